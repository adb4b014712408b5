//! An event handler that is behind pauses the client's reading: the service holds the
//! messages meanwhile, operations still go out, no timer runs out, nothing is lost.
mod common;
use bytes::Bytes;
use common::{
    all_roles, check, fast_options, message_text, next_event, stats, until_stats, wait_for,
};
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_GROUP_MESSAGE};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_dispatch, wps_client_dispatch_resume, wps_client_dispatch_suspend,
    wps_client_free, wps_client_invoke_event, wps_client_join_group, wps_client_leave_group,
    wps_client_new, wps_client_start, wps_client_stop, wps_invoke_response_data,
    wps_invoke_response_free,
};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_dispatch_mode,
    wps_options_set_event_backlog_bytes,
};
use webpubsub_client::ffi::status::{WPS_DATA_TYPE_TEXT, WPS_DISPATCH_POLL, WPS_STATUS_OK};
use webpubsub_client::{
    Client, ClientOptions, Credential, DataType, Event, EventHandler, Resume, RetryOptions,
    SendToGroupOptions,
};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

const HUB: &str = "hub";

/// Messages the publisher sends while the subscriber is held: 11.25 MiB in all, under
/// the emulator's 16 MiB of unacked messages per connection.
const MESSAGES: usize = 360;
const MESSAGE_BYTES: usize = 32 * 1024;

/// Forwards events to a channel, and asks the client to stop reading while `held`
/// (counting the pauses).
struct Gated {
    events: mpsc::UnboundedSender<Event>,
    held: watch::Receiver<bool>,
    pauses: Arc<AtomicUsize>,
}

impl EventHandler for Gated {
    fn on_event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn backpressure(&self) -> Option<Resume> {
        if !*self.held.borrow() {
            return None;
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.clone();
        Some(Box::pin(async move {
            let _ = held.wait_for(|held| !*held).await;
        }))
    }
}

fn url(emulator: &Emulator, user: &str) -> String {
    let token = TokenOptions {
        user_id: Some(user.into()),
        roles: all_roles(),
        ..TokenOptions::default()
    };
    emulator.client_url(HUB, &token)
}

async fn started_with_channel(
    emulator: &Emulator,
    user: &str,
) -> (Client, mpsc::UnboundedReceiver<Event>) {
    let credential = Credential::Url(url(emulator, user));
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    client.start().await.unwrap();
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    (client, events)
}

/// Sends the `MESSAGES` messages to `g`, all but the last fire-and-forget.
async fn publish_all(publisher: &Client) {
    let fire = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };
    for n in 0..MESSAGES - 1 {
        publisher
            .send_to_group("g", DataType::Text, body(n), fire)
            .await
            .unwrap();
    }
    // The last one acked: the emulator then has them all.
    let last = SendToGroupOptions::default();
    publisher
        .send_to_group("g", DataType::Text, body(MESSAGES - 1), last)
        .await
        .unwrap();
}

/// Once the emulator has every message (the publisher's last was acked): most are
/// still unacknowledged two seconds later. The subscriber stopped reading: one that
/// reads, even slowly, reads and acknowledges them within that time (it acknowledges
/// once a second at most). The emulator's buffer for its socket is no sign: the kernel's
/// socket buffers may take megabytes.
async fn held_by_the_emulator(emulator: &Emulator) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = stats(emulator).await;
    assert!(
        later["unackedMessages"].as_u64() >= Some(MESSAGES as u64 / 2),
        "the subscriber read on: {later}"
    );
}

fn body(n: usize) -> Bytes {
    let mut text = format!("{n:05}").into_bytes();
    text.resize(MESSAGE_BYTES, b'.');
    Bytes::from(text)
}

/// A started client of user `sub` joined to `g`, whose handler holds it while `held`
/// says so.
struct Held {
    client: Client,
    held: watch::Sender<bool>,
    events: mpsc::UnboundedReceiver<Event>,
    connection_id: String,
    pauses: Arc<AtomicUsize>,
}

impl Held {
    async fn start(emulator: &Emulator, options: ClientOptions) -> Held {
        let (held, held_rx) = watch::channel(false);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let pauses = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(Gated {
            events: events_tx,
            held: held_rx,
            pauses: Arc::clone(&pauses),
        });
        let client = Client::new(Credential::Url(url(emulator, "sub")), options, handler).unwrap();
        client.start().await.unwrap();
        let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
            panic!("not connected")
        };
        client.join_group("g").await.unwrap();
        Held {
            client,
            held,
            events,
            connection_id,
            pauses,
        }
    }

    /// Waits until the client has paused its reading at least once.
    async fn until_paused(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.pauses.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never paused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Takes the group messages left of the `MESSAGES`, from `next` on: each once, in order,
/// and nothing else.
async fn rest_in_order(events: &mut mpsc::UnboundedReceiver<Event>, mut next: usize) {
    while next < MESSAGES {
        match next_event(events, 10).await {
            Event::GroupMessage { data, .. } => {
                assert_eq!(data, body(next), "message {next} in order");
                next += 1;
            }
            other => panic!("unexpected {other:?} after {next} messages"),
        }
    }
}

#[tokio::test]
async fn a_held_handler_pauses_reading_and_loses_nothing() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    // Timers shorter than the pause (over 2.5 s): an ack timeout with no retry, and a
    // keep-alive timeout that would drop a connection this quiet.
    let options = ClientOptions {
        ack_timeout: Duration::from_millis(300),
        message_retry: RetryOptions {
            max_retries: Some(0),
            ..fast_options().message_retry
        },
        keep_alive_interval: Some(Duration::from_millis(100)),
        keep_alive_timeout: Some(Duration::from_secs(1)),
        ..fast_options()
    };
    let mut sub = Held::start(&emulator, options).await;
    let (observer, mut observed) = started_with_channel(&emulator, "observer").await;
    observer.join_group("other").await.unwrap();
    let (publisher, _publisher_events) = started_with_channel(&emulator, "pub").await;

    sub.held.send(true).unwrap();
    publish_all(&publisher).await;
    sub.until_paused().await;
    held_by_the_emulator(&emulator).await;

    // Operations still go out, and their ack waits for the pause without timing out.
    let sending = {
        let subscriber = sub.client.clone();
        tokio::spawn(async move {
            subscriber
                .send_to_group(
                    "other",
                    DataType::Text,
                    Bytes::from_static(b"while held"),
                    SendToGroupOptions::default(),
                )
                .await
        })
    };
    let (seen, _) = wait_for(&mut observed, 5, |e| {
        message_text(e).as_deref() == Some("while held")
    })
    .await;
    assert!(matches!(seen, Event::GroupMessage { .. }));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !sending.is_finished(),
        "the ack waits for the reading to resume"
    );
    let received_while_held = std::iter::from_fn(|| sub.events.try_recv().ok()).count();
    assert!(
        received_while_held < MESSAGES / 2,
        "{received_while_held} events arrived while held"
    );
    let before = stats(&emulator).await;

    sub.held.send(false).unwrap();
    rest_in_order(&mut sub.events, received_while_held).await;
    let sent = sending
        .await
        .unwrap()
        .expect("acked after the pause, within its timeout");
    assert!(!sent.is_duplicated);
    let after = stats(&emulator).await;
    for counter in ["connectionsOpened", "recoveries", "bufferOverflows"] {
        assert_eq!(before[counter], after[counter], "{counter}: {after}");
    }
    assert!(sub.events.try_recv().is_err(), "nothing but the messages");
}

#[tokio::test]
async fn a_connection_lost_while_paused_is_recovered_and_loses_nothing() {
    let emulator = Emulator::start(Config {
        recovery_window: Duration::from_secs(10),
        ..Config::default()
    })
    .await
    .unwrap();
    // Pings every 100 ms: a write finds the lost socket while nothing is read.
    let options = ClientOptions {
        keep_alive_interval: Some(Duration::from_millis(100)),
        keep_alive_timeout: Some(Duration::from_secs(1)),
        ..fast_options()
    };
    let mut sub = Held::start(&emulator, options).await;
    let (publisher, _publisher_events) = started_with_channel(&emulator, "pub").await;
    sub.held.send(true).unwrap();
    publish_all(&publisher).await;
    sub.until_paused().await;
    held_by_the_emulator(&emulator).await;

    let before = stats(&emulator).await["recoveries"].as_u64();
    common::fault(&emulator, HUB, &sub.connection_id, ":drop").await;
    until_stats(&emulator, "the paused client's recovery", 10, |s| {
        s["recoveries"].as_u64() > before
    })
    .await;
    let received_while_held = std::iter::from_fn(|| sub.events.try_recv().ok()).count();
    sub.held.send(false).unwrap();
    // The service replays what the client had not acknowledged; it keeps none twice.
    rest_in_order(&mut sub.events, received_while_held).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sub.events.try_recv().is_err(), "nothing after the messages");
}

#[tokio::test]
async fn a_json_client_paused_past_the_services_buffer_reconnects_and_goes_on() {
    // The emulator closes a socket that holds more than 1 MiB unread.
    let emulator = Emulator::start(Config {
        max_outbound_bytes: 1 << 20,
        ..Config::default()
    })
    .await
    .unwrap();
    let options = ClientOptions {
        protocol: webpubsub_client::Protocol::Json,
        keep_alive_interval: Some(Duration::from_millis(100)),
        keep_alive_timeout: Some(Duration::from_secs(1)),
        ..fast_options()
    };
    let mut sub = Held::start(&emulator, options).await;
    let (publisher, _publisher_events) = started_with_channel(&emulator, "pub").await;
    sub.held.send(true).unwrap();
    publish_all(&publisher).await;
    until_stats(&emulator, "the overflow of the paused client", 10, |s| {
        s["bufferOverflows"].as_u64() >= Some(1)
    })
    .await;
    // Still held: its pings find the closed socket, and it connects again.
    until_stats(&emulator, "the paused client's new connection", 15, |s| {
        s["connectionsOpened"].as_u64() >= Some(3)
    })
    .await;
    sub.held.send(false).unwrap();

    // What it read before the pause, in order; the lost connection and a new one (more
    // than one when a slow machine let the keep-alive timeout pass before the pause),
    // which rejoins the group (the test cannot see when: it sends until one arrives)
    // and reads on.
    let mut next = 0;
    let mut reconnected = false;
    let mut after = false;
    for _ in 0..20 {
        let text = Bytes::from_static(b"after");
        let options = SendToGroupOptions::default();
        publisher
            .send_to_group("g", DataType::Text, text, options)
            .await
            .unwrap();
        let wait = Duration::from_millis(500);
        while let Ok(Some(event)) = tokio::time::timeout(wait, sub.events.recv()).await {
            match event {
                Event::GroupMessage { data, .. } if data[..] == b"after"[..] => {
                    after = true;
                    break;
                }
                Event::GroupMessage { data, .. } => {
                    // In order, none twice; those published while a slow machine's
                    // keep-alive timeout had it reconnect are the service's loss.
                    let n: usize = std::str::from_utf8(&data[..5]).unwrap().parse().unwrap();
                    assert!(n >= next, "message {n} after {next}");
                    assert_eq!(data, body(n));
                    next = n + 1;
                    reconnected = false; // only a reconnection after them counts
                }
                Event::Disconnected { .. } => {}
                Event::Connected { connection_id, .. } => {
                    assert_ne!(connection_id, sub.connection_id);
                    reconnected = true;
                }
                other => panic!("unexpected {other:?} after {next} messages"),
            }
        }
        if after {
            break;
        }
    }
    assert!(after && reconnected, "a message after the reconnection");
    assert!(next < MESSAGES, "the service dropped the rest");
    assert_eq!(sub.client.state(), webpubsub_client::ClientState::Connected);
}

/// What a C client's callback saw, and what it is told.
#[derive(Default)]
struct Seen {
    messages: Vec<Vec<u8>>,
    /// The kinds of the other events, in order.
    others: Vec<u32>,
    /// The callback waits in its first message until this is set.
    released: bool,
    /// The statuses of the calls the held callback made then, once they returned.
    calls: Option<Vec<u32>>,
    /// The client's finalizer ran.
    freed: bool,
}

/// What the held callback does with its client once released: the calls' statuses.
type HeldCalls = fn(*mut wps_client) -> Vec<u32>;

/// A C client's callback state.
struct Subscriber {
    watched: common::Watched<Seen>,
    client: AtomicPtr<wps_client>,
    /// Holds the callback in the first message until released, then makes these calls.
    held: Option<HeldCalls>,
}

impl Subscriber {
    fn new(held: Option<HeldCalls>) -> Subscriber {
        Subscriber {
            watched: common::Watched::default(),
            client: AtomicPtr::new(std::ptr::null_mut()),
            held,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.watched.seen.lock().unwrap()
    }

    fn update(&self, change: impl FnOnce(&mut Seen)) {
        change(&mut self.seen());
        self.watched.changed.notify_all();
    }

    fn release(&self) {
        self.update(|seen| seen.released = true);
    }
}

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let sub = &*(user_data as *const Subscriber);
    let event = &*event;
    if event.kind != WPS_EVENT_GROUP_MESSAGE {
        sub.update(|seen| seen.others.push(event.kind));
        return;
    }
    let data = std::slice::from_raw_parts(event.data, event.data_len).to_vec();
    let mut first = false;
    sub.update(|seen| {
        seen.messages.push(data);
        first = seen.messages.len() == 1;
    });
    if let (true, Some(calls)) = (first, sub.held) {
        sub.watched.wait("the test's release", |seen| seen.released);
        let statuses = calls(sub.client.load(Ordering::Acquire));
        sub.update(|seen| seen.calls = Some(statuses));
    }
}

unsafe extern "C" fn on_free(user_data: *mut c_void) {
    let sub = &*(user_data as *const Subscriber);
    sub.update(|seen| seen.freed = true);
}

/// A started C client of user `user`, joined to `g`, with a backlog of `limit` bytes.
fn c_subscriber(
    emulator: &Emulator,
    user: &str,
    poll: bool,
    limit: usize,
    sub: &Subscriber,
) -> *mut wps_client {
    let url = CString::new(url(emulator, user)).unwrap();
    let mut c = std::ptr::null_mut();
    unsafe {
        let options = wps_options_new();
        check(
            wps_options_set_event_backlog_bytes(options, limit),
            "backlog",
        );
        if poll {
            check(
                wps_options_set_dispatch_mode(options, WPS_DISPATCH_POLL),
                "poll mode",
            );
        }
        let user_data = sub as *const Subscriber as *mut c_void;
        check(
            wps_client_new(
                url.as_ptr(),
                options,
                Some(on_event),
                user_data,
                Some(on_free),
                &mut c,
            ),
            "wps_client_new",
        );
        wps_options_free(options);
        sub.client.store(c, Ordering::Release);
        check(wps_client_start(c), "wps_client_start");
        check(
            wps_client_join_group(c, c"g".as_ptr(), std::ptr::null_mut()),
            "join",
        );
    }
    c
}

/// The backlog of the C subscribers: 8 messages.
const BACKLOG: usize = 256 << 10;

/// Publishes `MESSAGES` messages to `g`; returns once the subscriber stopped reading.
fn publish_until_held(rt: &tokio::runtime::Runtime, emulator: &Emulator) -> Client {
    rt.block_on(async {
        let (publisher, _events) = started_with_channel(emulator, "pub").await;
        publish_all(&publisher).await;
        held_by_the_emulator(emulator).await;
        publisher
    })
}

/// The messages are the first `MESSAGES` (all of them with `all`), each once and in order.
fn assert_in_order(seen: &Seen, all: bool) {
    if all {
        assert_eq!(seen.messages.len(), MESSAGES);
    }
    for (n, message) in seen.messages.iter().enumerate() {
        assert!(message[..] == body(n)[..], "message {n} in order");
    }
}

/// Runs `f` on another thread; its result, or a panic naming `what` after `secs` seconds.
fn within<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

/// A client pointer that may cross threads.
struct Handle(*mut wps_client);

// SAFETY: the library's handles may be used from any thread.
unsafe impl Send for Handle {}

impl Handle {
    /// The pointer (a closure calling this takes the whole `Handle`, which is `Send`).
    fn get(self) -> *mut wps_client {
        self.0
    }
}

/// Dispatches `c` until `done`; panics after 30 s.
fn dispatch_until(c: *mut wps_client, sub: &Subscriber, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&sub.seen()) {
        assert!(Instant::now() < deadline, "not dispatched within 30 s");
        check(
            unsafe { wps_client_dispatch(c, 64, std::ptr::null_mut()) },
            "dispatch",
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_poll_mode_client_that_is_not_dispatched_stops_reading() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub = Subscriber::new(None);
    let c = c_subscriber(&emulator, "sub", true, BACKLOG, &sub);
    let _publisher = publish_until_held(&rt, &emulator);
    dispatch_until(c, &sub, |seen| seen.messages.len() == MESSAGES);
    assert_in_order(&sub.seen(), true);
    unsafe { wps_client_free(c) };
}

#[test]
fn a_blocking_send_from_a_held_callback_still_gets_its_ack() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub = Subscriber::new(Some(|c| {
        vec![common::ffi_send_text(c, c"other", "from the callback", 0)]
    }));
    let c = c_subscriber(&emulator, "sub", false, BACKLOG, &sub);
    let _publisher = publish_until_held(&rt, &emulator);

    // The callback sends while its client's reading is paused: the ack is behind the
    // backlog, so the call resumes the reading until it returns.
    sub.release();
    sub.watched
        .wait("the callback's send to return", |seen| seen.calls.is_some());
    assert_eq!(sub.seen().calls, Some(vec![WPS_STATUS_OK]));
    sub.watched
        .wait("every message", |seen| seen.messages.len() == MESSAGES);
    assert_in_order(&sub.seen(), true);
    unsafe { wps_client_free(c) };
}

/// An upstream that answers every request 200 with its own body as text: an
/// invocation gets its data back.
async fn echo_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(echo(socket));
        }
    });
    url
}

/// Answers the requests of one upstream connection (HTTP/1.1 with a content length).
async fn echo(socket: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::io::BufReader::new(socket);
    while let Some((_, body)) = common::read_request(&mut socket).await {
        let length = body.len();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {length}\r\n\r\n"
        );
        let out = socket.get_mut();
        if out.write_all(head.as_bytes()).await.is_err() || out.write_all(&body).await.is_err() {
            return;
        }
    }
}

/// A blocking invocation echoed by the upstream, a join and a leave: their statuses
/// (the invocation's is `u32::MAX` when its data did not come back).
fn invoke_join_and_leave(c: *mut wps_client) -> Vec<u32> {
    unsafe {
        let mut response = std::ptr::null_mut();
        let mut invoked = wps_client_invoke_event(
            c,
            c"echo".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            b"ping".as_ptr(),
            4,
            10_000,
            &mut response,
        );
        if invoked == WPS_STATUS_OK {
            let mut len = 0;
            let data = wps_invoke_response_data(response, &mut len);
            if std::slice::from_raw_parts(data, len) != b"ping" {
                invoked = u32::MAX;
            }
            wps_invoke_response_free(response);
        }
        let joined = wps_client_join_group(c, c"g2".as_ptr(), std::ptr::null_mut());
        let left = wps_client_leave_group(c, c"g2".as_ptr(), std::ptr::null_mut());
        vec![invoked, joined, left]
    }
}

#[test]
fn a_blocking_invocation_join_and_leave_from_a_held_callback_return() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(echo_upstream());
    let config = Config {
        upstream: Some(upstream),
        ..Config::default()
    };
    let emulator = rt.block_on(Emulator::start(config)).unwrap();
    let sub = Subscriber::new(Some(invoke_join_and_leave));
    let c = c_subscriber(&emulator, "sub", false, BACKLOG, &sub);
    let _publisher = publish_until_held(&rt, &emulator);

    sub.release();
    sub.watched.wait("the callback's calls to return", |seen| {
        seen.calls.is_some()
    });
    assert_eq!(sub.seen().calls, Some(vec![WPS_STATUS_OK; 3]));
    sub.watched
        .wait("every message", |seen| seen.messages.len() == MESSAGES);
    assert_in_order(&sub.seen(), true);
    unsafe { wps_client_free(c) };
}

/// Stops `c`, which must return within 5 s, and waits until the emulator has closed its
/// connection (the publisher's stays); returns the handle.
fn stopped_at_once(c: Handle, rt: &tokio::runtime::Runtime, emulator: &Emulator) -> Handle {
    let (stopped, c) = within("wps_client_stop", 5, move || {
        let c = c.get();
        (unsafe { wps_client_stop(c) }, Handle(c))
    });
    check(stopped, "wps_client_stop");
    rt.block_on(until_stats(emulator, "the connection closed", 10, |s| {
        s["connections"].as_u64() == Some(1)
    }));
    c
}

#[test]
fn a_paused_poll_mode_client_stops_and_frees_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub: &'static Subscriber = Box::leak(Box::new(Subscriber::new(None)));
    let c = Handle(c_subscriber(&emulator, "sub", true, BACKLOG, sub));
    let _publisher = publish_until_held(&rt, &emulator);

    // Never dispatched: its events wait, its reading is paused.
    let c = stopped_at_once(c, &rt, &emulator);
    within("wps_client_free", 5, move || unsafe {
        wps_client_free(c.get())
    });
    let seen = sub.seen();
    assert!(seen.freed, "the finalizer ran");
    assert!(seen.messages.is_empty(), "nothing delivered once freed");
}

#[test]
fn a_paused_client_whose_callback_is_held_stops_and_frees_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub: &'static Subscriber = Box::leak(Box::new(Subscriber::new(Some(|_| Vec::new()))));
    let c = Handle(c_subscriber(&emulator, "sub", false, BACKLOG, sub));
    let _publisher = publish_until_held(&rt, &emulator);

    let c = stopped_at_once(c, &rt, &emulator);
    // The free waits for the held callback, and for nothing else.
    let (freed_tx, freed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        unsafe { wps_client_free(c.get()) };
        let _ = freed_tx.send(());
    });
    sub.release();
    freed
        .recv_timeout(Duration::from_secs(5))
        .expect("wps_client_free returned once the callback did");
    let seen = sub.seen();
    assert!(seen.freed, "the finalizer ran");
    assert_in_order(&seen, false);
}

#[test]
fn a_suspended_client_reads_on_and_drops_what_comes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub = Subscriber::new(None);
    let c = c_subscriber(&emulator, "sub", true, BACKLOG, &sub);
    let _publisher = publish_until_held(&rt, &emulator);

    // Nothing will dispatch it for a while: the messages that come are dropped, so
    // its reading goes on whatever waits.
    check(unsafe { wps_client_dispatch_suspend(c) }, "suspend");
    // It reads and acknowledges every message.
    rt.block_on(until_stats(
        &emulator,
        "the suspended client reading on",
        10,
        |s| s["unackedMessages"].as_u64() == Some(0) && s["outboundBytes"].as_u64() == Some(0),
    ));
    let mut dropped = 0;
    check(
        unsafe { wps_client_dispatch_resume(c, &mut dropped) },
        "resume",
    );
    assert!(dropped > 0);
    let dropped = dropped as usize;
    dispatch_until(c, &sub, |seen| seen.messages.len() + dropped == MESSAGES);
    assert_in_order(&sub.seen(), false);
    unsafe { wps_client_free(c) };
}

#[test]
fn backlogs_of_one_byte_and_of_no_limit_deliver_everything() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let limits = [1, usize::MAX, 0];
    let subs: Vec<Subscriber> = limits.iter().map(|_| Subscriber::new(None)).collect();
    let clients: Vec<_> = limits
        .iter()
        .zip(&subs)
        .map(|(limit, sub)| c_subscriber(&emulator, "sub", false, *limit, sub))
        .collect();
    rt.block_on(async {
        let (publisher, _events) = started_with_channel(&emulator, "pub").await;
        publish_all(&publisher).await;
    });
    for (limit, sub) in limits.iter().zip(&subs) {
        sub.watched
            .wait(&format!("every message, backlog {limit}"), |seen| {
                seen.messages.len() == MESSAGES
            });
        assert_in_order(&sub.seen(), true);
    }
    for c in clients {
        unsafe { wps_client_free(c) };
    }
}

#[test]
fn clients_behind_a_held_callback_on_their_dispatcher_all_resume() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    // One held client, then more than the dispatcher threads: some share its thread.
    let held = Subscriber::new(Some(|_| Vec::new()));
    let others: Vec<Subscriber> = (0..4).map(|_| Subscriber::new(None)).collect();
    let mut clients = vec![c_subscriber(&emulator, "held", false, BACKLOG, &held)];
    for sub in &others {
        clients.push(c_subscriber(&emulator, "other", false, BACKLOG, sub));
    }
    let _publisher = publish_until_held(&rt, &emulator);
    held.release();
    for sub in std::iter::once(&held).chain(&others) {
        sub.watched
            .wait("every message", |seen| seen.messages.len() == MESSAGES);
        assert_in_order(&sub.seen(), true);
    }
    for c in clients {
        unsafe { wps_client_free(c) };
    }
}
