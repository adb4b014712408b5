//! `wps_client_free` releases everything of the client before it returns: its
//! connection task has ended and dropped its state (pending-ack table, buffers), so a
//! program that exits right after it leaves nothing behind for a leak checker.

mod common;

use common::check;

use std::ffi::CString;
use std::sync::atomic::{AtomicUsize, Ordering};

use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_new, wps_client_send_to_group, wps_client_start,
};
use webpubsub_client::ffi::status::WPS_DATA_TYPE_TEXT;
use webpubsub_emulator::{Config, Emulator};

/// Counts the connection tasks that ended (their last log record), synchronously.
struct TaskEnds;

static ENDED: AtomicUsize = AtomicUsize::new(0);

impl log::Log for TaskEnds {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target() == "webpubsub_client::client::connection"
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata())
            && record.args().to_string().contains("connection task ends")
        {
            ENDED.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn flush(&self) {}
}

static LOGGER: TaskEnds = TaskEnds;

#[test]
fn free_returns_after_the_connection_task_has_ended() {
    const CLIENTS: usize = 20;
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = CString::new(emulator.client_url("hub", &common::user_token("u"))).unwrap();

    for i in 0..CLIENTS {
        let mut c: *mut wps_client = std::ptr::null_mut();
        let status = unsafe {
            wps_client_new(
                url.as_ptr(),
                std::ptr::null(),
                None,
                std::ptr::null_mut(),
                None,
                &mut c,
            )
        };
        check(status, "wps_client_new");
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
