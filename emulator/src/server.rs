//! Listener, optional TLS, routing and the accept loop.
//!
//! hyper's HTTP/1.1 connection is driven directly (instead of `axum::serve`) so that
//! plain and TLS sockets share one accept loop, every connection task observes the
//! shutdown token, and a peer that is slow to finish its TLS handshake or to send a
//! request head, or idle between requests, is cut off after `Config::http_timeout`.
//! There is no HTTP/2: the official SDKs speak HTTP/1.1 (TLS offers only `http/1.1`),
//! and a cleartext HTTP/2 connection could stall the protocol detection or idle without
//! a bound.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use axum::routing::{any, get, post};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{random_id, Hub, Server};
use crate::slots::Slots;
use crate::upstream::Upstream;
use crate::{client_ws, faults, rest, Config, TlsFiles};

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

fn tls_acceptor(files: &TlsFiles) -> std::io::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            invalid(format!(
                "cannot read certificate {}: {e}",
                files.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "no certificate in {}",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        invalid(format!(
            "cannot read private key {}: {e}",
            files.key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/client/hubs/{hub}", any(client_ws::client_endpoint))
        .route("/client", any(client_ws::client_endpoint_by_query))
        .route("/client/", any(client_ws::client_endpoint_by_query))
        .route("/client/{*rest}", any(client_ws::no_client_endpoint))
        .route("/clients", any(client_ws::other_client_endpoint))
        .route("/clients/", any(client_ws::other_client_endpoint))
        .route("/clients/{*rest}", any(client_ws::other_client_endpoint))
        .route(
            "/_emulator/stats",
            get(faults::stats).fallback(|m: Method| faults::method_not_allowed(m, "GET or HEAD")),
        )
        .route(
            "/_emulator/hubs/{hub}/connections/{id}/{action}",
            post(faults::connection_fault)
                .fallback(|m: Method| faults::method_not_allowed(m, "POST")),
        )
        .fallback(rest::dispatch)
        .with_state(server)
}

/// An access key goes into the connection string, one line of `name=value;` pairs.
fn check_access_key(key: &str) -> std::io::Result<()> {
    if key.is_empty() || key.contains(|c: char| c == ';' || c.is_control()) {
        return Err(invalid(
            "the access key must be non-empty, without ';' or control characters (it goes into the connection string)".into(),
        ));
    }
    Ok(())
}

/// The host that URLs name for a listener on `host` (without brackets) bound to `bound`:
/// for an unspecified address (every interface, however spelled or resolved, the
/// IPv4-mapped `::ffff:0.0.0.0` included), a loopback
/// address it takes, `127.0.0.1` when it `takes_ipv4` (an IPv4 or dual-stack socket),
/// else `[::1]`; an IP address in its canonical form, an IPv6 one in brackets (one with a
/// zone, `fe80::1%eth0`, as given); a name as it is.
fn public_host(host: &str, bound: IpAddr, takes_ipv4: bool) -> String {
    let ip = if bound.to_canonical().is_unspecified() {
        if takes_ipv4 {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        }
    } else if host.parse::<IpAddr>().is_ok() {
        bound
    } else if host.contains(':') {
        return format!("[{host}]");
    } else {
        return host.to_owned();
    };
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

/// Binds and spawns the accept loop.
pub(crate) async fn start(config: Config) -> std::io::Result<(Arc<Server>, JoinHandle<()>)> {
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let upstream = config
        .upstream
        .as_deref()
        .map(|u| Upstream::new(u, config.upstream_timeout, config.max_frame_bytes))
        .transpose()
        .map_err(invalid)?;
    if let Some(key) = &config.access_key {
        check_access_key(key)?;
    }
    // An IPv6 address may be given as in a URL, in brackets.
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    let listener = TcpListener::bind((host, config.port)).await.map_err(|e| {
        let address = if host.contains(':') {
            format!("[{host}]:{}", config.port)
        } else {
            format!("{host}:{}", config.port)
        };
        std::io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let takes_ipv4 = match bound {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(_) => !SockRef::from(&listener).only_v6()?,
    };
    let public_host = public_host(host, bound.ip(), takes_ipv4);
    let access_key = config.access_key.clone().unwrap_or_else(|| random_id(44));
    let server = Arc::new(Server {
        access_key,
        port: bound.port(),
        public_host,
        hubs: Default::default(),
        stats: Default::default(),
        upstream,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        slots: Slots::new(config.max_connections),
        config,
    });
    if let Some(ms) = server.config.fault_drop_every_ms {
        server.tasks.spawn(faults::drop_every(server.clone(), ms));
    }
    let app = router(server.clone());
    let accept = tokio::spawn(accept_loop(server.clone(), listener, tls, app));
    Ok((server, accept))
}

/// How long accepts must go without a failure for the failures to be over.
const ACCEPT_RECOVERED: Duration = Duration::from_secs(1);

async fn accept_loop(
    server: Arc<Server>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
) {
    // Failed accepts (out of file descriptors and the like) since the first was logged;
    // the recovery is logged once none has failed for `ACCEPT_RECOVERED`.
    let mut failed = 0u64;
    let mut last_failure = tokio::time::Instant::now();
    loop {
        let accepted = tokio::select! {
            _ = server.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(last_failure + ACCEPT_RECOVERED), if failed > 0 => {
                tracing::info!("accepting again, after {failed} failed accepts");
                failed = 0;
                continue;
            }
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if failed == 0 {
                    tracing::warn!("accept failed: {e} (retrying every 20 ms)");
                }
                failed += 1;
                last_failure = tokio::time::Instant::now();
                // Back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = server.shutdown.clone();
        let timeout = server.config.http_timeout;
        server.tasks.spawn(async move {
            match tls {
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve(TokioIo::new(stream), app, shutdown, timeout).await,
                    Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
                None => serve(TokioIo::new(tcp), app, shutdown, timeout).await,
            }
        });
    }
}

/// Serves one HTTP/1.1 connection. A request head must arrive whole within `timeout`
/// of the connection's start or of the previous response, which also closes a
/// keep-alive connection idle for that long.
async fn serve<I>(io: TokioIo<I>, app: Router, shutdown: CancellationToken, timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(io, TowerToHyperService::new(app))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// Drops every connection and hub (breaks nothing if tasks still run).
pub(crate) fn forget_all(server: &Server) {
    // Collected first: removing a hub's last connection removes the hub from the map.
    let hubs: Vec<Arc<Hub>> = server.hubs.iter().map(|h| h.clone()).collect();
    for hub in hubs {
        let conns: Vec<_> = hub.connections.iter().map(|c| c.clone()).collect();
        for c in conns {
            hub.remove(&c, None);
        }
    }
    server.hubs.clear();
}

#[cfg(test)]
mod tests {
    use super::public_host;

    #[test]
    fn urls_name_a_loopback_address_for_every_interface() {
        let any4 = "0.0.0.0".parse().unwrap();
        let any6 = "::".parse().unwrap();
        assert_eq!(public_host("0", any4, true), "127.0.0.1");
        assert_eq!(public_host("::", any6, true), "127.0.0.1");
        assert_eq!(public_host("0:0::0", any6, false), "[::1]");
        let mapped_any4 = "::ffff:0.0.0.0".parse().unwrap();
        assert_eq!(
            public_host("::ffff:0.0.0.0", mapped_any4, true),
            "127.0.0.1"
        );
        assert_eq!(public_host("::1", "::1".parse().unwrap(), false), "[::1]");
        assert_eq!(
            public_host("0:0:0:0:0:0:0:1", "::1".parse().unwrap(), false),
            "[::1]"
        );
        assert_eq!(
            public_host("10.0.0.2", "10.0.0.2".parse().unwrap(), true),
            "10.0.0.2"
        );
        let loopback = "127.0.0.1".parse().unwrap();
        assert_eq!(public_host("localhost", loopback, true), "localhost");
    }

    /// An IPv6 address with a zone, which `IpAddr` does not parse, is bracketed as given:
    /// a URL (and the emulator's own `client-url`) takes no bare IPv6 host.
    #[test]
    fn an_ipv6_host_with_a_zone_is_bracketed() {
        let link_local = "fe80::1".parse().unwrap();
        assert_eq!(
            public_host("fe80::1%eth0", link_local, false),
            "[fe80::1%eth0]"
        );
    }
}
