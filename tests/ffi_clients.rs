//! The C ABI driven from Rust, like a C program would: many clients on a few
//! dispatcher threads, ordered events, finalizers exactly once. (The full C harness is
//! `tests/c/run.sh`.)

mod common;

use common::{check, ffi_credential_client};

use std::cell::UnsafeCell;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_CONNECTED, WPS_EVENT_GROUP_MESSAGE};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_join_group, wps_client_new_with_credential,
    wps_client_send_to_group, wps_client_start, wps_client_start_async,
};
use webpubsub_client::ffi::credential::{wps_credential_result, wps_credential_result_set_url};
use webpubsub_client::ffi::status::WPS_DATA_TYPE_TEXT;
use webpubsub_emulator::{Config, Emulator};

/// What one client's callbacks saw.
#[derive(Default)]
struct Seen {
    messages: Vec<String>,
    threads: Vec<String>,
    freed: usize,
}

type Recorder = common::Watched<Seen>;

unsafe extern "C" fn on_event(user_data: *mut c_void, event: *const wps_event) {
    let rec = &*(user_data as *const Recorder);
    let event = &*event;
    let mut seen = rec.seen.lock().unwrap();
    let name = std::thread::current().name().unwrap_or("").to_owned();
    seen.threads.push(name);
    if event.kind == WPS_EVENT_GROUP_MESSAGE {
        let data = std::slice::from_raw_parts(event.data, event.data_len);
        seen.messages
            .push(String::from_utf8_lossy(data).into_owned());
    }
    rec.changed.notify_all();
}

unsafe extern "C" fn on_free(user_data: *mut c_void) {
    let rec = &*(user_data as *const Recorder);
    rec.seen.lock().unwrap().freed += 1;
    rec.changed.notify_all();
}

/// How many clients fit this process's open-file limit (two sockets each, the
/// emulator runs in-process), at most `wanted`.
fn clients_within_fd_limit(wanted: usize) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: Option<usize> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    soft.map_or(wanted, |n| wanted.min(n.saturating_sub(64) / 2))
}

fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

#[test]
fn many_clients_share_a_few_dispatcher_threads_and_events_stay_ordered() {
    const MESSAGES: usize = 50;
    let clients_wanted = clients_within_fd_limit(1000);
    assert!(
        clients_wanted >= 100,
        "the open-file limit is too low for this test"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let token = common::user_token("u");
    let url = CString::new(emulator.client_url("hub", &token)).unwrap();
    let group = c"g";

    let recorders: Vec<Box<Recorder>> = (0..clients_wanted).map(|_| Box::default()).collect();
    let mut clients: Vec<*mut wps_client> = Vec::new();
    let mut before = 0;
    for (i, rec) in recorders.iter().enumerate() {
        let user_data = &**rec as *const Recorder as *mut c_void;
        let c = common::ffi_client(&url, Some(on_event), user_data, Some(on_free));
        check(unsafe { wps_client_start(c) }, "wps_client_start");
        if i == 0 {
            before = thread_count();
        }
        clients.push(c);
    }
    let grown = thread_count().saturating_sub(before);
    assert!(grown <= 8, "{clients_wanted} clients added {grown} threads");

    let (sender, receiver) = (clients[0], clients[clients_wanted - 1]);
    check(
        unsafe { wps_client_join_group(receiver, group.as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    for i in 0..MESSAGES {
        let text = format!("m{i:03}");
        let status = unsafe {
            wps_client_send_to_group(
                sender,
                group.as_ptr(),
                WPS_DATA_TYPE_TEXT,
                text.as_ptr(),
                text.len(),
                0,
                std::ptr::null_mut(),
            )
        };
        check(status, "send");
    }
    let rec = &recorders[clients_wanted - 1];
    rec.wait("every message", |s| s.messages.len() >= MESSAGES);
    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:03}")).collect();
    {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(seen.messages, expected);
        assert!(
            seen.threads.iter().all(|t| t.starts_with("wps-dispatch-")),
            "{:?}",
            seen.threads
        );
    }

    for c in clients {
        unsafe { wps_client_free(c) };
    }
    for rec in &recorders {
        let seen = rec.seen.lock().unwrap();
        assert_eq!(seen.freed, 1, "finalizer ran once, before free returned");
    }
    rt.block_on(emulator.shutdown());
}

/// What the client freed from its own callback saw.
struct FreedInside {
    url: CString,
    client: AtomicPtr<wps_client>,
    callback_returned: AtomicBool,
    finalized: Mutex<Option<(String, bool)>>,
    /// The application no longer uses the client: a callback may free it.
    may_free: AtomicBool,
}

impl FreedInside {
    /// A client of `emulator`'s hub "hub" not created yet; its callbacks may free it
    /// once `may_free` is set.
    fn new(emulator: &Emulator, may_free: bool) -> FreedInside {
        FreedInside {
            url: CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap(),
            client: AtomicPtr::new(std::ptr::null_mut()),
            callback_returned: AtomicBool::new(false),
            finalized: Mutex::new(None),
            may_free: AtomicBool::new(may_free),
        }
    }

    fn user_data(&self) -> *mut c_void {
        self as *const FreedInside as *mut c_void
    }

    /// Waits for the finalizer: the thread it ran on, and whether the callback that
    /// freed the client had returned by then.
    fn wait_finalized(&self, what: &str) -> (String, bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(seen) = self.finalized.lock().unwrap().clone() {
                return seen;
            }
            assert!(Instant::now() < deadline, "the {what} never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

unsafe extern "C" fn provide_url(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const FreedInside);
    wps_credential_result_set_url(result, s.url.as_ptr());
}

unsafe extern "C" fn credential_finalizer(user_data: *mut c_void) {
    let s = &*(user_data as *const FreedInside);
    let thread = std::thread::current().name().unwrap_or("").to_owned();
    let after = s.callback_returned.load(Ordering::SeqCst);
    *s.finalized.lock().unwrap() = Some((thread, after));
}

unsafe extern "C" fn free_on_connected(user_data: *mut c_void, event: *const wps_event) {
    let s = &*(user_data as *const FreedInside);
    if (*event).kind == WPS_EVENT_CONNECTED {
        wps_client_free(s.client.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(300));
        s.callback_returned.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_client_freed_in_its_callback_finalizes_its_credential_on_the_dispatcher_after_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let state = FreedInside::new(&emulator, true);
    let user_data = state.user_data();
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new_with_credential(
            Some(provide_url),
            user_data,
            Some(credential_finalizer),
            std::ptr::null(),
            Some(free_on_connected),
            user_data,
            None,
            &mut c,
        )
    };
    check(status, "wps_client_new_with_credential");
    state.client.store(c, Ordering::SeqCst);
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    let (thread, after) = state.wait_finalized("credential finalizer");
    assert!(thread.starts_with("wps-dispatch-"), "ran on {thread:?}");
    assert!(
        after,
        "ran before the callback that freed the client returned"
    );
    rt.block_on(emulator.shutdown());
}

unsafe extern "C" fn free_in_credential(
    user_data: *mut c_void,
    result: *mut wps_credential_result,
) {
    let s = &*(user_data as *const FreedInside);
    wps_credential_result_set_url(result, s.url.as_ptr());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.may_free.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    wps_client_free(s.client.load(Ordering::SeqCst));
    // Still using the user data the event callback shares with this one.
    std::thread::sleep(Duration::from_millis(300));
    s.callback_returned.store(true, Ordering::SeqCst);
}

unsafe extern "C" fn event_finalizer(user_data: *mut c_void) {
    credential_finalizer(user_data);
}

#[test]
fn a_client_freed_in_its_credential_callback_finalizes_its_user_data_after_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let state = FreedInside::new(&emulator, false);
    let user_data = state.user_data();
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new_with_credential(
            Some(free_in_credential),
            user_data,
            None,
            std::ptr::null(),
            None,
            user_data,
            Some(event_finalizer),
            &mut c,
        )
    };
    check(status, "wps_client_new_with_credential");
    state.client.store(c, Ordering::SeqCst);
    let status =
        unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    check(status, "wps_client_start_async");
    state.may_free.store(true, Ordering::SeqCst);
    let (thread, after) = state.wait_finalized("user data finalizer");
    assert!(thread.starts_with("wps-dispatch-"), "ran on {thread:?}");
    assert!(
        after,
        "ran before the credential callback that freed the client returned"
    );
    rt.block_on(emulator.shutdown());
}

/// A credential callback that runs until released, whose finalizer writes with no
/// synchronization of its own, as a C program may.
struct HeldCredential {
    url: CString,
    entered: AtomicBool,
    release: AtomicBool,
    finalized: UnsafeCell<bool>,
}

unsafe extern "C" fn held_credential(user_data: *mut c_void, result: *mut wps_credential_result) {
    let s = &*(user_data as *const HeldCredential);
    s.entered.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.release.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    wps_credential_result_set_url(result, s.url.as_ptr());
}

unsafe extern "C" fn held_credential_finalizer(user_data: *mut c_void) {
    let s = &*(user_data as *const HeldCredential);
    *s.finalized.get() = true;
}

/// A free while the credential callback runs on another thread returns once that
/// callback has returned and the credential's finalizer has run after it (the read
/// below is ordered after the finalizer's write; scripts/tsan.sh checks that too).
#[test]
fn a_client_freed_during_its_credential_callback_returns_after_the_finalizer_ran() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let state = HeldCredential {
        url: CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap(),
        entered: AtomicBool::new(false),
        release: AtomicBool::new(false),
        finalized: UnsafeCell::new(false),
    };
    let user_data = &state as *const HeldCredential as *mut c_void;
    let c = ffi_credential_client(
        held_credential,
        user_data,
        Some(held_credential_finalizer),
        std::ptr::null(),
    );
    let status =
        unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    check(status, "wps_client_start_async");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.entered.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the credential callback never ran"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let release = &state.release;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            release.store(true, Ordering::SeqCst);
        });
        unsafe { wps_client_free(c) };
    });
    // SAFETY: the finalizer ran before `wps_client_free` returned.
    assert!(
        unsafe { *state.finalized.get() },
        "free returned before the credential finalizer ran"
    );
    rt.block_on(emulator.shutdown());
}
