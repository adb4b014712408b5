//! The floor: a bare WebSocket client (tokio-tungstenite) that writes the same
//! JSON frames as a Web PubSub client, with no protocol logic beyond what the
//! measurement needs (matching acks, acknowledging sequence ids). No client
//! library can be faster than this over the same socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use clap::Parser;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
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
        let frame = next_json(&mut ws).await?;
        if frame["type"] == "system" && frame["event"] == "connected" {
            return Ok(ws);
        }
    }
}

/// The next text frame, parsed.
async fn next_json<S>(ws: &mut S) -> Result<Value>
where
    S: futures_util::Stream<Item = tokio_tungstenite::tungstenite::Result<Message>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
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
        let frame = next_json(ws).await?;
        if frame["type"] == "ack" && frame["ackId"] == ack_id {
            return check_ack(&frame);
        }
    }
}

fn check_ack(frame: &Value) -> Result<()> {
    if frame["success"] == true {
        Ok(())
    } else {
        Err(format!("ack failed: {frame}").into())
    }
}

/// Builds the JSON text of a `sendToGroup` frame, encoding the payload per message.
fn send_frame(args: &Args, payload: &[u8], ack_id: Option<u64>) -> String {
    let data = if args.binary {
        Value::String(base64::engine::general_purpose::STANDARD.encode(payload))
    } else {
        Value::String(String::from_utf8_lossy(payload).into_owned())
    };
    let mut frame = serde_json::json!({
        "type": "sendToGroup",
        "group": args.group,
        "noEcho": false,
        "dataType": args.data_type(),
        "data": data,
    });
    if let Some(id) = ack_id {
        frame["ackId"] = id.into();
    }
    frame.to_string()
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
        ws.send(Message::text(send_frame(args, &payload, Some(ack_id))))
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
        sink.feed(Message::text(send_frame(args, &payload, ack_id)))
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
        let frame = next_json(&mut stream).await?;
        if frame["type"] == "ack" {
            check_ack(&frame)?;
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
        let frame =
            match tokio::time::timeout(got.poll_interval(args), next_json(&mut stream)).await {
                Ok(frame) => frame?,
                Err(_) => continue,
            };
        if frame["type"] != "message" {
            continue;
        }
        got.record(payload_len(&frame)?);
        last_seq = frame["sequenceId"].as_u64().unwrap_or(last_seq);
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
fn payload_len(frame: &Value) -> Result<usize> {
    let data = frame["data"].as_str().unwrap_or_default();
    if frame["dataType"] == "binary" {
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
        ws.send(Message::text(send_frame(args, &payload, Some(2))))
            .await?;
        loop {
            let frame = next_json(&mut ws).await?;
            if frame["type"] == "message" && frame["group"] == args.group.as_str() {
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
