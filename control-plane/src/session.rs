//! Web console sessions: a signed cookie that stands for the admin key, so the key itself is
//! typed once and never kept by the page.
//!
//! Stateless, so every replica accepts a session any of them opened: the token carries its
//! expiry and a random nonce, and a MAC under a key derived from the admin key's stored hash.
//! Replacing the admin key therefore ends every session opened with the old one. The page
//! gets a CSRF token (a second MAC over the nonce) in the sign-in answer and keeps it in
//! memory only; requests that change something must carry it in [`CSRF_HEADER`], which a
//! cross-site form or script cannot set. The cookie is `HttpOnly; Secure; SameSite=Strict`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::auth::AdminKeys;

/// The cookie's name.
pub const COOKIE: &str = "edgeplane_session";
/// The header that carries the CSRF token on requests that change something.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from sign-in.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// The cookie's path: the console's API calls and its WebSocket; the page's own files need
/// none.
pub const COOKIE_PATH: &str = "/api";
/// How far ahead of this replica's clock another's may have signed a session.
const CLOCK_SLACK: Duration = Duration::from_secs(60);
/// A token longer than this is not one of ours (read before any parsing).
const MAX_TOKEN: usize = 160;

type HmacSha256 = Hmac<Sha256>;

/// An open session, as the page sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The cookie's value.
    pub token: String,
    /// What [`CSRF_HEADER`] must carry.
    pub csrf: String,
    /// Milliseconds since the epoch.
    pub expires_ms: u64,
}

/// Why a request's credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing X-API-Key header or session cookie")]
    Missing,
    #[error("invalid API key")]
    InvalidKey,
    #[error(
        "the session is not valid (expired, signed out, or the admin key changed): sign in again"
    )]
    InvalidSession,
    #[error(
        "missing or wrong X-CSRF-Token header: a signed-in page sends the token it got at sign-in"
    )]
    Csrf,
    /// A session cookie where only the key will do (a Docker hijack on the proxy: the
    /// console's shell has its own route, which checks where the page came from).
    #[error("this route takes the X-API-Key header only (the console's shell uses /api/endpoints/{{id}}/exec/{{execId}}/ws)")]
    KeyRequired,
}

impl Refused {
    /// `true`: 403 (authenticated, but the request may not have been the page's); `false`: 401.
    pub fn forbidden(self) -> bool {
        matches!(self, Self::Csrf)
    }
}

/// What a request presents, read from its headers by whichever server took it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    pub api_key: Option<&'a str>,
    /// Every `Cookie` header's value.
    pub cookies: &'a [&'a str],
    pub csrf: Option<&'a str>,
    /// `GET`, `HEAD` or `OPTIONS`: nothing changes, no CSRF token needed.
    pub safe_method: bool,
}

impl<'a> Credentials<'a> {
    /// What a request presents, from its headers (`header` gives a header's value as text,
    /// `""` where it is not; `cookies` every `Cookie` header) and its method: the one reading
    /// both servers share.
    pub fn read(
        header: impl Fn(&str) -> Option<&'a str>,
        cookies: &'a [&'a str],
        method: &str,
    ) -> Self {
        Self {
            api_key: header(crate::auth::HEADER),
            cookies,
            csrf: header(CSRF_HEADER),
            safe_method: matches!(method, "GET" | "HEAD" | "OPTIONS"),
        }
    }

    /// Whether the request carries the key (a program) rather than only a cookie (a browser).
    pub fn has_key(&self) -> bool {
        self.api_key.is_some()
    }
}

impl AdminKeys {
    /// Opens a session for a valid admin key; `None` for any other.
    pub fn open_session(&self, key: &str, now_ms: u64) -> Option<Session> {
        if !self.accepts(key) {
            return None;
        }
        let pepper = self.session_pepper();
        let secret = session_secret(&pepper, &Self::hash(key));
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let expires_ms = now_ms + TTL.as_millis() as u64;
        let body = format!("v1.{expires_ms}.{}", hex::encode(nonce));
        let mac = hex::encode(mac(&secret, body.as_bytes()));
        Some(Session {
            csrf: csrf_of(&secret, &body),
            token: format!("{body}.{mac}"),
            expires_ms,
        })
    }

    /// The session a cookie value stands for, if its MAC is valid under a current admin key
    /// and it has not expired. Constant-time over every stored key.
    pub fn session(&self, token: &str, now_ms: u64) -> Option<Session> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let (body, mac_hex) = token.rsplit_once('.')?;
        let mut parts = body.split('.');
        let (Some("v1"), Some(expires), Some(nonce), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let expires_ms: u64 = expires.parse().ok()?;
        // A replica whose clock is behind the one that signed may see a fresh token's expiry
        // a little further than the lifetime.
        let latest = now_ms + (TTL + CLOCK_SLACK).as_millis() as u64;
        if expires_ms <= now_ms || expires_ms > latest || nonce.len() != 32 {
            return None;
        }
        let given = hex::decode(mac_hex).ok()?;
        let pepper = self.session_pepper();
        let mut found = None;
        for stored in self.hashes() {
            let secret = session_secret(&pepper, &stored);
            let ok = bool::from(mac(&secret, body.as_bytes()).ct_eq(given.as_slice()));
            if ok {
                found = Some(secret);
            }
        }
        let secret = found?;
        Some(Session {
            token: token.to_owned(),
            csrf: csrf_of(&secret, body),
            expires_ms,
        })
    }

    /// Checks a request's credentials: the admin key header, or else the session cookie (and,
    /// for a method that changes something, its CSRF token).
    pub fn authorize(&self, c: &Credentials<'_>, now_ms: u64) -> Result<(), Refused> {
        if let Some(key) = c.api_key {
            return if self.accepts(key) {
                Ok(())
            } else {
                Err(Refused::InvalidKey)
            };
        }
        // Every cookie of that name is tried: a second one set for a narrower path (which the
        // browser sends first) must not hide the real one.
        let mut tokens = cookies(c.cookies, COOKIE).peekable();
        if tokens.peek().is_none() {
            return Err(Refused::Missing);
        }
        let session = tokens
            .find_map(|t| self.session(t, now_ms))
            .ok_or(Refused::InvalidSession)?;
        if c.safe_method {
            return Ok(());
        }
        match c.csrf {
            Some(t) if bool::from(t.as_bytes().ct_eq(session.csrf.as_bytes())) => Ok(()),
            _ => Err(Refused::Csrf),
        }
    }
}

/// The `Set-Cookie` value that stores `s` in the browser.
pub fn set_cookie(s: &Session, now_ms: u64) -> String {
    let max_age = s.expires_ms.saturating_sub(now_ms) / 1000;
    format!(
        "{COOKIE}={}; Path={COOKIE_PATH}; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict",
        s.token
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// The values of cookie `name` among `Cookie` header values (`a=1; b=2`), in order.
pub fn cookies<'a, 'b>(
    headers: &'b [&'a str],
    name: &'b str,
) -> impl Iterator<Item = &'a str> + 'b {
    headers
        .iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The first value of cookie `name`.
pub fn cookie<'a>(headers: &[&'a str], name: &str) -> Option<&'a str> {
    cookies(headers, name).next()
}

fn session_secret(pepper: &[u8; 32], key_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"edgeplane console session\0");
    h.update(pepper);
    h.update(key_hash);
    h.finalize().into()
}

fn mac(secret: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    // A 32-byte key is valid for HMAC.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn csrf_of(secret: &[u8; 32], body: &str) -> String {
    hex::encode(&mac(secret, format!("csrf.{body}").as_bytes())[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn keys() -> AdminKeys {
        let k = AdminKeys::default();
        k.replace(vec![AdminKeys::hash("right")]);
        k
    }

    #[test]
    fn a_session_stands_for_the_key_until_it_expires_or_the_key_changes() {
        let keys = keys();
        assert!(keys.open_session("wrong", NOW).is_none());
        let s = keys.open_session("right", NOW).expect("session");
        assert_eq!(keys.session(&s.token, NOW + 1000), Some(s.clone()));
        let ttl = TTL.as_millis() as u64;
        assert!(keys.session(&s.token, NOW + ttl).is_none(), "expired");
        keys.replace(vec![AdminKeys::hash("other")]);
        assert!(keys.session(&s.token, NOW).is_none(), "key replaced");
    }

    #[test]
    fn the_stored_hash_alone_cannot_sign_a_session() {
        // Two replicas with the same keys and the same pepper (the API's TLS key) accept each
        // other's sessions; one that knows only the store's hashes does not.
        let a = keys();
        a.set_session_pepper(b"tls private key");
        let b = keys();
        b.set_session_pepper(b"tls private key");
        let s = a.open_session("right", NOW).expect("session");
        assert!(b.session(&s.token, NOW).is_some(), "another replica");
        let outsider = keys();
        outsider.set_session_pepper(b"");
        let forged = outsider.open_session("right", NOW).expect("session");
        assert!(
            a.session(&forged.token, NOW).is_none(),
            "without the pepper"
        );
    }

    #[test]
    fn a_planted_cookie_does_not_hide_the_session() {
        let keys = keys();
        let s = keys.open_session("right", NOW).expect("session");
        let header = format!("{COOKIE}=junk; {COOKIE}={}", s.token);
        let cookies = [header.as_str()];
        let c = Credentials {
            cookies: &cookies,
            safe_method: true,
            ..Default::default()
        };
        assert_eq!(keys.authorize(&c, NOW), Ok(()));
    }

    #[test]
    fn a_forged_or_altered_token_is_refused() {
        let keys = keys();
        let s = keys.open_session("right", NOW).expect("session");
        let (body, mac) = s.token.rsplit_once('.').expect("mac");
        // A later expiry with the old MAC.
        let later = body.replacen(
            &s.expires_ms.to_string(),
            &(s.expires_ms + 1).to_string(),
            1,
        );
        assert!(keys.session(&format!("{later}.{mac}"), NOW).is_none());
        // Far in the future, even if it were signed: refused before any MAC.
        let far = format!(
            "v1.{}.{}.{mac}",
            NOW + 10 * TTL.as_millis() as u64,
            "0".repeat(32)
        );
        assert!(keys.session(&far, NOW).is_none());
        for junk in [
            "",
            ".",
            "v1",
            "v1...",
            &"a".repeat(1000),
            "v1.x.y.z",
            "v2.1.2.3",
        ] {
            assert!(keys.session(junk, NOW).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn changing_requests_need_the_csrf_token_reading_ones_do_not() {
        let keys = keys();
        let s = keys.open_session("right", NOW).expect("session");
        let header = format!("theme=dark; {COOKIE}={}", s.token);
        let cookies = [header.as_str()];
        let mut c = Credentials {
            cookies: &cookies,
            safe_method: true,
            ..Default::default()
        };
        assert_eq!(keys.authorize(&c, NOW), Ok(()));
        c.safe_method = false;
        assert_eq!(keys.authorize(&c, NOW), Err(Refused::Csrf));
        c.csrf = Some("0123");
        assert_eq!(keys.authorize(&c, NOW), Err(Refused::Csrf));
        c.csrf = Some(&s.csrf);
        assert_eq!(keys.authorize(&c, NOW), Ok(()));
        // The key header wins and needs no CSRF token (it is not sent by browsers on their own).
        let key = Credentials {
            api_key: Some("right"),
            ..Default::default()
        };
        assert_eq!(keys.authorize(&key, NOW), Ok(()));
        let bad = Credentials {
            api_key: Some("wrong"),
            cookies: &cookies,
            ..Default::default()
        };
        assert_eq!(keys.authorize(&bad, NOW), Err(Refused::InvalidKey));
        assert_eq!(
            keys.authorize(&Credentials::default(), NOW),
            Err(Refused::Missing)
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        assert_eq!(cookie(&["a=1; b=2", "c=3"], "b"), Some("2"));
        assert_eq!(cookie(&["a=1; b=2", "c=3"], "c"), Some("3"));
        assert_eq!(cookie(&["ab=1"], "a"), None);
        assert_eq!(cookie(&[], "a"), None);
    }
}
