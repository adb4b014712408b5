//! Automatic ackIds: a counter per client that steps over the ids callers chose.
//!
//! The service remembers the last ackIds of a connection and answers one it already
//! processed with `Duplicate`, dropping the message. An automatic ackId equal to one a
//! caller chose shortly before (`ack_id: Some(..)`) would therefore lose its message
//! while reporting success. The counter skips every id among the latest
//! [`SERVICE_ACK_MEMORY`] chosen ones. It is never moved past them: a caller numbering
//! its own messages from a range ahead of the counter keeps that range to itself.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// How many of a connection's latest ackIds the service remembers for `Duplicate`.
pub(crate) const SERVICE_ACK_MEMORY: usize = 1000;

/// A client's ackId counter and the ids its callers chose lately.
pub(crate) struct AckIds {
    next: AtomicU64,
    /// Set at the first chosen id: until then the counter needs no lock.
    any_chosen: AtomicBool,
    chosen: Mutex<Recent>,
}

/// The latest chosen ids, oldest first, with a set to look them up.
#[derive(Default)]
struct Recent {
    order: VecDeque<u64>,
    ids: HashSet<u64>,
}

impl Default for AckIds {
    fn default() -> Self {
        AckIds {
            next: AtomicU64::new(1),
            any_chosen: AtomicBool::new(false),
            chosen: Mutex::default(),
        }
    }
}

impl AckIds {
    fn chosen(&self) -> MutexGuard<'_, Recent> {
        self.chosen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next automatic ackId (counting from 1), skipping the ids chosen lately.
    pub(crate) fn next(&self) -> u64 {
        if !self.any_chosen.load(Ordering::Acquire) {
            return self.next.fetch_add(1, Ordering::Relaxed);
        }
        let chosen = self.chosen();
        loop {
            // Ends: at most `SERVICE_ACK_MEMORY` ids are skipped.
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if !chosen.ids.contains(&id) {
                return id;
            }
        }
    }

    /// Records an ackId a caller chose, for [`AckIds::next`] to skip; false, recording
    /// nothing, for one the counter has passed (no automatic ackId can meet it any more:
    /// a resend with an ackId the client drew itself).
    pub(crate) fn chose(&self, id: u64) -> bool {
        if id < self.next.load(Ordering::Relaxed) {
            return false;
        }
        let mut chosen = self.chosen();
        if chosen.ids.insert(id) {
            chosen.order.push_back(id);
            if chosen.order.len() > SERVICE_ACK_MEMORY {
                if let Some(oldest) = chosen.order.pop_front() {
                    chosen.ids.remove(&oldest);
                }
            }
        }
        self.any_chosen.store(true, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_ids_skip_the_chosen_ones_and_never_jump() {
        let ids = AckIds::default();
        assert_eq!(ids.next(), 1);
        assert!(
            !ids.chose(1),
            "a resend with an id already drawn: nothing to skip"
        );
        assert!(!ids.any_chosen.load(Ordering::Acquire));
        assert!(ids.chose(3));
        ids.chose(4);
        ids.chose(1_000_000);
        ids.chose(u64::MAX);
        assert_eq!([ids.next(), ids.next(), ids.next()], [2, 5, 6]);
    }

    #[test]
    fn only_the_latest_chosen_ids_are_remembered() {
        let ids = AckIds::default();
        ids.chose(10);
        for id in 0..SERVICE_ACK_MEMORY as u64 {
            ids.chose(1_000 + id);
        }
        let drawn: Vec<u64> = (0..10).map(|_| ids.next()).collect();
        assert_eq!(drawn, (1..=10).collect::<Vec<_>>(), "10 fell out");
        ids.chose(11);
        assert_eq!(ids.next(), 12);
    }
}
