//! Where every event and completion callback runs: a library-owned dispatcher thread,
//! or the application's own thread (poll mode).
//!
//! Thread mode (the default): a small process-wide pool (`min(cpus, 4)` threads,
//! started on first use, never stopped). Each client has a worker of its own, whose FIFO
//! queue keeps that client's callbacks in order, pinned to one pool thread. The thread
//! takes turns among its clients' queues, a turn running at most `TURN_JOBS` jobs for at
//! most `TURN_TIME`: a client flooded with events delays the others on its thread by a
//! turn, not by all of its backlog.
//!
//! Poll mode: the client gets a worker of its own that no thread runs. A file
//! descriptor becomes readable when callbacks are queued, and the application runs
//! them with `dispatch` on its event loop. When the client is freed, what is left is
//! handed over to a pool thread, so finalizers always run. While the application
//! cannot poll (its event loop ended and the client stays open), `suspend` drops the
//! client's messages instead of queueing them without end.
//!
//! Jobs are taken under the queue lock and run after releasing it, so no callback ever
//! runs while a library lock is held, and never on a tokio worker. A dispatcher is only
//! woken (its thread's turn list or descriptor) when it is idle, not once per job.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::info;

use crate::try_once::TryOnce;

use super::callbacks::{wps_ack_record, CompletionTarget, OwnedCompletion, QueuedEvent};
use super::panic::guard_job;

/// A unit of work for a dispatcher.
pub(crate) enum Job {
    /// A closure: a completion, a finalizer, jobs handed over.
    Run(Box<dyn FnOnce() + Send>),
    /// An event for its client's callback, held in the queue itself: no allocation
    /// per event (freed on the dispatcher thread, it would contend with the
    /// connection task's allocator).
    Event(QueuedEvent),
    /// An operation's outcome (its id, where it goes, what it is), also held in the
    /// queue itself: one per acked message.
    Completion(u64, CompletionTarget, OwnedCompletion),
}

impl Job {
    /// A closure as a job.
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Job {
        Job::Run(Box::new(f))
    }

    fn run(self) {
        match self {
            Job::Run(f) => f(),
            Job::Event(queued) => queued.sink.call(&queued.event),
            Job::Completion(op_id, target, outcome) => outcome.deliver(op_id, target),
        }
    }
}

/// Where a dispatch writes the jobs that stand for records instead of running them,
/// and how many it wrote.
pub(crate) struct Records<'a> {
    acks: &'a mut [wps_ack_record],
    messages: &'a mut [u8],
    /// Ack records written to the start of `acks`.
    pub(crate) acks_written: usize,
    /// Message records written to the start of `messages`.
    pub(crate) messages_written: usize,
    /// Bytes of `messages` they take.
    pub(crate) message_bytes: usize,
}

impl<'a> Records<'a> {
    /// Records of successful `WPS_SEND_RECORD` sends go to `acks`, and group and server
    /// messages to `messages` (either may be empty: those jobs then run).
    pub(crate) fn new(acks: &'a mut [wps_ack_record], messages: &'a mut [u8]) -> Records<'a> {
        Records {
            acks,
            messages,
            acks_written: 0,
            messages_written: 0,
            message_bytes: 0,
        }
    }

    fn written(&self) -> usize {
        self.acks_written + self.messages_written
    }

    /// Writes the record `job` stands for, if it stands for one and there is room;
    /// returns whether it did.
    fn write(&mut self, job: &Job) -> bool {
        match job {
            Job::Completion(op_id, target, outcome) => {
                let Some(slot) = self.acks.get_mut(self.acks_written) else {
                    return false;
                };
                let Some(record) = outcome.record(*op_id, target) else {
                    return false;
                };
                *slot = record;
                self.acks_written += 1;
                true
            }
            Job::Event(queued) if queued.sink.is_open() => {
                let room = &mut self.messages[self.message_bytes..];
                let Some(size) = queued.event.write_message_record(room) else {
                    return false;
                };
                self.message_bytes += size;
                self.messages_written += 1;
                true
            }
            _ => false,
        }
    }
}

/// The one record of a suspension, at its first dropped message: at info level, as the
/// client may be on its way to being freed (an open client its application forgot).
fn log_dropping() {
    info!("a client's dispatch is suspended (its event loop ended): its messages are dropped until it resumes");
}

/// Most dispatcher threads the pool ever starts.
const MAX_THREADS: usize = 4;
/// Most jobs of one client a pool thread runs before the next client's turn.
const TURN_JOBS: usize = 256;
/// How long a turn goes on running jobs of one client while others wait: a slow
/// callback ends it after its job.
const TURN_TIME: Duration = Duration::from_millis(1);

/// Why `dispatch` could not run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DispatchError {
    /// The worker is run by a library thread, not polled.
    NotPolled,
    /// Another `dispatch` of this worker is running (on this or another thread).
    Busy,
}

/// How a worker is woken when a job arrives while it is idle.
enum Wake {
    /// A turn on this pool thread.
    Thread(Arc<PoolThread>),
    /// The application polls a descriptor. The pool worker (the heir) runs the jobs once
    /// the client is freed; picked when the client is made, so that a free cannot fail
    /// for want of a thread.
    Poll(Signal, Arc<Worker>),
}

/// A worker's queue and its state, under one lock.
struct Queue {
    jobs: VecDeque<Job>,
    /// Thread mode: neither running nor waiting for its turn. Poll mode: the
    /// descriptor is not signalled.
    idle: bool,
    /// Poll mode, after the client was freed: jobs go to this pool worker.
    forward: Option<Arc<Worker>>,
    /// Poll mode: a `dispatch` is running.
    dispatching: bool,
    /// Poll mode: hand over to a pool thread once the running `dispatch` ends.
    hand_over_pending: bool,
    /// Poll mode, while suspended: the messages dropped since `suspend`.
    suspended: Option<u64>,
}

impl Queue {
    /// While suspended: drops the messages among the jobs from index `from` on (those
    /// just added), and counts them. Returns whether they are the first the suspension
    /// drops.
    fn drop_messages(&mut self, from: usize) -> bool {
        let Some(before) = self.suspended else {
            return false;
        };
        let mut added = self.jobs.split_off(from);
        let count = added.len();
        added.retain(|job| !matches!(job, Job::Event(queued) if queued.event.is_message()));
        let dropped = (count - added.len()) as u64;
        self.jobs.append(&mut added);
        self.suspended = Some(before.saturating_add(dropped));
        before == 0 && dropped > 0
    }
}

/// A poll-mode dispatch that ran `ran` jobs, until dropped: then it ends, and a hand-over
/// to a pool thread that a free asked for meanwhile happens.
pub(crate) struct Dispatched<'a> {
    worker: &'a Worker,
    pub(crate) ran: usize,
}

impl Drop for Dispatched<'_> {
    fn drop(&mut self) {
        let mut queue = self.worker.lock();
        queue.dispatching = false;
        if queue.hand_over_pending {
            self.worker.hand_over_locked(&mut queue);
        }
    }
}

/// One client's FIFO of callbacks.
pub(crate) struct Worker {
    queue: Mutex<Queue>,
    wake: Wake,
}

impl Worker {
    fn new(wake: Wake) -> Worker {
        Worker {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: true,
                forward: None,
                dispatching: false,
                hand_over_pending: false,
                suspended: None,
            }),
            wake,
        }
    }

    /// A worker run by the application (poll mode), with its readiness descriptor.
    pub(crate) fn polled() -> Result<Arc<Worker>, String> {
        let heir = assign()?;
        let signal =
            Signal::new().map_err(|e| format!("cannot create the dispatch descriptor: {e}"))?;
        Ok(Arc::new(Worker::new(Wake::Poll(signal, heir))))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a job; it runs after every job pushed before it.
    pub(crate) fn push(self: &Arc<Self>, job: Job) {
        self.append(|queue| queue.push_back(job));
    }

    /// Appends every job of `jobs` (emptied, its capacity kept), in order, under one
    /// lock; the dispatcher is woken at most once.
    pub(crate) fn push_all(self: &Arc<Self>, jobs: &mut Vec<Job>) {
        if !jobs.is_empty() {
            self.append(|queue| queue.extend(jobs.drain(..)));
        }
    }

    /// Adds jobs with `add` under the lock (or to the worker this one forwards to), and
    /// wakes the dispatcher if it was idle. A suspended worker drops the messages.
    ///
    /// In poll mode the descriptor is set under the lock, as `dispatch` clears it: set
    /// after the lock, it could follow a dispatch that already ran the new jobs and
    /// marked the queue idle, and stay readable with nothing queued (the application's
    /// loop would then wake for nothing on every pass).
    fn append(self: &Arc<Self>, add: impl FnOnce(&mut VecDeque<Job>)) {
        let mut queue = self.lock();
        if let Some(target) = &queue.forward {
            let target = Arc::clone(target);
            drop(queue);
            return target.append(add);
        }
        let before = queue.jobs.len();
        add(&mut queue.jobs);
        let first_drop = queue.drop_messages(before);
        let wake = queue.jobs.len() > before && std::mem::replace(&mut queue.idle, false);
        if wake {
            if let Wake::Poll(signal, _) = &self.wake {
                signal.set();
            }
        }
        drop(queue);
        if let (true, Wake::Thread(thread)) = (wake, &self.wake) {
            thread.take_turn(Arc::clone(self));
        }
        if first_drop {
            log_dropping();
        }
    }

    /// Poll mode: nothing will dispatch this worker for a while (the application's
    /// event loop ended). Until `resume`, the messages that come are dropped and
    /// counted; what is queued stays, and the other events and jobs (completions) are
    /// queued as usual. `also` runs under the queue's lock: what it records about the
    /// suspension then agrees with the worker's, whatever `resume` runs at once.
    pub(crate) fn suspend(&self, also: impl FnOnce()) -> Result<(), DispatchError> {
        if !matches!(self.wake, Wake::Poll(..)) {
            return Err(DispatchError::NotPolled);
        }
        let mut queue = self.lock();
        queue.suspended.get_or_insert(0);
        also();
        Ok(())
    }

    /// Poll mode: ends a suspension: messages are queued again. Returns how many it
    /// dropped (0 when the worker was not suspended). `also` runs under the queue's
    /// lock, as with `suspend`.
    pub(crate) fn resume(&self, also: impl FnOnce()) -> Result<u64, DispatchError> {
        if !matches!(self.wake, Wake::Poll(..)) {
            return Err(DispatchError::NotPolled);
        }
        let mut queue = self.lock();
        also();
        Ok(queue.suspended.take().unwrap_or(0))
    }

    /// Poll mode: the descriptor that is readable while callbacks are queued.
    pub(crate) fn fd(&self) -> Option<std::ffi::c_int> {
        match &self.wake {
            Wake::Poll(signal, _) => Some(signal.fd()),
            Wake::Thread(_) => None,
        }
    }

    /// Poll mode: runs up to `max` queued jobs on this thread, in order; returns how
    /// many ran. The descriptor stays readable while jobs remain.
    ///
    /// With `records`, the jobs that stand for a record are written there instead of
    /// running, as long as there is room. The call then returns before running a
    /// callback, so that the caller sees everything in order: the callbacks that ran,
    /// then the records.
    ///
    /// The dispatch lasts as long as the returned `Dispatched`: the caller writes its
    /// outputs first. A client freed meanwhile (by a callback this ran) is handed over
    /// to a pool thread only then, so that its finalizer cannot run before the outputs
    /// are written (they may live in the memory it frees).
    pub(crate) fn dispatch(
        &self,
        max: usize,
        mut records: Option<&mut Records<'_>>,
    ) -> Result<Dispatched<'_>, DispatchError> {
        let Wake::Poll(signal, _) = &self.wake else {
            return Err(DispatchError::NotPolled);
        };
        {
            let mut queue = self.lock();
            if queue.dispatching {
                return Err(DispatchError::Busy);
            }
            // Once handed over, nothing is queued here: the loop finds no job.
            queue.dispatching = true;
        }
        let mut ran = 0;
        loop {
            let job = {
                let mut queue = self.lock();
                if queue.hand_over_pending {
                    break;
                }
                let mut recorded = false;
                if let Some(records) = records.as_deref_mut() {
                    while queue.jobs.front().is_some_and(|job| records.write(job)) {
                        queue.jobs.pop_front();
                    }
                    recorded = records.written() > 0;
                }
                // After a record, the front is a callback or a record with no room.
                let next = if ran < max && !recorded {
                    queue.jobs.pop_front()
                } else {
                    None
                };
                match next {
                    Some(job) => job,
                    None => {
                        if queue.jobs.is_empty() && !queue.idle {
                            signal.clear();
                            queue.idle = true;
                        }
                        break;
                    }
                }
            };
            guard_job("dispatched callback", || job.run());
            ran += 1;
        }
        Ok(Dispatched { worker: self, ran })
    }

    /// Poll mode: from now on a pool thread runs this worker's jobs (the client is
    /// being freed and will not be polled again). Deferred to the end of a running
    /// `dispatch`, so that no two threads run this client's callbacks at once.
    pub(crate) fn hand_over(&self) {
        if !matches!(self.wake, Wake::Poll(..)) {
            return;
        }
        let mut queue = self.lock();
        if queue.dispatching {
            queue.hand_over_pending = true;
        } else {
            self.hand_over_locked(&mut queue);
        }
    }

    fn hand_over_locked(&self, queue: &mut Queue) {
        let Wake::Poll(_, heir) = &self.wake else {
            return;
        };
        if queue.forward.is_some() {
            return;
        }
        let target = Arc::clone(heir);
        let jobs = std::mem::take(&mut queue.jobs);
        // Pushed under this worker's lock: a job forwarded later cannot overtake them.
        target.push(Job::new(move || {
            for job in jobs {
                guard_job("dispatcher job", || job.run());
            }
        }));
        queue.forward = Some(target);
    }

    /// Thread mode: one turn, on the pool thread; whether jobs are left for another.
    /// The turn's jobs are taken under one lock; those a slow one leaves go back first.
    fn run_turn(&self, batch: &mut VecDeque<Job>) -> bool {
        {
            let mut queue = self.lock();
            if queue.jobs.len() <= TURN_JOBS {
                std::mem::swap(&mut queue.jobs, batch);
            } else {
                batch.extend(queue.jobs.drain(..TURN_JOBS));
            }
            if batch.is_empty() {
                queue.idle = true;
                return false;
            }
        }
        let started = Instant::now();
        while let Some(job) = batch.pop_front() {
            guard_job("dispatcher job", || job.run());
            if !batch.is_empty() && started.elapsed() >= TURN_TIME {
                break;
            }
        }
        let mut queue = self.lock();
        while let Some(job) = batch.pop_back() {
            queue.jobs.push_front(job);
        }
        queue.idle = queue.jobs.is_empty();
        !queue.idle
    }
}

/// A pool thread and the workers (clients) waiting for their turn on it.
struct PoolThread {
    turns: Mutex<VecDeque<Arc<Worker>>>,
    ready: Condvar,
}

impl PoolThread {
    /// Queues a worker that has jobs and was idle: it gets the next free turn.
    fn take_turn(&self, worker: Arc<Worker>) {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(worker);
        self.ready.notify_one();
    }

    fn run(&self) {
        let mut batch = VecDeque::new();
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some(worker) = turns.pop_front() else {
                turns = self.ready.wait(turns).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            drop(turns);
            let again = worker.run_turn(&mut batch);
            turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            if again {
                // This thread takes it in its turn: no one to wake.
                turns.push_back(worker);
            }
        }
    }
}

/// A readiness descriptor: readable while set. On Linux an eventfd: setting and
/// clearing it are a counter's write and read, where a socket pair queues and frees a
/// buffer each time.
#[cfg(target_os = "linux")]
struct Signal(std::os::fd::OwnedFd);

#[cfg(target_os = "linux")]
impl Signal {
    fn new() -> io::Result<Signal> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Signal(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> std::ffi::c_int {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one` to a descriptor this value owns.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// One read resets the counter, however often it was set.
    fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into `count`, from a descriptor this value owns.
        let _ = unsafe { libc::read(self.fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

/// A readiness descriptor: readable while set (a socket pair).
#[cfg(all(unix, not(target_os = "linux")))]
struct Signal {
    read: std::os::unix::net::UnixStream,
    write: std::os::unix::net::UnixStream,
}

#[cfg(all(unix, not(target_os = "linux")))]
impl Signal {
    fn new() -> io::Result<Signal> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        Ok(Signal { read, write })
    }

    fn fd(&self) -> std::ffi::c_int {
        use std::os::fd::AsRawFd;
        self.read.as_raw_fd()
    }

    fn set(&self) {
        use std::io::Write;
        // At most one byte is ever pending: `set` only follows a `clear`.
        let _ = (&self.write).write(&[1]);
    }

    /// One read: at most one byte is pending, so no second read (and system call) to
    /// find the socket empty. Were more pending, the descriptor would stay readable and
    /// the next `dispatch` would find no job and clear it again.
    fn clear(&self) {
        use std::io::Read;
        let mut buf = [0u8; 16];
        let _ = (&self.read).read(&mut buf);
    }
}

/// Poll mode needs a Unix platform (an eventfd or a socket pair is its descriptor).
#[cfg(not(unix))]
struct Signal(());

#[cfg(not(unix))]
impl Signal {
    fn new() -> io::Result<Signal> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "poll dispatch needs a Unix platform",
        ))
    }

    fn fd(&self) -> std::ffi::c_int {
        -1
    }

    fn set(&self) {}

    fn clear(&self) {}
}

struct Pool {
    threads: Vec<Arc<PoolThread>>,
    next: AtomicUsize,
}

static POOL: TryOnce<Pool> = TryOnce::new();

/// The pool, started on first use with one thread per processor (at most
/// `MAX_THREADS`), or as many as the system would start if at least one; an error
/// (not kept: the next call tries again) when it refuses the first.
fn pool() -> io::Result<&'static Pool> {
    POOL.get_or_try_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::new();
        for i in 0..cpus.clamp(1, MAX_THREADS) {
            let thread = Arc::new(PoolThread {
                turns: Mutex::default(),
                ready: Condvar::new(),
            });
            let t = Arc::clone(&thread);
            let started = std::thread::Builder::new()
                .name(format!("wps-dispatch-{i}"))
                .spawn(move || t.run());
            match started {
                Ok(_) => threads.push(thread),
                Err(e) if threads.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(Pool {
            threads,
            next: AtomicUsize::new(0),
        })
    })
}

/// A worker for a new client, pinned to a pool thread (round robin); an error when the
/// system refuses the pool's first thread.
pub(crate) fn assign() -> Result<Arc<Worker>, String> {
    let pool = pool().map_err(|e| format!("cannot start a dispatcher thread: {e}"))?;
    let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.threads.len();
    Ok(Arc::new(Worker::new(Wake::Thread(Arc::clone(
        &pool.threads[i],
    )))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::gate::in_callback;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_of_one_worker_run_in_order_on_a_pool_thread() {
        let worker = assign().unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            worker.push(Job::new(move || {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                tx.send((i, name, in_callback())).unwrap();
            }));
        }
        worker.push(Job::new(|| {
            panic!("a panicking job does not kill the worker")
        }));
        let tx2 = tx.clone();
        worker.push(Job::new(move || {
            tx2.send((100, String::new(), false)).unwrap()
        }));
        for i in 0..=100 {
            let (n, name, inside) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(n, i);
            assert!(i == 100 || name.starts_with("wps-dispatch-"));
            assert!(!inside);
        }
        assert!(pool().unwrap().threads.len() <= MAX_THREADS);
    }

    #[test]
    fn a_slow_client_takes_turns_with_the_others_on_its_thread_in_order() {
        // Two clients on one pool thread: the first's jobs each outlast a turn's time, so
        // its turns end after one job, and those taken with it go back in order.
        let thread = assign().unwrap();
        let Wake::Thread(pool_thread) = &thread.wake else {
            unreachable!()
        };
        let on_thread = || Arc::new(Worker::new(Wake::Thread(Arc::clone(pool_thread))));
        let (slow, quick) = (on_thread(), on_thread());
        let (tx, rx) = mpsc::channel();
        for i in 0..20 {
            let tx = tx.clone();
            slow.push(Job::new(move || {
                std::thread::sleep(TURN_TIME * 2);
                tx.send(("slow", i)).unwrap();
            }));
        }
        let tx2 = tx.clone();
        quick.push(Job::new(move || tx2.send(("quick", 0)).unwrap()));
        let got: Vec<_> = (0..21)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        let slow_order: Vec<_> = got
            .iter()
            .filter(|(who, _)| *who == "slow")
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(slow_order, (0..20).collect::<Vec<_>>());
        let quick_at = got.iter().position(|(who, _)| *who == "quick").unwrap();
        assert!(
            quick_at < 3,
            "the quick client waited for the slow one's jobs: {got:?}"
        );
    }

    #[test]
    fn clients_pushed_to_from_many_threads_while_turns_end_lose_no_job_and_keep_order() {
        // Pushes racing the end of a turn (the worker neither idle nor queued again) must
        // wake it exactly once: a lost wake-up strands the worker, a double one would
        // queue it twice. Jobs also push to their own and to other workers, and a few
        // outlast a turn, so that what is left goes back to the front.
        const WORKERS: usize = 6;
        const PRODUCERS: usize = 3;
        const JOBS: usize = 4_000;
        struct Client {
            worker: Arc<Worker>,
            running: std::sync::atomic::AtomicBool,
            last: Mutex<[Option<usize>; PRODUCERS + 1]>,
        }
        let first = assign().unwrap();
        let Wake::Thread(pool_thread) = &first.wake else {
            unreachable!()
        };
        let clients: Arc<Vec<Client>> = Arc::new(
            (0..WORKERS)
                .map(|_| Client {
                    worker: Arc::new(Worker::new(Wake::Thread(Arc::clone(pool_thread)))),
                    running: false.into(),
                    last: Mutex::new([None; PRODUCERS + 1]),
                })
                .collect(),
        );
        let ran = Arc::new(AtomicUsize::new(0));
        let faults = Arc::new(Mutex::new(Vec::<String>::new()));
        // A job of `producer`, numbered `n` among its jobs for client `c`.
        fn job(
            clients: &Arc<Vec<Client>>,
            ran: &Arc<AtomicUsize>,
            faults: &Arc<Mutex<Vec<String>>>,
            c: usize,
            producer: usize,
            n: usize,
        ) -> Job {
            let (clients, ran, faults) = (Arc::clone(clients), Arc::clone(ran), Arc::clone(faults));
            Job::new(move || {
                let client = &clients[c];
                if client.running.swap(true, Ordering::SeqCst) {
                    faults
                        .lock()
                        .unwrap()
                        .push(format!("client {c} ran on two threads"));
                }
                let mut last = client.last.lock().unwrap();
                if last[producer].is_some_and(|l| l >= n) {
                    faults.lock().unwrap().push(format!(
                        "client {c}: {n} of {producer} after {:?}",
                        last[producer]
                    ));
                }
                last[producer] = Some(n);
                drop(last);
                if n % 500 == 499 {
                    std::thread::sleep(TURN_TIME + Duration::from_micros(200));
                }
                client.running.store(false, Ordering::SeqCst);
                ran.fetch_add(1, Ordering::SeqCst);
            })
        }
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (clients, ran, faults) =
                    (Arc::clone(&clients), Arc::clone(&ran), Arc::clone(&faults));
                std::thread::spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ p as u64;
                    for n in 0..JOBS {
                        for c in 0..WORKERS {
                            let j = job(&clients, &ran, &faults, c, p, n);
                            clients[c].worker.push(j);
                        }
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        if seed % 8 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        // From inside jobs: each client's jobs numbered by a chain of its own pushes.
        let chained = Arc::new(AtomicUsize::new(0));
        for c in 0..WORKERS {
            let (clients2, ran2, faults2, chained2) = (
                Arc::clone(&clients),
                Arc::clone(&ran),
                Arc::clone(&faults),
                Arc::clone(&chained),
            );
            fn chain(
                clients: Arc<Vec<Client>>,
                ran: Arc<AtomicUsize>,
                faults: Arc<Mutex<Vec<String>>>,
                chained: Arc<AtomicUsize>,
                c: usize,
                n: usize,
            ) {
                let next = (c + n) % WORKERS;
                let inner = job(&clients, &ran, &faults, c, PRODUCERS, n);
                let worker = Arc::clone(&clients[c].worker);
                let target = Arc::clone(&clients[next].worker);
                worker.push(inner);
                if n + 1 < JOBS / 4 {
                    let (cl, r, f, ch) = (clients, ran, faults, Arc::clone(&chained));
                    target.push(Job::new(move || chain(cl, r, f, ch, c, n + 1)));
                }
                chained.fetch_add(1, Ordering::SeqCst);
            }
            chain(clients2, ran2, faults2, chained2, c, 0);
        }
        let expected = WORKERS * PRODUCERS * JOBS + WORKERS * (JOBS / 4);
        let monitor_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = {
            let (pool_thread, clients, faults, done) = (
                Arc::clone(pool_thread),
                Arc::clone(&clients),
                Arc::clone(&faults),
                Arc::clone(&monitor_done),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let turns: Vec<_> = pool_thread.turns.lock().unwrap().iter().cloned().collect();
                    for client in clients.iter() {
                        let queued = turns
                            .iter()
                            .filter(|w| Arc::ptr_eq(w, &client.worker))
                            .count();
                        if queued > 1 {
                            faults
                                .lock()
                                .unwrap()
                                .push(format!("a worker queued {queued} times"));
                        }
                    }
                    std::thread::yield_now();
                }
            })
        };
        for p in producers {
            p.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while ran.load(Ordering::SeqCst) < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        monitor_done.store(true, Ordering::SeqCst);
        monitor.join().unwrap();
        let stranded: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.worker.lock().jobs.is_empty())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            ran.load(Ordering::SeqCst),
            expected,
            "jobs never ran (stranded clients {stranded:?})"
        );
        assert_eq!(*faults.lock().unwrap(), Vec::<String>::new());
        assert!(clients.iter().all(|c| c.worker.lock().idle));
    }

    #[cfg(unix)]
    fn readable(fd: std::ffi::c_int) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[cfg(unix)]
    #[test]
    fn a_signal_set_twice_is_cleared_by_one_clear() {
        let signal = Signal::new().unwrap();
        assert!(!readable(signal.fd()));
        signal.set();
        signal.set();
        assert!(readable(signal.fd()));
        signal.clear();
        assert!(!readable(signal.fd()), "one clear empties it");
        signal.clear();
        assert!(
            !readable(signal.fd()),
            "clearing an empty signal is harmless"
        );
        signal.set();
        assert!(readable(signal.fd()));
    }

    #[cfg(unix)]
    #[test]
    fn the_descriptor_is_readable_exactly_while_jobs_wait_under_concurrent_pushes() {
        // A push racing a dispatch that runs its job at once must not leave the
        // descriptor readable over an empty, idle queue (the loop would spin).
        let worker = Worker::polled().unwrap();
        let fd = worker.fd().unwrap();
        let pushed = 200_000;
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pusher = {
            let (worker, ran) = (Arc::clone(&worker), Arc::clone(&ran));
            std::thread::spawn(move || {
                for _ in 0..pushed {
                    let ran = Arc::clone(&ran);
                    worker.push(Job::new(move || {
                        ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }));
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut stale = 0;
        while ran.load(std::sync::atomic::Ordering::Relaxed) < pushed {
            assert!(
                std::time::Instant::now() < deadline,
                "jobs left undispatched"
            );
            worker.dispatch(usize::MAX, None).map(|d| d.ran).unwrap();
            let queue = worker.lock();
            if queue.jobs.is_empty() && queue.idle && readable(fd) {
                stale += 1;
            }
        }
        pusher.join().unwrap();
        assert_eq!(stale, 0, "readable with nothing queued");
        assert!(!readable(fd));
    }

    #[cfg(unix)]
    #[test]
    fn jobs_queued_by_a_free_inside_a_dispatch_wait_for_the_dispatch_to_end() {
        // A callback that frees its client asks for the hand-over, and its finalizer is
        // queued: that must not run before the dispatch's caller has written its
        // outputs, which may live in the memory the finalizer frees.
        let worker = Worker::polled().unwrap();
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&worker);
        worker.push(Job::new(move || {
            inner.hand_over();
            inner.push(Job::new(move || tx.send(()).unwrap()));
        }));
        let dispatched = worker.dispatch(10, None).unwrap();
        assert_eq!(dispatched.ran, 1, "the freeing callback only");
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the finalizer ran before the dispatch ended"
        );
        drop(dispatched);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
        assert_eq!(worker.dispatch(1, None).map(|d| d.ran), Ok(0));
    }

    #[cfg(unix)]
    #[test]
    fn a_polled_worker_signals_once_and_runs_jobs_only_when_dispatched() {
        let worker = Worker::polled().unwrap();
        let fd = worker.fd().unwrap();
        assert!(!readable(fd));
        let (tx, rx) = mpsc::channel();
        for i in 0..5 {
            let tx = tx.clone();
            worker.push(Job::new(move || tx.send(i).unwrap()));
        }
        assert!(readable(fd));
        assert!(rx.try_recv().is_err(), "nothing runs before dispatch");
        assert_eq!(worker.dispatch(2, None).map(|d| d.ran), Ok(2));
        assert!(readable(fd), "still readable while jobs remain");
        assert_eq!(worker.dispatch(100, None).map(|d| d.ran), Ok(3));
        assert!(!readable(fd));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);

        let inner = Arc::clone(&worker);
        let (busy_tx, busy_rx) = mpsc::channel();
        worker.push(Job::new(move || {
            busy_tx
                .send(inner.dispatch(1, None).map(|d| d.ran))
                .unwrap()
        }));
        assert_eq!(worker.dispatch(1, None).map(|d| d.ran), Ok(1));
        assert_eq!(busy_rx.try_recv(), Ok(Err(DispatchError::Busy)));
        assert_eq!(
            assign().unwrap().dispatch(1, None).map(|d| d.ran),
            Err(DispatchError::NotPolled)
        );

        let mut batch: Vec<Job> = Vec::new();
        worker.push_all(&mut batch);
        assert!(!readable(fd), "an empty batch signals nothing");
        for i in 6..9 {
            let tx = tx.clone();
            batch.push(Job::new(move || tx.send(i).unwrap()));
        }
        worker.push_all(&mut batch);
        assert!(batch.is_empty());
        assert!(readable(fd));
        assert_eq!(worker.dispatch(10, None).map(|d| d.ran), Ok(3));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![6, 7, 8]);

        worker.push(Job::new(move || tx.send(5).unwrap()));
        worker.hand_over();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(5));
        assert_eq!(
            worker.dispatch(1, None).map(|d| d.ran),
            Ok(0),
            "a handed-over worker has nothing to dispatch"
        );
    }

    /// A sink of `worker` whose callback notes each event's kind in `kinds`, reading
    /// paused past `backlog_limit` bytes (0: never).
    #[cfg(unix)]
    fn noting_sink(
        worker: &Arc<Worker>,
        kinds: &Arc<Mutex<Vec<u32>>>,
        backlog_limit: usize,
    ) -> Arc<super::super::callbacks::EventSink> {
        Arc::new(super::super::callbacks::EventSink::new(
            Arc::clone(worker),
            Some(note_event),
            Arc::as_ptr(kinds) as *mut std::ffi::c_void,
            None,
            backlog_limit,
        ))
    }

    /// The event callback of `noting_sink`: notes each event's kind in the
    /// `Mutex<Vec<u32>>` its user data points to.
    unsafe extern "C" fn note_event(
        user_data: *mut std::ffi::c_void,
        event: *const super::super::callbacks::wps_event,
    ) {
        let kinds = &*(user_data as *const Mutex<Vec<u32>>);
        kinds.lock().unwrap().push((*event).kind);
    }

    #[cfg(unix)]
    #[test]
    fn a_suspended_worker_drops_messages_and_keeps_other_jobs() {
        use super::super::callbacks::{SinkHandler, WPS_EVENT_SERVER_MESSAGE, WPS_EVENT_STOPPED};
        use crate::client::{Event, EventHandler};
        use crate::protocol::DataType;

        let worker = Worker::polled().unwrap();
        let fd = worker.fd().unwrap();
        let kinds = Arc::new(Mutex::new(Vec::<u32>::new()));
        let events = SinkHandler::new(noting_sink(&worker, &kinds, 0));
        let message = || Event::ServerMessage {
            data_type: DataType::Text,
            data: bytes::Bytes::from_static(&[b'x'; 1024]),
            sequence_id: None,
        };
        let send = |count: usize| {
            for _ in 0..count {
                events.on_event(message());
            }
            events.on_batch_end();
        };

        // What is queued stays; the messages that come are dropped and signal nothing.
        send(2);
        worker.suspend(|| {}).unwrap();
        assert_eq!(worker.dispatch(10, None).map(|d| d.ran), Ok(2));
        assert!(!readable(fd));
        send(10_000);
        assert!(!readable(fd), "a dropped message signals nothing");
        assert!(
            worker.lock().jobs.is_empty(),
            "nothing grows while suspended"
        );

        // Completions and lifecycle events are queued as usual, among dropped messages.
        let (tx, rx) = mpsc::channel();
        let first = tx.clone();
        worker.push(Job::new(move || first.send(1).unwrap()));
        send(1);
        events.on_event(Event::Stopped { error: None });
        events.on_batch_end();
        worker.push(Job::new(move || tx.send(2).unwrap()));
        worker.suspend(|| {}).unwrap(); // again: the count goes on
        assert!(readable(fd));
        assert_eq!(worker.dispatch(10, None).map(|d| d.ran), Ok(3));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![1, 2]);
        assert!(!readable(fd));
        assert_eq!(
            *kinds.lock().unwrap(),
            [
                WPS_EVENT_SERVER_MESSAGE,
                WPS_EVENT_SERVER_MESSAGE,
                WPS_EVENT_STOPPED
            ],
            "the two messages queued before, and the lifecycle event"
        );

        assert_eq!(worker.resume(|| {}), Ok(10_001));
        assert_eq!(worker.resume(|| {}), Ok(0), "the count starts again");
        send(1);
        assert_eq!(worker.dispatch(10, None).map(|d| d.ran), Ok(1));
        assert_eq!(kinds.lock().unwrap()[3], WPS_EVENT_SERVER_MESSAGE);
        assert_eq!(
            assign().unwrap().suspend(|| {}),
            Err(DispatchError::NotPolled)
        );
        assert_eq!(
            assign().unwrap().resume(|| {}),
            Err(DispatchError::NotPolled)
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_suspend_and_a_resume_racing_leave_the_queue_and_the_backlog_agreeing() {
        use super::super::callbacks::SinkHandler;
        use crate::client::{Event, EventHandler};
        use crate::protocol::DataType;

        const ROUNDS: usize = 20_000;
        let worker = Worker::polled().unwrap();
        let kinds = Arc::new(Mutex::new(Vec::<u32>::new()));
        // A backlog of one byte, over its limit while the message below waits: reading
        // then goes on only while the backlog is told the dispatch is suspended.
        let sink = noting_sink(&worker, &kinds, 1);
        let events = SinkHandler::new(Arc::clone(&sink));
        events.on_event(Event::ServerMessage {
            data_type: DataType::Text,
            data: bytes::Bytes::from_static(b"x"),
            sequence_id: None,
        });
        events.on_batch_end();
        // Each round, a thread waiting for the round's number suspends as this one resumes.
        let round = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let suspender = {
            let (sink, round, done) = (Arc::clone(&sink), Arc::clone(&round), Arc::clone(&done));
            std::thread::spawn(move || {
                for r in 1..=ROUNDS {
                    while round.load(Ordering::Acquire) != r {
                        std::thread::yield_now();
                    }
                    sink.suspend().unwrap();
                    done.store(r, Ordering::Release);
                }
            })
        };
        let mut disagreed = 0;
        for r in 1..=ROUNDS {
            round.store(r, Ordering::Release);
            sink.resume().unwrap();
            while done.load(Ordering::Acquire) != r {
                std::thread::yield_now();
            }
            let suspended = worker.lock().suspended.is_some();
            if sink.backlog().over().is_none() != suspended {
                disagreed += 1;
            }
            sink.resume().unwrap();
        }
        suspender.join().unwrap();
        assert_eq!(
            disagreed, 0,
            "rounds ending with the backlog and the queue at odds (reading past the \
             backlog while messages are queued, or the reverse)"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_dispatch_on_a_second_thread_is_refused_while_one_runs_and_takes_the_rest_after() {
        let worker = Worker::polled().unwrap();
        let fd = worker.fd().unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        worker.push(Job::new(move || {
            entered_tx.send(()).unwrap();
            released.recv().unwrap();
        }));
        for i in 0..3 {
            let tx = tx.clone();
            worker.push(Job::new(move || tx.send(i).unwrap()));
        }
        let first = {
            let worker = Arc::clone(&worker);
            std::thread::spawn(move || worker.dispatch(2, None).map(|d| d.ran))
        };
        entered.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            worker.dispatch(10, None).map(|d| d.ran),
            Err(DispatchError::Busy)
        );
        assert!(rx.try_recv().is_err(), "nothing ran on the refused thread");
        assert!(readable(fd), "the jobs left keep the descriptor readable");
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Ok(2));
        assert!(readable(fd));
        assert_eq!(worker.dispatch(10, None).map(|d| d.ran), Ok(2));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(!readable(fd));
    }

    #[cfg(unix)]
    #[test]
    fn a_hand_over_from_a_dispatched_job_ends_that_dispatch_and_the_pool_runs_the_rest() {
        // As when a callback frees its own client: the jobs after it are not run by
        // the dispatch that ran it, but by a pool thread, in order.
        let worker = Worker::polled().unwrap();
        let inner = Arc::clone(&worker);
        worker.push(Job::new(move || inner.hand_over()));
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            worker.push(Job::new(move || {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                tx.send((i, name)).unwrap();
            }));
        }
        assert_eq!(worker.dispatch(usize::MAX, None).map(|d| d.ran), Ok(1));
        for i in 0..3 {
            let (n, name) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(n, i);
            assert!(name.starts_with("wps-dispatch-"), "{name}");
        }
        assert_eq!(worker.dispatch(usize::MAX, None).map(|d| d.ran), Ok(0));
    }

    #[cfg(unix)]
    #[test]
    fn the_backlog_is_worked_down_to_nothing_whichever_way_its_events_leave() {
        use super::super::callbacks::SinkHandler;
        use crate::client::{Event, EventHandler};
        use crate::protocol::DataType;

        let worker = Worker::polled().unwrap();
        let kinds = Arc::new(Mutex::new(Vec::<u32>::new()));
        // A backlog of one byte: reading pauses while any event waits.
        let sink = noting_sink(&worker, &kinds, 1);
        let events = SinkHandler::new(Arc::clone(&sink));
        let send = |count: usize| {
            for _ in 0..count {
                events.on_event(Event::GroupMessage {
                    group: "g".into(),
                    from_user_id: None,
                    data_type: DataType::Binary,
                    data: bytes::Bytes::from_static(b"1234567"),
                    sequence_id: None,
                });
            }
            events.on_batch_end();
        };
        let drained = || sink.backlog().over().is_none();
        // One 48-byte record: 40 of it, the group, the payload and the padding.
        let mut room = [0u8; 48];
        for _ in 0..100 {
            send(4);
            assert!(!drained());
            assert_eq!(
                worker.dispatch(1, None).map(|d| d.ran),
                Ok(1),
                "one runs its callback"
            );
            let mut records = Records::new(&mut [], &mut room);
            assert_eq!(worker.dispatch(0, Some(&mut records)).map(|d| d.ran), Ok(0));
            assert_eq!(records.messages_written, 1, "one becomes a record");
            sink.suspend().unwrap();
            send(5);
            assert_eq!(sink.resume(), Ok(5), "five dropped unseen");
            assert!(!drained(), "two still wait");
            assert_eq!(worker.dispatch(usize::MAX, None).map(|d| d.ran), Ok(2));
            assert!(drained());
        }
        assert_eq!(kinds.lock().unwrap().len(), 300);

        // Left at free: handed over to a pool thread, which skips them.
        send(3);
        sink.close_now();
        worker.hand_over();
        let (tx, rx) = mpsc::channel();
        worker.push(Job::new(move || tx.send(()).unwrap()));
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(drained());
        assert_eq!(kinds.lock().unwrap().len(), 300);
    }

    /// The completion callback of `completion_job`: counts the calls in the `Mutex<Vec>`
    /// its user data points to, by ackId (0 for a failure).
    unsafe extern "C" fn note_completion(
        user_data: *mut std::ffi::c_void,
        completion: *const super::super::callbacks::wps_completion,
    ) {
        let calls = &*(user_data as *const Mutex<Vec<u64>>);
        calls.lock().unwrap().push((*completion).ack_id);
    }

    /// A queued completion of ackId `ack_id` (a failure when `None`) for `calls`.
    fn completion_job(calls: &Arc<Mutex<Vec<u64>>>, ack_id: Option<u64>, record: bool) -> Job {
        use super::super::callbacks::UserData;
        use crate::client::{AckResult, Error};
        let outcome = match ack_id {
            Some(id) => OwnedCompletion::from_ack(Ok(AckResult {
                ack_id: Some(id),
                is_duplicated: id % 2 == 0,
            })),
            None => OwnedCompletion::from_ack(Err(Error::Cancelled)),
        };
        let target = CompletionTarget {
            cb: Some(note_completion),
            user_data: UserData(Arc::as_ptr(calls) as *mut std::ffi::c_void),
            record,
        };
        Job::Completion(ack_id.unwrap_or(0) + 100, target, outcome)
    }

    #[cfg(unix)]
    #[test]
    fn records_stand_for_recordable_successes_in_order_with_the_callbacks() {
        let worker = Worker::polled().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        for job in [
            completion_job(&calls, Some(1), true),
            completion_job(&calls, Some(2), true),
            completion_job(&calls, Some(3), false), // not started with WPS_SEND_RECORD
            completion_job(&calls, None, true),     // a failure calls its callback
            completion_job(&calls, Some(4), true),
            completion_job(&calls, Some(5), true),
            completion_job(&calls, Some(6), true),
        ] {
            worker.push(job);
        }
        let empty = wps_ack_record {
            user_data: std::ptr::null_mut(),
            op_id: 0,
            ack_id: 0,
            has_ack_id: false,
            is_duplicated: false,
        };
        let mut acks = [empty; 2];
        let ids = |r: &[wps_ack_record]| r.iter().map(|r| r.ack_id).collect::<Vec<_>>();
        let dispatch = |acks: &mut [wps_ack_record]| {
            let mut records = Records::new(acks, &mut []);
            let ran = worker
                .dispatch(10, Some(&mut records))
                .map(|d| d.ran)
                .unwrap();
            (ran, records.acks_written)
        };

        // two records, then it stops before the callback that follows them
        assert_eq!(dispatch(&mut acks), (0, 2));
        assert_eq!(ids(&acks), [1, 2]);
        assert_eq!(acks[0].op_id, 101);
        assert_eq!(acks[0].user_data, Arc::as_ptr(&calls) as *mut _);
        assert!(acks[0].has_ack_id && !acks[0].is_duplicated && acks[1].is_duplicated);
        assert!(calls.lock().unwrap().is_empty());

        // the two callbacks, then records up to the room there is
        assert_eq!(dispatch(&mut acks), (2, 2));
        assert_eq!(*calls.lock().unwrap(), [3, 0]);
        assert_eq!(ids(&acks), [4, 5]);
        assert!(readable(worker.fd().unwrap()), "one record is left");

        // a dispatch with no room for acks calls the callback of a recordable success
        assert_eq!(dispatch(&mut []), (1, 0));
        assert_eq!(*calls.lock().unwrap(), [3, 0, 6]);
        assert!(!readable(worker.fd().unwrap()));
        assert_eq!(dispatch(&mut acks), (0, 0));
    }

    #[test]
    fn a_pool_thread_calls_the_callback_of_a_recordable_success() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let worker = assign().unwrap();
        worker.push(completion_job(&calls, Some(7), true));
        let (tx, rx) = mpsc::channel();
        worker.push(Job::new(move || tx.send(()).unwrap()));
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(*calls.lock().unwrap(), [7]);
    }
}
