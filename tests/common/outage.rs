//! A service that can die: an emulator killed abruptly (its runtime shut down: every
//! socket closes without a close frame, as when the process dies) and started again on
//! the same port, with a fixed access key so that tokens stay valid across the restart;
//! and an upstream that never answers.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use webpubsub_emulator::{Config, Emulator, TokenOptions};

/// The hub of the services.
pub const HUB: &str = "hub";
const KEY: &str = "outage-test-access-key-0123456789abcdefghijk";

/// An emulator on a runtime of its own.
pub struct Service {
    rt: tokio::runtime::Runtime,
    emulator: Option<Emulator>,
}

impl Service {
    /// Listens on `port` (0: the OS picks); `upstream` receives the user events.
    pub fn start(port: u16, upstream: Option<String>) -> Service {
        // On a thread of its own: a runtime is neither made nor dropped within another's
        // context (the tests' own may be running here).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let config = Config {
                port,
                access_key: Some(KEY.into()),
                upstream,
                ..Config::default()
            };
            let emulator = rt.block_on(Emulator::start(config)).unwrap();
            Service {
                rt,
                emulator: Some(emulator),
            }
        })
        .join()
        .unwrap()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.emulator.as_ref().unwrap().port()
    }

    /// Kills it: every socket closes without a close frame; the port is free again.
    pub fn kill(mut self) {
        let emulator = self.emulator.take();
        std::thread::spawn(move || {
            self.rt.shutdown_timeout(Duration::from_secs(5));
            drop(emulator);
        })
        .join()
        .unwrap();
    }
}

/// A client URL of `user` (every role) on `port`, valid for every service started there.
pub fn client_url(port: u16, user: &str) -> String {
    let audience = format!("http://127.0.0.1:{port}/client/hubs/{HUB}");
    let token = TokenOptions {
        user_id: Some(user.into()),
        roles: super::all_roles(),
        ..TokenOptions::default()
    };
    let jwt = webpubsub_emulator::auth::sign_client_token(KEY, &audience, &token);
    format!("ws://127.0.0.1:{port}/client/hubs/{HUB}?access_token={jwt}")
}

/// An upstream that takes every request and never answers (events wait for their ack):
/// its URL, and how many user events reached it (system events reach it too). It lives
/// as long as the process.
pub fn silent_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    std::thread::spawn(move || {
        for socket in listener.incoming() {
            let Ok(socket) = socket else { return };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut lines = BufReader::new(socket);
                let mut line = String::new();
                // Held open, unanswered, until the service goes away.
                while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line
                        .to_ascii_lowercase()
                        .starts_with("ce-type: azure.webpubsub.user.")
                    {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    line.clear();
                }
            });
        }
    });
    (url, reached)
}
