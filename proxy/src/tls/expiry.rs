//! Every served certificate's expiry as a metric, read from the resolver at each scrape:
//! `meshgate_tls_certificate_not_after_seconds{name, source}` (Traefik:
//! `traefik_tls_certs_not_after`). ACME's own `days_left` covers only what it ordered; this
//! covers files too.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Opts};

use super::{CertInfo, CertResolver};

pub struct ExpiryCollector {
    resolver: Arc<CertResolver>,
    shape: GaugeVec,
}

fn family() -> GaugeVec {
    GaugeVec::new(
        Opts::new(
            "meshgate_tls_certificate_not_after_seconds",
            "When each served certificate expires (Unix time), by name it is served for and source (acme, files).",
        ),
        &["name", "source"],
    )
    .expect("valid metric definition")
}

impl ExpiryCollector {
    #[must_use]
    pub fn new(resolver: Arc<CertResolver>) -> Self {
        Self { resolver, shape: family() }
    }
}

impl Collector for ExpiryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.shape.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = family();
        for (source, name, key) in self.resolver.served() {
            let Some(der) = key.cert.first() else { continue };
            if let Ok(info) = CertInfo::parse(der) {
                let at = info.not_after.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                now.with_label_values(&[&name, source]).set(at);
            }
        }
        now.collect()
    }
}
