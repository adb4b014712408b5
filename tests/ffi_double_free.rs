//! The header (`wps_client_free`): a second free of a handle, outside a finalizer, is
//! detected and ignored (an error is logged) as long as no new client got the same
//! address. A test binary of its own: no other test creates a client meanwhile, and
//! the log callback is process-wide.

mod common;

use common::{check, ffi_client, ffi_emulator};

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_CONNECTED};
use webpubsub_client::ffi::client::{wps_client_free, wps_client_start};
use webpubsub_client::ffi::status::WPS_LOG_ERROR;

type LogCallback = unsafe extern "C" fn(*mut c_void, u32, *const c_char, *const c_char);

extern "C" {
    /// The C API's `wps_set_log_callback` (exported by the library crate).
    fn wps_set_log_callback(cb: Option<LogCallback>, user_data: *mut c_void, max_level: u32)
        -> u32;
}

/// The error records the log callback got: (target, message).
static ERRORS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static CONNECTED: common::Watched<bool> = common::Watched {
    seen: Mutex::new(false),
    changed: std::sync::Condvar::new(),
};
static FINALIZED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn on_log(
    _user_data: *mut c_void,
    _level: u32,
    target: *const c_char,
    message: *const c_char,
) {
    let text = |s| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    ERRORS.lock().unwrap().push((text(target), text(message)));
}

unsafe extern "C" fn on_event(_user_data: *mut c_void, event: *const wps_event) {
    if (*event).kind == WPS_EVENT_CONNECTED {
        *CONNECTED.seen.lock().unwrap() = true;
        CONNECTED.changed.notify_all();
    }
}

unsafe extern "C" fn on_free(_user_data: *mut c_void) {
    FINALIZED.fetch_add(1, Ordering::SeqCst);
}

/// Sets `on_log` for errors. Once set again, the records logged before have reached it
/// (turning logging off instead would drop those still queued).
fn set_log_callback() {
    check(
        unsafe { wps_set_log_callback(Some(on_log), std::ptr::null_mut(), WPS_LOG_ERROR) },
        "wps_set_log_callback",
    );
}

#[test]
fn a_second_free_of_a_handle_is_ignored_and_logged() {
    let (rt, emulator, url) = ffi_emulator();
    set_log_callback();
    let c = ffi_client(&url, Some(on_event), std::ptr::null_mut(), Some(on_free));
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    CONNECTED.wait("the connected event", |connected| *connected);
    unsafe { wps_client_free(c) };
    assert_eq!(FINALIZED.load(Ordering::SeqCst), 1);
    set_log_callback();
    assert_eq!(*ERRORS.lock().unwrap(), [], "errors before the second free");

    unsafe { wps_client_free(c) };
    set_log_callback();
    assert_eq!(FINALIZED.load(Ordering::SeqCst), 1, "finalized twice");
    let errors = std::mem::take(&mut *ERRORS.lock().unwrap());
    let [(target, message)] = &errors[..] else {
        panic!("not one error record: {errors:?}");
    };
    assert_eq!(target, "webpubsub_client::ffi::client");
    assert!(
        message.contains(&format!("{c:p}")) && message.contains("not a live client"),
        "{message}"
    );
    rt.block_on(emulator.shutdown());
}
