//! One cluster view on every node. On a Swarm worker the Docker API cannot list services or
//! tasks, so the agents on managers serve a read-only **feed** (mutual TLS with the cluster
//! credential, see [`identity`]) and the other agents follow it:
//!
//! - the **leader** (the Swarm leader's agent) serves its state, the certificates it orders
//!   (it is the only agent that orders) and its ACME challenges;
//! - the other **managers** see the state in their own engine, follow the leader for
//!   certificates and challenges, and serve all of it again;
//! - **workers** follow any manager (failing over between them) for everything, keep
//!   serving the last state they received when none answers, and say so.
//!
//! Swarm stays the only source of truth: the feed carries what the managers' engines say.

mod follow;
pub mod hop;
pub mod identity;
mod serve;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::acme::store::Store;
use crate::acme::Challenges;
use crate::invalid::Invalid;
use crate::metrics::register;
use crate::provider::docker::{DockerLink, Position};
use crate::readiness::Readiness;
use crate::state::StateHub;

/// The readiness component and log prefix.
pub const NAME: &str = "cluster";
/// The provider name of the state received from the feed.
pub const PROVIDER: &str = "cluster";
/// What the state waits for until this agent knows its role (see `StateHub::expect`).
const PLAN: &str = "cluster role";

/// What this agent is in the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RoleSetting {
    /// From the local engine: Swarm leader, other manager, worker, or no Swarm (standalone).
    /// Without the cluster secret every agent is standalone.
    #[default]
    Auto,
    /// No feed: the agent orders its own certificates and routes what its providers see.
    Standalone,
    /// Serves the feed and orders the certificates.
    Leader,
    /// Serves the feed; follows `cluster.peers` (the leader) for certificates and challenges.
    Manager,
    /// Follows `cluster.peers` for the state, certificates and challenges.
    Worker,
}

/// The `[cluster]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub role: RoleSetting,
    /// Where managers serve the feed (TCP, mutual TLS).
    pub listen: SocketAddr,
    /// Where every agent lets the others reach the tasks of its node (TCP, mutual TLS; the
    /// port is the same on every node).
    pub hop_listen: SocketAddr,
    /// Feeds to follow (`host:port`), in order of preference. Empty: from the engine (the
    /// leader for managers, every manager for workers) at `listen`'s port.
    pub peers: Vec<String>,
    /// The cluster credential (`meshgate --new-cluster-secret`; a Docker secret in a Swarm).
    pub secret_file: PathBuf,
    /// Where a follower keeps the last state it received, to serve it after a restart while
    /// no manager answers. Unset: kept in memory only.
    pub state_file: Option<PathBuf>,
    /// A quiet feed sends a heartbeat this often.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A feed silent for this long is given up for the next peer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            role: RoleSetting::Auto,
            listen: SocketAddr::from(([0, 0, 0, 0], 7380)),
            hop_listen: SocketAddr::from(([0, 0, 0, 0], 7381)),
            peers: Vec::new(),
            secret_file: PathBuf::from("/run/secrets/meshgate_cluster"),
            state_file: None,
            heartbeat: Duration::from_secs(2),
            timeout: Duration::from_secs(6),
        }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if matches!(self.role, RoleSetting::Manager | RoleSetting::Worker) && self.peers.is_empty() {
            let role = if self.role == RoleSetting::Manager { "manager" } else { "worker" };
            return Err(Invalid::new(
                "cluster.role",
                role,
                "needs cluster.peers (the managers' feed addresses, e.g. 10.0.0.1:7380), or role = \"auto\" to take them from the engine",
            ));
        }
        if self.heartbeat.is_zero() || self.timeout <= self.heartbeat {
            return Err(Invalid::new(
                "cluster.timeout",
                humantime::format_duration(self.timeout),
                format!("longer than cluster.heartbeat ({})", humantime::format_duration(self.heartbeat)),
            ));
        }
        Ok(())
    }
}

/// Why a part of the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the cluster secret cannot be used for TLS: {0}")]
    Tls(rustls::Error),
    #[error("cannot listen on {addr} for {what}: {error} (set {key})")]
    Listen { what: &'static str, key: &'static str, addr: SocketAddr, error: std::io::Error },
}

/// What this agent does, derived from the setting and the engine's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    role: &'static str,
    serve: bool,
    issuer: bool,
    /// Peers to follow, and whether their state replaces the local view.
    follow: Option<(Vec<String>, bool)>,
}

fn plan(cfg: &ClusterConfig, position: &Position) -> Option<Plan> {
    let port = cfg.listen.port();
    let peers = |addrs: &[IpAddr]| {
        if cfg.peers.is_empty() {
            addrs.iter().map(|a| SocketAddr::new(*a, port).to_string()).collect()
        } else {
            cfg.peers.clone()
        }
    };
    let standalone = Plan { role: "standalone", serve: false, issuer: true, follow: None };
    Some(match (cfg.role, position) {
        (RoleSetting::Standalone, _) | (RoleSetting::Auto, Position::Standalone) => standalone,
        (RoleSetting::Leader, _) | (RoleSetting::Auto, Position::Manager { leader: true, .. }) => {
            Plan { role: "leader", serve: true, issuer: true, follow: None }
        }
        (RoleSetting::Manager, _) => {
            Plan { role: "manager", serve: true, issuer: false, follow: Some((cfg.peers.clone(), false)) }
        }
        (RoleSetting::Auto, Position::Manager { leader: false, leader_address }) => Plan {
            role: "manager",
            serve: true,
            issuer: false,
            follow: Some((peers(leader_address.as_slice()), false)),
        },
        (RoleSetting::Worker, _) => {
            Plan { role: "worker", serve: false, issuer: false, follow: Some((cfg.peers.clone(), true)) }
        }
        (RoleSetting::Auto, Position::Worker { managers }) => {
            Plan { role: "worker", serve: false, issuer: false, follow: Some((peers(managers), true)) }
        }
        (RoleSetting::Auto, Position::Unknown) => return None,
    })
}

/// The certificate side of the agent, when HTTPS runs: where certificates are stored and
/// which challenges are answered.
#[derive(Clone)]
pub struct CertShare {
    pub store: Arc<Store>,
    pub challenges: Arc<Challenges>,
    /// Tells the certificate watcher to reload at once.
    pub reload: Arc<Notify>,
    /// On-demand certificates wanted on followers, on their way to the issuer.
    pub relay: Arc<crate::acme::on_demand::Relay>,
}

/// Feed metrics.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub issuer: IntGauge,
    pub feed_connected: IntGauge,
    pub stale: IntGauge,
    pub state_received: IntGauge,
    pub followers: IntGauge,
    pub reconnects: IntCounter,
}

impl ClusterMetrics {
    fn register(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| register(registry, IntGauge::with_opts(Opts::new(name, help)));
        let reconnects = register(
            registry,
            IntCounter::with_opts(Opts::new(
                "meshgate_cluster_reconnects_total",
                "Times this follower lost its feed and connected again (to the same or another manager)",
            )),
        );
        Self {
            issuer: gauge("meshgate_cluster_issuer", "1 if this agent orders the cluster's certificates"),
            feed_connected: gauge(
                "meshgate_cluster_feed_connected",
                "1 while this follower receives a manager's feed",
            ),
            stale: gauge(
                "meshgate_cluster_state_stale",
                "1 while this follower serves a state no manager confirms (none reachable)",
            ),
            state_received: gauge(
                "meshgate_cluster_state_received_timestamp_seconds",
                "When this follower last heard from a manager (Unix time)",
            ),
            followers: gauge("meshgate_cluster_followers", "Agents following this agent's feed"),
            reconnects,
        }
    }
}

/// Everything the cluster task needs from the agent.
pub struct Parts {
    pub hub: Arc<StateHub>,
    pub readiness: Arc<Readiness>,
    pub registry: Registry,
    pub certs: Option<CertShare>,
    /// This node's name, for the feed's hello and logs.
    pub node: String,
    /// Turns true when the agent stops, and the time it gives requests in flight.
    pub shutdown: (watch::Receiver<bool>, Duration),
}

/// The handles the rest of the agent keeps: whether this agent orders certificates, the
/// Docker provider's link, and the way to other nodes' tasks (with the cluster credential).
pub struct Handles {
    pub issuer: watch::Receiver<bool>,
    pub docker: DockerLink,
    pub hop: Option<Arc<hop::Dialer>>,
    /// The hop server, which the agent waits for when it stops.
    pub hop_server: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the cluster task. Without the credential (or with `role = standalone`) it only
/// says the agent is standalone, and the agent orders its own certificates.
pub fn start(cfg: ClusterConfig, parts: Parts, background: &mut Vec<tokio::task::JoinHandle<()>>) -> Handles {
    let (position_tx, position_rx) = watch::channel(Position::Unknown);
    let (following_tx, following_rx) = watch::channel(false);
    let (issuer_tx, issuer_rx) = watch::channel(true);
    let mut handles = Handles {
        issuer: issuer_rx,
        docker: DockerLink { position: position_tx, following: following_rx },
        hop: None,
        hop_server: None,
    };
    let metrics = ClusterMetrics::register(&parts.registry);
    metrics.issuer.set(1);
    if cfg.role == RoleSetting::Standalone {
        return handles;
    }
    let identity = match identity::Identity::load(&cfg.secret_file) {
        Ok(identity) => identity,
        Err(e) if cfg.role == RoleSetting::Auto => {
            tracing::info!("cluster: standalone ({e}); in a Swarm, give every agent the cluster secret so workers see the whole cluster and one agent orders the certificates");
            background.push(tokio::spawn(warn_if_swarm(position_rx)));
            return handles;
        }
        Err(e) => {
            tracing::error!("cluster: {e}; this agent cannot join the cluster");
            parts.readiness.set(NAME, false, e.to_string());
            return handles;
        }
    };
    // Until the engine says whether this node follows a feed, the state may be half of it.
    parts.hub.expect(PLAN);
    match hop::start(cfg.hop_listen, &identity, parts.hub.clone(), parts.shutdown.clone()) {
        Ok((dialer, server)) => {
            handles.hop = Some(dialer);
            handles.hop_server = Some(server);
        }
        Err(e) => tracing::error!("cluster: {e}; tasks on this node cannot be reached from the other nodes"),
    }
    issuer_tx.send_replace(cfg.role == RoleSetting::Leader);
    if cfg.role == RoleSetting::Auto {
        parts.readiness.set(
            NAME,
            false,
            "waiting for the engine to say whether this node is a Swarm manager or worker",
        );
    }
    background.push(tokio::spawn(run(cfg, identity, parts, metrics, position_rx, issuer_tx, following_tx)));
    handles
}

/// Without the credential, a Swarm node is told once what it misses.
async fn warn_if_swarm(mut position: watch::Receiver<Position>) {
    loop {
        if matches!(&*position.borrow_and_update(), Position::Manager { .. } | Position::Worker { .. }) {
            tracing::warn!("cluster: this node is in a Swarm but has no cluster secret: on workers only local tasks are routed, and every agent orders its own certificates (see \"Deploy on a Swarm\" in the README)");
            return;
        }
        if position.changed().await.is_err() {
            return;
        }
    }
}

/// Applies the plan of each new position: issuer or not, serving or not, following whom.
async fn run(
    cfg: ClusterConfig,
    identity: identity::Identity,
    parts: Parts,
    metrics: ClusterMetrics,
    mut position: watch::Receiver<Position>,
    issuer: watch::Sender<bool>,
    following: watch::Sender<bool>,
) {
    let parts = Arc::new(parts);
    let mut current: Option<Plan> = None;
    let mut server: Option<tokio::task::JoinHandle<()>> = None;
    let mut follower: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let next = plan(&cfg, &position.borrow_and_update());
        if next.is_some() && next != current {
            let p = next.clone().expect("checked");
            tracing::info!(role = p.role, serve = p.serve, issuer = p.issuer, follow = %p.follow.as_ref().map(|f| f.0.join(",")).unwrap_or_default(), "cluster: role");
            issuer.send_replace(p.issuer);
            metrics.issuer.set(i64::from(p.issuer));
            if p.serve && server.is_none() {
                match serve::bind(&cfg, &identity) {
                    Ok(bound) => {
                        let src = serve::Source {
                            hub: parts.hub.clone(),
                            certs: parts.certs.clone(),
                            node: parts.node.clone(),
                            leader: issuer.subscribe(),
                            heartbeat: cfg.heartbeat,
                            followers: metrics.followers.clone(),
                        };
                        server = Some(tokio::spawn(serve::run(bound, src)));
                    }
                    Err(e) => {
                        tracing::error!("cluster: {e}");
                        parts.readiness.set(NAME, false, e.to_string());
                    }
                }
            } else if !p.serve {
                if let Some(s) = server.take() {
                    s.abort();
                }
            }
            if p.follow != current.as_ref().and_then(|c| c.follow.clone()) {
                if let Some(f) = follower.take() {
                    f.abort();
                }
                let takes_state = p.follow.as_ref().is_some_and(|(_, take)| *take);
                if takes_state {
                    // The proxy waits for the feed's first state (or its failure) to serve.
                    parts.hub.expect(PROVIDER);
                }
                if !takes_state && *following.borrow() {
                    // No longer a worker (promoted): the engine is the source now, the
                    // feed's last state must not linger beside it.
                    parts.hub.publish(PROVIDER, crate::state::MeshState::default());
                }
                following.send_replace(takes_state);
                if let Some((peers, take_state)) = p.follow.clone() {
                    let f = follow::Follower {
                        cfg: cfg.clone(),
                        identity: identity.clone(),
                        parts: parts.clone(),
                        metrics: metrics.clone(),
                        peers,
                        take_state,
                        role: p.role,
                    };
                    follower = Some(tokio::spawn(f.run()));
                } else {
                    metrics.feed_connected.set(0);
                    metrics.stale.set(0);
                }
            }
            if p.follow.is_none() {
                let what = if p.serve {
                    format!("{}: serving the feed on {}", p.role, cfg.listen)
                } else {
                    p.role.to_owned()
                };
                parts.readiness.set(NAME, server.is_some() || !p.serve, what);
            }
            current = next;
            parts.hub.fulfil(PLAN);
        }
        if position.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_follows_the_engine_and_the_setting() {
        let cfg = ClusterConfig::default();
        let leader = Position::Manager { leader: true, leader_address: Some([10, 0, 0, 1].into()) };
        let manager = Position::Manager { leader: false, leader_address: Some([10, 0, 0, 1].into()) };
        let worker = Position::Worker { managers: vec![[10, 0, 0, 1].into(), [10, 0, 0, 2].into()] };
        assert_eq!(plan(&cfg, &Position::Unknown), None, "nothing is decided before the engine answers");
        let p = plan(&cfg, &Position::Standalone).unwrap();
        assert!(p.issuer && !p.serve && p.follow.is_none());
        let p = plan(&cfg, &leader).unwrap();
        assert!(p.issuer && p.serve && p.follow.is_none());
        let p = plan(&cfg, &manager).unwrap();
        assert!(!p.issuer && p.serve);
        assert_eq!(
            p.follow,
            Some((vec!["10.0.0.1:7380".to_owned()], false)),
            "a manager follows the leader, for certificates only"
        );
        let p = plan(&cfg, &worker).unwrap();
        assert!(!p.issuer && !p.serve);
        assert_eq!(
            p.follow,
            Some((vec!["10.0.0.1:7380".to_owned(), "10.0.0.2:7380".to_owned()], true)),
            "a worker follows every manager, for everything"
        );
        let fixed = ClusterConfig {
            role: RoleSetting::Worker,
            peers: vec!["m:1".into()],
            ..ClusterConfig::default()
        };
        assert_eq!(plan(&fixed, &Position::Unknown).unwrap().follow, Some((vec!["m:1".to_owned()], true)));
        assert!(ClusterConfig { role: RoleSetting::Worker, ..ClusterConfig::default() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cluster.peers"));
    }
}
