//! One resync: what runs on the engine, turned into a [`MeshState`].
//!
//! - Standalone and Compose containers: one service per Compose service (replicas are its
//!   tasks), else per container; running ones only, and with a health check only while
//!   healthy.
//! - On a Swarm manager: every service with its running tasks and published ports. A task's
//!   addresses come from the task API (`NetworksAttachments`, known on every manager for
//!   every node), its health from its container when it runs here.
//! - On a Swarm worker (the Swarm API is refused): the local containers of Swarm tasks,
//!   grouped by their `com.docker.swarm.service.name` label.
//!
//! Every task is node-local (see [`Task::node_local`]): the state also says how this node
//! reaches its own tasks (`local_addresses`): on a network the agent shares with the task,
//! or a bridge of this host, the task's address there; on an overlay network, from the host
//! namespace, its `docker_gwbridge` address (the overlay itself is reached only from inside).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use bollard::models::{
    ContainerSummary, EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    LocalNodeState,
};
use bollard::query_parameters::{InspectNetworkOptions, ListContainersOptions};
use bollard::Docker;
use serde::Deserialize;

use super::optin::{self, Defaults, Workload};
use super::traefik_middleware::Catalogue;
use super::Position;
use super::{raw, DockerConfig, NAME};
use crate::state::{Health, HttpRoute, L4Protocol, MeshState, Node, PublishedPort, Service, Task};

const SWARM_SERVICE: &str = "com.docker.swarm.service.name";
const STACK: &str = "com.docker.stack.namespace";
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// The bridge that gives tasks on overlay networks a way out, and the host a way in.
const GWBRIDGE: &str = "docker_gwbridge";

/// What the list does not say about a container: read with an inspect, then cached until
/// the container's set of networks changes (aliases are per network).
struct Inspected {
    env: BTreeMap<String, String>,
    exposed: Vec<u16>,
    networks: BTreeSet<String>,
    aliases: HashMap<String, Vec<String>>,
}

pub struct Discovery {
    defaults: Defaults,
    htpasswd_dir: Option<std::path::PathBuf>,
    network: Option<String>,
    endpoint: String,
    inspected: HashMap<String, Inspected>,
    mode: &'static str,
    said_worker: bool,
    /// The networks of the agent's own container (empty when it runs on the host); read once.
    agent_networks: Option<BTreeSet<String>>,
}

/// What one resync found.
pub struct Found {
    pub state: MeshState,
    /// Opt-in settings that could not be used, and tasks that cannot be reached.
    pub problems: Vec<String>,
    pub position: Position,
}

/// The engine's own view of this node.
struct Engine {
    node: String,
    swarm: Option<bollard::models::SwarmInfo>,
    in_swarm: bool,
    manager: bool,
}

/// The engine's networks as far as reaching tasks goes.
#[derive(Default)]
struct Networks {
    /// Network name to driver (`bridge`, `overlay`, ...).
    drivers: HashMap<String, String>,
    /// Container id to its `docker_gwbridge` address.
    gateways: HashMap<String, IpAddr>,
}

impl Networks {
    async fn read(docker: &Docker) -> Result<Self, bollard::errors::Error> {
        let drivers = docker
            .list_networks(None)
            .await?
            .into_iter()
            .filter_map(|n| Some((n.name?, n.driver.unwrap_or_default())))
            .collect();
        // Absent until the first task on an overlay network starts on this node.
        let gateways = match docker.inspect_network(GWBRIDGE, None::<InspectNetworkOptions>).await {
            Ok(net) => net
                .containers
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(id, c)| Some((id, strip_prefix_len(c.ipv4_address.as_deref()?)?)))
                .collect(),
            Err(_) => HashMap::new(),
        };
        Ok(Self { drivers, gateways })
    }
}

/// `10.0.1.5/24` to `10.0.1.5`.
fn strip_prefix_len(cidr: &str) -> Option<IpAddr> {
    cidr.split('/').next()?.parse().ok()
}

/// A container as a task candidate.
struct Member<'a> {
    summary: &'a ContainerSummary,
    name: String,
}

/// What the resync builds up.
#[derive(Default)]
struct Building {
    services: Vec<Service>,
    problems: Vec<String>,
    local_addresses: BTreeMap<String, IpAddr>,
}

/// A task from the task API, with the fields bollard's model leaves out.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SwarmTask {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    #[serde(rename = "NodeID", default)]
    node_id: String,
    slot: Option<u64>,
    status: SwarmTaskStatus,
    #[serde(default)]
    networks_attachments: Vec<Attachment>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SwarmTaskStatus {
    state: String,
    container_status: Option<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerStatus {
    #[serde(rename = "ContainerID", default)]
    container_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Attachment {
    network: AttachedNetwork,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AttachedNetwork {
    spec: NetworkSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkSpec {
    name: String,
}

fn env_map(env: Option<Vec<String>>) -> BTreeMap<String, String> {
    env.unwrap_or_default()
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn ports_of(exposed: Option<Vec<String>>) -> Vec<u16> {
    exposed
        .unwrap_or_default()
        .iter()
        .filter(|p| p.ends_with("/tcp"))
        .filter_map(|p| p.trim_end_matches("/tcp").parse().ok())
        .collect()
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

/// Where the agent itself is attached, to prefer networks it shares with a task.
#[derive(Default)]
struct Reach<'a> {
    configured: Option<&'a str>,
    agent_networks: Option<&'a BTreeSet<String>>,
}

impl Reach<'_> {
    /// How this node reaches a task of its own that is `address` on `network`: there, if the
    /// agent is on that network too or the network is a bridge of this host (routed by the
    /// host); through `docker_gwbridge` if it is an overlay. `None`: not from here.
    fn local_address(
        &self,
        container: &str,
        network: &str,
        address: IpAddr,
        networks: &Networks,
    ) -> Option<IpAddr> {
        if self.agent_networks.is_some_and(|mine| mine.contains(network)) {
            return Some(address);
        }
        match networks.drivers.get(network).map(String::as_str) {
            Some("overlay") => networks.gateways.get(container).copied(),
            _ => Some(address),
        }
    }
}

/// The network a task is reached on: the one the workload names, else the configured one,
/// else one the agent shares with it, else the first by name (the same on every node).
/// Swarm's `ingress` network carries the routing mesh, not service traffic: it is used when
/// named, or when it is the task's only network.
fn choose_network(
    networks: &BTreeMap<String, IpAddr>,
    wanted: Option<&str>,
    reach: &Reach<'_>,
    who: &str,
    problems: &mut Vec<String>,
) -> Option<(String, IpAddr)> {
    for name in [wanted, reach.configured].into_iter().flatten() {
        if let Some(ip) = networks.get(name) {
            return Some((name.to_owned(), *ip));
        }
    }
    if let Some(name) = wanted {
        problems.push(format!(
            "{who}: network `{name}` (from its labels) is not one of its networks ({}); using another",
            networks.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut candidates = networks.iter().filter(|(n, _)| n.as_str() != "ingress");
    let shared = reach.agent_networks.and_then(|mine| candidates.clone().find(|(n, _)| mine.contains(*n)));
    // A service that only publishes ports has only `ingress`: its tasks are still reached
    // (from their node through docker_gwbridge, from others through that node).
    let ingress = || networks.get_key_value("ingress");
    shared.or_else(|| candidates.next()).or_else(ingress).map(|(n, ip)| (n.clone(), *ip))
}

/// The published ports of a service's endpoint.
fn published_ports(ports: &[EndpointPortConfig]) -> Vec<PublishedPort> {
    ports
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
        .collect()
}

/// The container's name without the leading `/`.
fn container_name(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map_or_else(|| "?".into(), |n| n.trim_start_matches('/').to_owned())
}

impl Discovery {
    pub fn new(cfg: &DockerConfig) -> Self {
        Self {
            defaults: Defaults {
                expose_by_default: cfg.expose_by_default,
                default_domain: cfg.default_domain.clone(),
                traefik_insecure_skip_verify: cfg.traefik_insecure_skip_verify,
                traefik_entrypoints: (
                    cfg.traefik_entrypoints_http.clone(),
                    cfg.traefik_entrypoints_https.clone(),
                ),
            },
            network: cfg.network.clone(),
            htpasswd_dir: cfg.htpasswd_dir.clone(),
            endpoint: cfg.endpoint(),
            inspected: HashMap::new(),
            mode: "containers",
            said_worker: false,
            agent_networks: None,
        }
    }

    /// What this engine is to us, for logs and `/readyz`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Lists everything and builds the state, plus the problems found in opt-in settings.
    /// With `leave_swarm_tasks` (a worker following the cluster feed), Swarm tasks are left
    /// to the feed, except for how this node reaches its own.
    pub async fn resync(&mut self, docker: &Docker, leave_swarm_tasks: bool) -> Result<Found, ResyncError> {
        let engine = self.engine(docker, leave_swarm_tasks).await?;
        self.learn_agent_networks(docker).await;
        let containers =
            docker.list_containers(Some(ListContainersOptions { all: false, ..Default::default() })).await?;
        self.refresh_inspected(docker, &containers).await;
        let networks = Networks::read(docker).await?;
        let mut out = Building::default();
        let services = if engine.manager { docker.list_services(None).await? } else { Vec::new() };
        let catalogue = catalogue(&containers, &services);
        let leave = engine.manager || leave_swarm_tasks;
        self.container_services(&containers, &engine.node, leave, &networks, &catalogue, &mut out);
        let mut nodes = Vec::new();
        if engine.manager {
            nodes = swarm_nodes(docker).await?;
            let found = (services, &catalogue);
            self.swarm_services(docker, &containers, found, &engine.node, &nodes, &networks, &mut out)
                .await?;
        } else if leave_swarm_tasks {
            self.own_swarm_tasks(&containers, &networks, &mut out);
        }
        let position = position_of(engine.swarm.as_ref(), engine.in_swarm, engine.manager, &nodes);
        let Building { services, problems, local_addresses } = out;
        let services = services.into_iter().map(std::sync::Arc::new).collect();
        let state = MeshState { services, problems: problems.clone(), nodes, local_addresses };
        Ok(Found { state, problems, position })
    }

    /// The engine's name for this node and its place in the Swarm.
    async fn engine(&mut self, docker: &Docker, leave_swarm_tasks: bool) -> Result<Engine, ResyncError> {
        let info = docker.info().await?;
        let swarm = info.swarm;
        let in_swarm =
            swarm.as_ref().and_then(|s| s.local_node_state.as_ref()) == Some(&LocalNodeState::ACTIVE);
        let manager = in_swarm && swarm.as_ref().and_then(|s| s.control_available) == Some(true);
        self.mode = match (in_swarm, manager) {
            (true, true) => "swarm manager",
            (true, false) => "swarm worker",
            _ => "containers",
        };
        if in_swarm && !manager && !leave_swarm_tasks && !self.said_worker {
            tracing::info!("this engine is a Swarm worker: until the cluster feed answers, only the tasks running on this node are routed");
            self.said_worker = true;
        }
        Ok(Engine { node: info.name.unwrap_or_else(|| "local".into()), swarm, in_swarm, manager })
    }

    /// The networks of the agent's own container, once (in a container, the hostname is the
    /// container id's prefix; on the host network nothing matches).
    async fn learn_agent_networks(&mut self, docker: &Docker) {
        if self.agent_networks.is_some() {
            return;
        }
        let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let own = docker.inspect_container(hostname.trim(), None).await.ok();
        let nets = own.and_then(|c| c.network_settings?.networks).map(|n| n.into_keys().collect());
        self.agent_networks = Some(nets.unwrap_or_default());
    }

    /// Inspects the containers not seen yet (or whose networks changed); forgets the gone.
    async fn refresh_inspected(&mut self, docker: &Docker, containers: &[ContainerSummary]) {
        let live: HashSet<&str> = containers.iter().filter_map(|c| c.id.as_deref()).collect();
        self.inspected.retain(|id, _| live.contains(id.as_str()));
        for c in containers {
            let Some(id) = c.id.as_deref() else { continue };
            let networks: BTreeSet<String> = networks_of(c).into_keys().collect();
            if self.inspected.get(id).is_some_and(|i| i.networks == networks) {
                continue;
            }
            // A container that vanished between list and inspect is simply skipped.
            let Ok(inspect) = docker.inspect_container(id, None).await else { continue };
            let short_id = &id[..id.len().min(12)];
            let aliases = inspect
                .network_settings
                .and_then(|n| n.networks)
                .unwrap_or_default()
                .into_iter()
                .map(|(net, ep)| {
                    (net, ep.aliases.unwrap_or_default().into_iter().filter(|a| a != short_id).collect())
                })
                .collect();
            let config = inspect.config.unwrap_or_default();
            let inspected = Inspected {
                env: env_map(config.env),
                exposed: ports_of(config.exposed_ports),
                networks,
                aliases,
            };
            self.inspected.insert(id.to_owned(), inspected);
        }
    }

    fn reach(&self) -> Reach<'_> {
        Reach { configured: self.network.as_deref(), agent_networks: self.agent_networks.as_ref() }
    }

    /// Containers grouped into services: Compose services, single containers, and Swarm
    /// tasks unless `leave_swarm_tasks` (a manager's task view, or the feed, covers them).
    fn container_services(
        &self,
        containers: &[ContainerSummary],
        node: &str,
        leave_swarm_tasks: bool,
        networks: &Networks,
        catalogue: &Catalogue,
        out: &mut Building,
    ) {
        let mut groups: BTreeMap<(String, Option<String>), Vec<Member<'_>>> = BTreeMap::new();
        for c in containers {
            let labels = c.labels.as_ref();
            let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
            let name = container_name(c);
            let key = if let Some(svc) = label(SWARM_SERVICE) {
                if leave_swarm_tasks {
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
            let Some(inspected) = first.summary.id.as_deref().and_then(|id| self.inspected.get(id)) else {
                continue;
            };
            let empty = HashMap::new();
            let labels = first.summary.labels.as_ref().unwrap_or(&empty);
            let opt = optin::read(
                &Workload {
                    env: &inspected.env,
                    labels,
                    exposed_ports: &inspected.exposed,
                    name: &name,
                    middlewares: catalogue,
                },
                &self.defaults,
            );
            out.problems.extend(opt.problems.iter().map(|p| format!("container `{}`: {p}", first.name)));
            // Workloads that did not opt in stay in the state without routes: mesh-dns
            // answers their names, the proxy exposes nothing of them.
            let tasks = members
                .iter()
                .filter_map(|m| self.container_task(m, node, opt.network.as_deref(), networks, out))
                .collect();
            out.services.push(Service {
                name,
                stack,
                provider: NAME.into(),
                tasks,
                http: self.with_htpasswd(opt.routes),
                l4: Vec::new(),
            });
        }
    }

    /// `routes` with the users of their hosts' htpasswd files, when there is a directory.
    fn with_htpasswd(&self, routes: Vec<HttpRoute>) -> Vec<HttpRoute> {
        match &self.htpasswd_dir {
            Some(dir) => super::htpasswd::apply(routes, dir),
            None => routes,
        }
    }

    /// One container as a task of this node, noting how this node reaches it.
    fn container_task(
        &self,
        m: &Member<'_>,
        node: &str,
        wanted: Option<&str>,
        networks: &Networks,
        out: &mut Building,
    ) -> Option<Task> {
        let reach = self.reach();
        let who = format!("container `{}`", m.name);
        let (network, address) =
            choose_network(&networks_of(m.summary), wanted, &reach, &who, &mut out.problems)?;
        let id = m.summary.id.as_deref().unwrap_or("");
        // A Swarm task's container is named like the task (`web.1.abc`).
        match reach.local_address(id, &network, address, networks) {
            Some(local) => {
                out.local_addresses.insert(m.name.clone(), local);
            }
            None => out.problems.push(unreachable_here(&who, &network)),
        }
        let aliases =
            self.inspected.get(id).and_then(|i| i.aliases.get(&network).cloned()).unwrap_or_default();
        Some(Task {
            id: m.name.clone(),
            address,
            port: None,
            node: node.to_owned(),
            health: health_of(m.summary.status.as_deref()),
            network: Some(network),
            aliases,
            node_local: true,
        })
    }

    /// A worker following the feed: the feed says which tasks exist, this engine how this
    /// node reaches the ones it runs.
    fn own_swarm_tasks(&self, containers: &[ContainerSummary], networks: &Networks, out: &mut Building) {
        let reach = self.reach();
        for c in
            containers.iter().filter(|c| c.labels.as_ref().is_some_and(|l| l.contains_key(SWARM_SERVICE)))
        {
            let name = container_name(c);
            let id = c.id.as_deref().unwrap_or("");
            let who = format!("container `{name}`");
            let Some((network, address)) =
                choose_network(&networks_of(c), None, &reach, &who, &mut Vec::new())
            else {
                continue;
            };
            if let Some(local) = reach.local_address(id, &network, address, networks) {
                out.local_addresses.insert(name, local);
            }
        }
    }

    /// Every Swarm service with its running tasks: addresses from the task API, health and
    /// the local address from the task's container when it runs here.
    #[allow(clippy::too_many_arguments)] // one resync's pieces, each read once
    async fn swarm_services(
        &self,
        docker: &Docker,
        containers: &[ContainerSummary],
        (mut list, catalogue): (Vec<bollard::models::Service>, &Catalogue),
        node: &str,
        nodes: &[Node],
        networks: &Networks,
        out: &mut Building,
    ) -> Result<(), ResyncError> {
        let by_id: HashMap<&str, &ContainerSummary> =
            containers.iter().filter_map(|c| Some((c.id.as_deref()?, c))).collect();
        let node_names: HashMap<&str, &str> =
            nodes.iter().map(|n| (n.id.as_str(), n.name.as_str())).collect();
        let tasks = self.running_tasks(docker).await?;
        list.sort_by(|a, b| {
            a.spec.as_ref().and_then(|s| s.name.clone()).cmp(&b.spec.as_ref().and_then(|s| s.name.clone()))
        });
        for svc in list {
            let (Some(id), Some(spec)) = (svc.id.clone(), svc.spec.clone()) else { continue };
            let name = spec.name.clone().unwrap_or_else(|| id.clone());
            let labels = spec.labels.clone().unwrap_or_default();
            let container_spec =
                spec.task_template.as_ref().and_then(|t| t.container_spec.clone()).unwrap_or_default();
            let env = env_map(container_spec.env);
            let ports: Vec<_> = svc.endpoint.as_ref().and_then(|e| e.ports.clone()).unwrap_or_default();
            let targets: Vec<u16> = ports.iter().filter_map(|p| u16::try_from(p.target_port?).ok()).collect();
            let opt = optin::read(
                &Workload {
                    env: &env,
                    labels: &labels,
                    exposed_ports: &targets,
                    name: &name,
                    middlewares: catalogue,
                },
                &self.defaults,
            );
            out.problems.extend(opt.problems.iter().map(|p| format!("service `{name}`: {p}")));
            let mut service_tasks = Vec::new();
            for t in tasks.iter().filter(|t| t.service_id == id && t.status.state == "running") {
                let task_node = node_names.get(t.node_id.as_str()).map_or(node, |n| *n);
                let container = t.status.container_status.as_ref().map(|c| c.container_id.as_str());
                let local = container.and_then(|cid| by_id.get(cid).copied());
                if let Some(task) =
                    self.swarm_task(&name, t, task_node, local, opt.network.as_deref(), networks, out)
                {
                    service_tasks.push(task);
                }
            }
            out.services.push(Service {
                name,
                stack: labels.get(STACK).cloned(),
                provider: NAME.into(),
                tasks: service_tasks,
                http: self.with_htpasswd(opt.routes),
                l4: published_ports(&ports),
            });
        }
        Ok(())
    }

    /// The tasks the orchestrator wants running (a task it is about to stop is left out
    /// already), from the task API.
    async fn running_tasks(&self, docker: &Docker) -> Result<Vec<SwarmTask>, ResyncError> {
        let version = docker.client_version();
        let path = format!(
            "/v{}.{}/tasks?filters=%7B%22desired-state%22%3A%5B%22running%22%5D%7D",
            version.major_version, version.minor_version
        );
        Ok(raw::get(&self.endpoint, &path).await?)
    }

    /// On a manager: what the tasks of the whole Swarm are doing, in a value that changes
    /// when any of them starts or stops (the engine sends no event for tasks on other nodes).
    /// `None` elsewhere.
    pub async fn tasks_fingerprint(&self, docker: &Docker) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        if self.mode != "swarm manager" {
            return None;
        }
        let tasks = self.running_tasks(docker).await.ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for t in &tasks {
            (&t.id, &t.status.state).hash(&mut h);
        }
        Some(h.finish())
    }

    /// One running task of a Swarm service, named like its container (`web.1.<id>`, or
    /// `web.<node id>.<id>` for a global service).
    #[allow(clippy::too_many_arguments)] // the task's own facts and where to note what it found
    fn swarm_task(
        &self,
        service: &str,
        t: &SwarmTask,
        node: &str,
        local: Option<&ContainerSummary>,
        wanted: Option<&str>,
        networks: &Networks,
        out: &mut Building,
    ) -> Option<Task> {
        let task_name = local.map_or_else(
            || format!("{service}.{}.{}", t.slot.map_or_else(|| t.node_id.clone(), |s| s.to_string()), t.id),
            container_name,
        );
        // The task API knows the overlay addresses on every node; a container here knows
        // its node-local networks too (a swarm-scoped bridge), and has the last word.
        let mut attached: BTreeMap<String, IpAddr> = t
            .networks_attachments
            .iter()
            .filter_map(|a| Some((a.network.spec.name.clone(), strip_prefix_len(a.addresses.first()?)?)))
            .collect();
        attached.extend(local.map(networks_of).unwrap_or_default());
        let who = format!("service `{service}` task `{task_name}`");
        let reach = self.reach();
        let chosen = choose_network(&attached, wanted, &reach, &who, &mut out.problems);
        let Some((network, address)) = chosen else {
            // A task on no Swarm network (on its node's default bridge) running on another
            // node: no manager knows its address, but its node's agent does; it is reached
            // through that agent by its id.
            let attached_nowhere = attached.is_empty() && local.is_none();
            return attached_nowhere.then(|| Task {
                id: task_name,
                address: IpAddr::from([0, 0, 0, 0]),
                port: None,
                node: node.to_owned(),
                health: Health::Unknown,
                network: None,
                aliases: Vec::new(),
                node_local: true,
            });
        };
        let mut aliases = Vec::new();
        if let Some(c) = local {
            let id = c.id.as_deref().unwrap_or("");
            match reach.local_address(id, &network, address, networks) {
                Some(addr) => {
                    out.local_addresses.insert(task_name.clone(), addr);
                }
                None => out.problems.push(unreachable_here(&who, &network)),
            }
            aliases =
                self.inspected.get(id).and_then(|i| i.aliases.get(&network).cloned()).unwrap_or_default();
        }
        Some(Task {
            id: task_name,
            address,
            port: None,
            node: node.to_owned(),
            health: local.map_or(Health::Unknown, |c| health_of(c.status.as_deref())),
            network: Some(network),
            aliases,
            node_local: true,
        })
    }
}

/// The Traefik middlewares every container and service defines (a router may name one
/// defined elsewhere).
fn catalogue(containers: &[ContainerSummary], services: &[bollard::models::Service]) -> Catalogue {
    let mut catalogue = Catalogue::default();
    for c in containers {
        if let Some(labels) = &c.labels {
            catalogue.add(&container_name(c), labels);
        }
    }
    for svc in services {
        if let Some(spec) = &svc.spec {
            if let Some(labels) = &spec.labels {
                catalogue.add(spec.name.as_deref().unwrap_or(""), labels);
            }
        }
    }
    catalogue
}

fn unreachable_here(who: &str, network: &str) -> String {
    format!(
        "{who}: not reachable from this node on network `{network}` (an overlay network is reached through {GWBRIDGE}, which this task has no address on: is the network internal?); not routed"
    )
}

/// What can go wrong reading the engine.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Api(#[from] bollard::errors::Error),
    #[error(transparent)]
    Raw(#[from] raw::RawError),
}

/// Where the engine puts this node: the leader is found in the node list (managers only);
/// a worker knows its managers' addresses from `docker info`.
fn position_of(
    swarm: Option<&bollard::models::SwarmInfo>,
    in_swarm: bool,
    manager: bool,
    nodes: &[Node],
) -> Position {
    if manager {
        let me = swarm.and_then(|s| s.node_id.as_deref());
        let leader = nodes.iter().find(|n| n.leader);
        Position::Manager {
            leader: leader.is_some_and(|l| Some(l.id.as_str()) == me),
            leader_address: leader.and_then(|l| l.address),
        }
    } else if in_swarm {
        let managers = swarm.and_then(|s| s.remote_managers.as_ref()).into_iter().flatten();
        let mut managers: Vec<IpAddr> = managers
            .filter_map(|m| m.addr.as_deref()?.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
            .collect();
        managers.sort();
        managers.dedup();
        Position::Worker { managers }
    } else {
        Position::Standalone
    }
}

/// The Swarm's nodes with their addresses.
async fn swarm_nodes(docker: &Docker) -> Result<Vec<Node>, bollard::errors::Error> {
    let mut nodes: Vec<Node> = docker
        .list_nodes(None)
        .await?
        .into_iter()
        .filter_map(|n| {
            let status = n.status.as_ref();
            Some(Node {
                name: n.description.as_ref().and_then(|d| d.hostname.clone()).unwrap_or_default(),
                address: status.and_then(|s| s.addr.as_deref()).and_then(|a| a.parse().ok()),
                manager: n.manager_status.is_some(),
                leader: n.manager_status.as_ref().and_then(|m| m.leader) == Some(true),
                ready: status.and_then(|s| s.state.as_ref()) == Some(&bollard::models::NodeState::READY),
                id: n.id?,
            })
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_the_status_text() {
        assert_eq!(health_of(Some("Up 3 minutes (healthy)")), Health::Healthy);
        assert_eq!(health_of(Some("Up 1 second (health: starting)")), Health::Starting);
        assert_eq!(health_of(Some("Up 2 hours (unhealthy)")), Health::Unhealthy);
        assert_eq!(health_of(Some("Up 2 hours")), Health::Unknown);
    }

    #[test]
    fn network_choice_prefers_the_label_then_the_setting_then_the_first() {
        let nets: BTreeMap<String, IpAddr> =
            [("b".to_owned(), [10, 0, 0, 2].into()), ("a".to_owned(), [10, 0, 0, 1].into())].into();
        let mut problems = Vec::new();
        let configured = |c| Reach { configured: Some(c), agent_networks: None };
        assert_eq!(choose_network(&nets, Some("b"), &configured("a"), "x", &mut problems).unwrap().0, "b");
        assert_eq!(choose_network(&nets, None, &configured("b"), "x", &mut problems).unwrap().0, "b");
        assert_eq!(choose_network(&nets, None, &Reach::default(), "x", &mut problems).unwrap().0, "a");
        let mine: BTreeSet<String> = ["b".to_owned()].into();
        assert_eq!(
            choose_network(
                &nets,
                None,
                &Reach { configured: None, agent_networks: Some(&mine) },
                "x",
                &mut problems
            )
            .unwrap()
            .0,
            "b"
        );
        assert!(problems.is_empty());
        assert_eq!(choose_network(&nets, Some("zzz"), &Reach::default(), "x", &mut problems).unwrap().0, "a");
        let only_ingress: BTreeMap<String, IpAddr> = [("ingress".to_owned(), [10, 0, 0, 9].into())].into();
        assert_eq!(
            choose_network(&only_ingress, None, &Reach::default(), "x", &mut problems).unwrap().0,
            "ingress"
        );
        assert!(
            choose_network(&only_ingress, Some("ingress"), &Reach::default(), "x", &mut problems).is_some()
        );
        assert!(problems[0].contains("`zzz`"), "{problems:?}");
    }
}
