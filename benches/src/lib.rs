//! Shared pieces of the Rust benchmark drivers: the command line every driver
//! (in every language) accepts, statistics, process readings and the one JSON
//! result line that `run.py` reads.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Map, Value};

/// The subprotocol every contender uses (the official clients' default).
pub const SUBPROTOCOL: &str = "json.reliable.webpubsub.azure.v1";

/// Clients connected before the mid-point reading of the idle scenario.
pub const IDLE_MIDPOINT: usize = 100;

/// What one driver run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Sequential acked sends: rate and ack latency.
    Seq,
    /// Pipelined publishing (`--window 0` = fire-and-forget).
    Pub,
    /// The subscriber counting what a publisher in another process sends.
    Sub,
    /// Connect, join, send and receive the first message, repeatedly.
    Ready,
    /// Many idle connected clients: memory and threads.
    Idle,
}

/// The command line shared by all drivers (see `benches/BENCHMARKS.md`).
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// Which scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Client access URL (`ws://127.0.0.1:PORT/client/hubs/HUB?access_token=...`).
    #[arg(long)]
    pub url: String,
    /// Group used for sending and subscribing.
    #[arg(long, default_value = "bench")]
    pub group: String,
    /// Upper bound on messages (or iterations) measured.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Upper bound on the measured time, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 16)]
    pub size: usize,
    /// Send binary payloads instead of text.
    #[arg(long)]
    pub binary: bool,
    /// Acked sends in flight; 0 sends fire-and-forget.
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// Idle clients to connect.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Subscriber: stop after this long without a message (once one arrived).
    #[arg(long, default_value_t = 500)]
    pub idle_ms: u64,
    /// Publisher: once connected, wait for a line on stdin before measuring.
    #[arg(long)]
    pub go: bool,
}

impl Args {
    /// The measurement deadline, counted from now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs_f64(self.seconds)
    }

    /// The payload every message carries: `size` bytes of text or binary.
    pub fn payload(&self) -> Vec<u8> {
        if self.binary {
            (0..self.size).map(|i| (i % 251) as u8).collect()
        } else {
            vec![b'x'; self.size]
        }
    }

    /// The wire name of the payload's data type.
    pub fn data_type(&self) -> &'static str {
        if self.binary {
            "binary"
        } else {
            "text"
        }
    }
}

/// With `--go`, blocks until a line arrives on stdin (the subscriber is ready).
pub fn wait_for_go(args: &Args) {
    if args.go {
        let mut line = String::new();
        // EOF or an error also releases the publisher: run.py is gone or done.
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// Prints a marker line (`START`, `READY`) that `run.py` waits for.
pub fn mark(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means run.py is gone; nothing useful is left to do then.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints the one JSON result line: `fields` plus the driver and scenario names.
pub fn emit(driver: &str, scenario: Scenario, fields: Value) {
    let mut obj = Map::new();
    obj.insert("driver".into(), json!(driver));
    obj.insert(
        "scenario".into(),
        json!(format!("{scenario:?}").to_lowercase()),
    );
    if let Value::Object(extra) = fields {
        obj.extend(extra);
    }
    mark(&Value::Object(obj).to_string());
}

/// Nearest-rank percentile of an ascending slice (`q` in 0..=1); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Result fields of the sequential scenario from per-message latencies in µs.
pub fn seq_result(mut latencies_us: Vec<f64>, elapsed: Duration, cpu: Duration) -> Value {
    latencies_us.sort_by(f64::total_cmp);
    let n = latencies_us.len();
    json!({
        "count": n,
        "seconds": elapsed.as_secs_f64(),
        "rate": n as f64 / elapsed.as_secs_f64(),
        "p50_us": percentile(&latencies_us, 0.50),
        "p99_us": percentile(&latencies_us, 0.99),
        "cpu_s": cpu.as_secs_f64(),
    })
}

/// Result fields of the time-to-ready scenario from per-iteration times in ms.
pub fn ready_result(mut times_ms: Vec<f64>) -> Value {
    times_ms.sort_by(f64::total_cmp);
    let n = times_ms.len();
    json!({
        "count": n,
        "p50_ms": percentile(&times_ms, 0.50),
        "p99_ms": percentile(&times_ms, 0.99),
        "mean_ms": times_ms.iter().sum::<f64>() / n.max(1) as f64,
    })
}

/// Result fields of a publisher run.
pub fn pub_result(sent: u64, acked: u64, elapsed: Duration, cpu: Duration) -> Value {
    json!({
        "sent": sent,
        "acked": acked,
        "seconds": elapsed.as_secs_f64(),
        "rate": sent as f64 / elapsed.as_secs_f64(),
        "cpu_s": cpu.as_secs_f64(),
    })
}

/// What a subscriber has received so far.
#[derive(Debug, Default)]
pub struct Receipts {
    first: Option<Instant>,
    last: Option<Instant>,
    /// Messages received.
    pub count: u64,
    /// Payload bytes received.
    pub bytes: u64,
}

impl Receipts {
    /// Records one received message carrying `bytes` payload bytes.
    pub fn record(&mut self, bytes: usize) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.count += 1;
        self.bytes += bytes as u64;
    }

    /// Whether the subscriber should stop: `--count` reached, past `deadline`,
    /// or, once the publisher is done (see [`SentCount`]), everything it sent
    /// arrived or nothing more came for `--idle-ms`.
    pub fn done(&self, args: &Args, deadline: Instant, sent: &SentCount) -> bool {
        let now = Instant::now();
        if self.count >= args.count || now >= deadline {
            return true;
        }
        let Some((total, at)) = sent.get() else {
            return false;
        };
        if total.is_some_and(|n| self.count >= n) {
            return true;
        }
        let quiet_from = self.last.map_or(at, |last| last.max(at));
        now - quiet_from >= Duration::from_millis(args.idle_ms)
    }

    /// How long to wait for the next message before checking `done` again.
    pub fn poll_interval(&self, args: &Args) -> Duration {
        Duration::from_millis(args.idle_ms.clamp(1, 100))
    }

    /// Result fields: rate measured from the first to the last message, and the
    /// CPU time used since `cpu_start` (a [`cpu_time`] reading).
    pub fn result(&self, cpu_start: Duration) -> Value {
        let span = match (self.first, self.last) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let rate = if span > 0.0 {
            (self.count - 1) as f64 / span
        } else {
            0.0
        };
        json!({
            "received": self.count,
            "bytes": self.bytes,
            "seconds": span,
            "rate": rate,
            "cpu_s": (cpu_time().saturating_sub(cpu_start)).as_secs_f64(),
        })
    }
}

/// What run.py tells a subscriber on stdin once the publisher is done: how
/// many messages it sent. EOF without a number means "done, count unknown".
#[derive(Clone, Debug, Default)]
pub struct SentCount(Arc<Mutex<Option<PublisherDone>>>);

/// The publisher's sent count (if known) and when the subscriber learnt it.
pub type PublisherDone = (Option<u64>, Instant);

impl SentCount {
    /// Starts a thread that reads one line from stdin into the returned value.
    pub fn from_stdin() -> SentCount {
        let sent = SentCount::default();
        let setter = sent.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let total = match std::io::stdin().read_line(&mut line) {
                Ok(_) => line.trim().parse().ok(),
                Err(_) => None,
            };
            setter.set(total);
        });
        sent
    }

    /// Records that the publisher is done, having sent `total` (if known).
    pub fn set(&self, total: Option<u64>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((total, Instant::now()));
    }

    /// `None` while the publisher runs; then its count and when it was told.
    pub fn get(&self) -> Option<PublisherDone> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// CPU time consumed so far by this process, all threads, exited ones included
/// (`CLOCK_PROCESS_CPUTIME_ID`, as the C and Python drivers read it).
pub fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `VmRSS` (KiB) and `Threads` of this process, from `/proc/self/status`.
#[derive(Debug, Clone, Copy)]
pub struct ProcStatus {
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Number of threads.
    pub threads: u64,
}

impl ProcStatus {
    /// Reads `/proc/self/status`; zeros where a field is missing.
    pub fn read() -> ProcStatus {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        ProcStatus {
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
        }
    }
}

/// Result fields of the idle scenario from readings before any client, after
/// [`IDLE_MIDPOINT`] clients and after all `clients`.
pub fn idle_result(
    clients: usize,
    before: ProcStatus,
    mid: ProcStatus,
    after: ProcStatus,
    connect: Duration,
) -> Value {
    let marginal = clients.saturating_sub(IDLE_MIDPOINT).max(1) as f64;
    json!({
        "clients": clients,
        "rss_before_kib": before.rss_kib,
        "rss_mid_kib": mid.rss_kib,
        "rss_after_kib": after.rss_kib,
        "threads_before": before.threads,
        "threads_mid": mid.threads,
        "threads_after": after.threads,
        "rss_per_client_kib": (after.rss_kib.saturating_sub(mid.rss_kib)) as f64 / marginal,
        "rss_total_per_client_kib": (after.rss_kib.saturating_sub(before.rss_kib)) as f64 / clients.max(1) as f64,
        "connect_seconds": connect.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn subscriber_stops_when_everything_sent_arrived() {
        let args = Args::parse_from([
            "x",
            "sub",
            "--url",
            "u",
            "--count",
            "100",
            "--idle-ms",
            "60000",
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let sent = SentCount::default();
        let mut got = Receipts::default();
        got.record(1);
        got.record(1);
        assert!(!got.done(&args, deadline, &sent), "publisher still running");
        sent.set(Some(3));
        assert!(
            !got.done(&args, deadline, &sent),
            "one message still missing"
        );
        got.record(1);
        assert!(got.done(&args, deadline, &sent));
    }

    #[test]
    fn subscriber_stops_when_quiet_after_the_publisher_is_done() {
        let args = Args::parse_from(["x", "sub", "--url", "u", "--idle-ms", "0"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let sent = SentCount::default();
        let got = Receipts::default();
        assert!(!got.done(&args, deadline, &sent));
        sent.set(None);
        assert!(got.done(&args, deadline, &sent));
        assert!(
            got.done(&args, Instant::now(), &SentCount::default()),
            "deadline"
        );
    }

    #[test]
    fn proc_status_reads_this_process() {
        let s = ProcStatus::read();
        assert!(s.rss_kib > 0);
        assert!(s.threads >= 1);
    }

    #[test]
    fn receipts_rate_spans_first_to_last() {
        let mut r = Receipts::default();
        assert_eq!(r.result(cpu_time())["rate"], 0.0);
        r.record(3);
        std::thread::sleep(Duration::from_millis(20));
        r.record(3);
        let v = r.result(Duration::ZERO);
        assert!(v["cpu_s"].as_f64().unwrap() > 0.0);
        assert_eq!(v["received"], 2);
        assert_eq!(v["bytes"], 6);
        let rate = v["rate"].as_f64().unwrap();
        assert!(rate > 0.0 && rate < 60.0, "{rate}");
    }
}
