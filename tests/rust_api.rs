//! The Rust API as an application uses it: from runtimes of its own (or none), across
//! threads, from inside its event handler, with its errors in `?` chains, with odd
//! options. The client runs on the library's own runtime; the application's runtime
//! (or executor) only polls the futures.

mod common;

use bytes::Bytes;
use common::{fast_options, message_text, user_token};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::sync::mpsc;
use webpubsub_client::{
    Client, ClientOptions, ClientState, Credential, DataType, Error, Event, EventHandler,
    InvokeOptions, Resume, RetryOptions, SendToGroupOptions, WeakClient,
};
use webpubsub_emulator::{Config, Emulator};

const HUB: &str = "hub";

/// An emulator on a runtime of its own, so that the tests' runtimes can come and go.
fn emulator() -> (tokio::runtime::Runtime, Emulator) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    (rt, emulator)
}

/// Wakes a thread parked in [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor that is not tokio: polls `future` on this thread, parking it
/// between wake-ups.
fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// The next event matching `matches`, at most 10 s, from any executor (the timer is
/// the library runtime's, which any executor may poll).
async fn event_where(
    events: &mut mpsc::UnboundedReceiver<Event>,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    let wait = async {
        loop {
            let event = events.recv().await.expect("event channel closed");
            if matches(&event) {
                return event;
            }
        }
    };
    let bounded = {
        let _runtime = webpubsub_client::runtime::handle().enter();
        tokio::time::timeout(Duration::from_secs(10), wait)
    };
    bounded.await.expect("no matching event within 10 s")
}

/// Starts a client of `url`, joins `g`, sends `text` to it and waits for its echo,
/// then stops: the whole round, polled by whatever executor runs it.
async fn round_trip(url: String, text: &str) {
    let (client, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    client.start().await.unwrap();
    client.join_group("g").await.unwrap();
    let sent = client
        .send_to_group(
            "g",
            DataType::Text,
            Bytes::from(text.to_owned()),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap();
    assert!(sent.ack_id.is_some());
    let echo = event_where(&mut events, |e| message_text(e).is_some()).await;
    assert_eq!(message_text(&echo).as_deref(), Some(text));
    client.stop().await;
    assert_eq!(client.state(), ClientState::Stopped);
}

#[test]
fn works_from_a_current_thread_runtime_of_the_application() {
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(round_trip(url, "current thread"));
}

#[test]
fn works_from_a_multi_thread_runtime_of_the_application() {
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { tokio::spawn(round_trip(url, "multi thread")).await })
        .unwrap();
}

#[test]
fn works_from_an_executor_that_is_not_tokio() {
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    block_on(round_trip(url, "no tokio"));
}

#[test]
fn a_client_outlives_the_runtime_that_created_it() {
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, mut events) = first.block_on(async {
        let (client, events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
        client.start().await.unwrap();
        client.join_group("g").await.unwrap();
        (client, events)
    });
    drop(first);
    block_on(async {
        assert_eq!(client.state(), ClientState::Connected);
        client
            .send_to_group(
                "g",
                DataType::Text,
                "after".into(),
                SendToGroupOptions::default(),
            )
            .await
            .unwrap();
        let echo = event_where(&mut events, |e| message_text(e).is_some()).await;
        assert_eq!(message_text(&echo).as_deref(), Some("after"));
        client.stop().await;
    });
}

#[test]
fn a_runtime_dropped_with_operations_pending_leaves_the_client_usable() {
    let (rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (client, _events) = block_on(async {
        let (client, events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
        client.start().await.unwrap();
        (client, events)
    });
    let id = client.connection_id().unwrap();
    // The service acks none of the application's sends: its tasks wait in them when
    // their runtime goes.
    let frames_in = rt.block_on(common::stats(&emulator))["framesIn"]
        .as_u64()
        .unwrap();
    rt.block_on(common::fault(&emulator, HUB, &id, ":dropAcks?count=10"));
    let user = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for n in 0..10 {
        let client = client.clone();
        user.spawn(async move {
            let sent = client
                .send_to_group(
                    "g",
                    DataType::Text,
                    Bytes::from(format!("m{n}")),
                    SendToGroupOptions::default(),
                )
                .await;
            panic!("a send completed: {sent:?}");
        });
    }
    rt.block_on(common::until_stats(
        &emulator,
        "the sends written",
        10,
        |s| s["framesIn"].as_u64().unwrap() >= frames_in + 10,
    ));
    drop(user);
    block_on(async {
        let acked = client.join_group("after").await;
        assert!(acked.is_ok(), "{acked:?}");
        assert_eq!(client.state(), ClientState::Connected);
        client.stop().await;
    });
}

#[tokio::test(flavor = "current_thread")]
async fn the_last_client_dropped_inside_a_current_thread_runtime() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (client, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    client.start().await.unwrap();
    let clone = client.clone();
    drop(client);
    drop(clone);
    // The connection task ends (its channel closes) without this runtime's help.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while events.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the connection task did not end");
}

#[test]
fn threads_share_a_client_through_start_stop_and_sends() {
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (client, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    block_on(client.start()).unwrap();
    let cycling = Arc::new(AtomicBool::new(true));
    let (done, finished) = std::sync::mpsc::channel();
    for n in 0..4 {
        let (client, cycling, done) = (client.clone(), cycling.clone(), done.clone());
        std::thread::spawn(move || {
            let send = |m: usize| {
                let text = Bytes::from(format!("{n}/{m}"));
                block_on(client.send_to_group("g", DataType::Text, text, Default::default()))
            };
            let mut m = 0;
            while cycling.load(Ordering::SeqCst) {
                match send(m) {
                    Ok(_)
                    | Err(
                        Error::Stopped { .. } | Error::IllegalState(_) | Error::NotConnected { .. },
                    ) => {}
                    Err(other) => panic!("send {n}/{m}: {other:?}"),
                }
                m += 1;
            }
            // Once the client is started for good, every send goes through.
            let _ = done.send(send(m));
        });
    }
    for _ in 0..5 {
        block_on(client.stop());
        // Two starts at once: one connects, the other is refused.
        let (a, b) = block_on(async { tokio::join!(client.start(), client.start()) });
        let refused = [&a, &b]
            .into_iter()
            .filter(|r| matches!(r, Err(Error::IllegalState(_))))
            .count();
        assert_eq!((a.is_ok() as usize, refused), (1, 1), "{a:?} {b:?}");
    }
    cycling.store(false, Ordering::SeqCst);
    for _ in 0..4 {
        let last = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("a sender hung");
        assert!(last.is_ok(), "{last:?}");
    }
    assert_eq!(client.state(), ClientState::Connected);
    block_on(client.stop());
}

#[test]
fn a_start_reads_connecting_once_handed_over_and_a_stop_then_wins() {
    // As the official clients' start(), which sets Connecting at once. The state read
    // Stopped until the connection task took the start, so a caller checking it before
    // stopping (the Python bindings' close()) left a client it had closed to connect.
    let (_rt, emulator) = emulator();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (client, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    for round in 0..20 {
        let mut start = Box::pin(client.start());
        // Handed over by the first poll; on a busy machine the task may even have
        // connected before that poll looked for its outcome.
        let first = start.as_mut().poll(&mut Context::from_waker(&waker));
        assert_ne!(client.state(), ClientState::Stopped, "round {round}");
        block_on(client.stop());
        let outcome = match first {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => block_on(start),
        };
        match outcome {
            Ok(()) | Err(Error::Stopped { .. }) => {}
            Err(other) => panic!("round {round}: {other:?}"),
        }
        assert_eq!(client.state(), ClientState::Stopped, "round {round}");
    }
}

#[tokio::test]
async fn a_handler_operates_on_its_client_through_spawned_tasks_and_lets_it_go() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (tx, mut events) = mpsc::unbounded_channel();
    let this: Arc<std::sync::OnceLock<WeakClient>> = Arc::default();
    let handler = {
        let this = this.clone();
        move |event: Event| {
            // The handler runs on the library's runtime: tokio::spawn works there.
            match message_text(&event).as_deref() {
                Some("ping") => {
                    let client = this.get().unwrap().upgrade().unwrap();
                    tokio::spawn(async move {
                        let opts = SendToGroupOptions::default();
                        client
                            .send_to_group("g", DataType::Text, "pong".into(), opts)
                            .await
                            .unwrap();
                    });
                }
                Some("stop") => {
                    let client = this.get().unwrap().upgrade().unwrap();
                    tokio::spawn(async move { client.stop().await });
                }
                _ => {}
            }
            let _ = tx.send(event);
        }
    };
    let client = Client::new(Credential::Url(url), fast_options(), Arc::new(handler)).unwrap();
    this.set(client.downgrade()).unwrap();
    client.start().await.unwrap();
    client.join_group("g").await.unwrap();
    for (text, answer) in [
        (
            "ping",
            Event::GroupMessage {
                group: "g".into(),
                from_user_id: Some("u".into()),
                data_type: DataType::Text,
                data: "pong".into(),
                sequence_id: Some(2),
            },
        ),
        ("stop", Event::Stopped { error: None }),
    ] {
        let opts = SendToGroupOptions::default();
        client
            .send_to_group("g", DataType::Text, text.into(), opts)
            .await
            .unwrap();
        common::wait_for(&mut events, 10, |e| *e == answer).await;
    }
    assert_eq!(client.state(), ClientState::Stopped);
    // The handler's weak handle does not keep the client: dropping the application's
    // ends the connection task, which drops the handler and closes its channel.
    let weak = client.downgrade();
    drop(client);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while events.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the connection task did not end");
    assert!(weak.upgrade().is_none());
}

#[tokio::test]
async fn a_panicking_handler_loses_its_event_only() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let (tx, mut events) = mpsc::unbounded_channel();
    let handler = move |event: Event| {
        assert!(
            message_text(&event).as_deref() != Some("boom"),
            "handler bug"
        );
        let _ = tx.send(event);
    };
    let client = Client::new(Credential::Url(url), fast_options(), Arc::new(handler)).unwrap();
    client.start().await.unwrap();
    client.join_group("g").await.unwrap();
    for text in ["boom", "after"] {
        let opts = SendToGroupOptions::default();
        client
            .send_to_group("g", DataType::Text, text.into(), opts)
            .await
            .unwrap();
    }
    let (_, skipped) = common::wait_for(&mut events, 10, |e| {
        message_text(e).as_deref() == Some("after")
    })
    .await;
    assert!(
        skipped.iter().all(|e| message_text(e).is_none()),
        "{skipped:?}"
    );
    client.stop().await;
}

/// Holds reading once with a `Resume` that panics.
struct PanickingResume(AtomicBool);

impl EventHandler for PanickingResume {
    fn on_event(&self, _: Event) {}

    fn backpressure(&self) -> Option<Resume> {
        self.0
            .swap(false, Ordering::SeqCst)
            .then(|| Box::pin(async { panic!("resume bug") }) as Resume)
    }
}

#[tokio::test]
async fn a_panicking_resume_lets_reading_go_on() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let handler = Arc::new(PanickingResume(AtomicBool::new(true)));
    let client = Client::new(Credential::Url(url), fast_options(), handler).unwrap();
    client.start().await.unwrap();
    let joined = tokio::time::timeout(Duration::from_secs(10), client.join_group("g")).await;
    assert!(matches!(joined, Ok(Ok(_))), "{joined:?}");
    client.stop().await;
    assert_eq!(client.state(), ClientState::Stopped);
}

#[tokio::test]
async fn a_panicking_credential_provider_fails_the_start_only() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let credential = {
        let calls = calls.clone();
        Credential::provider(move || {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            let url = url.clone();
            async move {
                assert!(!first, "provider bug");
                Ok(url)
            }
        })
    };
    let (client, _events) = Client::with_channel(credential, fast_options()).unwrap();
    let started = client.start().await;
    assert!(
        matches!(&started, Err(Error::Credential(m)) if m.contains("provider bug")),
        "{started:?}"
    );
    assert_eq!(client.state(), ClientState::Stopped);
    client.start().await.unwrap();
    client.join_group("g").await.unwrap();
    client.stop().await;
}

#[tokio::test]
async fn errors_travel_through_question_marks() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    // A token without the join role: the service refuses the join.
    let url = emulator.client_url(HUB, &webpubsub_emulator::TokenOptions::default());
    let (client, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    client.start().await.unwrap();
    async fn join(client: &Client) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        client.join_group("g").await?;
        Ok(())
    }
    let error = join(&client).await.unwrap_err();
    let error = error.downcast::<Error>().unwrap();
    let Error::Ack { ack_id, name, .. } = &*error else {
        panic!("{error:?}");
    };
    assert_eq!(name, "Forbidden");
    assert_eq!(error.ack_id(), Some(*ack_id));
    let detail = error.service_message().unwrap();
    assert!(!detail.is_empty());
    assert_eq!(
        error.to_string(),
        format!("operation {ack_id} failed: Forbidden: {detail}")
    );
    client.stop().await;
}

#[test]
fn durations_the_clock_cannot_hold_are_refused() {
    let url = || Credential::Url("ws://127.0.0.1:9/client/hubs/h".into());
    let retry = RetryOptions {
        delay: Duration::MAX,
        ..RetryOptions::message_default()
    };
    let cases: Vec<(&str, ClientOptions)> = vec![
        (
            "ack_timeout",
            ClientOptions {
                ack_timeout: Duration::MAX,
                ..fast_options()
            },
        ),
        (
            "start_timeout",
            ClientOptions {
                start_timeout: Duration::MAX,
                ..fast_options()
            },
        ),
        (
            "recovery_window",
            ClientOptions {
                recovery_window: Duration::MAX,
                ..fast_options()
            },
        ),
        (
            "keep_alive_interval",
            ClientOptions {
                keep_alive_interval: Some(Duration::MAX),
                keep_alive_timeout: None,
                ..fast_options()
            },
        ),
        (
            "keep_alive_timeout",
            ClientOptions {
                keep_alive_timeout: Some(Duration::MAX),
                ..fast_options()
            },
        ),
        (
            "message_retry",
            ClientOptions {
                message_retry: retry.clone(),
                ..fast_options()
            },
        ),
        (
            "reconnect_retry",
            ClientOptions {
                reconnect_retry: retry,
                ..fast_options()
            },
        ),
    ];
    for (name, options) in cases {
        match Client::with_channel(url(), options) {
            Err(Error::InvalidArgument(message)) => assert!(message.contains(name), "{message}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_longest_durations_allowed_work() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    // The longest a C caller can give (u64::MAX milliseconds).
    let longest = Duration::from_millis(u64::MAX);
    let options = ClientOptions {
        ack_timeout: longest,
        start_timeout: longest,
        recovery_window: longest,
        keep_alive_interval: Some(longest),
        keep_alive_timeout: None,
        ..fast_options()
    };
    let (client, mut events) = Client::with_channel(Credential::Url(url), options).unwrap();
    client.start().await.unwrap();
    client.join_group("g").await.unwrap();
    let invoke = InvokeOptions {
        timeout: Some(Duration::MAX),
    };
    let invoked = client
        .invoke_event("e", DataType::Text, "x".into(), invoke)
        .await;
    assert!(
        matches!(invoked, Err(Error::InvalidArgument(_))),
        "{invoked:?}"
    );
    // A recovery adds the window to the clock.
    let id = client.connection_id().unwrap();
    common::fault(&emulator, HUB, &id, ":drop").await;
    sent_and_received(&client, &mut events, "g", "after").await;
    assert_eq!(client.state(), ClientState::Connected);
    client.stop().await;
}

/// Sends `text` to `group` (joined), acked, and waits for it to come back.
async fn sent_and_received(
    client: &Client,
    events: &mut mpsc::UnboundedReceiver<Event>,
    group: &str,
    text: &str,
) {
    let sent = client
        .send_to_group(
            group,
            DataType::Text,
            Bytes::from(text.to_owned()),
            SendToGroupOptions::default(),
        )
        .await;
    assert!(sent.is_ok(), "{sent:?}");
    common::wait_for(events, 10, |e| message_text(e).as_deref() == Some(text)).await;
}

/// A token with a role per group for each of `groups` groups, which it also joins.
fn token_for_groups(groups: usize) -> webpubsub_emulator::TokenOptions {
    let names: Vec<String> = (0..groups).map(|i| format!("group-{i}")).collect();
    let roles = names
        .iter()
        .flat_map(|g| {
            [
                format!("webpubsub.joinLeaveGroup.{g}"),
                format!("webpubsub.sendToGroup.{g}"),
            ]
        })
        .collect();
    webpubsub_emulator::TokenOptions {
        user_id: Some("u".into()),
        roles,
        groups: names,
        ttl: None,
    }
}

#[tokio::test]
async fn a_url_too_long_for_an_http_request_is_refused_saying_so() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    // 560 groups' roles: a URL just under the 65534 bytes an `http::Uri` can hold.
    let url = emulator.client_url(HUB, &token_for_groups(560));
    assert!(url.len() > 60_000 && url.len() < 65_534, "{}", url.len());
    let (client, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    client.start().await.unwrap();
    client.join_group("group-559").await.unwrap();
    sent_and_received(&client, &mut events, "group-559", "to the last group").await;
    client.stop().await;

    // 1,000 groups' roles: about 110 KB, which no request line here can carry.
    let url = emulator.client_url(HUB, &token_for_groups(1000));
    let length = url.len().to_string();
    let made = Client::with_channel(Credential::Url(url.clone()), fast_options());
    assert!(
        matches!(&made, Err(Error::InvalidArgument(m)) if m.contains(&length) && m.contains("65534")),
        "{made:?}"
    );
    let credential = Credential::provider(move || {
        let url = url.clone();
        async move { Ok(url) }
    });
    let (client, _events) = Client::with_channel(credential, fast_options()).unwrap();
    let started = client.start().await;
    assert!(
        matches!(&started, Err(Error::Credential(m)) if m.contains(&length) && m.contains("65534")),
        "{started:?}"
    );
}

#[tokio::test]
async fn a_port_out_of_range_is_refused_not_replaced() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let bad = format!("ws://127.0.0.1:{}99/client/hubs/{HUB}", emulator.port());
    let made = Client::with_channel(Credential::Url(bad.clone()), fast_options());
    assert!(
        matches!(&made, Err(Error::InvalidArgument(m)) if m.contains("port")),
        "{made:?}"
    );
    for not_a_url in ["ws://exa mple/client/hubs/h", "ws://h:8o/client/hubs/h"] {
        let made = Client::with_channel(Credential::Url(not_a_url.into()), fast_options());
        assert!(
            matches!(made, Err(Error::InvalidArgument(_))),
            "{not_a_url}: {made:?}"
        );
    }
    // From a provider: the start fails, and the next URL is used.
    let urls = Arc::new(std::sync::Mutex::new(vec![url, bad]));
    let credential = Credential::provider(move || {
        let next = urls.lock().unwrap().pop().unwrap();
        async move { Ok(next) }
    });
    let (client, _events) = Client::with_channel(credential, fast_options()).unwrap();
    let started = client.start().await;
    assert!(
        matches!(&started, Err(Error::Credential(m)) if m.contains("port")),
        "{started:?}"
    );
    client.start().await.unwrap();
    client.stop().await;
}

/// A caller that sees a new connection's id finds the client connected: a send made
/// on seeing it is not refused as "not connected".
#[test]
fn a_new_connection_id_is_seen_only_once_the_client_is_connected() {
    const RECONNECTS: usize = 150;
    let (rt, emulator) = emulator();
    let options = ClientOptions {
        reconnect_retry: RetryOptions {
            delay: Duration::from_millis(1),
            ..fast_options().reconnect_retry
        },
        ..fast_options()
    };
    let url = emulator.client_url("hub", &user_token("u"));
    let (client, mut events) = Client::with_channel(Credential::Url(url), options).unwrap();
    rt.block_on(client.start()).unwrap();
    let first = rt.block_on(common::next_event(&mut events, 5));
    assert!(matches!(first, Event::Connected { .. }), "{first:?}");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, done) = (client.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = 0u64;
            while !done.load(Ordering::Relaxed) {
                let before = client.connection_id();
                let state = client.state();
                if before.is_some() && before == client.connection_id() {
                    seen += 1;
                    assert!(
                        matches!(state, ClientState::Connected | ClientState::Recovering),
                        "connection {before:?} seen while {state:?}"
                    );
                }
            }
            seen
        })
    };
    rt.block_on(async {
        for _ in 0..RECONNECTS {
            let id = client.connection_id().unwrap();
            common::fault(&emulator, "hub", &id, ":close?code=1008").await;
            let (connected, _) =
                common::wait_for(&mut events, 10, |e| matches!(e, Event::Connected { .. })).await;
            assert!(
                matches!(&connected, Event::Connected { connection_id, .. } if *connection_id != id),
                "{connected:?}"
            );
        }
    });
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("the watcher's assertion");
    assert!(seen > 0, "the watcher never saw a connection id");
    rt.block_on(client.stop());
}

/// Records a client's events (by kind) and batch ends, in the order the handler sees
/// them.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl Recorder {
    fn log(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl EventHandler for Recorder {
    fn on_event(&self, event: Event) {
        let entry = match event {
            Event::Connected { .. } => "connected".to_owned(),
            Event::Disconnected { .. } => "disconnected".to_owned(),
            Event::Stopped { error: None } => "stopped".to_owned(),
            other => message_text(&other).unwrap_or_else(|| format!("{other:?}")),
        };
        self.0.lock().unwrap().push(entry);
    }

    fn on_batch_end(&self) {
        self.0.lock().unwrap().push("end".to_owned());
    }
}

#[tokio::test]
async fn start_and_stop_return_after_their_events_each_ending_a_batch() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    let recorder = Arc::new(Recorder::default());
    let client = Client::new(
        Credential::Url(url.clone()),
        fast_options(),
        recorder.clone(),
    )
    .unwrap();
    client.start().await.unwrap();
    assert_eq!(recorder.log(), ["connected", "end"]);
    client.join_group("g").await.unwrap();
    let opts = SendToGroupOptions::default();
    client
        .send_to_group("g", DataType::Text, "echo".into(), opts)
        .await
        .unwrap();
    common::until("the echo's batch ended", Duration::from_secs(10), || {
        recorder
            .log()
            .ends_with(&["echo".to_owned(), "end".to_owned()])
    })
    .await;
    client.stop().await;
    assert_eq!(
        recorder.log(),
        [
            "connected",
            "end",
            "echo",
            "end",
            "disconnected",
            "end",
            "stopped",
            "end"
        ]
    );
    // Stopping a stopped client does nothing.
    client.stop().await;
    assert_eq!(recorder.log().len(), 8);

    // A failed start raises no event: its error is the call's.
    let recorder = Arc::new(Recorder::default());
    let forged = Credential::Url(format!("{url}x"));
    let client = Client::new(forged, fast_options(), recorder.clone()).unwrap();
    let error = client.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Connect(m) if m.contains("401")),
        "{error:?}"
    );
    client.stop().await;
    assert!(recorder.log().is_empty(), "{:?}", recorder.log());
}
