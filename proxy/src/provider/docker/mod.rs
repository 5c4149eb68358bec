//! The Docker provider: containers, Compose projects and Swarm services that opt in
//! (see [`optin`]), followed through the engine's event stream.
//!
//! Every relevant event marks the state dirty; after a short debounce one resync lists
//! what runs and publishes one snapshot, so a burst of starts costs one rebuild. A
//! container's environment is read once (it never changes) and cached. When the engine
//! goes away the last routes stay in force; the provider reconnects with capped backoff
//! and resyncs. It never blocks the other providers.

mod htpasswd;
mod optin;
mod raw;
mod traefik_middleware;
pub mod traefik_rule;
mod workloads;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::StateHub;

/// The provider name used in the hub, metrics and `/api/state`.
pub const NAME: &str = "docker";
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";
/// How often a manager checks the Swarm's tasks for changes on other nodes.
const TASK_POLL: Duration = Duration::from_secs(1);

/// Whether Docker discovery runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DockerMode {
    /// On when `DOCKER_HOST` is set or the default socket exists.
    #[default]
    Auto,
    /// Always on (waits for the engine if it is not there yet).
    On,
    Off,
}

/// The `[docker]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    pub mode: DockerMode,
    /// Engine address (`unix:///path`, `tcp://host:2376` with `DOCKER_TLS_VERIFY` and
    /// `DOCKER_CERT_PATH` as the docker CLI reads them). Unset: `DOCKER_HOST`, else the
    /// default socket.
    pub endpoint: Option<String>,
    /// Route containers and services that did not opt in (Traefik's `exposedByDefault`).
    pub expose_by_default: bool,
    /// With `expose_by_default`: workloads without a host get `<name>.<default_domain>`.
    pub default_domain: Option<String>,
    /// Traefik's `serversTransport.insecureSkipVerify`: Traefik-labelled https services are
    /// not verified (by default they are, against the public web roots, as Traefik does).
    pub traefik_insecure_skip_verify: bool,
    /// Traefik entrypoint names served on the HTTP listener (a router on another one is
    /// refused).
    pub traefik_entrypoints_http: Vec<String>,
    /// Traefik entrypoint names served on the HTTPS listener.
    pub traefik_entrypoints_https: Vec<String>,
    /// The network to reach tasks on when a workload does not name one.
    pub network: Option<String>,
    /// nginx-proxy's htpasswd directory: a file named after a host holds its users.
    pub htpasswd_dir: Option<std::path::PathBuf>,
    /// Events closer together than this make one resync.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// A full resync also runs this often (Swarm tasks on other nodes send no events here).
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            mode: DockerMode::Auto,
            endpoint: None,
            expose_by_default: false,
            default_domain: None,
            traefik_insecure_skip_verify: false,
            traefik_entrypoints_http: vec!["web".into()],
            traefik_entrypoints_https: vec!["websecure".into()],
            network: None,
            htpasswd_dir: None,
            debounce: Duration::from_millis(100),
            resync_interval: Duration::from_secs(10),
        }
    }
}

impl DockerConfig {
    /// The engine address in effect.
    #[must_use]
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| DEFAULT_SOCKET.into())
    }

    /// Whether discovery should run, and if not, why (for the start-up log line).
    pub fn wanted(&self) -> Result<(), NotWanted> {
        match self.mode {
            DockerMode::On => Ok(()),
            DockerMode::Off => Err(NotWanted::Off),
            DockerMode::Auto => {
                let endpoint = self.endpoint();
                match endpoint.strip_prefix("unix://") {
                    Some(path) if !std::path::Path::new(path).exists() => {
                        Err(NotWanted::NoSocket(path.into()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Runs the provider until the task is dropped.
pub async fn run(
    cfg: DockerConfig,
    hub: Arc<StateHub>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut link: DockerLink,
) {
    let endpoint = cfg.endpoint();
    let up = metrics.provider_up.with_label_values(&[NAME]);
    readiness.set(NAME, false, format!("connecting to {endpoint}"));
    let mut discovery = workloads::Discovery::new(&cfg);
    let mut backoff = Duration::from_millis(250);
    let mut reported = false;
    let mut logged_problems = HashSet::new();
    loop {
        let error = match connect(&endpoint).await {
            Ok(docker) => {
                backoff = Duration::from_millis(250);
                let Err(ended) = session(
                    &docker,
                    &cfg,
                    &mut discovery,
                    &hub,
                    &metrics,
                    &readiness,
                    &up,
                    &mut logged_problems,
                    &mut link,
                )
                .await;
                reported = false;
                tracing::warn!(%endpoint, "lost the Docker engine ({ended}); the last known routes stay in force; reconnecting");
                continue_after(
                    &readiness,
                    &up,
                    &endpoint,
                    "engine connection lost; serving the last known routes",
                );
                None
            }
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            // No engine to wait for: the proxy serves what the other sources have.
            hub.fulfil(NAME);
            if !reported {
                tracing::warn!(%endpoint, "cannot reach the Docker engine: {e}; the other providers keep serving; retrying with backoff");
                reported = true;
            }
            continue_after(&readiness, &up, &endpoint, &format!("engine unreachable: {e}"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The name of a container that an event says is stopping: killed with SIGTERM or SIGKILL
/// (what `docker stop` and Swarm do first), or dead.
fn stopping_container(ev: &bollard::models::EventMessage) -> Option<&str> {
    if ev.typ != Some(bollard::models::EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let attributes = ev.actor.as_ref()?.attributes.as_ref()?;
    let stops = match ev.action.as_deref()? {
        "kill" => matches!(attributes.get("signal").map(String::as_str), Some("15" | "9")),
        "die" | "stop" => true,
        _ => false,
    };
    stops.then(|| attributes.get("name").map(String::as_str)).flatten()
}

fn continue_after(readiness: &Readiness, up: &prometheus::IntGauge, endpoint: &str, why: &str) {
    up.set(0);
    readiness.set(NAME, false, format!("{endpoint}: {why}"));
}

async fn connect(endpoint: &str) -> Result<Docker, bollard::errors::Error> {
    let docker = Docker::connect_with_host(endpoint)?;
    // Speak the engine's API version, whatever bollard was built for.
    let docker = docker.negotiate_version().await?;
    docker.ping().await?;
    Ok(docker)
}

#[allow(clippy::too_many_arguments)]
async fn session(
    docker: &Docker,
    cfg: &DockerConfig,
    discovery: &mut workloads::Discovery,
    hub: &StateHub,
    metrics: &Metrics,
    readiness: &Readiness,
    up: &prometheus::IntGauge,
    logged_problems: &mut HashSet<String>,
    link: &mut DockerLink,
) -> Result<std::convert::Infallible, Lost> {
    // Subscribe first, then list: nothing that happens in between is missed.
    let filters =
        [("type".to_owned(), vec!["container".into(), "service".into(), "node".into(), "network".into()])]
            .into();
    let mut events = docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
    let mut resync =
        async |discovery: &mut workloads::Discovery, leave_swarm_tasks: bool| -> Result<(), Lost> {
            let workloads::Found { state, problems, position } =
                discovery.resync(docker, leave_swarm_tasks).await?;
            link.position.send_if_modified(|p| std::mem::replace(p, position.clone()) != position);
            for p in &problems {
                if logged_problems.insert(p.clone()) {
                    tracing::warn!("{p}; skipped, the other routes are kept");
                }
            }
            let services = state.services.len();
            let generation = hub.publish(NAME, state);
            metrics.provider_reloads.with_label_values(&[NAME]).inc();
            tracing::debug!(services, generation, "docker state published");
            Ok(())
        };
    let mut following = link.following.clone();
    let leave = *following.borrow_and_update();
    resync(discovery, leave).await?;
    tracing::info!(endpoint = %cfg.endpoint(), mode = discovery.mode(), "following the Docker engine");
    up.set(1);
    readiness.set(NAME, true, format!("following {} ({})", cfg.endpoint(), discovery.mode()));

    let mut dirty_since: Option<tokio::time::Instant> = None;
    let mut periodic = tokio::time::interval(cfg.resync_interval);
    periodic.tick().await;
    // A manager learns of task changes on other nodes by polling the task API (cheap: one
    // request), so that the whole cluster stops routing to a stopped task within a second.
    let mut task_poll = tokio::time::interval(TASK_POLL);
    task_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks_seen = discovery.tasks_fingerprint(docker).await;
    loop {
        let debounce = async {
            match dirty_since {
                Some(t) => tokio::time::sleep_until(t + cfg.debounce).await,
                None => std::future::pending().await,
            }
        };
        let now = tokio::select! {
            event = events.next() => match event {
                Some(Ok(ev)) => {
                    let action = ev.action.as_deref().unwrap_or("");
                    if let Some(name) = stopping_container(&ev) {
                        // Out of routing now, not at the next resync: requests stop going to
                        // a task that is going away, here and (their hops refused) elsewhere.
                        if hub.amend(NAME, |state| state.forget_task(name)).is_some() {
                            tracing::debug!(task = name, "container stopping: out of routing");
                        }
                    }
                    if !action.starts_with("exec_") && dirty_since.is_none() {
                        dirty_since = Some(tokio::time::Instant::now());
                    }
                    false
                }
                Some(Err(e)) => return Err(Lost::Events(e)),
                None => return Err(Lost::EventsEnded),
            },
            () = debounce => {
                dirty_since = None;
                true
            }
            _ = periodic.tick() => true,
            _ = task_poll.tick(), if tasks_seen.is_some() => {
                let now = discovery.tasks_fingerprint(docker).await;
                let changed = now != tasks_seen;
                tasks_seen = now;
                changed
            }
            // The cluster feed took over the Swarm tasks, or gave them back.
            Ok(()) = following.changed() => true,
        };
        if now {
            let leave = *following.borrow_and_update();
            resync(discovery, leave).await?;
            if tasks_seen.is_none() {
                // A node promoted to manager starts polling.
                tasks_seen = discovery.tasks_fingerprint(docker).await;
            }
        }
    }
}

/// Why Docker discovery does not run.
#[derive(Debug, thiserror::Error)]
pub enum NotWanted {
    #[error("Docker discovery is off (docker.mode = \"off\")")]
    Off,
    #[error("no Docker socket at {}", .0.display())]
    NoSocket(std::path::PathBuf),
}

/// Why following the engine stopped (it is reconnected to with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error(transparent)]
    Resync(#[from] workloads::ResyncError),
    #[error("{0}")]
    Events(bollard::errors::Error),
    #[error("the event stream ended")]
    EventsEnded,
}

/// Where the local engine puts this node, as the Docker provider last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Position {
    /// The engine has not answered yet.
    #[default]
    Unknown,
    /// Not in a Swarm.
    Standalone,
    Manager {
        leader: bool,
        leader_address: Option<IpAddr>,
    },
    Worker {
        managers: Vec<IpAddr>,
    },
}

/// The links between the cluster and the Docker provider.
#[derive(Clone)]
pub struct DockerLink {
    /// Written by the provider after every resync.
    pub position: watch::Sender<Position>,
    /// True while this agent takes its state from a feed: the provider then leaves the
    /// local containers of Swarm tasks to it.
    pub following: watch::Receiver<bool>,
}
