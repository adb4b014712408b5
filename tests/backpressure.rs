//! An event handler that is behind pauses the client's reading: the service holds the
//! messages meanwhile, operations still go out, no timer runs out, nothing is lost.
mod common;
use bytes::Bytes;
use common::{
    all_roles, check, fast_options, message_text, next_event, stats, until_stats, wait_for,
};
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_GROUP_MESSAGE};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_dispatch, wps_client_free, wps_client_join_group, wps_client_new,
    wps_client_start,
};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_dispatch_mode,
    wps_options_set_event_backlog_bytes,
};
use webpubsub_client::ffi::status::{WPS_DISPATCH_POLL, WPS_STATUS_OK};
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

/// Once the emulator has every message: it holds at least 4 MiB for its sockets, and
/// still does a second later. The subscriber stopped reading (one that reads, even
/// slowly, empties it well within that second).
async fn held_by_the_emulator(emulator: &Emulator) {
    let held = |s: &serde_json::Value| s["outboundBytes"].as_u64().unwrap_or(0) >= 4 << 20;
    until_stats(emulator, "messages held for the paused client", 20, held).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = stats(emulator).await;
    assert!(held(&later), "the subscriber read on: {later}");
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

/// What a C client's callback saw, and what it is told.
#[derive(Default)]
struct Seen {
    messages: Vec<Vec<u8>>,
    /// The callback waits in its first message until this is set.
    released: bool,
    /// The status of the blocking send the callback made then, once it returned.
    sent: Option<u32>,
}

/// The C client a callback sends with (null: it does not send).
struct Subscriber {
    watched: common::Watched<Seen>,
    client: std::sync::atomic::AtomicPtr<wps_client>,
}

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let sub = &*(user_data as *const Subscriber);
    let event = &*event;
    if event.kind != WPS_EVENT_GROUP_MESSAGE {
        return;
    }
    let data = std::slice::from_raw_parts(event.data, event.data_len).to_vec();
    let first = {
        let mut seen = sub.watched.seen.lock().unwrap();
        seen.messages.push(data);
        sub.watched.changed.notify_all();
        seen.messages.len() == 1
    };
    let client = sub.client.load(std::sync::atomic::Ordering::Acquire);
    if first && !client.is_null() {
        sub.watched.wait("the test's release", |seen| seen.released);
        let status = common::ffi_send_text(client, c"other", "from the callback", 0);
        sub.watched.seen.lock().unwrap().sent = Some(status);
        sub.watched.changed.notify_all();
    }
}

/// A started C client of user `user`, joined to `g`, with a 256 KiB backlog.
fn c_subscriber(emulator: &Emulator, user: &str, poll: bool, sub: &Subscriber) -> *mut wps_client {
    let url = CString::new(url(emulator, user)).unwrap();
    let mut c = std::ptr::null_mut();
    unsafe {
        let options = wps_options_new();
        check(
            wps_options_set_event_backlog_bytes(options, 256 << 10),
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
                None,
                &mut c,
            ),
            "wps_client_new",
        );
        wps_options_free(options);
        check(wps_client_start(c), "wps_client_start");
        check(
            wps_client_join_group(c, c"g".as_ptr(), std::ptr::null_mut()),
            "join",
        );
    }
    c
}

/// Publishes `MESSAGES` messages to `g`; returns once the subscriber stopped reading.
fn publish_until_held(rt: &tokio::runtime::Runtime, emulator: &Emulator) -> Client {
    rt.block_on(async {
        let (publisher, _events) = started_with_channel(emulator, "pub").await;
        publish_all(&publisher).await;
        held_by_the_emulator(emulator).await;
        publisher
    })
}

fn assert_all_in_order(seen: &Seen) {
    assert_eq!(seen.messages.len(), MESSAGES);
    for (n, message) in seen.messages.iter().enumerate() {
        assert!(message[..] == body(n)[..], "message {n} in order");
    }
}

#[test]
fn a_poll_mode_client_that_is_not_dispatched_stops_reading() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub = Subscriber {
        watched: common::Watched::default(),
        client: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
    };
    let c = c_subscriber(&emulator, "sub", true, &sub);
    let _publisher = publish_until_held(&rt, &emulator);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sub.watched.seen.lock().unwrap().messages.len() < MESSAGES {
        assert!(
            std::time::Instant::now() < deadline,
            "not all dispatched within 30 s"
        );
        check(
            unsafe { wps_client_dispatch(c, 64, std::ptr::null_mut()) },
            "dispatch",
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_all_in_order(&sub.watched.seen.lock().unwrap());
    unsafe { wps_client_free(c) };
}

#[test]
fn a_blocking_send_from_a_held_callback_still_gets_its_ack() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let sub = Subscriber {
        watched: common::Watched::default(),
        client: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
    };
    let c = c_subscriber(&emulator, "sub", false, &sub);
    sub.client.store(c, std::sync::atomic::Ordering::Release);
    let _publisher = publish_until_held(&rt, &emulator);

    // The callback sends while its client's reading is paused: the ack is behind the
    // backlog, so the call resumes the reading until it returns.
    sub.watched.seen.lock().unwrap().released = true;
    sub.watched.changed.notify_all();
    sub.watched
        .wait("the callback's send to return", |seen| seen.sent.is_some());
    assert_eq!(sub.watched.seen.lock().unwrap().sent, Some(WPS_STATUS_OK));
    sub.watched
        .wait("every message", |seen| seen.messages.len() == MESSAGES);
    assert_all_in_order(&sub.watched.seen.lock().unwrap());
    unsafe { wps_client_free(c) };
}
