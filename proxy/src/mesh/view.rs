//! The port table in force, for `/api/state`.

use meshgate_ebpf::{PortTable, Protocol};

/// The port table in force, as `/api/state` shows it (`null` while the mesh is off).
#[derive(Default)]
pub struct MeshView(std::sync::Mutex<serde_json::Value>);

impl MeshView {
    #[must_use]
    pub fn get(&self) -> serde_json::Value {
        self.0.lock().expect("mesh view lock").clone()
    }

    pub(super) fn set(&self, table: &PortTable) {
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
