//! Upstream CloudEvents for `event` and `invoke` frames, against a tiny HTTP server.
mod common;

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webpubsub_emulator::SystemEvents;

/// One request the upstream received.
#[derive(Debug)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// Signals when it is dropped (the emulator abandoned the request).
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

struct Upstream {
    url: String,
    seen: mpsc::UnboundedReceiver<Seen>,
    system: mpsc::UnboundedReceiver<Seen>,
    cancelled: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Replies by event name: `echo` returns the body with its content type, `empty` and
/// `message` 200 with no body, `hang` never answers, any other 500. System events go
/// to `system`.
async fn upstream() -> Upstream {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (cancel_tx, cancelled) = mpsc::unbounded_channel();
    let (system_tx, system) = mpsc::unbounded_channel();
    let seen_tx = Arc::new(seen_tx);
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap, body: Bytes| {
            let seen_tx = seen_tx.clone();
            let cancel_tx = cancel_tx.clone();
            let system_tx = system_tx.clone();
            async move {
                let ce_type = headers["ce-type"].to_str().unwrap().to_owned();
                if !ce_type.starts_with("azure.webpubsub.user.") {
                    let _ = system_tx.send(Seen { headers, body });
                    return StatusCode::NO_CONTENT.into_response();
                }
                let event = headers["ce-eventName"].to_str().unwrap().to_owned();
                let ct = headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let _ = seen_tx.send(Seen {
                    headers,
                    body: body.clone(),
                });
                match event.as_str() {
                    "echo" => ([("content-type", ct)], body).into_response(),
                    "json" => {
                        ([("content-type", "application/json")], r#"{"ok":true}"#).into_response()
                    }
                    "empty" | "message" => StatusCode::OK.into_response(),
                    "hang" => {
                        let _guard = DropSignal(cancel_tx);
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Upstream {
        url,
        seen,
        system,
        cancelled,
        task,
    }
}

/// An emulator that posts its events to a new [`upstream`].
async fn emulator_with_upstream() -> (Upstream, Emulator) {
    let up = upstream().await;
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        ..Config::default()
    })
    .await;
    (up, emu)
}

/// An emulator that posts its events to `url`, and a JSON client of it.
async fn emulator_posting_to(url: String) -> (Emulator, Ws) {
    let emu = start_with(Config {
        upstream: Some(url),
        ..Config::default()
    })
    .await;
    let (a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    (emu, a)
}

/// The `WebHook-Request-Origin` the emulator sends: the host of its endpoint without
/// the port, as the service sends its own host name (`xxx.webpubsub.azure.com`) and the
/// .NET handler looks the origin up by its endpoint's host.
fn origin(emu: &Emulator) -> String {
    let authority = emu.endpoint().split_once("://").unwrap().1.to_owned();
    authority.rsplit_once(':').unwrap().0.to_owned()
}

async fn next_seen(up: &mut Upstream) -> Seen {
    tokio::time::timeout(WAIT, up.seen.recv())
        .await
        .expect("upstream request in time")
        .unwrap()
}

#[tokio::test]
async fn events_are_cloud_events_and_replies_come_back() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (mut a, connected) =
        connect_json(&emu.client_url("Chat", &all_roles("alice")), RELIABLE).await;
    let ack = a
        .call(json!({"type":"event","event":"echo","ackId":1,"dataType":"text","data":"hello"}))
        .await;
    assert_ack_ok(&ack);
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("ce-type"), "azure.webpubsub.user.echo");
    assert_eq!(seen.h("ce-specversion"), "1.0");
    assert_eq!(seen.h("ce-userId"), "alice");
    assert_eq!(
        seen.h("ce-connectionId"),
        connected["connectionId"].as_str().unwrap()
    );
    assert_eq!(seen.h("ce-hub"), "Chat");
    assert_eq!(seen.h("ce-eventName"), "echo");
    // Always sent by the service; @azure/web-pubsub-express ignores a request without it.
    assert_eq!(seen.h("webhook-request-origin"), origin(&emu));
    assert!(!seen.h("ce-id").is_empty() && !seen.h("ce-source").is_empty());
    assert!(seen.h("ce-time").ends_with('Z'), "{}", seen.h("ce-time"));
    assert!(seen.h("content-type").starts_with("text/plain"));
    assert_eq!(&seen.body[..], b"hello");
    // The reply body arrives after the ack as a server message.
    let m = a.next_json().await;
    assert_eq!(
        (
            m["from"].as_str(),
            m["dataType"].as_str(),
            m["data"].as_str()
        ),
        (Some("server"), Some("text"), Some("hello"))
    );

    assert_ack_ok(
        &a.call(json!({"type":"event","event":"echo","ackId":2,"dataType":"json","data":{"a":1}}))
            .await,
    );
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("content-type"), "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&seen.body).unwrap(),
        json!({"a":1})
    );
    assert_eq!(a.next_json().await["data"], json!({"a":1}));

    assert_ack_ok(
        &a.call(json!({"type":"event","event":"echo","ackId":3,"dataType":"binary","data":"AAE="}))
            .await,
    );
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("content-type"), "application/octet-stream");
    assert_eq!(&seen.body[..], &[0, 1]);
    assert_eq!(a.next_json().await["data"], "AAE=");

    // Empty reply: ack only (the next frame is the following ack).
    assert_ack_ok(
        &a.call(json!({"type":"event","event":"empty","ackId":4,"dataType":"text","data":"x"}))
            .await,
    );
    a.send_json(json!({"type":"ping"})).await;
    assert_eq!(a.next_json().await["type"], "pong");

    let ack = a
        .call(json!({"type":"event","event":"fail","ackId":5,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn invoke_round_trip_errors_and_cancel() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), RELIABLE).await;
    a.send_json(json!({"type":"invoke","invocationId":"1","target":"event","event":"echo","dataType":"text","data":"q"})).await;
    let r = a.next_json().await;
    assert_eq!(
        r,
        json!({"type":"invokeResponse","invocationId":"1","success":true,"dataType":"text","data":"q"})
    );
    let _ = next_seen(&mut up).await;

    a.send_json(json!({"type":"invoke","invocationId":"2","target":"event","event":"json","dataType":"text","data":"q"})).await;
    let r = a.next_json().await;
    assert_eq!(
        (r["success"].as_bool(), r["dataType"].as_str(), &r["data"]),
        (Some(true), Some("json"), &json!({"ok":true}))
    );

    a.send_json(json!({"type":"invoke","invocationId":"3","target":"event","event":"empty"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(
        r,
        json!({"type":"invokeResponse","invocationId":"3","success":true})
    );

    a.send_json(json!({"type":"invoke","invocationId":"4","target":"event","event":"fail","dataType":"text","data":"q"})).await;
    let r = a.next_json().await;
    assert_eq!(
        (r["success"].as_bool(), r["error"]["name"].as_str()),
        (Some(false), Some("InternalServerError"))
    );

    // Cancel drops the pending upstream request.
    a.send_json(json!({"type":"invoke","invocationId":"5","target":"event","event":"hang","dataType":"text","data":"q"})).await;
    let seen = loop {
        let s = next_seen(&mut up).await;
        if s.h("ce-eventName") == "hang" {
            break s;
        }
    };
    assert_eq!(seen.h("ce-type"), "azure.webpubsub.user.hang");
    a.send_json(json!({"type":"cancelInvocation","invocationId":"5"}))
        .await;
    tokio::time::timeout(WAIT, up.cancelled.recv())
        .await
        .expect("the upstream request is dropped");
    a.send_json(json!({"type":"invoke","invocationId":"6","target":"event","event":"echo","dataType":"text","data":"after"})).await;
    assert_eq!(a.next_json().await["invocationId"], "6");
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn simple_client_frames_become_message_events() {
    let (mut up, emu) = emulator_with_upstream().await;
    let mut s = connect(&emu.client_url("h", &TokenOptions::default()), None).await;
    s.send_text("raw text").await;
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("ce-type"), "azure.webpubsub.user.message");
    assert_eq!(&seen.body[..], b"raw text");
    // A connection without a user: no ce-userId.
    assert!(seen.headers.get("ce-userId").is_none(), "{seen:?}");
    futures_util::SinkExt::send(&mut s.inner, Message::Binary(vec![7u8].into()))
        .await
        .unwrap();
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("content-type"), "application/octet-stream");
    assert_eq!(&seen.body[..], &[7]);
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn unreachable_upstream_is_an_internal_server_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x", listener.local_addr().unwrap());
    drop(listener); // nothing listens there any more
    let (emu, mut a) = emulator_posting_to(url).await;
    let ack = a
        .call(json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    a.send_json(json!({"type":"invoke","invocationId":"i","target":"event","event":"e"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(r["error"]["name"], "InternalServerError");
    emu.shutdown().await;
}

#[tokio::test]
async fn connected_and_disconnected_system_events() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    let event = tokio::time::timeout(WAIT, up.system.recv())
        .await
        .expect("connected")
        .unwrap();
    assert_eq!(event.h("ce-type"), "azure.webpubsub.sys.connected");
    assert_eq!(event.h("webhook-request-origin"), origin(&emu));
    a.close().await;
    let event = tokio::time::timeout(WAIT, up.system.recv())
        .await
        .expect("disconnected")
        .unwrap();
    assert_eq!(event.h("ce-type"), "azure.webpubsub.sys.disconnected");
    assert_eq!(event.h("webhook-request-origin"), origin(&emu));
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn an_event_flood_past_the_upstream_queue_gets_internal_server_error() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    // The upstream never answers "hang": one request in flight, 1000 queued, the next fails.
    let hang = |id: u64| {
        Message::Text(
            json!({"type":"event","event":"hang","ackId":id,"dataType":"text","data":"x"})
                .to_string()
                .into(),
        )
    };
    futures_util::SinkExt::send(&mut a.inner, hang(1))
        .await
        .unwrap();
    let _ = next_seen(&mut up).await; // the first request is now in flight
    for id in 2..=1002u64 {
        futures_util::SinkExt::feed(&mut a.inner, hang(id))
            .await
            .unwrap();
    }
    futures_util::SinkExt::flush(&mut a.inner).await.unwrap();
    let ack = a.next_json().await;
    assert_eq!(ack["ackId"], 1002, "{ack}");
    assert_ack_error(&ack, "InternalServerError");
    assert!(ack["error"]["message"]
        .as_str()
        .unwrap()
        .contains("upstream"));
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn an_invocation_flood_past_the_pending_limit_gets_internal_server_error() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    // The upstream never answers "hang": 1000 invocations pending, the next fails at once.
    for id in 1..=1001u64 {
        let frame = json!({"type":"invoke","invocationId":id.to_string(),"event":"hang"});
        futures_util::SinkExt::feed(&mut a.inner, Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    futures_util::SinkExt::flush(&mut a.inner).await.unwrap();
    let r = a.next_json().await;
    assert_eq!(
        (r["invocationId"].as_str(), r["success"].as_bool()),
        (Some("1001"), Some(false)),
        "{r}"
    );
    assert_eq!(r["error"]["name"], "InternalServerError", "{r}");
    // Cancelling one makes room for another.
    for _ in 0..1000 {
        let _ = next_seen(&mut up).await;
    }
    a.send_json(json!({"type":"cancelInvocation","invocationId":"1"}))
        .await;
    tokio::time::timeout(WAIT, up.cancelled.recv())
        .await
        .expect("the upstream request is dropped");
    a.send_json(
        json!({"type":"invoke","invocationId":"again","event":"echo","dataType":"text","data":"x"}),
    )
    .await;
    assert_eq!(a.next_json().await["invocationId"], "again");
    emu.shutdown().await;
    up.task.abort();
}

/// An upstream that takes every request and never answers: its URL and its task.
async fn silent_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, silent)
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_silent_upstream() {
    let (url, silent) = silent_upstream().await;
    let (emu, mut a) = emulator_posting_to(url).await;
    a.send_json(json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"}))
        .await;
    a.send_json(json!({"type":"invoke","invocationId":"i","target":"event","event":"e"}))
        .await;
    let started = std::time::Instant::now();
    emu.shutdown().await;
    // Its pending system event (connected), user event and invocation end with it,
    // rather than at the upstream timeout (shutdown gives up waiting after 5 s).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    silent.abort();
}

#[tokio::test]
async fn an_oversize_upstream_reply_is_an_internal_server_error() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const REPLY: usize = 64 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    // Streams a 64 MiB reply (chunked, no length given), counting the bytes it hands
    // out, and signals when the emulator stops taking them.
    let produced = Arc::new(AtomicUsize::new(0));
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let counter = produced.clone();
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap| {
            let (counter, gone_tx) = (counter.clone(), gone_tx.clone());
            async move {
                if !headers["ce-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("azure.webpubsub.user.")
                {
                    return StatusCode::NO_CONTENT.into_response();
                }
                if headers["ce-eventName"] == "declared" {
                    // Its length is declared: 2 MiB.
                    return ([("content-type", "text/plain")], vec![b'x'; 2 << 20]).into_response();
                }
                let guard = DropSignal(gone_tx);
                let chunks = futures_util::StreamExt::map(
                    futures_util::stream::iter(0..REPLY / CHUNK),
                    move |_| {
                        let _ = &guard;
                        counter.fetch_add(CHUNK, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(Bytes::from(vec![b'x'; CHUNK]))
                    },
                );
                (
                    [("content-type", "text/plain")],
                    axum::body::Body::from_stream(chunks),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (emu, mut a) = emulator_posting_to(url).await;
    let ack = a
        .call(json!({"type":"event","event":"big","ackId":1,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    let message = ack["error"]["message"].as_str().unwrap();
    assert!(message.contains("larger than 1048576 bytes"), "{message}");
    // The emulator gave the reply up well before its end.
    tokio::time::timeout(WAIT, gone.recv())
        .await
        .expect("the reply is abandoned");
    let taken = produced.swap(0, Ordering::SeqCst);
    assert!(taken < REPLY, "{taken} bytes taken");

    a.send_json(json!({"type":"invoke","invocationId":"i","event":"big"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(
        (r["invocationId"].as_str(), r["success"].as_bool()),
        (Some("i"), Some(false)),
        "{r}"
    );
    assert_eq!(r["error"]["name"], "InternalServerError", "{r}");
    tokio::time::timeout(WAIT, gone.recv())
        .await
        .expect("the reply is abandoned");
    assert!(produced.load(Ordering::SeqCst) < REPLY);
    let ack = a
        .call(json!({"type":"event","event":"declared","ackId":2,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    // The connection is still served.
    a.send_json(json!({"type":"ping"})).await;
    assert_eq!(a.next_json().await["type"], "pong");
    emu.shutdown().await;
    server.abort();
}

// ---- The `connect` system event and the connection state (`ce-connectionState`). ----

impl Seen {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// An upstream that records every request, in order, and answers it with `reply`.
struct Scripted {
    url: String,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("an upstream request in time")
            .unwrap()
    }

    /// The next request, which must be of that `ce-type` suffix (`sys.connect`, ...).
    async fn next_of(&mut self, ce_type: &str) -> Seen {
        let seen = self.next().await;
        assert_eq!(seen.h("ce-type"), format!("azure.webpubsub.{ce_type}"));
        seen
    }
}

async fn scripted(
    reply: impl Fn(&Seen) -> axum::response::Response + Clone + Send + Sync + 'static,
) -> Scripted {
    let (tx, seen) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap, body: Bytes| {
            let (reply, tx) = (reply.clone(), tx.clone());
            async move {
                let seen = Seen { headers, body };
                let response = reply(&seen);
                let _ = tx.send(seen);
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Scripted { url, seen, task }
}

/// An upstream that answers `connect` with `reply` and every other event with 204.
async fn scripted_connect(
    reply: impl Fn(&Seen) -> axum::response::Response + Clone + Send + Sync + 'static,
) -> Scripted {
    scripted(move |seen| {
        if seen.h("ce-type") != "azure.webpubsub.sys.connect" {
            return StatusCode::NO_CONTENT.into_response();
        }
        reply(seen)
    })
    .await
}

/// An emulator posting to `up`, and a JSON client of user "u" whose `connected` event
/// `up` has seen.
async fn connected_through(up: &mut Scripted) -> (webpubsub_emulator::Emulator, Ws) {
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        ..Config::default()
    })
    .await;
    let (a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    up.next_of("sys.connected").await;
    (emu, a)
}

/// Every system event, `connect` included.
fn all_system_events() -> SystemEvents {
    "connect,connected,disconnected".parse().unwrap()
}

/// An emulator posting every system event to `url`.
async fn emulator_asking(url: &str) -> Emulator {
    start_with(Config {
        upstream: Some(url.to_owned()),
        upstream_system_events: all_system_events(),
        ..Config::default()
    })
    .await
}

/// Sends "hi" to a group the client is in, with that ackId; returns the message it gets
/// back (it may come before the ack or after it).
async fn publish_to_own_group(ws: &mut Ws, group: &str, ack_id: u64) -> serde_json::Value {
    ws.send_json(
        json!({"type":"sendToGroup","group":group,"ackId":ack_id,"dataType":"text","data":"hi"}),
    )
    .await;
    let (mut message, mut acked) = (None, false);
    while message.is_none() || !acked {
        let frame = ws.next_json().await;
        if frame["type"] == "ack" {
            assert_ack_ok(&frame);
            acked = true;
        } else {
            message = Some(frame);
        }
    }
    message.unwrap()
}

/// Opens a socket offering `protocols` that the handshake must refuse; returns the
/// status and body of the refusal.
async fn refused(url: &str, protocols: &str) -> (u16, String) {
    match try_connect(url, Some(protocols)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, the handshake was accepted"),
    }
}

#[tokio::test]
async fn connect_is_posted_before_the_handshake_and_204_accepts_as_is() {
    let mut up = scripted(|_| StatusCode::NO_CONTENT.into_response()).await;
    let emu = emulator_asking(&up.url).await;
    let url = emu.client_url(
        "Chat",
        &TokenOptions {
            groups: vec!["token-group".into()],
            ..all_roles("alice")
        },
    );
    let (mut a, connected) = connect_json(&url, JSON).await;
    assert_eq!(connected["userId"], "alice");
    let id = connected["connectionId"].as_str().unwrap();
    let connect = up.next_of("sys.connect").await;
    assert_eq!(connect.h("ce-eventName"), "connect");
    assert_eq!(connect.h("ce-connectionId"), id);
    assert_eq!(connect.h("ce-userId"), "alice");
    assert_eq!(connect.h("ce-hub"), "Chat");
    assert_eq!(connect.h("webhook-request-origin"), origin(&emu));
    assert!(connect.h("content-type").starts_with("application/json"));
    assert!(connect.h("ce-connectionState").is_empty());
    let body = connect.json();
    assert_eq!(body["claims"]["sub"], json!(["alice"]));
    assert_eq!(
        body["claims"]["role"],
        json!(["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"])
    );
    assert_eq!(body["claims"]["webpubsub.group"], json!(["token-group"]));
    let token = url.split_once("access_token=").unwrap().1;
    assert_eq!(body["query"]["access_token"], json!([token]));
    assert_eq!(body["headers"]["sec-websocket-protocol"], json!([JSON]));
    assert_eq!(body["subprotocols"], json!([JSON]));
    assert_eq!(body["clientCertificates"], json!([]));
    // `connected` comes once the handshake is accepted.
    let event = up.next_of("sys.connected").await;
    assert_eq!(event.h("ce-connectionId"), id);
    // The token's groups are joined as without `connect`.
    let message = publish_to_own_group(&mut a, "token-group", 1).await;
    assert_eq!(message["data"], "hi");
    a.close().await;
    up.next_of("sys.disconnected").await;
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_200_connect_reply_sets_user_groups_roles_and_subprotocol() {
    let mut up = scripted_connect(|_seen| {
        axum::Json(json!({
            "userId": "bob",
            "groups": ["room"],
            "roles": ["webpubsub.sendToGroup.room"],
            "subprotocol": JSON,
        }))
        .into_response()
    })
    .await;
    let emu = emulator_asking(&up.url).await;
    // A token with a user and no role.
    let url = emu.client_url(
        "h",
        &TokenOptions {
            user_id: Some("alice".into()),
            ..Default::default()
        },
    );
    // Without the reply, the reliable protocol would be chosen.
    let mut a = connect(&url, Some(&format!("{JSON}, {RELIABLE}"))).await;
    assert_eq!(a.protocol.as_deref(), Some(JSON));
    let connected = a.next_json().await;
    assert_eq!(connected["event"], "connected", "{connected}");
    assert_eq!(connected["userId"], "bob");
    assert!(connected.get("reconnectionToken").is_none(), "{connected}");
    let connect = up.next_of("sys.connect").await;
    assert_eq!(connect.h("ce-userId"), "alice");
    assert_eq!(connect.json()["subprotocols"], json!([JSON, RELIABLE]));
    assert_eq!(up.next_of("sys.connected").await.h("ce-userId"), "bob");
    // In group "room" and allowed to send to it, but not to join or leave groups.
    let message = publish_to_own_group(&mut a, "room", 1).await;
    assert_eq!(
        (message["group"].as_str(), message["fromUserId"].as_str()),
        (Some("room"), Some("bob")),
        "{message}"
    );
    assert_ack_error(&a.join("other", 2).await, "Forbidden");
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_refused_connect_refuses_the_handshake_and_sends_nothing_more() {
    let mut up = scripted_connect(|seen| match seen.h("ce-userId") {
        "u400" => (StatusCode::BAD_REQUEST, "bad user").into_response(),
        "u401" => (StatusCode::UNAUTHORIZED, "who are you?").into_response(),
        "u403" => (StatusCode::FORBIDDEN, "not you").into_response(),
        "u500" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "u503" => (StatusCode::SERVICE_UNAVAILABLE, "later").into_response(),
        "bad-json" => ([("content-type", "application/json")], "{").into_response(),
        "bad-protocol" => axum::Json(json!({"subprotocol": "other"})).into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    })
    .await;
    let emu = emulator_asking(&up.url).await;
    // 4xx: the upstream's answer is the client's; anything else: 500.
    for (user, status, says) in [
        ("u400", 400, "bad user"),
        ("u401", 401, "who are you?"),
        ("u403", 403, "not you"),
        ("u500", 500, "boom"),
        ("u503", 500, "later"),
        ("bad-json", 500, "not the expected JSON"),
        ("bad-protocol", 500, "subprotocol 'other'"),
    ] {
        let (got, body) = refused(&emu.client_url("h", &all_roles(user)), JSON).await;
        assert_eq!(got, status, "{user}: {body}");
        assert!(body.contains(says), "{user}: {body}");
        assert_eq!(up.next_of("sys.connect").await.h("ce-userId"), user);
    }
    let held = stats(&emu).await;
    assert_eq!(
        (held["connections"].as_u64(), held["slotsTaken"].as_u64()),
        (Some(0), Some(0)),
        "{held}"
    );
    // A refused connection gets no `connected` nor `disconnected`: the next requests
    // are those of an accepted one.
    let (a, _) = connect_json(&emu.client_url("h", &all_roles("ok")), JSON).await;
    assert_eq!(up.next_of("sys.connect").await.h("ce-userId"), "ok");
    assert_eq!(up.next_of("sys.connected").await.h("ce-userId"), "ok");
    a.close().await;
    assert_eq!(up.next_of("sys.disconnected").await.h("ce-userId"), "ok");
    emu.shutdown().await;
    up.task.abort();
}

/// A `std::io::Write` appending to a shared buffer: a log to read back.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_connect_refusal_past_the_reply_limit_is_passed_on_cut_with_a_warning() {
    // The emulator's tasks run on this test's one thread, which logs to `log`.
    let log = Log::default();
    let writer = log.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    const LIMIT: usize = 1024;
    let up = scripted_connect(|seen| {
        let body: Vec<u8> = match seen.h("ce-userId") {
            "long" => (0..4 * LIMIT).map(|i| b'a' + (i % 26) as u8).collect(),
            _ => vec![b'x'; LIMIT],
        };
        (
            StatusCode::UNAUTHORIZED,
            [("content-type", "text/x-refusal")],
            body,
        )
            .into_response()
    })
    .await;
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        upstream_system_events: all_system_events(),
        max_frame_bytes: LIMIT,
        ..Config::default()
    })
    .await;
    let refusal = |user: &str| {
        let url = emu
            .client_url("h", &all_roles(user))
            .replacen("ws://", "http://", 1);
        async move {
            let resp = reqwest::Client::new()
                .get(url)
                .header("Upgrade", "websocket")
                .header("Connection", "Upgrade")
                .header("Sec-WebSocket-Version", "13")
                .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("Sec-WebSocket-Protocol", JSON)
                .send()
                .await
                .unwrap();
            let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
            (
                resp.status().as_u16(),
                content_type,
                resp.bytes().await.unwrap(),
            )
        }
    };
    // Within the limit: as it came, and nothing logged.
    let (status, content_type, body) = refusal("short").await;
    assert_eq!((status, content_type.as_str()), (401, "text/x-refusal"));
    assert_eq!(&body[..], &[b'x'; LIMIT][..]);
    assert!(!log.text().contains("WARN"), "{}", log.text());
    // Past it: the same status and content type, the body's first LIMIT bytes, and a
    // warning saying so.
    let (status, content_type, body) = refusal("long").await;
    assert_eq!((status, content_type.as_str()), (401, "text/x-refusal"));
    let expected: Vec<u8> = (0..LIMIT).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(&body[..], &expected[..]);
    let text = log.text();
    let warning = text
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning in the log: {text}"));
    assert!(
        warning.contains(&format!(
            "the upstream refused connect with HTTP 401 Unauthorized and a body larger than {LIMIT} bytes: the client gets its first {LIMIT} bytes"
        )),
        "{warning}"
    );
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_silent_or_unreachable_upstream_refuses_the_handshake_with_500() {
    let (url, silent) = silent_upstream().await;
    let emu = start_with(Config {
        upstream: Some(url),
        upstream_system_events: all_system_events(),
        upstream_timeout: std::time::Duration::from_millis(300),
        ..Config::default()
    })
    .await;
    let (status, body) = refused(&emu.client_url("h", &all_roles("u")), JSON).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("did not answer in time"), "{body}");
    emu.shutdown().await;
    silent.abort();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x", listener.local_addr().unwrap());
    drop(listener); // nothing listens there any more
    let emu = emulator_asking(&url).await;
    let (status, body) = refused(&emu.client_url("h", &all_roles("u")), JSON).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("upstream request failed"), "{body}");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_fails_a_user_event_at_the_timeout() {
    let (url, silent) = silent_upstream().await;
    let emu = start_with(Config {
        upstream: Some(url),
        upstream_timeout: std::time::Duration::from_millis(300),
        ..Config::default()
    })
    .await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    let ack = a
        .call(json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    a.send_json(json!({"type":"invoke","invocationId":"i","event":"e"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(
        (r["success"].as_bool(), r["error"]["name"].as_str()),
        (Some(false), Some("InternalServerError")),
        "{r}"
    );
    emu.shutdown().await;
    silent.abort();
}

#[tokio::test]
async fn the_binary_posts_connect_only_when_its_flag_asks() {
    let key = "upstream-flag-key";
    let mut up = scripted(|_| StatusCode::NO_CONTENT.into_response()).await;
    let client_url = |port: u16| {
        let audience = format!("http://127.0.0.1:{port}/client/hubs/h");
        let token = webpubsub_emulator::auth::sign_client_token(key, &audience, &all_roles("u"));
        format!("ws://127.0.0.1:{port}/client/hubs/h?access_token={token}")
    };
    // By default: connected and disconnected, no connect.
    let (binary, port) = spawn_binary(key, &["--upstream", &up.url]);
    let (a, _) = connect_json(&client_url(port), JSON).await;
    up.next_of("sys.connected").await;
    a.close().await;
    up.next_of("sys.disconnected").await;
    drop(binary);
    // Only the events named.
    let (_binary, port) = spawn_binary(
        key,
        &[
            "--upstream",
            &up.url,
            "--upstream-system-events",
            "connect,disconnected",
        ],
    );
    let (a, _) = connect_json(&client_url(port), JSON).await;
    up.next_of("sys.connect").await;
    a.close().await;
    up.next_of("sys.disconnected").await;
    assert_eq!(
        "connected".parse::<SystemEvents>().unwrap(),
        SystemEvents {
            connect: false,
            connected: true,
            disconnected: false
        }
    );
    assert_eq!(
        Config::default().upstream_system_events,
        SystemEvents::default()
    );
    assert!(!SystemEvents::default().connect);
    let unknown = "connect,joined".parse::<SystemEvents>().unwrap_err();
    assert!(unknown.contains("'joined'"), "{unknown}");
    up.task.abort();
}

/// Answers `connect` with state `c0`; a user event `set` with the state in its body,
/// `clear` with an empty state, `huge` with a state of as many bytes as its body says;
/// any other user event with the state it got, as text.
async fn state_keeping_upstream() -> Scripted {
    scripted(|seen| {
        let state = |value: &str| [("ce-connectionState", value.to_owned())];
        match seen.h("ce-type") {
            "azure.webpubsub.sys.connect" => (state("c0"), StatusCode::NO_CONTENT).into_response(),
            "azure.webpubsub.user.set" => {
                (state(std::str::from_utf8(&seen.body).unwrap()), "").into_response()
            }
            "azure.webpubsub.user.clear" => (state(""), "").into_response(),
            "azure.webpubsub.user.huge" => {
                let len: usize = std::str::from_utf8(&seen.body).unwrap().parse().unwrap();
                (state(&"x".repeat(len)), "").into_response()
            }
            t if t.starts_with("azure.webpubsub.user.") => (
                [("content-type", "text/plain")],
                seen.h("ce-connectionState").to_owned(),
            )
                .into_response(),
            _ => StatusCode::NO_CONTENT.into_response(),
        }
    })
    .await
}

#[tokio::test]
async fn the_connection_state_goes_round_between_replies_and_requests() {
    let mut up = state_keeping_upstream().await;
    let emu = emulator_asking(&up.url).await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), RELIABLE).await;
    up.next_of("sys.connect").await;
    // Set by the connect reply; `connected` carries it too.
    assert_eq!(
        up.next_of("sys.connected").await.h("ce-connectionState"),
        "c0"
    );
    let event = |event: &str, data: &str, ack_id: u64| json!({"type":"event","event":event,"ackId":ack_id,"dataType":"text","data":data});
    assert_ack_ok(&a.call(event("show", "", 1)).await);
    assert_eq!(a.next_json().await["data"], "c0");
    up.next().await;
    // A user event's reply replaces it.
    let base64_json = "eyJjb3VudCI6MX0="; // {"count":1}
    assert_ack_ok(&a.call(event("set", base64_json, 2)).await);
    assert_eq!(up.next_of("user.set").await.h("ce-connectionState"), "c0");
    a.send_json(json!({"type":"invoke","invocationId":"i","event":"show"}))
        .await;
    let r = a.next_json().await;
    assert_eq!(
        (r["success"].as_bool(), r["data"].as_str()),
        (Some(true), Some(base64_json)),
        "{r}"
    );
    up.next().await;
    // An empty value clears it: no header at all.
    assert_ack_ok(&a.call(event("clear", "", 3)).await);
    up.next_of("user.clear").await;
    assert_ack_ok(&a.call(event("show", "", 4)).await);
    let seen = up.next_of("user.show").await;
    assert!(seen.headers.get("ce-connectionState").is_none(), "{seen:?}");
    // It lasts as long as the connection: `disconnected` carries it.
    assert_ack_ok(&a.call(event("set", "c1", 5)).await);
    up.next_of("user.set").await;
    a.close().await;
    assert_eq!(
        up.next_of("sys.disconnected").await.h("ce-connectionState"),
        "c1"
    );
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_connection_state_over_4096_bytes_fails_the_reply_and_changes_nothing() {
    let mut up = state_keeping_upstream().await;
    let emu = emulator_asking(&up.url).await;
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    up.next_of("sys.connect").await;
    up.next_of("sys.connected").await;
    let event = |event: &str, data: &str, ack_id: u64| json!({"type":"event","event":event,"ackId":ack_id,"dataType":"text","data":data});
    assert_ack_ok(&a.call(event("huge", "4096", 1)).await);
    up.next_of("user.huge").await;
    let ack = a.call(event("huge", "4097", 2)).await;
    assert_ack_error(&ack, "InternalServerError");
    let message = ack["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("ce-connectionState is 4097 bytes, more than the 4096"),
        "{message}"
    );
    up.next_of("user.huge").await;
    a.send_json(
        json!({"type":"invoke","invocationId":"i","event":"huge","dataType":"text","data":"5000"}),
    )
    .await;
    let r = a.next_json().await;
    assert_eq!(
        (r["success"].as_bool(), r["error"]["name"].as_str()),
        (Some(false), Some("InternalServerError")),
        "{r}"
    );
    up.next_of("user.huge").await;
    // The state is still the last one accepted.
    assert_ack_ok(&a.call(event("show", "", 3)).await);
    assert_eq!(a.next_json().await["data"], "x".repeat(4096));
    emu.shutdown().await;
    up.task.abort();

    // Set by a connect reply, it refuses the handshake.
    let mut up = scripted_connect(|_seen| {
        (
            [("ce-connectionState", "x".repeat(4097))],
            StatusCode::NO_CONTENT,
        )
            .into_response()
    })
    .await;
    let emu = emulator_asking(&up.url).await;
    let (status, body) = refused(&emu.client_url("h", &all_roles("u")), JSON).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("ce-connectionState is 4097 bytes"), "{body}");
    up.next_of("sys.connect").await;
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn every_event_after_connect_carries_the_subprotocol() {
    let mut up = scripted(|seen| {
        if seen.h("ce-type") == "azure.webpubsub.sys.connect" && seen.h("ce-userId") == "custom" {
            return axum::Json(json!({"subprotocol": "custom.v1"})).into_response();
        }
        StatusCode::NO_CONTENT.into_response()
    })
    .await;
    let emu = emulator_asking(&up.url).await;
    // A JSON client: connected, a user event, an invocation and disconnected carry it;
    // connect does not (the subprotocol is not chosen yet).
    let (mut a, _) = connect_json(&emu.client_url("h", &all_roles("u")), JSON).await;
    assert_eq!(up.next_of("sys.connect").await.h("ce-subprotocol"), "");
    assert_eq!(up.next_of("sys.connected").await.h("ce-subprotocol"), JSON);
    let event = json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"});
    assert_ack_ok(&a.call(event).await);
    assert_eq!(up.next_of("user.e").await.h("ce-subprotocol"), JSON);
    a.send_json(
        json!({"type":"invoke","invocationId":"i","event":"e","dataType":"text","data":"x"}),
    )
    .await;
    assert_eq!(a.next_json().await["success"], true);
    assert_eq!(up.next_of("user.e").await.h("ce-subprotocol"), JSON);
    a.close().await;
    assert_eq!(
        up.next_of("sys.disconnected").await.h("ce-subprotocol"),
        JSON
    );
    // A simple client speaking the subprotocol the upstream chose sends it too.
    let mut s = connect(
        &emu.client_url("h", &all_roles("custom")),
        Some("custom.v1"),
    )
    .await;
    assert_eq!(s.protocol.as_deref(), Some("custom.v1"));
    up.next_of("sys.connect").await;
    assert_eq!(
        up.next_of("sys.connected").await.h("ce-subprotocol"),
        "custom.v1"
    );
    s.send_text("raw").await;
    assert_eq!(
        up.next_of("user.message").await.h("ce-subprotocol"),
        "custom.v1"
    );
    // A simple client without one sends none.
    let mut plain = connect(&emu.client_url("h", &all_roles("plain")), None).await;
    up.next_of("sys.connect").await;
    let connected = up.next_of("sys.connected").await;
    assert!(connected.headers.get("ce-subprotocol").is_none());
    plain.send_text("raw").await;
    assert!(up
        .next_of("user.message")
        .await
        .headers
        .get("ce-subprotocol")
        .is_none());
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn an_accepted_connect_whose_handshake_fails_still_gets_disconnected() {
    use tokio::io::AsyncWriteExt;
    // The connect reply waits until the test lets it go.
    let (seen_tx, seen) = mpsc::unbounded_channel::<Seen>();
    let release = Arc::new(tokio::sync::Notify::new());
    let app = axum::Router::new().route(
        "/events",
        post({
            let release = release.clone();
            move |headers: HeaderMap, body: Bytes| {
                let (seen_tx, release) = (seen_tx.clone(), release.clone());
                async move {
                    let connect = headers["ce-type"] == "azure.webpubsub.sys.connect";
                    let _ = seen_tx.send(Seen { headers, body });
                    if connect {
                        release.notified().await;
                    }
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut up = Scripted { url, seen, task };
    let emu = emulator_asking(&up.url).await;
    // A raw client sends its upgrade request and goes away before the answer.
    let client_url = emu.client_url("h", &all_roles("gone"));
    let request = upgrade_request(
        &emu,
        &client_url,
        &format!("{WS_VERSION_AND_KEY}Sec-WebSocket-Protocol: {JSON}\r\n"),
    );
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", emu.port()))
        .await
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let connect = up.next_of("sys.connect").await;
    let id = connect.h("ce-connectionId").to_owned();
    drop(tcp);
    release.notify_one();
    // The upstream accepted the connection: a `disconnected` follows (a `connected` may
    // come first, when the answer went out before the emulator saw the client gone).
    let mut after = up.next().await;
    if after.h("ce-type") == "azure.webpubsub.sys.connected" {
        after = up.next().await;
    }
    assert_eq!(after.h("ce-type"), "azure.webpubsub.sys.disconnected");
    assert_eq!(after.h("ce-connectionId"), id);
    assert_eq!(after.h("ce-userId"), "gone");
    assert_eq!(after.h("ce-subprotocol"), JSON);
    let reason = &after.json()["reason"];
    assert!(reason.as_str().unwrap().contains("handshake"), "{reason}");
    // The reply chooses no subprotocol, and the client offered only one of its own:
    // the handshake is refused, after the upstream accepted it.
    release.notify_one();
    let (status, body) = refused(&emu.client_url("h", &all_roles("picky")), "custom.v1").await;
    assert_eq!(status, 400, "{body}");
    let id = up
        .next_of("sys.connect")
        .await
        .h("ce-connectionId")
        .to_owned();
    let after = up.next_of("sys.disconnected").await;
    assert_eq!(after.h("ce-connectionId"), id);
    assert!(after.headers.get("ce-subprotocol").is_none());
    let reason = &after.json()["reason"];
    assert!(reason.as_str().unwrap().contains("handshake"), "{reason}");
    let held = stats(&emu).await;
    assert_eq!(
        (held["connections"].as_u64(), held["slotsTaken"].as_u64()),
        (Some(0), Some(0)),
        "{held}"
    );
    emu.shutdown().await;
    up.task.abort();
}

/// The body of the next request, which must be the `disconnected` of connection `id`.
async fn disconnected_body(up: &mut Scripted, id: &str) -> serde_json::Value {
    let event = up.next_of("sys.disconnected").await;
    assert_eq!(event.h("ce-connectionId"), id);
    assert!(event.h("content-type").starts_with("application/json"));
    event.json()
}

#[tokio::test]
async fn disconnected_says_why_the_connection_ended() {
    let mut up = scripted(|_| StatusCode::NO_CONTENT.into_response()).await;
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        recovery_window: std::time::Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let open = |protocol: &'static str| {
        let url = emu.client_url("h", &all_roles("u"));
        async move { connect_json(&url, protocol).await }
    };
    let id = |connected: &serde_json::Value| connected["connectionId"].as_str().unwrap().to_owned();

    // A normal close without a reason: no reason.
    let (a, connected) = open(JSON).await;
    up.next_of("sys.connected").await;
    a.close().await;
    assert_eq!(disconnected_body(&mut up, &id(&connected)).await, json!({}));

    // The client's close reason.
    let (mut a, connected) = open(JSON).await;
    up.next_of("sys.connected").await;
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    };
    a.inner.close(Some(bye)).await.unwrap();
    assert_eq!(
        disconnected_body(&mut up, &id(&connected)).await,
        json!({"reason": "bye"})
    );

    // The reason of a REST close.
    let (mut a, connected) = open(JSON).await;
    up.next_of("sys.connected").await;
    let url = format!(
        "{}/api/hubs/h/connections/{}?reason=maintenance",
        emu.endpoint(),
        id(&connected)
    );
    let token = rest_token(&emu, &url);
    let resp = reqwest::Client::new()
        .delete(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(a.expect_close().await, (1000, String::new()));
    // The text the client is told, as the service team's emulator sends it upstream.
    assert_eq!(
        disconnected_body(&mut up, &id(&connected)).await,
        json!({"reason": "Application server closed the connection. Reason: maintenance"})
    );

    // The reason of a close for bad input: the one the client is told.
    let (mut a, connected) = open(JSON).await;
    up.next_of("sys.connected").await;
    a.send_text("not json").await;
    let told = a.next_json().await;
    assert_eq!(told["event"], "disconnected", "{told}");
    assert_eq!(
        disconnected_body(&mut up, &id(&connected)).await,
        json!({"reason": told["message"]})
    );

    // A socket lost without a close frame, and a reliable session not recovered in time.
    for protocol in [JSON, RELIABLE] {
        let (a, connected) = open(protocol).await;
        up.next_of("sys.connected").await;
        drop(a);
        let body = disconnected_body(&mut up, &id(&connected)).await;
        let reason = body["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("without a close frame"),
            "{protocol}: {body}"
        );
    }
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_failed_message_event_drops_the_simple_client() {
    let mut up = scripted(|seen| {
        if seen.h("ce-type") != "azure.webpubsub.user.message" {
            return StatusCode::NO_CONTENT.into_response();
        }
        match &seen.body[..] {
            b"fail" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            _ => ([("content-type", "text/plain")], "ok").into_response(),
        }
    })
    .await;
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        ..Config::default()
    })
    .await;
    let mut s = connect(&emu.client_url("h", &all_roles("u")), None).await;
    let id = up
        .next_of("sys.connected")
        .await
        .h("ce-connectionId")
        .to_owned();
    // A success: the reply comes back as a frame, and the connection stays.
    s.send_text("hello").await;
    up.next_of("user.message").await;
    assert_eq!(s.next_message().await, Message::Text("ok".into()));
    // A failure drops it, as the service documents; the upstream is told why.
    s.send_text("fail").await;
    up.next_of("user.message").await;
    let (code, reason) = s.expect_close().await;
    assert_eq!(code, 1008);
    assert!(
        reason.contains("HTTP 500") && reason.contains("boom"),
        "{reason}"
    );
    let told = disconnected_body(&mut up, &id).await;
    assert!(
        told["reason"].as_str().unwrap().starts_with(&reason),
        "{told}"
    );
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn every_request_carries_its_source_signature_and_event_name() {
    use hmac::Mac;
    let mut up = scripted(|_| StatusCode::NO_CONTENT.into_response()).await;
    let emu = emulator_asking(&up.url).await;
    let (mut a, connected) = connect_json(&emu.client_url("Chat", &all_roles("u")), JSON).await;
    let id = connected["connectionId"].as_str().unwrap().to_owned();
    let event = json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"});
    assert_ack_ok(&a.call(event).await);
    a.close().await;
    // The signature an upstream checks: hex HMAC-SHA256 of the connection id by the key.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(emu.access_key().as_bytes()).unwrap();
    mac.update(id.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut ids = std::collections::HashSet::new();
    for (ce_type, name) in [
        ("sys.connect", "connect"),
        ("sys.connected", "connected"),
        ("user.e", "e"),
        ("sys.disconnected", "disconnected"),
    ] {
        let seen = up.next_of(ce_type).await;
        assert_eq!(seen.h("ce-eventName"), name);
        assert_eq!(seen.h("ce-specversion"), "1.0");
        assert_eq!(seen.h("ce-awpsversion"), "1.0");
        assert_eq!(seen.h("ce-source"), format!("/hubs/Chat/client/{id}"));
        assert_eq!(seen.h("ce-signature"), format!("sha256={hex}"), "{name}");
        assert!(
            ids.insert(seen.h("ce-id").to_owned()),
            "{name}: ce-id reused"
        );
        if name == "connected" {
            assert!(seen.h("content-type").starts_with("application/json"));
            assert_eq!(seen.json(), json!({}));
        }
    }
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_redirecting_upstream_fails_like_any_other_error() {
    let mut elsewhere = scripted(|_| {
        (
            [("content-type", "application/json")],
            r#"{"userId":"moved"}"#,
        )
            .into_response()
    })
    .await;
    let location = elsewhere.url.clone();
    let mut up = scripted(move |seen| match seen.h("ce-type") {
        "azure.webpubsub.sys.connect" | "azure.webpubsub.user.e" => (
            StatusCode::TEMPORARY_REDIRECT,
            [("location", location.clone())],
        )
            .into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    })
    .await;
    let (emu, mut a) = connected_through(&mut up).await;
    let ack = a
        .call(json!({"type":"event","event":"e","ackId":1,"dataType":"text","data":"x"}))
        .await;
    assert_ack_error(&ack, "InternalServerError");
    assert!(
        ack["error"]["message"].as_str().unwrap().contains("307"),
        "{ack}"
    );
    up.next_of("user.e").await;
    emu.shutdown().await;

    let emu = emulator_asking(&up.url).await;
    let (status, body) = refused(&emu.client_url("h", &all_roles("u")), JSON).await;
    assert_eq!(status, 500, "{body}");
    up.next_of("sys.connect").await;
    // Nothing was posted where the replies pointed.
    assert!(elsewhere.seen.try_recv().is_err());
    emu.shutdown().await;
    up.task.abort();
    elsewhere.task.abort();
}

#[tokio::test]
async fn a_connect_reply_adds_to_the_token_and_ignores_empty_fields() {
    let mut up = scripted_connect(|seen| match seen.h("ce-userId") {
        "empty-200" => StatusCode::OK.into_response(),
        _ => axum::Json(json!({
            "userId": "",
            "subprotocol": "",
            "groups": ["from-reply"],
            "roles": ["webpubsub.sendToGroup"],
        }))
        .into_response(),
    })
    .await;
    let emu = emulator_asking(&up.url).await;
    // 200 with an empty body: accepted as it is.
    let (_e, connected) = connect_json(&emu.client_url("h", &all_roles("empty-200")), JSON).await;
    assert_eq!(connected["userId"], "empty-200");
    up.next_of("sys.connect").await;
    up.next_of("sys.connected").await;
    // The token's user, group and role stay; the reply's group and role come besides.
    let url = emu.client_url(
        "h",
        &TokenOptions {
            user_id: Some("alice".into()),
            roles: vec!["webpubsub.joinLeaveGroup".into()],
            groups: vec!["from-token".into()],
            ..Default::default()
        },
    );
    let (mut a, connected) = connect_json(&url, RELIABLE).await;
    assert_eq!(connected["userId"], "alice");
    assert_eq!(a.protocol.as_deref(), Some(RELIABLE));
    for (group, ack_id) in [("from-token", 1), ("from-reply", 3)] {
        let message = publish_to_own_group(&mut a, group, ack_id).await;
        assert_eq!(message["group"], group, "{message}");
    }
    assert_ack_ok(&a.join("other", 2).await);
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn events_of_one_socket_are_posted_in_order() {
    let mut up = scripted(|_| StatusCode::NO_CONTENT.into_response()).await;
    let (emu, mut a) = connected_through(&mut up).await;
    for n in 0..50 {
        let frame = json!({"type":"event","event":"e","dataType":"text","data":n.to_string()});
        futures_util::SinkExt::feed(&mut a.inner, Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    futures_util::SinkExt::flush(&mut a.inner).await.unwrap();
    for n in 0..50 {
        assert_eq!(up.next_of("user.e").await.body, n.to_string());
    }
    emu.shutdown().await;
    up.task.abort();
}

#[tokio::test]
async fn a_simple_client_gets_the_reply_as_text_or_binary_by_its_content_type() {
    let up = scripted(|seen| {
        let content_type = std::str::from_utf8(&seen.body).unwrap().to_owned();
        ([("content-type", content_type)], "{\"a\":1}").into_response()
    })
    .await;
    let emu = start_with(Config {
        upstream: Some(up.url.clone()),
        ..Config::default()
    })
    .await;
    let mut s = connect(&emu.client_url("h", &all_roles("u")), None).await;
    for (content_type, text) in [
        ("application/json", true),
        ("text/plain; charset=utf-8", true),
        ("application/octet-stream", false),
        ("application/xml", false),
    ] {
        s.send_text(content_type).await;
        let expected = if text {
            Message::Text("{\"a\":1}".into())
        } else {
            Message::Binary(b"{\"a\":1}".to_vec().into())
        };
        assert_eq!(s.next_message().await, expected, "{content_type}");
    }
    emu.shutdown().await;
    up.task.abort();
}

/// Answers a user event by its body: `set:X` sets the state X, `twice` sends two state
/// headers, `bytes` a state that is not ASCII, anything else echoes the state it got;
/// `connected` and `disconnected` with a state of their own, which must be ignored.
async fn state_edges_upstream() -> Scripted {
    use axum::http::HeaderValue;
    scripted(|seen| {
        let ce_type = seen.h("ce-type");
        let mut response = if ce_type.starts_with("azure.webpubsub.user.") {
            (
                [("content-type", "text/plain")],
                seen.h("ce-connectionState").to_owned(),
            )
                .into_response()
        } else {
            StatusCode::NO_CONTENT.into_response()
        };
        let headers = response.headers_mut();
        let body = std::str::from_utf8(&seen.body).unwrap_or_default();
        if ce_type == "azure.webpubsub.sys.connected"
            || ce_type == "azure.webpubsub.sys.disconnected"
        {
            headers.insert(
                "ce-connectionState",
                HeaderValue::from_static("from-system"),
            );
        } else if let Some(state) = body.strip_prefix("set:") {
            headers.insert("ce-connectionState", HeaderValue::from_str(state).unwrap());
        } else if body == "twice" {
            headers.append("ce-connectionState", HeaderValue::from_static("one"));
            headers.append("ce-connectionState", HeaderValue::from_static("two"));
        } else if body == "bytes" {
            let value = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
            headers.insert("ce-connectionState", value);
        }
        response
    })
    .await
}

#[tokio::test]
async fn the_connection_state_survives_recovery_and_refuses_bad_headers() {
    let mut up = state_edges_upstream().await;
    let emu = emulator_asking(&up.url).await;
    let url = emu.client_url("h", &all_roles("u"));
    let (mut a, connected) = connect_json(&url, RELIABLE).await;
    let id = connected["connectionId"].as_str().unwrap();
    up.next_of("sys.connect").await;
    up.next_of("sys.connected").await;
    let event = |data: &str, ack_id: u64| json!({"type":"event","event":"e","ackId":ack_id,"dataType":"text","data":data});
    assert_ack_ok(&a.call(event("set:s1", 1)).await);
    // The state `connected`'s reply gave was ignored.
    assert_eq!(up.next_of("user.e").await.h("ce-connectionState"), "");
    // More than one header, or one not printable ASCII: the reply fails, the state stays.
    for (data, says, ack_id) in [
        ("twice", "more than one", 2),
        ("bytes", "not printable ASCII", 3),
    ] {
        let ack = a.call(event(data, ack_id)).await;
        assert_ack_error(&ack, "InternalServerError");
        assert!(
            ack["error"]["message"].as_str().unwrap().contains(says),
            "{ack}"
        );
        up.next().await;
    }
    // The state survives a recovery, which posts no `connect`.
    fault(&emu, "h", id, ":drop").await;
    a.expect_abrupt_end().await;
    let recovery = format!(
        "{url}&awps_connection_id={id}&awps_reconnection_token={}",
        connected["reconnectionToken"].as_str().unwrap()
    );
    let (mut a, again) = connect_json(&recovery, RELIABLE).await;
    assert_eq!(again["connectionId"], id);
    assert_ack_ok(&a.call(event("show", 4)).await);
    assert_eq!(a.next_json().await["data"], "s1");
    assert_eq!(up.next_of("user.e").await.h("ce-connectionState"), "s1");
    emu.shutdown().await;

    // A simple client's `message` reply sets it too.
    let emu = emulator_asking(&up.url).await;
    let mut s = connect(&emu.client_url("h", &all_roles("u")), None).await;
    up.next_of("sys.connect").await;
    up.next_of("sys.connected").await;
    s.send_text("set:m1").await;
    s.send_text("show").await;
    assert_eq!(s.next_message().await, Message::Text("m1".into()));
    emu.shutdown().await;
    up.task.abort();
}

/// A simple client's `webpubsub_mode=sendToGroup&group=g` query is ignored: its frame is
/// a `message` event as in the default mode, and nothing reaches the group.
#[tokio::test]
async fn a_simple_clients_send_to_group_mode_is_ignored() {
    let (mut up, emu) = emulator_with_upstream().await;
    let (mut member, _) = connect_json(&emu.client_url("h", &all_roles("m")), JSON).await;
    assert_ack_ok(&member.join("g", 1).await);
    let url = emu.client_url("h", &all_roles("s"));
    let mut s = connect(&format!("{url}&webpubsub_mode=sendToGroup&group=g"), None).await;
    s.send_text("raw text").await;
    let seen = next_seen(&mut up).await;
    assert_eq!(seen.h("ce-type"), "azure.webpubsub.user.message");
    assert_eq!(&seen.body[..], b"raw text");
    member
        .send_json(json!({"type":"sendToGroup","group":"g","dataType":"text","data":"marker"}))
        .await;
    assert_eq!(member.next_json().await["data"], "marker");
    emu.shutdown().await;
    up.task.abort();
}
