//! The interrupt check of blocking calls: one process-wide function that a blocking
//! call waiting for the service asks, every interval, whether to stop waiting (a
//! Ctrl-C, a shutdown flag). A thread may have a check of its own in its place. Without
//! one, blocking calls wait with no timer at all.

use std::cell::Cell;
use std::ffi::c_int;
use std::future::Future;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvError, RecvTimeoutError};
use std::time::Duration;

use tokio::runtime::Handle;

use super::gate::InCallback;
use super::panic::guard;
use super::park;
use super::status::{fail, wps_status, WPS_STATUS_INVALID_ARGUMENT};

/// Interrupt check: returns non-zero to end the wait of the blocking call that asks.
/// Runs on that call's thread, with none of the library's locks held.
pub type wps_interrupt_cb = Option<unsafe extern "C" fn() -> c_int>;

#[derive(Clone, Copy)]
struct Check {
    cb: unsafe extern "C" fn() -> c_int,
    interval: Duration,
}

impl Check {
    /// Asks the application; never once callbacks are disabled.
    fn interrupted(&self) -> bool {
        match InCallback::enter() {
            Some(_inside) => {
                let _checking = Checking::enter();
                // SAFETY: the caller of `wps_set_interrupt_check` declared it callable
                // from any thread that makes a blocking call, and the caller of
                // `wps_set_thread_interrupt_check` from its own.
                unsafe { (self.cb)() != 0 }
            }
            None => false,
        }
    }
}

thread_local! {
    /// This thread's own check (`wps_set_thread_interrupt_check`), taking the place of
    /// the process-wide one. No destructor: usable while the thread exits.
    static THREAD_CHECK: Cell<Option<Check>> = const { Cell::new(None) };
    /// A check runs on this thread: a blocking call made from inside it (a signal
    /// handler's) waits unchecked, so that no check is ever re-entered.
    static CHECKING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as running a check until dropped.
struct Checking {
    outer: bool,
}

impl Checking {
    fn enter() -> Checking {
        Checking {
            outer: CHECKING.with(|c| c.replace(true)),
        }
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        CHECKING.with(|c| c.set(self.outer));
    }
}

/// The check's function (NULL: none) and interval. Atomics rather than a lock: a
/// fork() child may set them while a thread of its parent was reading them at the fork,
/// and no thread of the child would ever release a lock that thread held. A waiter may
/// read a new function with the previous interval (and calls racing each other may
/// leave one's function with the other's interval), which only shifts its checks.
static CHECK_FN: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static CHECK_INTERVAL_MS: AtomicU32 = AtomicU32::new(0);

/// The check in force for a wait starting on this thread.
fn current() -> Option<Check> {
    if CHECKING.with(Cell::get) {
        return None;
    }
    if let Some(own) = THREAD_CHECK.with(Cell::get) {
        return Some(own);
    }
    let f = CHECK_FN.load(Ordering::Acquire);
    if f.is_null() {
        return None;
    }
    // SAFETY: stored by `wps_set_interrupt_check` from a function of this type.
    let cb = unsafe { std::mem::transmute::<*mut (), unsafe extern "C" fn() -> c_int>(f) };
    // Stored before the function: at least as new as it.
    let interval = Duration::from_millis(CHECK_INTERVAL_MS.load(Ordering::Acquire).into());
    Some(Check { cb, interval })
}

/// Sets the interrupt check of blocking calls, for the whole process. While
/// `wps_client_start`, `wps_client_join_group`, `wps_client_leave_group`,
/// `wps_client_send_to_group`, `wps_client_send_event` (and their `_with_ack_id`
/// forms) or `wps_client_invoke_event` waits, `cb` is called on the waiting thread
/// every `interval_ms` (above 0); once it returns non-zero, the call returns
/// `WPS_STATUS_INTERRUPTED`. The operation is then given up as by `wps_client_cancel`:
/// not written if it was not yet, not retried, its ack ignored (its ackId is still in
/// `out`: a resend with it, `_with_ack_id`, waits for the same operation if it is still
/// pending, and its `out` has the ackId the operation went out under, which in rare
/// cases differs); an invocation is cancelled at the service. An interrupted start goes on
/// (`wps_client_stop` ends it). `wps_client_stop` asks the check as well, but is never
/// ended by it: it returns once stopped, and what the check does on the way (running a
/// language runtime's signal handlers) does not wait for the closing handshake.
/// `wps_client_free` neither asks it nor is interrupted. NULL `cb` removes the check; a
/// wait already running keeps the check it started with. Not called once callbacks are
/// disabled (`wps_callbacks_disable`), nor from inside itself: a blocking call the check
/// makes waits unchecked. A thread with a check of its own
/// (`wps_set_thread_interrupt_check`) asks that one instead.
#[no_mangle]
pub extern "C" fn wps_set_interrupt_check(cb: wps_interrupt_cb, interval_ms: u32) -> wps_status {
    guard(|| {
        match check_of(cb, interval_ms)? {
            Some(check) => {
                CHECK_INTERVAL_MS.store(interval_ms, Ordering::Release);
                CHECK_FN.store(check.cb as *mut (), Ordering::Release);
            }
            None => CHECK_FN.store(std::ptr::null_mut(), Ordering::Release),
        }
        Ok(())
    })
}

/// Sets the interrupt check of the blocking calls made on the calling thread, in place
/// of the process-wide one (`wps_set_interrupt_check`), with the same rules; called on
/// this thread only. For a check that only one thread can answer, such as Python's
/// signal handlers, which run on its main thread. NULL `cb` removes it: the
/// process-wide check applies again. A child of `fork()` keeps the forking thread's.
#[no_mangle]
pub extern "C" fn wps_set_thread_interrupt_check(
    cb: wps_interrupt_cb,
    interval_ms: u32,
) -> wps_status {
    guard(|| {
        let own = check_of(cb, interval_ms)?;
        THREAD_CHECK.with(|c| c.set(own));
        Ok(())
    })
}

/// The check that `cb` and `interval_ms` set (None: removed), or why there is none.
fn check_of(cb: wps_interrupt_cb, interval_ms: u32) -> Result<Option<Check>, wps_status> {
    match cb {
        Some(_) if interval_ms == 0 => Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            "`interval_ms` must be above 0",
        )),
        Some(cb) => Ok(Some(Check {
            cb,
            interval: Duration::from_millis(interval_ms.into()),
        })),
        None => Ok(None),
    }
}

/// The interrupt check ended the wait.
pub(crate) struct Interrupted;

/// Waits on this thread for what `rx` receives (the output of a future spawned on the
/// runtime: a blocking call made on a thread of the runtime, such as a credential
/// callback's), asking the check every interval; the caller gives the future up when
/// the check says so.
pub(crate) fn recv<T>(rx: &Receiver<T>) -> Result<Result<T, RecvError>, Interrupted> {
    let Some(check) = current() else {
        return Ok(rx.recv());
    };
    loop {
        match rx.recv_timeout(check.interval) {
            Ok(output) => return Ok(Ok(output)),
            Err(RecvTimeoutError::Disconnected) => return Ok(Err(RecvError)),
            Err(RecvTimeoutError::Timeout) if check.interrupted() => return Err(Interrupted),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Runs `fut` to completion on this thread, driven by the runtime's I/O and timers
/// (this thread only polls it: see `park`). With an interrupt check set, it is asked
/// every interval, and the future is dropped once it says so.
pub(crate) fn block_on<F: Future>(rt: &Handle, fut: F) -> Result<F::Output, Interrupted> {
    let check = current();
    let interrupted = || check.is_some_and(|c| c.interrupted());
    let check = check.map(|c| (c.interval, &interrupted as &dyn Fn() -> bool));
    park::block_on(rt, fut, check).ok_or(Interrupted)
}

/// As `block_on`, for a wait the check does not end (a stop): the check is still asked
/// every interval, so that what it does on the way (a language runtime's signal
/// handlers) is not held up by the wait; what it answers is left to its owner.
pub(crate) fn block_on_asking<F: Future>(rt: &Handle, fut: F) -> Option<F::Output> {
    let check = current();
    let ask = || {
        if let Some(c) = check {
            c.interrupted();
        }
        false
    };
    park::block_on(
        rt,
        fut,
        check.map(|c| (c.interval, &ask as &dyn Fn() -> bool)),
    )
}

/// As `recv`, for a wait the check does not end (see `block_on_asking`).
pub(crate) fn recv_asking<T>(rx: &Receiver<T>) -> Result<T, RecvError> {
    let Some(check) = current() else {
        return rx.recv();
    };
    loop {
        match rx.recv_timeout(check.interval) {
            Ok(output) => return Ok(output),
            Err(RecvTimeoutError::Disconnected) => return Err(RecvError),
            Err(RecvTimeoutError::Timeout) => {
                check.interrupted();
            }
        }
    }
}
