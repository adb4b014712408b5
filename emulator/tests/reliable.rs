//! Reliable protocol: sequence ids, recovery with replay, failed recovery, overflow;
//! and the fault-injection routes.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

fn recovery_url(url: &str, connected: &Value) -> String {
    format!(
        "{url}&awps_connection_id={}&awps_reconnection_token={}",
        connected["connectionId"].as_str().unwrap(),
        connected["reconnectionToken"].as_str().unwrap()
    )
}

/// A publisher "a" on the JSON protocol, and "b" on the reliable one joined to "g": a,
/// b, b's URL and its `connected` frame.
async fn publisher_and_subscriber(emu: &Emulator) -> (Ws, Ws, String, Value) {
    let (a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let url_b = emu.client_url("h", &all_roles("b"));
    let (mut b, connected) = connect_json(&url_b, RELIABLE).await;
    assert_ack_ok(&b.join("g", 1).await);
    (a, b, url_b, connected)
}

fn text(group: &str, data: &str) -> Value {
    json!({"type":"sendToGroup","group":group,"dataType":"text","data":data})
}

#[tokio::test]
async fn recovery_replays_every_unacked_frame_in_order() {
    let emu = start().await;
    let (mut a, mut b, url_b, connected) = publisher_and_subscriber(&emu).await;
    let id = connected["connectionId"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        a.send_json(text("g", &format!("m{i}"))).await;
    }
    for i in 1..=3 {
        let m = b.next_json().await;
        assert_eq!(m["sequenceId"], i);
    }
    b.send_json(json!({"type":"sequenceAck","sequenceId":1}))
        .await;
    // Make sure the sequenceAck is processed before the drop: a ping round trip.
    b.send_json(json!({"type":"ping"})).await;
    assert_eq!(b.next_json().await["type"], "pong");

    assert_eq!(fault(&emu, "h", &id, ":drop").await.status(), 200);
    b.expect_abrupt_end().await;
    // Sent while b is away: buffered for the replay.
    assert_ack_ok(
        &a.call(json!({"type":"sendToGroup","group":"g","ackId":1,"dataType":"text","data":"m4"}))
            .await,
    );

    let (mut b2, again) = connect_json(&recovery_url(&url_b, &connected), RELIABLE).await;
    assert_eq!(again["connectionId"], id.as_str());
    for (seq, data) in [(2, "m2"), (3, "m3"), (4, "m4")] {
        let m = b2.next_json().await;
        assert_eq!(
            (
                m["sequenceId"].as_u64().unwrap(),
                m["data"].as_str().unwrap()
            ),
            (seq, data)
        );
    }
    // Still in the group, sequence continues; ackIds survive the recovery.
    a.send_json(text("g", "m5")).await;
    let m = b2.next_json().await;
    assert_eq!(
        (
            m["sequenceId"].as_u64().unwrap(),
            m["data"].as_str().unwrap()
        ),
        (5, "m5")
    );
    assert_ack_error(&b2.join("g", 1).await, "Duplicate");
    assert_eq!(stats(&emu).await["recoveries"], 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_recovery_needs_no_access_token() {
    let emu = start().await;
    let (mut a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_ack_ok(&a.join("g", 1).await);
    fault(&emu, "h", id, ":drop").await;
    a.expect_abrupt_end().await;
    // The documented recovery URL carries only the connection id and reconnection token.
    let bare = format!("ws://127.0.0.1:{}/client/hubs/h?", emu.port());
    let wrong = json!({"connectionId": id, "reconnectionToken": "wrong"});
    let mut refused = connect(&recovery_url(&bare, &wrong), Some(RELIABLE)).await;
    assert_eq!(refused.expect_close().await.0, 1008);
    let (mut a2, again) = connect_json(&recovery_url(&bare, &connected), RELIABLE).await;
    assert_eq!(again["connectionId"], id);
    assert_ack_error(&a2.join("g", 1).await, "Duplicate");
    // A new connection still needs one.
    match try_connect(&bare, Some(RELIABLE)).await {
        Err(e) => assert!(e.to_string().contains("401"), "{e}"),
        Ok(_) => panic!("a new connection without a token was accepted"),
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn a_recovery_without_a_token_creates_no_hub() {
    let emu = start().await;
    let hubs = stats(&emu).await["hubs"].clone();
    // Without an access token nothing vouches for the hub name: each made-up one would
    // otherwise stay in memory for good.
    for n in 0..3 {
        let url = format!(
            "ws://127.0.0.1:{}/client/hubs/madeUp{n}?awps_connection_id=c&awps_reconnection_token=t",
            emu.port()
        );
        let mut refused = connect(&url, Some(RELIABLE)).await;
        assert_eq!(refused.expect_close().await.0, 1008);
    }
    assert_eq!(stats(&emu).await["hubs"], hubs);
    emu.shutdown().await;
}

#[tokio::test]
async fn failed_recovery_is_accepted_then_closed_1008() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("b"));
    let (_b, connected) = connect_json(&url, RELIABLE).await;
    let bad = format!(
        "{url}&awps_connection_id={}&awps_reconnection_token=wrong",
        connected["connectionId"].as_str().unwrap()
    );
    let mut ws = connect(&bad, Some(RELIABLE)).await;
    assert_eq!(
        ws.expect_close().await,
        (1008, "The connection could not be recovered.".into())
    );
    let unknown = format!("{url}&awps_connection_id=nope&awps_reconnection_token=x");
    let mut ws = connect(&unknown, Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);

    // :drop?recoverable=false forgets the session.
    let (mut c, cc) = connect_json(&url, RELIABLE).await;
    let id = cc["connectionId"].as_str().unwrap();
    assert_eq!(
        fault(&emu, "h", id, ":drop?recoverable=false")
            .await
            .status(),
        200
    );
    c.expect_abrupt_end().await;
    let mut ws = connect(&recovery_url(&url, &cc), Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);
    emu.shutdown().await;
}

#[tokio::test]
async fn recovery_window_expires() {
    let emu = start_with(Config {
        recovery_window: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("b"));
    let (mut b, connected) = connect_json(&url, RELIABLE).await;
    fault(
        &emu,
        "h",
        connected["connectionId"].as_str().unwrap(),
        ":drop",
    )
    .await;
    b.expect_abrupt_end().await;
    stats_until(&emu, "the session was never forgotten", |s| {
        s["connections"] == 0
    })
    .await;
    let mut ws = connect(&recovery_url(&url, &connected), Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);
    emu.shutdown().await;
}

#[tokio::test]
async fn normal_close_ends_the_session() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("b"));
    let (b, connected) = connect_json(&url, RELIABLE).await;
    b.close().await;
    let mut ws = connect(&recovery_url(&url, &connected), Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_close_failing_the_connection_keeps_the_session_recoverable() {
    // A client fails a connection the service broke with 1002, 1007 or 1009 (RFC 6455,
    // 7.1.7), then recovers it.
    let emu = start().await;
    for code in [CloseCode::Protocol, CloseCode::Invalid, CloseCode::Size] {
        let url = emu.client_url("h", &all_roles("b"));
        let (mut b, connected) = connect_json(&url, RELIABLE).await;
        let frame = CloseFrame {
            code,
            reason: "".into(),
        };
        b.inner.close(Some(frame)).await.unwrap();
        stats_until(&emu, "the session never awaited its recovery", |s| {
            s["awaitingRecovery"] == 1
        })
        .await;
        let (again, recovered) = connect_json(&recovery_url(&url, &connected), RELIABLE).await;
        assert_eq!(recovered["connectionId"], connected["connectionId"]);
        again.close().await;
        stats_until(&emu, "the session was never ended", |s| {
            s["connections"] == 0
        })
        .await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn buffer_overflow_closes_with_a_reason() {
    let emu = start_with(Config {
        max_unacked_frames: 5,
        ..Config::default()
    })
    .await;
    let (mut a, mut b, _, _) = publisher_and_subscriber(&emu).await;
    for i in 0..6 {
        a.send_json(text("g", &i.to_string())).await;
    }
    for i in 1..=5 {
        assert_eq!(b.next_json().await["sequenceId"], i);
    }
    let d = b.next_json().await;
    assert_eq!(
        (d["type"].as_str(), d["event"].as_str()),
        (Some("system"), Some("disconnected"))
    );
    assert!(d["message"].as_str().unwrap().contains("overflow"), "{d}");
    let (code, reason) = b.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("overflow"), "{reason}");
    assert_eq!(stats(&emu).await["bufferOverflows"], 1);
    // Acked frames do not count.
    let (mut c, _) = connect_json(&emu.client_url("h", &all_roles("c")), RELIABLE).await;
    assert_ack_ok(&c.join("g", 1).await);
    for round in 0..4u64 {
        for _ in 0..4 {
            a.send_json(text("g", "x")).await;
        }
        let mut last = 0;
        for _ in 0..4 {
            last = c.next_json().await["sequenceId"].as_u64().unwrap();
        }
        assert_eq!(last, (round + 1) * 4);
        c.send_json(json!({"type":"sequenceAck","sequenceId":last}))
            .await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn mute_discards_frames() {
    let emu = start().await;
    let (mut a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_eq!(fault(&emu, "h", id, ":mute?ms=300").await.status(), 200);
    let muted_at = Instant::now(); // the server's mute ends before muted_at + 300 ms
    a.send_json(json!({"type":"joinGroup","group":"g","ackId":1}))
        .await;
    a.send_json(json!({"type":"ping"})).await;
    // Wait out the mute (the timer under test), then the next frame must be ack 2.
    tokio::time::sleep(Duration::from_millis(300).saturating_sub(muted_at.elapsed())).await;
    let ack = a
        .call(json!({"type":"joinGroup","group":"g","ackId":2}))
        .await;
    assert_ack_ok(&ack);
    assert!(muted_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(fault(&emu, "h", id, ":mute?ms=abc").await.status(), 400);
    emu.shutdown().await;
}

#[tokio::test]
async fn drop_acks_swallows_the_next_acks() {
    let emu = start().await;
    let (mut a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_eq!(
        fault(&emu, "h", id, ":dropAcks?count=1").await.status(),
        200
    );
    a.send_json(json!({"type":"joinGroup","group":"g","ackId":1}))
        .await;
    a.send_json(json!({"type":"joinGroup","group":"g","ackId":2}))
        .await;
    let ack = a.next_json().await;
    assert_eq!(ack["ackId"], 2, "ack 1 must have been swallowed: {ack}");
    assert_ack_ok(&ack);
    // The swallowed one was processed: a retry with the same ackId is a Duplicate.
    assert_ack_error(&a.join("g", 1).await, "Duplicate");
    emu.shutdown().await;
}

#[tokio::test]
async fn close_fault_sends_the_code_and_forgets() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("a"));
    let (mut a, connected) = connect_json(&url, RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_eq!(
        fault(&emu, "h", id, ":close?code=4001&reason=bye")
            .await
            .status(),
        200
    );
    assert_eq!(a.expect_close().await, (4001, "bye".into()));
    let mut ws = connect(&recovery_url(&url, &connected), Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);
    assert_eq!(fault(&emu, "h", id, ":close?code=1000").await.status(), 404);
    emu.shutdown().await;
}

#[tokio::test]
async fn fault_routes_reject_bad_requests() {
    let emu = start().await;
    let (_a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = connected["connectionId"].as_str().unwrap();
    assert_eq!(fault(&emu, "h", id, ":close?code=1006").await.status(), 400);
    assert_eq!(fault(&emu, "h", id, ":explode").await.status(), 404);
    assert_eq!(fault(&emu, "h", "nope", ":drop").await.status(), 404);
    assert_eq!(fault(&emu, "nohub", id, ":drop").await.status(), 404);
    assert_eq!(fault(&emu, "h", id, ":dropAcks").await.status(), 400);
    emu.shutdown().await;
}

#[tokio::test]
async fn fault_routes_name_their_method_to_another() {
    let emu = start().await;
    let (_a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let id = connected["connectionId"].as_str().unwrap();
    let http = reqwest::Client::new();
    let base = emu.endpoint();
    for (method, path, allow, takes) in [
        (
            reqwest::Method::GET,
            format!("/_emulator/hubs/h/connections/{id}/:drop"),
            "POST",
            "POST",
        ),
        (
            reqwest::Method::DELETE,
            format!("/_emulator/hubs/h/connections/{id}/:close"),
            "POST",
            "POST",
        ),
        (
            reqwest::Method::POST,
            "/_emulator/stats".to_owned(),
            "GET,HEAD",
            "GET or HEAD",
        ),
    ] {
        let resp = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "MethodNotAllowed", "{body}");
        assert_eq!(
            body["message"],
            format!("{method} is not allowed here: this route takes {takes}."),
        );
    }
    // Nothing was done: the connection is still there.
    assert_eq!(stats(&emu).await["connections"], 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn drop_on_plain_json_forgets_the_connection() {
    let emu = start().await;
    let (mut a, connected) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    fault(
        &emu,
        "h",
        connected["connectionId"].as_str().unwrap(),
        ":drop",
    )
    .await;
    a.expect_abrupt_end().await;
    stats_until(&emu, "the connection was never forgotten", |s| {
        s["connections"] == 0
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn periodic_drop_fault_then_recovery() {
    let emu = start_with(Config {
        fault_drop_every_ms: Some(100),
        ..Config::default()
    })
    .await;
    let url = emu.client_url("h", &all_roles("a"));
    let (mut a, connected) = connect_json(&url, RELIABLE).await;
    a.expect_abrupt_end().await;
    let (_a2, again) = connect_json(&recovery_url(&url, &connected), RELIABLE).await;
    assert_eq!(again["connectionId"], connected["connectionId"]);
    assert!(stats(&emu).await["faultDrops"].as_u64().unwrap() >= 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn recovery_replaces_a_socket_that_is_still_open() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("b"));
    let (mut old, connected) = connect_json(&url, RELIABLE).await;
    assert_ack_ok(&old.join("g", 1).await);
    let (mut new, again) = connect_json(&recovery_url(&url, &connected), RELIABLE).await;
    assert_eq!(again["connectionId"], connected["connectionId"]);
    old.expect_abrupt_end().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    a.send_json(text("g", "to the new socket")).await;
    assert_eq!(new.next_json().await["data"], "to the new socket");
    emu.shutdown().await;
}

#[tokio::test]
async fn random_keys_differ() {
    let (a, b) = (start().await, start().await);
    assert_ne!(a.access_key(), b.access_key());
    assert!(a.access_key().len() >= 32);
    assert!(a
        .connection_string()
        .contains(&format!("AccessKey={};", a.access_key())));
    a.shutdown().await;
    b.shutdown().await;
}

/// A ping round trip: every frame `ws` sent before it has been handled.
async fn handled(ws: &mut Ws) {
    ws.send_json(json!({"type":"ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");
}

/// Sends m{i} to group g for each i.
async fn publish(ws: &mut Ws, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        ws.send_json(text("g", &format!("m{i}"))).await;
    }
}

async fn unacked(emu: &Emulator) -> u64 {
    stats(emu).await["unackedMessages"].as_u64().unwrap()
}

/// (sequenceId, data) of a message frame.
fn seq_data(m: &Value) -> (u64, String) {
    assert_eq!(m["type"], "message", "{m}");
    (
        m["sequenceId"].as_u64().unwrap(),
        m["data"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn sequence_acks_ahead_behind_zero_and_max_neither_underflow_nor_stall() {
    let emu = start().await;
    let (mut a, mut b, url_b, connected) = publisher_and_subscriber(&emu).await;
    publish(&mut a, 1..=3).await;
    for i in 1..=3 {
        assert_eq!(seq_data(&b.next_json().await), (i, format!("m{i}")));
    }
    b.send_json(json!({"type":"sequenceAck","sequenceId":u64::MAX}))
        .await;
    handled(&mut b).await;
    assert_eq!(unacked(&emu).await, 0);

    publish(&mut a, 4..=6).await;
    for i in 4..=6 {
        assert_eq!(b.next_json().await["sequenceId"], i);
    }
    // Backwards, zero and repeated acks change nothing past the highest one.
    for seq in [0u64, 2, 4, 4, 3, 0] {
        b.send_json(json!({"type":"sequenceAck","sequenceId":seq}))
            .await;
    }
    handled(&mut b).await;
    assert_eq!(unacked(&emu).await, 2);

    // An ack ahead of every id sent covers what was sent, not what comes next.
    b.send_json(json!({"type":"sequenceAck","sequenceId":100}))
        .await;
    handled(&mut b).await;
    assert_eq!(unacked(&emu).await, 0);
    publish(&mut a, 7..=7).await;
    assert_eq!(seq_data(&b.next_json().await), (7, "m7".into()));
    assert_eq!(unacked(&emu).await, 1);

    fault(
        &emu,
        "h",
        connected["connectionId"].as_str().unwrap(),
        ":drop",
    )
    .await;
    b.expect_abrupt_end().await;
    let (mut b2, _) = connect_json(&recovery_url(&url_b, &connected), RELIABLE).await;
    assert_eq!(seq_data(&b2.next_json().await), (7, "m7".into()));
    publish(&mut a, 8..=8).await;
    assert_eq!(seq_data(&b2.next_json().await), (8, "m8".into()));
    emu.shutdown().await;
}

#[tokio::test]
async fn two_recoveries_at_once_leave_one_socket_with_the_whole_replay() {
    let emu = start().await;
    let (mut a, mut b, url_b, connected) = publisher_and_subscriber(&emu).await;
    for i in 1..=3 {
        a.send_json(text("g", &format!("m{i}"))).await;
    }
    for _ in 1..=3 {
        b.next_json().await;
    }
    let url = recovery_url(&url_b, &connected);
    let (x, y) = tokio::join!(connect(&url, Some(RELIABLE)), connect(&url, Some(RELIABLE)));
    b.expect_abrupt_end().await;
    // Both attached (each replacing the socket before it) before m4 is published.
    stats_until(&emu, "two recoveries never attached", |s| {
        s["recoveries"] == 2
    })
    .await;
    assert_ack_ok(
        &a.call(json!({"type":"sendToGroup","group":"g","ackId":1,"dataType":"text","data":"m4"}))
            .await,
    );
    // One socket was replaced and ends; the other has `connected`, the replay and m4.
    let read = |mut ws: Ws| async move {
        let mut frames = Vec::new();
        loop {
            let item = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws.inner))
                .await
                .expect("a frame or the end in time");
            match item {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    let last = v["sequenceId"] == 4;
                    frames.push(v);
                    if last {
                        return Some((frames, ws));
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                    panic!("a replaced socket ends without a close frame: {f:?}")
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    };
    let (x, y) = tokio::join!(read(x), read(y));
    let (frames, _kept) = match (x, y) {
        (Some(kept), None) | (None, Some(kept)) => kept,
        (x, y) => panic!(
            "exactly one socket must stay: {:?} {:?}",
            x.map(|k| k.0),
            y.map(|k| k.0)
        ),
    };
    assert_eq!(frames[0]["event"], "connected", "{frames:?}");
    assert_eq!(frames[0]["connectionId"], connected["connectionId"]);
    let got: Vec<(u64, String)> = frames[1..].iter().map(seq_data).collect();
    let want: Vec<(u64, String)> = (1..=4).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want);
    let s = stats(&emu).await;
    assert_eq!(
        (s["connections"].as_u64(), s["awaitingRecovery"].as_u64()),
        (Some(2), Some(0))
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn a_reconnection_token_of_another_connection_recovers_nothing() {
    let emu = start().await;
    let url_b = emu.client_url("h", &all_roles("b"));
    let (mut b, cb) = connect_json(&url_b, RELIABLE).await;
    let (mut c, cc) = connect_json(&emu.client_url("h", &all_roles("c")), RELIABLE).await;
    let crossed = json!({
        "connectionId": cb["connectionId"],
        "reconnectionToken": cc["reconnectionToken"],
    });
    let mut refused = connect(&recovery_url(&url_b, &crossed), Some(RELIABLE)).await;
    assert_eq!(
        refused.expect_close().await,
        (1008, "The connection could not be recovered.".into())
    );
    // Neither session was touched.
    handled(&mut b).await;
    handled(&mut c).await;
    let (_b2, again) = connect_json(&recovery_url(&url_b, &cb), RELIABLE).await;
    assert_eq!(again["connectionId"], cb["connectionId"]);
    assert_eq!(again["reconnectionToken"], cb["reconnectionToken"]);
    assert_eq!(again["userId"], "b");
    emu.shutdown().await;
}

#[tokio::test]
async fn recoveries_under_load_replay_from_the_ack_with_no_gap_and_no_repeat() {
    const N: u64 = 400;
    let emu = start().await;
    let (mut a, mut b, url_b, connected) = publisher_and_subscriber(&emu).await;
    let publisher = tokio::spawn(async move {
        for i in 1..=N {
            a.send_json(text("g", &format!("m{i}"))).await;
        }
        a
    });
    let recovery = recovery_url(&url_b, &connected);
    // On each socket the messages are consecutive from one past the last handled ack.
    let mut expected = 1u64;
    while expected <= N {
        let (seq, data) = seq_data(&b.next_json().await);
        assert_eq!((seq, data), (expected, format!("m{expected}")));
        expected += 1;
        if seq % 50 == 0 && seq < N {
            // Ack, make sure it is handled, then recover with the old socket still open.
            b.send_json(json!({"type":"sequenceAck","sequenceId":seq}))
                .await;
            b.send_json(json!({"type":"ping"})).await;
            loop {
                let m = b.next_json().await;
                if m["type"] == "pong" {
                    break;
                }
                assert_eq!(seq_data(&m), (expected, format!("m{expected}")));
                expected += 1;
            }
            b = connect_json(&recovery, RELIABLE).await.0;
            expected = seq + 1;
        }
    }
    assert_eq!(stats(&emu).await["recoveries"], (N - 1) / 50);
    publisher.await.unwrap();
    emu.shutdown().await;
}

#[tokio::test]
async fn a_replay_too_big_for_the_outbound_queue_ends_the_session_for_good() {
    let emu = start_with(Config {
        max_outbound_queue: 2,
        ..Config::default()
    })
    .await;
    let (mut a, mut b, url_b, connected) = publisher_and_subscriber(&emu).await;
    fault(
        &emu,
        "h",
        connected["connectionId"].as_str().unwrap(),
        ":drop",
    )
    .await;
    b.expect_abrupt_end().await;
    for i in 1..=20 {
        a.send_json(text("g", &format!("m{i}"))).await;
    }
    handled(&mut a).await;
    assert_eq!(unacked(&emu).await, 20);
    // Twenty frames cannot be queued to a socket: the session cannot be recovered and
    // ends with the reason, instead of staying forever without a socket.
    let mut b2 = connect(&recovery_url(&url_b, &connected), Some(RELIABLE)).await;
    let d = b2.next_json().await;
    assert_eq!(d["event"], "disconnected", "{d}");
    let (code, reason) = b2.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("replay"), "{reason}");
    stats_until(&emu, "the session was never forgotten", |s| {
        s["connections"] == 1 && s["unackedMessages"] == 0 && s["slotsTaken"] == 1
    })
    .await;
    emu.shutdown().await;
}
