//! HTTP proxies: which proxy a connection goes through (the client's setting or the
//! environment, as the official Python client reads it) and the `CONNECT` tunnel.

use base64::Engine;
use std::net::IpAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::client::Error;
use crate::transport::{describe_refusal, parse_response, read_response_head};

/// Where a client's connections go.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// The environment decides, as for the official Python client: `https_proxy` (or
    /// `HTTPS_PROXY`) for `wss://`, `http_proxy` (or `HTTP_PROXY`, except in a CGI
    /// program, where a request header sets it) for `ws://`, and `no_proxy` (or
    /// `NO_PROXY`) lists hosts reached directly. Loopback hosts are always reached
    /// directly. The default.
    #[default]
    FromEnvironment,
    /// Every connection is direct.
    Direct,
    /// Every connection goes through this HTTP proxy:
    /// `http://[user[:password]@]host[:port]` (port 80 by default).
    Url(String),
}

/// Shows a proxy URL without its user info (it may hold a password).
impl std::fmt::Debug for ProxySetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxySetting::FromEnvironment => f.write_str("FromEnvironment"),
            ProxySetting::Direct => f.write_str("Direct"),
            ProxySetting::Url(url) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let shown = match rest[..end].rsplit_once('@') {
                    Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[end..]),
                    None => url.clone(),
                };
                f.debug_tuple("Url").field(&shown).finish()
            }
        }
    }
}

/// The proxy one connection goes through.
#[derive(PartialEq, Eq)]
pub(crate) struct Proxy {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The `Proxy-Authorization` value (Basic), when the URL carries a user.
    authorization: Option<String>,
}

/// Shows the proxy without its credentials.
impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ProxySetting {
    /// Checks an explicit proxy URL; the environment's is checked at each connection.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            ProxySetting::Url(url) => Proxy::parse(url).map(drop),
            _ => Ok(()),
        }
    }

    /// The proxy for a connection to `host`:`port` (`tls` for `wss://`); `env` reads a
    /// variable of the environment.
    pub(crate) fn resolve(
        &self,
        host: &str,
        port: u16,
        tls: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, String> {
        match self {
            ProxySetting::Direct => Ok(None),
            ProxySetting::Url(url) => Proxy::parse(url).map(Some),
            ProxySetting::FromEnvironment => {
                // The lowercase name first, as the official Python client reads them.
                // In a CGI program (REQUEST_METHOD set), HTTP_PROXY comes from the
                // request's `Proxy:` header ("httpoxy"): ignored there, as Python's
                // urllib and Go do.
                let cgi = env("REQUEST_METHOD").is_some();
                let var = |name: &str| {
                    [name.to_owned(), name.to_ascii_uppercase()]
                        .into_iter()
                        .filter(|name| !(cgi && name == "HTTP_PROXY"))
                        .find_map(|name| env(&name).map(|value| (name, value)))
                        .filter(|(_, value)| !value.trim().is_empty())
                };
                let Some((name, url)) = var(if tls { "https_proxy" } else { "http_proxy" }) else {
                    return Ok(None);
                };
                if is_loopback(host)
                    || var("no_proxy").is_some_and(|(_, l)| bypasses(&l, host, port))
                {
                    return Ok(None);
                }
                Proxy::parse(&url)
                    .map(Some)
                    .map_err(|e| format!("{name}: {e}"))
            }
        }
    }
}

impl Proxy {
    /// Parses `http://[user[:password]@]host[:port][/]`; the scheme may be left out.
    fn parse(url: &str) -> Result<Proxy, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "the proxy scheme {scheme:?} is not supported (only http:// proxies)"
                ))
            }
            None => url,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => (Some(userinfo), host_port),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).ok_or_else(|| {
            let unbracketed_v6 = host_port.matches(':').count() > 1 && !host_port.starts_with('[');
            let hint = if unbracketed_v6 {
                " (an IPv6 address goes in brackets: http://[::1]:3128)"
            } else {
                ""
            };
            format!("the proxy URL has no valid host and port{hint}")
        })?;
        let authorization = userinfo.map(|userinfo| {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let credentials = [percent_decode(user), percent_decode(password)].join(&b':');
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            )
        });
        Ok(Proxy {
            host,
            port,
            authorization,
        })
    }

    /// Asks the proxy, over `tcp`, for a tunnel to `target` (`host:port`); on success
    /// `tcp` carries the target's bytes from the next one on.
    pub(crate) async fn tunnel(&self, tcp: &mut TcpStream, target: &str) -> Result<(), Error> {
        let authorization = self
            .authorization
            .as_deref()
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{authorization}\r\n");
        let proxy = format!("{}:{}", self.host, self.port);
        let io_error = |e: std::io::Error| Error::Connect(format!("proxy {proxy}: {e}"));
        tcp.write_all(request.as_bytes()).await.map_err(io_error)?;
        let mut buf = Vec::with_capacity(256);
        let during = format!("CONNECT through proxy {proxy}");
        let head_len = read_response_head(tcp, &mut buf, &during).await?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        parse_response(&mut response, &buf)
            .map_err(|e| Error::Connect(format!("{during}: malformed HTTP response: {e}")))?;
        if !response.code.is_some_and(|code| (200..300).contains(&code)) {
            let secrets: Vec<String> = self
                .authorization
                .iter()
                .filter_map(|a| a.strip_prefix("Basic ").map(str::to_owned))
                .collect();
            let refusal = describe_refusal(tcp, buf, &secrets).await;
            return Err(Error::Connect(format!(
                "proxy {proxy} refused CONNECT to {target}: {refusal}"
            )));
        }
        // Neither a TLS server nor a WebSocket server speaks first: nothing of the
        // target's can come before the client's first bytes.
        if head_len < buf.len() {
            return Err(Error::Connect(format!(
                "proxy {proxy} sent data after its CONNECT response"
            )));
        }
        Ok(())
    }
}

/// `host[:port]` or `[v6][:port]`, port 80 when absent; nothing else (an IPv6 address
/// without brackets, a port that is not decimal digits).
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            match after {
                "" => (host, None),
                after => (host, Some(after.strip_prefix(':')?)),
            }
        }
        None => match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        },
    };
    let port = match port {
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok().filter(|&p| p != 0)?,
        Some(_) => return None,
        None => 80,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// `%XX` escapes of a URL's part (a user, a password, a query value) decoded (others
/// kept as written): bytes, sent as they are, as curl does, whether or not they are UTF-8.
pub(crate) fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Whether `host` names this machine (a proxy would reach its own loopback instead).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `no_proxy` list (comma-separated: `*`; host names, with or without a
/// leading dot, each covering itself and its subdomains, as for curl and Python's
/// requests; IP addresses, IPv6 ones with or without brackets; and CIDR blocks) covers
/// `host`. An entry with a port (`host:8443`, `[v6]:8443`) covers that port only (the
/// URL's, or the scheme's default), as for Go.
fn bypasses(list: &str, host: &str, port: u16) -> bool {
    let ip = host.parse::<IpAddr>().ok();
    list.split(',').map(str::trim).any(|entry| {
        let (entry, entry_port) = split_entry_port(entry);
        if entry_port.is_some_and(|p| p != port) {
            return false;
        }
        if entry == "*" || entry.eq_ignore_ascii_case(host) {
            return true;
        }
        if let Some(ip) = ip {
            let entry = entry.replace(['[', ']'], "");
            return match entry.split_once('/') {
                Some((net, bits)) => in_block(ip, net, bits),
                None => entry.parse::<IpAddr>() == Ok(ip),
            };
        }
        // Bytes, not str slices: no char boundary to respect.
        let (host, domain) = (host.as_bytes(), entry.trim_start_matches('.').as_bytes());
        !domain.is_empty()
            && host.len() >= domain.len()
            && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
            && (host.len() == domain.len() || host[host.len() - domain.len() - 1] == b'.')
    })
}

/// A `no_proxy` entry and its port, if it has one: `host:port` or `[v6]:port`; an
/// unbracketed IPv6 address has no port.
fn split_entry_port(entry: &str) -> (&str, Option<u16>) {
    let split = match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            port.parse().ok().map(|port| (host, Some(port)))
        }
        _ => None,
    };
    split.unwrap_or((entry, None))
}

/// Whether `ip` lies in the block `net/bits`.
fn in_block(ip: IpAddr, net: &str, bits: &str) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= 128 || ((ip ^ net) >> shift) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_environment_picks_the_proxy_by_scheme_lowercase_first() {
        let vars = [
            ("https_proxy", "http://secure:3128"),
            ("HTTPS_PROXY", "http://ignored:1"),
            ("HTTP_PROXY", "plain:8080"),
        ];
        let from_env = ProxySetting::FromEnvironment;
        let secure = from_env
            .resolve("svc.example", 443, true, env(&vars))
            .unwrap();
        assert_eq!(
            secure.map(|p| (p.host, p.port)),
            Some(("secure".into(), 3128))
        );
        let plain = from_env
            .resolve("svc.example", 443, false, env(&vars))
            .unwrap();
        assert_eq!(
            plain.map(|p| (p.host, p.port)),
            Some(("plain".into(), 8080))
        );
        assert_eq!(
            from_env.resolve("svc.example", 443, true, env(&[])),
            Ok(None)
        );
        assert_eq!(
            from_env.resolve("svc.example", 443, true, env(&[("https_proxy", " ")])),
            Ok(None)
        );
        let bad = from_env.resolve("svc.example", 443, false, env(&[("HTTP_PROXY", "ftp://p")]));
        assert!(bad.unwrap_err().starts_with("HTTP_PROXY: the proxy scheme"));
    }

    #[test]
    fn no_proxy_and_loopback_go_direct() {
        let with = |no_proxy: &'static str| {
            move |host: &str| {
                let vars = [("https_proxy", "http://p:3128"), ("NO_PROXY", no_proxy)];
                ProxySetting::FromEnvironment
                    .resolve(host, 443, true, env(&vars))
                    .unwrap()
                    .is_none()
            }
        };
        assert!(with("")("127.0.0.1"));
        assert!(with("")("localhost"));
        assert!(with("")("::1"));
        assert!(!with("")("svc.example"));
        assert!(with("*")("svc.example"));
        assert!(with("other.test, example")("svc.example"));
        assert!(with(".example")("svc.example"));
        assert!(with("SVC.example")("svc.example"));
        assert!(!with("vc.example")("svc.example"));
        assert!(with("10.0.0.0/8")("10.1.2.3"));
        assert!(!with("10.0.0.0/8")("11.1.2.3"));
        assert!(with("fd00::/8")("fd12::1"));
        assert!(with("0.0.0.0/0")("8.8.8.8"));
        assert!(!with("10.0.0.0/99")("10.1.2.3"));
    }

    #[test]
    fn a_no_proxy_domain_with_a_leading_dot_covers_the_domain_itself() {
        // As curl and Python's requests read it (the comment on `bypasses` too).
        assert!(bypasses(".example.com", "example.com", 443));
        assert!(bypasses(".example.com", "svc.example.com", 443));
        assert!(bypasses("example.com", "example.com", 443));
        assert!(!bypasses(".example.com", "notexample.com", 443));
        assert!(
            !bypasses("x", "a\u{e9}", 443),
            "no panic on a non-ASCII host"
        );
    }

    #[test]
    fn no_proxy_ipv6_entries_match_bracketed_or_not_in_any_spelling() {
        for entry in ["fd00::1", "[fd00::1]", "FD00:0:0::1", "[fd00::]/16"] {
            assert!(bypasses(entry, "fd00::1", 443), "{entry}");
        }
        assert!(!bypasses("[fd00::2]", "fd00::1", 443));
    }

    #[test]
    fn a_no_proxy_entry_with_a_port_covers_that_port_only() {
        assert!(bypasses("svc.example:8443", "svc.example", 8443));
        assert!(!bypasses("svc.example:8443", "svc.example", 443));
        assert!(bypasses(".example:8443", "svc.example", 8443));
        assert!(bypasses("10.0.0.1:8443", "10.0.0.1", 8443));
        assert!(!bypasses("10.0.0.1:8443", "10.0.0.1", 443));
        assert!(bypasses("[fd00::1]:8443", "fd00::1", 8443));
        assert!(!bypasses("[fd00::1]:8443", "fd00::1", 443));
        assert!(
            bypasses("fd00::1", "fd00::1", 8443),
            "no port in a bare IPv6 address"
        );
    }

    #[test]
    fn http_proxy_in_capitals_is_ignored_in_a_cgi_environment() {
        // "httpoxy": a CGI server turns a request's `Proxy:` header into HTTP_PROXY.
        // Python's urllib and Go ignore it there; the lowercase name still counts.
        let cgi = [("REQUEST_METHOD", "GET"), ("HTTP_PROXY", "http://evil:1")];
        let from_env = ProxySetting::FromEnvironment;
        assert_eq!(
            from_env.resolve("svc.example", 443, false, env(&cgi)),
            Ok(None)
        );
        let cgi = [("REQUEST_METHOD", "GET"), ("http_proxy", "http://mine:2")];
        let proxy = from_env
            .resolve("svc.example", 443, false, env(&cgi))
            .unwrap();
        assert_eq!(proxy.map(|p| p.host), Some("mine".to_owned()));
        let cgi = [("REQUEST_METHOD", "GET"), ("HTTPS_PROXY", "http://mine:3")];
        let proxy = from_env
            .resolve("svc.example", 443, true, env(&cgi))
            .unwrap();
        assert_eq!(proxy.map(|p| p.host), Some("mine".to_owned()));
    }

    #[test]
    fn a_proxy_password_stays_out_of_debug_output() {
        let setting = ProxySetting::Url("http://me:s3cr%40t@proxy:3128".into());
        let shown = format!("{setting:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(shown.contains("proxy:3128"), "{shown}");
        let options = crate::ClientOptions {
            proxy: setting,
            ..Default::default()
        };
        assert!(!format!("{options:?}").contains("s3cr"));
        let proxy = Proxy::parse("http://me:s3cr%40t@proxy:3128").unwrap();
        assert!(!format!("{proxy:?}").contains(proxy.authorization.as_deref().unwrap()));
    }

    #[test]
    fn an_explicit_setting_ignores_the_environment() {
        let vars = [("https_proxy", "http://env:1")];
        assert_eq!(
            ProxySetting::Direct.resolve("h", 443, true, env(&vars)),
            Ok(None)
        );
        let url = ProxySetting::Url("http://me:3128".into());
        let proxy = url
            .resolve("127.0.0.1", 443, true, env(&vars))
            .unwrap()
            .unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("me", 3128));
    }

    #[test]
    fn proxy_urls_parse_with_credentials_and_defaults() {
        let p = Proxy::parse("http://us%3Aer:p%40ss@[::1]:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 8080));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(p.authorization.unwrap().trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(decoded, b"us:er:p@ss");
        let p = Proxy::parse("http://me:p%FFss@proxy").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(p.authorization.unwrap().trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(
            decoded, b"me:p\xffss",
            "bytes sent as they are, not made UTF-8"
        );
        let p = Proxy::parse("HTTP://proxy").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.authorization),
            ("proxy", 80, None)
        );
        for bad in [
            "socks5://p:1080",
            "https://p:443",
            "http://",
            "http://p:0",
            "p:x",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_proxy_url_with_junk_after_its_host_or_an_ipv6_address_without_brackets_is_refused() {
        let p = Proxy::parse("http://[::1]").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 80));
        for bad in [
            "http://[::1]x",
            "http://[::1]x:3128",
            "http://p:+80",
            "http://p:80:90",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
        for bad in ["http://fe80::1", "http://::1:3128"] {
            let error = Proxy::parse(bad).unwrap_err();
            assert!(
                error.ends_with("(an IPv6 address goes in brackets: http://[::1]:3128)"),
                "{bad}: {error}"
            );
        }
    }
}
