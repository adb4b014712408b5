//! Connections through an HTTP proxy: the tunnel, its credentials, a refusal, a recovery
//! that goes through the proxy again, IPv6, and a proxy that misbehaves or never answers.

mod common;

use bytes::Bytes;
use common::proxy::TestProxy;
use common::{fast_options, message_text, next_event, user_token};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use webpubsub_client::{
    Client, ClientOptions, Credential, DataType, Error, Event, ProxySetting, SendToGroupOptions,
};
use webpubsub_emulator::{Config, Emulator};

async fn emulator() -> (Emulator, SocketAddr) {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], emulator.port()));
    (emulator, addr)
}

fn through(proxy: &str) -> ClientOptions {
    ClientOptions {
        proxy: ProxySetting::Url(proxy.to_owned()),
        ..fast_options()
    }
}

async fn round_trip(client: &Client, events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) {
    client.join_group("g").await.unwrap();
    let options = SendToGroupOptions::default();
    client
        .send_to_group("g", DataType::Text, Bytes::from("via proxy"), options)
        .await
        .unwrap();
    let event = next_event(events, 5).await;
    assert_eq!(message_text(&event).as_deref(), Some("via proxy"));
}

#[tokio::test]
async fn a_client_connects_through_a_proxy_that_tunnels_to_the_service() {
    let (emulator, addr) = emulator().await;
    let proxy = TestProxy::start(addr, None).await;
    // The host name resolves nowhere: only the proxy's tunnel can reach the service.
    let url = emulator
        .client_url("hub", &user_token("p"))
        .replace("127.0.0.1", "webpubsub.invalid");
    let (client, mut events) = common::started(url, through(&proxy.url)).await;
    round_trip(&client, &mut events).await;
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let port = emulator.port();
    assert!(
        heads[0].starts_with(&format!("CONNECT webpubsub.invalid:{port} HTTP/1.1\r\n")),
        "{heads:?}"
    );
    assert!(!heads[0]
        .to_ascii_lowercase()
        .contains("proxy-authorization"));
    assert!(
        !heads[0].contains("access_token"),
        "the token stays inside the tunnel"
    );
    client.stop().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn proxy_credentials_are_sent_and_a_refusal_is_a_clear_error() {
    let (emulator, addr) = emulator().await;
    // "user:p@ss" in Basic form; the URL carries the password percent-encoded.
    let proxy = TestProxy::start(addr, Some("Basic dXNlcjpwQHNz")).await;
    let url = emulator.client_url("hub", &user_token("p"));
    let host = proxy.url.trim_start_matches("http://");

    let wrong = format!("http://user:nope@{host}");
    let (client, _events) =
        Client::with_channel(Credential::Url(url.clone()), through(&wrong)).unwrap();
    let error = client.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Connect(m) if m.contains("407") && m.contains(host) && !m.contains("nope")),
        "{error:?}"
    );

    let right = format!("http://user:p%40ss@{host}");
    let (client, mut events) = common::started(url, through(&right)).await;
    round_trip(&client, &mut events).await;
    client.stop().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_dropped_tunnel_is_recovered_through_the_proxy() {
    let (emulator, addr) = emulator().await;
    let proxy = TestProxy::start(addr, None).await;
    let url = emulator.client_url("hub", &user_token("p"));
    let (client, mut events) = common::started(url, through(&proxy.url)).await;
    let id = client.connection_id();
    proxy.drop_tunnels();
    round_trip(&client, &mut events).await;
    assert_eq!(client.connection_id(), id, "recovered, not reconnected");
    assert!(proxy.heads().len() >= 2, "{:?}", proxy.heads());
    client.stop().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_proxy_url_that_is_not_http_is_refused_when_the_client_is_made() {
    for bad in ["socks5://127.0.0.1:1080", "http://", "http://h:99999"] {
        let error =
            Client::with_channel(Credential::Url("ws://127.0.0.1:9/x".into()), through(bad))
                .unwrap_err();
        assert!(
            matches!(&error, Error::InvalidArgument(m) if m.contains("proxy")),
            "{bad}: {error:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_c_option_sends_a_client_through_the_proxy() {
    use std::ffi::CString;
    use webpubsub_client::ffi::client::{
        wps_client_free, wps_client_new, wps_client_start, wps_client_state,
    };
    use webpubsub_client::ffi::options::{
        wps_options_free, wps_options_new, wps_options_set_proxy,
    };
    use webpubsub_client::ffi::status::WPS_STATE_CONNECTED;

    let (emulator, addr) = emulator().await;
    let proxy = TestProxy::start(addr, None).await;
    let url = emulator
        .client_url("hub", &user_token("c"))
        .replace("127.0.0.1", "webpubsub.invalid");
    let (url, proxy_url) = (
        CString::new(url).unwrap(),
        CString::new(proxy.url.clone()).unwrap(),
    );
    let client = tokio::task::spawn_blocking(move || unsafe {
        let o = wps_options_new();
        common::check(
            wps_options_set_proxy(o, proxy_url.as_ptr()),
            "wps_options_set_proxy",
        );
        let mut c = std::ptr::null_mut();
        let status = wps_client_new(url.as_ptr(), o, None, std::ptr::null_mut(), None, &mut c);
        wps_options_free(o);
        common::check(status, "wps_client_new");
        common::check(wps_client_start(c), "wps_client_start");
        c as usize
    })
    .await
    .unwrap();
    let c = client as *mut webpubsub_client::ffi::client::wps_client;
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_CONNECTED);
    assert_eq!(proxy.heads().len(), 1);
    tokio::task::spawn_blocking(move || unsafe { wps_client_free(client as *mut _) })
        .await
        .unwrap();
    emulator.shutdown().await;
}

#[tokio::test]
async fn interim_responses_before_the_proxys_answer_are_skipped() {
    let (emulator, addr) = emulator().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // RFC 9110 (15.2): a client parses the 1xx responses it did not expect before the
    // final one.
    let interim =
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
    let proxy = TestProxy::serving(listener, addr, None, interim);
    let url = emulator.client_url("hub", &user_token("p"));
    let (client, mut events) = common::started(url, through(&proxy.url)).await;
    round_trip(&client, &mut events).await;
    client.stop().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn an_ipv6_proxy_tunnels_to_an_ipv6_host_named_in_brackets() {
    let listener = TcpListener::bind("[::1]:0")
        .await
        .expect("an IPv6 loopback ([::1]) to listen on");
    let (emulator, addr) = emulator().await;
    let proxy = TestProxy::serving(listener, addr, None, b"");
    assert!(proxy.url.starts_with("http://[::1]:"), "{}", proxy.url);
    let url = emulator
        .client_url("hub", &user_token("p"))
        .replace("127.0.0.1", "[::1]");
    let (client, mut events) = common::started(url, through(&proxy.url)).await;
    round_trip(&client, &mut events).await;
    let port = emulator.port();
    let heads = proxy.heads();
    assert!(
        heads[0].starts_with(&format!(
            "CONNECT [::1]:{port} HTTP/1.1\r\nHost: [::1]:{port}\r\n"
        )),
        "{heads:?}"
    );
    client.stop().await;
    emulator.shutdown().await;
}

/// What a hostile proxy does after it read the `CONNECT` request and sent its answer.
enum Then {
    Hold,
    Close,
    ShutdownWrite,
}

#[tokio::test]
async fn a_hostile_answer_to_connect_fails_the_start_at_once_with_a_clear_error() {
    let cases: Vec<(Vec<u8>, Then, &str)> = vec![
        (
            b"HTTP/1.1 2OO OK\r\n\r\n".to_vec(),
            Then::Hold,
            "malformed HTTP response: invalid response status",
        ),
        (
            [b"HTTP/1.1 200 OK\r\nX-A: ".to_vec(), b"b".repeat(1 << 20)].concat(),
            Then::Hold,
            "HTTP response head too large",
        ),
        (
            [
                b"HTTP/1.1 200 OK\r\n".to_vec(),
                b"X-A: b\r\n".repeat(40),
                b"\r\n".to_vec(),
            ]
            .concat(),
            Then::Hold,
            "malformed HTTP response: too many headers",
        ),
        // Neither a TLS nor a WebSocket server speaks first: such bytes are the proxy's.
        (
            b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-x\r\n".to_vec(),
            Then::Hold,
            "sent data after its CONNECT response",
        ),
        // Not an interim response: what follows would be another protocol.
        (
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
            Then::Hold,
            "refused CONNECT to nowhere.invalid:80: HTTP 101 Switching Protocols",
        ),
        (
            b"HTTP/1.1 200 Conn".to_vec(),
            Then::Close,
            "closed the connection during the CONNECT",
        ),
        (
            Vec::new(),
            Then::ShutdownWrite,
            "closed the connection during the CONNECT",
        ),
    ];
    for (answer, then, expected) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let hostile = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            common::request_head(&mut tcp).await;
            // The client may stop reading a huge answer half way.
            let _ = tcp.write_all(&answer).await;
            match then {
                Then::Hold => std::future::pending().await,
                Then::Close => drop(tcp),
                Then::ShutdownWrite => {
                    tcp.shutdown().await.unwrap();
                    std::future::pending().await
                }
            }
        });
        let options = ClientOptions {
            start_timeout: Duration::from_secs(30),
            ..through(&format!("http://{proxy}"))
        };
        let url = "ws://nowhere.invalid/client/hubs/h?access_token=tok";
        let (client, _events) = Client::with_channel(Credential::Url(url.into()), options).unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), client.start())
            .await
            .expect("failed at once, not at the start timeout")
            .unwrap_err();
        assert!(
            matches!(&error, Error::Connect(m) if m.contains(expected) && m.contains(&proxy.to_string())),
            "{expected}: {error:?}"
        );
        hostile.abort();
    }
}

#[tokio::test]
async fn a_proxy_that_never_answers_is_bounded_by_the_start_timeout_and_by_a_stop() {
    let (proxy, mut requests) = common::silent_server().await;
    let request = common::stalled_start(
        Credential::Url("ws://nowhere.invalid/x".into()),
        through(&format!("http://{proxy}")),
        &mut requests,
        format!("proxy {proxy} to answer CONNECT to nowhere.invalid:80"),
    )
    .await;
    assert!(request.starts_with(b"CONNECT nowhere.invalid:80 "));
}
