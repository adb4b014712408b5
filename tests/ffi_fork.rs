//! fork() children of a process whose threads were inside the library at the fork: the
//! process-wide settings a child may still change take no lock that a thread of the
//! parent may have held (none of the parent's threads exist in the child to release it).
#![cfg(unix)]

mod common;

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use webpubsub_client::ffi::client::{wps_client_free, wps_client_start};
use webpubsub_client::ffi::credential::{
    wps_credential_result, wps_credential_result_defer, wps_credential_result_set_error,
    wps_credential_result_set_url,
};
use webpubsub_client::ffi::interrupt::wps_set_interrupt_check;
use webpubsub_client::ffi::status::{
    WPS_STATUS_CREDENTIAL_FAILED, WPS_STATUS_FORKED, WPS_STATUS_ILLEGAL_STATE, WPS_STATUS_OK,
};

unsafe extern "C" fn never() -> c_int {
    0
}

/// Forks `times` times; each child runs `child` (its status is the exit code), bounded
/// by an alarm: a child that hangs is killed and fails the test.
fn fork_children(times: usize, child: fn() -> u32) {
    for i in 0..times {
        // SAFETY: the child only calls `child` (library calls), then `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                libc::alarm(5);
                libc::_exit(child() as c_int);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {i} hung or failed (wait status {status:#x})"
        );
    }
}

#[test]
fn a_child_sets_the_interrupt_check_while_a_parent_thread_was_setting_it() {
    let stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(wps_set_interrupt_check(Some(never), 1000), WPS_STATUS_OK);
                assert_eq!(wps_set_interrupt_check(None, 0), WPS_STATUS_OK);
            }
        })
    };
    fork_children(300, || {
        wps_set_interrupt_check(Some(never), 50) | wps_set_interrupt_check(None, 0)
    });
    stop.store(true, Ordering::Relaxed);
    setter.join().unwrap();
}

/// The token of the parent's deferred credential request.
static PENDING: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn defer_and_keep(_user_data: *mut c_void, result: *mut wps_credential_result) {
    assert_eq!(wps_credential_result_defer(result), WPS_STATUS_OK);
    PENDING.store(result as usize, Ordering::SeqCst);
}

#[test]
fn a_child_answering_its_parents_deferred_credential_is_refused_without_the_lock() {
    let c =
        common::ffi_credential_client(defer_and_keep, std::ptr::null_mut(), None, std::ptr::null());
    let client = c as usize;
    let (started, start) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = started.send(unsafe { wps_client_start(client as *mut _) });
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while PENDING.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the credential callback never ran"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A parent thread takes the table's lock over and over (a stray token is looked up).
    let stop = Arc::new(AtomicBool::new(false));
    let answerer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let stray = (usize::MAX - 7) as *mut wps_credential_result;
            while !stop.load(Ordering::Relaxed) {
                let status = unsafe { wps_credential_result_set_url(stray, c"ws://h/".as_ptr()) };
                assert_eq!(status, WPS_STATUS_ILLEGAL_STATE);
            }
        })
    };
    fork_children(300, || {
        let token = PENDING.load(Ordering::SeqCst) as *mut wps_credential_result;
        let answer = unsafe { wps_credential_result_set_error(token, c"child".as_ptr()) };
        let deferral = wps_credential_result_defer(token);
        u32::from(answer != WPS_STATUS_FORKED || deferral != WPS_STATUS_FORKED)
    });
    stop.store(true, Ordering::Relaxed);
    answerer.join().unwrap();
    // The parent's request is still pending.
    let token = PENDING.load(Ordering::SeqCst) as *mut wps_credential_result;
    let status = unsafe { wps_credential_result_set_error(token, c"parent".as_ptr()) };
    assert_eq!(status, WPS_STATUS_OK);
    let started = start.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(started, WPS_STATUS_CREDENTIAL_FAILED);
    unsafe { wps_client_free(c) };
}
