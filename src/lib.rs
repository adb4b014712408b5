//! Azure Web PubSub client: an async Rust core behind a C ABI.

pub mod ffi;
