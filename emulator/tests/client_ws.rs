//! The client endpoint: every frame type, acks, permissions, echo, auth.
mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connected_frame_and_subprotocol() {
    let emu = start().await;
    let url = emu.client_url("chat", &all_roles("alice"));
    let (ws, connected) = connect_json(&url, RELIABLE).await;
    assert_eq!(ws.protocol.as_deref(), Some(RELIABLE));
    assert_eq!(connected["userId"], "alice");
    assert!(connected["connectionId"].as_str().unwrap().len() > 8);
    assert!(connected["reconnectionToken"].is_string());

    let (ws2, connected2) = connect_json(&url, JSON).await;
    assert_eq!(ws2.protocol.as_deref(), Some(JSON));
    assert!(
        connected2.get("reconnectionToken").is_none(),
        "{connected2}"
    );

    let anon = emu.client_url("chat", &TokenOptions::default());
    let (_ws3, c3) = connect_json(&anon, JSON).await;
    // Present and null, as the service's own transcripts show it.
    assert_eq!(c3.get("userId"), Some(&serde_json::Value::Null), "{c3}");
    emu.shutdown().await;
}

#[tokio::test]
async fn join_send_ack_and_group_message() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), RELIABLE).await;
    assert_ack_ok(&b.join("g", 1).await);
    let ack = a
        .call(json!({"type":"sendToGroup","group":"g","ackId":7,"dataType":"text","data":"hi"}))
        .await;
    assert_ack_ok(&ack);
    let m = b.next_json().await;
    assert_eq!(m["type"], "message");
    assert_eq!(m["from"], "group");
    assert_eq!(m["group"], "g");
    assert_eq!(m["fromUserId"], "a");
    assert_eq!(m["dataType"], "text");
    assert_eq!(m["data"], "hi");
    assert_eq!(m["sequenceId"], 1);

    a.send_json(json!({"type":"sendToGroup","group":"g","dataType":"json","data":{"x":[1,2]}}))
        .await;
    let m = b.next_json().await;
    assert_eq!(m["data"], json!({"x":[1,2]}));
    assert_eq!(m["sequenceId"], 2);

    a.send_json(json!({"type":"sendToGroup","group":"g","dataType":"binary","data":"AAEC"}))
        .await;
    let m = b.next_json().await;
    assert_eq!(m["dataType"], "binary");
    assert_eq!(m["data"], "AAEC");

    // The non-reliable protocol never carries sequenceId.
    assert_ack_ok(&a.join("g", 8).await);
    b.send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"back"}))
        .await;
    let m = a.next_json().await;
    assert_eq!(m["data"], "back");
    assert!(m.get("sequenceId").is_none(), "{m}");
    assert_eq!(b.next_json().await["data"], "back"); // b's own echo

    // Leave: no more messages.
    assert_ack_ok(
        &a.call(json!({"type":"leaveGroup","group":"g","ackId":9}))
            .await,
    );
    b.send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"gone"}))
        .await;
    assert_eq!(b.next_json().await["data"], "gone");
    assert_ack_ok(&a.join("other", 10).await); // the next frame a sees is this ack
    emu.shutdown().await;
}

#[tokio::test]
async fn no_echo_excludes_the_sender() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    assert_ack_ok(&a.join("g", 1).await);
    a.send_json(
        json!({"type":"sendToGroup","group":"g","noEcho":true,"dataType":"text","data":"1"}),
    )
    .await;
    a.send_json(
        json!({"type":"sendToGroup","group":"g","noEcho":false,"dataType":"text","data":"2"}),
    )
    .await;
    let m = a.next_json().await;
    assert_eq!(m["data"], "2", "the noEcho message must not come back");
    emu.shutdown().await;
}

#[tokio::test]
async fn duplicate_ack_id() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    assert_ack_ok(&a.join("g", 5).await);
    assert_ack_error(&a.join("g", 5).await, "Duplicate");
    let ack = a
        .call(json!({"type":"sendToGroup","group":"g","ackId":5,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "Duplicate");
    // The text of the service's own example (howto-develop-reliable-clients).
    assert_eq!(
        ack["error"]["message"], "Message with ack-id: 5 has been processed",
        "{ack}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn data_without_a_data_type_is_json() {
    // "If dataType isn't specified, it defaults to json" (the JSON subprotocol
    // reference, for sendToGroup and event); the service internals page sends a
    // group message without dataType or ackId.
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    assert_ack_ok(&a.join("g", 1).await);
    a.send_json(json!({"type":"sendToGroup","group":"g","data":{"hello":"world"}}))
        .await;
    let m = a.next_json().await;
    assert_eq!(
        (&m["dataType"], &m["data"]),
        (&json!("json"), &json!({"hello":"world"})),
        "{m}"
    );
    // The echo comes before the ack.
    a.send_json(json!({"type":"sendToGroup","group":"g","ackId":2,"data":"a JSON string"}))
        .await;
    let m = a.next_json().await;
    assert_eq!(
        (&m["dataType"], &m["data"]),
        (&json!("json"), &json!("a JSON string")),
        "{m}"
    );
    assert_ack_ok(&a.next_json().await);
    assert_ack_ok(
        &a.call(json!({"type":"event","event":"e","ackId":3,"data":[1,2]}))
            .await,
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn ack_ids_at_the_ends_of_their_range_and_the_window_of_1000() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    for id in [0, u64::MAX] {
        let ack = a.join("g", id).await;
        assert_ack_ok(&ack);
        assert_eq!(ack["ackId"], id, "{ack}");
        assert_ack_error(&a.join("g", id).await, "Duplicate");
    }
    // The last 1000 ackIds are remembered (0 and MAX above are among them).
    for id in 1..=998 {
        a.send_json(json!({"type":"joinGroup","group":"g","ackId":id}))
            .await;
    }
    for id in 1..=998u64 {
        let ack = a.next_json().await;
        assert_eq!(ack["ackId"], id, "{ack}");
        assert_ack_ok(&ack);
    }
    assert_ack_error(&a.join("g", 0).await, "Duplicate");
    assert_ack_ok(&a.join("g", 999).await); // the 1001st: 0 is forgotten
    assert_ack_ok(&a.join("g", 0).await); // ... and MAX with it
    assert_ack_ok(&a.join("g", u64::MAX).await);
    assert_ack_error(&a.join("g", 3).await, "Duplicate");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_send_right_after_a_join_reaches_the_sender_and_leaving_twice_is_fine() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    // Not waiting for the join's ack: frames of one connection are handled in order.
    a.send_json(json!({"type":"joinGroup","group":"g","ackId":1}))
        .await;
    a.send_json(json!({"type":"sendToGroup","group":"g","ackId":2,"dataType":"text","data":"hi"}))
        .await;
    let first = a.next_json().await;
    assert_ack_ok(&first);
    assert_eq!(first["ackId"], 1);
    let mut rest = [a.next_json().await, a.next_json().await];
    rest.sort_by_key(|f| f["type"].as_str().map(str::to_owned));
    assert_ack_ok(&rest[0]);
    assert_eq!(rest[0]["ackId"], 2);
    assert_eq!(
        (&rest[1]["data"], &rest[1]["sequenceId"]),
        (&json!("hi"), &json!(1))
    );
    for id in [3, 4] {
        let left = a
            .call(json!({"type":"leaveGroup","group":"g","ackId":id}))
            .await;
        assert_ack_ok(&left);
    }
    assert_ack_ok(
        &a.call(json!({"type":"leaveGroup","group":"never","ackId":5}))
            .await,
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn forbidden_without_roles_and_scoped_roles() {
    let emu = start().await;
    let none = TokenOptions::default();
    let (mut a, _) = connect_json(&emu.client_url("h", &none), JSON).await;
    // The service's own texts (the join one is quoted in @azure/web-pubsub's README).
    let join = a.join("g", 1).await;
    assert_ack_error(&join, "Forbidden");
    assert_eq!(
        join["error"]["message"],
        "The client does not have permission to join group 'g'."
    );
    let leave = a
        .call(json!({"type":"leaveGroup","group":"g","ackId":3}))
        .await;
    assert_ack_error(&leave, "Forbidden");
    assert_eq!(
        leave["error"]["message"],
        "The client does not have permission to leave group 'g'."
    );
    let ack = a
        .call(json!({"type":"sendToGroup","group":"g","ackId":2,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "Forbidden");
    assert_eq!(
        ack["error"]["message"],
        "The client does not have permission to send to group 'g'."
    );

    let scoped = TokenOptions {
        roles: vec![
            "webpubsub.joinLeaveGroup.g1".into(),
            "webpubsub.sendToGroups.room*".into(),
        ],
        ..Default::default()
    };
    let (mut b, _) = connect_json(&emu.client_url("h", &scoped), JSON).await;
    assert_ack_ok(&b.join("g1", 1).await);
    assert_ack_error(&b.join("g2", 2).await, "Forbidden");
    let send = |ack: u64, g: &str| json!({"type":"sendToGroup","group":g,"ackId":ack,"dataType":"text","data":"x"});
    assert_ack_ok(&b.call(send(3, "room1")).await);
    assert_ack_error(&b.call(send(4, "g1")).await, "Forbidden");
    emu.shutdown().await;
}

#[tokio::test]
async fn initial_groups_from_the_token() {
    let emu = start().await;
    let opts = TokenOptions {
        groups: vec!["start".into()],
        ..Default::default()
    };
    let (mut a, _) = connect_json(&emu.client_url("h", &opts), JSON).await;
    let (mut b, _) = connect_json(&emu.client_url("h", &all_roles("b")), JSON).await;
    assert_ack_ok(
        &b.call(
            json!({"type":"sendToGroup","group":"start","ackId":1,"dataType":"text","data":"w"}),
        )
        .await,
    );
    assert_eq!(a.next_json().await["data"], "w");
    emu.shutdown().await;
}

#[tokio::test]
async fn ping_pong_and_unknown_types() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    a.send_json(json!({"type":"ping"})).await;
    assert_eq!(a.next_json().await["type"], "pong");
    let ack = a.call(json!({"type":"somethingNew","ackId":3})).await;
    assert_ack_error(&ack, "BadRequest");
    a.send_json(json!({"type":"somethingNewer"})).await; // ignored, no ack id
    a.send_json(json!({"type":"ping"})).await;
    assert_eq!(a.next_json().await["type"], "pong");
    emu.shutdown().await;
}

#[tokio::test]
async fn events_and_invokes_without_upstream() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let ack = a
        .call(json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"}))
        .await;
    assert_ack_ok(&ack);
    a.send_json(json!({"type":"invoke","invocationId":"i1","target":"event","event":"e","dataType":"text","data":"x"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(r["type"], "invokeResponse");
    assert_eq!(r["invocationId"], "i1");
    assert_eq!(r["success"], false);
    assert_eq!(r["error"]["name"], "BadRequest");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("No upstream server is configured"));
    a.send_json(json!({"type":"cancelInvocation","invocationId":"i1"}))
        .await;
    a.send_json(json!({"type":"ping"})).await;
    assert_eq!(a.next_json().await["type"], "pong");
    emu.shutdown().await;
}

#[tokio::test]
async fn simple_client_gets_raw_frames() {
    let emu = start().await;
    let opts = TokenOptions {
        groups: vec!["g".into()],
        ..Default::default()
    };
    let mut simple = connect(&emu.client_url("h", &opts), None).await;
    assert_eq!(simple.protocol, None);
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), JSON).await;
    let send = |ack: u64, dt: &str, data: serde_json::Value| json!({"type":"sendToGroup","group":"g","ackId":ack,"dataType":dt,"data":data});
    assert_ack_ok(&a.call(send(1, "text", json!("plain"))).await);
    assert_ack_ok(&a.call(send(2, "binary", json!("AQID"))).await);
    assert_ack_ok(&a.call(send(3, "json", json!({"k":1}))).await);
    assert_eq!(simple.next_message().await, Message::Text("plain".into()));
    assert_eq!(
        simple.next_message().await,
        Message::Binary(vec![1u8, 2, 3].into())
    );
    assert_eq!(
        simple.next_message().await,
        Message::Text(r#"{"k":1}"#.into())
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn a_simple_client_that_sends_without_an_upstream_is_dropped() {
    // "If the service can't find any registered servers to receive the messages, the
    // service also drops the connection" (service internals); a user saw code 1000
    // (Azure/azure-webpubsub#432).
    let emu = start().await;
    let url = emu.client_url("h", &TokenOptions::default());
    for message in [
        Message::Text("hi".into()),
        Message::Binary(vec![1u8].into()),
    ] {
        let mut simple = connect(&url, None).await;
        simple.inner.send(message).await.unwrap();
        let (code, reason) = simple.expect_close().await;
        assert_eq!(code, 1000, "{reason}");
        assert!(reason.contains("upstream"), "{reason}");
    }
    stats_until(&emu, "the simple clients were never forgotten", |s| {
        s["connections"] == 0
    })
    .await;
    emu.shutdown().await;
}

async fn status_of(url: &str, protocol: Option<&str>) -> u16 {
    match try_connect(url, protocol).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn bad_tokens_get_401_before_upgrade() {
    let emu = start().await;
    let base = format!("ws://127.0.0.1:{}/client/hubs/h", emu.port());
    let aud = format!("http://127.0.0.1:{}/client/hubs/h", emu.port());
    let key = emu.access_key().to_owned();
    let sign = |claims: serde_json::Value, key: &str| webpubsub_emulator::auth::sign(key, &claims);
    let good = sign(json!({"aud": aud, "exp": now() + 60}), &key);
    assert_eq!(
        status_of(&format!("{base}?access_token={good}"), Some(JSON)).await,
        101
    );
    // Audience variants are tolerated.
    let localhost = sign(
        json!({"aud": format!("http://localhost:{}/client/hubs/h?x=1", emu.port()), "exp": now() + 60}),
        &key,
    );
    assert_eq!(
        status_of(&format!("{base}?access_token={localhost}"), Some(JSON)).await,
        101
    );

    let expired = sign(json!({"aud": aud, "exp": now() - 10}), &key);
    let wrong_key = sign(json!({"aud": aud, "exp": now() + 60}), "not-the-key");
    let wrong_aud = sign(
        json!({"aud": format!("http://127.0.0.1:{}/client/hubs/other", emu.port()), "exp": now() + 60}),
        &key,
    );
    for bad in [
        expired.as_str(),
        wrong_key.as_str(),
        wrong_aud.as_str(),
        "garbage",
    ] {
        assert_eq!(
            status_of(&format!("{base}?access_token={bad}"), Some(JSON)).await,
            401,
            "{bad}"
        );
    }
    assert_eq!(status_of(&base, Some(JSON)).await, 401);
    // Authorization header works too.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        base.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {good}").parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    // An unknown subprotocol is refused.
    assert_eq!(
        status_of(
            &format!("{base}?access_token={good}"),
            Some("protobuf.webpubsub.azure.v1")
        )
        .await,
        400
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn a_client_close_gets_a_close_reply() {
    let emu = start().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    a.inner.close(None).await.unwrap();
    let end = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut a.inner))
        .await
        .expect("the reply in time");
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_restart_on_the_same_port_works_and_clients_see_1001() {
    let emu = start().await;
    let port = emu.port();
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("a")), RELIABLE).await;
    emu.shutdown().await;
    assert_eq!(a.expect_close().await.0, 1001);
    let again = start_with(Config {
        port,
        ..Config::default()
    })
    .await;
    assert_eq!(again.port(), port);
    let (_b, _) = connect_json(&again.client_url("h", &all_roles("b")), JSON).await;
    again.shutdown().await;
}

#[tokio::test]
async fn frames_a_client_sends_after_the_server_closed_it_are_ignored() {
    let emu = start().await;
    let url = emu.client_url("h", &all_roles("u"));
    let (mut receiver, _) = connect_json(&url, JSON).await;
    assert_ack_ok(&receiver.join("g", 1).await);
    for close in ["fault", "REST"] {
        let (mut late, connected) = connect_json(&url, JSON).await;
        let id = connected["connectionId"].as_str().unwrap();
        if close == "fault" {
            let closed = fault(&emu, "h", id, ":close?code=1000&reason=bye").await;
            assert!(closed.status().is_success());
        } else {
            let path = format!("/api/hubs/h/connections/{id}");
            let token = rest_token(&emu, &format!("{}{path}", emu.endpoint()));
            let status = reqwest::Client::new()
                .delete(format!("{}{path}", emu.endpoint()))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 204);
        }
        // The session is gone: what its socket still carries during the close
        // handshake is not handled (this send would be published before the marker).
        late.send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"late"}))
            .await;
        receiver
            .send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"marker"}))
            .await;
        assert_eq!(receiver.next_json().await["data"], "marker", "{close}");
    }
    emu.shutdown().await;
}

/// GETs `url`, asserts the answer is `status` in plain text (as every client endpoint
/// error, not the REST API's JSON), and returns its body.
async fn plain_text_answer(url: &str, status: u16) -> String {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status().as_u16(), status, "{url}");
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "{url}: {content_type}"
    );
    resp.text().await.unwrap()
}

#[tokio::test]
async fn paths_under_clients_say_what_is_served() {
    let emu = start().await;
    // The service's MQTT and Socket.IO endpoints, as the SDKs' `clientProtocol` and the
    // Socket.IO client (which adds a `/` and its own query) request them: 501.
    for (path, kind) in [
        ("mqtt/hubs/chat?access_token=x", "mqtt"),
        ("socketio/hubs/chat?access_token=x", "socketio"),
        ("socketio/hubs/chat/?EIO=4&transport=polling", "socketio"),
        ("socketio/hubs/chat/?EIO=4&transport=websocket", "socketio"),
        ("MQTT/hubs/chat", "mqtt"),
        // The hub is not looked at: a name the service refuses, or one with an encoded
        // `/` or a byte that is not UTF-8, is still under a served kind.
        ("mqtt/hubs/%2F", "mqtt"),
        ("mqtt/hubs/a%2Fb", "mqtt"),
        ("socketio/hubs/%E9", "socketio"),
    ] {
        let url = format!("{}/clients/{path}", emu.endpoint());
        let body = plain_text_answer(&url, 501).await;
        assert!(
            body.starts_with(&format!(
                "'{kind}' clients are not supported by the emulator"
            )),
            "{url}: {body}"
        );
    }
    // Anything else there, `/clients` itself included, names nothing: 404, naming what
    // is served and the path as it was sent.
    for path in [
        "/clients",
        "/clients/",
        "/clients/websocket/hubs/chat",
        "/clients/mqtt",
        "/clients/mqtt/hubs/",
        "/clients/socketio/chat",
        "/clients/x/y",
        "/clients/%2Fmqtt/hubs/chat",
    ] {
        let url = format!("{}{path}", emu.endpoint());
        let body = plain_text_answer(&url, 404).await;
        assert!(
            body.starts_with(&format!("No client endpoint at {path}: "))
                && body.contains("/clients/mqtt/hubs/{hub}")
                && body.contains("/clients/socketio/hubs/{hub}")
                && body.contains("/client/hubs/{hub}"),
            "{url}: {body}"
        );
    }
    emu.shutdown().await;
}

/// A path under `/client/` that names no client endpoint (`/client/hubs` without a hub
/// among them) gets `404` in plain text, as the other client endpoint errors, naming the
/// path as sent and the client endpoints: not the REST API's JSON error.
#[tokio::test]
async fn paths_under_client_without_an_endpoint_say_what_is_served() {
    let emu = start().await;
    for path in [
        "/client/hubs",
        "/client/hubs/",
        "/client/hubs/chat/",
        "/client/hubs/chat/x",
        "/client/x",
    ] {
        let url = format!("{}{path}?hub=chat", emu.endpoint());
        let body = plain_text_answer(&url, 404).await;
        assert!(
            body.starts_with(&format!("No client endpoint at {path}: "))
                && body.contains("/client/hubs/{hub}")
                && body.contains("/client?hub={hub}"),
            "{url}: {body}"
        );
    }
    emu.shutdown().await;
}

/// `/client/hubs/{hub}` takes its hub from the path: a `hub` query parameter there is
/// one like any other.
#[tokio::test]
async fn on_the_hub_path_a_hub_in_the_query_changes_nothing() {
    let emu = start().await;
    let (mut in_a, _) = connect_json(&emu.client_url("a", &all_roles("x")), JSON).await;
    assert_ack_ok(&in_a.join("g", 1).await);
    let (mut in_b, _) = connect_json(&emu.client_url("b", &all_roles("y")), JSON).await;
    assert_ack_ok(&in_b.join("g", 1).await);
    let for_a = emu.client_url("a", &all_roles("z"));
    let (mut both, _) = connect_json(&format!("{for_a}&hub=b"), JSON).await;
    both.send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"to a"}))
        .await;
    assert_eq!(in_a.next_json().await["data"], "to a");
    // Hub b got nothing: the next message in_b gets is the one sent in b.
    in_b.send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"in b"}))
        .await;
    assert_eq!(in_b.next_json().await["data"], "in b");
    // A token for hub b is not one for the path's hub a, whatever the query says.
    let for_b = emu.client_url("b", &all_roles("w"));
    let token_b = for_b.split_once("?access_token=").unwrap().1;
    let url = format!(
        "ws://127.0.0.1:{}/client/hubs/a?hub=b&access_token={token_b}",
        emu.port()
    );
    assert_eq!(status_of(&url, Some(JSON)).await, 401);
    emu.shutdown().await;
}

/// Does a socket listening on every IPv6 interface take IPv4 connections here (a
/// dual-stack socket, the default on Linux unless `net.ipv6.bindv6only` is set)?
fn ipv6_any_takes_ipv4() -> bool {
    let listener = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `client_url`, `endpoint` and `connection_string` name the configured host: an
/// unspecified address, however spelled, becomes a loopback address the listener takes
/// (`127.0.0.1`, or `[::1]` for an IPv6 socket without IPv4), an IP address is written in
/// its canonical form, an IPv6 one bracketed; and the emulator takes the URL it names.
#[tokio::test]
async fn urls_name_the_configured_host() {
    let any6 = if ipv6_any_takes_ipv4() {
        "127.0.0.1"
    } else {
        "[::1]"
    };
    for (host, named) in [
        ("0.0.0.0", "127.0.0.1"),
        ("0", "127.0.0.1"),
        ("::", any6),
        ("[::]", any6),
        ("[0:0::0]", any6),
        ("0:0:0:0:0:0:0:0", any6),
        ("::1", "[::1]"),
        ("[::1]", "[::1]"),
        ("0:0:0:0:0:0:0:1", "[::1]"),
        ("localhost", "localhost"),
    ] {
        let emu = start_with(Config {
            host: host.into(),
            ..Config::default()
        })
        .await;
        let port = emu.port();
        assert_eq!(emu.endpoint(), format!("http://{named}:{port}"), "{host}");
        assert!(
            emu.connection_string()
                .starts_with(&format!("Endpoint=http://{named};Port={port};")),
            "{host}: {}",
            emu.connection_string()
        );
        let url = emu.client_url("h", &all_roles("u"));
        assert!(
            url.starts_with(&format!("ws://{named}:{port}/client/hubs/h?access_token=")),
            "{host}: {url}"
        );
        connect_json(&url, JSON).await.0.close().await;
        emu.shutdown().await;
    }
}

/// The service's other client endpoint, `/client?hub={hub}` (its client protocol
/// reference): the same hub as `/client/hubs/{hub}`, with a token signed for that path.
#[tokio::test]
async fn the_hub_may_be_named_in_the_query() {
    let emu = start().await;
    let (mut by_path, _) = connect_json(&emu.client_url("chat", &all_roles("a")), RELIABLE).await;
    assert_ack_ok(&by_path.join("g", 1).await);
    let token_url = emu.client_url("chat", &all_roles("b"));
    let token = token_url.split_once("?access_token=").unwrap().1;
    for path in ["/client", "/client/"] {
        let url = format!(
            "ws://127.0.0.1:{}{path}?hub=chat&access_token={token}",
            emu.port()
        );
        let (mut by_query, connected) = connect_json(&url, RELIABLE).await;
        assert_eq!(connected["userId"], "b", "{path}");
        by_query
            .send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":path}))
            .await;
        assert_eq!(by_path.next_json().await["data"], path);
        by_query.close().await;
    }
    let base = format!("ws://127.0.0.1:{}/client", emu.port());
    assert_eq!(
        status_of(&format!("{base}?access_token={token}"), Some(JSON)).await,
        400
    );
    assert_eq!(
        status_of(
            &format!("{base}?hub=other&access_token={token}"),
            Some(JSON)
        )
        .await,
        401
    );
    // A second `hub` replaces the first.
    for (hubs, status) in [("hub=other&hub=chat", 101), ("hub=chat&hub=other", 401)] {
        let url = format!("{base}?{hubs}&access_token={token}");
        assert_eq!(status_of(&url, Some(JSON)).await, status, "{hubs}");
    }
    emu.shutdown().await;
}

/// A connection made through `/client?hub={hub}` recovers through the URL the official
/// JS client makes of it (its own URL, the recovery parameters appended), the hub named
/// in another case.
#[tokio::test]
async fn a_connection_by_query_recovers_through_its_url() {
    let emu = start().await;
    let (mut publisher, _) = connect_json(&emu.client_url("chat", &all_roles("a")), JSON).await;
    let token_url = emu.client_url("chat", &all_roles("b"));
    let token = token_url.split_once("?access_token=").unwrap().1;
    let url = |hub: &str| {
        format!(
            "ws://127.0.0.1:{}/client?hub={hub}&access_token={token}",
            emu.port()
        )
    };
    let (mut b, connected) = connect_json(&url("chat"), RELIABLE).await;
    assert_ack_ok(&b.join("g", 1).await);
    let id = connected["connectionId"].as_str().unwrap();
    assert_eq!(fault(&emu, "chat", id, ":drop").await.status(), 200);
    b.expect_abrupt_end().await;
    let recovery = format!(
        "{}&awps_connection_id={id}&awps_reconnection_token={}",
        url("Chat"),
        connected["reconnectionToken"].as_str().unwrap()
    );
    let (mut recovered, again) = connect_json(&recovery, RELIABLE).await;
    assert_eq!(again["connectionId"], id);
    publisher
        .send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"back"}))
        .await;
    assert_eq!(recovered.next_json().await["data"], "back");
    emu.shutdown().await;
}
