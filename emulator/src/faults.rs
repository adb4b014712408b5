//! Fault injection: the `/_emulator/` routes and `--fault-drop-every-ms`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::hub::{Server, Stats, LOST};
use crate::rest::error;

/// `GET /_emulator/stats`.
pub(crate) async fn stats(State(server): State<Arc<Server>>) -> Json<serde_json::Value> {
    let s = &server.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let held = server.held();
    Json(json!({
        "connections": server.connection_count(),
        "hubs": server.hubs.len(),
        "connectionsOpened": get(&s.connections_opened),
        "connectionsClosed": get(&s.connections_closed),
        "recoveries": get(&s.recoveries),
        "failedRecoveries": get(&s.failed_recoveries),
        "framesIn": get(&s.frames_in),
        "framesOut": get(&s.frames_out),
        "badFrames": get(&s.bad_frames),
        "bufferOverflows": get(&s.buffer_overflows),
        "faultDrops": get(&s.faults_dropped),
        "keepAliveDrops": get(&s.keep_alive_drops),
        "upstreamRequests": get(&s.upstream_requests),
        "upstreamErrors": get(&s.upstream_errors),
        "restRequests": get(&s.rest_requests),
        "groups": held.groups,
        "users": held.users,
        "userGroups": held.user_groups,
        "awaitingRecovery": held.awaiting_recovery,
        "slotsTaken": held.slots_taken,
        "unackedMessages": held.unacked_messages,
        "outboundBytes": held.outbound_bytes,
        "pendingInvocations": held.pending_invocations,
        "tasks": held.tasks,
    }))
}

fn number<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
) -> Result<T, Box<Response>> {
    let raw = q
        .get(name)
        .ok_or_else(|| format!("The query parameter '{name}' is required."));
    raw.and_then(|raw| {
        raw.parse().map_err(|_| {
            format!("The query parameter '{name}' must be a non-negative integer, not '{raw}'.")
        })
    })
    .map_err(|m| Box::new(error(StatusCode::BAD_REQUEST, m)))
}

/// Another method than the one a route of its own takes (`allowed`): 405, with the
/// `Allow` header that axum adds.
pub(crate) async fn method_not_allowed(method: Method, allowed: &'static str) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here: this route takes {allowed}."),
    )
}

/// `POST /_emulator/hubs/{hub}/connections/{id}/{:drop|:mute|:dropAcks|:close}`.
pub(crate) async fn connection_fault(
    State(server): State<Arc<Server>>,
    Path((hub_name, id, action)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(hub) = server.existing_hub(&hub_name) else {
        return error(StatusCode::NOT_FOUND, format!("No hub '{hub_name}'."));
    };
    let Some(conn) = hub.connections.get(&id).map(|c| c.clone()) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("No connection '{id}' in hub '{hub_name}'."),
        );
    };
    match action.as_str() {
        ":drop" => {
            let recoverable = q.get("recoverable").map(String::as_str) != Some("false");
            Stats::inc(&server.stats.faults_dropped);
            let dropped = conn.drop_socket();
            if !recoverable {
                hub.remove(&conn, Some(LOST));
            }
            Json(json!({"dropped": dropped, "recoverable": recoverable})).into_response()
        }
        ":mute" => {
            let ms: u64 = match number(&q, "ms") {
                Ok(v) => v,
                Err(r) => return *r,
            };
            conn.state.lock().muted_until = Some(Instant::now() + Duration::from_millis(ms));
            Json(json!({"mutedMs": ms})).into_response()
        }
        ":dropAcks" => {
            let count: u64 = match number(&q, "count") {
                Ok(v) => v,
                Err(r) => return *r,
            };
            conn.state.lock().drop_acks = count;
            Json(json!({"dropAcks": count})).into_response()
        }
        ":close" => {
            let code: u16 = match number(&q, "code") {
                Ok(v) => v,
                Err(r) => return *r,
            };
            if !(1000..=4999).contains(&code) || matches!(code, 1004..=1006 | 1015) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("Close code {code} cannot be sent in a close frame."),
                );
            }
            let reason = q.get("reason").cloned().unwrap_or_default();
            conn.close_socket(code, &reason, &reason, false);
            hub.remove(&conn, None);
            Json(json!({"closed": true, "code": code})).into_response()
        }
        other => error(
            StatusCode::NOT_FOUND,
            format!("Unknown fault '{other}': use :drop, :mute, :dropAcks or :close."),
        ),
    }
}

/// `--fault-drop-every-ms`: abruptly drops every client socket every `ms` milliseconds.
pub(crate) async fn drop_every(server: Arc<Server>, ms: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(ms.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = server.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for hub in server.hubs.iter() {
            for conn in hub.connections.iter() {
                if conn.drop_socket() {
                    Stats::inc(&server.stats.faults_dropped);
                }
            }
        }
    }
}
