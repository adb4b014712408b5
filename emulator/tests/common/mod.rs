//! Test helpers: a running emulator, raw WebSocket clients and REST calls.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
pub use webpubsub_emulator::{Config, Emulator, TokenOptions};

pub const JSON: &str = "json.webpubsub.azure.v1";
pub const RELIABLE: &str = "json.reliable.webpubsub.azure.v1";
/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn start() -> Emulator {
    start_with(Config::default()).await
}

pub async fn start_with(config: Config) -> Emulator {
    Emulator::start(config).await.expect("emulator starts")
}

/// Token options with every role.
pub fn all_roles(user: &str) -> TokenOptions {
    TokenOptions {
        user_id: Some(user.into()),
        roles: vec![
            "webpubsub.joinLeaveGroup".into(),
            "webpubsub.sendToGroup".into(),
        ],
        ..Default::default()
    }
}

pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub protocol: Option<String>,
}

/// Connects to `url` offering `protocol`; panics on failure.
pub async fn connect(url: &str, protocol: Option<&str>) -> Ws {
    try_connect(url, protocol)
        .await
        .expect("websocket connects")
}

pub async fn try_connect(
    url: &str,
    protocol: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request()?;
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let (inner, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")?;
    let protocol = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok(Ws { inner, protocol })
}

/// Connects and reads the `connected` frame.
pub async fn connect_json(url: &str, protocol: &str) -> (Ws, Value) {
    let mut ws = connect(url, Some(protocol)).await;
    let connected = ws.next_json().await;
    assert_eq!(connected["type"], "system", "{connected}");
    assert_eq!(connected["event"], "connected", "{connected}");
    (ws, connected)
}

impl Ws {
    pub async fn send_json(&mut self, v: Value) {
        self.inner
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.inner
            .send(Message::Text(s.to_owned().into()))
            .await
            .expect("send");
    }

    /// The next frame of any kind (pings skipped).
    pub async fn next_message(&mut self) -> Message {
        loop {
            let m = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("a frame in time")
                .expect("stream open")
                .expect("no socket error");
            if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
                return m;
            }
        }
    }

    /// The next frame, parsed as JSON.
    pub async fn next_json(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads until the close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let item = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close in time");
            match item {
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return (code.into(), reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Reads until the socket ends without a close frame (an abrupt drop).
    pub async fn expect_abrupt_end(&mut self) {
        loop {
            let item = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("end in time");
            match item {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(f))) => panic!("expected no close frame, got {f:?}"),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a frame with an ackId and returns the ack (skipping `skip_other` frames).
    pub async fn call(&mut self, frame: Value) -> Value {
        let ack_id = frame["ackId"].clone();
        self.send_json(frame).await;
        loop {
            let f = self.next_json().await;
            if f["type"] == "ack" && f["ackId"] == ack_id {
                return f;
            }
        }
    }

    pub async fn join(&mut self, group: &str, ack_id: u64) -> Value {
        self.call(json!({"type": "joinGroup", "group": group, "ackId": ack_id}))
            .await
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

pub fn assert_ack_ok(ack: &Value) {
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["success"], true, "{ack}");
}

pub fn assert_ack_error(ack: &Value, name: &str) {
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["success"], false, "{ack}");
    assert_eq!(ack["error"]["name"], name, "{ack}");
}

/// A signed REST bearer token for `url` (the full request URL).
pub fn rest_token(emulator: &Emulator, url: &str) -> String {
    webpubsub_emulator::auth::sign(
        emulator.access_key(),
        &json!({"aud": url, "exp": now() + 3600, "iat": now()}),
    )
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn stats(emulator: &Emulator) -> Value {
    reqwest::get(format!("{}/_emulator/stats", emulator.endpoint()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls the stats until `done` holds of them, failing after `WAIT` with `what` never
/// having happened; returns them.
pub async fn stats_until(emulator: &Emulator, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = stats(emulator).await;
        if done(&now) {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn fault(emulator: &Emulator, hub: &str, conn: &str, action: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!(
            "{}/_emulator/hubs/{hub}/connections/{conn}/{action}",
            emulator.endpoint()
        ))
        .send()
        .await
        .unwrap()
}

/// The version and key header lines of a valid WebSocket upgrade request.
pub const WS_VERSION_AND_KEY: &str =
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// A complete WebSocket upgrade request for the client URL `url` of `emulator`, with
/// `headers` (header lines, each ending in CRLF: [`WS_VERSION_AND_KEY`] for a valid one).
pub fn upgrade_request(emulator: &Emulator, url: &str, headers: &str) -> String {
    let path = url
        .split_once(&format!(":{}", emulator.port()))
        .expect("a client URL of this emulator")
        .1;
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{headers}\r\n"
    )
}

/// A WebSocket peer upgraded by hand over raw TCP, offering `protocol`: the `101` head
/// is read and nothing more, so the peer answers nothing (not even a ping) until the
/// test makes it.
pub async fn raw_upgrade(emulator: &Emulator, url: &str, protocol: Option<&str>) -> TcpStream {
    raw_upgrade_sending(emulator, url, protocol, &[]).await
}

/// [`raw_upgrade`], with `pipelined` sent in the same write as the upgrade request.
pub async fn raw_upgrade_sending(
    emulator: &Emulator,
    url: &str,
    protocol: Option<&str>,
    pipelined: &[u8],
) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let offer = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let mut request =
        upgrade_request(emulator, url, &format!("{WS_VERSION_AND_KEY}{offer}")).into_bytes();
    request.extend_from_slice(pipelined);
    let mut tcp = TcpStream::connect(("127.0.0.1", emulator.port()))
        .await
        .unwrap();
    tcp.write_all(&request).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(WAIT, tcp.read(&mut byte))
            .await
            .expect("an upgrade answer in time");
        assert_eq!(read.unwrap(), 1, "closed before the upgrade");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// A client frame (RFC 6455 5.2): first byte `head` (FIN, RSV bits and opcode), then
/// `payload`, masked when `masked` as a client's frames must be.
pub fn client_frame(head: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![head];
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = if masked {
        [0x37, 0xfa, 0x21, 0x3d]
    } else {
        [0; 4]
    };
    if masked {
        frame.extend_from_slice(&key);
    }
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// Reads what the server sends until it ends the socket (a close or a reset). Panics
/// unless it ends within [`WAIT`] of the last bytes.
pub async fn bytes_until_end(tcp: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the server ends the socket in time");
        match read {
            Ok(0) | Err(_) => return bytes,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads what the server sends over a raw WebSocket until it ends the socket, and
/// returns its frames as (opcode, payload). Panics unless it ends within [`WAIT`].
pub async fn frames_until_end(tcp: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let bytes = bytes_until_end(tcp).await;
    // Server frames are not masked.
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let (len, head) = match rest[1] & 0x7f {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        frames.push((opcode, rest[head..head + len].to_vec()));
        rest = &rest[head + len..];
    }
    assert!(rest.is_empty(), "a partial frame: {rest:?}");
    frames
}

/// The emulator binary, killed when dropped.
pub struct Binary(pub std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the emulator binary on an OS-chosen port with `--access-key key` and `flags`;
/// returns it and the port from the connection string it prints first.
pub fn spawn_binary(key: &str, flags: &[&str]) -> (Binary, u16) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut binary = Binary(
        Command::new(env!("CARGO_BIN_EXE_webpubsub-emulator"))
            .args(["--port", "0", "--access-key", key])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    );
    let mut line = String::new();
    BufReader::new(binary.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("Port=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (binary, port)
}
