//! A client freed inside a callback (here the completion of its own
//! `wps_client_stop_async`) while its credential callback still runs on another thread:
//! the credential callback is a callback running during the teardown, and may still use
//! the handle (`wps_client_free`), so the handle is released only after it returned.
//!
//! The handle's release is seen by the test's global allocator (the deallocation of
//! the handle's address), so the credential callback can tell, once the client's other
//! finalizer has run, whether the handle it holds is gone.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{check, ffi_emulator};
use webpubsub_client::ffi::callbacks::wps_completion;
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_new_with_credential, wps_client_start_async,
    wps_client_stop_async,
};
use webpubsub_client::ffi::credential::{wps_credential_result, wps_credential_result_set_url};
use webpubsub_client::ffi::status::{WPS_STATUS_OK, WPS_STATUS_STOPPED};

/// How long any wait of the test may take.
const WAIT: Duration = Duration::from_secs(30);

/// How long the credential callback still looks for the handle's release once the
/// client's event finalizer has run (the release follows it at once, on the same thread).
const AFTER_FINALIZER: Duration = Duration::from_millis(200);

/// The handle's address, once created.
static HANDLE: AtomicUsize = AtomicUsize::new(0);
/// The handle was deallocated.
static RELEASED: AtomicBool = AtomicBool::new(false);

struct Watching;

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ptr as usize == HANDLE.load(Ordering::SeqCst) {
            RELEASED.store(true, Ordering::SeqCst);
        }
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// What the callbacks share with the test.
struct Probe {
    url: CString,
    /// Sent to once the credential callback runs.
    entered: Mutex<mpsc::Sender<()>>,
    /// The client's event finalizer has run.
    finalized: AtomicBool,
    /// The handle was released while the credential callback still ran.
    released_inside: AtomicBool,
    /// What a start from the credential callback returned after the free began.
    start_inside: AtomicU32,
    /// The credential finalizer has run.
    cred_finalized: AtomicBool,
}

fn probe(user_data: *mut c_void) -> &'static Probe {
    unsafe { &*(user_data as *const Probe) }
}

/// Waits until `done`, for `limit` at most; whether it happened.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Lets the test free the client, waits until the client's event finalizer has run,
/// then uses the handle as a callback running during the teardown may.
unsafe extern "C" fn credential(user_data: *mut c_void, result: *mut wps_credential_result) {
    let p = probe(user_data);
    p.entered.lock().unwrap().send(()).unwrap();
    // Without a teardown, nothing is started below: the test then fails on `start_inside`.
    if !wait_until(WAIT, || p.finalized.load(Ordering::SeqCst)) {
        return;
    }
    if wait_until(AFTER_FINALIZER, || RELEASED.load(Ordering::SeqCst)) {
        p.released_inside.store(true, Ordering::SeqCst);
    } else {
        let c = HANDLE.load(Ordering::SeqCst) as *mut wps_client;
        let status = wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut());
        p.start_inside.store(status, Ordering::SeqCst);
    }
    wps_credential_result_set_url(result, p.url.as_ptr());
}

unsafe extern "C" fn free_client(_user_data: *mut c_void, _completion: *const wps_completion) {
    wps_client_free(HANDLE.load(Ordering::SeqCst) as *mut wps_client);
}

unsafe extern "C" fn note_finalized(user_data: *mut c_void) {
    probe(user_data).finalized.store(true, Ordering::SeqCst);
}

unsafe extern "C" fn note_cred_finalized(user_data: *mut c_void) {
    probe(user_data)
        .cred_finalized
        .store(true, Ordering::SeqCst);
}

#[test]
fn a_client_freed_in_a_callback_while_its_credential_callback_runs() {
    let (_rt, _emulator, url) = ffi_emulator();
    let (entered_tx, entered) = mpsc::channel();
    let p: &'static Probe = Box::leak(Box::new(Probe {
        url,
        entered: Mutex::new(entered_tx),
        finalized: AtomicBool::new(false),
        released_inside: AtomicBool::new(false),
        start_inside: AtomicU32::new(u32::MAX),
        cred_finalized: AtomicBool::new(false),
    }));
    let user_data = p as *const Probe as *mut c_void;
    let mut c = std::ptr::null_mut();
    let status = unsafe {
        wps_client_new_with_credential(
            Some(credential),
            user_data,
            Some(note_cred_finalized),
            std::ptr::null(),
            None,
            user_data,
            Some(note_finalized),
            &mut c,
        )
    };
    check(status, "wps_client_new_with_credential");
    HANDLE.store(c as usize, Ordering::SeqCst);

    let status =
        unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    check(status, "wps_client_start_async");
    entered
        .recv_timeout(WAIT)
        .expect("the credential callback ran");
    // The stop abandons the attempt; its completion frees the client.
    let status = unsafe {
        wps_client_stop_async(
            c,
            Some(free_client),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, WPS_STATUS_OK);

    assert!(
        wait_until(WAIT, || p.cred_finalized.load(Ordering::SeqCst)),
        "the credential finalizer did not run"
    );
    assert!(
        !p.released_inside.load(Ordering::SeqCst),
        "the handle was released while a credential callback of its client still ran"
    );
    assert_eq!(p.start_inside.load(Ordering::SeqCst), WPS_STATUS_STOPPED);
    assert!(
        wait_until(WAIT, || RELEASED.load(Ordering::SeqCst)),
        "the handle was never released"
    );
}
