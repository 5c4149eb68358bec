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
