//! The codec's parser of client frames (`decode_upstream`, used by tools and tests):
//! never panics, and what it accepts survives encode + decode unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use webpubsub_client::protocol::json;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let Ok(decoded) = json::decode_upstream(&frame) else {
        return;
    };
    let encoded = json::encode_upstream(&decoded);
    let again = json::decode_upstream(&Bytes::from(encoded.clone()))
        .unwrap_or_else(|e| panic!("re-encoded frame {encoded:?} does not decode: {e}"));
    assert_eq!(decoded, again, "round trip changed the frame {encoded:?}");
});
