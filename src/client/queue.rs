//! The way operations reach a client's connection task, awaited or not.
//!
//! The operations channel is bounded, so an awaiting caller feels backpressure. A
//! caller that must not wait (a completion-callback operation, started from any thread,
//! a runtime worker included) hands its operation over with `submit`: straight into
//! the channel when there is room, else into an unbounded overflow queue that one task
//! moves into the channel in order. While the overflow queue holds operations, every
//! later operation joins it, so none overtakes an earlier one of the same caller.
//!
//! Waking the connection task costs the submitting thread a system call. A caller that
//! starts many operations in a row (an event loop, once per iteration) may defer them:
//! they wait on the sender until `flush`, or until an operation that is not deferred,
//! and then go out together: written by the flushing thread itself as one batch as far
//! as it can ([`Direct::write_run`]), the rest handed to the connection task together,
//! for one wake-up.
//!
//! Every operation handed over (into the channel or the overflow queue) is counted in
//! [`Direct`] until the task is done with it, so that a direct write never overtakes
//! one; deferred operations are sent (written or handed over) before any later
//! operation is.
//!
//! A stopping task takes what waits in the overflow queue too
//! ([`Overflow::take_waiting`]): those operations were already reported handed over.

use super::direct::{Direct, Written};
use super::pending::Operation;
use super::Error;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, error::TrySendError};

/// The sending side of a client's operations channel.
pub(crate) struct OpSender {
    tx: mpsc::Sender<Operation>,
    overflow: Arc<Overflow>,
    runtime: Handle,
    direct: Arc<Direct>,
    /// Set while `deferred` holds operations.
    has_deferred: AtomicBool,
    /// Deferred operations, oldest first, waiting for `flush`.
    deferred: Mutex<Vec<Operation>>,
}

/// When a submitted operation is handed to the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// At once (waking the connection task if it sleeps).
    Now,
    /// At the next `flush` or the next operation handed over at once.
    Deferred,
}

/// Operations that found the channel full, oldest first; shared by a client's senders
/// and its connection task.
#[derive(Default)]
pub(crate) struct Overflow {
    /// Set while `queue` holds operations (and a task moves them into the channel).
    active: AtomicBool,
    queue: Mutex<VecDeque<Operation>>,
}

impl Overflow {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Operation>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every operation waiting for the connection task, oldest first: those in
    /// its channel `rx`, then those in this queue (a fire-and-forget one there was
    /// already reported sent). The channel is emptied under the queue's lock, which
    /// `drain` holds while it moves an operation, so none is taken out of order.
    pub(crate) fn take_waiting(&self, rx: &mut mpsc::Receiver<Operation>) -> Vec<Operation> {
        let mut queue = self.queue();
        let mut waiting = Vec::new();
        while let Ok(op) = rx.try_recv() {
            waiting.push(op);
        }
        waiting.extend(queue.drain(..));
        waiting
    }
}

impl OpSender {
    /// Wraps the channel, with its `overflow` queue; the overflow task runs on
    /// `runtime`; operations are counted in `direct`.
    pub(crate) fn new(
        tx: mpsc::Sender<Operation>,
        overflow: Arc<Overflow>,
        runtime: Handle,
        direct: Arc<Direct>,
    ) -> OpSender {
        OpSender {
            tx,
            overflow,
            runtime,
            direct,
            has_deferred: AtomicBool::new(false),
            deferred: Mutex::default(),
        }
    }

    fn deferred(&self) -> MutexGuard<'_, Vec<Operation>> {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `op` to the connection task, waiting for room in the channel. Behind
    /// operations in the overflow queue, it joins that queue instead (no overtaking).
    /// `Error::Stopped` when the connection task is gone.
    pub(crate) async fn send(&self, op: Operation) -> Result<(), Error> {
        self.flush();
        if self.overflow.active.load(Ordering::Acquire) {
            return self.hand_over(op);
        }
        // Counted once the channel has room for it: a caller that gives up while
        // waiting leaves nothing counted.
        let permit = self
            .tx
            .reserve()
            .await
            .map_err(|_| Error::Stopped { ack_id: None })?;
        self.direct.queued_one();
        permit.send(op);
        Ok(())
    }

    /// [`OpSender::send`] when it would not wait: hands `op` over if the channel has
    /// room (or joins the overflow queue behind earlier operations), else gives it back.
    pub(crate) fn try_send(&self, op: Operation) -> Result<Result<(), Error>, Operation> {
        self.flush();
        if self.overflow.active.load(Ordering::Acquire) {
            return Ok(self.hand_over(op));
        }
        self.send_if_room(op)
    }

    /// Hands `op` to the connection task without waiting (never blocks the thread):
    /// into the channel, or into the overflow queue when the channel is full or the
    /// queue is not empty. When the connection task is gone, the operation is refused
    /// (its reply gets `Error::Stopped`) and so is the call. A deferred operation is
    /// only queued here (its refusal, if any, comes with the flush).
    pub(crate) fn submit(&self, op: Operation, handover: Handover) -> Result<(), Error> {
        match handover {
            Handover::Deferred => {
                self.deferred().push(op);
                self.has_deferred.store(true, Ordering::Release);
                Ok(())
            }
            Handover::Now => {
                self.flush();
                self.hand_over(op)
            }
        }
    }

    /// Sends every deferred operation, in order: as many of them as it can written by
    /// this thread at once, as one batch, pending operations or not (see
    /// [`Direct::write_run`]); the rest handed to the connection task, for one wake-up.
    /// All under the lock, so that two flushing threads cannot interleave, and
    /// `has_deferred` is cleared only once they are sent: a flush that comes meanwhile
    /// (a stop's, before its command) waits for them instead of overtaking them.
    pub(crate) fn flush(&self) {
        if !self.has_deferred.load(Ordering::Acquire) {
            return;
        }
        let mut deferred = self.deferred();
        let mut run = deferred.drain(..).peekable();
        self.direct.write_run(&mut run);
        for op in run {
            // A refused operation has already given its reply the error.
            let _ = self.hand_over(op);
        }
        self.has_deferred.store(false, Ordering::Release);
    }

    /// Writes an acked operation on this thread if the client is idle (see
    /// [`Direct::try_write`]), after sending the deferred ones: it must not overtake
    /// them.
    pub(crate) fn try_write(&self, op: Operation) -> Written {
        self.flush();
        self.direct.try_write(op)
    }

    /// The runtime the connection task runs on.
    pub(crate) fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// Puts `op` into the channel if it has room (refused with `Error::Stopped` when the
    /// connection task is gone); a full channel gives it back. Counted once put in.
    fn send_if_room(&self, op: Operation) -> Result<Result<(), Error>, Operation> {
        match self.tx.try_reserve() {
            Ok(permit) => {
                self.direct.queued_one();
                permit.send(op);
                Ok(Ok(()))
            }
            Err(TrySendError::Closed(())) => {
                op.refuse(Error::Stopped { ack_id: None });
                Ok(Err(Error::Stopped { ack_id: None }))
            }
            Err(TrySendError::Full(())) => Err(op),
        }
    }

    fn hand_over(&self, op: Operation) -> Result<(), Error> {
        let op = if self.overflow.active.load(Ordering::Acquire) {
            op
        } else {
            match self.send_if_room(op) {
                Ok(sent) => return sent,
                Err(op) => op,
            }
        };
        self.direct.queued_one();
        let mut queue = self.overflow.queue();
        queue.push_back(op);
        if !self.overflow.active.swap(true, Ordering::AcqRel) {
            self.runtime
                .spawn(drain(self.tx.clone(), Arc::clone(&self.overflow)));
        }
        Ok(())
    }
}

/// Moves the overflow queue into the channel, in order, as room frees up; ends when
/// the queue is empty (clearing `active` under the queue lock, so a later operation
/// either sees it set and queues behind, or finds everything already in the channel).
async fn drain(tx: mpsc::Sender<Operation>, overflow: Arc<Overflow>) {
    loop {
        let Ok(permit) = tx.reserve().await else {
            let refused: Vec<Operation> = {
                let mut queue = overflow.queue();
                overflow.active.store(false, Ordering::Release);
                queue.drain(..).collect()
            };
            for op in refused {
                op.refuse(Error::Stopped { ack_id: None });
            }
            return;
        };
        let mut queue = overflow.queue();
        if let Some(op) = queue.pop_front() {
            permit.send(op);
        }
        if queue.is_empty() {
            overflow.active.store(false, Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::pending::{AckReply, OpKind};
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    fn op(n: usize) -> Operation {
        Operation {
            frame: Utf8Bytes::from(n.to_string()),
            kind: OpKind::FireAndForget,
        }
    }

    /// An acked operation whose outcome goes to `reply`.
    fn acked(reply: AckReply) -> Operation {
        Operation {
            frame: Utf8Bytes::from_static("a"),
            kind: OpKind::Ack {
                ack_id: 1,
                automatic: true,
                purpose: crate::client::pending::Purpose::Send,
                reply,
            },
        }
    }

    fn frame(op: Operation) -> usize {
        op.frame.as_str().parse().unwrap()
    }

    #[test]
    fn a_full_channel_neither_blocks_nor_reorders_nor_loses() {
        let runtime = crate::runtime::handle();
        let (tx, mut rx) = mpsc::channel(4);
        let sender = OpSender::new(tx, Arc::default(), runtime.clone(), Arc::default());
        for n in 0..5000 {
            sender.submit(op(n), Handover::Now).unwrap();
        }
        assert!(sender.overflow.active.load(Ordering::Acquire));
        let received = runtime.block_on(async {
            // An awaited send behind the overflow queue joins it: no overtaking.
            sender.send(op(5000)).await.unwrap();
            let mut received = Vec::new();
            while received.len() < 5001 {
                received.push(frame(rx.recv().await.unwrap()));
            }
            sender.submit(op(5001), Handover::Now).unwrap();
            received.push(frame(rx.recv().await.unwrap()));
            received
        });
        assert_eq!(received, (0..5002).collect::<Vec<_>>());
    }

    #[test]
    fn operations_for_a_gone_task_are_refused() {
        let runtime = crate::runtime::handle();
        let (tx, rx) = mpsc::channel(1);
        let sender = OpSender::new(tx, Arc::default(), runtime.clone(), Arc::default());
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender.submit(op(0), Handover::Now).unwrap();
        sender.submit(acked(reply.into()), Handover::Now).unwrap();
        drop(rx);
        let outcome = runtime.block_on(answer).unwrap();
        assert_eq!(outcome, Err(Error::Stopped { ack_id: None }));
        let (reply, answer) = tokio::sync::oneshot::channel();
        assert_eq!(
            sender.submit(acked(reply.into()), Handover::Now),
            Err(Error::Stopped { ack_id: None })
        );
        assert_eq!(
            runtime.block_on(answer).unwrap(),
            Err(Error::Stopped { ack_id: None })
        );
    }

    #[test]
    fn deferred_operations_wait_for_a_flush_or_an_operation_handed_over_at_once() {
        let runtime = crate::runtime::handle();
        let (tx, mut rx) = mpsc::channel(4);
        let sender = OpSender::new(tx, Arc::default(), runtime.clone(), Arc::default());
        for n in 0..3 {
            sender.submit(op(n), Handover::Deferred).unwrap();
        }
        assert!(
            rx.try_recv().is_err(),
            "deferred operations were handed over"
        );
        sender.flush();
        sender.submit(op(3), Handover::Deferred).unwrap();
        sender.submit(op(4), Handover::Deferred).unwrap();
        sender.submit(op(5), Handover::Now).unwrap();
        // more than the channel holds: the overflow queue keeps the order
        for n in 6..20 {
            sender.submit(op(n), Handover::Deferred).unwrap();
        }
        let received = runtime.block_on(async {
            sender.send(op(20)).await.unwrap();
            let mut received = Vec::new();
            while received.len() < 21 {
                received.push(frame(rx.recv().await.unwrap()));
            }
            received
        });
        assert_eq!(received, (0..21).collect::<Vec<_>>());
        sender.flush(); // nothing left: a no-op
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn deferred_operations_for_a_gone_task_are_refused_at_the_flush() {
        let runtime = crate::runtime::handle();
        let (tx, rx) = mpsc::channel(4);
        let sender = OpSender::new(tx, Arc::default(), runtime.clone(), Arc::default());
        let (reply, answer) = tokio::sync::oneshot::channel();
        drop(rx);
        assert_eq!(
            sender.submit(acked(reply.into()), Handover::Deferred),
            Ok(())
        );
        sender.flush();
        assert_eq!(
            runtime.block_on(answer).unwrap(),
            Err(Error::Stopped { ack_id: None })
        );
    }
}
