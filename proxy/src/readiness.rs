//! Named readiness components behind `/readyz` (providers, listeners, the L4 mesh, the cluster, ACME).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub ready: bool,
    pub detail: String,
}

#[derive(Default)]
pub struct Readiness {
    components: Mutex<BTreeMap<String, Status>>,
}

impl Readiness {
    pub fn set(&self, component: &str, ready: bool, detail: impl std::fmt::Display) {
        self.components
            .lock()
            .expect("readiness lock")
            .insert(component.to_owned(), Status { ready, detail: detail.to_string() });
    }

    /// All components, and whether every one is ready.
    pub fn report(&self) -> (bool, BTreeMap<String, Status>) {
        let map = self.components.lock().expect("readiness lock").clone();
        (map.values().all(|s| s.ready), map)
    }
}
