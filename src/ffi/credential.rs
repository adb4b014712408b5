//! The credential callback: a C function asked for a fresh client URL before every
//! new connection, run on a library thread where it may block.

use std::ffi::{c_char, c_void};
use std::sync::{Arc, Condvar, Mutex};

use crate::client::Credential;

use super::callbacks::{wps_user_data_free_cb, UserData};
use super::convert::{handle_mut, str_arg};
use super::gate::{in_callback, InCallback};
use super::panic::{guard, FfiResult};
use super::status::{fail, wps_status, WPS_STATUS_ILLEGAL_STATE};

/// Where a credential callback puts its answer: an opaque slot (a Rust struct owned
/// by the library), valid only during the callback. Set exactly one of a URL or an error.
pub struct wps_credential_result {
    outcome: Option<Result<String, String>>,
}

/// Credential callback: called before every new connection (not for a recovery) on a
/// library thread, where it may block. It must call `wps_credential_result_set_url` or
/// `wps_credential_result_set_error` on `result` exactly once before returning.
pub type wps_credential_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, result: *mut wps_credential_result)>;

/// Stores the callback's answer in the slot it was lent.
///
/// # Safety
/// `r` is NULL or the slot passed to the running credential callback.
unsafe fn set(r: *mut wps_credential_result, outcome: Result<String, String>) -> FfiResult {
    let r = handle_mut(r, "result")?;
    if r.outcome.is_some() {
        return Err(fail(
            WPS_STATUS_ILLEGAL_STATE,
            "the credential result is already set",
        ));
    }
    r.outcome = Some(outcome);
    Ok(())
}

/// Answers a credential request with the client URL to connect to (copied).
///
/// # Safety
/// `r` is the result passed to the running credential callback; `url` is NULL or a
/// NUL-terminated string.
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
/// `r` is the result passed to the running credential callback; `message` is NULL or
/// a NUL-terminated string.
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
        let mut result = wps_credential_result { outcome: None };
        match InCallback::enter() {
            // SAFETY: the callback and its user data were registered together.
            Some(_inside) => unsafe { (self.cb)(self.user_data.0, &mut result) },
            None => result.outcome = Some(Err("callbacks are disabled".to_owned())),
        }
        let finalize = {
            let mut st = self.lock();
            st.in_flight -= 1;
            self.take_finalizer(&mut st)
        };
        if finalize {
            self.finalize();
        }
        result
            .outcome
            .unwrap_or_else(|| Err("the credential callback set no result".to_owned()))
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
