//! The BPF counters as Prometheus metrics, read from the maps when `/metrics` is scraped
//! (one reader of the agent's own, so scrapes never wait for a sync).

use std::sync::Mutex;

use meshgate_ebpf::{CounterReader, Protocol};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGauge, Opts};

/// The mesh's metrics, made at each scrape from the maps' totals.
pub struct MeshCollector {
    reader: Mutex<CounterReader>,
    /// The metrics' descriptions (their values are made fresh at each scrape).
    shape: Families,
}

struct Families {
    packets: IntCounterVec,
    bytes: IntCounterVec,
    port_packets: IntCounterVec,
    port_bytes: IntCounterVec,
    flows: IntGauge,
}

impl Families {
    fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
        };
        Self {
            packets: counter(
                "meshgate_mesh_packets_total",
                "Packets the XDP and tc programs saw, by verdict.",
                &["verdict"],
            ),
            bytes: counter(
                "meshgate_mesh_bytes_total",
                "Bytes the XDP and tc programs saw, by verdict.",
                &["verdict"],
            ),
            port_packets: counter(
                "meshgate_mesh_port_packets_total",
                "Packets balanced, by published port.",
                &["protocol", "port"],
            ),
            port_bytes: counter(
                "meshgate_mesh_port_bytes_total",
                "Bytes balanced, by published port.",
                &["protocol", "port"],
            ),
            flows: IntGauge::new(
                "meshgate_mesh_flows",
                "Flows in the connection table (65536 at most; the least recently used are evicted beyond).",
            )
            .expect("valid metric definition"),
        }
    }
}

impl MeshCollector {
    pub fn new(reader: CounterReader) -> Self {
        Self { reader: Mutex::new(reader), shape: Families::new() }
    }
}

impl Collector for MeshCollector {
    fn desc(&self) -> Vec<&Desc> {
        let s = &self.shape;
        [s.packets.desc(), s.bytes.desc(), s.port_packets.desc(), s.port_bytes.desc(), s.flows.desc()]
            .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let reader = self.reader.lock().expect("counter reader lock");
        let now = Families::new();
        for (verdict, c) in reader.verdicts() {
            now.packets.with_label_values(&[verdict]).inc_by(c.packets);
            now.bytes.with_label_values(&[verdict]).inc_by(c.bytes);
        }
        for (protocol, port, c) in reader.ports() {
            let labels = [if protocol == Protocol::Tcp { "tcp" } else { "udp" }, &port.to_string()];
            now.port_packets.with_label_values(&labels).inc_by(c.packets);
            now.port_bytes.with_label_values(&labels).inc_by(c.bytes);
        }
        now.flows.set(i64::try_from(reader.flow_count()).unwrap_or(i64::MAX));
        [
            now.packets.collect(),
            now.bytes.collect(),
            now.port_packets.collect(),
            now.port_bytes.collect(),
            now.flows.collect(),
        ]
        .concat()
    }
}
