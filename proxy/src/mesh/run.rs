//! Loading, attaching and syncing the mesh for the agent's life.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use meshgate_ebpf::{Mesh, PortTable};

use super::devices::TaskDevices;
use super::metrics::MeshCollector;
use super::neighbours::prime_neighbours;
use super::{port_table, MeshConfig, MeshView, AUTO};
use crate::readiness::Readiness;
use crate::state::{StateHub, THIS_NODE};

/// Brings the maps and the reply translation in step with the hub's state, if it changed.
fn sync(
    mesh: &mut Mesh,
    devices: &mut TaskDevices,
    current: &mut PortTable,
    hub: &StateHub,
    node_name: &str,
    node_address: Ipv4Addr,
    view: &MeshView,
) {
    let table = port_table(&hub.load().state, node_name, node_address);
    if table == *current {
        return;
    }
    // Replies first: a task's first answer must find the translation in place.
    devices.update(mesh, &table);
    match mesh.sync(&table) {
        Ok(()) => {
            let changed = changed_ports(current, &table);
            tracing::info!(ports = table.ports.len(), %changed, "L4 mesh: port table synced");
            view.set(&table);
            *current = table;
        }
        Err(e) => tracing::error!("L4 mesh: cannot sync the port table: {e}"),
    }
}

/// The published ports whose tasks changed from `old` to `new`, for the log: each with how
/// many tasks serve it now (how many of them here), the first few only.
fn changed_ports(old: &PortTable, new: &PortTable) -> String {
    const SHOWN: usize = 8;
    let before: std::collections::HashMap<_, _> =
        old.ports.iter().map(|p| ((p.protocol, p.port), &p.backends)).collect();
    let changed: Vec<String> = new
        .ports
        .iter()
        .filter(|p| before.get(&(p.protocol, p.port)) != Some(&&p.backends))
        .map(|p| {
            let here = p.backends.iter().filter(|b| b.local).count();
            format!("{}/{:?}: {} tasks ({here} here)", p.port, p.protocol, p.backends.len())
        })
        .collect();
    let now: std::collections::HashSet<_> = new.ports.iter().map(|p| (p.protocol, p.port)).collect();
    let gone = old.ports.iter().filter(|p| !now.contains(&(p.protocol, p.port)));
    let mut shown: Vec<String> = changed
        .into_iter()
        .chain(gone.map(|p| format!("{}/{:?}: unpublished", p.port, p.protocol)))
        .collect();
    if shown.len() > SHOWN {
        let more = shown.len() - SHOWN;
        shown.truncate(SHOWN);
        shown.push(format!("and {more} more"));
    }
    shown.join(", ")
}

/// Waits until the cluster state names this node's IPv4 address (Swarm's node list, on a
/// manager or through the feed on a worker).
async fn node_address_from_state(hub: &StateHub, node_name: &str, readiness: &Readiness) -> Ipv4Addr {
    let mut changes = hub.subscribe();
    let mut told = false;
    loop {
        let found =
            hub.load().state.nodes.iter().find(|n| n.name == node_name).and_then(|n| match n.address {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            });
        if let Some(address) = found {
            tracing::info!(node = node_name, %address, "L4 mesh: this node's address, from the cluster state");
            return address;
        }
        if !std::mem::replace(&mut told, true) {
            readiness.set("mesh", true, format!("waiting for the address of node `{node_name}` in the cluster state (or set mesh.node_address)"));
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How long the agent waits for the uplink to be free before it reports the mesh down.
const ATTACH_PATIENCE: Duration = Duration::from_secs(60);

/// Loads and attaches the mesh, then keeps its maps in step with the hub. A mesh that cannot
/// load is reported (log and `/readyz`); the rest of the agent keeps running.
pub async fn run(
    cfg: MeshConfig,
    hub: Arc<StateHub>,
    registry: prometheus::Registry,
    readiness: Arc<Readiness>,
    view: Arc<MeshView>,
) {
    let Some(uplink) = cfg.uplink.clone() else { return };
    let node_name = cfg.node_name.clone().unwrap_or_else(|| THIS_NODE.into());
    let node_address = match cfg.node_address {
        Some(address) => address,
        None => node_address_from_state(&hub, &node_name, &readiness).await,
    };
    let down = |e: &dyn std::fmt::Display| {
        tracing::error!("L4 mesh is down: {e}; the HTTP proxy and DNS keep running");
        readiness.set("mesh", false, e.to_string());
    };
    let uplink = if uplink == AUTO {
        match meshgate_ebpf::route::device_of_network(node_address) {
            Some(device) => {
                tracing::info!(%device, %node_address, "L4 mesh: the uplink is the device of this node's address");
                device
            }
            None => return down(&format!("mesh.uplink = \"auto\": no device has a route to this node's address {node_address} (name the uplink)")),
        }
    } else {
        uplink
    };
    let (mut mesh, kept) = match Mesh::load(node_address, cfg.pin_dir.as_deref()) {
        Ok(m) => (m, cfg.pin_dir.as_ref().map(|dir| format!("; reply table kept in {}", dir.display()))),
        // Sharing is for updates without a failed connection; the mesh works without it.
        Err(e @ meshgate_ebpf::MeshError::Pin(..)) => {
            tracing::warn!("L4 mesh: {e}; connections opened during an update of the agent may fail");
            match Mesh::load(node_address, None) {
                Ok(m) => (m, Some(format!("; reply table not kept across updates: {e}"))),
                Err(e) => return down(&e),
            }
        }
        Err(e) => return down(&e),
    };
    mesh.set_drain(cfg.drain);
    // The maps and the reply translation are ready before XDP attaches: its first packet
    // finds them. During a rolling update the previous agent holds XDP on the uplink until
    // it stops: wait for it (still ready, so the update can go on and stop it), up to a limit.
    let mut devices = TaskDevices::default();
    let mut current = PortTable::default();
    let waiting_since = tokio::time::Instant::now();
    let mut told = false;
    let mode = loop {
        sync(&mut mesh, &mut devices, &mut current, &hub, &node_name, node_address, &view);
        match mesh.attach(&uplink) {
            Ok(mode) => break mode,
            // A missing interface is a mistake to report at once, not a wait.
            Err(e)
                if waiting_since.elapsed() < ATTACH_PATIENCE
                    && std::path::Path::new("/sys/class/net").join(&uplink).exists() =>
            {
                if !std::mem::replace(&mut told, true) {
                    tracing::info!(%uplink, "L4 mesh: cannot attach yet ({e}); another agent may hold the uplink during an update: retrying for up to {ATTACH_PATIENCE:?}");
                    readiness.set(
                        "mesh",
                        true,
                        format!("waiting to attach to {uplink} (held by another agent?): {e}"),
                    );
                }
                // Often: until this agent attaches, published ports are not served.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return down(&e),
        }
    };
    readiness.set(
        "mesh",
        true,
        format!("XDP ({mode:?}) on {uplink}, node {node_name} at {node_address}{}", kept.unwrap_or_default()),
    );
    tracing::info!(%uplink, %node_address, mode = %format!("{mode:?}"), "L4 mesh attached");
    match mesh.counters().twin() {
        Ok(reader) => crate::metrics::register_collector(&registry, MeshCollector::new(reader)),
        Err(e) => tracing::warn!("L4 mesh: no counters in /metrics: {e}"),
    }
    let mut changes = hub.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        sync(&mut mesh, &mut devices, &mut current, &hub, &node_name, node_address, &view);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {
                if let Err(e) = mesh.expire_drained() {
                    tracing::warn!("L4 mesh: ending drained tasks' flows failed: {e}");
                }
                // Neighbour entries last far longer than a second: every 5 s.
                if ticks.is_multiple_of(5) {
                    prime_neighbours(&current, node_address);
                    // A device made again (a network recreated) needs the program again.
                    devices.update(&mut mesh, &current);
                }
                ticks += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use meshgate_ebpf::{Backend, Protocol, PublishedPort};

    use super::*;

    fn port(port: u16, tasks: &[(u8, bool)]) -> PublishedPort {
        let backends = tasks
            .iter()
            .map(|&(last, local)| Backend {
                task: format!("t{last}"),
                node: "n".into(),
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80),
                node_addr: Ipv4Addr::new(192, 0, 2, 1),
                local,
            })
            .collect();
        PublishedPort { protocol: Protocol::Tcp, port, backends, local_only: false }
    }

    #[test]
    fn the_log_names_only_the_ports_whose_tasks_changed() {
        let old = PortTable {
            ports: vec![port(80, &[(2, true)]), port(81, &[(3, false)])],
            ..PortTable::default()
        };
        let new = PortTable {
            ports: vec![port(80, &[(2, true)]), port(82, &[(4, true), (5, false)])],
            ..PortTable::default()
        };
        assert_eq!(changed_ports(&old, &new), "82/Tcp: 2 tasks (1 here), 81/Tcp: unpublished");
        let many = PortTable { ports: (1..=10).map(|p| port(p, &[])).collect(), ..PortTable::default() };
        assert!(changed_ports(&PortTable::default(), &many).ends_with("8/Tcp: 0 tasks (0 here), and 2 more"));
    }
}
