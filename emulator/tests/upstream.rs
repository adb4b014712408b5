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

/// Replies by event name: `echo` returns the body with its content type, `empty` 200
/// with no body, `fail` 500, `hang` never answers. System events go to `system`.
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
                    "empty" => StatusCode::OK.into_response(),
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

/// The `WebHook-Request-Origin` the emulator sends: the host of its endpoint, as the
/// service sends its own (`xxx.webpubsub.azure.com`).
fn origin(emu: &Emulator) -> String {
    emu.endpoint().split_once("://").unwrap().1.to_owned()
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

#[tokio::test]
async fn shutdown_does_not_wait_for_a_silent_upstream() {
    // Takes every request and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
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
