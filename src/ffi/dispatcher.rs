//! Library-owned dispatcher threads that run every event and completion callback.
//!
//! A small process-wide pool (`min(cpus, 4)` threads, started on first use, never
//! stopped). Each client is pinned to one worker, whose FIFO queue keeps that client's
//! callbacks in order. Jobs are popped under the queue lock and run after releasing it,
//! so no callback ever runs while a library lock is held, and never on a tokio worker.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::panic::guard_job;

/// A unit of work for a dispatcher thread.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Most dispatcher threads the pool ever starts.
const MAX_WORKERS: usize = 4;

thread_local! {
    static CALLBACK_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as running a user callback for the guard's lifetime.
pub(crate) struct InCallback(());

impl InCallback {
    /// Enters a callback on this thread.
    pub(crate) fn enter() -> InCallback {
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        InCallback(())
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// True while this thread is inside a user callback called by the library.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// One dispatcher thread's queue.
pub(crate) struct Worker {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

impl Worker {
    /// Appends a job; it runs after every job pushed before it.
    pub(crate) fn push(&self, job: Job) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        self.ready.notify_one();
    }

    fn run(&self) {
        loop {
            let job = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(job) = queue.pop_front() {
                        break job;
                    }
                    queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            };
            guard_job("dispatcher job", job);
        }
    }
}

struct Pool {
    workers: Vec<Arc<Worker>>,
    next: AtomicUsize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = (0..cpus.clamp(1, MAX_WORKERS))
            .map(|i| {
                let worker = Arc::new(Worker {
                    queue: Mutex::new(VecDeque::new()),
                    ready: Condvar::new(),
                });
                let w = Arc::clone(&worker);
                std::thread::Builder::new()
                    .name(format!("wps-dispatch-{i}"))
                    .spawn(move || w.run())
                    .expect("spawn a dispatcher thread");
                worker
            })
            .collect();
        Pool {
            workers,
            next: AtomicUsize::new(0),
        }
    })
}

/// Picks the worker a new client is pinned to (round robin).
pub(crate) fn assign() -> Arc<Worker> {
    let pool = pool();
    let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.workers.len();
    Arc::clone(&pool.workers[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_of_one_worker_run_in_order_on_a_pool_thread() {
        let worker = assign();
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            worker.push(Box::new(move || {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                tx.send((i, name, in_callback())).unwrap();
            }));
        }
        worker.push(Box::new(|| {
            panic!("a panicking job does not kill the worker")
        }));
        let tx2 = tx.clone();
        worker.push(Box::new(move || {
            tx2.send((100, String::new(), false)).unwrap()
        }));
        for i in 0..=100 {
            let (n, name, inside) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(n, i);
            assert!(i == 100 || name.starts_with("wps-dispatch-"));
            assert!(!inside);
        }
        assert!(pool().workers.len() <= MAX_WORKERS);
    }
}
