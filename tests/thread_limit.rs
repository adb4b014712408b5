//! The system refuses the library's threads (a thread or memory limit): each call that
//! needs one fails with `WPS_STATUS_INTERNAL` and says which thread it could not start,
//! and once threads can be started again, the same calls succeed.
//!
//! Run in a `fork()` child with a limit on its address space just above what it maps
//! (a new thread's stack does not fit, small allocations do), before anything in this
//! process started a thread of the library.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::{c_char, c_void};

use webpubsub_client::ffi::client::{wps_client_free, wps_client_new, wps_client_start};
use webpubsub_client::ffi::options::{
    wps_options_free, wps_options_new, wps_options_set_dispatch_mode,
};
use webpubsub_client::ffi::status::{WPS_DISPATCH_POLL, WPS_STATUS_INTERNAL, WPS_STATUS_OK};

extern "C" {
    /// The C API's `wps_set_log_callback` (exported by the library crate).
    fn wps_set_log_callback(
        cb: Option<unsafe extern "C" fn(*mut c_void, u32, *const c_char, *const c_char)>,
        user_data: *mut c_void,
        max_level: u32,
    ) -> u32;
}

unsafe extern "C" fn on_log(_: *mut c_void, _: u32, _: *const c_char, _: *const c_char) {}

/// Limits the address space to what is mapped now plus 1 MiB (`Some`), or lifts the
/// limit (`None`).
fn limit_address_space(on: bool) {
    let limit = if on {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmSize:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024 + (1 << 20)
    } else {
        libc::RLIM_INFINITY
    };
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit; lowering and raising the soft limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlim) }, 0);
}

/// `status` is `WPS_STATUS_INTERNAL` with a message that starts with `message`.
fn refused(status: u32, message: &str, what: &str) -> Result<(), String> {
    let detail = common::last_error();
    if status == WPS_STATUS_INTERNAL && detail.starts_with(message) {
        Ok(())
    } else {
        Err(format!("{what}: status {status}, {detail:?}"))
    }
}

/// A new client of `url` (poll mode or callbacks on the pool): its status, and the
/// client freed if made.
fn new_client(url: &std::ffi::CStr, poll: bool) -> u32 {
    let opts = wps_options_new();
    if poll {
        assert_eq!(
            wps_options_set_dispatch_mode(opts, WPS_DISPATCH_POLL),
            WPS_STATUS_OK
        );
    }
    let mut c = std::ptr::null_mut();
    // SAFETY: valid URL, options and out pointer.
    let status =
        unsafe { wps_client_new(url.as_ptr(), opts, None, std::ptr::null_mut(), None, &mut c) };
    unsafe {
        wps_options_free(opts);
        wps_client_free(c);
    }
    status
}

fn child(url: &std::ffi::CStr) -> Result<(), String> {
    limit_address_space(true);
    for round in 0..2 {
        // The second time too: a refused thread is not taken for another logger.
        let status = unsafe { wps_set_log_callback(Some(on_log), std::ptr::null_mut(), 3) };
        refused(
            status,
            "cannot start the logging thread",
            &format!("log callback, round {round}"),
        )?;
        refused(
            new_client(url, false),
            "cannot start the webpubsub runtime",
            &format!("client, round {round}"),
        )?;
    }
    // The runtime, but not the dispatcher threads: a task ran, so its worker has
    // finished starting (it maps its signal stack once running).
    limit_address_space(false);
    webpubsub_client::runtime::block_on(async { tokio::spawn(async {}).await.unwrap() });
    limit_address_space(true);
    for poll in [false, true] {
        refused(
            new_client(url, poll),
            "cannot start a dispatcher thread",
            &format!("client, poll mode {poll}"),
        )?;
    }
    limit_address_space(false);
    let status = unsafe { wps_set_log_callback(Some(on_log), std::ptr::null_mut(), 3) };
    if status != WPS_STATUS_OK {
        return Err(format!(
            "log callback once threads start: {status}, {:?}",
            common::last_error()
        ));
    }
    unsafe { wps_set_log_callback(None, std::ptr::null_mut(), 0) };
    if new_client(url, true) != WPS_STATUS_OK {
        return Err(format!(
            "poll client once threads start: {:?}",
            common::last_error()
        ));
    }
    let c = common::ffi_client(url, None, std::ptr::null_mut(), None);
    // SAFETY: a live client, freed once.
    let started = unsafe { wps_client_start(c) };
    unsafe { wps_client_free(c) };
    if started != WPS_STATUS_OK {
        return Err(format!(
            "start once threads start: {started}, {:?}",
            common::last_error()
        ));
    }
    Ok(())
}

/// Set in the child: the client URL of the parent's emulator.
const CHILD_URL: &str = "WPS_THREAD_LIMIT_CHILD_URL";

#[test]
fn refused_threads_are_reported_and_tried_again() {
    if let Ok(url) = std::env::var(CHILD_URL) {
        let url = std::ffi::CString::new(url).unwrap();
        if let Err(reason) = child(&url) {
            panic!("{reason}");
        }
        return;
    }
    // A new process: in a `fork()` of this one, a thread could start on the stack of
    // a thread that ended (glibc keeps them), within the limit.
    let (_rt, _emulator, url) = common::ffi_emulator();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "refused_threads_are_reported_and_tried_again",
            "--nocapture",
        ])
        .env(CHILD_URL, url.to_str().unwrap())
        // tokio panics on a refused thread: no backtrace to allocate for under the limit
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr)
    );
}
