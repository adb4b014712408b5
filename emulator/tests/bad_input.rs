//! Bad input from clients: clear ack errors or a close with a reason, never a crash,
//! and other connections are not affected.
mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn still_alive(ws: &mut Ws) {
    ws.send_json(json!({"type":"ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");
}

#[tokio::test]
async fn invalid_frames_with_ack_id_get_bad_request() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let long = "x".repeat(1025);
    let cases = [
        json!({"type":"joinGroup","ackId":1,"group":5}),
        json!({"type":"joinGroup","ackId":2}),
        json!({"type":"joinGroup","ackId":3,"group":""}),
        json!({"type":"joinGroup","ackId":4,"group":long}),
        json!({"type":"sendToGroup","ackId":5,"group":"g","dataType":"binary","data":"!!notbase64"}),
        json!({"type":"sendToGroup","ackId":6,"group":"g","dataType":"text","data":{"not":"a string"}}),
        json!({"type":"sendToGroup","ackId":7,"group":"g","dataType":"yaml","data":"x"}),
        json!({"type":"sendToGroup","ackId":8,"group":"g","dataType":"text"}),
        json!({"type":"event","ackId":9,"dataType":"text","data":"no event name"}),
    ];
    for frame in cases {
        let ack = a.call(frame.clone()).await;
        assert_ack_error(&ack, "BadRequest");
        assert!(
            !ack["error"]["message"].as_str().unwrap().is_empty(),
            "{frame}"
        );
    }
    // 1024 characters is fine.
    assert_ack_ok(&a.join(&"y".repeat(1024), 10).await);
    still_alive(&mut a).await;
    emu.shutdown().await;
}

async fn expect_rejected(emu: &Emulator, send: Message, code: u16, reason_part: &str) {
    let (mut bystander, _) = connect_json(&emu.client_url("h", &all_roles("b")), JSON).await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    a.inner.send(send).await.unwrap();
    let d = a.next_json().await;
    assert_eq!(d["event"], "disconnected", "{d}");
    let (got, reason) = a.expect_close().await;
    assert_eq!(got, code, "{reason}");
    assert!(reason.contains(reason_part), "{reason}");
    still_alive(&mut bystander).await;
}

#[tokio::test]
async fn invalid_frames_without_ack_id_close_with_a_reason() {
    let emu = start_with(Config {
        max_frame_bytes: 4096,
        ..Config::default()
    })
    .await;
    expect_rejected(
        &emu,
        Message::Text("{not json".into()),
        1003,
        "Invalid frame",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(r#"{"type":"joinGroup","ackId":-1,"group":"g"}"#.into()),
        1003,
        "Invalid frame",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(
            r#"{"type":"sendToGroup","group":"g","dataType":"binary","data":"%%"}"#.into(),
        ),
        1003,
        "base64",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(r#"{"type":"sequenceAck"}"#.into()),
        1003,
        "sequenceId",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(r#"{"type":"sequenceAck","sequenceId":"5"}"#.into()),
        1003,
        "Invalid frame",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(r#"{"type":"sendToGroup","ackId":1.5,"group":"g","data":"x"}"#.into()),
        1003,
        "Invalid frame",
    )
    .await;
    expect_rejected(
        &emu,
        Message::Text(r#"{"type":"invoke","event":"e"}"#.into()),
        1003,
        "invocationId",
    )
    .await;
    expect_rejected(&emu, Message::Binary(vec![1u8, 2].into()), 1003, "Binary").await;
    assert!(stats(&emu).await["badFrames"].as_u64().unwrap() >= 8);
    emu.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_close_1009() {
    let emu = start_with(Config {
        max_frame_bytes: 4096,
        ..Config::default()
    })
    .await;
    let (mut bystander, _) = connect_json(&emu.client_url("h", &all_roles("b")), JSON).await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let big = json!({"type":"sendToGroup","group":"g","dataType":"text","data":"z".repeat(5000)});
    a.inner
        .send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let (code, reason) = a.expect_close().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("4096"), "{reason}");
    still_alive(&mut bystander).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_text_frame_of_invalid_utf8_closes_1007_for_good() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let invalid = || {
        Message::Frame(Frame::message(
            vec![b'{', 0xff, b'}'],
            OpCode::Data(Data::Text),
            true,
        ))
    };
    expect_rejected(&emu, invalid(), 1007, "UTF-8").await;
    // A simple client gets the close frame too (without the JSON `disconnected`).
    let mut simple = connect(&url, None).await;
    simple.inner.send(invalid()).await.unwrap();
    assert_eq!(simple.expect_close().await.0, 1007);
    // The reliable session is over, not waiting for a recovery.
    let deadline = std::time::Instant::now() + WAIT;
    while stats(&emu).await["connections"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            stats(&emu).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_frames_is_answered_in_order() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), JSON).await;
    const N: u64 = 3000;
    for i in 1..=N {
        a.inner
            .feed(Message::Text(
                json!({"type":"sendToGroup","group":"g","ackId":i,"dataType":"text","data":"x"})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
    }
    a.inner.flush().await.unwrap();
    for i in 1..=N {
        let ack = a.next_json().await;
        assert_eq!(ack["ackId"], i);
    }
    still_alive(&mut b).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_past_64_mib_queued() {
    let emu = start().await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), JSON).await;
    // b reads nothing: up to 100 MiB for it, in far fewer frames than the queue's frame
    // limit. It starts reading once the overflow is counted: the server gives a peer
    // that does not read 2 s to take its close frame, then drops the socket.
    let url = format!("{}/api/hubs/h/:send", emu.endpoint());
    let rest = reqwest::Client::new();
    let mut sent = 0;
    while stats(&emu).await["bufferOverflows"] == 0 {
        assert!(sent < 100, "no overflow after {sent} MiB");
        let resp = rest
            .post(&url)
            .bearer_auth(rest_token(&emu, &url))
            .header("content-type", "text/plain")
            .body(vec![b'x'; 1024 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        sent += 1;
    }
    assert!(sent > 64, "closed after {sent} MiB, below the 64 MiB limit");
    assert_eq!(stats(&emu).await["bufferOverflows"], 1);
    let (code, reason) = b.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("does not read"), "{reason}");
    emu.shutdown().await;
}

#[tokio::test]
async fn recovery_without_the_reliable_protocol_is_refused() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let (_a, c) = connect_json(&url, RELIABLE).await;
    let recover = format!(
        "{url}&awps_connection_id={}&awps_reconnection_token={}",
        c["connectionId"].as_str().unwrap(),
        c["reconnectionToken"].as_str().unwrap()
    );
    let mut ws = connect(&recover, Some(JSON)).await;
    assert_eq!(ws.expect_close().await.0, 1008);
    emu.shutdown().await;
}

#[tokio::test]
async fn non_websocket_requests_to_the_client_endpoint() {
    let emu = start().await;
    let url = emu
        .client_url("h", &all_roles("a"))
        .replacen("ws://", "http://", 1);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = reqwest::get(format!("{}/client/hubs/h", emu.endpoint()))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    emu.shutdown().await;
}

/// JSON nested `depth` levels deep: `[[[...]]]`.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_json_is_passed_on_or_refused_but_never_crashes() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = c["connectionId"].as_str().unwrap();
    let deep = nested(200_000);
    assert_ack_ok(&a.join("g", 1).await);
    // Passed on as it came, never parsed into a tree.
    a.send_text(&format!(
        r#"{{"type":"sendToGroup","group":"g","ackId":2,"noEcho":true,"dataType":"json","data":{deep},"x":{deep}}}"#
    ))
    .await;
    assert_eq!(a.next_json().await["ackId"], 2);
    // An invalid frame deeper than serde_json's recursion limit still gets its ack.
    a.send_text(&format!(
        r#"{{"type":"joinGroup","group":5,"ackId":3,"x":{}}}"#,
        nested(200)
    ))
    .await;
    assert_ack_error(&a.next_json().await, "BadRequest");
    let url = format!("{}/api/hubs/h/connections/{id}/:send", emu.endpoint());
    let sent = reqwest::Client::new()
        .post(&url)
        .bearer_auth(rest_token(&emu, &url))
        .header("content-type", "application/json")
        .body(deep.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    match a.next_message().await {
        Message::Text(t) => assert!(t.as_str().contains(&deep)),
        other => panic!("expected a text frame, got {other:?}"),
    }
    still_alive(&mut a).await;
    emu.shutdown().await;
}

/// Sends over raw TCP an upgrade request for `url` whose `Sec-WebSocket-*` header lines
/// (each ending in CRLF) are `headers`; returns the response head and its body.
async fn raw_handshake(emu: &Emulator, url: &str, headers: &str) -> (String, String) {
    raw_request(emu, &upgrade_request(emu, url, headers)).await
}

/// Sends `request` over raw TCP; returns the response head and its body.
async fn raw_request(emu: &Emulator, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", emu.port()))
        .await
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert_ne!(
            read,
            0,
            "closed early: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..read]);
        let text = String::from_utf8_lossy(&response).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        if head.starts_with("HTTP/1.1 101") || body.len() >= length {
            return (head.to_owned(), body.to_owned());
        }
    }
}

/// The value of the header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn a_handshake_of_another_websocket_version_gets_426_naming_13() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    // 8 is draft hybi-10's; a draft-76 client sends no version at all.
    for version in [
        "Sec-WebSocket-Version: 8\r\n",
        "Sec-WebSocket-Version: 14\r\n",
        "",
    ] {
        let (head, body) = raw_handshake(&emu, &url, &format!("{version}{KEY}")).await;
        assert!(head.starts_with("HTTP/1.1 426"), "{version:?}: {head}");
        assert_eq!(header(&head, "sec-websocket-version"), Some("13"), "{head}");
        assert!(body.contains("Sec-WebSocket-Version"), "{body}");
    }
    let (head, _) = raw_handshake(&emu, &url, WS_VERSION_AND_KEY).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_malformed_websocket_key_gets_400_and_takes_nothing() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    for key in [
        "",
        "not base64!",
        "dGhlIHNhbXBsZSBub25jZQ",       // 16 bytes, unpadded
        "dGhlIHNhbXBsZSBub25j",         // 15 bytes
        "dGhlIHNhbXBsZSBub25jZXM=",     // 17 bytes
        "dGhlIHNhbXBsZSBub25jZQ==AAAA", // 16 bytes and more
    ] {
        let (head, body) = raw_handshake(
            &emu,
            &url,
            &format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "{key:?}: {head}");
        assert!(
            header(&head, "content-type").is_some_and(|c| c.starts_with("text/plain")),
            "{head}"
        );
        assert!(body.contains("Sec-WebSocket-Key"), "{key:?}: {body}");
    }
    let now = stats(&emu).await;
    assert_eq!(
        (now["connectionsOpened"].clone(), now["slotsTaken"].clone()),
        (serde_json::json!(0), serde_json::json!(0)),
        "{now}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_without_a_host_gets_400_and_takes_nothing() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let request =
        upgrade_request(&emu, &url, WS_VERSION_AND_KEY).replace("Host: 127.0.0.1\r\n", "");
    let (head, body) = raw_request(&emu, &request).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("Host"), "{body}");
    assert_eq!(stats(&emu).await["slotsTaken"], 0);
    emu.shutdown().await;
}

/// The code and reason of a close frame's payload.
fn close_of(payload: &[u8]) -> (u16, String) {
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (code, String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[tokio::test]
async fn frames_that_break_rfc_6455_close_1002_for_good() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let ping = br#"{"type":"ping"}"#;
    let cases = [
        ("unmasked", client_frame(0x81, ping, false)),
        // What a compressed frame looks like: no extension was negotiated.
        ("RSV1", client_frame(0xc1, ping, true)),
        ("RSV3", client_frame(0x91, ping, true)),
        ("reserved data opcode", client_frame(0x83, b"x", true)),
        ("reserved control opcode", client_frame(0x8b, b"", true)),
        ("ping over 125 bytes", client_frame(0x89, &[7; 126], true)),
        ("fragmented ping", client_frame(0x09, b"", true)),
        ("continuation of nothing", client_frame(0x80, ping, true)),
        (
            "text within a fragmented message",
            [
                client_frame(0x01, b"{", true),
                client_frame(0x81, ping, true),
            ]
            .concat(),
        ),
        ("close payload of one byte", client_frame(0x88, &[3], true)),
    ];
    // A raw peer never answers the close: each socket ends after the server's grace.
    let ends = futures_util::future::join_all(cases.iter().map(|(_, bytes)| async {
        let mut peer = raw_upgrade_sending(&emu, &url, Some(RELIABLE), bytes).await;
        frames_until_end(&mut peer).await
    }))
    .await;
    for ((case, _), frames) in cases.iter().zip(ends) {
        let [(1, _), (1, disconnected), (0x8, close)] = &frames[..] else {
            panic!("{case}: {frames:?}");
        };
        let disconnected: serde_json::Value = serde_json::from_slice(disconnected).unwrap();
        assert_eq!(disconnected["event"], "disconnected", "{case}");
        let (code, reason) = close_of(close);
        assert_eq!(code, 1002, "{case}: {reason}");
        assert!(reason.starts_with("Protocol error: "), "{case}: {reason}");
    }
    // The reliable sessions are over, not waiting for a recovery.
    stats_until(&emu, "the sessions end", |now| now["connections"] == 0).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let ping = client_frame(0x81, br#"{"type":"ping"}"#, true);
    let peer = raw_upgrade_sending(&emu, &url, Some(JSON), &ping).await;
    let inner = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(peer),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut ws = Ws {
        inner,
        protocol: Some(JSON.into()),
    };
    assert_eq!(ws.next_json().await["event"], "connected");
    assert_eq!(ws.next_json().await["type"], "pong");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_client_close_is_echoed_and_an_unanswered_close_ends_the_socket() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    for (code, reason) in [(1000, ""), (1001, "away"), (3001, "bye"), (4999, "é")] {
        let mut close = u16::to_be_bytes(code).to_vec();
        close.extend_from_slice(reason.as_bytes());
        let mut peer =
            raw_upgrade_sending(&emu, &url, Some(JSON), &client_frame(0x88, &close, true)).await;
        // Frames queued before the close (`connected`) may be dropped for the reply.
        let frames = frames_until_end(&mut peer).await;
        let Some(((0x8, reply), before)) = frames.split_last() else {
            panic!("{code}: {frames:?}");
        };
        assert!(before.iter().all(|(op, _)| *op == 1), "{code}: {frames:?}");
        assert_eq!(close_of(reply), (code, reason.to_owned()));
    }
    // The server's close, never answered: the socket ends after the server's grace.
    let mut peer = raw_upgrade(&emu, &url, Some(JSON)).await;
    stats_until(&emu, "the peer is connected", |now| now["connections"] == 1).await;
    let path = "/api/hubs/h/:closeConnections?reason=bye";
    let closed = reqwest::Client::new()
        .post(format!("{}{path}", emu.endpoint()))
        .bearer_auth(rest_token(&emu, &format!("{}{path}", emu.endpoint())))
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    let frames = frames_until_end(&mut peer).await;
    let [(1, _), (1, disconnected), (0x8, close)] = &frames[..] else {
        panic!("{frames:?}");
    };
    assert!(String::from_utf8_lossy(disconnected).contains("bye"));
    assert_eq!(close_of(close).0, 1000);
    emu.shutdown().await;
}
