//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use webpubsub_client::{ClientOptions, Event, RetryMode, RetryOptions};

/// Options with every timer shortened so tests run in seconds.
pub fn fast_options() -> ClientOptions {
    ClientOptions {
        message_retry: RetryOptions {
            max_retries: Some(2),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        },
        reconnect_retry: RetryOptions {
            max_retries: Some(20),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        },
        ack_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(5),
        recovery_window: Duration::from_secs(5),
        recovery_attempt_delay: Duration::from_millis(100),
        sequence_ack_interval: Duration::from_millis(100),
        ..ClientOptions::default()
    }
}

/// The next event, failing the test after `secs` seconds.
pub async fn next_event(events: &mut UnboundedReceiver<Event>, secs: u64) -> Event {
    match tokio::time::timeout(Duration::from_secs(secs), events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("event channel closed"),
        Err(_) => panic!("no event within {secs} s"),
    }
}

/// Skips events until one matches, failing after `secs` seconds; returns it and the
/// events skipped on the way.
pub async fn wait_for(
    events: &mut UnboundedReceiver<Event>,
    secs: u64,
    mut matches: impl FnMut(&Event) -> bool,
) -> (Event, Vec<Event>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if matches(&event) => return (event, skipped),
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("event channel closed; skipped {skipped:?}"),
            Err(_) => panic!("no matching event within {secs} s; skipped {skipped:?}"),
        }
    }
}

/// Every event already queued (without waiting).
pub fn drain(events: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut all = Vec::new();
    while let Ok(event) = events.try_recv() {
        all.push(event);
    }
    all
}

/// The text payload of a group or server message.
pub fn message_text(event: &Event) -> Option<String> {
    match event {
        Event::GroupMessage { data, .. } | Event::ServerMessage { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    }
}
