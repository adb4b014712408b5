//! Azure Web PubSub client: an async Rust core behind a C ABI.
//!
//! Layers, bottom up: [`protocol`] (pure codec), [`transport`] (WebSocket over
//! TCP/TLS, directly or through the HTTP proxy [`proxy`] picks), [`client`] (the handle
//! and its connection task), [`runtime`] (the one process-wide tokio runtime every
//! client runs on).
//!
//! Logs go to the `log` crate under the target `webpubsub_client`, at every level
//! without an access or reconnection token (URLs show `access_token=***`). Its
//! WebSocket dependency logs whole frames at trace level under `tungstenite`, the
//! service's `connected` frame with its reconnection token included: keep that target
//! below trace in a log that others may read. (The C API and the Python binding pass
//! on only the library's own records.)
//!
//! ```no_run
//! use webpubsub_client::{Client, ClientOptions, Credential, DataType, Event, SendToGroupOptions};
//!
//! # async fn demo() -> Result<(), webpubsub_client::Error> {
//! let url = "wss://example.webpubsub.azure.com/client/hubs/chat?access_token=...".to_owned();
//! let (client, mut events) = Client::with_channel(Credential::Url(url), ClientOptions::default())?;
//! client.start().await?;
//! client.join_group("room").await?;
//! client.send_to_group("room", DataType::Text, "hello".into(), SendToGroupOptions::default()).await?;
//! // Print the group's messages until one says "bye".
//! while let Some(event) = events.recv().await {
//!     if let Event::GroupMessage { group, data, .. } = event {
//!         println!("{group}: {}", String::from_utf8_lossy(&data));
//!         if data == "bye" {
//!             break;
//!         }
//!     }
//! }
//! client.stop().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod ffi;
mod fork;
mod id_hash;
pub mod protocol;
pub mod proxy;
pub mod runtime;
pub mod transport;
mod try_once;

pub use client::{
    AckResult, Client, ClientOptions, ClientState, Credential, Error, Event, EventHandler,
    InvokeOptions, InvokeResult, Resume, RetryMode, RetryOptions, SendEventOptions,
    SendToGroupOptions, WeakClient,
};
pub use protocol::{Data, DataType, Protocol};
pub use proxy::ProxySetting;
