//! wss:// end to end: the emulator serves TLS with a certificate issued by a CA made
//! in the test; the client trusts that CA only through `extra_ca_pem`. Also a server
//! whose certificate expired, one that refuses the handshake, and one that stalls it.

mod common;

use bytes::Bytes;
use common::pki::Pki;
use common::{all_roles, fast_options, next_event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webpubsub_client::{Client, ClientOptions, Credential, DataType, Error, SendToGroupOptions};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

/// An emulator serving TLS with `pki`'s certificate.
async fn tls_emulator(pki: &Pki) -> Emulator {
    Emulator::start(Config {
        tls: Some(pki.files.clone()),
        ..Config::default()
    })
    .await
    .unwrap()
}

/// How a start fails against an emulator serving `pki`'s certificate, its CA trusted.
async fn start_error_trusting_its_ca(pki: &Pki) -> Error {
    let emulator = tls_emulator(pki).await;
    let url = emulator.client_url("hub", &TokenOptions::default());
    let options = ClientOptions {
        extra_ca_pem: vec![pki.ca_pem.clone().into_bytes()],
        ..fast_options()
    };
    let (client, _events) = Client::with_channel(Credential::Url(url), options).unwrap();
    client.start().await.unwrap_err()
}

#[tokio::test]
async fn wss_works_with_the_extra_ca_and_fails_verification_without_it() {
    let pki = Pki::new("ok");
    let emulator = tls_emulator(&pki).await;
    let token = TokenOptions {
        user_id: Some("tls".into()),
        roles: all_roles(),
        ..Default::default()
    };
    let url = emulator.client_url("hub", &token);
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");

    let options = ClientOptions {
        extra_ca_pem: vec![pki.ca_pem.clone().into_bytes()],
        ..fast_options()
    };
    let (client, mut events) = common::started(url.clone(), options).await;
    client.join_group("secure").await.unwrap();
    client
        .send_to_group(
            "secure",
            DataType::Text,
            Bytes::from("over tls"),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap();
    let event = next_event(&mut events, 5).await;
    assert_eq!(common::message_text(&event).as_deref(), Some("over tls"));
    client.stop().await;

    let (untrusting, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    let error = untrusting.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Tls(m) if m.contains("UnknownIssuer (the server's certificate is self-signed or from a CA this client does not trust: add that CA as an extra CA)")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_ca_certificate_served_as_the_servers_own_is_explained() {
    let error = start_error_trusting_its_ca(&Pki::ca_as_server("ca-as-server")).await;
    assert!(
        matches!(&error, Error::Tls(m) if m.contains("CaUsedAsEndEntity") && m.ends_with(" (the server presents a CA's certificate as its own: it needs a certificate issued by that CA)")),
        "{error:?}"
    );
}

#[tokio::test]
async fn wss_to_a_plain_server_says_it_does_not_speak_tls() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator
        .client_url("hub", &TokenOptions::default())
        .replacen("ws://", "wss://", 1);
    let (client, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    let error = client.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Tls(m) if m.ends_with("(the server does not speak TLS: a ws:// endpoint?)")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_bad_extra_ca_is_refused_when_the_client_is_made() {
    let options = ClientOptions {
        extra_ca_pem: vec![b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec()],
        ..fast_options()
    };
    let error =
        Client::with_channel(Credential::Url("wss://127.0.0.1:9/x".into()), options).unwrap_err();
    assert!(
        matches!(&error, Error::InvalidArgument(m) if m.contains("PEM")),
        "{error:?}"
    );
    let options = ClientOptions {
        extra_ca_pem: vec![b"no pem at all".to_vec()],
        ..fast_options()
    };
    let error =
        Client::with_channel(Credential::Url("wss://127.0.0.1:9/x".into()), options).unwrap_err();
    assert!(
        matches!(&error, Error::InvalidArgument(m) if m.contains("no certificate")),
        "{error:?}"
    );
}

#[tokio::test]
async fn wss_goes_through_a_proxy_tunnel_with_end_to_end_verification() {
    let pki = Pki::new("proxy");
    let emulator = tls_emulator(&pki).await;
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], emulator.port()));
    let proxy = common::proxy::TestProxy::start(target, None).await;
    let url = emulator.client_url("hub", &common::user_token("tls"));
    let options = ClientOptions {
        extra_ca_pem: vec![pki.ca_pem.clone().into_bytes()],
        proxy: webpubsub_client::ProxySetting::Url(proxy.url.clone()),
        ..fast_options()
    };
    let (client, _events) = common::started(url.clone(), options).await;
    assert!(proxy.heads()[0].starts_with("CONNECT 127.0.0.1:"));
    client.stop().await;

    // Through the same tunnel, a certificate the client does not trust still fails.
    let options = ClientOptions {
        proxy: webpubsub_client::ProxySetting::Url(proxy.url.clone()),
        ..fast_options()
    };
    let (untrusting, _events) = Client::with_channel(Credential::Url(url), options).unwrap();
    let error = untrusting.start().await.unwrap_err();
    assert!(
        matches!(&error, Error::Tls(m) if m.contains("certificate")),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_named_as_such() {
    let error = start_error_trusting_its_ca(&Pki::expired("expired")).await;
    assert!(
        matches!(&error, Error::Tls(m) if m.contains("certificate expired")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_server_that_refuses_the_handshake_with_an_alert_is_named() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let refusing = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let _hello = tcp.read(&mut [0u8; 4096]).await.unwrap();
        // A fatal handshake_failure alert (TLS 1.2 record).
        tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
            .await
            .unwrap();
        std::future::pending::<()>().await
    });
    let url = format!("wss://{server}/client/hubs/h");
    let (client, _events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    let error = client.start().await.unwrap_err();
    assert_eq!(
        error,
        Error::Tls(format!(
            "handshake with {server}: received fatal alert: HandshakeFailure"
        ))
    );
    refusing.abort();
}

#[tokio::test]
async fn a_stalled_handshake_is_bounded_by_the_start_timeout_and_by_a_stop() {
    let (server, mut hellos) = common::silent_server().await;
    let hello = common::stalled_start(
        Credential::Url(format!("wss://{server}/client/hubs/h")),
        fast_options(),
        &mut hellos,
        format!("the TLS handshake with {server}"),
    )
    .await;
    assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record");
}
