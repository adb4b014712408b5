//! Reliable protocol: sequence ids, recovery with replay, failed recovery, overflow;
//! and the fault-injection routes.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn recovery_url(url: &str, connected: &Value) -> String {
    format!(
        "{url}&awps_connection_id={}&awps_reconnection_token={}",
        connected["connectionId"].as_str().unwrap(),
        connected["reconnectionToken"].as_str().unwrap()
    )
}

fn text(group: &str, data: &str) -> Value {
    json!({"type":"sendToGroup","group":group,"dataType":"text","data":data})
}

#[tokio::test]
async fn recovery_replays_every_unacked_frame_in_order() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let url_b = emu.client_url("h", &all_roles("b"));
    let (mut b, connected) = connect_json(&url_b, RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap().to_owned();
    assert_ack_ok(&b.join("g", 1).await);
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
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["connections"] != 0 {
        assert!(Instant::now() < deadline, "the session was never forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
async fn buffer_overflow_closes_with_a_reason() {
    let emu = start_with(Config {
        max_unacked_frames: 5,
        ..Config::default()
    })
    .await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), RELIABLE).await;
    assert_ack_ok(&b.join("g", 1).await);
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
    let deadline = Instant::now() + WAIT;
    while stats(&emu).await["connections"] != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
