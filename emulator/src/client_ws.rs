//! The client endpoint `/client/hubs/{hub}`: authentication, subprotocol choice,
//! recovery, and the per-socket reader and writer tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::header::{HOST, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tungstenite::error::ProtocolError;
use tungstenite::protocol::WebSocketConfig;

use crate::auth::{self, Permission};
use crate::frames::{self, Payload, Publication};
use crate::hub::{
    new_connection_id, Conn, Hub, Protocol, Server, Stats, JSON_RELIABLE_V1, JSON_V1, LOST,
    POLICY_CLOSE,
};
use crate::names::{validate_group, validate_hub};
use crate::outbound::{Out, Outbound, SocketHandle};
use crate::upstream::{self, Accepted, OwedDisconnected, Target};

/// Close reason of a failed recovery (the official clients look for close code 1008).
pub(crate) const NOT_RECOVERABLE: &str = "The connection could not be recovered.";
/// Events queued to the upstream per socket, and invocations pending per connection,
/// before more fail with InternalServerError.
const MAX_PENDING_UPSTREAM: usize = 1000;
/// Frames written per flush at most.
const WRITE_BATCH: usize = 256;
/// How long the writer waits for the client's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The same wait when the whole server shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// A plain-text error response.
pub(crate) fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// Client kinds the service serves under `/clients/{kind}/hubs/{hub}`, and the emulator
/// does not.
const OTHER_CLIENT_KINDS: [&str; 2] = ["mqtt", "socketio"];

/// `/clients` and anything under it. The service serves MQTT clients at
/// `/clients/mqtt/hubs/{hub}` and Socket.IO clients at `/clients/socketio/hubs/{hub}`
/// (the Socket.IO client adds a `/` and its own path after it): 501, as the emulator
/// serves neither, whatever the hub. Any other path there names nothing: 404. The path
/// is read as it was sent, each segment percent-decoded for the comparisons only, so an
/// encoded `/` separates no segments.
pub(crate) async fn other_client_endpoint(uri: Uri) -> Response {
    let path = uri.path();
    let rest = path.strip_prefix("/clients/").unwrap_or_default();
    let mut segments = rest
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy());
    let kind = segments.next().unwrap_or_default();
    let served = OTHER_CLIENT_KINDS
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(&kind))
        .filter(|_| {
            segments
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("hubs"))
                && segments.next().is_some_and(|hub| !hub.is_empty())
        });
    match served {
        Some(kind) => error_response(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "'{kind}' clients are not supported by the emulator: it serves Web PubSub \
                 clients at /client/hubs/{{hub}} only."
            ),
        ),
        None => error_response(
            StatusCode::NOT_FOUND,
            format!(
                "No client endpoint at {path}: the service serves MQTT clients at \
                 /clients/mqtt/hubs/{{hub}} and Socket.IO clients at \
                 /clients/socketio/hubs/{{hub}} (the emulator neither), and Web PubSub \
                 clients at /client/hubs/{{hub}}."
            ),
        ),
    }
}

/// Any other path under `/client/` (`/client/hubs` without a hub among them): 404, in
/// plain text as the other client endpoint errors, naming the path as sent.
pub(crate) async fn no_client_endpoint(uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!(
            "No client endpoint at {}: Web PubSub clients connect at /client/hubs/{{hub}} or \
             /client?hub={{hub}}.",
            uri.path()
        ),
    )
}

/// The access token from `access_token` or `Authorization: Bearer`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

enum Session {
    /// A new connection for the hub of that name, with its initial groups and the
    /// `disconnected` owed when the upstream accepted its `connect`.
    New(String, Arc<Conn>, Vec<String>, Option<OwedDisconnected>),
    Recover(Arc<Hub>, Arc<Conn>),
    Unrecoverable,
}

/// `GET /client/hubs/{hub}` with a WebSocket upgrade.
pub(crate) async fn client_endpoint(
    State(server): State<Arc<Server>>,
    Path(hub_name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    open(server, hub_name, query, uri, headers, ws).await
}

/// `GET /client?hub={hub}` (or `/client/?hub={hub}`), the service's other client
/// endpoint: the same as `/client/hubs/{hub}`.
pub(crate) async fn client_endpoint_by_query(
    State(server): State<Arc<Server>>,
    Query(query): Query<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(hub_name) = query.get("hub").cloned() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "No hub: connect to /client/hubs/{hub} or /client?hub={hub}.",
        );
    };
    open(server, hub_name, query, uri, headers, ws).await
}

/// A client's upgrade request for hub `hub_name`.
async fn open(
    server: Arc<Server>,
    hub_name: String,
    query: HashMap<String, String>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(e) = validate_hub(&hub_name) {
        return error_response(StatusCode::BAD_REQUEST, e);
    }
    let recovering = query.contains_key("awps_connection_id");
    let token = query
        .get("access_token")
        .cloned()
        .or_else(|| bearer(&headers));
    // A recovery is authenticated by its reconnection token (the documented recovery URL
    // has no access token); one it carries anyway must still be genuine.
    if token.is_none() && !recovering {
        return error_response(StatusCode::UNAUTHORIZED, "Unauthorized: no access token.");
    }
    let claims = match token
        .map(|t| auth::verify(&server.access_key, &t, !recovering))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, format!("Unauthorized: {e}.")),
    };
    let path = format!("/client/hubs/{hub_name}");
    if let Some(claims) = claims.as_ref().filter(|c| {
        !c.audiences
            .iter()
            .any(|a| auth::audience_matches(a, &path, &server.config.host, server.port))
    }) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            format!(
                "Unauthorized: {}.",
                auth::AuthError::WrongAudience(claims.audiences.join(","))
            ),
        );
    }
    let mut ws = match ws {
        Ok(ws) => ws,
        // RFC 6455 4.2.2: refuse, naming the version this server speaks.
        Err(WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)) => {
            let mut response = error_response(
                StatusCode::UPGRADE_REQUIRED,
                "Unsupported WebSocket version: the Sec-WebSocket-Version header must be 13.",
            );
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return response;
        }
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("Expected a WebSocket upgrade: {e}"),
            )
        }
    };
    // RFC 6455 4.2.1: the key is a random 16-byte value in base64 (the upgrade only
    // checks that there is one).
    let key = headers.get(SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes);
    if !key.is_some_and(|k| STANDARD.decode(k).is_ok_and(|k| k.len() == 16)) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Invalid Sec-WebSocket-Key header: it must be the base64 of 16 bytes.",
        );
    }
    // RFC 6455 4.2.1, as RFC 9112 3.2 asks of every HTTP/1.1 request.
    if !headers.contains_key(HOST) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "Missing Host header: a WebSocket upgrade must name the host.",
        );
    }
    // In the client's order (the upgrade's own list is sorted).
    let requested: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    // The reliable protocol when both are offered.
    let known = [JSON_RELIABLE_V1, JSON_V1]
        .into_iter()
        .find(|p| requested.iter().any(|r| r == p))
        .map(str::to_owned);
    // The upstream's connect reply may choose a subprotocol of its own.
    let asks_upstream =
        !recovering && server.upstream.is_some() && server.config.upstream_system_events.connect;
    if known.is_none() && !requested.is_empty() && !asks_upstream {
        return unsupported(&requested);
    }
    let (session, selected) = if recovering {
        let protocol = Protocol::of(known.as_deref());
        let id = query
            .get("awps_connection_id")
            .map(String::as_str)
            .unwrap_or("");
        let token = query
            .get("awps_reconnection_token")
            .map(String::as_str)
            .unwrap_or("");
        // Only an existing hub: a recovery may carry no token to vouch for the name.
        let found = server.existing_hub(&hub_name).and_then(|hub| {
            let conn = hub.connections.get(id).map(|c| c.clone())?;
            Some((conn, hub))
        });
        let session = match found {
            Some((c, hub))
                if protocol.is_reliable()
                    && c.protocol == protocol
                    && c.reconnection_token == token
                    && !c.is_closed() =>
            {
                Session::Recover(hub, c)
            }
            _ => Session::Unrecoverable,
        };
        (session, known)
    } else {
        // Sessions waiting for a recovery hold their slots: they come back without asking.
        // Taken now, the slot is the connection's until it is forgotten; if the upgrade
        // never completes, it is given back with the dropped session.
        let Some(slot) = server.slots.take() else {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Too many connections: the limit is {}.",
                    server.config.max_connections
                ),
            );
        };
        let claims = claims.unwrap_or_default();
        let mut opening = Opening {
            id: new_connection_id(),
            user_id: claims.user_id.clone(),
            roles: claims.roles.clone(),
            groups: claims.groups.clone(),
            state: String::new(),
            subprotocol: known,
        };
        let mut owed = None;
        if asks_upstream {
            let body = upstream::connect_body(
                &claims.payload,
                uri.query().unwrap_or(""),
                &headers,
                &requested,
            );
            // A task of its own: if the client goes before the answer, the exchange
            // still ends, and an accepted `connect` still gets its `disconnected`.
            let asked = server.tasks.spawn(opening.ask_upstream(
                server.clone(),
                hub_name.clone(),
                body,
                requested.clone(),
            ));
            let (answered, accepted) = match asked.await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(refused)) => return refused,
                Err(e) => {
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("The upstream connect event failed: {e}."),
                    )
                }
            };
            opening = answered;
            owed = Some(accepted);
            if opening.subprotocol.is_none() && !requested.is_empty() {
                return unsupported(&requested);
            }
        }
        let conn = Conn::new(
            &server,
            opening.id,
            opening.user_id,
            opening.subprotocol.clone(),
            opening.roles,
            Some(slot),
        );
        *conn.upstream_state.lock() = opening.state;
        let groups: Vec<String> = opening
            .groups
            .into_iter()
            .filter(|g| validate_group(g).is_ok())
            .collect();
        (
            Session::New(hub_name, conn, groups, owed),
            opening.subprotocol,
        )
    };
    if let Some(name) = selected {
        ws.set_selected_protocol(
            HeaderValue::from_str(&name).expect("a name taken from the client's header"),
        );
    }
    let max = server.config.max_frame_bytes;
    let tasks = server.tasks.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        // `Config::read_buffer_bytes`, not tungstenite's 128 KiB: it is zeroed by the
        // socket's first read and held for its life. Larger frames are still read whole
        // (the buffer grows for them). The write buffer keeps its default threshold, and
        // holds at most the outbound queue's bytes past it (at least one: tungstenite
        // panics on a maximum that is not above the threshold): the writer puts in a
        // frame only once the buffer is written out, but tungstenite queues a pong for
        // each ping by itself, without bound for a peer that pings and reads nothing.
        .read_buffer_size(server.config.read_buffer_bytes)
        .max_write_buffer_size(
            WebSocketConfig::default()
                .write_buffer_size
                .saturating_add(server.config.max_outbound_bytes.max(1)),
        )
        .on_upgrade(move |socket| {
            tasks.track_future(async move { run_session(server, session, socket).await })
        })
}

/// The answer to a handshake whose subprotocols cannot be served.
fn unsupported(requested: &[String]) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        format!(
            "Unsupported subprotocol(s) {requested:?}: this server speaks {JSON_V1} and {JSON_RELIABLE_V1}, or none."
        ),
    )
}

/// What a new connection opens with: from its token, then changed by the upstream's
/// `connect` reply.
struct Opening {
    id: String,
    user_id: Option<String>,
    roles: Vec<String>,
    groups: Vec<String>,
    /// The upstream's state for it (empty: none).
    state: String,
    /// The subprotocol answered in the handshake.
    subprotocol: Option<String>,
}

impl Opening {
    /// Posts the `connect` event and applies the reply: its user id replaces the
    /// token's, its roles and groups are added, its subprotocol (one the client offered)
    /// is chosen, its `ce-connectionState` kept. Ok: the opening so changed, and the
    /// `disconnected` now owed. Err: the answer refusing the handshake.
    async fn ask_upstream(
        mut self,
        server: Arc<Server>,
        hub: String,
        body: serde_json::Value,
        offered: Vec<String>,
    ) -> Result<(Opening, OwedDisconnected), Response> {
        let up = server
            .upstream
            .as_ref()
            .expect("asked only with an upstream");
        let target = Target {
            hub: &hub,
            connection_id: &self.id,
            user_id: self.user_id.as_deref(),
            state: String::new(),
            subprotocol: None,
        };
        let answer = tokio::select! {
            answer = up.connect(&server, &target, &body) => answer,
            _ = server.shutdown.cancelled() => {
                return Err(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The emulator is shutting down.",
                ))
            }
        };
        let Accepted { reply, state } = answer.map_err(|refused| {
            let mut response = (refused.status, refused.body).into_response();
            if let Some(value) = refused
                .content_type
                .and_then(|c| HeaderValue::from_str(&c).ok())
            {
                response.headers_mut().insert("content-type", value);
            }
            response
        })?;
        if let Some(chosen) = reply.subprotocol.filter(|p| !p.is_empty()) {
            if !offered.contains(&chosen) {
                Stats::inc(&server.stats.upstream_errors);
                return Err(error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "The upstream connect event failed: it chose subprotocol '{chosen}', which the client did not offer ({offered:?})."
                    ),
                ));
            }
            self.subprotocol = Some(chosen);
        }
        if let Some(user) = reply.user_id.filter(|u| !u.is_empty()) {
            self.user_id = Some(user);
        }
        self.roles.extend(reply.roles.unwrap_or_default());
        self.groups.extend(reply.groups.unwrap_or_default());
        self.state = state.unwrap_or_default();
        let owed = OwedDisconnected::new(
            server.clone(),
            &hub,
            &self.id,
            self.user_id.as_deref(),
            &self.state,
            self.subprotocol.as_deref(),
        );
        Ok((self, owed))
    }
}

async fn run_session(server: Arc<Server>, session: Session, mut socket: WebSocket) {
    let (hub, conn, epoch, rx, kill) = match session {
        Session::Unrecoverable => {
            Stats::inc(&server.stats.failed_recoveries);
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: POLICY_CLOSE,
                    reason: NOT_RECOVERABLE.into(),
                })))
                .await;
            let drain = async { while let Some(Ok(_)) = socket.recv().await {} };
            tokio::select! {
                _ = tokio::time::timeout(CLOSE_GRACE, drain) => {}
                _ = server.shutdown.cancelled() => {}
            }
            return;
        }
        Session::New(hub_name, conn, groups, owed) => {
            let (handle, rx, kill) = SocketHandle::new(&server.config);
            let connected = (conn.protocol != Protocol::Simple).then(|| {
                frames::connected(
                    conn.user_id.as_deref(),
                    &conn.id,
                    conn.protocol
                        .is_reliable()
                        .then_some(conn.reconnection_token.as_str()),
                )
            });
            let Some(epoch) = conn.attach(handle, connected) else {
                return;
            };
            let hub = server.with_hub(&hub_name, |hub| {
                hub.register(&conn, &groups);
                hub.clone()
            });
            Stats::inc(&server.stats.connections_opened);
            if let Some(owed) = owed {
                owed.opened();
            }
            if let Some(up) = &server.upstream {
                up.system_event(&server, &Target::of(&hub.name, &conn), "connected", None);
            }
            (hub, conn, epoch, rx, kill)
        }
        Session::Recover(hub, conn) => {
            let (handle, rx, kill) = SocketHandle::new(&server.config);
            let connected = Some(frames::connected(
                conn.user_id.as_deref(),
                &conn.id,
                Some(conn.reconnection_token.as_str()),
            ));
            let Some(epoch) = conn.attach(handle, connected) else {
                return;
            };
            Stats::inc(&server.stats.recoveries);
            (hub, conn, epoch, rx, kill)
        }
    };
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        kill.clone(),
        server.shutdown.clone(),
        server.clone(),
    ));
    let mut reader = Reader {
        server: server.clone(),
        hub: hub.clone(),
        conn: conn.clone(),
        upstream_tx: None,
    };
    // One reader per connection at a time: after a recovery the old socket's reader may
    // still be handling a frame, and the client resends it on the new socket; handled
    // concurrently, two frames of one client could be published out of order.
    let (end, stream) = {
        let _one_reader = conn.reading.lock().await;
        reader.run(stream, &kill).await
    };
    if end != End::ServerClosing {
        kill.cancel();
    }
    if let Ok(sink) = writer.await {
        if matches!(end, End::ClientClosed { .. }) {
            // Send the close reply tungstenite queued for the client's close frame.
            if let Ok(mut ws) = stream.reunite(sink) {
                let _ = tokio::time::timeout(CLOSE_GRACE, ws.close()).await;
            }
        }
    }
    let why = end.reason();
    let end = match end {
        End::ClientClosed { normal: true, .. } => End::Closed,
        End::ClientClosed { normal: false, .. } => End::Abrupt,
        other => other,
    };
    let Some(away) = conn.detach(epoch) else {
        return; // a recovery attached a newer socket
    };
    let recoverable = conn.protocol.is_reliable() && end == End::Abrupt && !conn.is_closed();
    if !recoverable {
        hub.remove(&conn, why.as_deref());
        return;
    }
    let window = server.config.recovery_window;
    let shutdown = server.shutdown.clone();
    server.tasks.spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(window) => {}
            _ = shutdown.cancelled() => {}
            _ = away.cancelled() => return, // recovered or forgotten
        }
        if conn.detached_since(epoch) {
            hub.remove(&conn, why.as_deref());
        }
    });
}

/// Cuts a close reason to the 123 bytes a close frame can carry.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Runs one write to a socket, or gives it up: at once when the socket is killed, and
/// once the session is closing (its close queued, or the server shutting down) when the
/// peer has not taken it within the grace, so that a peer that does not read cannot
/// hold the socket forever. The write is polled first: one the socket takes at once
/// registers no waiter on the tokens (the per-frame path).
async fn bounded<T>(
    write: impl std::future::Future<Output = T>,
    kill: &CancellationToken,
    closing: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<T> {
    tokio::select! {
        biased;
        out = write => Some(out),
        _ = kill.cancelled() => None,
        _ = async {
            closing.cancelled().await;
            tokio::time::sleep(CLOSE_GRACE).await;
        } => None,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => None,
    }
}

/// Writes queued frames in batches; returns the sink for a final close handshake.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: Outbound,
    kill: CancellationToken,
    shutdown: CancellationToken,
    server: Arc<Server>,
) -> SplitSink<WebSocket, Message> {
    let closing = rx.closing.clone();
    let mut close = None;
    let mut grace = CLOSE_GRACE;
    'outer: loop {
        let first = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            _ = shutdown.cancelled() => {
                close = Some((1001, "The emulator is shutting down.".to_owned()));
                grace = SHUTDOWN_GRACE;
                break;
            }
            out = rx.recv() => out,
        };
        let mut next = first;
        let mut written = 0u64;
        while let Some(out) = next.take() {
            match out {
                Out::Frame(m) => {
                    let fed = bounded(sink.feed(m), &kill, &closing, &shutdown).await;
                    if !matches!(fed, Some(Ok(()))) {
                        break 'outer;
                    }
                    written += 1;
                }
                Out::Close(code, reason) => {
                    close = Some((code, reason));
                    break;
                }
            }
            if written < WRITE_BATCH as u64 {
                next = rx.try_recv();
            }
        }
        server
            .stats
            .frames_out
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        let flushed = bounded(sink.flush(), &kill, &closing, &shutdown).await;
        if !matches!(flushed, Some(Ok(()))) || close.is_some() {
            break;
        }
        if written == 0 {
            break; // channel closed: the socket was detached
        }
    }
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(&reason).into(),
        }));
        let sent = bounded(sink.send(frame), &kill, &closing, &shutdown).await;
        if matches!(sent, Some(Ok(()))) {
            tokio::select! {
                _ = tokio::time::timeout(grace, kill.cancelled()) => {}
                _ = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {}
            }
        }
    }
    kill.cancel();
    sink
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Socket lost without a close handshake: a reliable session stays recoverable.
    Abrupt,
    /// Closed by the client or the server on purpose.
    Closed,
    /// The client sent a close frame: reply; a normal code (1000, 1001, none) ends the
    /// session, any other keeps a reliable one recoverable.
    ClientClosed { normal: bool, reason: String },
    /// The server queued a close but can read no more: let the writer finish it.
    ServerClosing,
}

impl End {
    /// Why the connection ended, if it ends here: the client's close reason, or that the
    /// socket was lost. None for a close without a reason, and for a close by the
    /// server (which gave its reason when it closed).
    fn reason(&self) -> Option<String> {
        match self {
            End::ClientClosed { reason, .. } if !reason.is_empty() => Some(reason.clone()),
            End::Abrupt => Some(LOST.to_owned()),
            _ => None,
        }
    }

    /// The socket is gone without a close frame from the client (lost, killed, or
    /// dropped for its silence): closed if the server had queued a close, else abrupt.
    fn gone(closing: bool) -> End {
        if closing {
            End::Closed
        } else {
            End::Abrupt
        }
    }
}

/// The server's keep-alive of one socket, run by its reader: a WebSocket ping once the
/// client has sent nothing for `ping_after`, and the end of the socket once it has sent
/// nothing for `drop_after` in all. A frame only records when it came: the reader's one
/// timer is rearmed when it fires, not per frame.
struct KeepAlive {
    /// None: never pinged.
    ping_after: Option<Duration>,
    /// None: never dropped for its silence.
    drop_after: Option<Duration>,
    /// When the last frame came (or the socket was opened).
    heard: Instant,
    /// Pinged since then.
    pinged: bool,
}

/// What a client's silence calls for.
#[derive(Debug, PartialEq, Eq)]
enum Silence {
    Ping,
    Drop,
}

impl KeepAlive {
    fn new(config: &crate::Config) -> Self {
        let enabled = |d: Duration| (!d.is_zero()).then_some(d);
        KeepAlive {
            ping_after: enabled(config.keep_alive_interval),
            drop_after: enabled(config.keep_alive_timeout),
            heard: Instant::now(),
            pinged: false,
        }
    }

    /// A frame came from the client.
    fn heard(&mut self) {
        self.heard = Instant::now();
        self.pinged = false;
    }

    /// When to look at the silence again, as of `now` (None: never). Frames heard since
    /// only make a deadline later, so the timer never fires late.
    fn next_check(&self, now: Instant) -> Option<Instant> {
        let ping = match self.ping_after {
            Some(after) if self.pinged => Some(now + after), // heard again by then?
            Some(after) => Some(self.heard + after),
            None => None,
        };
        let drop = self.drop_after.map(|after| self.heard + after);
        ping.into_iter().chain(drop).min()
    }

    /// What the silence calls for at `now`; a ping is called for once per silence.
    fn check(&mut self, now: Instant) -> Option<Silence> {
        let silent = now.saturating_duration_since(self.heard);
        if self.drop_after.is_some_and(|after| silent >= after) {
            return Some(Silence::Drop);
        }
        if !self.pinged && self.ping_after.is_some_and(|after| silent >= after) {
            self.pinged = true;
            return Some(Silence::Ping);
        }
        None
    }
}

/// A JSON frame from a client. Unknown fields are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Inbound<'a> {
    #[serde(rename = "type")]
    ty: String,
    group: Option<String>,
    ack_id: Option<u64>,
    no_echo: Option<bool>,
    data_type: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    event: Option<String>,
    invocation_id: Option<String>,
    target: Option<String>,
    sequence_id: Option<u64>,
}

/// An operation's failure: the ack error name and message.
type OpError = (&'static str, String);

fn bad(message: impl Into<String>) -> OpError {
    ("BadRequest", message.into())
}

struct UpstreamJob {
    ack_id: Option<u64>,
    event: String,
    payload: Option<Payload>,
}

struct Reader {
    server: Arc<Server>,
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    upstream_tx: Option<mpsc::Sender<UpstreamJob>>,
}

impl Reader {
    async fn run(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        kill: &CancellationToken,
    ) -> (End, SplitStream<WebSocket>) {
        let end = self.read(&mut stream, kill).await;
        (end, stream)
    }

    async fn read(&mut self, stream: &mut SplitStream<WebSocket>, kill: &CancellationToken) -> End {
        // Once the server has queued a close, frames are read (for the client's close
        // reply) but ignored.
        let mut closing = false;
        let mut keep_alive = KeepAlive::new(&self.server.config);
        let first_check = keep_alive.next_check(Instant::now());
        let armed = first_check.is_some();
        let timer = tokio::time::sleep_until(first_check.unwrap_or_else(Instant::now));
        tokio::pin!(timer);
        loop {
            let item = tokio::select! {
                biased;
                _ = kill.cancelled() => return End::gone(closing),
                item = stream.next() => item,
                _ = &mut timer, if armed => {
                    let now = Instant::now();
                    if self.keep_alive(&mut keep_alive, now) == Some(Silence::Drop) {
                        return End::gone(closing);
                    }
                    if let Some(at) = keep_alive.next_check(now) {
                        timer.as_mut().reset(at);
                    }
                    continue;
                }
            };
            keep_alive.heard();
            Stats::inc(&self.server.stats.frames_in);
            let message = match item {
                None => return End::gone(closing),
                Some(Err(e)) => {
                    if closing {
                        return End::Closed;
                    }
                    let Some((code, reason)) = self.failure(e) else {
                        return End::Abrupt;
                    };
                    self.reject(code, &reason);
                    return End::ServerClosing;
                }
                Some(Ok(Message::Close(frame))) => {
                    if closing {
                        return End::Closed;
                    }
                    return End::ClientClosed {
                        normal: frame.as_ref().is_none_or(|f| matches!(f.code, 1000 | 1001)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    };
                }
                Some(Ok(m)) => m,
            };
            // Closed by the server (bad input here, a REST close, an overflow): the
            // session is gone, and what its socket still carries is not handled.
            if closing || self.conn.is_closed() {
                continue;
            }
            match message {
                Message::Text(text) => {
                    if self.conn.protocol == Protocol::Simple {
                        self.simple_event(Payload::Text(text.as_str().to_owned()));
                    } else if let Err(reason) = self.handle_json(text.as_str()) {
                        self.reject(1003, &reason);
                        closing = true;
                    }
                }
                Message::Binary(bytes) => {
                    if self.conn.protocol == Protocol::Simple {
                        self.simple_event(Payload::Binary(bytes));
                    } else {
                        self.reject(
                            1003,
                            "Binary frames are not supported by the JSON subprotocols.",
                        );
                        closing = true;
                    }
                }
                Message::Ping(_) | Message::Pong(_) | Message::Close(_) => {}
            }
        }
    }

    /// Acts on the client's silence at `now`: pings it, or counts its drop (the caller
    /// ends the socket, as an abrupt loss).
    fn keep_alive(&self, keep_alive: &mut KeepAlive, now: Instant) -> Option<Silence> {
        let silence = keep_alive.check(now);
        match silence {
            Some(Silence::Ping) => self.conn.send_control(Message::Ping(Bytes::new())),
            Some(Silence::Drop) => {
                Stats::inc(&self.server.stats.keep_alive_drops);
                tracing::info!(
                    connection = %self.conn.id,
                    "dropped: the client has sent nothing for {:?}",
                    keep_alive.drop_after.unwrap_or_default()
                );
            }
            None => {}
        }
        silence
    }

    /// The close code and reason with which a read error fails the connection (RFC 6455
    /// 7.1.7, 7.4.1); None when the socket was lost, not misused.
    fn failure(&self, e: axum::Error) -> Option<(u16, String)> {
        let e = e.into_inner().downcast::<tungstenite::Error>().ok()?;
        match *e {
            tungstenite::Error::Capacity(_) => Some((
                1009,
                format!(
                    "Frame too large: the limit is {} bytes.",
                    self.server.config.max_frame_bytes
                ),
            )),
            tungstenite::Error::Utf8(_) => Some((
                1007,
                "Invalid frame: a text frame is not valid UTF-8.".to_owned(),
            )),
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
            tungstenite::Error::Protocol(e) => Some((1002, format!("Protocol error: {e}."))),
            _ => None,
        }
    }

    /// Ends the session because of bad input: `disconnected` with the reason, then a
    /// close frame with `code`.
    fn reject(&self, code: u16, reason: &str) {
        Stats::inc(&self.server.stats.bad_frames);
        tracing::info!(connection = %self.conn.id, "closing: {reason}");
        self.hub.close(&self.conn, code, reason);
    }

    /// Posts a simple client's frame as a `message` event. Without an upstream to take
    /// it the connection is dropped, as the service documents; code 1000 is what a user
    /// saw the service send (Azure/azure-webpubsub#432).
    fn simple_event(&mut self, payload: Payload) {
        if self.server.upstream.is_none() {
            self.hub.close(
                &self.conn,
                1000,
                "No upstream is configured to receive a simple client's messages (start the \
                 emulator with --upstream URL).",
            );
            return;
        }
        self.queue_upstream(UpstreamJob {
            ack_id: None,
            event: "message".into(),
            payload: Some(payload),
        });
    }

    /// Handles one JSON frame. Err = the session must be closed with that reason.
    fn handle_json(&mut self, text: &str) -> Result<(), String> {
        let frame: Inbound = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                // Still answer with an ack when an ackId can be found. The values stay
                // raw: parsed into a tree, one nested deeper than serde_json's recursion
                // limit would hide the ackId.
                let ack_id = serde_json::from_str::<HashMap<String, &RawValue>>(text)
                    .ok()
                    .and_then(|fields| {
                        serde_json::from_str::<u64>(fields.get("ackId")?.get()).ok()
                    });
                return match ack_id {
                    Some(id) => {
                        Stats::inc(&self.server.stats.bad_frames);
                        self.conn.send_ack(frames::ack(
                            id,
                            Some(("BadRequest", &format!("Invalid frame: {e}"))),
                        ));
                        Ok(())
                    }
                    None => Err(format!("Invalid frame: {e}")),
                };
            }
        };
        match frame.ty.as_str() {
            "ping" => {
                self.conn.send_control(frames::pong());
                Ok(())
            }
            "sequenceAck" => match frame.sequence_id {
                Some(seq) => {
                    self.conn.sequence_ack(seq);
                    Ok(())
                }
                None => Err("Invalid sequenceAck frame: no sequenceId.".into()),
            },
            "invoke" => self.invoke(frame),
            "cancelInvocation" => {
                if let Some(id) = frame.invocation_id {
                    if let Some(h) = self.conn.invocations.lock().remove(&id) {
                        h.abort();
                    }
                }
                Ok(())
            }
            "joinGroup" | "leaveGroup" | "sendToGroup" | "event" => {
                if let Some(id) = frame.ack_id {
                    if !self.conn.acks.lock().insert(id) {
                        // The service's own text (its reliable-clients guide).
                        let message = format!("Message with ack-id: {id} has been processed");
                        self.conn
                            .send_ack(frames::ack(id, Some(("Duplicate", &message))));
                        return Ok(());
                    }
                }
                let ack_id = frame.ack_id;
                match self.operation(frame) {
                    Ok(false) => Ok(()), // the ack comes later (upstream)
                    Ok(true) => {
                        if let Some(id) = ack_id {
                            self.conn.send_ack(frames::ack(id, None));
                        }
                        Ok(())
                    }
                    Err((name, message)) => match ack_id {
                        Some(id) => {
                            self.conn.acks.lock().forget(id);
                            self.conn.send_ack(frames::ack(id, Some((name, &message))));
                            Ok(())
                        }
                        None if name == "BadRequest" => Err(message),
                        None => Ok(()),
                    },
                }
            }
            other => {
                Stats::inc(&self.server.stats.bad_frames);
                if let Some(id) = frame.ack_id {
                    self.conn.send_ack(frames::ack(
                        id,
                        Some(("BadRequest", &format!("Unknown frame type '{other}'."))),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Runs an ack-able operation. Ok(true): ack now; Ok(false): acked later.
    fn operation(&mut self, frame: Inbound) -> Result<bool, OpError> {
        match frame.ty.as_str() {
            "joinGroup" | "leaveGroup" => {
                let group = frame
                    .group
                    .ok_or_else(|| bad("The frame has no 'group'."))?;
                validate_group(&group).map_err(bad)?;
                if !self.conn.allowed(Permission::JoinLeaveGroup, &group) {
                    let action = if frame.ty == "joinGroup" {
                        "join"
                    } else {
                        "leave"
                    };
                    // The service's own text (quoted in @azure/web-pubsub's README).
                    return Err((
                        "Forbidden",
                        format!("The client does not have permission to {action} group '{group}'."),
                    ));
                }
                if frame.ty == "joinGroup" {
                    if !self.hub.join(&self.conn, &group) {
                        return Err(bad(self.conn.too_many_groups()));
                    }
                } else {
                    self.hub.leave(&self.conn, &group);
                }
                Ok(true)
            }
            "sendToGroup" => {
                let group = frame
                    .group
                    .ok_or_else(|| bad("The frame has no 'group'."))?;
                validate_group(&group).map_err(bad)?;
                let payload = payload_of(frame.data_type.as_deref(), frame.data)?
                    .ok_or_else(|| bad("The frame has no 'data'."))?;
                if !self.conn.allowed(Permission::SendToGroup, &group) {
                    return Err((
                        "Forbidden",
                        format!("The client does not have permission to send to group '{group}'."),
                    ));
                }
                let publication =
                    Publication::group(&group, self.conn.user_id.as_deref(), &payload);
                let no_echo = frame.no_echo.unwrap_or(false);
                self.hub
                    .publish_group(&group, &publication, |c| !(no_echo && c.id == self.conn.id));
                Ok(true)
            }
            _ => {
                let event = frame
                    .event
                    .filter(|e| !e.is_empty())
                    .ok_or_else(|| bad("The frame has no 'event' name."))?;
                let payload = payload_of(frame.data_type.as_deref(), frame.data)?;
                if self.server.upstream.is_none() {
                    return Ok(true);
                }
                if self.queue_upstream(UpstreamJob {
                    ack_id: frame.ack_id,
                    event,
                    payload,
                }) {
                    Ok(false)
                } else {
                    Err((
                        "InternalServerError",
                        format!("Too many events waiting for the upstream (limit {MAX_PENDING_UPSTREAM})."),
                    ))
                }
            }
        }
    }

    /// Queues an event to this socket's upstream worker (events keep their order).
    fn queue_upstream(&mut self, job: UpstreamJob) -> bool {
        let tx = self.upstream_tx.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(MAX_PENDING_UPSTREAM);
            self.server.tasks.spawn(upstream_worker(
                self.server.clone(),
                self.hub.clone(),
                self.conn.clone(),
                rx,
            ));
            tx
        });
        tx.try_send(job).is_ok()
    }

    fn invoke(&mut self, frame: Inbound) -> Result<(), String> {
        let Some(id) = frame.invocation_id.filter(|i| !i.is_empty()) else {
            return Err("Invalid invoke frame: no invocationId.".into());
        };
        let fail = |conn: &Arc<Conn>, name: &str, message: &str| {
            conn.send_control(frames::invoke_response(&id, Err((name, message))));
        };
        if frame.target.as_deref().is_some_and(|t| t != "event") {
            fail(
                &self.conn,
                "BadRequest",
                "Only invoke target 'event' is supported.",
            );
            return Ok(());
        }
        let Some(event) = frame.event.filter(|e| !e.is_empty()) else {
            fail(
                &self.conn,
                "BadRequest",
                "The invoke frame has no 'event' name.",
            );
            return Ok(());
        };
        let payload = match payload_of(frame.data_type.as_deref(), frame.data) {
            Ok(p) => p,
            Err((name, message)) => {
                fail(&self.conn, name, &message);
                return Ok(());
            }
        };
        if self.server.upstream.is_none() {
            fail(
                &self.conn,
                "BadRequest",
                "No upstream server is configured: start the emulator with --upstream URL to handle invocations.",
            );
            return Ok(());
        }
        let mut pending = self.conn.invocations.lock();
        if pending.contains_key(&id) {
            drop(pending);
            fail(
                &self.conn,
                "BadRequest",
                "An invocation with this invocationId is pending.",
            );
            return Ok(());
        }
        if pending.len() >= MAX_PENDING_UPSTREAM {
            drop(pending);
            fail(
                &self.conn,
                "InternalServerError",
                &format!(
                    "Too many invocations waiting for the upstream (limit {MAX_PENDING_UPSTREAM})."
                ),
            );
            return Ok(());
        }
        let (server, hub, conn) = (self.server.clone(), self.hub.clone(), self.conn.clone());
        let invocation_id = id.clone();
        let task = self.server.tasks.spawn(async move {
            let up = server.upstream.as_ref().expect("checked above");
            let result = tokio::select! {
                r = up.user_event(&server, &hub, &conn, &event, payload.as_ref()) => r,
                _ = server.shutdown.cancelled() => return,
            };
            if conn.invocations.lock().remove(&invocation_id).is_none() {
                return; // cancelled
            }
            let msg = match &result {
                Ok(body) => frames::invoke_response(&invocation_id, Ok(body.as_ref())),
                Err(e) => frames::invoke_response(&invocation_id, Err(("InternalServerError", e))),
            };
            conn.send_control(msg);
        });
        pending.insert(id, task.abort_handle());
        Ok(())
    }
}

/// A connection without a socket whose client text frames go through the same
/// handling as on a live socket; whatever it would send is discarded. For fuzzing.
pub(crate) struct Detached {
    reader: Reader,
    rx: Outbound,
}

impl Detached {
    /// A reliable connection with every role, registered in hub `fuzz` of `server`.
    pub(crate) fn new(server: &Arc<Server>) -> Detached {
        let conn = Conn::new(
            server,
            new_connection_id(),
            Some("fuzzer".into()),
            Some(JSON_RELIABLE_V1.into()),
            vec![
                "webpubsub.joinLeaveGroup".into(),
                "webpubsub.sendToGroup".into(),
            ],
            None,
        );
        let (handle, rx, _kill) = SocketHandle::new(&server.config);
        conn.attach(handle, None);
        let hub = server.with_hub("fuzz", |hub| {
            hub.register(&conn, &[]);
            hub.clone()
        });
        Detached {
            reader: Reader {
                server: server.clone(),
                hub,
                conn,
                upstream_tx: None,
            },
            rx,
        }
    }

    /// Handles one text frame; `false` when it would close the connection or closed
    /// it (a socket's reader handles nothing more then either).
    pub(crate) fn frame(&mut self, text: &str) -> bool {
        let ok = self.reader.handle_json(text).is_ok();
        while self.rx.try_recv().is_some() {}
        ok && !self.reader.conn.is_closed()
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        self.reader.hub.remove(&self.reader.conn, None);
    }
}

/// The payload of a frame; without a `dataType` it is JSON, as the service documents.
fn payload_of(
    data_type: Option<&str>,
    data: Option<&RawValue>,
) -> Result<Option<Payload>, OpError> {
    match (data_type, data) {
        (_, None) => Ok(None),
        (dt, Some(d)) => Payload::from_frame(dt.unwrap_or("json"), d)
            .map(Some)
            .map_err(bad),
    }
}

async fn upstream_worker(
    server: Arc<Server>,
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    mut rx: mpsc::Receiver<UpstreamJob>,
) {
    let Some(up) = server.upstream.as_ref() else {
        return;
    };
    while let Some(job) = rx.recv().await {
        let result = tokio::select! {
            r = up.user_event(&server, &hub, &conn, &job.event, job.payload.as_ref()) => r,
            _ = server.shutdown.cancelled() => return,
        };
        match result {
            Ok(body) => {
                if let Some(id) = job.ack_id {
                    conn.send_ack(frames::ack(id, None));
                }
                if let Some(body) = body {
                    conn.send_data(&Publication::server(&body));
                }
            }
            Err(e) => {
                tracing::info!(connection = %conn.id, "upstream event failed: {e}");
                if let Some(id) = job.ack_id {
                    conn.acks.lock().forget(id);
                    conn.send_ack(frames::ack(id, Some(("InternalServerError", &e))));
                }
                if conn.protocol == Protocol::Simple {
                    // The service drops a simple client whose `message` failed.
                    let reason = format!("The upstream message event failed: {e}");
                    hub.close(&conn, POLICY_CLOSE, &reason);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep_alive(ping_secs: u64, drop_secs: u64) -> KeepAlive {
        KeepAlive::new(&crate::Config {
            keep_alive_interval: Duration::from_secs(ping_secs),
            keep_alive_timeout: Duration::from_secs(drop_secs),
            ..crate::Config::default()
        })
    }

    #[test]
    fn a_silent_client_is_pinged_once_then_dropped() {
        let mut k = keep_alive(20, 60);
        let at = |secs| k.heard + Duration::from_secs(secs);
        let (t19, t20, t21, t41, t60) = (at(19), at(20), at(21), at(41), at(60));
        assert_eq!(k.next_check(k.heard), Some(t20));
        assert_eq!(k.check(t19), None);
        assert_eq!(k.check(t20), Some(Silence::Ping));
        assert_eq!(k.check(t21), None, "one ping per silence");
        // Looked at again one interval on (a frame by then starts a new silence).
        assert_eq!(k.next_check(t21), Some(t41));
        assert_eq!(k.check(t41), None);
        assert_eq!(k.next_check(t41 + Duration::from_secs(10)), Some(t60));
        assert_eq!(k.check(t60), Some(Silence::Drop));
    }

    #[test]
    fn a_frame_starts_the_silence_again() {
        let mut k = keep_alive(20, 60);
        let start = k.heard;
        assert_eq!(
            k.check(start + Duration::from_secs(30)),
            Some(Silence::Ping)
        );
        k.heard();
        assert!(k.heard >= start);
        assert_eq!(
            k.check(k.heard + Duration::from_secs(59)),
            Some(Silence::Ping)
        );
        assert_eq!(k.check(k.heard + Duration::from_secs(59)), None);
    }

    #[test]
    fn zero_turns_either_part_off() {
        let mut k = keep_alive(0, 60);
        let start = k.heard;
        assert_eq!(k.next_check(start), Some(start + Duration::from_secs(60)));
        assert_eq!(k.check(start + Duration::from_secs(59)), None);
        let mut k = keep_alive(20, 0);
        let start = k.heard;
        assert_eq!(
            k.check(start + Duration::from_secs(3600)),
            Some(Silence::Ping)
        );
        let later = start + Duration::from_secs(3601);
        assert_eq!(k.next_check(later), Some(later + Duration::from_secs(20)));
        assert_eq!(k.check(later), None);
        assert_eq!(keep_alive(0, 0).next_check(start), None);
    }
}
