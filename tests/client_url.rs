//! The forms a client access URL takes, from the service or a credential provider:
//! what reaches the server, what is refused when the client is made.

mod common;

use common::{all_roles, fast_options, fault, last_error, next_event, until_stats, wait_for};
use std::ffi::CString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use webpubsub_client::ffi::client::wps_client_new;
use webpubsub_client::ffi::status::WPS_STATUS_INVALID_ARGUMENT;
use webpubsub_client::{Client, Credential, Error, Event};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

const HUB: &str = "hub";

fn token() -> TokenOptions {
    TokenOptions {
        user_id: Some("u".into()),
        roles: all_roles(),
        ..TokenOptions::default()
    }
}

#[tokio::test]
async fn a_fragment_does_not_hide_the_recovery_parameters() {
    let emulator = Emulator::start(Config {
        recovery_window: Duration::from_secs(10),
        ..Config::default()
    })
    .await
    .unwrap();
    let url = format!("{}#section", emulator.client_url(HUB, &token()));
    let (client, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!("not connected")
    };
    fault(&emulator, HUB, &connection_id, ":drop").await;
    // Recovered, not replaced by a new connection the client would take for the old one.
    until_stats(&emulator, "the connection was not recovered", 10, |s| {
        s["recoveries"] == 1
    })
    .await;
    let stats = common::stats(&emulator).await;
    assert_eq!(stats["connectionsOpened"], 1, "{stats}");
    assert_eq!(client.connection_id(), Some(connection_id));
    client.stop().await;
}

/// A provider's URL may change from one connection to the next (another hub, another
/// spelling): each new connection goes where the latest URL says, and a recovery goes
/// back to the URL of the connection it recovers, without asking the provider.
#[tokio::test]
async fn each_new_connection_takes_the_providers_latest_url_and_a_recovery_keeps_its_own() {
    let emulator = Emulator::start(Config {
        recovery_window: Duration::from_secs(10),
        ..Config::default()
    })
    .await
    .unwrap();
    let first = emulator.client_url("first", &token());
    let second = emulator.client_url("second", &token());
    let second = format!("{}#section", second.replacen("ws://", "http://u:p@", 1));
    // A third call would get a URL the service refuses.
    let urls = [
        first,
        second,
        format!("{}x", emulator.client_url(HUB, &token())),
    ];
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let credential = Credential::provider(move || {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        let url = urls[call.min(2)].clone();
        async move { Ok(url) }
    });
    let (client, mut events) = Client::with_channel(credential, fast_options()).unwrap();
    client.start().await.unwrap();
    let Event::Connected { connection_id, .. } = next_event(&mut events, 5).await else {
        panic!("not connected")
    };
    fault(&emulator, "first", &connection_id, ":close?code=1008").await;
    let (Event::Connected { connection_id, .. }, _) =
        wait_for(&mut events, 10, |e| matches!(e, Event::Connected { .. })).await
    else {
        unreachable!()
    };
    // The fault route finds the connection in that hub only.
    fault(&emulator, "second", &connection_id, ":drop").await;
    until_stats(&emulator, "the connection was not recovered", 10, |s| {
        s["recoveries"] == 1
    })
    .await;
    assert_eq!(client.connection_id(), Some(connection_id));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    client.stop().await;
}

#[tokio::test]
async fn a_url_without_a_host_is_refused_when_the_client_is_made() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url(HUB, &token());
    let (_, query) = url.split_once('?').unwrap();
    let port = emulator.port();
    for url in [
        format!("ws://:{port}/client/hubs/{HUB}?{query}"),
        format!("ws://user@:{port}/client/hubs/{HUB}?{query}"),
    ] {
        match Client::with_channel(Credential::Url(url.clone()), fast_options()) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("no host") && !m.contains(query), "{m}")
            }
            Err(e) => panic!("{url}: {e:?}"),
            Ok(_) => panic!("{url}: accepted"),
        }
        let url = CString::new(url).unwrap();
        let mut client = std::ptr::null_mut();
        let status = unsafe {
            wps_client_new(
                url.as_ptr(),
                std::ptr::null(),
                None,
                std::ptr::null_mut(),
                None,
                &mut client,
            )
        };
        assert_eq!(status, WPS_STATUS_INVALID_ARGUMENT, "{}", last_error());
        assert!(client.is_null());
        assert!(last_error().contains("no host"), "{}", last_error());
    }
}

#[tokio::test]
async fn a_url_without_a_path_asks_for_the_root() {
    // As the official clients do: an HTTP request target starts with '/'.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}?access_token=t");
    let request = upgrade_request(&listener, &url, false).await;
    assert!(
        request.starts_with("GET /?access_token=t HTTP/1.1\r\n"),
        "{request}"
    );
}

/// The head of the upgrade request a client of `url` sends to `listener`, reached
/// directly or through a proxy tunnelling every request to it.
async fn upgrade_request(listener: &tokio::net::TcpListener, url: &str, proxy: bool) -> String {
    let proxy = if proxy {
        Some(common::proxy::TestProxy::start(listener.local_addr().unwrap(), None).await)
    } else {
        None
    };
    let options = webpubsub_client::ClientOptions {
        proxy: match &proxy {
            Some(proxy) => webpubsub_client::ProxySetting::Url(proxy.url.clone()),
            None => webpubsub_client::ProxySetting::Direct,
        },
        ..fast_options()
    };
    let (client, _events) = Client::with_channel(Credential::Url(url.into()), options).unwrap();
    let start = tokio::spawn(async move { client.start().await });
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let request = common::request_head(&mut socket).await;
    drop(socket);
    assert!(start.await.unwrap().is_err());
    request
}

#[tokio::test]
async fn the_request_target_and_host_are_sent_as_the_url_writes_them() {
    // The path and query go as written, percent-escapes kept; bytes outside ASCII, which
    // a request target cannot hold (RFC 9112, 3.2), percent-encoded as browsers do. The
    // Host names the port unless it is the scheme's default (RFC 6455, 4.1).
    let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let v6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let (p4, p6) = (
        v4.local_addr().unwrap().port(),
        v6.local_addr().unwrap().port(),
    );
    let cases = [
        (
            &v4,
            format!("ws://127.0.0.1:{p4}/a%2Fb/c%20d?x=%0D%0Ay&z=a+b&q=a/b?c"),
            false,
            format!(
                "GET /a%2Fb/c%20d?x=%0D%0Ay&z=a+b&q=a/b?c HTTP/1.1\r\nHost: 127.0.0.1:{p4}\r\n"
            ),
        ),
        (
            &v4,
            format!("ws://127.0.0.1:{p4}/hub/ä?name=José"),
            false,
            format!("GET /hub/%C3%A4?name=Jos%C3%A9 HTTP/1.1\r\nHost: 127.0.0.1:{p4}\r\n"),
        ),
        (
            &v6,
            format!("ws://[::1]:{p6}/client?access_token=t"),
            false,
            format!("GET /client?access_token=t HTTP/1.1\r\nHost: [::1]:{p6}\r\n"),
        ),
        (
            &v4,
            "ws://service.invalid/client?access_token=t".into(),
            true,
            "GET /client?access_token=t HTTP/1.1\r\nHost: service.invalid\r\n".into(),
        ),
    ];
    for (listener, url, proxy, expected) in cases {
        let request = upgrade_request(listener, &url, proxy).await;
        assert!(request.starts_with(&expected), "{url}\n{request}");
    }
}
