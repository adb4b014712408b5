//! WebSocket over TCP or TLS (rustls with the ring provider; platform roots plus
//! optional extra CAs; verification always on), directly or through an HTTP proxy.
//!
//! The HTTP upgrade is written here rather than by tungstenite so that the request
//! line, which carries the access token, never reaches a log, and so that an HTTP
//! refusal (401, 404, ...) becomes a clear error.

use crate::client::{ClientOptions, Error};
use crate::protocol::Protocol;
use crate::proxy::ProxySetting;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, RootCertStore};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// A connected WebSocket.
pub(crate) type Ws = WebSocketStream<Stream>;

/// Read buffer per connection: small, so an idle client costs little.
const READ_BUFFER: usize = 8 * 1024;
/// Bytes buffered before a write reaches the socket (a flush always writes all).
const WRITE_BUFFER: usize = 16 * 1024;
/// Largest HTTP response head accepted during the upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Replaces the values of `access_token` and `awps_reconnection_token` in a URL with
/// `***`: the only form in which a client URL may appear in a log or an error.
pub fn redact_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _))
                if key.eq_ignore_ascii_case("access_token")
                    || key.eq_ignore_ascii_case("awps_reconnection_token") =>
            {
                format!("{key}=***")
            }
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// TCP or TLS under the WebSocket.
pub(crate) enum Stream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads from `stream` into `buf` until it holds a whole HTTP response head; returns
/// the head's length (bytes after it are the peer's next data). `during` names the
/// exchange in errors.
pub(crate) async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    during: &str,
) -> Result<usize, Error> {
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Error::Connect(format!("{during}: {e}")))?;
        if n == 0 {
            return Err(Error::Connect(format!(
                "the server closed the connection during the {during}"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match httparse::Response::new(&mut headers).parse(buf) {
            Ok(httparse::Status::Complete(len)) => return Ok(len),
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(Error::Connect(format!(
                    "{during}: HTTP response head too large"
                )))
            }
            Err(e) => {
                return Err(Error::Connect(format!(
                    "{during}: malformed HTTP response: {e}"
                )))
            }
        }
    }
}

/// Opens WebSocket connections for one client (its subprotocol and trusted roots).
#[derive(Clone)]
pub(crate) struct Connector {
    protocol: Protocol,
    extra_ca_pem: Arc<Vec<Vec<u8>>>,
    user_agent: Option<Arc<str>>,
    proxy: ProxySetting,
    config: WebSocketConfig,
}

impl Connector {
    pub(crate) fn new(options: &ClientOptions) -> Connector {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_message_size(Some(options.max_message_size))
            .max_frame_size(Some(options.max_message_size));
        Connector {
            protocol: options.protocol,
            extra_ca_pem: Arc::new(options.extra_ca_pem.clone()),
            user_agent: options.user_agent.as_deref().map(Arc::from),
            proxy: options.proxy.clone(),
            config,
        }
    }

    /// Connects to a `ws://` or `wss://` URL and performs the upgrade.
    pub(crate) async fn connect(&self, url: &str) -> Result<Ws, Error> {
        let uri: Uri = url
            .parse()
            .map_err(|_| Error::InvalidArgument("the client URL is not a valid URL".into()))?;
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                return Err(Error::InvalidArgument(
                    "the client URL scheme must be ws or wss".into(),
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| Error::InvalidArgument("the client URL has no host".into()))?;
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let proxy = self
            .proxy
            .resolve(bare_host, port, tls, |name| std::env::var(name).ok())
            .map_err(Error::InvalidArgument)?;
        let mut tcp = match &proxy {
            Some(proxy) => TcpStream::connect((proxy.host.as_str(), proxy.port))
                .await
                .map_err(|e| {
                    Error::Connect(format!(
                        "TCP connect to proxy {}:{}: {e}",
                        proxy.host, proxy.port
                    ))
                })?,
            None => TcpStream::connect((bare_host, port))
                .await
                .map_err(|e| Error::Connect(format!("TCP connect to {host}:{port}: {e}")))?,
        };
        let _ = tcp.set_nodelay(true);
        if let Some(proxy) = proxy {
            proxy.tunnel(&mut tcp, &format!("{host}:{port}")).await?;
        }
        let stream = if tls {
            let config = self.tls_config()?;
            let name = ServerName::try_from(bare_host.to_owned()).map_err(|e| {
                Error::InvalidArgument(format!("invalid TLS server name {host:?}: {e}"))
            })?;
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    Error::Tls(
                        match e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        {
                            Some(inner) => format!("handshake with {host}:{port}: {inner}"),
                            None => format!("handshake with {host}:{port}: {e}"),
                        },
                    )
                })?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Plain(tcp)
        };
        let default_port = uri.port_u16().is_none();
        let host_header = if default_port {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.upgrade(stream, &host_header, target).await
    }

    async fn upgrade(&self, mut stream: Stream, host: &str, target: &str) -> Result<Ws, Error> {
        let key = generate_key();
        let user_agent = self
            .user_agent
            .as_deref()
            .map(|ua| format!("User-Agent: {ua}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {}\r\n{user_agent}\r\n",
            self.protocol.name()
        );
        let io_error = |e: io::Error| Error::Connect(format!("WebSocket upgrade: {e}"));
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(io_error)?;
        stream.flush().await.map_err(io_error)?;
        let mut buf = Vec::with_capacity(1024);
        let head_len = read_response_head(&mut stream, &mut buf, "WebSocket upgrade").await?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        response
            .parse(&buf)
            .map_err(|e| Error::Connect(format!("malformed HTTP response: {e}")))?;
        let code = response.code.unwrap_or(0);
        if code != 101 {
            let reason = response.reason.unwrap_or("");
            return Err(Error::Connect(
                format!("HTTP {code} {reason}").trim_end().to_owned(),
            ));
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value))
        };
        if !header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            return Err(Error::Connect(
                "the server did not upgrade to WebSocket".into(),
            ));
        }
        if header("Sec-WebSocket-Accept").as_deref()
            != Some(derive_accept_key(key.as_bytes()).as_str())
        {
            return Err(Error::Connect(
                "the server's Sec-WebSocket-Accept does not match".into(),
            ));
        }
        if header("Sec-WebSocket-Protocol").as_deref() != Some(self.protocol.name()) {
            return Err(Error::Connect(format!(
                "the server did not accept the subprotocol {}",
                self.protocol.name()
            )));
        }
        // Frames that arrived with the response head start the read buffer. It
        // gets its full capacity here: the codec sizes every later buffer after
        // this first one, and one sized to `rest` would make it read the socket
        // a frame at a time.
        let mut rest = Vec::with_capacity(READ_BUFFER.max(buf.len() - head_len));
        rest.extend_from_slice(&buf[head_len..]);
        Ok(
            WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(self.config))
                .await,
        )
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        tls_config(&self.extra_ca_pem).map_err(Error::Tls)
    }
}

/// The TLS configuration for a set of extra CAs, built once per process and shared
/// by every client with the same set (a root store is too big to copy per client).
fn tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    type Cache = Mutex<HashMap<Vec<Vec<u8>>, Arc<rustls::ClientConfig>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(config) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(extra_ca_pem)
    {
        return Ok(config.clone());
    }
    let config = build_tls_config(extra_ca_pem)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(extra_ca_pem.to_vec(), config.clone());
    Ok(config)
}

/// Checks that every extra CA PEM holds at least one parsable certificate.
pub(crate) fn check_extra_ca(extra_ca_pem: &[Vec<u8>]) -> Result<(), String> {
    parse_extra_ca(extra_ca_pem).map(drop)
}

fn parse_extra_ca(extra_ca_pem: &[Vec<u8>]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for pem in extra_ca_pem {
        let before = certs.len();
        for cert in CertificateDer::pem_slice_iter(pem) {
            certs.push(cert.map_err(|e| format!("extra CA certificate is not valid PEM: {e}"))?);
        }
        if certs.len() == before {
            return Err("an extra CA PEM holds no certificate".into());
        }
    }
    Ok(certs)
}

/// The platform's trusted roots, loaded once per process.
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            log::warn!("loading platform root certificates: {error}");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        log::debug!("loaded {added} platform root certificates ({ignored} unusable)");
        roots
    })
}

fn build_tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = platform_roots().clone();
    for cert in parse_extra_ca(extra_ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("extra CA certificate rejected: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no trusted root certificates (none on the platform and no extra CA)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted() {
        let url = "wss://h/client/hubs/x?access_token=eyJ.secret&awps_connection_id=c1&awps_reconnection_token=r%2Bt";
        let red = redact_url(url);
        assert_eq!(red, "wss://h/client/hubs/x?access_token=***&awps_connection_id=c1&awps_reconnection_token=***");
        assert_eq!(redact_url("ws://h/a"), "ws://h/a");
        assert_eq!(
            redact_url("ws://h/a?Access_Token=x"),
            "ws://h/a?Access_Token=***"
        );
    }

    #[test]
    fn bad_extra_ca_is_a_clear_error() {
        let err = build_tls_config(&[b"not a pem".to_vec()]).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }
}
