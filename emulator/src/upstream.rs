//! CloudEvents (HTTP binary mode) to the `--upstream` URL: user events, invocations, the
//! `connect`/`connected`/`disconnected` system events, and the connection state the
//! upstream keeps in `ce-connectionState`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::frames::Payload;
use crate::hub::{random_id, Conn, Hub, Server, Stats};

/// The upstream event handler.
pub(crate) struct Upstream {
    url: reqwest::Url,
    client: reqwest::Client,
    /// Longest reply body read; a longer one is an upstream failure.
    max_reply_bytes: usize,
}

/// Bytes of an error reply quoted in the failure's message.
const ERROR_EXCERPT: usize = 200;

/// Longest `ce-connectionState` a reply may set, in bytes: a longer one fails the reply.
/// The service documents no limit; this one keeps the header well within the 8 KiB
/// header line that common HTTP servers accept.
pub(crate) const MAX_CONNECTION_STATE: usize = 4096;

/// The system events posted to the upstream, like the service's event handler setting
/// `systemEvents`. Parsed from a comma-separated list of `connect`, `connected` and
/// `disconnected` (an empty list: none). The default is `connected,disconnected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemEvents {
    /// `connect`: blocking, before the WebSocket handshake is accepted; the upstream's
    /// reply can refuse the connection or set its user, groups, roles and subprotocol.
    pub connect: bool,
    /// `connected`: once the connection is open.
    pub connected: bool,
    /// `disconnected`: once the connection has ended.
    pub disconnected: bool,
}

impl Default for SystemEvents {
    fn default() -> Self {
        SystemEvents {
            connect: false,
            connected: true,
            disconnected: true,
        }
    }
}

impl FromStr for SystemEvents {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, String> {
        let mut events = SystemEvents {
            connect: false,
            connected: false,
            disconnected: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "connect" => events.connect = true,
                "connected" => events.connected = true,
                "disconnected" => events.disconnected = true,
                other => {
                    let known = "connect, connected or disconnected";
                    return Err(format!("unknown system event '{other}' (expected {known})"));
                }
            }
        }
        Ok(events)
    }
}

impl SystemEvents {
    /// Is the unblocking event of that name (`connected`, `disconnected`) posted?
    fn posts(&self, name: &str) -> bool {
        match name {
            "connected" => self.connected,
            "disconnected" => self.disconnected,
            _ => false,
        }
    }
}

/// The connection an upstream request is about.
pub(crate) struct Target<'a> {
    /// Its hub's name.
    pub hub: &'a str,
    /// Its id.
    pub connection_id: &'a str,
    /// Its user, if any.
    pub user_id: Option<&'a str>,
    /// The connection's state, sent as `ce-connectionState` (empty: none).
    pub state: String,
    /// Its subprotocol, sent as `ce-subprotocol` (none before it is chosen, or when it
    /// has none).
    pub subprotocol: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// An open connection of the hub of that name.
    pub(crate) fn of(hub: &'a str, conn: &'a Conn) -> Self {
        Target {
            hub,
            connection_id: &conn.id,
            user_id: conn.user_id.as_deref(),
            state: conn.upstream_state.lock().clone(),
            subprotocol: conn.subprotocol.as_deref(),
        }
    }
}

/// The `disconnected` owed to the upstream for a connection whose `connect` it
/// accepted: the service posts one after every accepted `connect`. Posted when dropped,
/// unless [`Self::opened`] was called (the connection's removal posts it then), so a
/// handshake that fails afterwards, or a client gone before the upgrade, still ends
/// with it.
pub(crate) struct OwedDisconnected {
    server: Arc<Server>,
    hub: String,
    connection_id: String,
    user_id: Option<String>,
    state: String,
    subprotocol: Option<String>,
    owed: bool,
}

impl OwedDisconnected {
    /// Owed for the connection `connection_id` of `hub`, with the user, state and
    /// subprotocol the `connect` reply left it with.
    pub(crate) fn new(
        server: Arc<Server>,
        hub: &str,
        connection_id: &str,
        user_id: Option<&str>,
        state: &str,
        subprotocol: Option<&str>,
    ) -> Self {
        OwedDisconnected {
            server,
            hub: hub.to_owned(),
            connection_id: connection_id.to_owned(),
            user_id: user_id.map(str::to_owned),
            state: state.to_owned(),
            subprotocol: subprotocol.map(str::to_owned),
            owed: true,
        }
    }

    /// The connection opened: its removal posts `disconnected`.
    pub(crate) fn opened(mut self) {
        self.owed = false;
    }
}

impl Drop for OwedDisconnected {
    fn drop(&mut self) {
        let Some(up) = self.server.upstream.as_ref().filter(|_| self.owed) else {
            return;
        };
        let target = Target {
            hub: &self.hub,
            connection_id: &self.connection_id,
            user_id: self.user_id.as_deref(),
            state: self.state.clone(),
            subprotocol: self.subprotocol.as_deref(),
        };
        up.system_event(
            &self.server,
            &target,
            "disconnected",
            Some(HANDSHAKE_FAILED),
        );
    }
}

/// Why a connection whose `connect` the upstream accepted ended before it opened.
const HANDSHAKE_FAILED: &str = "The WebSocket handshake did not complete.";

/// What a `200` reply to `connect` asks for. Every field may be missing; an empty string
/// counts as missing.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConnectReply {
    /// Replaces the token's user id.
    pub user_id: Option<String>,
    /// Joined, besides the token's groups.
    pub groups: Option<Vec<String>>,
    /// Granted, besides the token's roles.
    pub roles: Option<Vec<String>>,
    /// The subprotocol chosen among those the client offered.
    pub subprotocol: Option<String>,
}

/// A `connect` the upstream accepted.
pub(crate) struct Accepted {
    /// What the reply asks for (all missing for a 204).
    pub reply: ConnectReply,
    /// The connection's state from the reply (none: no header).
    pub state: Option<String>,
}

/// A `connect` refused or failed: the answer to the client's handshake.
pub(crate) struct Refused {
    /// The upstream's 4xx, or 500.
    pub status: StatusCode,
    /// The upstream's content type, or plain text.
    pub content_type: Option<String>,
    /// The upstream's body, or the reason of the failure.
    pub body: Bytes,
}

/// Reads at most `max` bytes of a reply body: the bytes, and whether that is the whole
/// body. What a longer body has beyond `max` is never read (dropping the response
/// closes its connection).
async fn read_at_most(mut resp: reqwest::Response, max: usize) -> reqwest::Result<(Bytes, bool)> {
    let mut body = BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if chunk.len() > max - body.len() {
            body.extend_from_slice(&chunk[..max - body.len()]);
            return Ok((body.freeze(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), true))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reply's content type, if it has a readable one.
fn content_type(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn read_failed(e: reqwest::Error) -> String {
    format!("reading the upstream reply failed: {e}")
}

/// The failure of a reply whose status is not a success, quoting the start of its body.
async fn error_status(resp: reqwest::Response) -> String {
    let status = resp.status();
    match read_at_most(resp, ERROR_EXCERPT).await {
        Ok((excerpt, _)) => format!(
            "the upstream answered HTTP {status}: {}",
            String::from_utf8_lossy(&excerpt)
        ),
        Err(e) => read_failed(e),
    }
}

/// The connection state a successful reply sets: None when it has no
/// `ce-connectionState` header; an empty value clears the state.
fn reply_state(headers: &HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all("ce-connectionstate").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("the upstream reply has more than one ce-connectionState header".into());
    }
    if value.len() > MAX_CONNECTION_STATE {
        return Err(format!(
            "the upstream reply's ce-connectionState is {} bytes, more than the {MAX_CONNECTION_STATE} a connection may keep",
            value.len()
        ));
    }
    value
        .to_str()
        .map(|v| Some(v.to_owned()))
        .map_err(|_| "the upstream reply's ce-connectionState is not printable ASCII".into())
}

/// Every value of a JSON object as a list of strings, as the `connect` event sends
/// claims: a string as itself, an array item by item, anything else as its JSON text.
fn string_lists(claims: &Map<String, Value>) -> Map<String, Value> {
    let text = |v: &Value| match v {
        Value::String(s) => Value::String(s.clone()),
        other => Value::String(other.to_string()),
    };
    claims
        .iter()
        .map(|(name, value)| {
            let list = match value {
                Value::Array(items) => items.iter().map(text).collect(),
                other => vec![text(other)],
            };
            (name.clone(), Value::Array(list))
        })
        .collect()
}

/// Adds `value` to the list of `name`.
fn push(lists: &mut Map<String, Value>, name: &str, value: String) {
    if let Value::Array(list) = lists
        .entry(name)
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        list.push(Value::String(value));
    }
}

/// The body of a `connect` event: the token's claims, the query parameters and request
/// headers (each a list of values), the offered subprotocols and no client certificate.
pub(crate) fn connect_body(
    claims: &Map<String, Value>,
    query: &str,
    headers: &axum::http::HeaderMap,
    subprotocols: &[String],
) -> Value {
    let mut params = Map::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        push(&mut params, &name, value.into_owned());
    }
    let mut fields = Map::new();
    for (name, value) in headers {
        push(
            &mut fields,
            name.as_str(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        );
    }
    serde_json::json!({
        "claims": string_lists(claims),
        "query": params,
        "headers": fields,
        "subprotocols": subprotocols,
        "clientCertificates": [],
    })
}

impl Upstream {
    /// A client for `url` (an `http://` URL: there is no TLS client) with a per-request
    /// timeout, reading reply bodies of at most `max_reply_bytes`. It follows no
    /// redirect: a 3xx reply is a failure.
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        max_reply_bytes: usize,
    ) -> Result<Self, String> {
        let invalid = |why: &dyn std::fmt::Display| format!("invalid upstream URL {url:?}: {why}");
        let url = reqwest::Url::parse(url).map_err(|e| invalid(&e))?;
        if url.scheme() != "http" {
            return Err(invalid(&"the emulator posts to http:// URLs only"));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        Ok(Upstream {
            url,
            client,
            max_reply_bytes,
        })
    }

    fn request(
        &self,
        server: &Server,
        target: &Target<'_>,
        ce_type: &str,
        event: &str,
    ) -> reqwest::RequestBuilder {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(server.access_key.as_bytes()).expect("any key");
        mac.update(target.connection_id.as_bytes());
        let signature = format!("sha256={}", hex(&mac.finalize().into_bytes()));
        // The service sends its own host name here on every request (the CloudEvents
        // abuse-protection origin, a DNS name: no port); @azure/web-pubsub-express
        // ignores a request without it, and the .NET handler finds the access key that
        // checks ce-signature by it, comparing it with its endpoint's host.
        let mut req = self
            .client
            .post(self.url.clone())
            .header("WebHook-Request-Origin", server.public_host.as_str())
            .header("ce-specversion", "1.0")
            .header("ce-type", ce_type)
            .header(
                "ce-source",
                format!("/hubs/{}/client/{}", target.hub, target.connection_id),
            )
            .header("ce-id", random_id(16))
            .header(
                "ce-time",
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            )
            .header("ce-awpsversion", "1.0")
            .header("ce-hub", target.hub)
            .header("ce-connectionId", target.connection_id)
            .header("ce-eventName", event)
            .header("ce-signature", signature);
        if let Some(user) = target.user_id {
            req = req.header("ce-userId", user);
        }
        if !target.state.is_empty() {
            req = req.header("ce-connectionState", target.state.as_str());
        }
        if let Some(subprotocol) = target.subprotocol {
            req = req.header("ce-subprotocol", subprotocol);
        }
        req
    }

    /// Reads a successful reply's body, failing past `max_reply_bytes`.
    async fn body(&self, resp: reqwest::Response) -> Result<Bytes, String> {
        let max = self.max_reply_bytes;
        let too_large = || format!("the upstream reply is larger than {max} bytes");
        if resp.content_length().is_some_and(|len| len > max as u64) {
            return Err(too_large());
        }
        let (body, whole) = read_at_most(resp, max).await.map_err(read_failed)?;
        if !whole {
            return Err(too_large());
        }
        Ok(body)
    }

    /// Posts the blocking `connect` event of a connection about to be accepted, with
    /// `body` from [`connect_body`]. A 4xx reply is passed on to the client as is (its
    /// body cut at `max_reply_bytes`, with a warning); a failure (another status, no
    /// answer in time, an invalid reply) refuses it with 500.
    pub(crate) async fn connect(
        &self,
        server: &Server,
        target: &Target<'_>,
        body: &Value,
    ) -> Result<Accepted, Refused> {
        Stats::inc(&server.stats.upstream_requests);
        let req = self
            .request(server, target, "azure.webpubsub.sys.connect", "connect")
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_string());
        let result = async {
            let resp = req.send().await.map_err(|e| {
                if e.is_timeout() {
                    format!("the upstream did not answer in time: {e}")
                } else {
                    format!("the upstream request failed: {e}")
                }
            })?;
            let status = resp.status();
            if status.is_client_error() {
                let content_type = content_type(&resp);
                let max = self.max_reply_bytes;
                let (body, whole) = read_at_most(resp, max).await.map_err(read_failed)?;
                if !whole {
                    tracing::warn!(
                        connection = %target.connection_id,
                        "the upstream refused connect with HTTP {status} and a body larger than {max} bytes: the client gets its first {max} bytes"
                    );
                }
                return Ok(Err(Refused {
                    status,
                    content_type,
                    body,
                }));
            }
            if !status.is_success() {
                return Err(error_status(resp).await);
            }
            let state = reply_state(resp.headers())?;
            let body = self.body(resp).await?;
            let reply = if body.trim_ascii().is_empty() {
                ConnectReply::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    format!("the upstream's connect reply is not the expected JSON: {e}")
                })?
            };
            Ok(Ok(Accepted { reply, state }))
        }
        .await;
        result.unwrap_or_else(|e| {
            Stats::inc(&server.stats.upstream_errors);
            tracing::info!(connection = %target.connection_id, "upstream connect event failed: {e}");
            Err(Refused {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                content_type: Some("text/plain; charset=utf-8".into()),
                body: format!("The upstream connect event failed: {e}.").into(),
            })
        })
    }

    /// Posts a user event and returns the reply body (None when empty). A
    /// `ce-connectionState` in a successful reply replaces the connection's state.
    pub(crate) async fn user_event(
        &self,
        server: &Server,
        hub: &Hub,
        conn: &Conn,
        event: &str,
        payload: Option<&Payload>,
    ) -> Result<Option<Payload>, String> {
        Stats::inc(&server.stats.upstream_requests);
        let mut req = self.request(
            server,
            &Target::of(&hub.name, conn),
            &format!("azure.webpubsub.user.{event}"),
            event,
        );
        if let Some(p) = payload {
            let (body, content_type) = p.to_http();
            req = req.header("content-type", content_type).body(body);
        }
        let result = async {
            let resp = req
                .send()
                .await
                .map_err(|e| format!("the upstream request failed: {e}"))?;
            if !resp.status().is_success() {
                return Err(error_status(resp).await);
            }
            let content_type = content_type(&resp);
            let state = reply_state(resp.headers())?;
            let body = self.body(resp).await?;
            let reply = if body.is_empty() {
                None
            } else {
                Some(
                    Payload::from_http(content_type.as_deref(), body)
                        .map_err(|e| format!("the upstream reply is invalid: {e}"))?,
                )
            };
            if let Some(state) = state {
                *conn.upstream_state.lock() = state;
            }
            Ok(reply)
        }
        .await;
        if result.is_err() {
            Stats::inc(&server.stats.upstream_errors);
        }
        result
    }

    /// Posts a system event (`connected`, `disconnected`) about `target` in the
    /// background, if the configured system events include it; failures are logged
    /// only, and a shutdown abandons it. The body is `{}`, or `{"reason": ...}` with a
    /// reason.
    pub(crate) fn system_event(
        &self,
        server: &Arc<Server>,
        target: &Target<'_>,
        name: &str,
        reason: Option<&str>,
    ) {
        if !server.config.upstream_system_events.posts(name)
            || server.shutdown.is_cancelled()
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        let req = self
            .request(server, target, &format!("azure.webpubsub.sys.{name}"), name)
            .header("content-type", "application/json")
            .body(match reason {
                Some(reason) => serde_json::json!({ "reason": reason }).to_string(),
                None => "{}".to_owned(),
            });
        let tasks = server.tasks.clone();
        let server = server.clone();
        tasks.spawn(async move {
            Stats::inc(&server.stats.upstream_requests);
            let sent = tokio::select! {
                sent = req.send() => sent,
                // Not waited for by a shutdown (a silent upstream would hold it).
                _ = server.shutdown.cancelled() => return,
            };
            if let Err(e) = sent.and_then(|r| r.error_for_status()) {
                Stats::inc(&server.stats.upstream_errors);
                tracing::debug!("upstream system event failed: {e}");
            }
        });
    }
}
