//! Client options, their defaults (those of the official clients) and retry policies.

use crate::protocol::Protocol;
use crate::proxy::ProxySetting;
use std::time::Duration;

/// The longest duration an option (or an invocation's timeout) may hold: u64::MAX
/// milliseconds, about 584 million years, the longest the C API can give. Deadlines
/// are the clock plus a few of them, which a longer one (`Duration::MAX`) would
/// overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_millis(u64::MAX);

/// The highest `max_message_size`.
const MAX_INCOMING_MESSAGE: usize = 1 << 30;

/// Refuses a duration over [`MAX_DURATION`], naming it `name`.
pub(crate) fn check_duration(name: &str, value: Duration) -> Result<(), String> {
    if value > MAX_DURATION {
        return Err(format!(
            "{name} must be at most u64::MAX milliseconds (about 584 million years)"
        ));
    }
    Ok(())
}

/// How the delay between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// Every attempt waits `delay`.
    #[default]
    Fixed,
    /// Attempt n waits `delay * 2^(n-1)`, capped at `max_delay`.
    Exponential,
}

/// A retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOptions {
    /// Retries after the first attempt; `None` retries forever.
    pub max_retries: Option<u32>,
    /// Base delay between attempts.
    pub delay: Duration,
    /// Upper bound of the delay in exponential mode (30 s in both defaults).
    pub max_delay: Duration,
    /// Fixed or exponential delays.
    pub mode: RetryMode,
}

impl RetryOptions {
    /// The message retry default: 3 retries, 1 s apart.
    pub fn message_default() -> RetryOptions {
        RetryOptions {
            max_retries: Some(3),
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            mode: RetryMode::Fixed,
        }
    }

    /// The reconnect default: unbounded retries, 1 s apart.
    pub fn reconnect_default() -> RetryOptions {
        RetryOptions {
            max_retries: None,
            ..RetryOptions::message_default()
        }
    }

    /// The delay before retry number `retry` (1-based), or `None` when retries are
    /// exhausted.
    pub fn delay_before(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || self.max_retries.is_some_and(|max| retry > max) {
            return None;
        }
        Some(match self.mode {
            RetryMode::Fixed => self.delay,
            RetryMode::Exponential => {
                let factor = 1u32.checked_shl(retry - 1).unwrap_or(u32::MAX);
                self.delay.saturating_mul(factor).min(self.max_delay)
            }
        })
    }
}

/// Everything configurable about a client. `Default` gives the official clients'
/// defaults; every timer can be shortened (tests run in seconds). A duration may be at
/// most u64::MAX milliseconds, and `ack_timeout`, `start_timeout`,
/// `recovery_attempt_delay`, `sequence_ack_interval` and a keep-alive duration that is
/// set must be above zero: [`Client::new`](crate::Client::new) refuses other values with
/// `Error::InvalidArgument`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The subprotocol; `JsonReliable` by default.
    pub protocol: Protocol,
    /// Open a new connection after the session is lost (default true).
    pub auto_reconnect: bool,
    /// Rejoin the groups joined through this client after a new connection (default true).
    pub auto_rejoin_groups: bool,
    /// Retries of an acked operation that timed out or hit `InternalServerError`;
    /// a retry keeps its ackId. Default: 3 retries, 1 s apart.
    pub message_retry: RetryOptions,
    /// Retries of a new connection after the session was lost: the first attempt is
    /// made at once, each retry after its delay; once they are used up the client stops
    /// (`Event::Stopped` with the last attempt's error). Default: unbounded, 1 s.
    pub reconnect_retry: RetryOptions,
    /// Send a `ping` this often; `None` disables (default 20 s).
    pub keep_alive_interval: Option<Duration>,
    /// Close and recover a connection that received nothing for this long; `None`
    /// disables (default 120 s). Must be longer than `keep_alive_interval` when both are
    /// set (else `Client::new` fails with `Error::InvalidArgument`).
    pub keep_alive_timeout: Option<Duration>,
    /// How long an acked operation waits for its ack before `Error::Timeout` (or a
    /// retry) (default 30 s), from each attempt's write. It runs on while the connection
    /// is being recovered, from the call for an operation made meanwhile (a retry's
    /// from when it would have been written), and a resend after a recovery does not
    /// restart it: no call waits for a recovery longer than for its acks. Also the
    /// default invoke timeout.
    pub ack_timeout: Duration,
    /// How long `start` waits for the credential, the handshake and the `connected`
    /// frame (default 30 s); then it fails with `Error::StartTimeout`, which names the
    /// step it was waiting for. Also the bound of each reconnect attempt.
    pub start_timeout: Duration,
    /// How long a dropped reliable connection keeps trying to recover (default 30 s). A
    /// recovered connection that drops again within `recovery_attempt_delay`, or before
    /// the service confirmed the recovery (by its `connected` frame or any frame of the
    /// session), continues the same recovery and its window.
    pub recovery_window: Duration,
    /// Delay between recovery attempts (default 1 s).
    pub recovery_attempt_delay: Duration,
    /// How often a changed `sequenceAck` is sent (default 1 s). A recovered connection
    /// acknowledges the delivered id again, changed or not.
    pub sequence_ack_interval: Duration,
    /// A `sequenceAck` is sent at once when the sequence id moved by more than this
    /// since the last one (default 300).
    pub sequence_ack_jump: u64,
    /// Extra trusted root certificates (PEM) for `wss://`, besides the platform roots.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Largest incoming WebSocket message accepted (default 16 MiB), from 1 KiB to
    /// 1 GiB: a frame's buffer is reserved at the length its header announces, so a
    /// bigger limit would let a server exhaust memory with a header alone.
    pub max_message_size: usize,
    /// Largest outgoing frame (the encoded JSON text, in bytes) the client sends; a
    /// bigger operation fails at once with `Error::InvalidArgument` and nothing is
    /// queued. Default 1 MiB, the service's limit on client frames (a bigger frame
    /// would get the connection closed); at least 1 KiB.
    pub max_outgoing_message_size: usize,
    /// The `User-Agent` header of the WebSocket upgrade; `None` sends none
    /// (default `webpubsub-client-rust/{version}`). Printable ASCII only.
    pub user_agent: Option<String>,
    /// The HTTP proxy connections go through (default: the environment's, as for the
    /// official Python client; see `ProxySetting`).
    pub proxy: ProxySetting,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            protocol: Protocol::JsonReliable,
            auto_reconnect: true,
            auto_rejoin_groups: true,
            message_retry: RetryOptions::message_default(),
            reconnect_retry: RetryOptions::reconnect_default(),
            keep_alive_interval: Some(Duration::from_secs(20)),
            keep_alive_timeout: Some(Duration::from_secs(120)),
            ack_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(30),
            recovery_window: Duration::from_secs(30),
            recovery_attempt_delay: Duration::from_secs(1),
            sequence_ack_interval: Duration::from_secs(1),
            sequence_ack_jump: 300,
            extra_ca_pem: Vec::new(),
            max_message_size: 16 << 20,
            max_outgoing_message_size: 1 << 20,
            user_agent: Some(
                concat!("webpubsub-client-rust/", env!("CARGO_PKG_VERSION")).to_owned(),
            ),
            proxy: ProxySetting::FromEnvironment,
        }
    }
}

impl ClientOptions {
    /// Rejects option values that cannot work (zero timers, empty delays, a silence
    /// timeout within the ping interval, durations over [`MAX_DURATION`]).
    pub(crate) fn validate(&self) -> Result<(), String> {
        let durations = [
            ("ack_timeout", self.ack_timeout),
            ("start_timeout", self.start_timeout),
            ("recovery_window", self.recovery_window),
            ("recovery_attempt_delay", self.recovery_attempt_delay),
            ("sequence_ack_interval", self.sequence_ack_interval),
            (
                "keep_alive_interval",
                self.keep_alive_interval.unwrap_or_default(),
            ),
            (
                "keep_alive_timeout",
                self.keep_alive_timeout.unwrap_or_default(),
            ),
            ("message_retry.delay", self.message_retry.delay),
            ("message_retry.max_delay", self.message_retry.max_delay),
            ("reconnect_retry.delay", self.reconnect_retry.delay),
            ("reconnect_retry.max_delay", self.reconnect_retry.max_delay),
        ];
        for (name, value) in durations {
            check_duration(name, value)?;
        }
        let positive = [
            ("ack_timeout", self.ack_timeout),
            ("start_timeout", self.start_timeout),
            ("recovery_attempt_delay", self.recovery_attempt_delay),
            ("sequence_ack_interval", self.sequence_ack_interval),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        for (name, value) in [
            ("keep_alive_interval", self.keep_alive_interval),
            ("keep_alive_timeout", self.keep_alive_timeout),
        ] {
            if value.is_some_and(|v| v.is_zero()) {
                return Err(format!(
                    "{name} must be None (disabled) or greater than zero"
                ));
            }
        }
        if let (Some(interval), Some(timeout)) = (self.keep_alive_interval, self.keep_alive_timeout)
        {
            // The silence timer would end a quiet, healthy connection before its next
            // ping could be answered.
            if timeout <= interval {
                return Err(format!(
                    "keep_alive_timeout ({timeout:?}) must be longer than keep_alive_interval ({interval:?})"
                ));
            }
        }
        crate::transport::check_extra_ca(&self.extra_ca_pem)?;
        if let Some(ua) = &self.user_agent {
            if !ua.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err("user_agent must be printable ASCII".into());
            }
        }
        self.proxy.validate()?;
        if !(1024..=MAX_INCOMING_MESSAGE).contains(&self.max_message_size) {
            return Err("max_message_size must be from 1024 bytes to 1 GiB".into());
        }
        if self.max_outgoing_message_size < 1024 {
            return Err("max_outgoing_message_size must be at least 1024 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_official_clients() {
        let o = ClientOptions::default();
        assert_eq!(o.protocol, Protocol::JsonReliable);
        assert!(o.auto_reconnect && o.auto_rejoin_groups);
        assert_eq!(o.message_retry.max_retries, Some(3));
        assert_eq!(o.message_retry.delay, Duration::from_secs(1));
        assert_eq!(o.message_retry.max_delay, Duration::from_secs(30));
        assert_eq!(o.message_retry.mode, RetryMode::Fixed);
        assert_eq!(o.reconnect_retry.max_retries, None);
        assert_eq!(o.reconnect_retry.delay, Duration::from_secs(1));
        assert_eq!(o.reconnect_retry.max_delay, Duration::from_secs(30));
        assert_eq!(o.reconnect_retry.mode, RetryMode::Fixed);
        assert_eq!(o.keep_alive_interval, Some(Duration::from_secs(20)));
        assert_eq!(o.keep_alive_timeout, Some(Duration::from_secs(120)));
        assert_eq!(o.ack_timeout, Duration::from_secs(30));
        assert_eq!(o.start_timeout, Duration::from_secs(30));
        assert_eq!(o.recovery_window, Duration::from_secs(30));
        assert_eq!(o.recovery_attempt_delay, Duration::from_secs(1));
        assert_eq!(o.sequence_ack_interval, Duration::from_secs(1));
        assert_eq!(o.sequence_ack_jump, 300);
        assert_eq!(o.max_message_size, 16 << 20);
        assert_eq!(o.max_outgoing_message_size, 1024 * 1024);
        assert!(o.extra_ca_pem.is_empty());
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            o.user_agent,
            Some(format!("webpubsub-client-rust/{version}"))
        );
        assert_eq!(o.proxy, ProxySetting::FromEnvironment);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn fixed_and_exponential_delays() {
        let fixed = RetryOptions::message_default();
        assert_eq!(fixed.delay_before(0), None);
        assert_eq!(fixed.delay_before(1), Some(Duration::from_secs(1)));
        assert_eq!(fixed.delay_before(3), Some(Duration::from_secs(1)));
        assert_eq!(fixed.delay_before(4), None);
        let exp = RetryOptions {
            mode: RetryMode::Exponential,
            max_retries: None,
            ..fixed
        };
        assert_eq!(exp.delay_before(1), Some(Duration::from_secs(1)));
        assert_eq!(exp.delay_before(2), Some(Duration::from_secs(2)));
        assert_eq!(exp.delay_before(5), Some(Duration::from_secs(16)));
        assert_eq!(exp.delay_before(6), Some(Duration::from_secs(30)));
        assert_eq!(exp.delay_before(100), Some(Duration::from_secs(30)));
    }

    #[test]
    fn zero_timers_are_rejected() {
        let o = ClientOptions {
            ack_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().contains("ack_timeout"));
        let o = ClientOptions {
            user_agent: Some("x\r\nInjected: 1".into()),
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().contains("user_agent"));
        let o = ClientOptions {
            keep_alive_interval: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }

    #[test]
    fn a_silence_timeout_within_the_ping_interval_is_rejected() {
        let o = ClientOptions {
            keep_alive_interval: Some(Duration::from_secs(20)),
            keep_alive_timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().contains("keep_alive_timeout"));
        let o = ClientOptions {
            keep_alive_timeout: Some(Duration::from_secs(21)),
            ..o
        };
        assert!(o.validate().is_ok());
        let o = ClientOptions {
            keep_alive_interval: None,
            ..o
        };
        assert!(o.validate().is_ok(), "no pings: any silence timeout");
    }

    #[test]
    fn an_incoming_message_limit_beyond_1_gib_is_rejected() {
        for (size, valid) in [
            (1023, false),
            (1024, true),
            (1 << 30, true),
            ((1 << 30) + 1, false),
            (usize::MAX, false),
        ] {
            let o = ClientOptions {
                max_message_size: size,
                ..Default::default()
            };
            assert_eq!(o.validate().is_ok(), valid, "{size}");
        }
    }
}
