//! The `[mesh]` section.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

/// `mesh.uplink` for "the device of this node's address".
pub const AUTO: &str = "auto";

/// The `[mesh]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// The interface published ports are served on (XDP attaches to it); `auto`: the one
    /// that holds this node's address. Unset: no L4 mesh.
    pub uplink: Option<String>,
    /// This node's IPv4 address on the uplink: packets to it on a published port are
    /// balanced; it is also the address other nodes reach this node's tasks through.
    /// Unset: the address the Swarm knows for `node_name` (from the cluster state).
    pub node_address: Option<Ipv4Addr>,
    /// This node's name as the providers name task nodes (Swarm node name; `local` for tasks
    /// of the routes file without a `node`). Tasks on it are local.
    pub node_name: Option<String>,
    /// A task gone from the state keeps its established connections this long (no new one
    /// reaches it), then they are reset: a stopping task finishes what it serves.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// A directory on a bpffs (`/sys/fs/bpf/meshgate`) where the reply table is kept, shared
    /// with the next agent of this node: a connection opened in the instant of an update
    /// keeps working. Unset, or not a bpffs: not kept (reported).
    pub pin_dir: Option<std::path::PathBuf>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            uplink: None,
            node_address: None,
            node_name: None,
            drain: meshgate_ebpf::DEFAULT_DRAIN,
            pin_dir: None,
        }
    }
}

impl MeshConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (&self.uplink, self.node_address) {
            (None, Some(address)) => Err(Invalid::new(
                "mesh.node_address",
                address,
                "set only with mesh.uplink (name the interface to attach to, or auto)",
            )),
            _ => Ok(()),
        }
    }
}
