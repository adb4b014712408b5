//! The panic boundary: no Rust panic ever unwinds into C.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::status::{clear_last_error, fail, wps_status, WPS_STATUS_OK, WPS_STATUS_PANIC};

/// Result type of an export's body: `Err` carries a status whose detail is already set.
pub(crate) type FfiResult<T = ()> = Result<T, wps_status>;

fn panic_message(payload: &(dyn Any + Send)) -> String {
    format!("internal panic: {}", crate::runtime::panic_detail(payload))
}

/// Runs the body of a status-returning export: clears the last error, maps `Ok` to
/// `WPS_STATUS_OK` and a panic to `WPS_STATUS_PANIC`. Cleared again on success: the
/// callbacks a call ran on this thread (a poll-mode dispatch) may have failed calls.
pub(crate) fn guard(body: impl FnOnce() -> FfiResult) -> wps_status {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last_error();
            WPS_STATUS_OK
        }
        Ok(Err(status)) => status,
        Err(payload) => fail(WPS_STATUS_PANIC, panic_message(payload.as_ref())),
    }
}

/// Runs the body of an export that returns a value; a panic yields `on_panic`.
pub(crate) fn guard_value<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            fail(WPS_STATUS_PANIC, panic_message(payload.as_ref()));
            on_panic
        }
    }
}

/// Runs library code that calls into C from a library thread (a callback job);
/// a panic is logged instead of killing the thread.
pub(crate) fn guard_job(what: &str, body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        log::error!("{what}: {}", panic_message(payload.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::status::{wps_last_error_message, WPS_STATUS_TIMEOUT};
    use std::ffi::CStr;

    #[test]
    fn a_panic_becomes_the_panic_status_with_a_message() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, WPS_STATUS_PANIC);
        let msg = unsafe { CStr::from_ptr(wps_last_error_message()) };
        assert_eq!(msg.to_str().unwrap(), "internal panic: boom");
        assert_eq!(guard(|| Err(WPS_STATUS_TIMEOUT)), WPS_STATUS_TIMEOUT);
        assert_eq!(guard(|| Ok(())), WPS_STATUS_OK);
        assert_eq!(guard_value(7u32, || panic!("{}", 1)), 7);
        guard_job("test", || panic!("ignored"));
    }
}
