//! Client lifecycles give back what they took. After repeated lifecycles of each kind
//! (started and stopped, many started at once, failed, abandoned or timed-out starts,
//! clients dropped or freed while connected or with operations pending, freed inside
//! their own callbacks or on threads of their own, recoveries, keep-alive timeouts and
//! reconnects, credential callbacks), through the
//! Rust API and the C ABI in both dispatch modes, the process holds no more descriptors
//! of any kind than after a warm-up round (which creates the shared runtime, the
//! dispatcher threads and so on), no more threads, and its live heap has not grown with
//! the rounds.
//!
//! One test: descriptors and threads are the process's, shared by tests running in
//! parallel. The emulators run in this process too: the descriptors include their side
//! of each connection (closed once the client's is), the heap leaves out what their
//! threads allocate.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::{check, fast_options, user_token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use webpubsub_client::ffi::callbacks::{wps_completion, wps_event, WPS_EVENT_CONNECTED};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_connection_id, wps_client_dispatch, wps_client_dispatch_fd,
    wps_client_free, wps_client_invoke_event_async, wps_client_join_group, wps_client_new,
    wps_client_send_to_group_async, wps_client_start, wps_client_start_async, wps_client_stop,
    wps_client_stop_async,
};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_defer, wps_credential_result_set_url,
};
use webpubsub_client::ffi::options::{
    wps_options, wps_options_free, wps_options_new, wps_options_set_dispatch_mode,
    wps_options_set_recovery, wps_options_set_start_timeout_ms,
};
use webpubsub_client::ffi::status::{
    WPS_DATA_TYPE_TEXT, WPS_DISPATCH_POLL, WPS_STATUS_CONNECT_FAILED, WPS_STATUS_ILLEGAL_STATE,
    WPS_STATUS_OK, WPS_STATUS_STOPPED,
};
use webpubsub_client::{
    Client, ClientOptions, Credential, DataType, Event, ProxySetting, RetryMode, RetryOptions,
};
use webpubsub_emulator::{Config, Emulator};

/// Live heap bytes of the process, counted by the global allocator, but for the
/// emulator's threads: its state is not the client's (a dropped connection's is kept
/// for its recovery window, for one).
static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Whether this thread is one of the emulator's.
    static EMULATOR_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Counts `bytes` unless on an emulator thread.
fn note(bytes: isize) {
    if !EMULATOR_THREAD.try_with(Cell::get).unwrap_or(false) {
        LIVE.fetch_add(bytes, Ordering::Relaxed);
    }
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Rounds of each lifecycle in each of the two halves after its warm-up round.
const HALF: usize = 25;

/// Threads a section may end with above its baseline: the runtime's blocking pool
/// (credential callbacks and finalizers run there) keeps an idle thread for 10 s.
const THREAD_SLACK: usize = 2;

/// Live heap bytes each half may grow by, per round: queues whose capacity grew (by up
/// to ~7 KiB in a half on a loaded machine), not a client's state (KiBs). A one-off
/// growth lands in one half; a leak grows both.
const HEAP_PER_ROUND: isize = 512;

/// How long descriptors and threads may take to come back (the emulator closes its
/// side of a connection once it sees the client's close).
const SETTLE: Duration = Duration::from_secs(10);

/// How long the heap may take to come back.
const HEAP_SETTLE: Duration = Duration::from_secs(1);

/// Open descriptors by kind: `socket`, `pipe`, `eventfd`, `eventpoll`, or a path.
fn descriptors() -> BTreeMap<String, usize> {
    let own_dir = format!("/proc/{}/fd", std::process::id());
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(target) = std::fs::read_link(entry.unwrap().path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy().into_owned();
        if target == own_dir {
            continue; // this listing's own descriptor
        }
        let kind = match target.split_once(':') {
            Some(("anon_inode", what)) => what.trim_matches(['[', ']']).to_owned(),
            Some((kind @ ("socket" | "pipe"), _)) => kind.to_owned(),
            _ => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// The process's threads by name.
fn threads() -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = std::fs::read_to_string(entry.unwrap().path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_owned()).or_default() += 1;
    }
    names
}

fn count(map: &BTreeMap<String, usize>) -> usize {
    map.values().sum()
}

/// What the process holds at one point.
struct Usage {
    fds: BTreeMap<String, usize>,
    threads: BTreeMap<String, usize>,
    heap: isize,
}

impl Usage {
    fn now() -> Usage {
        let heap = LIVE.load(Ordering::Relaxed);
        Usage {
            fds: descriptors(),
            threads: threads(),
            heap,
        }
    }

    /// No kind of descriptor above `baseline`, nor threads beyond the slack.
    fn within(&self, baseline: &Usage) -> bool {
        self.fds
            .iter()
            .all(|(kind, n)| baseline.fds.get(kind).is_some_and(|b| n <= b))
            && count(&self.threads) <= count(&baseline.threads) + THREAD_SLACK
    }

    /// Once two looks 50 ms apart see the same descriptors and threads (the warm-up's
    /// connections are closed), or after `SETTLE`.
    fn steady() -> Usage {
        let deadline = Instant::now() + SETTLE;
        let mut last = Usage::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let usage = Usage::now();
            if (usage.fds == last.fds && usage.threads == last.threads) || Instant::now() > deadline
            {
                return usage;
            }
            last = usage;
        }
    }

    /// Once back within `baseline`, and the heap within a half's bound above `heap`
    /// (waited for `HEAP_SETTLE` at most: a dropped client's connection task ends on
    /// its own); or after `SETTLE`.
    fn settled(baseline: &Usage, heap: isize) -> Usage {
        let started = Instant::now();
        loop {
            let usage = Usage::now();
            let heap_settled = usage.heap - heap < HEAP_PER_ROUND * HALF as isize
                || started.elapsed() > HEAP_SETTLE;
            if (usage.within(baseline) && heap_settled) || started.elapsed() > SETTLE {
                return usage;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `round` once to warm up, takes the baseline, then two halves of `HALF` rounds;
/// fails unless the descriptors and threads came back after each half, and unless the
/// live heap stayed put in at least one half.
fn lifecycles(name: &str, mut round: impl FnMut()) {
    let started = Instant::now();
    round();
    let baseline = Usage::steady();
    let mut halves = Vec::new();
    for half in 0..2 {
        let before = LIVE.load(Ordering::Relaxed);
        for _ in 0..HALF {
            round();
        }
        let after = Usage::settled(&baseline, before);
        assert!(
            after.within(&baseline),
            "{name}: after {} rounds: descriptors {:?}, threads {:?}; baseline: descriptors {:?}, threads {:?}",
            (half + 1) * HALF,
            after.fds,
            after.threads,
            baseline.fds,
            baseline.threads,
        );
        halves.push(after.heap - before);
    }
    println!(
        "{name}: {} rounds in {:?}; {} descriptors, {} threads; heap growth per half {halves:?} B",
        2 * HALF,
        started.elapsed(),
        count(&baseline.fds),
        count(&baseline.threads),
    );
    assert!(
        halves
            .iter()
            .any(|&growth| growth < HEAP_PER_ROUND * HALF as isize),
        "{name}: the live heap grew by {halves:?} B in two halves of {HALF} rounds"
    );
}

/// The servers the lifecycles connect to, all on 127.0.0.1.
struct Servers {
    rt: Runtime,
    emulator: Emulator,
    /// A client URL of the emulator.
    url: String,
    /// A URL whose port nothing listens on.
    refused: String,
    /// A URL of the emulator with a token it refuses (401).
    unauthorized: String,
    /// A `wss://` URL of the emulator, which speaks plain HTTP.
    plain_tls: String,
    /// A URL of a server that accepts and never answers.
    silent: String,
    /// A proxy that refuses every request (407).
    refusing_proxy: String,
    /// An emulator whose upstream never answers (invocations stay pending), with a
    /// client URL of it.
    silent_upstream: (Emulator, String),
    /// An emulator serving `wss://` with the certificate of `pki`, with a client URL.
    tls: (Emulator, String),
    pki: Pki,
}

/// Accepts connections and reads each until the peer closes it, never answering.
async fn never_answer(listener: tokio::net::TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

impl Servers {
    fn start() -> Servers {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(|| EMULATOR_THREAD.with(|e| e.set(true)))
            .build()
            .unwrap();
        let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
        let url = emulator.client_url("hub", &user_token("u"));
        let port = emulator.port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = format!(
            "ws://{}/client/hubs/hub?access_token=t",
            closed.local_addr().unwrap()
        );
        drop(closed);
        let silent = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let silent_url = format!(
            "ws://{}/client/hubs/hub?access_token=t",
            silent.local_addr().unwrap()
        );
        rt.spawn(never_answer(silent));
        let proxy = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
        rt.spawn(async move {
            while let Ok((mut socket, _)) = proxy.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let refusal =
                        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n";
                    let _ = socket.write_all(refusal).await;
                });
            }
        });
        let upstream = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let upstream_config = Config {
            upstream: Some(format!("http://{}/", upstream.local_addr().unwrap())),
            upstream_timeout: Duration::from_millis(200),
            ..Config::default()
        };
        rt.spawn(never_answer(upstream));
        let silent_upstream = rt.block_on(Emulator::start(upstream_config)).unwrap();
        let silent_upstream_url = silent_upstream.client_url("hub", &user_token("u"));
        let pki = Pki::new("resources");
        let tls_config = Config {
            tls: Some(pki.files.clone()),
            ..Config::default()
        };
        let tls = rt.block_on(Emulator::start(tls_config)).unwrap();
        let tls_url = tls.client_url("hub", &user_token("u"));
        Servers {
            silent_upstream: (silent_upstream, silent_upstream_url),
            tls: (tls, tls_url),
            pki,
            refused,
            unauthorized: format!("ws://127.0.0.1:{port}/client/hubs/hub?access_token=bad"),
            plain_tls: url.replacen("ws://", "wss://", 1),
            silent: silent_url,
            refusing_proxy: proxy_url,
            url,
            emulator,
            rt,
        }
    }

    /// Calls an emulator test route on connection `id` of hub `hub`, from a runtime on
    /// this thread: the emulator's runtime would release the socket on its own threads.
    fn fault(&self, id: &str, action: &str) {
        let here = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        here.block_on(common::fault(&self.emulator, "hub", id, action));
    }
}

/// A started Rust client of `url`; panics unless it connects.
fn rust_started(s: &Servers, options: ClientOptions) -> Client {
    let (client, _events) = Client::with_channel(Credential::Url(s.url.clone()), options).unwrap();
    s.rt.block_on(client.start()).unwrap();
    client
}

/// A Rust client of `url` whose start fails.
fn rust_start_fails(s: &Servers, url: &str, options: ClientOptions) {
    let (client, _events) = Client::with_channel(Credential::Url(url.to_owned()), options).unwrap();
    s.rt.block_on(client.start()).unwrap_err();
}

/// Options whose start gives up quickly.
fn quick_start() -> ClientOptions {
    ClientOptions {
        start_timeout: Duration::from_millis(50),
        ..fast_options()
    }
}

fn rust_api(s: &Servers) {
    lifecycles("rust: start, join, send, stop", || {
        let client = rust_started(s, fast_options());
        s.rt.block_on(async {
            client.join_group("g").await.unwrap();
            let data = bytes::Bytes::from_static(b"hi");
            let send = client.send_to_group("g", DataType::Text, data, Default::default());
            send.await.unwrap();
            client.stop().await;
        });
    });
    lifecycles("rust: dropped while connected", || {
        drop(rust_started(s, fast_options()));
    });
    // The shared runtime's threads serve them all: none is added per client.
    lifecycles(
        "rust: 20 clients started at once, half stopped, dropped",
        || {
            let clients: Vec<_> = (0..20)
                .map(|_| {
                    Client::with_channel(Credential::Url(s.url.clone()), fast_options()).unwrap()
                })
                .collect();
            s.rt.block_on(async {
                let starts = clients.iter().map(|(client, _events)| client.start());
                for started in futures_util::future::join_all(starts).await {
                    started.unwrap();
                }
                let stops = clients
                    .iter()
                    .step_by(2)
                    .map(|(client, _events)| client.stop());
                futures_util::future::join_all(stops).await;
            });
        },
    );
    lifecycles("rust: wss start, stop", || {
        let options = ClientOptions {
            extra_ca_pem: vec![s.pki.ca_pem.clone().into_bytes()],
            ..fast_options()
        };
        let credential = Credential::Url(s.tls.1.clone());
        let (client, _events) = Client::with_channel(credential, options).unwrap();
        s.rt.block_on(async {
            client.start().await.unwrap();
            client.stop().await;
        });
    });
    lifecycles("rust: dropped with sends pending", || {
        let client = rust_started(s, fast_options());
        s.fault(&client.connection_id().unwrap(), ":dropAcks?count=100");
        s.rt.block_on(async {
            let sends: Vec<_> = (0..10)
                .map(|_| {
                    let data = bytes::Bytes::from_static(b"hi");
                    client.send_to_group("g", DataType::Text, data, Default::default())
                })
                .collect();
            let pending = futures_util::future::join_all(sends);
            let early = tokio::time::timeout(Duration::from_millis(20), pending).await;
            assert!(early.is_err(), "no acks");
        });
    });
    lifecycles("rust: start refused", || {
        rust_start_fails(s, &s.refused, fast_options());
    });
    lifecycles("rust: start unauthorized", || {
        rust_start_fails(s, &s.unauthorized, fast_options());
    });
    lifecycles("rust: TLS handshake with a plain server", || {
        rust_start_fails(s, &s.plain_tls, fast_options());
    });
    let through_proxy = || ClientOptions {
        proxy: ProxySetting::Url(s.refusing_proxy.clone()),
        ..fast_options()
    };
    lifecycles("rust: proxy refusal", || {
        rust_start_fails(s, &s.url, through_proxy());
    });
    lifecycles("rust: start timeout", || {
        rust_start_fails(s, &s.silent, quick_start());
    });
    lifecycles("rust: start abandoned by stop", || {
        let (client, _events) =
            Client::with_channel(Credential::Url(s.silent.clone()), fast_options()).unwrap();
        s.rt.block_on(async {
            let start = client.start();
            tokio::pin!(start);
            let early = tokio::time::timeout(Duration::from_millis(20), &mut start).await;
            assert!(early.is_err(), "the silent server never answers");
            client.stop().await;
            start.await.unwrap_err();
        });
    });
    lifecycles("rust: start abandoned by drop", || {
        let (client, _events) =
            Client::with_channel(Credential::Url(s.silent.clone()), fast_options()).unwrap();
        s.rt.block_on(async {
            let start = client.start();
            let early = tokio::time::timeout(Duration::from_millis(20), start).await;
            assert!(early.is_err(), "the silent server never answers");
        });
    });
    lifecycles("rust: credential provider", || {
        let url = s.url.clone();
        let credential = Credential::provider(move || {
            let url = url.clone();
            async move { Ok(url) }
        });
        let (client, _events) = Client::with_channel(credential, fast_options()).unwrap();
        s.rt.block_on(async {
            client.start().await.unwrap();
            client.stop().await;
        });
    });
    // Recoveries in a row make one recovery window: long enough for all of them.
    let options = ClientOptions {
        recovery_window: Duration::from_secs(120),
        recovery_attempt_delay: Duration::from_millis(20),
        ..fast_options()
    };
    let client = rust_started(s, options.clone());
    lifecycles("rust: recoveries", || {
        let id = client.connection_id().unwrap();
        s.fault(&id, ":drop");
        let data = bytes::Bytes::from_static(b"hi");
        let send = client.send_to_group("g", DataType::Text, data, Default::default());
        s.rt.block_on(send).unwrap();
        assert_eq!(
            client.connection_id(),
            Some(id),
            "recovered, not reconnected"
        );
    });
    lifecycles("rust: reconnects", || {
        let id = client.connection_id().unwrap();
        s.fault(&id, ":drop?recoverable=false");
        let deadline = Instant::now() + SETTLE;
        while client.connection_id().is_none_or(|now| now == id) {
            assert!(Instant::now() < deadline, "no new connection");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    s.rt.block_on(client.stop());
    let options = ClientOptions {
        keep_alive_interval: Some(Duration::from_millis(30)),
        keep_alive_timeout: Some(Duration::from_millis(100)),
        ..options
    };
    let client = rust_started(s, options);
    lifecycles("rust: keep-alive timeouts", || {
        let id = client.connection_id().unwrap();
        s.fault(&id, ":mute?ms=250");
        let data = bytes::Bytes::from_static(b"hi");
        let send = client.send_to_group("g", DataType::Text, data, Default::default());
        s.rt.block_on(send).unwrap();
        assert_eq!(
            client.connection_id(),
            Some(id),
            "recovered, not reconnected"
        );
    });
    s.rt.block_on(client.stop());
    lifecycles("rust: stopped while recovering", || {
        let client = rust_started(s, fast_options());
        s.fault(&client.connection_id().unwrap(), ":drop");
        s.rt.block_on(client.stop());
    });
    lifecycles("rust: reconnects refused until stopped", || {
        let first = AtomicBool::new(true);
        let (url, refused) = (s.url.clone(), s.refused.clone());
        let credential = Credential::provider(move || {
            let url = if first.swap(false, Ordering::SeqCst) {
                url.clone()
            } else {
                refused.clone()
            };
            async move { Ok(url) }
        });
        let options = ClientOptions {
            reconnect_retry: RetryOptions {
                max_retries: Some(3),
                delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
                mode: RetryMode::Fixed,
            },
            ..fast_options()
        };
        let (client, mut events) = Client::with_channel(credential, options).unwrap();
        s.rt.block_on(client.start()).unwrap();
        s.fault(&client.connection_id().unwrap(), ":drop?recoverable=false");
        s.rt.block_on(common::wait_for(&mut events, 10, |e| {
            matches!(e, Event::Stopped { .. })
        }));
    });
}

/// Options of a C client: poll mode or not, a start timeout (0: the default), and
/// recoveries as in `rust_api`.
fn c_options(poll: bool, start_timeout_ms: u64) -> *mut wps_options {
    let opts = wps_options_new();
    if poll {
        check(
            wps_options_set_dispatch_mode(opts, WPS_DISPATCH_POLL),
            "dispatch mode",
        );
    }
    if start_timeout_ms > 0 {
        check(
            wps_options_set_start_timeout_ms(opts, start_timeout_ms),
            "start timeout",
        );
    }
    check(wps_options_set_recovery(opts, 120_000, 20), "recovery");
    opts
}

/// A new C client of `url` (not started).
fn c_client(url: &str, poll: bool, start_timeout_ms: u64) -> *mut wps_client {
    let url = CString::new(url).unwrap();
    let opts = c_options(poll, start_timeout_ms);
    let mut c = std::ptr::null_mut();
    let status =
        unsafe { wps_client_new(url.as_ptr(), opts, None, std::ptr::null_mut(), None, &mut c) };
    unsafe { wps_options_free(opts) };
    check(status, "wps_client_new");
    c
}

unsafe extern "C" fn note_done(user_data: *mut c_void, completion: *const wps_completion) {
    let done = &*(user_data as *const Done);
    done.status.store((*completion).status, Ordering::SeqCst);
    done.called.store(true, Ordering::SeqCst);
}

/// The outcome of one asynchronous operation.
#[derive(Default)]
struct Done {
    called: AtomicBool,
    status: AtomicU32,
}

impl Done {
    fn user_data(&self) -> *mut c_void {
        self as *const Done as *mut c_void
    }

    /// Thread mode: waits for the completion; its status.
    fn wait(&self) -> u32 {
        let deadline = Instant::now() + SETTLE;
        while !self.called.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.status.load(Ordering::SeqCst)
    }
}

/// Poll mode: the descriptor of `c`.
fn dispatch_fd(c: *mut wps_client) -> i32 {
    let mut fd = -1;
    check(unsafe { wps_client_dispatch_fd(c, &mut fd) }, "dispatch fd");
    fd
}

/// Poll mode: waits on `fd`, the descriptor of `c`, and dispatches at most `max` events
/// at a time, until `over()`; fails with `what` after `SETTLE`.
fn dispatch_while_not(
    c: *mut wps_client,
    fd: i32,
    max: usize,
    what: &str,
    over: impl Fn() -> bool,
) {
    let deadline = Instant::now() + SETTLE;
    while !over() {
        assert!(Instant::now() < deadline, "{what}");
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        check(
            unsafe { wps_client_dispatch(c, max, std::ptr::null_mut()) },
            "dispatch",
        );
    }
}

/// Poll mode: dispatches `c` until `done` was called; its status.
fn dispatch_until(c: *mut wps_client, done: &Done) -> u32 {
    let over = || done.called.load(Ordering::SeqCst);
    dispatch_while_not(c, dispatch_fd(c), 64, "no completion", over);
    done.status.load(Ordering::SeqCst)
}

/// Poll mode: starts `c` without blocking; its status.
fn c_start_async(c: *mut wps_client) -> u32 {
    let done = Done::default();
    start_async(c, &done);
    dispatch_until(c, &done)
}

/// Poll mode: stops `c` without blocking.
fn c_stop_async(c: *mut wps_client) {
    let done = Done::default();
    stop_async(c, &done);
    assert_eq!(dispatch_until(c, &done), WPS_STATUS_OK);
}

/// Starts `c` without blocking; the completion goes to `done`.
fn start_async(c: *mut wps_client, done: &Done) {
    let status = unsafe {
        wps_client_start_async(c, Some(note_done), done.user_data(), std::ptr::null_mut())
    };
    check(status, "wps_client_start_async");
}

/// Stops `c` without blocking; the completion goes to `done`.
fn stop_async(c: *mut wps_client, done: &Done) {
    let status = unsafe {
        wps_client_stop_async(c, Some(note_done), done.user_data(), std::ptr::null_mut())
    };
    check(status, "wps_client_stop_async");
}

/// Poll mode: an acked send without blocking.
fn c_send_async(c: *mut wps_client) {
    let done = Done::default();
    send_async(c, &done);
    assert_eq!(dispatch_until(c, &done), WPS_STATUS_OK);
}

/// Starts an acked send whose completion goes to `done`.
fn send_async(c: *mut wps_client, done: &Done) {
    let text = "hi";
    let status = unsafe {
        wps_client_send_to_group_async(
            c,
            c"g".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            text.as_ptr(),
            text.len(),
            0,
            Some(note_done),
            done.user_data(),
            std::ptr::null_mut(),
        )
    };
    check(status, "wps_client_send_to_group_async");
}

/// A client that frees itself in the callback of its connected event.
#[derive(Default)]
struct SelfFreeing {
    client: AtomicUsize,
    /// Its free has returned.
    gone: AtomicBool,
    /// The finalizer of its user data has run.
    finalized: AtomicBool,
}

impl SelfFreeing {
    fn wait_finalized(&self) {
        let deadline = Instant::now() + SETTLE;
        while !self.finalized.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "not finalized");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

unsafe extern "C" fn free_when_connected(user_data: *mut c_void, event: *const wps_event) {
    let me = &*(user_data as *const SelfFreeing);
    if (*event).kind == WPS_EVENT_CONNECTED {
        wps_client_free(me.client.load(Ordering::SeqCst) as *mut wps_client);
        me.gone.store(true, Ordering::SeqCst);
    }
}

unsafe extern "C" fn note_finalized(user_data: *mut c_void) {
    let me = &*(user_data as *const SelfFreeing);
    me.finalized.store(true, Ordering::SeqCst);
}

/// A new C client of `url` that frees itself once connected (not started).
fn c_self_freeing(url: &str, poll: bool, me: &SelfFreeing) -> *mut wps_client {
    let url = CString::new(url).unwrap();
    let opts = c_options(poll, 0);
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new(
            url.as_ptr(),
            opts,
            Some(free_when_connected),
            me as *const SelfFreeing as *mut c_void,
            Some(note_finalized),
            &mut c,
        )
    };
    unsafe { wps_options_free(opts) };
    check(status, "wps_client_new");
    me.client.store(c as usize, Ordering::SeqCst);
    c
}

/// A credential callback answering at once with the URL its user data points to.
unsafe extern "C" fn answer_now(user_data: *mut c_void, result: *mut wps_credential_result) {
    let url = &*(user_data as *const CString);
    check(
        wps_credential_result_set_url(result, url.as_ptr()),
        "set url",
    );
}

/// A credential callback deferring every request, answered by a thread of its own with
/// the URL its user data points to.
unsafe extern "C" fn defer_to_answerer(user_data: *mut c_void, result: *mut wps_credential_result) {
    check(wps_credential_result_defer(result), "defer");
    let (url, result) = (user_data as usize, result as usize);
    std::thread::spawn(move || {
        // SAFETY: the request holds the user data until it is answered.
        let url = unsafe { &*(url as *const CString) };
        let status = unsafe { wps_credential_result_set_url(result as *mut _, url.as_ptr()) };
        check(status, "set url");
    });
}

/// A credential callback deferring every request (never answered).
unsafe extern "C" fn defer_forever(_user_data: *mut c_void, result: *mut wps_credential_result) {
    check(wps_credential_result_defer(result), "defer");
}

/// Frees the `CString` a credential's user data points to.
unsafe extern "C" fn free_url(user_data: *mut c_void) {
    drop(Box::from_raw(user_data as *mut CString));
}

/// A C client whose credential callback is `cred`, with a boxed copy of `url` as its
/// user data.
fn c_credential_client(
    cred: unsafe extern "C" fn(*mut c_void, *mut wps_credential_result),
    url: &str,
    poll: bool,
) -> *mut wps_client {
    let user_data = Box::into_raw(Box::new(CString::new(url).unwrap()));
    let opts = c_options(poll, 0);
    let c = common::ffi_credential_client(cred, user_data.cast(), Some(free_url), opts);
    unsafe { wps_options_free(opts) };
    c
}

fn c_abi(s: &Servers) {
    lifecycles("c: blocking start, join, stop, free", || {
        let c = c_client(&s.url, false, 0);
        check(unsafe { wps_client_start(c) }, "start");
        check(
            unsafe { wps_client_join_group(c, c"g".as_ptr(), std::ptr::null_mut()) },
            "join",
        );
        check(unsafe { wps_client_stop(c) }, "stop");
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: each lifecycle on a thread of its own", || {
        let url = s.url.clone();
        std::thread::spawn(move || {
            let c = c_client(&url, false, 0);
            check(unsafe { wps_client_start(c) }, "start");
            assert_eq!(
                unsafe { wps_client_start(c) },
                WPS_STATUS_ILLEGAL_STATE,
                "a second start fails (and sets this thread's last error)"
            );
            unsafe { wps_client_free(c) };
        })
        .join()
        .unwrap();
    });
    lifecycles("c: freed while connected", || {
        let c = c_client(&s.url, false, 0);
        check(unsafe { wps_client_start(c) }, "start");
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: start refused", || {
        let c = c_client(&s.refused, false, 0);
        assert_eq!(unsafe { wps_client_start(c) }, WPS_STATUS_CONNECT_FAILED);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: start timeout", || {
        let c = c_client(&s.silent, false, 50);
        assert_ne!(unsafe { wps_client_start(c) }, WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: credential callback", || {
        let c = c_credential_client(answer_now, &s.url, false);
        check(unsafe { wps_client_start(c) }, "start");
        unsafe { wps_client_free(c) };
    });
    lifecycles(
        "c: deferred credential answered from another thread",
        || {
            let c = c_credential_client(defer_to_answerer, &s.url, false);
            check(unsafe { wps_client_start(c) }, "start");
            unsafe { wps_client_free(c) };
        },
    );
    lifecycles("c: deferred credential abandoned by stop", || {
        let c = c_credential_client(defer_forever, &s.url, false);
        let client = c as usize;
        let starter =
            std::thread::spawn(move || unsafe { wps_client_start(client as *mut wps_client) });
        std::thread::sleep(Duration::from_millis(20));
        check(unsafe { wps_client_stop(c) }, "stop");
        assert_ne!(starter.join().unwrap(), WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: async start, stop, free on dispatcher threads", || {
        let c = c_client(&s.url, false, 0);
        let started = Done::default();
        start_async(c, &started);
        assert_eq!(started.wait(), WPS_STATUS_OK);
        let stopped = Done::default();
        stop_async(c, &stopped);
        assert_eq!(stopped.wait(), WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: async start, send, stop, free", || {
        let c = c_client(&s.url, true, 0);
        assert_eq!(c_start_async(c), WPS_STATUS_OK);
        c_send_async(c);
        c_stop_async(c);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: freed while connected", || {
        let c = c_client(&s.url, true, 0);
        assert_eq!(c_start_async(c), WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: freed unstarted", || {
        unsafe { wps_client_free(c_client(&s.url, true, 0)) };
    });
    lifecycles("c poll: start refused", || {
        let c = c_client(&s.refused, true, 0);
        assert_eq!(c_start_async(c), WPS_STATUS_CONNECT_FAILED);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: start abandoned by free", || {
        let c = c_client(&s.silent, true, 0);
        check(
            unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) },
            "start",
        );
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: credential callback", || {
        let c = c_credential_client(answer_now, &s.url, true);
        assert_eq!(c_start_async(c), WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    lifecycles("c poll: deferred credential abandoned by free", || {
        let c = c_credential_client(defer_forever, &s.url, true);
        check(
            unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) },
            "start",
        );
        std::thread::sleep(Duration::from_millis(5));
        unsafe { wps_client_free(c) };
    });
    lifecycles("c: freed in its own event callback", || {
        let me = SelfFreeing::default();
        let c = c_self_freeing(&s.url, false, &me);
        check(
            unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) },
            "start",
        );
        me.wait_finalized();
    });
    lifecycles("c poll: freed in a dispatched callback", || {
        let me = SelfFreeing::default();
        let c = c_self_freeing(&s.url, true, &me);
        let fd = dispatch_fd(c);
        check(
            unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) },
            "start",
        );
        // One event per dispatch: the client is gone after the one that frees it.
        dispatch_while_not(c, fd, 1, "not connected", || me.gone.load(Ordering::SeqCst));
        me.wait_finalized();
    });
    lifecycles("c: freed with sends pending", || {
        let c = c_client(&s.url, false, 0);
        check(unsafe { wps_client_start(c) }, "start");
        s.fault(&connection_id(c), ":dropAcks?count=100");
        let sends: Vec<Done> = (0..10).map(|_| Done::default()).collect();
        for done in &sends {
            send_async(c, done);
        }
        unsafe { wps_client_free(c) };
        assert!(sends.iter().all(|done| done.called.load(Ordering::SeqCst)));
    });
    lifecycles("c poll: invocation pending at free", || {
        let c = c_client(&s.silent_upstream.1, true, 0);
        assert_eq!(c_start_async(c), WPS_STATUS_OK);
        let done = Done::default();
        let status = unsafe {
            wps_client_invoke_event_async(
                c,
                c"e".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                "x".as_ptr(),
                1,
                0,
                Some(note_done),
                done.user_data(),
                std::ptr::null_mut(),
            )
        };
        check(status, "wps_client_invoke_event_async");
        unsafe { wps_client_free(c) };
        assert_eq!(done.wait(), WPS_STATUS_STOPPED);
    });
    let c = c_client(&s.url, true, 0);
    assert_eq!(c_start_async(c), WPS_STATUS_OK);
    lifecycles("c poll: recoveries", || {
        let id = connection_id(c);
        s.fault(&id, ":drop");
        c_send_async(c);
        assert_eq!(connection_id(c), id, "recovered, not reconnected");
    });
    unsafe { wps_client_free(c) };
}

/// The connection id of a C client.
fn connection_id(c: *mut wps_client) -> String {
    let mut buf = [0u8; 256];
    let mut len = 0;
    check(
        unsafe { wps_client_connection_id(c, buf.as_mut_ptr().cast(), buf.len(), &mut len) },
        "connection id",
    );
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[test]
fn lifecycles_give_back_descriptors_threads_and_memory() {
    let servers = Servers::start();
    rust_api(&servers);
    c_abi(&servers);
}
