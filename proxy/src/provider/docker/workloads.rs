//! One resync: what runs on the engine, turned into a [`MeshState`].
//!
//! - Standalone and Compose containers: one service per Compose service (replicas are its
//!   tasks), else per container; running ones only, and with a health check only while
//!   healthy.
//! - On a Swarm manager: every service with its running tasks and published ports. A task's
//!   address is read from its container when the task runs on this node.
//! - On a Swarm worker (the Swarm API is refused): the local containers of Swarm tasks,
//!   grouped by their `com.docker.swarm.service.name` label.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use bollard::models::{
    ContainerSummary, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, LocalNodeState,
    TaskState,
};
use bollard::query_parameters::{InspectNetworkOptions, ListContainersOptions, ListTasksOptions};
use bollard::Docker;

use super::optin::{self, Defaults, Workload};
use super::{DockerConfig, NAME};
use crate::cluster::Position;
use crate::state::{Health, L4Protocol, MeshState, Node, PublishedPort, Service, Task};

const SWARM_SERVICE: &str = "com.docker.swarm.service.name";
const STACK: &str = "com.docker.stack.namespace";
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";

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
    network: Option<String>,
    inspected: HashMap<String, Inspected>,
    mode: &'static str,
    said_worker: bool,
    /// The networks of the agent's own container (empty when it runs on the host); read once.
    agent_networks: Option<BTreeSet<String>>,
}

/// A container as a task candidate.
struct Member<'a> {
    summary: &'a ContainerSummary,
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

/// The network a task is reached on: the one the workload names, else the configured one,
/// else one the agent shares with it, else the first by name (the same on every node).
/// Swarm's `ingress` network carries the routing mesh, not service traffic: it is used only
/// when named.
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
    shared.or_else(|| candidates.next()).map(|(n, ip)| (n.clone(), *ip))
}

impl Discovery {
    pub fn new(cfg: &DockerConfig) -> Self {
        Self {
            defaults: Defaults {
                expose_by_default: cfg.expose_by_default,
                default_domain: cfg.default_domain.clone(),
            },
            network: cfg.network.clone(),
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
    /// With `leave_swarm_tasks` (a worker following the cluster feed), Swarm task containers
    /// are left to the feed. Also returns where the engine puts this node in the Swarm.
    pub async fn resync(
        &mut self,
        docker: &Docker,
        leave_swarm_tasks: bool,
    ) -> Result<(MeshState, Vec<String>, Position), bollard::errors::Error> {
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
        if in_swarm && !manager && !leave_swarm_tasks && !self.said_worker {
            tracing::info!("this engine is a Swarm worker: until the cluster feed answers, only the tasks running on this node are routed");
            self.said_worker = true;
        }

        if self.agent_networks.is_none() {
            // In a container, the hostname is the container id's prefix.
            let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let own = docker.inspect_container(hostname.trim(), None).await.ok();
            let nets = own
                .and_then(|c| c.network_settings?.networks)
                .map(|n| n.into_keys().collect())
                .unwrap_or_default();
            self.agent_networks = Some(nets);
        }
        let reach =
            Reach { configured: self.network.as_deref(), agent_networks: self.agent_networks.as_ref() };
        let containers =
            docker.list_containers(Some(ListContainersOptions { all: false, ..Default::default() })).await?;
        let live: HashSet<&str> = containers.iter().filter_map(|c| c.id.as_deref()).collect();
        self.inspected.retain(|id, _| live.contains(id.as_str()));
        for c in &containers {
            let Some(id) = c.id.as_deref() else { continue };
            let networks: BTreeSet<String> = networks_of(c).into_keys().collect();
            if self.inspected.get(id).is_some_and(|i| i.networks == networks) {
                continue;
            }
            // A container that vanished between list and inspect is simply skipped.
            if let Ok(inspect) = docker.inspect_container(id, None).await {
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
                self.inspected.insert(
                    id.to_owned(),
                    Inspected {
                        env: env_map(config.env),
                        exposed: ports_of(config.exposed_ports),
                        networks,
                        aliases,
                    },
                );
            }
        }

        let mut problems = Vec::new();
        let mut services = Vec::new();
        // Containers grouped into services (Swarm tasks only when no manager view covers them).
        let mut groups: BTreeMap<(String, Option<String>), Vec<Member<'_>>> = BTreeMap::new();
        for c in &containers {
            let labels = c.labels.as_ref();
            let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map_or_else(|| "?".into(), |n| n.trim_start_matches('/').to_owned());
            let key = if let Some(svc) = label(SWARM_SERVICE) {
                if manager || leave_swarm_tasks {
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
                &Workload { env: &inspected.env, labels, exposed_ports: &inspected.exposed, name: &name },
                &self.defaults,
            );
            problems.extend(opt.problems.iter().map(|p| format!("container `{}`: {p}", first.name)));
            // Workloads that did not opt in stay in the state without routes: mesh-dns
            // answers their names, the proxy exposes nothing of them.
            let tasks = members
                .iter()
                .filter_map(|m| {
                    let who = format!("container `{}`", m.name);
                    let (network, address) = choose_network(
                        &networks_of(m.summary),
                        opt.network.as_deref(),
                        &reach,
                        &who,
                        &mut problems,
                    )?;
                    // A Swarm task's container is named like the task (`web.1.abc`).
                    let id = m.name.clone();
                    let aliases = m
                        .summary
                        .id
                        .as_deref()
                        .and_then(|id| self.inspected.get(id)?.aliases.get(&network).cloned())
                        .unwrap_or_default();
                    Some(Task {
                        id,
                        address,
                        port: None,
                        node: node.clone(),
                        health: health_of(m.summary.status.as_deref()),
                        network: Some(network),
                        aliases,
                    })
                })
                .collect();
            services.push(Service {
                name,
                stack,
                provider: NAME.into(),
                tasks,
                http: opt.routes,
                l4: Vec::new(),
            });
        }

        let mut nodes = Vec::new();
        if manager {
            nodes = swarm_nodes(docker).await?;
            self.swarm_services(docker, &containers, &node, &nodes, &reach, &mut services, &mut problems)
                .await?;
        }
        let position = position_of(swarm, in_swarm, manager, &nodes);
        Ok((MeshState { services, problems: problems.clone(), nodes }, problems, position))
    }

    /// Every Swarm service with its running tasks: addresses from the task's container when it
    /// runs here, else from the engine's verbose network view.
    #[allow(clippy::too_many_arguments)] // one call site; the inputs are the resync's own locals
    async fn swarm_services(
        &self,
        docker: &Docker,
        containers: &[ContainerSummary],
        node: &str,
        nodes: &[Node],
        reach: &Reach<'_>,
        services: &mut Vec<Service>,
        problems: &mut Vec<String>,
    ) -> Result<(), bollard::errors::Error> {
        let by_id: HashMap<&str, &ContainerSummary> =
            containers.iter().filter_map(|c| Some((c.id.as_deref()?, c))).collect();
        let nodes: HashMap<&str, &str> = nodes.iter().map(|n| (n.id.as_str(), n.name.as_str())).collect();
        // Task addresses on other nodes come from the verbose inspect of each network the
        // services attach to (the engine's own view, shared across the cluster by gossip).
        let mut remote: HashMap<String, BTreeMap<String, IpAddr>> = HashMap::new();
        let mut inspected_networks = HashSet::new();
        let filters = [("desired-state".to_owned(), vec!["running".to_owned()])].into();
        let tasks = docker.list_tasks(Some(ListTasksOptions { filters: Some(filters) })).await?;
        let mut list = docker.list_services(None).await?;
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
                &Workload { env: &env, labels: &labels, exposed_ports: &targets, name: &name },
                &self.defaults,
            );
            problems.extend(opt.problems.iter().map(|p| format!("service `{name}`: {p}")));
            let attached = spec
                .task_template
                .as_ref()
                .and_then(|t| t.networks.clone())
                .or(spec.networks.clone())
                .unwrap_or_default();
            for net in attached.iter().filter_map(|n| n.target.clone()) {
                if inspected_networks.insert(net.clone()) {
                    // A network that vanished meanwhile only loses its remote addresses.
                    if let Ok(inspect) = docker
                        .inspect_network(&net, Some(InspectNetworkOptions { verbose: true, scope: None }))
                        .await
                    {
                        let net_name = inspect.name.clone().unwrap_or(net);
                        for (task, ip) in task_addresses(inspect.services.as_ref()) {
                            remote.entry(task).or_default().insert(net_name.clone(), ip);
                        }
                    }
                }
            }
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
            let mut service_tasks = Vec::new();
            for t in tasks.iter().filter(|t| t.service_id.as_deref() == Some(id.as_str())) {
                if t.status.as_ref().and_then(|s| s.state.as_ref()) != Some(&TaskState::RUNNING) {
                    continue;
                }
                let task_name = format!("{name}.{}.{}", t.slot.unwrap_or(0), t.id.as_deref().unwrap_or(""));
                let local = t
                    .status
                    .as_ref()
                    .and_then(|s| s.container_status.as_ref())
                    .and_then(|c| c.container_id.as_deref())
                    .and_then(|cid| by_id.get(cid));
                let (networks, health) = match local {
                    Some(c) => (networks_of(c), health_of(c.status.as_deref())),
                    None => (remote.get(&task_name).cloned().unwrap_or_default(), Health::Unknown),
                };
                let who = format!("service `{name}` task `{task_name}`");
                let Some((network, address)) =
                    choose_network(&networks, opt.network.as_deref(), reach, &who, problems)
                else {
                    continue;
                };
                let task_node = t
                    .node_id
                    .as_deref()
                    .and_then(|n| nodes.get(n))
                    .map_or_else(|| node.to_owned(), |n| (*n).to_owned());
                let aliases = local
                    .and_then(|c| self.inspected.get(c.id.as_deref()?)?.aliases.get(&network).cloned())
                    .unwrap_or_default();
                service_tasks.push(Task {
                    id: task_name,
                    address,
                    port: None,
                    node: task_node,
                    health,
                    network: Some(network),
                    aliases,
                });
            }
            services.push(Service {
                name,
                stack: labels.get(STACK).cloned(),
                provider: NAME.into(),
                tasks: service_tasks,
                http: opt.routes,
                l4,
            });
        }
        Ok(())
    }
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

/// Task name to address, from a verbose network inspect's `Services` section:
/// `{"web": {"Tasks": [{"Name": "web.1.abc", "EndpointIP": "10.0.1.5"}]}}`.
fn task_addresses(services: Option<&HashMap<String, serde_json::Value>>) -> Vec<(String, IpAddr)> {
    services
        .into_iter()
        .flat_map(HashMap::values)
        .filter_map(|svc| svc.get("Tasks")?.as_array())
        .flatten()
        .filter_map(|t| {
            Some((t.get("Name")?.as_str()?.to_owned(), t.get("EndpointIP")?.as_str()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_addresses_from_a_verbose_network_inspect() {
        let services: HashMap<String, serde_json::Value> = serde_json::from_str(
            r#"{"web": {"VIP": "10.0.1.2", "Tasks": [{"Name": "web.1.abc", "EndpointIP": "10.0.1.5"}, {"Name": "web.2.def", "EndpointIP": "bogus"}]}, "": {}}"#,
        )
        .unwrap();
        assert_eq!(
            task_addresses(Some(&services)),
            vec![("web.1.abc".to_owned(), "10.0.1.5".parse().unwrap())]
        );
    }

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
        assert!(choose_network(&only_ingress, None, &Reach::default(), "x", &mut problems).is_none());
        assert!(
            choose_network(&only_ingress, Some("ingress"), &Reach::default(), "x", &mut problems).is_some()
        );
        assert!(problems[0].contains("`zzz`"), "{problems:?}");
    }
}
