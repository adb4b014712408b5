//! The service REST API: routes, status codes, auth.
mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Calls the REST API with a valid bearer token (aud = the full URL).
async fn call(
    emu: &Emulator,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, String) {
    let url = format!("{}/api/hubs/{path}", emu.endpoint());
    let token = rest_token(emu, &url);
    call_with(&url, method, Some(token), body).await
}

async fn call_with(
    url: &str,
    method: Method,
    token: Option<String>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, String) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if let Some((ct, b)) = body {
        req = req.header("Content-Type", ct).body(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn text(s: &str) -> Option<(&'static str, Vec<u8>)> {
    Some(("text/plain", s.as_bytes().to_vec()))
}

async fn client(emu: &Emulator, user: &str, protocol: &str) -> (Ws, String) {
    let (ws, c) = connect_json(&emu.client_url("hub", &all_roles(user)), protocol).await;
    (ws, c["connectionId"].as_str().unwrap().to_owned())
}

fn server_msg(m: &Value) -> (&str, &Value) {
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["from"], "server", "{m}");
    (m["dataType"].as_str().unwrap(), &m["data"])
}

#[tokio::test]
async fn send_to_all_group_user_connection() {
    let emu = start().await;
    let (mut a, a_id) = client(&emu, "ua", JSON).await;
    let (mut b, b_id) = client(&emu, "ub", RELIABLE).await;
    assert_ack_ok(&a.join("g", 1).await);

    let (code, _) = call(
        &emu,
        Method::POST,
        "hub/:send?api-version=2024-12-01",
        text("all"),
    )
    .await;
    assert_eq!(code, 202);
    assert_eq!(server_msg(&a.next_json().await), ("text", &json!("all")));
    let m = b.next_json().await;
    assert_eq!(server_msg(&m), ("text", &json!("all")));
    assert_eq!(m["sequenceId"], 1);

    // excluded
    let path = format!("hub/:send?excluded={a_id}&excluded=nobody");
    assert_eq!(
        call(
            &emu,
            Method::POST,
            &path,
            Some(("application/json", b"{\"n\":1}".to_vec()))
        )
        .await
        .0,
        202
    );
    assert_eq!(server_msg(&b.next_json().await), ("json", &json!({"n":1})));

    // group: only a
    assert_eq!(
        call(
            &emu,
            Method::POST,
            "hub/groups/g/:send",
            Some(("application/octet-stream", vec![0, 1, 2]))
        )
        .await
        .0,
        202
    );
    assert_eq!(server_msg(&a.next_json().await), ("binary", &json!("AAEC")));

    // user: only b
    assert_eq!(
        call(&emu, Method::POST, "hub/users/ub/:send", text("to-b"))
            .await
            .0,
        202
    );
    assert_eq!(server_msg(&b.next_json().await).1, "to-b");

    // connection: only a
    let path = format!("hub/connections/{a_id}/:send");
    assert_eq!(call(&emu, Method::POST, &path, text("to-a")).await.0, 202);
    assert_eq!(server_msg(&a.next_json().await).1, "to-a");

    // Ordering proof that b got nothing it should not have: the next thing b sees is this.
    let path = format!("hub/connections/{b_id}/:send");
    assert_eq!(call(&emu, Method::POST, &path, text("last")).await.0, 202);
    assert_eq!(server_msg(&b.next_json().await).1, "last");
    emu.shutdown().await;
}

#[tokio::test]
async fn simple_clients_get_raw_rest_sends() {
    let emu = start().await;
    let mut s = connect(&emu.client_url("hub", &TokenOptions::default()), None).await;
    assert_eq!(
        call(&emu, Method::POST, "hub/:send", text("raw")).await.0,
        202
    );
    assert_eq!(
        call(
            &emu,
            Method::POST,
            "hub/:send",
            Some(("application/octet-stream", vec![9]))
        )
        .await
        .0,
        202
    );
    assert_eq!(s.next_message().await, Message::Text("raw".into()));
    assert_eq!(s.next_message().await, Message::Binary(vec![9u8].into()));
    emu.shutdown().await;
}

#[tokio::test]
async fn group_membership_routes() {
    let emu = start().await;
    let (mut a, a_id) = client(&emu, "ua", JSON).await;
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/g", None).await.0, 404);
    assert_eq!(
        call(
            &emu,
            Method::PUT,
            &format!("hub/groups/g/connections/{a_id}"),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/g", None).await.0, 200);
    assert_eq!(
        call(&emu, Method::PUT, "hub/groups/g/connections/nope", None)
            .await
            .0,
        404
    );
    let (code, body) = call(&emu, Method::GET, "hub/groups/g/connections", None).await;
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list["value"],
        json!([{"connectionId": a_id, "userId": "ua"}])
    );
    assert_eq!(
        call(&emu, Method::POST, "hub/groups/g/:send", text("in"))
            .await
            .0,
        202
    );
    assert_eq!(server_msg(&a.next_json().await).1, "in");
    assert_eq!(
        call(
            &emu,
            Method::DELETE,
            &format!("hub/groups/g/connections/{a_id}"),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/g", None).await.0, 404);

    // user <-> group, also applied to the user's later connections
    assert_eq!(
        call(&emu, Method::PUT, "hub/users/ua/groups/ug", None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&emu, Method::HEAD, "hub/users/ua/groups/ug", None)
            .await
            .0,
        200
    );
    let (mut a2, _) = client(&emu, "ua", JSON).await;
    assert_eq!(
        call(&emu, Method::POST, "hub/groups/ug/:send", text("ug"))
            .await
            .0,
        202
    );
    assert_eq!(server_msg(&a.next_json().await).1, "ug");
    assert_eq!(server_msg(&a2.next_json().await).1, "ug");
    assert_eq!(
        call(&emu, Method::DELETE, "hub/users/ua/groups/ug", None)
            .await
            .0,
        204
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/ug", None).await.0, 404);

    // remove a connection / a user from all groups
    assert_ack_ok(&a.join("x", 1).await);
    assert_ack_ok(&a2.join("y", 1).await);
    assert_eq!(
        call(
            &emu,
            Method::DELETE,
            &format!("hub/connections/{a_id}/groups"),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/x", None).await.0, 404);
    assert_eq!(
        call(&emu, Method::DELETE, "hub/users/ua/groups", None)
            .await
            .0,
        204
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/y", None).await.0, 404);
    // invalid group name
    let long = "g".repeat(1025);
    assert_eq!(
        call(
            &emu,
            Method::PUT,
            &format!("hub/groups/{long}/connections/{a_id}"),
            None
        )
        .await
        .0,
        400
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn listing_a_group_honours_top() {
    let emu = start().await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let (mut ws, id) = client(&emu, user, JSON).await;
        assert_ack_ok(&ws.join("g", 1).await);
        clients.push((ws, id));
    }
    let listed = |body: &str| -> Vec<String> {
        let list: Value = serde_json::from_str(body).unwrap();
        list["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["connectionId"].as_str().unwrap().to_owned())
            .collect()
    };
    let (code, body) = call(&emu, Method::GET, "hub/groups/g/connections?top=2", None).await;
    assert_eq!(code, 200, "{body}");
    let two = listed(&body);
    assert_eq!(two.len(), 2, "{body}");
    assert!(two.iter().all(|id| clients.iter().any(|(_, c)| c == id)));
    let (_, body) = call(&emu, Method::GET, "hub/groups/g/connections?top=5", None).await;
    assert_eq!(listed(&body).len(), 3, "{body}");
    for bad in ["0", "x", "-1"] {
        let path = format!("hub/groups/g/connections?top={bad}");
        assert_eq!(
            call(&emu, Method::GET, &path, None).await.0,
            400,
            "top={bad}"
        );
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn existence_and_close_routes() {
    let emu = start().await;
    let (mut a, a_id) = client(&emu, "ua", RELIABLE).await;
    let (mut b, b_id) = client(&emu, "ub", JSON).await;
    let (mut c, c_id) = client(&emu, "uc", JSON).await;
    assert_eq!(
        call(&emu, Method::HEAD, &format!("hub/connections/{a_id}"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&emu, Method::HEAD, "hub/connections/nope", None)
            .await
            .0,
        404
    );
    assert_eq!(call(&emu, Method::HEAD, "hub/users/ua", None).await.0, 200);
    assert_eq!(
        call(&emu, Method::HEAD, "hub/users/nobody", None).await.0,
        404
    );

    let path = format!("hub/connections/{a_id}?reason=maintenance");
    assert_eq!(call(&emu, Method::DELETE, &path, None).await.0, 204);
    let d = a.next_json().await;
    assert_eq!(
        (d["event"].as_str(), d["message"].as_str()),
        (Some("disconnected"), Some("maintenance"))
    );
    assert_eq!(a.expect_close().await, (1008, "maintenance".into()));
    assert_eq!(
        call(&emu, Method::HEAD, &format!("hub/connections/{a_id}"), None)
            .await
            .0,
        404
    );

    let path = format!("hub/:closeConnections?excluded={c_id}&reason=bye");
    assert_eq!(call(&emu, Method::POST, &path, None).await.0, 204);
    assert_eq!(b.next_json().await["message"], "bye");
    assert_eq!(b.expect_close().await.0, 1008);
    assert_eq!(
        call(&emu, Method::HEAD, &format!("hub/connections/{c_id}"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&emu, Method::HEAD, &format!("hub/connections/{b_id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(&emu, Method::POST, "hub/users/uc/:closeConnections", None)
            .await
            .0,
        204
    );
    assert_eq!(c.next_json().await["event"], "disconnected");
    assert_eq!(
        call(
            &emu,
            Method::POST,
            "hub/groups/none/:closeConnections",
            None
        )
        .await
        .0,
        204
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn permission_routes() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("hub", &TokenOptions::default()), JSON).await;
    let id = c["connectionId"].as_str().unwrap();
    assert_ack_error(&a.join("g", 1).await, "Forbidden");
    let p = format!("hub/permissions/joinLeaveGroup/connections/{id}?targetName=g");
    assert_eq!(call(&emu, Method::HEAD, &p, None).await.0, 404);
    assert_eq!(call(&emu, Method::PUT, &p, None).await.0, 200);
    assert_eq!(call(&emu, Method::HEAD, &p, None).await.0, 200);
    assert_ack_ok(&a.join("g", 2).await);
    assert_ack_error(&a.join("other", 3).await, "Forbidden");
    assert_eq!(call(&emu, Method::DELETE, &p, None).await.0, 204);
    assert_ack_error(&a.join("g", 4).await, "Forbidden");
    let all = format!("hub/permissions/sendToGroup/connections/{id}");
    assert_eq!(call(&emu, Method::PUT, &all, None).await.0, 200);
    let ack = a
        .call(json!({"type":"sendToGroup","group":"any","ackId":5,"dataType":"text","data":"x"}))
        .await;
    assert_ack_ok(&ack);
    assert_eq!(
        call(
            &emu,
            Method::PUT,
            &format!("hub/permissions/fly/connections/{id}"),
            None
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            &emu,
            Method::PUT,
            "hub/permissions/sendToGroup/connections/nope",
            None
        )
        .await
        .0,
        404
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn generate_token() {
    let emu = start().await;
    let (code, body) = call(
        &emu,
        Method::POST,
        "hub/:generateToken?userId=zed&role=webpubsub.joinLeaveGroup&group=g1&minutesToExpire=5",
        None,
    )
    .await;
    assert_eq!(code, 200);
    let token: Value = serde_json::from_str(&body).unwrap();
    let url = format!(
        "ws://127.0.0.1:{}/client/hubs/hub?access_token={}",
        emu.port(),
        token["token"].as_str().unwrap()
    );
    let (mut ws, connected) = connect_json(&url, JSON).await;
    assert_eq!(connected["userId"], "zed");
    assert_ack_ok(&ws.join("g2", 1).await);
    assert_eq!(call(&emu, Method::HEAD, "hub/groups/g1", None).await.0, 200);
    assert_eq!(
        call(
            &emu,
            Method::POST,
            "hub/:generateToken?minutesToExpire=x",
            None
        )
        .await
        .0,
        400
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn rest_auth_failures_are_401() {
    let emu = start().await;
    let url = format!("{}/api/hubs/hub/:send", emu.endpoint());
    let key = emu.access_key().to_owned();
    let sign = |claims: Value, key: &str| webpubsub_emulator::auth::sign(key, &claims);
    let good = sign(
        json!({"aud": format!("{url}?api-version=1"), "exp": now() + 60}),
        &key,
    );
    assert_eq!(
        call_with(&url, Method::POST, Some(good), text("x")).await.0,
        202
    );
    let localhost = url.replace("127.0.0.1", "localhost");
    let variant = sign(json!({"aud": localhost, "exp": now() + 60}), &key);
    assert_eq!(
        call_with(&url, Method::POST, Some(variant), text("x"))
            .await
            .0,
        202
    );

    let cases = [
        None,
        Some(sign(json!({"aud": url, "exp": now() - 5}), &key)),
        Some(sign(json!({"aud": url, "exp": now() + 60}), "wrong")),
        Some(sign(
            json!({"aud": url.replace("/hub/", "/other/"), "exp": now() + 60}),
            &key,
        )),
        Some("not.a.jwt".to_owned()),
    ];
    for token in cases {
        let (code, body) = call_with(&url, Method::POST, token.clone(), text("x")).await;
        assert_eq!(code, 401, "{token:?}");
        assert!(body.contains("Unauthorized"), "{body}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_bad_bodies() {
    let emu = start().await;
    let (code, body) = call(&emu, Method::POST, "hub/:explode", None).await;
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        "NotFound"
    );
    let (code, _) = call_with(
        &format!("{}/nothing/here", emu.endpoint()),
        Method::GET,
        None,
        None,
    )
    .await;
    assert_eq!(code, 404);
    let (code, body) = call(
        &emu,
        Method::POST,
        "hub/:send",
        Some(("application/json", b"{oops".to_vec())),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let big = vec![b'a'; 1024 * 1024 + 1];
    assert_eq!(
        call(&emu, Method::POST, "hub/:send", Some(("text/plain", big)))
            .await
            .0,
        413
    );
    let (code, _) = call(
        &emu,
        Method::POST,
        "hub/:send",
        Some(("text/plain", vec![0xff, 0xfe])),
    )
    .await;
    assert_eq!(code, 400);
    emu.shutdown().await;
}
