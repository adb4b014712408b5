//! Shared state: hubs, connections, groups, users and the per-connection reliable
//! replay buffer.
//!
//! A hub exists while something in it lasts: a connection (also one awaiting its
//! recovery) or a user's group membership made through REST. Every change that adds
//! such state goes through [`Server::with_hub`], so a hub is never forgotten while it
//! is being filled.
//!
//! There is no global lock on the message path: hubs, connections, groups and users
//! live in sharded maps, a group's members behind their own `RwLock`, and each
//! connection's send state behind its own small mutex (held only to assign a sequence
//! id, buffer the frame and queue it to the connection's writer task).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::extract::ws::{Message, Utf8Bytes};
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use rand::distr::{Alphanumeric, SampleString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{role_grants, Permission};
use crate::filter::{Filter, Subject};
use crate::frames::{self, Publication};
use crate::outbound::SocketHandle;
use crate::slots::{Slot, Slots};
use crate::upstream::{Target, Upstream};
use crate::Config;

/// Close code used when a session is ended for good by the server.
pub(crate) const POLICY_CLOSE: u16 = 1008;

/// Close code of a session the application server closed through REST.
pub(crate) const NORMAL_CLOSE: u16 = 1000;

/// Why a connection ended when its socket went without a close frame.
pub(crate) const LOST: &str = "The connection was lost without a close frame.";

/// The WebSocket subprotocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `json.webpubsub.azure.v1`.
    Json,
    /// `json.reliable.webpubsub.azure.v1`.
    JsonReliable,
    /// No subprotocol: raw frames in and out.
    Simple,
}

/// Subprotocol names.
pub(crate) const JSON_V1: &str = "json.webpubsub.azure.v1";
pub(crate) const JSON_RELIABLE_V1: &str = "json.reliable.webpubsub.azure.v1";

impl Protocol {
    /// The protocol of a chosen subprotocol: another name than the JSON ones (chosen by
    /// the upstream), or none, is a simple client.
    pub(crate) fn of(subprotocol: Option<&str>) -> Protocol {
        match subprotocol {
            Some(JSON_V1) => Protocol::Json,
            Some(JSON_RELIABLE_V1) => Protocol::JsonReliable,
            _ => Protocol::Simple,
        }
    }

    pub(crate) fn is_reliable(self) -> bool {
        self == Protocol::JsonReliable
    }
}

/// Counters served by `GET /_emulator/stats`.
#[derive(Default)]
pub(crate) struct Stats {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub recoveries: AtomicU64,
    pub failed_recoveries: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bad_frames: AtomicU64,
    pub buffer_overflows: AtomicU64,
    pub faults_dropped: AtomicU64,
    pub keep_alive_drops: AtomicU64,
    pub upstream_requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub rest_requests: AtomicU64,
}

impl Stats {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The whole server's shared state.
pub(crate) struct Server {
    pub config: Config,
    pub access_key: String,
    pub port: u16,
    /// The host that URLs name: the listen host, or a loopback address for every interface.
    pub public_host: String,
    pub hubs: DashMap<String, Arc<Hub>>,
    pub stats: Stats,
    pub upstream: Option<Upstream>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Client connections at once, up to `config.max_connections`.
    pub slots: Slots,
}

impl Server {
    /// The hub of that name (case-insensitive), created on first use.
    fn hub(&self, name: &str) -> Arc<Hub> {
        let key = name.to_ascii_lowercase();
        if let Some(h) = self.hubs.get(&key) {
            return h.clone();
        }
        self.hubs
            .entry(key)
            .or_insert_with(|| Arc::new(Hub::new(name)))
            .clone()
    }

    /// Runs `f` on the hub of that name (created if need be), which is not forgotten
    /// meanwhile; afterwards it is forgotten if nothing in it lasts.
    pub(crate) fn with_hub<T>(&self, name: &str, f: impl FnOnce(&Arc<Hub>) -> T) -> T {
        loop {
            let hub = self.hub(name);
            let live = hub.live.read();
            if !*live {
                continue; // forgotten since it was looked up: take the new one
            }
            let out = f(&hub);
            drop(live);
            self.release_hub(&hub);
            return out;
        }
    }

    /// Forgets the hub if nothing in it lasts and no [`Server::with_hub`] is using it.
    fn release_hub(&self, hub: &Hub) {
        self.hubs.remove_if(&hub.name.to_ascii_lowercase(), |_, h| {
            std::ptr::eq(&**h, hub) && h.retire_if_idle()
        });
    }

    /// The hub of that name if it exists.
    pub(crate) fn existing_hub(&self, name: &str) -> Option<Arc<Hub>> {
        self.hubs.get(&name.to_ascii_lowercase()).map(|h| h.clone())
    }

    /// `http(s)://host:port`.
    pub(crate) fn endpoint(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}", self.public_host, self.port)
    }

    /// Total connections over all hubs.
    pub(crate) fn connection_count(&self) -> usize {
        self.hubs.iter().map(|h| h.connections.len()).sum()
    }

    /// What the server holds right now, over all hubs.
    pub(crate) fn held(&self) -> Held {
        let mut held = Held {
            slots_taken: self.slots.taken(),
            tasks: self.tasks.len(),
            ..Held::default()
        };
        for hub in self.hubs.iter() {
            held.groups += hub.groups.len();
            held.users += hub.users.len();
            held.user_groups += hub.user_groups.len();
            for conn in hub.connections.iter() {
                held.pending_invocations += conn.invocations.lock().len();
                let st = conn.state.lock();
                held.unacked_messages += st.buffer.len();
                match &st.socket {
                    Some(sock) => held.outbound_bytes += sock.queued_bytes(),
                    None => held.awaiting_recovery += usize::from(!st.closed),
                }
            }
        }
        held
    }
}

/// What a server holds at one moment (served by `GET /_emulator/stats`): back to its
/// baseline once the connections that made it are gone.
#[derive(Default)]
pub(crate) struct Held {
    /// Groups with members.
    pub groups: usize,
    /// Users with connections.
    pub users: usize,
    /// Users with group memberships made through REST (these last by design).
    pub user_groups: usize,
    /// Reliable sessions without a socket, waiting for their recovery.
    pub awaiting_recovery: usize,
    /// Taken `max_connections` slots.
    pub slots_taken: usize,
    /// Reliable messages not acknowledged yet.
    pub unacked_messages: usize,
    /// Bytes queued to sockets and not yet taken by their writers.
    pub outbound_bytes: usize,
    /// Invocations waiting for the upstream.
    pub pending_invocations: usize,
    /// Server tasks running (connections, sessions, recovery windows, upstream posts).
    pub tasks: usize,
}

/// A set of connections (a group's members or a user's connections).
#[derive(Default)]
pub(crate) struct Members {
    pub members: RwLock<HashMap<String, Arc<Conn>>>,
}

/// One hub.
pub(crate) struct Hub {
    pub name: String,
    pub connections: DashMap<String, Arc<Conn>>,
    pub groups: DashMap<String, Arc<Members>>,
    pub users: DashMap<String, Arc<Members>>,
    /// Groups a user was added to through REST: applied to the user's new connections.
    pub user_groups: DashMap<String, HashSet<String>>,
    /// False once forgotten; read-locked by [`Server::with_hub`] while in use.
    live: RwLock<bool>,
}

fn add_member(map: &DashMap<String, Arc<Members>>, key: &str, conn: &Arc<Conn>) {
    map.entry(key.to_owned())
        .or_default()
        .members
        .write()
        .insert(conn.id.clone(), conn.clone());
}

fn remove_member(map: &DashMap<String, Arc<Members>>, key: &str, conn_id: &str) {
    if let Some(m) = map.get(key) {
        m.members.write().remove(conn_id);
    }
    map.remove_if(key, |_, m| m.members.read().is_empty());
}

fn publish(members: &Members, p: &Publication, pick: impl Fn(&Conn) -> bool) {
    for c in members.members.read().values() {
        if pick(c) {
            c.send_data(p);
        }
    }
}

impl Hub {
    fn new(name: &str) -> Self {
        Hub {
            name: name.to_owned(),
            connections: DashMap::new(),
            groups: DashMap::new(),
            users: DashMap::new(),
            user_groups: DashMap::new(),
            live: RwLock::new(true),
        }
    }

    /// Marks the hub forgotten if nothing in it lasts and nobody is using it; true if so.
    fn retire_if_idle(&self) -> bool {
        let Some(mut live) = self.live.try_write() else {
            return false;
        };
        let idle = self.connections.is_empty()
            && self.user_groups.is_empty()
            && self.groups.is_empty()
            && self.users.is_empty();
        if idle {
            *live = false;
        }
        idle
    }

    /// Registers a new connection and joins its initial groups.
    pub(crate) fn register(self: &Arc<Self>, conn: &Arc<Conn>, groups: &[String]) {
        self.connections.insert(conn.id.clone(), conn.clone());
        if let Some(user) = &conn.user_id {
            {
                let _changing = conn.membership.lock();
                if !conn.is_closed() {
                    add_member(&self.users, user, conn);
                }
            }
            let persisted: Vec<String> = self
                .user_groups
                .get(user)
                .map(|g| g.iter().cloned().collect())
                .unwrap_or_default();
            for g in persisted {
                self.join(conn, &g);
            }
        }
        for g in groups {
            self.join(conn, g);
        }
    }

    /// Adds a connection to a group (idempotent). False when it is in as many groups as
    /// it may be and not in this one (nothing changes).
    pub(crate) fn join(&self, conn: &Arc<Conn>, group: &str) -> bool {
        let _changing = conn.membership.lock();
        if conn.is_closed() {
            return true;
        }
        {
            let mut groups = conn.groups.lock();
            if !groups.contains(group) {
                if groups.len() >= conn.max_groups {
                    return false;
                }
                groups.insert(group.to_owned());
            }
        }
        add_member(&self.groups, group, conn);
        true
    }

    /// Removes a connection from a group (idempotent).
    pub(crate) fn leave(&self, conn: &Conn, group: &str) {
        let _changing = conn.membership.lock();
        conn.groups.lock().remove(group);
        remove_member(&self.groups, group, &conn.id);
    }

    /// Forgets a connection: out of every map, its socket (if any) closed abruptly
    /// unless a close was already queued. The upstream's `disconnected` gives the
    /// reason the session was closed with, else `reason`. Idempotent.
    pub(crate) fn remove(&self, conn: &Arc<Conn>, reason: Option<&str>) {
        let reason = {
            let mut st = conn.state.lock();
            st.end(reason);
            if let Some(sock) = st.socket.take() {
                sock.kill.cancel();
            }
            st.buffer.clear();
            st.buffered_bytes = 0;
            if let Some(away) = st.away.take() {
                away.cancel();
            }
            st.end_reason.clone()
        };
        let removed = self
            .connections
            .remove_if(&conn.id, |_, c| Arc::ptr_eq(c, conn))
            .is_some();
        // Closed above, so once a join or a user entry under way is done, no other starts.
        let groups: Vec<String> = {
            let _changing = conn.membership.lock();
            if let Some(user) = &conn.user_id {
                remove_member(&self.users, user, &conn.id);
            }
            conn.groups.lock().drain().collect()
        };
        for g in groups {
            remove_member(&self.groups, &g, &conn.id);
        }
        for (_, h) in conn.invocations.lock().drain() {
            h.abort();
        }
        conn.slot.lock().take();
        if removed {
            if let Some(server) = conn.server.upgrade() {
                Stats::inc(&server.stats.connections_closed);
                if let Some(up) = &server.upstream {
                    let target = Target::of(&self.name, conn);
                    up.system_event(&server, &target, "disconnected", reason.as_deref());
                }
                server.release_hub(self);
            }
        }
    }

    /// Ends a session for good: a `disconnected` system frame with the reason (JSON
    /// protocols), a close frame with `code` and the reason, then forgotten.
    pub(crate) fn close(&self, conn: &Arc<Conn>, code: u16, reason: &str) {
        conn.close_socket(code, reason, reason, true);
        self.remove(conn, None);
    }

    /// Ends a session for good at the application server's request (a REST close), as
    /// the service does: `disconnected` "Application server closed the connection.
    /// Reason: {reason}" and a close frame 1000 without a reason, which a simple client
    /// (no `disconnected` frame) gets the text in instead. A reliable client takes the
    /// normal close for a drop, and its recovery is refused with 1008.
    pub(crate) fn close_by_application(&self, conn: &Arc<Conn>, reason: Option<&str>) {
        let message = match reason.filter(|r| !r.is_empty()) {
            Some(r) => format!("Application server closed the connection. Reason: {r}"),
            None => "Application server closed the connection.".to_owned(),
        };
        let frame_reason = if conn.protocol == Protocol::Simple {
            message.as_str()
        } else {
            ""
        };
        conn.close_socket(NORMAL_CLOSE, &message, frame_reason, true);
        self.remove(conn, None);
    }

    /// Delivers a publication to every member of a group that `pick` accepts.
    pub(crate) fn publish_group(&self, group: &str, p: &Publication, pick: impl Fn(&Conn) -> bool) {
        if let Some(members) = self.groups.get(group).map(|m| m.clone()) {
            publish(&members, p, pick);
        }
    }

    /// Delivers a publication to every connection of a user that `pick` accepts.
    pub(crate) fn publish_user(&self, user: &str, p: &Publication, pick: impl Fn(&Conn) -> bool) {
        if let Some(members) = self.users.get(user).map(|m| m.clone()) {
            publish(&members, p, pick);
        }
    }

    /// Delivers a publication to every connection of the hub that `pick` accepts.
    pub(crate) fn publish_all(&self, p: &Publication, pick: impl Fn(&Conn) -> bool) {
        for c in self.connections.iter() {
            if pick(&c) {
                c.send_data(p);
            }
        }
    }

    /// The connections of a user (snapshot).
    pub(crate) fn user_connections(&self, user: &str) -> Vec<Arc<Conn>> {
        self.users
            .get(user)
            .map(|m| m.members.read().values().cloned().collect())
            .unwrap_or_default()
    }

    /// The connections of a group (snapshot).
    pub(crate) fn group_connections(&self, group: &str) -> Vec<Arc<Conn>> {
        self.groups
            .get(group)
            .map(|m| m.members.read().values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Mutable send state of a connection.
pub(crate) struct ConnState {
    pub socket: Option<SocketHandle>,
    /// Incremented on every attach, so a stale socket's end does not detach a newer one.
    pub epoch: u64,
    pub closed: bool,
    pub last_seq: u64,
    /// Reliable: frames sent but not covered by the client's sequenceAck.
    pub buffer: VecDeque<(u64, Utf8Bytes)>,
    pub buffered_bytes: usize,
    /// Fault: until then nothing is sent (frames are discarded, not queued).
    pub muted_until: Option<Instant>,
    /// Fault: this many acks are still to be swallowed.
    pub drop_acks: u64,
    /// While detached: cancelled once a socket is attached again or the session is
    /// forgotten, which ends its recovery window early.
    pub away: Option<CancellationToken>,
    /// Why the session ended, once it has (None: no reason given).
    pub end_reason: Option<String>,
}

impl ConnState {
    /// Marks the session closed; the first non-empty reason given is the one kept.
    fn end(&mut self, reason: Option<&str>) {
        self.closed = true;
        if self.end_reason.is_none() {
            self.end_reason = reason.filter(|r| !r.is_empty()).map(str::to_owned);
        }
    }
}

/// Recently processed ackIds of a connection, for `Duplicate`.
pub(crate) struct AckWindow {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
    capacity: usize,
}

impl AckWindow {
    fn new(capacity: usize) -> Self {
        AckWindow {
            order: VecDeque::new(),
            seen: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records an ackId; false when it was already recorded.
    pub(crate) fn insert(&mut self, ack_id: u64) -> bool {
        if !self.seen.insert(ack_id) {
            return false;
        }
        self.order.push_back(ack_id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Forgets an ackId whose operation failed: it was not processed, so a retry with
    /// it is processed again instead of being answered with `Duplicate`.
    pub(crate) fn forget(&mut self, ack_id: u64) {
        if self.seen.remove(&ack_id) {
            self.order.retain(|id| *id != ack_id);
        }
    }
}

/// Which limit a connection went over.
enum Overflow {
    /// The reliable replay buffer.
    Reliable,
    /// The socket's outbound queue.
    Outbound,
    /// The socket's outbound queue, by the frames a recovery replays.
    Replay,
}

/// One logical client connection; with the reliable protocol it outlives its sockets.
pub(crate) struct Conn {
    pub id: String,
    pub user_id: Option<String>,
    pub protocol: Protocol,
    /// The subprotocol answered in the handshake (none: a simple client without one).
    pub subprotocol: Option<String>,
    pub reconnection_token: String,
    pub roles: Vec<String>,
    /// Per-group permissions set through REST (true granted, false revoked); for its
    /// group, one takes precedence over the roles.
    overrides: RwLock<HashMap<(Permission, String), bool>>,
    pub groups: Mutex<HashSet<String>>,
    /// Held while its group memberships or its user entry change: a join and a leave at
    /// once leave it in a group in both the group's and its own view, or in neither, and
    /// a join or a user entry racing the connection's removal is undone by it or not made.
    membership: Mutex<()>,
    pub state: Mutex<ConnState>,
    pub acks: Mutex<AckWindow>,
    /// The state the upstream keeps for it (`ce-connectionState`; empty: none).
    pub upstream_state: Mutex<String>,
    /// Pending upstream invocations, aborted by `cancelInvocation`.
    pub invocations: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    pub server: Weak<Server>,
    /// Held by the reader of the attached socket: a recovery's reader waits until the
    /// previous socket's reader has finished the frame it was handling.
    pub reading: tokio::sync::Mutex<()>,
    max_unacked_frames: usize,
    max_unacked_bytes: usize,
    /// Groups it may be in at once.
    max_groups: usize,
    /// Its share of `max_connections`, given back when it is forgotten.
    slot: Mutex<Option<Slot>>,
}

/// Random identifier of `len` alphanumeric characters.
pub(crate) fn random_id(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// A new connection id.
pub(crate) fn new_connection_id() -> String {
    random_id(22)
}

impl Conn {
    /// A new, not yet attached connection of that id (see [`new_connection_id`]) speaking
    /// `subprotocol`, holding `slot` (none: outside the budget).
    pub(crate) fn new(
        server: &Arc<Server>,
        id: String,
        user_id: Option<String>,
        subprotocol: Option<String>,
        roles: Vec<String>,
        slot: Option<Slot>,
    ) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            user_id,
            protocol: Protocol::of(subprotocol.as_deref()),
            subprotocol,
            reconnection_token: random_id(40),
            roles,
            overrides: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashSet::new()),
            membership: Mutex::new(()),
            state: Mutex::new(ConnState {
                socket: None,
                epoch: 0,
                closed: false,
                last_seq: 0,
                buffer: VecDeque::new(),
                buffered_bytes: 0,
                muted_until: None,
                drop_acks: 0,
                away: None,
                end_reason: None,
            }),
            acks: Mutex::new(AckWindow::new(server.config.ack_window)),
            upstream_state: Mutex::new(String::new()),
            invocations: Mutex::new(HashMap::new()),
            server: Arc::downgrade(server),
            reading: tokio::sync::Mutex::new(()),
            max_unacked_frames: server.config.max_unacked_frames,
            max_unacked_bytes: server.config.max_unacked_bytes,
            max_groups: server.config.max_groups_per_connection,
            slot: Mutex::new(slot),
        })
    }

    /// Why a join was refused when it is in as many groups as it may be.
    pub(crate) fn too_many_groups(&self) -> String {
        format!(
            "The connection is already in {} groups, the most it may join.",
            self.max_groups
        )
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Does a REST `filter` select this connection?
    pub(crate) fn matches(&self, filter: &Filter) -> bool {
        let none = HashSet::new();
        let joined;
        let groups = if filter.uses_groups() {
            joined = self.groups.lock();
            &*joined
        } else {
            &none
        };
        filter.matches(&Subject {
            connection_id: &self.id,
            user_id: self.user_id.as_deref(),
            groups,
        })
    }

    /// May this connection do `perm` on `group`?
    pub(crate) fn allowed(&self, perm: Permission, group: &str) -> bool {
        let overrides = self.overrides.read();
        if !overrides.is_empty() {
            if let Some(&allow) = overrides.get(&(perm, group.to_owned())) {
                return allow;
            }
        }
        self.roles.iter().any(|r| role_grants(r, perm, group))
    }

    /// Grants (`allow`) or revokes `perm` on `group` alone, whatever the roles say.
    pub(crate) fn set_permission(&self, perm: Permission, group: &str, allow: bool) {
        self.overrides
            .write()
            .insert((perm, group.to_owned()), allow);
    }

    /// Queues a frame to the attached socket, honouring mute. Returns false when the
    /// outbound queue is full (the caller ends the session).
    fn push(st: &mut ConnState, msg: Message) -> bool {
        if let Some(until) = st.muted_until {
            if Instant::now() < until {
                return true;
            }
            st.muted_until = None;
        }
        st.socket.as_ref().is_none_or(|sock| sock.push(msg))
    }

    /// Sends a non-data frame (connected, pong, invokeResponse).
    pub(crate) fn send_control(self: &Arc<Self>, msg: Message) {
        let full = {
            let mut st = self.state.lock();
            !st.closed && !Self::push(&mut st, msg)
        };
        if full {
            self.overflow(Overflow::Outbound);
        }
    }

    /// Sends an ack, unless the `:dropAcks` fault swallows it.
    pub(crate) fn send_ack(self: &Arc<Self>, msg: Message) {
        let full = {
            let mut st = self.state.lock();
            if st.drop_acks > 0 {
                st.drop_acks -= 1;
                return;
            }
            !st.closed && !Self::push(&mut st, msg)
        };
        if full {
            self.overflow(Overflow::Outbound);
        }
    }

    /// Delivers a data message: with the reliable protocol it gets the next sequence id
    /// and is buffered until acknowledged (also while no socket is attached).
    pub(crate) fn send_data(self: &Arc<Self>, p: &Publication) {
        let problem = {
            let mut st = self.state.lock();
            if st.closed {
                return;
            }
            match self.protocol {
                Protocol::Simple => (!Self::push(&mut st, p.raw())).then_some(Overflow::Outbound),
                Protocol::Json => (!Self::push(&mut st, p.json())).then_some(Overflow::Outbound),
                Protocol::JsonReliable => {
                    st.last_seq += 1;
                    let seq = st.last_seq;
                    let text = p.json_with_sequence(seq);
                    st.buffered_bytes += text.len();
                    st.buffer.push_back((seq, text.clone()));
                    if st.buffer.len() > self.max_unacked_frames
                        || st.buffered_bytes > self.max_unacked_bytes
                    {
                        Some(Overflow::Reliable)
                    } else {
                        (!Self::push(&mut st, Message::Text(text))).then_some(Overflow::Outbound)
                    }
                }
            }
        };
        if let Some(what) = problem {
            self.overflow(what);
        }
    }

    /// Ends the session for good because a buffer or queue overflowed.
    fn overflow(self: &Arc<Self>, what: Overflow) {
        let Some(server) = self.server.upgrade() else {
            return;
        };
        Stats::inc(&server.stats.buffer_overflows);
        let why = match what {
            Overflow::Reliable => format!(
                "the reliable buffer overflowed (limits: {} unacknowledged messages, {} bytes)",
                self.max_unacked_frames, self.max_unacked_bytes
            ),
            Overflow::Outbound => format!(
                "the client does not read: its outbound queue is full (limits: {} frames, {} bytes)",
                server.config.max_outbound_queue, server.config.max_outbound_bytes
            ),
            Overflow::Replay => format!(
                "the unacknowledged messages to replay do not fit in the outbound queue (limit: {} frames)",
                server.config.max_outbound_queue
            ),
        };
        let reason = format!("{why}; the connection is closed and cannot be recovered");
        tracing::warn!(connection = %self.id, "{reason}");
        self.close_socket(POLICY_CLOSE, &reason, &reason, true);
        // Removal takes group locks that a publisher may hold right now: do it later.
        let conn = self.clone();
        let hubs: Vec<Arc<Hub>> = server.hubs.iter().map(|h| h.clone()).collect();
        tokio::spawn(async move {
            for h in hubs {
                if h.connections.get(&conn.id).is_some() {
                    h.remove(&conn, None);
                }
            }
        });
    }

    /// Marks the session closed for `reason` (when not empty) and queues `disconnected`
    /// with it (JSON protocols, when `announce`) and a close frame with `code` and
    /// `frame_reason` to the attached socket, using the reserved headroom.
    pub(crate) fn close_socket(&self, code: u16, reason: &str, frame_reason: &str, announce: bool) {
        let mut st = self.state.lock();
        st.end(Some(reason));
        if let Some(sock) = st.socket.take() {
            if announce && self.protocol != Protocol::Simple {
                sock.send(frames::disconnected(reason));
            }
            if !sock.close(code, frame_reason) {
                sock.kill.cancel();
            }
        }
    }

    /// Drops the attached socket at once, without a close frame. The session stays.
    pub(crate) fn drop_socket(&self) -> bool {
        let st = self.state.lock();
        match &st.socket {
            Some(sock) => {
                sock.kill.cancel();
                true
            }
            None => false,
        }
    }

    /// Attaches a socket: drops a previous one, queues `connected` (JSON protocols) first and then, on a
    /// recovery, every unacknowledged frame in order. A replay that does not fit in the
    /// socket's queue could never be delivered: the session then ends for good, as an
    /// overflow, on the new socket. Returns the socket's epoch, or None when the session
    /// is closed.
    pub(crate) fn attach(
        self: &Arc<Self>,
        sock: SocketHandle,
        connected: Option<Message>,
    ) -> Option<u64> {
        let (epoch, fits) = {
            let mut st = self.state.lock();
            if st.closed {
                return None;
            }
            if let Some(old) = st.socket.take() {
                old.kill.cancel();
            }
            if let Some(away) = st.away.take() {
                away.cancel();
            }
            st.epoch += 1;
            st.muted_until = None;
            let fits = sock.fits(usize::from(connected.is_some()) + st.buffer.len());
            if fits {
                if let Some(c) = connected {
                    sock.send(c);
                }
                for (_, text) in &st.buffer {
                    sock.send(Message::Text(text.clone()));
                }
            }
            st.socket = Some(sock);
            (st.epoch, fits)
        };
        if !fits {
            self.overflow(Overflow::Replay);
        }
        Some(epoch)
    }

    /// Detaches the socket of that epoch. None when a newer socket is attached; else a
    /// token cancelled once a socket is attached again or the session is forgotten.
    pub(crate) fn detach(&self, epoch: u64) -> Option<CancellationToken> {
        let mut st = self.state.lock();
        if st.epoch != epoch {
            return None;
        }
        st.socket = None;
        let away = CancellationToken::new();
        st.away = Some(away.clone());
        Some(away)
    }

    /// Still detached since that epoch (the recovery window is running out)?
    pub(crate) fn detached_since(&self, epoch: u64) -> bool {
        let st = self.state.lock();
        st.epoch == epoch && st.socket.is_none() && !st.closed
    }

    /// The client acknowledged every frame up to `seq`.
    pub(crate) fn sequence_ack(&self, seq: u64) {
        let mut st = self.state.lock();
        while let Some((s, text)) = st.buffer.front() {
            if *s > seq {
                break;
            }
            let len = text.len();
            st.buffer.pop_front();
            st.buffered_bytes -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AckWindow;

    #[test]
    fn ack_window_forgets_oldest() {
        let mut w = AckWindow::new(2);
        assert!(w.insert(1));
        assert!(!w.insert(1));
        assert!(w.insert(2));
        assert!(w.insert(3));
        assert!(w.insert(1));
        assert!(!w.insert(3));
    }

    #[test]
    fn a_forgotten_ack_id_is_new_again_and_frees_its_place() {
        let mut w = AckWindow::new(2);
        assert!(w.insert(1));
        assert!(w.insert(2));
        w.forget(1);
        w.forget(7);
        assert!(w.insert(3), "1's place is free: 2 stays");
        assert!(!w.insert(2));
        assert!(w.insert(1));
    }
}
