//! Logs make a reconnect storm readable and never contain the access token: every
//! record of the process (client, tungstenite, rustls, ...) is captured at trace level
//! while a client connects, recovers, reconnects (once after a refused recovery, which
//! is a warning) and fails to start; and a recovery whose attempts fail tells why at
//! info level without a line per attempt.

mod common;

use common::outage::{client_url, Service};
use common::{all_roles, fast_options, fault, next_event, wait_for};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use webpubsub_client::{Client, ClientOptions, Credential, DataType, Event, SendToGroupOptions};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

struct Capture;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        LINES.lock().unwrap().push(line);
    }

    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

/// Captures every record of the process from now on (the tests share the logger).
fn capture() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        log::set_logger(&LOGGER).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Every occurrence of `key` in `line` is followed by the redaction marker.
fn redacted(line: &str, key: &str) -> bool {
    line.match_indices(key)
        .all(|(at, _)| line[at + key.len()..].starts_with("***"))
}

#[tokio::test]
async fn no_token_in_any_log_line() {
    capture();

    let emulator = Emulator::start(Config::default()).await.unwrap();
    let handed_out = Arc::new(Mutex::new(Vec::<String>::new()));
    let tokens = handed_out.clone();
    let key = emulator.access_key().to_owned();
    let base = emulator
        .client_url("hub", &TokenOptions::default())
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let audience = base.replacen("ws://", "http://", 1);
    let credential = Credential::provider(move || {
        let opts = TokenOptions {
            user_id: Some("logger".into()),
            roles: all_roles(),
            ..Default::default()
        };
        let jwt = webpubsub_emulator::auth::sign_client_token(&key, &audience, &opts);
        tokens.lock().unwrap().push(jwt.clone());
        let url = format!("{base}?access_token={jwt}");
        async move { Ok(url) }
    });
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!()
    };
    client.join_group("g").await.unwrap();

    fault(&emulator, "hub", &connection_id, ":drop").await;
    client
        .send_to_group(
            "g",
            DataType::Text,
            "after drop".into(),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap();
    fault(&emulator, "hub", &connection_id, ":close?code=1008").await;
    let (Event::Connected { connection_id, .. }, _) =
        wait_for(&mut events, 10, |e| matches!(e, Event::Connected { .. })).await
    else {
        panic!()
    };
    // A recovery the service refuses: the event reports the drop, the log the refusal.
    fault(&emulator, "hub", &connection_id, ":drop?recoverable=false").await;
    wait_for(&mut events, 10, |e| matches!(e, Event::Connected { .. })).await;
    client.stop().await;

    // With a password in its user info, which the client does not send.
    let bad_url = format!("{}x", emulator.client_url("hub", &TokenOptions::default())).replacen(
        "ws://",
        "ws://me:pw-secret@",
        1,
    );
    handed_out
        .lock()
        .unwrap()
        .push(bad_url.split("access_token=").nth(1).unwrap().to_owned());
    let (bad, _events) = Client::with_channel(Credential::Url(bad_url), fast_options()).unwrap();
    assert!(bad.start().await.is_err());

    let lines = LINES.lock().unwrap().clone();
    let tokens = handed_out.lock().unwrap().clone();
    assert!(tokens.len() >= 3);
    let ours: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" webpubsub_client"))
        .collect();
    let refusal = format!("WARN webpubsub_client::client::connection: the service refused the recovery of connection {connection_id}");
    assert!(
        ours.iter().any(|l| l.starts_with(&refusal)),
        "no {refusal:?} in {ours:#?}"
    );
    for needle in [
        "connected: connection",
        "recovering",
        "recovered",
        "lost",
        "start failed",
        "access_token=***",
    ] {
        assert!(
            ours.iter().any(|l| l.contains(needle)),
            "no log line with {needle:?} in {ours:#?}"
        );
    }
    for line in &ours {
        // The connected frame, as is or as a hex frame dump: its reconnection token.
        let hex: String = "reconnectionToken"
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            !line.contains("reconnectionToken") && !line.to_lowercase().contains(&hex),
            "{line}"
        );
    }
    for line in &lines {
        for token in &tokens {
            assert!(
                !line.contains(token.as_str()),
                "token in a log line: {line}"
            );
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !line.contains(signature),
                "token signature in a log line: {line}"
            );
        }
        assert!(redacted(line, "access_token="), "{line}");
        assert!(!line.contains("pw-secret"), "{line}");
        assert!(redacted(line, "awps_reconnection_token="), "{line}");
    }
}

/// The service is gone: the first failed recovery attempt is logged at info level with
/// its cause, the next ones at debug level only, and the end of the window, a warning,
/// names the last attempt's cause.
#[tokio::test]
async fn a_failing_recovery_tells_its_cause_at_info_level_once() {
    capture();
    let service = Service::start(0, None);
    let options = ClientOptions {
        auto_reconnect: false,
        recovery_window: Duration::from_secs(1),
        ..fast_options()
    };
    let url = client_url(service.port(), "rita");
    let (client, mut events) = Client::with_channel(Credential::Url(url), options).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!()
    };
    service.kill();
    wait_for(&mut events, 10, |e| matches!(e, Event::Stopped { .. })).await;

    let ours: Vec<String> = LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(" webpubsub_client") && l.contains(&connection_id))
        .cloned()
        .collect();
    let attempts: Vec<&String> = ours
        .iter()
        .filter(|l| l.contains("recovery attempt"))
        .collect();
    assert!(attempts.len() >= 3, "{ours:#?}");
    let first = format!("INFO webpubsub_client::client::connection: recovery attempt 1 of connection {connection_id} failed: connect failed: ");
    assert!(attempts[0].starts_with(&first), "{ours:#?}");
    assert!(
        attempts[1..].iter().all(|l| l.starts_with("DEBUG ")),
        "{ours:#?}"
    );
    let end = format!("WARN webpubsub_client::client::connection: connection {connection_id} could not be recovered within 1s (last attempt: connect failed: ");
    assert!(ours.iter().any(|l| l.starts_with(&end)), "{ours:#?}");
}
