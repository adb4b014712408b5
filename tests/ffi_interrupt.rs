//! `wps_set_interrupt_check` against the emulator: a blocking call waiting for an
//! upstream that never answers returns `WPS_STATUS_INTERRUPTED` once the check says
//! so, and blocking calls that complete are unaffected by it, also when the blocking
//! call is made inside a credential callback (a thread of the library's runtime). A
//! thread's own check takes the place of the process-wide one on that thread only, and
//! no check is asked from inside itself. The process-wide check is shared by every
//! thread, so this is a test binary of its own, with one test.

mod common;

use common::check;

use std::ffi::{c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use webpubsub_client::ffi::client::{
    wps_ack_result, wps_client, wps_client_free, wps_client_invoke_event, wps_client_join_group,
    wps_client_new, wps_client_send_event, wps_client_start, wps_client_start_async,
    wps_client_state, wps_client_stop,
};
use webpubsub_client::ffi::credential::{wps_credential_result, wps_credential_result_set_url};
use webpubsub_client::ffi::interrupt::{wps_set_interrupt_check, wps_set_thread_interrupt_check};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_ack_timeout_ms,
    wps_options_set_message_retry,
};
use webpubsub_client::ffi::status::{
    WPS_DATA_TYPE_TEXT, WPS_RETRY_FIXED, WPS_STATE_STOPPED, WPS_STATUS_INTERRUPTED,
    WPS_STATUS_INVALID_ARGUMENT, WPS_STATUS_OK, WPS_STATUS_TIMEOUT,
};

static INTERRUPT: AtomicBool = AtomicBool::new(false);
static ASKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn interrupt_check() -> c_int {
    ASKED.fetch_add(1, Ordering::SeqCst);
    INTERRUPT.load(Ordering::SeqCst).into()
}

/// Runs `call` with `flag` (the interrupt a check returns) set 200 ms into it; its
/// status, after asserting that it returned long before the 30 s it would otherwise wait.
fn interrupted(flag: &'static AtomicBool, what: &str, call: impl FnOnce() -> u32) -> u32 {
    flag.store(false, Ordering::SeqCst);
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
    });
    let t0 = Instant::now();
    let status = call();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{what} waited {:?}",
        t0.elapsed()
    );
    setter.join().unwrap();
    flag.store(false, Ordering::SeqCst);
    status
}

/// An out-struct for an acked call, not yet written.
fn unacked() -> wps_ack_result {
    wps_ack_result {
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: false,
    }
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

/// A started client whose acked operations time out after `ack_timeout_ms`, not retried.
fn started_without_retries(url: &CString, ack_timeout_ms: u64) -> *mut wps_client {
    let o = wps_options_new();
    check(
        wps_options_set_ack_timeout_ms(o, ack_timeout_ms),
        "ack timeout",
    );
    check(
        wps_options_set_message_retry(o, 0, 100, 100, WPS_RETRY_FIXED),
        "message retry",
    );
    let mut c = std::ptr::null_mut();
    check(
        unsafe { wps_client_new(url.as_ptr(), o, None, std::ptr::null_mut(), None, &mut c) },
        "wps_client_new",
    );
    unsafe { wps_options_free(o) };
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    c
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
    let mut out = unacked();
    let _ = s
        .status
        .send(send_event(s.other.load(Ordering::SeqCst), &mut out));
    wps_credential_result_set_url(result, s.url.as_ptr());
}

/// The blocking call a credential callback makes (on a thread of the library's runtime,
/// where it is spawned and waited for instead of driven in place) is interrupted too.
fn a_blocking_call_inside_a_credential_callback_is_interrupted(url: &CString) {
    // Without the check, the send would end with WPS_STATUS_TIMEOUT after 5 s.
    let other = started_without_retries(url, 5_000);

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
    let mut out = unacked();
    check(
        unsafe { wps_client_join_group(c, c"g".as_ptr(), &mut out) },
        "join with the check set",
    );
    check(common::ffi_send_text(c, c"g", "acked", 0), "send");

    let status = interrupted(&INTERRUPT, "send_event", || send_event(c, &mut out));
    assert_eq!(status, WPS_STATUS_INTERRUPTED);
    assert!(out.has_ack_id, "the given-up send keeps its ackId");

    let status = interrupted(&INTERRUPT, "invoke_event", || {
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
    a_check_is_not_asked_from_inside_itself(&url, c);
    a_thread_check_takes_the_place_of_the_process_wide_one(c);
    a_stop_asks_the_check_and_is_not_ended_by_it(&rt);

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

/// The client `reentrant_check` makes its blocking call on.
static REENTRANT_CLIENT: AtomicPtr<wps_client> = AtomicPtr::new(std::ptr::null_mut());
/// How deep in `reentrant_check` this test's thread is, and the deepest seen.
static DEPTH: AtomicUsize = AtomicUsize::new(0);
static DEEPEST: AtomicUsize = AtomicUsize::new(0);
/// The status of the blocking call `reentrant_check` made.
static NESTED_STATUS: AtomicUsize = AtomicUsize::new(usize::MAX);

/// A check that makes a blocking call, as a signal handler run by the check may, on
/// its first call (a send that times out); then it interrupts.
extern "C" fn reentrant_check() -> c_int {
    let depth = DEPTH.fetch_add(1, Ordering::SeqCst) + 1;
    DEEPEST.fetch_max(depth, Ordering::SeqCst);
    if NESTED_STATUS.load(Ordering::SeqCst) == usize::MAX {
        NESTED_STATUS.store(usize::MAX - 1, Ordering::SeqCst);
        let c = REENTRANT_CLIENT.load(Ordering::SeqCst);
        let status = send_event(c, &mut unacked());
        NESTED_STATUS.store(status as usize, Ordering::SeqCst);
    }
    DEPTH.fetch_sub(1, Ordering::SeqCst);
    1
}

/// A blocking call made from inside the check waits unchecked: the check is not asked
/// again from inside itself (the send waiting there would otherwise run it again, and
/// a check that is not re-entrant, such as Python's, could not answer).
fn a_check_is_not_asked_from_inside_itself(url: &CString, c: *mut wps_client) {
    let nested = started_without_retries(url, 300);
    REENTRANT_CLIENT.store(nested, Ordering::SeqCst);
    check(wps_set_interrupt_check(Some(reentrant_check), 1), "set");
    let mut out = unacked();
    assert_eq!(send_event(c, &mut out), WPS_STATUS_INTERRUPTED);
    check(wps_set_interrupt_check(None, 0), "remove");
    assert_eq!(
        DEEPEST.load(Ordering::SeqCst),
        1,
        "the check was re-entered"
    );
    assert_eq!(
        NESTED_STATUS.load(Ordering::SeqCst),
        WPS_STATUS_TIMEOUT as usize,
        "the check's own send"
    );
    unsafe { wps_client_free(nested) };
}

static OWN_INTERRUPT: AtomicBool = AtomicBool::new(false);
static OWN_ASKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn own_check() -> c_int {
    OWN_ASKED.fetch_add(1, Ordering::SeqCst);
    OWN_INTERRUPT.load(Ordering::SeqCst).into()
}

/// With a process-wide check that interrupts at once, a thread with a check of its own
/// that does not waits until the service answers, and is interrupted when its own says
/// so; other threads still ask the process-wide one. Removed, the process-wide one
/// applies again.
fn a_thread_check_takes_the_place_of_the_process_wide_one(c: *mut wps_client) {
    let c_addr = c as usize;
    let other_thread = move || {
        std::thread::spawn(move || {
            let mut out = unacked();
            send_event(c_addr as *mut wps_client, &mut out)
        })
        .join()
        .unwrap()
    };
    INTERRUPT.store(true, Ordering::SeqCst);
    check(wps_set_interrupt_check(Some(interrupt_check), 20), "set");
    assert_eq!(
        wps_set_thread_interrupt_check(Some(own_check), 0),
        WPS_STATUS_INVALID_ARGUMENT
    );
    check(
        wps_set_thread_interrupt_check(Some(own_check), 5),
        "set own",
    );
    let asked = ASKED.load(Ordering::SeqCst);
    assert_eq!(
        common::ffi_send_text(c, c"g", "own", 0),
        WPS_STATUS_OK,
        "a send that its thread's check let wait"
    );
    let status = interrupted(&OWN_INTERRUPT, "send_event", || {
        let mut out = unacked();
        send_event(c, &mut out)
    });
    assert_eq!(status, WPS_STATUS_INTERRUPTED);
    assert!(OWN_ASKED.load(Ordering::SeqCst) > 0);
    assert_eq!(
        ASKED.load(Ordering::SeqCst),
        asked,
        "the process-wide check was asked"
    );
    assert_eq!(other_thread(), WPS_STATUS_INTERRUPTED, "another thread");
    assert!(ASKED.load(Ordering::SeqCst) > asked);

    check(wps_set_thread_interrupt_check(None, 0), "remove own");
    let own_asked = OWN_ASKED.load(Ordering::SeqCst);
    let mut out = unacked();
    assert_eq!(send_event(c, &mut out), WPS_STATUS_INTERRUPTED);
    assert_eq!(OWN_ASKED.load(Ordering::SeqCst), own_asked);
    check(wps_set_interrupt_check(None, 0), "remove");
    INTERRUPT.store(false, Ordering::SeqCst);
}

static STOP_ASKED: AtomicUsize = AtomicUsize::new(0);

/// A check that always says "interrupt", and counts how often it was asked.
extern "C" fn always_interrupting() -> c_int {
    STOP_ASKED.fetch_add(1, Ordering::SeqCst);
    1
}

/// The URL of a service that says its client is connected, then reads and ignores
/// everything: a close frame gets no answer, so a stop waits out its closing handshake.
fn service_that_never_closes(rt: &tokio::runtime::Runtime) -> CString {
    use futures_util::StreamExt;
    let (url, _service) = common::scripted(rt, |listener| async move {
        // Read through the read half only: the socket never answers the close frame
        // (a whole stream would, as it reads).
        let (_write, mut read) = common::accepted_connected(listener).await.split();
        while let Some(Ok(_)) = read.next().await {}
        std::future::pending::<()>().await;
    });
    url
}

/// `wps_client_stop` asks the check as it waits (what a check does on the way, such as
/// Python's signal handlers, must not wait for the closing handshake), and is not ended
/// by it: the client is stopped when it returns.
fn a_stop_asks_the_check_and_is_not_ended_by_it(rt: &tokio::runtime::Runtime) {
    let url = service_that_never_closes(rt);
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    check(
        wps_set_thread_interrupt_check(Some(always_interrupting), 20),
        "set own",
    );
    let t0 = Instant::now();
    let status = unsafe { wps_client_stop(c) };
    let waited = t0.elapsed();
    check(wps_set_thread_interrupt_check(None, 0), "remove own");
    assert_eq!(status, WPS_STATUS_OK);
    assert!(
        waited > Duration::from_millis(900),
        "the stop returned after {waited:?}, before its closing handshake"
    );
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_STOPPED);
    let asked = STOP_ASKED.load(Ordering::SeqCst);
    assert!(
        asked >= 10,
        "the check was asked {asked} times during the stop"
    );
    unsafe { wps_client_free(c) };
}
