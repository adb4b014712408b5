//! The log bridge: records of the `log` crate go to one process-wide C callback.
//!
//! Records are queued (bounded; excess records are dropped) to one library-owned
//! logging thread, which calls the callback, so the callback never runs on an I/O
//! thread nor while a library lock is held.

use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::try_once::TryOnce;

use super::gate::InCallback;
use super::panic::guard;
use super::status::{
    fail, to_cstring, wps_status, WPS_STATUS_FORKED, WPS_STATUS_INTERNAL,
    WPS_STATUS_INVALID_ARGUMENT,
};

/// Log callback: `level` is one of `WPS_LOG_*`; `target` (the emitting module) and
/// `message` are borrowed for the duration of the call (a U+0000 in them is written as
/// the six characters `\u0000`).
pub type wps_log_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: u32,
        target: *const c_char,
        message: *const c_char,
    ),
>;

/// Records waiting for the logging thread beyond this are dropped.
const QUEUE_CAPACITY: usize = 4096;

#[derive(Clone, Copy)]
struct Sink {
    cb: unsafe extern "C" fn(*mut c_void, u32, *const c_char, *const c_char),
    user_data: *mut c_void,
    /// The `max_level` the callback was set with (above 0). Records are filtered
    /// against it when delivered: the process-wide level only spares formatting what no
    /// callback wants, and a thread logging may have read that of the callback set
    /// before or after this one.
    max_level: u32,
}

// SAFETY: the user data is only handed back to the user's callback, which the caller
// of `wps_set_log_callback` declares callable from the library's logging thread.
unsafe impl Send for Sink {}

enum Msg {
    Record {
        level: u32,
        target: String,
        message: String,
    },
    Flush(SyncSender<()>),
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);
/// The logging thread's queue and the `fork()` generation of the thread, once started;
/// `None` when the application had installed a `log` logger of its own.
static QUEUE: TryOnce<Option<(SyncSender<Msg>, usize)>> = TryOnce::new();

thread_local! {
    static ON_LOG_THREAD: Cell<bool> = const { Cell::new(false) };
}

struct Bridge;

static BRIDGE: Bridge = Bridge;

/// Whether a record may reach the host: within the process-wide level, and only the
/// library's own records. Dependencies (tungstenite) dump whole frames at trace level,
/// reconnection tokens and user payloads included.
fn allowed(metadata: &Metadata) -> bool {
    metadata.level() <= log::max_level() && metadata.target().starts_with("webpubsub_client")
}

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata) -> bool {
        allowed(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Some(Some((queue, _))) = QUEUE.get() {
            let msg = Msg::Record {
                level: record.level() as u32,
                target: record.target().to_owned(),
                message: record.args().to_string(),
            };
            if let Err(TrySendError::Full(_)) = queue.try_send(msg) {
                // The logging thread is behind: dropping is better than blocking I/O.
            }
        }
    }

    fn flush(&self) {}
}

fn run(rx: Receiver<Msg>) {
    ON_LOG_THREAD.with(|f| f.set(true));
    for msg in rx {
        match msg {
            Msg::Record {
                level,
                target,
                message,
            } => {
                let sink = *SINK.lock().unwrap_or_else(|e| e.into_inner());
                // Maybe queued under another callback's level: only what this one wants.
                let Some(sink) = sink.filter(|sink| level <= sink.max_level) else {
                    continue;
                };
                if let Some(_inside) = InCallback::enter() {
                    let target = to_cstring(&target);
                    let message = to_cstring(&message);
                    // SAFETY: the callback and user data were registered together.
                    unsafe { (sink.cb)(sink.user_data, level, target.as_ptr(), message.as_ptr()) };
                }
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// The logging thread's queue. The thread is started, then the bridge installed, once,
/// by whichever call comes first. A thread the system refuses is an error that the next
/// call tries again; another logger installed first is for good (the thread then ends
/// at once).
fn queue() -> Result<&'static (SyncSender<Msg>, usize), wps_status> {
    let started = QUEUE.get_or_try_init(|| -> Result<_, wps_status> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("wps-log".to_owned())
            .spawn(move || run(rx))
            .map_err(|e| {
                fail(
                    WPS_STATUS_INTERNAL,
                    format!("cannot start the logging thread: {e}"),
                )
            })?;
        let installed = log::set_logger(&BRIDGE).is_ok();
        Ok(installed.then(|| {
            crate::fork::watch();
            (tx, crate::fork::generation())
        }))
    })?;
    started.as_ref().ok_or_else(|| {
        fail(
            WPS_STATUS_INTERNAL,
            "another `log` logger is installed in this process",
        )
    })
}

/// Routes the library's logs to `cb` (process-wide), up to `max_level` (`WPS_LOG_*`;
/// 0 or a NULL `cb` turns logging off).
///
/// The callback runs on a library-owned logging thread. When this returns, the
/// previous callback is no longer running (unless this is called from inside it) and
/// will not be called again with its user data: to free that user data (at exit too,
/// where the logging thread may still be in the callback while `atexit` handlers run),
/// first replace the callback or turn logging off. In a `fork()` child of a process
/// whose logging thread had started, a callback gets `WPS_STATUS_FORKED` (there is no
/// thread to run it); NULL still turns logging off. `WPS_STATUS_INTERNAL` when another
/// Rust `log` logger was installed in this process before the library's first call
/// here (another Rust library linked in, for example): the library's logs go to it.
/// `WPS_STATUS_INTERNAL` too when the system refuses the logging thread; a later call
/// tries again.
#[no_mangle]
pub extern "C" fn wps_set_log_callback(
    cb: wps_log_cb,
    user_data: *mut c_void,
    max_level: u32,
) -> wps_status {
    guard(|| {
        let filter = match max_level {
            0 => LevelFilter::Off,
            1 => LevelFilter::Error,
            2 => LevelFilter::Warn,
            3 => LevelFilter::Info,
            4 => LevelFilter::Debug,
            5 => LevelFilter::Trace,
            _ => {
                return Err(fail(
                    WPS_STATUS_INVALID_ARGUMENT,
                    format!("unknown log level {max_level}"),
                ))
            }
        };
        let (queue, generation) = queue()?;
        if crate::fork::generation() != *generation {
            if cb.is_some() {
                return Err(fail(
                    WPS_STATUS_FORKED,
                    "the logging thread was started before fork(): the child process cannot route logs",
                ));
            }
            // Without `SINK`: a thread of the parent may have held its lock at the fork,
            // and no thread of the child would ever release it. Nothing reads it here.
            log::set_max_level(LevelFilter::Off);
            return Ok(());
        }
        let sink = cb.filter(|_| filter != LevelFilter::Off).map(|cb| Sink {
            cb,
            user_data,
            max_level,
        });
        {
            // Both under the lock: calls racing each other leave one call's level and
            // callback, never one's level with the other's callback.
            let mut current = SINK.lock().unwrap_or_else(|e| e.into_inner());
            log::set_max_level(if sink.is_some() {
                filter
            } else {
                LevelFilter::Off
            });
            *current = sink;
        }
        // The previous callback is done once the thread has emptied the queue.
        if !ON_LOG_THREAD.with(|f| f.get()) {
            let (tx, rx) = mpsc::sync_channel(1);
            if queue.send(Msg::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;

    fn meta(target: &str, level: Level) -> Metadata<'_> {
        Metadata::builder().target(target).level(level).build()
    }

    /// A fork() child turns logging off without the lock a thread of its parent held
    /// at the fork (the logging thread copies the callback under it for every record):
    /// no thread of the child would ever release it.
    #[cfg(unix)]
    #[test]
    fn a_fork_child_turns_logging_off_while_the_parent_held_the_callback_lock() {
        use super::super::status::WPS_STATUS_OK;
        use std::sync::mpsc;
        queue().unwrap();
        let (locked_tx, locked) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _sink = SINK.lock().unwrap();
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        locked.recv().unwrap();
        // SAFETY: the child only calls the function under test, then `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::alarm(5) }; // a hang ends the child with SIGALRM
            let status = wps_set_log_callback(None, std::ptr::null_mut(), 0);
            unsafe { libc::_exit(if status == WPS_STATUS_OK { 0 } else { 1 }) };
        }
        release.send(()).unwrap();
        holder.join().unwrap();
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child hung or failed (wait status {status:#x})"
        );
    }

    #[test]
    fn only_the_librarys_own_records_pass() {
        log::set_max_level(LevelFilter::Trace);
        for target in ["tungstenite::protocol", "tokio_tungstenite", "rustls::conn"] {
            assert!(!allowed(&meta(target, Level::Trace)), "{target}");
            assert!(!allowed(&meta(target, Level::Error)), "{target}");
        }
        assert!(allowed(&meta("webpubsub_client::client", Level::Trace)));
        log::set_max_level(LevelFilter::Info);
        assert!(!allowed(&meta("tungstenite::protocol", Level::Debug)));
        assert!(!allowed(&meta("webpubsub_client::client", Level::Debug)));
        assert!(allowed(&meta("webpubsub_client::client", Level::Info)));
        log::set_max_level(LevelFilter::Off);
    }
}
