//! `wps_set_interrupt_check` against the emulator: a blocking call waiting for an
//! upstream that never answers returns `WPS_STATUS_INTERRUPTED` once the check says
//! so, and blocking calls that complete are unaffected by it. The check is
//! process-wide, so this is a test binary of its own, with one test.

mod common;

use common::check;

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use webpubsub_client::ffi::client::{
    wps_ack_result, wps_client, wps_client_free, wps_client_invoke_event, wps_client_join_group,
    wps_client_send_event, wps_client_start,
};
use webpubsub_client::ffi::interrupt::wps_set_interrupt_check;
use webpubsub_client::ffi::status::{
    WPS_DATA_TYPE_TEXT, WPS_STATUS_INTERRUPTED, WPS_STATUS_INVALID_ARGUMENT, WPS_STATUS_OK,
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
