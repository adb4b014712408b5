//! The write path a caller takes itself: its frames written on its own thread, with no
//! hand-off to the connection task.
//!
//! A caller that waits for one acked operation at a time (a blocking C or Python call
//! in a loop, an asyncio loop awaiting each send) would otherwise wake the connection
//! task to write each frame, then sleep until the task reads the ack: two thread
//! wake-ups per round trip where one will do. When the client is idle (serving,
//! nothing queued towards the task, nothing awaiting an ack) the caller writes the
//! frame itself, non-blocking, and leaves the operation in `written`. A caller that
//! flushes a run of deferred operations (an event loop, once per pass) writes the run
//! itself too, as one batch, even with operations pending (awaiting acks): the task,
//! which wakes for their acks anyway, is not woken to write it as well. A single
//! operation handed over at once still needs an idle client: on a busy one, the task
//! batches such operations better.
//!
//! The task registers what callers wrote before it reads anything more from the socket
//! and before it looks for the operation of an ack (a batch of frames may be read
//! around a write), so the ack always finds it; before it takes in operations queued
//! after it, so a recovery resends them in that order; and at each keep-alive ping, so
//! its timeout runs even when nothing is read. Anything else (a socket that would
//! block, a half the reader holds, operations queued towards the task, no room left
//! under the limit of acked operations in flight) goes through the channel as before.
//!
//! The limit (`MAX_PENDING_ACKS`) holds for the task and callers together: the task
//! takes operations in from the channel under the write half's lock and counts them
//! pending before it lets go; a caller counts the room left under that lock.
//!
//! The connection task stays the owner: it puts the socket's write half here while it
//! serves, writes through the same lock, and takes the half back (and registers what
//! is left in `written`) before it recovers, reconnects or stops.

use super::connection::MAX_PENDING_ACKS;
use super::pending::{OpKind, Operation};
use super::Error;
use crate::transport::Ws;
use futures_util::stream::SplitSink;
use futures_util::task::noop_waker_ref;
use futures_util::Sink;
use std::iter::Peekable;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// The socket's write half.
pub(crate) type WriteHalf = SplitSink<Ws, Message>;

/// What callers and the connection task share for direct writes.
#[derive(Default)]
pub(crate) struct Direct {
    /// The write half while the task serves; `None` otherwise.
    sink: tokio::sync::Mutex<Option<WriteHalf>>,
    /// Operations handed towards the task (channel, overflow or deferred queue) that it
    /// has not finished with: a direct write must not overtake them.
    queued: AtomicUsize,
    /// Operations the task holds in its pending table, as of its last count. Never
    /// below it for a caller holding the write half's lock and `written`'s: the task
    /// counts what it takes in before it lets go of the former, and what callers wrote
    /// as it takes it from the latter. Only what finished is counted late.
    pending: AtomicUsize,
    /// Acked operations written by callers, with when, for the task to register.
    written: Mutex<Vec<(Operation, Instant)>>,
    /// Set for good once a caller chooses its own ackId ahead of the counter: only the
    /// task can renumber an automatic ackId that collides with one, and a written frame
    /// cannot be renumbered.
    chosen_ack_ids: AtomicBool,
    /// Wakes the task: a written frame was left to flush, a write failed, or an ack is
    /// late (its operation must be registered for the timeout to run).
    wake: Notify,
    /// The keep-alive pings come more often than the ack timeout. The task registers
    /// what callers wrote at each ping too, so a written operation is registered before
    /// its timeout is due even when nothing is read; only then may a caller that does
    /// not wait for the outcome (a completion callback) write its own frame.
    pings_register: bool,
}

/// The result of [`Direct::try_write`].
pub(crate) enum Written {
    /// Written (or left for the task to flush); the operation is the task's now.
    Yes,
    /// Not written: send the operation through the channel.
    No(Operation),
}

impl Direct {
    /// Shared state for a client whose pings come every `keep_alive_interval`, with
    /// `ack_timeout`.
    pub(crate) fn new(keep_alive_interval: Option<Duration>, ack_timeout: Duration) -> Direct {
        Direct {
            pings_register: keep_alive_interval.is_some_and(|every| every < ack_timeout),
            ..Direct::default()
        }
    }

    fn written(&self) -> MutexGuard<'_, Vec<(Operation, Instant)>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the task registers a written operation before its timeout is due even
    /// when nothing is read (else an awaiting caller must wake it: see `wake`).
    pub(crate) fn pings_register(&self) -> bool {
        self.pings_register
    }

    /// Writes an acked operation's frame on this thread if the client is idle, never
    /// blocking. For an awaited operation, or any when [`Direct::pings_register`].
    /// One whose caller gave up (a deferred send cancelled before its flush) is left
    /// to the task, which drops it unwritten.
    pub(crate) fn try_write(&self, op: Operation) -> Written {
        let acked = matches!(&op.kind, OpKind::Ack { reply, .. } if !reply.is_closed());
        if !acked || self.chosen_ack_ids.load(Ordering::Relaxed) || !self.idle() {
            return Written::No(op);
        }
        let Ok(mut slot) = self.sink.try_lock() else {
            return Written::No(op);
        };
        let Some(sink) = slot.as_mut() else {
            return Written::No(op);
        };
        // Checked again under the lock, which the task holds while it writes; and with
        // `written` locked, which the task empties as it counts its operations pending.
        let written = self.written();
        if !written.is_empty() || !self.idle() {
            return Written::No(op);
        }
        drop(written);
        let mut one = std::iter::once(op).peekable();
        self.write_prefix(sink, &mut one, 1, |_| true);
        match one.next() {
            Some(op) => Written::No(op),
            None => Written::Yes,
        }
    }

    /// Writes the longest prefix of a flushed `run` of deferred operations that it can
    /// on this thread, as one batch (one flush, one system call), never blocking; the
    /// rest stays in `run`, for the channel. Only when [`Direct::pings_register`] (their
    /// outcomes may go unawaited) and nothing is queued towards the task; pending
    /// operations are fine. An operation that is not acked, has an ackId its caller
    /// chose, or whose caller gave up, ends the prefix, and so does a socket that stops
    /// taking frames. So does the room left under `MAX_PENDING_ACKS` less one: the task
    /// decides to take an operation from the channel before it registers what callers
    /// wrote (it checks again before each next one), so one may come on top of a run
    /// that filled the room.
    pub(crate) fn write_run<I: Iterator<Item = Operation>>(&self, run: &mut Peekable<I>) {
        if !self.pings_register
            || self.chosen_ack_ids.load(Ordering::Relaxed)
            || self.queued.load(Ordering::Acquire) != 0
        {
            return;
        }
        let Ok(mut slot) = self.sink.try_lock() else {
            return;
        };
        let Some(sink) = slot.as_mut() else {
            return;
        };
        // Checked again under the write half's lock, which the task holds while it
        // writes and while it takes operations in from the channel, counting them
        // pending before it lets go; and with `written` locked, which the task empties
        // as it counts what callers wrote pending. So the count read here is never
        // below what the task holds (only what finished is counted late), and nothing
        // queued after this check is taken in, or goes out, before this run.
        let room = {
            let written = self.written();
            if self.queued.load(Ordering::Acquire) != 0 {
                return;
            }
            let held = self.pending.load(Ordering::Acquire) + written.len();
            (MAX_PENDING_ACKS - 1).saturating_sub(held)
        };
        // Not one with an ackId its caller chose: on a busy client it may be a resend of
        // a pending operation, which only the task can find and have it wait for.
        let writable = |op: &Operation| match &op.kind {
            OpKind::Ack {
                automatic, reply, ..
            } => *automatic && !reply.is_closed(),
            _ => false,
        };
        self.write_prefix(sink, run, room, writable);
    }

    /// Writes into `sink` the longest prefix of `ops`, at most `room` of them, that
    /// `writable` accepts and the socket takes at once, each registered in `written`
    /// before its frame can leave (so that its ack cannot come first), then flushes
    /// once; what is not written stays in `ops`. A flush left unfinished, or a failed
    /// socket, wakes the task, whose next flush finishes it or finds the failure.
    fn write_prefix<I: Iterator<Item = Operation>>(
        &self,
        sink: &mut WriteHalf,
        ops: &mut Peekable<I>,
        mut room: usize,
        writable: impl Fn(&Operation) -> bool,
    ) {
        let mut cx = Context::from_waker(noop_waker_ref());
        let (mut wrote, mut failed) = (false, false);
        while room > 0
            && matches!(
                Pin::new(&mut *sink).poll_ready(&mut cx),
                Poll::Ready(Ok(()))
            )
        {
            let Some(op) = ops.next_if(&writable) else {
                break;
            };
            let frame = op.frame.clone();
            self.written().push((op, Instant::now()));
            room -= 1;
            wrote = true;
            if Pin::new(&mut *sink)
                .start_send(Message::Text(frame))
                .is_err()
            {
                failed = true;
                break;
            }
        }
        if !wrote {
            return;
        }
        let flushed = !failed
            && matches!(
                Pin::new(&mut *sink).poll_flush(&mut cx),
                Poll::Ready(Ok(()))
            );
        if !flushed {
            self.wake.notify_one();
        }
    }

    fn idle(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0 && self.pending.load(Ordering::Acquire) == 0
    }

    /// Turns direct writes off for good (a caller chose an ackId ahead of the counter).
    pub(crate) fn chose_ack_id(&self) {
        self.chosen_ack_ids.store(true, Ordering::Relaxed);
    }

    /// An operation was handed towards the task.
    pub(crate) fn queued_one(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// The task is done with `n` queued operations (written, queued for a recovery or
    /// refused).
    pub(crate) fn finished(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// The task's pending table holds `n` operations.
    pub(crate) fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Release);
    }

    /// The operations written by callers since the last call, oldest first, for the
    /// task's pending table: counted pending at once (until its next
    /// [`Direct::set_pending`]), so that a caller never finds the client idle between
    /// (a resend with the same ackId would be written twice).
    pub(crate) fn take_written(&self) -> Vec<(Operation, Instant)> {
        let mut written = self.written();
        if written.is_empty() {
            // The usual case (it runs before every read and every batch of operations):
            // no atomic write to the counter callers read.
            return Vec::new();
        }
        self.pending.fetch_add(written.len(), Ordering::AcqRel);
        std::mem::take(&mut *written)
    }

    /// Wakes the connection task (see [`Direct::woken`]).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes when a caller woke the task.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// The write half, for the task's own writes (putting it there opens the direct
    /// path).
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Option<WriteHalf>> {
        self.sink.lock().await
    }

    /// Takes the write half back from callers (the task stops serving).
    pub(crate) async fn close(&self) -> Option<WriteHalf> {
        self.sink.lock().await.take()
    }

    /// The task has ended: what it shares with callers goes. Empty after a normal end;
    /// after a panic (a bug) the write half would keep the socket open, and the
    /// operations callers wrote would wait forever: each fails with `Stopped` and its
    /// ackId. The write half first, so that no caller writes after the operations went.
    pub(crate) fn abandon(&self) {
        // A caller holds the lock only for a non-blocking write; the task, for good,
        // has ended. Not `blocking_lock`: this runs on a runtime worker.
        for _ in 0..10_000 {
            if let Ok(mut sink) = self.sink.try_lock() {
                sink.take();
                break;
            }
            std::thread::yield_now();
        }
        for (op, _) in std::mem::take(&mut *self.written()) {
            let ack_id = match &op.kind {
                OpKind::Ack { ack_id, .. } => Some(*ack_id),
                _ => None,
            };
            op.refuse(Error::Stopped { ack_id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::pending::{AckReply, Purpose};

    #[test]
    fn abandon_fails_what_callers_wrote_with_its_ack_id() {
        let direct = Direct::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let op = Operation {
            frame: "{}".into(),
            kind: OpKind::Ack {
                ack_id: 7,
                automatic: true,
                purpose: Purpose::Send,
                reply: AckReply::Future(tx),
            },
        };
        direct.written().push((op, Instant::now()));
        direct.abandon();
        assert!(direct.take_written().is_empty());
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(Error::Stopped { ack_id: Some(7) }))
        ));
    }
}
