//! End-to-end tests against the in-process emulator: real sockets, real faults.

mod common;

use bytes::Bytes;
use common::{
    all_roles, drain, fast_options, fault, message_text, next_event, stats, until_stats, wait_for,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use webpubsub_client::{
    Client, ClientOptions, ClientState, Credential, DataType, Error, Event, EventHandler,
    InvokeOptions, Protocol, Resume, RetryOptions, SendEventOptions, SendToGroupOptions,
};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

const HUB: &str = "hub";

async fn emulator() -> Emulator {
    Emulator::start(Config {
        recovery_window: Duration::from_secs(10),
        ..Config::default()
    })
    .await
    .unwrap()
}

fn token(user: &str) -> TokenOptions {
    TokenOptions {
        user_id: Some(user.into()),
        roles: all_roles(),
        ..TokenOptions::default()
    }
}

/// A started client; returns it, its events (after `Connected`) and its connection id.
async fn started(
    emulator: &Emulator,
    user: &str,
    options: ClientOptions,
) -> (Client, UnboundedReceiver<Event>, String) {
    let url = emulator.client_url(HUB, &token(user));
    let (client, mut events) = Client::with_channel(Credential::Url(url), options).unwrap();
    client.start().await.unwrap();
    let Event::Connected {
        connection_id,
        user_id,
    } = next_event(&mut events, 5).await
    else {
        panic!("not connected")
    };
    assert_eq!(user_id.as_deref(), Some(user));
    assert_eq!(
        client.connection_id().as_deref(),
        Some(connection_id.as_str())
    );
    (client, events, connection_id)
}

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn publish(client: &Client, group: &str, body: &str) -> webpubsub_client::AckResult {
    client
        .send_to_group(
            group,
            DataType::Text,
            text(body),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap()
}

/// Collects the texts of the next `n` group messages (other events fail the test).
async fn group_texts(events: &mut UnboundedReceiver<Event>, n: usize, secs: u64) -> Vec<String> {
    let mut texts = Vec::new();
    while texts.len() < n {
        match next_event(events, secs).await {
            event @ Event::GroupMessage { .. } => texts.push(message_text(&event).unwrap()),
            other => panic!("unexpected event {other:?} after {} messages", texts.len()),
        }
    }
    texts
}

#[tokio::test]
async fn group_and_server_messages_flow_with_every_data_type() {
    let emulator = emulator().await;
    let (alice, mut alice_events, alice_id) = started(&emulator, "alice", fast_options()).await;
    let (bob, mut bob_events, _) = started(&emulator, "bob", fast_options()).await;
    let joined = bob.join_group("chat").await.unwrap();
    assert!(joined.ack_id.is_some() && !joined.is_duplicated);
    alice.join_group("chat").await.unwrap();

    let sent = publish(&alice, "chat", "hello").await;
    assert!(sent.ack_id.is_some() && sent.ack_id != joined.ack_id);
    let event = next_event(&mut bob_events, 5).await;
    let Event::GroupMessage {
        group,
        from_user_id,
        data_type,
        data,
        sequence_id,
    } = event
    else {
        panic!("{event:?}")
    };
    assert_eq!(
        (group.as_str(), from_user_id.as_deref(), data_type),
        ("chat", Some("alice"), DataType::Text)
    );
    assert_eq!(data, text("hello"));
    assert!(sequence_id.is_some());
    let echo = next_event(&mut alice_events, 5).await;
    assert_eq!(
        message_text(&echo).as_deref(),
        Some("hello"),
        "echoed to the sender"
    );

    let json = Bytes::from_static(br#"{"n":[1,2,{"x":"y"}]}"#);
    let no_echo = SendToGroupOptions {
        no_echo: true,
        ..Default::default()
    };
    alice
        .send_to_group("chat", DataType::Json, json.clone(), no_echo)
        .await
        .unwrap();
    let binary = Bytes::from_static(&[0, 1, 2, 254, 255]);
    let fire = SendToGroupOptions {
        no_echo: true,
        fire_and_forget: true,
        ack_id: None,
    };
    let result = alice
        .send_to_group("chat", DataType::Binary, binary.clone(), fire)
        .await
        .unwrap();
    assert_eq!(result.ack_id, None);
    let Event::GroupMessage {
        data_type, data, ..
    } = next_event(&mut bob_events, 5).await
    else {
        panic!()
    };
    assert_eq!((data_type, data), (DataType::Json, json));
    let Event::GroupMessage {
        data_type, data, ..
    } = next_event(&mut bob_events, 5).await
    else {
        panic!()
    };
    assert_eq!((data_type, data), (DataType::Binary, binary));

    common::rest_send_to_connection(&emulator, HUB, &alice_id, "from the server").await;
    let event = next_event(&mut alice_events, 5).await;
    assert!(
        matches!(&event, Event::ServerMessage { data_type: DataType::Text, data, sequence_id: Some(_) } if data == "from the server"),
        "{event:?}"
    );

    bob.leave_group("chat").await.unwrap();
    publish(&alice, "chat", "after leave").await;
    next_event(&mut alice_events, 5).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob_events.recv())
            .await
            .is_err()
    );
    alice.stop().await;
    bob.stop().await;
}

#[tokio::test]
async fn stop_writes_every_fire_and_forget_message_already_reported_sent() {
    // Bursts of 800 can outrun the subscriber's sequenceAcks on a loaded machine; the
    // service's 1000-message replay limit is not what this test is about.
    let emulator = Emulator::start(Config {
        max_unacked_frames: 1_000_000,
        ..Config::default()
    })
    .await
    .unwrap();
    let (subscriber, mut events, _) = started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("ff").await.unwrap();
    let fire_and_forget = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };
    let total = 800;
    // The stop races the operation queue: several rounds make the race certain to show.
    for round in 0..10 {
        let (publisher, _publisher_events, _) = started(&emulator, "pub", fast_options()).await;
        let sends = (0..total).map(|i| {
            publisher.send_to_group("ff", DataType::Text, text(&i.to_string()), fire_and_forget)
        });
        for sent in futures_util::future::join_all(sends).await {
            assert_eq!(sent.unwrap().ack_id, None);
        }
        publisher.stop().await;
        // Concurrent sends have no order among themselves: compare the sorted numbers.
        let mut got: Vec<usize> = group_texts(&mut events, total, 10)
            .await
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..total).collect::<Vec<_>>(), "round {round}");
    }
    subscriber.stop().await;
}

#[tokio::test]
async fn one_callers_fire_and_forget_and_acked_messages_arrive_in_call_order() {
    // An acked send on an idle client is written by its caller, a fire-and-forget one
    // by the connection task: the first must never overtake the second.
    let emulator = emulator().await;
    let (subscriber, mut events, _) = started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("order").await.unwrap();
    let (publisher, _publisher_events, _) = started(&emulator, "pub", fast_options()).await;
    let fire_and_forget = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };
    let rounds = 300;
    let mut expected = Vec::new();
    for i in 0..rounds {
        for k in 0..i % 3 {
            let body = format!("f{i}.{k}");
            publisher
                .send_to_group("order", DataType::Text, text(&body), fire_and_forget)
                .await
                .unwrap();
            expected.push(body);
        }
        let body = format!("a{i}");
        publish(&publisher, "order", &body).await;
        expected.push(body);
    }
    assert_eq!(group_texts(&mut events, expected.len(), 10).await, expected);
    publisher.stop().await;
    subscriber.stop().await;
}

#[tokio::test]
async fn recovery_after_drops_loses_and_duplicates_nothing_in_either_direction() {
    let emulator = emulator().await;
    let (publisher, mut publisher_events, publisher_id) =
        started(&emulator, "pub", fast_options()).await;
    let (subscriber, mut subscriber_events, subscriber_id) =
        started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("g").await.unwrap();
    const N: usize = 200;
    let mut drops = 0;
    for i in 0..N {
        if i % 25 == 10 {
            let victim = if (i / 25) % 2 == 0 {
                &publisher_id
            } else {
                &subscriber_id
            };
            fault(&emulator, HUB, victim, ":drop").await;
            drops += 1;
        }
        let result = publish(&publisher, "g", &format!("m{i}")).await;
        assert!(result.ack_id.is_some());
    }
    let texts = group_texts(&mut subscriber_events, N, 15).await;
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "every message once, in order");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subscriber_events.recv())
            .await
            .is_err()
    );
    assert!(
        publisher_events.try_recv().is_err(),
        "no disconnected/connected events on recovery"
    );
    assert_eq!(
        publisher.connection_id().as_deref(),
        Some(publisher_id.as_str())
    );
    assert_eq!(
        subscriber.connection_id().as_deref(),
        Some(subscriber_id.as_str())
    );
    assert!(stats(&emulator).await["recoveries"].as_u64().unwrap() >= drops);
    publisher.stop().await;
    subscriber.stop().await;
}

#[tokio::test]
async fn an_operation_pending_when_the_socket_drops_is_resent_and_deduplicated() {
    let emulator = emulator().await;
    let (publisher, _publisher_events, publisher_id) =
        started(&emulator, "pub", fast_options()).await;
    let (subscriber, mut subscriber_events, _) = started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("g").await.unwrap();
    fault(&emulator, HUB, &publisher_id, ":dropAcks?count=1").await;
    let p = publisher.clone();
    let send = tokio::spawn(async move { publish(&p, "g", "exactly once").await });
    assert_eq!(
        group_texts(&mut subscriber_events, 1, 5).await,
        ["exactly once"]
    );
    fault(&emulator, HUB, &publisher_id, ":drop").await;
    let result = tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .unwrap()
        .unwrap();
    assert!(
        result.is_duplicated,
        "resent with the same ackId after the recovery: {result:?}"
    );
    publish(&publisher, "g", "marker").await;
    assert_eq!(
        group_texts(&mut subscriber_events, 1, 5).await,
        ["marker"],
        "nothing published twice"
    );
    publisher.stop().await;
    subscriber.stop().await;
}

#[tokio::test]
async fn more_sends_in_flight_than_the_service_remembers_are_still_published_once() {
    // The service remembers the last 1000 ackIds of a connection. Acks travel in order,
    // so when one is lost every later one is too: with at most 1000 acked operations in
    // flight, every one resent after a recovery is among those it remembers.
    const SENDS: usize = 1500;
    // The subscriber's downstream buffer is raised: a burst of 1500 at loopback speed
    // outruns any client's sequenceAck, and that limit is not what this test is about.
    let emulator = Emulator::start(Config {
        recovery_window: Duration::from_secs(10),
        max_unacked_frames: 100_000,
        ..Config::default()
    })
    .await
    .unwrap();
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(30), // the recovery resends them, not a retry
        ..fast_options()
    };
    let (publisher, _publisher_events, publisher_id) = started(&emulator, "pub", options).await;
    let (subscriber, mut subscriber_events, _) = started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("g").await.unwrap();
    // The acks of every operation in flight: the client keeps 999 (a first send its
    // caller wrote itself among them). One more would swallow the ack of a resend.
    fault(&emulator, HUB, &publisher_id, ":dropAcks?count=999").await;
    let sends: Vec<_> = (0..SENDS)
        .map(|n| {
            let p = publisher.clone();
            tokio::spawn(async move {
                p.send_to_group(
                    "g",
                    DataType::Text,
                    text(&format!("m{n}")),
                    SendToGroupOptions::default(),
                )
                .await
            })
        })
        .collect();
    let mut texts = Vec::new();
    let take = |event: Event| message_text(&event).unwrap_or_else(|| panic!("{event:?}"));
    while texts.len() < 999 {
        texts.push(take(next_event(&mut subscriber_events, 10).await));
    }
    // Then until nothing more arrives: the acks of the first 999 never come.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), subscriber_events.recv()).await
    {
        texts.push(take(event));
    }
    fault(&emulator, HUB, &publisher_id, ":drop").await;
    for send in sends {
        let result = tokio::time::timeout(Duration::from_secs(20), send)
            .await
            .expect("every send completes after the recovery")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
    publish(&publisher, "g", "marker").await;
    loop {
        let text = take(next_event(&mut subscriber_events, 10).await);
        if text == "marker" {
            break;
        }
        texts.push(text);
    }
    let distinct: HashSet<&String> = texts.iter().collect();
    assert_eq!(distinct.len(), SENDS, "every message arrived");
    assert_eq!(texts.len(), SENDS, "none arrived twice");
    publisher.stop().await;
    subscriber.stop().await;
}

#[tokio::test]
async fn a_retried_operation_keeps_its_ack_id_and_a_lost_ack_times_out() {
    let emulator = emulator().await;
    let options = ClientOptions {
        ack_timeout: Duration::from_millis(300),
        ..fast_options()
    };
    let (publisher, _e, publisher_id) = started(&emulator, "pub", options).await;
    let (subscriber, mut subscriber_events, _) = started(&emulator, "sub", fast_options()).await;
    subscriber.join_group("g").await.unwrap();

    fault(&emulator, HUB, &publisher_id, ":dropAcks?count=1").await;
    let result = publish(&publisher, "g", "retried").await;
    assert!(
        result.is_duplicated,
        "the retry reused the ackId: {result:?}"
    );
    publish(&publisher, "g", "marker").await;
    assert_eq!(
        group_texts(&mut subscriber_events, 2, 5).await,
        ["retried", "marker"]
    );

    let no_retry = ClientOptions {
        ack_timeout: Duration::from_millis(300),
        message_retry: RetryOptions {
            max_retries: Some(0),
            ..fast_options().message_retry
        },
        ..fast_options()
    };
    let (lonely, _e2, lonely_id) = started(&emulator, "lonely", no_retry).await;
    fault(&emulator, HUB, &lonely_id, ":dropAcks?count=5").await;
    let began = Instant::now();
    let error = lonely.join_group("g").await.unwrap_err();
    assert!(
        matches!(error, Error::Timeout { ack_id: Some(_) }),
        "{error:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    for c in [publisher, subscriber, lonely] {
        c.stop().await;
    }
}

#[tokio::test]
async fn automatic_ack_ids_skip_the_ids_callers_chose() {
    // The service answers `Duplicate` to an ackId it processed on the connection, so an
    // automatic ackId equal to one a caller chose earlier would drop its message.
    let emulator = emulator().await;
    let (alice, mut events, _) = started(&emulator, "alice", fast_options()).await;
    let joined = alice.join_group("ids").await.unwrap();
    let next = joined.ack_id.unwrap() + 1;
    let chosen = [next + 1, next + 3];
    for (n, ack_id) in chosen.iter().enumerate() {
        let opts = SendToGroupOptions {
            ack_id: Some(*ack_id),
            ..SendToGroupOptions::default()
        };
        let result = alice
            .send_to_group("ids", DataType::Text, text(&format!("chosen {n}")), opts)
            .await
            .unwrap();
        assert_eq!(
            (result.ack_id, result.is_duplicated),
            (Some(*ack_id), false)
        );
    }
    for n in 0..5 {
        let result = publish(&alice, "ids", &format!("automatic {n}")).await;
        assert!(
            !result.is_duplicated,
            "automatic {n} got a used ackId: {result:?}"
        );
        assert!(!chosen.contains(&result.ack_id.unwrap()));
    }
    let mut texts = group_texts(&mut events, 7, 5).await;
    texts.sort();
    let mut expected: Vec<String> = (0..2).map(|n| format!("chosen {n}")).collect();
    expected.extend((0..5).map(|n| format!("automatic {n}")));
    expected.sort();
    assert_eq!(texts, expected, "every message published once");
    alice.stop().await;
}

#[tokio::test]
async fn forbidden_surfaces_at_once_with_its_name_and_message() {
    let emulator = emulator().await;
    let url = emulator.client_url(
        HUB,
        &TokenOptions {
            user_id: Some("nobody".into()),
            ..Default::default()
        },
    );
    let options = ClientOptions {
        message_retry: RetryOptions {
            delay: Duration::from_secs(2),
            ..RetryOptions::message_default()
        },
        ..fast_options()
    };
    let (client, _events) = Client::with_channel(Credential::Url(url), options).unwrap();
    client.start().await.unwrap();
    let began = Instant::now();
    let error = client.join_group("secret").await.unwrap_err();
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "not retried: {:?}",
        began.elapsed()
    );
    let Error::Ack { name, message, .. } = &error else {
        panic!("{error:?}")
    };
    assert_eq!(name, "Forbidden");
    assert!(!message.is_empty());
    assert!(error.to_string().contains("Forbidden"));
    let error = client
        .send_to_group("secret", DataType::Text, text("x"), Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Ack { ref name, .. } if name == "Forbidden"),
        "{error:?}"
    );
    client.stop().await;
}

/// A credential handing out a fresh token on every call; counts the calls.
fn counting_credential(emulator: &Emulator, user: &str) -> (Credential, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let endpoint_url = emulator.client_url(HUB, &token(user));
    let key = emulator.access_key().to_owned();
    let base = endpoint_url.split('?').next().unwrap().to_owned();
    let audience = base.replacen("ws://", "http://", 1);
    let user = user.to_owned();
    let credential = Credential::provider(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let jwt = webpubsub_emulator::auth::sign_client_token(&key, &audience, &token(&user));
        let url = format!("{base}?access_token={jwt}");
        async move { Ok(url) }
    });
    (credential, calls)
}

async fn assert_new_connection_and_rejoined(
    emulator: &Emulator,
    client: &Client,
    events: &mut UnboundedReceiver<Event>,
    old_id: &str,
    close_code: Option<u16>,
) {
    let (event, _) = wait_for(events, 10, |e| matches!(e, Event::Disconnected { .. })).await;
    let Event::Disconnected {
        connection_id,
        close_code: code,
        ..
    } = event
    else {
        unreachable!()
    };
    assert_eq!(connection_id.as_deref(), Some(old_id));
    assert_eq!(code, close_code);
    let (event, skipped) = wait_for(events, 10, |e| matches!(e, Event::Connected { .. })).await;
    assert!(skipped.is_empty(), "{skipped:?}");
    let Event::Connected {
        connection_id: new_id,
        ..
    } = event
    else {
        unreachable!()
    };
    assert_ne!(new_id, old_id);
    assert_eq!(client.state(), ClientState::Connected);
    let (other, _oe, _) = started(emulator, "other", fast_options()).await;
    let mut got = None;
    for i in 0..50 {
        publish(&other, "room", &format!("probe{i}")).await;
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), events.recv()).await
        {
            got = Some(event);
            break;
        }
    }
    let event = got.expect("the group was rejoined");
    assert!(
        matches!(&event, Event::GroupMessage { group, .. } if group == "room"),
        "{event:?}"
    );
    other.stop().await;
}

#[tokio::test]
async fn close_1008_opens_a_new_connection_from_the_provider_and_rejoins() {
    let emulator = emulator().await;
    let (credential, calls) = counting_credential(&emulator, "carol");
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!()
    };
    client.join_group("room").await.unwrap();
    fault(
        &emulator,
        HUB,
        &connection_id,
        ":close?code=1008&reason=policy",
    )
    .await;
    assert_new_connection_and_rejoined(&emulator, &client, &mut events, &connection_id, Some(1008))
        .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the provider is called for every new connection"
    );

    let connection_id = client.connection_id().unwrap();
    fault(&emulator, HUB, &connection_id, ":drop").await;
    publish(&client, "room", "after recovery").await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "never for a recovery");
    client.stop().await;
}

#[tokio::test]
async fn an_unrecoverable_drop_opens_a_new_connection_and_rejoins() {
    let emulator = emulator().await;
    let (credential, calls) = counting_credential(&emulator, "dave");
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!()
    };
    client.join_group("room").await.unwrap();
    fault(&emulator, HUB, &connection_id, ":drop?recoverable=false").await;
    // The recovery is refused (1008); the loss is the drop's, which had no close frame.
    assert_new_connection_and_rejoined(&emulator, &client, &mut events, &connection_id, None).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(stats(&emulator).await["failedRecoveries"].as_u64().unwrap() >= 1);
    client.stop().await;
}

#[tokio::test]
async fn the_json_protocol_reconnects_instead_of_recovering() {
    let emulator = emulator().await;
    let options = ClientOptions {
        protocol: Protocol::Json,
        ..fast_options()
    };
    let (client, mut events, id) = started(&emulator, "erin", options).await;
    client.join_group("room").await.unwrap();
    fault(&emulator, HUB, &id, ":drop").await;
    assert_new_connection_and_rejoined(&emulator, &client, &mut events, &id, None).await;
    client.stop().await;
}

/// A token provider that starts failing (its token service answers 401, say) once the
/// client runs: the reconnects give up per the policy, and `Stopped` carries the last
/// attempt's error.
#[tokio::test]
async fn a_client_whose_reconnects_all_fail_stops_with_the_last_attempts_error() {
    let emulator = emulator().await;
    let url = emulator.client_url(HUB, &token("gus"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let credential = Credential::provider(move || {
        let call = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = match call {
            1 => Ok(url.clone()),
            _ => Err(format!("the token service answered 401 (call {call})")),
        };
        async move { answer }
    });
    let options = ClientOptions {
        reconnect_retry: RetryOptions {
            max_retries: Some(2),
            ..fast_options().reconnect_retry
        },
        ..fast_options()
    };
    let (client, mut events) = Client::with_channel(credential, options).unwrap();
    client.start().await.unwrap();
    lose_the_session(&emulator, &mut events).await;
    // The start, then one attempt and 2 retries.
    let error = Error::Credential("the token service answered 401 (call 4)".into());
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Stopped { error: Some(error) }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(client.state(), ClientState::Stopped);

    // Started again, then stopped by its caller: no error.
    calls.store(0, Ordering::SeqCst);
    client.start().await.unwrap();
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Connected { .. }
    ));
    stopped_by_caller(&client, &mut events).await;
}

/// Forwards events to a channel; pauses the reading once (then notifies `paused`), with
/// a `Resume` future that completes when `resume` fires and panics when dropped.
struct PanicsOnResume {
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    resume: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    paused: tokio::sync::Notify,
}

impl EventHandler for PanicsOnResume {
    fn on_event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn backpressure(&self) -> Option<Resume> {
        let resume = self.resume.lock().unwrap().take()?;
        self.paused.notify_one();
        Some(Box::pin(PanicsWhenDropped(Box::pin(async move {
            let _ = resume.await;
        }))))
    }
}

/// A future of the application that panics when dropped.
struct PanicsWhenDropped<T>(std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>);

impl<T> std::future::Future for PanicsWhenDropped<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        self.0.as_mut().poll(cx)
    }
}

impl<T> Drop for PanicsWhenDropped<T> {
    fn drop(&mut self) {
        panic!("a bug in the connection task");
    }
}

/// A client of `emulator` connected with a [`PanicsOnResume`] handler that has paused its
/// reading: its events, its connection id, and the sender that resumes the reading.
async fn paused_client(
    emulator: &Emulator,
) -> (
    Client,
    UnboundedReceiver<Event>,
    String,
    tokio::sync::oneshot::Sender<()>,
) {
    let url = emulator.client_url(HUB, &token("ida"));
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (resume, resume_rx) = tokio::sync::oneshot::channel();
    let handler = Arc::new(PanicsOnResume {
        events: events_tx,
        resume: std::sync::Mutex::new(Some(resume_rx)),
        paused: tokio::sync::Notify::new(),
    });
    let client = Client::new(Credential::Url(url), fast_options(), handler.clone()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!("not connected")
    };
    tokio::time::timeout(Duration::from_secs(5), handler.paused.notified())
        .await
        .unwrap();
    (client, events, connection_id, resume)
}

/// The next events are those of a client connected as `connection_id` whose connection
/// task panicked in a [`PanicsWhenDropped`]: `Disconnected`, then `Stopped`, with
/// `Error::Internal`.
async fn told_of_the_panic(events: &mut UnboundedReceiver<Event>, connection_id: String) {
    let detail =
        "the connection task panicked (a bug in the library): a bug in the connection task";
    let error = Error::Internal(detail.into());
    assert_eq!(
        next_event(events, 5).await,
        Event::Disconnected {
            connection_id: Some(connection_id),
            message: Some(error.to_string()),
            close_code: None,
        }
    );
    assert_eq!(
        next_event(events, 5).await,
        Event::Stopped { error: Some(error) }
    );
}

/// A panic of the connection task (a bug in the library) stops the client on its own,
/// with `Error::Internal`: the handler is told, the pending operation fails, and the
/// client stays stopped. The library has no panic of its own to provoke: this one comes
/// from a future of the application that the task drops outside its catches.
#[tokio::test]
async fn a_panic_of_the_connection_task_stops_the_client_with_an_internal_error() {
    let emulator = emulator().await;
    let (client, mut events, connection_id, resume) = paused_client(&emulator).await;
    // Reading is paused: the join goes out, its ack is not read.
    let join = tokio::spawn({
        let client = client.clone();
        async move { client.join_group("room").await }
    });
    resume.send(()).unwrap();

    told_of_the_panic(&mut events, connection_id).await;
    assert_eq!(client.state(), ClientState::Stopped);
    let joined = tokio::time::timeout(Duration::from_secs(5), join).await;
    assert!(matches!(joined, Ok(Ok(Err(_)))), "{joined:?}");
    assert_eq!(client.start().await, Err(Error::Stopped { ack_id: None }));
    assert!(events.try_recv().is_err());
}

/// A panic that ends the connection task while it answers a `stop` (the reply on its
/// way out when a value the task drops panics) still lets the `stop` return, once the
/// client is stopped and the handler told why.
#[tokio::test]
async fn a_stop_returns_when_a_panic_ends_it() {
    let emulator = emulator().await;
    // Never fired: reading stays paused until the stop drops the `Resume`, which panics.
    let (client, mut events, connection_id, _resume) = paused_client(&emulator).await;

    let stopped = tokio::time::timeout(Duration::from_secs(5), client.stop()).await;
    assert!(stopped.is_ok(), "the stop did not return");
    assert_eq!(client.state(), ClientState::Stopped);
    let detail =
        "the connection task panicked (a bug in the library): a bug in the connection task";
    let error = Error::Internal(detail.into());
    assert_eq!(
        events.try_recv(),
        Ok(Event::Disconnected {
            connection_id: Some(connection_id),
            message: Some(error.to_string()),
            close_code: None,
        })
    );
    assert_eq!(events.try_recv(), Ok(Event::Stopped { error: Some(error) }));
    assert_eq!(client.start().await, Err(Error::Stopped { ack_id: None }));
}

/// The same during a start: the credential's future, pending when the stop comes,
/// panics when the task drops it.
#[tokio::test]
async fn a_stop_during_a_start_returns_when_a_panic_ends_it() {
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel();
    let credential = Credential::provider(move || {
        let _ = asked_tx.send(());
        PanicsWhenDropped(Box::pin(std::future::pending()))
    });
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    let start = tokio::spawn({
        let client = client.clone();
        async move { client.start().await }
    });
    tokio::time::timeout(Duration::from_secs(5), asked.recv())
        .await
        .unwrap();

    let stopped = tokio::time::timeout(Duration::from_secs(5), client.stop()).await;
    assert!(stopped.is_ok(), "the stop did not return");
    assert_eq!(client.state(), ClientState::Stopped);
    let Ok(Event::Stopped {
        error: Some(Error::Internal(detail)),
    }) = events.try_recv()
    else {
        panic!("no stopped event")
    };
    assert!(detail.ends_with("a bug in the connection task"), "{detail}");
    let started = tokio::time::timeout(Duration::from_secs(5), start).await;
    assert!(
        matches!(started, Ok(Ok(Err(Error::Stopped { ack_id: None })))),
        "{started:?}"
    );
}

/// Dropping the last handle raises no event, unless the connection task panics as it
/// ends: the handler is still told, with `Error::Internal`.
#[tokio::test]
async fn a_panic_as_the_dropped_client_ends_raises_its_stopped_event() {
    let emulator = emulator().await;
    // Never fired: reading stays paused until the end drops the `Resume`, which panics.
    let (client, mut events, connection_id, _resume) = paused_client(&emulator).await;

    drop(client);
    told_of_the_panic(&mut events, connection_id).await;
}

#[tokio::test]
async fn without_auto_reconnect_a_lost_session_stops_the_client() {
    let emulator = emulator().await;
    let options = ClientOptions {
        auto_reconnect: false,
        ..fast_options()
    };
    let (client, mut events, id) = started(&emulator, "fay", options).await;
    fault(&emulator, HUB, &id, ":close?code=1008").await;
    assert!(matches!(
        next_event(&mut events, 5).await,
        Event::Disconnected {
            close_code: Some(1008),
            ..
        }
    ));
    assert_eq!(
        next_event(&mut events, 5).await,
        Event::Stopped {
            error: Some(Error::NotConnected { ack_id: None })
        }
    );
    assert_eq!(client.state(), ClientState::Stopped);
    let error = client.join_group("g").await.unwrap_err();
    assert!(matches!(error, Error::IllegalState(_)), "{error:?}");
}

#[tokio::test]
async fn keep_alive_closes_a_muted_connection_and_recovers_it() {
    let emulator = emulator().await;
    let options = ClientOptions {
        keep_alive_interval: Some(Duration::from_millis(100)),
        keep_alive_timeout: Some(Duration::from_millis(400)),
        ..fast_options()
    };
    let (client, mut events, id) = started(&emulator, "gus", options).await;
    client.join_group("room").await.unwrap();
    let before = stats(&emulator).await["recoveries"].as_u64().unwrap();
    fault(&emulator, HUB, &id, ":mute?ms=1000").await;
    until_stats(
        &emulator,
        "the silent connection was never recovered",
        10,
        |s| s["recoveries"].as_u64().unwrap() != before,
    )
    .await;
    publish(&client, "room", "alive").await;
    let (event, skipped) = wait_for(&mut events, 5, |e| {
        message_text(e).as_deref() == Some("alive")
    })
    .await;
    assert!(
        skipped.is_empty(),
        "no disconnected/connected events: {skipped:?}"
    );
    assert!(matches!(event, Event::GroupMessage { .. }));
    assert_eq!(client.connection_id(), Some(id));
    client.stop().await;
}

/// A tiny upstream: answers `echo` user events with `echo:` + body (text), every
/// other request with 204.
async fn upstream() -> (String, tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    use tokio::io::{AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upstream", listener.local_addr().unwrap());
    let failed = Arc::new(AtomicUsize::new(0));
    let fail_count = failed.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let failed = failed.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                while let Some((headers, body)) = common::read_request(&mut stream).await {
                    let kind = headers
                        .iter()
                        .find_map(|h| h.strip_prefix("ce-type: ").map(str::to_owned));
                    let response = if kind.as_deref() == Some("azure.webpubsub.user.fail") {
                        failed.fetch_add(1, Ordering::SeqCst);
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_owned()
                    } else if kind.as_deref() == Some("azure.webpubsub.user.echo") {
                        let reply = format!("echo:{}", String::from_utf8_lossy(&body));
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{reply}",
                            reply.len()
                        )
                    } else {
                        "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
                    };
                    if stream
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, task, fail_count)
}

#[tokio::test]
async fn invoke_and_events_reach_the_upstream() {
    let (url, server, failed) = upstream().await;
    let emulator = Emulator::start(Config {
        upstream: Some(url),
        ..Config::default()
    })
    .await
    .unwrap();
    let (client, _events, _) = started(&emulator, "hal", fast_options()).await;
    let reply = client
        .invoke_event("echo", DataType::Text, text("hi"), InvokeOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (reply.data_type, reply.data),
        (DataType::Text, text("echo:hi"))
    );
    let acked = client
        .send_event(
            "echo",
            DataType::Text,
            text("event"),
            SendEventOptions::default(),
        )
        .await
        .unwrap();
    assert!(acked.ack_id.is_some());
    let fire = SendEventOptions {
        fire_and_forget: true,
        ack_id: None,
    };
    assert_eq!(
        client
            .send_event("echo", DataType::Json, text("[1]"), fire)
            .await
            .unwrap()
            .ack_id,
        None
    );
    // An upstream failure is InternalServerError: retried with the same ackId (two
    // retries in fast_options), each attempt reaching the upstream, and reported as
    // the failure it is, not as a duplicate of the failed attempt.
    let failure = client
        .send_event(
            "fail",
            DataType::Text,
            text("x"),
            SendEventOptions::default(),
        )
        .await;
    assert!(
        matches!(&failure, Err(Error::Ack { name, .. }) if name == "InternalServerError"),
        "{failure:?}"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 3, "1 attempt + 2 retries");
    client.stop().await;
    server.abort();
}

#[tokio::test]
async fn invoke_without_an_upstream_is_an_invoke_error() {
    let emulator = emulator().await;
    let (client, _events, _) = started(&emulator, "ida", fast_options()).await;
    let error = client
        .invoke_event("echo", DataType::Text, text("hi"), InvokeOptions::default())
        .await
        .unwrap_err();
    let Error::Invoke { name, message, .. } = &error else {
        panic!("{error:?}")
    };
    assert_eq!(name, "BadRequest");
    assert!(message.contains("upstream"), "{message}");
    client.stop().await;
}

#[tokio::test]
async fn stop_start_and_bad_input() {
    let emulator = emulator().await;
    let (client, mut events, first_id) = started(&emulator, "jo", fast_options()).await;
    assert!(matches!(client.start().await, Err(Error::IllegalState(_))));
    let bad_json = client
        .send_to_group("g", DataType::Json, text("{nope"), Default::default())
        .await;
    assert!(
        matches!(bad_json, Err(Error::InvalidArgument(_))),
        "{bad_json:?}"
    );
    let bad_text = client
        .send_to_group(
            "g",
            DataType::Text,
            Bytes::from_static(&[0xff]),
            Default::default(),
        )
        .await;
    assert!(matches!(bad_text, Err(Error::InvalidArgument(_))));
    let zero = SendToGroupOptions {
        ack_id: Some(0),
        ..Default::default()
    };
    let zero = client
        .send_to_group("g", DataType::Text, text("x"), zero)
        .await;
    assert!(
        matches!(&zero, Err(Error::InvalidArgument(m)) if m.contains("at least 1")),
        "{zero:?}"
    );
    assert!(matches!(
        client.join_group("").await,
        Err(Error::InvalidArgument(_))
    ));
    stopped_by_caller(&client, &mut events).await;
    assert_eq!(client.state(), ClientState::Stopped);
    assert_eq!(client.connection_id(), None);
    assert!(matches!(
        client.join_group("g").await,
        Err(Error::IllegalState(_))
    ));
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!()
    };
    assert_ne!(connection_id, first_id);
    client.stop().await;

    let url = emulator.client_url(HUB, &TokenOptions::default());
    let forged = format!("{}x", url);
    let (bad, _e) = Client::with_channel(Credential::Url(forged), fast_options()).unwrap();
    let error = bad.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Connect(m) if m.contains("401")),
        "{error:?}"
    );
    assert!(!error.to_string().contains("access_token"));
    assert_eq!(bad.state(), ClientState::Stopped);
    assert!(matches!(
        Client::with_channel(Credential::Url("ftp://x".into()), fast_options()),
        Err(Error::InvalidArgument(_))
    ));
    let failing = Credential::provider(|| async { Err("no token today".to_owned()) });
    let (c, _e) = Client::with_channel(failing, fast_options()).unwrap();
    assert_eq!(
        c.start().await,
        Err(Error::Credential("no token today".into()))
    );
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection_and_raises_no_event() {
    let emulator = emulator().await;
    let (client, mut events, _) = started(&emulator, "kim", fast_options()).await;
    let clone = client.clone();
    drop(client);
    assert_eq!(
        stats(&emulator).await["connections"],
        1,
        "a clone keeps it alive"
    );
    drop(clone);
    until_stats(&emulator, "the connection stayed open", 5, |s| {
        s["connections"] == 0
    })
    .await;
    // The ended task dropped its handler, which held the channel's sender.
    let after = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(after, Ok(None), "an event after the drop");
}

#[tokio::test]
async fn idle_clients_cost_no_thread() {
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0)
    }
    let emulator = emulator().await;
    let (first, _e, _) = started(&emulator, "t0", fast_options()).await;
    let before = threads();
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(started(&emulator, &format!("t{}", i + 1), fast_options()).await);
    }
    assert_eq!(
        threads(),
        before,
        "50 more connected clients, no more threads"
    );
    let ids: HashSet<String> = clients.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(ids.len(), 50);
    for (c, _, _) in clients {
        c.stop().await;
    }
    first.stop().await;
}

#[tokio::test]
async fn blocking_calls_work_from_a_plain_thread() {
    let emulator = emulator().await;
    let url = emulator.client_url(HUB, &token("plain"));
    let thread = std::thread::spawn(move || {
        use webpubsub_client::runtime::block_on;
        let (client, mut events) =
            Client::with_channel(Credential::Url(url), fast_options()).unwrap();
        block_on(client.start()).unwrap();
        block_on(client.join_group("g")).unwrap();
        block_on(client.send_to_group(
            "g",
            DataType::Text,
            text("sync"),
            SendToGroupOptions::default(),
        ))
        .unwrap();
        block_on(client.stop());
        let mut seen = Vec::new();
        while let Some(event) = events.blocking_recv() {
            let stopped = matches!(event, Event::Stopped { .. });
            seen.push(event);
            if stopped {
                break;
            }
        }
        seen
    });
    let seen = tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    assert!(matches!(seen[0], Event::Connected { .. }));
    assert_eq!(message_text(&seen[1]).as_deref(), Some("sync"));
    assert!(matches!(seen[2], Event::Disconnected { .. }));
    assert_eq!(seen[3], Event::Stopped { error: None });
}

#[tokio::test]
async fn an_oversized_message_fails_at_once_and_the_connection_stays() {
    let emulator = emulator().await;
    let (alice, mut events, connection_id) = started(&emulator, "alice", fast_options()).await;
    alice.join_group("big").await.unwrap();
    let limit = ClientOptions::default().max_outgoing_message_size;
    let frame_len = |len: usize| {
        webpubsub_client::protocol::json::encode_upstream(
            &webpubsub_client::protocol::Upstream::SendToGroup {
                group: "big".into(),
                ack_id: None,
                no_echo: false,
                data: webpubsub_client::Data {
                    data_type: DataType::Text,
                    bytes: Bytes::from(vec![b'x'; len]),
                },
            },
        )
        .len()
    };
    let overhead = frame_len(0);
    assert_eq!(frame_len(limit - overhead), limit);
    let fire = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };

    let started_at = Instant::now();
    let too_big = Bytes::from(vec![b'x'; limit - overhead + 1]);
    let error = alice
        .send_to_group("big", DataType::Text, too_big.clone(), fire)
        .await
        .unwrap_err();
    let Error::InvalidArgument(message) = &error else {
        panic!("{error:?}")
    };
    assert!(
        message.contains(&(limit + 1).to_string()) && message.contains(&limit.to_string()),
        "{message}"
    );
    let error = alice
        .send_to_group(
            "big",
            DataType::Text,
            too_big,
            SendToGroupOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error:?}");
    assert!(started_at.elapsed() < Duration::from_secs(1));

    // A frame of exactly the limit is what the service accepts: it arrives, and the
    // connection was never dropped.
    let at_limit = Bytes::from(vec![b'x'; limit - overhead]);
    alice
        .send_to_group("big", DataType::Text, at_limit, fire)
        .await
        .unwrap();
    let texts = group_texts(&mut events, 1, 10).await;
    assert_eq!(texts[0].len(), limit - overhead);
    assert_eq!(alice.state(), ClientState::Connected);
    assert_eq!(alice.connection_id(), Some(connection_id));
    alice.stop().await;
}

#[tokio::test]
async fn a_start_refused_by_the_upstream_connect_event_fails_at_once_with_its_status() {
    use tokio::io::AsyncWriteExt;
    // An upstream that refuses every connection with 403 and counts the requests.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}/events", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let upstream = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut socket = tokio::io::BufReader::new(socket);
                if common::read_request(&mut socket).await.is_none() {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let refusal = "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\
                               content-length: 7\r\nconnection: close\r\n\r\nnot you";
                let _ = socket.get_mut().write_all(refusal.as_bytes()).await;
            });
        }
    });
    let emulator = Emulator::start(Config {
        upstream: Some(upstream_url),
        upstream_system_events: "connect".parse().unwrap(),
        ..Config::default()
    })
    .await
    .unwrap();
    let url = emulator.client_url(HUB, &token("u"));
    let (client, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    let began = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(10), client.start())
        .await
        .expect("start ends")
        .unwrap_err();
    // The upstream's own text reaches the client, as with the official clients.
    assert!(
        matches!(&error, Error::Connect(m) if m.ends_with(" answered the WebSocket upgrade with HTTP 403 Forbidden: \"not you\"")),
        "{error:?}"
    );
    // Refused once, not retried: start reports the first refusal.
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert_eq!(client.state(), ClientState::Stopped);
    assert!(drain(&mut events)
        .iter()
        .all(|e| !matches!(e, Event::Connected { .. })));
    upstream.abort();
}

/// Stops the connected `client`: `Disconnected` (code 1000), then `Stopped` without an
/// error, both raised by the time `stop` returns.
async fn stopped_by_caller(client: &Client, events: &mut UnboundedReceiver<Event>) {
    client.stop().await;
    let raised = drain(events);
    assert!(
        matches!(
            raised.as_slice(),
            [
                Event::Disconnected {
                    close_code: Some(1000),
                    ..
                },
                Event::Stopped { error: None }
            ]
        ),
        "{raised:?}"
    );
}

#[tokio::test]
async fn operations_fail_at_once_while_connecting_or_waiting_to_reconnect() {
    let emulator = emulator().await;
    let url = emulator.client_url(HUB, &token("ida"));
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let credential = {
        let (calls, gate) = (calls.clone(), gate.clone());
        Credential::provider(move || {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let (url, gate) = (url.clone(), gate.clone());
            async move {
                if call > 1 {
                    return Err(format!("no token (call {call})"));
                }
                gate.acquire().await.map_err(|e| e.to_string())?.forget();
                Ok(url)
            }
        })
    };
    // Retries 60 s apart: only the first reconnect attempt comes within the test.
    let options = ClientOptions {
        reconnect_retry: RetryOptions {
            delay: Duration::from_secs(60),
            ..fast_options().reconnect_retry
        },
        ..fast_options()
    };
    let (client, mut events) = Client::with_channel(credential, options).unwrap();
    let starting = tokio::spawn({
        let client = client.clone();
        async move { client.start().await }
    });
    let asked = |n| calls.load(Ordering::SeqCst) == n;
    common::until("the start's URL request", Duration::from_secs(5), || {
        asked(1)
    })
    .await;
    assert_eq!(client.state(), ClientState::Connecting);
    refused_at_once(&client);
    gate.add_permits(1);
    starting.await.unwrap().unwrap();
    lose_the_session(&emulator, &mut events).await;
    // The first attempt is made at once, not after the retry delay; once it failed,
    // the client waits to reconnect.
    let failed = || asked(2) && client.state() == ClientState::Disconnected;
    common::until(
        "the first reconnect attempt",
        Duration::from_secs(5),
        failed,
    )
    .await;
    refused_at_once(&client);
    client.stop().await;
    assert_eq!(drain(&mut events), [Event::Stopped { error: None }]);
}

/// Every operation of `client` fails with `NotConnected` at its first poll.
fn refused_at_once(client: &Client) {
    use futures_util::FutureExt;
    let send = client
        .send_to_group(
            "g",
            DataType::Text,
            text("x"),
            SendToGroupOptions::default(),
        )
        .now_or_never();
    assert_eq!(send, Some(Err(Error::NotConnected { ack_id: None })));
    let join = client.join_group("g").now_or_never();
    assert_eq!(join, Some(Err(Error::NotConnected { ack_id: None })));
    let invoke = client
        .invoke_event("e", DataType::Text, text("x"), InvokeOptions::default())
        .now_or_never();
    assert_eq!(invoke, Some(Err(Error::NotConnected { ack_id: None })));
}

/// Waits for the client's `Connected` event, then loses its session (close code 1008)
/// and waits for its `Disconnected` event.
async fn lose_the_session(emulator: &Emulator, events: &mut UnboundedReceiver<Event>) {
    let Event::Connected { connection_id, .. } = next_event(events, 5).await else {
        panic!("not connected")
    };
    fault(emulator, HUB, &connection_id, ":close?code=1008").await;
    assert!(matches!(
        next_event(events, 5).await,
        Event::Disconnected { .. }
    ));
}
