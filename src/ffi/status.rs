//! Status codes, their names, the thread-local last error and the enum-like constants.

use std::cell::Cell;
use std::ffi::{c_char, CString};

/// Result code of every fallible call. The numbers are stable.
pub type wps_status = u32;

/// Success.
pub const WPS_STATUS_OK: wps_status = 0;
/// A required pointer argument was NULL.
pub const WPS_STATUS_NULL_ARG: wps_status = 1;
/// A string argument was not valid UTF-8.
pub const WPS_STATUS_INVALID_UTF8: wps_status = 2;
/// An argument was out of range or malformed.
pub const WPS_STATUS_INVALID_ARGUMENT: wps_status = 3;
/// The call is not valid in the client's current state (not started, already started...).
pub const WPS_STATUS_ILLEGAL_STATE: wps_status = 4;
/// The client has no connection, lost it before the operation's ack, or is recovering it
/// with as many operations queued as it takes (see `WPS_STATE_RECOVERING`).
pub const WPS_STATUS_NOT_CONNECTED: wps_status = 5;
/// The operation timed out.
pub const WPS_STATUS_TIMEOUT: wps_status = 6;
/// The operation was cancelled (`wps_client_cancel`).
pub const WPS_STATUS_CANCELLED: wps_status = 7;
/// The service answered success:false; `wps_last_error_name()` has its error name and
/// `wps_last_error_service_message()` its text.
pub const WPS_STATUS_ACK_ERROR: wps_status = 8;
/// The invocation failed; `wps_last_error_name()` has its error name and
/// `wps_last_error_service_message()` its text.
pub const WPS_STATUS_INVOKE_ERROR: wps_status = 9;
/// Connecting failed (transport, handshake, HTTP 401...). For an HTTP refusal,
/// `wps_last_error_message()` has its status and the start of the server's text.
pub const WPS_STATUS_CONNECT_FAILED: wps_status = 10;
/// The credential callback reported an error.
pub const WPS_STATUS_CREDENTIAL_FAILED: wps_status = 11;
/// A TLS error.
pub const WPS_STATUS_TLS: wps_status = 12;
/// The client was stopped or freed while the operation was pending.
pub const WPS_STATUS_STOPPED: wps_status = 13;
/// A bug inside the library was caught at the API boundary, or ended a client's
/// connection task (its stopped event).
pub const WPS_STATUS_PANIC: wps_status = 14;
/// The client (or the library's runtime) was created before a fork(): unusable in the child.
pub const WPS_STATUS_FORKED: wps_status = 15;
/// The interrupt check (`wps_set_interrupt_check`, or the calling thread's own,
/// `wps_set_thread_interrupt_check`) ended the wait of a blocking call.
pub const WPS_STATUS_INTERRUPTED: wps_status = 16;
/// Any other internal error.
pub const WPS_STATUS_INTERNAL: wps_status = 99;

/// Data type: UTF-8 text. Received text whose JSON escapes hold a lone surrogate (which
/// UTF-8 cannot carry) comes with U+FFFD in its place, as do such names and ids.
pub const WPS_DATA_TYPE_TEXT: u32 = 0;
/// Data type: a JSON value in its serialized (UTF-8) form.
pub const WPS_DATA_TYPE_JSON: u32 = 1;
/// Data type: raw bytes.
pub const WPS_DATA_TYPE_BINARY: u32 = 2;
/// Data type: protobuf bytes.
pub const WPS_DATA_TYPE_PROTOBUF: u32 = 3;

/// Subprotocol `json.reliable.webpubsub.azure.v1` (the default).
pub const WPS_PROTOCOL_JSON_RELIABLE: u32 = 0;
/// Subprotocol `json.webpubsub.azure.v1`.
pub const WPS_PROTOCOL_JSON: u32 = 1;

/// Retry with a fixed delay.
pub const WPS_RETRY_FIXED: u32 = 0;
/// Retry with a delay doubling each attempt, capped at the maximum delay.
pub const WPS_RETRY_EXPONENTIAL: u32 = 1;

/// Client state: stopped (initial and final state).
pub const WPS_STATE_STOPPED: u32 = 0;
/// Client state: connecting: from the moment a start is handed to a stopped client, or
/// reconnecting. A start handed over behind a stop still in progress
/// (`wps_client_stop_async`) is taken once that stop is done: the state goes through
/// `WPS_STATE_DISCONNECTED` (if connected) and `WPS_STATE_STOPPED` first.
pub const WPS_STATE_CONNECTING: u32 = 1;
/// Client state: connected.
pub const WPS_STATE_CONNECTED: u32 = 2;
/// Client state: recovering the same connection after a drop. Operations queue for the
/// recovered connection; once 16,384 are queued (or 16 MiB of fire-and-forget
/// messages, or 999 acked ones are pending), new ones fail at once with
/// `WPS_STATUS_NOT_CONNECTED` instead of waiting for the recovery.
pub const WPS_STATE_RECOVERING: u32 = 3;
/// Client state: disconnected, reconnecting if enabled.
pub const WPS_STATE_DISCONNECTED: u32 = 4;

/// Send flag: do not echo a group message back to the sender.
pub const WPS_SEND_NO_ECHO: u32 = 1;
/// Send flag: send without an ackId; the call completes once the frame is queued for the
/// connection, not once it is written (the official JavaScript and Python clients
/// complete once it is written to the socket); with `WPS_SEND_DEFERRED`, once deferred,
/// before the flush sends it. While the connection recovers it waits queued, and it is
/// dropped if the session is lost or the client is stopped first.
pub const WPS_SEND_FIRE_AND_FORGET: u32 = 2;
/// Send flag (asynchronous forms only): queue the message without waking the client's
/// connection task. It is sent at the next `wps_client_flush_deferred`, or with the
/// next operation started without this flag. A stop or free of the client hands it
/// over too, as `wps_client_stop` says: a fire-and-forget one is written before the
/// close frame, an acked one may fail with `WPS_STATUS_STOPPED`, written or not. An acked
/// message completes once acked; a fire-and-forget one at once (see
/// `WPS_SEND_FIRE_AND_FORGET`). An event loop starting many messages per iteration
/// saves a wake-up (a system call) per message.
pub const WPS_SEND_DEFERRED: u32 = 4;
/// Send flag (asynchronous forms only): in poll mode, a successful completion is
/// written as a `wps_ack_record` by `wps_client_dispatch_records` instead of calling
/// the callback (a failure still calls it). For bindings where a foreign callback costs
/// more than the work it does. Any other dispatch calls the callback as usual.
pub const WPS_SEND_RECORD: u32 = 8;

/// Dispatch mode (default): callbacks run on a library-owned dispatcher thread.
pub const WPS_DISPATCH_THREAD: u32 = 0;
/// Dispatch mode: event and completion callbacks run on the application's thread, in
/// `wps_client_dispatch`, when `wps_client_dispatch_fd` is readable (for event loops:
/// epoll, libuv, asyncio). Not the credential callback, which runs on a library thread
/// in either mode, nor what is left at `wps_client_free` (see there).
pub const WPS_DISPATCH_POLL: u32 = 1;

/// Log level: errors.
pub const WPS_LOG_ERROR: u32 = 1;
/// Log level: warnings.
pub const WPS_LOG_WARN: u32 = 2;
/// Log level: information.
pub const WPS_LOG_INFO: u32 = 3;
/// Log level: debugging detail.
pub const WPS_LOG_DEBUG: u32 = 4;
/// Log level: everything.
pub const WPS_LOG_TRACE: u32 = 5;

#[derive(Default)]
struct LastError {
    message: CString,
    name: CString,
    service_message: CString,
}

thread_local! {
    /// This thread's last error, allocated on first use: a pointer without a destructor,
    /// so that it stays usable while the thread exits (an `atexit` handler or a C++ or
    /// pthread key destructor may call the library after Rust's thread-locals are gone).
    /// `OWNER` frees it with those; one allocated after that is never freed.
    static LAST_ERROR: Cell<*mut LastError> = const { Cell::new(std::ptr::null_mut()) };
    static OWNER: Owner = const { Owner };
}

/// Frees this thread's last error when its thread-locals are destroyed.
struct Owner;

impl Drop for Owner {
    fn drop(&mut self) {
        let last = LAST_ERROR.with(|p| p.replace(std::ptr::null_mut()));
        if !last.is_null() {
            // SAFETY: allocated by `with_last_error` on this thread, and no longer in it.
            drop(unsafe { Box::from_raw(last) });
        }
    }
}

/// Runs `f` with this thread's last error (no library call runs inside `f`).
fn with_last_error<R>(f: impl FnOnce(&mut LastError) -> R) -> R {
    LAST_ERROR.with(|p| {
        if p.get().is_null() {
            p.set(Box::into_raw(Box::default()));
            let _ = OWNER.try_with(|_| ());
        }
        // SAFETY: allocated above or earlier on this thread, only freed by `Owner` on
        // this thread, and never borrowed twice (`f` calls nothing that borrows it).
        f(unsafe { &mut *p.get() })
    })
}

/// Converts text (a message, a reason, a log record) to a C string. A C string cannot
/// hold U+0000, so each one is written as the six characters `\u0000` (as JSON writes
/// it) rather than dropped or ending the text early. One allocation, sized for the
/// terminator.
pub(crate) fn to_cstring(s: &str) -> CString {
    if s.contains('\0') {
        return CString::new(s.replace('\0', "\\u0000")).expect("no NUL left");
    }
    let mut bytes = Vec::with_capacity(s.len() + 1);
    bytes.extend_from_slice(s.as_bytes());
    CString::new(bytes).expect("no NUL")
}

/// Records the detail of a failure on this thread and returns `status`.
pub(crate) fn fail(status: wps_status, message: impl AsRef<str>) -> wps_status {
    set_last_error(message.as_ref(), "", "");
    status
}

/// Sets this thread's last error message, and the service's error name and own text.
pub(crate) fn set_last_error(message: &str, name: &str, service_message: &str) {
    with_last_error(|e| {
        e.message = to_cstring(message);
        e.name = to_cstring(name);
        e.service_message = to_cstring(service_message);
    });
}

/// Clears this thread's last error (every status-returning call starts with this).
pub(crate) fn clear_last_error() {
    if LAST_ERROR.with(|p| p.get().is_null()) {
        return;
    }
    with_last_error(|e| {
        if !e.message.is_empty() || !e.name.is_empty() || !e.service_message.is_empty() {
            e.message = CString::default();
            e.name = CString::default();
            e.service_message = CString::default();
        }
    });
}

/// Returns a static, NUL-terminated description of a status code; never NULL.
#[no_mangle]
pub extern "C" fn wps_status_str(status: wps_status) -> *const c_char {
    let s: &'static [u8] = match status {
        WPS_STATUS_OK => b"ok\0",
        WPS_STATUS_NULL_ARG => b"null argument\0",
        WPS_STATUS_INVALID_UTF8 => b"invalid UTF-8\0",
        WPS_STATUS_INVALID_ARGUMENT => b"invalid argument\0",
        WPS_STATUS_ILLEGAL_STATE => b"illegal state\0",
        WPS_STATUS_NOT_CONNECTED => b"not connected\0",
        WPS_STATUS_TIMEOUT => b"timeout\0",
        WPS_STATUS_CANCELLED => b"cancelled\0",
        WPS_STATUS_ACK_ERROR => b"ack error\0",
        WPS_STATUS_INVOKE_ERROR => b"invoke error\0",
        WPS_STATUS_CONNECT_FAILED => b"connect failed\0",
        WPS_STATUS_CREDENTIAL_FAILED => b"credential failed\0",
        WPS_STATUS_TLS => b"TLS error\0",
        WPS_STATUS_STOPPED => b"stopped\0",
        WPS_STATUS_PANIC => b"panic\0",
        WPS_STATUS_FORKED => b"used in a fork() child\0",
        WPS_STATUS_INTERRUPTED => b"interrupted\0",
        WPS_STATUS_INTERNAL => b"internal error\0",
        _ => b"unknown status\0",
    };
    s.as_ptr().cast()
}

/// The detail message of this thread's last call that returned a `wps_status`: "" when
/// it returned `WPS_STATUS_OK`, whatever the callbacks it ran on this thread (poll mode)
/// met. The calls returning no status leave it as it is.
/// Like every text the library writes as a C string, a U+0000 in it (from the service's
/// text) is written as the six characters `\u0000`.
///
/// Valid until the next call on this thread that returns a `wps_status` (the three
/// `wps_last_error_*` texts, `wps_status_str` and the other calls returning no status
/// leave it, but for an internal panic in one, recorded here: one `printf` may take
/// them all); never NULL.
#[no_mangle]
pub extern "C" fn wps_last_error_message() -> *const c_char {
    with_last_error(|e| e.message.as_ptr())
}

/// The service's error name ("Forbidden") of the last ACK or INVOKE error on this
/// thread, "" otherwise. Valid as `wps_last_error_message()`; never NULL.
#[no_mangle]
pub extern "C" fn wps_last_error_name() -> *const c_char {
    with_last_error(|e| e.name.as_ptr())
}

/// The service's own text of the last ACK or INVOKE error on this thread ("No
/// permission to join group"), "" otherwise. `wps_last_error_message()` has it too,
/// after the library's description of the operation. Valid as
/// `wps_last_error_message()`; never NULL.
#[no_mangle]
pub extern "C" fn wps_last_error_service_message() -> *const c_char {
    with_last_error(|e| e.service_message.as_ptr())
}

/// The library's version, a static string like "0.1.0".
#[no_mangle]
pub extern "C" fn wps_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn text(p: *const c_char) -> String {
        unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned()
    }

    #[test]
    fn every_status_has_a_name_and_unknown_is_not_null() {
        for s in 0..=16 {
            assert_ne!(text(wps_status_str(s)), "unknown status", "{s}");
        }
        assert_eq!(text(wps_status_str(99)), "internal error");
        assert_eq!(text(wps_status_str(12345)), "unknown status");
    }

    #[test]
    fn last_error_is_per_thread_and_cleared() {
        fail(WPS_STATUS_INVALID_ARGUMENT, "bad\0thing\0");
        assert_eq!(text(wps_last_error_message()), "bad\\u0000thing\\u0000");
        std::thread::spawn(|| assert_eq!(text(wps_last_error_message()), ""))
            .join()
            .unwrap();
        clear_last_error();
        assert_eq!(text(wps_last_error_message()), "");
        assert_eq!(text(wps_last_error_name()), "");
        set_last_error("operation 1 failed: Forbidden: no", "Forbidden", "no");
        assert_eq!(text(wps_last_error_service_message()), "no");
        clear_last_error();
        assert_eq!(text(wps_last_error_service_message()), "");
    }
}
