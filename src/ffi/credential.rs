//! The credential callback: a C function asked for a fresh client URL before every
//! new connection, run on a library thread. It answers before returning, or defers the
//! answer and gives it later from any thread while the connection attempt waits.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::client::Credential;

use super::callbacks::{wps_user_data_free_cb, UserData};
use super::convert::str_arg;
use super::gate::{in_callback, InCallback};
use super::panic::{guard, FfiResult};
use super::status::{
    fail, wps_status, WPS_STATUS_FORKED, WPS_STATUS_ILLEGAL_STATE, WPS_STATUS_NULL_ARG,
};

/// Where a credential callback puts its answer: an opaque token. Set exactly one of a
/// URL or an error, during the callback, or after it once the callback deferred the
/// answer (`wps_credential_result_defer`). A token that is not pending (its callback
/// returned without deferring, it was answered, or its request was abandoned), or any
/// other pointer, is refused with `WPS_STATUS_ILLEGAL_STATE`.
pub struct wps_credential_result {
    _opaque: [u8; 0],
}

/// Credential callback: called before every new connection (not for a recovery) on a
/// library thread. It must either answer with `wps_credential_result_set_url` or
/// `wps_credential_result_set_error` before returning (it may block meanwhile), or call
/// `wps_credential_result_defer` and answer later, from any thread. A callback that
/// returns having done neither fails the attempt with `WPS_STATUS_CREDENTIAL_FAILED`.
/// A call that outlives its connection attempt (the start timeout, a stop) does not
/// hold the next attempt back: the next call may then run at the same time, on another
/// thread, with the same user data.
pub type wps_credential_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, result: *mut wps_credential_result)>;

type Outcome = Result<String, String>;

/// Where a credential request stands.
enum Request {
    /// Its callback is running: what it set, and whether it deferred the answer.
    Calling {
        answer: Option<Outcome>,
        deferred: bool,
    },
    /// Its callback returned after deferring: the connection attempt waits on this.
    Waiting(oneshot::Sender<Outcome>),
    /// Its connection attempt was abandoned while its callback runs: the callback may
    /// still defer, an answer is refused, and it leaves the table once the callback
    /// returns.
    Abandoned { deferred: bool },
}

/// The pending credential requests, by token. A token is a number never reused, not
/// an address, so a late or stray call finds nothing instead of memory that is gone.
static REQUESTS: Mutex<BTreeMap<usize, Request>> = Mutex::new(BTreeMap::new());
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);

/// The table, unless this is a fork() child of the process whose threads made the
/// requests (a thread of that parent may have held its lock at the fork), or no request
/// was ever made in this process. Checked before the lock is taken.
fn requests(
    r: *mut wps_credential_result,
) -> FfiResult<MutexGuard<'static, BTreeMap<usize, Request>>> {
    if r.is_null() {
        return Err(fail(WPS_STATUS_NULL_ARG, "`result` is NULL"));
    }
    match crate::runtime::belongs_here() {
        Some(true) => Ok(REQUESTS.lock().unwrap_or_else(|e| e.into_inner())),
        Some(false) => Err(fail(
            WPS_STATUS_FORKED,
            "the credential request belongs to the parent of this fork() child",
        )),
        None => Err(not_pending()),
    }
}

fn lock_requests() -> MutexGuard<'static, BTreeMap<usize, Request>> {
    REQUESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an abandoned request has no answer.
const ABANDONED: &str = "the credential request was abandoned (its client was stopped or \
                         freed, or the connection attempt timed out)";

fn not_pending() -> wps_status {
    fail(
        WPS_STATUS_ILLEGAL_STATE,
        "`result` is not a pending credential request (its callback returned without \
         deferring, it was answered, or the request was abandoned)",
    )
}

/// The token lent to one credential request; it leaves the table when this drops
/// (the request is over: answered, or abandoned by its connection attempt), or once its
/// callback returns if that still runs.
struct Token(usize);

impl Token {
    fn open() -> Token {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        lock_requests().insert(
            token,
            Request::Calling {
                answer: None,
                deferred: false,
            },
        );
        Token(token)
    }
}

/// Once the callback of request `token` returned: its answer, or the receiver of the
/// deferred one. An abandoned request has no answer to take.
fn after_callback(token: usize) -> Result<Outcome, oneshot::Receiver<Outcome>> {
    let mut requests = lock_requests();
    match requests.remove(&token) {
        Some(Request::Calling {
            answer: None,
            deferred: true,
        }) => {
            let (tx, rx) = oneshot::channel();
            requests.insert(token, Request::Waiting(tx));
            Err(rx)
        }
        Some(Request::Calling {
            answer: Some(answer),
            ..
        }) => Ok(answer),
        Some(Request::Abandoned { .. }) | None => Ok(Err(ABANDONED.to_owned())),
        _ => Ok(Err("the credential callback set no result".to_owned())),
    }
}

/// The answer to a request whose callback does not run: it leaves the table (abandoned
/// meanwhile, it would stay there, waiting for the callback's return).
fn not_called(token: usize, why: &str) -> Answer {
    lock_requests().remove(&token);
    Answer::Now(Err(why.to_owned()))
}

impl Drop for Token {
    fn drop(&mut self) {
        let mut requests = lock_requests();
        if let Some(Request::Calling { deferred, .. }) = requests.remove(&self.0) {
            requests.insert(self.0, Request::Abandoned { deferred });
        }
    }
}

/// Answers the request `r` names.
fn set(r: *mut wps_credential_result, outcome: Outcome) -> FfiResult {
    let mut requests = requests(r)?;
    let token = r as usize;
    match requests.remove(&token) {
        Some(Request::Calling {
            answer: None,
            deferred,
        }) => {
            let answer = Some(outcome);
            requests.insert(token, Request::Calling { answer, deferred });
            Ok(())
        }
        Some(answered @ Request::Calling { .. }) => {
            requests.insert(token, answered);
            Err(fail(
                WPS_STATUS_ILLEGAL_STATE,
                "the credential result is already set",
            ))
        }
        Some(Request::Waiting(tx)) => tx.send(outcome).map_err(|_| not_pending()),
        Some(abandoned @ Request::Abandoned { .. }) => {
            requests.insert(token, abandoned);
            Err(fail(WPS_STATUS_ILLEGAL_STATE, ABANDONED))
        }
        None => Err(not_pending()),
    }
}

/// Answers a credential request with the client URL to connect to (copied).
///
/// # Safety
/// `url` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn wps_credential_result_set_url(
    r: *mut wps_credential_result,
    url: *const c_char,
) -> wps_status {
    guard(|| {
        let url = str_arg(url, "url")?.to_owned();
        set(r, Ok(url))
    })
}

/// Answers a credential request with a failure (the message is copied); the
/// connection attempt fails with `WPS_STATUS_CREDENTIAL_FAILED`.
///
/// # Safety
/// `message` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn wps_credential_result_set_error(
    r: *mut wps_credential_result,
    message: *const c_char,
) -> wps_status {
    guard(|| {
        let message = str_arg(message, "message")?.to_owned();
        set(r, Err(message))
    })
}

/// Defers the answer to a credential request; called inside its callback. The callback
/// then returns, and the connection attempt waits, with no thread blocked and within
/// its start timeout, for `wps_credential_result_set_url` or `_set_error` on `r`,
/// called from any thread (an answer given before the callback returns is taken as
/// usual). `r` stays valid until answered or until the request is abandoned (the client
/// stopped or freed, or the attempt timed out): a late answer is then refused with
/// `WPS_STATUS_ILLEGAL_STATE`. The callback may defer even when the abandonment came
/// while it ran (the answer is refused all the same). A pending request counts as a use
/// of the credential's user data, so its finalizer runs after the answer or the
/// abandonment: code answering later must not use that user data once `wps_client_free`
/// has returned. An answer is not a callback: `wps_callbacks_disable` does not stop it.
/// In a fork() child, the parent's requests are refused with `WPS_STATUS_FORKED`.
/// `WPS_STATUS_ILLEGAL_STATE` once the callback has returned, or when `r` is already
/// answered or deferred.
#[no_mangle]
pub extern "C" fn wps_credential_result_defer(r: *mut wps_credential_result) -> wps_status {
    guard(|| {
        let mut requests = requests(r)?;
        match requests.get_mut(&(r as usize)) {
            Some(
                Request::Calling {
                    answer: None,
                    deferred,
                }
                | Request::Abandoned { deferred },
            ) if !*deferred => {
                *deferred = true;
                Ok(())
            }
            Some(Request::Calling { answer: None, .. } | Request::Abandoned { .. }) => Err(fail(
                WPS_STATUS_ILLEGAL_STATE,
                "the credential result is already deferred",
            )),
            Some(Request::Calling { .. }) => Err(fail(
                WPS_STATUS_ILLEGAL_STATE,
                "the credential result is already set",
            )),
            Some(Request::Waiting(_)) | None => Err(fail(
                WPS_STATUS_ILLEGAL_STATE,
                "`result` is not the result of a running credential callback (a deferral is \
                 only possible before the callback returns)",
            )),
        }
    })
}

#[derive(Default)]
struct State {
    closed: bool,
    /// Requests whose callback runs, or whose deferred answer is awaited.
    in_flight: usize,
    /// The finalizer was taken (it runs once).
    finalizing: bool,
    /// The finalizer has run.
    finalized: bool,
    /// What runs once the finalizer has run (`when_finalized`).
    then: Option<Box<dyn FnOnce() + Send>>,
}

/// The C credential callback of one client, with its user data and finalizer.
pub(crate) struct CredentialSink {
    cb: unsafe extern "C" fn(*mut c_void, *mut wps_credential_result),
    user_data: UserData,
    user_data_free: wps_user_data_free_cb,
    state: Mutex<State>,
    done: Condvar,
}

/// One request's use of a sink, from its callback to its answer or abandonment; the
/// finalizer of a closed sink runs once the last use ends.
struct Use(Arc<CredentialSink>);

impl Drop for Use {
    fn drop(&mut self) {
        let finalize = {
            let mut st = self.0.lock();
            st.in_flight -= 1;
            self.0.take_finalizer(&mut st)
        };
        if !finalize {
            return;
        }
        let sink = Arc::clone(&self.0);
        // A deferred request ends on a runtime thread (its connection attempt is dropped
        // there); a finalizer may block, and must never run on an I/O thread.
        drop(crate::runtime::handle().spawn_blocking(move || sink.finalize()));
    }
}

/// What a credential callback left: its answer, or the deferred answer to await.
enum Answer {
    Now(Outcome),
    Later {
        rx: oneshot::Receiver<Outcome>,
        _use: Use,
    },
}

impl CredentialSink {
    pub(crate) fn new(
        cb: unsafe extern "C" fn(*mut c_void, *mut wps_credential_result),
        user_data: *mut c_void,
        user_data_free: wps_user_data_free_cb,
    ) -> CredentialSink {
        CredentialSink {
            cb,
            user_data: UserData(user_data),
            user_data_free,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        }
    }

    /// The core credential that calls this sink on a blocking-pool thread, then awaits
    /// a deferred answer without a thread. The request's token belongs to the attempt's
    /// future: dropping it (a stop, a free, the start timeout) abandons the request at
    /// once, even while the callback still runs, so that no answer is taken after the
    /// abandonment.
    pub(crate) fn credential(self: &Arc<Self>) -> Credential {
        let sink = Arc::clone(self);
        Credential::Provider(Arc::new(move || {
            let sink = Arc::clone(&sink);
            Box::pin(async move {
                let token = Token::open();
                let id = token.0;
                match tokio::task::spawn_blocking(move || sink.call(id)).await {
                    Ok(Answer::Now(outcome)) => outcome,
                    Ok(Answer::Later { rx, _use }) => {
                        rx.await.unwrap_or_else(|_| Err(ABANDONED.to_owned()))
                    }
                    Err(e) => Err(format!("credential callback failed: {e}")),
                }
            })
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the callback for the request `token` names.
    fn call(self: Arc<Self>, token: usize) -> Answer {
        let closed = {
            let mut st = self.lock();
            if !st.closed {
                st.in_flight += 1;
            }
            st.closed
        };
        if closed {
            return not_called(token, "the client was freed");
        }
        let cb = self.cb;
        let user_data = self.user_data.0;
        let request = Use(self);
        let Some(inside) = InCallback::enter() else {
            return not_called(token, "callbacks are disabled");
        };
        // SAFETY: the callback and its user data were registered together.
        unsafe { cb(user_data, token as *mut wps_credential_result) };
        drop(inside);
        match after_callback(token) {
            Ok(outcome) => Answer::Now(outcome),
            Err(rx) => Answer::Later { rx, _use: request },
        }
    }

    fn take_finalizer(&self, st: &mut State) -> bool {
        if st.closed && st.in_flight == 0 && !st.finalizing {
            st.finalizing = true;
            return true;
        }
        false
    }

    fn finalize(&self) {
        if let (Some(free), Some(_inside)) = (self.user_data_free, InCallback::enter()) {
            // SAFETY: `take_finalizer` lets this happen once, after the last use.
            unsafe { free(self.user_data.0) };
        }
        let then = {
            let mut st = self.lock();
            st.finalized = true;
            st.then.take()
        };
        self.done.notify_all();
        if let Some(then) = then {
            then();
        }
    }

    /// Runs `f` once the finalizer has run (at once if it has): after the last call
    /// and the last deferred request, on the thread that ends them.
    pub(crate) fn when_finalized(&self, f: impl FnOnce() + Send + 'static) {
        let mut st = self.lock();
        if st.finalized {
            drop(st);
            f();
        } else {
            st.then = Some(Box::new(f));
        }
    }

    /// No more calls after this; the finalizer runs once the running call and the
    /// deferred requests (if any) are over. With `wait` (never from inside a callback),
    /// returns after it ran.
    pub(crate) fn close(&self, wait: bool) {
        let finalize = {
            let mut st = self.lock();
            st.closed = true;
            self.take_finalizer(&mut st)
        };
        if finalize {
            self.finalize();
        } else if wait && !in_callback() {
            let mut st = self.lock();
            while !st.finalized {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn answer(_user_data: *mut c_void, result: *mut wps_credential_result) {
        wps_credential_result_set_url(result, c"ws://127.0.0.1:1/".as_ptr());
    }

    #[test]
    fn a_request_abandoned_before_its_callback_could_run_leaves_the_table() {
        let sink = Arc::new(CredentialSink::new(answer, std::ptr::null_mut(), None));
        sink.close(false);
        let token = Token::open();
        let id = token.0;
        // The attempt is abandoned (a free) while its call waits for a pool thread.
        drop(token);
        assert!(matches!(
            Arc::clone(&sink).call(id),
            Answer::Now(Err(ref why)) if why.contains("freed")
        ));
        assert!(
            !lock_requests().contains_key(&id),
            "the request stays in the table"
        );
    }
}
