//! Hostile or broken peers: HTTP peers that are slow or idle, too many connections or
//! groups, hub and group names the service refuses, and REST input that used to crash
//! a request.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;

const SHORT: Duration = Duration::from_millis(300);

fn short_timeouts() -> Config {
    Config {
        http_timeout: SHORT,
        ..Config::default()
    }
}

/// Reads until the server closes the socket: what it sent, and when it closed.
async fn until_closed(tcp: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let out = bytes_until_end(tcp).await;
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

async fn tcp(emu: &Emulator) -> TcpStream {
    TcpStream::connect(("127.0.0.1", emu.port())).await.unwrap()
}

/// The HTTP status of a WebSocket connect (101 when it upgrades).
async fn ws_status(url: &str, protocol: &str) -> u16 {
    match try_connect(url, Some(protocol)).await {
        Ok(_) => 101,
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn rest(emu: &Emulator, method: reqwest::Method, path: &str) -> reqwest::Response {
    let url = format!("{}{path}", emu.endpoint());
    reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(rest_token(emu, &url))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let emu = start_with(short_timeouts()).await;
    // Nothing at all, half a head, half an HTTP/2 preface.
    for partial in [
        &b""[..],
        b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\n",
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut tcp = tcp(&emu).await;
        tcp.write_all(partial).await.unwrap();
        let (_, took) = until_closed(&mut tcp).await;
        assert!(took < WAIT, "{partial:?}");
    }
    // A head trickled a byte at a time, each byte well within the timeout.
    let head = b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut tcp = tcp(&emu).await;
    let start = Instant::now();
    let mut sent = 0;
    for byte in head {
        if tcp.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (response, _) = until_closed(&mut tcp).await;
    assert!(
        sent < head.len() || !response.starts_with("HTTP/1.1 200"),
        "the whole head was accepted over {:?}: {response}",
        start.elapsed()
    );
    // Other peers are served meanwhile.
    assert_eq!(stats(&emu).await["connections"], 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let emu = start_with(short_timeouts()).await;
    let mut tcp = tcp(&emu).await;
    tcp.write_all(b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (response, took) = until_closed(&mut tcp).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(took >= SHORT / 2, "closed after {took:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_rest_body_that_never_ends_gets_408() {
    let emu = start_with(short_timeouts()).await;
    let url = format!("{}/api/hubs/h/:send", emu.endpoint());
    let head = format!(
        "POST /api/hubs/h/:send HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nab",
        rest_token(&emu, &url)
    );
    let mut tcp = tcp(&emu).await;
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (response, _) = until_closed(&mut tcp).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    emu.shutdown().await;
}

#[tokio::test]
async fn new_connections_past_the_limit_get_429_and_recoveries_still_work() {
    let emu = start_with(Config {
        max_connections: 2,
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("a"));
    let (a, _) = connect_json(&url, JSON).await;
    let (_b, cb) = connect_json(&url, RELIABLE).await;
    assert_eq!(ws_status(&url, JSON).await, 429);
    assert_eq!(ws_status(&url, RELIABLE).await, 429);

    // b's socket drops: its session still counts, and its recovery is let in.
    let id_b = cb["connectionId"].as_str().unwrap();
    assert!(fault(&emu, "h", id_b, ":drop").await.status().is_success());
    let recover = format!(
        "{url}&awps_connection_id={id_b}&awps_reconnection_token={}",
        cb["reconnectionToken"].as_str().unwrap()
    );
    assert_eq!(ws_status(&url, JSON).await, 429);
    let (_b2, again) = connect_json(&recover, RELIABLE).await;
    assert_eq!(again["connectionId"], id_b);

    // Once a ends, a new connection fits again.
    a.close().await;
    let deadline = Instant::now() + WAIT;
    while ws_status(&url, JSON).await != 101 {
        assert!(
            Instant::now() < deadline,
            "no room after a connection ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn an_outbound_limit_of_zero_bytes_closes_at_the_first_ack_with_1008() {
    let emu = start_with(Config {
        max_outbound_bytes: 0,
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("a"));
    for protocol in [JSON, RELIABLE] {
        let (mut ws, _) = connect_json(&url, protocol).await;
        ws.send_json(json!({"type": "joinGroup", "group": "g", "ackId": 1}))
            .await;
        // The ack does not fit.
        assert_eq!(ws.expect_close().await.0, 1008);
    }
    stats_until(&emu, "every slot given back", |s| s["slotsTaken"] == 0).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_connection_joins_at_most_so_many_groups() {
    let emu = start_with(Config {
        max_groups_per_connection: 3,
        ..Config::default()
    })
    .await;
    let (mut a, c) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    for (i, g) in ["g1", "g2", "g3"].into_iter().enumerate() {
        assert_ack_ok(&a.join(g, i as u64 + 1).await);
    }
    let ack = a.join("g4", 4).await;
    assert_ack_error(&ack, "BadRequest");
    assert!(
        ack["error"]["message"].as_str().unwrap().contains('3'),
        "{ack}"
    );
    // Joining a group it is in is no new group.
    assert_ack_ok(&a.join("g1", 5).await);
    // Nor through REST.
    let id = c["connectionId"].as_str().unwrap();
    let put = |g: &str| format!("/api/hubs/h/groups/{g}/connections/{id}");
    assert_eq!(
        rest(&emu, reqwest::Method::PUT, &put("g5")).await.status(),
        400
    );
    assert_eq!(
        rest(&emu, reqwest::Method::PUT, &put("g2")).await.status(),
        200
    );
    // Leaving makes room.
    let leave = json!({"type": "leaveGroup", "group": "g3", "ackId": 6});
    assert_ack_ok(&a.call(leave).await);
    assert_ack_ok(&a.join("g4", 7).await);
    emu.shutdown().await;
}

#[tokio::test]
async fn hub_names_follow_the_service_pattern() {
    let emu = start().await;
    let long = "a".repeat(129);
    for bad in ["1hub", "a-b", "_a", long.as_str()] {
        let url = emu.client_url(bad, &all_roles("a"));
        assert_eq!(ws_status(&url, JSON).await, 400, "client endpoint, {bad}");
        let resp = rest(
            &emu,
            reqwest::Method::POST,
            &format!("/api/hubs/{bad}/:send"),
        )
        .await;
        assert_eq!(resp.status(), 400, "REST, {bad}");
    }
    let resp = rest(&emu, reqwest::Method::POST, "/api/hubs/a%20b/:send").await;
    assert_eq!(resp.status(), 400, "REST, 'a b'");
    assert_eq!(
        stats(&emu).await["hubs"],
        0,
        "no hub made for a refused name"
    );
    let long = "a".repeat(128);
    for good in ["h", "Hub_1.x,y", long.as_str()] {
        let url = emu.client_url(good, &all_roles("a"));
        assert_eq!(ws_status(&url, JSON).await, 101, "client endpoint, {good}");
        let resp = rest(
            &emu,
            reqwest::Method::POST,
            &format!("/api/hubs/{good}/:send"),
        )
        .await;
        assert_eq!(resp.status(), 202, "REST, {good}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn blank_group_names_are_refused() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    assert_ack_error(&a.join(" ", 1).await, "BadRequest");
    assert_ack_error(&a.join("\t \t", 2).await, "BadRequest");
    assert_ack_ok(&a.join(" g ", 3).await);
    let id = c["connectionId"].as_str().unwrap();
    for (method, path) in [
        (
            reqwest::Method::PUT,
            format!("/api/hubs/h/groups/%20/connections/{id}"),
        ),
        (
            reqwest::Method::POST,
            "/api/hubs/h/groups/%20%20/:send".into(),
        ),
    ] {
        assert_eq!(rest(&emu, method, &path).await.status(), 400, "{path}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn group_names_follow_the_pattern_as_dotnet_reads_it() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = c["connectionId"].as_str().unwrap();
    // `.` stops at a line feed; `$` also matches before a final one.
    assert_ack_error(&a.join("a\nb", 1).await, "BadRequest");
    assert_ack_error(&a.join("\ng", 2).await, "BadRequest");
    assert_ack_ok(&a.join("g\n", 3).await);
    // The length counts UTF-16 code units: a character outside the BMP counts 2.
    let astral = "\u{1F600}";
    assert_ack_ok(&a.join(&astral.repeat(512), 4).await);
    assert_ack_error(&a.join(&astral.repeat(513), 5).await, "BadRequest");
    let send = json!({"type": "sendToGroup", "group": "a\nb", "ackId": 6, "dataType": "text", "data": "x"});
    assert_ack_error(&a.call(send).await, "BadRequest");
    let leave = json!({"type": "leaveGroup", "group": "a\nb", "ackId": 7});
    assert_ack_error(&a.call(leave).await, "BadRequest");
    // Every REST route with a group in its path.
    let long = "%F0%9F%98%80".repeat(513);
    for group in ["a%0Ab", long.as_str()] {
        for (method, path) in [
            (
                reqwest::Method::PUT,
                format!("groups/{group}/connections/{id}"),
            ),
            (
                reqwest::Method::DELETE,
                format!("groups/{group}/connections/{id}"),
            ),
            (reqwest::Method::POST, format!("groups/{group}/:send")),
            (
                reqwest::Method::POST,
                format!("groups/{group}/:closeConnections"),
            ),
            (reqwest::Method::HEAD, format!("groups/{group}")),
            (reqwest::Method::GET, format!("groups/{group}/connections")),
            (reqwest::Method::PUT, format!("users/u/groups/{group}")),
        ] {
            let resp = rest(&emu, method.clone(), &format!("/api/hubs/h/{path}")).await;
            assert_eq!(resp.status(), 400, "{method} {path}");
        }
    }
    let resp = rest(&emu, reqwest::Method::HEAD, "/api/hubs/h/groups/g%0A").await;
    assert_eq!(resp.status(), 200, "the member of 'g\\n'");
    // Without an ackId a refused name still ends the session.
    a.send_json(json!({"type": "joinGroup", "group": "a\nb"}))
        .await;
    assert_eq!(a.expect_close().await.0, 1003);
    emu.shutdown().await;
}

/// The status code of the response head read from `tcp`.
async fn response_status(tcp: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(WAIT, tcp.read(&mut byte)).await;
        assert_eq!(
            read.expect("a response in time").unwrap(),
            1,
            "closed early"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    head[9..12].parse().unwrap()
}

#[tokio::test]
async fn a_burst_of_connects_never_goes_past_the_limit() {
    const MAX: usize = 5;
    const TRIES: usize = 60;
    let emu = start_with(Config {
        max_connections: MAX,
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("a"));
    // Every request arrives before any upgrade can complete.
    let request = upgrade_request(&emu, &url, WS_VERSION_AND_KEY);
    let mut socks = Vec::new();
    for _ in 0..TRIES {
        socks.push(tcp(&emu).await);
    }
    for sock in &mut socks {
        sock.write_all(request.as_bytes()).await.unwrap();
    }
    let mut open = Vec::new();
    for mut sock in socks {
        match response_status(&mut sock).await {
            101 => open.push(sock),
            status => assert_eq!(status, 429),
        }
    }
    assert_eq!(open.len(), MAX, "connections let in");
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["connections"] != MAX {
        assert!(Instant::now() < deadline, "{}", stats(&emu).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every slot comes back once they end, and the limit still holds.
    drop(open);
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["connections"] != 0 {
        assert!(Instant::now() < deadline, "connections not forgotten");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = Vec::new();
    for _ in 0..MAX {
        again.push(connect_json(&url, JSON).await);
    }
    assert_eq!(ws_status(&url, JSON).await, 429);
    emu.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_that_never_completes_gives_its_slot_back() {
    let emu = start_with(Config {
        max_connections: 1,
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("a"));
    let request = upgrade_request(&emu, &url, WS_VERSION_AND_KEY);
    for _ in 0..5 {
        // A complete upgrade request from a peer that is gone before the answer.
        let mut tcp = tcp(&emu).await;
        tcp.write_all(request.as_bytes()).await.unwrap();
        drop(tcp);
    }
    let deadline = Instant::now() + WAIT;
    while ws_status(&url, JSON).await != 101 {
        assert!(
            Instant::now() < deadline,
            "a slot was kept by a dead upgrade"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emu.shutdown().await;
}

/// Polls the stats until `hubs` is `n`.
async fn until_hubs(emu: &Emulator, n: usize) {
    let deadline = Instant::now() + WAIT;
    while stats(emu).await["hubs"] != n {
        assert!(
            Instant::now() < deadline,
            "hubs: {}, expected {n}",
            stats(emu).await["hubs"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hub_is_forgotten_once_nothing_in_it_lasts() {
    let emu = start().await;
    for n in 0..20 {
        let (mut ws, _) =
            connect_json(&emu.client_url(&format!("c{n}"), &all_roles("a")), JSON).await;
        assert_ack_ok(&ws.join("g", 1).await);
        ws.close().await;
        let hub = format!("/api/hubs/r{n}");
        let sent = rest(
            &emu,
            reqwest::Method::POST,
            &format!("{hub}/groups/g/:send"),
        )
        .await;
        assert_eq!(sent.status(), 202);
        let head = rest(&emu, reqwest::Method::HEAD, &format!("{hub}/users/u")).await;
        assert_eq!(head.status(), 404);
    }
    until_hubs(&emu, 0).await;

    // A user's group membership made over REST lasts without connections, so its hub does.
    let put = rest(
        &emu,
        reqwest::Method::PUT,
        "/api/hubs/Keep/users/u/groups/g",
    )
    .await;
    assert_eq!(put.status(), 200);
    until_hubs(&emu, 1).await;
    let (ws, c) = connect_json(&emu.client_url("keep", &all_roles("u")), JSON).await;
    let id = c["connectionId"].as_str().unwrap();
    let members = rest(
        &emu,
        reqwest::Method::GET,
        "/api/hubs/keep/groups/g/connections",
    )
    .await;
    let members: serde_json::Value = members.json().await.unwrap();
    assert_eq!(members["value"][0]["connectionId"], id);
    ws.close().await;
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["connections"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the connection was not forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats(&emu).await["hubs"], 1);
    let delete = rest(
        &emu,
        reqwest::Method::DELETE,
        "/api/hubs/keep/users/u/groups",
    )
    .await;
    assert_eq!(delete.status(), 204);
    until_hubs(&emu, 0).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn an_out_of_range_token_lifetime_is_400() {
    let emu = start().await;
    let huge = u64::MAX.to_string();
    let resp = rest(
        &emu,
        reqwest::Method::POST,
        &format!("/api/hubs/h/:generateToken?minutesToExpire={huge}"),
    )
    .await;
    assert_eq!(resp.status(), 400);
    // The service's parameter is an int32.
    let resp = rest(
        &emu,
        reqwest::Method::POST,
        "/api/hubs/h/:generateToken?minutesToExpire=2147483648",
    )
    .await;
    assert_eq!(resp.status(), 400);
    let resp = rest(
        &emu,
        reqwest::Method::POST,
        "/api/hubs/h/:generateToken?minutesToExpire=2147483647",
    )
    .await;
    assert_eq!(resp.status(), 200);
    emu.shutdown().await;
}

#[tokio::test]
async fn an_upgraded_connection_idle_past_the_header_timeout_stays_open() {
    // The header-read timeout bounds HTTP request heads only: a WebSocket that is
    // quiet for several times that long is still served.
    let emu = start_with(short_timeouts()).await;
    let url = emu.client_url("h", &all_roles("a"));
    let (mut ws, _) = connect_json(&url, JSON).await;
    tokio::time::sleep(SHORT * 4).await;
    assert_ack_ok(&ws.join("g", 1).await);
    tokio::time::sleep(SHORT * 4).await;
    assert_ack_ok(&ws.join("g2", 2).await);
    emu.shutdown().await;
}

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmRSS line")
}

#[tokio::test]
async fn an_idle_websocket_costs_the_server_little_memory() {
    // Many programs share one emulator, and a test suite may hold thousands of quiet
    // sockets: each used to keep a 128 KiB read buffer, zeroed by its first read.
    const SOCKETS: u64 = 300;
    let (binary, port) = spawn_binary("idle-key", &[]);
    let pid = binary.0.id();
    let endpoint = format!("http://127.0.0.1:{port}/client/hubs/h");
    let token = webpubsub_emulator::auth::sign_client_token("idle-key", &endpoint, &all_roles("u"));
    let url = format!("ws://127.0.0.1:{port}/client/hubs/h?access_token={token}");
    // Read by the server: its reader has run.
    async fn open(url: &str) -> Ws {
        let (mut ws, _) = connect_json(url, JSON).await;
        ws.send_json(json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
        ws
    }
    let mut sockets = vec![open(&url).await];
    let before = resident_kib(pid);
    for _ in 0..SOCKETS {
        sockets.push(open(&url).await);
    }
    let per_socket = (resident_kib(pid) - before) / SOCKETS;
    assert!(per_socket < 48, "{per_socket} KiB resident per idle socket");
}

/// Polls the stats of the binary at `endpoint` until it has read `n` frames.
async fn until_frames_in(endpoint: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let url = format!("{endpoint}/_emulator/stats");
        let now: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        if now["framesIn"].as_u64().unwrap() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pongs_to_a_peer_that_pings_and_never_reads_take_bounded_memory() {
    // tungstenite queues a pong for every ping by itself; the peer reads none of them.
    const FLOOD: usize = 32 << 20;
    let (binary, port) = spawn_binary("ping-key", &["--max-outbound-bytes", "1048576"]);
    let pid = binary.0.id();
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = format!("{endpoint}/client/hubs/h");
    let token = webpubsub_emulator::auth::sign_client_token("ping-key", &client, &all_roles("u"));
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET /client/hubs/h?access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{WS_VERSION_AND_KEY}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let ping = client_frame(0x89, &[7; 125], true);
    tcp.write_all(&ping).await.unwrap();
    until_frames_in(&endpoint, 1).await;
    let before = resident_kib(pid);
    let pings = FLOOD / ping.len();
    tokio::time::timeout(WAIT, tcp.write_all(&ping.repeat(pings)))
        .await
        .expect("the server reads the pings in time")
        .unwrap();
    until_frames_in(&endpoint, 1 + pings as u64).await;
    let grown = resident_kib(pid).saturating_sub(before);
    assert!(grown < 12 << 10, "{grown} KiB more resident");
}

/// `POST` `body` (JSON) to the REST `path` of `emu`.
async fn rest_json(emu: &Emulator, path: &str, body: serde_json::Value) -> reqwest::Response {
    let url = format!("{}{path}", emu.endpoint());
    reqwest::Client::new()
        .post(&url)
        .bearer_auth(rest_token(emu, &url))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn by_default_a_connection_joins_10000_groups_and_other_ways_in_skip_it() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = c["connectionId"].as_str().unwrap();
    let groups: Vec<String> = (0..10_000).map(|i| format!("g{i}")).collect();
    let added = rest_json(
        &emu,
        "/api/hubs/h/:addToGroups",
        json!({ "groups": groups }),
    )
    .await;
    assert_eq!(added.status(), 200);
    let head = |path: &'static str| rest(&emu, reqwest::Method::HEAD, path);
    assert_eq!(head("/api/hubs/h/groups/g9999").await.status(), 200);
    // :addToGroups and a user's groups skip it; a join is refused.
    let more = rest_json(&emu, "/api/hubs/h/:addToGroups", json!({"groups": ["x"]})).await;
    assert_eq!(more.status(), 200);
    assert_eq!(head("/api/hubs/h/groups/x").await.status(), 404);
    let put = rest(&emu, reqwest::Method::PUT, "/api/hubs/h/users/a/groups/y").await;
    assert_eq!(put.status(), 200);
    assert_eq!(head("/api/hubs/h/groups/y").await.status(), 404);
    let ack = a.join("z", 1).await;
    assert_ack_error(&ack, "BadRequest");
    assert!(
        ack["error"]["message"].as_str().unwrap().contains("10000"),
        "{ack}"
    );
    let put = format!("/api/hubs/h/groups/z/connections/{id}");
    assert_eq!(rest(&emu, reqwest::Method::PUT, &put).await.status(), 400);
    emu.shutdown().await;
}

#[tokio::test]
async fn by_default_a_client_message_or_rest_body_of_1_mib_is_taken_and_no_more() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let frame = |len: usize| {
        let head = r#"{"type":"event","event":"e","ackId":1,"dataType":"text","data":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    a.send_text(&frame(1 << 20)).await;
    assert_ack_ok(&a.next_json().await);
    a.send_text(&frame((1 << 20) + 1)).await;
    assert_eq!(a.expect_close().await.0, 1009);
    let url = format!("{}/api/hubs/h/:send", emu.endpoint());
    let send = |len: usize| {
        reqwest::Client::new()
            .post(&url)
            .bearer_auth(rest_token(&emu, &url))
            .header("content-type", "text/plain")
            .body(vec![b'x'; len])
            .send()
    };
    assert_eq!(send(1 << 20).await.unwrap().status(), 202);
    assert_eq!(send((1 << 20) + 1).await.unwrap().status(), 413);
    emu.shutdown().await;
}

/// A reliable subscriber that acknowledges nothing: what it gets of `count` messages of
/// `len` bytes of data before the overflow closes it with 1008.
async fn received_before_overflow(emu: &Emulator, count: usize, len: usize) -> Vec<String> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut publisher, _) = connect_json(&emu.client_url("h", &all_roles("p")), JSON).await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), RELIABLE).await;
    assert_ack_ok(&b.join("g", 1).await);
    let message =
        json!({"type":"sendToGroup","group":"g","dataType":"text","data":"x".repeat(len)});
    for _ in 0..count {
        publisher
            .inner
            .feed(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }
    publisher.inner.flush().await.unwrap();
    let mut received = Vec::new();
    loop {
        match b.next_message().await {
            Message::Text(t) if t.contains(r#""type":"message""#) => received.push(t.to_string()),
            Message::Text(t) => {
                assert!(t.contains("overflowed"), "{t}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(b.expect_close().await.0, 1008);
    received
}

#[tokio::test]
async fn by_default_the_reliable_buffer_keeps_1000_messages_and_16_mib() {
    let emu = start().await;
    assert_eq!(received_before_overflow(&emu, 1001, 1).await.len(), 1000);
    let received = received_before_overflow(&emu, 1000, 20_000).await;
    let kept: usize = received.iter().map(String::len).sum();
    let next = received.last().unwrap().len();
    assert!(
        kept <= 16 << 20 && kept + next > 16 << 20,
        "{kept} bytes kept"
    );
    emu.shutdown().await;
}
