//! fork() children of a process whose threads were inside the library at the fork: the
//! process-wide settings a child may still change take no lock that a thread of the
//! parent may have held (none of the parent's threads exist in the child to release it).
#![cfg(unix)]

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use webpubsub_client::ffi::interrupt::wps_set_interrupt_check;
use webpubsub_client::ffi::status::WPS_STATUS_OK;

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
