//! `wps_set_interrupt_check` against the emulator: a blocking call waiting for an
//! upstream that never answers returns `WPS_STATUS_INTERRUPTED` once the check says
//! so, and blocking calls that complete are unaffected by it, also when the blocking
//! call is made inside a credential callback (a thread of the library's runtime). The
//! check is process-wide, so this is a test binary of its own, with one test.

mod common;

use common::check;

use std::ffi::{c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use webpubsub_client::ffi::client::{
    wps_ack_result, wps_client, wps_client_free, wps_client_invoke_event, wps_client_join_group,
    wps_client_new, wps_client_send_event, wps_client_start, wps_client_start_async,
};
use webpubsub_client::ffi::credential::{wps_credential_result, wps_credential_result_set_url};
use webpubsub_client::ffi::interrupt::wps_set_interrupt_check;
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_ack_timeout_ms,
    wps_options_set_message_retry,
};
use webpubsub_client::ffi::status::{
    WPS_DATA_TYPE_TEXT, WPS_RETRY_FIXED, WPS_STATUS_INTERRUPTED, WPS_STATUS_INVALID_ARGUMENT,
    WPS_STATUS_OK,
};

static INTERRUPT: AtomicBool = AtomicBool::new(false);
static ASKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn interrupt_check() -> c_int {
    ASKED.fetch_add(1, Ordering::SeqCst);
    INTERRUPT.load(Ordering::SeqCst).into()
}

/// Runs `call` with the interrupt set 200 ms into it; its status, after asserting
/// that it returned long before the 30 s it would otherwise wait.
fn interrupted(what: &str, call: impl FnOnce() -> u32) -> u32 {
    INTERRUPT.store(false, Ordering::SeqCst);
    let setter = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(200));
        INTERRUPT.store(true, Ordering::SeqCst);
    });
    let t0 = Instant::now();
    let status = call();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{what} waited {:?}",
        t0.elapsed()
    );
    setter.join().unwrap();
    INTERRUPT.store(false, Ordering::SeqCst);
    status
}

fn send_event(c: *mut wps_client, out: &mut wps_ack_result) -> u32 {
    unsafe {
        wps_client_send_event(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            "x".as_ptr(),
            1,
            0,
            out,
        )
    }
}

/// A credential callback that makes a blocking call on another client (one whose
/// upstream never answers) before answering; the call's status goes to `status`.
struct BlockingCredential {
    url: CString,
    other: AtomicPtr<wps_client>,
    status: mpsc::SyncSender<u32>,
}

unsafe extern "C" fn send_then_answer(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const BlockingCredential);
    let mut out = wps_ack_result {
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: false,
    };
    let _ = s
        .status
        .send(send_event(s.other.load(Ordering::SeqCst), &mut out));
    wps_credential_result_set_url(result, s.url.as_ptr());
}

/// The blocking call a credential callback makes (on a thread of the library's runtime,
/// where it is spawned and waited for instead of driven in place) is interrupted too.
fn a_blocking_call_inside_a_credential_callback_is_interrupted(url: &CString) {
    // Without the check, the send would end with WPS_STATUS_TIMEOUT after 5 s.
    let o = wps_options_new();
    check(wps_options_set_ack_timeout_ms(o, 5_000), "ack timeout");
    check(
        wps_options_set_message_retry(o, 0, 100, 100, WPS_RETRY_FIXED),
        "message retry",
    );
    let mut other = std::ptr::null_mut();
    check(
        unsafe {
            wps_client_new(
                url.as_ptr(),
                o,
                None,
                std::ptr::null_mut(),
                None,
                &mut other,
            )
        },
        "wps_client_new",
    );
    unsafe { wps_options_free(o) };
    check(unsafe { wps_client_start(other) }, "start the other client");

    let (tx, statuses) = mpsc::sync_channel(1);
    let state = BlockingCredential {
        url: url.clone(),
        other: AtomicPtr::new(other),
        status: tx,
    };
    let c = common::ffi_credential_client(
        send_then_answer,
        &state as *const BlockingCredential as *mut c_void,
        None,
        std::ptr::null(),
    );
    INTERRUPT.store(false, Ordering::SeqCst);
    check(
        unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) },
        "wps_client_start_async",
    );
    let setter = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(200));
        INTERRUPT.store(true, Ordering::SeqCst);
    });
    let status = statuses
        .recv_timeout(Duration::from_secs(30))
        .expect("the credential callback's call returned");
    setter.join().unwrap();
    INTERRUPT.store(false, Ordering::SeqCst);
    assert_eq!(status, WPS_STATUS_INTERRUPTED);
    unsafe { wps_client_free(c) };
    unsafe { wps_client_free(other) };
}

#[test]
fn the_interrupt_check_ends_blocking_waits() {
    assert_eq!(
        wps_set_interrupt_check(Some(interrupt_check), 0),
        WPS_STATUS_INVALID_ARGUMENT
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);

    check(wps_set_interrupt_check(Some(interrupt_check), 20), "set");
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    let mut out = wps_ack_result {
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: false,
    };
    check(
        unsafe { wps_client_join_group(c, c"g".as_ptr(), &mut out) },
        "join with the check set",
    );
    check(common::ffi_send_text(c, c"g", "acked", 0), "send");

    let status = interrupted("send_event", || send_event(c, &mut out));
    assert_eq!(status, WPS_STATUS_INTERRUPTED);
    assert!(out.has_ack_id, "the given-up send keeps its ackId");

    let status = interrupted("invoke_event", || {
        let mut response = std::ptr::null_mut();
        unsafe {
            wps_client_invoke_event(
                c,
                c"e".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                "x".as_ptr(),
                1,
                30_000,
                &mut response,
            )
        }
    });
    assert_eq!(status, WPS_STATUS_INTERRUPTED);
    check(common::ffi_send_text(c, c"g", "after", 0), "send after");

    a_blocking_call_inside_a_credential_callback_is_interrupted(&url);

    // Removed: no longer asked, and the wait goes on until the service answers.
    check(wps_set_interrupt_check(None, 0), "remove");
    let asked = ASKED.load(Ordering::SeqCst);
    assert!(asked > 0);
    INTERRUPT.store(true, Ordering::SeqCst);
    assert_eq!(
        common::ffi_send_text(c, c"g", "unchecked", 0),
        WPS_STATUS_OK
    );
    assert_eq!(ASKED.load(Ordering::SeqCst), asked);
    unsafe { wps_client_free(c) };
    drop(emulator);
}
