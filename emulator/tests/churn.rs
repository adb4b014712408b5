//! Connection churn: after clients come and go in every way they can (clean closes,
//! abrupt drops, stalled handshakes, recoveries, expired and racing recoveries, work in
//! flight, REST calls on unknown names), the server is back to what it held before:
//! sockets, tasks, hubs, groups, users, sessions awaiting recovery, slots, replay
//! buffers, outbound bytes, invocations and upstream requests.
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

/// Recovery window of every emulator here: long enough to recover, short to expire.
const WINDOW: Duration = Duration::from_millis(400);

/// Short windows and timeouts, so that everything that ends by a timer ends fast.
fn fast() -> Config {
    Config {
        recovery_window: WINDOW,
        http_timeout: Duration::from_millis(300),
        ..Config::default()
    }
}

/// The gauges of `GET /_emulator/stats` that churn must not change.
const HELD: [&str; 11] = [
    "connections",
    "hubs",
    "groups",
    "users",
    "userGroups",
    "awaitingRecovery",
    "slotsTaken",
    "unackedMessages",
    "outboundBytes",
    "pendingInvocations",
    "tasks",
];

/// What the emulator holds, seen from its stats and from this process.
#[derive(Debug, PartialEq)]
struct Census {
    held: Vec<(&'static str, Value)>,
    /// Sockets accepted on the emulator's port that still have a descriptor here.
    sockets: usize,
    /// Tasks alive on the test's runtime (None when not compared).
    runtime_tasks: Option<usize>,
}

/// Inodes of the sockets this process has descriptors for.
fn socket_inodes() -> HashSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            l.parse().ok()
        })
        .collect()
}

/// Sockets with local port `port`, not listening, with a descriptor in this process.
fn server_sockets(port: u16) -> usize {
    let fds = socket_inodes();
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port
                && cols[3] != "0A"
                && fds.contains(&cols[9].parse().unwrap())
        })
        .count()
}

async fn census(emu: &Emulator, runtime_tasks: bool) -> Census {
    // Counted before the stats request, whose own socket and tasks end just after it.
    let sockets = server_sockets(emu.port());
    let runtime_tasks = runtime_tasks.then(|| {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    });
    let stats = stats(emu).await;
    Census {
        held: HELD.iter().map(|k| (*k, stats[k].clone())).collect(),
        sockets,
        runtime_tasks,
    }
}

/// The census once it no longer moves.
async fn baseline(emu: &Emulator, runtime_tasks: bool) -> Census {
    let deadline = Instant::now() + WAIT;
    let mut last = census(emu, runtime_tasks).await;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = census(emu, runtime_tasks).await;
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "never settled: {now:?}");
        last = now;
    }
}

/// Waits until the census is back to `before`; panics with both after `within`.
async fn back_to(emu: &Emulator, before: &Census, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = census(emu, before.runtime_tasks.is_some()).await;
        if now == *before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not back to the baseline after {within:?}:\nbefore {before:?}\nnow    {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn tcp_of(ws: &Ws) -> &TcpStream {
    match ws.inner.get_ref() {
        MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("plain ws"),
    }
}

/// Drops the socket without a close frame; with `reset`, with a TCP RST instead of a FIN.
fn vanish(ws: Ws, reset: bool) {
    if reset {
        tcp_of(&ws).set_zero_linger().unwrap();
    }
    drop(ws);
}

fn recovery_url(url: &str, connected: &Value) -> String {
    format!(
        "{url}&awps_connection_id={}&awps_reconnection_token={}",
        connected["connectionId"].as_str().unwrap(),
        connected["reconnectionToken"].as_str().unwrap()
    )
}

fn to_group(group: &str, ack_id: Option<u64>) -> Value {
    let mut f = json!({"type":"sendToGroup","group":group,"dataType":"text","data":"x"});
    if let Some(id) = ack_id {
        f["ackId"] = id.into();
    }
    f
}

/// The status of a REST call whose body is `{"groups":["g"]}` (JSON data to a send).
async fn rest(emu: &Emulator, method: reqwest::Method, path: &str) -> u16 {
    let url = format!("{}{path}", emu.endpoint());
    reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(rest_token(emu, &url))
        .header("content-type", "application/json")
        .body(r#"{"groups":["g"]}"#)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn clean_closes_and_abrupt_drops_leave_nothing_behind() {
    let emu = start_with(fast()).await;
    let before = baseline(&emu, true).await;
    let url = emu.client_url("h", &all_roles("u"));
    for round in 0..6 {
        let reset = round % 2 == 1;
        // No subprotocol: raw frames only.
        let simple = connect(&url, None).await;
        if round < 3 {
            simple.close().await;
        } else {
            vanish(simple, reset);
        }
        for protocol in [JSON, RELIABLE] {
            let (mut ws, _) = connect_json(&url, protocol).await;
            assert_ack_ok(&ws.join("g", 1).await);
            // A message to itself: on the reliable protocol it waits for its sequenceAck.
            assert_ack_ok(&ws.call(to_group("g", Some(2))).await);
            if round < 3 {
                ws.close().await;
            } else {
                vanish(ws, reset);
            }
        }
    }
    back_to(&emu, &before, WINDOW + WAIT).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn handshakes_that_never_finish_give_everything_back() {
    let emu = start_with(fast()).await;
    let before = baseline(&emu, true).await;
    let url = emu.client_url("h", &all_roles("u"));
    let request = upgrade_request(&emu, &url, WS_VERSION_AND_KEY);
    let head = request.strip_suffix("\r\n").unwrap(); // without its blank line
    let mut peers = Vec::new();
    for stall in [
        String::new(),         // connects, says nothing
        head[..20].to_owned(), // half a request line
        head.to_owned(),       // a head without its end
    ] {
        let mut tcp = TcpStream::connect(("127.0.0.1", emu.port())).await.unwrap();
        tcp.write_all(stall.as_bytes()).await.unwrap();
        peers.push(tcp);
    }
    // Cut off by the HTTP timeout while they are still there.
    back_to(&emu, &before, WAIT).await;
    // Whole upgrade requests (the server upgrades without waiting for a body) from
    // peers that never read the answer and are then gone.
    for request in [
        request.clone(),
        format!("{head}Content-Length: 100\r\n\r\n"),
        format!("{head}Transfer-Encoding: chunked\r\n\r\n5\r\nab"),
    ] {
        let mut tcp = TcpStream::connect(("127.0.0.1", emu.port())).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        peers.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(peers);
    back_to(&emu, &before, WAIT).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn silent_upgraded_peers_are_let_go() {
    let emu = start_with(Config {
        keep_alive_interval: Duration::from_millis(100),
        keep_alive_timeout: Duration::from_millis(300),
        ..fast()
    })
    .await;
    let before = baseline(&emu, true).await;
    let token = TokenOptions {
        groups: vec!["g".into()],
        ..all_roles("u")
    };
    let url = emu.client_url("h", &token);
    // Upgraded, then silent for good: they never read, answer a ping or close.
    let mut peers = Vec::new();
    for protocol in [Some(JSON), Some(RELIABLE), None] {
        peers.push(raw_upgrade(&emu, &url, protocol).await);
    }
    // Let go while they are still open on this side (the reliable one after its window).
    back_to(&emu, &before, WINDOW + WAIT).await;
    drop(peers);
    emu.shutdown().await;
}

#[tokio::test]
async fn recoveries_racing_expiring_and_late_leave_nothing_behind() {
    let emu = start_with(fast()).await;
    let before = baseline(&emu, true).await;
    let url = emu.client_url("h", &all_roles("u"));
    // Joined a group and has a message of its own waiting for its sequenceAck.
    let session = || async {
        let (mut ws, connected) = connect_json(&url, RELIABLE).await;
        assert_ack_ok(&ws.join("g", 1).await);
        assert_ack_ok(&ws.call(to_group("g", Some(2))).await);
        (ws, recovery_url(&url, &connected))
    };

    // Recovered, then closed.
    let (ws, recover) = session().await;
    vanish(ws, true);
    let (mut again, _) = connect_json(&recover, RELIABLE).await;
    assert_eq!(again.next_json().await["sequenceId"], 1, "replayed");
    again.close().await;

    // Two recoveries at once: one wins, the other is dropped; then closed.
    let (ws, recover) = session().await;
    vanish(ws, false);
    let (a, b) = tokio::join!(
        try_connect(&recover, Some(RELIABLE)),
        try_connect(&recover, Some(RELIABLE))
    );
    for ws in [a, b].into_iter().flatten() {
        ws.close().await;
    }

    // Never recovered, and recovered too late.
    let (ws, late) = session().await;
    vanish(ws, false);
    let (ws, recover) = session().await;
    vanish(ws, true);
    tokio::time::sleep(WINDOW * 2).await;
    for url in [late, recover] {
        let mut ws = connect(&url, Some(RELIABLE)).await;
        assert_eq!(ws.expect_close().await.0, 1008);
    }
    back_to(&emu, &before, WAIT).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_recovered_session_keeps_no_recovery_timer() {
    let emu = start_with(Config {
        recovery_window: Duration::from_secs(60),
        ..fast()
    })
    .await;
    let before = baseline(&emu, true).await;
    let url = emu.client_url("h", &all_roles("u"));
    let (mut ws, connected) = connect_json(&url, RELIABLE).await;
    let recover = recovery_url(&url, &connected);
    for _ in 0..10 {
        vanish(ws, false);
        ws = connect_json(&recover, RELIABLE).await.0;
    }
    ws.close().await;
    back_to(&emu, &before, WAIT).await;
    emu.shutdown().await;
}

/// Requests an upstream received, and those it still holds.
#[derive(Clone, Default)]
struct Upstream {
    received: Arc<AtomicUsize>,
    holding: Arc<AtomicUsize>,
}

/// Counts down when dropped (the emulator gave the request up).
struct Holding(Arc<AtomicUsize>);

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An upstream that never answers the event `hang`, and answers others with 200.
async fn upstream() -> (String, Upstream) {
    let seen = Upstream::default();
    let counts = seen.clone();
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: axum::http::HeaderMap| {
            let counts = counts.clone();
            async move {
                if headers.get("ce-eventName").is_some_and(|e| e == "hang") {
                    counts.holding.fetch_add(1, Ordering::SeqCst);
                    counts.received.fetch_add(1, Ordering::SeqCst);
                    let _held = Holding(counts.holding);
                    std::future::pending::<()>().await;
                }
                StatusCode::OK.into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// A client that joined groups itself and through REST, whose user was added to a group
/// through REST, with a message of its own unacknowledged, sends and an event whose acks
/// are in flight, and an invocation of `hang`.
async fn busy(emu: &Emulator, url: &str, protocol: &str) -> Ws {
    let (mut ws, connected) = connect_json(url, protocol).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_ack_ok(&ws.join("g", 1).await);
    let path = format!("/api/hubs/h/groups/r/connections/{id}");
    assert_eq!(rest(emu, reqwest::Method::PUT, &path).await, 200);
    let path = "/api/hubs/h/:addToGroups";
    assert_eq!(rest(emu, reqwest::Method::POST, path).await, 200);
    let path = "/api/hubs/h/users/u/groups/ug";
    assert_eq!(rest(emu, reqwest::Method::PUT, path).await, 200);
    assert_ack_ok(&ws.call(to_group("g", Some(2))).await);
    ws.send_json(json!({"type":"invoke","invocationId":"i","event":"hang"}))
        .await;
    ws.send_json(json!({"type":"event","event":"e","ackId":3}))
        .await;
    for ack_id in 4..20 {
        ws.send_json(to_group("g", Some(ack_id))).await;
    }
    ws
}

#[tokio::test]
async fn connections_with_work_in_flight_vanish_without_a_trace() {
    let (slow, seen) = upstream().await;
    let dead = {
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/events", gone.local_addr().unwrap())
    };
    for (upstream, answers) in [(slow, true), (dead, false)] {
        // Only the end of their connection ends the invocations of `hang`.
        let emu = start_with(Config {
            upstream: Some(upstream.clone()),
            upstream_timeout: Duration::from_secs(60),
            ..fast()
        })
        .await;
        // Not the runtime's tasks: the upstream client keeps idle connections a while.
        let before = baseline(&emu, false).await;
        let url = emu.client_url("h", &all_roles("u"));
        for protocol in [JSON, RELIABLE] {
            for ending in ["close", "fin", "rst", "rest"] {
                let received = seen.received.load(Ordering::SeqCst);
                let ws = busy(&emu, &url, protocol).await;
                let deadline = Instant::now() + WAIT;
                while answers && seen.received.load(Ordering::SeqCst) == received {
                    assert!(Instant::now() < deadline, "the invocation never came");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                match ending {
                    "close" => ws.close().await,
                    "fin" => vanish(ws, false),
                    "rst" => vanish(ws, true),
                    _ => {
                        let path = "/api/hubs/h/users/u/:closeConnections";
                        assert_eq!(rest(&emu, reqwest::Method::POST, path).await, 204);
                        drop(ws);
                    }
                }
            }
        }
        let path = "/api/hubs/h/users/u/groups";
        assert_eq!(rest(&emu, reqwest::Method::DELETE, path).await, 204);
        back_to(&emu, &before, WINDOW + WAIT).await;
        let deadline = Instant::now() + WAIT;
        while seen.holding.load(Ordering::SeqCst) != 0 {
            assert!(Instant::now() < deadline, "upstream requests still held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        emu.shutdown().await;
    }
}

#[tokio::test]
async fn rest_calls_on_unknown_names_create_nothing() {
    let emu = start_with(fast()).await;
    // One known connection, so that unknown groups and users are asked in a live hub too.
    let (ws, _) = connect_json(&emu.client_url("h", &all_roles("known")), JSON).await;
    let before = baseline(&emu, true).await;
    use reqwest::Method;
    for hub in ["h", "nohub"] {
        for (method, path) in [
            (Method::POST, ":send"),
            (Method::POST, "groups/g/:send"),
            (Method::POST, "users/u/:send"),
            (Method::POST, "connections/c/:send"),
            (Method::POST, ":addToGroups"),
            (Method::POST, ":removeFromGroups"),
            (Method::PUT, "groups/g/connections/c"),
            (Method::DELETE, "groups/g/connections/c"),
            (Method::DELETE, "users/u/groups/g"),
            (Method::DELETE, "users/u/groups"),
            (Method::DELETE, "connections/c/groups"),
            (Method::DELETE, "connections/c"),
            (Method::HEAD, "connections/c"),
            (Method::HEAD, "groups/g"),
            (Method::HEAD, "users/u"),
            (Method::HEAD, "users/u/groups/g"),
            (Method::GET, "groups/g/connections"),
            (Method::POST, "groups/g/:closeConnections"),
            (Method::POST, "users/u/:closeConnections"),
            (Method::PUT, "permissions/sendToGroup/connections/c"),
            (Method::DELETE, "permissions/sendToGroup/connections/c"),
            (Method::HEAD, "permissions/sendToGroup/connections/c"),
            (Method::POST, ":generateToken"),
            (Method::GET, "nothing/here"),
        ] {
            let status = rest(&emu, method.clone(), &format!("/api/hubs/{hub}/{path}")).await;
            assert!(status < 500, "{method} {path}: {status}");
        }
    }
    back_to(&emu, &before, WAIT).await;
    ws.close().await;
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_joins_and_leaves_leave_no_member_behind() {
    let emu = start().await;
    let before = baseline(&emu, true).await;
    let url = emu.client_url("h", &all_roles("u"));
    for _ in 0..40 {
        let (mut ws, connected) = connect_json(&url, JSON).await;
        let id = connected["connectionId"].as_str().unwrap();
        // A REST removal from the group, all but its last byte sent.
        let path = format!("/api/hubs/h/groups/g/connections/{id}");
        let token = rest_token(&emu, &format!("{}{path}", emu.endpoint()));
        let mut leave = TcpStream::connect(("127.0.0.1", emu.port())).await.unwrap();
        let request = format!(
            "DELETE {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let (head, last) = request.split_at(request.len() - 1);
        leave.write_all(head.as_bytes()).await.unwrap();
        // The client joins while REST removes it, at the same moment: either may win,
        // but the group must not keep it once it is gone.
        let join = json!({"type": "joinGroup", "group": "g", "ackId": 1});
        let (_, sent) = tokio::join!(ws.send_json(join), leave.write_all(last.as_bytes()));
        sent.unwrap();
        assert_ack_ok(&ws.next_json().await);
        let mut status = [0u8; 12];
        leave.read_exact(&mut status).await.unwrap();
        assert_eq!(&status[9..], b"204");
        ws.close().await;
    }
    back_to(&emu, &before, WAIT).await;
    emu.shutdown().await;
}

/// A client that reads nothing, sent 64 KiB messages until its socket is full and they
/// wait in its outbound queue.
async fn stuck(emu: &Emulator, protocol: &str) -> (Ws, Value) {
    let (ws, connected) = connect_json(&emu.client_url("h", &all_roles("u")), protocol).await;
    let id = connected["connectionId"].as_str().unwrap();
    let queued = stats(emu).await["outboundBytes"].as_u64().unwrap();
    let deadline = Instant::now() + WAIT;
    while stats(emu).await["outboundBytes"].as_u64().unwrap() == queued {
        assert!(
            Instant::now() < deadline,
            "nothing stayed queued for the peer"
        );
        send_to(emu, id).await;
    }
    (ws, connected)
}

/// Sends 64 KiB to connection `id`.
async fn send_to(emu: &Emulator, id: &str) {
    let url = format!("{}/api/hubs/h/connections/{id}/:send", emu.endpoint());
    let sent = reqwest::Client::new()
        .post(&url)
        .bearer_auth(rest_token(emu, &url))
        .header("content-type", "text/plain")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_once_closed() {
    let emu = start_with(Config {
        max_outbound_bytes: 1024 * 1024,
        ..fast()
    })
    .await;
    let before = baseline(&emu, true).await;
    let mut held = Vec::new();
    // Closed because its queue overflowed.
    let (ws, connected) = stuck(&emu, JSON).await;
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["bufferOverflows"] == 0 {
        assert!(
            Instant::now() < deadline,
            "the outbound queue never overflowed"
        );
        send_to(&emu, connected["connectionId"].as_str().unwrap()).await;
    }
    held.push(ws);
    // Closed through REST.
    let (ws, connected) = stuck(&emu, JSON).await;
    let path = format!(
        "/api/hubs/h/connections/{}",
        connected["connectionId"].as_str().unwrap()
    );
    assert_eq!(rest(&emu, reqwest::Method::DELETE, &path).await, 204);
    held.push(ws);
    // Replaced by a recovery, which then ends the session.
    let (ws, connected) = stuck(&emu, RELIABLE).await;
    let url = emu.client_url("h", &all_roles("u"));
    connect(&recovery_url(&url, &connected), Some(RELIABLE))
        .await
        .close()
        .await;
    held.push(ws);
    // The server lets their sockets go, although they are still open on this side.
    back_to(&emu, &before, WAIT).await;
    drop(held);
    emu.shutdown().await;
}

/// Descriptors and threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap()
            .count()
    };
    (count("fd"), count("task"))
}

#[tokio::test]
async fn the_binary_is_back_to_its_descriptors_and_threads() {
    let (binary, port) = spawn_binary(
        "churn-key",
        &["--recovery-window-ms", "300", "--http-timeout-ms", "300"],
    );
    let pid = binary.0.id();
    let endpoint = format!("http://127.0.0.1:{port}/client/hubs/h");
    let token =
        webpubsub_emulator::auth::sign_client_token("churn-key", &endpoint, &all_roles("u"));
    let url = format!("ws://127.0.0.1:{port}/client/hubs/h?access_token={token}");

    let mut before = fds_and_threads(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fds_and_threads(pid);
        if now == before {
            break;
        }
        before = now;
    }
    let mut stalled = Vec::new();
    for round in 0..10 {
        let (mut ws, connected) = connect_json(&url, RELIABLE).await;
        assert_ack_ok(&ws.join("g", 1).await);
        assert_ack_ok(&ws.call(to_group("g", Some(2))).await);
        let recover = recovery_url(&url, &connected);
        vanish(ws, round % 2 == 0);
        if round % 3 == 0 {
            connect_json(&recover, RELIABLE).await.0.close().await;
        }
        let (ws, _) = connect_json(&url, JSON).await;
        vanish(ws, round % 2 == 1);
        connect(&url, None).await.close().await;
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(b"GET /client/hubs/h HTTP/1.1\r\n")
            .await
            .unwrap();
        stalled.push(tcp);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let now = fds_and_threads(pid);
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors and threads: {now:?}, {before:?} before"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
}
