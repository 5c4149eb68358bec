//! This node's view of the published ports: which tasks serve each, at which address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use meshgate_ebpf::{Backend, PortTable, Protocol, PublishedPort};

use crate::state::{L4Protocol, MeshState, THIS_NODE};

/// The port table for this node: every published port of every service, each with the
/// routable tasks that serve it (only this node's if the port is local-only). A task of this
/// node is translated to the address this node reaches it at; a node-local task of another
/// node to the address that node knows it by (its overlay address: that node delivers it to
/// its own local address, see [`PortTable::local_addresses`]). A task whose node's address is
/// unknown, or that this node cannot reach, is left out.
#[must_use]
pub fn port_table(state: &MeshState, node_name: &str, node_address: Ipv4Addr) -> PortTable {
    let addresses: HashMap<&str, Ipv4Addr> = state
        .nodes
        .iter()
        .filter_map(|n| match n.address {
            Some(IpAddr::V4(a)) => Some((n.name.as_str(), a)),
            _ => None,
        })
        .collect();
    let v4 = |a: &IpAddr| match a {
        IpAddr::V4(a) if !a.is_unspecified() => Some(*a),
        _ => None,
    };
    let mut ports = Vec::new();
    let mut local_addresses = Vec::new();
    for svc in &state.services {
        for t in svc.tasks.iter().filter(|t| t.node_local && t.node == node_name) {
            if let (Some(from), Some(to)) = (v4(&t.address), state.local_addresses.get(&t.id).and_then(v4)) {
                local_addresses.push((from, to));
            }
        }
        for l4 in &svc.l4 {
            let backends = svc
                .tasks
                .iter()
                .filter(|t| t.health.routable())
                .filter_map(|t| {
                    // `local` (the routes file's default) is this node, whatever its name.
                    let local = t.node == node_name || t.node == THIS_NODE;
                    // A task of this node by the address this node reaches it at; another's by
                    // its own (unknown here for a task on no Swarm network: left out).
                    let ip = if local && t.node_local {
                        v4(state.local_addresses.get(&t.id)?)?
                    } else {
                        v4(&t.address)?
                    };
                    let node_addr = if local { node_address } else { *addresses.get(t.node.as_str())? };
                    Some(Backend {
                        task: t.id.clone(),
                        node: t.node.clone(),
                        addr: SocketAddrV4::new(ip, t.port.unwrap_or(l4.target)),
                        node_addr,
                        local,
                    })
                })
                .collect();
            let protocol = match l4.protocol {
                L4Protocol::Tcp => Protocol::Tcp,
                L4Protocol::Udp => Protocol::Udp,
            };
            ports.push(PublishedPort { protocol, port: l4.published, backends, local_only: l4.local_only });
        }
    }
    ports.sort_by_key(|p| (p.protocol, p.port));
    local_addresses.sort_unstable();
    local_addresses.dedup();
    PortTable { ports, local_addresses }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Health, Node, PublishedPort as L4, Service, Task};

    fn task(id: &str, ip: [u8; 4], node: &str, health: Health) -> Task {
        Task {
            id: id.into(),
            address: IpAddr::from(ip),
            port: None,
            node: node.into(),
            health,
            network: None,
            aliases: vec![],
            node_local: false,
        }
    }

    #[test]
    fn published_ports_become_a_port_table_for_this_node() {
        let node = |name: &str, a: Option<[u8; 4]>| Node {
            id: name.into(),
            name: name.into(),
            address: a.map(IpAddr::from),
            manager: false,
            leader: false,
            ready: true,
        };
        let state = MeshState {
            services: vec![std::sync::Arc::new(Service {
                name: "web".into(),
                stack: None,
                provider: "t".into(),
                tasks: vec![
                    task("a", [10, 0, 9, 2], "n1", Health::Healthy),
                    task("b", [10, 0, 9, 2], "n2", Health::Unknown),
                    task("c", [10, 0, 9, 3], "n1", Health::Unhealthy),
                    task("d", [10, 0, 9, 4], "n3", Health::Healthy),
                ],
                http: vec![],
                l4: vec![
                    L4 { protocol: L4Protocol::Tcp, published: 8080, target: 80, local_only: false },
                    L4 { protocol: L4Protocol::Udp, published: 5353, target: 53, local_only: true },
                ],
            })],
            nodes: vec![
                node("n1", Some([192, 0, 2, 10])),
                node("n2", Some([192, 0, 2, 11])),
                node("n3", None),
            ],
            ..MeshState::default()
        };
        let table = port_table(&state, "n1", Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(table.ports.len(), 2);
        let tcp = &table.ports[0];
        assert_eq!((tcp.protocol, tcp.port), (Protocol::Tcp, 8080));
        let backends: Vec<(String, Ipv4Addr, bool)> =
            tcp.backends.iter().map(|b| (b.addr.to_string(), b.node_addr, b.local)).collect();
        assert_eq!(
            backends,
            [("10.0.9.2:80".into(), Ipv4Addr::new(192, 0, 2, 10), true), ("10.0.9.2:80".into(), Ipv4Addr::new(192, 0, 2, 11), false)],
            "unhealthy tasks and tasks on a node without an address are left out; the same address on two nodes is two tasks"
        );
        assert!(table.ports[1].local_only);

        // A routes file's task without a node is on this node, named or not.
        let mut state = state;
        std::sync::Arc::make_mut(&mut state.services[0]).tasks =
            vec![task("e", [127, 0, 0, 1], THIS_NODE, Health::Healthy)];
        let table = port_table(&state, "n1", Ipv4Addr::new(192, 0, 2, 10));
        assert!(table.ports[0].backends[0].local, "{:?}", table.ports[0].backends);
    }
}
