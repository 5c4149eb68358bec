//! One resync: what runs on the engine, turned into a [`MeshState`].
//!
//! - Standalone and Compose containers: one service per Compose service (replicas are its
//!   tasks), else per container; running ones only, and with a health check only while
//!   healthy.
//! - On a Swarm manager: every service with its running tasks and published ports. A task's
//!   address is read from its container when the task runs on this node.
//! - On a Swarm worker (the Swarm API is refused): the local containers of Swarm tasks,
//!   grouped by their `com.docker.swarm.service.name` label.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use bollard::models::{ContainerSummary, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, LocalNodeState, TaskState};
use bollard::query_parameters::{ListContainersOptions, ListTasksOptions};
use bollard::Docker;

use super::optin::{self, Defaults, Workload};
use super::{DockerConfig, NAME};
use crate::state::{Health, L4Protocol, MeshState, PublishedPort, Service, Task};

const SWARM_SERVICE: &str = "com.docker.swarm.service.name";
const SWARM_TASK: &str = "com.docker.swarm.task.id";
const STACK: &str = "com.docker.stack.namespace";
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// What never changes for a container: read once with an inspect, then cached.
struct Inspected {
    env: BTreeMap<String, String>,
    exposed: Vec<u16>,
}

pub struct Discovery {
    defaults: Defaults,
    network: Option<String>,
    inspected: HashMap<String, Inspected>,
    mode: &'static str,
    said_worker: bool,
}

/// A container as a task candidate.
struct Member<'a> {
    summary: &'a ContainerSummary,
    name: String,
}

fn env_map(env: Option<Vec<String>>) -> BTreeMap<String, String> {
    env.unwrap_or_default().into_iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect()
}

fn ports_of(exposed: Option<Vec<String>>) -> Vec<u16> {
    exposed.unwrap_or_default().iter().filter(|p| p.ends_with("/tcp")).filter_map(|p| p.trim_end_matches("/tcp").parse().ok()).collect()
}

/// Health from the list's status text: `Up 3 minutes (healthy)`, `(health: starting)`.
fn health_of(status: Option<&str>) -> Health {
    match status.unwrap_or("") {
        s if s.contains("(healthy)") => Health::Healthy,
        s if s.contains("(unhealthy)") => Health::Unhealthy,
        s if s.contains("(health: starting)") => Health::Starting,
        _ => Health::Unknown,
    }
}

/// The container's addresses by network name.
fn networks_of(c: &ContainerSummary) -> BTreeMap<String, IpAddr> {
    c.network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|nets| {
            nets.iter()
                .filter_map(|(name, ep)| Some((name.clone(), ep.ip_address.as_deref()?.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The network a task is reached on: the one the workload names, else the configured one,
/// else the first by name (deterministic on every node).
fn choose_network(networks: &BTreeMap<String, IpAddr>, wanted: Option<&str>, configured: Option<&str>, who: &str, problems: &mut Vec<String>) -> Option<(String, IpAddr)> {
    for name in [wanted, configured].into_iter().flatten() {
        if let Some(ip) = networks.get(name) {
            return Some((name.to_owned(), *ip));
        }
    }
    if let Some(name) = wanted {
        problems.push(format!("{who}: network `{name}` (from its labels) is not one of its networks ({}); using another", networks.keys().cloned().collect::<Vec<_>>().join(", ")));
    }
    networks.iter().next().map(|(n, ip)| (n.clone(), *ip))
}

impl Discovery {
    pub fn new(cfg: &DockerConfig) -> Self {
        Self {
            defaults: Defaults { expose_by_default: cfg.expose_by_default, default_domain: cfg.default_domain.clone() },
            network: cfg.network.clone(),
            inspected: HashMap::new(),
            mode: "containers",
            said_worker: false,
        }
    }

    /// What this engine is to us, for logs and `/readyz`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Lists everything and builds the state, plus the problems found in opt-in settings.
    pub async fn resync(&mut self, docker: &Docker) -> Result<(MeshState, Vec<String>), bollard::errors::Error> {
        let info = docker.info().await?;
        let node = info.name.clone().unwrap_or_else(|| "local".into());
        let swarm = info.swarm.as_ref();
        let in_swarm = swarm.and_then(|s| s.local_node_state.as_ref()) == Some(&LocalNodeState::ACTIVE);
        let manager = in_swarm && swarm.and_then(|s| s.control_available) == Some(true);
        self.mode = match (in_swarm, manager) {
            (true, true) => "swarm manager",
            (true, false) => "swarm worker",
            _ => "containers",
        };
        if in_swarm && !manager && !self.said_worker {
            tracing::warn!("this engine is a Swarm worker: only the tasks running on this node are routed; the cluster-wide view needs a manager endpoint (docker.endpoint)");
            self.said_worker = true;
        }

        let containers = docker.list_containers(Some(ListContainersOptions { all: false, ..Default::default() })).await?;
        let live: HashSet<&str> = containers.iter().filter_map(|c| c.id.as_deref()).collect();
        self.inspected.retain(|id, _| live.contains(id.as_str()));
        for id in live {
            if !self.inspected.contains_key(id) {
                // A container that vanished between list and inspect is simply skipped.
                if let Ok(c) = docker.inspect_container(id, None).await {
                    let config = c.config.unwrap_or_default();
                    self.inspected.insert(id.to_owned(), Inspected { env: env_map(config.env), exposed: ports_of(config.exposed_ports) });
                }
            }
        }

        let mut problems = Vec::new();
        let mut services = Vec::new();
        // Containers grouped into services (Swarm tasks only when no manager view covers them).
        let mut groups: BTreeMap<(String, Option<String>), Vec<Member<'_>>> = BTreeMap::new();
        for c in &containers {
            let labels = c.labels.as_ref();
            let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
            let name = c.names.as_ref().and_then(|n| n.first()).map_or_else(|| "?".into(), |n| n.trim_start_matches('/').to_owned());
            let key = if let Some(svc) = label(SWARM_SERVICE) {
                if manager {
                    continue;
                }
                (svc, label(STACK))
            } else if let (Some(project), Some(svc)) = (label(COMPOSE_PROJECT), label(COMPOSE_SERVICE)) {
                (format!("{project}_{svc}"), Some(project))
            } else {
                (name.clone(), None)
            };
            groups.entry(key).or_default().push(Member { summary: c, name });
        }
        for ((name, stack), mut members) in groups {
            members.sort_by(|a, b| a.name.cmp(&b.name));
            let first = &members[0];
            let Some(inspected) = first.summary.id.as_deref().and_then(|id| self.inspected.get(id)) else { continue };
            let empty = HashMap::new();
            let labels = first.summary.labels.as_ref().unwrap_or(&empty);
            let opt = optin::read(&Workload { env: &inspected.env, labels, exposed_ports: &inspected.exposed, name: &name }, &self.defaults);
            problems.extend(opt.problems.iter().map(|p| format!("container `{}`: {p}", first.name)));
            if opt.routes.is_empty() {
                continue;
            }
            let tasks = members
                .iter()
                .filter_map(|m| {
                    let who = format!("container `{}`", m.name);
                    let (network, address) = choose_network(&networks_of(m.summary), opt.network.as_deref(), self.network.as_deref(), &who, &mut problems)?;
                    let id = m.summary.labels.as_ref().and_then(|l| l.get(SWARM_TASK)).map_or_else(|| m.name.clone(), |_| m.name.clone());
                    Some(Task { id, address, port: None, node: node.clone(), health: health_of(m.summary.status.as_deref()), network: Some(network) })
                })
                .collect();
            services.push(Service { name, stack, provider: NAME.into(), tasks, http: opt.routes, l4: Vec::new() });
        }

        if manager {
            self.swarm_services(docker, &containers, &node, &mut services, &mut problems).await?;
        }
        Ok((MeshState { services, problems: problems.clone() }, problems))
    }

    /// Every Swarm service with its running tasks; addresses from local task containers.
    async fn swarm_services(
        &self,
        docker: &Docker,
        containers: &[ContainerSummary],
        node: &str,
        services: &mut Vec<Service>,
        problems: &mut Vec<String>,
    ) -> Result<(), bollard::errors::Error> {
        let by_id: HashMap<&str, &ContainerSummary> = containers.iter().filter_map(|c| Some((c.id.as_deref()?, c))).collect();
        let nodes: HashMap<String, String> = docker
            .list_nodes(None)
            .await?
            .into_iter()
            .filter_map(|n| Some((n.id?, n.description.and_then(|d| d.hostname).unwrap_or_default())))
            .collect();
        let filters = [("desired-state".to_owned(), vec!["running".to_owned()])].into();
        let tasks = docker.list_tasks(Some(ListTasksOptions { filters: Some(filters) })).await?;
        let mut list = docker.list_services(None).await?;
        list.sort_by(|a, b| a.spec.as_ref().and_then(|s| s.name.clone()).cmp(&b.spec.as_ref().and_then(|s| s.name.clone())));
        for svc in list {
            let (Some(id), Some(spec)) = (svc.id.clone(), svc.spec.clone()) else { continue };
            let name = spec.name.clone().unwrap_or_else(|| id.clone());
            let labels = spec.labels.clone().unwrap_or_default();
            let container_spec = spec.task_template.as_ref().and_then(|t| t.container_spec.clone()).unwrap_or_default();
            let env = env_map(container_spec.env);
            let ports: Vec<_> = svc.endpoint.as_ref().and_then(|e| e.ports.clone()).unwrap_or_default();
            let targets: Vec<u16> = ports.iter().filter_map(|p| u16::try_from(p.target_port?).ok()).collect();
            let opt = optin::read(&Workload { env: &env, labels: &labels, exposed_ports: &targets, name: &name }, &self.defaults);
            problems.extend(opt.problems.iter().map(|p| format!("service `{name}`: {p}")));
            let l4: Vec<PublishedPort> = ports
                .iter()
                .filter_map(|p| {
                    Some(PublishedPort {
                        protocol: match p.protocol {
                            Some(EndpointPortConfigProtocolEnum::UDP) => L4Protocol::Udp,
                            Some(EndpointPortConfigProtocolEnum::TCP) | None => L4Protocol::Tcp,
                            _ => return None,
                        },
                        published: u16::try_from(p.published_port?).ok()?,
                        target: u16::try_from(p.target_port?).ok()?,
                        local_only: p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST),
                    })
                })
                .collect();
            if opt.routes.is_empty() && l4.is_empty() {
                continue;
            }
            let mut service_tasks = Vec::new();
            for t in tasks.iter().filter(|t| t.service_id.as_deref() == Some(id.as_str())) {
                if t.status.as_ref().and_then(|s| s.state.as_ref()) != Some(&TaskState::RUNNING) {
                    continue;
                }
                let task_name = format!("{name}.{}.{}", t.slot.unwrap_or(0), t.id.as_deref().unwrap_or(""));
                let Some(container) = t
                    .status
                    .as_ref()
                    .and_then(|s| s.container_status.as_ref())
                    .and_then(|c| c.container_id.as_deref())
                    .and_then(|cid| by_id.get(cid))
                else {
                    // TODO(cluster view): tasks on other nodes need their overlay address from a
                    // manager-side feed (issue 7); until then only local tasks are routed.
                    continue;
                };
                let who = format!("service `{name}` task `{task_name}`");
                let Some((network, address)) = choose_network(&networks_of(container), opt.network.as_deref(), self.network.as_deref(), &who, problems) else { continue };
                let task_node = t.node_id.as_ref().and_then(|n| nodes.get(n)).cloned().unwrap_or_else(|| node.to_owned());
                service_tasks.push(Task { id: task_name, address, port: None, node: task_node, health: health_of(container.status.as_deref()), network: Some(network) });
            }
            services.push(Service { name, stack: labels.get(STACK).cloned(), provider: NAME.into(), tasks: service_tasks, http: opt.routes, l4 });
        }
        Ok(())
    }
}
