//! Which foreign callbacks may run: every call into the application (events,
//! completions, user data finalizers, credential providers, the log callback) passes
//! through `InCallback::enter`, which marks the thread as inside a callback and
//! counts the callbacks running. `wps_callbacks_disable` closes the gate for good.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::panic::guard;
use super::status::{fail, wps_status, WPS_STATUS_TIMEOUT};

thread_local! {
    static CALLBACK_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Callbacks running now, on every thread.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Set by `wps_callbacks_disable`: no callback starts any more.
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Marks the current thread as running a user callback for the guard's lifetime.
pub(crate) struct InCallback(());

impl InCallback {
    /// Enters a callback on this thread; `None` once callbacks are disabled (the
    /// caller then skips the call).
    pub(crate) fn enter() -> Option<InCallback> {
        // Counted before the check, and the switch is set before the count is read:
        // either the callback sees the switch, or `wps_callbacks_disable` sees it run.
        RUNNING.fetch_add(1, Ordering::SeqCst);
        if DISABLED.load(Ordering::SeqCst) {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        Some(InCallback(()))
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
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
/// then). Meant for a language runtime that cannot take calls while it shuts down, such
/// as Python at interpreter exit: a library thread entering it then would be stopped
/// in the middle of the library. Blocking calls still return.
#[no_mangle]
pub extern "C" fn wps_callbacks_disable(timeout_ms: u32) -> wps_status {
    guard(|| {
        DISABLED.store(true, Ordering::SeqCst);
        let own = CALLBACK_DEPTH.with(Cell::get); // from inside a callback: not waited for
        let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
        while RUNNING.load(Ordering::SeqCst) > own {
            if Instant::now() >= deadline {
                return Err(fail(
                    WPS_STATUS_TIMEOUT,
                    "callbacks are disabled, but some still ran when the timeout expired",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}
