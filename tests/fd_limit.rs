//! The process runs out of file descriptors (EMFILE): what fails for it says so, and
//! once descriptors are free again, the same calls succeed, nothing of the shortage kept.
//!
//! Each case runs in a child process (a new run of this binary) that lowers its own
//! descriptor limit and takes every free descriptor: the test runner's are left alone,
//! and what the library loads once per process (its runtime, the platform's root
//! certificates) is loaded there for the first time.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::{CString, OsStr};
use std::fs::File;

use common::pki::Pki;
use common::{fast_options, last_error, user_token};
use webpubsub_client::ffi::client::{wps_client_free, wps_client_new};
use webpubsub_client::ffi::status::{WPS_STATUS_INTERNAL, WPS_STATUS_OK};
use webpubsub_client::runtime::block_on;
use webpubsub_client::{Client, Credential, Error};
use webpubsub_emulator::{Config, Emulator};

/// Set in the child: the client URL of the parent's emulator.
const CHILD_URL: &str = "WPS_FD_LIMIT_CHILD_URL";

/// Takes every free descriptor under a limit of 256 (files open on `/dev/null`) but
/// `spare`; they are free again once the files are dropped.
fn take_descriptors(spare: usize) -> Vec<File> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers; lowering the soft limit needs no privilege.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_cur.min(256);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let mut taken = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => taken.push(file),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    taken.truncate(taken.len().saturating_sub(spare));
    taken
}

/// A client of `url` (not started).
fn client(url: String) -> Client {
    Client::with_channel(Credential::Url(url), fast_options())
        .unwrap()
        .0
}

/// Runs `test` of this binary in a new process, given `url` and `env`; fails with the
/// child's output unless that test ran and passed.
fn in_child(test: &str, url: &str, env: &[(&str, &OsStr)]) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(CHILD_URL, url)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the child failed: {}",
        stdout + String::from_utf8_lossy(&output.stderr)
    );
}

/// An emulator on a runtime of its own.
fn emulator(config: Config) -> (tokio::runtime::Runtime, Emulator) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(config)).unwrap();
    (rt, emulator)
}

#[test]
fn the_runtime_refused_descriptors_is_reported_and_started_by_the_next_client() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        let (_rt, emulator) = emulator(Config::default());
        let url = emulator.client_url("hub", &user_token("u"));
        in_child(
            "the_runtime_refused_descriptors_is_reported_and_started_by_the_next_client",
            &url,
            &[],
        );
        return;
    };
    let url = CString::new(url).unwrap();
    let new_client = || {
        let mut c = std::ptr::null_mut();
        // SAFETY: a valid URL and out pointer; the client, if made, is freed once.
        let status = unsafe {
            let status = wps_client_new(
                url.as_ptr(),
                std::ptr::null(),
                None,
                std::ptr::null_mut(),
                None,
                &mut c,
            );
            wps_client_free(c);
            status
        };
        (status, last_error())
    };
    let taken = take_descriptors(0);
    let refused = new_client();
    drop(taken);
    assert_eq!(
        refused,
        (
            WPS_STATUS_INTERNAL,
            "cannot start the webpubsub runtime: Too many open files (os error 24)".into()
        )
    );
    assert_eq!(new_client().0, WPS_STATUS_OK, "{}", last_error());
}

#[test]
fn root_certificates_unread_for_want_of_descriptors_are_read_by_the_next_start() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        let pki = Pki::new("fd-limit");
        let (_rt, emulator) = emulator(Config {
            tls: Some(pki.files.clone()),
            ..Config::default()
        });
        // The client trusts the CA as the platform's only root, not as an extra CA.
        let ca = pki.ca_file();
        in_child(
            "root_certificates_unread_for_want_of_descriptors_are_read_by_the_next_start",
            &emulator.client_url("hub", &user_token("u")),
            &[
                ("SSL_CERT_FILE", ca.as_os_str()),
                ("SSL_CERT_DIR", OsStr::new("")),
            ],
        );
        return;
    };
    let client = client(url);
    // One descriptor left: the TCP connection takes it, none is left to read the roots.
    let taken = take_descriptors(1);
    let error = block_on(client.start()).unwrap_err();
    drop(taken);
    assert!(
        matches!(&error, Error::Tls(m) if m.contains("Too many open files")),
        "{error}"
    );
    block_on(client.start()).unwrap();
}

#[test]
fn a_name_unresolved_for_want_of_descriptors_says_so() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        let (_rt, emulator) = emulator(Config::default());
        let url =
            emulator
                .client_url("hub", &user_token("u"))
                .replacen("127.0.0.1", "localhost", 1);
        in_child(
            "a_name_unresolved_for_want_of_descriptors_says_so",
            &url,
            &[],
        );
        return;
    };
    let client = client(url);
    let taken = take_descriptors(0);
    let error = block_on(client.start()).unwrap_err();
    drop(taken);
    assert!(
        matches!(&error, Error::Connect(m) if m.contains("Too many open files")),
        "{error}"
    );
    block_on(client.start()).unwrap();
}
