//! The service REST API used by the official server SDKs, under `/api/hubs/{hub}`.
//!
//! One dispatcher matches the raw path segments (percent-decoded one by one, so a
//! group or user name may contain an encoded `/`), because the API's `:send`-style
//! segments are not expressible as axum route literals.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, Permission};
use crate::client_ws::bearer;
use crate::filter::Filter;
use crate::frames::{Payload, Publication};
use crate::hub::{Conn, Hub, Server, Stats};
use crate::names::{validate_group, validate_hub};
use crate::TokenOptions;

/// A JSON error body `{"code":..., "message":...}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLarge",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::REQUEST_TIMEOUT => "RequestTimeout",
        _ => "BadRequest",
    };
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
        .into_response()
}

/// The largest `maxpagesize` of a group listing, and its page size when none is given.
const MAX_PAGE_SIZE: usize = 200;

/// Query parameters, repeated keys kept.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(uri: &Uri) -> Self {
        QueryParams(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Every request that no other route took: the REST API, or 404.
pub(crate) async fn dispatch(
    State(server): State<Arc<Server>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Stats::inc(&server.stats.rest_requests);
    // The Health API (`HEAD /api/health`): a probe, answered without a token.
    if uri.path() == "/api/health" && (method == Method::HEAD || method == Method::GET) {
        return status(StatusCode::OK);
    }
    let Some(rest) = uri.path().strip_prefix("/api/hubs/") else {
        return error(
            StatusCode::NOT_FOUND,
            format!("No route for {} {}.", method, uri.path()),
        );
    };
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        match percent_decode_str(raw).decode_utf8() {
            Ok(s) => segments.push(s.into_owned()),
            Err(_) => return error(StatusCode::BAD_REQUEST, "The path is not valid UTF-8."),
        }
    }
    if let Err(e) = authorize(&server, &uri, &headers) {
        return error(StatusCode::UNAUTHORIZED, format!("Unauthorized: {e}."));
    }
    let query = QueryParams::parse(&uri);
    let limit = server.config.max_rest_body_bytes;
    let timeout = server.config.http_timeout;
    let body = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The request body is larger than {limit} bytes."),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("The request body did not arrive within {timeout:?}."),
            )
        }
    };
    let req = Request {
        server: &server,
        method: &method,
        path: uri.path(),
        query: &query,
        headers: &headers,
        body,
    };
    let hub_name = &segments[0];
    if hub_name.is_empty() {
        return error(StatusCode::NOT_FOUND, "The hub name is empty.");
    }
    if let Err(e) = validate_hub(hub_name) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let rest: Vec<&str> = segments[1..].iter().map(String::as_str).collect();
    // An empty id or name leaves an empty segment, which no route of the service
    // matches: 404, not an operation on the empty name (Azure/azure-webpubsub#47).
    if rest.iter().any(|s| s.is_empty()) {
        return error(
            StatusCode::NOT_FOUND,
            format!("No route for {} {}.", method, uri.path()),
        );
    }
    if let ["groups", group, ..] | ["users", _, "groups", group, ..] = rest.as_slice() {
        if let Err(e) = validate_group(group) {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
    match server.with_hub(hub_name, |hub| req.route(hub, &rest)) {
        Some(response) => response,
        None => error(
            StatusCode::NOT_FOUND,
            format!("No route for {} {}.", method, uri.path()),
        ),
    }
}

fn authorize(server: &Server, uri: &Uri, headers: &HeaderMap) -> Result<(), auth::AuthError> {
    let token = bearer(headers).ok_or(auth::AuthError::Missing)?;
    let claims = auth::verify(&server.access_key, &token, true)?;
    if claims
        .audiences
        .iter()
        .any(|a| auth::audience_matches(a, uri.path(), &server.config.host, server.port))
    {
        Ok(())
    } else {
        Err(auth::AuthError::WrongAudience(claims.audiences.join(",")))
    }
}

struct Request<'a> {
    server: &'a Arc<Server>,
    method: &'a Method,
    /// The request path as it came, still percent-encoded.
    path: &'a str,
    query: &'a QueryParams,
    headers: &'a HeaderMap,
    body: bytes::Bytes,
}

fn status(code: StatusCode) -> Response {
    code.into_response()
}

fn exists(found: bool) -> Response {
    status(if found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

impl Request<'_> {
    /// Matches the route; None = no such route.
    fn route(&self, hub: &Arc<Hub>, rest: &[&str]) -> Option<Response> {
        let m = self.method;
        let response = match rest {
            [":send"] if m == Method::POST => {
                self.send(|p, to| hub.publish_all(p, |c| to.picks(c)))
            }
            ["groups", g, ":send"] if m == Method::POST => {
                self.send(|p, to| hub.publish_group(g, p, |c| to.picks(c)))
            }
            ["users", u, ":send"] if m == Method::POST => {
                self.send(|p, to| hub.publish_user(u, p, |c| to.picks(c)))
            }
            ["connections", c, ":send"] if m == Method::POST => {
                if let Err(e) = self.check_ttl() {
                    return Some(error(StatusCode::BAD_REQUEST, e));
                }
                let payload = match self.payload() {
                    Ok(payload) => payload,
                    Err(e) => return Some(error(StatusCode::BAD_REQUEST, e)),
                };
                if let Some(conn) = conn(hub, c) {
                    conn.send_data(&Publication::server(&payload));
                }
                status(StatusCode::ACCEPTED)
            }
            [":addToGroups"] if m == Method::POST => self.update_groups(hub, true),
            [":removeFromGroups"] if m == Method::POST => self.update_groups(hub, false),
            ["groups", g, "connections", c] => self.group_connection(hub, g, c)?,
            ["users", u, "groups", g] => self.user_group(hub, u, g)?,
            ["connections", c, "groups"] if m == Method::DELETE => {
                if let Some(conn) = conn(hub, c) {
                    let groups: Vec<String> = conn.groups.lock().iter().cloned().collect();
                    for g in groups {
                        hub.leave(&conn, &g);
                    }
                }
                status(StatusCode::NO_CONTENT)
            }
            ["users", u, "groups"] if m == Method::DELETE => {
                hub.user_groups.remove(*u);
                for conn in hub.user_connections(u) {
                    let groups: Vec<String> = conn.groups.lock().iter().cloned().collect();
                    for g in groups {
                        hub.leave(&conn, &g);
                    }
                }
                status(StatusCode::NO_CONTENT)
            }
            ["connections", c] if m == Method::DELETE => {
                if let Some(conn) = conn(hub, c) {
                    hub.close_by_application(&conn, self.reason());
                }
                status(StatusCode::NO_CONTENT)
            }
            ["connections", c] if m == Method::HEAD => exists(conn(hub, c).is_some()),
            ["groups", g] if m == Method::HEAD => exists(!hub.group_connections(g).is_empty()),
            ["users", u] if m == Method::HEAD => exists(!hub.user_connections(u).is_empty()),
            [":closeConnections"] if m == Method::POST => {
                let all: Vec<Arc<Conn>> = hub.connections.iter().map(|c| c.clone()).collect();
                self.close_all(hub, all)
            }
            ["groups", g, ":closeConnections"] if m == Method::POST => {
                self.close_all(hub, hub.group_connections(g))
            }
            ["users", u, ":closeConnections"] if m == Method::POST => {
                self.close_all(hub, hub.user_connections(u))
            }
            ["groups", g, "connections"] if m == Method::GET => self.list_group(hub, g),
            ["permissions", perm, "connections", c] => self.permission(hub, perm, c)?,
            [":generateToken"] if m == Method::POST || m == Method::GET => self.generate_token(hub),
            _ => return None,
        };
        Some(response)
    }

    fn excluded(&self) -> Vec<&str> {
        self.query.all("excluded")
    }

    /// The integer query parameter `name`, when given; an error outside `range`.
    fn integer(&self, name: &str, range: RangeInclusive<i64>) -> Result<Option<i64>, String> {
        match self.query.get(name).map(str::parse::<i64>) {
            None => Ok(None),
            Some(Ok(n)) if range.contains(&n) => Ok(Some(n)),
            Some(_) => Err(format!(
                "{name} must be an integer from {} to {}.",
                range.start(),
                range.end()
            )),
        }
    }

    /// `messageTtlSeconds` is range-checked (0 to 300), then not acted on: a message
    /// waits for a slow client however long it takes.
    fn check_ttl(&self) -> Result<(), String> {
        self.integer("messageTtlSeconds", 0..=300).map(drop)
    }

    fn reason(&self) -> Option<&str> {
        self.query.get("reason")
    }

    /// The body decoded by content type.
    fn payload(&self) -> Result<Payload, String> {
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok());
        Payload::from_http(content_type, self.body.clone())
    }

    /// Decodes the body and publishes it once to the connections the query selects.
    fn send(&self, deliver: impl FnOnce(&Publication, &Selection)) -> Response {
        if let Err(e) = self.check_ttl() {
            return error(StatusCode::BAD_REQUEST, e);
        }
        let filter = match parse_filter(self.query.get("filter")) {
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        match self.payload() {
            Ok(payload) => {
                let to = Selection {
                    excluded: self.excluded(),
                    filter,
                };
                deliver(&Publication::server(&payload), &to);
                status(StatusCode::ACCEPTED)
            }
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        }
    }

    /// `:addToGroups` / `:removeFromGroups`: body `{"groups": [...], "filter": "..."}`;
    /// every connection of the hub the filter selects (all without one) joins or leaves
    /// every group.
    fn update_groups(&self, hub: &Hub, add: bool) -> Response {
        #[derive(Deserialize)]
        struct Body {
            groups: Option<Vec<String>>,
            filter: Option<String>,
        }
        let body: Body = match serde_json::from_slice(&self.body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("The body is not a valid JSON object with groups and filter: {e}."),
                )
            }
        };
        let Some(groups) = body.groups else {
            return error(StatusCode::BAD_REQUEST, "The body has no 'groups'.");
        };
        if let Some(e) = groups.iter().find_map(|g| validate_group(g).err()) {
            return error(StatusCode::BAD_REQUEST, e);
        }
        let filter = match parse_filter(body.filter.as_deref()) {
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let selected: Vec<Arc<Conn>> = hub
            .connections
            .iter()
            .filter(|c| filter.as_ref().is_none_or(|f| c.matches(f)))
            .map(|c| c.clone())
            .collect();
        for conn in selected {
            for g in &groups {
                if add {
                    hub.join(&conn, g);
                } else {
                    hub.leave(&conn, g);
                }
            }
        }
        status(StatusCode::OK)
    }

    /// One page of a group's members in connection id order: `maxpagesize` of them
    /// (1 to 200, default 200) after `continuationToken` (the last connection id of the
    /// previous page), `top` (1 to 2^31-1) at most in all pages. `nextLink` is this
    /// path with the same query, the next token and what is left of `top`; null on the
    /// last page.
    fn list_group(&self, hub: &Hub, group: &str) -> Response {
        let (top, page_size) = match (
            self.integer("top", 1..=i64::from(i32::MAX)),
            self.integer("maxpagesize", 1..=MAX_PAGE_SIZE as i64),
        ) {
            (Ok(top), Ok(size)) => (top, size.map_or(MAX_PAGE_SIZE, |n| n as usize)),
            (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        };
        let after = self.query.get("continuationToken").unwrap_or_default();
        let mut members: Vec<Arc<Conn>> = hub
            .group_connections(group)
            .into_iter()
            .filter(|c| c.id.as_str() > after)
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let wanted = top.map_or(usize::MAX, |t| t as usize);
        let page = &members[..members.len().min(page_size).min(wanted)];
        let value: Vec<_> = page
            .iter()
            .map(|c| json!({"connectionId": c.id, "userId": c.user_id}))
            .collect();
        let left = top.map(|t| t - page.len() as i64);
        let next_link = page
            .last()
            .filter(|_| members.len() > page.len() && left != Some(0))
            .map(|last| self.next_link(&last.id, left));
        Json(json!({ "value": value, "nextLink": next_link })).into_response()
    }

    /// This request's path and query for the page after connection `last`.
    fn next_link(&self, last: &str, top: Option<i64>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.query.0 {
            if !matches!(k.as_str(), "top" | "continuationToken") {
                query.append_pair(k, v);
            }
        }
        if let Some(t) = top {
            query.append_pair("top", &t.to_string());
        }
        query.append_pair("continuationToken", last);
        format!("{}?{}", self.path, query.finish())
    }

    fn close_all(&self, hub: &Hub, conns: Vec<Arc<Conn>>) -> Response {
        let excluded = self.excluded();
        let reason = self.reason();
        for c in conns {
            if !excluded.contains(&c.id.as_str()) {
                hub.close_by_application(&c, reason);
            }
        }
        status(StatusCode::NO_CONTENT)
    }

    fn group_connection(&self, hub: &Hub, group: &str, c: &str) -> Option<Response> {
        Some(match *self.method {
            Method::PUT => match conn(hub, c) {
                Some(conn) if hub.join(&conn, group) => status(StatusCode::OK),
                Some(conn) => error(StatusCode::BAD_REQUEST, conn.too_many_groups()),
                None => error(StatusCode::NOT_FOUND, format!("No connection '{c}'.")),
            },
            Method::DELETE => {
                if let Some(conn) = conn(hub, c) {
                    hub.leave(&conn, group);
                }
                status(StatusCode::NO_CONTENT)
            }
            _ => return None,
        })
    }

    fn user_group(&self, hub: &Hub, user: &str, group: &str) -> Option<Response> {
        Some(match *self.method {
            Method::PUT => {
                hub.user_groups
                    .entry(user.to_owned())
                    .or_default()
                    .insert(group.to_owned());
                for conn in hub.user_connections(user) {
                    hub.join(&conn, group);
                }
                status(StatusCode::OK)
            }
            Method::DELETE => {
                if let Some(mut groups) = hub.user_groups.get_mut(user) {
                    groups.remove(group);
                }
                hub.user_groups.remove_if(user, |_, g| g.is_empty());
                for conn in hub.user_connections(user) {
                    hub.leave(&conn, group);
                }
                status(StatusCode::NO_CONTENT)
            }
            Method::HEAD => exists(
                hub.user_connections(user)
                    .iter()
                    .any(|c| c.groups.lock().contains(group)),
            ),
            _ => return None,
        })
    }

    /// Grant, revoke or check `perm` on the group `targetName` (required, a group name).
    /// A grant or a revoke overrides, for that one group, what the token's roles say.
    fn permission(&self, hub: &Hub, perm: &str, c: &str) -> Option<Response> {
        if ![Method::PUT, Method::DELETE, Method::HEAD].contains(self.method) {
            return None;
        }
        let Some(permission) = Permission::from_rest_name(perm) else {
            return Some(error(
                StatusCode::BAD_REQUEST,
                format!("Unknown permission '{perm}': use joinLeaveGroup or sendToGroup."),
            ));
        };
        let Some(target) = self.query.get("targetName") else {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "targetName, the group the permission is for, is required.",
            ));
        };
        if let Err(e) = validate_group(target) {
            return Some(error(StatusCode::BAD_REQUEST, format!("targetName: {e}")));
        }
        let Some(conn) = conn(hub, c) else {
            return Some(match *self.method {
                Method::DELETE => status(StatusCode::NO_CONTENT),
                _ => error(StatusCode::NOT_FOUND, format!("No connection '{c}'.")),
            });
        };
        Some(match *self.method {
            Method::PUT => {
                conn.set_permission(permission, target, true);
                status(StatusCode::OK)
            }
            Method::DELETE => {
                conn.set_permission(permission, target, false);
                status(StatusCode::NO_CONTENT)
            }
            _ => exists(conn.allowed(permission, target)),
        })
    }

    /// A client token signed by the emulator. `clientType` (`Default` or `MQTT`, any
    /// case) picks the client path the token is for.
    fn generate_token(&self, hub: &Hub) -> Response {
        let minutes = match self.integer("minutesToExpire", 1..=i64::from(i32::MAX)) {
            Ok(m) => m.unwrap_or(60).unsigned_abs(),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let client_path = match self.query.get("clientType").map(str::to_ascii_lowercase) {
            None => "client",
            Some(t) if t == "default" => "client",
            Some(t) if t == "mqtt" => "clients/mqtt",
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "clientType must be Default or MQTT.",
                )
            }
        };
        let opts = TokenOptions {
            user_id: self.query.get("userId").map(str::to_owned),
            roles: self
                .query
                .all("role")
                .into_iter()
                .map(str::to_owned)
                .collect(),
            groups: self
                .query
                .all("group")
                .into_iter()
                .map(str::to_owned)
                .collect(),
            ttl: Some(Duration::from_secs(minutes * 60)),
        };
        let audience = format!("{}/{client_path}/hubs/{}", self.server.endpoint(), hub.name);
        let token = auth::sign_client_token(&self.server.access_key, &audience, &opts);
        Json(json!({ "token": token })).into_response()
    }
}

/// The connections a send reaches: not `excluded`, and selected by `filter` when given.
struct Selection<'a> {
    excluded: Vec<&'a str>,
    filter: Option<Filter>,
}

impl Selection<'_> {
    fn picks(&self, conn: &Conn) -> bool {
        !self.excluded.contains(&conn.id.as_str())
            && self.filter.as_ref().is_none_or(|f| conn.matches(f))
    }
}

/// Parses an optional filter; blank counts as none.
fn parse_filter(text: Option<&str>) -> Result<Option<Filter>, String> {
    match text {
        Some(t) if !t.trim().is_empty() => Filter::parse(t).map(Some),
        _ => Ok(None),
    }
}

fn conn(hub: &Hub, id: &str) -> Option<Arc<Conn>> {
    hub.connections.get(id).map(|c| c.clone())
}
