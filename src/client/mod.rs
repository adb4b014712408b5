//! The async client: a cheap handle ([`Client`]) over one connection task per client.
//!
//! The task runs on the crate's own [runtime](crate::runtime), whatever runtime the
//! caller uses. Every method encodes its frame on the caller's thread and hands it to
//! the task, which owns the socket and the state machine (an awaited acked operation on
//! an idle client, and a flushed run of deferred ones, are written by their caller
//! instead, and the task takes them over from there). Replies come back over a oneshot
//! channel, so the methods work from any executor. At most 999 acked operations are in
//! flight, callers' own writes included (the service remembers a connection's last
//! 1000 ackIds, which is what makes a resend after a recovery safe); later ones wait
//! their turn.

// The task is `connection.rs`, the caller's own write `direct.rs`. The crate's C layer
// builds the same operations from the caller's borrowed buffers (`group_message` and
// the like, each a `Prepared` frame) and either awaits them (`run`) or starts them with
// a completion callback (`start_then`: no task, no channel per operation).

mod ack_ids;
mod connection;
mod credential;
mod direct;
mod options;
mod pending;
mod queue;
mod sequence;

pub use credential::{Credential, UrlProvider};
pub use options::{ClientOptions, RetryMode, RetryOptions};

use crate::protocol::{json, Data, DataType, ProtocolError, Upstream};
use bytes::Bytes;
use connection::{Command, Shared};
use direct::Written;
pub(crate) use pending::AckCallback;
use pending::{AckReply, OpKind, Operation, Purpose};
pub(crate) use queue::Handover;
use queue::OpSender;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The connection state of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientState {
    /// Not started, stopped, or given up reconnecting; operations fail with
    /// `Error::IllegalState`.
    Stopped,
    /// Opening a new connection (`start` or an automatic reconnect): from the moment
    /// `start` hands its command to a stopped client, as with the official clients. A
    /// start behind a stop still in progress is taken once that stop is done.
    /// Operations fail at once with `Error::NotConnected` (wait for `Event::Connected`).
    Connecting,
    /// Connected; operations are sent at once.
    Connected,
    /// The socket dropped and the same session is being recovered; operations queue.
    /// Once 16,384 are queued (or 16 MiB of fire-and-forget frames, or 999 acked ones
    /// are pending), new ones fail at once with `Error::NotConnected` instead of
    /// waiting for the recovery. Once a recovery's socket opens, the client is
    /// `Connected` and writes them, before the service's `connected` frame confirms the
    /// session (as the official clients do): should the service refuse it (1008), the
    /// session is lost, and the acked ones fail with `Error::NotConnected` and their
    /// ackIds.
    Recovering,
    /// The session was lost; waiting before the next reconnect attempt. Operations fail
    /// at once with `Error::NotConnected`.
    Disconnected,
}

/// What happened on the connection, delivered in order to the [`EventHandler`]. More
/// kinds may come in later versions: a `match` needs a `_` arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new connection is ready (not raised again after a recovery). With
    /// `auto_rejoin_groups`, its rejoins are queued but not yet acked: a message
    /// published to such a group before the service takes the rejoin is not delivered,
    /// and a rejoin that fails raises `RejoinGroupFailed`.
    Connected {
        /// The service's id of this connection.
        connection_id: String,
        /// The user id of the token, if any.
        user_id: Option<String>,
    },
    /// The session was lost (or stopped); an automatic reconnect may follow. When a
    /// recovery failed (the service refused it with 1008 before confirming it by its
    /// `connected` frame or any other frame of the session, answered it as another
    /// connection, or its window ran out), `message` and `close_code` tell how the
    /// connection dropped, not how the recovery ended (that is logged).
    Disconnected {
        /// The id of the connection that was lost.
        connection_id: Option<String>,
        /// The service's reason (`system`/`disconnected` frame) or the close reason;
        /// `stopped by the client` for a `stop`, the error of a panic (`Error::Internal`).
        message: Option<String>,
        /// The WebSocket close code, when a close frame arrived; 1000 for a `stop`.
        close_code: Option<u16>,
    },
    /// The client stopped: by `stop`, or on its own. Not raised by a failed `start` (its
    /// error is the call's), by a `stop` of a stopped client, or once the client is
    /// dropped, unless its connection task panicked then.
    Stopped {
        /// Why it stopped on its own: the last attempt's error once the reconnect policy
        /// gave up, `Error::NotConnected` for a session lost with `auto_reconnect` off
        /// (the `Disconnected` event before it tells why), or `Error::Internal` when its
        /// connection task panicked (a bug in the library). `None` when `stop` stopped it.
        error: Option<Error>,
    },
    /// A message from the server side.
    ServerMessage {
        /// How to read `data`.
        data_type: DataType,
        /// The payload (see [`Data`]).
        data: Bytes,
        /// The sequence id on reliable protocols.
        sequence_id: Option<u64>,
    },
    /// A message published to a joined group.
    GroupMessage {
        /// The group.
        group: String,
        /// The publisher's user id, if any.
        from_user_id: Option<String>,
        /// How to read `data`.
        data_type: DataType,
        /// The payload (see [`Data`]).
        data: Bytes,
        /// The sequence id on reliable protocols.
        sequence_id: Option<u64>,
    },
    /// Rejoining a group on a new connection failed.
    RejoinGroupFailed {
        /// The group that could not be rejoined.
        group: String,
        /// Why.
        error: Error,
    },
}

/// Receives a client's events, in order, on its connection task. Must not block (the
/// FFI enqueues to its dispatcher; Rust users may use [`Client::with_channel`]); it runs
/// on the library's runtime, so it may `tokio::spawn` work, such as an operation of its
/// client (reached through a [`WeakClient`], which does not keep it alive). A panic in
/// a method (or in a [`Resume`] it returned) is caught and logged: that event is
/// dropped (or reading goes on), and the client carries on. Any
/// `Fn(Event) + Send + Sync` closure is one. It may call its client's non-async
/// methods (`state`, `connection_id`), which already show the event's outcome (a
/// `Disconnected` handler finds the client disconnected). What it spawns runs on that
/// runtime too, shared by every client of the process: it must not block either.
pub trait EventHandler: Send + Sync {
    /// One event.
    fn on_event(&self, event: Event);

    /// Every event of one read from the socket went to `on_event`: a handler that hands
    /// events to another thread may wake it once per batch here. Not called for a read
    /// that raised no event; called after each event raised outside such a batch. Does
    /// nothing by default.
    fn on_batch_end(&self) {}

    /// Asked after each batch of frames read (and when a connection starts serving):
    /// `Some(resume)` when the handler holds more events than it wants. The client then
    /// reads nothing more from the socket until `resume` completes, so a slow consumer
    /// holds the service back (which buffers, or drops a slow connection) instead of
    /// growing the process's memory. Meanwhile operations are still written, keep-alive
    /// pings still go out, and neither ack timeouts nor the keep-alive timeout run (an
    /// operation's deadline moves by the pause). A consumer that awaits an operation of
    /// this client before it takes more events would wait for the pause: complete
    /// `resume` then (the C layer does so for its blocking calls). `None` (the default):
    /// never paused.
    fn backpressure(&self) -> Option<Resume> {
        None
    }
}

/// What [`EventHandler::backpressure`] returns: completes once reading may go on.
pub type Resume = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl<F: Fn(Event) + Send + Sync> EventHandler for F {
    fn on_event(&self, event: Event) {
        self(event)
    }
}

/// The outcome of an operation that was acked (or sent fire-and-forget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckResult {
    /// The ackId used; `None` for fire-and-forget.
    pub ack_id: Option<u64>,
    /// The service had already processed this ackId (a retry or a resend after a
    /// recovery): the operation took effect once.
    pub is_duplicated: bool,
}

/// The reply of an `invoke_event`. A reply without data (the upstream answered with an
/// empty body) is empty text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeResult {
    /// How to read `data`.
    pub data_type: DataType,
    /// The payload (see [`Data`]).
    pub data: Bytes,
}

/// Options of [`Client::send_to_group`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendToGroupOptions {
    /// Do not deliver the message back to this connection.
    pub no_echo: bool,
    /// Send without an ackId and return once queued. Sent at most once: one written to
    /// a connection that then drops is lost without an error, even on a reliable
    /// protocol (a recovery resends acked operations only), and so is one queued during
    /// a recovery that fails (it is written once the recovery's socket opens, before
    /// the service confirms the session, as the official clients do).
    pub fire_and_forget: bool,
    /// Use this ackId (at least 1, else `Error::InvalidArgument`; ignored with
    /// `fire_and_forget`) instead of the next one. It must not be in use by a
    /// pending operation (else `Error::InvalidArgument`), unless that is this very message,
    /// given up by its caller: then this waits for it. Automatic ackIds skip the latest 1000
    /// chosen ones: the service would answer a reused one with `Duplicate` and drop its
    /// message. (Rarely an automatic ackId drawn for a message is held by a pending
    /// operation and the message goes out under another: a resend with the drawn one goes
    /// under that one too, and its result carries it.)
    pub ack_id: Option<u64>,
}

/// Options of [`Client::send_event`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendEventOptions {
    /// Send without an ackId and return once queued. Sent at most once: one written to
    /// a connection that then drops is lost without an error, even on a reliable
    /// protocol (a recovery resends acked operations only), and so is one queued during
    /// a recovery that fails (it is written once the recovery's socket opens, before
    /// the service confirms the session, as the official clients do).
    pub fire_and_forget: bool,
    /// Use this ackId (at least 1, else `Error::InvalidArgument`; ignored with
    /// `fire_and_forget`) instead of the next one. It must not be in use by a
    /// pending operation (else `Error::InvalidArgument`), unless that is this very message,
    /// given up by its caller: then this waits for it. Automatic ackIds skip the latest 1000
    /// chosen ones: the service would answer a reused one with `Duplicate` and drop its
    /// message. (Rarely an automatic ackId drawn for a message is held by a pending
    /// operation and the message goes out under another: a resend with the drawn one goes
    /// under that one too, and its result carries it.)
    pub ack_id: Option<u64>,
}

/// Options of [`Client::invoke_event`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvokeOptions {
    /// How long to wait for the reply; `None` uses the client's `ack_timeout`. Above
    /// zero and at most u64::MAX milliseconds (else `Error::InvalidArgument`). It runs
    /// from the write: an invocation made during a recovery waits for the recovery too.
    pub timeout: Option<Duration>,
}

/// Every failure the client reports. More kinds may come in later versions: a `match`
/// needs a `_` arm.
///
/// What is worth retrying: the client has already retried (per `message_retry`) an
/// acked operation that ends in `Timeout` or in an `Ack` named `InternalServerError`,
/// and a resend with the error's `ack_id` is deduplicated by the service only on the
/// same connection (after a lost session the connection is a new one). `NotConnected`
/// passes once the client is connected again (`Event::Connected`, or a recovery's end,
/// which raises no event); `StartTimeout`, `Connect` and `Credential` from `start` may
/// pass on a later `start` (an HTTP 401 is a stale token). Any other `Ack`
/// (`Forbidden`, `BadRequest`), `Invoke`, `InvalidArgument`, `Tls` and `Protocol` would
/// fail again; after `Stopped`, or an operation's `IllegalState` (not started), the
/// client needs a `start`, and `Cancelled` is the application's own. An invocation is
/// never retried or resent: on its `Timeout` (`ack_id` `None`) the client writes
/// `cancelInvocation` and drops a reply that comes later, and one written before a drop
/// fails with `NotConnected` (a recovery does not resend it). Either way the upstream
/// may have handled the event, and a new `invoke_event` is a new invocation that
/// nothing deduplicates: retry only one whose upstream handler is idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A bad argument (empty group, invalid JSON payload, bad URL, ...).
    InvalidArgument(String),
    /// The call does not fit the client's state (not started, already started).
    IllegalState(String),
    /// There is no connection to send on: the client is connecting or waiting to
    /// reconnect, the connection was lost before the ack, or a recovery has queued as
    /// many operations as it takes.
    NotConnected {
        /// The ackId of an acked operation the client had taken in (sent, or queued to
        /// send) when its connection was lost; `None` when it was never taken in.
        ack_id: Option<u64>,
    },
    /// No ack or reply arrived in time.
    Timeout {
        /// The ackId of the acked operation that timed out (every retry used it, so a
        /// resend with it is deduplicated by the service); `None` for an invocation.
        ack_id: Option<u64>,
    },
    /// The start (or a reconnection) did not connect within `start_timeout`.
    StartTimeout {
        /// How long it waited.
        after: Duration,
        /// What the attempt was waiting for when the time ran out, as in
        /// `127.0.0.1:8080 to answer the WebSocket upgrade` or `the connected frame from
        /// example.webpubsub.azure.com`.
        waiting_for: String,
    },
    /// The operation was cancelled (the C API's `wps_client_cancel`). A Rust caller
    /// cancels by dropping the operation's future, which then reports nothing.
    Cancelled,
    /// The client was stopped before the operation completed (through the C API, also
    /// freed: a Rust operation borrows its client, which cannot be dropped meanwhile).
    Stopped {
        /// The ackId of an acked operation the client had taken in (sent, or queued to
        /// send) when it was stopped; `None` when it was never taken in.
        ack_id: Option<u64>,
    },
    /// The service refused the operation (`success:false` in the ack).
    Ack {
        /// The ackId of the refused operation.
        ack_id: u64,
        /// The service's error name, e.g. `Forbidden`.
        name: String,
        /// The service's detail.
        message: String,
    },
    /// The invocation failed (`success:false` in the invoke response).
    Invoke {
        /// The invocation id.
        invocation_id: String,
        /// The service's error name.
        name: String,
        /// The service's detail.
        message: String,
    },
    /// The connection could not be opened (transport, handshake, HTTP 401, ...). An HTTP
    /// refusal names the server, its status and the start of its text (the response
    /// body, tokens hidden), as in `127.0.0.1:8080 answered the WebSocket upgrade with
    /// HTTP 401 Unauthorized: "Unauthorized: the access token has expired."`.
    Connect(String),
    /// The credential provider failed.
    Credential(String),
    /// TLS setup or certificate verification failed.
    Tls(String),
    /// The service broke the protocol.
    Protocol(String),
    /// A bug in the library: the client's connection task panicked. The client stopped
    /// for good: a `start` fails with `Stopped`.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::IllegalState(m) => write!(f, "illegal state: {m}"),
            Error::NotConnected { ack_id: None } => f.write_str("not connected"),
            Error::NotConnected {
                ack_id: Some(ack_id),
            } => write!(
                f,
                "not connected: the connection was lost before the ack of operation {ack_id}"
            ),
            Error::Timeout { ack_id: None } => f.write_str("timed out"),
            Error::Timeout {
                ack_id: Some(ack_id),
            } => write!(f, "timed out waiting for the ack of operation {ack_id}"),
            Error::StartTimeout { after, waiting_for } => write!(
                f,
                "timed out after {} s waiting for {waiting_for}",
                after.as_secs_f64()
            ),
            Error::Cancelled => f.write_str("cancelled"),
            Error::Stopped { ack_id: None } => f.write_str("client stopped"),
            Error::Stopped {
                ack_id: Some(ack_id),
            } => write!(f, "client stopped before the ack of operation {ack_id}"),
            Error::Ack {
                ack_id,
                name,
                message,
            } => write!(f, "operation {ack_id} failed: {name}: {message}"),
            Error::Invoke {
                invocation_id,
                name,
                message,
            } => {
                write!(f, "invocation {invocation_id} failed: {name}: {message}")
            }
            Error::Connect(m) => write!(f, "connect failed: {m}"),
            Error::Credential(m) => write!(f, "credential failed: {m}"),
            Error::Tls(m) => write!(f, "TLS failed: {m}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The ackId of the acked operation this error ended: the refused one, the one that
    /// timed out, or the one whose connection was lost or whose client was stopped.
    /// `None` for every other error.
    pub fn ack_id(&self) -> Option<u64> {
        match self {
            Error::Ack { ack_id, .. } => Some(*ack_id),
            Error::NotConnected { ack_id }
            | Error::Timeout { ack_id }
            | Error::Stopped { ack_id } => *ack_id,
            _ => None,
        }
    }

    /// The service's own text of a refusal (`Ack` or `Invoke`), without the library's
    /// description of the operation around it. `None` for every other error.
    pub fn service_message(&self) -> Option<&str> {
        match self {
            Error::Ack { message, .. } | Error::Invoke { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A Web PubSub client. Cheap to clone (an `Arc` inside); `Send + Sync`. Dropping the
/// last clone writes the fire-and-forget messages already queued, as a `stop` does,
/// then closes its connection (close code 1001, going away) and ends its connection
/// task, raising no event (not `Stopped` either). A clone held by the client's own
/// event handler counts too, and would keep the client (and its connection) alive after
/// the application dropped its own: give the handler a [`WeakClient`]
/// ([`Client::downgrade`]) instead.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A handle on a [`Client`] that does not keep it alive, for the client's own event
/// handler: [`WeakClient::upgrade`] gives the client while the application still holds
/// a handle, `None` after. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct WeakClient {
    inner: Weak<Inner>,
}

impl WeakClient {
    /// The client, unless every [`Client`] handle is gone (it is then stopping or
    /// stopped for good).
    pub fn upgrade(&self) -> Option<Client> {
        self.inner.upgrade().map(|inner| Client { inner })
    }
}

impl fmt::Debug for WeakClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakClient")
            .field("alive", &(self.inner.strong_count() > 0))
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    operations: OpSender,
    ack_timeout: Duration,
    max_outgoing: usize,
    next_invocation_id: AtomicU64,
    /// Held while a start or a stop is handed over: a stop that found the client
    /// `Connecting` because of a start being handed over follows that start.
    start_stop: std::sync::Mutex<()>,
}

/// See [`Client::end_watch`].
pub(crate) struct EndWatch(Arc<Shared>);

impl EndWatch {
    /// Blocks until the connection task has ended, at most `limit`; whether it has.
    pub(crate) fn wait(&self, limit: Duration) -> bool {
        self.0.wait_ended(limit)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("state", &self.state())
            .field("connection_id", &self.connection_id())
            .finish()
    }
}

impl Client {
    /// Creates a stopped client; events go to `on_event`. Fails with
    /// `Error::InvalidArgument` on invalid options or a fixed URL that is not a ws/wss
    /// (or http/https) URL, and with `Error::IllegalState` when the runtime cannot be
    /// used (see [`crate::runtime::try_handle`]).
    pub fn new(
        credential: Credential,
        options: ClientOptions,
        on_event: Arc<dyn EventHandler>,
    ) -> Result<Client, Error> {
        options.validate().map_err(Error::InvalidArgument)?;
        if let Credential::Url(url) = &credential {
            credential::normalize_url(url).map_err(Error::InvalidArgument)?;
        }
        let ack_timeout = options.ack_timeout;
        let max_outgoing = options.max_outgoing_message_size;
        let runtime =
            crate::runtime::try_handle().map_err(|e| Error::IllegalState(e.to_string()))?;
        let (shared, commands, operations) =
            connection::spawn(&runtime, credential, options, on_event);
        Ok(Client {
            inner: Arc::new(Inner {
                commands,
                operations: OpSender::new(
                    operations,
                    shared.overflow.clone(),
                    runtime,
                    shared.direct.clone(),
                ),
                shared,
                ack_timeout,
                max_outgoing,
                next_invocation_id: AtomicU64::new(1),
                start_stop: std::sync::Mutex::new(()),
            }),
        })
    }

    /// Like [`Client::new`], with the events delivered to an unbounded channel: a
    /// receiver that falls behind lets it grow. An [`EventHandler`] of your own can
    /// bound it with [`EventHandler::backpressure`]. The channel ends once every
    /// `Client` handle is dropped, not at a `stop` (the client may start again).
    pub fn with_channel(
        credential: Credential,
        options: ClientOptions,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Event>), Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = Client::new(
            credential,
            options,
            Arc::new(move |event| {
                let _ = tx.send(event);
            }),
        )?;
        Ok((client, rx))
    }

    /// Opens the connection: gets the URL, connects and waits for the service's
    /// `connected` frame (bounded by `start_timeout`); returns after the `Connected`
    /// event. One attempt; later losses are handled by recovery and auto-reconnect. A
    /// start that fails on its own raises no event; a `stop` meanwhile ends it with
    /// `Error::Stopped` (and raises `Stopped`). `Error::IllegalState` when the client
    /// is not stopped.
    ///
    /// Cancel safety: the first poll hands the start to the client. Dropping the
    /// future after that only ends the wait: the attempt goes on, and within
    /// `start_timeout` the client is connected or stopped again. Meanwhile another
    /// `start` fails with `Error::IllegalState`; `stop` ends the attempt. A future
    /// dropped before its first poll does nothing.
    pub async fn start(&self) -> Result<(), Error> {
        self.start_now()?.await
    }

    /// [`Client::start`]'s command handed to the connection task at once, on the calling
    /// thread (so it keeps its place among the caller's later commands); the future
    /// gives its outcome.
    pub(crate) fn start_now(
        &self,
    ) -> Result<impl Future<Output = Result<(), Error>> + Send + 'static, Error> {
        let (tx, rx) = oneshot::channel();
        let order = self.start_stop_order();
        // Before the command: the task's handling of it sets the state last.
        self.inner.shared.start_queued();
        if let Err(e) = self.command(Command::Start(tx)) {
            self.inner.shared.start_unqueued();
            return Err(e);
        }
        drop(order);
        let shared = Arc::clone(&self.inner.shared);
        Ok(async move {
            let reply = shared.reply(rx).await;
            reply.unwrap_or(Err(Error::Stopped { ack_id: None }))
        })
    }

    /// Closes the connection and stops reconnecting. Fire-and-forget messages whose
    /// send returned before this call are written before the close frame (not during
    /// a recovery, when there is no socket: they are dropped); acked
    /// operations still pending fail with `Error::Stopped`. Returns once stopped
    /// (after the `Stopped` event): the closing handshake waits at most 1 s for the
    /// service's close frame. Stopping a stopped client does nothing (no event). Joined
    /// groups are rejoined by the next `start` (with `auto_rejoin_groups`), as the
    /// official clients do.
    ///
    /// Cancel safety: the first poll hands the stop to the client. Dropping the future
    /// after that only ends the wait: the client still stops, and a later `start`
    /// comes after the stop. A future dropped before its first poll does nothing.
    pub async fn stop(&self) {
        self.stop_now().await
    }

    /// [`Client::stop`]'s command handed over at once, as [`Client::start_now`]'s.
    pub(crate) fn stop_now(&self) -> impl Future<Output = ()> + Send + 'static {
        self.flush_deferred();
        let (tx, rx) = oneshot::channel();
        let sent = {
            let _order = self.start_stop_order();
            self.command(Command::Stop(tx)).is_ok()
        };
        let shared = Arc::clone(&self.inner.shared);
        async move {
            if sent {
                shared.reply(rx).await;
            }
        }
    }

    fn start_stop_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .start_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// What tells when this client's connection task has ended, which it does once
    /// every handle is dropped: for a caller that drops the last handle and must
    /// know the client's memory is released (the C API's `wps_client_free`).
    pub(crate) fn end_watch(&self) -> EndWatch {
        EndWatch(Arc::clone(&self.inner.shared))
    }

    /// A handle that does not keep this client alive (see [`WeakClient`]).
    pub fn downgrade(&self) -> WeakClient {
        WeakClient {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The current connection state.
    pub fn state(&self) -> ClientState {
        self.inner.shared.state()
    }

    /// The current connection id, when connected or recovering.
    pub fn connection_id(&self) -> Option<String> {
        self.inner.shared.connection_id()
    }

    /// Joins a group; the group is rejoined on every new connection (auto-rejoin): after
    /// a reconnect, and after a `start` that follows a `stop`, until it is left.
    ///
    /// Cancel safety: as [`Client::send_to_group`]'s acked messages. A join whose ack
    /// arrives after its future was dropped counts as an awaited one: the group is
    /// rejoined on new connections. One dropped unwritten, or whose ack never comes,
    /// is not retried and is not rejoined.
    pub async fn join_group(&self, group: &str) -> Result<AckResult, Error> {
        self.run(self.membership(group, Membership::Join)?).await
    }

    /// Leaves a group.
    ///
    /// Cancel safety: as [`Client::join_group`]: once its ack arrives, the group is no
    /// longer rejoined; dropped unwritten, it leaves nothing.
    pub async fn leave_group(&self, group: &str) -> Result<AckResult, Error> {
        self.run(self.membership(group, Membership::Leave)?).await
    }

    /// Publishes to a group. Waits for the ack unless `fire_and_forget`.
    ///
    /// Cancel safety: nothing is sent before the first poll, and a frame is written
    /// whole or not at all. An acked message whose future is dropped before it was
    /// written is never written (not after a recovery either). One already written
    /// stays pending until its ack, its `ack_timeout` or the next lost connection,
    /// without retries or resends, then nothing of it is kept. A fire-and-forget
    /// message is queued once the future completes; dropped while it waits for room in
    /// the queue, it is not sent.
    pub async fn send_to_group(
        &self,
        group: &str,
        data_type: DataType,
        data: Bytes,
        opts: SendToGroupOptions,
    ) -> Result<AckResult, Error> {
        self.run(self.group_message(group, data_type, &data, opts)?)
            .await
    }

    /// Sends a user event to the upstream server. Waits for the ack unless
    /// `fire_and_forget`.
    ///
    /// Cancel safety: as [`Client::send_to_group`].
    pub async fn send_event(
        &self,
        event: &str,
        data_type: DataType,
        data: Bytes,
        opts: SendEventOptions,
    ) -> Result<AckResult, Error> {
        self.run(self.event_message(event, data_type, &data, opts)?)
            .await
    }

    /// Sends the deferred messages, in order: written by this thread as far as it can
    /// (see `direct.rs`), the rest handed to the connection task (one wake-up).
    pub(crate) fn flush_deferred(&self) {
        self.inner.operations.flush();
    }

    /// Sends an event whose reply comes from the upstream server. Dropping the future
    /// before it resolves sends `cancelInvocation`; so does a timeout.
    ///
    /// Cancel safety: nothing is sent before the first poll. Dropped after that, an
    /// invocation already written is cancelled with `cancelInvocation`; one not written
    /// yet (queued during a recovery too) is never written. Nothing of it is kept.
    pub async fn invoke_event(
        &self,
        event: &str,
        data_type: DataType,
        data: Bytes,
        opts: InvokeOptions,
    ) -> Result<InvokeResult, Error> {
        let (op, reply, guard) = self.invocation(event, data_type, data, opts)?;
        self.operation(op).await?;
        invocation_reply(reply, guard).await
    }

    /// [`Client::invoke_event`] handed over at once, as [`Client::start_now`]: the
    /// invocation takes its place among the operations (in call order, or refused)
    /// before this returns, and the future only waits for the reply (dropping it sends
    /// `cancelInvocation`).
    pub(crate) fn invoke_now(
        &self,
        event: &str,
        data_type: DataType,
        data: Bytes,
        opts: InvokeOptions,
    ) -> Result<impl Future<Output = Result<InvokeResult, Error>> + Send + 'static, Error> {
        let (op, reply, guard) = self.invocation(event, data_type, data, opts)?;
        self.inner.operations.submit(op, Handover::Now)?;
        Ok(invocation_reply(reply, guard))
    }

    /// An invocation checked and encoded, the receiver of its reply, and the guard
    /// that cancels it unless disarmed.
    fn invocation(
        &self,
        event: &str,
        data_type: DataType,
        data: Bytes,
        opts: InvokeOptions,
    ) -> Result<(Operation, InvokeReceiver, CancelOnDrop), Error> {
        check_name("event", event)?;
        let data = check_data(data_type, data)?;
        let timeout = opts.timeout.unwrap_or(self.inner.ack_timeout);
        if timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "invoke timeout must be greater than zero".into(),
            ));
        }
        options::check_duration("invoke timeout", timeout).map_err(Error::InvalidArgument)?;
        self.check_usable()?;
        let invocation_id = self
            .inner
            .next_invocation_id
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let frame = self.encode(&Upstream::Invoke {
            invocation_id: invocation_id.clone(),
            event: event.to_owned(),
            data,
        })?;
        let (tx, rx) = oneshot::channel();
        let guard = CancelOnDrop {
            commands: self.inner.commands.clone(),
            invocation_id: Some(invocation_id.clone()),
        };
        let op = Operation {
            frame,
            kind: OpKind::Invoke {
                invocation_id,
                timeout,
                reply: tx,
            },
        };
        Ok((op, rx, guard))
    }

    /// Encodes a frame, refusing one over `max_outgoing_message_size` (the service
    /// would close the connection, and the resend after each recovery would fail again).
    fn encode(&self, frame: &Upstream) -> Result<Utf8Bytes, Error> {
        self.checked(Ok(json::encode_upstream(frame)))
    }

    /// An encoded frame, or why it cannot be sent: a bad payload, or a size over the limit.
    fn checked(&self, encoded: Result<String, ProtocolError>) -> Result<Utf8Bytes, Error> {
        let text = encoded.map_err(|e| Error::InvalidArgument(e.0))?;
        let limit = self.inner.max_outgoing;
        if text.len() > limit {
            return Err(Error::InvalidArgument(format!(
                "the message is {} bytes encoded, over the limit of {limit} bytes on a \
                 frame the service takes from a client",
                text.len()
            )));
        }
        Ok(text.into())
    }

    /// The ackId of a message and whether it is automatic: none for fire-and-forget,
    /// else the caller's or the next of the counter.
    fn choose_ack_id(&self, fire_and_forget: bool, chosen: Option<u64>) -> Option<(u64, bool)> {
        match (fire_and_forget, chosen) {
            (true, _) => None,
            (false, Some(ack_id)) => {
                if self.inner.shared.ack_ids.chose(ack_id) {
                    // Ahead of the counter: an automatic ackId may meet it while it is
                    // pending, and only the connection task can renumber that one.
                    self.inner.shared.direct.chose_ack_id();
                }
                Some((ack_id, false))
            }
            (false, None) => Some((self.next_ack_id(), true)),
        }
    }

    fn next_ack_id(&self) -> u64 {
        self.inner.shared.next_ack_id()
    }

    fn command(&self, command: Command) -> Result<(), Error> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| Error::Stopped { ack_id: None })
    }

    async fn operation(&self, op: Operation) -> Result<(), Error> {
        self.inner.operations.send(op).await
    }

    /// Operations need a started client: connected, or recovering (they then queue, up
    /// to a limit).
    fn check_usable(&self) -> Result<(), Error> {
        match self.state() {
            ClientState::Connected => Ok(()),
            ClientState::Recovering if self.inner.shared.recovery_queue_full() => {
                Err(Error::NotConnected { ack_id: None })
            }
            ClientState::Recovering => Ok(()),
            ClientState::Stopped => Err(Error::IllegalState("the client is not started".into())),
            ClientState::Connecting | ClientState::Disconnected => {
                Err(Error::NotConnected { ack_id: None })
            }
        }
    }

    /// A joinGroup or leaveGroup, checked and encoded.
    pub(crate) fn membership(
        &self,
        group: &str,
        membership: Membership,
    ) -> Result<Prepared, Error> {
        check_name("group", group)?;
        let ack_id = self.next_ack_id();
        let (frame, purpose) = if membership == Membership::Join {
            let frame = Upstream::JoinGroup {
                group: group.to_owned(),
                ack_id: Some(ack_id),
            };
            (frame, Purpose::Join(group.to_owned()))
        } else {
            let frame = Upstream::LeaveGroup {
                group: group.to_owned(),
                ack_id: Some(ack_id),
            };
            (frame, Purpose::Leave(group.to_owned()))
        };
        Ok(Prepared {
            frame: self.encode(&frame)?,
            ack: Some((ack_id, true, purpose)),
        })
    }

    /// A sendToGroup, checked and encoded.
    pub(crate) fn group_message(
        &self,
        group: &str,
        data_type: DataType,
        data: &[u8],
        opts: SendToGroupOptions,
    ) -> Result<Prepared, Error> {
        let ack_id = (opts.fire_and_forget, opts.ack_id);
        self.message(
            ("group", group),
            data_type,
            data,
            ack_id,
            |id, data_type, data| {
                json::encode_send_to_group(group, id, opts.no_echo, data_type, data)
            },
        )
    }

    /// An event, checked and encoded.
    pub(crate) fn event_message(
        &self,
        event: &str,
        data_type: DataType,
        data: &[u8],
        opts: SendEventOptions,
    ) -> Result<Prepared, Error> {
        let ack_id = (opts.fire_and_forget, opts.ack_id);
        self.message(
            ("event", event),
            data_type,
            data,
            ack_id,
            |id, data_type, data| json::encode_event(event, id, data_type, data),
        )
    }

    /// A message frame: checks the `(what, name)` target, picks the ackId from
    /// `(fire_and_forget, caller's ack_id)`, encodes with `encode` and checks the size.
    fn message(
        &self,
        (what, name): (&str, &str),
        data_type: DataType,
        data: &[u8],
        (fire_and_forget, ack_id): (bool, Option<u64>),
        encode: impl FnOnce(Option<u64>, DataType, &[u8]) -> Result<String, ProtocolError>,
    ) -> Result<Prepared, Error> {
        check_name(what, name)?;
        if ack_id == Some(0) && !fire_and_forget {
            return Err(Error::InvalidArgument(
                "ackId must be at least 1 (the service refuses 0)".into(),
            ));
        }
        let ack_id = self.choose_ack_id(fire_and_forget, ack_id);
        let frame = encode(ack_id.map(|(id, _)| id), data_type, data);
        Ok(Prepared::message(self.checked(frame)?, ack_id))
    }

    /// Sends a prepared operation and waits for its ack (fire-and-forget: until queued).
    pub(crate) async fn run(&self, op: Prepared) -> Result<AckResult, Error> {
        self.check_usable()?;
        let Some((ack_id, automatic, purpose)) = op.ack else {
            self.operation(Operation {
                frame: op.frame,
                kind: OpKind::FireAndForget,
            })
            .await?;
            return Ok(NO_ACK);
        };
        let (tx, rx) = oneshot::channel();
        let op = Operation {
            frame: op.frame,
            kind: OpKind::Ack {
                ack_id,
                automatic,
                purpose,
                reply: tx.into(),
            },
        };
        match self.inner.operations.try_write(op) {
            Written::Yes => self.await_written(rx).await,
            Written::No(op) => {
                self.operation(op).await?;
                rx.await.unwrap_or(Err(Error::Stopped { ack_id: None }))
            }
        }
    }

    /// Waits for the outcome of an operation this caller wrote itself. The connection
    /// task registers it when it next reads or pings; without pings to rely on, a
    /// caller still waiting past the ack timeout wakes the task to register it, so that
    /// its timeout and retries run.
    async fn await_written(
        &self,
        mut rx: oneshot::Receiver<Result<AckResult, Error>>,
    ) -> Result<AckResult, Error> {
        if self.inner.shared.direct.pings_register() {
            return rx.await.unwrap_or(Err(Error::Stopped { ack_id: None }));
        }
        let late = {
            let _runtime = self.inner.operations.runtime().enter();
            tokio::time::sleep(self.inner.ack_timeout)
        };
        tokio::select! {
            outcome = &mut rx => return outcome.unwrap_or(Err(Error::Stopped { ack_id: None })),
            () = late => self.inner.shared.direct.wake(),
        }
        rx.await.unwrap_or(Err(Error::Stopped { ack_id: None }))
    }

    /// [`Client::run`] of a fire-and-forget message when it would not wait (room in the
    /// operations channel): its outcome at once. An acked operation, or one that would
    /// wait, is given back for `run`.
    pub(crate) fn try_run(&self, op: Prepared) -> Result<Result<AckResult, Error>, Prepared> {
        if op.ack.is_some() {
            return Err(op);
        }
        if let Err(error) = self.check_usable() {
            return Ok(Err(error));
        }
        let op = Operation {
            frame: op.frame,
            kind: OpKind::FireAndForget,
        };
        match self.inner.operations.try_send(op) {
            Ok(queued) => Ok(queued.map(|()| NO_ACK)),
            Err(op) => Err(Prepared {
                frame: op.frame,
                ack: None,
            }),
        }
    }

    /// Hands a prepared operation (or why there is none) to the connection task
    /// without waiting (or defers it); the outcome goes to `done`, exactly once (at
    /// once on the calling thread when refused). Never blocks. A fire-and-forget
    /// message completes once queued; a deferred one waits for
    /// [`Client::flush_deferred`] or the next operation not deferred. When the
    /// keep-alive pings bound how late the task registers it, an acked one is written by
    /// the caller (see `direct.rs`): handed over at once on an idle client, or flushed
    /// with the deferred ones before it, its ackId automatic, on a client with no
    /// operation queued.
    pub(crate) fn start_then(
        &self,
        op: Result<Prepared, Error>,
        handover: Handover,
        done: Box<dyn AckCallback>,
    ) {
        let op = match op.and_then(|op| self.check_usable().map(|()| op)) {
            Ok(op) => op,
            Err(error) => return done.complete(Err(error)),
        };
        let Some((ack_id, automatic, purpose)) = op.ack else {
            let queued = self.inner.operations.submit(
                Operation {
                    frame: op.frame,
                    kind: OpKind::FireAndForget,
                },
                handover,
            );
            return done.complete(queued.map(|()| NO_ACK));
        };
        let mut op = Operation {
            frame: op.frame,
            kind: OpKind::Ack {
                ack_id,
                automatic,
                purpose,
                reply: AckReply::callback(done),
            },
        };
        if handover == Handover::Now && self.inner.shared.direct.pings_register() {
            op = match self.inner.operations.try_write(op) {
                Written::Yes => return,
                Written::No(op) => op,
            };
        }
        // A refused operation has already given its reply the error.
        let _ = self.inner.operations.submit(op, handover);
    }
}

/// The outcome of a fire-and-forget message.
const NO_ACK: AckResult = AckResult {
    ack_id: None,
    is_duplicated: false,
};

/// Whether a membership operation joins or leaves its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    Join,
    Leave,
}

/// An operation checked and encoded on the caller's thread, ready for the connection
/// task; it owns nothing of the caller's.
pub(crate) struct Prepared {
    frame: Utf8Bytes,
    /// The ackId, whether it is automatic, and why it was sent; `None` for
    /// fire-and-forget.
    ack: Option<(u64, bool, Purpose)>,
}

impl Prepared {
    /// The operation's ackId (`None` for fire-and-forget).
    pub(crate) fn ack_id(&self) -> Option<u64> {
        self.ack.as_ref().map(|(ack_id, ..)| *ack_id)
    }

    /// A message (sendToGroup or event) with its ackId from `choose_ack_id`.
    fn message(frame: Utf8Bytes, ack_id: Option<(u64, bool)>) -> Prepared {
        Prepared {
            frame,
            ack: ack_id.map(|(id, automatic)| (id, automatic, Purpose::Send)),
        }
    }
}

/// Where the reply of an invocation arrives.
type InvokeReceiver = oneshot::Receiver<Result<InvokeResult, Error>>;

/// Waits for an invocation's reply; dropped before it, `guard` cancels the invocation.
async fn invocation_reply(
    reply: InvokeReceiver,
    mut guard: CancelOnDrop,
) -> Result<InvokeResult, Error> {
    let result = reply.await.unwrap_or(Err(Error::Stopped { ack_id: None }));
    guard.disarm();
    result
}

/// Sends `cancelInvocation` when an invocation's future is dropped unfinished.
struct CancelOnDrop {
    commands: mpsc::UnboundedSender<Command>,
    invocation_id: Option<String>,
}

impl CancelOnDrop {
    /// The invocation ended: nothing to cancel.
    fn disarm(&mut self) {
        self.invocation_id = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.invocation_id.take() {
            let _ = self.commands.send(Command::CancelInvocation(id));
        }
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} name must not be empty"
        )));
    }
    Ok(())
}

fn check_data(data_type: DataType, bytes: Bytes) -> Result<Data, Error> {
    let data = Data { data_type, bytes };
    json::validate_payload(&data).map_err(|e| Error::InvalidArgument(e.0))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn send<T: Send>(_: &T) {}

    #[test]
    fn the_client_and_its_futures_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Client>();
        send_sync::<WeakClient>();
        send_sync::<Event>();
        send_sync::<Error>();
        let credential = Credential::Url("ws://127.0.0.1:9/client/hubs/h".into());
        let client = Client::new(credential, ClientOptions::default(), Arc::new(|_| {})).unwrap();
        send(&client.start());
        send(&client.stop());
        send(&client.join_group("g"));
        send(&client.leave_group("g"));
        send(&client.send_to_group(
            "g",
            DataType::Text,
            Bytes::new(),
            SendToGroupOptions::default(),
        ));
        send(&client.send_event(
            "e",
            DataType::Text,
            Bytes::new(),
            SendEventOptions::default(),
        ));
        send(&client.invoke_event("e", DataType::Text, Bytes::new(), InvokeOptions::default()));
    }

    #[test]
    fn calls_before_start_are_illegal_state() {
        let credential = Credential::Url("ws://127.0.0.1:9/client/hubs/h".into());
        let client = Client::new(credential, ClientOptions::default(), Arc::new(|_| {})).unwrap();
        assert_eq!(client.state(), ClientState::Stopped);
        let result = crate::runtime::block_on(client.join_group("g"));
        assert!(matches!(result, Err(Error::IllegalState(_))), "{result:?}");
        let result = crate::runtime::block_on(client.invoke_event(
            "e",
            DataType::Json,
            "{".into(),
            InvokeOptions::default(),
        ));
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{result:?}"
        );
        crate::runtime::block_on(client.stop());
    }

    #[test]
    fn the_connection_task_ends_once_the_last_handle_is_dropped() {
        let credential = Credential::Url("ws://127.0.0.1:9/client/hubs/h".into());
        let client = Client::new(credential, ClientOptions::default(), Arc::new(|_| {})).unwrap();
        let ended = client.end_watch();
        let clone = client.clone();
        drop(client);
        assert!(
            !ended.wait(Duration::from_millis(50)),
            "a handle is still alive"
        );
        drop(clone);
        assert!(ended.wait(Duration::from_secs(10)), "the task did not end");
    }

    /// Hands an operation's outcome to a channel.
    struct ToChannel(std::sync::mpsc::Sender<Result<AckResult, Error>>);

    impl AckCallback for ToChannel {
        fn complete(self: Box<Self>, outcome: Result<AckResult, Error>) {
            let _ = self.0.send(outcome);
        }

        fn is_cancelled(&self) -> bool {
            false
        }
    }

    type ServiceSocket = tokio_tungstenite::tungstenite::WebSocket<std::net::TcpStream>;

    /// A scripted service on a plain thread: the connected frame, then `script` with
    /// the socket, then reading until the client goes. Returns the client URL.
    #[allow(clippy::result_large_err)] // tungstenite's handshake callback returns a response
    fn scripted_service(script: impl FnOnce(&mut ServiceSocket) + Send + 'static) -> String {
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        use tokio_tungstenite::tungstenite::Message;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "ws://{}/client/hubs/h?access_token=t",
            listener.local_addr().unwrap()
        );
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let echo_protocol = |req: &Request, mut resp: Response| {
                if let Some(protocol) = req.headers().get("Sec-WebSocket-Protocol") {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", protocol.clone());
                }
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::tungstenite::accept_hdr(tcp, echo_protocol).unwrap();
            ws.send(Message::text(
                r#"{"type":"system","event":"connected","userId":"u","connectionId":"c1","reconnectionToken":"t1"}"#,
            ))
            .unwrap();
            script(&mut ws);
            while ws.read().is_ok() {}
        });
        url
    }

    /// Sends a server message, which holds the client's connection task in the event
    /// handler of these tests.
    fn hold(ws: &mut ServiceSocket, sequence_id: usize) {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            r#"{{"type":"message","from":"server","dataType":"text","data":"hold","sequenceId":{sequence_id}}}"#
        )))
        .unwrap();
    }

    /// The next sendToGroup frame the client writes; `None` once it is gone.
    fn next_send(ws: &mut ServiceSocket) -> Option<serde_json::Value> {
        loop {
            let Ok(tokio_tungstenite::tungstenite::Message::Text(text)) = ws.read() else {
                return None;
            };
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "sendToGroup" {
                return Some(frame);
            }
        }
    }

    /// Acks the sendToGroup `frame`, successfully.
    fn ack(ws: &mut ServiceSocket, frame: &serde_json::Value) {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            r#"{{"type":"ack","ackId":{},"success":true}}"#,
            frame["ackId"]
        )))
        .unwrap();
    }

    /// A scripted service: per round a server message (which holds the connection
    /// task), the next sendToGroup frame reported to `frames`, and its ack.
    fn holding_service(rounds: usize) -> (String, std::sync::mpsc::Receiver<serde_json::Value>) {
        let (frames_tx, frames) = std::sync::mpsc::channel();
        let url = scripted_service(move |ws| {
            for round in 1..=rounds {
                hold(ws, round);
                let Some(frame) = next_send(ws) else {
                    return;
                };
                let _ = frames_tx.send(frame.clone());
                ack(ws, &frame);
            }
        });
        (url, frames)
    }

    /// An event handler that holds the connection task in each server message until
    /// released; `entered` reports each.
    fn holding_handler() -> (
        impl EventHandler,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered_tx, released) = (Mutex::new(entered_tx), Mutex::new(released));
        let handler = move |event: Event| {
            if matches!(event, Event::ServerMessage { .. }) {
                let _ = entered_tx.lock().unwrap().send(());
                let _ = released
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }
        };
        (handler, entered, release)
    }

    /// A started client for `url` whose event handler is [`holding_handler`]'s, with its
    /// two channels.
    fn held_client(
        url: String,
    ) -> (
        Client,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (handler, entered, release) = holding_handler();
        let client = Client::new(
            Credential::Url(url),
            ClientOptions::default(),
            Arc::new(handler),
        )
        .unwrap();
        crate::runtime::block_on(client.start()).unwrap();
        (client, entered, release)
    }

    #[test]
    fn a_callback_operation_on_an_idle_client_is_written_by_its_caller() {
        let (url, frames) = holding_service(2);
        let (client, entered, release) = held_client(url);
        // At once, then deferred and flushed alone: both written by this thread while
        // the connection task is held inside the event handler.
        for handover in [Handover::Now, Handover::Deferred] {
            entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the handler was not called");
            let (done, outcome) = std::sync::mpsc::channel();
            let message = client.group_message(
                "g",
                DataType::Text,
                format!("{handover:?}").as_bytes(),
                SendToGroupOptions::default(),
            );
            client.start_then(message, handover, Box::new(ToChannel(done)));
            client.flush_deferred();
            let frame = frames
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{handover:?}: no frame while the task is held"));
            assert_eq!(frame["data"], format!("{handover:?}"));
            release.send(()).unwrap();
            let acked = outcome.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(acked.unwrap().ack_id, frame["ackId"].as_u64());
        }
        crate::runtime::block_on(client.stop());
    }

    #[test]
    fn a_flushed_run_of_deferred_operations_on_a_busy_client_is_written_by_its_caller() {
        const PENDING: usize = 3;
        const RUN: usize = 5;
        let (frames_tx, frames) = std::sync::mpsc::channel();
        let url = scripted_service(move |ws| {
            // Acked sends pending (unacked) while the connection task is held, then a
            // flushed run; all acked at the end.
            let mut read = Vec::new();
            for n in 0..PENDING + RUN {
                if n == PENDING {
                    hold(ws, 1);
                }
                let Some(frame) = next_send(ws) else {
                    return;
                };
                let _ = frames_tx.send(frame.clone());
                read.push(frame);
            }
            for frame in &read {
                ack(ws, frame);
            }
        });
        let (client, entered, release) = held_client(url);
        let (done, outcomes) = std::sync::mpsc::channel();
        let send = |text: String, handover| {
            let message =
                client.group_message("g", DataType::Text, text.as_bytes(), Default::default());
            client.start_then(message, handover, Box::new(ToChannel(done.clone())));
        };
        let mut sent = Vec::new();
        for n in 0..PENDING {
            send(format!("pending{n}"), Handover::Now);
            sent.push(frames.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the handler was not called");
        for n in 0..RUN {
            send(format!("run{n}"), Handover::Deferred);
        }
        client.flush_deferred();
        // Written while the connection task is held: by this thread.
        for n in 0..RUN {
            let frame = frames
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("run{n} was not written while the task is held"));
            assert_eq!(frame["data"], format!("run{n}"));
            sent.push(frame);
        }
        release.send(()).unwrap();
        let mut acked: Vec<Option<u64>> = (0..PENDING + RUN)
            .map(|_| {
                let outcome = outcomes.recv_timeout(Duration::from_secs(10)).unwrap();
                outcome.unwrap().ack_id
            })
            .collect();
        acked.sort_unstable();
        let mut expected: Vec<Option<u64>> = sent.iter().map(|f| f["ackId"].as_u64()).collect();
        expected.sort_unstable();
        assert_eq!(acked, expected);
        crate::runtime::block_on(client.stop());
    }

    #[test]
    fn a_callback_operation_its_caller_wrote_times_out_with_nothing_read() {
        // The service acks nothing and answers no ping: only the task's registration
        // at each keep-alive ping lets the ack timeout run.
        let (url, _frames) = holding_service(0);
        let options = ClientOptions {
            keep_alive_interval: Some(Duration::from_millis(100)),
            keep_alive_timeout: None,
            ack_timeout: Duration::from_millis(400),
            message_retry: RetryOptions {
                max_retries: Some(0),
                ..RetryOptions::message_default()
            },
            ..ClientOptions::default()
        };
        let client = Client::new(Credential::Url(url), options, Arc::new(|_| {})).unwrap();
        crate::runtime::block_on(client.start()).unwrap();
        let (done, outcome) = std::sync::mpsc::channel();
        let started = std::time::Instant::now();
        let message =
            client.group_message("g", DataType::Text, b"lost", SendToGroupOptions::default());
        client.start_then(message, Handover::Now, Box::new(ToChannel(done)));
        let outcome = outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the operation never timed out");
        assert!(
            matches!(outcome, Err(Error::Timeout { ack_id: Some(_) })),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        crate::runtime::block_on(client.stop());
    }
}
