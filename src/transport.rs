//! WebSocket over TCP or TLS (rustls with the ring provider; platform roots plus
//! optional extra CAs; verification always on), directly or through an HTTP proxy.
//!
//! The HTTP upgrade is written here rather than by tungstenite so that the request
//! line, which carries the access token, never reaches a log, and so that an HTTP
//! refusal (401, 404, ...) becomes a clear error.

use crate::client::{ClientOptions, Error};
use crate::protocol::Protocol;
use crate::proxy::ProxySetting;
use crate::try_once::TryOnce;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
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
/// Most of a refusal's body read: secrets in it are hidden before it is cut to
/// `MAX_REFUSAL_TEXT` for an error.
const MAX_REFUSAL_BODY: usize = 16 * 1024;
/// Most characters of a refusal's body quoted in an error (the service explains a
/// refusal in a line).
const MAX_REFUSAL_TEXT: usize = 512;
/// Longest wait for a refusal's body once its head is in: a server that announces a body
/// and never sends it must not turn a clear refusal into a start timeout.
const REFUSAL_BODY_WAIT: Duration = Duration::from_millis(500);

/// Replaces the values of `access_token` and `awps_reconnection_token` in a URL, and
/// the password of its user info, with `***`: the only form in which a client URL may
/// appear in a log or an error.
pub fn redact_url(url: &str) -> String {
    let url = &hide_password(url);
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if is_secret_param(key) => format!("{key}=***"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// `url` with the password of `scheme://user:password@host` shown as `***` (the client
/// sends no user info, but a log must not show it either).
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority
        .rsplit_once('@')
        .and_then(|(userinfo, host)| Some((userinfo.split_once(':')?.0, host)))
    {
        Some((user, host)) => format!("{scheme}://{user}:***@{host}{}", &rest[authority.len()..]),
        None => url.to_owned(),
    }
}

/// Whether a query parameter of a client URL holds a token.
fn is_secret_param(key: &str) -> bool {
    key.eq_ignore_ascii_case("access_token") || key.eq_ignore_ascii_case("awps_reconnection_token")
}

/// The `host:port` of a client URL (the scheme's port when it names none), for errors.
pub(crate) fn peer_of(url: &str) -> String {
    let Ok(uri) = url.parse::<Uri>() else {
        return String::new();
    };
    let tls = uri.scheme_str() == Some("wss");
    format!(
        "{}:{}",
        uri.host().unwrap_or_default(),
        uri.port_u16().unwrap_or(if tls { 443 } else { 80 })
    )
}

/// The values of `access_token` and `awps_reconnection_token` in a URL, as written and
/// percent-decoded: what must not appear in an error or a log.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let mut secrets = Vec::new();
    for (key, value) in query.split('&').filter_map(|p| p.split_once('=')) {
        if !value.is_empty() && is_secret_param(key) {
            let decoded =
                String::from_utf8_lossy(&crate::proxy::percent_decode(value)).into_owned();
            if decoded != value {
                secrets.push(decoded);
            }
            secrets.push(value.to_owned());
        }
    }
    secrets
}

/// Connects to `host`'s addresses in the resolver's order (`localhost` may be `::1`,
/// then `127.0.0.1`) until one accepts.
async fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => connect_first(addrs).await,
        Err(e) => Err(with_descriptor_shortage(e)),
    }
}

/// A failed name lookup, told as well when no socket can be made for want of file
/// descriptors: glibc's resolver then reports the name unknown, as it cannot open
/// `/etc/hosts` or a socket, and the shortage is what the user must fix.
fn with_descriptor_shortage(lookup: io::Error) -> io::Error {
    match tokio::net::TcpSocket::new_v4() {
        Err(shortage) if out_of_descriptors(&shortage) => io::Error::new(
            shortage.kind(),
            format!("{lookup}; no socket can be made either: {shortage}"),
        ),
        _ => lookup,
    }
}

/// Whether `error` is the process or the system out of file descriptors (EMFILE,
/// ENFILE on Unix): a shortage that passes, unlike the other reasons a file cannot be
/// opened.
fn out_of_descriptors(error: &io::Error) -> bool {
    cfg!(unix) && matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How long an address is tried alone before the next is tried beside it (RFC 8305's
/// connection attempt delay): an address that drops packets (a broken IPv6 route) does
/// not hold the connection up for the whole start timeout.
const NEXT_ADDRESS_DELAY: Duration = Duration::from_millis(250);

/// Connects to the first of `addrs` that accepts, in order, starting the next when the
/// last one failed or has not answered for [`NEXT_ADDRESS_DELAY`]; when none accepts,
/// the error names each address's failure (tokio's own loop keeps only the last).
async fn connect_first(addrs: impl IntoIterator<Item = SocketAddr>) -> io::Result<TcpStream> {
    let mut addrs = addrs.into_iter().enumerate().peekable();
    let mut attempts = FuturesUnordered::new();
    let mut failures = Vec::new();
    let mut start_next = true;
    loop {
        if std::mem::take(&mut start_next) {
            if let Some((order, addr)) = addrs.next() {
                attempts.push(async move { (order, addr, TcpStream::connect(addr).await) });
            }
        }
        if attempts.is_empty() {
            break;
        }
        let more = addrs.peek().is_some();
        tokio::select! {
            Some((order, addr, result)) = attempts.next() => match result {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    failures.push((order, addr, e));
                    start_next = true;
                }
            },
            () = tokio::time::sleep(NEXT_ADDRESS_DELAY), if more => start_next = true,
        }
    }
    failures.sort_by_key(|(order, ..)| *order);
    match failures.len() {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the host name resolved to no address",
        )),
        1 => Err(failures.remove(0).2),
        _ => Err(io::Error::new(
            failures[failures.len() - 1].2.kind(),
            failures
                .iter()
                .map(|(_, addr, e)| format!("{addr}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
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

/// Parses an HTTP response head into `response`, taking an obs-fold (a field value
/// continued on a line of its own) for the spaces it stands for, as RFC 9112 (5.2)
/// asks of a user agent; `field` reads such a value.
pub(crate) fn parse_response<'b>(
    response: &mut httparse::Response<'_, 'b>,
    buf: &'b [u8],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(response, buf)
}

/// Reads from `stream` into `buf` until it holds a whole final HTTP response head,
/// dropping the interim (1xx but 101) responses before it, as RFC 9110 asks of a client
/// that did not expect them; returns the head's length (bytes after it are the peer's
/// next data). `during` names the exchange in errors.
pub(crate) async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    during: &str,
) -> Result<usize, Error> {
    let mut chunk = [0u8; 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match parse_response(&mut response, buf) {
            Ok(httparse::Status::Complete(len)) => match response.code {
                Some(code) if (100..200).contains(&code) && code != 101 => {
                    buf.drain(..len);
                    continue;
                }
                _ => return Ok(len),
            },
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
    }
}

/// Describes an HTTP response that refused what was asked (the upgrade, a tunnel) for an
/// error: `HTTP 401 Unauthorized: "<its body>"` (a body under a `Content-Encoding` is
/// not quoted), then its `Retry-After` and `Location` when sent. `buf` holds the
/// response from its start, its head complete; the rest of the body is read from
/// `stream`, for `REFUSAL_BODY_WAIT` at most. Each of `secrets` found in the reason
/// phrase or the body shows as `***`.
pub(crate) async fn describe_refusal<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    secrets: &[String],
) -> String {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = parse_response(&mut response, &buf) else {
        return "malformed HTTP response".into();
    };
    let code = response.code.unwrap_or(0);
    let reason = quote_body(response.reason.unwrap_or("").as_bytes(), secrets);
    let mut text = format!("HTTP {code} {reason}").trim_end().to_owned();
    let header = |name: &str| field(response.headers, name);
    let length = header("Content-Length").and_then(|v| v.parse::<usize>().ok());
    let chunked =
        header("Transfer-Encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let retry_after = header("Retry-After");
    let location = header("Location");
    let encoding = header("Content-Encoding").filter(|e| !e.eq_ignore_ascii_case("identity"));
    let has_body = !(code < 200 || code == 204 || code == 304 || length == Some(0));
    if has_body {
        // The body ends at its length, at the last chunk, or (neither announced) when
        // the server closes the connection.
        let complete = |body: &[u8]| match length {
            Some(n) => body.len() >= n,
            None => chunked && body.windows(5).any(|w| w == b"0\r\n\r\n"),
        };
        let _ = tokio::time::timeout(REFUSAL_BODY_WAIT, async {
            let mut chunk = [0u8; 1024];
            while buf.len() - head_len < MAX_REFUSAL_BODY && !complete(&buf[head_len..]) {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let raw = &buf[head_len..];
        let body = if chunked {
            dechunk(raw)
        } else {
            raw[..length.unwrap_or(raw.len()).min(raw.len())].to_vec()
        };
        if let Some(encoding) = encoding {
            let encoding = quote_body(encoding.as_bytes(), secrets);
            text.push_str(&format!(" (a {encoding}-encoded body, not shown)"));
        } else {
            let body = quote_body(&body, secrets);
            if !body.is_empty() {
                text.push_str(&format!(": \"{body}\""));
            }
        }
    }
    if let Some(retry_after) = retry_after {
        let retry_after = quote_body(retry_after.as_bytes(), secrets);
        text.push_str(&format!(" (Retry-After: {retry_after})"));
    }
    if let Some(location) = location.filter(|_| (300..400).contains(&code)) {
        let location = quote_body(redact_url(&location).as_bytes(), secrets);
        text.push_str(&format!(" (a redirect to {location}, not followed)"));
    }
    text
}

/// The value of the field `name` in `headers`: the values of each field of that name,
/// obs-folds made spaces, joined as one list (RFC 9110, 5.3), so that a field sent
/// twice is not read as its first; `None` when no such field holds a value.
fn field(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    let values: Vec<_> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| {
            String::from_utf8_lossy(h.value)
                .replace(['\r', '\n'], " ")
                .trim()
                .to_owned()
        })
        .filter(|value| !value.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The data of a chunked body's complete chunks.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(httparse::Status::Complete((start, size))) = httparse::parse_chunk_size(raw) {
        let data = &raw[start..];
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size == 0 || data.len() < size {
            body.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        body.extend_from_slice(&data[..size]);
        raw = data.get(size + 2..).unwrap_or_default();
    }
    body
}

/// A body (or a header's value) as one line of text for an error: secrets hidden,
/// control characters and runs of white space made one space, at most
/// `MAX_REFUSAL_TEXT` characters.
fn quote_body(body: &[u8], secrets: &[String]) -> String {
    let text = hide(&String::from_utf8_lossy(body), secrets);
    let line = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match line.char_indices().nth(MAX_REFUSAL_TEXT) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// `text` with each of `secrets` shown as `***`.
fn hide(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "***");
        }
    }
    text
}

/// Opens WebSocket connections for one client (its subprotocol and trusted roots).
#[derive(Clone)]
pub(crate) struct Connector {
    protocol: Protocol,
    extra_ca_pem: Arc<Vec<Vec<u8>>>,
    user_agent: Option<Arc<str>>,
    proxy: ProxySetting,
    config: WebSocketConfig,
    /// The TLS configuration once built: held for the client's life, so its
    /// reconnections share it (and its TLS session tickets) with the client's other
    /// connections and with the other clients trusting the same CAs.
    tls: Arc<OnceLock<Arc<rustls::ClientConfig>>>,
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
            tls: Arc::default(),
        }
    }

    /// Connects to a `ws://` or `wss://` URL and performs the upgrade. `waiting_for` is
    /// kept naming the step in progress (the TCP connection, a proxy's answer, the TLS
    /// handshake, the upgrade's answer), for an error should the caller's timeout end
    /// the attempt.
    pub(crate) async fn connect(&self, url: &str, waiting_for: &mut String) -> Result<Ws, Error> {
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
        *waiting_for = match &proxy {
            Some(proxy) => format!("the TCP connection to proxy {}:{}", proxy.host, proxy.port),
            None => format!("the TCP connection to {host}:{port}"),
        };
        let mut tcp = match &proxy {
            Some(proxy) => connect_tcp(&proxy.host, proxy.port).await.map_err(|e| {
                Error::Connect(format!(
                    "TCP connect to proxy {}:{}: {e}",
                    proxy.host, proxy.port
                ))
            })?,
            None => connect_tcp(bare_host, port)
                .await
                .map_err(|e| Error::Connect(format!("TCP connect to {host}:{port}: {e}")))?,
        };
        let _ = tcp.set_nodelay(true);
        if let Some(proxy) = proxy {
            *waiting_for = format!(
                "proxy {}:{} to answer CONNECT to {host}:{port}",
                proxy.host, proxy.port
            );
            proxy.tunnel(&mut tcp, &format!("{host}:{port}")).await?;
        }
        let stream = if tls {
            *waiting_for = format!("the TLS handshake with {host}:{port}");
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
                            Some(inner) => {
                                format!("handshake with {host}:{port}: {inner}{}", tls_hint(inner))
                            }
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
        // `ws://host?q` has an empty path, which `Uri` keeps: the request's is `/?q`. A
        // request target is ASCII (RFC 9112, 3.2), and `Uri` lets other bytes through:
        // they are percent-encoded, as browsers do.
        let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
        let slash = if pq.starts_with('/') { "" } else { "/" };
        let target = format!("{slash}{}", percent_encode(pq, |b| b.is_ascii()));
        *waiting_for = format!("{host}:{port} to answer the WebSocket upgrade");
        self.upgrade(stream, &host_header, &format!("{host}:{port}"), &target)
            .await
    }

    /// Upgrades to WebSocket at `target` on `host` (the `Host` header; `peer` names the
    /// server in errors).
    async fn upgrade(
        &self,
        mut stream: Stream,
        host: &str,
        peer: &str,
        target: &str,
    ) -> Result<Ws, Error> {
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
        let during = format!("WebSocket upgrade with {peer}");
        let io_error = |e: io::Error| Error::Connect(format!("{during}: {e}"));
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(io_error)?;
        stream.flush().await.map_err(io_error)?;
        let mut buf = Vec::with_capacity(1024);
        let head_len = read_response_head(&mut stream, &mut buf, &during).await?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        parse_response(&mut response, &buf)
            .map_err(|e| Error::Connect(format!("{during}: malformed HTTP response: {e}")))?;
        if response.code != Some(101) {
            let refusal = describe_refusal(&mut stream, buf, &url_secrets(target)).await;
            return Err(Error::Connect(format!(
                "{peer} answered the WebSocket upgrade with {refusal}"
            )));
        }
        let header = |name: &str| field(response.headers, name);
        if !header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            return Err(Error::Connect(format!(
                "{peer}: the server did not upgrade to WebSocket"
            )));
        }
        if !header("Connection").is_some_and(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        }) {
            return Err(Error::Connect(format!(
                "{peer}: the server's answer lacks Connection: upgrade (RFC 6455)"
            )));
        }
        if header("Sec-WebSocket-Accept").as_deref()
            != Some(derive_accept_key(key.as_bytes()).as_str())
        {
            return Err(Error::Connect(format!(
                "{peer}: the server's Sec-WebSocket-Accept does not match"
            )));
        }
        let name = self.protocol.name();
        match header("Sec-WebSocket-Protocol") {
            Some(chosen) if chosen == name => {}
            Some(chosen) => {
                return Err(Error::Connect(format!(
                    "{peer}: the server chose the subprotocol {chosen:?}, not {name}"
                )))
            }
            None => {
                return Err(Error::Connect(format!(
                    "{peer}: the server did not accept the subprotocol {name} \
                     (not a Web PubSub client endpoint?)"
                )))
            }
        }
        // None is offered: one the server applies anyway would alter the frames
        // (RFC 6455, 4.1).
        if let Some(extensions) = header("Sec-WebSocket-Extensions") {
            return Err(Error::Connect(format!(
                "{peer}: the server chose the extension {extensions:?}, which the client \
                 did not offer"
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
        if let Some(config) = self.tls.get() {
            return Ok(config.clone());
        }
        let config = tls_config(&self.extra_ca_pem).map_err(Error::Tls)?;
        Ok(self.tls.get_or_init(|| config).clone())
    }
}

/// `value` with each byte that `keep` refuses percent-encoded (`%XX`).
pub(crate) fn percent_encode(value: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if keep(byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What a user may do about a failed TLS handshake, for the cases a message alone does
/// not make plain; "" for the others.
fn tls_hint(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            " (the server's certificate is self-signed or from a CA this client does not \
             trust: add that CA as an extra CA)"
        }
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            " (the server does not speak TLS: a ws:// endpoint?)"
        }
        // The verifier's own error, which rustls carries without a type of its own.
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
            if other.to_string() == "CaUsedAsEndEntity" =>
        {
            " (the server presents a CA's certificate as its own: it needs a certificate \
             issued by that CA)"
        }
        _ => "",
    }
}

/// The TLS configuration for a set of extra CAs, shared by every client with the same
/// set while one of them holds it (a root store is too big to copy per client). The
/// sets no client holds any more are forgotten: a process that goes through many CA
/// sets keeps only those of its clients.
fn tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let configs = || TLS_CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    let shared = configs().get(extra_ca_pem).and_then(Weak::upgrade);
    if let Some(config) = shared {
        return Ok(config);
    }
    let config = build_tls_config(extra_ca_pem)?;
    let mut configs = configs();
    configs.retain(|_, config| config.strong_count() > 0);
    configs.insert(extra_ca_pem.to_vec(), Arc::downgrade(&config));
    Ok(config)
}

/// The TLS configurations of [`tls_config`], by set of extra CAs.
static TLS_CONFIGS: LazyLock<Mutex<TlsConfigs>> = LazyLock::new(Mutex::default);

/// A TLS configuration by set of extra CAs, while a client holds it.
type TlsConfigs = HashMap<Vec<Vec<u8>>, Weak<rustls::ClientConfig>>;

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

/// The platform's trusted roots, loaded once per process; an error, not kept (the next
/// connection loads them again), when the process had no file descriptor to read them.
fn platform_roots() -> Result<&'static RootCertStore, String> {
    static ROOTS: TryOnce<RootCertStore> = TryOnce::new();
    ROOTS.get_or_try_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let shortage = found.errors.iter().find(|error| match &error.kind {
            rustls_native_certs::ErrorKind::Io { inner, .. } => out_of_descriptors(inner),
            _ => false,
        });
        if let Some(error) = shortage {
            return Err(format!(
                "cannot load the platform's root certificates: {error}"
            ));
        }
        for error in &found.errors {
            log::warn!("loading platform root certificates: {error}");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        log::debug!("loaded {added} platform root certificates ({ignored} unusable)");
        Ok(roots)
    })
}

fn build_tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = platform_roots()?.clone();
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
        assert_eq!(
            redact_url("ws://me:p@ss:w@h:1/a?access_token=t"),
            "ws://me:***@h:1/a?access_token=***"
        );
        assert_eq!(redact_url("ws://me@h/a"), "ws://me@h/a");
        assert_eq!(redact_url("ws://h/a?x=u:p@h"), "ws://h/a?x=u:p@h");
    }

    /// A set of one extra CA: a new self-signed certificate.
    fn extra_ca() -> Vec<Vec<u8>> {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        vec![ca.cert.pem().into_bytes()]
    }

    #[test]
    fn tls_configurations_no_client_holds_are_forgotten() {
        let (kept, dropped) = (extra_ca(), extra_ca());
        let config = tls_config(&kept).unwrap();
        assert!(Arc::ptr_eq(&config, &tls_config(&kept).unwrap()));
        drop(tls_config(&dropped).unwrap());
        let _later = tls_config(&extra_ca()).unwrap();
        let configs = TLS_CONFIGS.lock().unwrap();
        assert!(configs.contains_key(&kept));
        assert!(!configs.contains_key(&dropped));
    }

    #[test]
    fn a_client_keeps_its_tls_configuration_between_connections() {
        let connector = Connector::new(&ClientOptions {
            extra_ca_pem: extra_ca(),
            ..ClientOptions::default()
        });
        let config = Arc::downgrade(&connector.tls_config().unwrap());
        assert!(config.upgrade().is_some(), "the client let it go");
    }

    /// A loopback address whose connects hang, as to a host that drops packets: a
    /// listener that never accepts, its accept queue filled (a full queue drops SYNs).
    async fn unanswering() -> (tokio::net::TcpListener, SocketAddr, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(tcp) => queued.push(tcp.unwrap()),
                Err(_) => return (listener, addr, queued),
            }
        }
        panic!("16 connects to a listener that never accepts were all answered");
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_hold_up_the_next() {
        let (_full, hanging, _queued) = unanswering().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        let started = std::time::Instant::now();
        let tcp = tokio::time::timeout(Duration::from_secs(5), connect_first([hanging, good]))
            .await
            .expect("connected within 5 s")
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn every_address_is_tried_in_order_and_every_failure_named() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v4 = listener.local_addr().unwrap();
        // The same port on ::1, where nothing listens: refused, as for `localhost`
        // resolving to ::1 first with a server on 127.0.0.1 only.
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v4.port()));
        let tcp = connect_first([v6, v4]).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), v4);
        drop(listener);
        let error = connect_first([v6, v4]).await.unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("{v6}: ")) && text.contains(&format!("; {v4}: ")),
            "{text}"
        );
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn bad_extra_ca_is_a_clear_error() {
        let err = build_tls_config(&[b"not a pem".to_vec()]).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }
}
