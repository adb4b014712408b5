//! Sequence tracking of a reliable connection: dedupe and `sequenceAck` timing.

/// The highest sequence id delivered and the last one acknowledged to the service.
#[derive(Debug, Default)]
pub(crate) struct Sequence {
    delivered: u64,
    acked: u64,
}

impl Sequence {
    /// Forgets everything (a new connection starts from zero).
    pub(crate) fn reset(&mut self) {
        *self = Sequence::default();
    }

    /// The socket dropped: its last `sequenceAck` may never have reached the service,
    /// which then replays what it covered. The recovered connection acknowledges the
    /// delivered id again (the replayed frames, all duplicates, would not).
    pub(crate) fn ack_again(&mut self) {
        self.acked = 0;
    }

    /// Records a data frame's id; `false` means it was already delivered (drop it).
    pub(crate) fn accept(&mut self, id: u64) -> bool {
        if id <= self.delivered {
            return false;
        }
        self.delivered = id;
        true
    }

    /// Whether delivered frames are not yet acknowledged.
    pub(crate) fn has_unacked(&self) -> bool {
        self.delivered > self.acked
    }

    /// Whether the delivered id moved by more than `jump` since the last ack.
    pub(crate) fn ack_due_now(&self, jump: u64) -> bool {
        self.delivered - self.acked > jump
    }

    /// The id to acknowledge now, if it changed since the last ack.
    pub(crate) fn take_ack(&mut self) -> Option<u64> {
        self.has_unacked().then(|| {
            self.acked = self.delivered;
            self.delivered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Sequence;

    #[test]
    fn duplicates_are_dropped_and_acks_sent_once() {
        let mut s = Sequence::default();
        assert!(s.accept(1));
        assert!(s.accept(2));
        assert!(!s.accept(2));
        assert!(!s.accept(1));
        assert!(s.accept(5));
        assert_eq!(s.take_ack(), Some(5));
        assert_eq!(s.take_ack(), None);
        assert!(!s.accept(4));
        assert!(!s.has_unacked());
    }

    #[test]
    fn a_jump_over_the_threshold_is_due_at_once() {
        let mut s = Sequence::default();
        assert!(s.accept(300));
        assert!(!s.ack_due_now(300));
        assert!(s.accept(301));
        assert!(s.ack_due_now(300));
        assert_eq!(s.take_ack(), Some(301));
        s.reset();
        assert!(s.accept(1));
    }

    #[test]
    fn the_extreme_ids_neither_overflow_nor_reopen_the_sequence() {
        let mut s = Sequence::default();
        assert!(!s.accept(0), "0 is not above the start");
        assert!(s.accept(u64::MAX));
        assert!(s.ack_due_now(300));
        assert_eq!(s.take_ack(), Some(u64::MAX));
        assert!(!s.ack_due_now(0));
        for id in [0, 1, u64::MAX - 1, u64::MAX] {
            assert!(!s.accept(id), "{id} is not above u64::MAX");
        }
        s.ack_again();
        assert!(s.ack_due_now(u64::MAX - 1));
        assert_eq!(s.take_ack(), Some(u64::MAX));
        assert!(!s.has_unacked());
    }

    #[test]
    fn a_drop_makes_the_delivered_id_due_again() {
        let mut s = Sequence::default();
        s.ack_again();
        assert_eq!(s.take_ack(), None, "nothing delivered");
        assert!(s.accept(7));
        assert_eq!(s.take_ack(), Some(7));
        s.ack_again();
        assert!(!s.accept(7));
        assert_eq!(s.take_ack(), Some(7));
    }
}
