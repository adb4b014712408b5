//! `wps_client_free` releases everything of the client before it returns: its
//! connection task has ended and dropped its state (pending-ack table, buffers), so a
//! program that exits right after it leaves nothing behind for a leak checker.

mod common;

use common::check;

use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::ThreadId;
use std::time::Duration;

use tokio::runtime::Runtime;
use webpubsub_client::ffi::callbacks::{
    wps_completion, wps_event, WPS_EVENT_CONNECTED, WPS_EVENT_DISCONNECTED,
    WPS_EVENT_GROUP_MESSAGE, WPS_EVENT_STOPPED,
};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_join_group, wps_client_send_event_async,
    wps_client_send_to_group, wps_client_start, wps_client_stop, wps_client_stop_async,
};
use webpubsub_client::ffi::status::{WPS_DATA_TYPE_TEXT, WPS_STATUS_STOPPED};
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

/// What the callbacks of the clients of a test did, in the order they ran: `connected`,
/// `disconnected` (with whether it has a message), `stopped` (its status, whether it has
/// a message), a group message's text, `c <status> <has ackId>` for a completion,
/// `finalized`, and the marks of the test's own callbacks.
type Timeline = common::Watched<Vec<String>>;

fn timeline_data(t: &Timeline) -> *mut c_void {
    t as *const Timeline as *mut c_void
}

unsafe extern "C" fn note_event(user_data: *mut c_void, event: *const wps_event) {
    let timeline = &*(user_data as *const Timeline);
    let e = &*event;
    let entry = match e.kind {
        WPS_EVENT_CONNECTED => "connected".to_owned(),
        WPS_EVENT_DISCONNECTED => format!("disconnected message:{}", !e.message.is_null()),
        WPS_EVENT_STOPPED => format!("stopped {} message:{}", e.status, !e.message.is_null()),
        WPS_EVENT_GROUP_MESSAGE => {
            String::from_utf8_lossy(std::slice::from_raw_parts(e.data, e.data_len)).into_owned()
        }
        kind => format!("event {kind}"),
    };
    timeline.seen.lock().unwrap().push(entry);
    timeline.changed.notify_all();
}

unsafe extern "C" fn note_completion(user_data: *mut c_void, done: *const wps_completion) {
    let timeline = &*(user_data as *const Timeline);
    let done = &*done;
    let entry = format!("c {} {}", done.status, done.has_ack_id);
    timeline.seen.lock().unwrap().push(entry);
    timeline.changed.notify_all();
}

unsafe extern "C" fn note_finalized(user_data: *mut c_void) {
    let timeline = &*(user_data as *const Timeline);
    timeline.seen.lock().unwrap().push("finalized".into());
    timeline.changed.notify_all();
}

/// A client of `url` whose callbacks write to `timeline`, in poll mode when `poll`.
fn noted_client(url: &CStr, timeline: &Timeline, poll: bool) -> *mut wps_client {
    let new = if poll {
        common::ffi_poll_client
    } else {
        common::ffi_client
    };
    new(
        url,
        Some(note_event),
        timeline_data(timeline),
        Some(note_finalized),
    )
}

/// Starts an event to the silent upstream of `emulator` (acked once it answers, which it
/// never does) whose completion goes to `timeline`; returns once the upstream has it.
fn pending_event(rt: &Runtime, emulator: &Emulator, c: *mut wps_client, timeline: &Timeline) {
    let before = rt.block_on(common::stats(emulator))["upstreamRequests"]
        .as_u64()
        .unwrap_or(0);
    let status = unsafe {
        wps_client_send_event_async(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            b"x".as_ptr(),
            1,
            0,
            Some(note_completion),
            timeline_data(timeline),
            std::ptr::null_mut(),
        )
    };
    check(status, "wps_client_send_event_async");
    rt.block_on(common::until_stats(
        emulator,
        "the event at the upstream",
        30,
        |s| s["upstreamRequests"].as_u64() > Some(before),
    ));
}

/// The header (`wps_client_free`): a thread-mode client freed outside its callbacks gets
/// the events of the free's stop (disconnected, then stopped with `WPS_STATUS_OK` and no
/// message) after those queued before, and its pending operation's completion, all
/// before its finalizer, which runs last, before the free returns. A poll-mode client
/// gets no event once the free begins (its queued connected event is dropped): only the
/// completion and the finalizer, on a library thread, before the free returns.
#[test]
fn a_free_delivers_the_events_of_its_stop_in_thread_mode_and_none_in_poll_mode() {
    let _serial = serial();
    let rt = Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);

    let threaded = common::leaked::<Timeline>();
    let c = noted_client(&url, threaded, false);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    pending_event(&rt, &emulator, c, threaded);
    unsafe { wps_client_free(c) };
    let seen = threaded.seen.lock().unwrap().clone();
    let at = |entry: &str| seen.iter().position(|e| e == entry);
    let (disconnected, stopped, completed) = (
        at("disconnected message:true"),
        at("stopped 0 message:false"),
        at(&format!("c {WPS_STATUS_STOPPED} true")),
    );
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[0], "connected", "{seen:?}");
    assert!(disconnected.is_some() && completed.is_some(), "{seen:?}");
    assert!(disconnected < stopped, "{seen:?}");
    assert_eq!(seen[4], "finalized", "{seen:?}");

    let polled = common::leaked::<Timeline>();
    let c = noted_client(&url, polled, true);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    pending_event(&rt, &emulator, c, polled);
    unsafe { wps_client_free(c) };
    assert_eq!(
        *polled.seen.lock().unwrap(),
        [format!("c {WPS_STATUS_STOPPED} true"), "finalized".into()]
    );
    rt.block_on(emulator.shutdown());
}

/// The client that `free_other_on_message` frees, and where it notes what it did (and
/// on which thread).
struct FreesOther {
    other: AtomicPtr<wps_client>,
    other_timeline: &'static Timeline,
    thread: Mutex<Option<ThreadId>>,
}

/// The thread of the last event that `note_event_on_thread` noted.
static NOTED_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);

/// As `note_event`, noting the thread first.
unsafe extern "C" fn note_event_on_thread(user_data: *mut c_void, event: *const wps_event) {
    *NOTED_THREAD.lock().unwrap() = Some(std::thread::current().id());
    note_event(user_data, event);
}

/// On the group message "free b": frees the other client, and returns a while later.
unsafe extern "C" fn free_other_on_message(user_data: *mut c_void, event: *const wps_event) {
    let this = &*(user_data as *const FreesOther);
    let e = &*event;
    if e.kind != WPS_EVENT_GROUP_MESSAGE
        || std::slice::from_raw_parts(e.data, e.data_len) != b"free b"
    {
        return;
    }
    let note = |entry: &str| {
        this.other_timeline.seen.lock().unwrap().push(entry.into());
        this.other_timeline.changed.notify_all();
    };
    *this.thread.lock().unwrap() = Some(std::thread::current().id());
    note("A frees B");
    wps_client_free(this.other.load(Ordering::SeqCst));
    // Time for a teardown that did not wait for this callback to show.
    std::thread::sleep(Duration::from_millis(100));
    note("A returns");
}

/// The header (`wps_client_free`): freed inside a callback of another client, the free
/// returns at once; no further event of the freed client is delivered (not those of its
/// stop), and once that callback has returned its pending operation completes with
/// `WPS_STATUS_STOPPED` (and its ackId), then its finalizer runs. The two clients share
/// a dispatcher thread, where a free that waited for the teardown would deadlock.
#[test]
fn a_client_freed_in_another_clients_callback_is_torn_down_after_that_callback() {
    let _serial = serial();
    let rt = Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);
    let b_timeline = common::leaked::<Timeline>();
    let frees: &FreesOther = Box::leak(Box::new(FreesOther {
        other: AtomicPtr::default(),
        other_timeline: b_timeline,
        thread: Mutex::new(None),
    }));
    let a = common::ffi_client(
        &url,
        Some(free_other_on_message),
        frees as *const FreesOther as *mut c_void,
        None,
    );
    // Dispatcher threads are assigned round robin: 12 clients on is A's thread again,
    // whatever the pool's size (1 to 4 threads).
    let fillers: Vec<_> = (1..12)
        .map(|_| common::ffi_client(&url, None, std::ptr::null_mut(), None))
        .collect();
    let b = common::ffi_client(
        &url,
        Some(note_event_on_thread),
        timeline_data(b_timeline),
        Some(note_finalized),
    );
    frees.other.store(b, Ordering::SeqCst);
    check(unsafe { wps_client_start(a) }, "wps_client_start");
    check(
        unsafe { wps_client_join_group(a, c"g".as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    check(unsafe { wps_client_start(b) }, "wps_client_start");
    b_timeline.wait("the connected event of B", |t| !t.is_empty());
    pending_event(&rt, &emulator, b, b_timeline);
    check(common::ffi_send_text(b, c"g", "free b", 0), "send");
    b_timeline.wait("the finalizer of B", |t| t.iter().any(|e| e == "finalized"));
    assert_eq!(
        *frees.thread.lock().unwrap(),
        *NOTED_THREAD.lock().unwrap(),
        "A's callback and B's events on different threads"
    );
    assert_eq!(
        *b_timeline.seen.lock().unwrap(),
        [
            "connected".to_owned(),
            "A frees B".into(),
            "A returns".into(),
            format!("c {WPS_STATUS_STOPPED} true"),
            "finalized".into(),
        ]
    );
    unsafe { wps_client_free(a) };
    for filler in fillers {
        unsafe { wps_client_free(filler) };
    }
    rt.block_on(emulator.shutdown());
}

/// The header (`wps_event`): a stop by the application, blocking or not, raises the
/// disconnected event with its reason, then the stopped event with `WPS_STATUS_OK` and
/// no message.
#[test]
fn a_stop_by_the_application_raises_a_stopped_event_without_a_message() {
    let _serial = serial();
    let rt = Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap();
    let timeline = common::leaked::<Timeline>();
    let c = noted_client(&url, timeline, false);
    unsafe {
        check(wps_client_start(c), "wps_client_start");
        check(wps_client_stop(c), "wps_client_stop");
        check(wps_client_start(c), "wps_client_start");
        check(
            wps_client_stop_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()),
            "wps_client_stop_async",
        );
    }
    timeline.wait("the second stopped event", |t| t.len() == 6);
    unsafe { wps_client_free(c) };
    let lifecycle = [
        "connected",
        "disconnected message:true",
        "stopped 0 message:false",
    ];
    assert_eq!(
        *timeline.seen.lock().unwrap(),
        [&lifecycle[..], &lifecycle[..], &["finalized"]].concat()
    );
    rt.block_on(emulator.shutdown());
}
