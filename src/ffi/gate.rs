//! Which foreign callbacks may run: every call into the application (events,
//! completions, user data finalizers, credential providers, the log callback) passes
//! through `InCallback::enter`, which marks the thread as inside a callback and
//! counts the callbacks running. `wps_callbacks_disable` closes the gate for good.
//! Work that must wait until a callback has returned (the teardown of a client freed
//! inside it) is kept per thread until its outermost callback returns.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::panic::{guard, guard_job};
use super::status::{fail, wps_status, WPS_STATUS_TIMEOUT};

/// Work deferred until a callback has returned.
type Deferred = Vec<Box<dyn FnOnce()>>;

thread_local! {
    static CALLBACK_DEPTH: Cell<usize> = const { Cell::new(0) };
    /// What runs once this thread's outermost callback has returned (NULL: nothing). A
    /// pointer without a destructor, so that it stays usable while the thread exits (a
    /// callback dispatched by an `atexit` handler, after Rust's thread-locals are gone).
    static AFTER_CALLBACKS: Cell<*mut Deferred> = const { Cell::new(std::ptr::null_mut()) };
}

/// The process's gate; a type so that its tests can use gates of their own (closing
/// this one is for good).
struct Gate {
    /// Callbacks running now, on every thread.
    running: AtomicUsize,
    /// No callback starts any more.
    disabled: AtomicBool,
    /// The callbacks of the threads waiting in `disable` from inside callbacks: those
    /// cannot return while their thread waits, so no waiter waits for them (two such
    /// threads would otherwise wait for each other).
    waiting: AtomicUsize,
}

static GATE: Gate = Gate::new();

impl Gate {
    const fn new() -> Gate {
        Gate {
            running: AtomicUsize::new(0),
            disabled: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
        }
    }

    fn enter(&'static self) -> Option<InCallback> {
        // Counted before the check, and the switch is set before the count is read:
        // either the callback sees the switch, or `disable` sees it run.
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.disabled.load(Ordering::SeqCst) {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        Some(InCallback {
            gate: self,
            _this_thread: PhantomData,
        })
    }

    /// Closes the gate, then waits up to `timeout` for the callbacks running on other
    /// threads; false when some still ran at the limit.
    fn disable(&self, timeout: Duration) -> bool {
        self.disabled.store(true, Ordering::SeqCst);
        let own = CALLBACK_DEPTH.with(Cell::get);
        self.waiting.fetch_add(own, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        // The count of running callbacks is read before the waiters': a waiter that
        // leaves in between is then still counted as running, never the other way.
        let done = loop {
            let running = self.running.load(Ordering::SeqCst);
            if running <= self.waiting.load(Ordering::SeqCst) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.waiting.fetch_sub(own, Ordering::SeqCst);
        done
    }
}

/// Marks the current thread as running a user callback for the guard's lifetime (it
/// stays on the thread that entered).
pub(crate) struct InCallback {
    gate: &'static Gate,
    _this_thread: PhantomData<*const ()>,
}

impl InCallback {
    /// Enters a callback on this thread; `None` once callbacks are disabled (the
    /// caller then skips the call).
    pub(crate) fn enter() -> Option<InCallback> {
        GATE.enter()
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        let depth = CALLBACK_DEPTH.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        self.gate.running.fetch_sub(1, Ordering::SeqCst);
        if depth == 0 {
            let jobs = AFTER_CALLBACKS.with(|jobs| jobs.replace(std::ptr::null_mut()));
            if !jobs.is_null() {
                // SAFETY: allocated by `after_callback` on this thread, taken out above.
                for job in *unsafe { Box::from_raw(jobs) } {
                    guard_job("work deferred until a callback returned", job);
                }
            }
        }
    }
}

/// Runs `f` on this thread once its outermost callback has returned (the callback
/// calling this may still use what `f` releases); at once outside callbacks.
pub(crate) fn after_callback(f: impl FnOnce() + 'static) {
    if in_callback() {
        AFTER_CALLBACKS.with(|jobs| {
            if jobs.get().is_null() {
                jobs.set(Box::into_raw(Box::default()));
            }
            // SAFETY: allocated above or earlier on this thread, freed only by the
            // outermost callback's end on this thread.
            unsafe { (*jobs.get()).push(Box::new(f)) };
        });
    } else {
        f();
    }
}

/// In a new `fork()` child, on the thread that forked (the child's only thread): the
/// callbacks that ran on the parent's other threads are gone, so only this thread's
/// count. Touches only atomics and this thread's own depth.
pub(crate) fn forget_other_threads() {
    let own = CALLBACK_DEPTH.with(Cell::get);
    GATE.running.store(own, Ordering::SeqCst);
    GATE.waiting.store(0, Ordering::SeqCst);
}

/// True while this thread is inside a user callback called by the library.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// Stops every callback of the library for good, in the whole process: no event,
/// completion, user data finalizer, credential or log callback is called after this
/// returns (a credential request then fails, so a connection attempt fails; every
/// other call is skipped). Returns once the callbacks running on other threads have
/// returned, or after `timeout_ms` with `WPS_STATUS_TIMEOUT` (the switch is set even
/// then). Called from inside callbacks, it does not wait for the callbacks of the
/// threads that call it too. Meant for a language runtime that cannot take calls while
/// it shuts down, such as Python at interpreter exit: a library thread entering it then
/// would be stopped in the middle of the library. Blocking calls still return.
#[no_mangle]
pub extern "C" fn wps_callbacks_disable(timeout_ms: u32) -> wps_status {
    guard(|| {
        if GATE.disable(Duration::from_millis(timeout_ms.into())) {
            Ok(())
        } else {
            Err(fail(
                WPS_STATUS_TIMEOUT,
                "callbacks are disabled, but some still ran when the timeout expired",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Barrier};

    fn gate() -> &'static Gate {
        Box::leak(Box::new(Gate::new()))
    }

    #[test]
    fn a_callback_on_another_thread_is_waited_for() {
        let gate = gate();
        let (entered_tx, entered) = mpsc::channel();
        let (leave_tx, leave) = mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _inside = gate.enter().unwrap();
            entered_tx.send(()).unwrap();
            leave.recv().unwrap();
        });
        entered.recv().unwrap();
        assert!(!gate.disable(Duration::from_millis(20)), "still running");
        assert!(gate.enter().is_none(), "closed even after a timeout");
        leave_tx.send(()).unwrap();
        assert!(gate.disable(Duration::from_secs(30)));
        other.join().unwrap();
        assert_eq!(gate.running.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn deferred_work_runs_once_the_outermost_callback_returned() {
        let gate = gate();
        let ran = std::rc::Rc::new(Cell::new(0));
        let count = |ran: &std::rc::Rc<Cell<i32>>| {
            let ran = ran.clone();
            move || ran.set(ran.get() + 1)
        };
        after_callback(count(&ran));
        assert_eq!(ran.get(), 1, "outside callbacks: at once");
        let outer = gate.enter().unwrap();
        let inner = gate.enter().unwrap();
        after_callback(count(&ran));
        drop(inner);
        assert_eq!(ran.get(), 1, "still inside the outer callback");
        drop(outer);
        assert_eq!(ran.get(), 2);
        assert!(!in_callback());
    }

    #[test]
    fn callbacks_disabling_at_once_do_not_wait_for_each_other() {
        let gate = gate();
        let meet = std::sync::Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let meet = meet.clone();
                std::thread::spawn(move || {
                    let _inside = gate.enter().unwrap();
                    let _nested = gate.enter().unwrap();
                    meet.wait();
                    gate.disable(Duration::from_secs(30))
                })
            })
            .collect();
        for thread in threads {
            assert!(
                thread.join().unwrap(),
                "a disabling callback waited out its timeout"
            );
        }
        assert_eq!(gate.running.load(Ordering::SeqCst), 0);
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }
}
