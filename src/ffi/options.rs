//! `wps_options`: an opaque builder of client options, copied by `wps_client_new`.

use std::ffi::c_char;
use std::time::Duration;

use crate::client::{ClientOptions, RetryMode, RetryOptions};
use crate::protocol::Protocol;
use crate::proxy::ProxySetting;

use super::backlog;
use super::convert::{bytes_arg, handle_mut, str_arg};
use super::panic::{guard, guard_value, FfiResult};
use super::status::{
    fail, wps_status, WPS_DISPATCH_POLL, WPS_DISPATCH_THREAD, WPS_PROTOCOL_JSON,
    WPS_PROTOCOL_JSON_RELIABLE, WPS_RETRY_EXPONENTIAL, WPS_RETRY_FIXED,
    WPS_STATUS_INVALID_ARGUMENT,
};

/// Client options: an opaque builder (a boxed `ClientOptions`), created by
/// `wps_options_new` with the official clients' defaults, released by `wps_options_free`.
/// Not synchronized: set it from one thread at a time, and not while a `wps_client_new*`
/// on another thread copies it (clients copying it at once is fine).
#[derive(Clone)]
pub struct wps_options {
    pub(crate) inner: ClientOptions,
    /// Callbacks are polled by the application (`WPS_DISPATCH_POLL`).
    pub(crate) poll: bool,
    /// Bytes of events that may wait for the application before reading pauses (0: no limit).
    pub(crate) event_backlog_bytes: usize,
}

/// The defaults: those of the official clients, thread dispatch, a 64 MiB event backlog.
impl Default for wps_options {
    fn default() -> wps_options {
        wps_options {
            inner: ClientOptions::default(),
            poll: false,
            event_backlog_bytes: backlog::DEFAULT_LIMIT,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn retry(max_retries: u32, delay_ms: u64, max_delay_ms: u64, mode: u32) -> FfiResult<RetryOptions> {
    let mode = match mode {
        WPS_RETRY_FIXED => RetryMode::Fixed,
        WPS_RETRY_EXPONENTIAL => RetryMode::Exponential,
        _ => {
            return Err(fail(
                WPS_STATUS_INVALID_ARGUMENT,
                format!("unknown retry mode {mode}"),
            ))
        }
    };
    Ok(RetryOptions {
        max_retries: (max_retries != u32::MAX).then_some(max_retries),
        delay: ms(delay_ms),
        max_delay: ms(max_delay_ms),
        mode,
    })
}

fn positive(v: u64, what: &str) -> FfiResult<Duration> {
    if v == 0 {
        return Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            format!("`{what}` must be above 0"),
        ));
    }
    Ok(ms(v))
}

/// Applies `set` to the options behind `o`.
fn with(o: *mut wps_options, set: impl FnOnce(&mut ClientOptions) -> FfiResult) -> wps_status {
    with_handle(o, |options| set(&mut options.inner))
}

/// Applies `set` to the handle `o`.
fn with_handle(o: *mut wps_options, set: impl FnOnce(&mut wps_options) -> FfiResult) -> wps_status {
    // SAFETY: `o` comes from `wps_options_new` per the API contract.
    guard(|| set(unsafe { handle_mut(o, "options") }?))
}

/// Creates options holding the defaults (those of the official clients). Never NULL
/// except on allocation failure. Free with `wps_options_free`.
#[no_mangle]
pub extern "C" fn wps_options_new() -> *mut wps_options {
    guard_value(std::ptr::null_mut(), || {
        Box::into_raw(Box::new(wps_options::default()))
    })
}

/// Frees options (NULL is ignored). Clients created from them keep their own copy.
///
/// # Safety
/// `o` is NULL or comes from `wps_options_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn wps_options_free(o: *mut wps_options) {
    guard_value((), || {
        if !o.is_null() {
            drop(Box::from_raw(o));
        }
    })
}

/// Subprotocol: `WPS_PROTOCOL_JSON_RELIABLE` (default) or `WPS_PROTOCOL_JSON`.
#[no_mangle]
pub extern "C" fn wps_options_set_protocol(o: *mut wps_options, protocol: u32) -> wps_status {
    with(o, |opts| {
        opts.protocol = match protocol {
            WPS_PROTOCOL_JSON_RELIABLE => Protocol::JsonReliable,
            WPS_PROTOCOL_JSON => Protocol::Json,
            _ => {
                return Err(fail(
                    WPS_STATUS_INVALID_ARGUMENT,
                    format!("unknown protocol {protocol}"),
                ))
            }
        };
        Ok(())
    })
}

/// Where the client's event and completion callbacks run: `WPS_DISPATCH_THREAD`
/// (default: a library thread) or `WPS_DISPATCH_POLL` (the application's thread, in
/// `wps_client_dispatch`). A credential callback runs on a library thread either way.
#[no_mangle]
pub extern "C" fn wps_options_set_dispatch_mode(o: *mut wps_options, mode: u32) -> wps_status {
    with_handle(o, |options| {
        options.poll = match mode {
            WPS_DISPATCH_THREAD => false,
            WPS_DISPATCH_POLL => true,
            _ => {
                return Err(fail(
                    WPS_STATUS_INVALID_ARGUMENT,
                    format!("unknown dispatch mode {mode}"),
                ))
            }
        };
        Ok(())
    })
}

/// How many bytes of received events may wait for the application (for its callbacks,
/// or for `wps_client_dispatch*` in poll mode) before the client stops reading its
/// socket; reading goes on once they are down to half. Default 64 MiB; 0: no limit.
/// While reading waits, the service holds the client's messages, within its own
/// limits for a slow connection. Operations are still sent meanwhile, and their ack
/// timeouts wait too. A blocking call of this client (its answer comes behind the
/// events) lets reading go on until it returns, so a callback may make one.
#[no_mangle]
pub extern "C" fn wps_options_set_event_backlog_bytes(
    o: *mut wps_options,
    bytes: usize,
) -> wps_status {
    with_handle(o, |options| {
        options.event_backlog_bytes = bytes;
        Ok(())
    })
}

/// Whether a lost session is replaced by a new connection (default true).
#[no_mangle]
pub extern "C" fn wps_options_set_auto_reconnect(o: *mut wps_options, on: bool) -> wps_status {
    with(o, |opts| {
        opts.auto_reconnect = on;
        Ok(())
    })
}

/// Whether groups joined by the user are joined again on every new connection: after a
/// reconnect, and on a start after a stop (default true).
#[no_mangle]
pub extern "C" fn wps_options_set_auto_rejoin_groups(o: *mut wps_options, on: bool) -> wps_status {
    with(o, |opts| {
        opts.auto_rejoin_groups = on;
        Ok(())
    })
}

/// Retry policy of operations (default 3 retries, 1000 ms, max 30000 ms, fixed): an
/// acked operation is resent with its ackId after an ack timeout or an
/// `InternalServerError`, never after another error. `max_retries` UINT32_MAX means
/// unbounded; `mode` is a `WPS_RETRY_*` value.
#[no_mangle]
pub extern "C" fn wps_options_set_message_retry(
    o: *mut wps_options,
    max_retries: u32,
    delay_ms: u64,
    max_delay_ms: u64,
    mode: u32,
) -> wps_status {
    with(o, |opts| {
        opts.message_retry = retry(max_retries, delay_ms, max_delay_ms, mode)?;
        Ok(())
    })
}

/// Retry policy of reconnecting (default unbounded, 1000 ms, max 30000 ms, fixed).
/// `max_retries` UINT32_MAX means unbounded; `mode` is a `WPS_RETRY_*` value.
#[no_mangle]
pub extern "C" fn wps_options_set_reconnect_retry(
    o: *mut wps_options,
    max_retries: u32,
    delay_ms: u64,
    max_delay_ms: u64,
    mode: u32,
) -> wps_status {
    with(o, |opts| {
        opts.reconnect_retry = retry(max_retries, delay_ms, max_delay_ms, mode)?;
        Ok(())
    })
}

/// Keep-alive: send a ping every `interval_ms` (default 20000) and drop the
/// connection after `timeout_ms` of silence (default 120000); 0 disables either. With
/// both set, the timeout must be longer than the interval (`wps_client_new` fails
/// with `WPS_STATUS_INVALID_ARGUMENT` otherwise).
#[no_mangle]
pub extern "C" fn wps_options_set_keep_alive(
    o: *mut wps_options,
    interval_ms: u64,
    timeout_ms: u64,
) -> wps_status {
    with(o, |opts| {
        opts.keep_alive_interval = (interval_ms != 0).then(|| ms(interval_ms));
        opts.keep_alive_timeout = (timeout_ms != 0).then(|| ms(timeout_ms));
        Ok(())
    })
}

/// How long an operation waits for its ack (default 30000 ms; must be above 0), from
/// each attempt's write. It runs on during a recovery, from the call for an operation
/// made meanwhile, and a resend after a recovery does not restart it: no call waits for
/// a recovery longer than for its acks.
#[no_mangle]
pub extern "C" fn wps_options_set_ack_timeout_ms(o: *mut wps_options, ms: u64) -> wps_status {
    with(o, |opts| {
        opts.ack_timeout = positive(ms, "ms")?;
        Ok(())
    })
}

/// How long `wps_client_start` waits for a connection, the credential callback's answer
/// included (default 30000 ms; must be above 0); also the bound of each reconnect
/// attempt. Then the start fails with `WPS_STATUS_TIMEOUT`, and
/// `wps_last_error_message()` names the step it was waiting for (the TCP connection, the
/// TLS handshake, the upgrade's answer, the connected frame, the credential).
#[no_mangle]
pub extern "C" fn wps_options_set_start_timeout_ms(o: *mut wps_options, ms: u64) -> wps_status {
    with(o, |opts| {
        opts.start_timeout = positive(ms, "ms")?;
        Ok(())
    })
}

/// Reliable protocol recovery: how long to try (default 30000 ms) and the delay
/// between attempts (default 1000 ms; must be above 0). A recovered connection that
/// drops again within that delay, or before the service confirmed the recovery (by its
/// `connected` frame or any frame of the session), continues the same recovery and its
/// window.
#[no_mangle]
pub extern "C" fn wps_options_set_recovery(
    o: *mut wps_options,
    window_ms: u64,
    attempt_delay_ms: u64,
) -> wps_status {
    with(o, |opts| {
        opts.recovery_attempt_delay = positive(attempt_delay_ms, "attempt_delay_ms")?;
        opts.recovery_window = ms(window_ms);
        Ok(())
    })
}

/// Reliable protocol: how often the delivered sequence id is acknowledged
/// (default 1000 ms; must be above 0).
#[no_mangle]
pub extern "C" fn wps_options_set_sequence_ack_interval_ms(
    o: *mut wps_options,
    ms: u64,
) -> wps_status {
    with(o, |opts| {
        opts.sequence_ack_interval = positive(ms, "ms")?;
        Ok(())
    })
}

/// Adds trusted root certificates (PEM, one or more) for `wss://`, on top of the
/// platform's roots. The bytes are copied; an empty buffer is refused here, and one
/// holding no certificate or a malformed one by `wps_client_new`, both with
/// `WPS_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `pem` is NULL (with `len` 0) or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn wps_options_add_ca_pem(
    o: *mut wps_options,
    pem: *const u8,
    len: usize,
) -> wps_status {
    with(o, |opts| {
        let pem = bytes_arg(pem, len, "pem")?;
        if pem.is_empty() {
            return Err(fail(WPS_STATUS_INVALID_ARGUMENT, "`pem` is empty"));
        }
        opts.extra_ca_pem.push(pem.to_vec());
        Ok(())
    })
}

/// The `User-Agent` header of the WebSocket upgrade (copied; printable ASCII, checked
/// by `wps_client_new`). NULL sends none. Default `webpubsub-client-rust/{version}`.
///
/// # Safety
/// `ua` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn wps_options_set_user_agent(
    o: *mut wps_options,
    ua: *const c_char,
) -> wps_status {
    with(o, |opts| {
        opts.user_agent = if ua.is_null() {
            None
        } else {
            Some(str_arg(ua, "ua")?.to_owned())
        };
        Ok(())
    })
}

/// The HTTP proxy of the client's connections (copied). NULL (the default) takes it
/// from the environment as the official Python client does: `https_proxy` or
/// `HTTPS_PROXY` for `wss://`, `http_proxy` or `HTTP_PROXY` (not in a CGI program, where
/// a request header sets it) for `ws://`, except for the hosts `no_proxy` or `NO_PROXY`
/// lists and loopback hosts. An empty string connects
/// directly; otherwise `http://[user[:password]@]host[:port]` (Basic authentication,
/// port 80 by default) is used for every connection. A URL that is not of that form
/// fails with `WPS_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `url` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn wps_options_set_proxy(
    o: *mut wps_options,
    url: *const c_char,
) -> wps_status {
    with(o, |opts| {
        let proxy = match url.is_null() {
            true => ProxySetting::FromEnvironment,
            false => match str_arg(url, "url")? {
                "" => ProxySetting::Direct,
                url => ProxySetting::Url(url.to_owned()),
            },
        };
        proxy
            .validate()
            .map_err(|e| fail(WPS_STATUS_INVALID_ARGUMENT, e))?;
        opts.proxy = proxy;
        Ok(())
    })
}
