//! Benchmark driver for our Rust API (`webpubsub_client::Client`), with the
//! default options (reliable JSON protocol), driven from the library's own
//! runtime as an application would.

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use webpubsub_bench::{
    cpu_time, emit, idle_result, mark, pub_result, ready_result, seq_result, wait_for_go, Args,
    ProcStatus, Receipts, Scenario, SentCount, IDLE_MIDPOINT,
};
use webpubsub_client::{Client, ClientOptions, Credential, DataType, Event, SendToGroupOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DRIVER: &str = "rust";

fn main() {
    let args = Args::parse();
    // The work runs as a task on the library's runtime, as a tokio application's
    // tasks would: a task woken by the connection task then usually runs on the
    // same worker thread, with no thread hand-off.
    let task = webpubsub_client::runtime::handle().spawn(async move {
        match args.scenario {
            Scenario::Seq => seq(&args).await,
            Scenario::Pub => publish(&args).await,
            Scenario::Sub => subscribe(&args).await,
            Scenario::Ready => ready(&args).await,
            Scenario::Idle => idle(&args).await,
        }
    });
    let outcome = webpubsub_client::runtime::block_on(task)
        .unwrap_or_else(|e| Err(format!("the benchmark task failed: {e}").into()));
    if let Err(e) = outcome {
        eprintln!("bench-rust: {e}");
        std::process::exit(1);
    }
}

/// A started client with its event channel.
async fn open(url: &str) -> Result<(Client, UnboundedReceiver<Event>)> {
    let (client, events) =
        Client::with_channel(Credential::Url(url.to_owned()), ClientOptions::default())?;
    client.start().await?;
    Ok((client, events))
}

fn data_type(args: &Args) -> DataType {
    if args.binary {
        DataType::Binary
    } else {
        DataType::Text
    }
}

fn acked() -> SendToGroupOptions {
    SendToGroupOptions::default()
}

async fn seq(args: &Args) -> Result<()> {
    let (client, _events) = open(&args.url).await?;
    let payload = Bytes::from(args.payload());
    let mut latencies = Vec::with_capacity(args.count as usize);
    mark("START");
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = args.deadline();
    for _ in 0..args.count {
        let t0 = Instant::now();
        if t0 >= deadline {
            break;
        }
        client
            .send_to_group(&args.group, data_type(args), payload.clone(), acked())
            .await?;
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    emit(
        DRIVER,
        args.scenario,
        seq_result(latencies, start.elapsed(), cpu_time().saturating_sub(cpu)),
    );
    client.stop().await;
    Ok(())
}

async fn publish(args: &Args) -> Result<()> {
    let (client, _events) = open(&args.url).await?;
    let payload = Bytes::from(args.payload());
    let go = args.clone();
    tokio::task::spawn_blocking(move || wait_for_go(&go)).await?;
    mark("START");
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = args.deadline();
    let mut sent = 0;
    let mut acked_count = 0;
    if args.window == 0 {
        let opts = SendToGroupOptions {
            fire_and_forget: true,
            ..SendToGroupOptions::default()
        };
        while sent < args.count && Instant::now() < deadline {
            client
                .send_to_group(&args.group, data_type(args), payload.clone(), opts)
                .await?;
            sent += 1;
        }
    } else {
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < args.window && sent < args.count && Instant::now() < deadline {
                in_flight.push(client.send_to_group(
                    &args.group,
                    data_type(args),
                    payload.clone(),
                    acked(),
                ));
                sent += 1;
            }
            match in_flight.next().await {
                Some(done) => {
                    done?;
                    acked_count += 1;
                }
                None => break,
            }
        }
    }
    let elapsed = start.elapsed();
    // CPU is counted until everything queued is written and the client stopped.
    client.stop().await;
    emit(
        DRIVER,
        args.scenario,
        pub_result(sent, acked_count, elapsed, cpu_time().saturating_sub(cpu)),
    );
    Ok(())
}

async fn subscribe(args: &Args) -> Result<()> {
    let (client, mut events) = open(&args.url).await?;
    client.join_group(&args.group).await?;
    let sent = SentCount::from_stdin();
    mark("READY");
    let cpu = cpu_time();
    let deadline = args.deadline();
    let mut got = Receipts::default();
    // Drains whatever has arrived in one wake-up, as a consumer that keeps up would.
    let mut batch = Vec::with_capacity(1024);
    while !got.done(args, deadline, &sent) {
        let poll = events.recv_many(&mut batch, 1024);
        match tokio::time::timeout(got.poll_interval(args), poll).await {
            Ok(0) => return Err("the event channel closed".into()),
            Ok(_) => {
                for event in batch.drain(..) {
                    if let Event::GroupMessage { data, .. } = event {
                        got.record(data.len());
                    }
                }
            }
            Err(_) => {}
        }
    }
    emit(DRIVER, args.scenario, got.result(cpu));
    client.stop().await;
    Ok(())
}

async fn ready(args: &Args) -> Result<()> {
    let payload = Bytes::from(args.payload());
    let mut times = Vec::new();
    mark("START");
    let deadline = args.deadline();
    for _ in 0..args.count {
        if Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        let (client, mut events) = open(&args.url).await?;
        client.join_group(&args.group).await?;
        client
            .send_to_group(&args.group, data_type(args), payload.clone(), acked())
            .await?;
        let arrived = async {
            loop {
                match events.recv().await {
                    Some(Event::GroupMessage { .. }) => return Ok(()),
                    Some(_) => continue,
                    None => return Err("the event channel closed"),
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), arrived)
            .await
            .map_err(|_| "group message did not arrive within 30 s")??;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        client.stop().await;
    }
    emit(DRIVER, args.scenario, ready_result(times));
    Ok(())
}

async fn idle(args: &Args) -> Result<()> {
    let before = ProcStatus::read();
    mark("START");
    let start = Instant::now();
    let mut clients = Vec::with_capacity(args.clients);
    let first = args.clients.min(IDLE_MIDPOINT);
    connect_many(&args.url, first, &mut clients).await?;
    let mid = ProcStatus::read();
    connect_many(&args.url, args.clients - first, &mut clients).await?;
    let connect_time = start.elapsed();
    let after = ProcStatus::read();
    emit(
        DRIVER,
        args.scenario,
        idle_result(args.clients, before, mid, after, connect_time),
    );
    // Stopping 1,000 clients one by one measures nothing; the result is out.
    std::process::exit(0);
}

/// Starts `n` clients, at most 50 handshakes at a time.
async fn connect_many(
    url: &str,
    n: usize,
    clients: &mut Vec<(Client, UnboundedReceiver<Event>)>,
) -> Result<()> {
    let mut pending = FuturesUnordered::new();
    let mut started = 0;
    while started < n || !pending.is_empty() {
        while started < n && pending.len() < 50 {
            pending.push(open(url));
            started += 1;
        }
        if let Some(client) = pending.next().await {
            clients.push(client?);
        }
    }
    Ok(())
}
