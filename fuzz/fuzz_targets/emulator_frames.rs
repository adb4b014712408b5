//! The emulator's handling of client text frames: the input is split into lines, each
//! one frame of the same connection (join, publish to itself, sequence acks, bad
//! frames...), run through the real frame handler. Its reliable buffer is small (8
//! messages), so that a few unacknowledged publications make it overflow, which closes
//! the connection. Must never panic, and the hub must be forgotten once the connection
//! is gone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use webpubsub_emulator::fuzzing::ClientFrames;

fuzz_target!(|data: &[u8]| {
    static EMULATOR: OnceLock<ClientFrames> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let emulator = EMULATOR.get_or_init(ClientFrames::default);
    emulator.connection(text.split('\n'));
    assert_eq!(emulator.hubs(), 0, "a hub outlived its last connection");
});
