//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod outage;
pub mod pki;
pub mod proxy;

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use webpubsub_client::{
    Client, ClientOptions, ClientState, Credential, Error, Event, RetryMode, RetryOptions,
};

/// Options with every timer shortened so tests run in seconds.
pub fn fast_options() -> ClientOptions {
    ClientOptions {
        message_retry: RetryOptions {
            max_retries: Some(2),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        },
        reconnect_retry: RetryOptions {
            max_retries: Some(20),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        },
        ack_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(5),
        recovery_window: Duration::from_secs(5),
        recovery_attempt_delay: Duration::from_millis(100),
        sequence_ack_interval: Duration::from_millis(100),
        ..ClientOptions::default()
    }
}

/// The next event, failing the test after `secs` seconds.
pub async fn next_event(events: &mut UnboundedReceiver<Event>, secs: u64) -> Event {
    match tokio::time::timeout(Duration::from_secs(secs), events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("event channel closed"),
        Err(_) => panic!("no event within {secs} s"),
    }
}

/// Skips events until one matches, failing after `secs` seconds; returns it and the
/// events skipped on the way.
pub async fn wait_for(
    events: &mut UnboundedReceiver<Event>,
    secs: u64,
    mut matches: impl FnMut(&Event) -> bool,
) -> (Event, Vec<Event>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if matches(&event) => return (event, skipped),
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("event channel closed; skipped {skipped:?}"),
            Err(_) => panic!("no matching event within {secs} s; skipped {skipped:?}"),
        }
    }
}

/// Waits until `done` holds, polling, at most 30 s; panics naming `what`.
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `done` holds, polling from async code, at most `limit`; panics naming
/// `what`.
pub async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every event already queued (without waiting).
pub fn drain(events: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut all = Vec::new();
    while let Ok(event) = events.try_recv() {
        all.push(event);
    }
    all
}

/// The text payload of a group or server message.
pub fn message_text(event: &Event) -> Option<String> {
    match event {
        Event::GroupMessage { data, .. } | Event::ServerMessage { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (connection closed after it); returns
/// the status and the body.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Calls an emulator test route (`:drop`, `:mute?ms=`, `:dropAcks?count=`, `:close?code=`).
pub async fn fault(
    emulator: &webpubsub_emulator::Emulator,
    hub: &str,
    connection_id: &str,
    action: &str,
) {
    let path = format!("/_emulator/hubs/{hub}/connections/{connection_id}/{action}");
    let (status, body) = http(emulator.port(), "POST", &path, &[], b"").await;
    assert_eq!(status, 200, "{path}: {body}");
}

/// The emulator's counters.
pub async fn stats(emulator: &webpubsub_emulator::Emulator) -> serde_json::Value {
    let (status, body) = http(emulator.port(), "GET", "/_emulator/stats", &[], b"").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Waits until the emulator's counters satisfy `done`: at most `secs` seconds, then
/// panics with `what` and the counters.
pub async fn until_stats(
    emulator: &webpubsub_emulator::Emulator,
    what: &str,
    secs: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let counters = stats(emulator).await;
        if done(&counters) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {counters}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `Authorization` header value of a service REST request to `path`.
pub fn rest_authorization(emulator: &webpubsub_emulator::Emulator, path: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"aud": format!("{}{path}", emulator.endpoint()), "exp": exp});
    format!(
        "Bearer {}",
        webpubsub_emulator::auth::sign(emulator.access_key(), &claims)
    )
}

/// Sends text to one connection through the service REST API (a server message).
pub async fn rest_send_to_connection(
    emulator: &webpubsub_emulator::Emulator,
    hub: &str,
    id: &str,
    text: &str,
) {
    let path = format!("/api/hubs/{hub}/connections/{id}/:send?api-version=2024-12-01");
    let auth = rest_authorization(emulator, &path);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "text/plain"),
    ];
    let (status, body) = http(emulator.port(), "POST", &path, &headers, text.as_bytes()).await;
    assert_eq!(status, 202, "{body}");
}

/// Roles allowing every group operation.
pub fn all_roles() -> Vec<String> {
    vec![
        "webpubsub.joinLeaveGroup".into(),
        "webpubsub.sendToGroup".into(),
    ]
}

/// A token for `user` with [`all_roles`].
pub fn user_token(user: &str) -> webpubsub_emulator::TokenOptions {
    webpubsub_emulator::TokenOptions {
        user_id: Some(user.into()),
        roles: all_roles(),
        ..webpubsub_emulator::TokenOptions::default()
    }
}

/// State for callbacks of a client under test, never freed: when an assertion fails
/// with the client still running, its callbacks keep a valid pointer while the test
/// unwinds (state on the test's stack would be freed under them: SIGSEGV, not the
/// assertion's message).
pub fn leaked<T: Default>() -> &'static T {
    Box::leak(Box::default())
}

/// State that callbacks on other threads update, with a bounded wait for a condition.
pub struct Watched<T> {
    /// The state; notify `changed` after changing it.
    pub seen: std::sync::Mutex<T>,
    /// Signalled on every change.
    pub changed: std::sync::Condvar,
}

impl<T: Default> Default for Watched<T> {
    fn default() -> Self {
        Watched {
            seen: std::sync::Mutex::new(T::default()),
            changed: std::sync::Condvar::new(),
        }
    }
}

impl<T> Watched<T> {
    /// Waits until `done` holds; panics naming `what` after 30 s.
    pub fn wait(&self, what: &str, done: impl Fn(&T) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut seen = self.seen.lock().unwrap();
        while !done(&seen) {
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            seen = self.changed.wait_timeout(seen, left).unwrap().0;
        }
    }
}

/// Panics with the library's last error unless `status` is `WPS_STATUS_OK` (C ABI tests).
pub fn check(status: u32, what: &str) {
    use webpubsub_client::ffi::status::{wps_last_error_message, WPS_STATUS_OK};
    if status != WPS_STATUS_OK {
        let detail = unsafe { std::ffi::CStr::from_ptr(wps_last_error_message()) };
        panic!("{what}: status {status}: {detail:?}");
    }
}

/// This thread's last error message of the library (C ABI tests).
pub fn last_error() -> String {
    let message = unsafe {
        std::ffi::CStr::from_ptr(webpubsub_client::ffi::status::wps_last_error_message())
    };
    message.to_string_lossy().into_owned()
}

/// An emulator on a runtime of its own, with a client URL of user `u` (C ABI tests).
pub fn ffi_emulator() -> (
    tokio::runtime::Runtime,
    webpubsub_emulator::Emulator,
    std::ffi::CString,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt
        .block_on(webpubsub_emulator::Emulator::start(
            webpubsub_emulator::Config::default(),
        ))
        .unwrap();
    let url = std::ffi::CString::new(emulator.client_url("hub", &user_token("u"))).unwrap();
    (rt, emulator, url)
}

/// A new C client without event callback whose URL comes from `cred`, with `opts`
/// (NULL: the defaults) and the credential's finalizer `cred_free` (not started);
/// panics on failure.
pub fn ffi_credential_client(
    cred: unsafe extern "C" fn(
        *mut std::ffi::c_void,
        *mut webpubsub_client::ffi::credential::wps_credential_result,
    ),
    user_data: *mut std::ffi::c_void,
    cred_free: webpubsub_client::ffi::callbacks::wps_user_data_free_cb,
    opts: *const webpubsub_client::ffi::options::wps_options,
) -> *mut webpubsub_client::ffi::client::wps_client {
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        webpubsub_client::ffi::client::wps_client_new_with_credential(
            Some(cred),
            user_data,
            cred_free,
            opts,
            None,
            std::ptr::null_mut(),
            None,
            &mut c,
        )
    };
    check(status, "wps_client_new_with_credential");
    c
}

/// A new C client of `url` with default options (not started); panics on failure.
pub fn ffi_client(
    url: &std::ffi::CStr,
    on_event: webpubsub_client::ffi::callbacks::wps_event_cb,
    user_data: *mut std::ffi::c_void,
    on_free: webpubsub_client::ffi::callbacks::wps_user_data_free_cb,
) -> *mut webpubsub_client::ffi::client::wps_client {
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        webpubsub_client::ffi::client::wps_client_new(
            url.as_ptr(),
            std::ptr::null(),
            on_event,
            user_data,
            on_free,
            &mut c,
        )
    };
    check(status, "wps_client_new");
    c
}

/// A new C client of `url` in poll dispatch mode (not started); panics on failure.
pub fn ffi_poll_client(
    url: &std::ffi::CStr,
    on_event: webpubsub_client::ffi::callbacks::wps_event_cb,
    user_data: *mut std::ffi::c_void,
    on_free: webpubsub_client::ffi::callbacks::wps_user_data_free_cb,
) -> *mut webpubsub_client::ffi::client::wps_client {
    use webpubsub_client::ffi::options::{
        wps_options_free, wps_options_new, wps_options_set_dispatch_mode,
    };
    use webpubsub_client::ffi::status::WPS_DISPATCH_POLL;
    let o = wps_options_new();
    check(
        wps_options_set_dispatch_mode(o, WPS_DISPATCH_POLL),
        "dispatch mode",
    );
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        webpubsub_client::ffi::client::wps_client_new(
            url.as_ptr(),
            o,
            on_event,
            user_data,
            on_free,
            &mut c,
        )
    };
    unsafe { wps_options_free(o) };
    check(status, "wps_client_new");
    c
}

/// A blocking send of `text` to `group` with `flags`; its status.
pub fn ffi_send_text(
    c: *mut webpubsub_client::ffi::client::wps_client,
    group: &std::ffi::CStr,
    text: &str,
    flags: u32,
) -> u32 {
    unsafe {
        webpubsub_client::ffi::client::wps_client_send_to_group(
            c,
            group.as_ptr(),
            webpubsub_client::ffi::status::WPS_DATA_TYPE_TEXT,
            text.as_ptr(),
            text.len(),
            flags,
            std::ptr::null_mut(),
        )
    }
}

/// Reads one HTTP/1.1 request on a test upstream's connection: its header lines
/// (lowercased, without the line end) and its body (`content-length` bytes). `None`
/// once the peer has closed the connection or cut the body short.
pub async fn read_request(
    stream: &mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> Option<(Vec<String>, Vec<u8>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        headers.push(line.trim_end().to_ascii_lowercase());
    }
    let length = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some((headers, body))
}

/// An emulator on `rt` whose upstream takes every request and never answers: events
/// with an ack and invocations stay pending. Returns it with a client URL of user `u`.
pub fn emulator_with_silent_upstream(
    rt: &tokio::runtime::Runtime,
) -> (webpubsub_emulator::Emulator, std::ffi::CString) {
    let upstream = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let upstream_url = format!("http://{}/", upstream.local_addr().unwrap());
    rt.spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = upstream.accept().await {
            held.push(socket);
        }
    });
    let config = webpubsub_emulator::Config {
        upstream: Some(upstream_url),
        ..webpubsub_emulator::Config::default()
    };
    let emulator = rt
        .block_on(webpubsub_emulator::Emulator::start(config))
        .unwrap();
    let url = emulator.client_url("hub", &user_token("u"));
    (emulator, std::ffi::CString::new(url).unwrap())
}

/// A started client of `url`, its connected event taken.
pub async fn started(
    url: String,
    options: ClientOptions,
) -> (webpubsub_client::Client, UnboundedReceiver<Event>) {
    let credential = webpubsub_client::Credential::Url(url);
    let (client, mut events) = webpubsub_client::Client::with_channel(credential, options).unwrap();
    client.start().await.unwrap();
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    (client, events)
}

/// The next text frame a client wrote to a scripted service, as JSON (pings skipped;
/// at most 10 s).
pub async fn next_client_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame from the client within 10 s")
            .expect("connection closed")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ping" {
                return value;
            }
        }
    }
}

/// An event as it reached a [`StateAtEvent`]: its kind, and the client's state and
/// connection id at that moment.
pub type Seen = (&'static str, ClientState, Option<String>);

/// Records the client's state and connection id when each event reaches the handler
/// (from the connection task, as the event is raised): what a listener calling the
/// client from the event finds.
#[derive(Default)]
pub struct StateAtEvent {
    client: std::sync::OnceLock<Client>,
    seen: std::sync::Mutex<Vec<Seen>>,
}

impl StateAtEvent {
    /// A client of `credential` whose events go to a new recorder; both.
    pub fn client(credential: Credential, options: ClientOptions) -> (Client, Arc<StateAtEvent>) {
        let handler = Arc::new(StateAtEvent::default());
        let client = Client::new(credential, options, handler.clone()).unwrap();
        handler.client.set(client.clone()).ok().unwrap();
        (client, handler)
    }

    /// What was recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` events were recorded, at most 10 s; returns them.
    pub async fn until(&self, n: usize) -> Vec<Seen> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} events expected, got {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl webpubsub_client::EventHandler for StateAtEvent {
    fn on_event(&self, event: Event) {
        let kind = match event {
            Event::Connected { .. } => "connected",
            Event::Disconnected { .. } => "disconnected",
            Event::Stopped { .. } => "stopped",
            Event::RejoinGroupFailed { .. } => "rejoinGroupFailed",
            Event::ServerMessage { .. } => "serverMessage",
            Event::GroupMessage { .. } => "groupMessage",
            other => panic!("an event this test does not know: {other:?}"),
        };
        let client = self.client.get();
        let state = client.map_or(ClientState::Stopped, Client::state);
        let connection_id = client.and_then(Client::connection_id);
        self.seen.lock().unwrap().push((kind, state, connection_id));
    }
}

/// A scripted service on a free loopback port, run on `rt`: the client URL to reach it
/// and the service's task.
pub fn scripted<F>(
    rt: &tokio::runtime::Runtime,
    service: impl FnOnce(tokio::net::TcpListener) -> F,
) -> (std::ffi::CString, tokio::task::JoinHandle<F::Output>)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("ws://{}/client/hubs/h", listener.local_addr().unwrap());
    (
        std::ffi::CString::new(url).unwrap(),
        rt.spawn(service(listener)),
    )
}

/// The scripted services' connection: the client's WebSocket, accepted with the
/// subprotocol it asked for, and its `connected` frame sent.
pub async fn accepted_connected(
    listener: tokio::net::TcpListener,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = accepted(&listener).await;
    let connected = r#"{"type":"system","event":"connected","connectionId":"c1"}"#;
    ws.send(Message::text(connected)).await.unwrap();
    ws
}

/// The next client WebSocket of a scripted service, accepted with the subprotocol it
/// asked for (at most 10 s).
#[allow(clippy::result_large_err)] // the handshake callback's type is tungstenite's
pub async fn accepted(
    listener: &tokio::net::TcpListener,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("no connection within 10 s")
        .unwrap();
    tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
        if let Some(protocol) = req.headers().get("Sec-WebSocket-Protocol").cloned() {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", protocol);
        }
        Ok(resp)
    })
    .await
    .unwrap()
}

/// Reads one HTTP request head from `tcp`, byte by byte (nothing after it is taken);
/// each byte must come within 5 s.
pub async fn request_head(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("a request head in time");
        assert!(read.unwrap() == 1, "request cut short");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A server on 127.0.0.1 that takes connections, reads what comes and never answers, as
/// a stalled proxy or TLS server: its address, and a receiver that gets each
/// connection's first bytes.
pub async fn silent_server() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 4096];
                let n = tcp.read(&mut first).await.unwrap_or(0);
                first.truncate(n);
                let _ = sender.send(first);
                // Held open, unanswered, until the client closes it.
                while tcp.read(&mut [0u8; 4096]).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    (addr, received)
}

/// A client of `url` with `options` whose connection stalls at a `silent_server`
/// (`received` gets each connection's first bytes): with a 300 ms start timeout, the
/// start fails with `StartTimeout` naming `waiting_for`; with a 60 s one, a stop made
/// once the start has sent its first bytes (returned) returns at once, and the start
/// ends with `Stopped`. Neither start raises `Disconnected`; only the stop raises
/// `Stopped` (without an error).
pub async fn stalled_start(
    url: Credential,
    options: ClientOptions,
    received: &mut UnboundedReceiver<Vec<u8>>,
    waiting_for: String,
) -> Vec<u8> {
    let short = ClientOptions {
        start_timeout: Duration::from_millis(300),
        ..options.clone()
    };
    let (client, mut events) = Client::with_channel(url.clone(), short).unwrap();
    assert_eq!(
        client.start().await,
        Err(Error::StartTimeout {
            after: Duration::from_millis(300),
            waiting_for,
        })
    );
    received.recv().await.unwrap();
    assert_eq!(drain(&mut events), [], "a failed start raised an event");

    let long = ClientOptions {
        start_timeout: Duration::from_secs(60),
        ..options
    };
    let (client, mut events) = Client::with_channel(url, long).unwrap();
    let starting = tokio::spawn({
        let client = client.clone();
        async move { client.start().await }
    });
    let first = received.recv().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.stop())
        .await
        .expect("the stop ends the start's wait at once");
    let started = tokio::time::timeout(Duration::from_secs(5), starting).await;
    assert_eq!(
        started.expect("the start ends with the stop").unwrap(),
        Err(Error::Stopped { ack_id: None })
    );
    assert_eq!(drain(&mut events), [Event::Stopped { error: None }]);
    first
}
