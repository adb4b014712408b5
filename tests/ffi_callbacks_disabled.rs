//! `wps_callbacks_disable` against the emulator: it waits for the callbacks running on
//! other threads (up to its timeout), and after it no callback of any kind is called
//! while blocking calls still work, and a deferred credential request is still answered.
//! The switch is process-wide and for good, so this is a test binary of its own, with
//! one test.

mod common;

use common::{check, ffi_credential_client};

use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use webpubsub_client::ffi::callbacks::{wps_completion, wps_event, WPS_EVENT_GROUP_MESSAGE};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_join_group, wps_client_send_to_group_async,
    wps_client_start,
};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_defer, wps_credential_result_set_url,
};
use webpubsub_client::ffi::gate::wps_callbacks_disable;
use webpubsub_client::ffi::status::{WPS_DATA_TYPE_TEXT, WPS_STATUS_OK, WPS_STATUS_TIMEOUT};
use webpubsub_emulator::{Config, Emulator};

/// What the callbacks saw.
#[derive(Default)]
struct Calls {
    messages: AtomicUsize,
    slow_started: AtomicUsize,
    slow_finished: AtomicUsize,
    completions: AtomicUsize,
    freed: AtomicUsize,
}

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let calls = &*(user_data as *const Calls);
    let event = &*event;
    if event.kind != WPS_EVENT_GROUP_MESSAGE {
        return;
    }
    calls.messages.fetch_add(1, Ordering::SeqCst);
    if std::slice::from_raw_parts(event.data, event.data_len) == b"slow" {
        calls.slow_started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(400));
        calls.slow_finished.fetch_add(1, Ordering::SeqCst);
    }
}

unsafe extern "C" fn on_complete(user_data: *mut c_void, _done: *const wps_completion) {
    let calls = &*(user_data as *const Calls);
    calls.completions.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn on_free(user_data: *mut c_void) {
    let calls = &*(user_data as *const Calls);
    calls.freed.fetch_add(1, Ordering::SeqCst);
}

/// The token of the deferred credential request.
static DEFERRED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn defer(_user_data: *mut c_void, result: *mut wps_credential_result) {
    check(wps_credential_result_defer(result), "defer");
    DEFERRED.store(result as usize, Ordering::SeqCst);
}

fn send(c: *mut wps_client, group: &CStr, text: &str) {
    check(common::ffi_send_text(c, group, text, 0), "a blocking send");
}

#[test]
fn disabled_callbacks_are_waited_for_then_never_called_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap();
    let calls = Calls::default();
    let user_data = &calls as *const Calls as *mut c_void;
    let c = common::ffi_client(&url, Some(on_event), user_data, Some(on_free));
    check(unsafe { wps_client_start(c) }, "start");
    let group = c"gate";
    check(
        unsafe { wps_client_join_group(c, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );

    // A credential request deferred before the switch is answered after it.
    let deferring = ffi_credential_client(defer, user_data, Some(on_free), std::ptr::null());
    let (started, start) = mpsc::channel();
    let client = deferring as usize;
    std::thread::spawn(move || {
        let _ = started.send(unsafe { wps_client_start(client as *mut wps_client) });
    });
    common::wait_until("the deferred request", || {
        DEFERRED.load(Ordering::SeqCst) != 0
    });

    // A callback that is still running when the switch is set: a short timeout says so,
    // a long one returns once it has.
    send(c, group, "slow");
    common::wait_until("the slow callback", || {
        calls.slow_started.load(Ordering::SeqCst) == 1
    });
    assert_eq!(wps_callbacks_disable(20), WPS_STATUS_TIMEOUT);
    check(wps_callbacks_disable(10_000), "disable");
    assert_eq!(calls.slow_finished.load(Ordering::SeqCst), 1);

    let token = DEFERRED.load(Ordering::SeqCst) as *mut wps_credential_result;
    check(
        unsafe { wps_credential_result_set_url(token, url.as_ptr()) },
        "a deferred answer",
    );
    assert_eq!(
        start.recv_timeout(Duration::from_secs(30)),
        Ok(WPS_STATUS_OK)
    );
    unsafe { wps_client_free(deferring) };

    // Blocking calls still work; no event, completion or finalizer is called any more.
    send(c, group, "after");
    let mut op = 0;
    let status = unsafe {
        wps_client_send_to_group_async(
            c,
            group.as_ptr(),
            WPS_DATA_TYPE_TEXT,
            "async".as_ptr(),
            5,
            0,
            Some(on_complete),
            user_data,
            &mut op,
        )
    };
    check(status, "an asynchronous send");
    std::thread::sleep(Duration::from_millis(300));
    unsafe { wps_client_free(c) };
    assert_eq!(
        calls.messages.load(Ordering::SeqCst),
        1,
        "only the slow message"
    );
    assert_eq!(calls.completions.load(Ordering::SeqCst), 0);
    assert_eq!(calls.freed.load(Ordering::SeqCst), 0);
    rt.block_on(emulator.shutdown());
}
