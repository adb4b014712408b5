//! https/wss with a self-signed certificate made in the test.
mod common;

use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use webpubsub_emulator::TlsFiles;

#[tokio::test]
async fn wss_with_a_self_signed_certificate() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("wps-emulator-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();

    let emu = start_with(Config {
        tls: Some(TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        }),
        ..Config::default()
    })
    .await;
    assert!(emu.endpoint().starts_with("https://"));
    assert!(emu
        .connection_string()
        .starts_with("Endpoint=https://127.0.0.1;Port="));
    let url = emu.client_url("h", &all_roles("a"));
    assert!(url.starts_with("wss://"));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(RELIABLE));
    let (inner, _) = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(client))),
    )
    .await
    .expect("wss connects");
    let mut ws = Ws {
        inner,
        protocol: None,
    };
    assert_eq!(ws.next_json().await["event"], "connected");
    assert_ack_ok(&ws.join("g", 1).await);
    emu.shutdown().await;

    // Bad PEM files are a clear startup error.
    std::fs::write(&key_path, "not a key").unwrap();
    let err = Emulator::start(Config {
        tls: Some(TlsFiles {
            cert: cert_path,
            key: key_path,
        }),
        ..Config::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("private key"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_cut_off_after_the_http_timeout() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("wps-emulator-tls-slow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.cert.pem()).unwrap();
    std::fs::write(&files.key, cert.key_pair.serialize_pem()).unwrap();
    let timeout = std::time::Duration::from_millis(300);
    let emu = start_with(Config {
        tls: Some(files),
        http_timeout: timeout,
        ..Config::default()
    })
    .await;
    // A peer that connects and never starts its handshake, and one that stops halfway
    // through its ClientHello, are let go as a peer that never sends its request head is.
    for sent in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", emu.port()))
            .await
            .unwrap();
        tcp.write_all(sent).await.unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(timeout * 10, tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("still open after {:?} ({sent:?})", start.elapsed()));
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    emu.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
