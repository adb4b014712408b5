//! The `max_connections` budget. A slot is taken before a client's WebSocket upgrade,
//! in the same atomic step as the check, and given back when its connection is
//! forgotten, or dropped without ever being registered (a failed handshake).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The connection slots of a server.
pub(crate) struct Slots {
    taken: Arc<AtomicUsize>,
    max: usize,
}

/// One taken slot, given back when dropped.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slots {
    /// `max` slots, none taken.
    pub(crate) fn new(max: usize) -> Self {
        Slots {
            taken: Arc::default(),
            max,
        }
    }

    /// Takes a slot; None when all are taken.
    pub(crate) fn take(&self) -> Option<Slot> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.taken.clone()))
    }

    /// How many are taken.
    pub(crate) fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::Slots;

    #[test]
    fn a_dropped_slot_is_free_again() {
        let slots = Slots::new(2);
        let a = slots.take().expect("first");
        let _b = slots.take().expect("second");
        assert!(slots.take().is_none());
        drop(a);
        assert!(slots.take().is_some());
    }
}
