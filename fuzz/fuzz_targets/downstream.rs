//! The client's parser of service frames (`decode_downstream`): never panics on any
//! input, and whatever it accepts survives encode + decode unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use webpubsub_client::protocol::{json, Downstream};

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let Ok(decoded) = json::decode_downstream(&frame) else {
        return;
    };
    if matches!(decoded, Downstream::Unknown { .. }) {
        return;
    }
    let encoded = json::encode_downstream(&decoded);
    let again = json::decode_downstream(&Bytes::from(encoded.clone()))
        .unwrap_or_else(|e| panic!("re-encoded frame {encoded:?} does not decode: {e}"));
    assert_eq!(decoded, again, "round trip changed the frame {encoded:?}");
});
