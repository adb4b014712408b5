//! The C ABI through a service outage: the service killed (every socket cut without a
//! close frame) and restarted on the same port without the sessions, or never. The
//! asynchronous operations' completions (records included), both dispatch modes, deferred
//! credential answers, cancellation, stop and free while the client recovers or
//! reconnects.
//!
//! The tests take turns (`TURN`): a killed service's port is free, and the system may
//! give it to the service of a test running meanwhile.

mod common;

use common::outage::{client_url, silent_upstream, Service};
use common::{check, Watched};

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use webpubsub_client::ffi::callbacks::{
    wps_ack_record, wps_completion, wps_dispatch_buffers, wps_event, WPS_EVENT_CONNECTED,
    WPS_EVENT_DISCONNECTED, WPS_EVENT_GROUP_MESSAGE, WPS_EVENT_STOPPED,
};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_cancel, wps_client_dispatch_fd, wps_client_dispatch_into,
    wps_client_flush_deferred, wps_client_free, wps_client_join_group, wps_client_join_group_async,
    wps_client_new, wps_client_send_event_async, wps_client_send_to_group_async, wps_client_start,
    wps_client_state, wps_client_stop, wps_client_stop_async,
};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_defer, wps_credential_result_set_url,
};
use webpubsub_client::ffi::options::{
    wps_options, wps_options_free, wps_options_new, wps_options_set_ack_timeout_ms,
    wps_options_set_dispatch_mode, wps_options_set_message_retry, wps_options_set_protocol,
    wps_options_set_reconnect_retry, wps_options_set_recovery, wps_options_set_start_timeout_ms,
};
use webpubsub_client::ffi::status::*;

/// How long any wait of these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// One test at a time (see the module's doc).
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client URL of `user` on `port`, valid for every service of these tests there.
fn url(port: u16, user: &str) -> CString {
    CString::new(client_url(port, user)).unwrap()
}

/// A completion as its callback saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Done {
    status: u32,
    ack_id: Option<u64>,
}

/// What the callbacks of one client saw.
#[derive(Default)]
struct Seen {
    /// Event kinds, in order.
    events: Vec<u32>,
    /// Group message texts, in order.
    messages: Vec<String>,
    /// Per operation id, every completion, in order.
    completions: HashMap<u64, Vec<Done>>,
    /// Poll mode: the ack records written (op id, ackId), in order.
    records: Vec<(u64, Option<u64>)>,
    /// Calls of the client's user data finalizer.
    freed: usize,
    /// Callbacks that ran after the finalizer.
    late: usize,
}

impl Seen {
    fn done(&self, op: u64) -> &[Done] {
        self.completions.get(&op).map_or(&[], Vec::as_slice)
    }
}

type Recorder = Watched<Seen>;

/// A recorder that outlives the test: a client left alive by a failed assertion may
/// still call back.
fn recorder() -> &'static Recorder {
    Box::leak(Box::default())
}

fn user_data(rec: &Recorder) -> *mut c_void {
    rec as *const Recorder as *mut c_void
}

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let rec = &*(user_data as *const Recorder);
    let event = &*event;
    let mut seen = rec.seen.lock().unwrap();
    seen.late += seen.freed;
    seen.events.push(event.kind);
    if event.kind == WPS_EVENT_GROUP_MESSAGE {
        let data = std::slice::from_raw_parts(event.data, event.data_len);
        seen.messages
            .push(String::from_utf8_lossy(data).into_owned());
    }
    rec.changed.notify_all();
}

unsafe extern "C" fn on_complete(user_data: *mut c_void, done: *const wps_completion) {
    let rec = &*(user_data as *const Recorder);
    let done = &*done;
    let mut seen = rec.seen.lock().unwrap();
    seen.late += seen.freed;
    seen.completions.entry(done.op_id).or_default().push(Done {
        status: done.status,
        ack_id: done.has_ack_id.then_some(done.ack_id),
    });
    rec.changed.notify_all();
}

unsafe extern "C" fn on_free(user_data: *mut c_void) {
    let rec = &*(user_data as *const Recorder);
    rec.seen.lock().unwrap().freed += 1;
    rec.changed.notify_all();
}

/// The options of a client of these tests: timers in milliseconds.
struct Opts {
    protocol: u32,
    poll: bool,
    ack_timeout: u64,
    /// Retries of an operation (100 ms apart).
    message_retries: u32,
    /// Retries of a reconnection, and their delay.
    reconnect: (u32, u64),
    /// The recovery window and the delay between its attempts.
    recovery: (u64, u64),
    start_timeout: u64,
}

impl Opts {
    fn new(protocol: u32) -> Opts {
        Opts {
            protocol,
            poll: false,
            ack_timeout: 30_000,
            message_retries: 0,
            reconnect: (u32::MAX, 100),
            recovery: (30_000, 100),
            start_timeout: 5_000,
        }
    }

    fn build(&self) -> *mut wps_options {
        let o = wps_options_new();
        check(wps_options_set_protocol(o, self.protocol), "protocol");
        if self.poll {
            check(
                wps_options_set_dispatch_mode(o, WPS_DISPATCH_POLL),
                "dispatch mode",
            );
        }
        check(
            wps_options_set_ack_timeout_ms(o, self.ack_timeout),
            "ack timeout",
        );
        check(
            wps_options_set_message_retry(o, self.message_retries, 100, 100, WPS_RETRY_FIXED),
            "message retry",
        );
        let (retries, delay) = self.reconnect;
        check(
            wps_options_set_reconnect_retry(o, retries, delay, delay, WPS_RETRY_FIXED),
            "reconnect retry",
        );
        let (window, delay) = self.recovery;
        check(wps_options_set_recovery(o, window, delay), "recovery");
        check(
            wps_options_set_start_timeout_ms(o, self.start_timeout),
            "start timeout",
        );
        o
    }
}

/// A started client of `url` whose callbacks go to `rec` (its finalizer counted there).
/// A poll-mode client is started by a thread that dispatches meanwhile.
fn started(url: &CStr, opts: &Opts, rec: &Recorder) -> *mut wps_client {
    let o = opts.build();
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new(
            url.as_ptr(),
            o,
            Some(on_event),
            user_data(rec),
            Some(on_free),
            &mut c,
        )
    };
    unsafe { wps_options_free(o) };
    check(status, "wps_client_new");
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    if opts.poll {
        pump(c, rec, "connected", |s| s.events == [WPS_EVENT_CONNECTED]);
    } else {
        rec.wait("connected", |s| s.events == [WPS_EVENT_CONNECTED]);
    }
    c
}

/// Sends an event (acked unless `flags` says otherwise) without blocking; its op id.
fn send_event(c: *mut wps_client, flags: u32, rec: &Recorder) -> u64 {
    let mut op = 0;
    let status = unsafe {
        wps_client_send_event_async(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            b"x".as_ptr(),
            1,
            flags,
            Some(on_complete),
            user_data(rec),
            &mut op,
        )
    };
    check(status, "wps_client_send_event_async");
    op
}

/// Sends `text` to group "g" without blocking; its op id.
fn send_to_group(c: *mut wps_client, text: &str, flags: u32, rec: &Recorder) -> u64 {
    let mut op = 0;
    let status = unsafe {
        wps_client_send_to_group_async(
            c,
            c"g".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            text.as_ptr(),
            text.len(),
            flags,
            Some(on_complete),
            user_data(rec),
            &mut op,
        )
    };
    check(status, "wps_client_send_to_group_async");
    op
}

/// Joins group `group` without blocking; its op id.
fn join(c: *mut wps_client, group: &CStr, rec: &Recorder) -> u64 {
    let mut op = 0;
    let status = unsafe {
        wps_client_join_group_async(
            c,
            group.as_ptr(),
            Some(on_complete),
            user_data(rec),
            &mut op,
        )
    };
    check(status, "wps_client_join_group_async");
    op
}

fn state(c: *mut wps_client) -> u32 {
    unsafe { wps_client_state(c) }
}

fn until_state(c: *mut wps_client, wanted: u32) {
    common::wait_until(&format!("state {wanted}"), || state(c) == wanted);
}

/// Frees `c` on another thread; how long the free took (a free that hangs fails the
/// test instead of hanging it).
fn free_timed(c: *mut wps_client) -> Duration {
    let c = c as usize;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let began = Instant::now();
        unsafe { wps_client_free(c as *mut wps_client) };
        let _ = tx.send(began.elapsed());
    });
    rx.recv_timeout(WAIT).expect("wps_client_free returned")
}

/// Asserts that the client's finalizer ran once, after every other callback, and that
/// no operation completed twice.
fn assert_finalized_once(rec: &Recorder) {
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.freed, 1);
    assert_eq!(seen.late, 0, "a callback after the finalizer");
    assert!(
        seen.completions.values().all(|d| d.len() == 1),
        "completed twice: {:?}",
        seen.completions
    );
}

/// Asserts that the client's events were one connection, its loss, then the stop.
fn assert_stopped_after_one_connection(rec: &Recorder) {
    let events = rec.seen.lock().unwrap().events.clone();
    let expected = [
        WPS_EVENT_CONNECTED,
        WPS_EVENT_DISCONNECTED,
        WPS_EVENT_STOPPED,
    ];
    assert_eq!(events, expected);
}

/// Asserts that each of `ops` completed exactly once, as `expected` says: its name, op
/// id, status and whether it has an ackId (`None`: either; see `EITHER`).
fn assert_completed(rec: &Recorder, expected: &[(&str, u64, u32, Option<bool>)]) {
    let seen = rec.seen.lock().unwrap();
    for &(name, op, status, has_ack_id) in expected {
        let done = seen.done(op);
        assert_eq!(done.len(), 1, "{name}: {done:?}");
        assert_eq!(done[0].status, status, "{name}: {done:?}");
        if let Some(has_ack_id) = has_ack_id {
            assert_eq!(done[0].ack_id.is_some(), has_ack_id, "{name}: {done:?}");
        }
    }
}

/// An operation made just before a stop or a free during a recovery reports its ackId
/// when the connection task took it in first; one the stop found still on its way to the
/// task was never written, and reports none.
const EITHER: Option<bool> = None;

/// Whether the descriptor becomes readable within `wait`.
fn readable(fd: i32, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) == 1 }
}

fn dispatch_fd(c: *mut wps_client) -> i32 {
    let mut fd = -1;
    check(unsafe { wps_client_dispatch_fd(c, &mut fd) }, "dispatch fd");
    fd
}

/// Poll mode: dispatches with `wps_client_dispatch_into` (room for ack records, noted in
/// `Seen::records`) whenever the descriptor is readable, until `done` holds for what the
/// callbacks saw. Every readiness found something to dispatch.
fn pump(c: *mut wps_client, rec: &Recorder, what: &str, done: impl Fn(&Seen) -> bool) {
    let fd = dispatch_fd(c);
    let deadline = Instant::now() + WAIT;
    let mut acks = [wps_ack_record {
        user_data: std::ptr::null_mut(),
        op_id: 0,
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: false,
    }; 4];
    while !done(&rec.seen.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "timed out dispatching for {what}"
        );
        if !readable(fd, Duration::from_millis(100)) {
            continue;
        }
        let mut buffers = wps_dispatch_buffers {
            acks: acks.as_mut_ptr(),
            ack_cap: acks.len(),
            messages: std::ptr::null_mut(),
            message_cap: 0,
            ran: 0,
            acks_written: 0,
            messages_written: 0,
            message_bytes: 0,
        };
        check(
            unsafe { wps_client_dispatch_into(c, 64, &mut buffers) },
            "wps_client_dispatch_into",
        );
        let written = acks[..buffers.acks_written]
            .iter()
            .map(|r| (r.op_id, r.has_ack_id.then_some(r.ack_id)));
        rec.seen.lock().unwrap().records.extend(written);
        assert!(
            buffers.ran + buffers.acks_written > 0,
            "readable with nothing to dispatch"
        );
    }
}

/// Operations pending when the service is killed, and made while the client is offline,
/// each complete exactly once when it comes back without the session: the reliable
/// client's recovery is refused, it reconnects, and what it held fails with
/// `NOT_CONNECTED` and its ackId; the json client refused what came while disconnected
/// at once. One cancelled while held completes once with `CANCELLED` and its ackId (the json client's
/// was refused before the cancel, which then finds nothing pending).
fn pending_operations_complete_once_when_the_service_restarts(protocol: u32) {
    let _turn = turn();
    let reliable = protocol == WPS_PROTOCOL_JSON_RELIABLE;
    let (upstream, reached) = silent_upstream();
    let first = Service::start(0, Some(upstream.clone()));
    let port = first.port();
    let rec = recorder();
    let c = started(&url(port, "u"), &Opts::new(protocol), rec);
    // Both wait for the silent upstream's ack (the service posts a connection's events
    // one at a time: the second waits behind the first); the second would be a record in
    // poll mode.
    let in_flight = send_event(c, 0, rec);
    let recorded = send_event(c, WPS_SEND_RECORD, rec);
    common::wait_until("the event reached the upstream", || {
        reached.load(Ordering::SeqCst) >= 1
    });
    first.kill();
    let offline = if reliable {
        WPS_STATE_RECOVERING
    } else {
        WPS_STATE_DISCONNECTED
    };
    common::wait_until(
        "offline",
        || matches!(state(c), s if s == offline || s == WPS_STATE_CONNECTING),
    );
    let during = send_event(c, 0, rec);
    let deferred = send_to_group(c, "deferred", WPS_SEND_DEFERRED, rec);
    check(unsafe { wps_client_flush_deferred(c) }, "flush");
    let joined = join(c, c"j", rec);
    let cancelled = send_event(c, 0, rec);
    // Held by the recovery; refused at once (completed) when disconnected.
    let cancel = unsafe { wps_client_cancel(c, cancelled) };
    assert_eq!(
        cancel,
        if reliable {
            WPS_STATUS_OK
        } else {
            WPS_STATUS_INVALID_ARGUMENT
        }
    );
    std::thread::sleep(Duration::from_millis(300));
    let second = Service::start(port, Some(upstream));
    rec.wait("reconnected", |s| {
        s.events
            == [
                WPS_EVENT_CONNECTED,
                WPS_EVENT_DISCONNECTED,
                WPS_EVENT_CONNECTED,
            ]
    });
    let held = WPS_STATUS_NOT_CONNECTED;
    rec.wait("every completion", |s| s.completions.len() == 6);
    assert_completed(
        rec,
        &[
            ("in flight", in_flight, held, Some(true)),
            ("recorded", recorded, held, Some(true)),
            ("made during", during, held, Some(reliable)),
            ("deferred", deferred, held, Some(reliable)),
            ("joined", joined, held, Some(reliable)),
        ],
    );
    let cancelled_status = if reliable {
        WPS_STATUS_CANCELLED
    } else {
        WPS_STATUS_NOT_CONNECTED
    };
    assert_completed(
        rec,
        &[("cancelled", cancelled, cancelled_status, Some(reliable))],
    );
    // The new connection works, and nothing completes again.
    let after = join(c, c"after", rec);
    rec.wait("the join after", |s| !s.done(after).is_empty());
    assert_completed(rec, &[("after", after, WPS_STATUS_OK, Some(true))]);
    assert!(free_timed(c) < Duration::from_secs(5));
    assert_finalized_once(rec);
    second.kill();
}

#[test]
fn pending_reliable_operations_complete_once_when_the_service_restarts() {
    pending_operations_complete_once_when_the_service_restarts(WPS_PROTOCOL_JSON_RELIABLE);
}

#[test]
fn pending_json_operations_complete_once_when_the_service_restarts() {
    pending_operations_complete_once_when_the_service_restarts(WPS_PROTOCOL_JSON);
}

/// Poll mode, json.reliable, ack timeout 1 s, a 30 s recovery: a recorded send in flight
/// when the service dies and a deferred recorded one made during the recovery fail with
/// `TIMEOUT` and their ackIds through the callback while the recovery goes on. The
/// descriptor is readable for them, and rests while nothing is queued; a free during the
/// recovery returns promptly with the finalizer run.
#[test]
fn poll_mode_sends_time_out_during_a_recovery_and_the_descriptor_rests() {
    let _turn = turn();
    let (upstream, reached) = silent_upstream();
    let service = Service::start(0, Some(upstream));
    let rec = recorder();
    let opts = Opts {
        poll: true,
        ack_timeout: 1_000,
        ..Opts::new(WPS_PROTOCOL_JSON_RELIABLE)
    };
    let c = started(&url(service.port(), "u"), &opts, rec);
    let fd = dispatch_fd(c);
    let in_flight = send_event(c, WPS_SEND_RECORD, rec);
    common::wait_until("the event reached the upstream", || {
        reached.load(Ordering::SeqCst) >= 1
    });
    service.kill();
    until_state(c, WPS_STATE_RECOVERING);
    let made = Instant::now();
    let during = send_event(c, WPS_SEND_RECORD | WPS_SEND_DEFERRED, rec);
    check(unsafe { wps_client_flush_deferred(c) }, "flush");
    pump(c, rec, "the timeouts", |s| s.completions.len() == 2);
    assert!(
        made.elapsed() < Duration::from_secs(4),
        "{:?}",
        made.elapsed()
    );
    assert_completed(
        rec,
        &[
            ("in flight", in_flight, WPS_STATUS_TIMEOUT, Some(true)),
            ("made during", during, WPS_STATUS_TIMEOUT, Some(true)),
        ],
    );
    assert_eq!(state(c), WPS_STATE_RECOVERING);
    // Nothing queued while the client keeps trying (every 100 ms): no wake-up.
    assert!(
        !readable(fd, Duration::from_millis(1_000)),
        "readable with nothing queued"
    );
    assert_eq!(rec.seen.lock().unwrap().events, [WPS_EVENT_CONNECTED]);
    let pending = send_event(c, 0, rec);
    let took = free_timed(c);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_completed(rec, &[("pending", pending, WPS_STATUS_STOPPED, EITHER)]);
    assert_finalized_once(rec);
    assert!(rec.seen.lock().unwrap().records.is_empty());
}

/// Poll mode, json, a service that never comes back: the disconnected event makes the
/// descriptor readable; while the client retries (every 100 ms) it rests; the give-up's
/// stopped event makes it readable again. Operations after the give-up complete at once.
#[test]
fn poll_mode_descriptor_rests_while_a_json_client_reconnects_and_wakes_for_the_give_up() {
    let _turn = turn();
    let service = Service::start(0, None);
    let rec = recorder();
    let opts = Opts {
        poll: true,
        reconnect: (15, 100),
        ..Opts::new(WPS_PROTOCOL_JSON)
    };
    let c = started(&url(service.port(), "u"), &opts, rec);
    let fd = dispatch_fd(c);
    service.kill();
    assert!(readable(fd, WAIT), "no readiness for the disconnection");
    pump(c, rec, "disconnected", |s| s.events.len() == 2);
    assert!(
        !readable(fd, Duration::from_millis(700)),
        "readable with nothing queued while reconnecting"
    );
    pump(c, rec, "the give-up", |s| s.events.len() == 3);
    assert_stopped_after_one_connection(rec);
    assert_eq!(state(c), WPS_STATE_STOPPED);
    let after = send_event(c, 0, rec);
    pump(c, rec, "the send after the give-up", |s| {
        !s.done(after).is_empty()
    });
    assert_completed(
        rec,
        &[("after", after, WPS_STATUS_ILLEGAL_STATE, Some(false))],
    );
    assert!(!readable(fd, Duration::from_millis(200)));
    assert!(free_timed(c) < Duration::from_secs(2));
    assert_finalized_once(rec);
}

/// A reliable client gives up: its 1 s recovery window ends, then its reconnect retries.
/// What it held completes once with `NOT_CONNECTED` and its ackId at the session's loss.
#[test]
fn held_operations_complete_once_when_a_reliable_client_gives_up() {
    let _turn = turn();
    let service = Service::start(0, None);
    let rec = recorder();
    let opts = Opts {
        recovery: (1_000, 100),
        reconnect: (2, 100),
        ..Opts::new(WPS_PROTOCOL_JSON_RELIABLE)
    };
    let c = started(&url(service.port(), "u"), &opts, rec);
    service.kill();
    until_state(c, WPS_STATE_RECOVERING);
    let held = send_event(c, 0, rec);
    let joined = join(c, c"g", rec);
    rec.wait("stopped", |s| s.events.last() == Some(&WPS_EVENT_STOPPED));
    assert_completed(
        rec,
        &[
            ("held", held, WPS_STATUS_NOT_CONNECTED, Some(true)),
            ("joined", joined, WPS_STATUS_NOT_CONNECTED, Some(true)),
        ],
    );
    assert_stopped_after_one_connection(rec);
    assert!(free_timed(c) < Duration::from_secs(2));
    assert_finalized_once(rec);
}

/// `wps_client_stop_async` during an outage: what a reliable client's recovery held
/// completes once with `STOPPED` and its ackId (a json client failed its operations with
/// `NOT_CONNECTED` at the drop, and refuses new ones at once while it reconnects), then the
/// stop completes with `OK`, after the disconnected and stopped events.
fn a_stop_during_an_outage(protocol: u32) {
    let _turn = turn();
    let reliable = protocol == WPS_PROTOCOL_JSON_RELIABLE;
    let (upstream, reached) = silent_upstream();
    let service = Service::start(0, Some(upstream));
    let rec = recorder();
    let c = started(&url(service.port(), "u"), &Opts::new(protocol), rec);
    let in_flight = send_event(c, WPS_SEND_RECORD, rec);
    common::wait_until("the event reached the upstream", || {
        reached.load(Ordering::SeqCst) >= 1
    });
    service.kill();
    if reliable {
        until_state(c, WPS_STATE_RECOVERING);
    } else {
        rec.wait("disconnected", |s| s.events.len() == 2);
    }
    let during = send_to_group(c, "held", 0, rec);
    let mut stop = 0;
    check(
        unsafe { wps_client_stop_async(c, Some(on_complete), user_data(rec), &mut stop) },
        "stop_async",
    );
    rec.wait("the stop", |s| !s.done(stop).is_empty());
    if reliable {
        assert_completed(
            rec,
            &[
                ("in flight", in_flight, WPS_STATUS_STOPPED, Some(true)),
                ("made during", during, WPS_STATUS_STOPPED, EITHER),
            ],
        );
    } else {
        assert_completed(
            rec,
            &[
                ("in flight", in_flight, WPS_STATUS_NOT_CONNECTED, Some(true)),
                ("made during", during, WPS_STATUS_NOT_CONNECTED, Some(false)),
            ],
        );
    }
    assert_completed(rec, &[("stop", stop, WPS_STATUS_OK, Some(false))]);
    assert_stopped_after_one_connection(rec);
    assert_eq!(state(c), WPS_STATE_STOPPED);
    assert!(free_timed(c) < Duration::from_secs(2));
    assert_finalized_once(rec);
}

#[test]
fn a_stop_during_a_recovery_ends_the_held_operations_once_with_stopped() {
    a_stop_during_an_outage(WPS_PROTOCOL_JSON_RELIABLE);
}

#[test]
fn a_stop_during_the_reconnect_back_off_completes_once() {
    a_stop_during_an_outage(WPS_PROTOCOL_JSON);
}

/// A free while the client waits to try again (a reliable client between recovery
/// attempts 10 s apart, a json one between reconnect attempts 10 s apart) returns at once,
/// with what was pending completed once with `STOPPED` and the finalizer run.
fn a_free_while_the_client_waits_to_try_again_returns_promptly(protocol: u32) {
    let _turn = turn();
    let reliable = protocol == WPS_PROTOCOL_JSON_RELIABLE;
    let service = Service::start(0, None);
    let rec = recorder();
    let opts = Opts {
        recovery: (30_000, 10_000),
        reconnect: (u32::MAX, 10_000),
        ..Opts::new(protocol)
    };
    let c = started(&url(service.port(), "u"), &opts, rec);
    service.kill();
    if reliable {
        until_state(c, WPS_STATE_RECOVERING);
    } else {
        rec.wait("disconnected", |s| s.events.len() == 2);
    }
    // The first attempt is made at once, and refused: the next one is 10 s away.
    std::thread::sleep(Duration::from_millis(300));
    let pending = send_event(c, 0, rec);
    let took = free_timed(c);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_finalized_once(rec);
    if reliable {
        assert_completed(rec, &[("pending", pending, WPS_STATUS_STOPPED, EITHER)]);
    } else {
        assert_completed(
            rec,
            &[("pending", pending, WPS_STATUS_NOT_CONNECTED, Some(false))],
        );
    }
}

#[test]
fn a_free_between_recovery_attempts_returns_promptly() {
    a_free_while_the_client_waits_to_try_again_returns_promptly(WPS_PROTOCOL_JSON_RELIABLE);
}

#[test]
fn a_free_during_the_reconnect_back_off_returns_promptly() {
    a_free_while_the_client_waits_to_try_again_returns_promptly(WPS_PROTOCOL_JSON);
}

/// A credential whose callback defers every request and hands its token over.
struct Deferring {
    tokens: Mutex<mpsc::Sender<usize>>,
    /// Calls of the finalizer.
    freed: AtomicUsize,
}

unsafe extern "C" fn defer(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const Deferring);
    check(wps_credential_result_defer(result), "defer");
    let _ = s.tokens.lock().unwrap().send(result as usize);
}

unsafe extern "C" fn count_credential_free(user_data: *mut c_void) {
    let s = &*(user_data as *const Deferring);
    s.freed.fetch_add(1, Ordering::SeqCst);
}

/// How a client of a deferring credential ends while a reconnect's request is pending.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Its single reconnect attempt times out (start timeout 500 ms): it gives up.
    GiveUp,
    Stop,
    Free,
}

/// The service dies and comes back; the client's reconnect asks its credential, which
/// defers. The client gives up, is stopped or is freed before the answer: the answer is
/// then refused with `ILLEGAL_STATE`, and the credential's finalizer runs once.
fn a_late_credential_answer_is_refused(protocol: u32, ending: Ending) {
    let _turn = turn();
    let first = Service::start(0, None);
    let port = first.port();
    let address = url(port, "u");
    let (tx, tokens) = mpsc::channel();
    let cred: &'static Deferring = Box::leak(Box::new(Deferring {
        tokens: Mutex::new(tx),
        freed: AtomicUsize::new(0),
    }));
    let opts = Opts {
        recovery: (500, 100),
        reconnect: (0, 100),
        // A request left unanswered ends the only attempt, and the client gives up.
        start_timeout: if matches!(ending, Ending::GiveUp) {
            500
        } else {
            10_000
        },
        ..Opts::new(protocol)
    };
    let o = opts.build();
    let rec = recorder();
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        webpubsub_client::ffi::client::wps_client_new_with_credential(
            Some(defer),
            cred as *const Deferring as *mut c_void,
            Some(count_credential_free),
            o,
            Some(on_event),
            user_data(rec),
            Some(on_free),
            &mut c,
        )
    };
    unsafe { wps_options_free(o) };
    check(status, "wps_client_new_with_credential");
    // The first request is answered: the client connects.
    let client = c as usize;
    let start = std::thread::spawn(move || unsafe { wps_client_start(client as *mut wps_client) });
    let token = tokens.recv_timeout(WAIT).expect("a credential request");
    check(
        unsafe { wps_credential_result_set_url(token as *mut _, address.as_ptr()) },
        "set_url",
    );
    check(start.join().unwrap(), "start");
    first.kill();
    let second = Service::start(port, None);
    let token = tokens
        .recv_timeout(WAIT)
        .expect("a credential request for the reconnect");
    match ending {
        Ending::GiveUp => {
            rec.wait("stopped", |s| s.events.last() == Some(&WPS_EVENT_STOPPED));
            assert_eq!(state(c), WPS_STATE_STOPPED);
        }
        Ending::Stop => check(unsafe { wps_client_stop(c) }, "stop"),
        Ending::Free => {
            assert!(free_timed(c) < Duration::from_secs(2));
            assert_eq!(
                cred.freed.load(Ordering::SeqCst),
                1,
                "finalized by the free"
            );
        }
    }
    let answer = unsafe { wps_credential_result_set_url(token as *mut _, address.as_ptr()) };
    assert_eq!(answer, WPS_STATUS_ILLEGAL_STATE, "{ending:?}");
    let why = common::last_error();
    assert!(why.contains("not a pending"), "{why}");
    if !matches!(ending, Ending::Free) {
        assert_eq!(state(c), WPS_STATE_STOPPED, "{ending:?}");
        assert!(free_timed(c) < Duration::from_secs(2));
    }
    assert_eq!(cred.freed.load(Ordering::SeqCst), 1);
    assert_finalized_once(rec);
    // No further request came.
    assert!(tokens.try_recv().is_err());
    second.kill();
}

#[test]
fn a_late_credential_answer_after_a_json_client_gave_up_is_refused() {
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON, Ending::GiveUp);
}

#[test]
fn a_late_credential_answer_after_a_reliable_client_gave_up_is_refused() {
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON_RELIABLE, Ending::GiveUp);
}

#[test]
fn a_late_credential_answer_after_a_stop_during_an_outage_is_refused() {
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON, Ending::Stop);
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON_RELIABLE, Ending::Stop);
}

#[test]
fn a_late_credential_answer_after_a_free_during_an_outage_is_refused() {
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON, Ending::Free);
    a_late_credential_answer_is_refused(WPS_PROTOCOL_JSON_RELIABLE, Ending::Free);
}

/// A TCP forwarder in front of a service: `cut` closes every tunnel without a close frame
/// and closes new connections at once (the network is down, the service keeps the
/// sessions); `restore` forwards again.
struct Gate {
    rt: tokio::runtime::Runtime,
    port: u16,
    up: Arc<AtomicBool>,
    tunnels: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Gate {
    fn start(target: u16) -> Gate {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let (open, held) = (Arc::clone(&up), Arc::clone(&tunnels));
        rt.spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    let mut service = tokio::net::TcpStream::connect(("127.0.0.1", target))
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut service).await;
                });
                held.lock().unwrap().push(task.abort_handle());
            }
        });
        Gate {
            rt,
            port,
            up,
            tunnels,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for tunnel in self.tunnels.lock().unwrap().drain(..) {
            tunnel.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The network to the service is down for a while (the session survives): operations
/// made meanwhile are held by the recovery, and one cancelled then completes once with
/// `CANCELLED` and is never written once the connection is recovered, while the others
/// go out in order and succeed (in poll mode, as ack records).
fn a_cancelled_operation_held_by_a_recovery_is_never_written(poll: bool) {
    let _turn = turn();
    let service = Service::start(0, None);
    let gate = Gate::start(service.port());
    let receiver_rec = recorder();
    let receiver = started(
        &url(service.port(), "r"),
        &Opts::new(WPS_PROTOCOL_JSON_RELIABLE),
        receiver_rec,
    );
    check(
        unsafe { wps_client_join_group(receiver, c"g".as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let rec = recorder();
    let sender_url = url(service.port(), "s").into_string().unwrap().replace(
        &format!(":{}/", service.port()),
        &format!(":{}/", gate.port),
    );
    let opts = Opts {
        poll,
        ..Opts::new(WPS_PROTOCOL_JSON_RELIABLE)
    };
    let sender = started(&CString::new(sender_url).unwrap(), &opts, rec);
    let settle = |what: &str, done: &dyn Fn(&Seen) -> bool| {
        if poll {
            pump(sender, rec, what, done);
        } else {
            rec.wait(what, done);
        }
    };
    gate.cut();
    until_state(sender, WPS_STATE_RECOVERING);
    let first = send_to_group(sender, "first", WPS_SEND_RECORD, rec);
    let cancelled = send_to_group(sender, "cancelled", WPS_SEND_RECORD, rec);
    let deferred = send_to_group(
        sender,
        "deferred-cancelled",
        WPS_SEND_DEFERRED | WPS_SEND_RECORD,
        rec,
    );
    let last = send_to_group(sender, "last", WPS_SEND_RECORD, rec);
    check(unsafe { wps_client_cancel(sender, cancelled) }, "cancel");
    check(
        unsafe { wps_client_cancel(sender, deferred) },
        "cancel deferred",
    );
    settle("the cancellations", &|s| {
        !s.done(cancelled).is_empty() && !s.done(deferred).is_empty()
    });
    gate.restore();
    let sends = [first, last];
    if poll {
        settle("the records", &|s| s.records.len() == 2);
        let seen = rec.seen.lock().unwrap();
        assert_eq!(
            seen.records.iter().map(|r| r.0).collect::<Vec<_>>(),
            sends,
            "{:?}",
            seen.records
        );
        assert!(seen.records.iter().all(|r| r.1.is_some()));
        assert!(sends.iter().all(|op| seen.done(*op).is_empty()));
    } else {
        settle("the sends", &|s| s.completions.len() == 4);
        assert_completed(
            rec,
            &[
                ("first", first, WPS_STATUS_OK, Some(true)),
                ("last", last, WPS_STATUS_OK, Some(true)),
            ],
        );
    }
    assert_completed(
        rec,
        &[
            ("cancelled", cancelled, WPS_STATUS_CANCELLED, Some(true)),
            ("deferred", deferred, WPS_STATUS_CANCELLED, Some(true)),
        ],
    );
    receiver_rec.wait("the messages", |s| {
        s.messages.last().map(String::as_str) == Some("last")
    });
    // Written in order: had a cancelled one been written, it would have come before "last".
    assert_eq!(
        receiver_rec.seen.lock().unwrap().messages,
        ["first", "last"]
    );
    assert_eq!(
        rec.seen.lock().unwrap().events,
        [WPS_EVENT_CONNECTED],
        "recovered without a new connection"
    );
    for op in [cancelled, deferred] {
        assert_eq!(
            unsafe { wps_client_cancel(sender, op) },
            WPS_STATUS_INVALID_ARGUMENT
        );
    }
    assert!(free_timed(sender) < Duration::from_secs(2));
    assert!(free_timed(receiver) < Duration::from_secs(2));
    assert_finalized_once(rec);
    assert_finalized_once(receiver_rec);
    gate.rt.shutdown_background();
    service.kill();
}

#[test]
fn an_operation_held_by_a_recovery_and_cancelled_is_never_written() {
    a_cancelled_operation_held_by_a_recovery_is_never_written(false);
}

#[test]
fn a_recorded_operation_held_by_a_recovery_and_cancelled_is_never_written_in_poll_mode() {
    a_cancelled_operation_held_by_a_recovery_is_never_written(true);
}

/// A completion callback that records the completion, then frees its client.
struct FreeOnComplete {
    client: AtomicUsize,
    rec: &'static Recorder,
}

unsafe extern "C" fn free_on_complete(data: *mut c_void, done: *const wps_completion) {
    let f = &*(data as *const FreeOnComplete);
    on_complete(user_data(f.rec), done);
    wps_client_free(f.client.load(Ordering::SeqCst) as *mut wps_client);
}

/// A reliable client recovering from a dead service is freed by the `TIMEOUT` completion
/// of its in-flight send: the send it held meanwhile (made later, its deadline not passed)
/// completes once with `STOPPED` and its ackId, then the finalizer runs, once.
fn freed_in_a_completion_during_a_recovery(poll: bool) {
    let _turn = turn();
    let (upstream, reached) = silent_upstream();
    let service = Service::start(0, Some(upstream));
    let rec = recorder();
    let opts = Opts {
        poll,
        ack_timeout: 1_000,
        ..Opts::new(WPS_PROTOCOL_JSON_RELIABLE)
    };
    let c = started(&url(service.port(), "u"), &opts, rec);
    let freer: &'static FreeOnComplete = Box::leak(Box::new(FreeOnComplete {
        client: AtomicUsize::new(c as usize),
        rec,
    }));
    let mut in_flight = 0;
    let status = unsafe {
        wps_client_send_event_async(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_TEXT,
            b"x".as_ptr(),
            1,
            WPS_SEND_RECORD,
            Some(free_on_complete),
            freer as *const FreeOnComplete as *mut c_void,
            &mut in_flight,
        )
    };
    check(status, "wps_client_send_event_async");
    common::wait_until("the event reached the upstream", || {
        reached.load(Ordering::SeqCst) >= 1
    });
    service.kill();
    until_state(c, WPS_STATE_RECOVERING);
    let held = send_to_group(c, "held", 0, rec);
    if poll {
        pump(c, rec, "the timeout", |s| !s.done(in_flight).is_empty());
    }
    rec.wait("the finalizer", |s| s.freed == 1);
    assert_completed(
        rec,
        &[
            ("in flight", in_flight, WPS_STATUS_TIMEOUT, Some(true)),
            ("held", held, WPS_STATUS_STOPPED, Some(true)),
        ],
    );
    assert_finalized_once(rec);
}

#[test]
fn a_free_in_a_completion_during_a_recovery_ends_the_rest_once() {
    freed_in_a_completion_during_a_recovery(false);
}

#[test]
fn a_free_in_a_dispatched_completion_during_a_recovery_ends_the_rest_once() {
    freed_in_a_completion_during_a_recovery(true);
}
