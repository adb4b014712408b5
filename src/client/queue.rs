//! The way operations reach a client's connection task, awaited or not.
//!
//! The operations channel is bounded, so an awaiting caller feels backpressure. A
//! caller that must not wait (a completion-callback operation, started from any thread,
//! a runtime worker included) hands its operation over with `submit`: straight into
//! the channel when there is room, else into an unbounded overflow queue that one task
//! moves into the channel in order. While the overflow queue holds operations, every
//! later operation joins it, so none overtakes an earlier one of the same caller.

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
}

/// Operations that found the channel full, oldest first.
#[derive(Default)]
struct Overflow {
    /// Set while `queue` holds operations (and a task moves them into the channel).
    active: AtomicBool,
    queue: Mutex<VecDeque<Operation>>,
}

impl Overflow {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Operation>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OpSender {
    /// Wraps the channel; the overflow task runs on `runtime`.
    pub(crate) fn new(tx: mpsc::Sender<Operation>, runtime: Handle) -> OpSender {
        OpSender {
            tx,
            overflow: Arc::default(),
            runtime,
        }
    }

    /// Hands `op` to the connection task, waiting for room in the channel. Behind
    /// operations in the overflow queue, it joins that queue instead (no overtaking).
    /// `Error::Stopped` when the connection task is gone.
    pub(crate) async fn send(&self, op: Operation) -> Result<(), Error> {
        if self.overflow.active.load(Ordering::Acquire) {
            return self.submit(op);
        }
        self.tx.send(op).await.map_err(|_| Error::Stopped)
    }

    /// Hands `op` to the connection task without waiting (never blocks the thread):
    /// into the channel, or into the overflow queue when the channel is full or the
    /// queue is not empty. When the connection task is gone, the operation is refused
    /// (its reply gets `Error::Stopped`) and so is the call.
    pub(crate) fn submit(&self, op: Operation) -> Result<(), Error> {
        let op = if self.overflow.active.load(Ordering::Acquire) {
            op
        } else {
            match self.tx.try_send(op) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(op)) => {
                    op.refuse(Error::Stopped);
                    return Err(Error::Stopped);
                }
                Err(TrySendError::Full(op)) => op,
            }
        };
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
                op.refuse(Error::Stopped);
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
    use crate::client::pending::OpKind;
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    fn op(n: usize) -> Operation {
        Operation {
            frame: Utf8Bytes::from(n.to_string()),
            kind: OpKind::FireAndForget,
        }
    }

    fn frame(op: Operation) -> usize {
        op.frame.as_str().parse().unwrap()
    }

    #[test]
    fn a_full_channel_neither_blocks_nor_reorders_nor_loses() {
        let runtime = crate::runtime::handle();
        let (tx, mut rx) = mpsc::channel(4);
        let sender = OpSender::new(tx, runtime.clone());
        for n in 0..5000 {
            sender.submit(op(n)).unwrap();
        }
        assert!(sender.overflow.active.load(Ordering::Acquire));
        let received = runtime.block_on(async {
            // An awaited send behind the overflow queue joins it: no overtaking.
            sender.send(op(5000)).await.unwrap();
            let mut received = Vec::new();
            while received.len() < 5001 {
                received.push(frame(rx.recv().await.unwrap()));
            }
            sender.submit(op(5001)).unwrap();
            received.push(frame(rx.recv().await.unwrap()));
            received
        });
        assert_eq!(received, (0..5002).collect::<Vec<_>>());
    }

    #[test]
    fn operations_for_a_gone_task_are_refused() {
        let runtime = crate::runtime::handle();
        let (tx, rx) = mpsc::channel(1);
        let sender = OpSender::new(tx, runtime.clone());
        let (reply, answer) = tokio::sync::oneshot::channel();
        let acked = |reply| Operation {
            frame: Utf8Bytes::from_static("a"),
            kind: OpKind::Ack {
                ack_id: 1,
                automatic: true,
                purpose: crate::client::pending::Purpose::Send,
                reply,
            },
        };
        sender.submit(op(0)).unwrap();
        sender.submit(acked(reply.into())).unwrap();
        drop(rx);
        let outcome = runtime.block_on(answer).unwrap();
        assert_eq!(outcome, Err(Error::Stopped));
        let (reply, answer) = tokio::sync::oneshot::channel();
        assert_eq!(sender.submit(acked(reply.into())), Err(Error::Stopped));
        assert_eq!(runtime.block_on(answer).unwrap(), Err(Error::Stopped));
    }
}
