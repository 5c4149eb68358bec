//! mesh-dns: answers service, task and routed host names for a whole node, forwards every
//! other name, and answers the DNS-01 challenges of the agent's ACME orders.
//!
//! A library over a plain [`Zone`]: the agent builds the zone from its state and swaps it
//! in with [`MeshDns::set_zone`]; [`MeshDns`] is a hickory-server request handler, served
//! over UDP by [`serve_udp`] (batched, with answers kept as wire bytes) and over TCP by
//! [`serve_connection`].

mod capture;
mod challenges;
mod forward;
mod handler;
mod rate;
mod tcp;
mod udp;
mod wire;
mod zone;

use std::time::Duration;

pub use challenges::ChallengeRecords;
pub use forward::{resolv_conf_upstreams, ForwardError, Forwarder};
pub use handler::{DnsMetrics, MeshDns};
pub use tcp::serve_connection;
pub use udp::serve_udp;
pub use zone::{Answer, Entry, NameError, Zone, ZoneBuilder};

/// How long a TCP client may stay connected without sending a query.
const TCP_IDLE: Duration = Duration::from_secs(10);
