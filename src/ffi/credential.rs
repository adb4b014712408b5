//! The credential callback: a C function asked for a fresh client URL before every
//! new connection, run on a library thread where it may block.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::client::Credential;

use super::callbacks::{wps_user_data_free_cb, UserData};
use super::convert::str_arg;
use super::gate::{in_callback, InCallback};
use super::panic::{guard, FfiResult};
use super::status::{fail, wps_status, WPS_STATUS_ILLEGAL_STATE, WPS_STATUS_NULL_ARG};

/// Where a credential callback puts its answer: an opaque token, valid only during
/// the callback. Set exactly one of a URL or an error. A token used after its callback
/// returned (or any other pointer) is refused with `WPS_STATUS_ILLEGAL_STATE`.
pub struct wps_credential_result {
    _opaque: [u8; 0],
}

/// Credential callback: called before every new connection (not for a recovery) on a
/// library thread, where it may block. It must call `wps_credential_result_set_url` or
/// `wps_credential_result_set_error` on `result` exactly once before returning.
pub type wps_credential_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, result: *mut wps_credential_result)>;

type Outcome = Option<Result<String, String>>;

/// The answers of the running credential calls, by token. A token is a number never
/// reused, not an address, so a late or stray call finds nothing instead of memory
/// that is gone.
static SLOTS: Mutex<BTreeMap<usize, Outcome>> = Mutex::new(BTreeMap::new());
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);

fn slots() -> MutexGuard<'static, BTreeMap<usize, Outcome>> {
    SLOTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A slot lent to one credential call; its token leaves the table when it drops.
struct Slot(usize);

impl Slot {
    fn open() -> Slot {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        slots().insert(token, None);
        Slot(token)
    }

    fn token(&self) -> *mut wps_credential_result {
        self.0 as *mut wps_credential_result
    }

    fn take(self) -> Outcome {
        slots().remove(&self.0).flatten()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        slots().remove(&self.0);
    }
}

/// Stores the callback's answer in the slot `r` names.
fn set(r: *mut wps_credential_result, outcome: Result<String, String>) -> FfiResult {
    if r.is_null() {
        return Err(fail(WPS_STATUS_NULL_ARG, "`result` is NULL"));
    }
    let mut slots = slots();
    let Some(slot) = slots.get_mut(&(r as usize)) else {
        return Err(fail(
            WPS_STATUS_ILLEGAL_STATE,
            "`result` is not the result of a running credential call (its callback returned)",
        ));
    };
    if slot.is_some() {
        return Err(fail(
            WPS_STATUS_ILLEGAL_STATE,
            "the credential result is already set",
        ));
    }
    *slot = Some(outcome);
    Ok(())
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

#[derive(Default)]
struct State {
    closed: bool,
    in_flight: usize,
    finalized: bool,
}

/// The C credential callback of one client, with its user data and finalizer.
pub(crate) struct CredentialSink {
    cb: unsafe extern "C" fn(*mut c_void, *mut wps_credential_result),
    user_data: UserData,
    user_data_free: wps_user_data_free_cb,
    state: Mutex<State>,
    done: Condvar,
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

    /// The core credential that calls this sink on a blocking-pool thread.
    pub(crate) fn credential(self: &Arc<Self>) -> Credential {
        let sink = Arc::clone(self);
        Credential::Provider(Arc::new(move || {
            let sink = Arc::clone(&sink);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || sink.call())
                    .await
                    .unwrap_or_else(|e| Err(format!("credential callback failed: {e}")))
            })
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call(&self) -> Result<String, String> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err("the client was freed".to_owned());
            }
            st.in_flight += 1;
        }
        let slot = Slot::open();
        let outcome = match InCallback::enter() {
            Some(_inside) => {
                // SAFETY: the callback and its user data were registered together.
                unsafe { (self.cb)(self.user_data.0, slot.token()) };
                slot.take()
            }
            None => Some(Err("callbacks are disabled".to_owned())),
        };
        let finalize = {
            let mut st = self.lock();
            st.in_flight -= 1;
            self.take_finalizer(&mut st)
        };
        if finalize {
            self.finalize();
        }
        outcome.unwrap_or_else(|| Err("the credential callback set no result".to_owned()))
    }

    fn take_finalizer(&self, st: &mut State) -> bool {
        if st.closed && st.in_flight == 0 && !st.finalized {
            st.finalized = true;
            return true;
        }
        false
    }

    fn finalize(&self) {
        if let (Some(free), Some(_inside)) = (self.user_data_free, InCallback::enter()) {
            // SAFETY: `take_finalizer` lets this happen once, after the last call.
            unsafe { free(self.user_data.0) };
        }
        self.done.notify_all();
    }

    /// No more calls after this; the finalizer runs once the running call (if any)
    /// returns. With `wait` (never from inside a callback), returns after it ran.
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
