//! How a blocking call's thread waits for its operation: it polls the operation's
//! future itself (the runtime's workers drive the I/O and timers it waits on) and,
//! while the future is pending, first spins for a short while, then parks.
//!
//! An answer from a nearby service (a loopback emulator, a service in the same
//! datacenter) comes back within tens of microseconds, about as long as a parked thread
//! takes to be woken and scheduled again. So a thread whose previous wait was that short
//! spins first, watching a flag its waker sets, and the runtime's worker that completes
//! the operation wakes it without a futex call on either side. Each turn of the spin
//! yields the processor, so that a thread ready to run (the worker, the service on the
//! same machine) is not kept waiting by it. A thread whose previous wait was longer (a
//! distant service) parks at once. At most one thread of the process spins at a time,
//! and none on a single processor, where it would only delay the worker it waits for.

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// The longest spin of one wait, and the longest previous wait after which a thread
/// spins (the ack of a message to a loopback emulator: 40 to 60 µs at the median).
const SPIN: Duration = Duration::from_micros(100);

/// Set while a thread spins: the others park at once.
static SPINNING: AtomicBool = AtomicBool::new(false);

/// Whether this process may spin at all: not on a single processor.
fn may_spin() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// Wakes the thread that waits in `block_on`: sets the flag it may be spinning on, and
/// unparks it (an atomic operation only, unless it is parked).
struct Waiter {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Waiter {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// This thread's waiter and a waker of it.
struct Local {
    waiter: Arc<Waiter>,
    waker: Waker,
}

thread_local! {
    static LOCAL: Local = {
        let waiter = Arc::new(Waiter {
            woken: AtomicBool::new(false),
            thread: std::thread::current(),
        });
        Local { waker: Waker::from(waiter.clone()), waiter }
    };
    /// How long this thread's previous `block_on` waited for its future.
    static LAST_WAIT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Runs `fut` to completion on this thread. With `check` (an interval and a function),
/// the function is asked every interval, and `None` is returned, the future dropped,
/// once it says to stop. On a thread whose thread-locals are being destroyed (a call
/// from a thread-exit handler), it is the runtime's `block_on`, and never stopped.
pub(crate) fn block_on<F: Future>(
    rt: &Handle,
    fut: F,
    check: Option<(Duration, &dyn Fn() -> bool)>,
) -> Option<F::Output> {
    let Ok((waiter, waker)) = LOCAL.try_with(|l| (l.waiter.clone(), l.waker.clone())) else {
        return Some(rt.block_on(fut));
    };
    let mut spin = may_spin() && LAST_WAIT.try_with(Cell::get).is_ok_and(|last| last <= SPIN);
    let _context = rt.enter();
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut next_check = check.map(|(interval, _)| Instant::now() + interval);
    let mut pending_since = None;
    loop {
        waiter.woken.store(false, Ordering::Relaxed);
        if let Poll::Ready(output) = fut.as_mut().poll(&mut cx) {
            let waited = pending_since.map_or(Duration::ZERO, |since: Instant| since.elapsed());
            let _ = LAST_WAIT.try_with(|last| last.set(waited));
            return Some(output);
        }
        let now = Instant::now();
        pending_since.get_or_insert(now);
        if let (Some(at), Some((interval, stop))) = (next_check, check) {
            if now >= at {
                if stop() {
                    return None;
                }
                next_check = Some(now + interval);
            }
        }
        if spin {
            if spin_until_woken(&waiter, now + SPIN) {
                continue;
            }
            spin = false; // a slow answer: once is enough
        }
        // Woken (or spuriously, which only costs a poll) or due for a check.
        match next_check {
            Some(at) => std::thread::park_timeout(at.saturating_duration_since(Instant::now())),
            None => std::thread::park(),
        }
    }
}

/// Spins until `waiter` is woken (true) or `until` (false), yielding the processor on
/// each turn; false at once when another thread spins.
fn spin_until_woken(waiter: &Waiter, until: Instant) -> bool {
    if SPINNING.swap(true, Ordering::Acquire) {
        return false;
    }
    let woken = loop {
        if waiter.woken.load(Ordering::Acquire) {
            break true;
        }
        if Instant::now() >= until {
            break false;
        }
        // Not a busy loop: on a busy machine the worker that will wake this thread may
        // be waiting for a processor.
        std::thread::yield_now();
    };
    SPINNING.store(false, Ordering::Release);
    woken
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits on futures answered by another thread after no delay, a spin's worth, or
    /// longer (a mix of spun and parked waits), from several threads at once: every
    /// wake-up is seen (a lost one would hang the test), and a check stops a wait that
    /// nothing answers.
    #[test]
    fn every_wake_up_is_seen_whether_spinning_or_parked() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let waiters: Vec<_> = (0..3u64)
            .map(|t| {
                let handle = rt.handle().clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let delay = Duration::from_micros(((i * 7 + t) % 5) * 60);
                        handle.spawn(async move {
                            if !delay.is_zero() {
                                std::thread::sleep(delay);
                            }
                            let _ = tx.send(i);
                        });
                        assert_eq!(block_on(&handle, rx, None), Some(Ok(i)));
                    }
                })
            })
            .collect();
        for waiter in waiters {
            waiter.join().unwrap();
        }
        let never = std::future::pending::<()>();
        let stop = || true;
        let check = Some((Duration::from_millis(5), &stop as &dyn Fn() -> bool));
        assert_eq!(block_on(rt.handle(), never, check), None);
        assert!(
            !SPINNING.load(Ordering::Relaxed),
            "the spin slot is given back"
        );
    }
}
