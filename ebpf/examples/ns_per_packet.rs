//! Nanoseconds per packet of the XDP program alone, from BPF_PROG_TEST_RUN (run as root).
//! `bench/mesh.sh` runs it. With `repeat` the kernel does not reset the packet between runs
//! (after the first run it would measure the "already translated" path), so this averages
//! many single runs, whose duration the kernel measures around the program only.
//!
//! Usage: ns_per_packet [RUNS]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use meshgate_ebpf::{Backend, Mesh, PortTable, Protocol, PublishedPort};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A TCP SYN from 198.51.100.7:`sport` to the node's port 8080 (checksums not needed: the
/// program updates them incrementally without checking).
fn syn(sport: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 51, 100, 7]);
    p.extend_from_slice(&NODE.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&8080u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

fn main() {
    let runs: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let mut mesh = Mesh::load(NODE, None).expect("load the BPF object (run as root, built with clang)");
    let backends = (2..=9)
        .map(|i| {
            let addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 9, i), 80);
            Backend { task: addr.to_string(), node: "n1".into(), addr, node_addr: NODE, local: true }
        })
        .collect();
    mesh.sync(&PortTable {
        ports: vec![PublishedPort { protocol: Protocol::Tcp, port: 8080, backends, local_only: false }],
        ..PortTable::default()
    })
    .expect("sync");
    let mut time = |packet: &dyn Fn(u32) -> Vec<u8>| {
        let total: Duration = (0..runs).map(|i| mesh.time_per_packet(&packet(i), 1).expect("test run")).sum();
        total.as_nanos() as f64 / f64::from(runs)
    };
    // Established: one flow, found in the connection table every time.
    let established = time(&|_| syn(40000));
    // New flows: a new source port each run (Maglev pick and two table inserts).
    let new = time(&|i| syn(1024 + (i % 60000) as u16));
    // Left alone: a port that is not published.
    let passed = time(&|_| {
        let mut p = syn(40000);
        p[36..38].copy_from_slice(&9999u16.to_be_bytes());
        p
    });
    // The not-published packet is left unchanged, so `repeat` is valid for it: the kernel's
    // average over a million runs, without the per-run timer overhead of single runs.
    let mut unpublished = syn(40000);
    unpublished[36..38].copy_from_slice(&9999u16.to_be_bytes());
    let passed_repeat = mesh.time_per_packet(&unpublished, 1_000_000).expect("test run").as_nanos() as f64;
    // Single runs carry the same fixed overhead; the full paths without it:
    let overhead = passed - passed_repeat;
    println!(
        "established_ns={:.1} new_flow_ns={:.1} not_published_ns={passed_repeat:.1} (single runs: established {established:.1}, new {new:.1}, not published {passed:.1}; runs={runs})",
        established - overhead,
        new - overhead
    );
}
