//! The C ABI's asynchronous acked operations driven from Rust, like a C program would:
//! order, exactly-once completions, cancellation, refusals, deferred sends, bursts far
//! larger than the core's operation queue, threads mixing every form across socket
//! drops, and a poll-mode client whose dispatch is suspended.

mod common;

use common::check;

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use webpubsub_client::ffi::callbacks::{
    wps_ack_record, wps_completion, wps_dispatch_buffers, wps_event, wps_event_cb,
    wps_message_record, WPS_EVENT_CONNECTED, WPS_EVENT_DISCONNECTED, WPS_EVENT_GROUP_MESSAGE,
    WPS_EVENT_STOPPED, WPS_MESSAGE_HAS_FROM_USER_ID, WPS_MESSAGE_HAS_SEQUENCE_ID,
};
use webpubsub_client::ffi::client::{
    wps_ack_result, wps_client, wps_client_cancel, wps_client_connection_id, wps_client_dispatch,
    wps_client_dispatch_into, wps_client_dispatch_records, wps_client_dispatch_resume,
    wps_client_dispatch_suspend, wps_client_flush_deferred, wps_client_free,
    wps_client_invoke_event_async, wps_client_join_group, wps_client_join_group_async,
    wps_client_new, wps_client_send_event_async, wps_client_send_to_group,
    wps_client_send_to_group_async, wps_client_send_to_group_with_ack_id,
    wps_client_send_to_group_with_ack_id_async, wps_client_start, wps_client_start_async,
    wps_client_state, wps_client_stop, wps_client_stop_async,
};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_ack_timeout_ms,
    wps_options_set_dispatch_mode, wps_options_set_keep_alive, wps_options_set_message_retry,
    wps_options_set_reconnect_retry, wps_options_set_recovery,
};
use webpubsub_client::ffi::status::{
    wps_last_error_message, WPS_DATA_TYPE_JSON, WPS_DATA_TYPE_TEXT, WPS_DISPATCH_POLL,
    WPS_RETRY_FIXED, WPS_SEND_DEFERRED, WPS_SEND_FIRE_AND_FORGET, WPS_SEND_RECORD,
    WPS_STATE_CONNECTED, WPS_STATE_RECOVERING, WPS_STATE_STOPPED, WPS_STATUS_CANCELLED,
    WPS_STATUS_ILLEGAL_STATE, WPS_STATUS_INVALID_ARGUMENT, WPS_STATUS_INVALID_UTF8,
    WPS_STATUS_NOT_CONNECTED, WPS_STATUS_NULL_ARG, WPS_STATUS_OK, WPS_STATUS_STOPPED,
    WPS_STATUS_TIMEOUT,
};
use webpubsub_emulator::{Config, Emulator};

/// How long any wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// What the callbacks of one client saw.
#[derive(Default)]
struct Seen {
    /// Group message texts, in arrival order.
    messages: Vec<String>,
    /// Per operation id: the statuses its completions reported, in order.
    completions: HashMap<u64, Vec<u32>>,
    /// Completions that carried an ackId.
    acked: usize,
    /// Per operation id: the ackId its completion carried.
    ack_ids: HashMap<u64, u64>,
    /// Completions whose ackId the service had already processed.
    duplicated: usize,
    /// Group messages (`m <group> <sender or -> <text>`), the connected, disconnected and
    /// stopped events (`connected`, ...) and completions (`c <op id>`), in the order the
    /// callbacks ran.
    timeline: Vec<String>,
}

type Recorder = common::Watched<Seen>;

impl Recorder {
    fn user_data(&self) -> *mut c_void {
        self as *const Recorder as *mut c_void
    }
}

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let rec = &*(user_data as *const Recorder);
    let event = &*event;
    let lifecycle = match event.kind {
        WPS_EVENT_CONNECTED => Some("connected"),
        WPS_EVENT_DISCONNECTED => Some("disconnected"),
        WPS_EVENT_STOPPED => Some("stopped"),
        _ => None,
    };
    if let Some(name) = lifecycle {
        rec.seen.lock().unwrap().timeline.push(name.into());
        rec.changed.notify_all();
    }
    if event.kind == WPS_EVENT_GROUP_MESSAGE {
        let data = std::slice::from_raw_parts(event.data, event.data_len);
        let text = String::from_utf8_lossy(data).into_owned();
        let group = CStr::from_ptr(event.group).to_string_lossy();
        let from = match event.from_user_id.is_null() {
            true => "-".into(),
            false => CStr::from_ptr(event.from_user_id).to_string_lossy(),
        };
        let mut seen = rec.seen.lock().unwrap();
        seen.timeline.push(format!("m {group} {from} {text}"));
        seen.messages.push(text);
        rec.changed.notify_all();
    }
}

unsafe extern "C" fn on_complete(user_data: *mut c_void, done: *const wps_completion) {
    let rec = &*(user_data as *const Recorder);
    let done = &*done;
    let mut seen = rec.seen.lock().unwrap();
    seen.timeline.push(format!("c {}", done.op_id));
    seen.completions
        .entry(done.op_id)
        .or_default()
        .push(done.status);
    if done.has_ack_id {
        seen.acked += 1;
        seen.ack_ids.insert(done.op_id, done.ack_id);
    }
    if done.is_duplicated {
        seen.duplicated += 1;
    }
    rec.changed.notify_all();
}

/// An emulator and clients of one hub that may join and publish to any group.
struct Setup {
    rt: tokio::runtime::Runtime,
    emulator: Emulator,
    url: CString,
}

impl Setup {
    fn new() -> Setup {
        let rt = tokio::runtime::Runtime::new().unwrap();
        // A receiver of a 5,000 message burst may fall more than the default 1,000
        // frames behind with its sequence acks on a busy machine; the emulator would
        // then end its session, which is not what these tests are about.
        let config = Config {
            max_unacked_frames: 100_000,
            ..Config::default()
        };
        let emulator = rt.block_on(Emulator::start(config)).unwrap();
        let token = common::user_token("u");
        let url = CString::new(emulator.client_url("hub", &token)).unwrap();
        Setup { rt, emulator, url }
    }

    /// A client whose events and completions go to `rec`; started when `start`.
    fn client(&self, rec: &Recorder, start: bool) -> *mut wps_client {
        client_of(&self.url, rec, start)
    }

    /// Two started clients, the second joined to `group`.
    fn sender_and_receiver(
        &self,
        sender_rec: &Recorder,
        receiver_rec: &Recorder,
        group: &CStr,
    ) -> (*mut wps_client, *mut wps_client) {
        let sender = self.client(sender_rec, true);
        let receiver = self.client(receiver_rec, true);
        check(
            unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
            "join",
        );
        (sender, receiver)
    }

    /// Has the emulator deliver the next `count` messages of `c` but swallow their acks.
    fn drop_acks(&self, c: *mut wps_client, count: u32) {
        self.fault(c, &format!(":dropAcks?count={count}"));
    }

    /// Has the emulator apply the fault `action` (`:drop`, ...) to `c`'s connection.
    fn fault(&self, c: *mut wps_client, action: &str) {
        self.rt.block_on(common::fault(
            &self.emulator,
            "hub",
            &connection_id(c),
            action,
        ));
    }

    /// A started client whose events and completions go to `rec`, patient: its acks
    /// awaited a minute (no retry in these tests), its drops recovered.
    fn patient_client(&self, rec: &Recorder) -> *mut wps_client {
        unsafe {
            let o = wps_options_new();
            check(wps_options_set_ack_timeout_ms(o, 60_000), "ack timeout");
            check(wps_options_set_recovery(o, 30_000, 20), "recovery");
            let mut c = std::ptr::null_mut();
            let status = wps_client_new(
                self.url.as_ptr(),
                o,
                Some(on_event),
                rec.user_data(),
                None,
                &mut c,
            );
            wps_options_free(o);
            check(status, "wps_client_new");
            check(wps_client_start(c), "wps_client_start");
            c
        }
    }

    fn shutdown(self) {
        self.rt.block_on(self.emulator.shutdown());
    }
}

/// A client of the service at `url` whose events and completions go to `rec`;
/// started when `start`.
fn client_of(url: &CStr, rec: &Recorder, start: bool) -> *mut wps_client {
    let c = common::ffi_client(url, Some(on_event), rec.user_data(), None);
    if start {
        check(unsafe { wps_client_start(c) }, "wps_client_start");
    }
    c
}

/// Sends `text` to `group` without blocking; returns the operation id.
fn send_async(c: *mut wps_client, group: &CStr, text: &str, flags: u32, rec: &Recorder) -> u64 {
    let mut op = 0;
    let status = unsafe {
        wps_client_send_to_group_async(
            c,
            group.as_ptr(),
            WPS_DATA_TYPE_TEXT,
            text.as_ptr(),
            text.len(),
            flags,
            Some(on_complete),
            rec.user_data(),
            &mut op,
        )
    };
    check(status, "wps_client_send_to_group_async");
    op
}

/// A blocking send of `text` to group "g" (with `ack_id` when given): its status and the
/// `wps_ack_result` it wrote over stale values.
fn send_blocking(c: *mut wps_client, text: &str, ack_id: Option<u64>) -> (u32, wps_ack_result) {
    let mut out = wps_ack_result {
        ack_id: 7,
        has_ack_id: true,
        is_duplicated: true,
    };
    let (group, data, len) = (c"g".as_ptr(), text.as_ptr(), text.len());
    let status = unsafe {
        match ack_id {
            None => wps_client_send_to_group(c, group, WPS_DATA_TYPE_TEXT, data, len, 0, &mut out),
            Some(id) => wps_client_send_to_group_with_ack_id(
                c,
                group,
                WPS_DATA_TYPE_TEXT,
                data,
                len,
                0,
                id,
                &mut out,
            ),
        }
    };
    (status, out)
}

#[test]
fn a_burst_of_async_sends_from_one_thread_arrives_in_order_each_completed_once() {
    // Far more than the core's operation queue (1024) holds, issued before any ack.
    const SENDS: usize = 5000;
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"burst";
    let (sender, receiver) = setup.sender_and_receiver(sender_rec, receiver_rec, group);

    let started = Instant::now();
    let ops: Vec<u64> = (0..SENDS)
        .map(|i| send_async(sender, group, &format!("m{i:05}"), 0, sender_rec))
        .collect();
    assert!(
        started.elapsed() < WAIT,
        "issuing the sends took {:?}",
        started.elapsed()
    );
    sender_rec.wait("every completion", |s| s.completions.len() == SENDS);
    receiver_rec.wait("every message", |s| s.messages.len() >= SENDS);
    {
        let seen = sender_rec.seen.lock().unwrap();
        for op in &ops {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_OK], "operation {op}");
        }
        assert_eq!(seen.acked, SENDS);
    }
    let expected: Vec<String> = (0..SENDS).map(|i| format!("m{i:05}")).collect();
    assert_eq!(receiver_rec.seen.lock().unwrap().messages, expected);

    // Fire-and-forget async sends keep their place among acked ones.
    let mixed: Vec<u64> = (0..100)
        .map(|i| {
            let flags = if i % 2 == 0 {
                WPS_SEND_FIRE_AND_FORGET
            } else {
                0
            };
            send_async(sender, group, &format!("f{i:03}"), flags, sender_rec)
        })
        .collect();
    sender_rec.wait("the mixed completions", |s| {
        s.completions.len() == SENDS + mixed.len()
    });
    receiver_rec.wait("the mixed messages", |s| {
        s.messages.len() >= SENDS + mixed.len()
    });
    let expected: Vec<String> = (0..100).map(|i| format!("f{i:03}")).collect();
    assert_eq!(
        receiver_rec.seen.lock().unwrap().messages[SENDS..],
        expected
    );
    assert_eq!(sender_rec.seen.lock().unwrap().acked, SENDS + 50);

    unsafe {
        wps_client_free(sender);
        wps_client_free(receiver);
    }
    setup.shutdown();
}

/// A scripted service for one connection: connects the client, reads `sends`
/// acked sendToGroup frames, then writes each one's echo (from `sender(i)`, to group
/// `left` or `right` in turn) followed by its ack, all in one write, so that a socket
/// read holds both events and acks.
async fn echo_then_ack_service(listener: tokio::net::TcpListener, sends: usize) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = common::accepted_connected(listener).await;
    let mut sent = Vec::new();
    while sent.len() < sends {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("the client went away");
        };
        let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "sendToGroup" {
            sent.push((frame["ackId"].as_u64().unwrap(), frame["data"].clone()));
        }
    }
    for (i, (ack_id, data)) in sent.iter().enumerate() {
        let group = ["left", "right"][i % 2];
        let mut echo = serde_json::json!({"type": "message", "from": "group", "group": group,
            "dataType": "text", "data": data, "sequenceId": i + 1});
        if let Some(user) = sender(i) {
            echo["fromUserId"] = user.into();
        }
        ws.feed(Message::text(echo.to_string())).await.unwrap();
        let ack = serde_json::json!({"type": "ack", "ackId": ack_id, "success": true});
        ws.feed(Message::text(ack.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

/// The sender of the `i`th echo of `echo_then_ack_service`: two users and none, in turn.
fn sender(i: usize) -> Option<&'static str> {
    [Some("ann"), Some("bob"), None][i % 3]
}

#[test]
fn a_completion_never_overtakes_the_events_received_before_it() {
    // The events of a socket read are queued together at its end; the acks read with
    // them must not complete ahead of them (the core completes a read's acks after its
    // events). Each event also names its own group and sender.
    const SENDS: usize = 200;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, service) = common::scripted(&rt, |listener| echo_then_ack_service(listener, SENDS));
    let rec = common::leaked::<Recorder>();
    let c = client_of(&url, rec, true);
    let ops: Vec<u64> = (0..SENDS)
        .map(|i| send_async(c, c"left", &format!("m{i:03}"), 0, rec))
        .collect();
    rec.wait("every echo and completion", |s| {
        s.completions.len() == SENDS && s.messages.len() == SENDS
    });
    let timeline = rec.seen.lock().unwrap().timeline.clone();
    let at = |entry: String| timeline.iter().position(|e| *e == entry);
    let mut last_echo = None;
    for (i, op) in ops.iter().enumerate() {
        let group = ["left", "right"][i % 2];
        let from = sender(i).unwrap_or("-");
        let echo = at(format!("m {group} {from} m{i:03}"));
        let done = at(format!("c {op}"));
        assert!(
            echo.is_some() && done.is_some(),
            "message {i}: {timeline:?}"
        );
        assert!(
            echo < done,
            "message {i} completed before its echo: {timeline:?}"
        );
        assert!(
            echo > last_echo,
            "message {i} echoed out of order: {timeline:?}"
        );
        last_echo = echo;
    }
    unsafe { wps_client_free(c) };
    rt.block_on(service).unwrap();
}

#[test]
fn start_and_stop_without_blocking_complete_after_their_events() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, false);
    let (mut start, mut stop, mut again, mut idle) = (0, 0, 0, 0);
    let (on, data) = (Some(on_complete as _), rec.user_data());
    unsafe {
        check(
            wps_client_start_async(c, on, data, &mut start),
            "start_async",
        );
        rec.wait("the start", |s| s.completions.contains_key(&start));
        assert_eq!(wps_client_state(c), WPS_STATE_CONNECTED);
        // a second start while connected fails as the blocking one does
        check(
            wps_client_start_async(c, on, data, &mut again),
            "start_async",
        );
        check(wps_client_stop_async(c, on, data, &mut stop), "stop_async");
        rec.wait("the stop", |s| s.completions.contains_key(&stop));
        assert_eq!(wps_client_state(c), WPS_STATE_STOPPED);
        // stopping a stopped client completes with OK
        check(wps_client_stop_async(c, on, data, &mut idle), "stop_async");
        rec.wait("the idle stop", |s| s.completions.contains_key(&idle));
        // started again without blocking, then freed while connected
        let mut restart = 0;
        check(
            wps_client_start_async(c, on, data, &mut restart),
            "start_async",
        );
        rec.wait("the restart", |s| s.completions.contains_key(&restart));
        assert_eq!(wps_client_state(c), WPS_STATE_CONNECTED);
        assert_eq!(
            wps_client_start_async(std::ptr::null_mut(), on, data, std::ptr::null_mut()),
            WPS_STATUS_NULL_ARG
        );
        assert_eq!(
            wps_client_stop_async(std::ptr::null_mut(), None, data, std::ptr::null_mut()),
            WPS_STATUS_NULL_ARG
        );
        wps_client_free(c);
    }
    let seen = rec.seen.lock().unwrap();
    for (op, status) in [
        (start, WPS_STATUS_OK),
        (again, WPS_STATUS_ILLEGAL_STATE),
        (stop, WPS_STATUS_OK),
        (idle, WPS_STATUS_OK),
    ] {
        assert_eq!(
            seen.completions[&op],
            vec![status],
            "operation {op}: {:?}",
            seen.timeline
        );
    }
    let at = |entry: &str| {
        seen.timeline
            .iter()
            .position(|e| e == entry)
            .unwrap_or(usize::MAX)
    };
    // the start completes after the connected event, the stop after the stopped event
    assert!(
        at("connected") < at(&format!("c {start}")),
        "{:?}",
        seen.timeline
    );
    assert!(at("disconnected") < at("stopped"), "{:?}", seen.timeline);
    assert!(
        at("stopped") < at(&format!("c {stop}")),
        "{:?}",
        seen.timeline
    );
    drop(seen);
    // freed with its start still in flight: the start completes exactly once, and the
    // free returns (the connection attempt is stopped under it)
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, false);
    let mut pending = 0;
    unsafe {
        check(
            wps_client_start_async(c, Some(on_complete), rec.user_data(), &mut pending),
            "start_async",
        );
        wps_client_free(c);
    }
    assert_completed_once_ok_or_stopped(rec, &[pending]);
    setup.shutdown();
}

/// The header (`wps_client_start`, `WPS_STATE_CONNECTING`): a start handed over behind
/// a stop still in progress is taken once that stop is done. Called on a client still
/// connected, it connects again instead of failing with `WPS_STATUS_ILLEGAL_STATE`,
/// after the stop's disconnected and stopped events.
#[test]
fn a_start_behind_a_stop_in_progress_connects_after_it() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, true);
    let mut stop = 0;
    unsafe {
        check(
            wps_client_stop_async(c, Some(on_complete), rec.user_data(), &mut stop),
            "stop_async",
        );
        check(wps_client_start(c), "the start behind the stop");
        assert_eq!(wps_client_state(c), WPS_STATE_CONNECTED);
    }
    rec.wait("the stop and the second connection", |s| {
        s.completions.contains_key(&stop)
            && s.timeline.iter().filter(|e| *e == "connected").count() == 2
    });
    {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&stop], vec![WPS_STATUS_OK]);
        let events: Vec<_> = seen
            .timeline
            .iter()
            .filter(|e| !e.starts_with("c "))
            .collect();
        assert_eq!(
            events,
            ["connected", "disconnected", "stopped", "connected"]
        );
    }
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// The header (`wps_client_stop`): the stopped event, after the disconnected one, is
/// queued by the time the stop returns. In poll mode one dispatch right after it runs
/// both; in thread mode the completion of a `wps_client_stop_async` made after it (at
/// once: the client is stopped) runs after them. Stopping a stopped client raises no
/// event.
#[test]
fn the_stopped_event_is_queued_when_the_stop_returns() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = started_poll_client(&setup.url, rec);
    dispatch_records_until(c, rec, &mut Vec::new(), |s, _| !s.timeline.is_empty());
    let mut ran = 0;
    unsafe {
        check(wps_client_stop(c), "wps_client_stop");
        check(wps_client_dispatch(c, 16, &mut ran), "wps_client_dispatch");
    }
    assert_eq!(
        rec.seen.lock().unwrap().timeline,
        ["connected", "disconnected", "stopped"]
    );
    assert_eq!(ran, 2);
    unsafe {
        check(wps_client_stop(c), "the second stop");
        check(wps_client_dispatch(c, 16, &mut ran), "wps_client_dispatch");
        wps_client_free(c);
    }
    assert_eq!(ran, 0, "{:?}", rec.seen.lock().unwrap().timeline);

    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, true);
    let mut after = 0;
    unsafe {
        check(wps_client_stop(c), "wps_client_stop");
        check(
            wps_client_stop_async(c, Some(on_complete), rec.user_data(), &mut after),
            "wps_client_stop_async",
        );
    }
    rec.wait("the completion", |s| s.completions.contains_key(&after));
    assert_eq!(
        rec.seen.lock().unwrap().timeline,
        [
            "connected",
            "disconnected",
            "stopped",
            &format!("c {after}")
        ]
    );
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// The header (`wps_client_start_async`, `WPS_STATE_CONNECTING`): the start is handed
/// to the client before the call returns (the state is no longer stopped), so a stop
/// made right after it, blocking or not, comes after it: the client ends stopped and
/// stays so, and the start completes once, connected or stopped.
#[test]
fn a_stop_right_after_an_asynchronous_start_comes_after_it() {
    let setup = Setup::new();
    for round in 0..10 {
        let rec = common::leaked::<Recorder>();
        let c = setup.client(rec, false);
        let (mut start, mut stop) = (0, 0);
        unsafe {
            check(
                wps_client_start_async(c, Some(on_complete), rec.user_data(), &mut start),
                "wps_client_start_async",
            );
            assert_ne!(wps_client_state(c), WPS_STATE_STOPPED, "round {round}");
            if round % 2 == 0 {
                check(wps_client_stop(c), "wps_client_stop");
                assert_eq!(wps_client_state(c), WPS_STATE_STOPPED, "round {round}");
            } else {
                check(
                    wps_client_stop_async(c, Some(on_complete), rec.user_data(), &mut stop),
                    "wps_client_stop_async",
                );
            }
        }
        rec.wait("the start's completion and the stopped event", |s| {
            s.completions.contains_key(&start)
                && s.timeline.iter().any(|e| e == "stopped")
                && (stop == 0 || s.completions.contains_key(&stop))
        });
        unsafe {
            // Still stopped: the start did not connect after the stop.
            assert_eq!(wps_client_state(c), WPS_STATE_STOPPED, "round {round}");
            wps_client_free(c);
        }
        let seen = rec.seen.lock().unwrap();
        let events: Vec<&str> = seen
            .timeline
            .iter()
            .map(String::as_str)
            .filter(|e| !e.starts_with("c "))
            .collect();
        let connected = match seen.completions[&start][..] {
            [WPS_STATUS_OK] => true,
            [WPS_STATUS_STOPPED] => events.len() == 3,
            ref other => panic!("round {round}: the start completed with {other:?}"),
        };
        let expected: &[&str] = match connected {
            true => &["connected", "disconnected", "stopped"],
            false => &["stopped"],
        };
        assert_eq!(events, expected, "round {round}: {:?}", seen.timeline);
        if stop != 0 {
            assert_eq!(seen.completions[&stop], [WPS_STATUS_OK], "round {round}");
            // After the stopped event; the start's completion may come before or after.
            let at = |entry: &str| seen.timeline.iter().position(|e| e == entry);
            assert!(
                at("stopped") < at(&format!("c {stop}")),
                "round {round}: {:?}",
                seen.timeline
            );
        }
    }
    setup.shutdown();
}

/// The header (`wps_client_start_async`): cancelling the start only ends its wait, the
/// connection attempt goes on; and (`wps_client_stop_async`) cancelling a stop only ends
/// its wait, the stop goes on. Each completes once with `WPS_STATUS_CANCELLED`.
#[test]
fn a_cancelled_start_or_stop_goes_on() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, false);
    let (mut start, mut stop) = (0, 0);
    unsafe {
        check(
            wps_client_start_async(c, Some(on_complete), rec.user_data(), &mut start),
            "wps_client_start_async",
        );
        check(wps_client_cancel(c, start), "cancel the start");
    }
    rec.wait("the connected event", |s| {
        s.timeline.iter().any(|e| e == "connected")
    });
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_CONNECTED);
    unsafe {
        check(
            wps_client_stop_async(c, Some(on_complete), rec.user_data(), &mut stop),
            "wps_client_stop_async",
        );
        check(wps_client_cancel(c, stop), "cancel the stop");
    }
    rec.wait("the stopped event", |s| {
        s.timeline.iter().any(|e| e == "stopped")
    });
    assert_eq!(unsafe { wps_client_state(c) }, WPS_STATE_STOPPED);
    unsafe { wps_client_free(c) };
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.completions[&start], [WPS_STATUS_CANCELLED]);
    assert_eq!(seen.completions[&stop], [WPS_STATUS_CANCELLED]);
    setup.shutdown();
}

#[test]
fn a_cancelled_async_operation_completes_once_with_cancelled() {
    const SENDS: usize = 1000;
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, true);
    let group = c"cancel";
    let mut cancelled = Vec::new();
    let mut kept = Vec::new();
    for i in 0..SENDS {
        let op = send_async(c, group, "x", 0, rec);
        if i % 2 == 0 {
            // It may have completed already (then there is nothing left to cancel).
            if unsafe { wps_client_cancel(c, op) } == WPS_STATUS_OK {
                cancelled.push(op);
            } else {
                kept.push(op);
            }
        } else {
            kept.push(op);
        }
    }
    assert!(!cancelled.is_empty());
    rec.wait("every completion", |s| s.completions.len() == SENDS);
    {
        let seen = rec.seen.lock().unwrap();
        for op in &cancelled {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_CANCELLED], "{op}");
        }
        for op in &kept {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_OK], "{op}");
        }
    }
    // Nothing is left to cancel, and late acks of cancelled operations changed nothing.
    for op in &cancelled {
        assert_eq!(
            unsafe { wps_client_cancel(c, *op) },
            WPS_STATUS_INVALID_ARGUMENT
        );
    }
    // In flight when freed: each completes exactly once, OK or STOPPED.
    let in_flight: Vec<u64> = (0..SENDS)
        .map(|_| send_async(c, group, "y", 0, rec))
        .collect();
    unsafe { wps_client_free(c) };
    assert_completed_once_ok_or_stopped(rec, &in_flight);
    setup.shutdown();
}

#[test]
fn refused_async_operations_complete_with_the_reason() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, false);
    let group = c"g";
    let mut op = 0;
    // Not started: the call succeeds, the completion says why.
    let status = unsafe {
        wps_client_join_group_async(
            c,
            group.as_ptr(),
            Some(on_complete),
            rec.user_data(),
            &mut op,
        )
    };
    check(status, "join_group_async");
    rec.wait("the refusal", |s| s.completions.contains_key(&op));
    assert_eq!(
        rec.seen.lock().unwrap().completions[&op],
        vec![WPS_STATUS_ILLEGAL_STATE]
    );
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    // A bad payload (invalid JSON) and an empty group: refused by the core.
    let bad_json = "{";
    let status = unsafe {
        wps_client_send_event_async(
            c,
            c"e".as_ptr(),
            WPS_DATA_TYPE_JSON,
            bad_json.as_ptr(),
            bad_json.len(),
            0,
            Some(on_complete),
            rec.user_data(),
            &mut op,
        )
    };
    check(status, "send_event_async");
    let json_op = op;
    let empty_op = send_async(c, c"", "x", 0, rec);
    rec.wait("the refusals", |s| {
        s.completions.contains_key(&json_op) && s.completions.contains_key(&empty_op)
    });
    {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(
            seen.completions[&json_op],
            vec![WPS_STATUS_INVALID_ARGUMENT]
        );
        assert_eq!(
            seen.completions[&empty_op],
            vec![WPS_STATUS_INVALID_ARGUMENT]
        );
    }
    // Bad C arguments: the call itself fails and nothing completes.
    let bad_utf8 = [0xffu8, 0];
    let status = unsafe {
        wps_client_send_to_group_async(
            c,
            bad_utf8.as_ptr().cast(),
            WPS_DATA_TYPE_TEXT,
            std::ptr::null(),
            0,
            0,
            Some(on_complete),
            rec.user_data(),
            &mut op,
        )
    };
    assert_eq!(status, WPS_STATUS_INVALID_UTF8);
    unsafe { wps_client_free(c) };
    assert_eq!(rec.seen.lock().unwrap().completions.len(), 3);
    setup.shutdown();
}

#[test]
fn a_timed_out_operation_reports_its_ack_id_and_a_resend_with_it_is_a_duplicate() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let mut c = std::ptr::null_mut();
    unsafe {
        let opts = wps_options_new();
        check(wps_options_set_ack_timeout_ms(opts, 300), "ack timeout");
        check(
            wps_options_set_message_retry(opts, 0, 100, 100, WPS_RETRY_FIXED),
            "message retry",
        );
        let status = wps_client_new(
            setup.url.as_ptr(),
            opts,
            Some(on_event),
            rec.user_data(),
            None,
            &mut c,
        );
        wps_options_free(opts);
        check(status, "wps_client_new");
        check(wps_client_start(c), "wps_client_start");
    }
    // The emulator delivers the next two messages but swallows their acks.
    setup.drop_acks(c, 2);
    let (status, out) = send_blocking(c, "once", None);
    assert_eq!(status, WPS_STATUS_TIMEOUT);
    assert!(out.has_ack_id && out.ack_id > 0 && !out.is_duplicated);
    let op = send_async(c, c"g", "twice", 0, rec);
    rec.wait("the async timeout", |s| s.completions.contains_key(&op));
    let async_ack_id = {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&op], vec![WPS_STATUS_TIMEOUT]);
        seen.ack_ids[&op]
    };
    assert!(async_ack_id > out.ack_id);
    // Both were delivered: a resend with the reported ackId is deduplicated.
    for (text, ack_id) in [("once", out.ack_id), ("twice", async_ack_id)] {
        let (status, again) = send_blocking(c, text, Some(ack_id));
        check(status, "the resend");
        assert!(again.has_ack_id && again.ack_id == ack_id && again.is_duplicated);
    }
    // A failure with no ackId still writes `out`: cleared.
    unsafe { wps_client_stop(c) };
    let (status, stale) = send_blocking(c, "late", None);
    assert_eq!(status, WPS_STATUS_ILLEGAL_STATE);
    assert!(!stale.has_ack_id && !stale.is_duplicated && stale.ack_id == 0);
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// A client that frees itself inside the callback of the group message "free me".
struct FreedOnMessage {
    rec: Recorder,
    client: AtomicPtr<wps_client>,
}

unsafe extern "C" fn free_on_message(user_data: *mut c_void, event: *const wps_event) {
    let this = &*(user_data as *const FreedOnMessage);
    on_event(this.rec.user_data(), event);
    let event = &*event;
    if event.kind == WPS_EVENT_GROUP_MESSAGE
        && std::slice::from_raw_parts(event.data, event.data_len) == b"free me"
    {
        wps_client_free(this.client.load(Ordering::SeqCst));
    }
}

/// A send the service took in but never acked, pending when `c` is freed by `free`:
/// completes once with `WPS_STATUS_STOPPED` and its ackId, after the message arrived.
fn assert_freed_send_reports_its_ack_id(
    setup: &Setup,
    c: *mut wps_client,
    rec: &Recorder,
    free: impl FnOnce(),
) {
    check(
        unsafe { wps_client_join_group(c, c"g".as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    setup.drop_acks(c, 1);
    let op = send_async(c, c"g", "free me", 0, rec);
    rec.wait("the message, so taken in", |s| {
        s.messages.iter().any(|m| m == "free me")
    });
    free();
    rec.wait("the completion", |s| s.completions.contains_key(&op));
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.completions[&op], vec![WPS_STATUS_STOPPED]);
    assert!(seen.ack_ids.get(&op).is_some_and(|id| *id > 0), "no ackId");
}

#[test]
fn a_send_pending_when_its_client_is_freed_reports_its_ack_id() {
    let setup = Setup::new();
    // Freed by the application.
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, true);
    assert_freed_send_reports_its_ack_id(&setup, c, rec, || unsafe { wps_client_free(c) });
    // Freed inside its own event callback: the same, after that callback.
    let freed: &FreedOnMessage = Box::leak(Box::new(FreedOnMessage {
        rec: Recorder::default(),
        client: AtomicPtr::new(std::ptr::null_mut()),
    }));
    let c = common::ffi_client(
        &setup.url,
        Some(free_on_message),
        freed as *const FreedOnMessage as *mut c_void,
        None,
    );
    freed.client.store(c, Ordering::SeqCst);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    assert_freed_send_reports_its_ack_id(&setup, c, &freed.rec, || {});
    setup.shutdown();
}

#[test]
fn deferred_sends_wait_for_a_flush_or_the_next_send_and_keep_their_order() {
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"deferred";
    let (sender, receiver) = setup.sender_and_receiver(sender_rec, receiver_rec, group);

    // Deferred: nothing is sent until the flush.
    let deferred: Vec<u64> = (0..10)
        .map(|i| {
            send_async(
                sender,
                group,
                &format!("d{i}"),
                WPS_SEND_DEFERRED,
                sender_rec,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(sender_rec.seen.lock().unwrap().completions.is_empty());
    assert!(receiver_rec.seen.lock().unwrap().messages.is_empty());
    check(unsafe { wps_client_flush_deferred(sender) }, "flush");
    sender_rec.wait("the deferred acks", |s| s.completions.len() == 10);
    receiver_rec.wait("the deferred messages", |s| s.messages.len() >= 10);
    for op in &deferred {
        assert_eq!(
            sender_rec.seen.lock().unwrap().completions[op],
            vec![WPS_STATUS_OK]
        );
    }

    // A send that is not deferred takes the deferred ones along, after them.
    for i in 0..5 {
        send_async(
            sender,
            group,
            &format!("e{i}"),
            WPS_SEND_DEFERRED,
            sender_rec,
        );
    }
    send_async(sender, group, "now", 0, sender_rec);
    receiver_rec.wait("the messages sent along", |s| s.messages.len() >= 16);
    let expected: Vec<String> = (0..10)
        .map(|i| format!("d{i}"))
        .chain((0..5).map(|i| format!("e{i}")))
        .chain(["now".to_string()])
        .collect();
    assert_eq!(receiver_rec.seen.lock().unwrap().messages, expected);
    sender_rec.wait("their acks", |s| s.completions.len() == 16);

    // The blocking forms cannot defer: they would wait for a message never sent.
    assert_blocking_send_refused(sender, group, WPS_SEND_DEFERRED, "asynchronous forms only");
    assert_eq!(
        unsafe { wps_client_flush_deferred(std::ptr::null_mut()) },
        WPS_STATUS_NULL_ARG
    );

    // Still deferred when the client is stopped: stop sends them first.
    for i in 0..5 {
        send_async(
            sender,
            group,
            &format!("s{i}"),
            WPS_SEND_DEFERRED | WPS_SEND_FIRE_AND_FORGET,
            sender_rec,
        );
    }
    check(unsafe { wps_client_stop(sender) }, "stop");
    receiver_rec.wait("the messages sent by stop", |s| s.messages.len() >= 21);
    assert_eq!(
        receiver_rec.seen.lock().unwrap().messages[16..],
        (0..5).map(|i| format!("s{i}")).collect::<Vec<_>>()[..]
    );
    check(unsafe { wps_client_start(sender) }, "restart");

    // Still deferred when the client is freed: each completes exactly once.
    let left: Vec<u64> = (0..3)
        .map(|i| {
            send_async(
                sender,
                group,
                &format!("l{i}"),
                WPS_SEND_DEFERRED,
                sender_rec,
            )
        })
        .collect();
    unsafe { wps_client_free(sender) };
    assert_completed_once_ok_or_stopped(sender_rec, &left);
    unsafe { wps_client_free(receiver) };
    setup.shutdown();
}

#[test]
fn deferred_runs_flushed_with_sends_in_flight_arrive_once_in_order() {
    windowed_deferred_runs(false);
}

#[test]
fn deferred_runs_flushed_with_sends_in_flight_across_recovered_drops_arrive_once_in_order() {
    windowed_deferred_runs(true);
}

/// One thread keeps `WINDOW` sends in flight, as the C benchmark's pipelined publisher
/// does: each refill a run of deferred sends and one flush, which the flushing thread
/// writes itself as far as it can, sends pending or not. Some runs go partly through the
/// connection task: one with a send not deferred in its middle (the deferred ones before
/// it are flushed first, the send itself queued on the busy client, ahead of the rest),
/// one with a deferred fire-and-forget send there (which ends what the thread writes).
/// With `drops`, the sender's socket is dropped, and recovered, again and again
/// meanwhile. Every send completes once, successfully; a subscriber gets the acked ones
/// (and, with no drop, all of them) once each, in call order.
fn windowed_deferred_runs(drops: bool) {
    const SENDS: usize = 5000;
    const WINDOW: usize = 100;
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"windowed";
    let receiver = setup.client(receiver_rec, true);
    check(
        unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let sender = setup.patient_client(sender_rec);
    let sender_at = AtomicPtr::new(sender);
    let sending = AtomicBool::new(true);
    let dropped = AtomicUsize::new(0);
    let ops = std::thread::scope(|s| {
        if drops {
            s.spawn(|| {
                let sender = sender_at.load(Ordering::Relaxed);
                let mut n = 0u64;
                while sending.load(Ordering::Acquire) {
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5 + n * 13 % 20));
                    let Some(id) = try_connection_id(sender) else {
                        continue;
                    };
                    let path = format!("/_emulator/hubs/hub/connections/{id}/:drop");
                    let port = setup.emulator.port();
                    let (_, body) = setup
                        .rt
                        .block_on(common::http(port, "POST", &path, &[], b""));
                    if body.contains("\"dropped\":true") {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let mut ops: Vec<(u64, u32)> = Vec::with_capacity(SENDS);
        let mut refills = 0;
        while ops.len() < SENDS {
            let started = ops.len();
            sender_rec.wait("room in the window", |s| {
                started - s.completions.len() < WINDOW
            });
            let in_flight = started - sender_rec.seen.lock().unwrap().completions.len();
            let run = (WINDOW - in_flight).min(SENDS - started);
            refills += 1;
            for k in 0..run {
                let flags = match (refills % 7, refills % 11) {
                    (0, _) if k == run / 2 => 0,
                    (_, 0) if k == run / 2 => WPS_SEND_DEFERRED | WPS_SEND_FIRE_AND_FORGET,
                    _ => WPS_SEND_DEFERRED,
                };
                let text = format!("m{:05}", ops.len());
                ops.push((send_async(sender, group, &text, flags, sender_rec), flags));
            }
            check(unsafe { wps_client_flush_deferred(sender) }, "flush");
        }
        sending.store(false, Ordering::Release);
        ops
    });
    sender_rec.wait("every completion", |s| s.completions.len() == SENDS);
    let acked: Vec<usize> = (0..SENDS)
        .filter(|&i| ops[i].1 & WPS_SEND_FIRE_AND_FORGET == 0)
        .collect();
    {
        let seen = sender_rec.seen.lock().unwrap();
        for (op, _) in &ops {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_OK], "operation {op}");
        }
        assert_eq!(seen.acked, acked.len());
        assert!(
            !seen.timeline.iter().any(|e| e == "disconnected"),
            "the sender only recovers"
        );
    }
    receiver_rec.wait("every acked message", |s| s.messages.len() >= acked.len());
    // Anything written twice would arrive by now.
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<usize> = receiver_rec
        .seen
        .lock()
        .unwrap()
        .messages
        .iter()
        .map(|m| m[1..].parse().unwrap())
        .collect();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "out of order or twice: {got:?}"
    );
    if drops {
        let missing: Vec<&usize> = acked.iter().filter(|i| !got.contains(i)).collect();
        assert!(missing.is_empty(), "acked, never received: {missing:?}");
        let dropped = dropped.load(Ordering::Relaxed);
        assert!(dropped > 0, "no socket was dropped");
        println!("socket drops: {dropped}, messages received {}", got.len());
    } else {
        assert_eq!(got, (0..SENDS).collect::<Vec<_>>());
    }
    unsafe {
        wps_client_free(sender);
        wps_client_free(receiver);
    }
    setup.shutdown();
}

#[test]
fn deferred_runs_flushed_past_the_acks_kept_in_flight_are_published_once() {
    // The service remembers the last 1000 ackIds of a connection; a client keeps 999
    // acked sends in flight, those its flushing thread wrote itself included. With the
    // acks of the first 999 swallowed, no more go out; once the socket drops, the
    // recovery resends those with their ackIds, and the service dedupes every one.
    const SENDS: usize = 1500;
    const RUN: usize = 100;
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"kept";
    let receiver = setup.client(receiver_rec, true);
    check(
        unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let sender = setup.patient_client(sender_rec);
    setup.drop_acks(sender, 999);
    let ops: Vec<u64> = (0..SENDS)
        .map(|i| {
            let op = send_async(
                sender,
                group,
                &format!("m{i:05}"),
                WPS_SEND_DEFERRED,
                sender_rec,
            );
            if (i + 1) % RUN == 0 {
                check(unsafe { wps_client_flush_deferred(sender) }, "flush");
            }
            op
        })
        .collect();
    receiver_rec.wait("the messages in flight", |s| s.messages.len() >= 999);
    // Their acks never come: had a 1000th gone out, its ack would have made room for
    // more, which would arrive by now.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver_rec.seen.lock().unwrap().messages.len(),
        999,
        "acked sends in flight"
    );
    assert!(sender_rec.seen.lock().unwrap().completions.is_empty());
    setup.fault(sender, ":drop");
    sender_rec.wait("every completion", |s| s.completions.len() == SENDS);
    {
        let seen = sender_rec.seen.lock().unwrap();
        for op in &ops {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_OK], "operation {op}");
        }
        assert_eq!(
            seen.duplicated, 999,
            "resent with their ackIds, deduplicated"
        );
    }
    receiver_rec.wait("every message", |s| s.messages.len() >= SENDS);
    // Anything published twice would arrive by now.
    std::thread::sleep(Duration::from_millis(300));
    let expected: Vec<String> = (0..SENDS).map(|i| format!("m{i:05}")).collect();
    assert_eq!(receiver_rec.seen.lock().unwrap().messages, expected);
    unsafe {
        wps_client_free(sender);
        wps_client_free(receiver);
    }
    setup.shutdown();
}

/// The header (`wps_client_send_to_group_with_ack_id`): a resend of a send given up
/// while still pending waits for it, also when it is deferred and flushed with that send
/// in flight (the flushing thread must leave it to the connection task, which alone
/// knows what is pending: written itself, it would go out twice and fail with
/// `WPS_STATUS_INVALID_ARGUMENT`).
#[test]
fn a_deferred_resend_of_a_cancelled_send_in_flight_waits_for_it() {
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"resent";
    let receiver = setup.client(receiver_rec, true);
    check(
        unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let sender = setup.patient_client(sender_rec);
    // Written and published, its ack swallowed: in flight until the drop below.
    setup.drop_acks(sender, 1);
    let text = "again";
    let original = send_async(sender, group, text, 0, sender_rec);
    receiver_rec.wait("the original", |s| s.messages.len() == 1);
    check(unsafe { wps_client_cancel(sender, original) }, "cancel");
    sender_rec.wait("the cancellation", |s| {
        s.completions.contains_key(&original)
    });
    let ack_id = {
        let seen = sender_rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&original], vec![WPS_STATUS_CANCELLED]);
        seen.ack_ids[&original]
    };
    let mut resend = 0;
    check(
        unsafe {
            wps_client_send_to_group_with_ack_id_async(
                sender,
                group.as_ptr(),
                WPS_DATA_TYPE_TEXT,
                text.as_ptr(),
                text.len(),
                WPS_SEND_DEFERRED,
                ack_id,
                Some(on_complete),
                sender_rec.user_data(),
                &mut resend,
            )
        },
        "the resend",
    );
    check(unsafe { wps_client_flush_deferred(sender) }, "flush");
    // The recovery resends the original for the resend, answered as a duplicate.
    setup.fault(sender, ":drop");
    sender_rec.wait("the resend", |s| s.completions.contains_key(&resend));
    {
        let seen = sender_rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&resend], vec![WPS_STATUS_OK]);
        assert_eq!(seen.ack_ids[&resend], ack_id);
        assert_eq!(seen.duplicated, 1, "the resend's outcome is the original's");
    }
    // Anything published twice would arrive by now.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver_rec.seen.lock().unwrap().messages, vec![text]);
    unsafe {
        wps_client_free(sender);
        wps_client_free(receiver);
    }
    setup.shutdown();
}

/// The header (`WPS_SEND_FIRE_AND_FORGET`): a deferred fire-and-forget send completes
/// once deferred, with `WPS_STATUS_OK`, before the flush sends it.
#[test]
fn a_deferred_fire_and_forget_send_completes_before_its_flush_sends_it() {
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"deferred-faf";
    let (sender, receiver) = setup.sender_and_receiver(sender_rec, receiver_rec, group);
    let flags = WPS_SEND_DEFERRED | WPS_SEND_FIRE_AND_FORGET;
    let op = send_async(sender, group, "deferred", flags, sender_rec);
    sender_rec.wait("the completion", |s| s.completions.contains_key(&op));
    assert_eq!(
        sender_rec.seen.lock().unwrap().completions[&op],
        [WPS_STATUS_OK]
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(receiver_rec.seen.lock().unwrap().messages.is_empty());
    check(unsafe { wps_client_flush_deferred(sender) }, "flush");
    receiver_rec.wait("the flushed message", |s| s.messages == ["deferred"]);
    unsafe { wps_client_free(sender) };
    unsafe { wps_client_free(receiver) };
    setup.shutdown();
}

/// The header (`wps_ack_result`): automatic ackIds increase but may skip numbers. A send
/// the client refuses before sending it (too large, or the client stopped) reports
/// no ackId, and has used one up.
#[test]
fn a_send_refused_before_it_is_sent_reports_no_ack_id_and_uses_one_up() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = setup.client(rec, true);
    let (status, first) = send_blocking(c, "first", None);
    check(status, "the first send");
    let (status, too_large) = send_blocking(c, &"x".repeat(1 << 20), None);
    assert_eq!(status, WPS_STATUS_INVALID_ARGUMENT);
    assert!(!too_large.has_ack_id);
    check(unsafe { wps_client_stop(c) }, "stop");
    let (status, stopped) = send_blocking(c, "stopped", None);
    assert_eq!(status, WPS_STATUS_ILLEGAL_STATE);
    assert!(!stopped.has_ack_id);
    check(unsafe { wps_client_start(c) }, "restart");
    let (status, last) = send_blocking(c, "last", None);
    check(status, "the last send");
    assert!(first.has_ack_id && last.has_ack_id);
    assert_eq!(
        last.ack_id,
        first.ack_id + 3,
        "the refused sends used one each"
    );
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// The header (`wps_client_dispatch_records`): `max` 0 runs no callback, and still
/// writes the records queued ahead of the first callback.
#[test]
fn dispatch_records_with_max_0_writes_the_records_ahead_of_the_first_callback() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = started_poll_client(&setup.url, rec);
    dispatch_records_until(c, rec, &mut Vec::new(), |s, _| !s.timeline.is_empty());
    // Fire-and-forget sends complete as they are queued, in this order.
    let flags = WPS_SEND_RECORD | WPS_SEND_FIRE_AND_FORGET;
    let first = send_async(c, c"max-0", "first", flags, rec);
    let plain = send_async(c, c"max-0", "plain", WPS_SEND_FIRE_AND_FORGET, rec);
    let last = send_async(c, c"max-0", "last", flags, rec);
    let mut buf = [NO_RECORD; 4];
    let mut dispatch = |max| {
        let (mut ran, mut written) = (usize::MAX, usize::MAX);
        let status = unsafe {
            wps_client_dispatch_records(c, max, buf.as_mut_ptr(), buf.len(), &mut ran, &mut written)
        };
        check(status, "wps_client_dispatch_records");
        (
            ran,
            buf[..written].iter().map(|r| r.op_id).collect::<Vec<_>>(),
        )
    };
    assert_eq!(dispatch(0), (0, vec![first]));
    assert_eq!(dispatch(0), (0, vec![]), "the callback is ahead");
    assert_eq!(dispatch(1), (1, vec![last]));
    assert_eq!(
        rec.seen.lock().unwrap().completions[&plain],
        [WPS_STATUS_OK]
    );
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// A blocking send to `group` with `flags`, which only the asynchronous forms take, is
/// refused with an error that says `part`.
fn assert_blocking_send_refused(c: *mut wps_client, group: &CStr, flags: u32, part: &str) {
    let status = common::ffi_send_text(c, group, "blocking", flags);
    assert_eq!(status, WPS_STATUS_INVALID_ARGUMENT);
    let detail = unsafe { CStr::from_ptr(wps_last_error_message()) };
    assert!(detail.to_string_lossy().contains(part), "{detail:?}");
}

/// An ack record to fill the arrays the library writes to.
const NO_RECORD: wps_ack_record = wps_ack_record {
    user_data: std::ptr::null_mut(),
    op_id: 0,
    ack_id: 0,
    has_ack_id: false,
    is_duplicated: false,
};

/// Dispatches a poll-mode client's queue with `wps_client_dispatch_records` until
/// `done` holds for what its callbacks saw and the records it wrote (in order).
fn dispatch_records_until(
    c: *mut wps_client,
    rec: &Recorder,
    records: &mut Vec<wps_ack_record>,
    done: impl Fn(&Seen, &[wps_ack_record]) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [NO_RECORD; 4];
    while !done(&rec.seen.lock().unwrap(), records) {
        assert!(Instant::now() < deadline, "timed out dispatching");
        let (mut ran, mut written) = (0, 0);
        let status = unsafe {
            wps_client_dispatch_records(c, 16, buf.as_mut_ptr(), buf.len(), &mut ran, &mut written)
        };
        check(status, "wps_client_dispatch_records");
        records.extend_from_slice(&buf[..written]);
        if ran + written == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A started client in poll dispatch mode whose events and completions go to `rec`.
fn started_poll_client(url: &CStr, rec: &Recorder) -> *mut wps_client {
    started_poll_client_with(url, Some(on_event), rec)
}

/// As `started_poll_client`, with the event callback `on_event` (may be None).
fn started_poll_client_with(url: &CStr, on_event: wps_event_cb, rec: &Recorder) -> *mut wps_client {
    let options = wps_options_new();
    check(
        wps_options_set_dispatch_mode(options, WPS_DISPATCH_POLL),
        "dispatch mode",
    );
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new(
            url.as_ptr(),
            options,
            on_event,
            rec.user_data(),
            None,
            &mut c,
        )
    };
    unsafe { wps_options_free(options) };
    check(status, "wps_client_new");
    check(unsafe { wps_client_start(c) }, "start");
    c
}

/// `wps_client_dispatch_into` of poll client `c` without record arrays: its `ran`.
fn dispatched_into(c: *mut wps_client) -> usize {
    let mut buffers = wps_dispatch_buffers {
        acks: std::ptr::null_mut(),
        ack_cap: 0,
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
    buffers.ran
}

#[test]
fn a_dispatch_counts_the_completions_it_took_without_a_callback() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = started_poll_client(&setup.url, rec);
    common::wait_until("the connected event", || {
        dispatched_into(c);
        let seen = rec.seen.lock().unwrap();
        seen.timeline.contains(&"connected".to_owned())
    });
    assert_eq!(dispatched_into(c), 0, "only the connected event was queued");
    for text in ["a", "b"] {
        let status = unsafe {
            wps_client_send_to_group_async(
                c,
                c"g".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                text.as_ptr(),
                text.len(),
                WPS_SEND_FIRE_AND_FORGET,
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        check(status, "a send without a completion callback");
    }
    let ran = std::cell::Cell::new(0);
    common::wait_until("the 2 completions taken", || {
        ran.set(ran.get() + dispatched_into(c));
        ran.get() >= 2
    });
    assert_eq!(ran.get(), 2);
    assert_eq!(dispatched_into(c), 0);
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

#[test]
fn recorded_sends_come_back_as_records_and_everything_else_through_callbacks() {
    let setup = Setup::new();
    let (rec, thread_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let c = started_poll_client(&setup.url, rec);
    let group = c"records";

    // Ten recorded sends, one that is not, a recorded fire-and-forget, and a recorded
    // one cancelled while deferred (a failure: its callback says so).
    let recorded: Vec<u64> = (0..10)
        .map(|i| send_async(c, group, &format!("r{i}"), WPS_SEND_RECORD, rec))
        .collect();
    let plain = send_async(c, group, "plain", 0, rec);
    let forgotten = send_async(
        c,
        group,
        "ff",
        WPS_SEND_RECORD | WPS_SEND_FIRE_AND_FORGET,
        rec,
    );
    let cancelled = send_async(c, group, "x", WPS_SEND_RECORD | WPS_SEND_DEFERRED, rec);
    check(unsafe { wps_client_cancel(c, cancelled) }, "cancel");

    let mut records = Vec::new();
    dispatch_records_until(c, rec, &mut records, |seen, records| {
        records.len() == 11 && seen.completions.len() == 2
    });
    let ops: Vec<u64> = records.iter().map(|r| r.op_id).collect();
    let mut expected = recorded.clone();
    expected.push(forgotten);
    expected.sort_unstable();
    let mut sorted = ops.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "each recorded success once, as a record");
    for r in &records {
        assert_eq!(r.user_data, rec.user_data());
        assert_eq!(
            r.has_ack_id,
            r.op_id != forgotten,
            "fire-and-forget has no ackId"
        );
        assert!(!r.is_duplicated);
    }
    let ack_ids: std::collections::HashSet<u64> = records
        .iter()
        .filter(|r| r.has_ack_id)
        .map(|r| r.ack_id)
        .collect();
    assert_eq!(ack_ids.len(), 10);
    {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&plain], vec![WPS_STATUS_OK]);
        assert_eq!(seen.completions[&cancelled], vec![WPS_STATUS_CANCELLED]);
        assert!(recorded.iter().all(|op| !seen.completions.contains_key(op)));
    }

    // A plain dispatch calls the callback of a recorded success.
    let again = send_async(c, group, "again", WPS_SEND_RECORD, rec);
    let deadline = Instant::now() + WAIT;
    while !rec.seen.lock().unwrap().completions.contains_key(&again) {
        assert!(Instant::now() < deadline, "timed out dispatching");
        check(
            unsafe { wps_client_dispatch(c, 16, std::ptr::null_mut()) },
            "dispatch",
        );
        std::thread::sleep(Duration::from_millis(2));
    }

    // Bad arguments.
    let mut buf = [records[0]; 1];
    let (null, none) = (std::ptr::null_mut(), std::ptr::null_mut());
    let refused = [
        (
            unsafe { wps_client_dispatch_records(c, 1, null, 1, none, none) },
            WPS_STATUS_NULL_ARG,
        ),
        (
            unsafe { wps_client_dispatch_records(c, 1, buf.as_mut_ptr(), 0, none, none) },
            WPS_STATUS_INVALID_ARGUMENT,
        ),
        // The handle is checked before the arrays, as in every call.
        (
            unsafe {
                wps_client_dispatch_records(
                    std::ptr::null_mut(),
                    1,
                    buf.as_mut_ptr(),
                    0,
                    none,
                    none,
                )
            },
            WPS_STATUS_NULL_ARG,
        ),
        (
            unsafe {
                let misaligned = buf.as_mut_ptr().cast::<u8>().wrapping_add(4).cast();
                wps_client_dispatch_records(c, 1, misaligned, 1, none, none)
            },
            WPS_STATUS_INVALID_ARGUMENT,
        ),
        (
            unsafe { wps_client_dispatch_records(c, 1, buf.as_mut_ptr(), usize::MAX, none, none) },
            WPS_STATUS_INVALID_ARGUMENT,
        ),
    ];
    for (status, expected) in refused {
        assert_eq!(status, expected);
    }
    assert_blocking_send_refused(c, group, WPS_SEND_RECORD, "WPS_SEND_RECORD");

    // In thread mode the flag changes nothing: the callback runs.
    let threaded = setup.client(thread_rec, true);
    let op = send_async(threaded, group, "t", WPS_SEND_RECORD, thread_rec);
    thread_rec.wait("the thread-mode completion", |s| {
        s.completions.contains_key(&op)
    });
    assert_eq!(
        thread_rec.seen.lock().unwrap().completions[&op],
        vec![WPS_STATUS_OK]
    );
    assert_eq!(
        unsafe { wps_client_dispatch_records(threaded, 1, buf.as_mut_ptr(), 1, none, none) },
        WPS_STATUS_ILLEGAL_STATE
    );

    unsafe { wps_client_free(threaded) };
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

/// Each of `ops`, pending when its client was freed, completed exactly once: sent (OK)
/// or given up (STOPPED).
fn assert_completed_once_ok_or_stopped(rec: &Recorder, ops: &[u64]) {
    let seen = rec.seen.lock().unwrap();
    for op in ops {
        let statuses = &seen.completions[op];
        assert_eq!(statuses.len(), 1, "{op}: {statuses:?}");
        assert!(
            statuses[0] == WPS_STATUS_OK || statuses[0] == WPS_STATUS_STOPPED,
            "{op}: {statuses:?}"
        );
    }
}

/// A message record read back from a `wps_client_dispatch_into` buffer: the
/// `m <group> <sender or -> <text>` line the event callback records, its sequence id.
fn read_message_records(buf: &[u8], count: usize) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    let mut at = 0;
    for _ in 0..count {
        // SAFETY: the library wrote a record at `at` (8-byte aligned in an aligned buffer).
        let r = unsafe { &*buf[at..].as_ptr().cast::<wps_message_record>() };
        assert_eq!(r.kind, WPS_EVENT_GROUP_MESSAGE);
        assert_eq!(r.data_type, WPS_DATA_TYPE_TEXT);
        assert_eq!(r.size % 8, 0);
        let text =
            |from: usize, len: usize| String::from_utf8_lossy(&buf[from..from + len]).into_owned();
        let start = at + std::mem::size_of::<wps_message_record>();
        let (glen, flen) = (r.group_len as usize, r.from_user_id_len as usize);
        let from = match r.flags & WPS_MESSAGE_HAS_FROM_USER_ID {
            0 => "-".to_string(),
            _ => text(start + glen, flen),
        };
        let data = text(start + glen + flen, r.data_len as usize);
        let line = format!("m {} {from} {data}", text(start, glen));
        let sequence_id = (r.flags & WPS_MESSAGE_HAS_SEQUENCE_ID != 0).then_some(r.sequence_id);
        out.push((line, sequence_id));
        at += r.size as usize;
    }
    out
}

/// One `wps_client_dispatch_into` of up to 16 callbacks into `acks` (none when empty)
/// and `messages`; its counts, every output field written.
fn dispatch_into(
    c: *mut wps_client,
    acks: &mut [wps_ack_record],
    messages: &mut [u64],
) -> wps_dispatch_buffers {
    let mut buffers = wps_dispatch_buffers {
        acks: if acks.is_empty() {
            std::ptr::null_mut()
        } else {
            acks.as_mut_ptr()
        },
        ack_cap: acks.len(),
        messages: messages.as_mut_ptr().cast(),
        message_cap: std::mem::size_of_val(messages),
        ran: 99,
        acks_written: 99,
        messages_written: 99,
        message_bytes: 99,
    };
    check(
        unsafe { wps_client_dispatch_into(c, 16, &mut buffers) },
        "wps_client_dispatch_into",
    );
    assert!(buffers.ack_cap == 0 || buffers.acks_written <= buffers.ack_cap);
    assert!(buffers.message_bytes <= buffers.message_cap);
    buffers
}

#[test]
fn a_client_without_an_event_callback_still_gets_its_messages_as_records() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = started_poll_client_with(&setup.url, None, rec);
    let group = c"no-callback";
    check(
        unsafe { wps_client_join_group(c, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    for text in ["a", "b", "c"] {
        check(common::ffi_send_text(c, group, text, 0), "a blocking send");
    }
    let mut messages = [0u64; 64];
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while lines.len() < 3 {
        assert!(Instant::now() < deadline, "timed out: {lines:?}");
        let buffers = dispatch_into(c, &mut [], &mut messages);
        // SAFETY: the buffer is plain bytes, 8-byte aligned.
        let bytes = unsafe {
            std::slice::from_raw_parts(messages.as_ptr().cast::<u8>(), buffers.message_bytes)
        };
        lines.extend(
            read_message_records(bytes, buffers.messages_written)
                .into_iter()
                .map(|(l, _)| l),
        );
        if buffers.messages_written == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(
        lines,
        [
            "m no-callback u a",
            "m no-callback u b",
            "m no-callback u c"
        ]
    );
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

#[test]
fn messages_come_back_as_records_in_order_with_the_callbacks_and_large_ones_call_back() {
    let setup = Setup::new();
    let rec = common::leaked::<Recorder>();
    let c = started_poll_client(&setup.url, rec);
    let group = c"messages";
    check(
        unsafe { wps_client_join_group(c, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    // Small messages fit the 256-byte buffer (a few at a time), a 300-byte one never does.
    let large = "L".repeat(300);
    let mut texts: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    texts.insert(7, large.clone());
    texts.insert(15, large);
    let ops: Vec<u64> = texts
        .iter()
        .map(|t| send_async(c, group, t, WPS_SEND_RECORD, rec))
        .collect();

    let mut acks = [NO_RECORD; 4];
    let mut messages = [0u64; 32];
    let (mut lines, mut sequence_ids, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + WAIT;
    while lines.len() < texts.len() || acked.len() < ops.len() {
        assert!(
            Instant::now() < deadline,
            "timed out dispatching: {lines:?}"
        );
        let buffers = dispatch_into(c, &mut acks, &mut messages);
        // the callbacks that ran came before this call's records
        let called: Vec<String> = {
            let mut seen = rec.seen.lock().unwrap();
            let timeline = std::mem::take(&mut seen.timeline);
            timeline
                .into_iter()
                .filter(|l| l.starts_with("m "))
                .collect()
        };
        lines.extend(called.into_iter().map(|l| (l, true)));
        // SAFETY: the buffer is plain bytes, 8-byte aligned.
        let bytes = unsafe {
            std::slice::from_raw_parts(messages.as_ptr().cast::<u8>(), buffers.message_bytes)
        };
        for (line, sequence_id) in read_message_records(bytes, buffers.messages_written) {
            lines.push((line, false));
            sequence_ids.push(sequence_id);
        }
        acked.extend(acks[..buffers.acks_written].iter().map(|r| r.op_id));
        if buffers.ran + buffers.acks_written + buffers.messages_written == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let expected: Vec<(String, bool)> = texts
        .iter()
        .map(|t| (format!("m messages u {t}"), t.len() == 300))
        .collect();
    assert_eq!(lines, expected, "in order; only the large ones called back");
    assert!(
        sequence_ids.iter().all(Option::is_some),
        "the reliable protocol numbers them"
    );
    assert!(sequence_ids.windows(2).all(|w| w[0] < w[1]));
    acked.sort_unstable();
    assert_eq!(acked, ops, "every acked send as a record");

    // Bad arguments, and no arrays at all (a plain dispatch).
    let mut misaligned = wps_dispatch_buffers {
        acks: std::ptr::null_mut(),
        ack_cap: 4,
        messages: messages.as_mut_ptr().cast::<u8>().wrapping_add(1),
        message_cap: 64,
        ran: 0,
        acks_written: 0,
        messages_written: 0,
        message_bytes: 0,
    };
    assert_eq!(
        unsafe { wps_client_dispatch_into(c, 1, &mut misaligned) },
        WPS_STATUS_INVALID_ARGUMENT
    );
    let mut misaligned_acks = wps_dispatch_buffers {
        acks: acks.as_mut_ptr().cast::<u8>().wrapping_add(4).cast(),
        messages: std::ptr::null_mut(),
        ..misaligned
    };
    assert_eq!(
        unsafe { wps_client_dispatch_into(c, 1, &mut misaligned_acks) },
        WPS_STATUS_INVALID_ARGUMENT
    );
    let mut too_long = wps_dispatch_buffers {
        acks: acks.as_mut_ptr(),
        ack_cap: usize::MAX / 16,
        messages: std::ptr::null_mut(),
        ..misaligned
    };
    assert_eq!(
        unsafe { wps_client_dispatch_into(c, 1, &mut too_long) },
        WPS_STATUS_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { wps_client_dispatch_into(c, 1, std::ptr::null_mut()) },
        WPS_STATUS_NULL_ARG
    );
    // The handle is checked before the buffers, as in every call.
    assert_eq!(
        unsafe { wps_client_dispatch_into(std::ptr::null_mut(), 1, &mut misaligned) },
        WPS_STATUS_NULL_ARG
    );
    let mut none = wps_dispatch_buffers {
        messages: std::ptr::null_mut(),
        ..misaligned
    };
    check(
        unsafe { wps_client_dispatch_into(c, 1, &mut none) },
        "no arrays",
    );
    assert_eq!(
        (none.acks_written, none.messages_written, none.message_bytes),
        (0, 0, 0)
    );
    assert_eq!(
        unsafe { wps_client_dispatch_into(std::ptr::null_mut(), 1, &mut none) },
        WPS_STATUS_NULL_ARG
    );

    let threaded = setup.client(rec, true);
    assert_eq!(
        unsafe { wps_client_dispatch_into(threaded, 1, &mut none) },
        WPS_STATUS_ILLEGAL_STATE
    );
    unsafe { wps_client_free(threaded) };
    unsafe { wps_client_free(c) };
    setup.shutdown();
}

#[test]
fn an_invocation_started_before_a_stop_completes_with_stopped() {
    // The invocations are pending when the client stops.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (emulator, url) = common::emulator_with_silent_upstream(&rt);
    let rec = common::leaked::<Recorder>();
    let c = client_of(&url, rec, false);
    for round in 0..30 {
        check(unsafe { wps_client_start(c) }, "wps_client_start");
        let mut op = 0;
        let status = unsafe {
            wps_client_invoke_event_async(
                c,
                c"e".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                "x".as_ptr(),
                1,
                0,
                Some(on_complete),
                rec.user_data(),
                &mut op,
            )
        };
        check(status, "wps_client_invoke_event_async");
        check(unsafe { wps_client_stop(c) }, "wps_client_stop");
        rec.wait("the invocation's completion", |s| {
            s.completions.contains_key(&op)
        });
        let seen = rec.seen.lock().unwrap();
        assert_eq!(
            seen.completions[&op],
            vec![WPS_STATUS_STOPPED],
            "round {round}: started while connected, ended by the stop"
        );
    }
    unsafe { wps_client_free(c) };
    rt.block_on(emulator.shutdown());
}

/// A client that frees itself in its connected event's callback, then calls itself from
/// that callback.
#[derive(Default)]
struct FreedOnConnected {
    /// The completions of the calls.
    rec: Recorder,
    seen: common::Watched<FreedState>,
}

#[derive(Default)]
struct FreedState {
    /// The client, set once the call that started it has returned: no other thread may
    /// be inside a call of a client when it is freed.
    client: Option<usize>,
    /// The statuses the calls returned.
    statuses: Vec<u32>,
    /// The finalizer ran.
    freed: bool,
}

/// Frees the client, then invokes without blocking and sends a blocking marker behind
/// the invocation: once the marker is acked, the service has read all written before it.
unsafe extern "C" fn free_then_invoke(user_data: *mut c_void, event: *const wps_event) {
    let this = &*(user_data as *const FreedOnConnected);
    if (*event).kind != WPS_EVENT_CONNECTED {
        return;
    }
    this.seen
        .wait("the start call's return", |s| s.client.is_some());
    let c = this.seen.seen.lock().unwrap().client.unwrap() as *mut wps_client;
    wps_client_free(c);
    let invoke = wps_client_invoke_event_async(
        c,
        c"e".as_ptr(),
        WPS_DATA_TYPE_TEXT,
        "x".as_ptr(),
        1,
        0,
        Some(on_complete),
        this.rec.user_data(),
        std::ptr::null_mut(),
    );
    let (marker, _) = send_blocking(c, "marker", None);
    this.seen
        .seen
        .lock()
        .unwrap()
        .statuses
        .extend([invoke, marker]);
    this.seen.changed.notify_all();
}

unsafe extern "C" fn note_freed(user_data: *mut c_void) {
    let this = &*(user_data as *const FreedOnConnected);
    // Notified under the lock: the test, which may drop `this` once it sees `freed`,
    // cannot see it before this call is done with `this`.
    let mut seen = this.seen.seen.lock().unwrap();
    seen.freed = true;
    this.seen.changed.notify_all();
}

/// A scripted service for one connection: connects the client, acks its sendToGroups, and
/// gathers the type of every frame but pings and sequence acks until the client closes.
async fn frame_types_service(listener: tokio::net::TcpListener) -> Vec<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = common::accepted_connected(listener).await;
    let mut types = Vec::new();
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        if let (true, Some(ack_id)) = (kind == "sendToGroup", frame["ackId"].as_u64()) {
            let ack = serde_json::json!({"type": "ack", "ackId": ack_id, "success": true});
            ws.send(Message::text(ack.to_string())).await.unwrap();
        }
        if kind != "ping" && kind != "sequenceAck" {
            types.push(kind);
        }
    }
    types
}

#[test]
fn an_invocation_after_the_free_began_is_refused_unsent() {
    // Called by a callback that runs during the teardown: refused with STOPPED before it
    // reaches the client, so nothing completes and nothing is written. (Handed over
    // first, then refused, it was written whenever the connection task took it before
    // the refusal dropped it: in some rounds only.)
    const ROUNDS: usize = 300;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..ROUNDS {
        let (url, service) = common::scripted(&rt, frame_types_service);
        let probe = common::leaked::<FreedOnConnected>();
        let c = common::ffi_client(
            &url,
            Some(free_then_invoke),
            probe as *const FreedOnConnected as *mut c_void,
            Some(note_freed),
        );
        let status =
            unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) };
        check(status, "wps_client_start_async");
        probe.seen.seen.lock().unwrap().client = Some(c as usize);
        probe.seen.changed.notify_all();
        probe.seen.wait("the finalizer", |s| s.freed);
        assert_eq!(
            probe.seen.seen.lock().unwrap().statuses,
            [WPS_STATUS_STOPPED, WPS_STATUS_OK],
            "round {round}: the invocation's and the marker's statuses"
        );
        let types = rt
            .block_on(async { tokio::time::timeout(WAIT, service).await })
            .expect("the connection was not closed")
            .unwrap();
        assert_eq!(
            types,
            ["sendToGroup"],
            "round {round}: the invocation was written"
        );
        assert!(probe.rec.seen.lock().unwrap().completions.is_empty());
    }
}

/// A scripted service for one connection: connects the client, then gathers the data of
/// every sendToGroup frame until the client closes.
async fn gathering_service(listener: tokio::net::TcpListener) -> Vec<String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = common::accepted_connected(listener).await;
    let mut gathered = Vec::new();
    while let Some(Ok(Message::Text(text))) = ws.next().await {
        let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "sendToGroup" {
            gathered.push(frame["data"].as_str().unwrap().to_owned());
        }
    }
    gathered
}

#[test]
fn fire_and_forget_sends_past_the_operation_queue_go_out_before_a_stop() {
    // Far more than the core's operation queue (1024) holds: most wait in its overflow
    // queue, already completed as sent, when the stop comes.
    const SENDS: usize = 5000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, service) = common::scripted(&rt, gathering_service);
    let rec = common::leaked::<Recorder>();
    let c = client_of(&url, rec, true);
    let ops: Vec<u64> = (0..SENDS)
        .map(|i| send_async(c, c"g", &format!("m{i:05}"), WPS_SEND_FIRE_AND_FORGET, rec))
        .collect();
    check(unsafe { wps_client_stop(c) }, "wps_client_stop");
    rec.wait("every completion", |s| s.completions.len() == SENDS);
    {
        let seen = rec.seen.lock().unwrap();
        for op in &ops {
            assert_eq!(seen.completions[op], vec![WPS_STATUS_OK], "operation {op}");
        }
    }
    let gathered = rt
        .block_on(async { tokio::time::timeout(WAIT, service).await })
        .expect("the service still reads after the stop")
        .unwrap();
    let expected: Vec<String> = (0..SENDS).map(|i| format!("m{i:05}")).collect();
    assert_eq!(
        gathered.len(),
        SENDS,
        "messages reported sent before the stop but never written"
    );
    assert_eq!(gathered, expected);
    unsafe { wps_client_free(c) };
}

/// A scripted service whose first connection (of a reliable session) drops at once and
/// whose recovery attempt it holds unanswered; it connects the next connection and
/// returns the first text that comes to a group there.
async fn dropping_then_first_text(listener: tokio::net::TcpListener) -> String {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = common::accepted(&listener).await;
    let connected =
        r#"{"type":"system","event":"connected","connectionId":"c1","reconnectionToken":"rt1"}"#;
    ws.send(Message::text(connected)).await.unwrap();
    drop(ws);
    let _held = listener.accept().await.unwrap();
    let mut ws = common::accepted(&listener).await;
    let connected = r#"{"type":"system","event":"connected","connectionId":"c2"}"#;
    ws.send(Message::text(connected)).await.unwrap();
    loop {
        let frame = common::next_client_frame(&mut ws).await;
        if frame["type"] == "sendToGroup" {
            return frame["data"].as_str().unwrap().to_owned();
        }
    }
}

#[test]
fn fire_and_forget_sends_queued_by_a_recovery_are_dropped_by_a_stop() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, service) = common::scripted(&rt, dropping_then_first_text);
    let rec = common::leaked::<Recorder>();
    let c = client_of(&url, rec, true);
    common::wait_until("the recovery", || unsafe {
        wps_client_state(c) == WPS_STATE_RECOVERING
    });
    let op = send_async(c, c"g", "dropped", WPS_SEND_FIRE_AND_FORGET, rec);
    rec.wait("the send's completion", |s| s.completions.contains_key(&op));
    assert_eq!(rec.seen.lock().unwrap().completions[&op], [WPS_STATUS_OK]);
    check(
        common::ffi_send_text(c, c"g", "dropped too", WPS_SEND_FIRE_AND_FORGET),
        "blocking send",
    );
    check(unsafe { wps_client_stop(c) }, "wps_client_stop");
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    check(
        common::ffi_send_text(c, c"g", "after", WPS_SEND_FIRE_AND_FORGET),
        "send after the restart",
    );
    let first = rt
        .block_on(async { tokio::time::timeout(WAIT, service).await })
        .expect("the service got a text")
        .unwrap();
    assert_eq!(first, "after", "a message dropped by the stop was written");
    unsafe { wps_client_free(c) };
}

#[test]
fn a_deferred_send_cancelled_before_its_flush_is_never_written() {
    // Cancelled while deferred, it must not be written (`wps_client_cancel`: given up,
    // "not written if it was not yet"), also when the flush finds it alone on an idle
    // client, which the flushing thread would otherwise write itself. Its completion
    // carries its automatic ackId, which a resend then uses: published once.
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"cancelled-deferred";
    let (sender, receiver) = setup.sender_and_receiver(sender_rec, receiver_rec, group);
    let mut cancelled = Vec::new();
    for round in 0..5 {
        let op = send_async(
            sender,
            group,
            &format!("cancelled{round}"),
            WPS_SEND_DEFERRED,
            sender_rec,
        );
        check(unsafe { wps_client_cancel(sender, op) }, "cancel");
        check(unsafe { wps_client_flush_deferred(sender) }, "flush");
        // A marker behind it on the same connection: once it arrived, so would have
        // the cancelled message.
        let marker = send_async(sender, group, &format!("marker{round}"), 0, sender_rec);
        sender_rec.wait("the marker's ack", |s| s.completions.contains_key(&marker));
        receiver_rec.wait("the marker", |s| s.messages.len() > round);
        let seen = sender_rec.seen.lock().unwrap();
        assert_eq!(seen.completions[&op], vec![WPS_STATUS_CANCELLED]);
        assert_eq!(seen.completions[&marker], vec![WPS_STATUS_OK]);
        let ack_id = *seen
            .ack_ids
            .get(&op)
            .expect("the cancellation has no ackId");
        assert_ne!(Some(&ack_id), seen.ack_ids.get(&marker));
        cancelled.push(ack_id);
    }
    assert_eq!(
        receiver_rec.seen.lock().unwrap().messages,
        (0..5).map(|i| format!("marker{i}")).collect::<Vec<_>>(),
        "a cancelled deferred send was published"
    );
    let text = "resent";
    let mut out = wps_ack_result {
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: true,
    };
    let status = unsafe {
        wps_client_send_to_group_with_ack_id(
            sender,
            group.as_ptr(),
            WPS_DATA_TYPE_TEXT,
            text.as_ptr(),
            text.len(),
            0,
            cancelled[0],
            &mut out,
        )
    };
    check(status, "the resend with the cancelled send's ackId");
    assert_eq!((out.ack_id, out.is_duplicated), (cancelled[0], false));
    receiver_rec.wait("the resend", |s| s.messages.len() == 6);
    unsafe { wps_client_free(sender) };
    unsafe { wps_client_free(receiver) };
    setup.shutdown();
}

#[test]
fn deferred_fire_and_forget_sends_flushed_while_a_stop_comes_go_out_before_it() {
    // The sends returned (completed as sent) before the stop was called, so the stop
    // writes them before its close frame, also while another thread is still flushing
    // them: the stop's own flush must not find them gone and overtake them.
    const SENDS: usize = 3000;
    const ROUNDS: usize = 20;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..ROUNDS {
        let (url, service) = common::scripted(&rt, gathering_service);
        let rec = common::leaked::<Recorder>();
        let c = client_of(&url, rec, true);
        for i in 0..SENDS {
            let flags = WPS_SEND_DEFERRED | WPS_SEND_FIRE_AND_FORGET;
            send_async(c, c"g", &format!("m{i:05}"), flags, rec);
        }
        rec.wait("every completion", |s| s.completions.len() == SENDS);
        let meet = std::sync::Arc::new(std::sync::Barrier::new(2));
        let flusher = {
            let (meet, handle) = (meet.clone(), c as usize);
            std::thread::spawn(move || {
                meet.wait();
                check(
                    unsafe { wps_client_flush_deferred(handle as *mut wps_client) },
                    "flush",
                );
            })
        };
        meet.wait();
        // Into the flush, which takes milliseconds for this many.
        std::thread::sleep(Duration::from_micros(200));
        check(unsafe { wps_client_stop(c) }, "wps_client_stop");
        flusher.join().unwrap();
        let gathered = rt
            .block_on(async { tokio::time::timeout(WAIT, service).await })
            .expect("the service still reads after the stop")
            .unwrap();
        assert_eq!(
            gathered.len(),
            SENDS,
            "round {round}: deferred messages reported sent before the stop were dropped"
        );
        unsafe { wps_client_free(c) };
    }
}

#[test]
fn a_suspended_poll_client_drops_the_messages_that_come_and_counts_them() {
    const MESSAGES: usize = 200;
    let setup = Setup::new();
    let (sender_rec, rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let sender = setup.client(sender_rec, true);
    let c = started_poll_client(&setup.url, rec);
    let group = c"suspended";
    check(
        unsafe { wps_client_join_group(c, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    check(unsafe { wps_client_dispatch_suspend(c) }, "suspend");
    check(unsafe { wps_client_dispatch_suspend(c) }, "suspend again");
    for i in 0..MESSAGES {
        check(
            common::ffi_send_text(sender, group, &format!("m{i}"), 0),
            "send",
        );
    }
    // The client got every message: it acknowledged them all.
    setup.rt.block_on(common::until_stats(
        &setup.emulator,
        "the messages were not acknowledged",
        WAIT.as_secs(),
        |s| s["unackedMessages"] == 0,
    ));
    // Only the connected event, queued before the suspension, is left.
    let mut ran = 0;
    check(
        unsafe { wps_client_dispatch(c, 1000, &mut ran) },
        "dispatch",
    );
    assert_eq!(ran, 1);
    assert_eq!(rec.seen.lock().unwrap().timeline, ["connected"]);

    let mut dropped = u64::MAX;
    check(
        unsafe { wps_client_dispatch_resume(c, &mut dropped) },
        "resume",
    );
    assert_eq!(dropped, MESSAGES as u64);
    check(
        unsafe { wps_client_dispatch_resume(c, &mut dropped) },
        "resume again",
    );
    assert_eq!(dropped, 0);
    check(common::ffi_send_text(sender, group, "after", 0), "send");
    dispatch_records_until(c, rec, &mut Vec::new(), |seen, _| !seen.messages.is_empty());
    assert_eq!(rec.seen.lock().unwrap().messages, ["after"]);

    let null = std::ptr::null_mut();
    assert_eq!(
        unsafe { wps_client_dispatch_suspend(null) },
        WPS_STATUS_NULL_ARG
    );
    assert_eq!(
        unsafe { wps_client_dispatch_resume(null, null.cast()) },
        WPS_STATUS_NULL_ARG
    );
    assert_eq!(
        unsafe { wps_client_dispatch_suspend(sender) },
        WPS_STATUS_ILLEGAL_STATE
    );
    assert_eq!(
        unsafe { wps_client_dispatch_resume(sender, null.cast()) },
        WPS_STATUS_ILLEGAL_STATE
    );
    unsafe {
        wps_client_free(sender);
        wps_client_free(c);
    }
    setup.shutdown();
}

/// `c`'s connection id.
fn connection_id(c: *mut wps_client) -> String {
    try_connection_id(c).unwrap_or_else(|| panic!("connection id: {}", common::last_error()))
}

/// `c`'s connection id, if it has one.
fn try_connection_id(c: *mut wps_client) -> Option<String> {
    let mut id = [0u8; 128];
    let mut len = 0;
    let status = unsafe { wps_client_connection_id(c, id.as_mut_ptr().cast(), id.len(), &mut len) };
    (status == WPS_STATUS_OK).then(|| String::from_utf8(id[..len].to_vec()).unwrap())
}

#[test]
fn mixed_sends_of_several_threads_across_recovered_drops_arrive_once_in_order() {
    mixed_sends_across_drops(true);
}

#[test]
fn mixed_sends_of_several_threads_across_lost_sessions_complete_once_and_keep_order() {
    mixed_sends_across_drops(false);
}

/// Several threads send through one client while its socket keeps dropping (the
/// session `recoverable` or lost): one thread's blocking sends (its own writes when the
/// client is idle), another's completion sends (its own writes too when idle, else
/// queued), another's deferred sends flushed alone or in runs (written by the flushing
/// thread when it can), and one that mixes all of these with joins. Every operation completes
/// once; a subscriber gets each thread's messages in call order, none twice, every one
/// acked successfully, and, when every drop was recovered, all of them.
fn mixed_sends_across_drops(recoverable: bool) {
    const PER_THREAD: usize = 1500;
    const THREADS: usize = 4;
    let setup = Setup::new();
    let (sender_rec, receiver_rec) = (common::leaked::<Recorder>(), common::leaked::<Recorder>());
    let group = c"mixed";
    let receiver = setup.client(receiver_rec, true);
    check(
        unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let sender = unsafe {
        let o = wps_options_new();
        check(wps_options_set_ack_timeout_ms(o, 60_000), "ack timeout");
        check(wps_options_set_recovery(o, 30_000, 20), "recovery");
        check(
            wps_options_set_reconnect_retry(o, u32::MAX, 20, 20, WPS_RETRY_FIXED),
            "reconnect retry",
        );
        // Frequent pings: the task registers the callers' writes, and writes, often.
        check(wps_options_set_keep_alive(o, 50, 10_000), "keep-alive");
        let mut c = std::ptr::null_mut();
        let status = wps_client_new(
            setup.url.as_ptr(),
            o,
            Some(on_event),
            sender_rec.user_data(),
            None,
            &mut c,
        );
        wps_options_free(o);
        check(status, "wps_client_new");
        check(wps_client_start(c), "wps_client_start");
        c
    };
    let sender_at = AtomicPtr::new(sender);
    let sending = AtomicUsize::new(THREADS);
    let drops = AtomicUsize::new(0);
    // Per thread: (index, operation id) of its asynchronous sends, and the indexes its
    // blocking sends got acked.
    let outcomes = std::sync::Mutex::new(vec![(Vec::new(), Vec::new()); THREADS]);
    std::thread::scope(|s| {
        s.spawn(|| {
            let action = match recoverable {
                true => ":drop",
                false => ":drop?recoverable=false",
            };
            let mut n = 0u64;
            while sending.load(Ordering::Acquire) > 0 {
                n += 1;
                std::thread::sleep(Duration::from_millis(5 + n * 37 % 40));
                let c = sender_at.load(Ordering::Relaxed);
                if unsafe { wps_client_state(c) } != WPS_STATE_CONNECTED {
                    continue;
                }
                let Some(id) = try_connection_id(c) else {
                    continue;
                };
                let path = format!("/_emulator/hubs/hub/connections/{id}/{action}");
                let port = setup.emulator.port();
                let (_, body) = setup
                    .rt
                    .block_on(common::http(port, "POST", &path, &[], b""));
                if body.contains("\"dropped\":true") {
                    drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for t in 0..THREADS {
            let (sender_at, sending, outcomes, rec) =
                (&sender_at, &sending, &outcomes, &sender_rec);
            s.spawn(move || {
                let c = sender_at.load(Ordering::Relaxed);
                let (mut started, mut acked) = (Vec::new(), Vec::new());
                let mut deferred = 0;
                for i in 0..PER_THREAD {
                    let text = format!("t{t} {i:04}");
                    let form = match t {
                        3 => i % 4,
                        _ => t,
                    };
                    match form {
                        0 => match common::ffi_send_text(c, group, &text, 0) {
                            WPS_STATUS_OK => acked.push(i),
                            status => assert!(
                                !recoverable && status == WPS_STATUS_NOT_CONNECTED,
                                "{text}: status {status}: {}",
                                common::last_error()
                            ),
                        },
                        1 => {
                            let op = send_async(c, group, &text, 0, rec);
                            started.push((Some(i), op));
                        }
                        _ => {
                            let op = send_async(c, group, &text, WPS_SEND_DEFERRED, rec);
                            started.push((Some(i), op));
                            deferred += 1;
                            // Alone, or in runs of 3.
                            if t == 3 || deferred == 3 || i % 5 == 0 {
                                check(unsafe { wps_client_flush_deferred(c) }, "flush");
                                deferred = 0;
                            }
                            if t == 3 {
                                let side = CString::new(format!("side{i}")).unwrap();
                                let mut op = 0;
                                check(
                                    unsafe {
                                        wps_client_join_group_async(
                                            c,
                                            side.as_ptr(),
                                            Some(on_complete),
                                            rec.user_data(),
                                            &mut op,
                                        )
                                    },
                                    "join async",
                                );
                                started.push((None, op));
                            }
                        }
                    }
                    // Now and then the thread waits for its latest operation: the client
                    // falls idle, and fewer acked operations are pending than a recovery
                    // queues (past 999, sends fail at once with NOT_CONNECTED, by design).
                    if let (7, Some(&(_, op))) = (i % 8, started.last()) {
                        check(unsafe { wps_client_flush_deferred(c) }, "flush");
                        rec.wait("an operation", |s| s.completions.contains_key(&op));
                    }
                }
                check(unsafe { wps_client_flush_deferred(c) }, "flush");
                outcomes.lock().unwrap()[t] = (started, acked);
                sending.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap();
    let ops = outcomes
        .iter()
        .map(|(started, _)| started.len())
        .sum::<usize>();
    sender_rec.wait("every completion", |s| s.completions.len() == ops);
    {
        let seen = sender_rec.seen.lock().unwrap();
        for (started, acked) in &mut outcomes {
            for (i, op) in started.iter() {
                let statuses = &seen.completions[op];
                assert_eq!(statuses.len(), 1, "operation {op} completed {statuses:?}");
                match (statuses[0], i) {
                    (WPS_STATUS_OK, Some(i)) => acked.push(*i),
                    (WPS_STATUS_OK, None) => {}
                    (status, _) => assert!(!recoverable, "operation {op}: status {status}"),
                }
            }
            acked.sort_unstable();
        }
    }
    if recoverable {
        let timeline = &sender_rec.seen.lock().unwrap().timeline;
        assert!(
            !timeline.iter().any(|e| e == "disconnected"),
            "the sender only recovers: {timeline:?}"
        );
    }
    let all_acked: usize = outcomes.iter().map(|(_, acked)| acked.len()).sum();
    receiver_rec.wait("every message acked", |s| s.messages.len() >= all_acked);
    // Anything written twice, or not acked, would arrive by now.
    std::thread::sleep(Duration::from_millis(300));
    unsafe { wps_client_free(sender) };
    assert_eq!(
        sender_rec.seen.lock().unwrap().completions.len(),
        ops,
        "a completion came for no operation"
    );
    let messages = receiver_rec.seen.lock().unwrap().messages.clone();
    for (t, (_, acked)) in outcomes.iter().enumerate() {
        let prefix = format!("t{t} ");
        let got: Vec<usize> = messages
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix))
            .map(|i| i.parse().unwrap())
            .collect();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "thread {t}: out of order or twice: {got:?}"
        );
        if recoverable {
            assert_eq!(got, (0..PER_THREAD).collect::<Vec<_>>(), "thread {t}");
        } else {
            let missing: Vec<&usize> = acked.iter().filter(|i| !got.contains(i)).collect();
            assert!(
                missing.is_empty(),
                "thread {t}: acked, never received: {missing:?}"
            );
        }
    }
    let drops = drops.load(Ordering::Relaxed);
    assert!(drops > 0, "no socket was dropped");
    println!(
        "socket drops: {drops}, messages acked {all_acked}, received {}",
        messages.len()
    );
    unsafe { wps_client_free(receiver) };
    setup.shutdown();
}
