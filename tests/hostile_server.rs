//! The client against a hostile server: truncated frames, every field with the wrong
//! type, huge frames and HTTP heads, floods, binary and control frames, acks for
//! unknown ids, sequence ids out of order, extreme or malformed (also across a
//! recovery), a second `connected` frame, every interesting close code, fragmented
//! messages, RFC 6455 violations, and upgrade answers the client must fail (or must
//! accept, however spelled). The client must stay up, report what the protocol says
//! through its events, and leave nothing behind (its socket is closed once the last
//! handle is dropped, and the heap returns to where it was).
//!
//! (tests/fake_service.rs covers the basic malformed / unknown / duplicate cases.)

mod common;

use common::{next_event, wait_for};
use futures_util::{SinkExt, StreamExt};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;
use webpubsub_client::{Client, ClientOptions, ClientState, Credential, Error, Event, Protocol};

/// Counts live heap bytes, to show that hostile sessions leave nothing behind.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests run one at a time so that the heap measurement sees only its own test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Hostile {
    listener: TcpListener,
    url: String,
}

type Ws = WebSocketStream<TcpStream>;

impl Hostile {
    async fn new() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "ws://{}/client/hubs/h?access_token=tok",
            listener.local_addr().unwrap()
        );
        Hostile { listener, url }
    }

    async fn accept_tcp(&self) -> TcpStream {
        tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("no connection within 10 s")
            .unwrap()
            .0
    }

    /// Accepts a WebSocket (any size of frame may be sent); returns it and its URI.
    #[allow(clippy::result_large_err)]
    async fn accept(&self) -> (Ws, String) {
        let tcp = self.accept_tcp().await;
        let uri = Arc::new(Mutex::new(String::new()));
        let seen = uri.clone();
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let ws = tokio_tungstenite::accept_hdr_async_with_config(
            tcp,
            move |req: &Request, mut resp: Response| {
                *seen.lock().unwrap() = req.uri().to_string();
                if let Some(p) = req.headers().get("Sec-WebSocket-Protocol").cloned() {
                    resp.headers_mut().insert("Sec-WebSocket-Protocol", p);
                }
                Ok(resp)
            },
            Some(config),
        )
        .await
        .unwrap();
        let uri = uri.lock().unwrap().clone();
        (ws, uri)
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

async fn connected(ws: &mut Ws, id: &str, token: &str) {
    send(
        ws,
        &format!(
            r#"{{"type":"system","event":"connected","userId":"u","connectionId":"{id}","reconnectionToken":"{token}"}}"#
        ),
    )
    .await;
}

/// The next text frame from the client that is not a ping or a sequenceAck.
async fn recv(ws: &mut Ws) -> serde_json::Value {
    loop {
        let value = common::next_client_frame(ws).await;
        if value["type"] != "sequenceAck" {
            return value;
        }
    }
}

/// Waits until the client closes the socket (its connection task ended).
async fn closed_by_client(ws: &mut Ws) {
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the client kept its socket open");
}

fn options(protocol: Protocol) -> ClientOptions {
    ClientOptions {
        protocol,
        keep_alive_interval: None,
        keep_alive_timeout: None,
        max_message_size: 64 * 1024,
        ..common::fast_options()
    }
}

/// A client of `url` whose start runs in a task of its own, while the test plays the
/// server.
fn starting(
    url: &str,
    options: ClientOptions,
) -> (
    Client,
    UnboundedReceiver<Event>,
    JoinHandle<Result<(), Error>>,
) {
    let (client, events) = Client::with_channel(Credential::Url(url.into()), options).unwrap();
    let c = client.clone();
    (client, events, tokio::spawn(async move { c.start().await }))
}

async fn start(
    hostile: &Hostile,
    options: ClientOptions,
) -> (Client, UnboundedReceiver<Event>, Ws) {
    let (client, mut events, start) = starting(&hostile.url, options);
    let (mut ws, _) = hostile.accept().await;
    connected(&mut ws, "conn1", "rt1").await;
    start.await.unwrap().unwrap();
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    (client, events, ws)
}

fn server_message(text: &str, sequence_id: u64) -> String {
    server_message_with_id(text, &sequence_id.to_string())
}

/// Skips message events until the one with `text`; anything else fails.
async fn until_message(events: &mut UnboundedReceiver<Event>, text: &str) -> usize {
    let mut skipped = 0;
    loop {
        match next_event(events, 10).await {
            Event::ServerMessage { ref data, .. } | Event::GroupMessage { ref data, .. }
                if data.as_ref() == text.as_bytes() =>
            {
                return skipped
            }
            Event::ServerMessage { .. } | Event::GroupMessage { .. } => skipped += 1,
            other => panic!("unexpected event {other:?} before {text:?}"),
        }
    }
}

/// Well-formed frames of every downstream type, the seeds of the hostile variants.
const VALID: &[&str] = &[
    r#"{"type":"ack","ackId":77,"success":false,"error":{"name":"Forbidden","message":"m"}}"#,
    r#"{"type":"message","from":"group","group":"g","fromUserId":"u","dataType":"text","data":"x","sequenceId":1}"#,
    r#"{"type":"message","from":"server","dataType":"json","data":{"a":1},"sequenceId":2}"#,
    r#"{"type":"message","from":"server","dataType":"binary","data":"AAEC","sequenceId":3}"#,
    r#"{"type":"invokeResponse","invocationId":"9","success":true,"dataType":"text","data":"x"}"#,
    r#"{"type":"system","event":"connected","userId":"u","connectionId":"c","reconnectionToken":"t"}"#,
    r#"{"type":"system","event":"disconnected","message":"m"}"#,
    r#"{"type":"pong"}"#,
];

/// Every field of every valid frame replaced by a value of each wrong type.
fn mistyped() -> Vec<String> {
    let wrong = [
        "null",
        "true",
        "0",
        "-1",
        "1.5",
        "18446744073709551616",
        "\"\"",
        "\"text\"",
        "[]",
        "[1,\"a\"]",
        "{}",
        "{\"name\":5}",
    ];
    let mut out = Vec::new();
    for frame in VALID {
        let value: serde_json::Value = serde_json::from_str(frame).unwrap();
        let object = value.as_object().unwrap();
        for key in object.keys() {
            for w in wrong {
                let mut changed = object.clone();
                changed.insert(key.clone(), serde_json::from_str(w).unwrap());
                out.push(serde_json::Value::Object(changed).to_string());
            }
            let mut without = object.clone();
            without.remove(key);
            out.push(serde_json::Value::Object(without).to_string());
        }
    }
    out
}

#[tokio::test]
async fn truncated_mistyped_binary_and_stray_frames_never_break_the_connection() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("room").await });
    let join_frame = recv(&mut ws).await;

    let mut barrage = 0;
    for frame in VALID {
        for end in 0..frame.len() {
            send(&mut ws, &frame[..end]).await;
            barrage += 1;
        }
    }
    for frame in mistyped() {
        send(&mut ws, &frame).await;
        barrage += 1;
    }
    for stray in [
        r#"{"type":"ack","ackId":0,"success":true}"#,
        r#"{"type":"ack","ackId":18446744073709551615,"success":true}"#,
        r#"{"type":"ack","ackId":424242,"success":false,"error":{"name":"Duplicate","message":""}}"#,
        r#"{"type":"invokeResponse","invocationId":"nobody","success":false,"error":{"name":"X","message":"y"}}"#,
        r#"{"type":"message","from":"elsewhere","dataType":"text","data":"x","sequenceId":5}"#,
        r#"{"type":"system","event":"brandNew"}"#,
        r#"[1,2,3]"#,
        r#""type""#,
        r#"{"type":"ack","ackId":1,"success":true,"type":"pong"}"#,
        "\u{feff}{\"type\":\"pong\"}",
        "",
    ] {
        send(&mut ws, stray).await;
        barrage += 1;
    }
    ws.send(Message::binary(vec![0xffu8; 4096])).await.unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    ws.send(Message::Pong(Bytes::from_static(b"unsolicited")))
        .await
        .unwrap();

    send(&mut ws, &server_message("sentinel", 1_000_000)).await;
    until_message(&mut events, "sentinel").await;
    assert_eq!(client.state(), ClientState::Connected);
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));

    // The operation pending through all that still completes with its own ack.
    send(
        &mut ws,
        &format!(
            r#"{{"type":"ack","ackId":{},"success":true}}"#,
            join_frame["ackId"]
        ),
    )
    .await;
    let ack = join.await.unwrap().unwrap();
    assert_eq!(ack.ack_id, join_frame["ackId"].as_u64());
    assert!(barrage > 1000, "{barrage} hostile frames");
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn sequence_ids_out_of_order_are_delivered_once_and_acked_at_the_highest() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    for (text, id) in [
        ("a", 1),
        ("c", 3),
        ("b", 2),
        ("e", 5),
        ("d", 4),
        ("c", 3),
        ("f", 6),
        ("zero", 0),
    ] {
        send(&mut ws, &server_message(text, id)).await;
    }
    let mut texts = Vec::new();
    for _ in 0..4 {
        texts.push(common::message_text(&next_event(&mut events, 5).await).unwrap());
    }
    assert_eq!(
        texts,
        ["a", "c", "e", "f"],
        "late and repeated ids are dropped"
    );
    let ack = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = frame {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "sequenceAck" {
                break v;
            }
        }
    };
    assert_eq!(ack["sequenceId"], 6);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "nothing more delivered"
    );
    drop(client);
    closed_by_client(&mut ws).await;
}

/// A server message whose `sequenceId` is the JSON text `id`.
fn server_message_with_id(text: &str, id: &str) -> String {
    format!(
        r#"{{"type":"message","from":"server","dataType":"text","data":"{text}","sequenceId":{id}}}"#
    )
}

/// A server message without a `sequenceId`: delivered whatever the sequence, so it
/// shows that the frames written before it were handled.
fn unsequenced(text: &str) -> String {
    format!(r#"{{"type":"message","from":"server","dataType":"text","data":"{text}"}}"#)
}

/// The texts of the next `n` events, all messages.
async fn texts(events: &mut UnboundedReceiver<Event>, n: usize) -> Vec<String> {
    let mut texts = Vec::new();
    for _ in 0..n {
        let event = next_event(events, 10).await;
        texts.push(common::message_text(&event).unwrap_or_else(|| panic!("{event:?}")));
    }
    texts
}

/// Reads the client's frames until its `sequenceAck` of `id`.
async fn until_sequence_ack(ws: &mut Ws, id: u64) {
    while common::next_client_frame(ws).await
        != serde_json::json!({"type": "sequenceAck", "sequenceId": id})
    {}
}

/// The reliable protocol with no periodic sequenceAck: only a jump of over 300 is
/// acknowledged at once.
fn acking_jumps_only() -> ClientOptions {
    ClientOptions {
        sequence_ack_interval: Duration::from_secs(3600),
        ..options(Protocol::JsonReliable)
    }
}

#[tokio::test]
async fn extreme_sequence_ids_are_deduplicated_without_overflow() {
    // 0 first, a jump of 2^40, an id going back, u64::MAX and what follows it: only
    // ids above the highest delivered one are delivered (as the official JS client
    // does), each jump is acknowledged at once, and the connection stays usable.
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, acking_jumps_only()).await;
    const JUMP: u64 = 1 << 40;
    for (text, id) in [
        ("zero", 0),
        ("one", 1),
        ("jump", JUMP),
        ("back", 2),
        ("max", u64::MAX),
        ("after max", 5),
        ("max again", u64::MAX),
    ] {
        send(&mut ws, &server_message(text, id)).await;
    }
    send(&mut ws, &unsequenced("sentinel")).await;
    assert_eq!(
        texts(&mut events, 4).await,
        ["one", "jump", "max", "sentinel"]
    );
    let c = client.clone();
    let join = tokio::spawn(async move { c.join_group("g").await });
    // Each jump of more than 300 is acknowledged at once, nothing else. (The join's
    // frame, which its caller may write itself, can come before them.)
    let mut acks = Vec::new();
    let mut join_frame = None;
    while acks.len() < 2 || join_frame.is_none() {
        let frame = common::next_client_frame(&mut ws).await;
        match frame["type"].as_str() {
            Some("sequenceAck") => acks.push(frame["sequenceId"].as_u64().unwrap()),
            Some("joinGroup") => join_frame = Some(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(acks, [JUMP, u64::MAX]);
    let join_frame = join_frame.unwrap();
    let ack = format!(
        r#"{{"type":"ack","ackId":{},"success":true}}"#,
        join_frame["ackId"]
    );
    send(&mut ws, &ack).await;
    join.await.unwrap().unwrap();
    assert_eq!(client.state(), ClientState::Connected);
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn a_message_with_a_malformed_sequence_id_is_dropped_and_the_sequence_kept() {
    // Negative, fractional, beyond u64, or not a number: the frame is malformed and
    // skipped with a warning, and its id reaches no state (2^64 taken as u64::MAX
    // would drop every later message). A null id is no id: delivered, as the official
    // JS client does.
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, acking_jumps_only()).await;
    send(&mut ws, &server_message("one", 1)).await;
    for id in [
        "-1",
        "-0.5",
        "1.5",
        "1e3",
        "18446744073709551616",
        "1000000000000000000000000",
        "\"3\"",
        "true",
        "{}",
        "[4]",
    ] {
        send(&mut ws, &server_message_with_id(&format!("bad {id}"), id)).await;
    }
    send(&mut ws, &server_message_with_id("null", "null")).await;
    send(&mut ws, &server_message("two", 2)).await;
    send(&mut ws, &server_message("far", 400)).await;
    assert_eq!(texts(&mut events, 4).await, ["one", "null", "two", "far"]);
    assert_eq!(
        common::next_client_frame(&mut ws).await,
        serde_json::json!({"type": "sequenceAck", "sequenceId": 400}),
        "the jump from 0 to 400 is acknowledged at once"
    );
    assert_eq!(client.state(), ClientState::Connected);
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn after_a_recovery_the_replays_up_to_u64_max_are_dropped_and_it_is_acked_again() {
    // The recovery URL names the connection and its token, not a sequence id: the
    // service replays what the last sequenceAck did not cover, here all of it.
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    send(&mut ws, &server_message("one", 1)).await;
    send(&mut ws, &server_message("max", u64::MAX)).await;
    assert_eq!(texts(&mut events, 2).await, ["one", "max"]);
    until_sequence_ack(&mut ws, u64::MAX).await;
    drop(ws);
    let (mut ws, uri) = hostile.accept().await;
    assert!(
        uri.ends_with("awps_connection_id=conn1&awps_reconnection_token=rt1"),
        "{uri}"
    );
    connected(&mut ws, "conn1", "rt2").await;
    for (text, id) in [("one", 1), ("max", u64::MAX), ("seven", 7)] {
        send(&mut ws, &server_message(text, id)).await;
    }
    send(&mut ws, &unsequenced("sentinel")).await;
    assert_eq!(
        until_message(&mut events, "sentinel").await,
        0,
        "replayed frames are not delivered"
    );
    until_sequence_ack(&mut ws, u64::MAX).await;
    assert_eq!(client.state(), ClientState::Connected);
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn a_second_connected_frame_only_renews_the_reconnection_token() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    connected(&mut ws, "other", "rt2").await;
    send(&mut ws, &server_message("after", 1)).await;
    assert_eq!(until_message(&mut events, "after").await, 0);
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    drop(ws);
    let (mut ws, uri) = hostile.accept().await;
    assert!(
        uri.ends_with("awps_connection_id=conn1&awps_reconnection_token=rt2"),
        "recovers its own connection with the newest token: {uri}"
    );
    connected(&mut ws, "conn1", "rt3").await;
    send(&mut ws, &server_message("recovered", 2)).await;
    assert_eq!(until_message(&mut events, "recovered").await, 0);
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn a_recovery_the_service_takes_for_another_connection_loses_the_session() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    end(&mut ws, Ending::Code(4000)).await;
    let (mut ws, uri) = hostile.accept().await;
    assert!(uri.contains("awps_connection_id=conn1"), "{uri}");
    // Not conn1: groups and sequence ids of another connection.
    connected(&mut ws, "conn2", "rt2").await;
    // That connection is closed normally, for the service to free it at once.
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame within 5 s");
    assert_eq!(close, Some(CloseCode::Normal));
    drop(ws);
    // Reported as the drop the recovery was for.
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            connection_id: Some("conn1".into()),
            message: Some("closing with 4000".into()),
            close_code: Some(4000)
        }
    );
    let (mut ws, uri) = hostile.accept().await;
    assert!(
        !uri.contains("awps_connection_id"),
        "a new connection: {uri}"
    );
    connected(&mut ws, "conn3", "rt3").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { connection_id, .. } if connection_id == "conn3"
    ));
    // A new connection's sequence starts again, and its first message is delivered.
    send(&mut ws, &server_message("first of conn3", 1)).await;
    assert_eq!(texts(&mut events, 1).await, ["first of conn3"]);
    drop(client);
    closed_by_client(&mut ws).await;
}

/// A frame (payload under 64 KiB) as the server writes it, unmasked: `head` is its
/// first byte (FIN, RSV bits, opcode).
fn raw_frame(head: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![head];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn a_fragmented_message_with_control_frames_between_its_fragments_arrives_whole() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    let message = server_message("whole", 1);
    let (first, rest) = message.as_bytes().split_at(10);
    let (middle, last) = rest.split_at(20);
    // The longest ping allowed: its pong carries all of it.
    let ping = [b'p'; 125];
    let frames = [
        raw_frame(0x01, first),
        raw_frame(0x89, &ping),
        raw_frame(0x00, middle),
        raw_frame(0x8a, b"unsolicited"),
        raw_frame(0x80, last),
    ];
    ws.get_mut().write_all(&frames.concat()).await.unwrap();
    assert_eq!(texts(&mut events, 1).await, ["whole"]);
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Message::Pong(payload) = ws.next().await.unwrap().unwrap() {
                return payload;
            }
        }
    })
    .await
    .expect("a pong within 5 s");
    assert_eq!(pong.as_ref(), ping);
    assert_eq!(client.state(), ClientState::Connected);
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn websocket_protocol_violations_end_the_connection_with_their_reason() {
    // RFC 6455: each fails the connection with its reason, before the connected frame (a
    // refused start) and after it (the connection is then lost, JSON protocol, and a new
    // one opened). The client sends the close frame the violation calls for (7.1.7,
    // 7.4.1): none for a socket that ended, only the answer to a close frame.
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let masked = [&[0x81, 0x82, 1, 2, 3, 4][..], &[b'{' ^ 1, b'}' ^ 2]].concat();
    let mut huge = vec![0x81, 127];
    huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
    // What the server writes (nothing: it ends its stream), the reason, the close code
    // of the disconnected event, the close code the client sends.
    type Violation = (Vec<u8>, &'static str, Option<u16>, Option<u16>);
    let cases: Vec<Violation> = vec![
        (
            [raw_frame(0x01, b"{"), raw_frame(0x81, b"{}")].concat(),
            "While waiting for more fragments received: TEXT",
            None,
            Some(1002),
        ),
        (
            raw_frame(0x80, b"{}"),
            "Continue frame but nothing to continue",
            None,
            Some(1002),
        ),
        (
            raw_frame(0x09, b"ping"),
            "Fragmented control frame",
            None,
            Some(1002),
        ),
        (
            raw_frame(0x89, &[0; 126]),
            "Control frame too big",
            None,
            Some(1002),
        ),
        (
            masked,
            "Received a masked frame from server",
            None,
            Some(1002),
        ),
        (
            raw_frame(0xc1, b"{}"),
            "Reserved bits are non-zero",
            None,
            Some(1002),
        ),
        (
            raw_frame(0x83, b"{}"),
            "invalid opcode: 3",
            None,
            Some(1002),
        ),
        (raw_frame(0x8b, b""), "invalid opcode: 11", None, Some(1002)),
        (
            raw_frame(0x81, b"{\xff}"),
            "UTF-8 encoding error",
            None,
            Some(1007),
        ),
        (
            huge,
            "Message too long: 9223372036854775808 > 65536",
            None,
            Some(1009),
        ),
        (
            raw_frame(0x88, &[3]),
            "Invalid close sequence",
            None,
            Some(1002),
        ),
        (
            raw_frame(0x88, b"\x03\xe8\xff"),
            "UTF-8 encoding error",
            None,
            Some(1007),
        ),
        // Codes not allowed on the wire (1005 means none was sent; 999 is out of range)
        // are reported as the peer's protocol violation, and so answered.
        (
            raw_frame(0x88, &1005u16.to_be_bytes()),
            "Protocol violation",
            Some(1002),
            Some(1002),
        ),
        (
            raw_frame(0x88, &999u16.to_be_bytes()),
            "Protocol violation",
            Some(1002),
            Some(1002),
        ),
        (
            Vec::new(),
            "Connection reset without closing handshake",
            None,
            None,
        ),
    ];
    for (bytes, reason, close_code, sent) in cases {
        let (client, _events, starting) = starting(&hostile.url, options(Protocol::Json));
        let (mut ws, _) = hostile.accept().await;
        violate(&mut ws, &bytes).await;
        assert_eq!(
            close_sent(&mut ws).await,
            sent,
            "before connected: {reason}"
        );
        match starting.await.unwrap() {
            Err(Error::Connect(message)) => assert!(
                message.starts_with("closed before the connected frame")
                    && message.contains(reason),
                "{reason}: {message}"
            ),
            other => panic!("{reason}: {other:?}"),
        }
        drop(client);

        let (client, mut events, mut ws) = start(&hostile, options(Protocol::Json)).await;
        violate(&mut ws, &bytes).await;
        assert_eq!(close_sent(&mut ws).await, sent, "{reason}");
        match next_event(&mut events, 5).await {
            Event::Disconnected {
                connection_id,
                message,
                close_code: code,
            } => {
                assert_eq!(connection_id.as_deref(), Some("conn1"), "{reason}");
                assert!(
                    message.as_deref().is_some_and(|m| m.contains(reason)),
                    "{reason}: {message:?}"
                );
                assert_eq!(code, close_code, "{reason}");
            }
            other => panic!("{reason}: {other:?}"),
        }
        let (mut ws, uri) = hostile.accept().await;
        assert!(!uri.contains("awps_connection_id"), "{reason}: {uri}");
        connected(&mut ws, "conn2", "rt2").await;
        assert!(matches!(
            next_event(&mut events, 5).await,
            Event::Connected { connection_id, .. } if connection_id == "conn2"
        ));
        drop(client);
        closed_by_client(&mut ws).await;
    }
}

/// Writes `bytes` raw to the client; none: ends the stream without a close frame.
async fn violate(ws: &mut Ws, bytes: &[u8]) {
    let tcp = ws.get_mut();
    if bytes.is_empty() {
        tcp.shutdown().await.unwrap();
    } else {
        tcp.write_all(bytes).await.unwrap();
    }
}

/// The code of the close frame the client writes before it drops its socket (1005 for
/// one without a code); None when it drops it without one.
async fn close_sent(ws: &mut Ws) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return Some(frame.map_or(1005, |f| u16::from(f.code)))
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the client kept its socket open")
}

#[tokio::test]
async fn a_close_frame_is_answered_and_nothing_after_it_is_read() {
    // RFC 6455 (5.5.1): a close frame is answered with one, before the connected frame
    // (a refused start) and after it (a lost connection).
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let close_then_data = [
        raw_frame(0x88, b"\x03\xe9bye"),
        raw_frame(0x81, unsequenced("after the close").as_bytes()),
    ]
    .concat();

    let (client, _events, starting) = starting(&hostile.url, options(Protocol::Json));
    let (mut ws, _) = hostile.accept().await;
    ws.get_mut().write_all(&close_then_data).await.unwrap();
    assert_eq!(close_sent(&mut ws).await, Some(1001));
    assert_eq!(
        starting.await.unwrap(),
        Err(Error::Connect(
            "closed before the connected frame (1001 bye)".into()
        ))
    );
    assert_eq!(client.state(), ClientState::Stopped);

    let (client, mut events, mut ws) = start(&hostile, options(Protocol::Json)).await;
    ws.get_mut().write_all(&close_then_data).await.unwrap();
    assert_eq!(close_sent(&mut ws).await, Some(1001));
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            connection_id: Some("conn1".into()),
            message: Some("bye".into()),
            close_code: Some(1001)
        }
    );
    drop(client);
}

#[tokio::test]
async fn huge_frames_are_refused_by_dropping_the_socket_then_recovering() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    let big = "x".repeat(60 * 1024);
    send(&mut ws, &server_message(&big, 1)).await;
    assert_eq!(
        until_message(&mut events, &big).await,
        0,
        "60 KiB is allowed"
    );
    let huge = "y".repeat(4 << 20);
    let _ = ws.send(Message::text(server_message(&huge, 2))).await;
    let (mut ws, uri) = hostile.accept().await;
    assert!(uri.contains("awps_connection_id=conn1"), "{uri}");
    connected(&mut ws, "conn1", "rt1").await;
    send(&mut ws, &server_message("small again", 3)).await;
    assert_eq!(until_message(&mut events, "small again").await, 0);
    assert_eq!(client.state(), ClientState::Connected);
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn hostile_http_upgrade_answers_fail_start_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec(), "401"),
        (b"garbage\r\n\r\n".to_vec(), "malformed"),
        (
            [b"HTTP/1.1 101 Switching Protocols\r\nX-A: ".to_vec(), b"b".repeat(20_000)].concat(),
            "too large",
        ),
        (
            [b"HTTP/1.1 101 Switching Protocols\r\n".to_vec(), b"X-A: b\r\n".repeat(40), b"\r\n".to_vec()].concat(),
            "malformed",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n".to_vec(),
            "Sec-WebSocket-Accept",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tcp\r\n\r\n".to_vec(), "did not upgrade"),
        (b"HTTP/1.1 200 OK\r\n".to_vec(), "closed the connection"),
    ];
    for (answer, expected) in cases {
        let options = ClientOptions {
            start_timeout: Duration::from_secs(3),
            ..options(Protocol::JsonReliable)
        };
        let (client, _events, start) = starting(&hostile.url, options);
        let mut tcp = hostile.accept_tcp().await;
        let mut request = [0u8; 4096];
        let _ = tcp.read(&mut request).await.unwrap();
        let _ = tcp.write_all(&answer).await;
        drop(tcp);
        let error = start.await.unwrap().unwrap_err();
        match &error {
            Error::Connect(m) => assert!(m.contains(expected), "{expected}: {m}"),
            other => panic!("{expected}: unexpected error {other:?}"),
        }
        assert!(!error.to_string().contains("tok"), "no token in {error}");
        assert_eq!(client.state(), ClientState::Stopped);
    }
}

/// Reads the client's upgrade request from `tcp`; returns a `101` answer to it carrying
/// `headers` (each line ending in CRLF).
async fn switching(tcp: &mut TcpStream, headers: &str) -> String {
    let head = common::request_head(tcp).await;
    let key = head
        .lines()
        .filter_map(|line| line.split_once(": "))
        .find(|(name, _)| name.eq_ignore_ascii_case("Sec-WebSocket-Key"))
        .map(|(_, key)| derive_accept_key(key.as_bytes()))
        .unwrap();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {key}\r\n{headers}\r\n"
    )
}

/// Starts a reliable client of `hostile`, answers its upgrade with the 101 `switching`
/// makes for `headers`, rewritten by `edit`, and sends the connected frame of conn1:
/// the client, its start's outcome (within 3 s), and the server's side.
async fn answered_upgrade(
    hostile: &Hostile,
    headers: &str,
    edit: impl FnOnce(String) -> String,
) -> (Client, Result<(), Error>, Ws) {
    let (client, _events, start) = starting(&hostile.url, options(Protocol::JsonReliable));
    let mut tcp = hostile.accept_tcp().await;
    let answer = edit(switching(&mut tcp, headers).await);
    tcp.write_all(answer.as_bytes()).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Server, None).await;
    connected(&mut ws, "conn1", "rt1").await;
    let started = tokio::time::timeout(Duration::from_secs(3), start)
        .await
        .expect("the start ends at once")
        .unwrap();
    (client, started, ws)
}

#[tokio::test]
async fn interim_responses_before_the_upgrade_answer_are_skipped() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    // RFC 9110 (15.2): a client parses the 1xx responses it did not expect before the
    // final one.
    let (client, started, mut ws) = answered_upgrade(
        &hostile,
        "Sec-WebSocket-Protocol: json.reliable.webpubsub.azure.v1\r\n",
        |answer| {
            format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n{answer}"
            )
        },
    )
    .await;
    started.unwrap();
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn an_upgrade_answer_the_client_must_fail_fails_start() {
    // RFC 6455 (4.1): an extension or a subprotocol the client did not ask for, or a
    // Connection without the token "upgrade", fails the connection. A field sent twice
    // is the list of both values (RFC 9110, 5.3), not its first.
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let offered = "Sec-WebSocket-Protocol: json.reliable.webpubsub.azure.v1\r\n";
    let upgrade = "Connection: Upgrade\r\n";
    let cases = [
        (
            upgrade,
            format!("{offered}Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "the server chose the extension \"permessage-deflate\", which the client did not offer",
        ),
        (
            upgrade,
            "Sec-WebSocket-Protocol: json.webpubsub.azure.v1\r\n".into(),
            "the server chose the subprotocol \"json.webpubsub.azure.v1\", not json.reliable.webpubsub.azure.v1",
        ),
        (upgrade, String::new(), "the server did not accept the subprotocol json.reliable.webpubsub.azure.v1"),
        (
            upgrade,
            format!("{offered}Sec-WebSocket-Extensions: \r\nSec-WebSocket-Extensions: permessage-deflate\r\n"),
            "the server chose the extension \"permessage-deflate\", which the client did not offer",
        ),
        (
            upgrade,
            format!("{offered}Sec-WebSocket-Protocol: json.webpubsub.azure.v1\r\n"),
            "the server chose the subprotocol \"json.reliable.webpubsub.azure.v1, json.webpubsub.azure.v1\"",
        ),
        (upgrade, format!("{offered}Sec-WebSocket-Accept: other\r\n"), "Sec-WebSocket-Accept does not match"),
        ("", offered.into(), "the server's answer lacks Connection: upgrade"),
        ("Connection: keep-alive\r\n", offered.into(), "the server's answer lacks Connection: upgrade"),
    ];
    for (connection, headers, expected) in cases {
        let (client, started, _ws) = answered_upgrade(&hostile, &headers, |answer| {
            answer.replacen(upgrade, connection, 1)
        })
        .await;
        let error = started.expect_err(expected);
        match &error {
            Error::Connect(m) => assert!(m.contains(expected), "{expected}\n{m}"),
            other => panic!("{expected}: unexpected error {other:?}"),
        }
        assert_eq!(client.state(), ClientState::Stopped);
    }
}

#[tokio::test]
async fn an_upgrade_answer_in_any_valid_spelling_is_accepted() {
    // Field names and the values RFC 6455 names are case-insensitive, Connection is a
    // list, whitespace around a value is not part of it, an obs-fold is a space (RFC
    // 9112, 5.2), the reason phrase may be empty, and a Content-Length on a 101
    // announces no body (RFC 9110).
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, started, mut ws) = answered_upgrade(&hostile, "", |answer| {
        answer.replace(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept:",
            "HTTP/1.1 101 \r\nuPGRADE: WebSocket\r\nconnection: keep-alive\r\nCONNECTION:\r\n\t UPGRADE \r\n\
             Content-Length: 5\r\nsec-websocket-protocol:  json.reliable.webpubsub.azure.v1 \r\nsec-websocket-accept:",
        )
    })
    .await;
    started.unwrap();
    assert_eq!(client.connection_id().as_deref(), Some("conn1"));
    drop(client);
    closed_by_client(&mut ws).await;
}

/// The start error for one HTTP answer to the client's first request, `url` reached
/// directly or through `hostile` as its proxy; the connection is held open after the
/// answer, as a server keeping it alive would.
async fn refusal(hostile: &Hostile, url: &str, proxy: bool, answer: &[u8]) -> Error {
    let options = ClientOptions {
        start_timeout: Duration::from_secs(5),
        proxy: if proxy {
            webpubsub_client::ProxySetting::Url(format!(
                "http://{}",
                hostile.listener.local_addr().unwrap()
            ))
        } else {
            webpubsub_client::ProxySetting::Direct
        },
        ..options(Protocol::JsonReliable)
    };
    let (client, _events, start) = starting(url, options);
    let mut tcp = hostile.accept_tcp().await;
    let mut request = [0u8; 4096];
    let _ = tcp.read(&mut request).await.unwrap();
    tcp.write_all(answer).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(2), start)
        .await
        .expect("the refusal is reported at once, not at the start timeout")
        .unwrap()
        .unwrap_err();
    assert_eq!(client.state(), ClientState::Stopped);
    error
}

#[tokio::test]
async fn an_http_refusal_reports_the_servers_text_and_never_the_token() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let peer = hostile.listener.local_addr().unwrap();
    let token = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2lnbmF0dXJl";
    let url = format!("ws://{peer}/client/hubs/h?access_token={token}&x=1");
    let cases: Vec<(bool, Vec<u8>, String)> = vec![
        (
            false,
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 43\r\n\r\n\
              Unauthorized: the access token has expired."
                .to_vec(),
            format!("{peer} answered the WebSocket upgrade with HTTP 401 Unauthorized: \"Unauthorized: the access token has expired.\""),
        ),
        (
            false,
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\ndown \r\nF\r\nfor maintenance\r\n0\r\n\r\n"
                .to_vec(),
            "HTTP 503 Service Unavailable: \"down for maintenance\" (Retry-After: 30)".into(),
        ),
        (
            false,
            format!("HTTP/1.1 302 Found\r\nLocation: ws://elsewhere/client/hubs/h?access_token={token}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            "HTTP 302 Found (a redirect to ws://elsewhere/client/hubs/h?access_token=***, not followed)".into(),
        ),
        (
            false,
            format!("HTTP/1.1 400 Bad Request\r\n\r\nCannot GET\n  /client/hubs/h?access_token={token}&x=1").into_bytes(),
            "HTTP 400 Bad Request: \"Cannot GET /client/hubs/h?access_token=***&x=1\"".into(),
        ),
        (
            false,
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\nhalf a".to_vec(),
            "HTTP 500 Internal Server Error: \"half a\"".into(),
        ),
        (
            false,
            format!("HTTP/1.1 400 No such token {token}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            "HTTP 400 No such token ***".into(),
        ),
        (
            false,
            format!("HTTP/1.1 400 {}\r\nContent-Length: 0\r\n\r\n", "r".repeat(10_000)).into_bytes(),
            format!("HTTP 400 {}...", "r".repeat(512)),
        ),
        (
            false,
            b"HTTP/1.1 401 Unauthorized\r\nContent-Encoding: gzip\r\nContent-Length: 22\r\n\r\n\
              \x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\xcb\x07\x00\x1f\x28\xaa\x67\x02\x00\x00\x00"
                .to_vec(),
            "HTTP 401 Unauthorized (a gzip-encoded body, not shown)".into(),
        ),
        (
            false,
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer,\r\n error=\"invalid_token\"\r\n\
              Content-Length: 8\r\n\r\nExpired."
                .to_vec(),
            "HTTP 401 Unauthorized: \"Expired.\"".into(),
        ),
        (
            true,
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 19\r\n\r\nProxy login needed.".to_vec(),
            format!("proxy {peer} refused CONNECT to nowhere.invalid:80: HTTP 407 Proxy Authentication Required: \"Proxy login needed.\""),
        ),
    ];
    for (proxy, answer, expected) in cases {
        let url = if proxy {
            format!("ws://nowhere.invalid/client/hubs/h?access_token={token}")
        } else {
            url.clone()
        };
        let error = refusal(&hostile, &url, proxy, &answer).await;
        match &error {
            Error::Connect(m) => {
                assert!(m.contains(&expected), "{expected}\n{m}");
                assert!(m.len() < 1024, "{m}");
            }
            other => panic!("{expected}: unexpected error {other:?}"),
        }
        assert!(
            !error.to_string().contains("c2VjcmV0"),
            "no token in {error}"
        );
    }
}

#[tokio::test]
async fn the_services_reason_for_closing_before_the_connected_frame_is_in_the_start_error() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    for code in [1008u16, 1011] {
        let (client, _events, start) = starting(&hostile.url, options(Protocol::JsonReliable));
        let (mut ws, _) = hostile.accept().await;
        send(
            &mut ws,
            r#"{"type":"system","event":"disconnected","message":"The access token is revoked."}"#,
        )
        .await;
        let close = CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        };
        ws.send(Message::Close(Some(close))).await.unwrap();
        let error = start.await.unwrap().unwrap_err();
        assert_eq!(
            error,
            Error::Connect(format!(
                "closed before the connected frame: The access token is revoked. ({code} bye)"
            ))
        );
        assert_eq!(client.state(), ClientState::Stopped);
    }
}

#[tokio::test]
async fn a_flood_arrives_in_order_and_leaves_no_heap_behind() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    // Warm up the runtime and the lazily built parts, then measure.
    flood_once(&hostile, 100).await;
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..3 {
        flood_once(&hostile, 20_000).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        grown < 256 * 1024,
        "{grown} bytes still live after three floods of 20,000 frames"
    );
}

async fn flood_once(hostile: &Hostile, n: u64) {
    let (client, mut events, mut ws) = start(hostile, options(Protocol::JsonReliable)).await;
    for i in 1..=n {
        ws.feed(Message::text(server_message(&format!("m{i}"), i)))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    for i in 1..=n {
        let event = next_event(&mut events, 10).await;
        assert_eq!(
            common::message_text(&event).as_deref(),
            Some(format!("m{i}").as_str())
        );
    }
    drop(client);
    closed_by_client(&mut ws).await;
    drop(events);
}

/// How the server ends a connection in the close-code tests.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Code(u16),
    /// No close frame: the TCP connection just ends (the client sees 1006).
    Abrupt,
}

async fn end(ws: &mut Ws, ending: Ending) {
    match ending {
        Ending::Code(code) => {
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: format!("closing with {code}").into(),
                }))
                .await;
        }
        Ending::Abrupt => {
            let _ = ws.get_mut().shutdown().await;
        }
    }
}

const ENDINGS: [Ending; 8] = [
    Ending::Code(1000),
    Ending::Code(1001),
    Ending::Abrupt,
    Ending::Code(1008),
    Ending::Code(1011),
    Ending::Code(4000),
    Ending::Code(4403),
    Ending::Code(4999),
];

#[tokio::test]
async fn every_close_code_on_the_reliable_protocol_recovers_except_1008() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    for ending in ENDINGS {
        let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
        end(&mut ws, ending).await;
        let (mut ws, uri) = hostile.accept().await;
        if matches!(ending, Ending::Code(1008)) {
            assert!(
                !uri.contains("awps_connection_id"),
                "{ending:?}: a new connection: {uri}"
            );
            let event = next_event(&mut events, 5).await;
            assert_eq!(
                event,
                Event::Disconnected {
                    connection_id: Some("conn1".into()),
                    message: Some("closing with 1008".into()),
                    close_code: Some(1008)
                }
            );
            connected(&mut ws, "conn2", "rt2").await;
            let (event, _) =
                wait_for(&mut events, 5, |e| matches!(e, Event::Connected { .. })).await;
            assert_eq!(
                event,
                Event::Connected {
                    connection_id: "conn2".into(),
                    user_id: Some("u".into())
                }
            );
        } else {
            assert!(
                uri.ends_with("awps_connection_id=conn1&awps_reconnection_token=rt1"),
                "{ending:?}: recovery expected: {uri}"
            );
            connected(&mut ws, "conn1", "rt1").await;
        }
        send(&mut ws, &server_message("alive", 1)).await;
        assert_eq!(
            until_message(&mut events, "alive").await,
            0,
            "{ending:?}: no other event (a recovery raises none)"
        );
        assert_eq!(client.state(), ClientState::Connected, "{ending:?}");
        drop(client);
        closed_by_client(&mut ws).await;
    }
}

#[tokio::test]
async fn every_close_code_on_the_json_protocol_is_reported_then_reconnected() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    for ending in ENDINGS {
        let (client, mut events, mut ws) = start(&hostile, options(Protocol::Json)).await;
        send(
            &mut ws,
            r#"{"type":"system","event":"disconnected","message":"bye"}"#,
        )
        .await;
        end(&mut ws, ending).await;
        let event = next_event(&mut events, 5).await;
        let close_code = match ending {
            Ending::Code(code) => Some(code),
            Ending::Abrupt => None,
        };
        assert_eq!(
            event,
            Event::Disconnected {
                connection_id: Some("conn1".into()),
                message: Some("bye".into()),
                close_code
            },
            "{ending:?}"
        );
        let (mut ws, uri) = hostile.accept().await;
        assert!(!uri.contains("awps_connection_id"), "{ending:?}: {uri}");
        connected(&mut ws, "conn2", "rt2").await;
        assert!(matches!(
            next_event(&mut events, 5).await,
            Event::Connected { connection_id, .. } if connection_id == "conn2"
        ));
        drop(client);
        closed_by_client(&mut ws).await;
    }
}

#[tokio::test]
async fn a_server_that_accepts_and_never_speaks_times_out_the_start() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let options = ClientOptions {
        start_timeout: Duration::from_millis(500),
        ..options(Protocol::JsonReliable)
    };
    let (client, _events, start) = starting(&hostile.url, options);
    let (mut ws, _) = hostile.accept().await;
    // Data frames before the connected frame are ignored; the connected frame never comes.
    send(&mut ws, &server_message("early", 1)).await;
    let peer = hostile.listener.local_addr().unwrap();
    assert_eq!(
        start.await.unwrap(),
        Err(Error::StartTimeout {
            after: Duration::from_millis(500),
            waiting_for: format!("the connected frame from {peer}"),
        })
    );
    assert_eq!(client.state(), ClientState::Stopped);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn a_start_timeout_names_what_the_attempt_waited_for() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let peer = hostile.listener.local_addr().unwrap();
    let options = ClientOptions {
        start_timeout: Duration::from_millis(300),
        ..options(Protocol::JsonReliable)
    };

    // A server that takes the connection and never answers the upgrade.
    let (_client, _events, start) = starting(&hostile.url, options.clone());
    let _silent = hostile.accept_tcp().await;
    let error = start.await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("timed out after 0.3 s waiting for {peer} to answer the WebSocket upgrade")
    );

    // A credential that never gives its URL.
    let credential = Credential::provider(std::future::pending::<Result<String, String>>);
    let (client, _events) = Client::with_channel(credential, options).unwrap();
    assert_eq!(
        client.start().await,
        Err(Error::StartTimeout {
            after: Duration::from_millis(300),
            waiting_for: "the credential to give the client URL".into(),
        })
    );
}

#[tokio::test]
async fn the_reason_of_a_recovered_close_is_not_reported_for_a_later_loss() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let (client, mut events, mut ws) = start(&hostile, options(Protocol::JsonReliable)).await;
    send(
        &mut ws,
        r#"{"type":"system","event":"disconnected","message":"service upgrade"}"#,
    )
    .await;
    end(&mut ws, Ending::Code(1001)).await;
    let (mut ws, uri) = hostile.accept().await;
    assert!(uri.contains("awps_connection_id=conn1"), "{uri}");
    connected(&mut ws, "conn1", "rt2").await;
    send(&mut ws, &server_message("recovered", 1)).await;
    assert_eq!(until_message(&mut events, "recovered").await, 0);
    end(&mut ws, Ending::Code(1008)).await;
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            connection_id: Some("conn1".into()),
            message: Some("closing with 1008".into()),
            close_code: Some(1008)
        }
    );
    drop(client);
}

#[tokio::test]
async fn a_recovery_whose_connections_close_at_once_ends_with_its_window() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let options = ClientOptions {
        recovery_window: Duration::from_secs(1),
        ..options(Protocol::JsonReliable)
    };
    let (client, mut events, mut ws) = start(&hostile, options).await;
    let c = client.clone();
    let send = tokio::spawn(async move { c.join_group("g").await });
    let join = recv(&mut ws).await;
    end(&mut ws, Ending::Abrupt).await;
    // Every recovery attempt is accepted, then closed before a single frame.
    let mut recoveries = 0;
    let mut ws = loop {
        let (mut ws, uri) = hostile.accept().await;
        if !uri.contains("awps_connection_id") {
            break ws;
        }
        recoveries += 1;
        assert!(
            recoveries < 100,
            "recovering for good, {recoveries} connections"
        );
        end(&mut ws, Ending::Code(1011)).await;
    };
    // The drop the recovery was for, without a close frame; not its attempts' 1011.
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            close_code: None,
            ..
        }
    ));
    assert_eq!(
        send.await.unwrap(),
        Err(Error::NotConnected {
            ack_id: join["ackId"].as_u64()
        })
    );
    connected(&mut ws, "conn2", "rt2").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    drop(client);
    closed_by_client(&mut ws).await;
}

#[tokio::test]
async fn a_session_whose_recovery_url_is_too_long_is_lost_at_once() {
    let _serial = SERIAL.lock().await;
    let hostile = Hostile::new().await;
    let options = ClientOptions {
        recovery_window: Duration::from_secs(30),
        ..options(Protocol::JsonReliable)
    };
    let (client, mut events, start) = starting(&hostile.url, options);
    let (mut ws, _) = hostile.accept().await;
    // Percent-encoded, 30,000 '+' take 90,000 bytes: no request can carry the recovery URL.
    connected(&mut ws, &"+".repeat(30_000), "rt1").await;
    start.await.unwrap().unwrap();
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    end(&mut ws, Ending::Abrupt).await;
    // Not after the recovery window: no attempt of it could have worked.
    let (event, _) = wait_for(&mut events, 5, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(
            event,
            Event::Disconnected {
                close_code: None,
                ..
            }
        ),
        "{event:?}"
    );
    let (mut ws, uri) = hostile.accept().await;
    assert!(!uri.contains("awps_connection_id"), "{uri}");
    connected(&mut ws, "conn2", "rt2").await;
    wait_for(&mut events, 5, |e| matches!(e, Event::Connected { .. })).await;
    drop(client);
    closed_by_client(&mut ws).await;
}
