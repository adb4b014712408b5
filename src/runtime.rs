//! The one process-wide tokio runtime every client's connection task runs on.
//!
//! It is created on first use and lives in a static that is never dropped, so no
//! client ever blocks on a runtime shutting down. Its worker threads are shared by
//! all clients: the thread count does not grow with the number of clients.

use std::any::Any;
use std::future::Future;
use std::panic;
use tokio::runtime::{Handle, Runtime};

use crate::try_once::TryOnce;

/// The runtime, with the `fork()` generation its threads belong to.
static RUNTIME: TryOnce<(Runtime, usize)> = TryOnce::new();

/// How many worker threads the runtime gets on a machine with `cpus` processors: half
/// of them, from 1 to 4. The workers only move frames between sockets and queues; the
/// other processors are left to the application's threads, which make the calls and run
/// the callbacks. A second worker on two processors costs more than it brings: each
/// blocking call then wakes one worker to write and is answered by the other, and
/// sequential acked sends from C measured 15-20% slower, at more CPU per message.
fn worker_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 4)
}

/// The runtime, created by the first caller; an error when the system refuses its
/// threads (not kept: the next caller tries again).
fn runtime() -> Result<&'static (Runtime, usize), String> {
    RUNTIME.get_or_try_init(|| {
        crate::fork::watch();
        let workers = worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()));
        // tokio panics when the system refuses a worker thread (a thread or memory limit).
        let built = panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("webpubsub-rt")
                .enable_all()
                .build()
        });
        let detail = match built {
            Ok(Ok(runtime)) => return Ok((runtime, crate::fork::generation())),
            Ok(Err(e)) => e.to_string(),
            Err(payload) => panic_detail(payload.as_ref()),
        };
        Err(format!("cannot start the webpubsub runtime: {detail}"))
    })
}

/// The text a panic was raised with.
pub(crate) fn panic_detail(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned())
}

/// Why the runtime cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeError {
    /// It was created before `fork()`: its worker threads do not exist in this child.
    Forked,
    /// The system refused its threads (a thread or memory limit); a later call tries again.
    Start(String),
}

impl std::fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuntimeError::Forked => {
                "the webpubsub runtime was created before fork(); it cannot be used in the child process"
            }
            RuntimeError::Start(message) => message,
        })
    }
}

/// The runtime's handle (created on first use), or why it cannot be used.
pub fn try_handle() -> Result<Handle, RuntimeError> {
    let (runtime, generation) = runtime().map_err(RuntimeError::Start)?;
    if crate::fork::generation() != *generation {
        return Err(RuntimeError::Forked);
    }
    Ok(runtime.handle().clone())
}

/// Whether the runtime belongs to this process, without creating it: `None` before it
/// is created, `Some(false)` in a `fork()` child of the process that created it.
pub(crate) fn belongs_here() -> Option<bool> {
    RUNTIME
        .get()
        .map(|(_, generation)| crate::fork::generation() == *generation)
}

/// The runtime's handle (created on first use).
///
/// # Panics
/// When it cannot be used (see [`try_handle`]).
pub fn handle() -> Handle {
    try_handle().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a future to completion on the shared runtime, blocking the calling thread.
/// For blocking calls from threads that are not runtime workers (FFI, plain threads).
///
/// # Panics
/// When called from inside an async context (a runtime worker), where blocking would
/// stall other tasks, or when the runtime cannot be used (see [`try_handle`]).
pub fn block_on<F: Future>(f: F) -> F::Output {
    assert!(
        Handle::try_current().is_err(),
        "webpubsub_client::runtime::block_on called from an async context; await the future instead"
    );
    handle().block_on(f)
}

#[cfg(test)]
mod tests {
    #[test]
    fn half_the_processors_from_one_to_four_workers() {
        let workers: Vec<usize> = [1, 2, 3, 4, 8, 16, 64]
            .into_iter()
            .map(super::worker_threads)
            .collect();
        assert_eq!(workers, [1, 1, 1, 2, 4, 4, 4]);
    }

    #[test]
    fn block_on_runs_on_the_shared_runtime() {
        let name = super::block_on(async {
            tokio::spawn(async { std::thread::current().name().map(String::from) }).await
        });
        assert_eq!(name.unwrap().as_deref(), Some("webpubsub-rt"));
    }
}
