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

/// `meshgate_component_ready{component}`, 1 or 0 for each component of `/readyz`, read at
/// each scrape (what an alert on a mesh that did not attach or a lost provider watches).
pub struct ReadyCollector {
    readiness: std::sync::Arc<Readiness>,
    shape: prometheus::IntGaugeVec,
}

fn family() -> prometheus::IntGaugeVec {
    prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "meshgate_component_ready",
            "1 while a component of /readyz is ready (http, https, file, docker, mesh, dns, cluster, ...), else 0.",
        ),
        &["component"],
    )
    .expect("valid metric definition")
}

impl ReadyCollector {
    #[must_use]
    pub fn new(readiness: std::sync::Arc<Readiness>) -> Self {
        Self { readiness, shape: family() }
    }
}

impl prometheus::core::Collector for ReadyCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.shape.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = family();
        for (component, status) in self.readiness.report().1 {
            now.with_label_values(&[&component]).set(i64::from(status.ready));
        }
        now.collect()
    }
}
