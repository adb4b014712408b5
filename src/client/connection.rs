//! The one task that owns a client's socket and its state machine.
//!
//! ```text
//!            start                      connected frame
//!  Stopped ─────────▶ Connecting ───────────────────────▶ Connected ◀──────────┐
//!     ▲                  │ ▲  failed (start: error to caller)  │ dropped, reliable │ recovered
//!     │ stop / give up   │ │                                   ▼  (not 1008)      │ (no events)
//!     └──────────────────┘ └── Disconnected ◀── session lost ── Recovering ───────┘
//!                               (reconnect delay)   (1008, window over, not reliable)
//! ```
//!
//! Everything else talks to the task over two channels: commands (start, stop,
//! cancel; unbounded) and operations (encoded frames with their reply channel;
//! bounded, so a fast sender feels backpressure). Each phase is one method below,
//! returning the next phase; `serve` is the connected loop. While it serves, a caller
//! may write its own frames (an idle client's operation, or a flushed run of deferred
//! ones: see `direct.rs`); the task registers those operations before it reads
//! anything more.

use super::ack_ids::{AckIds, SERVICE_ACK_MEMORY};
use super::credential::MAX_URL_LEN;
use super::direct::{Direct, WriteHalf};
use super::pending::{AckReply, Done, OpKind, Operation, Pending, Purpose, Start};
use super::queue::Overflow;
use super::sequence::Sequence;
use super::{
    ClientOptions, ClientState, Credential, Error, Event, EventHandler, InvokeResult, Resume,
};
use crate::protocol::{json, DataType, Downstream, Upstream};
use crate::transport::{peer_of, percent_encode, redact_url, Connector, Ws};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use log::{debug, error, info, trace, warn};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

/// Operations queued towards the task before senders wait.
const OPERATION_QUEUE: usize = 1024;
/// Operations a recovery queues for the recovered connection at most, and bytes of
/// fire-and-forget frames; past either, new operations fail at once with
/// `NotConnected` until the recovery ends (no sender waits, none queues without bound).
const RECOVERY_QUEUE_OPS: usize = 16 * 1024;
const RECOVERY_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Operations written per batch before one flush; also frames read per wake-up.
const BATCH: usize = 256;
/// How long a closing handshake may take when stopping.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The close code after which a session cannot be recovered.
const POLICY_VIOLATION: u16 = 1008;
/// Acked operations the task takes in at most; further operations wait in the channel.
/// Acks arrive in order: when one is lost with a dropped socket, so is every later one.
/// With no more in flight than the service remembers, every operation it processed but
/// whose ack was lost is still among those it remembers when the recovery resends it.
/// One less than that memory, as a margin. Callers' own writes count against it too:
/// the task takes operations in under the write half's lock, where callers look for
/// room (see `Direct::write_run`), so the task and callers together never exceed it.
pub(crate) const MAX_PENDING_ACKS: usize = SERVICE_ACK_MEMORY - 1;

/// A control message to the connection task.
pub(crate) enum Command {
    /// Open the connection; reply once connected (or failed).
    Start(oneshot::Sender<Result<(), Error>>),
    /// Close and stop; reply once stopped.
    Stop(oneshot::Sender<()>),
    /// The caller of an invocation gave up.
    CancelInvocation(String),
}

/// How `Shared` stores a state (`Shared::state` reads it back).
fn state_code(state: ClientState) -> u8 {
    match state {
        ClientState::Stopped => 0,
        ClientState::Connecting => 1,
        ClientState::Connected => 2,
        ClientState::Recovering => 3,
        ClientState::Disconnected => 4,
    }
}

/// What the client handle reads without asking the task.
pub(crate) struct Shared {
    state: AtomicU8,
    connection_id: Mutex<Option<String>>,
    /// The automatic ackIds.
    pub(crate) ack_ids: AckIds,
    /// Set once the task has ended and dropped everything it held.
    ended: Mutex<bool>,
    ended_changed: Condvar,
    /// Wakes the callers awaiting a reply (see [`Shared::reply`]) once `ended` is set.
    ended_notify: tokio::sync::Notify,
    /// The write path callers share with the task.
    pub(crate) direct: Arc<Direct>,
    /// Operations waiting for room in the operations channel.
    pub(crate) overflow: Arc<Overflow>,
    /// Set while a recovery's queue is full (`RECOVERY_QUEUE_OPS`, `RECOVERY_QUEUE_BYTES`).
    recovery_queue_full: AtomicBool,
}

impl Shared {
    fn new(options: &ClientOptions) -> Shared {
        Shared {
            state: AtomicU8::new(state_code(ClientState::Stopped)),
            connection_id: Mutex::new(None),
            ack_ids: AckIds::default(),
            ended: Mutex::new(false),
            ended_changed: Condvar::new(),
            ended_notify: tokio::sync::Notify::new(),
            direct: Arc::new(Direct::new(
                options.keep_alive_interval,
                options.ack_timeout,
            )),
            overflow: Arc::default(),
            recovery_queue_full: AtomicBool::new(false),
        }
    }

    pub(crate) fn state(&self) -> ClientState {
        match self.state.load(Ordering::Acquire) {
            1 => ClientState::Connecting,
            2 => ClientState::Connected,
            3 => ClientState::Recovering,
            4 => ClientState::Disconnected,
            _ => ClientState::Stopped,
        }
    }

    /// Whether a recovery queues no more operations now (they fail with `NotConnected`).
    pub(crate) fn recovery_queue_full(&self) -> bool {
        self.recovery_queue_full.load(Ordering::Acquire)
    }

    pub(crate) fn connection_id(&self) -> Option<String> {
        self.connection_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The next automatic ackId of this client (see `ack_ids.rs`).
    pub(crate) fn next_ack_id(&self) -> u64 {
        self.ack_ids.next()
    }

    /// A start is being handed to the task: a stopped client reads `Connecting` from
    /// now on, as the official clients' `start()` sets it at once. Until the task took
    /// it, a stop that read `Stopped` would have skipped a client about to connect.
    /// Called before the command is sent, so that the task's handling of it (which
    /// always sets the state of a stopped client) comes after. Any other state is the
    /// task's to change.
    pub(crate) fn start_queued(&self) {
        self.swap_state(ClientState::Stopped, ClientState::Connecting);
    }

    /// The start of [`Shared::start_queued`] could not be sent: the task has ended.
    pub(crate) fn start_unqueued(&self) {
        self.swap_state(ClientState::Connecting, ClientState::Stopped);
    }

    fn swap_state(&self, from: ClientState, to: ClientState) {
        let _ = self.state.compare_exchange(
            state_code(from),
            state_code(to),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn set_state(&self, state: ClientState) {
        self.state.store(state_code(state), Ordering::Release);
    }

    fn set_connection_id(&self, id: Option<String>) {
        *self.connection_id.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Blocks until the task has ended (it ends once every client handle is dropped),
    /// at most `limit`; whether it has.
    pub(crate) fn wait_ended(&self, limit: Duration) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, _) = self
            .ended_changed
            .wait_timeout_while(ended, limit, |ended| !*ended)
            .unwrap_or_else(|e| e.into_inner());
        *ended
    }

    /// The task's answer on `rx`; `None` when the task dropped the sender unanswered or
    /// ended without answering. A panic that ends the task may leak the sender instead
    /// of dropping it (a value being returned when a destructor panics is leaked,
    /// rust-lang/rust#47949): the caller is then released by the task's end.
    pub(crate) async fn reply<T>(&self, mut rx: oneshot::Receiver<T>) -> Option<T> {
        // Created first: it is woken by an end after it, even before it is polled.
        let ended = self.ended_notify.notified();
        if *self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            return rx.try_recv().ok();
        }
        tokio::select! {
            biased;
            reply = rx => reply.ok(),
            () = ended => None,
        }
    }
}

/// The task's last field: dropped after all the others, it marks the task ended.
struct EndMark(Arc<Shared>);

impl Drop for EndMark {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!("the connection task panicked (a bug in the library): the client is stopped");
        }
        // What the handle reads: a task that panicked could not set it.
        self.0.set_connection_id(None);
        self.0.set_state(ClientState::Stopped);
        self.0.direct.abandon();
        *self.0.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.0.ended_changed.notify_all();
        self.0.ended_notify.notify_waiters();
    }
}

/// Starts a client's connection task on `runtime`; returns what the handle keeps.
pub(crate) fn spawn(
    runtime: &tokio::runtime::Handle,
    credential: Credential,
    options: ClientOptions,
    on_event: Arc<dyn EventHandler>,
) -> (
    Arc<Shared>,
    mpsc::UnboundedSender<Command>,
    mpsc::Sender<Operation>,
) {
    let (task, command_tx, operation_tx) = Task::new(credential, options, on_event);
    let shared = task.shared.clone();
    runtime.spawn(task.run());
    (shared, command_tx, operation_tx)
}

/// The phase to run next.
enum Next {
    /// Stopped: wait for `start`.
    Idle,
    /// Open a new connection; `start` is the caller of `start()`, `attempt` 0 for a
    /// start and from 1 for automatic reconnects.
    Open {
        start: Option<oneshot::Sender<Result<(), Error>>>,
        attempt: u32,
    },
    /// Connected: run the connection.
    Serve(Box<Ws>),
    /// The socket dropped: try to recover the same session, from `first_attempt` on.
    Recover {
        since: Instant,
        first_attempt: Instant,
        close_code: Option<u16>,
        reason: String,
    },
    /// The session is gone.
    Lost {
        close_code: Option<u16>,
        message: Option<String>,
    },
    /// The client handle was dropped.
    Exit,
}

/// Why the connected loop ended.
enum End {
    /// The socket ended or failed: its close code and reason.
    Dropped(Option<u16>, String),
    /// The service broke the WebSocket protocol: the close code that fails the
    /// connection, and the reason.
    Failed(CloseCode, String),
    /// `stop()` was called.
    Stop(oneshot::Sender<()>),
    /// The client handle was dropped.
    Exit,
    /// The service answered a recovery as another connection: that one is closed and
    /// the session is lost to the drop the recovery was for.
    Foreign(Cause),
}

/// How a connection ended: its close code (when a close frame came) and the reason.
struct Cause {
    close_code: Option<u16>,
    reason: String,
}

/// What stops the client.
enum StopBy {
    /// `stop()`: its caller, answered once stopped.
    Caller(oneshot::Sender<()>),
    /// The error that ended the client on its own.
    Error(Error),
}

/// The service-side session of the current connection.
struct Session {
    url: String,
    connection_id: String,
    reconnection_token: Option<String>,
}

struct Task {
    shared: Arc<Shared>,
    options: ClientOptions,
    credential: Credential,
    connector: Connector,
    on_event: Arc<dyn EventHandler>,
    commands: mpsc::UnboundedReceiver<Command>,
    operations: mpsc::Receiver<Operation>,
    pending: Pending,
    sequence: Sequence,
    /// Groups joined through this client, rejoined on every new connection: after a
    /// reconnect, and after a `start` that follows a stop (as the official clients do).
    groups: BTreeSet<String>,
    session: Option<Session>,
    /// A `Connected` event was raised for the current session.
    announced: bool,
    /// The reason of the service's last `system`/`disconnected` frame.
    disconnect_message: Option<String>,
    /// When the recovery that opened the current connection began, and when it did.
    recovered_at: Option<(Instant, Instant)>,
    /// The current connection is a recovery the service has not confirmed yet, by its
    /// `connected` frame (which must name the recovered connection) or any other frame
    /// of the session: how the connection it recovers dropped, which is still what a
    /// loss of the session reports.
    recovering_from: Option<Cause>,
    /// Frames to write at the end of the current step.
    out: Vec<Utf8Bytes>,
    /// Operations finished in the current step.
    done: Vec<Done>,
    /// Events go to the handler as part of a batch of frames (see `end_batch`).
    in_batch: bool,
    /// The current batch of frames raised an event: it ends with `on_batch_end`.
    raised_in_batch: bool,
    /// Operations taken from the channel in the current step, finished once written.
    taken: usize,
    /// Last, so that it is dropped last.
    _end: EndMark,
}

impl Task {
    /// A stopped client's task, and the senders of its commands and operations.
    fn new(
        credential: Credential,
        options: ClientOptions,
        on_event: Arc<dyn EventHandler>,
    ) -> (
        Task,
        mpsc::UnboundedSender<Command>,
        mpsc::Sender<Operation>,
    ) {
        let shared = Arc::new(Shared::new(&options));
        let (command_tx, commands) = mpsc::unbounded_channel();
        let (operation_tx, operations) = mpsc::channel(OPERATION_QUEUE);
        let task = Task {
            shared: shared.clone(),
            connector: Connector::new(&options),
            pending: Pending::new(options.ack_timeout, options.message_retry.clone()),
            options,
            credential,
            on_event,
            commands,
            operations,
            sequence: Sequence::default(),
            groups: BTreeSet::new(),
            session: None,
            announced: false,
            disconnect_message: None,
            recovered_at: None,
            recovering_from: None,
            out: Vec::new(),
            done: Vec::new(),
            in_batch: false,
            raised_in_batch: false,
            taken: 0,
            _end: EndMark(shared),
        };
        (task, command_tx, operation_tx)
    }

    /// Runs the phases until the client handle is dropped. A panic in them (a bug in
    /// the library) stops the client as an error would, and ends the task.
    async fn run(mut self) {
        if let Err(panic) = std::panic::AssertUnwindSafe(self.phases())
            .catch_unwind()
            .await
        {
            let detail = crate::runtime::panic_detail(panic.as_ref());
            self.stop_after_panic(detail).await;
        }
        self.pending
            .fail_all(|ack_id| Error::Stopped { ack_id }, &mut self.done);
        self.finish_done();
        self.shared.set_connection_id(None);
        self.shared.set_state(ClientState::Stopped);
        debug!("connection task ends");
    }

    async fn phases(&mut self) {
        let mut next = Next::Idle;
        loop {
            next = match next {
                Next::Idle => self.idle().await,
                Next::Open { start, attempt } => self.open(start, attempt).await,
                Next::Serve(ws) => self.serve(*ws).await,
                Next::Recover {
                    since,
                    first_attempt,
                    close_code,
                    reason,
                } => self.recover(since, first_attempt, close_code, reason).await,
                Next::Lost {
                    close_code,
                    message,
                } => self.lose_session(close_code, message),
                Next::Exit => return,
            };
        }
    }

    /// The phases panicked: the client stops with `Error::Internal`, as on an error of
    /// its own, so that the handler learns of it (the `Stopped` event is raised even if
    /// that stop panics too). What the panic left half done is dropped; the operations
    /// callers wrote on the connection fail with the others.
    async fn stop_after_panic(&mut self, detail: String) {
        let error = Error::Internal(format!(
            "the connection task panicked (a bug in the library): {detail}"
        ));
        error!("{error}; the client is stopped");
        drop(self.shared.direct.close().await);
        self.register_written();
        self.out.clear();
        self.in_batch = false;
        let stop = std::panic::AssertUnwindSafe(|| self.stop(StopBy::Error(error.clone())));
        if std::panic::catch_unwind(stop).is_err() {
            self.shared.set_state(ClientState::Stopped);
            self.emit(Event::Stopped { error: Some(error) });
        }
    }

    /// Stopped: operations are refused until `start`. Every way here set the state
    /// already; set again, it would undo the `Connecting` of a start handed over since.
    async fn idle(&mut self) -> Next {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return Next::Exit,
                    Some(Command::Start(reply)) => return Next::Open { start: Some(reply), attempt: 0 },
                    Some(Command::Stop(reply)) => {
                        let _ = reply.send(());
                    }
                    Some(Command::CancelInvocation(_)) => {}
                },
                // Callers check the state first: what still arrives here was sent
                // while the client was running, so it was stopped under it.
                Some(op) = self.operations.recv() => {
                    self.shared.direct.finished(1);
                    op.refuse(Error::Stopped { ack_id: None });
                }
            }
        }
    }

    /// Opens a new connection: credential, handshake, `connected` frame.
    async fn open(
        &mut self,
        start: Option<oneshot::Sender<Result<(), Error>>>,
        attempt: u32,
    ) -> Next {
        self.shared.set_state(ClientState::Connecting);
        if attempt > 0 {
            info!("reconnecting (attempt {attempt})");
        }
        let mut waiting_for = String::new();
        let limit = self.options.start_timeout;
        // Boxed: connecting (TLS, upgrade) needs far more state than a live
        // connection, and the task should not carry that size while idle.
        let opening = Box::pin(open_connection(
            self.credential.clone(),
            self.connector.clone(),
            &mut waiting_for,
        ));
        let result = match self.offline(before_limit(limit, opening), false).await {
            Ok(result) => result.unwrap_or_else(|| {
                Err(Error::StartTimeout {
                    after: limit,
                    waiting_for,
                })
            }),
            Err(next) => return next,
        };
        let (ws, session, user_id) = match result {
            Ok(opened) => opened,
            Err(error) => {
                return match start {
                    Some(reply) => {
                        warn!("start failed: {error}");
                        self.shared.set_state(ClientState::Stopped);
                        let _ = reply.send(Err(error));
                        Next::Idle
                    }
                    None => self.after_failed_reconnect(attempt, error).await,
                }
            }
        };
        info!(
            "connected: connection {} to {}",
            session.connection_id,
            redact_url(&session.url)
        );
        self.sequence.reset();
        // Connected before the id is shown: a caller that sees the new id and sends at
        // once is not refused as not connected.
        self.shared.set_state(ClientState::Connected);
        self.shared
            .set_connection_id(Some(session.connection_id.clone()));
        let connection_id = session.connection_id.clone();
        self.session = Some(session);
        self.disconnect_message = None;
        self.recovered_at = None;
        self.recovering_from = None;
        if self.options.auto_rejoin_groups {
            self.queue_rejoins();
        }
        self.announced = true;
        self.emit(Event::Connected {
            connection_id,
            user_id,
        });
        if let Some(reply) = start {
            let _ = reply.send(Ok(()));
        }
        Next::Serve(Box::new(ws))
    }

    /// A reconnect attempt failed: wait per the reconnect policy, or give up.
    async fn after_failed_reconnect(&mut self, attempt: u32, error: Error) -> Next {
        self.shared.set_state(ClientState::Disconnected);
        let Some(delay) = self.options.reconnect_retry.delay_before(attempt) else {
            warn!("reconnect attempt {attempt} failed: {error}; giving up");
            return self.stop(StopBy::Error(error));
        };
        warn!("reconnect attempt {attempt} failed: {error}; next attempt in {delay:?}");
        match self
            .offline(sleep_until(Instant::now() + delay), false)
            .await
        {
            Ok(()) => Next::Open {
                start: None,
                attempt: attempt + 1,
            },
            Err(next) => next,
        }
    }

    /// Connected: serves until the socket ends or the client stops, then takes the
    /// write half back from callers and registers what they wrote before going on.
    async fn serve(&mut self, ws: Ws) -> Next {
        self.shared.set_state(ClientState::Connected);
        let (sink, mut stream) = ws.split();
        let end = self.serve_until_end(sink, &mut stream).await;
        let sink = self.shared.direct.close().await;
        self.register_written();
        self.shared.direct.finished(std::mem::take(&mut self.taken));
        let ws = sink.and_then(|sink| stream.reunite(sink).ok());
        match end {
            End::Dropped(close_code, reason) => {
                if let Some(mut ws) = ws {
                    answer_close(&mut ws);
                }
                self.dropped(close_code, reason)
            }
            End::Failed(code, reason) => {
                if let Some(mut ws) = ws {
                    fail(&mut ws, code);
                }
                self.dropped(None, reason)
            }
            End::Stop(reply) => {
                if let Some(mut ws) = ws {
                    self.write_queued_fire_and_forget(&mut ws).await;
                    close(&mut ws, CloseCode::Normal).await;
                }
                self.stop(StopBy::Caller(reply))
            }
            End::Exit => {
                if let Some(mut ws) = ws {
                    self.write_queued_fire_and_forget(&mut ws).await;
                    close(&mut ws, CloseCode::Away).await;
                }
                Next::Exit
            }
            End::Foreign(lost) => {
                // Closed normally: the service frees the connection it made at once.
                if let Some(mut ws) = ws {
                    close(&mut ws, CloseCode::Normal).await;
                }
                Next::Lost {
                    close_code: lost.close_code,
                    message: Some(lost.reason),
                }
            }
        }
    }

    /// The connected loop: reads frames, writes operations, runs the timers.
    async fn serve_until_end(&mut self, sink: WriteHalf, stream: &mut SplitStream<Ws>) -> End {
        let reliable = self.options.protocol.is_reliable();
        let far = far_future();
        let mut now = Instant::now();
        let direct = self.shared.direct.clone();
        {
            // What queued during a recovery goes out before any caller's direct write.
            let mut slot = direct.lock().await;
            let sink = slot.insert(sink);
            self.pending.take_unsent(now.into_std(), &mut self.out);
            // Under the lock, and before a failed write can let it go with the write
            // half still here: callers count their room (or check for an idle client)
            // under it.
            direct.set_pending(self.pending.len());
            if let Err(end) = self.write_serving(sink).await {
                return end;
            }
        }
        let ping_every = self.options.keep_alive_interval;
        let silence_limit = self.options.keep_alive_timeout;
        let ping = sleep_until(ping_every.map_or(far, |d| now + d));
        let silence = sleep_until(silence_limit.map_or(far, |d| now + d));
        let sequence_timer = sleep_until(far);
        let op_timer = sleep_until(far);
        tokio::pin!(ping, silence, sequence_timer, op_timer);
        let mut last_received = now;
        let mut sequence_armed = false;
        let mut op_armed: Option<Instant> = None;
        // Reading waits while the event handler holds too much (since the instant kept).
        let mut paused = self.backpressure(now);
        loop {
            if reliable && !sequence_armed && self.sequence.has_unacked() {
                sequence_timer
                    .as_mut()
                    .reset(now + self.options.sequence_ack_interval);
                sequence_armed = true;
            }
            if let Some(due) = self.pending.next_due().map(Instant::from_std) {
                if op_armed.is_none_or(|armed| due < armed) {
                    op_timer.as_mut().reset(due);
                    op_armed = Some(due);
                }
            }
            let mut flush = false;
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return End::Exit,
                    Some(Command::Start(reply)) => {
                        let _ = reply.send(Err(already_started()));
                    }
                    Some(Command::Stop(reply)) => return End::Stop(reply),
                    Some(Command::CancelInvocation(id)) => {
                        self.out.extend(self.pending.cancel_invoke(&id));
                    }
                },
                message = stream.next(), if paused.is_none() => {
                    now = Instant::now();
                    last_received = now;
                    if let Some(end) = self.read_batch(message, stream, now) {
                        return end;
                    }
                    paused = self.backpressure(now);
                },
                () = resumed(&mut paused) => {
                    now = Instant::now();
                    let since = paused.take().map_or(now, |(_, since)| since);
                    self.register_written();
                    self.pending.postpone(now - since);
                    op_armed = None;
                    last_received = now;
                    silence.as_mut().reset(silence_limit.map_or(far, |d| now + d));
                },
                Some(op) = self.operations.recv(), if self.takes_operations() => {
                    now = Instant::now();
                    // Taken in under the write half's lock, and counted pending before
                    // it is released: a caller that writes a run itself looks for room
                    // under it (see `Direct::write_run`).
                    let _held = direct.lock().await;
                    // A caller's own write went out before the operations it queued
                    // next: registered first, it is resent first after a recovery.
                    self.register_written();
                    self.send_op(op, now);
                    self.taken += 1;
                    for _ in 1..BATCH {
                        if !self.takes_operations() {
                            break;
                        }
                        match self.operations.try_recv() {
                            Ok(op) => {
                                self.send_op(op, now);
                                self.taken += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    direct.set_pending(self.pending.len());
                },
                () = direct.woken() => {
                    now = Instant::now();
                    self.register_written();
                    flush = true;
                },
                () = &mut ping, if ping_every.is_some() => {
                    now = Instant::now();
                    // Bounds how late a caller's write is registered with nothing read.
                    self.register_written();
                    trace!("keep-alive ping");
                    self.out.push(encode(&Upstream::Ping));
                    ping.as_mut().reset(ping_every.map_or(far, |d| now + d));
                },
                () = &mut silence, if silence_limit.is_some() && paused.is_none() => {
                    now = Instant::now();
                    let due = silence.deadline();
                    if let Some(message) = ready_after_yield(stream.next(), due).await {
                        last_received = now;
                        if let Some(end) = self.read_batch(message, stream, now) {
                            return end;
                        }
                        paused = self.backpressure(now);
                    }
                    let limit = silence_limit.unwrap_or_default();
                    if now >= last_received + limit {
                        warn!("nothing received for {limit:?}: closing the connection to recover it");
                        return End::Dropped(None, format!("nothing received for {limit:?}"));
                    }
                    silence.as_mut().reset(last_received + limit);
                },
                () = &mut sequence_timer, if sequence_armed => {
                    now = Instant::now();
                    sequence_armed = false;
                    if let Some(sequence_id) = self.sequence.take_ack() {
                        self.out.push(encode(&Upstream::SequenceAck { sequence_id }));
                    }
                },
                () = &mut op_timer, if op_armed.is_some() && paused.is_none() => {
                    now = Instant::now();
                    op_armed = None;
                    let due = op_timer.deadline();
                    if let Some(message) = ready_after_yield(stream.next(), due).await {
                        last_received = now;
                        if let Some(end) = self.read_batch(message, stream, now) {
                            return end;
                        }
                        paused = self.backpressure(now);
                    }
                    if paused.is_none() {
                        self.pending.expire(now.into_std(), &mut self.out, &mut self.done);
                    }
                },
            }
            direct.set_pending(self.pending.len());
            self.finish_done();
            if flush || !self.out.is_empty() {
                let mut slot = direct.lock().await;
                if let Some(sink) = slot.as_mut() {
                    if let Err(end) = self.write_serving(sink).await {
                        return end;
                    }
                }
            }
            direct.finished(std::mem::take(&mut self.taken));
        }
    }

    /// Handles `message` and what else the socket holds now (`BATCH` frames at most),
    /// their events as one batch; `Some` when the connection ended.
    fn read_batch(
        &mut self,
        mut message: Option<Result<Message, WsError>>,
        stream: &mut SplitStream<Ws>,
        now: Instant,
    ) -> Option<End> {
        // Before anything read now: an ack may be for a caller's own write.
        self.register_written();
        let mut budget = BATCH;
        // What the frames read now make due (a jump's sequenceAck) starts here.
        let replies = self.out.len();
        self.in_batch = true;
        let ended = loop {
            if let Some(end) = self.on_message(message, now) {
                break Some(end);
            }
            budget -= 1;
            if budget == 0 {
                break None;
            }
            match stream.next().now_or_never() {
                Some(more) => message = more,
                None => break None,
            }
        };
        self.in_batch = false;
        if std::mem::take(&mut self.raised_in_batch) {
            self.end_batch();
        }
        if ended.is_some() {
            // Meant for this connection only: on the next, the sequence starts afresh,
            // or is acknowledged again after a recovery.
            self.out.truncate(replies);
        }
        ended
    }

    /// Writes `out` (and flushes) on the live connection. Commands are still answered
    /// meanwhile: a peer that reads nothing keeps the socket's buffers full and a write
    /// waiting, for as long as the connection stays up, and neither a stop nor the
    /// client's drop may wait for it longer than `CLOSE_TIMEOUT`. A write that makes no
    /// progress for the keep-alive timeout drops the connection (to recover it), as
    /// silence does: the socket is not read while a write waits.
    async fn write_serving(&mut self, sink: &mut WriteHalf) -> Result<(), End> {
        let stall_limit = self.options.keep_alive_timeout;
        let mut cancelled = Vec::new();
        loop {
            let written = {
                let write = write_out(sink, &mut self.out, stall_limit);
                tokio::pin!(write);
                let mut ending = None;
                let written = loop {
                    tokio::select! {
                        written = &mut write => break Some(written),
                        command = self.commands.recv() => match command {
                            None => {
                                ending = Some(End::Exit);
                                break None;
                            }
                            Some(Command::Stop(reply)) => {
                                ending = Some(End::Stop(reply));
                                break None;
                            }
                            Some(Command::Start(reply)) => {
                                let _ = reply.send(Err(already_started()));
                            }
                            Some(Command::CancelInvocation(id)) => cancelled.push(id),
                        },
                    }
                };
                if let Some(end) = ending {
                    // The frames being written may be fire-and-forget messages already
                    // reported sent: they go before the close frame, if they can.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut write).await;
                    return Err(end);
                }
                written.unwrap_or(Ok(()))
            };
            if let Err(reason) = written {
                warn!("{reason}: closing the connection to recover it");
                return Err(End::Dropped(None, reason));
            }
            for id in cancelled.drain(..) {
                self.out.extend(self.pending.cancel_invoke(&id));
            }
            if self.out.is_empty() {
                return Ok(());
            }
        }
    }

    /// Registers the acked operations callers wrote themselves (only acked ones take
    /// that path), as sent when they were written. One whose caller gave up meanwhile is
    /// registered too: it was written, and a resend with its ackId waits for it
    /// (`Pending::reattach`) instead of writing it again.
    fn register_written(&mut self) {
        for (op, written_at) in self.shared.direct.take_written() {
            if let OpKind::Ack {
                ack_id,
                purpose,
                reply,
                ..
            } = op.kind
            {
                if let Err(done) = self.pending.add_ack(
                    ack_id,
                    op.frame,
                    purpose,
                    Some(reply),
                    Start::Written(written_at),
                ) {
                    done.reply();
                }
            }
        }
    }

    /// Before a closing handshake: writes the queued fire-and-forget frames (in the
    /// channel and its overflow queue), whose senders were already told they were sent
    /// (commands and operations travel on separate channels, so a stop can overtake
    /// them). Queued acked operations fail with `Stopped` unsent, so that a caller's
    /// retry cannot publish twice.
    async fn write_queued_fire_and_forget(&mut self, ws: &mut Ws) {
        for op in self.take_waiting() {
            match op.kind {
                OpKind::FireAndForget => self.out.push(op.frame),
                _ => op.refuse(Error::Stopped { ack_id: None }),
            }
        }
        if !self.out.is_empty() {
            let written =
                tokio::time::timeout(CLOSE_TIMEOUT, write_out(ws, &mut self.out, None)).await;
            if !matches!(written, Ok(Ok(()))) {
                warn!("stopping: queued fire-and-forget frames could not all be written");
            }
            self.out.clear();
        }
    }

    /// Takes every operation handed towards the task and not taken in yet, oldest
    /// first (see [`Overflow::take_waiting`]); the task is done with them.
    fn take_waiting(&mut self) -> Vec<Operation> {
        let waiting = self.shared.overflow.take_waiting(&mut self.operations);
        self.shared.direct.finished(waiting.len());
        waiting
    }

    /// Handles what the socket produced; `Some` when the connection ended.
    fn on_message(
        &mut self,
        message: Option<Result<Message, WsError>>,
        now: Instant,
    ) -> Option<End> {
        match message {
            Some(Ok(Message::Text(text))) => return self.on_frame(Bytes::from(text), now),
            Some(Ok(Message::Binary(_))) => {
                warn!("ignoring a binary frame: the JSON protocols use text frames")
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((None, String::new()), |f| {
                    (Some(u16::from(f.code)), f.reason.to_string())
                });
                let reason = if reason.is_empty() {
                    "closed by the service".into()
                } else {
                    reason
                };
                return Some(End::Dropped(code, reason));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return Some(match failure_code(&e) {
                    Some(code) => End::Failed(code, e.to_string()),
                    None => End::Dropped(None, e.to_string()),
                })
            }
            None => return Some(End::Dropped(None, "the connection closed".into())),
        }
        None
    }

    /// Recovering: reconnects to the same session every `recovery_attempt_delay` for
    /// `recovery_window`. Operations queue meanwhile; no events are raised.
    async fn recover(
        &mut self,
        since: Instant,
        first_attempt: Instant,
        close_code: Option<u16>,
        reason: String,
    ) -> Next {
        self.update_recovery_queue_full();
        self.shared.set_state(ClientState::Recovering);
        let deadline = since + self.options.recovery_window;
        let Some(session) = &self.session else {
            return Next::Lost {
                close_code,
                message: Some(reason),
            };
        };
        let connection_id = session.connection_id.clone();
        let url = recovery_url(
            &session.url,
            &connection_id,
            session.reconnection_token.as_deref().unwrap_or_default(),
        );
        // A connection id or token long enough makes a URL no request can carry: no
        // attempt could work, and the session would only be lost at the window's end.
        if url.len() > MAX_URL_LEN {
            warn!(
                "connection {connection_id} dropped ({reason}) and cannot be recovered: its recovery URL is {} bytes long, over the {MAX_URL_LEN} bytes a request can carry",
                url.len()
            );
            return Next::Lost {
                close_code,
                message: Some(reason),
            };
        }
        info!("connection {connection_id} dropped ({reason}); recovering");
        let mut attempt = 0u32;
        let mut attempt_at = first_attempt;
        // The first failure is logged at info with its cause, the others at debug (one
        // per `recovery_attempt_delay` would flood the log); the window's end names the
        // last one.
        let mut last_failure: Option<String> = None;
        while attempt_at < deadline {
            if attempt_at > Instant::now() {
                if let Err(next) = self.offline(sleep_until(attempt_at), true).await {
                    return next;
                }
            }
            attempt += 1;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let connector = self.connector.clone();
            let limit = (deadline - now).min(self.options.start_timeout);
            let mut waiting_for = String::new();
            let attempt_fut = Box::pin(connector.connect(&url, &mut waiting_for));
            let failure = match self.offline(before_limit(limit, attempt_fut), true).await {
                Err(next) => return next,
                Ok(Some(Ok(ws))) => {
                    info!("connection {connection_id}: recovery attempt {attempt} reached the service");
                    self.recovered_at = Some((since, Instant::now()));
                    self.recovering_from = Some(Cause { close_code, reason });
                    return Next::Serve(Box::new(ws));
                }
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => format!("timed out waiting for {waiting_for}"),
            };
            let delay = self.options.recovery_attempt_delay;
            if last_failure.is_none() {
                info!(
                    "recovery attempt {attempt} of connection {connection_id} failed: {failure}; retrying every {delay:?} until {:?} after the drop",
                    self.options.recovery_window
                );
            } else {
                debug!(
                    "recovery attempt {attempt} of connection {connection_id} failed: {failure}"
                );
            }
            last_failure = Some(failure);
            attempt_at = Instant::now() + delay;
        }
        let last = last_failure.map_or_else(String::new, |f| format!(" (last attempt: {f})"));
        warn!(
            "connection {connection_id} could not be recovered within {:?}{last}",
            self.options.recovery_window
        );
        Next::Lost {
            close_code,
            message: Some(reason),
        }
    }

    /// The session is gone: report it, fail what was pending, then reconnect or stop.
    fn lose_session(&mut self, close_code: Option<u16>, message: Option<String>) -> Next {
        let connection_id = self.session.take().map(|s| s.connection_id);
        let message = self.disconnect_message.take().or(message);
        warn!(
            "connection {} lost ({}close code {}): the session cannot be recovered",
            connection_id.as_deref().unwrap_or("-"),
            message
                .as_deref()
                .map(|m| format!("{m}; "))
                .unwrap_or_default(),
            close_code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
        );
        self.shared.set_connection_id(None);
        // Before the event: a listener of it finds the client disconnected (its calls
        // are refused at once), not connected still.
        self.shared.set_state(ClientState::Disconnected);
        self.sequence.reset();
        self.pending.connection_dropped(false, &mut self.done);
        self.finish_done();
        if std::mem::take(&mut self.announced) {
            self.emit(Event::Disconnected {
                connection_id,
                message,
                close_code,
            });
        }
        if self.options.auto_reconnect {
            Next::Open {
                start: None,
                attempt: 1,
            }
        } else {
            self.stop(StopBy::Error(Error::NotConnected { ack_id: None }))
        }
    }

    /// Stops: fails pending operations, raises `Disconnected` (if connected) and
    /// `Stopped` (with the error of a stop on its own), then answers the `stop()` caller.
    /// As with the official clients, each event finds the client in the state it reports
    /// (`Disconnected`, then `Stopped`), and the pending operations fail once it is no
    /// longer connected.
    fn stop(&mut self, by: StopBy) -> Next {
        let announced = std::mem::take(&mut self.announced);
        let connection_id = self.session.take().map(|s| s.connection_id);
        self.shared.set_connection_id(None);
        self.shared.set_state(if announced {
            ClientState::Disconnected
        } else {
            ClientState::Stopped
        });
        for op in self.take_waiting() {
            op.refuse(Error::Stopped { ack_id: None });
        }
        self.pending
            .fail_all(|ack_id| Error::Stopped { ack_id }, &mut self.done);
        self.finish_done();
        self.sequence.reset();
        let (reply, error) = match by {
            StopBy::Caller(reply) => (Some(reply), None),
            StopBy::Error(error) => (None, Some(error)),
        };
        if announced {
            // Only a panic stops a connected client on its own: its socket is dropped.
            let (message, close_code) = match &error {
                None => ("stopped by the client".into(), Some(1000)),
                Some(error) => (error.to_string(), None),
            };
            self.emit(Event::Disconnected {
                connection_id,
                message: Some(message),
                close_code,
            });
            self.shared.set_state(ClientState::Stopped);
        }
        info!("stopped");
        self.emit(Event::Stopped { error });
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
        Next::Idle
    }

    /// Classifies an ended socket: recover (reliable, not 1008) or lose the session. A
    /// recovery's socket that ends before the service confirmed the recovery was one
    /// more attempt of it (with 1008, refused): the drop the recovery was for is still
    /// the one recovered from, or reported.
    fn dropped(&mut self, close_code: Option<u16>, reason: String) -> Next {
        let recoverable = self.options.protocol.is_reliable()
            && close_code != Some(POLICY_VIOLATION)
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.reconnection_token.is_some());
        let recovering_from = self.recovering_from.take();
        let unconfirmed = recovering_from.is_some();
        let (close_code, reason) = match recovering_from {
            Some(lost) => {
                let connection_id = self.session.as_ref().map_or("-", |s| &s.connection_id);
                let code = close_code.map_or_else(|| "none".to_owned(), |c| c.to_string());
                if recoverable {
                    debug!("the recovery of connection {connection_id} ended before the service confirmed it ({reason}; close code {code})");
                } else {
                    warn!("the service refused the recovery of connection {connection_id} ({reason}; close code {code})");
                }
                (lost.close_code, lost.reason)
            }
            None => (close_code, reason),
        };
        if !recoverable {
            // `lose_session` fails what was pending once the client is disconnected:
            // not here, where a caller told of it (or a `RejoinGroupFailed` listener)
            // would find it connected still.
            return Next::Lost {
                close_code,
                message: Some(reason),
            };
        }
        self.pending.connection_dropped(true, &mut self.done);
        self.finish_done();
        self.sequence.ack_again();
        let now = Instant::now();
        let delay = self.options.recovery_attempt_delay;
        // A connection that ends within an attempt's delay of its recovery, or before
        // the service confirmed it however long it stayed open, was one more failed
        // attempt of that recovery: its window goes on, and so does the delay between
        // attempts.
        let (since, first_attempt) = match self.recovered_at.take() {
            Some((since, at)) if unconfirmed || now < at + delay => (since, at + delay),
            _ => (now, now),
        };
        Next::Recover {
            since,
            first_attempt,
            close_code,
            reason,
        }
    }

    /// Runs `fut` while not connected, answering commands meanwhile. Operations are
    /// queued (`queue`, during a recovery) or refused. During a recovery the ack
    /// deadlines of the operations it holds run on (`Pending::expire`): those the drop
    /// cut off and those made since. `Err` carries the phase to go to when the client
    /// was stopped or dropped.
    async fn offline<F: Future>(&mut self, fut: F, queue: bool) -> Result<F::Output, Next> {
        let ack_timer = sleep_until(far_future());
        let stop = {
            tokio::pin!(fut, ack_timer);
            loop {
                let due = self.pending.next_due().filter(|_| queue);
                if queue {
                    self.update_recovery_queue_full();
                    if let Some(due) = due {
                        ack_timer.as_mut().reset(Instant::from_std(due));
                    }
                }
                tokio::select! {
                    output = &mut fut => return Ok(output),
                    () = &mut ack_timer, if due.is_some() => {
                        let now = Instant::now().into_std();
                        self.pending.expire(now, &mut self.out, &mut self.done);
                        self.finish_done();
                    },
                    command = self.commands.recv() => match command {
                        None => return Err(Next::Exit),
                        Some(Command::Stop(reply)) => break reply,
                        Some(Command::Start(reply)) => {
                            let _ = reply.send(Err(already_started()));
                        }
                        Some(Command::CancelInvocation(id)) => {
                            self.pending.cancel_invoke(&id);
                        }
                    },
                    Some(op) = self.operations.recv(), if !queue || self.takes_operations() => {
                        self.shared.direct.finished(1);
                        if queue {
                            self.queue_op(op);
                        } else {
                            op.refuse(Error::NotConnected { ack_id: None });
                        }
                    }
                }
            }
        };
        // `fut` was dropped, before the stop is answered: whoever waited for the stop
        // finds what it abandoned over (a credential request, whose late answer is then
        // refused).
        Err(self.stop(StopBy::Caller(stop)))
    }

    /// Whether the task takes another operation from the channel: fewer than
    /// `MAX_PENDING_ACKS` acked ones are pending.
    fn takes_operations(&self) -> bool {
        self.pending.acks_len() < MAX_PENDING_ACKS
    }

    /// Tells senders whether a recovery may queue more: not once its queue is full, nor
    /// while `MAX_PENDING_ACKS` acked operations are pending (no ack can come to make
    /// room, and a sender would wait for the whole recovery). Operations given up by
    /// their callers are forgotten first: they will not be written, so they take no
    /// room. What was handed over before stays: the queue can pass the limits by what
    /// was in flight when it filled, and acked operations beyond the pending limit wait
    /// in the channel.
    fn update_recovery_queue_full(&mut self) {
        if self.recovery_queue_is_full() {
            self.pending.forget_given_up();
        }
        let full = self.recovery_queue_is_full();
        self.shared
            .recovery_queue_full
            .store(full, Ordering::Release);
    }

    fn recovery_queue_is_full(&self) -> bool {
        self.pending.unsent_len() >= RECOVERY_QUEUE_OPS
            || self.pending.unsent_frame_bytes() >= RECOVERY_QUEUE_BYTES
            || !self.takes_operations()
    }

    /// Writes an operation on the live connection (the frame goes to `out`).
    fn send_op(&mut self, op: Operation, now: Instant) {
        match op.kind {
            OpKind::FireAndForget => self.out.push(op.frame),
            OpKind::Ack {
                ack_id,
                automatic,
                purpose,
                reply,
            } => {
                if reply.is_closed() {
                    // Dropped unwritten. Its caller may resend it with the ackId it
                    // drew: not with one a pending operation holds (the service would
                    // take the resend for that one's duplicate).
                    if automatic && self.pending.has_ack(ack_id) {
                        let free = self.free_ack_id();
                        self.pending.renumber(ack_id, &op.frame, free);
                    }
                    return;
                }
                let written = Start::Written(now.into_std());
                if let Some(frame) =
                    self.add_ack(ack_id, automatic, op.frame, purpose, reply, written)
                {
                    self.out.push(frame);
                }
            }
            OpKind::Invoke {
                invocation_id,
                timeout,
                reply,
            } => {
                if reply.is_closed() {
                    return;
                }
                self.pending.add_invoke(
                    invocation_id,
                    op.frame.clone(),
                    timeout,
                    reply,
                    Some(now.into_std()),
                );
                self.out.push(op.frame);
            }
        }
    }

    /// Keeps an operation until the connection is recovered.
    fn queue_op(&mut self, op: Operation) {
        match op.kind {
            OpKind::FireAndForget => self.pending.add_unsent_frame(op.frame),
            OpKind::Ack {
                ack_id,
                automatic,
                purpose,
                reply,
            } => {
                let held = Start::Held(std::time::Instant::now());
                self.add_ack(ack_id, automatic, op.frame, purpose, reply, held);
            }
            OpKind::Invoke {
                invocation_id,
                timeout,
                reply,
            } => {
                self.pending
                    .add_invoke(invocation_id, op.frame, timeout, reply, None);
            }
        }
    }

    /// Registers a caller's acked operation, written now or queued (`start`); returns
    /// the frame to write. An automatic ackId still held by a pending operation (whose
    /// caller chose it) is replaced by the next free one, so only a caller's own
    /// choice can collide (`InvalidArgument`), unless it resends an operation whose
    /// caller gave up: it then waits for that one (`Pending::reattach`). Such a resend
    /// may carry the automatic ackId its caller drew (an interrupted call reports it):
    /// it goes under that ackId's replacement, as the operation it resends did.
    fn add_ack(
        &mut self,
        mut ack_id: u64,
        automatic: bool,
        mut frame: Utf8Bytes,
        purpose: Purpose,
        reply: AckReply,
        start: Start,
    ) -> Option<Utf8Bytes> {
        let reply = if automatic {
            reply
        } else {
            if let Some(used) = self.pending.renumbered(ack_id, &frame) {
                (ack_id, frame) = renumber(ack_id, frame, used);
            }
            // The operation it resends may be one a caller wrote itself, not registered yet.
            self.register_written();
            match self.pending.reattach(ack_id, &frame, reply) {
                Ok(()) => return None,
                Err(reply) => reply,
            }
        };
        if automatic && self.pending.has_ack(ack_id) {
            let (drawn, drawn_frame) = (ack_id, frame.clone());
            (ack_id, frame) = renumber(drawn, frame, self.free_ack_id());
            debug!("automatic ackId {drawn} is held by a pending operation: using {ack_id}");
            self.pending.renumber(drawn, &drawn_frame, ack_id);
        }
        match self
            .pending
            .add_ack(ack_id, frame.clone(), purpose, Some(reply), start)
        {
            Ok(()) => Some(frame),
            Err(done) => {
                done.reply();
                None
            }
        }
    }

    /// The next ackId of the counter that no pending operation holds (the loop ends:
    /// at most one id per pending operation is skipped).
    fn free_ack_id(&self) -> u64 {
        loop {
            let ack_id = self.shared.next_ack_id();
            if !self.pending.has_ack(ack_id) {
                return ack_id;
            }
        }
    }

    /// Queues a joinGroup for every group joined before the session was lost or the
    /// client stopped.
    fn queue_rejoins(&mut self) {
        for group in self.groups.clone() {
            let ack_id = self.free_ack_id();
            let frame = encode(&Upstream::JoinGroup {
                group: group.clone(),
                ack_id: Some(ack_id),
            });
            debug!("rejoining group {group:?} (ackId {ack_id})");
            if let Err(done) =
                self.pending
                    .add_ack(ack_id, frame, Purpose::Rejoin(group), None, Start::Queued)
            {
                self.done.push(*done);
            }
        }
    }

    /// The service confirmed the recovery of the current session (by its `connected`
    /// frame or its traffic): the reason it gave for the drop explains no later one. Not
    /// before: a recovery the service refuses (it closes the socket first) loses the
    /// session for that reason, as the official clients say.
    fn recovery_confirmed(&mut self) {
        if let Some(session) = &self.session {
            info!("connection {} recovered", session.connection_id);
        }
        self.disconnect_message = None;
    }

    /// Handles one frame from the service. Malformed and unknown frames are logged
    /// and skipped, never fatal; `Some` when the frame ends the connection.
    fn on_frame(&mut self, frame: Bytes, now: Instant) -> Option<End> {
        let downstream = match json::decode_downstream(&frame) {
            Ok(downstream) => downstream,
            Err(e) => {
                warn!("skipping a malformed frame from the service: {e}");
                return None;
            }
        };
        let of_the_session = !matches!(
            downstream,
            Downstream::Connected { .. }
                | Downstream::Disconnected { .. }
                | Downstream::Unknown { .. }
        );
        if of_the_session && self.recovering_from.take().is_some() {
            // The service may recover a session without a `connected` frame: its traffic
            // confirms the recovery as well.
            self.recovery_confirmed();
        }
        match downstream {
            Downstream::Ack {
                ack_id,
                success,
                error,
            } => {
                if !self.pending.has_ack(ack_id) {
                    // A caller may have written it while this batch was being read.
                    self.register_written();
                }
                match self.pending.on_ack(ack_id, success, error, now.into_std()) {
                    Some(done) => self.done.push(done),
                    None => trace!("ack {ack_id} completes nothing (late, duplicate or retrying)"),
                }
            }
            Downstream::GroupMessage {
                group,
                from_user_id,
                data,
                sequence_id,
            } => {
                if self.accept_sequence(sequence_id) {
                    self.emit(Event::GroupMessage {
                        group,
                        from_user_id,
                        data_type: data.data_type,
                        data: data.bytes,
                        sequence_id,
                    });
                }
            }
            Downstream::ServerMessage { data, sequence_id } => {
                if self.accept_sequence(sequence_id) {
                    self.emit(Event::ServerMessage {
                        data_type: data.data_type,
                        data: data.bytes,
                        sequence_id,
                    });
                }
            }
            Downstream::InvokeResponse {
                invocation_id,
                success,
                data,
                error,
            } => {
                let result = if success {
                    let data = data.unwrap_or(crate::protocol::Data {
                        data_type: DataType::Text,
                        bytes: Bytes::new(),
                    });
                    Ok(InvokeResult {
                        data_type: data.data_type,
                        data: data.bytes,
                    })
                } else {
                    let error = error.unwrap_or_else(|| crate::protocol::ErrorDetail {
                        name: "Unknown".into(),
                        message: "the invocation failed".into(),
                    });
                    Err(Error::Invoke {
                        invocation_id: invocation_id.clone(),
                        name: error.name,
                        message: error.message,
                    })
                };
                if !self.pending.on_invoke_response(&invocation_id, result) {
                    debug!("invoke response {invocation_id:?} matches no pending invocation");
                }
            }
            Downstream::Connected {
                connection_id,
                reconnection_token,
                ..
            } => {
                if let Some(lost) = self.recovering_from.take() {
                    if let Some(session) = self
                        .session
                        .as_ref()
                        .filter(|s| s.connection_id != connection_id)
                    {
                        // The service took the recovery for a new connection: that one
                        // has none of our groups, and its sequence ids start again,
                        // which the dedup would drop. The session is lost; a new
                        // connection rejoins the groups.
                        warn!(
                            "the service answered the recovery of connection {} as connection {connection_id}: the session is lost",
                            session.connection_id
                        );
                        return Some(End::Foreign(lost));
                    }
                    self.recovery_confirmed();
                }
                debug!("connected frame for connection {connection_id} on a live connection: new reconnection token");
                if let (Some(session), Some(token)) = (self.session.as_mut(), reconnection_token) {
                    session.reconnection_token = Some(token);
                }
            }
            Downstream::Disconnected { message } => {
                let message_text = message.as_deref().unwrap_or("");
                if self.recovering_from.is_none() {
                    info!("the service is closing the connection: {message_text}");
                    self.disconnect_message = message;
                } else {
                    // Before the recovery is confirmed, it explains a refusal of the
                    // recovery, which only the log tells: the event reports the drop.
                    warn!("the service is closing the recovering connection: {message_text}");
                }
            }
            Downstream::Pong => trace!("pong"),
            Downstream::Unknown { kind } => debug!("ignoring a frame of unknown type {kind:?}"),
        }
        None
    }

    /// Dedupes a data frame by sequence id (reliable protocols) and sends a
    /// `sequenceAck` at once after a big jump. `false`: already delivered.
    fn accept_sequence(&mut self, sequence_id: Option<u64>) -> bool {
        let Some(id) = sequence_id.filter(|_| self.options.protocol.is_reliable()) else {
            return true;
        };
        if !self.sequence.accept(id) {
            trace!("dropping duplicate data frame {id}");
            return false;
        }
        if self.sequence.ack_due_now(self.options.sequence_ack_jump) {
            if let Some(sequence_id) = self.sequence.take_ack() {
                self.out
                    .push(encode(&Upstream::SequenceAck { sequence_id }));
            }
        }
        true
    }

    /// Delivers finished operations: group bookkeeping, rejoin failures, replies.
    fn finish_done(&mut self) {
        for done in std::mem::take(&mut self.done) {
            match (&done.purpose, &done.result) {
                (Purpose::Join(group) | Purpose::Rejoin(group), Ok(_)) => {
                    self.groups.insert(group.clone());
                }
                (Purpose::Leave(group), Ok(_)) => {
                    self.groups.remove(group);
                }
                (Purpose::Rejoin(group), Err(error)) if !matches!(error, Error::Stopped { .. }) => {
                    warn!("rejoining group {group:?} failed: {error}");
                    self.emit(Event::RejoinGroupFailed {
                        group: group.clone(),
                        error: error.clone(),
                    });
                }
                _ => {}
            }
            done.reply();
        }
    }

    /// Calls the event handler; a panicking handler is logged, never fatal. Outside a
    /// batch of frames, the batch ends with the event.
    fn emit(&mut self, event: Event) {
        let handler = &self.on_event;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.on_event(event)))
            .is_err()
        {
            warn!("the event handler panicked; the event was dropped");
        }
        if self.in_batch {
            self.raised_in_batch = true;
        } else {
            self.end_batch();
        }
    }

    /// Asks the event handler whether reading must wait (see
    /// [`EventHandler::backpressure`]); a panicking handler is logged and not waited for.
    fn backpressure(&self, now: Instant) -> Option<(Resume, Instant)> {
        let handler = &self.on_event;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.backpressure())) {
            Ok(resume) => resume.map(|resume| {
                debug!("the event handler is behind: reading paused");
                (resume, now)
            }),
            Err(_) => {
                warn!("the event handler panicked when asked for backpressure");
                None
            }
        }
    }

    /// Tells the event handler that a batch of events is complete.
    fn end_batch(&self) {
        let handler = &self.on_event;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.on_batch_end()))
            .is_err()
        {
            warn!("the event handler panicked at the end of a batch");
        }
    }
}

/// Completes when the paused reading may go on (never while it is not paused). A
/// panicking `resume` is logged and lets reading go on, as a panicking handler does.
async fn resumed(paused: &mut Option<(Resume, Instant)>) {
    match paused {
        Some((resume, _)) => {
            if std::panic::AssertUnwindSafe(resume)
                .catch_unwind()
                .await
                .is_err()
            {
                warn!("the event handler's resume future panicked; reading goes on");
            }
        }
        None => std::future::pending().await,
    }
}

/// `fut`'s output, unless `limit` passes first. A limit that fired gives `fut` the last
/// chance of [`ready_after_yield`].
async fn before_limit<F: Future + Unpin>(limit: Duration, mut fut: F) -> Option<F::Output> {
    let due = Instant::now() + limit;
    match tokio::time::timeout(limit, &mut fut).await {
        Ok(output) => Some(output),
        Err(_) => ready_after_yield(fut, due).await,
    }
}

/// How much later than due a timer fires when it counts as late: the process was
/// stopped (SIGSTOP, a debugger) or starved meanwhile.
const LATE: Duration = Duration::from_millis(5);

/// `fut`'s output if it is ready once the runtime has polled its sockets. A timer that
/// fired late (the process was stopped, or busy) may be handled before the readiness that
/// came meanwhile is seen: it gives the work it bounds this last chance before failing
/// it, so that an ack, a `connected` frame or a writable socket that came in time wins.
/// A yield is one chance; for a timer that fired `LATE` after `due`, a millisecond's
/// sleep is a second: a worker's turn after a yield polls the sockets only if no other
/// worker holds the driver, while a sleep ends in a turn of the driver that polled them
/// after it began.
async fn ready_after_yield<F: Future + Unpin>(mut fut: F, due: Instant) -> Option<F::Output> {
    tokio::task::yield_now().await;
    if let Some(output) = (&mut fut).now_or_never() {
        return Some(output);
    }
    if Instant::now() < due + LATE {
        return None;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    fut.now_or_never()
}

/// Gets a URL from the credential, connects, and waits for the `connected` frame.
/// `waiting_for` names the step in progress, for a timeout's error.
async fn open_connection(
    credential: Credential,
    connector: Connector,
    waiting_for: &mut String,
) -> Result<(Ws, Session, Option<String>), Error> {
    *waiting_for = "the credential to give the client URL".into();
    let url = credential.client_url().await?;
    debug!("connecting to {}", redact_url(&url));
    let mut ws = connector.connect(&url, waiting_for).await?;
    *waiting_for = format!("the connected frame from {}", peer_of(&url));
    // Why the service is about to close the connection, should it say so first.
    let mut disconnected: Option<String> = None;
    let closed = |detail: String, disconnected: Option<String>| {
        Error::Connect(match disconnected {
            Some(message) => format!("closed before the connected frame: {message} ({detail})"),
            None => format!("closed before the connected frame ({detail})"),
        })
    };
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match json::decode_downstream(&Bytes::from(text)) {
                Ok(Downstream::Connected {
                    connection_id,
                    user_id,
                    reconnection_token,
                }) => {
                    return Ok((
                        ws,
                        Session {
                            url,
                            connection_id,
                            reconnection_token,
                        },
                        user_id,
                    ));
                }
                Ok(Downstream::Disconnected { message }) => disconnected = message,
                Ok(other) => debug!("ignoring a frame before the connected frame: {other:?}"),
                Err(e) => warn!("skipping a malformed frame from the service: {e}"),
            },
            Some(Ok(Message::Close(frame))) => {
                answer_close(&mut ws);
                let detail = frame.map_or_else(
                    || "no close frame".to_owned(),
                    |f| {
                        format!("{} {}", u16::from(f.code), f.reason)
                            .trim_end()
                            .to_owned()
                    },
                );
                return Err(closed(detail, disconnected));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if let Some(code) = failure_code(&e) {
                    fail(&mut ws, code);
                }
                return Err(closed(e.to_string(), disconnected));
            }
            None => return Err(closed("no close frame".into(), disconnected)),
        }
    }
}

/// The URL of a recovery attempt: the lost connection's URL plus its id and token.
fn recovery_url(url: &str, connection_id: &str, token: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{separator}awps_connection_id={}&awps_reconnection_token={}",
        percent_encode(connection_id, unreserved),
        percent_encode(token, unreserved)
    )
}

/// A URI's unreserved characters (RFC 3986, 2.3): the others are percent-encoded in a
/// query value.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// `frame` with its ackId `ack_id` replaced by `new`, and its ackId now (still
/// `ack_id` for a frame without that ackId: none encoded by this crate).
fn renumber(ack_id: u64, frame: Utf8Bytes, new: u64) -> (u64, Utf8Bytes) {
    match json::replace_ack_id(&frame, ack_id, new) {
        Some(renumbered) => (new, renumbered.into()),
        None => (ack_id, frame),
    }
}

fn encode(frame: &Upstream) -> Utf8Bytes {
    json::encode_upstream(frame).into()
}

/// The refusal of a `start` while the client runs.
fn already_started() -> Error {
    Error::IllegalState("the client is already started".into())
}

/// Writes every frame of `out`, then flushes once. With a `stall_limit`, a step (a
/// frame, or the flush) still waiting after it fails the write: the peer reads nothing.
async fn write_out<S>(
    ws: &mut S,
    out: &mut Vec<Utf8Bytes>,
    stall_limit: Option<Duration>,
) -> Result<(), String>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    for frame in out.drain(..) {
        within(stall_limit, ws.feed(Message::Text(frame))).await?;
    }
    within(stall_limit, ws.flush()).await
}

/// Runs one write step, failing it once it has waited `limit`. The timer starts only
/// when the step waits, so the common step that completes at once costs none.
async fn within<F>(limit: Option<Duration>, step: F) -> Result<(), String>
where
    F: Future<Output = Result<(), WsError>>,
{
    tokio::pin!(step);
    let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let waited = std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = step.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        if let Some(limit) = limit {
            let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err((limit, timer.deadline())));
            }
        }
        Poll::Pending
    })
    .await;
    let done = match waited {
        Ok(done) => done,
        Err((limit, due)) => ready_after_yield(step, due).await.ok_or_else(|| {
            format!("no write went through for {limit:?} (the service reads nothing)")
        })?,
    };
    done.map_err(|e| format!("write failed: {e}"))
}

/// Sends a close frame and drops what comes until the service's close frame, waiting
/// at most `CLOSE_TIMEOUT` in all. A socket closed with unread data (a paused reading
/// leaves much) is reset, and the service may then lose the close frame and keep a
/// reliable session for a recovery that never comes.
async fn close(ws: &mut Ws, code: CloseCode) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(""),
    };
    let handshake = async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// Writes the answer to a close frame from the service, which tungstenite queued when
/// it read it (RFC 6455, 5.5.1), if the socket takes it at once: a service that reads
/// nothing holds up no reconnect. After another end, it writes what is left (if
/// anything) to a socket about to be dropped.
fn answer_close(ws: &mut Ws) {
    let _ = ws.flush().now_or_never();
}

/// The close code with which a read error fails the connection (RFC 6455, 7.1.7 and
/// 7.4.1); None when the socket itself failed or ended, or after a close frame.
fn failure_code(error: &WsError) -> Option<CloseCode> {
    match error {
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::ReceivedAfterClosing
            | ProtocolError::SendAfterClosing,
        ) => None,
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}

/// Fails the connection with a close frame of `code` before the socket is dropped, if
/// the socket takes it at once: a service that reads nothing holds up no reconnect.
fn fail(ws: &mut Ws, code: CloseCode) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(""),
    };
    let _ = ws.close(Some(frame)).now_or_never();
}

/// A deadline that never comes (timers that are off).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_url_appends_encoded_session() {
        assert_eq!(
            recovery_url("ws://h/client/hubs/x?access_token=t", "c 1", "a+b/c="),
            "ws://h/client/hubs/x?access_token=t&awps_connection_id=c%201&awps_reconnection_token=a%2Bb%2Fc%3D"
        );
        assert_eq!(
            recovery_url("ws://h/x", "c", "t"),
            "ws://h/x?awps_connection_id=c&awps_reconnection_token=t"
        );
    }

    #[test]
    fn a_read_error_fails_the_connection_with_the_close_code_it_calls_for() {
        use tokio_tungstenite::tungstenite::error::CapacityError;
        let too_long = CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        };
        let cases = [
            (WsError::Utf8("invalid".into()), Some(CloseCode::Invalid)),
            (WsError::Capacity(too_long), Some(CloseCode::Size)),
            (
                WsError::Protocol(ProtocolError::ControlFrameTooBig),
                Some(CloseCode::Protocol),
            ),
            (
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                None,
            ),
            (WsError::Protocol(ProtocolError::ReceivedAfterClosing), None),
            (WsError::Protocol(ProtocolError::SendAfterClosing), None),
            (
                WsError::Io(std::io::ErrorKind::ConnectionReset.into()),
                None,
            ),
            (WsError::ConnectionClosed, None),
            (WsError::AlreadyClosed, None),
        ];
        for (error, code) in cases {
            assert_eq!(failure_code(&error), code, "{error}");
        }
    }

    #[test]
    fn a_task_that_panics_leaves_its_client_stopped_and_ended() {
        let shared = Arc::new(Shared::new(&ClientOptions::default()));
        shared.set_state(ClientState::Connected);
        shared.set_connection_id(Some("c".into()));
        let task = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _end = EndMark(shared.clone());
            panic!("a bug in the connection task");
        }));
        assert!(task.is_err());
        assert_eq!(shared.state(), ClientState::Stopped);
        assert_eq!(shared.connection_id(), None);
        assert!(shared.wait_ended(Duration::ZERO));
    }

    #[test]
    fn a_start_handed_over_before_the_task_is_idle_reads_connecting() {
        // As a start from the `Stopped` event's handler, or from another thread once
        // the stop has set the state: the task's way into idle() must not undo it.
        let credential = Credential::Url("ws://127.0.0.1:9/client/hubs/h".into());
        let (mut task, commands, _operations) = Task::new(
            credential,
            ClientOptions::default(),
            Arc::new(|_: Event| {}),
        );
        let shared = task.shared.clone();
        shared.start_queued();
        let (reply, _outcome) = oneshot::channel();
        assert!(commands.send(Command::Start(reply)).is_ok());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let next = rt.block_on(task.idle());
        assert!(matches!(next, Next::Open { attempt: 0, .. }));
        assert_eq!(shared.state(), ClientState::Connecting);
    }
}
