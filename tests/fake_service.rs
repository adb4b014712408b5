//! The client against a scripted fake service: exact frames on the wire, malformed
//! input, sequence handling, recovery URLs, retries and cancellation.

mod common;

use bytes::Bytes;
use common::{fast_options, next_event, wait_for};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use webpubsub_client::{
    AckResult, Client, ClientOptions, ClientState, Credential, DataType, Error, Event,
    InvokeOptions, SendToGroupOptions,
};

struct Fake {
    listener: TcpListener,
    url: String,
}

impl Fake {
    async fn new() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "ws://{}/client/hubs/h?access_token=tok",
            listener.local_addr().unwrap()
        );
        Fake { listener, url }
    }

    /// The next connection, asserted to be a recovery of `conn1`.
    async fn accept_recovery(&self) -> Conn {
        let (conn, uri) = self.accept().await;
        assert!(
            uri.contains("awps_connection_id=conn1"),
            "not a recovery: {uri}"
        );
        conn
    }

    /// Accepts the next connection; returns it and its request URI.
    #[allow(clippy::result_large_err)]
    async fn accept(&self) -> (Conn, String) {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("no connection within 10 s")
            .unwrap();
        let uri = Arc::new(Mutex::new(String::new()));
        let seen = uri.clone();
        let ws =
            tokio_tungstenite::accept_hdr_async(tcp, move |req: &Request, mut resp: Response| {
                let agent = req
                    .headers()
                    .get("User-Agent")
                    .map(|v| v.to_str().unwrap().to_owned());
                *seen.lock().unwrap() = format!("{} {}", req.uri(), agent.unwrap_or_default());
                let offered = req.headers().get("Sec-WebSocket-Protocol").cloned();
                if let Some(protocol) = offered {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", protocol);
                }
                Ok(resp)
            })
            .await
            .unwrap();
        let seen = uri.lock().unwrap().clone();
        let (uri, agent) = seen.split_once(' ').unwrap();
        assert!(
            agent.starts_with("webpubsub-client-rust/"),
            "User-Agent {agent:?}"
        );
        (Conn { ws }, uri.to_owned())
    }
}

struct Conn {
    ws: WebSocketStream<TcpStream>,
}

impl Conn {
    async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    async fn connected(&mut self, id: &str, token: &str) {
        self.send(&format!(
            r#"{{"type":"system","event":"connected","userId":"u","connectionId":"{id}","reconnectionToken":"{token}"}}"#
        ))
        .await;
    }

    /// Sends the `disconnected` system frame with `message`.
    async fn disconnected(&mut self, message: &str) {
        self.send(&format!(
            r#"{{"type":"system","event":"disconnected","message":"{message}"}}"#
        ))
        .await;
    }

    /// Closes the connection with `code` and `reason`.
    async fn close(&mut self, code: CloseCode, reason: &str) {
        let reason = reason.to_owned().into();
        self.ws
            .close(Some(CloseFrame { code, reason }))
            .await
            .unwrap();
    }

    /// Acknowledges `frame` (an upstream frame with an ackId) as a success.
    async fn ack(&mut self, frame: &serde_json::Value) {
        self.send(&format!(
            r#"{{"type":"ack","ackId":{},"success":true}}"#,
            frame["ackId"]
        ))
        .await;
    }

    /// The next text frame from the client (pings skipped).
    async fn recv(&mut self) -> serde_json::Value {
        common::next_client_frame(&mut self.ws).await
    }

    /// Asserts that nothing but pings arrives for `ms` milliseconds.
    async fn silent_for(&mut self, ms: u64) {
        let quiet = tokio::time::timeout(Duration::from_millis(ms), self.recv()).await;
        assert!(quiet.is_err(), "unexpected frame {:?}", quiet.unwrap());
    }
}

fn quiet_options() -> ClientOptions {
    ClientOptions {
        keep_alive_interval: None,
        keep_alive_timeout: None,
        ..fast_options()
    }
}

/// Quiet options with a 300 ms ack timeout and no retry.
fn one_try_options() -> ClientOptions {
    ClientOptions {
        ack_timeout: Duration::from_millis(300),
        message_retry: webpubsub_client::RetryOptions {
            max_retries: Some(0),
            ..fast_options().message_retry
        },
        ..quiet_options()
    }
}

/// An acked text message `body` to group `g`, sent from a task.
fn spawn_send(
    client: &Client,
    body: &'static str,
) -> tokio::task::JoinHandle<Result<webpubsub_client::AckResult, Error>> {
    let client = client.clone();
    tokio::spawn(async move {
        client
            .send_to_group(
                "g",
                DataType::Text,
                Bytes::from(body),
                SendToGroupOptions::default(),
            )
            .await
    })
}

/// Invokes an event that the fake leaves unanswered for its 200 ms timeout; asserts the
/// `Timeout` and the `cancelInvocation` written after it; the invocation's id.
async fn invocation_timed_out(client: &Client, conn: &mut Conn) -> String {
    let c = client.clone();
    let invoke = tokio::spawn(async move {
        let opts = InvokeOptions {
            timeout: Some(Duration::from_millis(200)),
        };
        c.invoke_event("slow", DataType::Text, Bytes::from("x"), opts)
            .await
    });
    let frame = conn.recv().await;
    let id = frame["invocationId"].as_str().unwrap().to_owned();
    assert_eq!(
        invoke.await.unwrap().unwrap_err(),
        Error::Timeout { ack_id: None }
    );
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"cancelInvocation","invocationId":id})
    );
    id
}

/// A started client on a fake service, with the connected frame sent.
async fn connect(
    fake: &Fake,
    options: ClientOptions,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Event>, Conn) {
    let (client, mut events) =
        Client::with_channel(Credential::Url(fake.url.clone()), options).unwrap();
    let starter = client.clone();
    let start = tokio::spawn(async move { starter.start().await });
    let (mut conn, uri) = fake.accept().await;
    assert_eq!(uri, "/client/hubs/h?access_token=tok");
    conn.connected("conn1", "rt1").await;
    start.await.unwrap().unwrap();
    let event = next_event(&mut events, 5).await;
    assert_eq!(
        event,
        Event::Connected {
            connection_id: "conn1".into(),
            user_id: Some("u".into())
        }
    );
    (client, events, conn)
}

/// The `Disconnected` event of `conn1` with `message` and `close_code`.
fn conn1_lost(message: &str, close_code: u16) -> Event {
    Event::Disconnected {
        connection_id: Some("conn1".into()),
        message: Some(message.into()),
        close_code: Some(close_code),
    }
}

fn server_message(text: &str, sequence_id: u64) -> String {
    format!(
        r#"{{"type":"message","from":"server","dataType":"text","data":"{text}","sequenceId":{sequence_id}}}"#
    )
}

#[tokio::test]
async fn the_subprotocol_is_offered_and_frames_match_the_reference() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    assert_eq!(client.state(), ClientState::Connected);
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("g").await });
    let frame = conn.recv().await;
    assert_eq!(
        frame,
        serde_json::json!({"type":"joinGroup","group":"g","ackId":frame["ackId"]})
    );
    let ack_id = frame["ackId"].as_u64().unwrap();
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{ack_id},"success":true}}"#
    ))
    .await;
    let result = join.await.unwrap().unwrap();
    assert_eq!(result.ack_id, Some(ack_id));
    assert!(!result.is_duplicated);

    client
        .send_to_group(
            "g",
            DataType::Json,
            Bytes::from_static(br#"{"a":1}"#),
            SendToGroupOptions {
                no_echo: true,
                fire_and_forget: true,
                ack_id: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"sendToGroup","group":"g","noEcho":true,"dataType":"json","data":{"a":1}})
    );
    client.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_frames_are_skipped() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    conn.send("garbage").await;
    conn.send(r#"{"type":"brandNew","group":{"x":1}}"#).await;
    conn.send(r#"{"type":"message","from":"server","dataType":"text"}"#)
        .await;
    conn.send(r#"{"type":"ack","ackId":999,"success":true}"#)
        .await;
    conn.ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    conn.send(&server_message("still alive", 1)).await;
    let event = next_event(&mut events, 5).await;
    assert_eq!(
        event,
        Event::ServerMessage {
            data_type: DataType::Text,
            data: Bytes::from("still alive"),
            sequence_id: Some(1)
        }
    );
    assert_eq!(client.state(), ClientState::Connected);
    client.stop().await;
}

#[tokio::test]
async fn duplicate_sequence_ids_are_dropped_and_acknowledged() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    for (text, id) in [("a", 1), ("b", 2), ("b", 2), ("a", 1), ("c", 3)] {
        conn.send(&server_message(text, id)).await;
    }
    let mut texts = Vec::new();
    for _ in 0..3 {
        texts.push(common::message_text(&next_event(&mut events, 5).await).unwrap());
    }
    assert_eq!(texts, ["a", "b", "c"]);
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"sequenceAck","sequenceId":3})
    );
    conn.silent_for(300).await;
    assert!(
        events.try_recv().is_err(),
        "duplicates must not be delivered"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_sequence_jump_over_300_is_acknowledged_at_once() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        sequence_ack_interval: Duration::from_secs(3600),
        ..quiet_options()
    };
    let (client, mut events, mut conn) = connect(&fake, options).await;
    conn.send(&server_message("x", 1)).await;
    next_event(&mut events, 5).await;
    conn.silent_for(200).await;
    conn.send(&server_message("y", 302)).await;
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"sequenceAck","sequenceId":302})
    );
    client.stop().await;
}

#[tokio::test]
async fn a_pending_operation_is_resent_with_its_ack_id_after_recovery() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    conn.send(&server_message("before", 5)).await;
    next_event(&mut events, 5).await;
    let send = spawn_send(&client, "once");
    let first = conn.recv().await;
    let first = if first["type"] == "sequenceAck" {
        conn.recv().await
    } else {
        first
    };
    assert_eq!(first["type"], "sendToGroup");
    drop(conn);

    let (mut conn, uri) = fake.accept().await;
    assert_eq!(
        uri,
        "/client/hubs/h?access_token=tok&awps_connection_id=conn1&awps_reconnection_token=rt1"
    );
    let mut resent = conn.recv().await;
    if resent["type"] == "sequenceAck" {
        resent = conn.recv().await;
    }
    assert_eq!(resent, first, "resent with the same ackId");
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"Duplicate","message":"done"}}}}"#,
        first["ackId"]
    ))
    .await;
    let result = send.await.unwrap().unwrap();
    assert_eq!(result.ack_id, first["ackId"].as_u64());
    assert!(result.is_duplicated);

    conn.send(&server_message("before", 5)).await;
    conn.send(&server_message("after", 6)).await;
    let event = next_event(&mut events, 5).await;
    assert_eq!(
        common::message_text(&event).as_deref(),
        Some("after"),
        "replayed frame deduped, no events"
    );
    assert_eq!(client.state(), ClientState::Connected);
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    client.stop().await;
}

#[tokio::test]
async fn operations_pending_at_a_drop_are_resent_in_the_order_they_were_written() {
    // Resent by ackId before, which is not the order of a caller whose ackIds do not
    // grow: its own ids (an idempotency key), or its own then automatic ones.
    resent_as_written(&[
        (Some(9000), "first"),
        (Some(500), "second"),
        (None, "third"),
    ])
    .await;
    // The first written by its caller (an idle client), the second queued behind it:
    // the task took the second in before it registered the first.
    resent_as_written(&[(None, "own"), (None, "queued")]).await;
}

/// Sends `sends` (ackId, body) in this order, all pending when the connection drops;
/// checks that the recovery resends them as they were written.
async fn resent_as_written(sends: &[(Option<u64>, &'static str)]) {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let mut pending = Vec::new();
    for &(ack_id, body) in sends {
        let c = client.clone();
        let mut send = Box::pin(async move {
            let opts = SendToGroupOptions {
                ack_id,
                ..SendToGroupOptions::default()
            };
            c.send_to_group("g", DataType::Text, Bytes::from(body), opts)
                .await
        });
        // Handed over at its first poll: in this order.
        assert!(futures_util::poll!(&mut send).is_pending());
        pending.push(tokio::spawn(send));
    }
    let mut written = Vec::new();
    while written.len() < sends.len() {
        written.push(conn.recv().await);
    }
    let bodies: Vec<&str> = written
        .iter()
        .map(|f| f["data"].as_str().unwrap())
        .collect();
    let sent: Vec<&str> = sends.iter().map(|(_, body)| *body).collect();
    assert_eq!(bodies, sent);
    drop(conn);

    let (mut conn, _) = fake.accept().await;
    let mut resent = Vec::new();
    while resent.len() < sends.len() {
        resent.push(conn.recv().await);
    }
    assert_eq!(resent, written, "resent as written, with the same ackIds");
    for frame in &resent {
        conn.ack(frame).await;
    }
    for send in pending {
        send.await.unwrap().unwrap();
    }
    client.stop().await;
}

#[tokio::test]
async fn forbidden_is_not_retried_and_internal_errors_are_retried_with_the_same_ack_id() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("g").await });
    let frame = conn.recv().await;
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"Forbidden","message":"no role"}}}}"#,
        frame["ackId"]
    ))
    .await;
    let error = join.await.unwrap().unwrap_err();
    assert_eq!(
        error,
        Error::Ack {
            ack_id: frame["ackId"].as_u64().unwrap(),
            name: "Forbidden".into(),
            message: "no role".into()
        }
    );
    conn.silent_for(400).await;

    let send = spawn_send(&client, "x");
    let frame = conn.recv().await;
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"InternalServerError","message":"oops"}}}}"#,
        frame["ackId"]
    ))
    .await;
    let retry = conn.recv().await;
    assert_eq!(retry, frame);
    conn.ack(&frame).await;
    assert_eq!(send.await.unwrap().unwrap().ack_id, frame["ackId"].as_u64());
    client.stop().await;
}

/// Acks `frame` with the error `name`.
async fn refuse(conn: &mut Conn, frame: &serde_json::Value, name: &str) {
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"{name}","message":"m"}}}}"#,
        frame["ackId"]
    ))
    .await;
}

#[tokio::test]
async fn a_duplicate_after_a_refused_resend_is_that_refusal_though_a_drop_came_first() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let send = spawn_send(&client, "x");
    let first = conn.recv().await;
    assert_eq!(first["type"], "sendToGroup");
    // Cut off unanswered: the service may or may not have processed it.
    drop(conn);
    let (mut conn, _) = fake.accept().await;
    let resent = conn.recv().await;
    assert_eq!(resent, first);
    // Refused, not Duplicate: so the cut-off attempt was not processed.
    refuse(&mut conn, &resent, "InternalServerError").await;
    let retry = conn.recv().await;
    assert_eq!(retry, first, "retried with the same ackId");
    // The service remembers the refused attempt: nothing was published.
    refuse(&mut conn, &retry, "Duplicate").await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&outcome, Err(Error::Ack { name, .. }) if name == "InternalServerError"),
        "reported {outcome:?}"
    );
    client.stop().await;
}

#[tokio::test]
async fn invocations_reply_time_out_and_cancel() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let c = client.clone();
    let invoke = tokio::spawn(async move {
        c.invoke_event(
            "echo",
            DataType::Text,
            Bytes::from("ping?"),
            InvokeOptions::default(),
        )
        .await
    });
    let frame = conn.recv().await;
    assert_eq!(frame["type"], "invoke");
    assert_eq!(frame["target"], "event");
    assert_eq!(frame["event"], "echo");
    assert_eq!(frame["data"], "ping?");
    let id = frame["invocationId"].as_str().unwrap().to_owned();
    conn.send(&format!(r#"{{"type":"invokeResponse","invocationId":"{id}","success":true,"dataType":"text","data":"pong!"}}"#))
        .await;
    let reply = invoke.await.unwrap().unwrap();
    assert_eq!(
        (reply.data_type, reply.data),
        (DataType::Text, Bytes::from("pong!"))
    );

    // A reply without data (an upstream that answered with an empty body) is empty text.
    let c = client.clone();
    let invoke = tokio::spawn(async move {
        c.invoke_event(
            "empty",
            DataType::Binary,
            Bytes::new(),
            InvokeOptions::default(),
        )
        .await
    });
    let frame = conn.recv().await;
    let id = frame["invocationId"].as_str().unwrap().to_owned();
    conn.send(&format!(
        r#"{{"type":"invokeResponse","invocationId":"{id}","success":true}}"#
    ))
    .await;
    let reply = invoke.await.unwrap().unwrap();
    assert_eq!(
        (reply.data_type, reply.data),
        (DataType::Text, Bytes::new())
    );

    invocation_timed_out(&client, &mut conn).await;

    let c = client.clone();
    let abandoned = tokio::time::timeout(Duration::from_millis(200), async move {
        c.invoke_event(
            "dropped",
            DataType::Text,
            Bytes::from("x"),
            InvokeOptions::default(),
        )
        .await
    })
    .await;
    assert!(abandoned.is_err());
    let frame = conn.recv().await;
    assert_eq!(frame["event"], "dropped");
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"cancelInvocation","invocationId":frame["invocationId"]})
    );

    let c = client.clone();
    let invoke = tokio::spawn(async move {
        c.invoke_event(
            "refused",
            DataType::Text,
            Bytes::from("x"),
            InvokeOptions::default(),
        )
        .await
    });
    let frame = conn.recv().await;
    let id = frame["invocationId"].as_str().unwrap().to_owned();
    conn.send(&format!(
        r#"{{"type":"invokeResponse","invocationId":"{id}","success":false,"error":{{"name":"BadRequest","message":"no handler"}}}}"#
    ))
    .await;
    assert_eq!(
        invoke.await.unwrap().unwrap_err(),
        Error::Invoke {
            invocation_id: id,
            name: "BadRequest".into(),
            message: "no handler".into()
        }
    );
    client.stop().await;
}

#[tokio::test]
async fn keep_alive_pings_and_closes_a_silent_connection_to_recover_it() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        keep_alive_interval: Some(Duration::from_millis(100)),
        keep_alive_timeout: Some(Duration::from_millis(500)),
        ..fast_options()
    };
    let (client, mut events, mut conn) = connect(&fake, options).await;
    let ping = tokio::time::timeout(Duration::from_secs(5), conn.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ping, Message::text(r#"{"type":"ping"}"#));
    let mut recovered = fake.accept_recovery().await;
    recovered.send(&server_message("back", 1)).await;
    let event = next_event(&mut events, 5).await;
    assert_eq!(common::message_text(&event).as_deref(), Some("back"));
    drop(conn);
    client.stop().await;
}

#[tokio::test]
async fn close_1008_loses_the_session_then_reconnects_with_a_fresh_url_and_rejoins() {
    let fake = Fake::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let base = fake.url.clone();
    let credential = Credential::provider(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let url = base.replace("access_token=tok", &format!("access_token=tok{n}"));
        async move { Ok(url) }
    });
    let (client, mut events) = Client::with_channel(credential, quiet_options()).unwrap();
    let c = client.clone();
    let start = tokio::spawn(async move { c.start().await });
    let (mut conn, uri) = fake.accept().await;
    assert!(uri.ends_with("access_token=tok1"), "{uri}");
    conn.connected("conn1", "rt1").await;
    start.await.unwrap().unwrap();
    next_event(&mut events, 5).await;

    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("room").await });
    let frame = conn.recv().await;
    conn.ack(&frame).await;
    join.await.unwrap().unwrap();

    conn.disconnected("kicked").await;
    conn.close(CloseCode::Policy, "bye").await;
    let event = next_event(&mut events, 5).await;
    assert_eq!(event, conn1_lost("kicked", 1008));
    let (mut conn, uri) = fake.accept().await;
    assert!(
        uri.ends_with("access_token=tok2"),
        "a fresh URL, no recovery: {uri}"
    );
    conn.connected("conn2", "rt2").await;
    let event = next_event(&mut events, 5).await;
    assert_eq!(
        event,
        Event::Connected {
            connection_id: "conn2".into(),
            user_id: Some("u".into())
        }
    );
    let rejoin = conn.recv().await;
    assert_eq!(rejoin["type"], "joinGroup");
    assert_eq!(rejoin["group"], "room");
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"Forbidden","message":"not any more"}}}}"#,
        rejoin["ackId"]
    ))
    .await;
    let (event, _) = wait_for(&mut events, 5, |e| {
        matches!(e, Event::RejoinGroupFailed { .. })
    })
    .await;
    assert!(
        matches!(event, Event::RejoinGroupFailed { group, error: Error::Ack { name, .. } } if group == "room" && name == "Forbidden")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    client.stop().await;
    let (event, _) = wait_for(&mut events, 5, |e| *e == Event::Stopped { error: None }).await;
    assert_eq!(event, Event::Stopped { error: None });
}

#[tokio::test]
async fn a_new_reconnection_token_is_used_by_the_next_recovery() {
    let fake = Fake::new().await;
    let (client, mut events, conn) = connect(&fake, quiet_options()).await;
    drop(conn);
    let (mut conn, uri) = fake.accept().await;
    assert!(uri.ends_with("awps_reconnection_token=rt1"), "{uri}");
    conn.connected("conn1", "rt2").await;
    conn.send(&server_message("m", 1)).await;
    next_event(&mut events, 5).await;
    drop(conn);
    let (_conn, uri) = fake.accept().await;
    assert!(
        uri.ends_with("awps_connection_id=conn1&awps_reconnection_token=rt2"),
        "{uri}"
    );
    assert!(
        events.try_recv().is_err(),
        "no connected event after a recovery"
    );
    client.stop().await;
}

#[tokio::test]
async fn reconnecting_gives_up_per_the_retry_policy_and_stops() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        reconnect_retry: webpubsub_client::RetryOptions {
            max_retries: Some(2),
            delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(50),
            mode: webpubsub_client::RetryMode::Fixed,
        },
        ..quiet_options()
    };
    let (client, mut events, mut conn) = connect(&fake, options).await;
    let c = client.clone();
    let pending = tokio::spawn(async move { c.join_group("g").await });
    let ack_id = conn.recv().await["ackId"].as_u64();
    assert!(ack_id.is_some());
    drop(fake);
    conn.close(CloseCode::Policy, "gone").await;
    assert_eq!(
        pending.await.unwrap(),
        Err(Error::NotConnected { ack_id }),
        "pending ops fail when the session is lost, with their ackIds"
    );
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            close_code: Some(1008),
            ..
        }
    ));
    let stopped = next_event(&mut events, 5).await;
    assert!(
        matches!(
            &stopped,
            Event::Stopped {
                error: Some(Error::Connect(_))
            }
        ),
        "1 attempt + 2 retries, then stopped with the last one's error: {stopped:?}"
    );
    assert_eq!(client.state(), ClientState::Stopped);
}

#[tokio::test]
async fn operations_in_flight_when_stopping_fail_with_stopped() {
    let fake = Fake::new().await;
    let (client, _events, _conn) = connect(&fake, quiet_options()).await;
    let mut sends = Vec::new();
    for i in 0..200 {
        let c = client.clone();
        sends.push(tokio::spawn(async move {
            c.send_to_group(
                "g",
                DataType::Text,
                Bytes::from(format!("m{i}")),
                SendToGroupOptions::default(),
            )
            .await
        }));
    }
    for _ in 0..20 {
        tokio::task::yield_now().await; // lets every send be queued or written (none is acked)
    }
    client.stop().await;
    let mut taken_in = std::collections::HashSet::new();
    for send in sends {
        match send.await.unwrap() {
            Err(Error::Stopped {
                ack_id: Some(ack_id),
            }) => {
                assert!(taken_in.insert(ack_id), "ackId {ack_id} reported twice");
            }
            Err(Error::Stopped { ack_id: None }) => {}
            other => panic!("expected Stopped, got {other:?}"),
        }
    }
    let late = client
        .send_to_group(
            "g",
            DataType::Text,
            Bytes::from("late"),
            SendToGroupOptions::default(),
        )
        .await;
    assert!(matches!(late, Err(Error::IllegalState(_))), "{late:?}");
}

#[tokio::test]
async fn operations_written_before_a_stop_fail_with_their_ack_ids() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let sends = [spawn_send(&client, "a"), spawn_send(&client, "b")];
    let mut written = std::collections::HashMap::new();
    while written.len() < 2 {
        let frame = conn.recv().await;
        if frame["type"] == "sendToGroup" {
            written.insert(
                frame["data"].as_str().unwrap().to_owned(),
                frame["ackId"].as_u64(),
            );
        }
    }
    client.stop().await;
    for (send, body) in sends.into_iter().zip(["a", "b"]) {
        let outcome = send.await.unwrap();
        assert_eq!(
            outcome,
            Err(Error::Stopped {
                ack_id: written[body]
            })
        );
        let message = outcome.unwrap_err().to_string();
        let expected = format!(
            "client stopped before the ack of operation {}",
            written[body].unwrap()
        );
        assert_eq!(message, expected);
    }
}

#[tokio::test]
async fn a_resent_operation_still_times_out_on_a_quiet_recovered_connection() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, one_try_options()).await;
    let send = spawn_send(&client, "x");
    let ack_id = conn.recv().await["ackId"].as_u64();
    assert!(ack_id.is_some());
    drop(conn);
    let (mut conn, _) = fake.accept().await;
    assert_eq!(
        conn.recv().await["ackId"].as_u64(),
        ack_id,
        "resent with its ackId"
    );
    let result = tokio::time::timeout(Duration::from_secs(3), send)
        .await
        .expect("the ack timeout fired")
        .unwrap();
    assert_eq!(result, Err(Error::Timeout { ack_id }));
    client.stop().await;
}

#[tokio::test]
async fn an_unacked_send_times_out_on_a_connection_that_keeps_dropping_and_recovering() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(1),
        ..one_try_options()
    };
    let (client, _events, mut conn) = connect(&fake, options).await;
    let send = spawn_send(&client, "x");
    let ack_id = conn.recv().await["ackId"].as_u64();
    assert!(ack_id.is_some());
    // Each connection stays up longer than a recovery attempt's delay (100 ms), so each
    // drop starts a new recovery, and shorter than the ack timeout; nothing is acked.
    let mut recoveries = 0;
    while !send.is_finished() && recoveries < 15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(conn);
        conn = fake.accept().await.0;
        recoveries += 1;
    }
    assert!(
        send.is_finished(),
        "the send was still waiting for its ack after {recoveries} recoveries"
    );
    assert_eq!(send.await.unwrap(), Err(Error::Timeout { ack_id }));
    drop(conn);
    client.stop().await;
}

#[tokio::test]
async fn an_ack_deadline_passed_during_a_recovery_is_retried_once_recovered() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(1),
        message_retry: webpubsub_client::RetryOptions {
            max_retries: Some(1),
            ..fast_options().message_retry
        },
        ..one_try_options()
    };
    let (client, _events, mut conn) = connect(&fake, options).await;
    let send = spawn_send(&client, "x");
    let first = conn.recv().await;
    drop(conn);
    let tcp = held_recovery(&fake, &client).await;
    // Its deadline passes during the recovery (at 1 s): its retry's runs until 2.1 s
    // (100 ms of delay, then 1 s), and is the resend once recovered.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(!send.is_finished(), "{:?}", send.await);
    drop(tcp);
    let mut conn = fake.accept_recovery().await;
    assert_eq!(conn.recv().await, first, "resent with its ackId");
    conn.silent_for(100).await;
    conn.ack(&first).await;
    let result = send.await.unwrap().unwrap();
    assert_eq!(result.ack_id, first["ackId"].as_u64());
    client.stop().await;
}

#[tokio::test]
async fn automatic_ack_ids_skip_ids_chosen_by_the_caller_while_pending() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("g").await });
    let first = conn.recv().await["ackId"].as_u64().unwrap();
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{first},"success":true}}"#
    ))
    .await;
    assert_eq!(join.await.unwrap().unwrap().ack_id, Some(first));

    // The caller takes the id the counter gives next; it stays pending.
    let chosen = first + 1;
    let send = |ack_id: Option<u64>| {
        let c = client.clone();
        tokio::spawn(async move {
            let opts = SendToGroupOptions {
                ack_id,
                ..SendToGroupOptions::default()
            };
            c.send_to_group("g", DataType::Text, Bytes::from("x"), opts)
                .await
        })
    };
    let user = send(Some(chosen));
    assert_eq!(conn.recv().await["ackId"], chosen);

    // The automatic one skips it.
    let automatic = send(None);
    let frame = conn.recv().await;
    assert_eq!(frame["ackId"], chosen + 1);
    assert_eq!(frame["group"], "g");
    assert_eq!(frame["data"], "x");
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":true}}"#,
        chosen + 1
    ))
    .await;
    assert_eq!(automatic.await.unwrap().unwrap().ack_id, Some(chosen + 1));

    // A caller's id colliding with a pending one is refused, clearly, and not sent.
    let error = send(Some(chosen)).await.unwrap().unwrap_err();
    let Error::InvalidArgument(message) = &error else {
        panic!("{error:?}")
    };
    assert!(
        message.contains(&format!("ackId {chosen}")) && message.contains("pending"),
        "{message}"
    );
    conn.silent_for(200).await;
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{chosen},"success":true}}"#
    ))
    .await;
    assert_eq!(user.await.unwrap().unwrap().ack_id, Some(chosen));
    client.stop().await;
}

#[tokio::test]
async fn a_resend_with_the_drawn_ack_id_of_a_renumbered_send_given_up_waits_for_it() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let send = |ack_id: Option<u64>, body: &'static str| {
        let c = client.clone();
        tokio::spawn(async move {
            let opts = SendToGroupOptions {
                ack_id,
                ..SendToGroupOptions::default()
            };
            c.send_to_group("g", DataType::Text, Bytes::from(body), opts)
                .await
        })
    };
    let first = send(None, "first");
    let frame = conn.recv().await;
    conn.ack(&frame).await;
    let drawn = first.await.unwrap().unwrap().ack_id.unwrap() + 1;
    // The id the counter gives next, chosen and held pending; then so many other chosen
    // ids that the counter no longer skips it.
    let held = send(Some(drawn), "held");
    assert_eq!(conn.recv().await["ackId"], drawn);
    for i in 0..1000 {
        let other = send(Some(1_000_000 + i), "other");
        let frame = conn.recv().await;
        conn.ack(&frame).await;
        other.await.unwrap().unwrap();
    }
    // An automatic send draws that id: the connection task writes it under another.
    let renumbered = send(None, "renumbered");
    let frame = conn.recv().await;
    assert_eq!(frame["data"], "renumbered");
    let used = frame["ackId"].as_u64().unwrap();
    assert_ne!(used, drawn);
    // Its caller gives up, and resends with the ackId it drew (as an interrupted
    // blocking call of the C API reports it): this waits for the same operation.
    renumbered.abort();
    assert!(renumbered.await.unwrap_err().is_cancelled());
    let resend = send(Some(drawn), "renumbered");
    conn.silent_for(200).await;
    assert!(!resend.is_finished(), "{:?}", resend.await);
    conn.ack(&frame).await;
    let result = tokio::time::timeout(Duration::from_secs(5), resend)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        result,
        Ok(webpubsub_client::AckResult {
            ack_id: Some(used),
            is_duplicated: false
        })
    );
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{drawn},"success":true}}"#
    ))
    .await;
    held.await.unwrap().unwrap();
    client.stop().await;
}

/// A started client whose connection task is held inside its event handler (the
/// handler of a server message waits for `release`). With `in_place` the handler waits
/// in `block_in_place`, so that another thread polls the socket meanwhile, as a second
/// runtime worker would.
async fn held_client(
    fake: &Fake,
    options: ClientOptions,
    in_place: bool,
) -> (Client, Conn, std::sync::mpsc::Sender<()>) {
    let (client, mut conn, mut hold) = holding_client(fake, options, in_place).await;
    hold.hold(&mut conn).await;
    (client, conn, hold.release)
}

/// Holds a client's connection task inside its event handler on demand (see
/// [`held_client`]).
struct Hold {
    entered: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl Hold {
    /// Sends a server message and returns once its handler holds the task.
    async fn hold(&mut self, conn: &mut Conn) {
        conn.send(&server_message("hold", 1)).await;
        tokio::time::timeout(Duration::from_secs(10), self.entered.recv())
            .await
            .expect("the handler was not called");
    }
}

/// A started client whose event handler waits for `Hold::release` at every server
/// message (see [`held_client`]).
async fn holding_client(
    fake: &Fake,
    options: ClientOptions,
    in_place: bool,
) -> (Client, Conn, Hold) {
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let handler = move |event: Event| {
        if matches!(event, Event::ServerMessage { .. }) {
            let _ = entered_tx.send(());
            let wait = || {
                let _ = released
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            };
            if in_place {
                tokio::task::block_in_place(wait);
            } else {
                wait();
            }
        }
    };
    let client = Client::new(
        Credential::Url(fake.url.clone()),
        options,
        Arc::new(handler),
    )
    .unwrap();
    let starter = client.clone();
    let start = tokio::spawn(async move { starter.start().await });
    let (mut conn, _) = fake.accept().await;
    conn.connected("conn1", "rt1").await;
    start.await.unwrap().unwrap();
    (client, conn, Hold { entered, release })
}

#[tokio::test]
async fn an_idle_clients_caller_writes_its_own_frame_while_the_connection_task_is_busy() {
    let fake = Fake::new().await;
    let (client, mut conn, release) = held_client(&fake, quiet_options(), false).await;

    let send = spawn_send(&client, "direct");
    // The task is still inside the handler: only the caller can have written this.
    let frame = conn.recv().await;
    assert_eq!(frame["type"], "sendToGroup");
    assert_eq!(frame["data"], "direct");
    conn.ack(&frame).await;
    release.send(()).unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .expect("the ack did not complete the send")
        .unwrap()
        .unwrap();
    assert_eq!(sent.ack_id, frame["ackId"].as_u64());
    client.stop().await;
}

#[tokio::test]
async fn a_frame_its_caller_wrote_still_times_out_when_nothing_comes_back() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, one_try_options()).await;
    let started = std::time::Instant::now();
    let send = spawn_send(&client, "lost");
    let frame = conn.recv().await;
    assert_eq!(frame["data"], "lost");
    // Nothing is read after the write (no ack, no pings): the timeout must still run.
    let outcome = tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .expect("the send never timed out")
        .unwrap();
    assert_eq!(
        outcome.unwrap_err(),
        Error::Timeout {
            ack_id: frame["ackId"].as_u64()
        }
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    client.stop().await;
}

/// Queues fire-and-forget messages far bigger in total than the socket buffers of a
/// peer that reads nothing, so the client's writes block. A keep-alive timeout may end
/// the connection meanwhile (encoding these takes a while on a loaded machine): the
/// recovery then queues messages up to its limit and refuses the rest.
async fn fill_a_peer_that_reads_nothing(client: &Client) {
    let body = Bytes::from("x".repeat(900_000));
    for _ in 0..64 {
        let opts = SendToGroupOptions {
            fire_and_forget: true,
            ..SendToGroupOptions::default()
        };
        let sent = client
            .send_to_group("g", DataType::Text, body.clone(), opts)
            .await;
        match sent {
            Err(Error::NotConnected { .. }) if client.state() == ClientState::Recovering => break,
            sent => {
                sent.unwrap();
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn stop_returns_while_the_peer_reads_nothing() {
    let fake = Fake::new().await;
    let (client, mut events, conn) = connect(&fake, quiet_options()).await;
    fill_a_peer_that_reads_nothing(&client).await;
    tokio::time::timeout(Duration::from_secs(5), client.stop())
        .await
        .expect("stop() hung on a connection whose writes block");
    let (event, _) = wait_for(&mut events, 5, |e| *e == Event::Stopped { error: None }).await;
    assert_eq!(event, Event::Stopped { error: None });
    assert_eq!(client.state(), ClientState::Stopped);
    drop(conn);
}

#[tokio::test]
async fn keep_alive_recovers_a_connection_whose_peer_reads_nothing() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        keep_alive_timeout: Some(Duration::from_millis(800)),
        ..quiet_options()
    };
    let (client, mut events, conn) = connect(&fake, options).await;
    fill_a_peer_that_reads_nothing(&client).await;
    // Nothing was received for longer than the keep-alive timeout: the client drops
    // the connection and recovers it, though its writes never finish.
    let recovered = fake.accept_recovery().await;
    drop(conn);
    // This one reads: the messages still queued go out on it.
    let (mut sink, mut stream) = recovered.ws.split();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    sink.send(Message::text(server_message("back", 1)))
        .await
        .unwrap();
    let (event, _) = wait_for(&mut events, 10, |e| common::message_text(e).is_some()).await;
    assert_eq!(common::message_text(&event).as_deref(), Some("back"));
    tokio::time::timeout(Duration::from_secs(5), client.stop())
        .await
        .expect("stop() hung");
    reader.abort();
}

/// Joins (`join`) or leaves `group` through `client`, the fake acknowledging it.
async fn group_op(client: &Client, conn: &mut Conn, join: bool, group: &str) {
    let (c, g) = (client.clone(), group.to_owned());
    let op = tokio::spawn(async move {
        if join {
            c.join_group(&g).await
        } else {
            c.leave_group(&g).await
        }
    });
    let frame = conn.recv().await;
    let kind = if join { "joinGroup" } else { "leaveGroup" };
    assert_eq!(
        (&frame["type"], &frame["group"]),
        (&kind.into(), &group.into())
    );
    conn.ack(&frame).await;
    op.await.unwrap().unwrap();
}

/// Stops `client` and starts it again on a new connection `id`, which it returns.
async fn restart(fake: &Fake, client: &Client, conn: Conn, id: &str) -> Conn {
    client.stop().await;
    drop(conn);
    let c = client.clone();
    let start = tokio::spawn(async move { c.start().await });
    let (mut conn, _) = fake.accept().await;
    conn.connected(id, &format!("rt-{id}")).await;
    start.await.unwrap().unwrap();
    conn
}

#[tokio::test]
async fn groups_joined_before_a_stop_are_rejoined_by_the_next_start() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    group_op(&client, &mut conn, true, "room").await;

    // As with the official clients, a restart rejoins what was joined.
    let mut conn = restart(&fake, &client, conn, "conn2").await;
    let (event, _) = wait_for(&mut events, 5, |e| *e == Event::Stopped { error: None }).await;
    assert_eq!(event, Event::Stopped { error: None });
    let rejoin = conn.recv().await;
    assert_eq!(rejoin["type"], "joinGroup");
    assert_eq!(rejoin["group"], "room");
    conn.ack(&rejoin).await;

    // Left: not rejoined by the start after.
    group_op(&client, &mut conn, false, "room").await;
    let mut conn = restart(&fake, &client, conn, "conn3").await;
    conn.silent_for(300).await;
    client.stop().await;
}

#[tokio::test]
async fn a_leave_acked_after_its_future_was_dropped_still_ends_the_rejoins() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    group_op(&client, &mut conn, true, "room").await;
    let mut leave = Box::pin(client.leave_group("room"));
    let frame = tokio::select! {
        left = &mut leave => panic!("done before its ack: {left:?}"),
        frame = conn.recv() => frame,
    };
    assert_eq!(
        (&frame["type"], &frame["group"]),
        (&"leaveGroup".into(), &"room".into())
    );
    drop(leave);
    conn.ack(&frame).await;
    // Acked after the leave's: the client has read that one too.
    group_op(&client, &mut conn, true, "other").await;

    let mut conn = restart(&fake, &client, conn, "conn2").await;
    let rejoin = conn.recv().await;
    assert_eq!(
        (&rejoin["type"], &rejoin["group"]),
        (&"joinGroup".into(), &"other".into())
    );
    conn.ack(&rejoin).await;
    conn.silent_for(300).await;
    client.stop().await;
}

/// A client that joined `room`, restarted, and whose rejoin of it the fake refused
/// with `InternalServerError` (retried 100 ms later); with that rejoin frame.
async fn rejoin_refused_once(fake: &Fake) -> (Client, Conn, serde_json::Value) {
    let (client, _events, mut conn) = connect(fake, quiet_options()).await;
    group_op(&client, &mut conn, true, "room").await;
    let mut conn = restart(fake, &client, conn, "conn2").await;
    let rejoin = conn.recv().await;
    assert_eq!(rejoin["type"], "joinGroup");
    conn.send(&format!(
        r#"{{"type":"ack","ackId":{},"success":false,"error":{{"name":"InternalServerError","message":"oops"}}}}"#,
        rejoin["ackId"]
    ))
    .await;
    (client, conn, rejoin)
}

#[tokio::test]
async fn a_leave_stops_the_retries_of_its_groups_rejoin() {
    let fake = Fake::new().await;
    let (client, mut conn, _) = rejoin_refused_once(&fake).await;
    group_op(&client, &mut conn, false, "room").await;
    // A rejoin retried now (100 ms after the error) would put the client back in
    // the group it has just left.
    conn.silent_for(500).await;
    client.stop().await;
}

#[tokio::test]
async fn a_leave_given_up_during_a_recovery_keeps_its_groups_rejoin() {
    let fake = Fake::new().await;
    let (client, conn, rejoin) = rejoin_refused_once(&fake).await;
    drop(conn);
    for _ in 0..200 {
        if client.state() == ClientState::Recovering {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(client.state(), ClientState::Recovering);
    // Queued, then given up: never written, so it leaves nothing and abandons nothing.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), client.leave_group("room")).await;
    assert!(gave_up.is_err(), "left while recovering: {gave_up:?}");

    let (mut conn, _) = fake.accept().await;
    let resent = conn.recv().await;
    assert_eq!(
        resent, rejoin,
        "the rejoin (refused, so the client is not in the group) was dropped"
    );
    conn.ack(&resent).await;
    conn.silent_for(300).await;
    client.stop().await;
}

#[tokio::test]
async fn an_operation_given_up_during_a_recovery_is_not_sent_after_it() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let send = spawn_send(&client, "in flight");
    let first = conn.recv().await;
    assert_eq!(first["data"], "in flight");
    drop(conn);

    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.send_to_group(
            "g",
            DataType::Text,
            Bytes::from("given up"),
            SendToGroupOptions::default(),
        ),
    )
    .await;
    assert!(gave_up.is_err(), "sent while recovering: {gave_up:?}");
    let kept = spawn_send(&client, "kept");

    let (mut conn, _) = fake.accept().await;
    let resent = conn.recv().await;
    assert_eq!(resent, first);
    conn.ack(&resent).await;
    let next = conn.recv().await;
    assert_eq!(next["data"], "kept", "the given-up message was written");
    conn.ack(&next).await;
    send.await.unwrap().unwrap();
    kept.await.unwrap().unwrap();
    client.stop().await;
}

#[tokio::test]
async fn an_invocation_given_up_during_a_recovery_is_not_sent_after_it() {
    let fake = Fake::new().await;
    let (client, _events, conn) = connect(&fake, quiet_options()).await;
    drop(conn);
    let held = held_recovery(&fake, &client).await;
    // Handed over together, then given up together: a cancel may reach the connection
    // task before its invocation.
    let names: Vec<String> = (0..256).map(|n| format!("given-up-{n}")).collect();
    let invocations = names.iter().map(|name| {
        client.invoke_event(
            name,
            DataType::Text,
            Bytes::from("x"),
            InvokeOptions::default(),
        )
    });
    let gave_up =
        tokio::time::timeout(Duration::ZERO, futures_util::future::join_all(invocations)).await;
    assert!(gave_up.is_err(), "answered while recovering: {gave_up:?}");
    let kept = spawn_send(&client, "kept");
    drop(held);

    let (mut conn, _) = fake.accept().await;
    let next = conn.recv().await;
    assert_eq!(next["data"], "kept", "a given-up invocation was written");
    conn.ack(&next).await;
    kept.await.unwrap().unwrap();
    conn.silent_for(200).await;
    client.stop().await;
}

#[tokio::test]
async fn a_resend_with_the_ack_id_of_a_send_given_up_waits_for_it() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let send = |c: Client| async move {
        let options = SendToGroupOptions {
            ack_id: Some(7),
            ..SendToGroupOptions::default()
        };
        c.send_to_group("g", DataType::Text, Bytes::from("once"), options)
            .await
    };
    let gave_up = tokio::time::timeout(Duration::from_millis(200), send(client.clone())).await;
    assert!(gave_up.is_err(), "acked without an ack: {gave_up:?}");
    let frame = conn.recv().await;
    assert_eq!(frame["ackId"], 7);
    // Refused as 'ackId in use' before, while the first attempt was pending.
    let resend = tokio::spawn(send(client.clone()));
    conn.silent_for(200).await; // not written twice
    conn.ack(&frame).await;
    let result = resend.await.unwrap().unwrap();
    assert_eq!((result.ack_id, result.is_duplicated), (Some(7), false));
    client.stop().await;
}

/// Sends "once" to group g, with `ack_id` or an automatic one.
async fn send_once(c: Client, ack_id: Option<u64>) -> Result<AckResult, Error> {
    let options = SendToGroupOptions {
        ack_id,
        ..SendToGroupOptions::default()
    };
    c.send_to_group("g", DataType::Text, Bytes::from("once"), options)
        .await
}

/// A send whose caller gives up after 200 ms without its ack: the frame written.
async fn given_up_send(client: &Client, conn: &mut Conn) -> serde_json::Value {
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), send_once(client.clone(), None)).await;
    assert!(gave_up.is_err(), "acked without an ack: {gave_up:?}");
    conn.recv().await
}

#[tokio::test]
async fn a_resend_of_a_send_its_caller_wrote_itself_then_gave_up_waits_for_it() {
    // An idle client's caller writes its frame itself (src/client/direct.rs); the task
    // registers it only when it next reads. Given up before that (the Python binding's
    // interrupted send), the resend with its ackId was written a second time, and the
    // service's immediate `Duplicate` for it answered the resend before the first
    // attempt's own outcome: `is_duplicated` true, whatever the first one's fate.
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let frame = given_up_send(&client, &mut conn).await;
    let ack_id = frame["ackId"].as_u64().unwrap();
    let resend = tokio::spawn(send_once(client.clone(), Some(ack_id)));
    conn.silent_for(200).await; // not written twice
    conn.ack(&frame).await;
    let result = resend.await.unwrap().unwrap();
    assert_eq!((result.ack_id, result.is_duplicated), (Some(ack_id), false));
    client.stop().await;
}

#[tokio::test]
async fn a_resend_of_a_callers_write_registered_by_a_busy_task_waits_for_it() {
    // The task registers a caller's write when it next reads. Until the end of that
    // step it still counted nothing pending, so a resend given the same ackId meanwhile
    // (the task held by the event handler) found the client idle: it was written a
    // second time, then refused as 'ackId in use' though the message went out.
    let fake = Fake::new().await;
    let (client, mut conn, mut hold) = holding_client(&fake, quiet_options(), false).await;
    let frame = given_up_send(&client, &mut conn).await;
    let ack_id = frame["ackId"].as_u64().unwrap();
    // The task reads (registering the write), then waits in the handler.
    hold.hold(&mut conn).await;
    let resend = tokio::spawn(send_once(client.clone(), Some(ack_id)));
    conn.silent_for(200).await; // not written twice
    hold.release.send(()).unwrap();
    conn.ack(&frame).await;
    let result = resend.await.unwrap().unwrap();
    assert_eq!((result.ack_id, result.is_duplicated), (Some(ack_id), false));
    client.stop().await;
}

#[tokio::test]
async fn the_ack_of_a_callers_write_read_in_the_same_batch_as_earlier_frames_completes_it() {
    let fake = Fake::new().await;
    // The task is held in the middle of a batch of frames read from the socket, while
    // another thread polls the socket and sees the ack arrive.
    let (client, mut conn, release) = held_client(&fake, one_try_options(), true).await;
    let send = spawn_send(&client, "direct");
    let frame = conn.recv().await;
    assert_eq!(frame["data"], "direct");
    conn.ack(&frame).await;
    // The ack reaches the client's socket while its task is still in the handler: the
    // task reads it within the same batch, before it would register the write anew.
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.send(()).unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .expect("the send never completed")
        .unwrap();
    assert_eq!(sent.unwrap().ack_id, frame["ackId"].as_u64());
    client.stop().await;
}

#[tokio::test]
async fn the_sequence_is_acknowledged_again_after_a_recovery() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    for id in 1..=3 {
        conn.send(&server_message("m", id)).await;
        next_event(&mut events, 5).await;
    }
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"sequenceAck","sequenceId":3})
    );
    // That ack was written, but the socket drops before the service takes it in: the
    // service replays what it still holds to the recovered connection.
    drop(conn);
    let mut conn = fake.accept_recovery().await;
    conn.connected("conn1", "rt2").await;
    for id in 1..=3 {
        conn.send(&server_message("m", id)).await;
    }
    assert_eq!(
        conn.recv().await,
        serde_json::json!({"type":"sequenceAck","sequenceId":3}),
        "the replayed frames stay in the service's buffer until acknowledged"
    );
    assert!(
        events.try_recv().is_err(),
        "replayed frames are not delivered"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_sequence_ack_due_as_the_session_is_lost_never_reaches_the_next_connection() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        sequence_ack_interval: Duration::from_secs(3600),
        ..quiet_options()
    };
    let (client, mut events, mut conn) = connect(&fake, options).await;
    // Read in one batch: the jump makes a sequenceAck due, then the session ends.
    conn.ws
        .feed(Message::text(server_message("jump", 301)))
        .await
        .unwrap();
    let close = CloseFrame {
        code: CloseCode::Policy,
        reason: "bye".into(),
    };
    conn.ws.feed(Message::Close(Some(close))).await.unwrap();
    conn.ws.flush().await.unwrap();
    let (_, skipped) = wait_for(&mut events, 5, |e| matches!(e, Event::Disconnected { .. })).await;
    let delivered: Vec<_> = skipped.iter().filter_map(common::message_text).collect();
    assert_eq!(delivered, ["jump"]);
    let (mut conn, uri) = fake.accept().await;
    assert!(
        !uri.contains("awps_connection_id"),
        "a new connection: {uri}"
    );
    conn.connected("conn2", "rt2").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("g").await });
    let frame = conn.recv().await;
    assert_eq!(
        frame["type"], "joinGroup",
        "the first frame on conn2 (its sequence starts afresh): {frame}"
    );
    conn.ack(&frame).await;
    join.await.unwrap().unwrap();
    client.stop().await;
}

/// The recovery attempt of `client`, whose connection just dropped, accepted by TCP and
/// not answered: the client recovers until the stream is dropped.
async fn held_recovery(fake: &Fake, client: &Client) -> tokio::net::TcpStream {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), fake.listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.state(), ClientState::Recovering);
    tcp
}

#[tokio::test]
async fn a_recovery_queues_so_many_operations_and_refuses_more_at_once() {
    let fake = Fake::new().await;
    // The recovery outlasts the sends however slow they are (TSan, a loaded machine):
    // the test ends it by dropping the held attempt.
    let options = ClientOptions {
        recovery_window: Duration::from_secs(60),
        ..quiet_options()
    };
    let (client, _events, conn) = connect(&fake, options).await;
    drop(conn);
    let tcp = held_recovery(&fake, &client).await;
    const SENDS: usize = 20_000;
    let c = client.clone();
    let sender = tokio::spawn(async move {
        let mut outcomes = Vec::with_capacity(SENDS);
        for n in 0..SENDS {
            let opts = SendToGroupOptions {
                fire_and_forget: true,
                ..SendToGroupOptions::default()
            };
            let body = Bytes::from(n.to_string());
            outcomes.push(c.send_to_group("g", DataType::Text, body, opts).await);
        }
        outcomes
    });
    // No sender waits for the recovery: the loop ends while it still goes on.
    let outcomes = tokio::time::timeout(Duration::from_secs(20), sender)
        .await
        .expect("a send waited for the recovery")
        .unwrap();
    assert_eq!(client.state(), ClientState::Recovering);
    let queued = outcomes.iter().take_while(|r| r.is_ok()).count();
    assert!(
        (16 * 1024..SENDS).contains(&queued),
        "{queued} sends queued for the recovered connection"
    );
    assert!(
        outcomes[queued..]
            .iter()
            .all(|r| *r == Err(Error::NotConnected { ack_id: None })),
        "past the limit, every send is refused"
    );
    // Once recovered, every queued message goes out, in order, and nothing else.
    drop(tcp);
    let mut conn = fake.accept_recovery().await;
    for n in 0..queued {
        let frame = conn.recv().await;
        assert_eq!(frame["data"], n.to_string());
    }
    let c = client.clone();
    let probe = tokio::spawn(async move {
        let opts = SendToGroupOptions {
            fire_and_forget: true,
            ..SendToGroupOptions::default()
        };
        c.send_to_group("g", DataType::Text, Bytes::from("after"), opts)
            .await
    });
    assert_eq!(conn.recv().await["data"], "after");
    probe.await.unwrap().unwrap();
    client.stop().await;
}

/// A client (30 s ack timeout and recovery window) with as many acked sends `body` in
/// flight as it keeps (the service's ackId memory less one), all written, none acked.
async fn with_as_many_acks_pending_as_kept(
    fake: &Fake,
    body: &'static str,
) -> (
    Client,
    Conn,
    Vec<tokio::task::JoinHandle<Result<AckResult, Error>>>,
) {
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(30),
        recovery_window: Duration::from_secs(30),
        ..quiet_options()
    };
    let (client, _events, mut conn) = connect(fake, options).await;
    let sends: Vec<_> = (0..999).map(|_| spawn_send(&client, body)).collect();
    for _ in 0..999 {
        conn.recv().await;
    }
    (client, conn, sends)
}

#[tokio::test]
async fn a_recovery_with_as_many_acks_pending_as_it_keeps_makes_no_sender_wait() {
    let fake = Fake::new().await;
    let (client, conn, unacked) = with_as_many_acks_pending_as_kept(&fake, "unacked").await;
    drop(conn);
    let tcp = held_recovery(&fake, &client).await;
    // No ack can come to make room: more than the operation queue holds fails at once.
    let c = client.clone();
    let sender = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for n in 0..2000 {
            let opts = SendToGroupOptions {
                fire_and_forget: n % 2 == 0,
                ..SendToGroupOptions::default()
            };
            let body = Bytes::from(n.to_string());
            outcomes.push(c.send_to_group("g", DataType::Text, body, opts).await);
        }
        outcomes
    });
    let outcomes = tokio::time::timeout(Duration::from_secs(20), sender)
        .await
        .expect("a send waited for the recovery")
        .unwrap();
    assert!(outcomes
        .iter()
        .all(|r| matches!(r, Err(Error::NotConnected { .. }))));
    drop(tcp);
    client.stop().await;
    for send in unacked {
        assert!(matches!(send.await.unwrap(), Err(Error::Stopped { .. })));
    }
}

/// A fire-and-forget text message `body` to group g; its outcome.
async fn fire_and_forget(client: &Client, body: &'static str) -> Result<AckResult, Error> {
    let opts = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };
    client
        .send_to_group("g", DataType::Text, Bytes::from(body), opts)
        .await
}

#[tokio::test]
async fn sends_given_up_hold_no_place_in_a_recovery() {
    let fake = Fake::new().await;
    let (client, conn, given_up) = with_as_many_acks_pending_as_kept(&fake, "given up").await;
    // All given up (their tasks aborted) before the connection drops.
    for send in &given_up {
        send.abort();
    }
    for send in given_up {
        assert!(send.await.unwrap_err().is_cancelled());
    }
    drop(conn);
    let tcp = held_recovery(&fake, &client).await;
    // None of them is resent: they leave room for what is sent during the recovery.
    let during = fire_and_forget(&client, "during").await;
    assert_eq!(
        during.map(|r| r.ack_id),
        Ok(None),
        "refused while recovering"
    );

    // More given up while the recovery queues them, past what it keeps. (Unconstrained:
    // each first poll hands its send over.)
    tokio::task::unconstrained(async {
        for _ in 0..1500 {
            let _ = send_once(client.clone(), None).now_or_never();
        }
    })
    .await;
    // The connection task catches up with them; then the recovery takes sends again.
    let started = tokio::time::Instant::now();
    while fire_and_forget(&client, "after").await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "sends given up fill the recovery"
        );
        tokio::task::yield_now().await;
    }
    let kept = spawn_send(&client, "kept");

    drop(tcp);
    let (mut conn, _) = fake.accept().await;
    for body in ["during", "after", "kept"] {
        let frame = conn.recv().await;
        assert_eq!(frame["data"], body, "a given-up send was written");
        if body == "kept" {
            conn.ack(&frame).await;
        }
    }
    kept.await.unwrap().unwrap();
    conn.silent_for(200).await;
    client.stop().await;
}

/// Closes a fake's connection with 1008: the session is lost, not recovered.
async fn lose(mut conn: Conn) {
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: "lost".into(),
    };
    conn.ws.close(Some(frame)).await.unwrap();
}

#[tokio::test]
async fn a_rejoin_cut_off_by_a_lost_session_is_reported_once_the_client_is_disconnected() {
    let fake = Fake::new().await;
    let credential = Credential::Url(fake.url.clone());
    let (client, handler) = common::StateAtEvent::client(credential, quiet_options());
    let c = client.clone();
    let start = tokio::spawn(async move { c.start().await });
    let (mut conn, _) = fake.accept().await;
    conn.connected("conn1", "rt1").await;
    start.await.unwrap().unwrap();
    group_op(&client, &mut conn, true, "room").await;
    lose(conn).await;
    let (mut conn, _) = fake.accept().await;
    conn.connected("conn2", "rt2").await;
    let rejoin = conn.recv().await;
    assert_eq!(rejoin["type"], "joinGroup");
    // Lost before the rejoin's ack: the rejoin fails with the session.
    lose(conn).await;
    handler.until(5).await;
    client.stop().await;
    use ClientState::{Connected, Disconnected};
    assert_eq!(
        handler.seen()[..5],
        [
            ("connected", Connected, Some("conn1".into())),
            ("disconnected", Disconnected, None),
            ("connected", Connected, Some("conn2".into())),
            ("rejoinGroupFailed", Disconnected, None),
            ("disconnected", Disconnected, None),
        ]
    );
}

#[tokio::test]
async fn each_recovery_and_reconnect_attempt_ends_after_the_start_timeout() {
    let fake = Fake::new().await;
    // Long enough for the fake to answer the upgrades of attempts 2 and 3 on a loaded
    // machine.
    let start_timeout = Duration::from_secs(1);
    let options = ClientOptions {
        start_timeout,
        recovery_window: Duration::from_secs(60),
        reconnect_retry: webpubsub_client::RetryOptions {
            max_retries: Some(2),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            mode: webpubsub_client::RetryMode::Fixed,
        },
        ..quiet_options()
    };
    let (client, mut events, conn) = connect(&fake, options).await;
    let peer = fake.listener.local_addr().unwrap().to_string();
    // A recovery attempt whose upgrade is never answered ends; the next one follows.
    // Each time is taken before the attempts start (the client's clock starts later).
    let since = tokio::time::Instant::now();
    drop(conn);
    let held = held_recovery(&fake, &client).await;
    let conn = fake.accept_recovery().await;
    assert!(since.elapsed() >= start_timeout, "{:?}", since.elapsed());
    drop(held);
    let since = tokio::time::Instant::now();
    lose(conn).await;
    // Refused: the loss is the drop's, which came without a close frame.
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            close_code: None,
            ..
        }
    ));
    // Reconnect attempt 1: the upgrade is never answered.
    let (held, _) = tokio::time::timeout(Duration::from_secs(10), fake.listener.accept())
        .await
        .expect("no reconnect attempt within 10 s")
        .unwrap();
    // Attempts 2 and 3 (the last retry): upgraded, no connected frame.
    let (second, uri) = fake.accept().await;
    assert!(!uri.contains("awps_connection_id"), "{uri}");
    assert!(since.elapsed() >= start_timeout, "{:?}", since.elapsed());
    let (third, _) = fake.accept().await;
    assert!(
        since.elapsed() >= 2 * start_timeout,
        "{:?}",
        since.elapsed()
    );
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Stopped {
            error: Some(Error::StartTimeout {
                after: start_timeout,
                waiting_for: format!("the connected frame from {peer}"),
            })
        }
    );
    assert_eq!(client.state(), ClientState::Stopped);
    drop((held, second, third));
}

#[tokio::test]
async fn a_stop_during_a_recovery_drops_the_fire_and_forget_messages_it_queued() {
    let fake = Fake::new().await;
    let options = ClientOptions {
        recovery_window: Duration::from_secs(60),
        start_timeout: Duration::from_secs(60),
        ..quiet_options()
    };
    let (client, _events, conn) = connect(&fake, options).await;
    drop(conn);
    let held = held_recovery(&fake, &client).await;
    assert_eq!(
        fire_and_forget(&client, "dropped").await.map(|r| r.ack_id),
        Ok(None)
    );
    tokio::time::timeout(Duration::from_secs(5), client.stop())
        .await
        .expect("the stop ends the recovery at once");
    drop(held);
    let c = client.clone();
    let start = tokio::spawn(async move { c.start().await });
    let (mut conn, uri) = fake.accept().await;
    assert!(!uri.contains("awps_connection_id"), "{uri}");
    conn.connected("conn2", "rt2").await;
    start.await.unwrap().unwrap();
    fire_and_forget(&client, "after").await.unwrap();
    assert_eq!(
        conn.recv().await["data"],
        "after",
        "a dropped message was written"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_stop_waits_for_an_unanswered_close_frame_a_bounded_time() {
    let fake = Fake::new().await;
    let (client, mut events, conn) = connect(&fake, quiet_options()).await;
    // The read half only: it reads on, and never answers the close frame.
    let (_write, mut read) = conn.ws.split();
    let reader = tokio::spawn(async move {
        loop {
            match read.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), client.stop())
        .await
        .expect("the stop waited for the close frame's answer for good");
    let frame = reader.await.unwrap().unwrap();
    assert_eq!(frame.code, CloseCode::Normal);
    let (event, _) = wait_for(&mut events, 5, |e| *e == Event::Stopped { error: None }).await;
    assert_eq!(event, Event::Stopped { error: None });
}

#[tokio::test]
async fn dropping_the_last_handle_writes_the_queued_fire_and_forget_messages_and_goes_away() {
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    const BODIES: [&str; 3] = ["one", "two", "three"];
    for _ in 0..100 {
        for body in BODIES {
            fire_and_forget(&client, body).await.unwrap();
        }
    }
    drop(client);
    for i in 0..300 {
        let frame = conn.recv().await;
        assert_eq!(frame["data"], BODIES[i % 3], "message {i}: {frame}");
    }
    let close = match conn.ws.next().await {
        Some(Ok(Message::Close(frame))) => frame,
        other => panic!("no close frame after the messages: {other:?}"),
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    // No event, not Stopped either: the channel just ends.
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(end, Ok(None));
}

#[tokio::test]
async fn a_fire_and_forget_message_written_before_a_drop_is_not_resent_by_the_recovery() {
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    fire_and_forget(&client, "once").await.unwrap();
    assert_eq!(conn.recv().await["data"], "once");
    drop(conn);
    let (mut conn, uri) = fake.accept().await;
    assert!(uri.contains("awps_connection_id"), "not a recovery: {uri}");
    let after = spawn_send(&client, "after");
    let frame = conn.recv().await;
    assert_eq!(
        frame["data"], "after",
        "the fire-and-forget message was resent"
    );
    conn.ack(&frame).await;
    after.await.unwrap().unwrap();
    client.stop().await;
}

#[tokio::test]
async fn a_refused_recovery_reports_the_drop_it_was_to_recover() {
    // The service closes the connection with 4000 and no `disconnected` frame, then
    // refuses its recovery with 1008: the user learns why the connection dropped.
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    conn.close(CloseCode::from(4000), "the service is restarting")
        .await;
    let mut conn = fake.accept_recovery().await;
    conn.close(CloseCode::Policy, "The connection could not be recovered.")
        .await;
    assert_eq!(
        next_event(&mut events, 5).await,
        conn1_lost("the service is restarting", 4000)
    );
    let (mut conn, uri) = fake.accept().await;
    assert!(
        !uri.contains("awps_connection_id"),
        "a new connection: {uri}"
    );
    conn.connected("conn2", "rt2").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { connection_id, .. } if connection_id == "conn2"
    ));
    client.stop().await;
}

#[tokio::test]
async fn a_recovery_confirmed_by_traffic_alone_reports_a_later_drop_as_its_own() {
    // The service may recover a session without a `connected` frame: a message on the
    // recovered socket confirms it, so a later close is reported for what it is, and
    // the first drop's explanation is forgotten.
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    conn.disconnected("maintenance").await;
    conn.close(CloseCode::from(4000), "the service is restarting")
        .await;
    let mut conn = fake.accept_recovery().await;
    conn.send(&server_message("after the recovery", 1)).await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::ServerMessage { data, .. } if data == "after the recovery"
    ));
    conn.close(CloseCode::Policy, "kicked").await;
    assert_eq!(next_event(&mut events, 5).await, conn1_lost("kicked", 1008));
    client.stop().await;
}

#[tokio::test]
async fn a_refused_recovery_keeps_the_dropped_connections_disconnected_message() {
    // The service explained the drop; its refusal of the recovery explains it too: the
    // drop's own explanation is the one reported, with its close code.
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    conn.disconnected("maintenance").await;
    conn.close(CloseCode::Away, "bye").await;
    let (mut conn, _) = fake.accept().await;
    conn.disconnected("session expired").await;
    conn.close(CloseCode::Policy, "").await;
    assert_eq!(
        next_event(&mut events, 5).await,
        conn1_lost("maintenance", 1001)
    );
    client.stop().await;
}

#[tokio::test]
async fn operations_written_on_a_refused_recovery_fail_or_are_lost_at_most_once() {
    // Operations made during a recovery are written as soon as its socket opens,
    // before the service's `connected` frame, as the official clients do. A refusal
    // (1008) fails the acked one with its ackId at once; neither is written again on
    // the next connection.
    let fake = Fake::new().await;
    let (client, mut events, conn) = connect(&fake, quiet_options()).await;
    drop(conn);
    let recovering = || client.state() == ClientState::Recovering;
    common::until("the recovery", Duration::from_secs(5), recovering).await;
    let acked = spawn_send(&client, "acked");
    assert_eq!(
        fire_and_forget(&client, "fire").await,
        Ok(AckResult {
            ack_id: None,
            is_duplicated: false
        })
    );
    let mut conn = fake.accept_recovery().await;
    let mut written = [conn.recv().await, conn.recv().await];
    written.sort_by_key(|frame| frame["data"].to_string());
    assert_eq!(written[0]["data"], "acked");
    assert_eq!(written[1]["data"], "fire");
    assert_eq!(client.state(), ClientState::Connected, "before `connected`");
    conn.close(CloseCode::Policy, "The connection could not be recovered.")
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), acked)
        .await
        .expect("the acked send ends with the refusal")
        .unwrap();
    assert_eq!(
        outcome,
        Err(Error::NotConnected {
            ack_id: written[0]["ackId"].as_u64()
        })
    );
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected { .. }
    ));
    let (mut conn, uri) = fake.accept().await;
    assert!(
        !uri.contains("awps_connection_id"),
        "a new connection: {uri}"
    );
    conn.connected("conn2", "rt2").await;
    next_event(&mut events, 5).await;
    conn.silent_for(300).await;
    client.stop().await;
}

#[tokio::test]
async fn a_late_reply_to_a_timed_out_invocation_is_dropped() {
    // The timeout writes `cancelInvocation`; a reply that comes anyway completes nothing
    // and raises no event. A retry is a new invocation, with a new id.
    let fake = Fake::new().await;
    let (client, mut events, mut conn) = connect(&fake, quiet_options()).await;
    let first = invocation_timed_out(&client, &mut conn).await;
    let c = client.clone();
    let retry = tokio::spawn(async move {
        c.invoke_event("slow", DataType::Text, Bytes::from("x"), Default::default())
            .await
    });
    let frame = conn.recv().await;
    let second = frame["invocationId"].as_str().unwrap().to_owned();
    assert_ne!(second, first, "a retry is a new invocation");
    for (id, data) in [(&first, "late"), (&second, "fresh")] {
        conn.send(&format!(
            r#"{{"type":"invokeResponse","invocationId":"{id}","success":true,"dataType":"text","data":"{data}"}}"#
        ))
        .await;
    }
    assert_eq!(retry.await.unwrap().unwrap().data, Bytes::from("fresh"));
    assert!(events.try_recv().is_err(), "no event for the late reply");
    client.stop().await;
}

#[tokio::test]
async fn a_recovery_whose_sockets_are_never_confirmed_ends_with_its_window() {
    // Each recovery attempt is accepted, then held without a `connected` frame (or any
    // frame of the session) for longer than the delay between attempts, and closed
    // (not 1008): each was one more attempt of the same recovery, not a recovered
    // connection whose drop starts a new window. The session is lost to the first drop.
    let fake = Fake::new().await;
    let options = ClientOptions {
        recovery_window: Duration::from_secs(1),
        ..quiet_options()
    };
    let (client, mut events, mut conn) = connect(&fake, options).await;
    conn.close(CloseCode::from(4000), "the service is restarting")
        .await;
    let mut recoveries = 0;
    let mut conn = loop {
        let (mut conn, uri) = fake.accept().await;
        if !uri.contains("awps_connection_id") {
            break conn;
        }
        recoveries += 1;
        assert!(
            recoveries < 20,
            "recovering for good: {recoveries} attempts"
        );
        conn.silent_for(300).await;
        conn.close(CloseCode::Error, "overloaded").await;
    };
    assert_eq!(
        next_event(&mut events, 5).await,
        conn1_lost("the service is restarting", 4000)
    );
    conn.connected("conn2", "rt2").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { connection_id, .. } if connection_id == "conn2"
    ));
    client.stop().await;
}

#[tokio::test]
async fn an_invocations_timeout_runs_from_its_write() {
    // Made during a recovery longer than its timeout, an invocation waits for the
    // recovery and is then answered. One written before the drop fails with
    // `NotConnected` and is not written again.
    let fake = Fake::new().await;
    let (client, _events, mut conn) = connect(&fake, quiet_options()).await;
    let invoke = |event: &'static str| {
        let c = client.clone();
        tokio::spawn(async move {
            let opts = InvokeOptions {
                timeout: Some(Duration::from_millis(200)),
            };
            c.invoke_event(event, DataType::Text, Bytes::from("x"), opts)
                .await
        })
    };
    let written = invoke("written");
    assert_eq!(conn.recv().await["event"], "written");
    drop(conn);
    let held = held_recovery(&fake, &client).await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), written).await;
    assert_eq!(
        outcome
            .expect("the written invocation ends with the drop")
            .unwrap(),
        Err(Error::NotConnected { ack_id: None })
    );
    let mut queued = invoke("queued");
    let early = tokio::time::timeout(Duration::from_millis(400), &mut queued).await;
    assert!(early.is_err(), "ended during the recovery: {early:?}");
    drop(held);
    let mut conn = fake.accept_recovery().await;
    let frame = conn.recv().await;
    assert_eq!(frame["event"], "queued");
    let id = frame["invocationId"].as_str().unwrap();
    conn.send(&format!(
        r#"{{"type":"invokeResponse","invocationId":"{id}","success":true,"dataType":"text","data":"answered"}}"#
    ))
    .await;
    assert_eq!(queued.await.unwrap().unwrap().data, Bytes::from("answered"));
    conn.silent_for(200).await;
    client.stop().await;
}

#[tokio::test]
async fn a_fire_and_forget_message_queued_during_a_recovery_that_runs_out_is_dropped() {
    // No socket opens within the window: the session is lost, and the message, reported
    // sent, is not written on the next connection.
    let fake = Fake::new().await;
    let options = ClientOptions {
        recovery_window: Duration::from_millis(500),
        ..quiet_options()
    };
    let (client, mut events, conn) = connect(&fake, options).await;
    drop(conn);
    let held = held_recovery(&fake, &client).await;
    assert_eq!(
        fire_and_forget(&client, "fire").await,
        Ok(AckResult {
            ack_id: None,
            is_duplicated: false
        })
    );
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected { .. }
    ));
    drop(held);
    let (mut conn, uri) = fake.accept().await;
    assert!(
        !uri.contains("awps_connection_id"),
        "a new connection: {uri}"
    );
    conn.connected("conn2", "rt2").await;
    next_event(&mut events, 5).await;
    conn.silent_for(300).await;
    client.stop().await;
}
