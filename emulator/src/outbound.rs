//! A socket's outbound queue: bounded in frames and in bytes, with headroom kept for
//! the final `disconnected` and close frames.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Config;

/// Frames kept free in every outbound queue for the final close.
const CLOSE_HEADROOM: usize = 4;

/// What the writer task of a socket receives.
pub(crate) enum Out {
    /// A frame to write.
    Frame(Message),
    /// Write a close frame, then end the socket.
    Close(u16, String),
}

fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// The sending end, held by the connection the socket is attached to.
pub(crate) struct SocketHandle {
    tx: mpsc::Sender<Out>,
    /// Bytes of the frames queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Cancelled to drop the socket at once, without a close frame.
    pub kill: CancellationToken,
    closing: CancellationToken,
}

/// The receiving end, drained by the socket's writer task.
pub(crate) struct Outbound {
    rx: mpsc::Receiver<Out>,
    queued: Arc<AtomicUsize>,
    /// Cancelled once the final close is queued.
    pub closing: CancellationToken,
}

impl SocketHandle {
    /// A queue of `max_outbound_queue` frames and `max_outbound_bytes` bytes (plus the
    /// headroom), and the kill token of its socket.
    pub(crate) fn new(config: &Config) -> (SocketHandle, Outbound, CancellationToken) {
        let (tx, rx) = mpsc::channel(config.max_outbound_queue.max(1) + CLOSE_HEADROOM + 4);
        let queued = Arc::new(AtomicUsize::new(0));
        let kill = CancellationToken::new();
        let closing = CancellationToken::new();
        let handle = SocketHandle {
            tx,
            queued: queued.clone(),
            max_bytes: config.max_outbound_bytes,
            kill: kill.clone(),
            closing: closing.clone(),
        };
        let outbound = Outbound {
            rx,
            queued,
            closing,
        };
        (handle, outbound, kill)
    }

    /// Queues a frame within the limits. False when they are reached (the caller ends
    /// the session); a frame for a socket whose writer is gone is dropped.
    pub(crate) fn push(&self, msg: Message) -> bool {
        let room = self.tx.capacity() > CLOSE_HEADROOM
            && self.queued.load(Ordering::Relaxed) + frame_len(&msg) <= self.max_bytes;
        room && (self.send(msg) || self.tx.is_closed())
    }

    /// Queues a frame using the headroom if need be; false when the queue is full or
    /// its writer gone.
    pub(crate) fn send(&self, msg: Message) -> bool {
        let len = frame_len(&msg);
        // Counted before the writer can take it, so the count never goes below zero.
        self.queued.fetch_add(len, Ordering::Relaxed);
        let sent = self.tx.try_send(Out::Frame(msg)).is_ok();
        if !sent {
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
        sent
    }

    /// Is there room for `frames` more frames, besides the headroom for the final close?
    pub(crate) fn fits(&self, frames: usize) -> bool {
        self.tx.capacity() >= frames + CLOSE_HEADROOM
    }

    /// Bytes queued and not yet taken by the writer.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues the final close frame; false when it could not be queued.
    pub(crate) fn close(&self, code: u16, reason: &str) -> bool {
        self.closing.cancel();
        self.tx
            .try_send(Out::Close(code, reason.to_owned()))
            .is_ok()
    }
}

impl Outbound {
    /// The next queued item; None once every handle is gone.
    pub(crate) async fn recv(&mut self) -> Option<Out> {
        let out = self.rx.recv().await;
        self.taken(out)
    }

    /// The next queued item if there is one now.
    pub(crate) fn try_recv(&mut self) -> Option<Out> {
        let out = self.rx.try_recv().ok();
        self.taken(out)
    }

    fn taken(&self, out: Option<Out>) -> Option<Out> {
        if let Some(Out::Frame(m)) = &out {
            self.queued.fetch_sub(frame_len(m), Ordering::Relaxed);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_taken_by_the_writer_make_room_again() {
        let config = Config {
            max_outbound_bytes: 10,
            ..Config::default()
        };
        let (handle, mut outbound, _kill) = SocketHandle::new(&config);
        let frame = |n: usize| Message::Text("x".repeat(n).into());
        assert!(handle.push(frame(6)));
        assert!(!handle.push(frame(5)), "11 bytes would be queued");
        assert!(handle.send(frame(5)), "the headroom ignores the byte limit");
        assert!(outbound.try_recv().is_some());
        assert!(outbound.try_recv().is_some());
        assert!(handle.push(frame(10)));
        assert!(outbound.try_recv().is_some());
        assert!(outbound.try_recv().is_none());
    }
}
