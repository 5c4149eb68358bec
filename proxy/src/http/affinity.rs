//! Affinity: which task a client keeps to (a route's [`crate::state::Affinity`]). By the
//! client's address, rendezvous hashing (the same task through every node, a client moving
//! only when its task goes); by cookie, a token naming the task, set on the first answer.

use std::fmt::Write as _;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};

use super::endpoint::Endpoint;
use crate::state::Affinity;

/// What a request asks of the choice of a task (its route's affinity).
pub enum Wish {
    /// Any task: balanced.
    Any,
    /// The task this client's address hashes to.
    Hash(std::net::IpAddr),
    /// The task this cookie value names, if it still serves.
    Token(String),
}

/// The cookie value that names a task: the same on every node, nothing of the task's name
/// or address readable in it.
#[must_use]
pub fn task_token(task: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, task.as_bytes());
    digest.as_ref()[..8].iter().fold(String::with_capacity(16), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// Rendezvous hashing: the candidate with the highest hash of (client, task) wins, so a
/// client moves only when its own task goes.
pub fn rendezvous<'a>(
    client: std::net::IpAddr,
    candidates: impl Iterator<Item = &'a Arc<Endpoint>>,
) -> Option<&'a Arc<Endpoint>> {
    use std::hash::{Hash, Hasher};
    candidates.max_by_key(|e| {
        let mut h = std::hash::DefaultHasher::new();
        (client, &*e.task).hash(&mut h);
        h.finish()
    })
}

/// What `headers` (a request's) and `client` wish for on a route with `affinity`.
#[must_use]
pub fn wish_of(affinity: Option<&Affinity>, headers: &HeaderMap, client: std::net::IpAddr) -> Wish {
    match affinity {
        None => Wish::Any,
        Some(Affinity::ClientIp) => Wish::Hash(client),
        Some(Affinity::Cookie { name, .. }) => {
            cookie(headers, name).map_or(Wish::Any, |t| Wish::Token(t.to_owned()))
        }
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

/// The `Set-Cookie` that keeps the client to `endpoint`, unless its cookie already does.
#[must_use]
pub fn set_cookie(affinity: Option<&Affinity>, wish: &Wish, endpoint: &Endpoint) -> Option<HeaderValue> {
    let Some(Affinity::Cookie { name, secure, http_only, same_site, max_age, path }) = affinity else {
        return None;
    };
    let token = task_token(&endpoint.task);
    if matches!(wish, Wish::Token(t) if *t == token) {
        return None;
    }
    let mut v = format!("{name}={token}; Path={}", path.as_deref().unwrap_or("/"));
    if let Some(age) = max_age {
        let _ = write!(v, "; Max-Age={age}");
    }
    if *secure {
        v.push_str("; Secure");
    }
    if *http_only {
        v.push_str("; HttpOnly");
    }
    if let Some(site) = same_site {
        let site = match site.to_ascii_lowercase().as_str() {
            "none" => "None",
            "strict" => "Strict",
            _ => "Lax",
        };
        let _ = write!(v, "; SameSite={site}");
    }
    HeaderValue::from_str(&v).ok()
}
