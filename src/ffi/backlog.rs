//! How many bytes of a client's received events wait for the application (its
//! callbacks, or its dispatch in poll mode). Past the client's limit the core stops
//! reading the socket, until the application has worked the backlog down to half of it.
//!
//! Never while a blocking call of the client waits for the service: the thread that
//! would work the backlog down may be the one waiting (a callback sending), and the
//! answer it waits for comes behind the events on the socket. Nor while the client's
//! dispatch is suspended: the messages that come are dropped then, not queued.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::client::Resume;

/// The default limit: 64 MiB of events waiting.
pub(crate) const DEFAULT_LIMIT: usize = 64 << 20;

/// One client's waiting events, counted in bytes.
pub(crate) struct Backlog {
    bytes: AtomicUsize,
    /// Reading pauses above this many bytes (0: never).
    limit: usize,
    /// Blocking calls of the client waiting for the service.
    blocking: AtomicUsize,
    /// The client's dispatch is suspended (poll mode): its messages are dropped.
    suspended: AtomicBool,
    /// Reading is paused (a future of `over` is waiting).
    paused: AtomicBool,
    /// Woken when the backlog falls to half the limit, a blocking call starts, or the
    /// dispatch is suspended.
    drained: Notify,
}

/// A blocking call's hold on its client's reading (see [`Backlog::unpause`]). It owns a
/// reference: the client may be freed by another thread while the call waits.
pub(crate) struct Unpaused(Arc<Backlog>);

impl Drop for Unpaused {
    fn drop(&mut self) {
        self.0.blocking.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Backlog {
    pub(crate) fn new(limit: usize) -> Backlog {
        Backlog {
            bytes: AtomicUsize::new(0),
            limit,
            blocking: AtomicUsize::new(0),
            suspended: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    /// An event of `bytes` now waits.
    pub(crate) fn hold(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// An event of `bytes` no longer waits (it ran, became a record, or was dropped).
    pub(crate) fn release(&self, bytes: usize) {
        let before = self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        let low = self.limit / 2;
        if self.limit > 0 && before > low && before - bytes <= low {
            self.drained.notify_waiters();
        }
    }

    /// A blocking call of the client waits for the service until the guard drops:
    /// reading goes on meanwhile, whatever the backlog.
    pub(crate) fn unpause(self: &Arc<Self>) -> Unpaused {
        self.blocking.fetch_add(1, Ordering::SeqCst);
        self.wake_paused();
        Unpaused(Arc::clone(self))
    }

    /// The client's dispatch is suspended (`on`) or resumed: while suspended, the
    /// messages that come are dropped, so reading goes on whatever the backlog.
    pub(crate) fn set_suspended(&self, on: bool) {
        self.suspended.store(on, Ordering::SeqCst);
        if on {
            self.wake_paused();
        }
    }

    /// Wakes the paused reading, if it is, to look again.
    fn wake_paused(&self) {
        if self.paused.load(Ordering::SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// Reading goes on whatever the backlog: a blocking call waits, or the dispatch is
    /// suspended.
    fn reads_anyway(&self) -> bool {
        self.blocking.load(Ordering::SeqCst) > 0 || self.suspended.load(Ordering::SeqCst)
    }

    fn may_read(&self) -> bool {
        self.bytes.load(Ordering::Acquire) <= self.limit / 2 || self.reads_anyway()
    }

    /// Over the limit (and no blocking call waiting, not suspended): a future that
    /// completes once the backlog is down to half of it, a blocking call starts, or the
    /// dispatch is suspended.
    pub(crate) fn over(self: &Arc<Self>) -> Option<Resume> {
        if self.limit == 0
            || self.bytes.load(Ordering::Acquire) <= self.limit
            || self.reads_anyway()
        {
            return None;
        }
        let backlog = Arc::clone(self);
        Some(Box::pin(async move {
            let _paused = PausedFlag::set(&backlog.paused);
            loop {
                let notified = backlog.drained.notified();
                tokio::pin!(notified);
                // Registered before the check: a release in between still wakes it.
                notified.as_mut().enable();
                if backlog.may_read() {
                    break;
                }
                notified.await;
            }
        }))
    }
}

/// `Backlog::paused` while a pause waits; cleared when it ends or is dropped (its
/// connection ended).
struct PausedFlag<'a>(&'a AtomicBool);

impl<'a> PausedFlag<'a> {
    fn set(flag: &'a AtomicBool) -> PausedFlag<'a> {
        flag.store(true, Ordering::SeqCst);
        PausedFlag(flag)
    }
}

impl Drop for PausedFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn pauses_above_the_limit_and_resumes_at_half_of_it() {
        let backlog = Arc::new(Backlog::new(100));
        backlog.hold(100);
        assert!(backlog.over().is_none(), "at the limit: not over");
        backlog.hold(1);
        let mut resume = backlog.over().expect("over the limit");
        assert!((&mut resume).now_or_never().is_none());
        backlog.release(40);
        assert!(
            (&mut resume).now_or_never().is_none(),
            "61 bytes: above half"
        );
        backlog.release(11);
        assert!(resume.now_or_never().is_some(), "50 bytes: resumed");
    }

    #[test]
    fn a_blocking_call_resumes_reading_and_keeps_it_going() {
        let backlog = Arc::new(Backlog::new(100));
        backlog.hold(101);
        let mut resume = backlog.over().expect("over the limit");
        assert!((&mut resume).now_or_never().is_none());
        let call = backlog.unpause();
        assert!(resume.now_or_never().is_some(), "resumed by the call");
        assert!(backlog.over().is_none(), "not paused while it waits");
        drop(call);
        assert!(backlog.over().is_some(), "paused again after it");
    }

    #[test]
    fn a_pause_given_up_is_no_longer_woken() {
        let backlog = Arc::new(Backlog::new(100));
        backlog.hold(101);
        let mut resume = backlog.over().expect("over the limit");
        assert!((&mut resume).now_or_never().is_none());
        assert!(backlog.paused.load(Ordering::SeqCst));
        drop(resume);
        assert!(!backlog.paused.load(Ordering::SeqCst));
    }

    #[test]
    fn a_suspension_resumes_reading_until_it_ends() {
        let backlog = Arc::new(Backlog::new(100));
        backlog.hold(101);
        let mut resume = backlog.over().expect("over the limit");
        assert!((&mut resume).now_or_never().is_none());
        backlog.set_suspended(true);
        assert!(resume.now_or_never().is_some(), "resumed by the suspension");
        assert!(backlog.over().is_none(), "not paused while suspended");
        backlog.set_suspended(false);
        assert!(backlog.over().is_some(), "paused again after it");
    }

    #[test]
    fn a_change_before_the_first_poll_is_not_missed() {
        let backlog = Arc::new(Backlog::new(100));
        backlog.hold(101);
        let resume = backlog.over().expect("over the limit");
        backlog.release(51);
        assert!(resume.now_or_never().is_some(), "drained before the poll");
        backlog.hold(51);
        let resume = backlog.over().expect("over the limit");
        let call = backlog.unpause();
        assert!(resume.now_or_never().is_some(), "a call before the poll");
        drop(call);
    }

    #[test]
    fn no_limit_never_pauses() {
        let backlog = Arc::new(Backlog::new(0));
        backlog.hold(usize::MAX / 2);
        assert!(backlog.over().is_none());
        backlog.release(usize::MAX / 2);
    }
}
