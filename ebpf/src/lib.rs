//! meshgate-ebpf: the L4 routing mesh. BPF programs in C (`bpf/`, built by `build.rs` with
//! clang), loaded and kept in step with a plain [`PortTable`] by [`Mesh`] (aya).
//!
//! The agent converts its state into a `PortTable`; this crate knows nothing of Docker.

mod counters;
mod loader;
pub mod maglev;
pub mod maps;
pub mod route;

use std::net::{Ipv4Addr, SocketAddrV4};

pub use counters::CounterReader;
pub use loader::{Attached, Mesh, MeshError, DEFAULT_DRAIN, OBJECT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (`IPPROTO_*`).
    #[must_use]
    pub fn ip_number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// One published port and the tasks behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub backends: Vec<Backend>,
    /// Only tasks on this node serve it (the client address is always kept).
    pub local_only: bool,
}

/// A task that serves a published port, and the node that runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The task's and its node's names, for people reading `/api/state`.
    pub task: String,
    pub node: String,
    pub addr: SocketAddrV4,
    /// The uplink address of the node that runs the task.
    pub node_addr: Ipv4Addr,
    /// Whether that node is this one.
    pub local: bool,
}

/// Everything the BPF maps are synced from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortTable {
    pub ports: Vec<PublishedPort>,
    /// This node's tasks as other nodes name them (e.g. an overlay address), and the address
    /// this node reaches them at (e.g. their `docker_gwbridge` address): a flow another node
    /// sends is delivered there.
    pub local_addresses: Vec<(Ipv4Addr, Ipv4Addr)>,
}

#[cfg(test)]
mod packet_tests;
