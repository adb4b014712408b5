//! Deferred credential answers (`wps_credential_result_defer`): the callback returns,
//! the connection attempt waits until the token is answered from another thread, and a
//! token whose request was answered or abandoned (stop, free, start timeout) is refused.

mod common;

use common::{check, ffi_credential_client, ffi_emulator, last_error};

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_start, wps_client_state, wps_client_stop,
};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_defer, wps_credential_result_set_error,
    wps_credential_result_set_url,
};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_start_timeout_ms,
};
use webpubsub_client::ffi::status::*;

/// How long any wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// A credential whose callback defers every request and hands its token over.
struct Deferring {
    tokens: Mutex<mpsc::Sender<usize>>,
    /// Callbacks that returned.
    returned: AtomicUsize,
    /// Calls of the finalizer.
    freed: AtomicUsize,
}

unsafe extern "C" fn defer(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const Deferring);
    check(
        wps_credential_result_defer(result),
        "wps_credential_result_defer",
    );
    s.tokens.lock().unwrap().send(result as usize).unwrap();
    s.returned.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn count_free(user_data: *mut c_void) {
    let s = &*(user_data as *const Deferring);
    s.freed.fetch_add(1, Ordering::SeqCst);
}

/// A client of a deferring credential; its state, and the tokens of its requests.
struct Setup {
    client: *mut wps_client,
    state: &'static Deferring,
    tokens: mpsc::Receiver<usize>,
    /// Tokens taken so far.
    taken: std::cell::Cell<usize>,
}

impl Setup {
    /// `start_timeout_ms`: 0 for the default.
    fn new(start_timeout_ms: u64) -> Setup {
        let (tx, tokens) = mpsc::channel();
        let state: &'static Deferring = Box::leak(Box::new(Deferring {
            tokens: Mutex::new(tx),
            returned: AtomicUsize::new(0),
            freed: AtomicUsize::new(0),
        }));
        let opts = wps_options_new();
        if start_timeout_ms > 0 {
            check(
                wps_options_set_start_timeout_ms(opts, start_timeout_ms),
                "start timeout",
            );
        }
        let client = ffi_credential_client(
            defer,
            state as *const Deferring as *mut c_void,
            Some(count_free),
            opts,
        );
        unsafe { wps_options_free(opts) };
        Setup {
            client,
            state,
            tokens,
            taken: std::cell::Cell::new(0),
        }
    }

    fn start(&self) -> mpsc::Receiver<(u32, String)> {
        start_on_a_thread(self.client)
    }

    /// The next deferred request, once its callback has returned.
    fn token(&self) -> *mut wps_credential_result {
        let token = self
            .tokens
            .recv_timeout(WAIT)
            .expect("a credential request");
        self.taken.set(self.taken.get() + 1);
        let deadline = std::time::Instant::now() + WAIT;
        while self.state.returned.load(Ordering::SeqCst) < self.taken.get() {
            assert!(
                std::time::Instant::now() < deadline,
                "the callback returned"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        token as *mut wps_credential_result
    }

    fn free(self) -> &'static Deferring {
        free_on_a_thread(self.client);
        self.state
    }
}

/// Starts `client` on another thread: the status and last error of the start.
fn start_on_a_thread(client: *mut wps_client) -> mpsc::Receiver<(u32, String)> {
    let client = client as usize;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let status = unsafe { wps_client_start(client as *mut wps_client) };
        let _ = tx.send((status, last_error()));
    });
    rx
}

/// Frees `client` on another thread, so that a free that hangs fails the test instead
/// of hanging it.
fn free_on_a_thread(client: *mut wps_client) {
    let client = client as usize;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        unsafe { wps_client_free(client as *mut wps_client) };
        let _ = tx.send(());
    });
    rx.recv_timeout(WAIT).expect("wps_client_free returned");
}

fn outcome(start: &mpsc::Receiver<(u32, String)>) -> (u32, String) {
    start.recv_timeout(WAIT).expect("wps_client_start returned")
}

#[test]
fn a_deferred_request_answered_from_another_thread_connects() {
    let (rt, emulator, url) = ffi_emulator();
    let setup = Setup::new(0);
    let start = setup.start();
    let token = setup.token() as usize;
    std::thread::sleep(Duration::from_millis(100));
    assert!(start.try_recv().is_err(), "the start waits for the answer");
    let answer = std::thread::spawn(move || {
        let token = token as *mut wps_credential_result;
        let first = unsafe { wps_credential_result_set_url(token, url.as_ptr()) };
        let second = unsafe { wps_credential_result_set_url(token, url.as_ptr()) };
        let error = unsafe { wps_credential_result_set_error(token, c"late".as_ptr()) };
        (first, second, error)
    })
    .join()
    .unwrap();
    assert_eq!(
        answer,
        (
            WPS_STATUS_OK,
            WPS_STATUS_ILLEGAL_STATE,
            WPS_STATUS_ILLEGAL_STATE
        )
    );
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_OK, "{error}");
    assert_eq!(
        unsafe { wps_client_state(setup.client) },
        WPS_STATE_CONNECTED
    );
    let state = setup.free();
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
    rt.block_on(emulator.shutdown());
}

#[test]
fn a_deferred_request_answered_with_an_error_fails_the_start() {
    let setup = Setup::new(0);
    let start = setup.start();
    let token = setup.token();
    let status = unsafe { wps_credential_result_set_error(token, c"no token today".as_ptr()) };
    check(status, "set_error");
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_CREDENTIAL_FAILED, "{error}");
    assert!(error.contains("no token today"), "{error}");
    let state = setup.free();
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
}

#[test]
fn a_stop_abandons_a_deferred_request_and_a_new_start_asks_again() {
    let (rt, emulator, url) = ffi_emulator();
    let setup = Setup::new(0);
    let start = setup.start();
    let abandoned = setup.token();
    check(unsafe { wps_client_stop(setup.client) }, "wps_client_stop");
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_STOPPED, "{error}");
    let late = unsafe { wps_credential_result_set_url(abandoned, url.as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    assert!(last_error().contains("abandoned"), "{}", last_error());
    assert_eq!(setup.state.freed.load(Ordering::SeqCst), 0, "not freed");

    let start = setup.start();
    let token = setup.token();
    assert_ne!(token, abandoned, "a token is never reused");
    check(
        unsafe { wps_credential_result_set_url(token, url.as_ptr()) },
        "set_url",
    );
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_OK, "{error}");
    let state = setup.free();
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
    rt.block_on(emulator.shutdown());
}

/// The request is over when `wps_client_stop` returns, not only once the start it failed
/// has returned too: an answer given straight after the stop is refused. (The task
/// answered the stop before it dropped the request: most rounds took the answer.)
#[test]
fn an_answer_right_after_the_stop_returned_is_refused() {
    let setup = Setup::new(0);
    for round in 0..20 {
        let start = setup.start();
        let token = setup.token();
        check(unsafe { wps_client_stop(setup.client) }, "wps_client_stop");
        let late = unsafe { wps_credential_result_set_url(token, c"ws://127.0.0.1:9/x".as_ptr()) };
        assert_eq!(
            late,
            WPS_STATUS_ILLEGAL_STATE,
            "round {round}: {}",
            last_error()
        );
        let (status, error) = outcome(&start);
        assert_eq!(status, WPS_STATUS_STOPPED, "{error}");
    }
    let state = setup.free();
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
}

#[test]
fn a_free_abandons_a_deferred_request_and_finalizes_once() {
    let setup = Setup::new(0);
    let start = setup.start();
    let token = setup.token();
    let state = setup.free();
    assert_eq!(
        state.freed.load(Ordering::SeqCst),
        1,
        "finalized by the free"
    );
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_STOPPED, "{error}");
    let late = unsafe { wps_credential_result_set_error(token, c"late".as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
}

#[test]
fn a_deferred_request_unanswered_past_the_start_timeout_is_abandoned() {
    let setup = Setup::new(300);
    let start = setup.start();
    let token = setup.token();
    let (status, error) = outcome(&start);
    assert_eq!(status, WPS_STATUS_TIMEOUT, "{error}");
    let late = unsafe { wps_credential_result_set_url(token, c"ws://127.0.0.1:9/x".as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    let state = setup.free();
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
}

/// The statuses of the calls a callback made, and its token, kept past its return.
#[derive(Default)]
struct InCallback {
    url: Option<CString>,
    token: AtomicUsize,
    statuses: Mutex<Vec<u32>>,
}

/// Defers, defers again, answers, then defers once more.
unsafe extern "C" fn defer_then_answer(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const InCallback);
    s.token.store(result as usize, Ordering::SeqCst);
    let url = s.url.as_ref().unwrap();
    let statuses = vec![
        wps_credential_result_defer(result),
        wps_credential_result_defer(result),
        wps_credential_result_set_url(result, url.as_ptr()),
        wps_credential_result_defer(result),
    ];
    *s.statuses.lock().unwrap() = statuses;
}

#[test]
fn a_deferral_is_refused_twice_after_an_answer_and_after_its_callback() {
    let (rt, emulator, url) = ffi_emulator();
    let state: &'static InCallback = Box::leak(Box::new(InCallback {
        url: Some(url),
        ..InCallback::default()
    }));
    let c = ffi_credential_client(
        defer_then_answer,
        state as *const InCallback as *mut c_void,
        None,
        std::ptr::null(),
    );
    // Answered during the callback after its deferral: taken as usual.
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    assert_eq!(
        *state.statuses.lock().unwrap(),
        [
            WPS_STATUS_OK,
            WPS_STATUS_ILLEGAL_STATE,
            WPS_STATUS_OK,
            WPS_STATUS_ILLEGAL_STATE
        ]
    );
    let kept = state.token.load(Ordering::SeqCst) as *mut wps_credential_result;
    assert_eq!(wps_credential_result_defer(kept), WPS_STATUS_ILLEGAL_STATE);
    assert!(
        last_error().contains("before the callback returns"),
        "{}",
        last_error()
    );
    let stray = (usize::MAX - 7) as *mut wps_credential_result;
    assert_eq!(wps_credential_result_defer(stray), WPS_STATUS_ILLEGAL_STATE);
    assert_eq!(
        wps_credential_result_defer(std::ptr::null_mut()),
        WPS_STATUS_NULL_ARG
    );
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

/// Neither answers nor defers.
unsafe extern "C" fn no_answer(user_data: *mut c_void, _result: *mut wps_credential_result) {
    (*(user_data as *const AtomicU32)).fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_callback_returning_without_answering_or_deferring_fails_the_start() {
    let calls: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let c = ffi_credential_client(
        no_answer,
        calls as *const AtomicU32 as *mut c_void,
        None,
        std::ptr::null(),
    );
    assert_eq!(unsafe { wps_client_start(c) }, WPS_STATUS_CREDENTIAL_FAILED);
    assert!(last_error().contains("set no result"), "{}", last_error());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    unsafe { wps_client_free(c) };
}

/// A credential whose callback defers, hands its token over, then keeps running until
/// released.
struct Holding {
    tokens: Mutex<mpsc::Sender<usize>>,
    release: Mutex<mpsc::Receiver<()>>,
    freed: AtomicUsize,
}

unsafe extern "C" fn defer_and_hold(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const Holding);
    check(
        wps_credential_result_defer(result),
        "wps_credential_result_defer",
    );
    s.tokens.lock().unwrap().send(result as usize).unwrap();
    let _ = s.release.lock().unwrap().recv_timeout(WAIT);
}

unsafe extern "C" fn count_holding_free(user_data: *mut c_void) {
    let s = &*(user_data as *const Holding);
    s.freed.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn an_answer_after_a_stop_is_refused_while_the_deferring_callback_still_runs() {
    let (rt, emulator, url) = ffi_emulator();
    let (tx, tokens) = mpsc::channel();
    let (release, rx) = mpsc::channel();
    let state: &'static Holding = Box::leak(Box::new(Holding {
        tokens: Mutex::new(tx),
        release: Mutex::new(rx),
        freed: AtomicUsize::new(0),
    }));
    let client = ffi_credential_client(
        defer_and_hold,
        state as *const Holding as *mut c_void,
        Some(count_holding_free),
        std::ptr::null(),
    );
    let started = start_on_a_thread(client);
    let token =
        tokens.recv_timeout(WAIT).expect("a credential request") as *mut wps_credential_result;
    check(unsafe { wps_client_stop(client) }, "wps_client_stop");
    let (status, error) = outcome(&started);
    assert_eq!(status, WPS_STATUS_STOPPED, "{error}");
    // The callback has deferred and still runs; its request is abandoned all the same.
    let late = unsafe { wps_credential_result_set_url(token, url.as_ptr()) };
    assert_eq!(late, WPS_STATUS_ILLEGAL_STATE, "{}", last_error());
    release.send(()).unwrap();
    free_on_a_thread(client);
    assert_eq!(state.freed.load(Ordering::SeqCst), 1);
    rt.block_on(emulator.shutdown());
}

/// A credential whose callback, once released, defers and then answers, reporting both
/// statuses and the answer's error.
struct Late {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
    outcome: Mutex<mpsc::Sender<(u32, u32, String)>>,
}

unsafe extern "C" fn defer_when_released(
    user_data: *mut c_void,
    result: *mut wps_credential_result,
) {
    let s = &*(user_data as *const Late);
    s.entered.lock().unwrap().send(()).unwrap();
    let _ = s.release.lock().unwrap().recv_timeout(WAIT);
    let deferred = wps_credential_result_defer(result);
    let answered = wps_credential_result_set_url(result, c"ws://127.0.0.1:1/".as_ptr());
    let _ = s
        .outcome
        .lock()
        .unwrap()
        .send((deferred, answered, last_error()));
}

#[test]
fn a_callback_still_running_when_its_request_is_abandoned_may_defer_and_is_told_of_the_abandonment()
{
    let (rt, emulator, _url) = ffi_emulator();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let (outcome_tx, outcome_rx) = mpsc::channel();
    let state: &'static Late = Box::leak(Box::new(Late {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
        outcome: Mutex::new(outcome_tx),
    }));
    let client = ffi_credential_client(
        defer_when_released,
        state as *const Late as *mut c_void,
        None,
        std::ptr::null(),
    );
    let started = start_on_a_thread(client);
    entered.recv_timeout(WAIT).expect("a credential request");
    check(unsafe { wps_client_stop(client) }, "wps_client_stop");
    let (status, error) = outcome(&started);
    assert_eq!(status, WPS_STATUS_STOPPED, "{error}");

    release.send(()).unwrap();
    let (deferred, answered, error) = outcome_rx.recv_timeout(WAIT).expect("the callback's end");
    assert_eq!(deferred, WPS_STATUS_OK, "the deferral inside the callback");
    assert_eq!(answered, WPS_STATUS_ILLEGAL_STATE, "the answer");
    assert!(error.contains("abandoned"), "{error}");
    free_on_a_thread(client);
    rt.block_on(emulator.shutdown());
}
