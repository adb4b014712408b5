//! JWT (HS256) signing and verification, audience matching and role checks.
//!
//! Tokens are signed with the access key exactly as the official server SDKs do, so a
//! token made by `azure-messaging-webpubsubservice` or `@azure/web-pubsub` from the
//! emulator's connection string is accepted, and a token made here is accepted by them.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use crate::TokenOptions;

type HmacSha256 = Hmac<Sha256>;

/// Claim holding the groups a client token joins at connect.
pub const GROUP_CLAIM: &str = "webpubsub.group";
/// Claim holding the roles of a client token.
pub const ROLE_CLAIM: &str = "role";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the query nor in the `Authorization` header.
    Missing,
    /// Not three base64url parts of JSON, or not HS256.
    Malformed(String),
    /// The signature does not match the access key.
    BadSignature,
    /// `exp` is in the past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `aud` does not name this endpoint.
    WrongAudience(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => write!(f, "no access token in the request"),
            AuthError::Malformed(m) => write!(f, "malformed access token: {m}"),
            AuthError::BadSignature => write!(f, "invalid access token signature"),
            AuthError::Expired => write!(f, "the access token has expired"),
            AuthError::NotYetValid => write!(f, "the access token is not valid yet (nbf)"),
            AuthError::WrongAudience(a) => {
                write!(f, "the access token audience '{a}' does not match")
            }
        }
    }
}

impl std::error::Error for AuthError {}

/// The verified claims the emulator uses.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// Audiences (`aud`, a string or an array).
    pub audiences: Vec<String>,
    /// User id (`sub`).
    pub user_id: Option<String>,
    /// Roles (`role`).
    pub roles: Vec<String>,
    /// Groups joined at connect (`webpubsub.group`).
    pub groups: Vec<String>,
    /// Every claim of the token, as signed (the upstream's `connect` event gets them).
    pub payload: Map<String, Value>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs any JSON claims object with HS256.
pub fn sign(access_key: &str, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(access_key.as_bytes()).expect("HMAC takes any key");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Signs a client token for `audience` (the client URL without query) with the given
/// user id, roles, groups and lifetime (default one hour).
pub fn sign_client_token(access_key: &str, audience: &str, opts: &TokenOptions) -> String {
    let now = now_secs();
    let ttl = opts.ttl.unwrap_or(Duration::from_secs(3600)).as_secs();
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(audience));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl));
    if let Some(user) = &opts.user_id {
        claims.insert("sub".into(), json!(user));
    }
    if !opts.roles.is_empty() {
        claims.insert(ROLE_CLAIM.into(), json!(opts.roles));
    }
    if !opts.groups.is_empty() {
        claims.insert(GROUP_CLAIM.into(), json!(opts.groups));
    }
    sign(access_key, &Value::Object(claims))
}

/// What a URL path segment may hold as it is (RFC 3986 `pchar`): the rest of a hub
/// name is percent-encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// A client access URL `ws(s)://host[:port]/client/hubs/{hub}?access_token=JWT` for
/// `endpoint` (`http(s)://host[:port]`), as the official server SDKs make it: the
/// token's audience is the same URL with the endpoint's scheme. The URL has the hub
/// percent-encoded where a path may not hold it as it is ('`', '[', ']'); the audience
/// has it as the SDKs sign it, unencoded.
pub(crate) fn client_url(
    endpoint: &str,
    hub: &str,
    access_key: &str,
    opts: &TokenOptions,
) -> String {
    let jwt = sign_client_token(access_key, &format!("{endpoint}/client/hubs/{hub}"), opts);
    let hub = utf8_percent_encode(hub, PATH_SEGMENT);
    let url = format!("{endpoint}/client/hubs/{hub}?access_token={jwt}");
    url.replacen("http", "ws", 1)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Verifies the signature (and `exp`/`nbf` when `check_time`), returning the claims.
/// The audience is checked separately with [`audience_matches`].
pub fn verify(access_key: &str, token: &str, check_time: bool) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header: Value = decode_part(h)?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(AuthError::Malformed("only HS256 is supported".into()));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("signature: {e}")))?;
    let mut mac = HmacSha256::new_from_slice(access_key.as_bytes()).expect("HMAC takes any key");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| AuthError::BadSignature)?;
    let payload = match decode_part(p)? {
        Value::Object(claims) => claims,
        _ => Map::new(),
    };
    if check_time {
        let now = now_secs();
        if let Some(exp) = payload.get("exp").and_then(Value::as_f64) {
            if exp <= now as f64 {
                return Err(AuthError::Expired);
            }
        }
        if let Some(nbf) = payload.get("nbf").and_then(Value::as_f64) {
            // A little slack for clock differences between the token maker and us.
            if nbf > (now + 300) as f64 {
                return Err(AuthError::NotYetValid);
            }
        }
    }
    Ok(Claims {
        audiences: strings(payload.get("aud")),
        user_id: payload
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned),
        roles: strings(payload.get(ROLE_CLAIM)),
        groups: strings(payload.get(GROUP_CLAIM)),
        payload,
    })
}

fn decode_part(part: &str) -> Result<Value, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("base64: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| AuthError::Malformed(format!("json: {e}")))
}

/// Is `host` one this server answers to: a loopback name, or the configured host? An IP
/// address is compared as an address, however spelled, with or without brackets (an
/// IPv4-mapped IPv6 address as its IPv4 one).
fn host_ok(host: &str, configured_host: &str) -> bool {
    fn unbracketed(h: &str) -> &str {
        h.trim_start_matches('[').trim_end_matches(']')
    }
    let same = |a: &str, b: &str| {
        let (a, b) = (unbracketed(a), unbracketed(b));
        match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
            _ => a.eq_ignore_ascii_case(b),
        }
    };
    ["localhost", "127.0.0.1", "::1", "0.0.0.0", configured_host]
        .into_iter()
        .any(|known| same(host, known))
}

/// Does the audience URL `aud` name `path` (the request's path as sent, still
/// percent-encoded) on this server? Scheme (http/https/ws/wss), loopback host variants,
/// a missing port, the query and a trailing slash are tolerated; the paths are compared
/// segment by segment, each percent-decoded (the SDKs sign the URL as sent, and may
/// encode a name otherwise than the request), without case. An encoded '/' stays
/// inside its segment: a token for group 'a/connections/c' is not one for connection
/// 'c' of group 'a'.
pub fn audience_matches(aud: &str, path: &str, configured_host: &str, port: u16) -> bool {
    let Some((scheme, rest)) = aud.split_once("://") else {
        return false;
    };
    if !matches!(
        scheme.to_ascii_lowercase().as_str(),
        "http" | "https" | "ws" | "wss"
    ) {
        return false;
    }
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, aud_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, aud_port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    if !host_ok(host, configured_host) {
        return false;
    }
    if let Some(p) = aud_port {
        if p.parse::<u16>() != Ok(port) {
            return false;
        }
    }
    let segments = |path: &str| {
        path.trim_end_matches('/')
            .split('/')
            .map(|s| percent_decode_str(s).collect::<Vec<u8>>())
            .collect::<Vec<_>>()
    };
    let (aud_path, path) = (segments(aud_path), segments(path));
    aud_path.len() == path.len()
        && aud_path
            .iter()
            .zip(&path)
            .all(|(a, b)| a.eq_ignore_ascii_case(b))
}

/// The two client permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// `webpubsub.joinLeaveGroup[.group]` / REST `joinLeaveGroup`.
    JoinLeaveGroup,
    /// `webpubsub.sendToGroup[.group]` / REST `sendToGroup`.
    SendToGroup,
}

impl Permission {
    /// Parses the REST route name (`joinLeaveGroup`, `sendToGroup`), without case as
    /// the service binds it.
    pub fn from_rest_name(name: &str) -> Option<Permission> {
        if name.eq_ignore_ascii_case("joinLeaveGroup") {
            Some(Permission::JoinLeaveGroup)
        } else if name.eq_ignore_ascii_case("sendToGroup") {
            Some(Permission::SendToGroup)
        } else {
            None
        }
    }

    fn role_names(self) -> (&'static str, &'static str) {
        match self {
            Permission::JoinLeaveGroup => ("webpubsub.joinLeaveGroup", "webpubsub.joinLeaveGroups"),
            Permission::SendToGroup => ("webpubsub.sendToGroup", "webpubsub.sendToGroups"),
        }
    }
}

/// Does one role grant `perm` on `group`? Exact roles (`webpubsub.sendToGroup`,
/// `webpubsub.sendToGroup.{group}`) and the wildcard forms
/// (`webpubsub.sendToGroups.{pattern}`: `*` within a dot segment, `**` across, `?` one char).
pub fn role_grants(role: &str, perm: Permission, group: &str) -> bool {
    let (single, plural) = perm.role_names();
    if role == single {
        return true;
    }
    if let Some(g) = role.strip_prefix(single).and_then(|r| r.strip_prefix('.')) {
        return g == group;
    }
    if let Some(pattern) = role.strip_prefix(plural).and_then(|r| r.strip_prefix('.')) {
        return wildcard_match(pattern.as_bytes(), group.as_bytes());
    }
    false
}

/// Glob matching with `*` (any run without '.'), `**` (any run) and `?` (one char).
/// Iterative with memoisation bounded by the input sizes, so no pattern can blow up.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    // dp[j] = pattern[..i] matches text[..j]
    let mut dp = vec![false; text.len() + 1];
    dp[0] = true;
    let mut i = 0;
    while i < pattern.len() {
        let mut next = vec![false; text.len() + 1];
        if pattern[i] == b'*' {
            let double = pattern.get(i + 1) == Some(&b'*');
            for j in 0..=text.len() {
                next[j] = dp[j] || (j > 0 && next[j - 1] && (double || text[j - 1] != b'.'));
            }
            i += if double { 2 } else { 1 };
        } else {
            for j in 1..=text.len() {
                next[j] = dp[j - 1] && (pattern[i] == b'?' || pattern[i] == text[j - 1]);
            }
            i += 1;
        }
        dp = next;
    }
    dp[text.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_round_trips() {
        let opts = TokenOptions {
            user_id: Some("u1".into()),
            roles: vec!["webpubsub.joinLeaveGroup".into()],
            groups: vec!["g".into()],
            ttl: None,
        };
        let t = sign_client_token("k", "http://127.0.0.1:1/client/hubs/h", &opts);
        let c = verify("k", &t, true).unwrap();
        assert_eq!(c.user_id.as_deref(), Some("u1"));
        assert_eq!(c.roles, vec!["webpubsub.joinLeaveGroup"]);
        assert_eq!(c.groups, vec!["g"]);
        assert_eq!(
            verify("other", &t, true).unwrap_err(),
            AuthError::BadSignature
        );
        assert!(matches!(
            verify("k", "a.b", true),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn expired_is_refused_only_when_time_is_checked() {
        let claims = json!({"aud": "x", "exp": 1});
        let t = sign("k", &claims);
        assert_eq!(verify("k", &t, true).unwrap_err(), AuthError::Expired);
        assert!(verify("k", &t, false).is_ok());
    }

    #[test]
    fn audience_variants() {
        let p = "/client/hubs/chat";
        assert!(audience_matches(
            "http://127.0.0.1:80/client/hubs/chat",
            p,
            "127.0.0.1",
            80
        ));
        assert!(audience_matches(
            "ws://localhost:80/client/hubs/Chat/",
            p,
            "127.0.0.1",
            80
        ));
        assert!(audience_matches(
            "https://localhost/client/hubs/chat?x=1",
            p,
            "127.0.0.1",
            80
        ));
        assert!(!audience_matches(
            "http://127.0.0.1:81/client/hubs/chat",
            p,
            "127.0.0.1",
            80
        ));
        assert!(!audience_matches(
            "http://example.com/client/hubs/chat",
            p,
            "127.0.0.1",
            80
        ));
        assert!(!audience_matches(
            "http://127.0.0.1:80/client/hubs/other",
            p,
            "127.0.0.1",
            80
        ));
        assert!(!audience_matches("not a url", p, "127.0.0.1", 80));
        assert!(audience_matches(
            "http://127.0.0.1:80/api/hubs/h/groups/a%20b%2Fc",
            "/api/hubs/h/groups/a%20b%2fc",
            "127.0.0.1",
            80
        ));
        assert!(audience_matches(
            "http://127.0.0.1:80/api/hubs/h/groups/%C3%A9",
            "/api/hubs/h/groups/\u{e9}",
            "127.0.0.1",
            80
        ));
        for (aud, path) in [
            ("/api/hubs/h/groups/a%2Fb", "/api/hubs/h/groups/a/b"),
            ("/api/hubs/h/groups/a/b", "/api/hubs/h/groups/a%2Fb"),
            ("/api/hubs/h/groups/a%2F..%2F..%2Fx", "/api/hubs/h/groups/x"),
        ] {
            let aud = format!("http://127.0.0.1:80{aud}");
            assert!(
                !audience_matches(&aud, path, "127.0.0.1", 80),
                "{aud} {path}"
            );
        }
    }

    /// An IP address is the same host however it is spelled, with or without brackets,
    /// and an IPv4 address as its IPv4-mapped IPv6 form.
    #[test]
    fn an_ip_host_matches_in_any_spelling() {
        let p = "/client/hubs/chat";
        for (aud_host, configured) in [
            ("[fd00::2]", "fd00::2"),
            ("[fd00::2]", "[fd00::2]"),
            ("[FD00:0:0::2]", "fd00::2"),
            ("[::1]", "0:0:0:0:0:0:0:1"),
            ("10.0.0.2", "10.0.0.2"),
            ("[::ffff:10.0.0.2]", "10.0.0.2"),
            ("10.0.0.2", "::ffff:10.0.0.2"),
            ("[::ffff:127.0.0.1]", "example.com"),
            ("example.com", "Example.com"),
        ] {
            let aud = format!("ws://{aud_host}:80{p}");
            assert!(
                audience_matches(&aud, p, configured, 80),
                "{aud} {configured}"
            );
        }
        for (aud_host, configured) in [("[fd00::3]", "fd00::2"), ("10.0.0.3", "10.0.0.2")] {
            let aud = format!("ws://{aud_host}:80{p}");
            assert!(
                !audience_matches(&aud, p, configured, 80),
                "{aud} {configured}"
            );
        }
    }

    #[test]
    fn roles_and_wildcards() {
        use Permission::*;
        assert!(role_grants("webpubsub.sendToGroup", SendToGroup, "a"));
        assert!(role_grants("webpubsub.sendToGroup.a", SendToGroup, "a"));
        assert!(!role_grants("webpubsub.sendToGroup.a", SendToGroup, "b"));
        assert!(!role_grants("webpubsub.sendToGroup", JoinLeaveGroup, "a"));
        assert!(role_grants(
            "webpubsub.joinLeaveGroups.room*",
            JoinLeaveGroup,
            "room1"
        ));
        assert!(!role_grants(
            "webpubsub.joinLeaveGroups.room*",
            JoinLeaveGroup,
            "room.1"
        ));
        assert!(role_grants(
            "webpubsub.joinLeaveGroups.room**",
            JoinLeaveGroup,
            "room.1"
        ));
        assert!(role_grants("webpubsub.sendToGroups.r?", SendToGroup, "r1"));
        assert!(!role_grants(
            "webpubsub.sendToGroups.r?",
            SendToGroup,
            "r12"
        ));
    }
}
