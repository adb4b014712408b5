//! CloudEvents (HTTP binary mode) to the `--upstream` URL: user events, invocations and
//! the `connected`/`disconnected` system events.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frames::Payload;
use crate::hub::{random_id, Conn, Hub, Server, Stats};

/// The upstream event handler.
pub(crate) struct Upstream {
    url: String,
    client: reqwest::Client,
    /// Longest reply body read; a longer one is an upstream failure.
    max_reply_bytes: usize,
}

/// Bytes of an error reply quoted in the failure's message.
const ERROR_EXCERPT: usize = 200;

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

impl Upstream {
    /// A client for `url` with a per-request timeout, reading reply bodies of at most
    /// `max_reply_bytes`.
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        max_reply_bytes: usize,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        Ok(Upstream {
            url: url.to_owned(),
            client,
            max_reply_bytes,
        })
    }

    fn request(
        &self,
        server: &Server,
        hub: &Hub,
        conn: &Conn,
        ce_type: &str,
        event: &str,
    ) -> reqwest::RequestBuilder {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(server.access_key.as_bytes()).expect("any key");
        mac.update(conn.id.as_bytes());
        let signature = format!("sha256={}", hex(&mac.finalize().into_bytes()));
        // The service sends its own host here on every request (the CloudEvents
        // abuse-protection origin); @azure/web-pubsub-express ignores one without it.
        let origin = format!("{}:{}", server.public_host(), server.port);
        let mut req = self
            .client
            .post(&self.url)
            .header("WebHook-Request-Origin", origin)
            .header("ce-specversion", "1.0")
            .header("ce-type", ce_type)
            .header(
                "ce-source",
                format!("/hubs/{}/client/{}", hub.name, conn.id),
            )
            .header("ce-id", random_id(16))
            .header(
                "ce-time",
                humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            )
            .header("ce-awpsversion", "1.0")
            .header("ce-hub", hub.name.as_str())
            .header("ce-connectionId", conn.id.as_str())
            .header("ce-eventName", event)
            .header("ce-signature", signature);
        if let Some(user) = &conn.user_id {
            req = req.header("ce-userId", user.as_str());
        }
        req
    }

    /// Posts a user event and returns the reply body (None when empty).
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
            hub,
            conn,
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
            let status = resp.status();
            let content_type = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let read_failed = |e| format!("reading the upstream reply failed: {e}");
            if !status.is_success() {
                let (excerpt, _) = read_at_most(resp, ERROR_EXCERPT)
                    .await
                    .map_err(read_failed)?;
                return Err(format!(
                    "the upstream answered HTTP {status}: {}",
                    String::from_utf8_lossy(&excerpt)
                ));
            }
            let max = self.max_reply_bytes;
            let too_large = || format!("the upstream reply is larger than {max} bytes");
            if resp.content_length().is_some_and(|len| len > max as u64) {
                return Err(too_large());
            }
            let (body, whole) = read_at_most(resp, max).await.map_err(read_failed)?;
            if !whole {
                return Err(too_large());
            }
            if body.is_empty() {
                return Ok(None);
            }
            Payload::from_http(content_type.as_deref(), body)
                .map(Some)
                .map_err(|e| format!("the upstream reply is invalid: {e}"))
        }
        .await;
        if result.is_err() {
            Stats::inc(&server.stats.upstream_errors);
        }
        result
    }

    /// Posts a system event (`connected`, `disconnected`) in the background; failures
    /// are logged only, and a shutdown abandons it.
    pub(crate) fn system_event(&self, server: &Arc<Server>, hub: &Hub, conn: &Conn, name: &str) {
        if server.shutdown.is_cancelled() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let req = self
            .request(
                server,
                hub,
                conn,
                &format!("azure.webpubsub.sys.{name}"),
                name,
            )
            .header("content-type", "application/json")
            .body("{}");
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
