//! The service goes away (its process killed: every socket cut without a close frame)
//! and comes back on the same port without the sessions, or never comes back.
//!
//! The tests take turns: a killed service's port is free, and the system may give it
//! to the service of a test running meanwhile, which the clients of the first would
//! then reach.

mod common;

use bytes::Bytes;
use common::outage::{client_url, silent_upstream, Service};
use common::{fast_options, next_event, StateAtEvent};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use webpubsub_client::{
    AckResult, Client, ClientOptions, ClientState, Credential, DataType, Error, Event, Protocol,
    RetryOptions, SendEventOptions, SendToGroupOptions,
};

/// One test at a time (see the module's doc).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A provider of fresh client URLs of `user` on `port`, with its call count.
fn credential(port: u16, user: &str) -> (Credential, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let user = user.to_owned();
    let credential = Credential::provider(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let url = client_url(port, &user);
        async move { Ok(url) }
    });
    (credential, calls)
}

/// Waits until the upstream got a user event (the client wrote it), at most 5 s.
async fn until_sent(reached: &AtomicUsize) {
    let sent = || reached.load(Ordering::SeqCst) >= 1;
    common::until(
        "the user event at the upstream",
        Duration::from_secs(5),
        sent,
    )
    .await;
}

/// A started client of user `u` whose URL comes from [`credential`]; its events after
/// `Connected`, its connection id and its credential's call count.
async fn started(
    port: u16,
    options: ClientOptions,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
    String,
    Arc<AtomicUsize>,
) {
    let (credential, calls) = credential(port, "u");
    let (client, mut events) = Client::with_channel(credential, options).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!("not connected")
    };
    (client, events, connection_id, calls)
}

/// An acked event, sent from a task; its outcome and how long it took.
fn spawn_event(client: &Client) -> JoinHandle<(Result<AckResult, Error>, Duration)> {
    let client = client.clone();
    tokio::spawn(async move {
        let sent = Instant::now();
        let outcome = client
            .send_event(
                "e",
                DataType::Text,
                Bytes::from_static(b"x"),
                SendEventOptions::default(),
            )
            .await;
        (outcome, sent.elapsed())
    })
}

/// A send waiting for its ack when the service dies, and one made while the client
/// recovers: each fails with `Timeout` once its attempts' ack deadlines ran out, while
/// the recovery (30 s) still goes on. `retries` retries of 1 s each, 100 ms apart.
async fn sends_time_out_while_a_dead_service_is_being_recovered(retries: u32) {
    let (upstream, reached) = silent_upstream();
    let service = Service::start(0, Some(upstream));
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(1),
        message_retry: RetryOptions {
            max_retries: Some(retries),
            ..fast_options().message_retry
        },
        recovery_window: Duration::from_secs(30),
        ..fast_options()
    };
    let (client, _events, _, _) = started(service.port(), options).await;
    // The upstream never answers: the event waits for its ack.
    let in_flight = spawn_event(&client);
    until_sent(&reached).await;
    service.kill();
    let recovering = || client.state() == ClientState::Recovering;
    common::until("the recovery", Duration::from_secs(5), recovering).await;
    let made_during = spawn_event(&client);
    // Each attempt's 1 s, and 100 ms before each retry.
    let bound = Duration::from_millis(1100) * (retries + 1) + Duration::from_secs(3);
    for send in [in_flight, made_during] {
        let (outcome, waited) = tokio::time::timeout(bound, send)
            .await
            .expect("a send waited for the recovery")
            .unwrap();
        assert!(
            matches!(outcome, Err(Error::Timeout { ack_id: Some(_) })),
            "{outcome:?}"
        );
        assert!(
            waited >= Duration::from_secs(u64::from(retries) + 1),
            "{waited:?}"
        );
    }
    assert_eq!(client.state(), ClientState::Recovering);
    client.stop().await;
}

#[tokio::test]
async fn sends_without_retries_time_out_while_a_dead_service_is_being_recovered() {
    let _turn = TURN.lock().await;
    sends_time_out_while_a_dead_service_is_being_recovered(0).await;
}

#[tokio::test]
async fn sends_with_retries_time_out_while_a_dead_service_is_being_recovered() {
    let _turn = TURN.lock().await;
    sends_time_out_while_a_dead_service_is_being_recovered(2).await;
}

/// The service is killed with a group joined and a send in flight, and comes back on
/// the same port without the session: the session is lost (a reliable client's
/// recovery is refused with 1008; the loss reported is the kill's, with no close
/// frame), the client opens a new connection with a fresh URL
/// and rejoins the group, and the sends of the outage fail with `NotConnected`.
async fn a_restarted_service_gets_a_new_connection_that_rejoins(protocol: Protocol) {
    let reliable = protocol.is_reliable();
    let (upstream, reached) = silent_upstream();
    let first = Service::start(0, Some(upstream));
    let port = first.port();
    let options = ClientOptions {
        protocol,
        ..fast_options()
    };
    let (client, mut events, old_id, calls) = started(port, options).await;
    client.join_group("g").await.unwrap();
    let in_flight = spawn_event(&client);
    until_sent(&reached).await;
    first.kill();
    let offline = if reliable {
        ClientState::Recovering
    } else {
        ClientState::Disconnected
    };
    let lost = || client.state() == offline;
    common::until("the loss seen", Duration::from_secs(5), lost).await;
    let during = spawn_event(&client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Service::start(port, None);

    let Event::Disconnected {
        connection_id,
        close_code,
        ..
    } = next_event(&mut events, 10).await
    else {
        panic!("not disconnected")
    };
    assert_eq!(connection_id.as_deref(), Some(old_id.as_str()));
    assert_eq!(close_code, None);
    let event = next_event(&mut events, 10).await;
    let Event::Connected { connection_id, .. } = &event else {
        panic!("{event:?}")
    };
    assert_ne!(*connection_id, old_id);
    assert_eq!(client.connection_id().as_ref(), Some(connection_id));
    if reliable {
        assert_eq!(calls.load(Ordering::SeqCst), 2, "not for the recovery");
    } else {
        assert!(calls.load(Ordering::SeqCst) >= 2);
    }
    let (outcome, _) = in_flight.await.unwrap();
    assert!(
        matches!(outcome, Err(Error::NotConnected { ack_id: Some(_) })),
        "{outcome:?}"
    );
    // Taken in by the recovery (it has an ackId); refused at once without one.
    match during.await.unwrap() {
        (Err(Error::NotConnected { ack_id }), _) => assert_eq!(ack_id.is_some(), reliable),
        other => panic!("{other:?}"),
    }

    // Rejoined: its own message to the group comes back.
    client
        .send_to_group(
            "g",
            DataType::Text,
            Bytes::from_static(b"back"),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap();
    let event = next_event(&mut events, 5).await;
    assert!(
        matches!(&event, Event::GroupMessage { group, data, .. } if group == "g" && data == "back"),
        "{event:?}"
    );
    client.stop().await;
    second.kill();
}

#[tokio::test]
async fn a_restarted_service_refuses_the_recovery_and_the_client_reconnects_and_rejoins() {
    let _turn = TURN.lock().await;
    a_restarted_service_gets_a_new_connection_that_rejoins(Protocol::JsonReliable).await;
}

#[tokio::test]
async fn a_restarted_service_gets_a_new_json_connection_that_rejoins() {
    let _turn = TURN.lock().await;
    a_restarted_service_gets_a_new_connection_that_rejoins(Protocol::Json).await;
}

#[tokio::test]
async fn a_service_that_never_comes_back_is_retried_per_the_policy_then_the_client_stops() {
    let _turn = TURN.lock().await;
    let service = Service::start(0, None);
    let options = ClientOptions {
        recovery_window: Duration::from_secs(1),
        reconnect_retry: RetryOptions {
            max_retries: Some(5),
            delay: Duration::from_millis(200),
            ..fast_options().reconnect_retry
        },
        ..fast_options()
    };
    let (client, mut events, _, calls) = started(service.port(), options).await;
    service.kill();
    let Event::Disconnected { close_code, .. } = next_event(&mut events, 5).await else {
        panic!("not disconnected")
    };
    assert_eq!(close_code, None);
    let lost = Instant::now();
    let stopped = next_event(&mut events, 5).await;
    let Event::Stopped {
        error: Some(Error::Connect(reason)),
    } = &stopped
    else {
        panic!("not stopped by the last attempt's error: {stopped:?}")
    };
    assert!(reason.contains("refused"), "{reason}");
    // One attempt at once, then 5 retries 200 ms apart: each refused at once.
    let waited = lost.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 1 + 5);
    assert_eq!(client.state(), ClientState::Stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::drain(&mut events), []);
}

/// The service's port is taken by a process that accepts connections (the kernel
/// does) and never answers: `stop()` interrupts the attempt at once.
async fn stop_interrupts_an_attempt_that_gets_no_answer(protocol: Protocol) {
    let service = Service::start(0, None);
    let port = service.port();
    let options = ClientOptions {
        protocol,
        start_timeout: Duration::from_secs(30),
        ..fast_options()
    };
    let (client, mut events, _, _) = started(port, options).await;
    service.kill();
    let _hung = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    // Attempts 100 ms apart: one is waiting for its answer now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offline = if protocol.is_reliable() {
        ClientState::Recovering
    } else {
        ClientState::Connecting
    };
    assert_eq!(client.state(), offline);
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), client.stop())
        .await
        .expect("stop waited for the attempt");
    assert!(stopping.elapsed() < Duration::from_millis(500));
    assert_eq!(client.state(), ClientState::Stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = common::drain(&mut events);
    assert!(
        matches!(
            seen.as_slice(),
            [Event::Disconnected { .. }, Event::Stopped { error: None }]
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn stop_interrupts_a_recovery_attempt_that_gets_no_answer() {
    let _turn = TURN.lock().await;
    stop_interrupts_an_attempt_that_gets_no_answer(Protocol::JsonReliable).await;
}

#[tokio::test]
async fn stop_interrupts_a_reconnect_attempt_that_gets_no_answer() {
    let _turn = TURN.lock().await;
    stop_interrupts_an_attempt_that_gets_no_answer(Protocol::Json).await;
}

/// The service dies and comes back without the sessions (a reliable client's recovery
/// is refused): each event finds the client as it reports it, so that a listener
/// calling the client from the event is refused at once on `Disconnected`, and finds
/// the new connection's id on `Connected`.
async fn events_find_the_client_as_they_report_it_through_an_outage(protocol: Protocol) {
    let service = Service::start(0, None);
    let port = service.port();
    let options = ClientOptions {
        protocol,
        ..fast_options()
    };
    let (client, handler) = StateAtEvent::client(Credential::Url(client_url(port, "u")), options);
    client.start().await.unwrap();
    let first = client.connection_id().unwrap();
    service.kill();
    handler.until(2).await;
    let service = Service::start(port, None);
    handler.until(3).await;
    let second = client.connection_id().unwrap();
    assert_ne!(first, second);
    client.stop().await;
    service.kill();
    use ClientState::{Connected, Disconnected, Stopped};
    assert_eq!(
        handler.seen(),
        [
            ("connected", Connected, Some(first)),
            ("disconnected", Disconnected, None),
            ("connected", Connected, Some(second)),
            ("disconnected", Disconnected, None),
            ("stopped", Stopped, None),
        ]
    );
}

#[tokio::test]
async fn a_lost_connection_is_reported_once_the_client_is_disconnected() {
    let _turn = TURN.lock().await;
    events_find_the_client_as_they_report_it_through_an_outage(Protocol::Json).await;
}

#[tokio::test]
async fn a_refused_recovery_is_reported_once_the_client_is_disconnected() {
    let _turn = TURN.lock().await;
    events_find_the_client_as_they_report_it_through_an_outage(Protocol::JsonReliable).await;
}
