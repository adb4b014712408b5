//! Where the client URL comes from: a fixed string or a provider called before every
//! new connection (never for a recovery, which reuses the URL of the lost connection).

use super::Error;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::fmt;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::http::Uri;

/// A function returning a fresh client access URL (with its `access_token`).
pub type UrlProvider = Arc<dyn Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// The client access URL, fixed or provided anew for every new connection.
#[derive(Clone)]
pub enum Credential {
    /// A fixed `wss://…/client/hubs/{hub}?access_token=…` URL.
    Url(String),
    /// Called before every NEW connection (not for a recovery). May be slow. An error,
    /// a panic, or a URL that is not a ws/wss (or http/https) URL fails that connection
    /// attempt with `Error::Credential`. Its future runs on the library's runtime, which
    /// every client of the process shares: it must await, not block its thread (a
    /// blocking HTTP call, `std::thread::sleep`), which would hold back every client's
    /// acks and events meanwhile; run blocking work with `tokio::task::spawn_blocking`.
    Provider(UrlProvider),
}

impl Credential {
    /// A credential from an async function (e.g. one asking your server for a token).
    pub fn provider<F, Fut>(f: F) -> Credential
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Credential::Provider(Arc::new(move || Box::pin(f())))
    }

    /// Fetches the URL for a new connection and checks it.
    pub(crate) async fn client_url(&self) -> Result<String, Error> {
        let url = match self {
            Credential::Url(url) => url.clone(),
            Credential::Provider(provider) => {
                // A panicking provider fails this attempt, not the connection task.
                let asked = panic::catch_unwind(AssertUnwindSafe(|| provider()));
                let answer = match asked {
                    Ok(url) => AssertUnwindSafe(url).catch_unwind().await,
                    Err(payload) => Err(payload),
                };
                answer
                    .unwrap_or_else(|payload| {
                        Err(format!(
                            "the provider panicked: {}",
                            crate::runtime::panic_detail(payload.as_ref())
                        ))
                    })
                    .map_err(Error::Credential)?
            }
        };
        normalize_url(&url).map_err(|e| match self {
            Credential::Url(_) => Error::InvalidArgument(e),
            Credential::Provider(_) => Error::Credential(e),
        })
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Url(url) => f
                .debug_tuple("Url")
                .field(&crate::transport::redact_url(url))
                .finish(),
            Credential::Provider(_) => f.write_str("Provider(..)"),
        }
    }
}

/// The longest URL the WebSocket upgrade request can carry (the `http` crate's limit
/// on a request target).
pub(crate) const MAX_URL_LEN: usize = u16::MAX as usize - 1;

/// Accepts a valid `ws://` or `wss://` URL and their `http://`/`https://` spellings
/// (turned into the WebSocket schemes), without its fragment; anything else is an error
/// that never repeats the URL (it may hold a token).
pub(crate) fn normalize_url(url: &str) -> Result<String, String> {
    // A fragment is never sent, and the recovery parameters appended after one would
    // not be either: a recovery would open a new connection instead. Python's client
    // drops it too (Node's `ws` refuses it).
    let url = url.trim();
    let url = url.split_once('#').map_or(url, |(before, _)| before);
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("the client URL has no scheme (expected ws:// or wss://)")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err("the client URL scheme must be ws, wss, http or https".into()),
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() {
        return Err("the client URL has no host".into());
    }
    let url = format!("{scheme}://{rest}");
    if url.len() > MAX_URL_LEN {
        // Else refused below as "not a valid URL": a token naming many groups in its
        // roles or initial groups gets this long.
        return Err(format!(
            "the client URL is {} bytes long, over the {MAX_URL_LEN} bytes a request can carry (does its token name very many groups?)",
            url.len()
        ));
    }
    let uri: Uri = url
        .parse()
        .map_err(|_| "the client URL is not a valid URL")?;
    // `Uri` reads a port that is not a u16 as no port at all: the connection would go
    // to the scheme's default port instead.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let port = match host_port.strip_prefix('[') {
        Some(ipv6) => ipv6.split_once(']').and_then(|(_, p)| p.strip_prefix(':')),
        None => host_port.split_once(':').map(|(_, p)| p),
    };
    // Digits only: a u16 parse takes "+443" too. Port 0 reaches no server.
    let valid_port =
        |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0);
    if port.is_some_and(|p| !p.is_empty() && !valid_port(p)) {
        return Err("the client URL port must be a number from 1 to 65535".into());
    }
    // `ws://:443/` and `ws://user@/` have an authority but no host.
    if uri.host().is_none_or(str::is_empty) {
        return Err("the client URL has no host".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_normalized() {
        assert_eq!(
            normalize_url("https://h/client/hubs/x?access_token=t").unwrap(),
            "wss://h/client/hubs/x?access_token=t"
        );
        assert_eq!(normalize_url("http://h:8080/a").unwrap(), "ws://h:8080/a");
        assert_eq!(normalize_url("wss://h").unwrap(), "wss://h");
        assert!(normalize_url("ftp://h").is_err());
        assert!(normalize_url("no scheme").is_err());
        assert_eq!(normalize_url("ws://h:/a").unwrap(), "ws://h:/a");
        assert_eq!(normalize_url("ws://[::1]:80/a").unwrap(), "ws://[::1]:80/a");
        assert_eq!(normalize_url("ws://[::1]/a").unwrap(), "ws://[::1]/a");
        assert_eq!(normalize_url("ws://u:p@h:1/a").unwrap(), "ws://u:p@h:1/a");
        assert_eq!(
            normalize_url("https://u@h:443?t=x").unwrap(),
            "wss://u@h:443?t=x"
        );
        assert!(normalize_url("ws://[::1]:65536/a").is_err());
        assert_eq!(normalize_url("ws://h/a?t=x#f?y").unwrap(), "ws://h/a?t=x");
        assert!(normalize_url("ws://:80/a").is_err());
        for port in ["+80", "0", "00", "-1", "65536", "8o"] {
            let error = normalize_url(&format!("ws://h:{port}/a")).unwrap_err();
            assert!(error.contains("from 1 to 65535"), "{port}: {error}");
        }
        assert_eq!(normalize_url("ws://h:080/a").unwrap(), "ws://h:080/a");
        assert_eq!(normalize_url("ws://h:/a").unwrap(), "ws://h:/a");
        assert!(normalize_url("ws://u@/a").is_err());
        assert!(normalize_url("ws://?access_token=secret")
            .unwrap_err()
            .find("secret")
            .is_none());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = Credential::Url("wss://h/client/hubs/x?access_token=secret".into());
        assert!(!format!("{c:?}").contains("secret"));
    }
}
