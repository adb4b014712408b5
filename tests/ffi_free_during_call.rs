//! A client freed in the callback of the connected event that its own
//! `wps_client_start_async` brought about, on a dispatcher thread, before that call has
//! returned: the call ends on the client state it holds, and uses nothing of the client
//! after the free released it. (Completions cannot overtake their call: the task that
//! delivers them is spawned last.)
//!
//! To land the free inside the call every time, as it lands when the calling thread is
//! descheduled there, the calling thread is held in each of its allocations during the
//! call (a global allocator that waits on the armed thread) until the free has run the
//! client's finalizer, or for `HOLD` before the free can have begun.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{ffi_client, ffi_emulator};
use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_CONNECTED};
use webpubsub_client::ffi::client::{wps_client, wps_client_free, wps_client_start_async};
use webpubsub_client::ffi::status::WPS_STATUS_OK;

thread_local! {
    /// Whether this thread's allocations are held.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

/// How long an armed allocation waits for the free at most.
const HOLD: Duration = Duration::from_millis(200);

/// How long an armed allocation still waits once the finalizer has run: the handle is
/// released right after it, on the same thread.
const AFTER_FINALIZER: Duration = Duration::from_millis(50);

/// The client the callback frees.
static CLIENT: AtomicUsize = AtomicUsize::new(0);
/// Its finalizer has run.
static FINALIZED: AtomicBool = AtomicBool::new(false);

/// Holds the armed thread until the free has happened, or for `HOLD`.
fn hold() {
    if !ARMED.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    let deadline = Instant::now() + HOLD;
    while !FINALIZED.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if FINALIZED.load(Ordering::SeqCst) {
        std::thread::sleep(AFTER_FINALIZER);
    }
}

struct Holding;

unsafe impl GlobalAlloc for Holding {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        hold();
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        hold();
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Holding = Holding;

unsafe extern "C" fn free_when_connected(_user_data: *mut c_void, event: *const wps_event) {
    if (*event).kind == WPS_EVENT_CONNECTED {
        wps_client_free(CLIENT.load(Ordering::SeqCst) as *mut wps_client);
    }
}

unsafe extern "C" fn note_finalized(_user_data: *mut c_void) {
    FINALIZED.store(true, Ordering::SeqCst);
}

#[test]
fn an_asynchronous_start_whose_connected_event_frees_the_client() {
    let (_rt, _emulator, url) = ffi_emulator();
    let c = ffi_client(
        &url,
        Some(free_when_connected),
        std::ptr::null_mut(),
        Some(note_finalized),
    );
    CLIENT.store(c as usize, Ordering::SeqCst);

    ARMED.with(|a| a.set(true));
    let status =
        unsafe { wps_client_start_async(c, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    ARMED.with(|a| a.set(false));
    assert_eq!(status, WPS_STATUS_OK);

    let deadline = Instant::now() + Duration::from_secs(10);
    while !FINALIZED.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the client was never finalized");
        std::thread::sleep(Duration::from_millis(1));
    }
}
