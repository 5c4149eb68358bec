//! The feed's frames: a 4-byte big-endian length, then one JSON [`Frame`]. Each frame but
//! the heartbeat replaces its part of the follower's copy whole, so a follower that joins
//! late, or reconnects to another manager, is complete after the first three frames.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::acme::ChallengeSet;
use crate::state::MeshState;

/// A frame larger than this is refused (a state of thousands of services is a few MiB).
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Frame {
    /// First frame from the server.
    Hello { node: String, leader: bool },
    /// The cluster's services and nodes, as the manager sees them.
    State { generation: u64, state: MeshState },
    /// Every certificate the issuer holds, with its key (the feed is encrypted end to end).
    Certs { certs: Vec<CertPair> },
    /// The ACME challenges in progress, so any node answers a validation; `version` is
    /// acknowledged once the follower (and everything following it) answers them.
    Challenges { version: u64, set: ChallengeSet },
    /// From a follower: it answers the challenges of `version` (the issuer waits for this
    /// before telling the CA to validate).
    Ack { challenges: u64 },
    /// Nothing changed; the connection is alive.
    Heartbeat,
    /// From a follower: a handshake there waits for an on-demand certificate for `name`
    /// (the issuer orders it if its ask endpoint allows; it comes back in `Certs`).
    Wanted { name: String },
    /// To that follower: `name` gets no certificate, and why (its handshakes fail at once).
    NotObtained { name: String, why: String },
}

/// One stored certificate, as the store keeps it (`<name>.crt`, `<name>.key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertPair {
    pub name: String,
    pub chain_pem: String,
    pub key_pem: String,
}

/// The realm and the one user of the lock an earlier agent enforces (below).
const LOCK_REALM: &str = "meshgate: served by agents of the same version only (an upgrade is in progress)";
/// A user no password opens: the SHA-1 of a password would have to be all zeros.
const LOCK_USER: &str = "upgrade:{SHA}AAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The state as it goes on the wire. A route that restricts access with what an agent of an
/// earlier version does not read would be served open by it during a rolling upgrade of
/// meshgate (its serde drops the fields it does not know), so it is locked for that agent,
/// in a way that agent enforces and agents of this version undo ([`from_the_wire`]):
/// - middlewares and conditions (unknown to the first versions): a basic auth that no
///   password opens (its realm says why);
/// - client certificates and a basic auth's `header_field` (unknown to the versions that
///   undo the first lock): `allow_from` admits no one (403), the route's own kept in
///   `wire_lock`.
///
/// Fails closed while versions are mixed.
#[must_use]
pub fn for_the_wire(state: &MeshState) -> MeshState {
    let mut state = state.clone();
    for route in state.services.iter_mut().flat_map(|s| &mut std::sync::Arc::make_mut(s).http) {
        let names_user = |a: &crate::state::BasicAuth| a.header_field.is_some();
        let newer = route.client_ca.is_some()
            || route.basic_auth.as_ref().is_some_and(names_user)
            || route
                .middlewares
                .iter()
                .any(|m| matches!(m, crate::state::Middleware::BasicAuth(a) if names_user(a)));
        if newer {
            route.wire_lock = Some(crate::state::WireLock { allow_from: route.allow_from.take() });
            route.allow_from = Some(Vec::new());
        }
        let unread = !route.middlewares.is_empty() || !route.conditions.is_empty() || newer;
        if route.basic_auth.is_none() && unread {
            route.basic_auth = Some(crate::state::BasicAuth {
                users: vec![LOCK_USER.to_owned()],
                realm: LOCK_REALM.to_owned(),
                remove_header: false,
                header_field: None,
            });
        }
    }
    state
}

/// The state a follower of this version uses: the lock for earlier agents taken off.
#[must_use]
pub fn from_the_wire(mut state: MeshState) -> MeshState {
    for route in state.services.iter_mut().flat_map(|s| &mut std::sync::Arc::make_mut(s).http) {
        if route.basic_auth.as_ref().is_some_and(|a| a.realm == LOCK_REALM && a.users == [LOCK_USER]) {
            route.basic_auth = None;
        }
        if let Some(lock) = route.wire_lock.take() {
            route.allow_from = lock.allow_from;
        }
    }
    state
}

pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let body = serde_json::to_vec(frame).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {len} bytes is larger than the {MAX_FRAME} allowed"
        )));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::other(format!("not a feed frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A route with a middleware, as an agent of the previous version reads it off the wire
    /// (its serde drops the fields it does not know): locked, never open; as this version
    /// reads it: as it was.
    #[tokio::test]
    async fn an_earlier_agent_gets_restricted_routes_locked_and_this_one_gets_them_whole() {
        use crate::state::{HostPattern, HttpRoute, Middleware};
        let route = || HttpRoute::new(vec![HostPattern::parse("a.test").unwrap()], "/".into(), 80);
        let mut allow = route();
        allow.middlewares = vec![Middleware::AllowFrom { networks: vec!["10.0.0.0/8".parse().unwrap()] }];
        let mut mtls = route();
        mtls.client_ca = Some("/etc/meshgate/clients-ca.pem".into());
        for (route, unread) in [(allow, "middlewares"), (mtls, "client_ca")] {
            an_earlier_agent_gets_it_locked(route, unread).await;
        }
    }

    /// `route` on the wire, read by an agent that does not know the field `unread`.
    async fn an_earlier_agent_gets_it_locked(route: crate::state::HttpRoute, unread: &str) {
        let state = one_route(route);
        let mut json = serde_json::to_value(for_the_wire(&state)).unwrap();
        let old = json.pointer_mut("/services/0/http/0").unwrap().as_object_mut().unwrap();
        assert!(old.remove(unread).is_some(), "{unread} is on the wire");
        let as_old: MeshState = serde_json::from_value(json).unwrap();
        let lock = as_old.services[0].http[0].basic_auth.clone().expect("locked for an earlier agent");
        assert!(lock.bad_entry().is_none(), "an entry earlier agents take");
        let checker = std::sync::Arc::new(crate::http::basic_auth::Checker::new(&lock));
        for password in ["", "upgrade", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="] {
            use base64::Engine as _;
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("upgrade:{password}"))
            );
            assert!(!checker.allows(Some(value.as_bytes())).await, "no password opens the lock");
        }
        assert_eq!(from_the_wire(for_the_wire(&state)), state, "this version gets the route as it was");
    }

    /// The agents of the version before this one undo the first lock (they read middlewares
    /// and conditions) but know neither client certificates nor `header_field`: for them the
    /// route admits no one (403), never served without what it asks.
    #[test]
    fn the_previous_version_gets_routes_with_newer_restrictions_closed() {
        use crate::state::{BasicAuth, HostPattern, HttpRoute, Middleware};
        let route = || HttpRoute::new(vec![HostPattern::parse("a.test").unwrap()], "/".into(), 80);
        let auth = BasicAuth {
            users: vec!["ann:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=".into()],
            realm: "r".into(),
            remove_header: false,
            header_field: Some("x-webauth-user".into()),
        };
        let mut mtls = route();
        mtls.client_ca = Some("/etc/meshgate/clients-ca.pem".into());
        mtls.allow_from = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut named = route();
        named.basic_auth = Some(auth.clone());
        let mut chained = route();
        chained.middlewares = vec![Middleware::BasicAuth(auth)];
        for route in [mtls, named, chained] {
            let state = one_route(route);
            let mut json = serde_json::to_string(&for_the_wire(&state)).unwrap();
            for unknown in ["client_ca", "wire_lock", "header_field"] {
                let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
                strip(&mut v, unknown);
                json = v.to_string();
            }
            let as_previous: MeshState = serde_json::from_str(&json).unwrap();
            let mut seen = as_previous.services[0].http[0].clone();
            // What the previous version's `from_the_wire` does.
            if seen.basic_auth.as_ref().is_some_and(|a| a.realm == LOCK_REALM) {
                seen.basic_auth = None;
            }
            assert_eq!(seen.allow_from, Some(Vec::new()), "admits no one: {seen:?}");
            assert_eq!(from_the_wire(for_the_wire(&state)), state, "this version gets the route as it was");
        }
    }

    /// A state with one service and its one HTTP route.
    fn one_route(route: crate::state::HttpRoute) -> MeshState {
        let service = crate::state::Service {
            name: "a".into(),
            stack: None,
            provider: "docker".into(),
            tasks: Vec::new(),
            http: vec![route],
            l4: Vec::new(),
        };
        MeshState::of_services([service])
    }

    /// Removes every field named `key`, at any depth.
    fn strip(v: &mut serde_json::Value, key: &str) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove(key);
                map.values_mut().for_each(|v| strip(v, key));
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip(v, key)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let frames = [
            Frame::Hello { node: "n1".into(), leader: true },
            Frame::Challenges {
                version: 3,
                set: ChallengeSet {
                    http: [("tok".into(), "tok.x".into())].into(),
                    alpn: BTreeMap::new(),
                    dns: BTreeMap::new(),
                },
            },
            Frame::Ack { challenges: 3 },
            Frame::Heartbeat,
            Frame::Wanted { name: "shop.example.com".into() },
            Frame::NotObtained { name: "x.example.com".into(), why: "the ask endpoint answered 403".into() },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write(&mut buf, f).await.unwrap();
        }
        let mut r = buf.as_slice();
        for f in &frames {
            assert_eq!(&read(&mut r).await.unwrap(), f);
        }
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read(&mut huge.as_slice()).await.unwrap_err().to_string().contains("larger"));
        let mut garbage = 2u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{]");
        assert!(read(&mut garbage.as_slice()).await.unwrap_err().to_string().contains("not a feed frame"));
    }

    #[test]
    fn fuzzed_frames_are_read_or_refused_never_a_crash() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        crate::fuzz::run(
            "feed frame",
            |rng| {
                let body = crate::fuzz::text(
                    rng,
                    &["{", "}", "\"State\"", "\"Heartbeat\"", ":", "[", "]", "1", ",", "\"x\""],
                    20,
                );
                let len = if rng.bool() { u32::try_from(body.len()).unwrap() } else { rng.u32(..) };
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.extend(body.as_bytes());
                bytes
            },
            |bytes| {
                let _ = runtime.block_on(read(&mut bytes.as_slice()));
            },
        );
    }
}
