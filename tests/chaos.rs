//! Chaos soak: publishers and subscribers on `json.reliable` while the network cuts
//! their sockets at random moments.
//!
//! Every client talks to the emulator through its own chaos proxy. The proxy gives
//! each TCP connection a random lifetime; when it runs out, the next chunk in either
//! direction is forwarded only in part (so the cut lands inside a WebSocket frame or
//! inside the HTTP upgrade of a recovery) and both sides are closed. One subscriber
//! is "unlucky": besides the cuts, the emulator now and then forgets its session
//! (`:drop?recoverable=false`), so its recovery is refused with 1008 and a full
//! reconnect follows.
//!
//! Checked, per subscriber and publisher: no duplicate, order kept, nothing lost
//! except across a full reconnect, which must be reported as `Disconnected` (without a
//! close code: the drop whose recovery was refused had no close frame) then `Connected`
//! with a new connection id, once per refused recovery. Each publisher gets exactly one
//! success per message, acked with its counter as ackId: the first two publishers send
//! one message at a time with automatic ackIds (their callers write their own frames),
//! the first through the Rust API's futures, the second through the C API's
//! asynchronous form and its completion callback; the others pipeline with the counter
//! as their chosen ackId.
//!
//! The short form runs in `cargo test`. The long form is ignored by default:
//! `WPS_CHAOS_MESSAGES=100000 WPS_CHAOS_DROP_MS=200 WPS_CHAOS_SECONDS=900 \
//!  cargo test --release --test chaos -- --ignored --nocapture`

mod common;

use bytes::Bytes;
use common::{all_roles, stats};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::ffi::{c_void, CStr, CString};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, sleep_until, Instant};
use webpubsub_client::ffi::callbacks::{wps_completion, wps_event, WPS_EVENT_CONNECTED};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_new, wps_client_send_to_group_async, wps_client_start,
    wps_client_stop,
};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_ack_timeout_ms,
    wps_options_set_reconnect_retry, wps_options_set_recovery,
    wps_options_set_sequence_ack_interval_ms, wps_options_set_start_timeout_ms,
};
use webpubsub_client::ffi::status::{
    wps_last_error_message, WPS_DATA_TYPE_TEXT, WPS_RETRY_FIXED, WPS_STATUS_OK,
};
use webpubsub_client::{
    AckResult, Client, ClientOptions, ClientState, Credential, DataType, Error, Event, RetryMode,
    RetryOptions, SendToGroupOptions,
};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

const HUB: &str = "chaos";
const GROUP: &str = "soak";

/// What one run does.
#[derive(Debug, Clone)]
struct Settings {
    /// Messages per publisher (the counter runs 1..=messages).
    messages: u64,
    publishers: u64,
    /// Subscribers that only see recoverable cuts.
    steady_subscribers: usize,
    /// Mean lifetime of a proxied TCP connection.
    drop_ms: u64,
    /// Mean interval between refused recoveries of the unlucky subscriber.
    refuse_ms: u64,
    /// Acked sends in flight per publisher.
    window: usize,
    /// Time bound of the publishing phase (publishers stop early when it is over).
    seconds: u64,
    seed: u64,
}

impl Settings {
    fn from_env(defaults: Settings) -> Settings {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name} must be a number"))
                })
                .unwrap_or(default)
        };
        Settings {
            messages: var("WPS_CHAOS_MESSAGES", defaults.messages),
            publishers: var("WPS_CHAOS_PUBLISHERS", defaults.publishers).max(1),
            steady_subscribers: var("WPS_CHAOS_SUBSCRIBERS", defaults.steady_subscribers as u64)
                as usize,
            drop_ms: var("WPS_CHAOS_DROP_MS", defaults.drop_ms).max(1),
            refuse_ms: var("WPS_CHAOS_REFUSE_MS", defaults.refuse_ms).max(1),
            window: var("WPS_CHAOS_WINDOW", defaults.window as u64).clamp(1, 512) as usize,
            seconds: var("WPS_CHAOS_SECONDS", defaults.seconds),
            seed: var("WPS_CHAOS_SEED", defaults.seed),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    run(Settings {
        messages: 10_000,
        publishers: 3,
        steady_subscribers: 2,
        drop_ms: 200,
        refuse_ms: 500,
        window: 64,
        seconds: 40,
        seed: seed(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long soak: run with --ignored (see the module docs and TESTING.md)"]
async fn chaos_long() {
    run(Settings::from_env(Settings {
        messages: 100_000,
        publishers: 3,
        steady_subscribers: 2,
        drop_ms: 200,
        refuse_ms: 3000,
        window: 128,
        seconds: 900,
        seed: seed(),
    }))
    .await;
}

fn seed() -> u64 {
    std::env::var("WPS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// xorshift64*: enough randomness for fault timing, reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// The chaos proxy
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ProxyStats {
    connections: AtomicU64,
    cuts: AtomicU64,
    /// Cuts whose last forwarded byte was not the end of a WebSocket frame.
    mid_frame_cuts: AtomicU64,
    /// Cuts before the HTTP upgrade completed (new connections and recoveries).
    upgrade_cuts: AtomicU64,
    /// Complete data frames (with a sequenceId) forwarded to the client.
    data_frames: AtomicU64,
}

/// A TCP proxy in front of the emulator that cuts its connections at random.
struct Proxy {
    port: u16,
    stats: Arc<ProxyStats>,
    /// No more cuts (existing and new connections live on).
    calm: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Proxy {
    async fn start(target: u16, drop_ms: u64, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(ProxyStats::default());
        let calm = Arc::new(AtomicBool::new(false));
        let (s, c) = (stats.clone(), calm.clone());
        let accept = tokio::spawn(async move {
            let mut rng = Rng(seed);
            let mut links = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                while links.try_join_next().is_some() {}
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                s.connections.fetch_add(1, Ordering::Relaxed);
                // One in ten connections dies young: inside the upgrade or the replay of
                // a recovery. The others live 0..2x the mean.
                let life = if rng.below(10) == 0 {
                    Duration::from_millis(rng.below(15))
                } else {
                    Duration::from_millis(rng.below(2 * drop_ms))
                };
                links.spawn(link(
                    client,
                    server,
                    life,
                    rng.next() | 1,
                    s.clone(),
                    c.clone(),
                ));
            }
        });
        Proxy {
            port,
            stats,
            calm,
            accept,
        }
    }
}

/// Follows the WebSocket framing of one direction (after the HTTP head) to tell
/// frame boundaries and count complete data frames.
struct Framing {
    in_head: bool,
    buf: Vec<u8>,
    data_frames: u64,
}

impl Framing {
    fn new() -> Framing {
        Framing {
            in_head: true,
            buf: Vec::new(),
            data_frames: 0,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.in_head {
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            self.buf.drain(..end + 4);
            self.in_head = false;
        }
        loop {
            let b = &self.buf;
            if b.len() < 2 {
                return;
            }
            let masked = b[1] & 0x80 != 0;
            let (len, mut header) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => return,
                n => (n as usize, 2),
            };
            if masked {
                header += 4;
            }
            if b.len() < header + len {
                return;
            }
            let text = b[0] & 0x0f == 1;
            if text && !masked && contains(&b[header..header + len], b"\"sequenceId\"") {
                self.data_frames += 1;
            }
            self.buf.drain(..header + len);
        }
    }

    fn at_boundary(&self) -> bool {
        !self.in_head && self.buf.is_empty()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Pipes one proxied connection until its life is over, then cuts it mid-chunk.
async fn link(
    client: TcpStream,
    server: TcpStream,
    life: Duration,
    seed: u64,
    stats: Arc<ProxyStats>,
    calm: Arc<AtomicBool>,
) {
    let mut rng = Rng(seed);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down) = (Framing::new(), Framing::new());
    let (mut up_buf, mut down_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let far = Instant::now() + Duration::from_secs(86_400);
    let expiry = sleep_until(Instant::now() + life);
    tokio::pin!(expiry);
    // Once expired: the next chunk is cut; an idle link is cut after a short grace.
    let mut cutting = false;
    loop {
        tokio::select! {
            n = client_read.read(&mut up_buf) => {
                let Ok(n @ 1..) = n else { break };
                let chunk = &up_buf[..n];
                if cutting && !calm.load(Ordering::Relaxed) {
                    let keep = rng.below(n as u64) as usize;
                    up.feed(&chunk[..keep]);
                    let _ = server_write.write_all(&chunk[..keep]).await;
                    record_cut(&stats, &up, &down);
                    break;
                }
                up.feed(chunk);
                if server_write.write_all(chunk).await.is_err() { break; }
            }
            n = server_read.read(&mut down_buf) => {
                let Ok(n @ 1..) = n else { break };
                let chunk = &down_buf[..n];
                if cutting && !calm.load(Ordering::Relaxed) {
                    let keep = rng.below(n as u64) as usize;
                    down.feed(&chunk[..keep]);
                    let _ = client_write.write_all(&chunk[..keep]).await;
                    stats.data_frames.fetch_add(std::mem::take(&mut down.data_frames), Ordering::Relaxed);
                    record_cut(&stats, &up, &down);
                    break;
                }
                down.feed(chunk);
                stats.data_frames.fetch_add(std::mem::take(&mut down.data_frames), Ordering::Relaxed);
                if client_write.write_all(chunk).await.is_err() { break; }
            }
            () = &mut expiry => {
                if calm.load(Ordering::Relaxed) {
                    expiry.as_mut().reset(far);
                } else if cutting {
                    record_cut(&stats, &up, &down);
                    break;
                } else {
                    cutting = true;
                    expiry.as_mut().reset(Instant::now() + Duration::from_millis(20));
                }
            }
        }
    }
    stats
        .data_frames
        .fetch_add(down.data_frames, Ordering::Relaxed);
}

fn record_cut(stats: &ProxyStats, up: &Framing, down: &Framing) {
    stats.cuts.fetch_add(1, Ordering::Relaxed);
    if up.in_head || down.in_head {
        stats.upgrade_cuts.fetch_add(1, Ordering::Relaxed);
    } else if !up.at_boundary() || !down.at_boundary() {
        stats.mid_frame_cuts.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

fn options() -> ClientOptions {
    ClientOptions {
        reconnect_retry: RetryOptions {
            max_retries: None,
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        },
        ack_timeout: Duration::from_secs(60),
        start_timeout: Duration::from_secs(5),
        recovery_window: Duration::from_secs(30),
        recovery_attempt_delay: Duration::from_millis(50),
        sequence_ack_interval: Duration::from_millis(100),
        ..ClientOptions::default()
    }
}

/// What a subscriber saw, in order.
#[derive(Debug, Clone)]
enum Seen {
    Message { publisher: u64, counter: u64 },
    Connected(String),
    Disconnected(Option<u16>),
    RejoinFailed(Error),
}

struct Subscriber {
    name: String,
    client: Client,
    proxy: Proxy,
    check: Arc<Mutex<Check>>,
    /// Highest counter received per publisher (progress, read without the lock).
    highest: Arc<Vec<AtomicU64>>,
    collector: tokio::task::JoinHandle<()>,
}

/// A client access URL of `user` that goes through `proxy`.
fn url_via(emulator: &Emulator, proxy: &Proxy, user: &str) -> String {
    let url = emulator.client_url(
        HUB,
        &TokenOptions {
            user_id: Some(user.into()),
            roles: all_roles(),
            ..TokenOptions::default()
        },
    );
    url.replacen(
        &format!("127.0.0.1:{}/", emulator.port()),
        &format!("127.0.0.1:{}/", proxy.port),
        1,
    )
}

async fn client_via(
    emulator: &Emulator,
    proxy: &Proxy,
    user: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Event>, String) {
    let url = url_via(emulator, proxy, user);
    let (client, mut events) = Client::with_channel(Credential::Url(url), options()).unwrap();
    // The proxy may cut the very first connection too: retry the start (bounded).
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.start().await {
            Ok(()) => break,
            Err(e) if attempts < 50 => {
                assert!(
                    matches!(e, Error::Connect(_) | Error::Timeout { .. }),
                    "start of {user}: {e}"
                );
                sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{user} could not start in {attempts} attempts: {e}"),
        }
    }
    let id = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Event::Connected { connection_id, .. })) => break connection_id,
            Ok(Some(Event::Stopped { .. } | Event::Disconnected { .. })) => {}
            other => panic!("{user}: no Connected event: {other:?}"),
        }
    };
    (client, events, id)
}

/// A client of the C API, with the options of [`options`]. It records the kinds of
/// the events it gets after its first `Connected`: a publisher only recovers, so none
/// may come.
struct CClient {
    handle: *mut wps_client,
    /// Lent to the client as its event callback's user data; outlives it.
    events: Box<Mutex<Vec<u32>>>,
}

// SAFETY: the C API may be called from any thread; `events` is behind a lock.
unsafe impl Send for CClient {}
unsafe impl Sync for CClient {}

unsafe extern "C" fn on_c_event(user_data: *mut c_void, event: *const wps_event) {
    let events = &*(user_data as *const Mutex<Vec<u32>>);
    events.lock().unwrap().push((*event).kind);
}

/// Settles the send whose boxed reply is `user_data`.
unsafe extern "C" fn on_c_sent(user_data: *mut c_void, done: *const wps_completion) {
    let reply =
        Box::from_raw(user_data as *mut tokio::sync::oneshot::Sender<Result<AckResult, Error>>);
    let done = &*done;
    let result = if done.status == WPS_STATUS_OK {
        Ok(AckResult {
            ack_id: done.has_ack_id.then_some(done.ack_id),
            is_duplicated: done.is_duplicated,
        })
    } else {
        let message = match done.error_message.is_null() {
            true => String::new(),
            false => CStr::from_ptr(done.error_message)
                .to_string_lossy()
                .into_owned(),
        };
        Err(Error::Protocol(format!(
            "status {}: {message}",
            done.status
        )))
    };
    let _ = reply.send(result);
}

fn c_check(status: u32, what: &str) {
    if status != WPS_STATUS_OK {
        let detail = unsafe { CStr::from_ptr(wps_last_error_message()) };
        panic!("{what}: status {status}: {detail:?}");
    }
}

impl CClient {
    /// Starts a C client of `user` through `proxy` (the start is retried, bounded, as
    /// the proxy may cut the first connection too).
    fn start_via(emulator: &Emulator, proxy: &Proxy, user: &str) -> CClient {
        let url = CString::new(url_via(emulator, proxy, user)).unwrap();
        let events: Box<Mutex<Vec<u32>>> = Box::default();
        let mut handle = std::ptr::null_mut();
        unsafe {
            let o = wps_options_new();
            c_check(
                wps_options_set_reconnect_retry(o, u32::MAX, 100, 1000, WPS_RETRY_FIXED),
                "reconnect retry",
            );
            c_check(wps_options_set_ack_timeout_ms(o, 60_000), "ack timeout");
            c_check(wps_options_set_start_timeout_ms(o, 5_000), "start timeout");
            c_check(wps_options_set_recovery(o, 30_000, 50), "recovery");
            c_check(
                wps_options_set_sequence_ack_interval_ms(o, 100),
                "sequence ack",
            );
            let status = wps_client_new(
                url.as_ptr(),
                o,
                Some(on_c_event),
                &*events as *const Mutex<Vec<u32>> as *mut c_void,
                None,
                &mut handle,
            );
            wps_options_free(o);
            c_check(status, "wps_client_new");
        }
        let client = CClient { handle, events };
        let mut attempts = 0;
        while unsafe { wps_client_start(client.handle) } != WPS_STATUS_OK {
            attempts += 1;
            assert!(
                attempts < 50,
                "{user} could not start in {attempts} attempts"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !client.events.lock().unwrap().contains(&WPS_EVENT_CONNECTED) {
            assert!(
                std::time::Instant::now() < deadline,
                "{user}: no Connected event"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        client.events.lock().unwrap().clear();
        client
    }

    /// Sends `data` to the group with the asynchronous C form; the future settles from
    /// the completion callback.
    fn send(&self, data: Bytes) -> impl Future<Output = Result<AckResult, Error>> {
        let (reply, settled) = tokio::sync::oneshot::channel();
        let user_data = Box::into_raw(Box::new(reply)) as *mut c_void;
        let group = CString::new(GROUP).unwrap();
        let mut op = 0;
        let status = unsafe {
            wps_client_send_to_group_async(
                self.handle,
                group.as_ptr(),
                WPS_DATA_TYPE_TEXT,
                data.as_ptr(),
                data.len(),
                0,
                Some(on_c_sent),
                user_data,
                &mut op,
            )
        };
        if status != WPS_STATUS_OK {
            // The call failed: nothing completes, the reply is ours again.
            drop(unsafe {
                Box::from_raw(
                    user_data as *mut tokio::sync::oneshot::Sender<Result<AckResult, Error>>,
                )
            });
        }
        async move {
            match status {
                WPS_STATUS_OK => settled
                    .await
                    .unwrap_or(Err(Error::Stopped { ack_id: None })),
                _ => Err(Error::Protocol(format!(
                    "the send was refused: status {status}"
                ))),
            }
        }
    }
}

impl Drop for CClient {
    fn drop(&mut self) {
        unsafe {
            wps_client_stop(self.handle);
            wps_client_free(self.handle);
        }
    }
}

/// How a publisher sends.
#[derive(Clone)]
enum Sender {
    Rust(Client),
    C(Arc<CClient>),
}

impl Sender {
    /// The events since it started, from `events` for a Rust client (a publisher only
    /// recovers: none may come).
    fn events_since_start(
        &self,
        events: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    ) -> Vec<String> {
        match (self, events) {
            (Sender::Rust(_), Some(events)) => std::iter::from_fn(|| events.try_recv().ok())
                .map(|e| format!("{e:?}"))
                .collect(),
            (Sender::C(c), _) => {
                let kinds = c.events.lock().unwrap();
                kinds.iter().map(|k| format!("C event kind {k}")).collect()
            }
            (Sender::Rust(_), None) => vec!["a Rust publisher without its events".into()],
        }
    }

    async fn stop(&self) {
        match self {
            Sender::Rust(client) => client.stop().await,
            Sender::C(c) => tokio::task::block_in_place(|| unsafe {
                c_check(wps_client_stop(c.handle), "wps_client_stop");
            }),
        }
    }
}

async fn subscriber(emulator: &Emulator, name: &str, publishers: u64, s: &Settings) -> Subscriber {
    let proxy = Proxy::start(emulator.port(), s.drop_ms, s.seed ^ hash(name)).await;
    let (client, mut events, id) = client_via(emulator, &proxy, name).await;
    let check = Arc::new(Mutex::new(Check::new(name, publishers as usize)));
    check.lock().unwrap().see(Seen::Connected(id));
    let highest: Arc<Vec<AtomicU64>> =
        Arc::new((0..publishers).map(|_| AtomicU64::new(0)).collect());
    let (l, h, who) = (check.clone(), highest.clone(), name.to_owned());
    let collector = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let seen = match event {
                Event::GroupMessage { data, group, .. } => {
                    assert_eq!(group, GROUP);
                    let (publisher, counter) = parse(&data)
                        .unwrap_or_else(|| panic!("{who}: unexpected payload {data:?}"));
                    h[publisher as usize].fetch_max(counter, Ordering::Relaxed);
                    Seen::Message { publisher, counter }
                }
                Event::Connected { connection_id, .. } => Seen::Connected(connection_id),
                Event::Disconnected { close_code, .. } => Seen::Disconnected(close_code),
                // A rejoin in flight when the next refusal hits fails with NotConnected.
                Event::RejoinGroupFailed { error, .. } => Seen::RejoinFailed(error),
                Event::Stopped { .. } => return,
                other => panic!("{who}: unexpected event {other:?}"),
            };
            l.lock().unwrap().see(seen);
        }
    });
    let mut joined = false;
    for _ in 0..20 {
        match client.join_group(GROUP).await {
            Ok(_) => {
                joined = true;
                break;
            }
            Err(e) => {
                assert!(matches!(e, Error::NotConnected { .. }), "{name} join: {e}");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(joined, "{name} could not join");
    Subscriber {
        name: name.to_owned(),
        client,
        proxy,
        check,
        highest,
        collector,
    }
}

fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn payload(publisher: u64, counter: u64) -> Bytes {
    Bytes::from(format!("p{publisher}:{counter}"))
}

fn parse(data: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(data).ok()?;
    let (p, c) = text.strip_prefix('p')?.split_once(':')?;
    Some((p.parse().ok()?, c.parse().ok()?))
}

type Sending = Pin<Box<dyn Future<Output = (u64, Result<AckResult, Error>)> + Send>>;

/// What a publisher got back (counts only, so that long runs stay small).
#[derive(Default, Debug)]
struct Published {
    /// Whether each counter completed (index = counter - 1).
    done: Vec<bool>,
    /// Successes answered `Duplicate` (a resend after a recovery).
    duplicated: u64,
    /// The first problems seen (an error, a second completion, a wrong ackId).
    problems: Vec<String>,
}

impl Published {
    fn record(&mut self, counter: u64, result: Result<AckResult, Error>) {
        let slot = &mut self.done[counter as usize - 1];
        let problem = match result {
            _ if *slot => Some(format!("counter {counter} completed twice")),
            Ok(ack) if ack.ack_id != Some(counter) => {
                Some(format!("counter {counter} acked as {:?}", ack.ack_id))
            }
            Ok(ack) => {
                self.duplicated += u64::from(ack.is_duplicated);
                None
            }
            Err(e) => Some(format!("counter {counter} failed: {e}")),
        };
        *slot = true;
        if let Some(problem) = problem {
            if self.problems.len() < 10 {
                self.problems.push(problem);
            }
        }
    }
}

/// One publishing run: counters `from..=to`, `window` sends in flight, a pause of
/// `pace` before each, until `deadline`.
struct Plan {
    from: u64,
    to: u64,
    window: usize,
    deadline: Instant,
    pace: Option<Duration>,
    /// The client numbers the messages itself (its n-th message gets ackId n, so the
    /// counter still names it); else the counter is given as ackId.
    automatic_ack_ids: bool,
}

/// Whether publisher `p` sends one message at a time with automatic ackIds: an idle
/// client, whose caller writes its own frames (the others pipeline through the
/// connection task). One publisher at least pipelines.
fn sequential(p: usize, s: &Settings) -> bool {
    p < 2 && (p as u64) < s.publishers - 1
}

/// Whether publisher `p` sends through the C API (the second sequential one).
fn through_c(p: usize, s: &Settings) -> bool {
    p == 1 && sequential(p, s)
}

/// Publishes the plan's counters. The frames reach the connection task in counter
/// order (each send is polled once, unconstrained, before the next is created). Stops
/// early when `stop_when` says so; returns the last counter sent.
async fn publish(
    sender: &Sender,
    publisher: u64,
    plan: Plan,
    out: &mut Published,
    stop_when: &(dyn Fn() -> bool + Sync),
) -> u64 {
    let Plan {
        from,
        to,
        window,
        deadline,
        pace,
        automatic_ack_ids,
    } = plan;
    let mut in_flight: FuturesUnordered<Sending> = FuturesUnordered::new();
    let mut last = from - 1;
    for counter in from..=to {
        if Instant::now() >= deadline || stop_when() {
            break;
        }
        while in_flight.len() >= window {
            let (c, r) = in_flight.next().await.unwrap();
            out.record(c, r);
        }
        if let Some(pace) = pace {
            sleep(pace).await;
        }
        out.done.resize(counter as usize, false);
        let mut send: Sending = match sender {
            Sender::Rust(client) => {
                let c = client.clone();
                Box::pin(tokio::task::unconstrained(async move {
                    let r = c
                        .send_to_group(
                            GROUP,
                            DataType::Text,
                            payload(publisher, counter),
                            SendToGroupOptions {
                                ack_id: (!automatic_ack_ids).then_some(counter),
                                ..SendToGroupOptions::default()
                            },
                        )
                        .await;
                    (counter, r)
                }))
            }
            Sender::C(client) => {
                assert!(automatic_ack_ids, "the C publisher numbers nothing itself");
                let sent = client.send(payload(publisher, counter));
                Box::pin(async move { (counter, sent.await) })
            }
        };
        let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        match first {
            Poll::Ready((c, r)) => out.record(c, r),
            Poll::Pending => in_flight.push(send),
        }
        last = counter;
    }
    while let Some((c, r)) = in_flight.next().await {
        out.record(c, r);
    }
    last
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

async fn run(s: Settings) {
    println!("chaos settings: {s:?}");
    let started = std::time::Instant::now();
    let emulator = Emulator::start(Config {
        recovery_window: Duration::from_secs(60),
        max_unacked_frames: 10_000_000,
        max_unacked_bytes: 1 << 31,
        ..Config::default()
    })
    .await
    .unwrap();

    let mut subscribers = Vec::new();
    for i in 0..s.steady_subscribers {
        subscribers.push(subscriber(&emulator, &format!("steady{i}"), s.publishers, &s).await);
    }
    let unlucky = subscriber(&emulator, "unlucky", s.publishers, &s).await;

    let mut publishers = Vec::new();
    for p in 0..s.publishers as usize {
        let name = format!("publisher{p}");
        let proxy = Proxy::start(emulator.port(), s.drop_ms, s.seed ^ hash(&name)).await;
        let (sender, events) = match through_c(p, &s) {
            true => {
                let c =
                    tokio::task::block_in_place(|| CClient::start_via(&emulator, &proxy, &name));
                (Sender::C(Arc::new(c)), None)
            }
            false => {
                let (client, events, _) = client_via(&emulator, &proxy, &name).await;
                (Sender::Rust(client), Some(events))
            }
        };
        publishers.push((sender, events, proxy));
    }

    // The unlucky subscriber's session is forgotten now and then.
    let refusals = Arc::new(AtomicU64::new(0));
    let refusing = Arc::new(AtomicBool::new(true));
    let refuser = {
        let (client, refusals, refusing) =
            (unlucky.client.clone(), refusals.clone(), refusing.clone());
        let port = emulator.port();
        let mut rng = Rng(s.seed ^ 0x5eed);
        let mean = s.refuse_ms;
        tokio::spawn(async move {
            while refusing.load(Ordering::Relaxed) {
                sleep(Duration::from_millis(mean / 2 + rng.below(mean))).await;
                if !refusing.load(Ordering::Relaxed) || client.state() != ClientState::Connected {
                    continue;
                }
                let Some(id) = client.connection_id() else {
                    continue;
                };
                let path =
                    format!("/_emulator/hubs/{HUB}/connections/{id}/:drop?recoverable=false");
                if common::http(port, "POST", &path, &[], b"").await.0 == 200 {
                    refusals.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Publishing phase, under chaos.
    let deadline = Instant::now() + Duration::from_secs(s.seconds);
    let never = || false;
    let mut tasks = Vec::new();
    for (p, (sender, _, _)) in publishers.iter().enumerate() {
        let (sender, s) = (sender.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Published::default();
            let plan = Plan {
                from: 1,
                to: s.messages,
                window: if sequential(p, &s) { 1 } else { s.window },
                deadline,
                pace: None,
                automatic_ack_ids: sequential(p, &s),
            };
            let last = publish(&sender, p as u64, plan, &mut out, &never).await;
            (last, out)
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(task.await.unwrap());
    }
    let publish_secs = started.elapsed().as_secs_f64();

    // Calm: no more cuts nor refusals. Each publisher sends a slow tail until every
    // subscriber has received one tail message of it, so that the last messages of
    // the chaos phase are provably in (or reported lost).
    refusing.store(false, Ordering::Relaxed);
    refuser.await.unwrap();
    for proxy in subscribers
        .iter()
        .map(|s| &s.proxy)
        .chain([&unlucky.proxy])
        .chain(publishers.iter().map(|(_, _, p)| p))
    {
        proxy.calm.store(true, Ordering::Relaxed);
    }
    let everyone: Vec<Arc<Vec<AtomicU64>>> = subscribers
        .iter()
        .chain([&unlucky])
        .map(|s| s.highest.clone())
        .collect();
    let tail_deadline = Instant::now() + Duration::from_secs(30);
    let mut tails = Vec::new();
    for (p, (sender, _, _)) in publishers.iter().enumerate() {
        let (sender, everyone) = (sender.clone(), everyone.clone());
        let (chaos_last, mut out) = std::mem::take(&mut sent[p]);
        let first_tail = chaos_last + 1;
        let one_at_a_time = sequential(p, &s);
        tails.push(tokio::spawn(async move {
            let reached = move || {
                everyone
                    .iter()
                    .all(|h| h[p].load(Ordering::Relaxed) >= first_tail)
            };
            let plan = Plan {
                from: first_tail,
                to: first_tail + 10_000,
                window: if one_at_a_time { 1 } else { 4 },
                deadline: tail_deadline,
                pace: Some(Duration::from_millis(20)),
                automatic_ack_ids: one_at_a_time,
            };
            let last = publish(&sender, p as u64, plan, &mut out, &reached).await;
            assert!(
                reached(),
                "publisher{p}: a subscriber never got the tail (see the checks)"
            );
            (chaos_last, last, out)
        }));
    }
    let mut finals = Vec::new();
    for tail in tails {
        finals.push(tail.await.unwrap());
    }
    // Steady subscribers must have everything up to the last counter.
    let wait_until = Instant::now() + Duration::from_secs(20);
    for sub in &subscribers {
        for (p, (_, last, _)) in finals.iter().enumerate() {
            while sub.highest[p].load(Ordering::Relaxed) < *last && Instant::now() < wait_until {
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
    sleep(Duration::from_millis(300)).await;

    // ---- Checks and figures ----
    let emulator_stats = stats(&emulator).await;
    let mut report = Vec::new();
    let mut sent_total = 0;
    let mut acked_duplicates = 0;
    for (p, (chaos_last, last, out)) in finals.iter().enumerate() {
        assert_eq!(out.done.len() as u64, *last);
        assert!(out.problems.is_empty(), "publisher{p}: {:?}", out.problems);
        assert!(
            out.done.iter().all(|d| *d),
            "publisher{p}: a send never completed"
        );
        acked_duplicates += out.duplicated;
        if s.seconds >= 60 || *chaos_last == s.messages {
            report.push(format!(
                "publisher{p}: {chaos_last} sent under chaos + {} tail",
                last - chaos_last
            ));
        } else {
            panic!(
                "publisher{p} sent only {chaos_last} of {} messages within {} s",
                s.messages, s.seconds
            );
        }
        sent_total += last;
    }
    for (sender, events, _) in &mut publishers {
        let events = sender.events_since_start(events);
        assert!(
            events.is_empty(),
            "a publisher must only recover, never reconnect: {events:?}"
        );
    }
    let lasts: Vec<u64> = finals.iter().map(|(_, last, _)| *last).collect();
    let mut delivered_total = 0;
    let mut suppressed_total = 0;
    for sub in subscribers.iter().chain([&unlucky]) {
        let check = sub.check.lock().unwrap().finish(&lasts);
        let steady = sub.name != "unlucky";
        if steady {
            assert_eq!(check.reconnects, 0, "{}: must only recover", sub.name);
            assert_eq!(check.lost, 0, "{}", sub.name);
            assert_eq!(check.rejoin_failures, 0, "{}", sub.name);
            assert_eq!(check.delivered, lasts.iter().sum::<u64>(), "{}", sub.name);
        } else {
            assert_eq!(
                check.reconnects,
                refusals.load(Ordering::Relaxed),
                "unlucky: one Disconnected/Connected pair per refused recovery"
            );
        }
        let forwarded = sub.proxy.stats.data_frames.load(Ordering::Relaxed);
        assert!(
            forwarded >= check.delivered,
            "{}: delivered {} but only {forwarded} data frames went through the proxy",
            sub.name,
            check.delivered
        );
        let suppressed = forwarded - check.delivered;
        delivered_total += check.delivered;
        suppressed_total += suppressed;
        let p = &sub.proxy.stats;
        report.push(format!(
            "{}: delivered {}, duplicates suppressed {suppressed}, lost across reconnects {}, reconnects {} (rejoins failed {}), proxy connections {}, cuts {} ({} mid-frame, {} in the upgrade)",
            sub.name,
            check.delivered,
            check.lost,
            check.reconnects,
            check.rejoin_failures,
            p.connections.load(Ordering::Relaxed),
            p.cuts.load(Ordering::Relaxed),
            p.mid_frame_cuts.load(Ordering::Relaxed),
            p.upgrade_cuts.load(Ordering::Relaxed),
        ));
    }
    let mut cuts = 0;
    let mut mid_frame = 0;
    for proxy in subscribers
        .iter()
        .map(|s| &s.proxy)
        .chain([&unlucky.proxy])
        .chain(publishers.iter().map(|(_, _, p)| p))
    {
        cuts += proxy.stats.cuts.load(Ordering::Relaxed);
        mid_frame += proxy.stats.mid_frame_cuts.load(Ordering::Relaxed);
    }
    println!("chaos figures (seed {}):", s.seed);
    for line in &report {
        println!("  {line}");
    }
    println!(
        "  total: sent {sent_total}, delivered {delivered_total}, duplicates suppressed {suppressed_total}, \
         acks answered Duplicate after a resend {acked_duplicates}, cuts {cuts} ({mid_frame} mid-frame), \
         refused recoveries {}, emulator recoveries {} (failed {}), publishing {publish_secs:.1} s, total {:.1} s",
        refusals.load(Ordering::Relaxed),
        emulator_stats["recoveries"],
        emulator_stats["failedRecoveries"],
        started.elapsed().as_secs_f64()
    );
    assert!(cuts > 0, "the chaos must cut something");

    for sub in subscribers.into_iter().chain([unlucky]) {
        sub.client.stop().await;
        tokio::time::timeout(Duration::from_secs(5), sub.collector)
            .await
            .expect("collector ends after Stopped")
            .unwrap();
    }
    for (sender, _, _) in &publishers {
        sender.stop().await;
    }
    emulator.shutdown().await;
}

/// The running check of one subscriber's events: no duplicate, order kept per
/// publisher, gaps only across a reported full reconnect (`Disconnected` without a
/// close code, then `Connected` with a new id), nothing past the last counter sent.
/// The first violation is kept and reported at the end.
struct Check {
    name: String,
    last: Vec<u64>,
    gap_allowed: Vec<bool>,
    ids: Vec<String>,
    disconnected: bool,
    failure: Option<String>,
    delivered: u64,
    lost: u64,
    reconnects: u64,
    rejoin_failures: u64,
}

impl Check {
    fn new(name: &str, publishers: usize) -> Check {
        Check {
            name: name.to_owned(),
            last: vec![0; publishers],
            gap_allowed: vec![false; publishers],
            ids: Vec::new(),
            disconnected: false,
            failure: None,
            delivered: 0,
            lost: 0,
            reconnects: 0,
            rejoin_failures: 0,
        }
    }

    fn see(&mut self, seen: Seen) {
        if let Err(problem) = self.step(seen) {
            let name = &self.name;
            self.failure.get_or_insert(format!("{name}: {problem}"));
        }
    }

    fn step(&mut self, seen: Seen) -> Result<(), String> {
        match seen {
            Seen::Connected(id) => {
                if !self.ids.is_empty() && !self.disconnected {
                    return Err("Connected without Disconnected before it".into());
                }
                if self.ids.contains(&id) {
                    return Err(format!(
                        "a reconnect must bring a new connection id, got {id} again"
                    ));
                }
                if !self.ids.is_empty() {
                    self.reconnects += 1;
                    self.gap_allowed.iter_mut().for_each(|g| *g = true);
                }
                self.ids.push(id);
                self.disconnected = false;
            }
            Seen::Disconnected(code) => {
                if self.disconnected {
                    return Err("Disconnected twice in a row".into());
                }
                if code.is_some() {
                    return Err(format!(
                        "a lost session here is a cut socket whose recovery was refused \
                         (no close frame), not {code:?}"
                    ));
                }
                self.disconnected = true;
            }
            Seen::RejoinFailed(error) => {
                if !matches!(error, Error::NotConnected { .. }) {
                    return Err(format!("rejoin failed: {error}"));
                }
                self.rejoin_failures += 1;
            }
            Seen::Message { publisher, counter } => {
                let p = publisher as usize;
                let last = self.last[p];
                if self.disconnected {
                    return Err("a message between Disconnected and Connected".into());
                }
                if counter <= last {
                    return Err(format!(
                        "publisher{p} counter {counter} after {last} (duplicate or out of order)"
                    ));
                }
                if counter != last + 1 {
                    if !self.gap_allowed[p] {
                        return Err(format!(
                            "publisher{p} messages {}..{counter} lost without a reconnect",
                            last + 1
                        ));
                    }
                    self.lost += counter - last - 1;
                }
                self.gap_allowed[p] = false;
                self.last[p] = counter;
                self.delivered += 1;
            }
        }
        Ok(())
    }

    /// The figures, after asserting that nothing went wrong and nothing arrived that
    /// was not sent (`lasts`: the last counter of each publisher).
    fn finish(&self, lasts: &[u64]) -> Figures {
        if let Some(failure) = &self.failure {
            panic!("{failure}");
        }
        for (p, (seen, sent)) in self.last.iter().zip(lasts).enumerate() {
            assert!(
                seen <= sent,
                "{}: publisher{p} counter {seen} was never sent",
                self.name
            );
        }
        Figures {
            delivered: self.delivered,
            lost: self.lost,
            reconnects: self.reconnects,
            rejoin_failures: self.rejoin_failures,
        }
    }
}

/// What one subscriber saw, in numbers.
struct Figures {
    delivered: u64,
    lost: u64,
    reconnects: u64,
    rejoin_failures: u64,
}
