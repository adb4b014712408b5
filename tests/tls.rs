//! wss:// end to end: the emulator serves TLS with a certificate issued by a CA made
//! in the test; the client trusts that CA only through `extra_ca_pem`.

mod common;

use bytes::Bytes;
use common::pki::Pki;
use common::{all_roles, fast_options, next_event};
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
    let pki = Pki::ca_as_server("ca-as-server");
    let emulator = tls_emulator(&pki).await;
    let url = emulator.client_url("hub", &TokenOptions::default());
    let options = ClientOptions {
        extra_ca_pem: vec![pki.ca_pem.clone().into_bytes()],
        ..fast_options()
    };
    let (client, _events) = Client::with_channel(Credential::Url(url), options).unwrap();
    let error = client.start().await.unwrap_err();
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
