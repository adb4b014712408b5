//! Operations awaiting an ack or an invoke response, with their deadlines.
//!
//! Pure bookkeeping (no I/O): the connection task tells it what was sent and what
//! arrived, and it says what to resend and what finished. An acked operation keeps
//! its encoded frame, so a retry or a resend after a recovery reuses the same ackId
//! and the service's `Duplicate` answer makes it safe.

use super::ack_ids::SERVICE_ACK_MEMORY;
use super::options::RetryOptions;
use super::{AckResult, Error, InvokeResult};
use crate::id_hash::IdMap;
use crate::protocol::{json, ErrorDetail, Upstream};
use log::debug;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Receives the outcome of an acked operation started without a future (the FFI's
/// asynchronous operations): no task and no channel per operation.
pub(crate) trait AckCallback: Send {
    /// Takes the outcome; called exactly once. It may run on the caller's thread
    /// (refused at once) or on a runtime worker (the connection task), so it must not
    /// block. After the caller gave up (`is_cancelled`), the outcome means nothing
    /// (`Error::Stopped` when the operation was dropped unwritten).
    fn complete(self: Box<Self>, outcome: Result<AckResult, Error>);

    /// Whether the caller gave up: an operation not yet written is then dropped
    /// unwritten, and a failed one is not retried.
    fn is_cancelled(&self) -> bool;
}

/// Where the outcome of an acked operation goes.
pub(crate) enum AckReply {
    /// An awaiting future (the async methods); it gave up when the receiver is dropped.
    Future(oneshot::Sender<Result<AckResult, Error>>),
    /// A completion callback.
    Callback(CallbackReply),
}

impl AckReply {
    /// A reply to `callback`.
    pub(crate) fn callback(callback: Box<dyn AckCallback>) -> AckReply {
        AckReply::Callback(CallbackReply(Some(callback)))
    }

    /// Hands the outcome over (ignored when the caller gave up).
    pub(crate) fn send(self, outcome: Result<AckResult, Error>) {
        match self {
            AckReply::Future(tx) => {
                let _ = tx.send(outcome);
            }
            AckReply::Callback(mut reply) => {
                if let Some(callback) = reply.0.take() {
                    callback.complete(outcome);
                }
            }
        }
    }

    /// Whether the caller gave up.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            AckReply::Future(tx) => tx.is_closed(),
            AckReply::Callback(reply) => reply.0.as_ref().is_none_or(|c| c.is_cancelled()),
        }
    }
}

impl From<oneshot::Sender<Result<AckResult, Error>>> for AckReply {
    fn from(tx: oneshot::Sender<Result<AckResult, Error>>) -> AckReply {
        AckReply::Future(tx)
    }
}

/// A callback that completes with `Error::Stopped` if dropped uncalled (an operation
/// dropped unfinished with the connection task), as an awaiting future would see it.
pub(crate) struct CallbackReply(Option<Box<dyn AckCallback>>);

impl Drop for CallbackReply {
    fn drop(&mut self) {
        if let Some(callback) = self.0.take() {
            callback.complete(Err(Error::Stopped { ack_id: None }));
        }
    }
}
/// Where the outcome of an invocation goes.
pub(crate) type InvokeReply = oneshot::Sender<Result<InvokeResult, Error>>;

/// An encoded frame on its way to the connection task.
pub(crate) struct Operation {
    /// The frame, ready to write.
    pub(crate) frame: Utf8Bytes,
    /// What to wait for.
    pub(crate) kind: OpKind,
}

impl Operation {
    /// Refuses an operation that cannot be sent: its caller gets `error`.
    pub(crate) fn refuse(self, error: Error) {
        match self.kind {
            OpKind::FireAndForget => debug!("dropping a fire-and-forget frame: {error}"),
            OpKind::Ack { reply, .. } => reply.send(Err(error)),
            OpKind::Invoke { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What an [`Operation`] waits for.
pub(crate) enum OpKind {
    /// Nothing: written and forgotten.
    FireAndForget,
    /// An ack with this id.
    Ack {
        ack_id: u64,
        /// Drawn from the client's counter (not chosen by the caller): the connection
        /// task renumbers it if a caller's ackId holds the same id.
        automatic: bool,
        purpose: Purpose,
        reply: AckReply,
    },
    /// An `invokeResponse` with this id, for at most `timeout`.
    Invoke {
        invocation_id: String,
        timeout: Duration,
        reply: InvokeReply,
    },
}

/// Why an acked operation was sent; the connection task tracks joined groups with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A message (sendToGroup or event).
    Send,
    /// A user's joinGroup.
    Join(String),
    /// A user's leaveGroup.
    Leave(String),
    /// The automatic rejoin of a group after a reconnect (no caller waits).
    Rejoin(String),
    /// A rejoin that a later leave of its group made moot: not retried, not resent,
    /// and its outcome is ignored.
    Abandoned,
}

/// A finished acked operation.
pub(crate) struct Done {
    pub(crate) purpose: Purpose,
    pub(crate) reply: Option<AckReply>,
    pub(crate) result: Result<AckResult, Error>,
}

impl Done {
    /// Hands the result to the caller, if one still waits.
    pub(crate) fn reply(self) {
        if let Some(reply) = self.reply {
            reply.send(self.result);
        }
    }
}

enum Phase {
    /// Not written on the current connection: queued for the next one, or held by a
    /// recovery (cut off by the drop, or made since), whose `due` is the deadline of
    /// the attempt then running.
    Unsent,
    /// Written; waiting for the ack until `due`.
    AwaitingAck,
    /// Failed retriably; resent at `due`.
    RetryWait,
}

struct AckOp {
    frame: Utf8Bytes,
    purpose: Purpose,
    reply: Option<AckReply>,
    retries: u32,
    phase: Phase,
    due: Option<Instant>,
    /// The error of the latest attempt the service refused (then retried).
    refused: Option<ErrorDetail>,
    /// An attempt since the latest refusal timed out or was cut off by a dropped
    /// socket: the service may have processed it without our hearing so. A refusal
    /// clears it: had an earlier attempt been processed, the service would have answered
    /// the refused one `Duplicate`.
    maybe_processed: bool,
    /// Its place in the order operations were registered (as written, or queued): a
    /// recovery resends in this order, which the ackIds need not follow (a caller may
    /// choose its own, and an automatic one may be renumbered).
    order: u64,
}

impl AckOp {
    /// Whether anyone still cares about the outcome.
    fn wanted(&self) -> bool {
        self.reply
            .as_ref()
            .map_or(matches!(self.purpose, Purpose::Rejoin(_)), |r| {
                !r.is_closed()
            })
    }
}

struct InvokeOp {
    frame: Utf8Bytes,
    reply: InvokeReply,
    timeout: Duration,
    due: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Ack(u64),
    Invoke(String),
}

/// Something to write once the connection is (again) usable, in order.
enum Unsent {
    Op(Key),
    Frame(Utf8Bytes),
}

/// Where a new acked operation's ack deadline starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// Written at that instant.
    Written(Instant),
    /// Queued at that instant while a recovery holds the operations: the deadline runs
    /// from then, as if it had been written (a caller waits no longer for a recovery
    /// than for an ack).
    Held(Instant),
    /// Queued for the next connection (the rejoins before it opens): the deadline
    /// starts with the write.
    Queued,
}

/// All operations in flight on one client.
///
/// Each operation carries its own deadline; instead of one timer entry per operation
/// (which would pile up for every acked message at high rates), one timer points at
/// the earliest deadline and `expire` sweeps the (small) set of pending operations.
pub(crate) struct Pending {
    acks: IdMap<AckOp>,
    invokes: HashMap<String, InvokeOp>,
    /// No deadline is earlier than this (it may be earlier than every real one).
    earliest: Option<Instant>,
    unsent: Vec<Unsent>,
    /// Bytes of the `Unsent::Frame`s in `unsent`.
    unsent_frame_bytes: usize,
    ack_timeout: Duration,
    retry: RetryOptions,
    /// Automatic ackIds drawn by a caller and replaced by the connection task (they
    /// collided with a pending operation's), with their replacements, oldest first; at
    /// most `SERVICE_ACK_MEMORY`.
    /// (Frames by their hash: the record must not hold their bytes.)
    renumbered: VecDeque<(u64, u64, u64)>,
    /// The `AckOp::order` of the next operation registered.
    next_order: u64,
}

impl Pending {
    pub(crate) fn new(ack_timeout: Duration, retry: RetryOptions) -> Pending {
        Pending {
            acks: HashMap::default(),
            invokes: HashMap::new(),
            earliest: None,
            unsent: Vec::new(),
            unsent_frame_bytes: 0,
            ack_timeout,
            retry,
            renumbered: VecDeque::new(),
            next_order: 0,
        }
    }

    /// Notes that the operation `frame`, whose caller drew the automatic ackId `drawn`,
    /// goes out (or would have) under `used`. Its caller knows only `drawn`: a resend
    /// with it must reach the same operation (see [`Pending::renumbered`]).
    pub(crate) fn renumber(&mut self, drawn: u64, frame: &str, used: u64) {
        if drawn == used {
            return;
        }
        if self.renumbered.len() == SERVICE_ACK_MEMORY {
            self.renumbered.pop_front();
        }
        self.renumbered.push_back((drawn, frame_hash(frame), used));
    }

    /// The ackId that replaced `drawn` if `frame` (carrying `drawn`) is an operation
    /// renumbered so: not for another message with that ackId (the pending operation
    /// whose caller chose it, resent by that caller).
    pub(crate) fn renumbered(&self, drawn: u64, frame: &str) -> Option<u64> {
        if self.renumbered.is_empty() {
            return None;
        }
        let hash = frame_hash(frame);
        self.renumbered
            .iter()
            .rev()
            .find(|(d, h, _)| *d == drawn && *h == hash)
            .map(|(.., used)| *used)
    }

    /// How many operations are pending (acked, invocations and unsent frames).
    pub(crate) fn len(&self) -> usize {
        self.acks.len() + self.invokes.len() + self.unsent.len()
    }

    /// Registers an acked operation, written or queued (`start`). An ackId already
    /// pending is refused (boxed: the rare path stays off the stack).
    pub(crate) fn add_ack(
        &mut self,
        ack_id: u64,
        frame: Utf8Bytes,
        purpose: Purpose,
        reply: Option<AckReply>,
        start: Start,
    ) -> Result<(), Box<Done>> {
        if self.acks.contains_key(&ack_id) {
            let error = Error::InvalidArgument(format!(
                "ackId {ack_id} is already in use by a pending operation of this client; \
                 choose another one or wait until that operation completes"
            ));
            return Err(Box::new(Done {
                purpose,
                reply,
                result: Err(error),
            }));
        }
        let mut op = AckOp {
            frame,
            purpose,
            reply,
            retries: 0,
            phase: Phase::Unsent,
            due: None,
            refused: None,
            maybe_processed: false,
            order: self.next_order,
        };
        self.next_order += 1;
        match start {
            Start::Written(now) => {
                // A queued leave abandons nothing until written (`take_unsent`): its
                // caller may still give it up unwritten.
                if let Purpose::Leave(group) = &op.purpose {
                    self.abandon_rejoin(group);
                }
                op.phase = Phase::AwaitingAck;
                op.due = Some(self.arm(now + self.ack_timeout));
            }
            Start::Held(now) => {
                op.due = Some(self.arm(now + self.ack_timeout));
                self.unsent.push(Unsent::Op(Key::Ack(ack_id)));
            }
            Start::Queued => self.unsent.push(Unsent::Op(Key::Ack(ack_id))),
        }
        self.acks.insert(ack_id, op);
        Ok(())
    }

    /// A leave of `group`, once written, makes its automatic rejoin moot. Else a rejoin
    /// retried after an `InternalServerError` or a timeout could reach the service after
    /// the leave and join the group again. One not written yet or waiting for its retry is
    /// dropped; one awaiting its ack (written before the leave) is kept but abandoned.
    fn abandon_rejoin(&mut self, group: &str) {
        self.acks.retain(|_, op| {
            if !matches!(&op.purpose, Purpose::Rejoin(g) if g == group) {
                return true;
            }
            op.purpose = Purpose::Abandoned;
            matches!(op.phase, Phase::AwaitingAck)
        });
    }

    /// A caller resending, with its ackId, the very frame of an operation whose caller
    /// gave up (an interrupted or cancelled wait) waits for that operation instead:
    /// nothing is written twice, and its outcome is this caller's. `reply` comes back
    /// when there is no such operation.
    pub(crate) fn reattach(
        &mut self,
        ack_id: u64,
        frame: &Utf8Bytes,
        reply: AckReply,
    ) -> Result<(), AckReply> {
        match self.acks.get_mut(&ack_id) {
            Some(op) if op.frame == *frame && !op.wanted() => {
                op.reply = Some(reply);
                Ok(())
            }
            _ => Err(reply),
        }
    }

    /// Whether an acked operation with this id is pending.
    pub(crate) fn has_ack(&self, ack_id: u64) -> bool {
        self.acks.contains_key(&ack_id)
    }

    /// How many acked operations are registered (sent, queued or awaiting a retry).
    pub(crate) fn acks_len(&self) -> usize {
        self.acks.len()
    }

    /// How many operations and frames wait to be written once the connection is usable.
    pub(crate) fn unsent_len(&self) -> usize {
        self.unsent.len()
    }

    /// Registers an invocation, written now (`sent_at`) or queued (`None`).
    pub(crate) fn add_invoke(
        &mut self,
        invocation_id: String,
        frame: Utf8Bytes,
        timeout: Duration,
        reply: InvokeReply,
        sent_at: Option<Instant>,
    ) {
        if self.invokes.contains_key(&invocation_id) {
            let _ = reply.send(Err(Error::InvalidArgument(format!(
                "invocation {invocation_id} is already pending"
            ))));
            return;
        }
        let due = match sent_at {
            Some(now) => Some(self.arm(now + timeout)),
            None => {
                self.unsent
                    .push(Unsent::Op(Key::Invoke(invocation_id.clone())));
                None
            }
        };
        self.invokes.insert(
            invocation_id,
            InvokeOp {
                frame,
                reply,
                timeout,
                due,
            },
        );
    }

    /// Queues a fire-and-forget frame until the connection is usable again.
    pub(crate) fn add_unsent_frame(&mut self, frame: Utf8Bytes) {
        self.unsent_frame_bytes += frame.len();
        self.unsent.push(Unsent::Frame(frame));
    }

    /// Bytes of the fire-and-forget frames waiting to be written.
    pub(crate) fn unsent_frame_bytes(&self) -> usize {
        self.unsent_frame_bytes
    }

    /// The ack of `ack_id` arrived. `Duplicate` counts as success, unless the latest
    /// answered attempt was refused and no attempt since may have been processed: then
    /// the service remembers a refused attempt, not a processed one, and the operation
    /// fails with that refusal. A retriable failure
    /// (`InternalServerError`) schedules a resend with the same ackId while the retry
    /// policy allows. Returns the finished operation, if this finished one.
    pub(crate) fn on_ack(
        &mut self,
        ack_id: u64,
        success: bool,
        error: Option<ErrorDetail>,
        now: Instant,
    ) -> Option<Done> {
        let op = self.acks.get_mut(&ack_id)?;
        let result = match error {
            _ if success => Ok(AckResult {
                ack_id: Some(ack_id),
                is_duplicated: false,
            }),
            Some(e) if e.name == "Duplicate" => match op.refused.take() {
                Some(refusal) if !op.maybe_processed => Err(Error::Ack {
                    ack_id,
                    name: refusal.name,
                    message: refusal.message,
                }),
                _ => Ok(AckResult {
                    ack_id: Some(ack_id),
                    is_duplicated: true,
                }),
            },
            Some(e) => {
                if e.name == "InternalServerError" && op.wanted() {
                    if let Some(delay) = self.retry.delay_before(op.retries + 1) {
                        op.refused = Some(e);
                        op.maybe_processed = false;
                        op.phase = Phase::RetryWait;
                        op.due = Some(now + delay);
                        lower(&mut self.earliest, now + delay);
                        return None;
                    }
                }
                Err(Error::Ack {
                    ack_id,
                    name: e.name,
                    message: e.message,
                })
            }
            None => Err(Error::Ack {
                ack_id,
                name: "Unknown".into(),
                message: "the service refused the operation".into(),
            }),
        };
        let op = self.acks.remove(&ack_id)?;
        Some(Done {
            purpose: op.purpose,
            reply: op.reply,
            result,
        })
    }

    /// The reply of an invocation arrived; `false` if none was pending with that id.
    pub(crate) fn on_invoke_response(
        &mut self,
        invocation_id: &str,
        result: Result<InvokeResult, Error>,
    ) -> bool {
        match self.invokes.remove(invocation_id) {
            Some(op) => {
                let _ = op.reply.send(result);
                true
            }
            None => false,
        }
    }

    /// The caller gave up on an invocation. Returns the `cancelInvocation` frame to
    /// write when the invocation had been sent.
    pub(crate) fn cancel_invoke(&mut self, invocation_id: &str) -> Option<Utf8Bytes> {
        let op = self.invokes.remove(invocation_id)?;
        let _ = op.reply.send(Err(Error::Cancelled));
        op.due.map(|_| cancel_frame(invocation_id))
    }

    /// When the earliest deadline may be due (then call `expire`).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.earliest
    }

    /// Moves every deadline `by` later: reading was paused that long, so no ack or
    /// invoke response could be read meanwhile. The whole pause, also for what was
    /// written during it: its answer comes behind everything the service held for the
    /// whole pause, which is read first.
    pub(crate) fn postpone(&mut self, by: Duration) {
        let dues = self.acks.values_mut().map(|op| &mut op.due);
        for due in dues
            .chain(self.invokes.values_mut().map(|op| &mut op.due))
            .flatten()
        {
            *due += by;
        }
        self.earliest = self.earliest.map(|earliest| earliest + by);
    }

    /// Handles every deadline due at `now`: ack timeouts (retry with the same ackId,
    /// or `Error::Timeout` with the ackId), retry delays (resend), invoke timeouts (`cancelInvocation`).
    /// Frames to write go to `out`, finished operations to `done`.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<Utf8Bytes>, done: &mut Vec<Done>) {
        let mut due: Vec<u64> = self
            .acks
            .iter()
            .filter(|(_, op)| op.due.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for ack_id in due {
            self.expire_ack(ack_id, now, out, done);
        }
        let due: Vec<String> = self
            .invokes
            .iter()
            .filter(|(_, op)| op.due.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(op) = self.invokes.remove(&id) {
                let _ = op.reply.send(Err(Error::Timeout { ack_id: None }));
                out.push(cancel_frame(&id));
            }
        }
        self.earliest = self
            .acks
            .values()
            .filter_map(|op| op.due)
            .chain(self.invokes.values().filter_map(|op| op.due))
            .min();
    }

    fn expire_ack(
        &mut self,
        ack_id: u64,
        now: Instant,
        out: &mut Vec<Utf8Bytes>,
        done: &mut Vec<Done>,
    ) {
        let Some(op) = self.acks.get_mut(&ack_id) else {
            return;
        };
        if let Phase::RetryWait = op.phase {
            if op.wanted() {
                op.retries += 1;
                op.phase = Phase::AwaitingAck;
                op.due = Some(now + self.ack_timeout);
                out.push(op.frame.clone());
            } else {
                self.acks.remove(&ack_id);
            }
            return;
        }
        // The attempt timed out: a written one (AwaitingAck), or one a recovery holds,
        // cut off by the drop or made since (Unsent).
        let delay = if op.wanted() {
            self.retry.delay_before(op.retries + 1)
        } else {
            None
        };
        match (delay, &op.phase) {
            (Some(delay), Phase::AwaitingAck) => {
                op.maybe_processed = true;
                op.phase = Phase::RetryWait;
                op.due = Some(now + delay);
            }
            // Its retry runs its deadline from when it would have been written, after
            // its delay; the resend once recovered is the attempt then running, with
            // what is left of it.
            (Some(delay), _) => {
                op.retries += 1;
                op.due = Some(now + delay + self.ack_timeout);
            }
            (None, _) => {
                if let Some(op) = self.acks.remove(&ack_id) {
                    done.push(Done {
                        purpose: op.purpose,
                        reply: op.reply,
                        result: Err(Error::Timeout {
                            ack_id: Some(ack_id),
                        }),
                    });
                }
            }
        }
    }

    /// The socket dropped. On a recoverable drop, acked operations stay and are resent
    /// with their ackIds once recovered (the service dedupes them): those written, in
    /// the order they were registered, before those still queued; otherwise they fail
    /// with `NotConnected`, as do invocations already sent (their replies are lost).
    /// A resend is the same attempt, with the same ack deadline, which runs on during
    /// the recovery (else a connection that keeps dropping and recovering, or a
    /// recovery of a service that is gone, would hold an unacked operation past it), or
    /// the retry that was waiting for its delay.
    pub(crate) fn connection_dropped(&mut self, recoverable: bool, done: &mut Vec<Done>) {
        self.earliest = None;
        let sent: Vec<String> = self
            .invokes
            .iter()
            .filter(|(_, op)| op.due.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in sent {
            if let Some(op) = self.invokes.remove(&id) {
                let _ = op.reply.send(Err(Error::NotConnected { ack_id: None }));
            }
        }
        if !recoverable {
            self.fail_all(|ack_id| Error::NotConnected { ack_id }, done);
            return;
        }
        let mut in_flight: Vec<(u64, u64)> = self
            .acks
            .iter()
            .filter(|(_, op)| !matches!(op.phase, Phase::Unsent))
            .map(|(id, op)| (op.order, *id))
            .collect();
        in_flight.sort_unstable();
        for (_, ack_id) in &in_flight {
            if let Some(op) = self.acks.get_mut(ack_id) {
                match op.phase {
                    Phase::AwaitingAck => op.maybe_processed = true,
                    // The retry it waited for is the resend; its deadline runs from
                    // when it was to be written.
                    Phase::RetryWait => {
                        op.retries += 1;
                        op.due = op.due.map(|written| written + self.ack_timeout);
                    }
                    Phase::Unsent => {}
                }
                op.phase = Phase::Unsent;
            }
        }
        let queued = std::mem::take(&mut self.unsent);
        self.unsent = in_flight
            .into_iter()
            .map(|(_, id)| Unsent::Op(Key::Ack(id)))
            .chain(queued)
            .collect();
        // The deadlines of the interrupted attempts and retries run on during the recovery.
        self.earliest = self.acks.values().filter_map(|op| op.due).min();
    }

    /// The connection is usable: every queued or interrupted operation is written now,
    /// in order, with its original ackId. One whose caller gave up meanwhile (an
    /// invocation too) is dropped unwritten, as on a live connection; so is one whose
    /// ack deadline passed meanwhile, until `expire` retries it or fails it with
    /// `Error::Timeout`.
    pub(crate) fn take_unsent(&mut self, now: Instant, out: &mut Vec<Utf8Bytes>) {
        self.unsent_frame_bytes = 0;
        for unsent in std::mem::take(&mut self.unsent) {
            match unsent {
                Unsent::Frame(frame) => out.push(frame),
                Unsent::Op(Key::Ack(ack_id)) => {
                    let Some(op) = self.acks.get_mut(&ack_id) else {
                        continue;
                    };
                    if !matches!(op.phase, Phase::Unsent) {
                        continue;
                    }
                    if !op.wanted() {
                        self.acks.remove(&ack_id);
                        continue;
                    }
                    op.phase = Phase::AwaitingAck;
                    let due = op.due.unwrap_or(now + self.ack_timeout);
                    op.due = Some(due);
                    lower(&mut self.earliest, due);
                    if due > now {
                        out.push(op.frame.clone());
                    }
                    if let Purpose::Leave(group) = &op.purpose {
                        let group = group.clone();
                        self.abandon_rejoin(&group);
                    }
                }
                Unsent::Op(Key::Invoke(id)) => {
                    let Some(op) = self.invokes.get_mut(&id) else {
                        continue;
                    };
                    if op.due.is_some() {
                        continue;
                    }
                    if op.reply.is_closed() {
                        // Its cancel reached the task before it did, and found nothing.
                        self.invokes.remove(&id);
                        continue;
                    }
                    let due = now + op.timeout;
                    op.due = Some(due);
                    lower(&mut self.earliest, due);
                    out.push(op.frame.clone());
                }
            }
        }
    }

    /// Forgets the operations not written on the current connection whose callers gave
    /// up, with the queue entries of invocations cancelled meanwhile: `take_unsent` would
    /// drop them unwritten, so until then they would only hold places in a recovery's
    /// queue and among the acked operations in flight.
    pub(crate) fn forget_given_up(&mut self) {
        self.acks
            .retain(|_, op| !matches!(op.phase, Phase::Unsent) || op.wanted());
        self.invokes
            .retain(|_, op| op.due.is_some() || !op.reply.is_closed());
        let (acks, invokes) = (&self.acks, &self.invokes);
        self.unsent.retain(|unsent| match unsent {
            Unsent::Frame(_) => true,
            Unsent::Op(Key::Ack(ack_id)) => acks.contains_key(ack_id),
            Unsent::Op(Key::Invoke(id)) => invokes.contains_key(id),
        });
    }

    /// Fails every operation with `error(its ackId)`, `None` for an invocation (stop,
    /// session lost, client dropped).
    pub(crate) fn fail_all(&mut self, error: impl Fn(Option<u64>) -> Error, done: &mut Vec<Done>) {
        self.earliest = None;
        self.unsent.clear();
        self.unsent_frame_bytes = 0;
        for (_, op) in self.invokes.drain() {
            let _ = op.reply.send(Err(error(None)));
        }
        let mut acks: Vec<(u64, AckOp)> = self.acks.drain().collect();
        acks.sort_unstable_by_key(|(id, _)| *id);
        for (ack_id, op) in acks {
            done.push(Done {
                purpose: op.purpose,
                reply: op.reply,
                result: Err(error(Some(ack_id))),
            });
        }
    }

    /// Notes a new deadline; returns it.
    fn arm(&mut self, due: Instant) -> Instant {
        lower(&mut self.earliest, due);
        due
    }
}

/// A frame's hash, to recognise it again.
fn frame_hash(frame: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    frame.hash(&mut hasher);
    hasher.finish()
}

/// Moves `earliest` down to `due` if that is earlier.
fn lower(earliest: &mut Option<Instant>, due: Instant) {
    *earliest = Some(earliest.map_or(due, |e| e.min(due)));
}

fn cancel_frame(invocation_id: &str) -> Utf8Bytes {
    json::encode_upstream(&Upstream::CancelInvocation {
        invocation_id: invocation_id.to_owned(),
    })
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::options::RetryMode;

    fn pending(retries: u32) -> Pending {
        let retry = RetryOptions {
            max_retries: Some(retries),
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(1),
            mode: RetryMode::Fixed,
        };
        Pending::new(Duration::from_secs(10), retry)
    }

    fn frame(n: u64) -> Utf8Bytes {
        Utf8Bytes::from(format!("frame{n}"))
    }

    fn add(
        p: &mut Pending,
        ack_id: u64,
        now: Option<Instant>,
    ) -> oneshot::Receiver<Result<AckResult, Error>> {
        let (tx, rx) = oneshot::channel();
        assert!(p
            .add_ack(
                ack_id,
                frame(ack_id),
                Purpose::Send,
                Some(tx.into()),
                start(now)
            )
            .is_ok());
        rx
    }

    /// Written at `now`, or queued for the next connection.
    fn start(now: Option<Instant>) -> Start {
        now.map_or(Start::Queued, Start::Written)
    }

    fn error(name: &str) -> Option<ErrorDetail> {
        Some(ErrorDetail {
            name: name.into(),
            message: "m".into(),
        })
    }

    /// Adds operation `ack_id`, sent at `t0`, and refuses it once with a retriable
    /// error; the receiver keeps it wanted.
    fn refused_once(
        p: &mut Pending,
        ack_id: u64,
        t0: Instant,
    ) -> oneshot::Receiver<Result<AckResult, Error>> {
        let rx = add(p, ack_id, Some(t0));
        assert!(p
            .on_ack(ack_id, false, error("InternalServerError"), t0)
            .is_none());
        rx
    }

    #[test]
    fn a_timeout_is_retried_with_the_same_frame_then_fails() {
        let t0 = Instant::now();
        let mut p = pending(1);
        let mut rx = add(&mut p, 1, Some(t0));
        let (mut out, mut done) = (Vec::new(), Vec::new());
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(10)));
        p.expire(t0 + Duration::from_secs(10), &mut out, &mut done);
        assert!(out.is_empty() && done.is_empty());
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(11)));
        p.expire(t0 + Duration::from_secs(11), &mut out, &mut done);
        assert_eq!(out, vec![frame(1)]);
        p.expire(t0 + Duration::from_secs(21), &mut out, &mut done);
        assert_eq!(done.len(), 1);
        done.pop().unwrap().reply();
        assert_eq!(
            rx.try_recv().unwrap(),
            Err(Error::Timeout { ack_id: Some(1) })
        );
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn a_resend_after_a_recovery_keeps_its_ack_deadline_or_is_the_retry_it_waited_for() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut p = pending(1);
        let mut rx = add(&mut p, 1, Some(t0));
        let (mut out, mut done) = (Vec::new(), Vec::new());
        for recovered in [2, 4] {
            p.connection_dropped(true, &mut done);
            p.take_unsent(at(recovered), &mut out);
            assert_eq!(std::mem::take(&mut out), vec![frame(1)], "resent");
            assert_eq!(
                p.next_due(),
                Some(at(10)),
                "the deadline of the first write"
            );
        }
        // Past its deadline when recovered: not resent, but retried after the delay.
        p.connection_dropped(true, &mut done);
        p.take_unsent(at(12), &mut out);
        assert!(out.is_empty());
        p.expire(at(12), &mut out, &mut done);
        assert!(out.is_empty() && done.is_empty());
        assert_eq!(p.next_due(), Some(at(13)));
        // Dropped while waiting for that retry: the resend is the retry.
        p.connection_dropped(true, &mut done);
        p.take_unsent(at(14), &mut out);
        assert_eq!(out, vec![frame(1)]);
        p.expire(at(24), &mut out, &mut done);
        assert_eq!(done.len(), 1, "its one retry was used");
        done.pop().unwrap().reply();
        assert_eq!(
            rx.try_recv().unwrap(),
            Err(Error::Timeout { ack_id: Some(1) })
        );
    }

    #[test]
    fn duplicate_is_success_and_forbidden_is_final() {
        let t0 = Instant::now();
        let mut p = pending(3);
        add(&mut p, 1, Some(t0));
        add(&mut p, 2, Some(t0));
        let done = p.on_ack(1, false, error("Duplicate"), t0).unwrap();
        assert_eq!(
            done.result,
            Ok(AckResult {
                ack_id: Some(1),
                is_duplicated: true
            })
        );
        let done = p.on_ack(2, false, error("Forbidden"), t0).unwrap();
        assert!(
            matches!(done.result, Err(Error::Ack { ack_id: 2, ref name, .. }) if name == "Forbidden")
        );
        assert!(p.on_ack(2, true, None, t0).is_none());
    }

    #[test]
    fn an_internal_error_is_retried_and_a_late_ack_still_completes() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let _rx = refused_once(&mut p, 1, t0);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(1)));
        let done = p.on_ack(1, true, None, t0).unwrap();
        assert!(done.result.is_ok());
    }

    #[test]
    fn a_duplicate_after_refusals_only_is_the_refusal_after_a_lost_attempt_a_success() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let _rx = refused_once(&mut p, 1, t0);
        let done = p.on_ack(1, false, error("Duplicate"), t0).unwrap();
        assert!(
            matches!(done.result, Err(Error::Ack { ack_id: 1, ref name, .. }) if name == "InternalServerError"),
            "the service remembered the refused attempt: {:?}",
            done.result
        );

        let _rx = refused_once(&mut p, 2, t0);
        let (mut out, mut done) = (Vec::new(), Vec::new());
        p.expire(t0 + Duration::from_secs(1), &mut out, &mut done);
        assert_eq!(out, vec![frame(2)], "retried");
        p.expire(t0 + Duration::from_secs(11), &mut out, &mut done);
        assert!(done.is_empty(), "the retry timed out: retried again");
        let done = p.on_ack(2, false, error("Duplicate"), t0).unwrap();
        assert_eq!(
            done.result,
            Ok(AckResult {
                ack_id: Some(2),
                is_duplicated: true
            }),
            "the timed-out attempt may have been processed"
        );

        let _rx = refused_once(&mut p, 3, t0);
        let mut finished = Vec::new();
        p.expire(t0 + Duration::from_secs(1), &mut out, &mut finished);
        p.connection_dropped(true, &mut finished);
        assert!(finished.is_empty());
        let done = p.on_ack(3, false, error("Duplicate"), t0).unwrap();
        assert!(
            done.result.is_ok(),
            "the attempt cut off by the drop may have been processed"
        );
    }

    #[test]
    fn a_duplicate_after_a_refusal_that_followed_a_lost_attempt_is_the_refusal() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let _rx = add(&mut p, 1, Some(t0));
        let (mut out, mut done) = (Vec::new(), Vec::new());
        p.connection_dropped(true, &mut done);
        p.take_unsent(t0, &mut out);
        assert_eq!(out, vec![frame(1)], "resent");
        // Refused, not Duplicate: the attempt cut off by the drop was not processed.
        assert!(p
            .on_ack(1, false, error("InternalServerError"), t0)
            .is_none());
        let done = p.on_ack(1, false, error("Duplicate"), t0).unwrap();
        assert!(
            matches!(done.result, Err(Error::Ack { ack_id: 1, ref name, .. }) if name == "InternalServerError"),
            "the service remembered the refused attempt: {:?}",
            done.result
        );
    }

    #[test]
    fn a_recoverable_drop_resends_in_order_and_a_lost_session_fails_all() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let _rx2 = add(&mut p, 2, Some(t0));
        let _rx1 = add(&mut p, 1, Some(t0));
        let gave_up = add(&mut p, 4, Some(t0));
        let mut done = Vec::new();
        p.connection_dropped(true, &mut done);
        assert!(done.is_empty());
        assert_eq!(
            p.next_due(),
            Some(t0 + Duration::from_secs(10)),
            "the deadlines of the interrupted attempts run on"
        );
        let _rx3 = add(&mut p, 3, None);
        drop(gave_up);
        p.add_unsent_frame(Utf8Bytes::from_static("ff"));
        let mut out = Vec::new();
        p.take_unsent(t0, &mut out);
        assert_eq!(
            out,
            vec![frame(2), frame(1), frame(3), Utf8Bytes::from_static("ff")],
            "in the order registered (not by ackId); 4 was given up"
        );
        p.connection_dropped(false, &mut done);
        let failed: Vec<_> = done.into_iter().map(|d| d.result).collect();
        let lost = |ack_id| {
            Err(Error::NotConnected {
                ack_id: Some(ack_id),
            })
        };
        assert_eq!(failed, vec![lost(1), lost(2), lost(3)]);
    }

    #[test]
    fn an_operation_made_during_a_recovery_has_a_deadline_from_its_call() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let (mut out, mut done) = (Vec::new(), Vec::new());
        let mut p = pending(1);
        p.connection_dropped(true, &mut done);
        let (tx, _rx) = oneshot::channel();
        let held = Start::Held(at(1));
        assert!(p
            .add_ack(1, frame(1), Purpose::Send, Some(tx.into()), held)
            .is_ok());
        assert_eq!(p.next_due(), Some(at(11)));
        // Its first attempt times out unwritten; the retry's runs from 1 s later.
        p.expire(at(11), &mut out, &mut done);
        assert!(done.is_empty() && out.is_empty());
        assert_eq!(p.next_due(), Some(at(22)));
        p.expire(at(22), &mut out, &mut done);
        let results: Vec<_> = done.drain(..).map(|d| d.result).collect();
        assert_eq!(results, vec![Err(Error::Timeout { ack_id: Some(1) })]);
        p.take_unsent(at(23), &mut out);
        assert!(out.is_empty(), "a timed-out operation is never written");
        // Queued for the next connection (a rejoin), its deadline starts with its write.
        let mut p = pending(1);
        let rejoin = Purpose::Rejoin("g".into());
        assert!(p.add_ack(2, frame(2), rejoin, None, Start::Queued).is_ok());
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn a_deadline_passed_during_a_recovery_fails_or_makes_the_resend_a_retry() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let timed_out = |ack_id| {
            vec![Err(Error::Timeout {
                ack_id: Some(ack_id),
            })]
        };
        let (mut out, mut done) = (Vec::new(), Vec::new());
        // No retry left: it fails at its deadline, recovered or not.
        let mut p = pending(0);
        let _rx = add(&mut p, 1, Some(t0));
        p.connection_dropped(true, &mut done);
        p.expire(at(10), &mut out, &mut done);
        let results: Vec<_> = done.drain(..).map(|d| d.result).collect();
        assert_eq!(results, timed_out(1));
        assert_eq!(p.next_due(), None);
        p.take_unsent(at(12), &mut out);
        assert!(out.is_empty());
        // A retry left: its deadline runs from when it would have been written (after
        // its 1 s delay); the resend once recovered is that retry, with what is left.
        let mut p = pending(1);
        let _rx = add(&mut p, 1, Some(t0));
        p.connection_dropped(true, &mut done);
        p.expire(at(10), &mut out, &mut done);
        assert!(done.is_empty() && out.is_empty());
        assert_eq!(p.next_due(), Some(at(21)));
        p.take_unsent(at(12), &mut out);
        assert_eq!(out, vec![frame(1)]);
        assert_eq!(p.next_due(), Some(at(21)));
        p.expire(at(21), &mut out, &mut done);
        let results: Vec<_> = done.drain(..).map(|d| d.result).collect();
        assert_eq!(results, timed_out(1), "no retry left after it");
        // Waiting for its retry at the drop: the retry's deadline runs from when it was
        // to be written.
        out.clear();
        let mut p = pending(1);
        let _rx = add(&mut p, 1, Some(t0));
        p.expire(at(10), &mut out, &mut done);
        assert_eq!(p.next_due(), Some(at(11)), "its retry, 1 s later");
        p.connection_dropped(true, &mut done);
        assert_eq!(p.next_due(), Some(at(21)));
        p.expire(at(21), &mut out, &mut done);
        let results: Vec<_> = done.drain(..).map(|d| d.result).collect();
        assert_eq!(results, timed_out(1));
        assert!(out.is_empty());
    }

    #[test]
    fn invocations_time_out_with_a_cancel_and_fail_on_a_drop() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let (tx, mut rx) = oneshot::channel();
        p.add_invoke("7".into(), frame(7), Duration::from_secs(2), tx, Some(t0));
        let (mut out, mut done) = (Vec::new(), Vec::new());
        p.expire(t0 + Duration::from_secs(2), &mut out, &mut done);
        assert_eq!(out, vec![cancel_frame("7")]);
        assert_eq!(rx.try_recv().unwrap(), Err(Error::Timeout { ack_id: None }));

        let (tx, mut rx) = oneshot::channel();
        p.add_invoke("8".into(), frame(8), Duration::from_secs(2), tx, Some(t0));
        p.connection_dropped(true, &mut done);
        assert_eq!(
            rx.try_recv().unwrap(),
            Err(Error::NotConnected { ack_id: None })
        );
    }

    #[test]
    fn a_leave_abandons_the_rejoin_of_its_group_in_every_phase() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let rejoin = |p: &mut Pending, ack_id, group: &str, now| {
            let purpose = Purpose::Rejoin(group.into());
            assert!(p
                .add_ack(ack_id, frame(ack_id), purpose, None, start(now))
                .is_ok());
        };
        rejoin(&mut p, 1, "awaiting", Some(t0));
        rejoin(&mut p, 2, "retrying", Some(t0));
        assert!(p
            .on_ack(2, false, error("InternalServerError"), t0)
            .is_none());
        rejoin(&mut p, 3, "unsent", None);
        rejoin(&mut p, 4, "other", None);
        for (ack_id, group) in [(5, "awaiting"), (6, "retrying"), (7, "unsent")] {
            let purpose = Purpose::Leave(group.into());
            assert!(p
                .add_ack(ack_id, frame(ack_id), purpose, None, Start::Written(t0))
                .is_ok());
        }
        let (mut out, mut done) = (Vec::new(), Vec::new());
        p.expire(t0 + Duration::from_secs(1), &mut out, &mut done);
        assert!(out.is_empty(), "rejoin 2 retried after its leave");
        p.take_unsent(t0, &mut out);
        assert_eq!(out, vec![frame(4)], "only the other group's rejoin");
        let done = p
            .on_ack(1, false, error("InternalServerError"), t0)
            .unwrap();
        assert_eq!(
            done.purpose,
            Purpose::Abandoned,
            "not retried, not reported"
        );
    }

    #[test]
    fn a_queued_leave_abandons_the_rejoin_once_written_and_a_given_up_one_never() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let rejoin = Purpose::Rejoin("g".into());
        assert!(p.add_ack(1, frame(1), rejoin, None, Start::Queued).is_ok());
        let leave = |p: &mut Pending, ack_id| {
            let (tx, rx) = oneshot::channel();
            let purpose = Purpose::Leave("g".into());
            assert!(p
                .add_ack(
                    ack_id,
                    frame(ack_id),
                    purpose,
                    Some(tx.into()),
                    Start::Queued
                )
                .is_ok());
            rx
        };
        drop(leave(&mut p, 2));
        let mut out = Vec::new();
        p.take_unsent(t0, &mut out);
        assert_eq!(out, vec![frame(1)], "the given-up leave dropped the rejoin");

        let mut done = Vec::new();
        p.connection_dropped(true, &mut done);
        let _rx = leave(&mut p, 3);
        out.clear();
        p.take_unsent(t0, &mut out);
        assert_eq!(out, vec![frame(1), frame(3)], "the rejoin, then the leave");
        let done = p
            .on_ack(1, false, error("InternalServerError"), t0)
            .unwrap();
        assert_eq!(done.purpose, Purpose::Abandoned, "written before its leave");
    }

    #[test]
    fn a_resend_of_an_operation_given_up_waits_for_it() {
        let t0 = Instant::now();
        let mut p = pending(3);
        drop(add(&mut p, 1, Some(t0)));
        let (tx, _rx) = oneshot::channel();
        let other = Utf8Bytes::from_static("another frame");
        let refused = p.reattach(1, &other, tx.into());
        assert!(refused.is_err(), "not the same operation");
        let (tx, mut rx) = oneshot::channel();
        assert!(p.reattach(1, &frame(1), tx.into()).is_ok());
        let (tx, _held) = oneshot::channel();
        assert!(p.reattach(1, &frame(1), tx.into()).is_err(), "wanted again");
        p.on_ack(1, true, None, t0).unwrap().reply();
        assert_eq!(rx.try_recv().unwrap().unwrap().ack_id, Some(1));
    }

    #[test]
    fn a_renumbered_ack_id_is_found_for_its_own_frame_only() {
        let mut p = pending(0);
        assert_eq!(p.renumbered(2, "drawn"), None);
        p.renumber(2, "drawn", 2);
        assert_eq!(p.renumbered(2, "drawn"), None, "not renumbered");
        p.renumber(2, "drawn", 5);
        assert_eq!(p.renumbered(2, "drawn"), Some(5));
        assert_eq!(p.renumbered(2, "the holder's"), None);
        for n in 0..SERVICE_ACK_MEMORY as u64 {
            p.renumber(100 + n, "other", 10_000 + n);
        }
        assert_eq!(p.renumbered(2, "drawn"), None, "forgotten");
    }

    #[test]
    fn operations_given_up_unwritten_are_forgotten_with_their_queue_entries() {
        let t0 = Instant::now();
        let mut p = pending(3);
        let _cut_off = add(&mut p, 1, Some(t0));
        drop(add(&mut p, 2, Some(t0)));
        let mut done = Vec::new();
        p.connection_dropped(true, &mut done);
        let _queued = add(&mut p, 3, None);
        drop(add(&mut p, 4, None));
        let (tx, _cancelled) = oneshot::channel();
        p.add_invoke("5".into(), frame(5), Duration::from_secs(2), tx, None);
        assert_eq!(p.cancel_invoke("5"), None, "never written");
        let (tx, rx) = oneshot::channel();
        p.add_invoke("6".into(), frame(6), Duration::from_secs(2), tx, None);
        drop(rx);
        p.add_unsent_frame(Utf8Bytes::from_static("ff"));
        p.forget_given_up();
        assert_eq!((p.acks_len(), p.unsent_len(), p.len()), (2, 3, 5));
        let mut out = Vec::new();
        p.take_unsent(t0, &mut out);
        assert_eq!(out, vec![frame(1), frame(3), Utf8Bytes::from_static("ff")]);
    }

    #[test]
    fn an_ack_id_in_use_is_refused() {
        let mut p = pending(0);
        add(&mut p, 1, None);
        let (tx, _rx) = oneshot::channel();
        let refused = p
            .add_ack(1, frame(1), Purpose::Send, Some(tx.into()), Start::Queued)
            .err()
            .unwrap();
        assert!(matches!(refused.result, Err(Error::InvalidArgument(_))));
    }
}
