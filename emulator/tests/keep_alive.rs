//! The server's keep-alive: an upgraded peer that goes silent (a half-open TCP
//! connection) is pinged, then dropped as an abrupt loss; a peer that answers pings is
//! kept however long it sends nothing of its own.
mod common;

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Silence after which the emulator pings a peer, and after which it drops it.
const PING_AFTER: Duration = Duration::from_millis(150);
const DROP_AFTER: Duration = Duration::from_millis(800);

/// WebSocket opcodes of the frames a raw peer reads.
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

fn short_keep_alive() -> Config {
    Config {
        keep_alive_interval: PING_AFTER,
        keep_alive_timeout: DROP_AFTER,
        ..Config::default()
    }
}

/// Polls the stats until `key` is `value`.
async fn until_stat(emu: &Emulator, key: &str, value: u64) {
    stats_until(emu, &format!("{key} never {value}"), |now| {
        now[key] == value
    })
    .await;
}

/// An upstream that reports the `ce-type` of every system event it receives.
async fn system_events() -> (String, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap| {
            let tx = tx.clone();
            async move {
                let ce_type = headers["ce-type"].to_str().unwrap();
                if ce_type.starts_with("azure.webpubsub.sys.") {
                    let _ = tx.send(ce_type.to_owned());
                }
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

#[tokio::test]
async fn a_silent_reliable_peer_is_pinged_then_dropped_and_stays_recoverable() {
    let emu = start_with(short_keep_alive()).await;
    let url = emu.client_url("h", &all_roles("u"));
    let mut peer = raw_upgrade(&emu, &url, Some(RELIABLE)).await;
    until_stat(&emu, "keepAliveDrops", 1).await;
    // What the peer was sent: `connected`, a ping, and no close frame before the end.
    let frames = frames_until_end(&mut peer).await;
    let opcodes: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
    assert_eq!(opcodes.first(), Some(&TEXT), "{frames:?}");
    assert!(opcodes[1..].iter().all(|op| *op == PING), "{frames:?}");
    assert!(opcodes.contains(&PING) && !opcodes.contains(&CLOSE));
    let connected: Value = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!(connected["event"], "connected", "{connected}");
    // Lost as if its TCP connection had died: the session waits for its recovery.
    let now = stats(&emu).await;
    assert_eq!(now["connections"], 1, "{now}");
    assert_eq!(now["awaitingRecovery"], 1, "{now}");
    let recover = format!(
        "{url}&awps_connection_id={}&awps_reconnection_token={}",
        connected["connectionId"].as_str().unwrap(),
        connected["reconnectionToken"].as_str().unwrap()
    );
    let (mut ws, again) = connect_json(&recover, RELIABLE).await;
    assert_eq!(again["connectionId"], connected["connectionId"]);
    assert_ack_ok(&ws.join("g", 1).await);
    ws.close().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn silent_json_and_simple_peers_are_dropped_and_disconnected_upstream() {
    let (upstream, mut events) = system_events().await;
    let emu = start_with(Config {
        upstream: Some(upstream),
        ..short_keep_alive()
    })
    .await;
    let token = TokenOptions {
        groups: vec!["g".into()],
        ..all_roles("u")
    };
    let url = emu.client_url("h", &token);
    let mut peers = vec![
        raw_upgrade(&emu, &url, Some(JSON)).await,
        raw_upgrade(&emu, &url, None).await,
    ];
    until_stat(&emu, "keepAliveDrops", 2).await;
    for peer in &mut peers {
        let frames = frames_until_end(peer).await;
        assert!(frames.iter().any(|(op, _)| *op == PING), "{frames:?}");
        assert!(frames.iter().all(|(op, _)| *op != CLOSE), "{frames:?}");
    }
    // Gone for good, with their group memberships and user entries.
    let now = stats(&emu).await;
    let held = ["connections", "groups", "users", "slotsTaken"].map(|k| now[k].clone());
    assert_eq!(held, [0, 0, 0, 0].map(Value::from), "{now}");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("system events in time")
            .unwrap();
        seen.push(event);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "azure.webpubsub.sys.connected",
            "azure.webpubsub.sys.connected",
            "azure.webpubsub.sys.disconnected",
            "azure.webpubsub.sys.disconnected"
        ]
    );
    drop(peers);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_answers_pings_is_kept() {
    let emu = start_with(short_keep_alive()).await;
    let url = emu.client_url("h", &all_roles("u"));
    for protocol in [Some(JSON), Some(RELIABLE), None] {
        let mut ws = connect(&url, protocol).await;
        // It sends nothing of its own, only reads (which answers every ping with a pong),
        // for twice the drop timeout.
        let until = tokio::time::Instant::now() + DROP_AFTER * 2;
        let mut pings = 0;
        while let Ok(item) = tokio::time::timeout_at(until, ws.inner.next()).await {
            match item {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Text(_))) => {} // connected
                other => panic!("{protocol:?}: the server ended the socket: {other:?}"),
            }
        }
        assert!(pings >= 2, "{protocol:?}: {pings} pings");
        if protocol.is_some() {
            assert_ack_ok(&ws.join("g", 1).await);
        }
        let now = stats(&emu).await;
        assert_eq!(
            (now["keepAliveDrops"].clone(), now["connections"].clone()),
            (json!(0), json!(1)),
            "{protocol:?}: {now}"
        );
        ws.close().await;
        until_stat(&emu, "connections", 0).await;
    }
    emu.shutdown().await;
}
