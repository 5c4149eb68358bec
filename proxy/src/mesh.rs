//! The `[mesh]` settings and the L4 mesh's place in the agent: the published ports of each
//! new state become a [`PortTable`] that the BPF maps are synced to, and the BPF counters
//! become Prometheus metrics.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use meshgate_ebpf::{Backend, Mesh, PortTable, Protocol, PublishedPort};
use prometheus::{IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;
use crate::readiness::Readiness;
use crate::state::{L4Protocol, MeshState, StateHub, THIS_NODE};

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

/// BPF counters as Prometheus counters (read from the per-CPU maps every second).
pub struct MeshMetrics {
    packets: IntCounterVec,
    bytes: IntCounterVec,
    port_packets: IntCounterVec,
    port_bytes: IntCounterVec,
    flows: IntGauge,
}

impl MeshMetrics {
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            packets: counter(
                "meshgate_mesh_packets_total",
                "Packets the XDP and tc programs saw, by verdict.",
                &["verdict"],
            )?,
            bytes: counter(
                "meshgate_mesh_bytes_total",
                "Bytes the XDP and tc programs saw, by verdict.",
                &["verdict"],
            )?,
            port_packets: counter(
                "meshgate_mesh_port_packets_total",
                "Packets balanced, by published port.",
                &["protocol", "port"],
            )?,
            port_bytes: counter(
                "meshgate_mesh_port_bytes_total",
                "Bytes balanced, by published port.",
                &["protocol", "port"],
            )?,
            flows: {
                let g = IntGauge::new("meshgate_mesh_flows", "Flows in the connection table (65536 at most; the least recently used are evicted beyond).")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
        })
    }

    fn set(counter: &IntCounterVec, labels: &[&str], total: u64) {
        let c = counter.with_label_values(labels);
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    fn update(&self, mesh: &Mesh, table: &PortTable, count_flows: bool) {
        if count_flows {
            self.flows.set(mesh.flow_count() as i64);
        }
        for (verdict, c) in mesh.verdict_counters() {
            Self::set(&self.packets, &[verdict], c.packets);
            Self::set(&self.bytes, &[verdict], c.bytes);
        }
        for p in &table.ports {
            if let Some(c) = mesh.port_counters(p.protocol, p.port) {
                let proto = if p.protocol == Protocol::Tcp { "tcp" } else { "udp" };
                let port = p.port.to_string();
                Self::set(&self.port_packets, &[proto, &port], c.packets);
                Self::set(&self.port_bytes, &[proto, &port], c.bytes);
            }
        }
    }
}

/// XDP sends packets for other nodes' tasks straight to those nodes, using the kernel's
/// neighbour (ARP) entries, which only exist once this node talked to them. A datagram to the
/// discard port of each such node keeps the entries fresh.
fn prime_neighbours(table: &PortTable, node_address: Ipv4Addr) {
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
            tracing::info!(ports = table.ports.len(), "L4 mesh: port table synced");
            view.set(&table);
            *current = table;
        }
        Err(e) => tracing::error!("L4 mesh: cannot sync the port table: {e}"),
    }
}

/// The devices this node's tasks are reached through (a Docker bridge, a veth), which get
/// the reply translation on their ingress; problems are logged once each.
#[derive(Default)]
struct TaskDevices {
    current: std::collections::HashSet<(String, u32)>,
    failing: std::collections::BTreeSet<String>,
}

impl TaskDevices {
    fn update(&mut self, mesh: &mut Mesh, table: &PortTable) {
        let local =
            table.ports.iter().flat_map(|p| p.backends.iter()).filter(|b| b.local).map(|b| *b.addr.ip());
        let wanted = meshgate_ebpf::route::devices_toward(local);
        if wanted == self.current && self.failing.is_empty() {
            return;
        }
        let failed = mesh.set_task_devices(&wanted);
        let names: std::collections::BTreeSet<String> = failed.iter().map(|(d, _)| d.clone()).collect();
        for (device, e) in &failed {
            if !self.failing.contains(device) {
                tracing::error!(%device, "L4 mesh: replies of the tasks behind {device} cannot be translated: {e}");
            }
        }
        let added: Vec<&str> = wanted
            .difference(&self.current)
            .map(|(d, _)| d.as_str())
            .filter(|d| !names.contains(*d))
            .collect();
        if !added.is_empty() {
            tracing::info!(devices = ?added, "L4 mesh: reply translation on the devices of local tasks");
        }
        self.failing = names;
        self.current = wanted;
    }
}

/// The port table in force, as `/api/state` shows it (`null` while the mesh is off).
#[derive(Default)]
pub struct MeshView(std::sync::Mutex<serde_json::Value>);

impl MeshView {
    #[must_use]
    pub fn get(&self) -> serde_json::Value {
        self.0.lock().expect("mesh view lock").clone()
    }

    fn set(&self, table: &PortTable) {
        let ports: Vec<serde_json::Value> = table
            .ports
            .iter()
            .map(|p| {
                serde_json::json!({
                    "protocol": if p.protocol == Protocol::Tcp { "tcp" } else { "udp" },
                    "port": p.port,
                    "local_only": p.local_only,
                    "backends": p.backends.iter().map(|b| serde_json::json!({
                        "task": b.task, "address": b.addr.to_string(), "node": b.node, "node_address": b.node_addr.to_string(), "local": b.local,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        *self.0.lock().expect("mesh view lock") = serde_json::json!({ "ports": ports });
    }
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
    tracing::info!(%uplink, %node_address, ?mode, "L4 mesh attached");
    let metrics = MeshMetrics::register(&registry).ok();
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
                // Walking the connection table costs a system call per flow, and neighbour
                // entries last far longer: both every 5 s.
                let slow = ticks.is_multiple_of(5);
                if let Some(m) = &metrics {
                    m.update(&mesh, &current, slow);
                }
                if slow {
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
            services: vec![Service {
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
            }],
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
        state.services[0].tasks = vec![task("e", [127, 0, 0, 1], THIS_NODE, Health::Healthy)];
        let table = port_table(&state, "n1", Ipv4Addr::new(192, 0, 2, 10));
        assert!(table.ports[0].backends[0].local, "{:?}", table.ports[0].backends);
    }
}
