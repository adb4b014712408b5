//! Azure Web PubSub client: an async Rust core behind a C ABI.
//!
//! Layers, bottom up: [`protocol`] (pure codec), [`transport`] (WebSocket over
//! TCP/TLS), [`client`] (the handle and its connection task), [`runtime`] (the one
//! process-wide tokio runtime every client runs on).

pub mod client;
pub mod ffi;
pub mod protocol;
pub mod runtime;
pub mod transport;

pub use client::{
    AckResult, Client, ClientOptions, ClientState, Credential, Error, Event, EventHandler,
    InvokeOptions, InvokeResult, RetryMode, RetryOptions, SendEventOptions, SendToGroupOptions,
};
pub use protocol::{Data, DataType, Protocol};
