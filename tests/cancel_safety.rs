//! Cancel safety of the async API against the emulator: each method's future dropped
//! at its first await point (polled once, then dropped), or never polled, and what the
//! client and the service hold afterwards. The wire-level cases (a send or an
//! invocation given up during a recovery) are in `tests/fake_service.rs`.

mod common;

use bytes::Bytes;
use common::{fast_options, fault, message_text, started, until_stats, user_token, wait_for};
use futures_util::FutureExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use webpubsub_client::{
    Client, ClientOptions, ClientState, Credential, DataType, Error, Event, InvokeOptions,
    SendToGroupOptions,
};
use webpubsub_emulator::{Config, Emulator};

const HUB: &str = "hub";

/// Polls `future` once, then drops it; its output if that poll completed it. (A
/// `timeout(Duration::ZERO, ..)` would not do: its timer fires at the next tick of the
/// runtime's clock, up to a millisecond later, and may let the future complete.) A
/// future that waits for the connection task may still complete on its first poll
/// when this thread is descheduled meanwhile.
fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    future.now_or_never()
}

/// Waits (at most 5 s) until the credential was asked for a URL.
async fn asked_for_the_url(asked: &mut mpsc::UnboundedReceiver<()>) {
    let asked = timeout(Duration::from_secs(5), asked.recv()).await;
    asked.expect("the credential was not asked for");
}

fn text(body: &str) -> Bytes {
    Bytes::from(body.to_owned())
}

/// The texts of the group and server messages among `events`.
fn texts(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(message_text).collect()
}

#[tokio::test]
async fn dropped_sends_arrive_whole_or_not_and_hold_no_slot() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let (subscriber, mut received) =
        started(emulator.client_url(HUB, &user_token("sub")), fast_options()).await;
    subscriber.join_group("g").await.unwrap();
    // A send that kept a slot would keep it for the ack timeout: far longer than the
    // awaited send below may take.
    let options = ClientOptions {
        ack_timeout: Duration::from_secs(60),
        ..fast_options()
    };
    let (publisher, _events) = started(emulator.client_url(HUB, &user_token("pub")), options).await;

    // More than the 999 acked operations the client keeps in flight. (Unconstrained:
    // after tokio's budget of operations per task poll, the first poll of a send would
    // not even reach the client's queue.)
    let dropped = 1500;
    tokio::task::unconstrained(async {
        for n in 0..dropped {
            let send = publisher.send_to_group(
                "g",
                DataType::Text,
                text(&format!("m{n}")),
                SendToGroupOptions::default(),
            );
            if let Some(outcome) = poll_once(send) {
                assert!(outcome.is_ok(), "{outcome:?}");
            }
        }
    })
    .await;
    let last = timeout(
        Duration::from_secs(10),
        publisher.send_to_group(
            "g",
            DataType::Text,
            text("last"),
            SendToGroupOptions::default(),
        ),
    )
    .await
    .expect("dropped sends hold the client's slots");
    assert!(last.unwrap().ack_id.is_some());

    // A fire-and-forget message is queued by its first poll, then sent.
    let fire_and_forget = SendToGroupOptions {
        fire_and_forget: true,
        ..SendToGroupOptions::default()
    };
    let queued = publisher.send_to_group("g", DataType::Text, text("ff"), fire_and_forget);
    let queued = poll_once(queued).expect("not queued by its first poll");
    assert_eq!(queued.unwrap().ack_id, None);

    let (_, before) = wait_for(&mut received, 10, |e| {
        message_text(e).as_deref() == Some("ff")
    })
    .await;
    let arrived = texts(&before);
    assert_eq!(
        arrived.last().map(String::as_str),
        Some("last"),
        "{arrived:?}"
    );
    // Each dropped message arrived whole, once at most, in order.
    let numbers: Vec<usize> = arrived[..arrived.len() - 1]
        .iter()
        .map(|t| t.strip_prefix('m').unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    assert!(numbers.iter().all(|n| *n < dropped));
    assert_eq!(publisher.state(), ClientState::Connected);
    publisher.stop().await;
    subscriber.stop().await;
}

#[tokio::test]
async fn a_dropped_start_goes_on_until_connected_or_stopped() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &user_token("u"));
    // The credential answers only once a permit is added: the client stays Connecting.
    let gate = Arc::new(Semaphore::new(0));
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    let permits = gate.clone();
    let credential = Credential::provider(move || {
        let (gate, url, asked) = (permits.clone(), url.clone(), asked_tx.clone());
        async move {
            let _ = asked.send(());
            gate.acquire().await.map_err(|e| e.to_string())?.forget();
            Ok(url)
        }
    });
    let options = ClientOptions {
        start_timeout: Duration::from_millis(500),
        ..fast_options()
    };
    let (client, mut events) = Client::with_channel(credential, options).unwrap();

    // Given up: the attempt goes on, and connects.
    assert!(poll_once(client.start()).is_none());
    asked_for_the_url(&mut asked).await;
    assert_eq!(client.state(), ClientState::Connecting);
    let again = client.start().await;
    assert!(matches!(again, Err(Error::IllegalState(_))), "{again:?}");
    gate.add_permits(1);
    wait_for(&mut events, 5, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(client.state(), ClientState::Connected);
    client.stop().await;

    // Given up, then stopped: the attempt ends; the next start connects.
    assert!(poll_once(client.start()).is_none());
    asked_for_the_url(&mut asked).await;
    client.stop().await;
    assert_eq!(client.state(), ClientState::Stopped);
    gate.add_permits(1);
    client.start().await.unwrap();
    asked_for_the_url(&mut asked).await;
    client.stop().await;

    // Given up and never answered: stopped again after the start timeout.
    assert!(poll_once(client.start()).is_none());
    asked_for_the_url(&mut asked).await;
    for _ in 0..500 {
        if client.state() == ClientState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.state(), ClientState::Stopped);
    gate.add_permits(1);
    client.start().await.unwrap();
    client.stop().await;
}

#[tokio::test]
async fn a_dropped_stop_still_stops_and_a_start_after_it_connects() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let (client, mut events) =
        started(emulator.client_url(HUB, &user_token("u")), fast_options()).await;
    let first = client.connection_id().unwrap();

    drop(client.stop());
    assert_eq!(client.state(), ClientState::Connected, "never polled");

    poll_once(client.stop());
    // Handed over at once, right after the stop: it comes after it.
    client.start().await.unwrap();
    let (connected, skipped) =
        wait_for(&mut events, 5, |e| matches!(e, Event::Connected { .. })).await;
    assert!(
        matches!(
            skipped.as_slice(),
            [Event::Disconnected { .. }, Event::Stopped { error: None }]
        ),
        "{skipped:?}"
    );
    assert!(matches!(connected, Event::Connected { connection_id, .. } if connection_id != first));
    assert_eq!(client.state(), ClientState::Connected);
    client.stop().await;
}

#[tokio::test]
async fn a_dropped_join_counts_once_acked_and_is_rejoined_after_a_reconnect() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    // No pings: nothing but this test's calls writes to the socket, so the idle
    // client's first poll of an acked operation writes its frame itself.
    let options = ClientOptions {
        keep_alive_interval: None,
        ..fast_options()
    };
    let (member, mut events) =
        started(emulator.client_url(HUB, &user_token("member")), options).await;
    let id = member.connection_id().unwrap();
    // Serving now: the write path is open.
    member
        .send_event("warm", DataType::Text, text("up"), Default::default())
        .await
        .unwrap();

    drop(member.join_group("never"));
    if let Some(joined) = poll_once(member.join_group("room")) {
        joined.unwrap();
    }
    // Its own messages come back to it through the groups it is in.
    let echo = |group: &'static str, body: &'static str| {
        member.send_to_group(
            group,
            DataType::Text,
            text(body),
            SendToGroupOptions::default(),
        )
    };
    echo("never", "not a member").await.unwrap();
    echo("room", "joined").await.unwrap();
    let (_, skipped) = wait_for(&mut events, 5, |e| {
        message_text(e).as_deref() == Some("joined")
    })
    .await;
    assert!(texts(&skipped).is_empty(), "{skipped:?}");

    // Its ack came after the drop: the group is rejoined on the next connection.
    fault(&emulator, HUB, &id, ":drop?recoverable=false").await;
    let (connected, _) = wait_for(&mut events, 10, |e| matches!(e, Event::Connected { .. })).await;
    assert!(matches!(connected, Event::Connected { connection_id, .. } if connection_id != id));
    echo("room", "rejoined").await.unwrap();
    wait_for(&mut events, 5, |e| {
        message_text(e).as_deref() == Some("rejoined")
    })
    .await;
    member.stop().await;
}

#[tokio::test]
async fn a_dropped_invocation_is_cancelled_at_the_service() {
    // An upstream that takes every request and never answers.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}/", upstream.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = upstream.accept().await {
            held.push(socket);
        }
    });
    let emulator = Emulator::start(Config {
        upstream: Some(upstream_url),
        ..Config::default()
    })
    .await
    .unwrap();
    let (client, _events) =
        started(emulator.client_url(HUB, &user_token("u")), fast_options()).await;
    let options = InvokeOptions {
        timeout: Some(Duration::from_secs(60)),
    };

    drop(client.invoke_event("never", DataType::Text, text("x"), options));
    let mut invocation = Box::pin(client.invoke_event("slow", DataType::Text, text("x"), options));
    tokio::select! {
        answer = &mut invocation => panic!("answered: {answer:?}"),
        () = until_stats(&emulator, "the invocation never reached the upstream", 5, |s| {
            s["pendingInvocations"] == 1
        }) => {}
    }
    drop(invocation);
    until_stats(&emulator, "the invocation was not cancelled", 5, |s| {
        s["pendingInvocations"] == 0
    })
    .await;
    client.stop().await;
}
