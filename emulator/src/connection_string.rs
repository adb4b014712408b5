//! Service connection strings (`Endpoint=...;Port=...;AccessKey=...;Version=1.0;`), read
//! as the official server SDKs read them, to make client access URLs offline.

use std::str::FromStr;

use crate::{auth, TokenOptions};

/// The endpoint and access key a connection string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `http(s)://[userinfo@]host[:port][/path]`, lower-case, without a trailing slash.
    pub endpoint: String,
    /// The key signing tokens.
    pub access_key: String,
}

impl ConnectionString {
    /// A client access URL `ws(s)://host[:port]/client/hubs/{hub}?access_token=JWT`, as
    /// the server SDKs' `get_client_access_token` makes it: the token's audience is the
    /// same URL with the endpoint's `http(s)` scheme.
    pub fn client_url(&self, hub: &str, token: &TokenOptions) -> String {
        auth::client_url(&self.endpoint, hub, &self.access_key, token)
    }
}

impl FromStr for ConnectionString {
    type Err = String;

    /// `key=value` segments separated by `;`, keys without case, the first of a key
    /// winning, as `azure-messaging-webpubsubservice` reads them: `Endpoint` (`http://`
    /// or `https://`, without a query, which the URL's path cannot follow) and
    /// `AccessKey` are needed, other keys (`Version`) are ignored. `Port` replaces the
    /// endpoint's port, as `@azure/web-pubsub` does (the Python SDK appends it to the
    /// endpoint, a path included).
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut endpoint, mut port, mut access_key) = (None, None, None);
        for segment in s.trim().split(';').filter(|s| !s.is_empty()) {
            let Some((key, value)) = segment.split_once('=') else {
                return Err(format!("expected key=value, found '{segment}'"));
            };
            let field = match key.to_ascii_lowercase().as_str() {
                "endpoint" => &mut endpoint,
                "port" => &mut port,
                "accesskey" => &mut access_key,
                _ => continue,
            };
            field.get_or_insert(value);
        }
        let endpoint = endpoint.ok_or("no Endpoint")?.to_ascii_lowercase();
        let access_key = access_key.filter(|k| !k.is_empty()).ok_or("no AccessKey")?;
        let (scheme, rest) = endpoint
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .ok_or_else(|| format!("Endpoint '{endpoint}' is not an http:// or https:// URL"))?;
        if rest.contains(['?', '#']) {
            return Err(format!("Endpoint '{endpoint}' has a query or fragment"));
        }
        let rest = rest.trim_end_matches('/');
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        // The host and port follow a userinfo ('@'); an IPv6 host is bracketed: a ':'
        // inside the brackets is not a port's.
        let (userinfo, host_port) = authority.split_at(authority.rfind('@').map_or(0, |i| i + 1));
        let host = match host_port.rsplit_once(':') {
            Some((host, p)) if !p.contains(']') => host,
            _ => host_port,
        };
        if host.is_empty() || host.contains(':') && !host.starts_with('[') {
            return Err(format!(
                "Endpoint '{endpoint}' names no host (an IPv6 one is bracketed)"
            ));
        }
        let authority = match port {
            None => authority.to_owned(),
            Some(port) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("Port '{port}' is not a port number (1 to 65535)"))?;
                format!("{userinfo}{host}:{port}")
            }
        };
        Ok(ConnectionString {
            endpoint: format!("{scheme}://{authority}{path}"),
            access_key: access_key.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectionString;

    fn parse(s: &str) -> Result<(String, String), String> {
        s.parse::<ConnectionString>()
            .map(|c| (c.endpoint, c.access_key))
    }

    #[test]
    fn the_emulators_and_the_services_forms() {
        let ok = |endpoint: &str, key: &str| Ok((endpoint.to_owned(), key.to_owned()));
        assert_eq!(
            parse("Endpoint=http://127.0.0.1;Port=8080;AccessKey=k3y;Version=1.0;"),
            ok("http://127.0.0.1:8080", "k3y")
        );
        assert_eq!(
            parse("endpoint=HTTPS://Name.WebPubSub.Azure.com/;accesskey=a+b/c==;version=1.0\n"),
            ok("https://name.webpubsub.azure.com", "a+b/c==")
        );
        assert_eq!(
            parse("Endpoint=https://[::1]:1;Port=8443;AccessKey=k;AccessKey=other"),
            ok("https://[::1]:8443", "k")
        );
        assert_eq!(
            parse("Endpoint=http://localhost:8080;AccessKey=k"),
            ok("http://localhost:8080", "k")
        );
        assert_eq!(
            parse("Endpoint=http://[::1];AccessKey=k"),
            ok("http://[::1]", "k")
        );
    }

    /// `Port` replaces the port after the host, not a ':' of a userinfo before it (the
    /// URL named host 'u').
    #[test]
    fn the_port_follows_the_host_after_a_userinfo() {
        let ok = |endpoint: &str| Ok((endpoint.to_owned(), "k".to_owned()));
        assert_eq!(
            parse("Endpoint=http://u:p@h;Port=81;AccessKey=k"),
            ok("http://u:p@h:81")
        );
        assert_eq!(
            parse("Endpoint=http://u@h:90/api;Port=81;AccessKey=k"),
            ok("http://u@h:81/api")
        );
        assert_eq!(
            parse("Endpoint=http://u:p@[::1];Port=81;AccessKey=k"),
            ok("http://u:p@[::1]:81")
        );
    }

    #[test]
    fn what_is_refused_is_named() {
        for (s, expected) in [
            ("", "no Endpoint"),
            ("Endpoint=http://h", "no AccessKey"),
            ("Endpoint=http://h;AccessKey=", "no AccessKey"),
            ("Endpoint=http://h;AccessKey=k;oops", "'oops'"),
            ("Endpoint=ws://h;AccessKey=k", "http://"),
            ("Endpoint=h;AccessKey=k", "http://"),
            ("Endpoint=http://;AccessKey=k", "no host"),
            ("Endpoint=http://h;Port=0;AccessKey=k", "Port '0'"),
            ("Endpoint=http://h;Port=x;AccessKey=k", "Port 'x'"),
            ("Endpoint=http://h;Port=65536;AccessKey=k", "Port '65536'"),
            ("Endpoint=http://u@;AccessKey=k", "no host"),
            ("Endpoint=http://u@:81;AccessKey=k", "no host"),
            ("Endpoint=http://::1;Port=81;AccessKey=k", "no host"),
            ("Endpoint=http://fe80::1;AccessKey=k", "no host"),
            // The client URL's path cannot follow them.
            ("Endpoint=http://h?x=1;AccessKey=k", "query"),
            ("Endpoint=http://h/api#f;Port=81;AccessKey=k", "query"),
        ] {
            let err = parse(s).unwrap_err();
            assert!(err.contains(expected), "{s}: {err}");
        }
    }
}
