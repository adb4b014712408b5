//! The one process-wide tokio runtime every client's connection task runs on.
//!
//! It is created on first use and lives in a static that is never dropped, so no
//! client ever blocks on a runtime shutting down. Its worker threads are shared by
//! all clients: the thread count does not grow with the number of clients.

use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::{Handle, Runtime};

/// The runtime, with the `fork()` generation its threads belong to.
static RUNTIME: OnceLock<(Runtime, usize)> = OnceLock::new();

/// How many worker threads the runtime gets on a machine with `cpus` processors: half
/// of them, from 1 to 4. The workers only move frames between sockets and queues; the
/// other processors are left to the application's threads, which make the calls and run
/// the callbacks. A second worker on two processors costs more than it brings: each
/// blocking call then wakes one worker to write and is answered by the other, and
/// sequential acked sends from C measured 15-20% slower, at more CPU per message.
fn worker_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 4)
}

fn runtime() -> &'static (Runtime, usize) {
    RUNTIME.get_or_init(|| {
        crate::fork::watch();
        let workers = worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("webpubsub-rt")
            .enable_all()
            .build()
            .expect("building the webpubsub client runtime");
        (runtime, crate::fork::generation())
    })
}

/// The runtime's handle, or an error in a `fork()` child of the process that created
/// it (its worker threads do not exist there, so using it would hang).
pub fn try_handle() -> Result<Handle, String> {
    let (runtime, generation) = runtime();
    if crate::fork::generation() != *generation {
        return Err("the webpubsub runtime was created before fork(); it cannot be used in the child process".into());
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
/// In a `fork()` child of the process that created the runtime (see [`try_handle`]).
pub fn handle() -> Handle {
    try_handle().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a future to completion on the shared runtime, blocking the calling thread.
/// For blocking calls from threads that are not runtime workers (FFI, plain threads).
///
/// # Panics
/// When called from inside an async context (a runtime worker), where blocking would
/// stall other tasks, or in a `fork()` child (see [`try_handle`]).
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
