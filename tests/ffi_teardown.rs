//! `wps_client_free` releases everything of the client before it returns: its
//! connection task has ended and dropped its state (pending-ack table, buffers), so a
//! program that exits right after it leaves nothing behind for a leak checker.

mod common;

use common::check;

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use webpubsub_client::ffi::callbacks::wps_event;
use webpubsub_client::ffi::client::{wps_client_free, wps_client_send_to_group, wps_client_start};
use webpubsub_client::ffi::status::WPS_DATA_TYPE_TEXT;
use webpubsub_emulator::{Config, Emulator};

/// Counts the connection tasks that ended (their last log record), synchronously, and
/// the records that tell of the client's state.
struct TaskEnds;

static ENDED: AtomicUsize = AtomicUsize::new(0);
/// The `stopped` records of the connection tasks (a stop is answered right after).
static STOPPED: common::Watched<usize> = common::Watched {
    seen: Mutex::new(0),
    changed: std::sync::Condvar::new(),
};
/// The warnings of `wps_client_free` that a connection task did not end in time.
static LATE_ENDS: AtomicUsize = AtomicUsize::new(0);
/// While set, a connection task takes a second over its last record: its end is slow.
static SLOW_END: AtomicBool = AtomicBool::new(false);

impl log::Log for TaskEnds {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with("webpubsub_client::")
    }

    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        match record.target() {
            "webpubsub_client::client::connection" if text.contains("connection task ends") => {
                if SLOW_END.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(1));
                }
                ENDED.fetch_add(1, Ordering::SeqCst);
            }
            "webpubsub_client::client::connection" if text == "stopped" => {
                *STOPPED.seen.lock().unwrap() += 1;
                STOPPED.changed.notify_all();
            }
            "webpubsub_client::ffi::client" if text.contains("did not end") => {
                LATE_ENDS.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    fn flush(&self) {}
}

static LOGGER: TaskEnds = TaskEnds;

/// Installs the logger; the lock keeps the tests of this file from running at once (they
/// count the task ends of the whole process).
fn serial() -> MutexGuard<'static, ()> {
    static INSTALL: Once = Once::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    INSTALL.call_once(|| {
        log::set_logger(&LOGGER).unwrap();
        log::set_max_level(log::LevelFilter::Debug);
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn free_returns_after_the_connection_task_has_ended() {
    const CLIENTS: usize = 20;
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap();

    for i in 0..CLIENTS {
        let c = common::ffi_client(&url, None, std::ptr::null_mut(), None);
        check(unsafe { wps_client_start(c) }, "wps_client_start");
        // An acked send: the task's pending-ack table holds memory from here on.
        let text = format!("m{i}");
        let status = unsafe {
            wps_client_send_to_group(
                c,
                c"g".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                text.as_ptr(),
                text.len(),
                0,
                std::ptr::null_mut(),
            )
        };
        check(status, "wps_client_send_to_group");
        let before = ENDED.load(Ordering::SeqCst);
        unsafe { wps_client_free(c) };
        assert_eq!(
            ENDED.load(Ordering::SeqCst),
            before + 1,
            "client {i}: wps_client_free returned before its connection task ended"
        );
    }
}

/// The state of `hold_first_event`'s client.
#[derive(Default)]
struct Held {
    entered: bool,
    released: bool,
}

/// Holds the dispatcher thread in the client's first event until the test releases it.
unsafe extern "C" fn hold_first_event(user_data: *mut c_void, _event: *const wps_event) {
    let held = &*(user_data as *const common::Watched<Held>);
    let first = !std::mem::replace(&mut held.seen.lock().unwrap().entered, true);
    held.changed.notify_all();
    if first {
        held.wait("the test's release", |h| h.released);
    }
}

#[test]
fn free_returns_after_the_task_ended_when_the_dispatcher_was_busy_for_long() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap();
    let held = Arc::new(common::Watched::<Held>::default());
    let c = common::ffi_client(
        &url,
        Some(hold_first_event),
        Arc::as_ptr(&held) as *mut c_void,
        None,
    );
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    held.wait("the connected callback", |h| h.entered);

    // The callback goes on for 3 s after the free's stop: longer than the 2 s the free
    // waits for the connection task's end (which follows the finalizer), so that wait
    // runs out before the finalizer ran. The task then ends slowly.
    let stops = *STOPPED.seen.lock().unwrap();
    let releaser = {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            STOPPED.wait("the free's stop", |n| *n > stops);
            std::thread::sleep(Duration::from_secs(3));
            held.seen.lock().unwrap().released = true;
            held.changed.notify_all();
        })
    };
    SLOW_END.store(true, Ordering::SeqCst);
    let (ends, late) = (
        ENDED.load(Ordering::SeqCst),
        LATE_ENDS.load(Ordering::SeqCst),
    );
    unsafe { wps_client_free(c) };
    let ended = ENDED.load(Ordering::SeqCst);
    SLOW_END.store(false, Ordering::SeqCst);
    releaser.join().unwrap();
    assert_eq!(
        ended,
        ends + 1,
        "wps_client_free returned before its connection task ended"
    );
    assert_eq!(
        LATE_ENDS.load(Ordering::SeqCst),
        late,
        "no warning: the task ended at once after the finalizer"
    );
    rt.block_on(emulator.shutdown());
}
