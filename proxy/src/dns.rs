//! The `[dns]` settings and the zone mesh-dns serves, derived from the state in force.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use mesh_dns::{ChallengeRecords, MeshDns, Zone, ZoneBuilder};
use serde::{Deserialize, Serialize};

use crate::acme::Challenges;
use crate::state::{HostPattern, L4Protocol, MeshState, StateHub};

/// The `[dns]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Address for DNS over UDP and TCP (e.g. `0.0.0.0:53`). Unset: mesh-dns is off.
    pub listen: Option<SocketAddr>,
    /// Cluster domain: every name is also answered under it (`web.mesh.internal`).
    pub domain: String,
    /// TTL of local answers; short so clients follow task changes.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Resolvers for every other name. Empty: the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// Time a forwarded query may take before the client gets SERVFAIL.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Forwarded answers kept in the cache at most.
    pub cache_size: usize,
    /// Clients that get the cluster's names and others forwarded; everyone else gets the
    /// ACME challenge names only (REFUSED for the rest).
    pub recursion_networks: Vec<IpNet>,
    /// Also answer the routed HTTP host names with the nodes' addresses.
    pub answer_routed_hosts: bool,
    /// Addresses given for routed host names. Empty: the Swarm nodes' addresses.
    pub node_addresses: Vec<IpAddr>,
    /// ACME DNS-01 records are also answered under this zone (`_acme-challenge.example.com`
    /// as `_acme-challenge.example.com.<zone>`): the target of a CNAME delegation.
    pub challenge_zone: Option<String>,
    /// UDP answers a client (an address, an IPv6 /64) gets a second; beyond, they go out
    /// empty with TC set (the client asks again over TCP), so the node amplifies nothing for
    /// a forged source. 0: no limit.
    pub udp_rate_limit: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            domain: "mesh.internal".into(),
            ttl: Duration::from_secs(5),
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            cache_size: 10_000,
            recursion_networks: ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
                .iter()
                .map(|n| n.parse().expect("valid network"))
                .collect(),
            answer_routed_hosts: false,
            node_addresses: Vec::new(),
            challenge_zone: None,
            udp_rate_limit: 200,
        }
    }
}

/// Builds the zone: services (`web`, `stack_web`), `tasks.<service>`, task and container
/// names, SRV names for published ports and, if asked, routed host names.
#[must_use]
pub fn zone_of(state: &MeshState, cfg: &DnsConfig) -> Zone {
    let ttl = u32::try_from(cfg.ttl.as_secs()).unwrap_or(5).max(1);
    let Ok(mut zone) = ZoneBuilder::new(&cfg.domain, ttl) else {
        return Zone::empty("mesh.internal", ttl).expect("valid default domain");
    };
    let skip = |what: &str, e: &mesh_dns::NameError| tracing::debug!("dns: {what} left out: {e}");
    for svc in &state.services {
        let answerable = |t: &&crate::state::Task| t.health.routable() && !t.address.is_unspecified();
        let healthy: Vec<IpAddr> = svc.tasks.iter().filter(answerable).map(|t| t.address).collect();
        let mut names = vec![svc.name.clone()];
        if let Some(short) = svc.stack.as_ref().and_then(|stack| svc.name.strip_prefix(&format!("{stack}_")))
        {
            names.push(short.to_owned());
        }
        for name in &names {
            for n in [name.clone(), format!("tasks.{name}")] {
                if let Err(e) = zone.add(&n, &healthy) {
                    skip("service name", &e);
                }
            }
            for port in &svc.l4 {
                let proto = match port.protocol {
                    L4Protocol::Tcp => "tcp",
                    L4Protocol::Udp => "udp",
                };
                if let Err(e) =
                    zone.add_srv(&format!("_{}._{proto}.{name}", port.published), port.published, name)
                {
                    skip("SRV name", &e);
                }
            }
        }
        for task in svc.tasks.iter().filter(answerable) {
            for name in std::iter::once(&task.id).chain(&task.aliases) {
                if let Err(e) = zone.add(name, &[task.address]) {
                    skip("task name", &e);
                }
            }
        }
    }
    if cfg.answer_routed_hosts {
        let nodes: Vec<IpAddr> = if cfg.node_addresses.is_empty() {
            state.nodes.iter().filter_map(|n| n.address).collect()
        } else {
            cfg.node_addresses.clone()
        };
        for route in state.services.iter().flat_map(|s| &s.http) {
            for host in &route.hosts {
                if let HostPattern::Exact(h) = host {
                    if let Err(e) = zone.add_public(h, &nodes) {
                        skip("routed host", &e);
                    }
                }
            }
        }
    }
    zone.build()
}

/// Keeps mesh-dns's zone in step with the hub: one rebuild per new generation.
pub async fn follow(hub: Arc<StateHub>, dns: Arc<MeshDns>, cfg: DnsConfig) {
    let mut changes = hub.subscribe();
    loop {
        dns.set_zone(zone_of(&hub.load().state, &cfg));
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps mesh-dns's ACME challenge records in step with the challenges in progress (this
/// agent's orders and, on a follower of the cluster feed, the issuer's). A one-second TTL: a
/// CA's resolver must not keep an old value.
pub async fn follow_challenges(challenges: Arc<Challenges>, dns: Arc<MeshDns>, cfg: DnsConfig) {
    let zone = cfg.challenge_zone.as_deref().and_then(|z| challenge_zone(z).ok());
    let mut changes = challenges.subscribe();
    loop {
        let set = challenges.snapshot().dns;
        dns.set_challenges(ChallengeRecords::new(&set, zone.as_ref(), 1));
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// `dns.challenge_zone` as a DNS name.
pub fn challenge_zone(zone: &str) -> Result<hickory_proto::rr::Name, String> {
    use std::str::FromStr as _;
    hickory_proto::rr::Name::from_str(&format!("{}.", zone.trim_end_matches('.'))).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::state::{Health, Node, PublishedPort, Service, Task};
    use hickory_proto::rr::{LowerName, Name, RecordType};
    use mesh_dns::Answer;
    use std::str::FromStr;

    fn count(zone: &Zone, name: &str, qtype: RecordType) -> Option<usize> {
        match zone.answer(&LowerName::from(Name::from_str(name).unwrap()), qtype) {
            Answer::Records(r) => Some(r.len()),
            _ => None,
        }
    }

    #[test]
    fn service_task_and_routed_names() {
        let task = |id: &str, ip: [u8; 4], health| Task {
            id: id.into(),
            address: ip.into(),
            port: None,
            node: "n1".into(),
            health,
            network: None,
            aliases: vec![],
            node_local: false,
        };
        let state = MeshState {
            services: vec![std::sync::Arc::new(Service {
                name: "shop_web".into(),
                stack: Some("shop".into()),
                provider: "t".into(),
                tasks: vec![
                    task("shop_web.1.abc", [10, 0, 0, 1], Health::Healthy),
                    task("shop_web.2.def", [10, 0, 0, 2], Health::Unknown),
                    task("shop_web.3.ghi", [10, 0, 0, 3], Health::Unhealthy),
                ],
                http: vec![crate::state::HttpRoute::new(
                    vec![
                        HostPattern::parse("shop.example.com").unwrap(),
                        HostPattern::parse("*.shop.example.com").unwrap(),
                    ],
                    "/".into(),
                    80,
                )],
                l4: vec![PublishedPort {
                    protocol: L4Protocol::Tcp,
                    published: 8080,
                    target: 80,
                    local_only: false,
                }],
            })],
            problems: vec![],
            nodes: vec![Node {
                id: "n1".into(),
                name: "n1".into(),
                address: Some([192, 0, 2, 1].into()),
                manager: true,
                leader: true,
                ready: true,
            }],
            local_addresses: BTreeMap::new(),
        };
        let cfg = DnsConfig { answer_routed_hosts: true, ..DnsConfig::default() };
        let zone = zone_of(&state, &cfg);
        assert_eq!(count(&zone, "shop_web.", RecordType::A), Some(2), "unhealthy tasks are left out");
        assert_eq!(count(&zone, "web.mesh.internal.", RecordType::A), Some(2));
        assert_eq!(count(&zone, "tasks.web.", RecordType::A), Some(2));
        assert_eq!(count(&zone, "shop_web.1.abc.", RecordType::A), Some(1));
        assert_eq!(count(&zone, "shop_web.3.ghi.mesh.internal.", RecordType::A), None);
        assert_eq!(count(&zone, "_8080._tcp.web.", RecordType::SRV), Some(1));
        assert_eq!(count(&zone, "shop.example.com.", RecordType::A), Some(1), "routed host -> node address");
    }
}
