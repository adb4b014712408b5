//! The emulator's JWT verification and role matching on arbitrary tokens and role
//! patterns. Input: three lines, `token`, `role`, `group`. A token line starting with
//! `!` is the raw claims text, signed here with the right key so that claim parsing
//! (not only the signature check) is explored. Must never panic.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use webpubsub_emulator::auth::{self, Permission};

const KEY: &str = "fuzz-key";

fn signed(claims: &str) -> String {
    let head = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).expect("any key length");
    mac.update(head.as_bytes());
    format!(
        "{head}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (token, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (role, group) = rest.split_once('\n').unwrap_or((rest, "g"));
    let token = match token.strip_prefix('!') {
        Some(claims) => signed(claims),
        None => token.to_owned(),
    };
    for check_time in [true, false] {
        if let Ok(claims) = auth::verify(KEY, &token, check_time) {
            for aud in &claims.audiences {
                auth::audience_matches(aud, "/client/hubs/h", "127.0.0.1", 8080);
            }
        }
    }
    for perm in [Permission::JoinLeaveGroup, Permission::SendToGroup] {
        auth::role_grants(role, perm, group);
    }
});
