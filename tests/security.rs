//! Client-side security, beyond tests/tls.rs (unknown CA) and tests/logging.rs (the
//! access token in every log record): a certificate for another host name fails
//! `start` with `Error::Tls` even when its CA is trusted, and neither the access token
//! nor a reconnection token (also as a hex frame dump) reaches the records the C log
//! callback receives, an error or a Debug form.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use webpubsub_client::{Client, ClientOptions, Credential, Error, Event};
use webpubsub_emulator::{Config, Emulator, TlsFiles, TokenOptions};

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// An emulator serving wss with a self-signed certificate for `names`; returns it
/// and the certificate (PEM).
async fn tls_emulator(names: &[&str], tag: &str) -> (Emulator, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = std::env::temp_dir().join(format!("wps-security-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let emulator = Emulator::start(Config {
        tls: Some(TlsFiles {
            cert: cert_path,
            key: key_path,
        }),
        ..Config::default()
    })
    .await
    .unwrap();
    // Read at the start: the files are no longer needed.
    std::fs::remove_dir_all(&dir).unwrap();
    (emulator, cert.cert.pem())
}

async fn start_with_ca(emulator: &Emulator, ca: Option<&str>) -> Result<(), Error> {
    let url = emulator.client_url("h", &TokenOptions::default());
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let options = ClientOptions {
        extra_ca_pem: ca.map(|pem| pem.as_bytes().to_vec()).into_iter().collect(),
        ..common::fast_options()
    };
    let (client, _events) = Client::with_channel(Credential::Url(url), options).unwrap();
    let result = client.start().await;
    client.stop().await;
    result
}

#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused_even_with_its_ca() {
    let (emulator, pem) = tls_emulator(&["wrong.example"], "wrong-host").await;
    match start_with_ca(&emulator, Some(&pem)).await {
        Err(Error::Tls(message)) => assert!(
            message.to_lowercase().contains("name") || message.contains("NotValidForName"),
            "{message}"
        ),
        other => panic!("a wrong host name must fail with Error::Tls, got {other:?}"),
    }
    emulator.shutdown().await;
}

// ---------------------------------------------------------------------------
// Tokens in logs
// ---------------------------------------------------------------------------

/// Every record the library hands to a C log callback (the FFI log bridge, as C and
/// Python applications receive them), formatted.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn on_log(
    _user_data: *mut std::ffi::c_void,
    level: u32,
    target: *const std::ffi::c_char,
    message: *const std::ffi::c_char,
) {
    let text = |p: *const std::ffi::c_char| {
        // SAFETY: the bridge passes NUL-terminated strings valid during the call.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    };
    let line = format!("{level} {}: {}", text(target), text(message));
    LINES.lock().unwrap().push(line);
}

type LogCallback = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    u32,
    *const std::ffi::c_char,
    *const std::ffi::c_char,
);

extern "C" {
    /// The C API's `wps_set_log_callback` (exported by the library crate).
    fn wps_set_log_callback(
        cb: Option<LogCallback>,
        user_data: *mut std::ffi::c_void,
        max_level: u32,
    ) -> u32;
}

/// Routes the library's logs, up to TRACE, to `on_log`.
fn capture() {
    // SAFETY: `on_log` may run on any thread and ignores its user data.
    let status = unsafe { wps_set_log_callback(Some(on_log), std::ptr::null_mut(), 5) };
    assert_eq!(status, 0);
}

/// A bare WebSocket server end written by hand, so that the only WebSocket code that
/// logs in this process is the client's.
struct Raw(tokio::net::TcpStream);

impl Raw {
    /// Sends one unmasked frame.
    async fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut head = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => head.push(n as u8),
            n @ 126..=65535 => {
                head.push(126);
                head.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                head.push(127);
                head.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.0.write_all(&head).await.unwrap();
        self.0.write_all(payload).await.unwrap();
    }

    async fn text(&mut self, text: &str) {
        self.frame(1, text.as_bytes()).await;
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let payload = [&code.to_be_bytes()[..], reason.as_bytes()].concat();
        self.frame(8, &payload).await;
    }
}

/// Accepts one WebSocket upgrade; returns the socket and the request line.
async fn accept(listener: &TcpListener) -> (Raw, String) {
    let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let head = common::request_head(&mut tcp).await;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap()
    };
    let accept = derive_accept_key(header("Sec-WebSocket-Key").as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        header("Sec-WebSocket-Protocol")
    );
    tcp.write_all(response.as_bytes()).await.unwrap();
    let line = head.lines().next().unwrap().to_owned();
    (Raw(tcp), line)
}

const ACCESS: [&str; 3] = ["AccessSecretOne", "AccessSecretTwo", "AccessSecretThree"];
const RECONNECTION: [&str; 2] = ["ReconnSecretOne", "ReconnSecretTwo"];

/// A secret in the forms it could leak in: as is, percent-encoded is the same
/// (alphanumeric), and as the hex of its bytes (frame dumps).
fn leaks(line: &str, secret: &str) -> bool {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    line.contains(secret) || line.to_lowercase().contains(&hex)
}

#[tokio::test]
async fn access_and_reconnection_tokens_never_reach_logs_or_errors() {
    capture();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "ws://{}/client/hubs/h?access_token=",
        listener.local_addr().unwrap()
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let (b, n) = (base.clone(), calls.clone());
    let credential = Credential::provider(move || {
        let i = n.fetch_add(1, Ordering::SeqCst).min(ACCESS.len() - 1);
        let url = format!("{b}{}", ACCESS[i]);
        async move { Ok(url) }
    });
    let (client, mut events) = Client::with_channel(credential, common::fast_options()).unwrap();
    let c = client.clone();
    let start = tokio::spawn(async move { c.start().await });

    let connected = |id: &str, token: &str| {
        format!(
            r#"{{"type":"system","event":"connected","userId":"u","connectionId":"{id}","reconnectionToken":"{token}"}}"#
        )
    };

    // 1. First connection, then an abrupt drop: the recovery URL carries both tokens.
    let (mut ws, uri) = accept(&listener).await;
    assert!(uri.contains(ACCESS[0]), "{uri}");
    ws.text(&connected("c1", RECONNECTION[0])).await;
    start.await.unwrap().unwrap();
    drop(ws);
    let (mut ws, uri) = accept(&listener).await;
    assert!(
        uri.contains(ACCESS[0]) && uri.contains(RECONNECTION[0]),
        "{uri}"
    );
    // 2. Recovered; a renewed reconnection token; then 1008 loses the session.
    ws.text(&connected("c1", RECONNECTION[1])).await;
    ws.text(r#"{"type":"message","from":"server","dataType":"text","data":"x","sequenceId":1}"#)
        .await;
    ws.close(1008, "policy").await;
    // 3. The reconnect (second token) gets HTTP 401; the next one (third) succeeds.
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut request = vec![0u8; 4096];
    let n = tcp.read(&mut request).await.unwrap();
    assert!(String::from_utf8_lossy(&request[..n]).contains(ACCESS[1]));
    tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    drop(tcp);
    let (mut ws, uri) = accept(&listener).await;
    assert!(uri.contains(ACCESS[2]), "{uri}");
    ws.text(&connected("c2", "fresh")).await;
    let (event, _) = common::wait_for(
        &mut events,
        10,
        |e| matches!(e, Event::Connected { connection_id, .. } if connection_id == "c2"),
    )
    .await;
    assert!(matches!(event, Event::Connected { .. }));
    client.stop().await;
    drop(ws);

    // 4. Errors and Debug forms of a credential and a failed start.
    let fixed = format!("{base}{}", ACCESS[0]);
    let (refused, _) = Client::with_channel(
        Credential::Url(fixed.clone()),
        ClientOptions {
            start_timeout: Duration::from_secs(2),
            ..common::fast_options()
        },
    )
    .unwrap();
    let r = refused.clone();
    let failing = tokio::spawn(async move { r.start().await });
    let (mut tcp, _) = listener.accept().await.unwrap();
    let _ = tcp.read(&mut request).await.unwrap();
    tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let error = failing.await.unwrap().unwrap_err();
    let mut texts = vec![
        error.to_string(),
        format!("{error:?}"),
        format!("{:?}", Credential::Url(fixed)),
        format!("{refused:?}"),
    ];

    // The bridge delivers from its own thread: wait (bounded) for the last records.
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = LINES.lock().unwrap().clone();
        if lines.iter().any(|l| l.contains("401")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        lines.iter().any(|l| l.contains("recover")),
        "the capture works: {lines:#?}"
    );
    texts.extend(lines);
    for line in &texts {
        for secret in ACCESS.iter().chain(RECONNECTION.iter()) {
            assert!(!leaks(line, secret), "{secret} leaked in: {line}");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
