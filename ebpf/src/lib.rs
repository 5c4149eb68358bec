//! meshgate-ebpf: the L4 routing mesh (XDP and tc-BPF programs, loaded with aya).
//!
//! The BPF programs arrive with their own issue; this crate already holds the plain
//! `PortTable` the agent will hand it, so the conversion from the agent's state has a home.

use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One published port and the tasks behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub backends: Vec<Backend>,
    /// Only tasks on this node serve it.
    pub local_only: bool,
}

/// A task that serves a published port, and the node that owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub node: String,
}

/// Everything the BPF maps are synced from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortTable {
    pub ports: Vec<PublishedPort>,
}
