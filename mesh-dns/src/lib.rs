//! mesh-dns: answers service, task and routed host names for a whole node, forwards every
//! other name, and answers the DNS-01 challenges of the agent's ACME orders.
//!
//! A library over a plain [`Zone`]: the agent builds the zone from its state and swaps it
//! in with [`MeshDns::set_zone`]; the server is hickory-server with [`MeshDns`] as its
//! request handler.

mod challenges;
mod forward;
mod handler;
mod rate;
mod tcp;
mod zone;

use std::sync::Arc;
use std::time::Duration;

pub use challenges::ChallengeRecords;
pub use forward::{resolv_conf_upstreams, ForwardError, Forwarder};
pub use handler::{DnsMetrics, MeshDns};
pub use tcp::serve_connection;
pub use zone::{Answer, Entry, NameError, Zone, ZoneBuilder};

/// How long a TCP client may stay connected without sending a query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Serves `handler` on a bound UDP socket until the future is dropped. (TCP: the caller
/// accepts and hands each connection to [`serve_connection`].)
pub async fn serve_udp(
    handler: Arc<MeshDns>,
    udp: tokio::net::UdpSocket,
) -> Result<(), hickory_server::net::NetError> {
    let mut server = hickory_server::Server::new(Shared(handler));
    server.register_socket(udp);
    server.block_until_done().await
}

/// Lets the agent keep a handle on the handler (to swap zones) while the server owns one.
struct Shared(Arc<MeshDns>);

#[async_trait::async_trait]
impl hickory_server::server::RequestHandler for Shared {
    async fn handle_request<
        R: hickory_server::server::ResponseHandler,
        T: hickory_server::net::runtime::Time,
    >(
        &self,
        request: &hickory_server::server::Request,
        response_handle: R,
    ) -> hickory_server::server::ResponseInfo {
        self.0.handle_request::<R, T>(request, response_handle).await
    }
}
