//! The floor: a bare WebSocket client (tokio-tungstenite) that writes the same
//! JSON frames as a Web PubSub client, with no protocol logic beyond what the
//! measurement needs (matching acks, acknowledging sequence ids). Frames are
//! written from a borrowed struct and read into one (serde derive), as a lean
//! client would: no JSON tree per frame.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use clap::Parser;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webpubsub_bench::{
    cpu_time, emit, idle_result, mark, pub_result, ready_result, seq_result, wait_for_go, Args,
    ProcStatus, Receipts, Scenario, SentCount, IDLE_MIDPOINT, SUBPROTOCOL,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DRIVER: &str = "raw";
/// The service keeps unacknowledged frames for replay; acknowledge at least this often.
const SEQUENCE_ACK_EVERY: u64 = 300;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let outcome = match args.scenario {
        Scenario::Seq => seq(&args).await,
        Scenario::Pub => publish(&args).await,
        Scenario::Sub => subscribe(&args).await,
        Scenario::Ready => ready(&args).await,
        Scenario::Idle => idle(&args).await,
    };
    if let Err(e) = outcome {
        eprintln!("bench-raw: {e}");
        std::process::exit(1);
    }
}

/// Opens the socket and waits for the `connected` system frame.
async fn connect(url: &str) -> Result<Ws> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    loop {
        let text = next_text(&mut ws).await?;
        let frame = parse(&text)?;
        if frame.kind == "system" && frame.event.as_deref() == Some("connected") {
            return Ok(ws);
        }
    }
}

/// The fields of a received frame that the measurement reads, borrowed from its text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Inbound<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    ack_id: Option<u64>,
    success: Option<bool>,
    sequence_id: Option<u64>,
    #[serde(borrow)]
    group: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<Cow<'a, str>>,
}

fn parse(text: &str) -> Result<Inbound<'_>> {
    Ok(serde_json::from_str(text)?)
}

/// The next text frame.
async fn next_text<S>(ws: &mut S) -> Result<Utf8Bytes>
where
    S: futures_util::Stream<Item = tokio_tungstenite::tungstenite::Result<Message>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}").into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("connection ended".into()),
        }
    }
}

/// Reads frames until the ack for `ack_id`; fails on `success:false`.
async fn wait_ack<S>(ws: &mut S, ack_id: u64) -> Result<()>
where
    S: futures_util::Stream<Item = tokio_tungstenite::tungstenite::Result<Message>> + Unpin,
{
    loop {
        let text = next_text(ws).await?;
        let frame = parse(&text)?;
        if frame.kind == "ack" && frame.ack_id == Some(ack_id) {
            return check_ack(&frame, &text);
        }
    }
}

fn check_ack(frame: &Inbound<'_>, text: &str) -> Result<()> {
    if frame.success == Some(true) {
        Ok(())
    } else {
        Err(format!("ack failed: {text}").into())
    }
}

/// A `sendToGroup` frame, serialized from borrowed parts.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SendToGroup<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    group: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_id: Option<u64>,
    no_echo: bool,
    data_type: &'static str,
    data: &'a str,
}

/// Builds the JSON text of a `sendToGroup` frame, encoding the payload per message.
fn send_frame(args: &Args, payload: &[u8], ack_id: Option<u64>) -> Result<String> {
    let data = if args.binary {
        Cow::Owned(base64::engine::general_purpose::STANDARD.encode(payload))
    } else {
        String::from_utf8_lossy(payload)
    };
    let frame = SendToGroup {
        kind: "sendToGroup",
        group: &args.group,
        ack_id,
        no_echo: false,
        data_type: args.data_type(),
        data: &data,
    };
    Ok(serde_json::to_string(&frame)?)
}

fn join_frame(group: &str, ack_id: u64) -> String {
    serde_json::json!({"type": "joinGroup", "group": group, "ackId": ack_id}).to_string()
}

async fn seq(args: &Args) -> Result<()> {
    let mut ws = connect(&args.url).await?;
    let payload = args.payload();
    let mut latencies = Vec::with_capacity(args.count as usize);
    mark("START");
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = args.deadline();
    for ack_id in 1..=args.count {
        if Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        ws.send(Message::text(send_frame(args, &payload, Some(ack_id))?))
            .await?;
        wait_ack(&mut ws, ack_id).await?;
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed();
    emit(
        DRIVER,
        args.scenario,
        seq_result(latencies, elapsed, cpu_time().saturating_sub(cpu)),
    );
    ws.close(None).await?;
    Ok(())
}

async fn publish(args: &Args) -> Result<()> {
    let ws = connect(&args.url).await?;
    let (mut sink, stream) = ws.split();
    let payload = args.payload();
    let window = Arc::new(Semaphore::new(args.window));
    let acked = Arc::new(AtomicU64::new(0));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    // Fire-and-forget gets no acks: the reader then only keeps the socket drained.
    let reader = tokio::spawn(read_acks(
        stream,
        window.clone(),
        acked.clone(),
        target.clone(),
    ));
    let go = args.clone();
    tokio::task::spawn_blocking(move || wait_for_go(&go)).await?;
    mark("START");
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = args.deadline();
    let mut sent = 0;
    while sent < args.count && Instant::now() < deadline {
        let ack_id = if args.window > 0 {
            let permit = match window.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    sink.flush().await?;
                    window.acquire().await?
                }
            };
            permit.forget();
            Some(sent + 1)
        } else {
            None
        };
        sink.feed(Message::text(send_frame(args, &payload, ack_id)?))
            .await?;
        sent += 1;
    }
    sink.flush().await?;
    if args.window > 0 {
        target.store(sent, Ordering::SeqCst);
        if acked.load(Ordering::SeqCst) < sent {
            reader.await??;
        }
    }
    let elapsed = start.elapsed();
    sink.close().await?;
    emit(
        DRIVER,
        args.scenario,
        pub_result(
            sent,
            acked.load(Ordering::SeqCst),
            elapsed,
            cpu_time().saturating_sub(cpu),
        ),
    );
    Ok(())
}

/// Counts acks, returning a permit for each, until `target` acks arrived.
async fn read_acks(
    mut stream: SplitStream<Ws>,
    window: Arc<Semaphore>,
    acked: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
) -> Result<()> {
    loop {
        let text = next_text(&mut stream).await?;
        let frame = parse(&text)?;
        if frame.kind == "ack" {
            check_ack(&frame, &text)?;
            window.add_permits(1);
            let n = acked.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= target.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }
}

async fn subscribe(args: &Args) -> Result<()> {
    let mut ws = connect(&args.url).await?;
    ws.send(Message::text(join_frame(&args.group, 1))).await?;
    wait_ack(&mut ws, 1).await?;
    let (mut sink, mut stream) = ws.split();
    let sent = SentCount::from_stdin();
    mark("READY");
    let cpu = cpu_time();
    let deadline = args.deadline();
    let mut got = Receipts::default();
    let mut acked_seq = 0;
    let mut last_seq = 0;
    while !got.done(args, deadline, &sent) {
        let text = match tokio::time::timeout(got.poll_interval(args), next_text(&mut stream)).await
        {
            Ok(text) => text?,
            Err(_) => continue,
        };
        let frame = parse(&text)?;
        if frame.kind != "message" {
            continue;
        }
        got.record(payload_len(&frame)?);
        last_seq = frame.sequence_id.unwrap_or(last_seq);
        if last_seq >= acked_seq + SEQUENCE_ACK_EVERY {
            sequence_ack(&mut sink, last_seq).await?;
            acked_seq = last_seq;
        }
    }
    if last_seq > acked_seq {
        sequence_ack(&mut sink, last_seq).await?;
    }
    emit(DRIVER, args.scenario, got.result(cpu));
    sink.close().await?;
    Ok(())
}

async fn sequence_ack(sink: &mut SplitSink<Ws, Message>, id: u64) -> Result<()> {
    let frame = serde_json::json!({"type": "sequenceAck", "sequenceId": id});
    sink.send(Message::text(frame.to_string())).await?;
    Ok(())
}

/// Payload size of a data frame, decoding binary as a client would.
fn payload_len(frame: &Inbound<'_>) -> Result<usize> {
    let data = frame.data.as_deref().unwrap_or_default();
    if frame.data_type.as_deref() == Some("binary") {
        Ok(base64::engine::general_purpose::STANDARD
            .decode(data)?
            .len())
    } else {
        Ok(data.len())
    }
}

async fn ready(args: &Args) -> Result<()> {
    let payload = args.payload();
    let mut times = Vec::new();
    mark("START");
    let deadline = args.deadline();
    for _ in 0..args.count {
        if Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        let mut ws = connect(&args.url).await?;
        ws.send(Message::text(join_frame(&args.group, 1))).await?;
        wait_ack(&mut ws, 1).await?;
        ws.send(Message::text(send_frame(args, &payload, Some(2))?))
            .await?;
        loop {
            let text = next_text(&mut ws).await?;
            let frame = parse(&text)?;
            if frame.kind == "message" && frame.group.as_deref() == Some(args.group.as_str()) {
                break;
            }
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        ws.close(None).await?;
    }
    emit(DRIVER, args.scenario, ready_result(times));
    Ok(())
}

async fn idle(args: &Args) -> Result<()> {
    let before = ProcStatus::read();
    mark("START");
    let start = Instant::now();
    let mut readers = Vec::with_capacity(args.clients);
    let first = args.clients.min(IDLE_MIDPOINT);
    connect_idle(&args.url, first, &mut readers).await?;
    let mid = ProcStatus::read();
    connect_idle(&args.url, args.clients - first, &mut readers).await?;
    let connect_time = start.elapsed();
    let after = ProcStatus::read();
    emit(
        DRIVER,
        args.scenario,
        idle_result(args.clients, before, mid, after, connect_time),
    );
    for reader in readers {
        reader.abort();
    }
    Ok(())
}

/// Connects `n` clients, at most 50 handshakes at a time, each then kept
/// open by a task reading its socket.
async fn connect_idle(
    url: &str,
    n: usize,
    readers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<()> {
    let mut pending = FuturesUnordered::new();
    let mut started = 0;
    while started < n || !pending.is_empty() {
        while started < n && pending.len() < 50 {
            pending.push(connect(url));
            started += 1;
        }
        if let Some(ws) = pending.next().await {
            let mut ws = ws?;
            readers.push(tokio::spawn(async move {
                while let Some(Ok(_)) = ws.next().await {}
            }));
        }
    }
    Ok(())
}
