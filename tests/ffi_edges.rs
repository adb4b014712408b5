//! Edge cases of the C ABI: calls back into the API from inside callbacks (credential,
//! poll-mode dispatch), a client freed under a blocking call, arguments at the limits
//! of their types, and calls from a thread-exit handler.

mod common;

use common::{check, ffi_credential_client, ffi_emulator, last_error};

use std::cell::RefCell;
use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_CONNECTED, WPS_EVENT_STOPPED};
use webpubsub_client::ffi::client::{
    wps_ack_result, wps_client, wps_client_cancel, wps_client_dispatch, wps_client_free,
    wps_client_invoke_event, wps_client_join_group, wps_client_new, wps_client_send_event,
    wps_client_send_to_group, wps_client_start, wps_client_state, wps_client_stop,
    wps_invoke_response,
};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_set_error, wps_credential_result_set_url,
};
use webpubsub_client::ffi::options::*;
use webpubsub_client::ffi::status::*;

/// How long any wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// Runs `call` on another thread; its result, or a panic naming `what` if it hangs.
fn bounded<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not return within {WAIT:?}"))
}

/// A credential callback's state: the URL it answers with, the client, and the
/// statuses of the calls it made on that client.
struct Credential {
    url: CString,
    client: AtomicPtr<wps_client>,
    stop: AtomicU32,
    join: AtomicU32,
}

unsafe extern "C" fn stop_then_answer(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const Credential);
    let c = s.client.load(Ordering::SeqCst);
    s.join.store(
        wps_client_join_group(c, c"g".as_ptr(), std::ptr::null_mut()),
        Ordering::SeqCst,
    );
    s.stop.store(wps_client_stop(c), Ordering::SeqCst);
    wps_credential_result_set_url(result, s.url.as_ptr());
}

#[test]
fn a_credential_callback_may_stop_its_own_client() {
    let (rt, emulator, url) = ffi_emulator();
    let state = Box::leak(Box::new(Credential {
        url,
        client: AtomicPtr::default(),
        stop: AtomicU32::new(u32::MAX),
        join: AtomicU32::new(u32::MAX),
    }));
    let c = ffi_credential_client(
        stop_then_answer,
        state as *mut Credential as *mut c_void,
        None,
        std::ptr::null(),
    );
    state.client.store(c, Ordering::SeqCst);
    let client = c as usize;
    let start = bounded("wps_client_start", move || unsafe {
        wps_client_start(client as *mut wps_client)
    });
    assert_eq!(start, WPS_STATUS_STOPPED, "{}", last_error());
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_STOPPED);
    // Returns once the credential callback has.
    bounded("wps_client_free", move || unsafe {
        wps_client_free(client as *mut wps_client)
    });
    assert_eq!(state.stop.load(Ordering::SeqCst), WPS_STATUS_OK);
    assert_eq!(state.join.load(Ordering::SeqCst), WPS_STATUS_NOT_CONNECTED);
    rt.block_on(emulator.shutdown());
}

/// The result slot lent to the last credential call, kept past its return.
static KEPT_RESULT: AtomicPtr<wps_credential_result> = AtomicPtr::new(std::ptr::null_mut());

unsafe extern "C" fn answer_and_keep(user_data: *mut c_void, result: *mut wps_credential_result) {
    KEPT_RESULT.store(result, Ordering::SeqCst);
    wps_credential_result_set_url(result, (*(user_data as *const CString)).as_ptr());
}

#[test]
fn a_credential_result_used_after_its_callback_returned_is_refused() {
    let (rt, emulator, url) = ffi_emulator();
    let url = Box::leak(Box::new(url));
    let c = ffi_credential_client(
        answer_and_keep,
        url as *mut CString as *mut c_void,
        None,
        std::ptr::null(),
    );
    let client = c as usize;
    let start = bounded("wps_client_start", move || unsafe {
        wps_client_start(client as *mut wps_client)
    });
    check(start, "wps_client_start");
    let kept = KEPT_RESULT.load(Ordering::SeqCst);
    assert!(!kept.is_null());
    let late = unsafe { wps_credential_result_set_url(kept, url.as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    assert!(last_error().contains("returned"), "{}", last_error());
    let late = unsafe { wps_credential_result_set_error(kept, c"late".as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    let garbage = (usize::MAX - 7) as *mut wps_credential_result; // no token gets this far
    let status = unsafe { wps_credential_result_set_url(garbage, url.as_ptr()) };
    assert_eq!(status, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_CONNECTED);
    bounded("wps_client_free", move || unsafe {
        wps_client_free(client as *mut wps_client)
    });
    rt.block_on(emulator.shutdown());
}

/// Poll-mode events: the client stops itself from inside the dispatched connected
/// event; `stopped` counts the stopped events.
struct SelfStop {
    client: AtomicPtr<wps_client>,
    stop: AtomicU32,
    stopped: AtomicU32,
}

unsafe extern "C" fn stop_on_connected(user_data: *mut c_void, event: *const wps_event) {
    let s = &*(user_data as *const SelfStop);
    match (*event).kind {
        WPS_EVENT_CONNECTED => s.stop.store(
            wps_client_stop(s.client.load(Ordering::SeqCst)),
            Ordering::SeqCst,
        ),
        WPS_EVENT_STOPPED => {
            s.stopped.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
}

#[test]
fn a_dispatched_callback_may_stop_its_own_client() {
    let (rt, emulator, url) = ffi_emulator();
    let state = SelfStop {
        client: AtomicPtr::default(),
        stop: AtomicU32::new(u32::MAX),
        stopped: AtomicU32::new(0),
    };
    let c = common::ffi_poll_client(
        &url,
        Some(stop_on_connected),
        &state as *const SelfStop as *mut c_void,
        None,
    );
    state.client.store(c, Ordering::SeqCst);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    let deadline = std::time::Instant::now() + WAIT;
    while state.stopped.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no stopped event");
        check(
            unsafe { wps_client_dispatch(c, 16, std::ptr::null_mut()) },
            "wps_client_dispatch",
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(state.stop.load(Ordering::SeqCst), WPS_STATUS_OK);
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

#[test]
fn a_blocking_call_ends_when_another_thread_frees_its_client() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    let client = c as usize;
    let (tx, rx) = mpsc::channel();
    let invoker = std::thread::spawn(move || {
        let mut out: *mut wps_invoke_response = std::ptr::null_mut();
        let status = unsafe {
            wps_client_invoke_event(
                client as *mut wps_client,
                c"slow".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                b"x".as_ptr(),
                1,
                0,
                &mut out,
            )
        };
        tx.send((status, last_error(), out.is_null())).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    bounded("wps_client_free", move || unsafe {
        wps_client_free(client as *mut wps_client)
    });
    let (status, message, no_response) = rx.recv_timeout(WAIT).expect("the invocation ended");
    assert_eq!(status, WPS_STATUS_STOPPED, "{message}");
    assert!(!message.is_empty());
    assert!(no_response);
    invoker.join().unwrap();
    rt.block_on(emulator.shutdown());
}

/// The header (`wps_ack_result`): an acked operation ended by a free on another thread
/// reports `WPS_STATUS_STOPPED` with its ackId, as one ended by `wps_client_stop` does.
#[test]
fn a_blocking_send_ended_by_a_free_on_another_thread_reports_its_ack_id() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    let client = c as usize;
    let sender = std::thread::spawn(move || {
        let mut out = wps_ack_result {
            ack_id: 0,
            has_ack_id: false,
            is_duplicated: true,
        };
        // Acked once the upstream answers, which it never does.
        let status = unsafe {
            wps_client_send_event(
                client as *mut wps_client,
                c"slow".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                b"x".as_ptr(),
                1,
                0,
                &mut out,
            )
        };
        (status, last_error(), out)
    });
    rt.block_on(common::until_stats(
        &emulator,
        "the event at the upstream",
        30,
        |s| s["upstreamRequests"].as_u64() >= Some(1),
    ));
    bounded("wps_client_free", move || unsafe {
        wps_client_free(client as *mut wps_client)
    });
    let (status, message, out) = sender.join().unwrap();
    assert_eq!(status, WPS_STATUS_STOPPED, "{message}");
    assert!(
        out.has_ack_id && out.ack_id >= 1 && !out.is_duplicated,
        "ackId {} (has_ack_id {})",
        out.ack_id,
        out.has_ack_id
    );
    rt.block_on(emulator.shutdown());
}

#[test]
fn options_at_the_limits_of_their_types_make_a_working_client() {
    let (rt, emulator, url) = ffi_emulator();
    let o = wps_options_new();
    for (status, what) in [
        (
            wps_options_set_message_retry(o, u32::MAX, u64::MAX, u64::MAX, WPS_RETRY_EXPONENTIAL),
            "message retry",
        ),
        (
            wps_options_set_reconnect_retry(o, u32::MAX, u64::MAX, u64::MAX, WPS_RETRY_FIXED),
            "reconnect retry",
        ),
        (
            wps_options_set_keep_alive(o, u64::MAX - 1, u64::MAX),
            "keep alive",
        ),
        (wps_options_set_ack_timeout_ms(o, u64::MAX), "ack timeout"),
        (
            wps_options_set_start_timeout_ms(o, u64::MAX),
            "start timeout",
        ),
        (wps_options_set_recovery(o, u64::MAX, u64::MAX), "recovery"),
        (
            wps_options_set_sequence_ack_interval_ms(o, u64::MAX),
            "sequence ack interval",
        ),
    ] {
        check(status, what);
    }
    let mut c = std::ptr::null_mut();
    let status =
        unsafe { wps_client_new(url.as_ptr(), o, None, std::ptr::null_mut(), None, &mut c) };
    unsafe { wps_options_free(o) };
    check(status, "wps_client_new");
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    check(common::ffi_send_text(c, c"g", "hi", 0), "acked send");
    let mut out: *mut wps_invoke_response = std::ptr::null_mut();
    let status = unsafe {
        wps_client_invoke_event(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            b"x".as_ptr(),
            1,
            u64::MAX,
            &mut out,
        )
    };
    assert_ne!(status, WPS_STATUS_PANIC, "{}", last_error());
    check(unsafe { wps_client_stop(c) }, "wps_client_stop");
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

#[test]
fn a_length_past_isize_max_is_refused() {
    let (rt, emulator, url) = ffi_emulator();
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
    let status = unsafe {
        wps_client_send_to_group(
            c,
            c"g".as_ptr(),
            WPS_DATA_TYPE_BINARY,
            b"x".as_ptr(),
            usize::MAX,
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, WPS_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("too long"), "{}", last_error());
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

/// The header says: a message whose frame (binary data in base64) exceeds 1 MiB fails
/// with `WPS_STATUS_INVALID_ARGUMENT`, and the connection stays usable.
#[test]
fn a_message_over_the_one_mib_frame_limit_is_refused() {
    let (rt, emulator, url) = ffi_emulator();
    let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    // 800 KiB of binary data is about 1.07 MiB in base64.
    let big = vec![7u8; 800 * 1024];
    let status = unsafe {
        wps_client_send_to_group(
            c,
            c"g".as_ptr(),
            WPS_DATA_TYPE_BINARY,
            big.as_ptr(),
            big.len(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, WPS_STATUS_INVALID_ARGUMENT, "{}", last_error());
    assert!(last_error().contains("limit"), "{}", last_error());
    check(
        common::ffi_send_text(c, c"g", "small", 0),
        "a small send after",
    );
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

thread_local! {
    /// Runs when its thread exits: registered before the library's thread-locals, it
    /// is destroyed after them (as a pthread key destructor, an `atexit` handler or a
    /// C++ static destructor runs after them).
    static AT_THREAD_EXIT: AtThreadExit = const { AtThreadExit(RefCell::new(None)) };
}

struct AtThreadExit(RefCell<Option<Box<dyn FnOnce()>>>);

impl Drop for AtThreadExit {
    fn drop(&mut self) {
        if let Some(f) = self.0.borrow_mut().take() {
            f();
        }
    }
}

/// The user data of a client freed late: the client, and its finalizer calls.
#[derive(Default)]
struct Late {
    client: AtomicPtr<wps_client>,
    freed: AtomicU32,
}

impl Late {
    /// A `Late` that outlives its client, as user data.
    fn leaked() -> (&'static Late, *mut c_void) {
        let late: &'static Late = Box::leak(Box::default());
        (late, late as *const Late as *mut c_void)
    }
}

unsafe extern "C" fn count_free(user_data: *mut c_void) {
    (*(user_data as *const Late))
        .freed
        .fetch_add(1, Ordering::SeqCst);
}

#[test]
fn calls_from_a_thread_exit_handler_work_after_the_librarys_thread_locals_are_gone() {
    let (rt, emulator, url) = ffi_emulator();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let late = tx.clone();
        AT_THREAD_EXIT.with(|f| {
            *f.0.borrow_mut() = Some(Box::new(move || unsafe {
                let (state, user_data) = Late::leaked();
                let c = common::ffi_client(&url, None, user_data, Some(count_free));
                let null_group = wps_client_join_group(c, std::ptr::null(), std::ptr::null_mut());
                let message = last_error();
                let start = wps_client_start(c);
                let send = common::ffi_send_text(c, c"g", "late", 0);
                let stop = wps_client_stop(c);
                wps_client_free(c);
                let freed = state.freed.load(Ordering::SeqCst) == 1 && last_error().is_empty();
                late.send((null_group, message, start, send, stop, freed))
                    .unwrap();
            }))
        });
        // The library's thread-locals (its last error, the runtime's context) in use.
        assert_eq!(
            unsafe { wps_client_stop(std::ptr::null_mut()) },
            WPS_STATUS_NULL_ARG
        );
        let c = common::ffi_client(c"ws://127.0.0.1:1/x", None, std::ptr::null_mut(), None);
        assert_ne!(unsafe { wps_client_start(c) }, WPS_STATUS_OK);
        unsafe { wps_client_free(c) };
    });
    let (null_group, message, start, send, stop, freed) =
        rx.recv_timeout(WAIT).expect("the exit handler ran");
    assert!(freed, "the free finished (its finalizer ran, no panic)");
    assert_eq!(null_group, WPS_STATUS_NULL_ARG);
    assert_eq!(message, "`group` is NULL");
    assert_eq!(
        (start, send, stop),
        (WPS_STATUS_OK, WPS_STATUS_OK, WPS_STATUS_OK)
    );
    rt.block_on(emulator.shutdown());
}

/// A thread-exit handler registered after the library's first call on its thread but
/// before its first blocking call (a C++ `thread_local` whose constructor makes the
/// client) runs once the runtime's parker of that thread is gone, its context not yet.
#[test]
fn a_client_made_before_its_thread_exit_handler_is_used_stopped_and_freed_by_it() {
    let (rt, emulator, url) = ffi_emulator();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (state, user_data) = Late::leaked();
        let client = common::ffi_client(&url, None, user_data, Some(count_free)) as usize;
        AT_THREAD_EXIT.with(|f| {
            *f.0.borrow_mut() = Some(Box::new(move || unsafe {
                let c = client as *mut wps_client;
                let send = common::ffi_send_text(c, c"g", "late", 0);
                let message = last_error();
                let stop = wps_client_stop(c);
                wps_client_free(c);
                let freed = state.freed.load(Ordering::SeqCst) == 1;
                tx.send((send, message, stop, freed)).unwrap();
            }))
        });
        check(
            unsafe { wps_client_start(client as *mut wps_client) },
            "wps_client_start",
        );
    });
    let (send, message, stop, freed) = rx.recv_timeout(WAIT).expect("the exit handler ran");
    assert_eq!((send, stop), (WPS_STATUS_OK, WPS_STATUS_OK), "{message}");
    assert!(freed, "the free finished (its finalizer ran)");
    rt.block_on(emulator.shutdown());
}

/// A started poll-mode client of `url` whose events go to `on_event` with `user_data`
/// (a `Late`, which counts the finalizer calls).
fn started_poll_client(
    url: &CStr,
    on_event: webpubsub_client::ffi::callbacks::wps_event_cb,
    user_data: *mut c_void,
) -> *mut wps_client {
    let c = common::ffi_poll_client(url, on_event, user_data, Some(count_free));
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    c
}

unsafe extern "C" fn free_on_connected(user_data: *mut c_void, event: *const wps_event) {
    if (*event).kind == WPS_EVENT_CONNECTED {
        wps_client_free((*(user_data as *const Late)).client.load(Ordering::SeqCst));
    }
}

unsafe extern "C" fn ignore_event(_: *mut c_void, _: *const wps_event) {}

/// Dispatches `c` until a callback ran, for at most `WAIT`; whether one did.
fn dispatch_one(c: *mut wps_client) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    let mut ran = 0;
    while ran == 0 {
        if std::time::Instant::now() > deadline
            || unsafe { wps_client_dispatch(c, 1, &mut ran) } != WPS_STATUS_OK
        {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn a_client_freed_in_a_callback_dispatched_from_a_thread_exit_handler_is_torn_down() {
    let (rt, emulator, url) = ffi_emulator();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let late = tx.clone();
        let url_late = url.clone();
        AT_THREAD_EXIT.with(|f| {
            *f.0.borrow_mut() = Some(Box::new(move || {
                let (state, user_data) = Late::leaked();
                let c = started_poll_client(&url_late, Some(free_on_connected), user_data);
                state.client.store(c, Ordering::SeqCst);
                // One callback per dispatch: the handle is gone once the free ran.
                let mut freed = false;
                let deadline = std::time::Instant::now() + WAIT;
                while !freed && std::time::Instant::now() < deadline {
                    unsafe { wps_client_dispatch(c, 1, std::ptr::null_mut()) };
                    std::thread::sleep(Duration::from_millis(5));
                    freed = state.freed.load(Ordering::SeqCst) == 1;
                }
                late.send(freed).unwrap();
            }))
        });
        // The library's thread-locals of callbacks in use: a dispatched callback ran.
        let (_, user_data) = Late::leaked();
        let c = started_poll_client(&url, Some(ignore_event), user_data);
        let dispatched = dispatch_one(c);
        unsafe { wps_client_free(c) };
        assert!(dispatched);
    });
    assert!(
        rx.recv_timeout(WAIT).expect("the exit handler ran"),
        "the client was not freed"
    );
    rt.block_on(emulator.shutdown());
}

/// Makes a call that fails (a cancel of an operation that never was) from inside the
/// dispatched callback; `status` gets its status.
unsafe extern "C" fn fail_inside(user_data: *mut c_void, event: *const wps_event) {
    let status = &*(user_data as *const AtomicU32);
    if (*event).kind == WPS_EVENT_CONNECTED {
        status.store(wps_client_cancel(std::ptr::null_mut(), 1), Ordering::SeqCst);
    }
}

/// The header (`wps_last_error_message`): the message is that of this thread's last call
/// returning a status, "" when it returned `WPS_STATUS_OK`: also after a dispatch whose
/// callback made a failing call on this thread, and whatever `wps_client_state` (which
/// returns no status) is asked in between.
#[test]
fn the_last_error_is_that_of_the_last_call_returning_a_status() {
    let (rt, emulator, url) = ffi_emulator();
    let inner = AtomicU32::new(u32::MAX);
    let c = common::ffi_poll_client(
        &url,
        Some(fail_inside),
        &inner as *const AtomicU32 as *mut c_void,
        None,
    );
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    common::wait_until("the connected event", || {
        let status = unsafe { wps_client_dispatch(c, 16, std::ptr::null_mut()) };
        assert_eq!(status, WPS_STATUS_OK);
        assert_eq!(last_error(), "", "after a dispatch that returned OK");
        inner.load(Ordering::SeqCst) != u32::MAX
    });
    assert_eq!(inner.load(Ordering::SeqCst), WPS_STATUS_NULL_ARG);

    assert_eq!(
        unsafe { wps_client_cancel(c, 424242) },
        WPS_STATUS_INVALID_ARGUMENT
    );
    let message = last_error();
    assert_eq!(message, "no pending operation 424242");
    assert_eq!(
        unsafe { wps_client_state(std::ptr::null()) },
        WPS_STATE_STOPPED
    );
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_CONNECTED);
    assert_eq!(last_error(), message, "after wps_client_state");
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

/// A start of a client of `url` with a start timeout of `ms`: its status and message.
fn timed_out_start(url: &CStr, ms: u64) -> (u32, String) {
    let o = wps_options_new();
    check(wps_options_set_start_timeout_ms(o, ms), "start timeout");
    let mut c = std::ptr::null_mut();
    let status =
        unsafe { wps_client_new(url.as_ptr(), o, None, std::ptr::null_mut(), None, &mut c) };
    unsafe { wps_options_free(o) };
    check(status, "wps_client_new");
    let status = unsafe { wps_client_start(c) };
    let message = last_error();
    unsafe { wps_client_free(c) };
    (status, message)
}

#[test]
fn a_start_timeout_is_timeout_and_names_the_step_it_waited_for() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, _received) = rt.block_on(common::silent_server());
    let url = CString::new(format!("ws://{addr}/client/hubs/h")).unwrap();
    assert_eq!(
        timed_out_start(&url, 300),
        (
            WPS_STATUS_TIMEOUT,
            format!("timed out after 0.3 s waiting for {addr} to answer the WebSocket upgrade")
        )
    );
    let (url, _service) = common::scripted(&rt, |listener| async move {
        let _upgraded = common::accepted(&listener).await;
        std::future::pending::<()>().await;
    });
    // Long enough for the service to answer the upgrade on a loaded machine.
    let (status, message) = timed_out_start(&url, 1000);
    assert_eq!(status, WPS_STATUS_TIMEOUT, "{message}");
    assert!(
        message.starts_with("timed out after 1 s waiting for the connected frame from 127.0.0.1:"),
        "{message}"
    );
}

/// The poll-mode descriptor watched edge-triggered (`EPOLLET`) signals once per
/// emptied queue: what is queued while callbacks wait raises no new edge, so the
/// application dispatches until a call takes fewer than its `max`.
#[cfg(target_os = "linux")]
#[test]
fn an_edge_triggered_descriptor_signals_again_only_after_a_dispatch_emptied_the_queue() {
    use webpubsub_client::ffi::client::{wps_client_dispatch_fd, wps_client_join_group_async};
    unsafe extern "C" fn ignore(
        _: *mut c_void,
        _: *const webpubsub_client::ffi::callbacks::wps_completion,
    ) {
    }
    let url = c"ws://127.0.0.1:1/client/hubs/h";
    let c = common::ffi_poll_client(url, None, std::ptr::null_mut(), None);
    // Not started: each join completes at once (refused), queued for the dispatch.
    let refused = || unsafe {
        let status = wps_client_join_group_async(
            c,
            c"g".as_ptr(),
            Some(ignore),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        check(status, "join");
    };
    let mut fd = -1;
    check(unsafe { wps_client_dispatch_fd(c, &mut fd) }, "dispatch fd");
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    let mut watch = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    assert_eq!(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut watch) },
        0
    );
    let edges = || {
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
        unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 0) }
    };
    let dispatch = |max| {
        let mut ran = 0;
        check(unsafe { wps_client_dispatch(c, max, &mut ran) }, "dispatch");
        ran
    };
    refused();
    refused();
    assert_eq!(edges(), 1);
    assert_eq!(dispatch(1), 1);
    refused();
    assert_eq!(edges(), 0, "no edge while callbacks wait");
    assert_eq!(dispatch(3), 2, "fewer than max: the queue is empty");
    refused();
    assert_eq!(edges(), 1, "queued after the queue was emptied");
    assert_eq!(dispatch(3), 1);
    unsafe {
        libc::close(ep);
        wps_client_free(c);
    }
}
