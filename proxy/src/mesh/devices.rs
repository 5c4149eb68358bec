//! The reply translation on the devices local tasks are reached through.

use meshgate_ebpf::{Mesh, PortTable};

/// The devices this node's tasks are reached through (a Docker bridge, a veth), which get
/// the reply translation on their ingress until they are deleted; problems are logged once
/// each.
#[derive(Default)]
pub(super) struct TaskDevices {
    current: std::collections::HashSet<(String, u32)>,
    failing: std::collections::BTreeSet<String>,
}

impl TaskDevices {
    pub(super) fn update(&mut self, mesh: &mut Mesh, table: &PortTable) {
        let local =
            table.ports.iter().flat_map(|p| p.backends.iter()).filter(|b| b.local).map(|b| *b.addr.ip());
        // A device keeps the translation while it exists: a task gone from the table still
        // answers through it while it stops and drains (and so may a task the table lists
        // again), and an answer let through untranslated leaves masqueraded, from the wrong
        // address: the client resets its connection. Detached, then attached again, at each
        // rolling update, it cost about one connection in 10,000 there.
        let kept =
            self.current.iter().filter(|(name, index)| meshgate_ebpf::route::ifindex(name) == Some(*index));
        let wanted: std::collections::HashSet<(String, u32)> =
            meshgate_ebpf::route::devices_toward(local).into_iter().chain(kept.cloned()).collect();
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
            tracing::info!(devices = %added.join(","), "L4 mesh: reply translation on the devices of local tasks");
        }
        self.failing = names;
        self.current = wanted;
    }
}
