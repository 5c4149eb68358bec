//! Who may see what on the admin listener. Health and metrics answer whoever reaches the
//! listener (probes, Prometheus): counts and states, no secret. The dashboard and
//! `/api/state` show every route, task, address and certificate: the node itself (loopback,
//! the Unix socket) always sees them; anyone else only as a user of `admin.users_file`, and
//! without that file nobody else does (refused, never shown by default).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::http::basic_auth::Checker;
use crate::state::BasicAuth;

/// Where a connection to the admin listener comes from.
pub trait Peer {
    /// From this node: loopback, or a Unix socket (reached through the node's filesystem).
    fn is_local(&self) -> bool;
}

impl Peer for SocketAddr {
    fn is_local(&self) -> bool {
        // An IPv4 client of a dual-stack listener shows as ::ffff:127.x.
        self.ip().to_canonical().is_loopback()
    }
}

impl Peer for tokio::net::unix::SocketAddr {
    fn is_local(&self) -> bool {
        true
    }
}

/// Paths open to anyone who reaches the listener.
const OPEN: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// What to do with a request.
pub enum Decision {
    Allow,
    /// Not from the node, no `admin.users_file`: nobody else may see it.
    Refuse,
    /// Not from the node and not a user of the file: ask for credentials.
    Challenge,
}

/// The users who may see the dashboard from beyond the node.
#[derive(Clone, Default)]
pub struct Viewers(Option<Arc<Checker>>);

impl Viewers {
    /// Reads `admin.users_file`; an error says what is wrong with it (the agent does not
    /// start: a dashboard meant to be protected must not be served without its users).
    pub fn load(file: Option<&Path>) -> Result<Self, String> {
        let Some(path) = file else { return Ok(Self(None)) };
        match BasicAuth::from_htpasswd_file(path)? {
            None => Err(format!("htpasswd file {} does not exist", path.display())),
            Some(auth) => Ok(Self(Some(Arc::new(Checker::new(&auth))))),
        }
    }

    pub async fn decide(&self, path: &str, local: bool, authorization: Option<&[u8]>) -> Decision {
        if local || OPEN.contains(&path) {
            return Decision::Allow;
        }
        match &self.0 {
            None => Decision::Refuse,
            Some(checker) if checker.allows(authorization).await => Decision::Allow,
            Some(_) => Decision::Challenge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_file_that_cannot_be_used_stops_the_start_and_without_one_only_the_node_sees_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody");
        assert!(Viewers::load(Some(&missing)).err().unwrap().contains("does not exist"));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "ops:plaintext\n").unwrap();
        assert!(Viewers::load(Some(&bad)).err().unwrap().contains("ops"));
        let Ok(none) = Viewers::load(None) else { panic!("no file is no error") };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            assert!(matches!(none.decide("/api/state", false, None).await, Decision::Refuse));
            assert!(matches!(none.decide("/", false, Some(b"Basic b3BzOng=")).await, Decision::Refuse));
            assert!(matches!(none.decide("/metrics", false, None).await, Decision::Allow));
            assert!(matches!(none.decide("/", true, None).await, Decision::Allow));
        });
    }
}
