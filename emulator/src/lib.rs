//! A local Azure Web PubSub-compatible server for development and tests.
//!
//! It speaks the client protocol (`json.webpubsub.azure.v1`,
//! `json.reliable.webpubsub.azure.v1` and plain WebSocket clients), the service REST
//! API used by the official server SDKs, forwards user events to an upstream over
//! CloudEvents, and offers fault-injection routes under `/_emulator/`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use webpubsub_emulator::{Config, Emulator, TokenOptions};
//! let emulator = Emulator::start(Config::default()).await?;
//! let url = emulator.client_url("chat", &TokenOptions::default());
//! println!("{} -> {url}", emulator.connection_string());
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
mod client_ws;
pub mod connection_string;
mod faults;
mod filter;
mod frames;
mod hub;
pub mod names;
mod outbound;
mod rest;
mod server;
mod slots;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::hub::Server;
pub use crate::upstream::SystemEvents;

/// Entry points for fuzzing the parsers of untrusted client input. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use crate::hub::Server;
    use crate::slots::Slots;
    use crate::Config;

    /// An emulator without a listener, to feed client frames to. Its reliable buffer
    /// holds 8 unacknowledged messages, so that a few frames can make it overflow.
    pub struct ClientFrames {
        server: Arc<Server>,
        /// Runs what the frame handling spawns (the removal of a connection whose
        /// buffer overflowed).
        runtime: tokio::runtime::Runtime,
    }

    impl Default for ClientFrames {
        fn default() -> Self {
            let config = Config {
                max_unacked_frames: 8,
                ..Config::default()
            };
            ClientFrames {
                server: Arc::new(Server {
                    access_key: "fuzz".into(),
                    port: 0,
                    public_host: "127.0.0.1".into(),
                    hubs: Default::default(),
                    stats: Default::default(),
                    upstream: None,
                    shutdown: CancellationToken::new(),
                    tasks: TaskTracker::new(),
                    slots: Slots::new(config.max_connections),
                    config,
                }),
                runtime: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime"),
            }
        }
    }

    impl ClientFrames {
        /// Feeds `frames` as the text frames of one new reliable connection, in order,
        /// until one would close it or one closed it. Returns how many were accepted.
        /// It runs them on its own runtime: not to be called from within another one.
        pub fn connection<'a>(&self, frames: impl IntoIterator<Item = &'a str>) -> usize {
            self.runtime.block_on(async {
                let mut conn = crate::client_ws::Detached::new(&self.server);
                let accepted = frames.into_iter().take_while(|f| conn.frame(f)).count();
                drop(conn);
                // Lets what the frames spawned run to its end.
                tokio::task::yield_now().await;
                accepted
            })
        }

        /// Hubs in the server's table: none once every connection fed is gone.
        pub fn hubs(&self) -> usize {
            self.server.hubs.len()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::ClientFrames;

        #[test]
        fn frames_are_handled_until_one_closes_the_connection() {
            let emulator = ClientFrames::default();
            let frames = [
                r#"{"type":"joinGroup","group":"g","ackId":1}"#,
                r#"{"type":"sendToGroup","group":"g","ackId":2,"dataType":"text","data":"x"}"#,
                r#"{"type":"sequenceAck","sequenceId":1}"#,
                r#"{"type":"nope","ackId":3}"#,
                "not json",
                r#"{"type":"ping"}"#,
            ];
            assert_eq!(emulator.connection(frames), 4);
            assert_eq!(emulator.connection([r#"{"type":"ping"}"#]), 1);
            assert_eq!(emulator.hubs(), 0);
        }

        #[test]
        fn a_connection_past_its_reliable_buffer_is_closed_outside_a_runtime() {
            let emulator = ClientFrames::default();
            let publish = r#"{"type":"sendToGroup","group":"g","dataType":"text","data":"x"}"#;
            let frames = std::iter::once(r#"{"type":"joinGroup","group":"g"}"#)
                .chain(std::iter::repeat_n(publish, 100));
            // Its own messages are never acknowledged: the ninth overflows the buffer,
            // which closes the connection.
            assert_eq!(emulator.connection(frames), 9);
            assert_eq!(emulator.hubs(), 0);
            assert_eq!(emulator.connection([r#"{"type":"ping"}"#]), 1);
        }
    }
}

/// PEM files for serving https/wss.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How to run the emulator. Every field has a default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1`).
    pub host: String,
    /// Port to listen on (default 0: the OS picks).
    pub port: u16,
    /// Access key signing every token (default: a random key). It goes into the
    /// connection string: `start` refuses an empty one, or one with `;` or a control
    /// character.
    pub access_key: Option<String>,
    /// Where `event`/`invoke` frames are POSTed as CloudEvents (default: none): an
    /// `http://` URL, else `start` fails.
    pub upstream: Option<String>,
    /// The system events posted to the upstream (default: `connected` and
    /// `disconnected`; `connect` is opt-in, as an upstream that does not handle it
    /// would refuse every connection).
    pub upstream_system_events: SystemEvents,
    /// Fault: drop every client socket abruptly every N ms (default: off).
    pub fault_drop_every_ms: Option<u64>,
    /// Largest WebSocket message accepted from a client, and largest upstream reply body
    /// read: a longer reply is an upstream failure (default 1 MiB).
    pub max_frame_bytes: usize,
    /// How long a dropped reliable connection stays recoverable (default 30 s).
    pub recovery_window: Duration,
    /// Serve https/wss with these PEM files (default: plain http/ws).
    pub tls: Option<TlsFiles>,
    /// Reliable protocol: unacknowledged frames kept per connection before it is
    /// closed for good (default 1000).
    pub max_unacked_frames: usize,
    /// Reliable protocol: unacknowledged bytes kept per connection (default 16 MiB).
    pub max_unacked_bytes: usize,
    /// Frames queued to one socket before a client that does not read is closed
    /// (default 1,000,000); a recovery whose replay does not fit ends the session.
    pub max_outbound_queue: usize,
    /// Bytes queued to one socket before a client that does not read is closed
    /// (default 64 MiB).
    pub max_outbound_bytes: usize,
    /// Each client socket's read buffer (default 8 KiB): zeroed by the socket's first
    /// read and held for its life, so it is what an idle client costs; a larger one
    /// reads a fast publisher's bursts in fewer calls (a benchmark raises it).
    pub read_buffer_bytes: usize,
    /// AckIds remembered per connection for `Duplicate` (default 1000).
    pub ack_window: usize,
    /// Timeout of one upstream request (default 30 s).
    pub upstream_timeout: Duration,
    /// Largest REST request body (default 1 MiB, like `max_frame_bytes`).
    pub max_rest_body_bytes: usize,
    /// Longest wait for a TLS handshake, an HTTP request head and a REST request body,
    /// and how long an idle keep-alive connection is kept (default 30 s).
    pub http_timeout: Duration,
    /// Client connections at once, over all hubs; a new one past it gets HTTP 429
    /// (default 100,000: the service's largest standard instance, 100 units of 1,000;
    /// the docs give the quota, not the answer, so 429 is the emulator's choice).
    pub max_connections: usize,
    /// Groups one connection may be in at once (default 10,000). The service documents
    /// no such limit: this one only bounds what one connection can make the emulator hold.
    pub max_groups_per_connection: usize,
    /// Keep-alive: a client socket that has sent nothing (no frame of any kind) for this
    /// long is sent a WebSocket ping (default 20 s, the service's documented default
    /// ping-pong interval; zero: never pinged).
    pub keep_alive_interval: Duration,
    /// Keep-alive: a client socket that has sent nothing for this long in all is dropped
    /// as an abrupt loss, as if its TCP connection had died: a reliable session stays
    /// recoverable (default 60 s; zero: never dropped for its silence).
    pub keep_alive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 0,
            access_key: None,
            upstream: None,
            upstream_system_events: SystemEvents::default(),
            fault_drop_every_ms: None,
            max_frame_bytes: 1024 * 1024,
            recovery_window: Duration::from_secs(30),
            tls: None,
            max_unacked_frames: 1000,
            max_unacked_bytes: 16 * 1024 * 1024,
            max_outbound_queue: 1_000_000,
            max_outbound_bytes: 64 * 1024 * 1024,
            read_buffer_bytes: 8 * 1024,
            ack_window: 1000,
            upstream_timeout: Duration::from_secs(30),
            max_rest_body_bytes: 1024 * 1024,
            http_timeout: Duration::from_secs(30),
            max_connections: 100_000,
            max_groups_per_connection: 10_000,
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(60),
        }
    }
}

/// Claims of a client token made by [`Emulator::client_url`] or
/// [`auth::sign_client_token`].
#[derive(Debug, Default, Clone)]
pub struct TokenOptions {
    /// User id (`sub`).
    pub user_id: Option<String>,
    /// Roles, e.g. `webpubsub.joinLeaveGroup`, `webpubsub.sendToGroup.room1`.
    pub roles: Vec<String>,
    /// Groups joined at connect.
    pub groups: Vec<String>,
    /// Lifetime (default one hour).
    pub ttl: Option<Duration>,
}

/// A running emulator. Dropping it shuts it down (use [`Emulator::shutdown`] to wait).
pub struct Emulator {
    server: Arc<Server>,
    accept: Option<JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl Emulator {
    /// Binds the listener and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> std::io::Result<Emulator> {
        let (server, accept) = server::start(config).await?;
        Ok(Emulator {
            shutdown: server.shutdown.clone(),
            server,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The access key that signs tokens.
    pub fn access_key(&self) -> &str {
        &self.server.access_key
    }

    /// `http://HOST:PORT` (`https` with TLS). HOST is [`Config::host`] as URLs write it
    /// (an IP address in its canonical form, an IPv6 one in brackets, one with a zone as
    /// given), or, when it is an unspecified address (every interface, no address to
    /// connect to) however spelled, `127.0.0.1`, or `[::1]` for an IPv6 listener that
    /// takes no IPv4 connections.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// `Endpoint=http://HOST;Port=PORT;AccessKey=KEY;Version=1.0;` (`https` with TLS),
    /// HOST as in [`Emulator::endpoint`].
    pub fn connection_string(&self) -> String {
        let scheme = if self.server.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!(
            "Endpoint={scheme}://{};Port={};AccessKey={};Version=1.0;",
            self.server.public_host,
            self.port(),
            self.access_key()
        )
    }

    /// A ready client URL `ws(s)://HOST:PORT/client/hubs/{hub}?access_token=JWT`, HOST as
    /// in [`Emulator::endpoint`].
    pub fn client_url(&self, hub: &str, token: &TokenOptions) -> String {
        auth::client_url(&self.endpoint(), hub, self.access_key(), token)
    }

    /// Stops accepting, closes every socket (close code 1001) and waits for the
    /// server's tasks to end (at most a few seconds).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        self.server.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server.tasks.wait()).await;
        server::forget_all(&self.server);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
        server::forget_all(&self.server);
    }
}
