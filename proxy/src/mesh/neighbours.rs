//! Fresh neighbour entries for the other nodes.

use std::net::Ipv4Addr;

use meshgate_ebpf::PortTable;

/// XDP sends packets for other nodes' tasks straight to those nodes, using the kernel's
/// neighbour (ARP) entries, which only exist once this node talked to them. A datagram to the
/// discard port of each such node keeps the entries fresh.
pub(super) fn prime_neighbours(table: &PortTable, node_address: Ipv4Addr) {
    let nodes: std::collections::BTreeSet<Ipv4Addr> = table
        .ports
        .iter()
        .flat_map(|p| p.backends.iter())
        .filter(|b| !b.local)
        .map(|b| b.node_addr)
        .collect();
    if nodes.is_empty() {
        return;
    }
    let Ok(socket) = std::net::UdpSocket::bind((node_address, 0)) else { return };
    for node in nodes {
        let _ = socket.send_to(b"meshgate", (node, 9));
    }
}
