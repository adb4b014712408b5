//! `wps_client`: creation, lifetime, and the blocking and asynchronous operations.
//!
//! Blocking calls drive the core future on the calling thread (the shared runtime
//! does the I/O), so they work from any thread, dispatcher threads included (acks are
//! resolved by the core's reader task, never by a dispatcher). Asynchronous acked
//! calls hand the core a completion callback (no task per operation) that queues the
//! completion to the client's dispatcher thread; an invocation runs as a task.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_void};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use log::warn;

use crate::client::{
    AckCallback, AckResult, Client, ClientState, Credential, Error, Handover, InvokeOptions,
    InvokeResult, Membership, Prepared, SendEventOptions, SendToGroupOptions,
};
use crate::id_hash::IdMap;
use crate::protocol::DataType;
use crate::runtime::RuntimeError;

use super::callbacks::{
    data_type_code, fail_with, wps_ack_record, wps_completion_cb, wps_dispatch_buffers,
    wps_event_cb, wps_user_data_free_cb, CompletionTarget, EventSink, OwnedCompletion, SinkHandler,
    UserData,
};
use super::convert::{array_out, bytes_arg, handle_arg, str_arg, write_optional, write_out};
use super::credential::{wps_credential_cb, CredentialSink};
use super::dispatcher::{self, DispatchError, Job, Records, Worker};
use super::gate::{after_callback, in_callback};
use super::interrupt::{self, Interrupted};
use super::options::wps_options;
use super::panic::{guard, guard_value, FfiResult};
use super::status::{
    fail, wps_status, WPS_DATA_TYPE_BINARY, WPS_DATA_TYPE_JSON, WPS_DATA_TYPE_PROTOBUF,
    WPS_DATA_TYPE_TEXT, WPS_SEND_DEFERRED, WPS_SEND_FIRE_AND_FORGET, WPS_SEND_NO_ECHO,
    WPS_SEND_RECORD, WPS_STATE_CONNECTED, WPS_STATE_CONNECTING, WPS_STATE_DISCONNECTED,
    WPS_STATE_RECOVERING, WPS_STATE_STOPPED, WPS_STATUS_FORKED, WPS_STATUS_ILLEGAL_STATE,
    WPS_STATUS_INTERNAL, WPS_STATUS_INTERRUPTED, WPS_STATUS_INVALID_ARGUMENT,
    WPS_STATUS_INVALID_UTF8, WPS_STATUS_NOT_CONNECTED, WPS_STATUS_NULL_ARG, WPS_STATUS_STOPPED,
};

/// How long `wps_client_free` waits for the client's connection task to end once its
/// last handle is gone (it takes microseconds; the bound only keeps a bug from hanging).
const TASK_END_LIMIT: Duration = Duration::from_secs(2);

/// A client: an opaque handle to a boxed `Arc` of the library's client state (the core
/// `Client`, its dispatcher thread and its pending operations). Created by
/// `wps_client_new*`, released by `wps_client_free`. Every function taking it may be
/// called from any thread, by several threads at once (a second concurrent dispatch of
/// a poll-mode client is refused: see `wps_client_dispatch`); a blocking call still
/// waiting when another thread frees the client returns `WPS_STATUS_STOPPED`. Any other
/// call on another thread must have returned before the free begins: the free does not
/// wait for it, and a call still in progress may then read released memory (a callback
/// running during the teardown may still call it: see `wps_client_free`).
pub struct wps_client {
    _private: [u8; 0],
}

/// The response of a blocking invocation: an opaque box owned by the caller,
/// released by `wps_invoke_response_free`.
pub struct wps_invoke_response {
    data_type: u32,
    data: Bytes,
}

/// The outcome of a blocking acked operation, written whatever the status. On a
/// failure `has_ack_id` tells whether the failed operation had an ackId: refused
/// (`WPS_STATUS_ACK_ERROR`), timed out after its retries (`WPS_STATUS_TIMEOUT`: a
/// resend with it is deduplicated by the service), sent (or queued during a recovery)
/// when its connection was lost (`WPS_STATUS_NOT_CONNECTED`) or when `wps_client_stop`,
/// or `wps_client_free` on another thread, ended it (`WPS_STATUS_STOPPED`), or given up
/// by the interrupt check (`WPS_STATUS_INTERRUPTED`). A client's automatic ackIds (of
/// either form) increase but may skip numbers: an operation refused before it is sent
/// for the client's state (not started, not connected) or its message (too large,
/// invalid JSON) used one up, as in the official clients.
#[repr(C)]
pub struct wps_ack_result {
    /// The operation's ackId when `has_ack_id` (not for fire-and-forget).
    pub ack_id: u64,
    /// Whether `ack_id` is set.
    pub has_ack_id: bool,
    /// The service had already processed this ackId (still a success).
    pub is_duplicated: bool,
}

/// The shared runtime; `WPS_STATUS_FORKED` in a fork() child of the process that
/// started it (the core records its pid; its threads do not exist in the child),
/// `WPS_STATUS_INTERNAL` when the system refused its threads.
fn runtime() -> FfiResult<tokio::runtime::Handle> {
    crate::runtime::try_handle().map_err(|e| {
        let status = match e {
            RuntimeError::Forked => WPS_STATUS_FORKED,
            RuntimeError::Start(_) => WPS_STATUS_INTERNAL,
        };
        fail(status, e.to_string())
    })
}

/// Runs a core future to completion on this thread, driven by the shared runtime's
/// I/O and timers: no task, no thread hop (a fire-and-forget send finishes on its
/// first poll). On a thread already inside the runtime's context (a blocking-pool
/// thread running a credential callback), or exiting with the runtime's thread-locals
/// being destroyed (`BLOCK_ON_HERE`), it is spawned instead and waited for.
/// A panic in the future unwinds to the caller's panic boundary. Never interrupted,
/// and the interrupt check is not asked: a free's stop.
fn block<F>(fut: F) -> FfiResult<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    wait(fut, Check::Unasked)
}

/// As `block`, asking the interrupt check as `block_interruptible` does but never ended
/// by it: `wps_client_stop`, which is never left half done, and during which what the
/// check does on the way (a language runtime's signal handlers) must not wait.
fn block_asking<F>(fut: F) -> FfiResult<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    wait(fut, Check::Asked)
}

/// As `block`, for a wait the interrupt check may end (`wps_set_interrupt_check`, or
/// the thread's own, `wps_set_thread_interrupt_check`): then the future is dropped (its
/// task aborted, where it was spawned), which gives the operation up. The check is
/// asked on both paths: a blocking call made inside a credential callback is
/// interrupted too.
fn block_interruptible<F>(fut: F) -> FfiResult<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    wait(fut, Check::Ends)
}

/// How a blocking call's wait treats the interrupt check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not asked.
    Unasked,
    /// Asked every interval; its answer does not end the wait.
    Asked,
    /// Asked every interval; a non-zero answer ends the wait.
    Ends,
}

thread_local! {
    /// Made after the runtime's thread-locals that a wait on this thread uses (its
    /// context and its parker), so destroyed before them: once it is gone, a call from
    /// a later thread-exit handler (a C++ `thread_local` made after the library's first
    /// call on its thread) would find the parker gone and the context not yet.
    static BLOCK_ON_HERE: BlockOnHere = BlockOnHere::new();
}

/// The marker of `BLOCK_ON_HERE`.
struct BlockOnHere;

impl BlockOnHere {
    /// Makes this thread's parker of the runtime first (a wait on a ready future).
    fn new() -> BlockOnHere {
        if let Ok(rt) = crate::runtime::try_handle() {
            rt.block_on(async {});
        }
        BlockOnHere
    }
}

/// A destructor, so that the thread-local is destroyed with the others and says so.
impl Drop for BlockOnHere {
    fn drop(&mut self) {}
}

fn wait<F>(fut: F, check: Check) -> FfiResult<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = runtime()?;
    // Outside the runtime's context, unless this thread's exit has begun destroying the
    // runtime's thread-locals (a call from a thread-exit or `atexit` handler): the
    // waits on this thread need them. The context is made first, `BLOCK_ON_HERE` after.
    if tokio::runtime::Handle::try_current().is_err_and(|e| !e.is_thread_local_destroyed())
        && BLOCK_ON_HERE.try_with(|_| ()).is_ok()
    {
        return match check {
            Check::Unasked => Ok(rt.block_on(fut)),
            Check::Asked => interrupt::block_on_asking(&rt, fut)
                .ok_or_else(|| fail(WPS_STATUS_INTERNAL, "a wait the check cannot end ended")),
            Check::Ends => interrupt::block_on(&rt, fut).map_err(|Interrupted| interrupted()),
        };
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let task = rt.spawn(async move {
        let _ = tx.send(AssertUnwindSafe(fut).catch_unwind().await);
    });
    let received = match check {
        Check::Unasked => Ok(rx.recv()),
        Check::Asked => Ok(interrupt::recv_asking(&rx)),
        Check::Ends => interrupt::recv(&rx),
    };
    match received {
        // A panic in the future goes on here, to the caller's panic boundary.
        Ok(Ok(output)) => Ok(output.unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
        Ok(Err(_)) => Err(fail(
            WPS_STATUS_INTERNAL,
            "the operation was dropped by the runtime",
        )),
        Err(Interrupted) => {
            // Dropping the future gives the operation up, as on the other path.
            task.abort();
            Err(interrupted())
        }
    }
}

fn interrupted() -> wps_status {
    fail(
        WPS_STATUS_INTERRUPTED,
        "the interrupt check ended the wait; the operation was given up",
    )
}

/// An asynchronous operation not completed yet.
struct Pending {
    target: CompletionTarget,
    /// The task of an invocation (acked operations run without one).
    abort: Option<tokio::task::AbortHandle>,
    /// An acked operation's ackId (the one drawn for it, if automatic): a cancellation
    /// reports it, to resend the operation with.
    ack_id: Option<u64>,
}

#[derive(Default)]
struct Ops {
    closing: bool,
    pending: IdMap<Pending>,
}

/// Everything behind a `wps_client` handle.
struct Shared {
    client: Client,
    sink: Arc<EventSink>,
    credential: Option<Arc<CredentialSink>>,
    ops: Mutex<Ops>,
    next_op: AtomicU64,
    /// Operations removed before their outcome arrived (cancelled, or the client is
    /// being freed). While none were, the core's "gave up?" check needs no lock.
    given_up: AtomicU64,
}

impl Shared {
    fn ops(&self) -> MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the completion of `op_id` unless it was already completed. The queue
    /// push happens under the ops lock so that teardown sees either the pending
    /// entry or the queued completion, never neither.
    fn complete(&self, op_id: u64, outcome: OwnedCompletion) {
        let mut ops = self.ops();
        if let Some(p) = ops.pending.remove(&op_id) {
            self.push_completion(op_id, p.target, outcome);
        }
    }

    fn push_completion(&self, op_id: u64, target: CompletionTarget, outcome: OwnedCompletion) {
        self.sink
            .worker()
            .push(Job::Completion(op_id, target, outcome));
    }

    /// Hands the client a start command, unless its free has begun (`None`). Under the
    /// ops lock: a free on another thread (while a callback of this client runs) either
    /// came first, or queues its stop after this start, which it then ends.
    fn start_unless_freed(
        &self,
    ) -> Option<Result<impl Future<Output = Result<(), Error>> + Send + 'static, Error>> {
        let ops = self.ops();
        (!ops.closing).then(|| self.client.start_now())
    }

    /// Refuses new operations: the client is being freed.
    fn refuse_new_ops(&self) {
        self.ops().closing = true;
    }

    /// Completes every operation still pending with `WPS_STATUS_STOPPED`, once new ones
    /// are refused (`refuse_new_ops`). After the core's stop, which has completed the
    /// acked operations it had taken in with their ackIds, this ends what is left:
    /// invocations, and operations that never reached the connection task.
    fn stop_all_ops(&self) {
        let mut ops = self.ops();
        self.given_up.fetch_add(1, Ordering::Release);
        let mut pending: Vec<_> = ops.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (id, p) in pending {
            if let Some(abort) = p.abort {
                abort.abort();
            }
            self.push_completion(
                id,
                p.target,
                OwnedCompletion::status(WPS_STATUS_STOPPED, "the client was freed"),
            );
        }
    }
}

/// The addresses of the live handles: `wps_client_free` of a handle not in it (freed
/// already) is found out instead of freeing it twice, until a new client reuses the
/// address. Only `new` and `free` take the lock, never the other calls.
static LIVE: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

fn live() -> MutexGuard<'static, BTreeSet<usize>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocation behind a handle being freed. Released only by `release`: a panic
/// unwinding through `wps_client_free` leaves it allocated (a callback still running
/// may be using it) rather than freeing it under that callback.
struct Handle(*mut Arc<Shared>);

// SAFETY: owns a `Box<Arc<Shared>>`, which is `Send`.
unsafe impl Send for Handle {}

impl Handle {
    fn release(self) {
        // SAFETY: from `Box::into_raw` in `new_client`; released once (`self` is moved).
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// The client behind a handle (a `Box<Arc<Shared>>`), refusing it in a fork() child.
/// The call holds this reference to the end: a callback that the call itself brings
/// about (the connected event of an asynchronous start) may free the client, and
/// release the handle, on a dispatcher thread before the call returns.
///
/// # Safety
/// `c` is NULL or a live handle from `wps_client_new*`.
unsafe fn client_arg(c: *const wps_client) -> FfiResult<Arc<Shared>> {
    let shared = handle_arg(c.cast::<Arc<Shared>>(), "client")?;
    runtime()?;
    Ok(Arc::clone(shared))
}

/// Creates the client state; on failure nothing is taken over (no finalizer runs).
fn new_client(
    credential: Credential,
    credential_sink: Option<Arc<CredentialSink>>,
    opts: *const wps_options,
    on_event: wps_event_cb,
    user_data: *mut c_void,
    user_data_free: wps_user_data_free_cb,
    out: *mut *mut wps_client,
) -> FfiResult {
    if out.is_null() {
        return Err(fail(WPS_STATUS_NULL_ARG, "`out` is NULL"));
    }
    runtime()?;
    // SAFETY: `opts` is NULL or comes from `wps_options_new`.
    let opts = unsafe { opts.as_ref() }.cloned().unwrap_or_default();
    let worker = if opts.poll {
        Worker::polled()
    } else {
        dispatcher::assign()
    }
    .map_err(|e| fail(WPS_STATUS_INTERNAL, e))?;
    let sink = Arc::new(EventSink::new(
        worker,
        on_event,
        user_data,
        user_data_free,
        opts.event_backlog_bytes,
    ));
    let handler = Arc::new(SinkHandler::new(Arc::clone(&sink)));
    let client = Client::new(credential, opts.inner, handler).map_err(fail_with)?;
    let handle = into_handle(client, sink, credential_sink);
    // SAFETY: checked non-NULL above.
    unsafe { out.write(handle) };
    Ok(())
}

/// Puts a new client's state behind a live handle.
fn into_handle(
    client: Client,
    sink: Arc<EventSink>,
    credential: Option<Arc<CredentialSink>>,
) -> *mut wps_client {
    let shared = Arc::new(Shared {
        client,
        sink,
        credential,
        ops: Mutex::new(Ops::default()),
        next_op: AtomicU64::new(1),
        given_up: AtomicU64::new(0),
    });
    let handle = Box::into_raw(Box::new(shared));
    live().insert(handle as usize);
    handle.cast()
}

/// Creates a stopped client connecting to a fixed client URL
/// (`ws[s]://host/client/hubs/HUB?access_token=...`).
///
/// `opts` may be NULL (defaults) and is copied. `on_event` (may be NULL) receives every
/// event on the client's dispatcher thread with `user_data`; `user_data_free` (may be
/// NULL) runs exactly once after the last callback, at the latest when
/// `wps_client_free` returns (unless freed inside a callback: see `wps_client_free`).
/// On failure nothing is taken over: no finalizer runs. `WPS_STATUS_INTERNAL` when the
/// system refuses a thread the library needs (its runtime's or a dispatcher's, started
/// with the first client); a later call tries again.
///
/// # Safety
/// `url` is NULL or NUL-terminated; `opts` is NULL or from `wps_options_new`; `out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_new(
    url: *const c_char,
    opts: *const wps_options,
    on_event: wps_event_cb,
    user_data: *mut c_void,
    user_data_free: wps_user_data_free_cb,
    out: *mut *mut wps_client,
) -> wps_status {
    guard(|| {
        let url = str_arg(url, "url")?.to_owned();
        new_client(
            Credential::Url(url),
            None,
            opts,
            on_event,
            user_data,
            user_data_free,
            out,
        )
    })
}

/// Creates a stopped client whose URL comes from `cred`, called before every new
/// connection (see `wps_credential_cb`). `cred_user_data_free` runs exactly once after
/// the last credential call and the last deferred request (answered or abandoned, see
/// `wps_credential_result_defer`). Otherwise as `wps_client_new`.
///
/// # Safety
/// As `wps_client_new`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_new_with_credential(
    cred: wps_credential_cb,
    cred_user_data: *mut c_void,
    cred_user_data_free: wps_user_data_free_cb,
    opts: *const wps_options,
    on_event: wps_event_cb,
    user_data: *mut c_void,
    user_data_free: wps_user_data_free_cb,
    out: *mut *mut wps_client,
) -> wps_status {
    guard(|| {
        let Some(cred) = cred else {
            return Err(fail(WPS_STATUS_NULL_ARG, "`cred` is NULL"));
        };
        let sink = Arc::new(CredentialSink::new(
            cred,
            cred_user_data,
            cred_user_data_free,
        ));
        new_client(
            sink.credential(),
            Some(sink),
            opts,
            on_event,
            user_data,
            user_data_free,
            out,
        )
    })
}

/// Frees a client (NULL is ignored): stops the client, completes every pending
/// operation with `WPS_STATUS_STOPPED` (unless its outcome was already queued; an
/// acked operation the client had sent reports its ackId, as after `wps_client_stop`),
/// waits for the running callbacks and runs the finalizers. In thread mode the events
/// of that stop (disconnected, stopped) are delivered, after those queued; in poll mode,
/// and from inside a callback (below), no event is delivered once the free begins, and
/// those queued are dropped. When it returns, no callback of this client is running or
/// will run, and the client's connection task has ended and released its memory.
/// What is left runs on a dispatcher thread (in
/// poll mode, one of the pool's) after this client's callbacks queued before it, in
/// turns with the other clients sharing the thread: a callback of theirs that waits
/// for this free to return deadlocks it.
///
/// Inside a callback (of any client, or a credential, log or finalizer callback), the
/// teardown is deferred: no further event of this client is delivered, and once that
/// callback has returned (the outermost one, when callbacks nest) its pending
/// operations complete with `WPS_STATUS_STOPPED` and the finalizers run on library
/// threads. In poll mode, what is left at free (completions, the `user_data_free`
/// finalizer) runs on a library thread, not in `wps_client_dispatch`; outside a
/// callback, this waits for it. Freed from a callback that a `wps_client_dispatch*`
/// call runs, what is left waits until that call has written its outputs (counts and
/// records): they may live in memory the finalizer frees. In a fork() child the
/// handle is left alone (its threads do not exist there). A callback running during the
/// teardown (a finalizer included) may still use the handle: a start then fails with
/// `WPS_STATUS_STOPPED`, as do new asynchronous operations. Another thread must not be
/// inside a call of this client (except a blocking call that waits: it returns
/// `WPS_STATUS_STOPPED`; a free from a callback may run the finalizers before it writes
/// its outputs) nor enter one once the free begins. A second free of a handle is
/// detected and ignored (an error is logged) as long as no new client got the same
/// address; any other use of a freed handle is undefined behaviour.
///
/// # Safety
/// `c` is NULL or a handle from `wps_client_new*`, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn wps_client_free(c: *mut wps_client) {
    guard_value((), || {
        if c.is_null() {
            return;
        }
        // Returning no status, it leaves the last error alone: no `runtime()`.
        let Ok(rt) = crate::runtime::try_handle() else {
            return;
        };
        if !live().remove(&(c as usize)) {
            log::error!("wps_client_free: {c:p} is not a live client (freed twice?); ignored");
            return;
        }
        // The handle stays allocated until the client's last callback ran, so a
        // callback still running during the teardown may use it.
        let handle = Handle(c.cast::<Arc<Shared>>());
        let shared = Arc::clone(&*handle.0);
        // Poll mode: nothing polls this client any more; a library thread runs what
        // is left (completions, the finalizer), and no further event is delivered.
        if shared.sink.worker().fd().is_some() {
            shared.sink.close_now();
            shared.sink.worker().hand_over();
        }
        // The core's stop completes the acked operations it had taken in, each with its
        // ackId; stop_all_ops then ends the rest.
        shared.refuse_new_ops();
        if in_callback() {
            shared.sink.close_now();
            // Once the callback calling this has returned (it may be another client's,
            // a credential or a log callback, on another thread than the dispatcher):
            // it may still use the user data the finalizers release.
            after_callback(move || {
                rt.spawn(async move {
                    shared.client.stop().await;
                    shared.stop_all_ops();
                    // On the dispatcher, after the completions: a finalizer may block,
                    // and must never run on an I/O thread.
                    let credential = shared.credential.clone();
                    if let Some(cred) = credential.clone() {
                        shared
                            .sink
                            .worker()
                            .push(Job::new(move || cred.close(false)));
                    }
                    shared.sink.close_then(move || match credential {
                        // A credential callback may still run on another thread (the
                        // stop only abandoned its request), and use the handle.
                        Some(cred) => cred.when_finalized(move || handle.release()),
                        None => handle.release(),
                    });
                });
            });
        } else {
            let client = shared.client.clone();
            let ended = client.end_watch();
            let _ = block(async move { client.stop().await });
            shared.stop_all_ops();
            if let Some(cred) = &shared.credential {
                cred.close(true);
            }
            let (tx, rx) = mpsc::sync_channel(1);
            shared.sink.close_then(move || {
                // With this last reference, the connection task ends and drops its state.
                handle.release();
                let _ = tx.send(());
            });
            drop(shared);
            // The task's end follows the finalizer: waiting for it first, this thread
            // sleeps once for both, and the finalizer's signal is already there. A
            // dispatcher busy with earlier callbacks for longer delays both: the bound
            // then counts from the finalizer.
            let ended_first = ended.wait(TASK_END_LIMIT);
            let _ = rx.recv();
            if !ended_first && !ended.wait(TASK_END_LIMIT) {
                warn!("wps_client_free: the connection task did not end within {TASK_END_LIMIT:?}");
            }
        }
    })
}

/// Poll mode (`WPS_DISPATCH_POLL`): writes to `out_fd` a descriptor that is readable
/// while callbacks of this client are queued. Watch it for readability in your event
/// loop and call `wps_client_dispatch` then; never read it yourself. It is
/// level-triggered: watched edge-triggered (`EPOLLET`), it signals again only what is
/// queued after a dispatch emptied the queue, so dispatch until a call takes fewer
/// than its `max` and writes no record. It stays valid until `wps_client_free` (stop
/// watching it before). `WPS_STATUS_ILLEGAL_STATE` in thread mode.
///
/// # Safety
/// `c` is NULL or a live handle; `out_fd` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch_fd(
    c: *const wps_client,
    out_fd: *mut c_int,
) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        if out_fd.is_null() {
            return Err(fail(WPS_STATUS_NULL_ARG, "`out_fd` is NULL"));
        }
        let fd = shared.sink.worker().fd().ok_or_else(not_polled)?;
        out_fd.write(fd);
        Ok(())
    })
}

/// Poll mode: takes up to `max` queued events and completions of this client, in
/// order, and runs their callbacks on the calling thread; `ran` (may be NULL) receives
/// how many were taken (`max` 0 takes none and succeeds). Each runs its callback at
/// most once: not at all when that callback is NULL or callbacks were disabled
/// (`wps_callbacks_disable`). While more remain queued the descriptor stays readable.
/// Callbacks may call the API, `wps_client_free` of this client included, but not a
/// dispatch of this client (`wps_client_dispatch`, `_records`, `_into`): that, a call
/// from two threads at once, and a client in thread mode get `WPS_STATUS_ILLEGAL_STATE`.
///
/// # Safety
/// `c` is NULL or a live handle; `ran` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch(
    c: *mut wps_client,
    max: usize,
    ran: *mut usize,
) -> wps_status {
    guard(|| {
        dispatch(dispatch_worker(c)?, max, None, |count, _| {
            write_optional(ran, count)
        })
    })
}

/// Poll mode: as `wps_client_dispatch`, but a successful completion of a send started
/// with `WPS_SEND_RECORD` is written to `records` (room for `cap`, at least 1) instead
/// of calling its callback. The call returns before running a callback once it wrote a
/// record, so the events and completions taken (`ran`, may be NULL) came before the records
/// (`recorded`, may be NULL), in completion order; what is left stays queued and the
/// descriptor readable. `max` bounds the callbacks run (0: none; the records queued
/// ahead of the first callback are still written), `cap` the records written.
/// `records` must be aligned for `wps_ack_record` (`WPS_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `c` is NULL or a live handle; `records` is NULL or writable for `cap` records;
/// `ran` and `recorded` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch_records(
    c: *mut wps_client,
    max: usize,
    records: *mut wps_ack_record,
    cap: usize,
    ran: *mut usize,
    recorded: *mut usize,
) -> wps_status {
    guard(|| {
        // The handle first, as in every call.
        let worker = dispatch_worker(c)?;
        if records.is_null() {
            return Err(fail(WPS_STATUS_NULL_ARG, "`records` is NULL"));
        }
        if cap == 0 {
            return Err(fail(
                WPS_STATUS_INVALID_ARGUMENT,
                "`cap` is 0: no room for a record",
            ));
        }
        let acks = array_out(records, cap, 1, "records")?;
        let mut records = Records::new(acks, &mut []);
        dispatch(worker, max, Some(&mut records), |count, records| {
            write_optional(ran, count);
            write_optional(recorded, records.map_or(0, |r| r.acks_written));
        })
    })
}

/// Poll mode: as `wps_client_dispatch_records`, with a second array for messages. A
/// group or server message is written to `buffers->messages` as a `wps_message_record`
/// followed by its bytes, instead of calling the event callback; a message larger than
/// `message_cap` still reaches the callback. Acked sends go to `buffers->acks` as
/// with `wps_client_dispatch_records`. Either array may be NULL (then `ack_cap` or
/// `message_cap` is ignored). The call returns before running a callback once it wrote
/// a record; the counts are in `buffers`'s output fields. Events other than messages,
/// failures and any other dispatch still call the callbacks. The order holds within
/// each array and against the callbacks (which came first), not between the two
/// arrays. A client created without an event callback still gets its messages here
/// (those that reach no record are dropped). Both arrays must be 8-byte aligned
/// (`WPS_STATUS_INVALID_ARGUMENT`), and
/// belong to the call until it returns: a callback it runs must not use them.
///
/// # Safety
/// `c` is NULL or a live handle; `buffers` is NULL or points to a `wps_dispatch_buffers`
/// whose arrays are NULL or writable for their capacities.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch_into(
    c: *mut wps_client,
    max: usize,
    buffers: *mut wps_dispatch_buffers,
) -> wps_status {
    guard(|| {
        let worker = dispatch_worker(c)?;
        if buffers.is_null() {
            return Err(fail(WPS_STATUS_NULL_ARG, "`buffers` is NULL"));
        }
        // Fields read and written one by one: callbacks run during the call, so no
        // reference to the caller's struct is held across it.
        let acks = array_out((*buffers).acks, (*buffers).ack_cap, 1, "buffers->acks")?;
        let messages = array_out(
            (*buffers).messages,
            (*buffers).message_cap,
            8,
            "buffers->messages",
        )?;
        let mut records = Records::new(acks, messages);
        dispatch(worker, max, Some(&mut records), |count, records| {
            (*buffers).ran = count;
            if let Some(records) = records {
                (*buffers).acks_written = records.acks_written;
                (*buffers).messages_written = records.messages_written;
                (*buffers).message_bytes = records.message_bytes;
            }
        })
    })
}

/// Poll mode: nothing will dispatch this client for a while (the event loop that
/// watched its descriptor ended, and the client stays open). Until
/// `wps_client_dispatch_resume`, the group and server messages that come are dropped
/// and counted (logged at info level at the first), rather than queued without bound;
/// what is queued stays, and the other events and completions are queued as usual. The
/// client goes on (acknowledgements, recoveries, reconnections), reading whatever its
/// event backlog (`wps_options_set_event_backlog_bytes`). Suspending a suspended client
/// does nothing.
/// `WPS_STATUS_ILLEGAL_STATE` in thread mode.
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch_suspend(c: *mut wps_client) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        shared.sink.suspend().map_err(|_| not_polled())
    })
}

/// Poll mode: ends `wps_client_dispatch_suspend`; messages are queued again. `dropped`
/// (may be NULL) receives how many messages the suspension dropped (0 when the client
/// was not suspended). `WPS_STATUS_ILLEGAL_STATE` in thread mode.
///
/// # Safety
/// `c` is NULL or a live handle; `dropped` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_dispatch_resume(
    c: *mut wps_client,
    dropped: *mut u64,
) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        let count = shared.sink.resume().map_err(|_| not_polled())?;
        write_optional(dropped, count);
        Ok(())
    })
}

/// The worker that runs the callbacks of `c`, kept alive by a dispatch (a callback may
/// free the client) without keeping the client.
unsafe fn dispatch_worker(c: *mut wps_client) -> FfiResult<Arc<Worker>> {
    Ok(Arc::clone(client_arg(c)?.sink.worker()))
}

/// Runs the dispatch of a client by its worker; `outputs` writes the call's outputs from
/// how many callbacks ran and the records, before the dispatch ends: a callback that
/// freed the client leaves its finalizer to run after that (it may free where they go).
fn dispatch(
    worker: Arc<Worker>,
    max: usize,
    mut records: Option<&mut Records<'_>>,
    outputs: impl FnOnce(usize, Option<&Records<'_>>),
) -> FfiResult {
    let dispatched = worker
        .dispatch(max, records.as_deref_mut())
        .map_err(|e| match e {
            DispatchError::NotPolled => not_polled(),
            DispatchError::Busy => fail(
                WPS_STATUS_ILLEGAL_STATE,
                "a dispatch of this client is already running",
            ),
        })?;
    outputs(dispatched.ran, records.as_deref());
    Ok(())
}

fn not_polled() -> wps_status {
    fail(
        WPS_STATUS_ILLEGAL_STATE,
        "the client's callbacks run on a library thread (dispatch mode WPS_DISPATCH_POLL was not set)",
    )
}

/// Connects; blocks until connected or failed (start timeout). Fails with
/// `WPS_STATUS_ILLEGAL_STATE` when the client is not stopped once the connection task
/// takes the start (a start behind a stop still in progress, `wps_client_stop_async`,
/// is taken after it, and connects), and with
/// `WPS_STATUS_STOPPED` once its `wps_client_free` has begun (from a callback running
/// during the teardown).
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_start(c: *mut wps_client) -> wps_status {
    guard(|| {
        let start = client_arg(c)?
            .start_unless_freed()
            .ok_or_else(|| fail(WPS_STATUS_STOPPED, "the client is being freed"))?
            .map_err(fail_with)?;
        block_interruptible(start)?.map_err(fail_with)
    })
}

/// Stops the client: closes the connection (the closing handshake waits at most 1 s
/// for the service's close frame), no reconnect; blocks until stopped. The
/// stopped event (after the disconnected one, if connected) is queued by then, but its
/// callback, and those queued before it, may still run after this returns (the
/// completion of `wps_client_stop_async` runs after them). Stopping a stopped client is
/// a no-op. The interrupt check is asked while it waits, and does not end it
/// (`wps_set_interrupt_check`).
/// Fire-and-forget messages whose send returned before this call (asynchronous ones
/// included) are written before the close frame, except while the client recovers a
/// dropped connection: with no socket to write to, they are dropped. Acked operations
/// still pending fail with `WPS_STATUS_STOPPED`.
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_stop(c: *mut wps_client) -> wps_status {
    guard(|| {
        let client = client_arg(c)?.client.clone();
        block_asking(async move { client.stop().await })
    })
}

/// Connects without blocking: `cb` (may be NULL) runs once on the dispatcher thread
/// when connected or failed, with the status `wps_client_start` would return (see
/// `wps_client_join_group_async` for `op_id`). For an event loop that must not block
/// for the connection. The start is handed to the client before this returns, so a
/// later stop (blocking or not) comes after it (the completion of a
/// `wps_client_stop_async` that ends the start may run before the start's). Cancelling
/// it only ends the wait: the connection attempt goes on (stop the client to end it).
/// Once the client's `wps_client_free` has begun (from a callback running during the
/// teardown), it fails with `WPS_STATUS_STOPPED` and no connection is attempted.
///
/// # Safety
/// `c` is NULL or a live handle; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_start_async(
    c: *mut wps_client,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        let op = |shared: &Shared| {
            // `None`: a free began since the start was registered; it completes the start.
            let start = shared
                .start_unless_freed()
                .unwrap_or(Err(Error::Stopped { ack_id: None }));
            async move { start?.await }
        };
        run_async(c, op, OwnedCompletion::from_unit, cb, user_data, op_id)
    })
}

/// Stops the client without blocking: `cb` (may be NULL) runs once stopped, after the
/// disconnected and stopped events (see `wps_client_join_group_async` for `op_id`).
/// Stopping a stopped client completes at once with `WPS_STATUS_OK`. What
/// `wps_client_stop` says of earlier sends holds here too. Cancelling it only ends the
/// wait: the stop goes on. Once the client's `wps_client_free` has begun it fails with
/// `WPS_STATUS_STOPPED` (the free stops the client).
///
/// # Safety
/// `c` is NULL or a live handle; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_stop_async(
    c: *mut wps_client,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        let op = |shared: &Shared| {
            let stopped = shared.client.stop_now();
            async move {
                stopped.await;
                Ok(())
            }
        };
        run_async(c, op, OwnedCompletion::from_unit, cb, user_data, op_id)
    })
}

/// The client's state, a `WPS_STATE_*` value (`WPS_STATE_STOPPED` for NULL).
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_state(c: *const wps_client) -> u32 {
    guard_value(WPS_STATE_STOPPED, || {
        // Returning no status, it leaves the last error alone: no `client_arg`.
        let shared = c.cast::<Arc<Shared>>().as_ref();
        match shared.filter(|_| crate::runtime::try_handle().is_ok()) {
            Some(shared) => match shared.client.state() {
                ClientState::Stopped => WPS_STATE_STOPPED,
                ClientState::Connecting => WPS_STATE_CONNECTING,
                ClientState::Connected => WPS_STATE_CONNECTED,
                ClientState::Recovering => WPS_STATE_RECOVERING,
                ClientState::Disconnected => WPS_STATE_DISCONNECTED,
            },
            None => WPS_STATE_STOPPED,
        }
    })
}

/// Copies the current connection id, NUL-terminated, into `buf` (`buf_len` bytes).
/// `*out_len` receives its length without the NUL, also when `buf` is too small, in
/// which case the call fails with `WPS_STATUS_INVALID_ARGUMENT` (`buf` may then be
/// NULL with `buf_len` 0, to ask for the size). `WPS_STATUS_NOT_CONNECTED` when there
/// is no connection id. All of its bytes are copied: one holding U+0000 is longer than
/// `strlen` finds.
///
/// # Safety
/// `buf` is NULL or writable for `buf_len` bytes; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_connection_id(
    c: *const wps_client,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        if out_len.is_null() {
            return Err(fail(WPS_STATUS_NULL_ARG, "`out_len` is NULL"));
        }
        let id = shared
            .client
            .connection_id()
            .ok_or_else(|| fail(WPS_STATUS_NOT_CONNECTED, "the client has no connection"))?;
        out_len.write(id.len());
        if buf.is_null() || buf_len <= id.len() {
            return Err(fail(
                WPS_STATUS_INVALID_ARGUMENT,
                format!("the buffer needs {} bytes", id.len() + 1),
            ));
        }
        std::ptr::copy_nonoverlapping(id.as_ptr(), buf.cast::<u8>(), id.len());
        buf.add(id.len()).write(0);
        Ok(())
    })
}

/// The payload of a message argument, checked against its data type (borrowed: the
/// core encodes it into the frame before the call returns).
unsafe fn payload<'a>(
    data_type: u32,
    data: *const u8,
    len: usize,
) -> FfiResult<(DataType, &'a [u8])> {
    let bytes = bytes_arg(data, len, "data")?;
    let t = match data_type {
        WPS_DATA_TYPE_TEXT => DataType::Text,
        WPS_DATA_TYPE_JSON => DataType::Json,
        WPS_DATA_TYPE_BINARY => DataType::Binary,
        WPS_DATA_TYPE_PROTOBUF => DataType::Protobuf,
        _ => {
            return Err(fail(
                WPS_STATUS_INVALID_ARGUMENT,
                format!("unknown data type {data_type}"),
            ))
        }
    };
    if matches!(t, DataType::Text | DataType::Json) {
        if let Err(e) = std::str::from_utf8(bytes) {
            return Err(fail(
                WPS_STATUS_INVALID_UTF8,
                format!("text/json `data` is not UTF-8: {e}"),
            ));
        }
    }
    Ok((t, bytes))
}

/// The `WPS_SEND_*` flags of a message.
struct SendFlags {
    no_echo: bool,
    fire_and_forget: bool,
    delivery: Delivery,
}

/// How an asynchronous send reaches the connection task and its completion the caller
/// (`WPS_SEND_DEFERRED`, `WPS_SEND_RECORD`); the blocking forms take neither.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Delivery {
    handover: Handover,
    record: bool,
}

impl Delivery {
    const BLOCKING: Delivery = Delivery {
        handover: Handover::Now,
        record: false,
    };
}

fn send_flags(flags: u32, allowed: u32) -> FfiResult<SendFlags> {
    if flags & !allowed != 0 {
        return Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            format!("unknown send flags {flags:#x}"),
        ));
    }
    Ok(SendFlags {
        no_echo: flags & WPS_SEND_NO_ECHO != 0,
        fire_and_forget: flags & WPS_SEND_FIRE_AND_FORGET != 0,
        delivery: Delivery {
            handover: if flags & WPS_SEND_DEFERRED != 0 {
                Handover::Deferred
            } else {
                Handover::Now
            },
            record: flags & WPS_SEND_RECORD != 0,
        },
    })
}

fn invoke_options(timeout_ms: u64) -> InvokeOptions {
    InvokeOptions {
        timeout: (timeout_ms != 0).then(|| Duration::from_millis(timeout_ms)),
    }
}

/// An acked operation's checked arguments, borrowed from the call; the core encodes
/// them (`prepare`) into a frame that owns nothing of the caller's.
enum AckOp<'a> {
    Join(&'a str),
    Leave(&'a str),
    SendToGroup(&'a str, DataType, &'a [u8], SendToGroupOptions, Delivery),
    SendEvent(&'a str, DataType, &'a [u8], SendEventOptions, Delivery),
}

impl<'a> AckOp<'a> {
    /// When the operation is to reach the connection task, and how it completes.
    fn delivery(&self) -> Delivery {
        match self {
            AckOp::Join(_) | AckOp::Leave(_) => Delivery::BLOCKING,
            AckOp::SendToGroup(.., d) | AckOp::SendEvent(.., d) => *d,
        }
    }

    /// The operation checked and encoded by the core.
    fn prepare(self, client: &Client) -> Result<Prepared, Error> {
        match self {
            AckOp::Join(g) => client.membership(g, Membership::Join),
            AckOp::Leave(g) => client.membership(g, Membership::Leave),
            AckOp::SendToGroup(g, t, d, o, _) => client.group_message(g, t, d, o),
            AckOp::SendEvent(e, t, d, o, _) => client.event_message(e, t, d, o),
        }
    }

    unsafe fn join(group: *const c_char) -> FfiResult<AckOp<'a>> {
        Ok(AckOp::Join(str_arg(group, "group")?))
    }

    unsafe fn leave(group: *const c_char) -> FfiResult<AckOp<'a>> {
        Ok(AckOp::Leave(str_arg(group, "group")?))
    }

    unsafe fn send_to_group(
        group: *const c_char,
        data_type: u32,
        data: *const u8,
        len: usize,
        flags: u32,
        ack_id: Option<u64>,
    ) -> FfiResult<AckOp<'a>> {
        let group = str_arg(group, "group")?;
        let (t, d) = payload(data_type, data, len)?;
        let f = send_flags(
            flags,
            WPS_SEND_NO_ECHO | WPS_SEND_FIRE_AND_FORGET | WPS_SEND_DEFERRED | WPS_SEND_RECORD,
        )?;
        let opts = SendToGroupOptions {
            no_echo: f.no_echo,
            fire_and_forget: f.fire_and_forget,
            ack_id,
        };
        Ok(AckOp::SendToGroup(group, t, d, opts, f.delivery))
    }

    unsafe fn send_event(
        event: *const c_char,
        data_type: u32,
        data: *const u8,
        len: usize,
        flags: u32,
        ack_id: Option<u64>,
    ) -> FfiResult<AckOp<'a>> {
        let event = str_arg(event, "event")?;
        let (t, d) = payload(data_type, data, len)?;
        let f = send_flags(
            flags,
            WPS_SEND_FIRE_AND_FORGET | WPS_SEND_DEFERRED | WPS_SEND_RECORD,
        )?;
        let opts = SendEventOptions {
            fire_and_forget: f.fire_and_forget,
            ack_id,
        };
        Ok(AckOp::SendEvent(event, t, d, opts, f.delivery))
    }
}

/// Runs an acked operation to completion on this thread; writes `out` (when not NULL)
/// whatever the outcome.
unsafe fn run_blocking(
    c: *mut wps_client,
    op: FfiResult<AckOp>,
    out: *mut wps_ack_result,
) -> FfiResult {
    // Cleared first, so that `out` is written also when a panic ends the call.
    let cleared = wps_ack_result {
        ack_id: 0,
        has_ack_id: false,
        is_duplicated: false,
    };
    write_optional(out, cleared);
    let (ack, result) = match run_acked(c, op) {
        Ok(ack) => (ack, Ok(())),
        Err((status, ack_id)) => (
            AckResult {
                ack_id,
                is_duplicated: false,
            },
            Err(status),
        ),
    };
    write_optional(
        out,
        wps_ack_result {
            ack_id: ack.ack_id.unwrap_or(0),
            has_ack_id: ack.ack_id.is_some(),
            is_duplicated: ack.is_duplicated,
        },
    );
    result
}

/// The outcome of a blocking acked operation; a failure's status comes with the
/// failed operation's ackId, if it had one.
unsafe fn run_acked(
    c: *mut wps_client,
    op: FfiResult<AckOp>,
) -> Result<AckResult, (wps_status, Option<u64>)> {
    let no_ack_id = |status| (status, None);
    let shared = client_arg(c).map_err(no_ack_id)?;
    let op = op.map_err(no_ack_id)?;
    if op.delivery() != Delivery::BLOCKING {
        return Err(no_ack_id(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            "WPS_SEND_DEFERRED and WPS_SEND_RECORD apply to the asynchronous forms only",
        )));
    }
    let prepared = op
        .prepare(&shared.client)
        .map_err(|e| no_ack_id(fail_with(e)))?;
    let outcome = match shared.client.try_run(prepared) {
        Ok(outcome) => outcome,
        Err(prepared) => {
            // The ack comes behind the events: it is read whatever their backlog while
            // this call waits. (The guard owns what it needs: another thread may free
            // the client meanwhile.) A fire-and-forget message queued at once waits
            // for nothing and takes no guard.
            let _reading = shared.sink.backlog().unpause();
            let ack_id = prepared.ack_id();
            let client = shared.client.clone();
            block_interruptible(async move { client.run(prepared).await }).map_err(|status| {
                // An interrupted operation may have been written: a resend keeps its ackId.
                (status, ack_id.filter(|_| status == WPS_STATUS_INTERRUPTED))
            })?
        }
    };
    outcome.map_err(|error| {
        let ack_id = error.ack_id();
        (fail_with(error), ack_id)
    })
}

/// Registers an asynchronous operation completing to `cb`; writes its id to `op_id`.
/// Refused while the client is being freed.
unsafe fn register(
    shared: &Shared,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    record: bool,
    ack_id: Option<u64>,
    op_id: *mut u64,
) -> FfiResult<u64> {
    let id = shared.next_op.fetch_add(1, Ordering::Relaxed);
    {
        let mut ops = shared.ops();
        if ops.closing {
            return Err(fail(WPS_STATUS_STOPPED, "the client is being freed"));
        }
        let target = CompletionTarget {
            cb,
            user_data: UserData(user_data),
            record,
        };
        ops.pending.insert(
            id,
            Pending {
                target,
                abort: None,
                ack_id,
            },
        );
    }
    write_optional(op_id, id);
    Ok(id)
}

/// Starts an operation whose completion goes to `cb` on the dispatcher thread: it is
/// registered first (refused while the client is being freed, so nothing reaches the
/// client then), `handover` gives it to the client, and a task awaits its outcome.
unsafe fn run_async<T, F>(
    c: *mut wps_client,
    handover: impl FnOnce(&Shared) -> F,
    convert: fn(Result<T, Error>) -> OwnedCompletion,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> FfiResult
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    let shared = client_arg(c)?;
    let rt = runtime()?;
    let id = register(&shared, cb, user_data, false, None, op_id)?;
    let fut = handover(&shared);
    let task = {
        let shared = Arc::clone(&shared);
        rt.spawn(async move {
            let outcome = convert(fut.await);
            shared.complete(id, outcome);
        })
    };
    match shared.ops().pending.get_mut(&id) {
        Some(p) => p.abort = Some(task.abort_handle()),
        None => task.abort(),
    }
    Ok(())
}

/// Starts an acked operation whose completion goes to `cb` on the dispatcher thread:
/// the core calls back with the outcome, no task involved.
unsafe fn run_async_ack(
    c: *mut wps_client,
    op: FfiResult<AckOp>,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> FfiResult {
    let shared = client_arg(c)?;
    let op = op?;
    let delivery = op.delivery();
    let prepared = op.prepare(&shared.client);
    let ack_id = prepared.as_ref().ok().and_then(Prepared::ack_id);
    let id = register(&shared, cb, user_data, delivery.record, ack_id, op_id)?;
    let done = Box::new(AckCompletion {
        shared: Arc::downgrade(&shared),
        id,
    });
    shared.client.start_then(prepared, delivery.handover, done);
    Ok(())
}

/// The core's completion callback of an asynchronous acked operation. Holds the client
/// weakly: the core may keep it after the client is freed (every operation is then
/// completed already).
struct AckCompletion {
    shared: Weak<Shared>,
    id: u64,
}

impl AckCallback for AckCompletion {
    fn complete(self: Box<Self>, outcome: Result<AckResult, Error>) {
        if let Some(shared) = self.shared.upgrade() {
            shared.complete(self.id, OwnedCompletion::from_ack(outcome));
        }
    }

    /// Cancelled or freed: the operation is no longer pending.
    fn is_cancelled(&self) -> bool {
        self.shared.upgrade().is_none_or(|shared| {
            shared.given_up.load(Ordering::Acquire) != 0
                && !shared.ops().pending.contains_key(&self.id)
        })
    }
}

/// Joins `group`; blocks until acked. `out` (may be NULL) receives the outcome (`wps_ack_result`).
///
/// # Safety
/// `c` is NULL or a live handle; `group` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_join_group(
    c: *mut wps_client,
    group: *const c_char,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| run_blocking(c, AckOp::join(group), out))
}

/// Leaves `group`; blocks until acked. `out` (may be NULL) receives the outcome (`wps_ack_result`).
///
/// # Safety
/// As `wps_client_join_group`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_leave_group(
    c: *mut wps_client,
    group: *const c_char,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| run_blocking(c, AckOp::leave(group), out))
}

/// Sends a message to `group`; blocks until acked (with `WPS_SEND_FIRE_AND_FORGET`:
/// until queued). `flags` combines `WPS_SEND_*`. `out` may be NULL. A message whose
/// frame, the JSON text with binary data in base64, exceeds 1 MiB (the service's limit)
/// fails with `WPS_STATUS_INVALID_ARGUMENT`; so does an empty `group`.
///
/// # Safety
/// `data` is NULL (with `len` 0) or readable for `len` bytes; otherwise as `wps_client_join_group`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_to_group(
    c: *mut wps_client,
    group: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| {
        run_blocking(
            c,
            AckOp::send_to_group(group, data_type, data, len, flags, None),
            out,
        )
    })
}

/// Sends an event to the upstream server; blocks until acked (with
/// `WPS_SEND_FIRE_AND_FORGET`: until queued). `out` may be NULL. The 1 MiB limit of
/// `wps_client_send_to_group` applies.
///
/// # Safety
/// As `wps_client_send_to_group`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_event(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| {
        run_blocking(
            c,
            AckOp::send_event(event, data_type, data, len, flags, None),
            out,
        )
    })
}

/// Invokes the upstream handler of `event` and blocks for its response, which is
/// written to `*out` (owned by the caller: `wps_invoke_response_free`).
/// `timeout_ms` 0 uses the ack timeout. The 1 MiB limit of `wps_client_send_to_group`
/// applies.
///
/// # Safety
/// As `wps_client_send_to_group`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_invoke_event(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    out: *mut *mut wps_invoke_response,
) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        let event = str_arg(event, "event")?.to_owned();
        let (t, d) = payload(data_type, data, len)?;
        let d = Bytes::copy_from_slice(d);
        if out.is_null() {
            return Err(fail(WPS_STATUS_NULL_ARG, "`out` is NULL"));
        }
        let client = shared.client.clone();
        let opts = invoke_options(timeout_ms);
        let _reading = shared.sink.backlog().unpause();
        let r: InvokeResult =
            block_interruptible(async move { client.invoke_event(&event, t, d, opts).await })?
                .map_err(fail_with)?;
        let resp = wps_invoke_response {
            data_type: data_type_code(r.data_type),
            data: r.data,
        };
        write_out(out, Box::into_raw(Box::new(resp)), "out")
    })
}

/// The payload of an invoke response (not NUL-terminated), valid until
/// `wps_invoke_response_free`;
/// `*len` (may be NULL) receives its length. NULL (length 0) for a NULL response.
///
/// # Safety
/// `r` is NULL or a live response; `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_invoke_response_data(
    r: *const wps_invoke_response,
    len: *mut usize,
) -> *const u8 {
    guard_value(std::ptr::null(), || {
        let (ptr, n) = r
            .as_ref()
            .map_or((std::ptr::null(), 0), |r| (r.data.as_ptr(), r.data.len()));
        write_optional(len, n);
        ptr
    })
}

/// The `WPS_DATA_TYPE_*` of an invoke response (`WPS_DATA_TYPE_TEXT` for NULL, and for a
/// reply without data: the upstream answered with an empty body, given as empty text).
///
/// # Safety
/// `r` is NULL or from `wps_client_invoke_event` and not freed.
#[no_mangle]
pub unsafe extern "C" fn wps_invoke_response_data_type(r: *const wps_invoke_response) -> u32 {
    guard_value(WPS_DATA_TYPE_TEXT, || {
        r.as_ref().map_or(WPS_DATA_TYPE_TEXT, |r| r.data_type)
    })
}

/// Frees an invoke response (NULL is ignored).
///
/// # Safety
/// `r` is NULL or from `wps_client_invoke_event`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn wps_invoke_response_free(r: *mut wps_invoke_response) {
    guard_value((), || {
        if !r.is_null() {
            drop(Box::from_raw(r));
        }
    })
}

/// Joins `group` without blocking: `*op_id` (may be NULL) receives the operation id
/// before the operation is handed over, so before `cb` can run, and `cb` (may be NULL)
/// runs exactly once on the client's dispatcher thread with the outcome. The call
/// itself fails only on a bad C argument (NULL, invalid UTF-8, unknown data type or
/// flags) or with `WPS_STATUS_STOPPED` for a client being freed, and then nothing is
/// sent and nothing completes; every other failure, state and arguments the
/// client checks (empty name, invalid JSON, a message too large, ackId 0) included,
/// comes in the completion.
/// Operations are written in call order (and resent in it after a recovery), with at
/// most 999 acked ones awaiting their acks per client (the service remembers a
/// connection's last 1000 ackIds, which keeps a resend after a recovery from publishing
/// twice); later ones wait queued.
///
/// # Safety
/// As `wps_client_join_group`; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_join_group_async(
    c: *mut wps_client,
    group: *const c_char,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| run_async_ack(c, AckOp::join(group), cb, user_data, op_id))
}

/// Leaves `group` without blocking; see `wps_client_join_group_async`.
///
/// # Safety
/// As `wps_client_join_group_async`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_leave_group_async(
    c: *mut wps_client,
    group: *const c_char,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| run_async_ack(c, AckOp::leave(group), cb, user_data, op_id))
}

/// Sends to `group` without blocking; see `wps_client_join_group_async`.
///
/// # Safety
/// As `wps_client_send_to_group`; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_to_group_async(
    c: *mut wps_client,
    group: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        run_async_ack(
            c,
            AckOp::send_to_group(group, data_type, data, len, flags, None),
            cb,
            user_data,
            op_id,
        )
    })
}

/// Sends an event without blocking; see `wps_client_join_group_async`.
///
/// # Safety
/// As `wps_client_send_event`; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_event_async(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        run_async_ack(
            c,
            AckOp::send_event(event, data_type, data, len, flags, None),
            cb,
            user_data,
            op_id,
        )
    })
}

/// Invokes without blocking; the completion carries the response (`data_type`,
/// `data`, `data_len`). Cancelling it sends cancelInvocation. See
/// `wps_client_join_group_async`.
///
/// # Safety
/// As `wps_client_send_event`; `op_id` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn wps_client_invoke_event_async(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        let event = str_arg(event, "event")?.to_owned();
        let (t, d) = payload(data_type, data, len)?;
        let d = Bytes::copy_from_slice(d);
        let opts = invoke_options(timeout_ms);
        // Handed over before this returns (in call order with the other operations, and
        // before a later stop); a refusal completes like the other operations' do.
        let op = move |shared: &Shared| {
            let reply = shared.client.invoke_now(&event, t, d, opts);
            async move { reply?.await }
        };
        run_async(c, op, OwnedCompletion::from_invoke, cb, user_data, op_id)
    })
}

/// Like `wps_client_send_to_group`, with a caller-chosen ackId (positive, unique per
/// connection; a retry with the same id is answered as a duplicate; a retry of a send
/// given up while still pending, cancelled or interrupted, waits for it). Ignored with
/// `WPS_SEND_FIRE_AND_FORGET`. The client's automatic ackIds skip the latest 1000
/// chosen ones (the service would answer a reused one with `Duplicate`).
///
/// # Safety
/// As `wps_client_send_to_group`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_to_group_with_ack_id(
    c: *mut wps_client,
    group: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    ack_id: u64,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| {
        let op = AckOp::send_to_group(group, data_type, data, len, flags, Some(ack_id));
        run_blocking(c, op, out)
    })
}

/// Like `wps_client_send_event`, with a caller-chosen ackId (see
/// `wps_client_send_to_group_with_ack_id`).
///
/// # Safety
/// As `wps_client_send_event`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_event_with_ack_id(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    ack_id: u64,
    out: *mut wps_ack_result,
) -> wps_status {
    guard(|| {
        let op = AckOp::send_event(event, data_type, data, len, flags, Some(ack_id));
        run_blocking(c, op, out)
    })
}

/// Like `wps_client_send_to_group_async`, with a caller-chosen ackId (see
/// `wps_client_send_to_group_with_ack_id`).
///
/// # Safety
/// As `wps_client_send_to_group_async`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_to_group_with_ack_id_async(
    c: *mut wps_client,
    group: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    ack_id: u64,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        let op = AckOp::send_to_group(group, data_type, data, len, flags, Some(ack_id));
        run_async_ack(c, op, cb, user_data, op_id)
    })
}

/// Like `wps_client_send_event_async`, with a caller-chosen ackId (see
/// `wps_client_send_to_group_with_ack_id`).
///
/// # Safety
/// As `wps_client_send_event_async`.
#[no_mangle]
pub unsafe extern "C" fn wps_client_send_event_with_ack_id_async(
    c: *mut wps_client,
    event: *const c_char,
    data_type: u32,
    data: *const u8,
    len: usize,
    flags: u32,
    ack_id: u64,
    cb: wps_completion_cb,
    user_data: *mut c_void,
    op_id: *mut u64,
) -> wps_status {
    guard(|| {
        let op = AckOp::send_event(event, data_type, data, len, flags, Some(ack_id));
        run_async_ack(c, op, cb, user_data, op_id)
    })
}

/// Sends the messages started with `WPS_SEND_DEFERRED`, in order. Acked ones with
/// automatic ackIds are written by the calling thread, as one batch, as far as it can:
/// with keep-alive pings more often than the ack timeout (the default), nothing else
/// queued towards the client's connection task, room under the 999 acked messages in
/// flight, and a socket that takes them at once. The rest are handed to that task,
/// waking it once for all of them. Never blocks.
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_flush_deferred(c: *mut wps_client) -> wps_status {
    guard(|| {
        client_arg(c)?.client.flush_deferred();
        Ok(())
    })
}

/// Cancels a pending asynchronous operation: its completion reports
/// `WPS_STATUS_CANCELLED` (an invocation also sends cancelInvocation), with an acked
/// operation's ackId (an automatic one too): one already written may still take effect,
/// and a resend with that ackId (`..._with_ack_id`) cannot publish twice.
/// `WPS_STATUS_INVALID_ARGUMENT` when no operation `op_id` is pending (already completed).
///
/// # Safety
/// `c` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wps_client_cancel(c: *mut wps_client, op_id: u64) -> wps_status {
    guard(|| {
        let shared = client_arg(c)?;
        let mut ops = shared.ops();
        let p = ops.pending.remove(&op_id).ok_or_else(|| {
            fail(
                WPS_STATUS_INVALID_ARGUMENT,
                format!("no pending operation {op_id}"),
            )
        })?;
        shared.given_up.fetch_add(1, Ordering::Release);
        if let Some(abort) = p.abort {
            abort.abort();
        }
        shared.push_completion(op_id, p.target, OwnedCompletion::cancelled(p.ack_id));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::callbacks::wps_completion;
    use crate::ffi::status::{wps_last_error_message, WPS_STATUS_OK, WPS_STATUS_PANIC};
    use std::ffi::CStr;

    /// On a thread of the runtime (where a credential callback runs), a blocking call's
    /// future is spawned and waited for; a panic in it still reaches the call's panic
    /// boundary: `WPS_STATUS_PANIC`, as on the caller's own thread.
    #[test]
    fn a_panic_in_a_spawned_wait_reaches_the_callers_boundary() {
        let rt = runtime().unwrap_or_else(|_| panic!("no runtime"));
        let (status, message) = rt.block_on(async {
            tokio::task::spawn_blocking(|| {
                let status = guard(|| {
                    wait(
                        async {
                            if true {
                                panic!("a bug in the operation");
                            }
                        },
                        Check::Unasked,
                    )
                });
                let message = unsafe { CStr::from_ptr(wps_last_error_message()) };
                (status, message.to_string_lossy().into_owned())
            })
            .await
            .unwrap()
        });
        assert_eq!(status, WPS_STATUS_PANIC);
        assert_eq!(message, "internal panic: a bug in the operation");
    }

    /// A callback that frees its client, then calls it; the test's view of it.
    struct FreedInCallback {
        client: *mut wps_client,
        /// Signalled once the call that runs the callback has returned: no other thread
        /// may be inside a call of a client when it is freed.
        returned: Mutex<mpsc::Receiver<()>>,
        statuses: Mutex<Vec<wps_status>>,
        completions: AtomicU64,
    }

    unsafe extern "C" fn count_completion(user_data: *mut c_void, _: *const wps_completion) {
        let probe = &*(user_data as *const FreedInCallback);
        probe.completions.fetch_add(1, Ordering::SeqCst);
    }

    /// Frees the client (the teardown waits for this callback), then starts, stops and
    /// invokes without blocking.
    unsafe extern "C" fn free_then_call(user_data: *mut c_void, _: *const wps_completion) {
        let probe = &*(user_data as *const FreedInCallback);
        let (c, count) = (probe.client, Some(count_completion as _));
        let returned = probe.returned.lock().unwrap();
        returned.recv_timeout(Duration::from_secs(30)).unwrap();
        wps_client_free(c);
        let mut op = 0;
        let statuses = [
            wps_client_start_async(c, count, user_data, &mut op),
            wps_client_stop_async(c, count, user_data, &mut op),
            wps_client_invoke_event_async(
                c,
                c"e".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                std::ptr::null(),
                0,
                0,
                count,
                user_data,
                &mut op,
            ),
        ];
        probe.statuses.lock().unwrap().extend(statuses);
    }

    unsafe extern "C" fn signal_freed(user_data: *mut c_void) {
        let freed = Box::from_raw(user_data as *mut mpsc::SyncSender<()>);
        let _ = freed.send(());
    }

    /// Once a client's free has begun, the asynchronous calls of a callback that runs
    /// during the teardown fail with `WPS_STATUS_STOPPED`, complete nothing, and hand
    /// nothing to the client: no connection is attempted, so the free's stop finds the
    /// client stopped and raises no event.
    #[test]
    fn async_calls_after_the_free_began_reach_nothing() {
        // A server that never answers the upgrade: a connection attempt would wait there.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/client/hubs/h", server.local_addr().unwrap());
        let (events_tx, events) = mpsc::channel();
        let on_event = move |event| {
            let _ = events_tx.send(event);
        };
        let client = Client::new(
            Credential::Url(url),
            crate::ClientOptions::default(),
            Arc::new(on_event),
        )
        .unwrap();
        let (freed_tx, freed) = mpsc::sync_channel::<()>(1);
        let sink = Arc::new(EventSink::new(
            dispatcher::assign().unwrap(),
            None,
            Box::into_raw(Box::new(freed_tx)).cast(),
            Some(signal_freed),
            0,
        ));
        let (returned_tx, returned) = mpsc::channel();
        let probe = FreedInCallback {
            client: into_handle(client, sink, None),
            returned: Mutex::new(returned),
            statuses: Mutex::new(Vec::new()),
            completions: AtomicU64::new(0),
        };
        // Stopping a stopped client completes at once: the callback runs.
        let user_data = &probe as *const FreedInCallback as *mut c_void;
        let status = unsafe {
            wps_client_stop_async(
                probe.client,
                Some(free_then_call),
                user_data,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(status, WPS_STATUS_OK);
        returned_tx.send(()).unwrap();
        freed
            .recv_timeout(Duration::from_secs(30))
            .expect("the teardown did not end");
        assert_eq!(*probe.statuses.lock().unwrap(), [WPS_STATUS_STOPPED; 3]);
        assert_eq!(probe.completions.load(Ordering::SeqCst), 0);
        let events: Vec<_> = events.try_iter().collect();
        assert!(events.is_empty(), "a start reached the client: {events:?}");
        server.set_nonblocking(true).unwrap();
        assert_eq!(
            server.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "a connection was attempted"
        );
    }
}
