//! Security checks not covered elsewhere: forged and tampered tokens, `nbf`, a
//! recovery that borrows another connection's reconnection token or forges the access
//! token, and group operations just outside what the token's roles allow.
mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};

async fn status_of(url: &str) -> u16 {
    match try_connect(url, Some(RELIABLE)).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn part(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn forged_tampered_and_not_yet_valid_tokens_get_401() {
    let emu = start().await;
    let base = format!("ws://127.0.0.1:{}/client/hubs/h", emu.port());
    let aud = format!("http://127.0.0.1:{}/client/hubs/h", emu.port());
    let key = emu.access_key().to_owned();
    let claims = json!({"aud": aud, "exp": now() + 60, "sub": "a"});
    let good = webpubsub_emulator::auth::sign(&key, &claims);
    assert_eq!(status_of(&format!("{base}?access_token={good}")).await, 101);

    let pieces: Vec<&str> = good.split('.').collect();
    let admin = json!({"aud": aud, "exp": now() + 60, "sub": "admin", "role": ["webpubsub.joinLeaveGroup"]});
    let tampered = format!("{}.{}.{}", pieces[0], part(&admin), pieces[2]);
    let unsigned = format!(
        "{}.{}.",
        part(&json!({"alg":"none","typ":"JWT"})),
        part(&claims)
    );
    let none_with_sig = format!(
        "{}.{}.{}",
        part(&json!({"alg":"none","typ":"JWT"})),
        pieces[1],
        pieces[2]
    );
    let hs512 = format!(
        "{}.{}.{}",
        part(&json!({"alg":"HS512","typ":"JWT"})),
        pieces[1],
        pieces[2]
    );
    let not_yet = webpubsub_emulator::auth::sign(
        &key,
        &json!({"aud": aud, "exp": now() + 600, "nbf": now() + 3600}),
    );
    let empty_key = webpubsub_emulator::auth::sign("", &claims);
    let two_parts = format!("{}.{}", pieces[0], pieces[1]);
    for (name, token) in [
        ("tampered payload", tampered.as_str()),
        ("alg none", unsigned.as_str()),
        ("alg none with a signature", none_with_sig.as_str()),
        ("alg switched", hs512.as_str()),
        ("nbf in the future", not_yet.as_str()),
        ("empty key", empty_key.as_str()),
        ("two parts", two_parts.as_str()),
        ("empty", ""),
    ] {
        assert_eq!(
            status_of(&format!("{base}?access_token={token}")).await,
            401,
            "{name}"
        );
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn a_recovery_needs_its_own_reconnection_token_and_a_genuine_access_token() {
    let emu = start().await;
    let url_a = emu.client_url("h", &all_roles("a"));
    let url_b = emu.client_url("h", &all_roles("b"));
    let (_a, ca) = connect_json(&url_a, RELIABLE).await;
    let (_b, cb) = connect_json(&url_b, RELIABLE).await;
    let id_b = cb["connectionId"].as_str().unwrap();
    let token_a = ca["reconnectionToken"].as_str().unwrap();

    // b's id with a's (valid) reconnection token: refused.
    let borrowed = format!("{url_b}&awps_connection_id={id_b}&awps_reconnection_token={token_a}");
    let mut ws = connect(&borrowed, Some(RELIABLE)).await;
    assert_eq!(ws.expect_close().await.0, 1008);

    // The right pair behind a forged access token: refused before the upgrade.
    let token_b = cb["reconnectionToken"].as_str().unwrap();
    let forged = webpubsub_emulator::auth::sign(
        "not-the-key",
        &json!({"aud": format!("http://127.0.0.1:{}/client/hubs/h", emu.port()), "exp": now() + 60}),
    );
    let forged_url = format!(
        "ws://127.0.0.1:{}/client/hubs/h?access_token={forged}&awps_connection_id={id_b}&awps_reconnection_token={token_b}",
        emu.port()
    );
    assert_eq!(status_of(&forged_url).await, 401);
    // The same pair from another hub: refused.
    let other_hub = emu.client_url("other", &all_roles("b"));
    let mut ws = connect(
        &format!("{other_hub}&awps_connection_id={id_b}&awps_reconnection_token={token_b}"),
        Some(RELIABLE),
    )
    .await;
    assert_eq!(ws.expect_close().await.0, 1008);
    assert_eq!(stats(&emu).await["recoveries"], 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn group_operations_just_outside_the_roles_are_forbidden() {
    let emu = start().await;
    let scoped = TokenOptions {
        user_id: Some("s".into()),
        roles: vec![
            "webpubsub.joinLeaveGroup.g1".into(),
            "webpubsub.sendToGroups.room*".into(),
            "webpubsub.joinLeaveGroups.team.**".into(),
        ],
        ..Default::default()
    };
    let (mut c, _) = connect_json(&emu.client_url("h", &scoped), JSON).await;
    let send = |ack: u64, g: &str| json!({"type":"sendToGroup","group":g,"ackId":ack,"dataType":"text","data":"x"});
    let leave = |ack: u64, g: &str| json!({"type":"leaveGroup","group":g,"ackId":ack});
    // Allowed, as controls.
    assert_ack_ok(&c.join("g1", 1).await);
    assert_ack_ok(&c.call(leave(2, "g1")).await);
    assert_ack_ok(&c.call(send(3, "room7")).await);
    assert_ack_ok(&c.join("team.a.b", 4).await);
    // Just outside.
    assert_ack_error(&c.call(leave(5, "g2")).await, "Forbidden");
    assert_ack_error(&c.join("g1x", 6).await, "Forbidden");
    assert_ack_error(&c.join("G1", 7).await, "Forbidden");
    assert_ack_error(&c.call(send(8, "g1")).await, "Forbidden");
    assert_ack_error(&c.call(send(9, "room1.sub")).await, "Forbidden");
    assert_ack_error(&c.call(send(10, "xroom1")).await, "Forbidden");
    assert_ack_error(&c.join("room1", 11).await, "Forbidden");
    assert_ack_error(&c.join("team", 12).await, "Forbidden");
    assert_ack_error(&c.call(send(13, "team.a")).await, "Forbidden");

    // A token without roles may do nothing with groups, not even leave.
    let (mut none, _) = connect_json(&emu.client_url("h", &TokenOptions::default()), JSON).await;
    assert_ack_error(&none.call(leave(1, "g1")).await, "Forbidden");
    emu.shutdown().await;
}
