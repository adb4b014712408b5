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

/// The connection ids of a listing page, and its nextLink.
fn page(body: &str) -> (Vec<String>, Option<String>) {
    let page: Value = serde_json::from_str(body).unwrap();
    let ids = page["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connectionId"].as_str().unwrap().to_owned())
        .collect();
    (ids, page["nextLink"].as_str().map(str::to_owned))
}

/// Every page of a listing from `path` on, following nextLink (a path and query).
async fn pages(emu: &Emulator, path: &str) -> Vec<Vec<String>> {
    let mut url = format!("{}/api/hubs/{path}", emu.endpoint());
    let mut out = Vec::new();
    for _ in 0..10 {
        let token = rest_token(emu, &url);
        let (code, body) = call_with(&url, Method::GET, Some(token), None).await;
        assert_eq!(code, 200, "{url}: {body}");
        let (ids, next) = page(&body);
        out.push(ids);
        match next {
            Some(link) => {
                assert!(link.starts_with("/api/hubs/"), "{link}");
                url = format!("{}{link}", emu.endpoint());
            }
            None => return out,
        }
    }
    panic!("more than 10 pages: {out:?}");
}

#[tokio::test]
async fn listing_a_group_pages_with_maxpagesize_and_continuation_token() {
    let emu = start().await;
    // A group name with a space and an encoded '/': the nextLink keeps its encoding.
    let group = "a b/c";
    let encoded = "a%20b%2Fc";
    let mut ids = Vec::new();
    let mut sockets = Vec::new();
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        let (mut ws, id) = client(&emu, user, JSON).await;
        assert_ack_ok(&ws.join(group, 1).await);
        ids.push(id);
        sockets.push(ws);
    }
    ids.sort();
    let (_outsider, _) = client(&emu, "u6", JSON).await;

    let by_two = pages(
        &emu,
        &format!("hub/groups/{encoded}/connections?api-version=2024-12-01&maxpagesize=2"),
    )
    .await;
    assert_eq!(by_two, [&ids[0..2], &ids[2..4], &ids[4..5]]);
    let topped = pages(
        &emu,
        &format!("hub/groups/{encoded}/connections?maxpagesize=2&top=3"),
    )
    .await;
    assert_eq!(topped, [&ids[0..2], &ids[2..3]]);
    let exact = pages(
        &emu,
        &format!("hub/groups/{encoded}/connections?maxpagesize=5&top=5"),
    )
    .await;
    assert_eq!(exact, [&ids[..]]);
    let all = pages(&emu, &format!("hub/groups/{encoded}/connections")).await;
    assert_eq!(all, [&ids[..]]);
    let after = pages(
        &emu,
        &format!(
            "hub/groups/{encoded}/connections?maxpagesize=3&continuationToken={}",
            ids[1]
        ),
    )
    .await;
    assert_eq!(after, [&ids[2..5]]);
    let past_the_end = format!(
        "hub/groups/{encoded}/connections?continuationToken={}",
        ids[4]
    );
    assert_eq!(pages(&emu, &past_the_end).await, [Vec::<String>::new()]);

    for bad in [
        "maxpagesize=0",
        "maxpagesize=201",
        "maxpagesize=x",
        "top=2147483648",
    ] {
        let path = format!("hub/groups/{encoded}/connections?{bad}");
        let (code, body) = call(&emu, Method::GET, &path, None).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn message_ttl_seconds_is_range_checked_on_every_send() {
    let emu = start().await;
    let (mut ws, id) = client(&emu, "u", JSON).await;
    assert_ack_ok(&ws.join("g", 1).await);
    let routes = [
        "hub/:send".to_owned(),
        "hub/groups/g/:send".to_owned(),
        "hub/users/u/:send".to_owned(),
        format!("hub/connections/{id}/:send"),
    ];
    for route in &routes {
        for bad in ["301", "-1", "x"] {
            let path = format!("{route}?messageTtlSeconds={bad}");
            let (code, body) = call(&emu, Method::POST, &path, text("refused")).await;
            assert_eq!(code, 400, "{path}: {body}");
            assert!(body.contains("messageTtlSeconds"), "{body}");
        }
        for ok in ["0", "300"] {
            let path = format!("{route}?messageTtlSeconds={ok}");
            assert_eq!(
                call(&emu, Method::POST, &path, text(ok)).await.0,
                202,
                "{path}"
            );
            assert_eq!(server_msg(&ws.next_json().await).1, ok);
        }
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn generate_token_honours_client_type() {
    let emu = start().await;
    let audience = |body: &str| {
        let token: Value = serde_json::from_str(body).unwrap();
        let claims = webpubsub_emulator::auth::verify(
            emu.access_key(),
            token["token"].as_str().unwrap(),
            true,
        )
        .unwrap();
        claims.audiences.join(",")
    };
    let base = format!("http://127.0.0.1:{}", emu.port());
    for (client_type, path) in [
        ("", "client"),
        ("&clientType=Default", "client"),
        ("&clientType=default", "client"),
        ("&clientType=MQTT", "clients/mqtt"),
        ("&clientType=mqtt", "clients/mqtt"),
    ] {
        let route = format!("hub/:generateToken?api-version=2024-12-01{client_type}");
        let (code, body) = call(&emu, Method::POST, &route, None).await;
        assert_eq!(code, 200, "{client_type}: {body}");
        assert_eq!(
            audience(&body),
            format!("{base}/{path}/hubs/hub"),
            "{client_type}"
        );
    }
    let (code, body) = call(
        &emu,
        Method::POST,
        "hub/:generateToken?clientType=Pigeon",
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("clientType"), "{body}");
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
        (
            Some("disconnected"),
            Some("Application server closed the connection. Reason: maintenance")
        )
    );
    assert_eq!(a.expect_close().await, (1000, String::new()));
    assert_eq!(
        call(&emu, Method::HEAD, &format!("hub/connections/{a_id}"), None)
            .await
            .0,
        404
    );

    let path = format!("hub/:closeConnections?excluded={c_id}&reason=bye");
    assert_eq!(call(&emu, Method::POST, &path, None).await.0, 204);
    assert_eq!(
        b.next_json().await["message"],
        "Application server closed the connection. Reason: bye"
    );
    assert_eq!(b.expect_close().await, (1000, String::new()));
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
    let d = c.next_json().await;
    assert_eq!(d["event"], "disconnected");
    assert_eq!(d["message"], "Application server closed the connection.");
    assert_eq!(c.expect_close().await, (1000, String::new()));
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

/// A REST close ends the session for good, as the service's does: a reliable client
/// that takes the normal close for a drop and tries to recover is refused with 1008. A
/// simple client, which has no `disconnected` frame, gets the text as the close reason.
#[tokio::test]
async fn a_closed_reliable_session_cannot_be_recovered_and_a_simple_client_gets_the_reason() {
    let emu = start().await;
    let url = emu.client_url("hub", &all_roles("u"));
    let (mut a, connected) = connect_json(&url, RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap();
    let path = format!("hub/connections/{id}?reason=done");
    assert_eq!(call(&emu, Method::DELETE, &path, None).await.0, 204);
    assert_eq!(a.next_json().await["event"], "disconnected");
    assert_eq!(a.expect_close().await.0, 1000);
    let recovery = format!(
        "{url}&awps_connection_id={id}&awps_reconnection_token={}",
        connected["reconnectionToken"].as_str().unwrap()
    );
    let mut again = connect(&recovery, Some(RELIABLE)).await;
    assert_eq!(
        again.expect_close().await,
        (1008, "The connection could not be recovered.".into())
    );

    let mut simple = connect(&url, None).await;
    let (_kept, kept_id) = client(&emu, "u", JSON).await;
    let path = format!("hub/users/u/:closeConnections?excluded={kept_id}&reason=done");
    assert_eq!(call(&emu, Method::POST, &path, None).await.0, 204);
    assert_eq!(
        simple.expect_close().await,
        (
            1000,
            "Application server closed the connection. Reason: done".into()
        )
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
    assert_eq!(
        call(
            &emu,
            Method::PUT,
            &format!("hub/permissions/fly/connections/{id}?targetName=g"),
            None
        )
        .await
        .0,
        400
    );
    let missing = "hub/permissions/sendToGroup/connections/nope?targetName=g";
    assert_eq!(call(&emu, Method::PUT, missing, None).await.0, 404);
    assert_eq!(call(&emu, Method::HEAD, missing, None).await.0, 404);
    assert_eq!(call(&emu, Method::DELETE, missing, None).await.0, 204);
    emu.shutdown().await;
}

/// The permission routes as the service has them (REST API specification: "For
/// joinLeaveGroup and sendToGroup, targetName is a required parameter standing for
/// the group name"): a target is required and is one literal group; a grant or a
/// revoke of it overrides what the token's roles say of that group, and of no other;
/// the permission name is matched without case.
#[tokio::test]
async fn permissions_are_per_target_group_and_override_the_roles() {
    let emu = start().await;
    let roles = TokenOptions {
        roles: vec!["webpubsub.sendToGroup".into()],
        ..TokenOptions::default()
    };
    let (mut a, c) = connect_json(&emu.client_url("hub", &roles), JSON).await;
    let id = c["connectionId"].as_str().unwrap().to_owned();
    let send = |group: &str, ack_id: u64| json!({"type":"sendToGroup","group":group,"ackId":ack_id,"dataType":"text","data":"x"});
    let path = |perm: &str, query: &str| format!("hub/permissions/{perm}/connections/{id}{query}");

    let long = format!("?targetName={}", "g".repeat(1025));
    for query in ["", "?targetName=", "?targetName=%20%09", long.as_str()] {
        for method in [Method::PUT, Method::HEAD, Method::DELETE] {
            let (code, body) = call(&emu, method.clone(), &path("sendToGroup", query), None).await;
            assert_eq!(code, 400, "{method} {query}: {body}");
        }
    }
    // Validated before the connection is looked up.
    let (code, body) = call(
        &emu,
        Method::PUT,
        "hub/permissions/sendToGroup/connections/nope",
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");

    // The role grants every group; a revoke takes one group out, and only it.
    let room = path("sendToGroup", "?targetName=room");
    assert_eq!(call(&emu, Method::HEAD, &room, None).await.0, 200);
    assert_eq!(call(&emu, Method::DELETE, &room, None).await.0, 204);
    assert_eq!(call(&emu, Method::HEAD, &room, None).await.0, 404);
    let other = path("sendToGroup", "?targetName=other");
    assert_eq!(call(&emu, Method::HEAD, &other, None).await.0, 200);
    assert_ack_error(&a.call(send("room", 1)).await, "Forbidden");
    assert_ack_ok(&a.call(send("other", 2)).await);
    // A grant gives it back; the target is literal and case-sensitive.
    assert_eq!(call(&emu, Method::PUT, &room, None).await.0, 200);
    assert_ack_ok(&a.call(send("room", 3)).await);
    let upper = path("joinLeaveGroup", "?targetName=ROOM");
    assert_eq!(call(&emu, Method::HEAD, &upper, None).await.0, 404);
    assert_ack_error(&a.join("ROOM", 4).await, "Forbidden");
    // Permission names without case, as the service binds them.
    let shouted = path("JOINLEAVEGROUP", "?targetName=ROOM");
    assert_eq!(call(&emu, Method::PUT, &shouted, None).await.0, 200);
    assert_eq!(call(&emu, Method::HEAD, &upper, None).await.0, 200);
    assert_ack_ok(&a.join("ROOM", 5).await);
    emu.shutdown().await;
}

/// An empty connection id, user id or group name leaves an empty path segment, which
/// names no route: the service answers 404 (Azure/azure-webpubsub#47; the paths'
/// `minLength` is 1), where the emulator sent, closed or persisted for the empty name.
/// Both official service SDKs send such paths as they are.
#[tokio::test]
async fn an_empty_id_or_name_in_the_path_is_no_route() {
    let emu = start().await;
    for (method, path) in [
        (Method::POST, "hub/connections//:send"),
        (Method::DELETE, "hub/connections/"),
        (Method::HEAD, "hub/connections/"),
        (Method::DELETE, "hub/connections//groups"),
        (Method::POST, "hub/users//:send"),
        (Method::HEAD, "hub/users/"),
        (Method::POST, "hub/users//:closeConnections"),
        (Method::PUT, "hub/users//groups/g"),
        (Method::DELETE, "hub/users//groups/g"),
        (Method::DELETE, "hub/users//groups"),
        (Method::POST, "hub/groups//:send"),
        (Method::HEAD, "hub/groups/"),
        (Method::GET, "hub/groups//connections"),
        (Method::PUT, "hub/groups//connections/c"),
        (Method::PUT, "hub/groups/g/connections/"),
        (
            Method::PUT,
            "hub/permissions/sendToGroup/connections/?targetName=g",
        ),
    ] {
        let body = matches!(method, Method::POST).then(|| ("text/plain", b"x".to_vec()));
        let (code, answer) = call(&emu, method.clone(), path, body).await;
        assert_eq!(code, 404, "{method} {path}: {answer}");
    }
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
    // The fault routes' errors have the same codes.
    let fault = fault(&emu, "nohub", "c", "drop").await;
    assert_eq!(fault.status(), 404);
    assert_eq!(fault.json::<Value>().await.unwrap()["code"], "NotFound");
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

/// `HEAD /api/health` (the Health API's Get Service Status, which the JS SDK's
/// getServiceStatus sample calls): 200 with or without a token, as the service answers
/// its health probe; other methods there are unknown routes.
#[tokio::test]
async fn health_api_answers_200() {
    let emu = start().await;
    let url = format!("{}/api/health?api-version=2024-12-01", emu.endpoint());
    let token = rest_token(&emu, &url);
    assert_eq!(
        call_with(&url, Method::HEAD, Some(token), None).await,
        (200, String::new())
    );
    assert_eq!(call_with(&url, Method::HEAD, None, None).await.0, 200);
    assert_eq!(call_with(&url, Method::GET, None, None).await.0, 200);
    assert_eq!(call_with(&url, Method::POST, None, None).await.0, 404);
    emu.shutdown().await;
}

/// `path` with `filter` as a query parameter (percent-encoded).
fn filtered(path: &str, filter: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let encoded: String = form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    format!("{path}{sep}filter={encoded}")
}

/// Sends `marker` to one connection and asserts it is the next thing the socket gets:
/// proof that nothing sent before it reached that connection.
async fn assert_nothing_before(emu: &Emulator, ws: &mut Ws, id: &str, marker: &str) {
    let path = format!("hub/connections/{id}/:send");
    assert_eq!(call(emu, Method::POST, &path, text(marker)).await.0, 202);
    assert_eq!(server_msg(&ws.next_json().await).1, marker);
}

async fn anonymous(emu: &Emulator) -> (Ws, String) {
    let (ws, c) = connect_json(&emu.client_url("hub", &TokenOptions::default()), JSON).await;
    (ws, c["connectionId"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn send_to_all_honours_the_filter() {
    let emu = start().await;
    let (mut alice, alice_id) = client(&emu, "alice", JSON).await;
    let (mut bob, bob_id) = client(&emu, "bob", RELIABLE).await;
    let (mut anon, anon_id) = anonymous(&emu).await;
    assert_ack_ok(&alice.join("vip", 1).await);

    let send = |filter: &str| filtered("hub/:send?api-version=2024-12-01", filter);
    assert_eq!(
        call(
            &emu,
            Method::POST,
            &send("userId ne 'bob'"),
            text("not-bob")
        )
        .await
        .0,
        202
    );
    assert_eq!(server_msg(&alice.next_json().await).1, "not-bob");
    assert_eq!(server_msg(&anon.next_json().await).1, "not-bob");
    assert_nothing_before(&emu, &mut bob, &bob_id, "b1").await;

    let path = send("userId eq null");
    assert_eq!(call(&emu, Method::POST, &path, text("anon")).await.0, 202);
    assert_eq!(server_msg(&anon.next_json().await).1, "anon");
    let path = send(&format!("'vip' in groups or connectionId eq '{bob_id}'"));
    assert_eq!(
        call(&emu, Method::POST, &path, text("vip-or-bob")).await.0,
        202
    );
    assert_eq!(server_msg(&alice.next_json().await).1, "vip-or-bob");
    assert_eq!(server_msg(&bob.next_json().await).1, "vip-or-bob");
    assert_nothing_before(&emu, &mut anon, &anon_id, "n1").await;

    // excluded and filter both apply
    let path = filtered(
        &format!("hub/:send?excluded={alice_id}"),
        "not('nothing' in groups)",
    );
    assert_eq!(call(&emu, Method::POST, &path, text("both")).await.0, 202);
    assert_eq!(server_msg(&bob.next_json().await).1, "both");
    assert_eq!(server_msg(&anon.next_json().await).1, "both");
    assert_nothing_before(&emu, &mut alice, &alice_id, "a1").await;

    // a filter nobody matches reaches nobody; a blank one is no filter
    let path = send("startswith(userId, 'z')");
    assert_eq!(call(&emu, Method::POST, &path, text("none")).await.0, 202);
    let path = send(" ");
    assert_eq!(call(&emu, Method::POST, &path, text("all")).await.0, 202);
    for ws in [&mut alice, &mut bob, &mut anon] {
        assert_eq!(server_msg(&ws.next_json().await).1, "all");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn send_to_group_and_user_honour_the_filter() {
    let emu = start().await;
    let (mut a1, a1_id) = client(&emu, "alice", JSON).await;
    let (mut a2, a2_id) = client(&emu, "alice", RELIABLE).await;
    let (mut bob, bob_id) = client(&emu, "bob", JSON).await;
    let (mut out, out_id) = client(&emu, "carol", JSON).await;
    for ws in [&mut a1, &mut a2, &mut bob] {
        assert_ack_ok(&ws.join("room", 1).await);
    }
    assert_ack_ok(&a2.join("mods", 2).await);

    // group: members only, then the filter among them
    let path = filtered(
        "hub/groups/room/:send",
        "userId eq 'alice' or userId eq 'carol'",
    );
    assert_eq!(call(&emu, Method::POST, &path, text("alices")).await.0, 202);
    assert_eq!(server_msg(&a1.next_json().await).1, "alices");
    assert_eq!(server_msg(&a2.next_json().await).1, "alices");
    assert_nothing_before(&emu, &mut bob, &bob_id, "b1").await;
    assert_nothing_before(&emu, &mut out, &out_id, "c1").await;

    let path = filtered("hub/groups/room/:send", "not('mods' in groups)");
    assert_eq!(
        call(&emu, Method::POST, &path, text("no-mods")).await.0,
        202
    );
    assert_eq!(server_msg(&a1.next_json().await).1, "no-mods");
    assert_eq!(server_msg(&bob.next_json().await).1, "no-mods");
    assert_nothing_before(&emu, &mut a2, &a2_id, "a2").await;

    // user: that user's connections only, then the filter among them
    let path = filtered(
        "hub/users/alice/:send",
        &format!("connectionId ne '{a1_id}'"),
    );
    assert_eq!(
        call(&emu, Method::POST, &path, text("a2-only")).await.0,
        202
    );
    assert_eq!(server_msg(&a2.next_json().await).1, "a2-only");
    assert_nothing_before(&emu, &mut a1, &a1_id, "a1").await;
    let path = filtered("hub/users/alice/:send", "userId eq 'bob'");
    assert_eq!(call(&emu, Method::POST, &path, text("nobody")).await.0, 202);
    assert_nothing_before(&emu, &mut a1, &a1_id, "a1b").await;
    assert_nothing_before(&emu, &mut a2, &a2_id, "a2b").await;
    assert_nothing_before(&emu, &mut bob, &bob_id, "b2").await;
    emu.shutdown().await;
}

#[tokio::test]
async fn add_and_remove_connections_to_groups_by_filter() {
    let emu = start().await;
    let (mut alice, alice_id) = client(&emu, "alice", JSON).await;
    let (mut bob, bob_id) = client(&emu, "bob", JSON).await;
    let (_anon, anon_id) = anonymous(&emu).await;
    let members = |group: &str| {
        let emu = &emu;
        let path = format!("hub/groups/{group}/connections");
        async move {
            let (code, body) = call(emu, Method::GET, &path, None).await;
            assert_eq!(code, 200, "{body}");
            let list: Value = serde_json::from_str(&body).unwrap();
            let mut ids: Vec<String> = list["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["connectionId"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    let sorted = |ids: &[&String]| {
        let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let json_body = |v: Value| Some(("application/json", v.to_string().into_bytes()));

    let (code, body) = call(
        &emu,
        Method::POST,
        "hub/:addToGroups?api-version=2024-12-01",
        json_body(json!({"groups": ["g1", "g2"], "filter": "userId ne null"})),
    )
    .await;
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(members("g1").await, sorted(&[&alice_id, &bob_id]));
    assert_eq!(members("g2").await, sorted(&[&alice_id, &bob_id]));

    // the joined groups are real: a group send reaches them
    assert_eq!(
        call(&emu, Method::POST, "hub/groups/g2/:send", text("g2"))
            .await
            .0,
        202
    );
    assert_eq!(server_msg(&alice.next_json().await).1, "g2");
    assert_eq!(server_msg(&bob.next_json().await).1, "g2");

    let (code, _) = call(
        &emu,
        Method::POST,
        "hub/:removeFromGroups",
        json_body(json!({"groups": ["g1"], "filter": "userId eq 'alice'"})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(members("g1").await, sorted(&[&bob_id]));
    assert_eq!(members("g2").await, sorted(&[&alice_id, &bob_id]));

    // a filter on groups sees the memberships before the update
    let (code, _) = call(
        &emu,
        Method::POST,
        "hub/:addToGroups",
        json_body(json!({"groups": ["g3", "g1"], "filter": "not('g1' in groups)"})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(members("g3").await, sorted(&[&alice_id, &anon_id]));
    assert_eq!(members("g1").await, sorted(&[&alice_id, &bob_id, &anon_id]));

    // without a filter: every connection
    let (code, _) = call(
        &emu,
        Method::POST,
        "hub/:removeFromGroups",
        json_body(json!({"groups": ["g1", "g2", "g3"]})),
    )
    .await;
    assert_eq!(code, 200);
    for g in ["g1", "g2", "g3"] {
        assert_eq!(
            call(&emu, Method::HEAD, &format!("hub/groups/{g}"), None)
                .await
                .0,
            404
        );
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn invalid_filters_are_400_and_send_nothing() {
    let emu = start().await;
    let (mut alice, alice_id) = client(&emu, "alice", JSON).await;
    assert_ack_ok(&alice.join("g", 1).await);
    for bad in [
        "userId eq",
        "userId = 'alice'",
        "user eq 'alice'",
        "userId eq 'alice",
        "not length(userId) gt 5",
        "userId EQ 'alice'",
        "userId eq 1",
    ] {
        for route in ["hub/:send", "hub/groups/g/:send", "hub/users/alice/:send"] {
            let (code, body) = call(&emu, Method::POST, &filtered(route, bad), text("x")).await;
            assert_eq!(code, 400, "{route} {bad}: {body}");
            let err: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(err["code"], "BadRequest");
            let message = err["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("Invalid filter '{bad}': ")),
                "{message}"
            );
        }
        for route in ["hub/:addToGroups", "hub/:removeFromGroups"] {
            let body = json!({"groups": ["other"], "filter": bad}).to_string();
            let (code, body) = call(
                &emu,
                Method::POST,
                route,
                Some(("application/json", body.into_bytes())),
            )
            .await;
            assert_eq!(code, 400, "{route} {bad}: {body}");
            assert!(body.contains("Invalid filter"), "{body}");
        }
    }
    assert_eq!(
        call(&emu, Method::HEAD, "hub/groups/other", None).await.0,
        404
    );
    assert_nothing_before(&emu, &mut alice, &alice_id, "after").await;

    // bad group-update bodies
    for body in [
        "{oops",
        "{}",
        r#"{"groups": "g"}"#,
        r#"{"groups": [""]}"#,
        r#"{"groups": ["g"], "filter": 1}"#,
    ] {
        let (code, answer) = call(
            &emu,
            Method::POST,
            "hub/:addToGroups",
            Some(("application/json", body.as_bytes().to_vec())),
        )
        .await;
        assert_eq!(code, 400, "{body}: {answer}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn names_that_need_percent_encoding_pass_auth_as_the_sdks_sign_them() {
    // The service SDKs put the request URL as sent, percent-encoded, in `aud`.
    let emu = start().await;
    let (mut a, a_id) = client(&emu, "user é/1", JSON).await;
    for (i, group) in ["a b", "a/b", "é"].into_iter().enumerate() {
        assert_ack_ok(&a.join(group, i as u64 + 1).await);
        let encoded: String =
            percent_encoding::utf8_percent_encode(group, percent_encoding::NON_ALPHANUMERIC)
                .collect();
        let (code, body) = call(
            &emu,
            Method::POST,
            &format!("hub/groups/{encoded}/:send?api-version=2024-12-01"),
            text(group),
        )
        .await;
        assert_eq!(code, 202, "{group}: {body}");
        assert_eq!(server_msg(&a.next_json().await), ("text", &json!(group)));
    }
    let (code, body) = call(&emu, Method::HEAD, "hub/users/user%20%C3%A9%2F1", None).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(&emu, Method::HEAD, &format!("hub/connections/{a_id}"), None).await;
    assert_eq!(code, 200, "{body}");
    emu.shutdown().await;
}

#[tokio::test]
async fn an_encoded_slash_in_the_audience_is_not_a_path_separator() {
    // A token signed for HEAD on group 'a/connections/<id>' (one segment, '/' encoded)
    // must not authorize PUT on group 'a', connection <id> (three segments), although
    // both paths read the same once decoded whole.
    let emu = start().await;
    let (_a, a_id) = client(&emu, "u", JSON).await;
    let base = format!("{}/api/hubs/hub/groups", emu.endpoint());
    let signed_for = format!("{base}/a%2Fconnections%2F{a_id}");
    let token = rest_token(&emu, &signed_for);
    let used_for = format!("{base}/a/connections/{a_id}");
    let (code, body) = call_with(&used_for, Method::PUT, Some(token), None).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = call(&emu, Method::HEAD, "hub/groups/a", None).await;
    assert_eq!(code, 404, "the connection joined group 'a': {body}");
    // The other way round: a token for the three segments does not pass for the one.
    let token = rest_token(&emu, &used_for);
    let (code, body) = call_with(&signed_for, Method::HEAD, Some(token), None).await;
    assert_eq!(code, 401, "{body}");
    // Encodings of the same segments are one path: hex case and optional escapes.
    let token = rest_token(&emu, &format!("{base}/%61%2fb/:send"));
    let (code, body) = call_with(
        &format!("{base}/a%2Fb/:send"),
        Method::POST,
        Some(token),
        text("x"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    emu.shutdown().await;
}

#[tokio::test]
async fn hub_names_are_case_insensitive() {
    let emu = start().await;
    let (mut a, c) = connect_json(&emu.client_url("chat", &all_roles("a")), JSON).await;
    let a_id = c["connectionId"].as_str().unwrap().to_owned();
    let (mut b, _) = connect_json(&emu.client_url("CHAT", &all_roles("b")), JSON).await;
    assert_ack_ok(&b.join("g", 1).await);
    let send = json!({"type":"sendToGroup","group":"g","dataType":"text","data":"hi","ackId":2});
    assert_ack_ok(&a.call(send).await);
    assert_eq!(b.next_json().await["data"], "hi");
    let head = format!("Chat/connections/{a_id}");
    assert_eq!(call(&emu, Method::HEAD, &head, None).await.0, 200);
    assert_eq!(
        call(&emu, Method::POST, "cHaT/groups/g/:send", text("rest"))
            .await
            .0,
        202
    );
    assert_eq!(server_msg(&b.next_json().await).1, "rest");
    emu.shutdown().await;
}
