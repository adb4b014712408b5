//! `wps_set_log_callback` while other threads log: a callback gets no record above the
//! level it was set with, and none once a call replacing it has returned. The callback
//! is process-wide, so this is a test binary of its own; its tests take turns.

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use webpubsub_client::ffi::status::{WPS_LOG_ERROR, WPS_LOG_TRACE, WPS_STATUS_OK};

type LogCallback = unsafe extern "C" fn(*mut c_void, u32, *const c_char, *const c_char);

extern "C" {
    /// The C API's `wps_set_log_callback` (exported by the library crate).
    fn wps_set_log_callback(cb: Option<LogCallback>, user_data: *mut c_void, max_level: u32)
        -> u32;
}

/// The tests share the process's callback: one at a time.
static TURN: Mutex<()> = Mutex::new(());

/// What one registration of `on_log` was set with, and what it got.
struct Sink {
    max_level: u32,
    /// Set once the call that replaced this registration has returned.
    retired: AtomicBool,
    calls: AtomicUsize,
    above_level: AtomicUsize,
    after_retired: AtomicUsize,
}

impl Sink {
    const fn new(max_level: u32) -> Sink {
        Sink {
            max_level,
            retired: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            above_level: AtomicUsize::new(0),
            after_retired: AtomicUsize::new(0),
        }
    }
}

unsafe extern "C" fn on_log(
    user_data: *mut c_void,
    level: u32,
    _target: *const c_char,
    _message: *const c_char,
) {
    let sink = unsafe { &*(user_data as *const Sink) };
    sink.calls.fetch_add(1, Ordering::SeqCst);
    if level > sink.max_level {
        sink.above_level.fetch_add(1, Ordering::SeqCst);
    }
    if sink.retired.load(Ordering::SeqCst) {
        sink.after_retired.fetch_add(1, Ordering::SeqCst);
    }
}

fn set(sink: &Sink) {
    let user_data = sink as *const Sink as *mut c_void;
    let status = unsafe { wps_set_log_callback(Some(on_log), user_data, sink.max_level) };
    assert_eq!(status, WPS_STATUS_OK);
}

/// Runs `body` while two threads log records of the library's target at the error and
/// trace levels as fast as they can.
fn while_logging(body: impl FnOnce()) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    log::error!(target: "webpubsub_client::probe", "an error");
                    log::trace!(target: "webpubsub_client::probe", "a trace");
                }
            });
        }
        body();
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        unsafe { wps_set_log_callback(None, std::ptr::null_mut(), 0) },
        WPS_STATUS_OK
    );
}

/// Switching between a callback set for errors only and one set for everything: the
/// first never gets a trace record, the switch in either direction.
#[test]
fn a_callback_gets_nothing_above_its_level_while_the_level_changes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    static ERRORS: Sink = Sink::new(WPS_LOG_ERROR);
    static ALL: Sink = Sink::new(WPS_LOG_TRACE);
    let deadline = Instant::now() + Duration::from_secs(3);
    while_logging(|| {
        while Instant::now() < deadline && ERRORS.above_level.load(Ordering::SeqCst) == 0 {
            set(&ERRORS);
            set(&ALL);
        }
    });
    assert!(ERRORS.calls.load(Ordering::SeqCst) > 0);
    assert!(ALL.calls.load(Ordering::SeqCst) > 0);
    assert_eq!(
        ERRORS.above_level.load(Ordering::SeqCst),
        0,
        "the callback set for errors got trace records"
    );
}

/// A callback replaced (by another, or by none) is not called once the replacing call
/// has returned, while records keep coming: its user data may be freed then.
#[test]
fn a_replaced_callback_is_not_called_after_the_call_that_replaced_it_returned() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let sinks: Vec<Sink> = (0..500).map(|_| Sink::new(WPS_LOG_TRACE)).collect();
    while_logging(|| {
        for (i, sink) in sinks.iter().enumerate() {
            set(sink);
            if i % 2 == 1 {
                let off = unsafe { wps_set_log_callback(None, std::ptr::null_mut(), 0) };
                assert_eq!(off, WPS_STATUS_OK);
            }
            if i > 0 {
                sinks[i - 1].retired.store(true, Ordering::SeqCst);
            }
        }
    });
    let late: usize = sinks
        .iter()
        .map(|s| s.after_retired.load(Ordering::SeqCst))
        .sum();
    assert_eq!(late, 0, "records reached replaced callbacks");
    assert!(sinks.iter().any(|s| s.calls.load(Ordering::SeqCst) > 0));
}
