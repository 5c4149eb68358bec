//! HTTP basic authentication for a route (Traefik's `basicauth` middleware): users as
//! `htpasswd` writes them, bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5 (`$apr1$`) or SHA-1
//! (`{SHA}`), checked against each request's `Authorization: Basic`.
//!
//! bcrypt is slow on purpose (a few ms to hundreds at common costs): checking it on every
//! request would make a protected route cost that much CPU per request. Credentials that
//! verified are remembered as a SHA-256 digest of `user:password` and the stored hash (never
//! the password), at most `REMEMBERED` of them, for `REMEMBER_FOR`; a wrong password is
//! never remembered, so guessing still pays the full hash each time. The trade-off: someone
//! who reads the agent's memory could test guesses against those digests at SHA-256 speed
//! rather than bcrypt's, for credentials used in the last few minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::BasicAuth;
use base64::Engine as _;

/// Verified credentials remembered at most.
const REMEMBERED: usize = 4096;
/// How long a verified credential is remembered.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
enum Kind {
    Bcrypt,
    Apr1,
    Sha1,
}

impl Kind {
    fn of(hash: &str) -> Option<Self> {
        if hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$") {
            Some(Self::Bcrypt)
        } else if hash.starts_with("$apr1$") {
            Some(Self::Apr1)
        } else if hash.starts_with("{SHA}") {
            Some(Self::Sha1)
        } else {
            None
        }
    }
}

/// A route's checker: its users by name, and the credentials it verified lately (its realm
/// and header choice stay in the route's `BasicAuth`).
pub struct Checker {
    users: HashMap<String, String>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Checker {
    #[must_use]
    pub fn new(auth: &BasicAuth) -> Self {
        let users = auth
            .users
            .iter()
            .filter_map(|e| e.split_once(':'))
            .map(|(u, h)| (u.to_owned(), h.trim().to_owned()))
            .collect();
        Self { users, verified: Mutex::default() }
    }

    /// Whether `authorization` (the header's value) names a user with the right password.
    /// The hash is checked on the blocking pool (bcrypt takes milliseconds).
    pub async fn allows(self: &std::sync::Arc<Self>, authorization: Option<&[u8]>) -> bool {
        let Some(encoded) = authorization.and_then(|v| v.strip_prefix(b"Basic ")) else { return false };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else { return false };
        let Some(hash) = std::str::from_utf8(&decoded[..colon]).ok().and_then(|u| self.users.get(u)) else {
            return false;
        };
        let key = digest(&decoded, hash);
        let now = Instant::now();
        if let Some(at) = self.verified.lock().expect("auth cache lock").get(&key) {
            if now.duration_since(*at) < REMEMBER_FOR {
                return true;
            }
        }
        let (password, hash) = (decoded[colon + 1..].to_vec(), hash.clone());
        let right = tokio::task::spawn_blocking(move || verify(&password, &hash)).await.unwrap_or(false);
        if right {
            let mut verified = self.verified.lock().expect("auth cache lock");
            if verified.len() >= REMEMBERED {
                verified.retain(|_, at| now.duration_since(*at) < REMEMBER_FOR);
                if verified.len() >= REMEMBERED {
                    verified.clear();
                }
            }
            verified.insert(key, now);
        }
        right
    }
}

fn digest(credentials: &[u8], hash: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(credentials);
    ctx.update(b"\0");
    ctx.update(hash.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `password` against one stored hash (constant-time comparisons where the hash is ours).
fn verify(password: &[u8], hash: &str) -> bool {
    match Kind::of(hash) {
        Some(Kind::Bcrypt) => bcrypt::verify(password, hash).unwrap_or(false),
        Some(Kind::Apr1) => {
            let mut parts = hash.splitn(4, '$').skip(2);
            let (Some(salt), Some(_)) = (parts.next(), parts.next()) else { return false };
            let made = apr1(password, salt.as_bytes());
            same(made.as_bytes(), hash.as_bytes())
        }
        Some(Kind::Sha1) => {
            let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, password);
            let made = format!("{{SHA}}{}", base64::engine::general_purpose::STANDARD.encode(d.as_ref()));
            same(made.as_bytes(), hash.as_bytes())
        }
        None => false,
    }
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Apache's MD5-crypt (`$apr1$salt$digest`), as `htpasswd -m` and `openssl passwd -apr1`.
fn apr1(password: &[u8], salt: &[u8]) -> String {
    use md5::{Digest as _, Md5};
    const MAGIC: &[u8] = b"$apr1$";
    const ITOA64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let salt = &salt[..salt.len().min(8)];
    let alt = Md5::new().chain_update(password).chain_update(salt).chain_update(password).finalize();
    let mut ctx = Md5::new().chain_update(password).chain_update(MAGIC).chain_update(salt);
    let mut left = password.len();
    while left > 0 {
        ctx.update(&alt[..left.min(16)]);
        left = left.saturating_sub(16);
    }
    let mut i = password.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        i >>= 1;
    }
    let mut last = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(password);
        } else {
            c.update(last);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 == 1 {
            c.update(last);
        } else {
            c.update(password);
        }
        last = c.finalize();
    }
    let mut out = String::with_capacity(37);
    out.push_str("$apr1$");
    out.push_str(&String::from_utf8_lossy(salt));
    out.push('$');
    let mut to64 = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(char::from(ITOA64[(v & 0x3f) as usize]));
            v >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        to64(u32::from(last[a]) << 16 | u32::from(last[b]) << 8 | u32::from(last[c]), 4);
    }
    to64(u32::from(last[11]), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `openssl passwd -apr1 -salt 5Ye4DyZe secret`, Python's crypt (bcrypt, cost 4)
    // and `printf secret | openssl dgst -sha1 -binary | base64`.
    const APR1: &str = "$apr1$5Ye4DyZe$OfueD4r9hh3Tvz8EwMEI5/";
    const BCRYPT: &str = "$2b$04$puXCmF1cfVKrdCR3bteh0urXKZoRIwQ.THbji2zlBd5xnIwKXr7gy";
    const SHA: &str = "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=";

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            .into_bytes()
    }

    #[tokio::test]
    async fn every_kind_htpasswd_writes_is_checked() {
        assert_eq!(apr1(b"secret", b"5Ye4DyZe"), APR1);
        let auth = BasicAuth {
            users: vec![format!("a:{APR1}"), format!("b:{BCRYPT}"), format!("c:{SHA}")],
            realm: "r".into(),
            remove_header: false,
            header_field: None,
        };
        assert_eq!(auth.bad_entry(), None);
        let checker = std::sync::Arc::new(Checker::new(&auth));
        for user in ["a", "b", "c"] {
            assert!(checker.allows(Some(&basic(user, "secret"))).await, "{user}");
            assert!(!checker.allows(Some(&basic(user, "Secret"))).await, "{user}: a wrong password");
            // Twice: the second time from what it remembers, still right.
            assert!(checker.allows(Some(&basic(user, "secret"))).await, "{user}");
            assert!(!checker.allows(Some(&basic(user, "secret2"))).await, "{user}");
        }
        assert!(!checker.allows(Some(&basic("d", "secret"))).await, "an unknown user");
        assert!(!checker.allows(None).await);
        assert!(!checker.allows(Some(b"Bearer x")).await);
        assert!(!checker.allows(Some(b"Basic !!!")).await);
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["nouser", ":{SHA}x", "u:plain", "u:$1$md5crypt"] {
            let auth = BasicAuth {
                users: vec![bad.into()],
                realm: String::new(),
                remove_header: false,
                header_field: None,
            };
            assert!(auth.bad_entry().is_some(), "{bad}");
        }
    }
}
