//! The routing model: what every provider produces and every consumer compiles from.
//!
//! A [`MeshState`] is plain, immutable data. Providers hand complete states to the
//! [`StateHub`]; the hub merges the newest state of every provider into one [`Snapshot`],
//! swaps it in atomically and bumps a generation on a `watch` channel. Consumers (the HTTP
//! router, the BPF map sync, the DNS zone, ACME) wait on that channel and derive their own
//! compiled view from [`StateHub::load`]. Nothing ever reaches back into a provider.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

mod condition;
mod middleware;
pub use condition::{Condition, Test};
pub use middleware::{Cors, ForwardAuth, Headers, Middleware, Source};

/// The node name that always means the node the agent runs on (the routes file's default
/// for a task without `node`).
pub const THIS_NODE: &str = "local";

/// How long a new agent waits for its sources' first answers ([`StateHub::complete`]) before
/// it listens anyway.
pub const COMPLETE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// Everything one provider (or the merge of all of them) knows about the node's services.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    pub services: Vec<Arc<Service>>,
    /// Opt-in settings that could not be used (each names the workload and the key);
    /// shown in `/api/state`.
    pub problems: Vec<String>,
    /// The cluster's nodes (Swarm), for the L4 mesh and `/api/state`.
    pub nodes: Vec<Node>,
    /// How this node reaches its own tasks, by task id: the address a node-local task
    /// (see [`Task::node_local`]) is dialled on from here (its `docker_gwbridge` address for
    /// a task on an overlay network). Read from this node's engine; never sent to other
    /// nodes, whose own engines say how they reach theirs.
    #[serde(skip)]
    pub local_addresses: BTreeMap<String, IpAddr>,
}

impl MeshState {
    /// A state of these services and nothing else.
    #[must_use]
    pub fn of_services(services: impl IntoIterator<Item = Service>) -> Self {
        Self { services: services.into_iter().map(Arc::new).collect(), ..Self::default() }
    }

    /// Gives back the room its vectors have beyond what they hold. A provider's state is
    /// kept for as long as it is in force, and vectors collected one item at a time have
    /// room for four: with an HTTP route of some 800 bytes, that was 2.3 KiB of nothing per
    /// service (23 MiB at 10,000 services, seen in a heap profile).
    pub fn shrink_to_fit(&mut self) {
        for svc in &mut self.services {
            // Only the provider holds its new state: nothing is copied here.
            let svc = Arc::make_mut(svc);
            svc.tasks.shrink_to_fit();
            svc.http.shrink_to_fit();
            svc.l4.shrink_to_fit();
            for http in &mut svc.http {
                http.hosts.shrink_to_fit();
            }
        }
        self.services.shrink_to_fit();
    }

    /// Takes task `id` out of every service and out of `local_addresses`. Returns whether it
    /// was there.
    pub fn forget_task(&mut self, id: &str) -> bool {
        let mut found = self.local_addresses.remove(id).is_some();
        for svc in &mut self.services {
            // Services are shared with published snapshots: only one that changes is copied.
            if svc.tasks.iter().any(|t| t.id == id) {
                Arc::make_mut(svc).tasks.retain(|t| t.id != id);
                found = true;
            }
        }
        found
    }
}

/// A Swarm node and the address other nodes reach it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    pub address: Option<IpAddr>,
    pub manager: bool,
    /// The Swarm leader (the manager that orders certificates for the cluster).
    #[serde(default)]
    pub leader: bool,
    pub ready: bool,
}

/// A service: a name, the tasks that serve it and the ways it is exposed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    /// The Swarm stack (or Compose project) the service belongs to, if any.
    pub stack: Option<String>,
    /// Which provider described it (`file`, `docker`, `example`).
    pub provider: String,
    pub tasks: Vec<Task>,
    pub http: Vec<HttpRoute>,
    pub l4: Vec<PublishedPort>,
}

/// One running instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// Unspecified (`0.0.0.0`) when only the task's own node knows it (a Swarm task on no
    /// network of the Swarm's, seen from a manager): it is then reached through that node.
    pub address: IpAddr,
    /// Overrides the route's target port for this task (the file provider allows it so
    /// several tasks can share one address, e.g. on loopback).
    pub port: Option<u16>,
    pub node: String,
    pub health: Health,
    /// The network `address` belongs to, when the provider knows it.
    pub network: Option<String>,
    /// Other names of the task on that network (Docker network aliases), for mesh-dns.
    pub aliases: Vec<String>,
    /// The address is reachable only on `node`, through the address that node's engine
    /// gives (a Docker task: a container's networks are local to its host, an overlay is
    /// reached from inside only). Other nodes go through that node's agent. `false` for
    /// addresses the user wrote down (routes file), dialled as they are.
    #[serde(default)]
    pub node_local: bool,
}

impl Task {
    /// Where a route with target port `port` reaches this task.
    #[must_use]
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.address, self.port.unwrap_or(port))
    }
}

/// Health as the provider sees it. `Unhealthy` and `Starting` tasks are kept out of
/// routing; a task without a health check is `Unknown` and is routed (as Docker does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Has a health check that has not passed yet.
    Starting,
    #[default]
    Unknown,
}

impl Health {
    /// Whether a task in this state takes traffic.
    #[must_use]
    pub fn routable(self) -> bool {
        matches!(self, Self::Healthy | Self::Unknown)
    }
}

/// How the proxy exposes a service over HTTP.
// Allowed because: each flag is a setting of its own in the routes file and on the wire.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub hosts: Vec<HostPattern>,
    /// Path prefix, always starting with `/`; the longest matching prefix wins.
    pub path: String,
    /// The port on each task that the proxy connects to.
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub tls: TlsWish,
    /// Replaces the matched path prefix before the request goes to the task
    /// (nginx-proxy's `VIRTUAL_DEST`): path `/api` with rewrite `/` sends `/api/x` as `/x`.
    pub rewrite: Option<String>,
    /// What plain HTTP does once the host has a certificate (redirect, serve both, refuse).
    pub https_method: HttpsMethod,
    /// `Strict-Transport-Security` value to send over HTTPS; `None` sends none.
    pub hsts: Option<String>,
    /// Why the route is not served: it asks for something that restricts access which
    /// meshgate cannot honour (a Traefik middleware, an entrypoint it does not have, ...).
    /// Its hosts answer 503 rather than be served open (fails closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Whether its requests are written to the access log (a label turns it off for a
    /// health-check or metrics route).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub access_log: bool,
    /// Users who may use the route (Traefik's `basicauth`); `None`: anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    /// Only clients from these networks may use the route (Traefik's `ipallowlist`,
    /// nginx-proxy's `NETWORK_ACCESS=internal`); others get 403. `None`: anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// Largest request body the route takes, in bytes (413 past it); `None`: the agent's
    /// `proxy.max_body_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    /// The request body is read (up to `proxy.request_buffer_bytes`) before the task gets
    /// any of it, as nginx's `proxy_request_buffering on`; off: streamed as it comes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub request_buffering: bool,
    /// How long its tasks have to send a response head (`None`: the agent's
    /// `proxy.upstream_response_timeout`); a long report or export needs more.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub response_timeout: Option<std::time::Duration>,
    /// How long a connect to a task may take before it counts as down (`None`: the agent's
    /// `proxy.connect_timeout`; nginx-proxy users set `proxy_connect_timeout` for this).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub connect_timeout: Option<std::time::Duration>,
    /// How long a task may take nothing of a request body before the request is abandoned
    /// (`None`: the agent's `proxy.upstream_send_timeout`; nginx's `proxy_send_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub send_timeout: Option<std::time::Duration>,
    /// TLS to the tasks when `protocol` is https; `None`: not verified (nginx-proxy's way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<UpstreamTls>,
    /// What is done to its requests, in order (Traefik's middlewares), after `allow_from`
    /// and `basic_auth`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub middlewares: Vec<Middleware>,
    /// What a request must also be for this route to take it (Traefik's `Method`, `Header`,
    /// ...): all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Among a host's routes that all have one (Traefik's routers: its `priority`, else the
    /// rule's length), the highest that matches takes the request; otherwise the longest
    /// path prefix does, and this breaks ties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Which task a client keeps (`None`: each request is balanced on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Whether the task gets the client's `Host` (else its own address, Traefik's
    /// `passHostHeader=false`).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub pass_host: bool,
    /// An active health check of each task (a failing task takes no traffic while others
    /// pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The tasks want the PROXY protocol: each connection to them starts with a header
    /// naming the client (and is then not shared with other clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The certificate its hosts are served with: `<cert_name>.crt` of `tls.certs_dir`
    /// (nginx-proxy's `CERT_NAME`), whatever their own names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_name: Option<String>,
    /// Its hosts take TLS 1.3 only (nginx-proxy's `SSL_POLICY=Mozilla-Modern`); else TLS 1.2
    /// and 1.3, with rustls's ciphers (all of them forward-secret AEAD).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls13_only: bool,
    /// Clients must show a certificate from this CA (a PEM file on each node that serves
    /// the route; a node that cannot read it serves no one): mutual TLS, Traefik's
    /// `clientAuth` with `RequireAndVerifyClientCert`. Over plain HTTP the route answers 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<std::path::PathBuf>,
    /// On the cluster feed only: the route's own `allow_from`, while `allow_from` itself
    /// admits no one for agents of an earlier version (see `cluster::wire`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_lock: Option<WireLock>,
}

/// What the feed's lock for earlier agents set aside (see [`HttpRoute::wire_lock`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLock {
    pub allow_from: Option<Vec<ipnet::IpNet>>,
}

/// A PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// What a task is asked, and how often, to count as healthy (Traefik's
/// `loadbalancer.healthcheck`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Path (and query) asked with a GET.
    pub path: String,
    #[serde(with = "humantime_serde", default = "HealthCheck::default_interval")]
    pub interval: std::time::Duration,
    #[serde(with = "humantime_serde", default = "HealthCheck::default_timeout")]
    pub timeout: std::time::Duration,
    /// The status that means healthy (`None`: any 2xx or 3xx).
    #[serde(default)]
    pub status: Option<u16>,
    /// `Host` of the check (`None`: the route's first host).
    #[serde(default)]
    pub hostname: Option<String>,
}

impl HealthCheck {
    /// A check of `path` with Traefik's defaults: every 30 s, 5 s to answer.
    #[must_use]
    pub fn of(path: String) -> Self {
        Self {
            path,
            interval: Self::default_interval(),
            timeout: Self::default_timeout(),
            status: None,
            hostname: None,
        }
    }

    fn default_interval() -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }

    fn default_timeout() -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }

    /// Reads `interval`, `timeout` and `status` as labels write them, onto this check.
    ///
    /// # Errors
    /// A value that is not a duration above zero, or not a status code.
    pub fn set(&mut self, option: &str, value: &str) -> Result<(), String> {
        let duration = || match humantime::parse_duration(value.trim()) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(format!("`{value}` is not a duration above zero (write 10s)")),
        };
        match option {
            "interval" => self.interval = duration()?,
            "timeout" => self.timeout = duration()?,
            "status" => {
                self.status = Some(
                    value
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|s| (100..600).contains(s))
                        .ok_or_else(|| format!("`{value}` is not a status code"))?,
                );
            }
            "hostname" => self.hostname = Some(value.trim().to_owned()),
            other => return Err(format!("`{other}` is not a health check setting")),
        }
        Ok(())
    }
}

/// How a client keeps to one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Affinity {
    /// By the client's address (nginx's `hash $remote_addr`, `ip_hash`): the same task
    /// through every node while the tasks stay the same.
    ClientIp,
    /// By a cookie naming the task (Traefik's sticky cookie), set on the first answer.
    Cookie {
        name: String,
        #[serde(default)]
        secure: bool,
        #[serde(default)]
        http_only: bool,
        /// `SameSite`: `none`, `lax` or `strict`.
        #[serde(default)]
        same_site: Option<String>,
        /// `Max-Age` in seconds (`None`: a session cookie).
        #[serde(default)]
        max_age: Option<u64>,
        /// `Path` (`None`: `/`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
}

impl HttpRoute {
    /// A route for `hosts` and `path` to `port` over plain HTTP, with every other setting at
    /// its default (redirect to HTTPS once a certificate exists, no HSTS, no certificate
    /// asked for, logged, open to anyone).
    #[must_use]
    pub fn new(hosts: Vec<HostPattern>, path: String, port: u16) -> Self {
        Self {
            hosts,
            path,
            port,
            protocol: UpstreamProtocol::Http,
            tls: TlsWish::None,
            rewrite: None,
            https_method: HttpsMethod::Redirect,
            hsts: None,
            refused: None,
            access_log: true,
            basic_auth: None,
            allow_from: None,
            max_body: None,
            response_timeout: None,
            connect_timeout: None,
            send_timeout: None,
            request_buffering: false,
            wire_lock: None,
            upstream_tls: None,
            middlewares: Vec::new(),
            conditions: Vec::new(),
            priority: None,
            affinity: None,
            pass_host: true,
            health_check: None,
            proxy_protocol: None,
            cert_name: None,
            tls13_only: false,
            client_ca: None,
        }
    }
}

/// A size as users write it: `1048576`, `512k`, `10m`, `1g` (powers of 1024, as nginx).
///
/// # Errors
/// Not a number with an optional `k`, `m` or `g`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, unit) = match t.strip_suffix(['k', 'm', 'g']) {
        Some(d) => (
            d,
            t.chars().last().map_or(1, |u| match u {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                _ => 1 << 30,
            }),
        ),
        None => (t.as_str(), 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("`{text}` is not a size (write 1048576, 512k, 10m or 1g)"))
}

/// A network (`10.0.0.0/8`) or one address (`192.0.2.7`, as a /32 or /128).
///
/// # Errors
/// Neither.
pub fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is neither a network (10.0.0.0/8) nor an address"))
}

/// The networks nginx-proxy's `NETWORK_ACCESS=internal` lets in (its `network_internal.conf`):
/// loopback and the private ranges.
#[must_use]
pub fn internal_networks() -> Vec<ipnet::IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ]
    .iter()
    .map(|n| n.parse().expect("a valid network"))
    .collect()
}

/// A route's users and realm, as they travel in the state and the cluster feed (hashes
/// only, as an htpasswd file holds them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BasicAuth {
    /// `user:hash` entries: bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5 (`$apr1$`) or SHA-1
    /// (`{SHA}`).
    pub users: Vec<String>,
    pub realm: String,
    /// Whether `Authorization` is removed before the request goes to the task.
    pub remove_header: bool,
    /// The header that tells the task who the user is (Traefik's `headerField`); a client's
    /// own header of that name never reaches the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_field: Option<String>,
}

impl BasicAuth {
    /// The users of an htpasswd file (`None`: there is no such file), realm `Restricted`;
    /// an error says what is wrong with the file (unreadable, a bad line, no user).
    pub fn from_htpasswd_file(path: &std::path::Path) -> Result<Option<Self>, String> {
        let text = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("htpasswd file {} cannot be read: {e}", path.display())),
            Ok(text) => text,
        };
        let users: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        let auth = Self { users, realm: "Restricted".into(), remove_header: false, header_field: None };
        match auth.bad_entry() {
            Some(bad) => Err(format!("htpasswd file {}: {bad}", path.display())),
            None if auth.users.is_empty() => Err(format!("htpasswd file {} names no user", path.display())),
            None => Ok(Some(auth)),
        }
    }

    /// The first entry that is not `user:hash` with a hash htpasswd writes.
    #[must_use]
    pub fn bad_entry(&self) -> Option<String> {
        self.users.iter().find_map(|entry| {
            let known = |h: &str| ["$2y$", "$2b$", "$2a$", "$apr1$", "{SHA}"].iter().any(|p| h.starts_with(p));
            match entry.split_once(':') {
                Some((user, hash)) if !user.is_empty() && known(hash.trim()) => None,
                Some((user, _)) if !user.is_empty() => Some(format!("user `{user}`: the hash is none htpasswd writes (bcrypt $2y$, Apache MD5 $apr1$ or SHA-1 {{SHA}})")),
                _ => Some(format!("`{entry}` is not `user:hash`")),
            }
        })
    }
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_yes(b: &bool) -> bool {
    *b
}

/// nginx-proxy's `HTTPS_METHOD`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpsMethod {
    /// Plain HTTP is redirected to HTTPS once a certificate exists.
    #[default]
    Redirect,
    /// Both are served.
    Noredirect,
    /// Only HTTPS is served.
    Nohttp,
    /// Only plain HTTP is served.
    Nohttps,
}

/// A host name a route answers to, already lower-cased and validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `app.example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any name ending with it.
    Suffix(String),
    /// `example.*`, stored as `example.`: any name starting with it.
    Prefix(String),
    /// A regular expression searched in the lower-case host, as nginx and Traefik v3 do
    /// (nginx-proxy's `~regex`, Traefik's `HostRegexp`): anchors are the pattern's own
    /// (`^`, `$`). Checked after the wildcards.
    Regex(String),
}

/// Why a host name or pattern was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("empty host name")]
    Empty,
    #[error("`{0}` is not a valid host name (letters, digits, `-` and `.`; a wildcard only as `*.domain` or `name.*`)")]
    Invalid(String),
    #[error("`{pattern}` is not a valid regular expression: {error}")]
    Regex { pattern: String, error: regex::Error },
}

impl HostPattern {
    /// Parses a host pattern as users write it (`app.example.com`, `*.example.com`, `example.*`).
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        if let Some(re) = raw.trim().strip_prefix('~') {
            return Self::regex(re);
        }
        let host = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        let (pattern, name) = if let Some(rest) = host.strip_prefix("*.") {
            (Self::Suffix(format!(".{rest}")), rest)
        } else if let Some(rest) = host.strip_suffix(".*") {
            (Self::Prefix(format!("{rest}.")), rest)
        } else {
            (Self::Exact(host.clone()), host.as_str())
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(HostError::Invalid(raw.to_owned()));
        }
        Ok(pattern)
    }
}

impl HostPattern {
    /// A host regex, searched as written (nginx's and Traefik v3's semantics).
    pub fn regex(re: &str) -> Result<Self, HostError> {
        regex::Regex::new(re).map_err(|error| HostError::Regex { pattern: re.to_owned(), error })?;
        Ok(Self::Regex(re.to_owned()))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Suffix(s) => write!(f, "*{s}"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Regex(r) => write!(f, "~{r}"),
        }
    }
}

impl Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The inverse of `Display` (the cluster feed carries states as JSON): a regex comes back
/// exactly as it was anchored.
impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        match raw.strip_prefix('~') {
            Some(re) => {
                regex::Regex::new(re).map(|_| Self::Regex(re.to_owned())).map_err(serde::de::Error::custom)
            }
            None => Self::parse(&raw).map_err(serde::de::Error::custom),
        }
    }
}

/// How the proxy talks to a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http,
    /// HTTP/1.1 over TLS; the task's certificate is not verified (as nginx-proxy).
    Https,
    /// HTTP/2 without TLS (prior knowledge).
    H2c,
}

/// Whether the route wants a certificate (consumed by the ACME work).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum TlsWish {
    #[default]
    None,
    Acme {
        email: Option<String>,
        /// The certificate's names (nginx-proxy's `LETSENCRYPT_HOST` value); none: the
        /// route's exact hosts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        names: Option<Vec<String>>,
    },
}

/// How the proxy speaks TLS to a route's tasks (`protocol = "https"`): verified against a CA
/// (with the name to verify, and a client certificate for tasks that require one), or not
/// verified at all (nginx-proxy's `VIRTUAL_PROTO=https`). Files are read on each node that
/// serves the route; one that cannot be read there makes the route's requests fail (502),
/// never fall back to an unverified connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// Check the task's certificate (against `ca`, else the public web roots).
    pub verify: bool,
    /// The name the certificate must carry, also sent as SNI. Unset: the task's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM file of the internal CA that signs the tasks' certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate and key (PEM) for tasks that require mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<std::path::PathBuf>,
}

/// An L4 port published on every node (consumed by the eBPF mesh).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: L4Protocol,
    pub published: u16,
    pub target: u16,
    /// Only tasks on the receiving node serve it, so the client address is always kept.
    pub local_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Protocol {
    Tcp,
    Udp,
}

/// The merged state at one point in time.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Bumped on every publish; 0 means nothing was published yet.
    pub generation: u64,
    pub state: MeshState,
}

/// Holds the newest state of each provider and publishes their merge.
///
/// `publish` is the only writer; it holds a lock while merging so two providers can never
/// interleave a load-modify-store. Readers never take that lock.
pub struct StateHub {
    current: ArcSwap<Snapshot>,
    per_provider: Mutex<BTreeMap<String, MeshState>>,
    generation: watch::Sender<u64>,
    /// Sources expected to publish before the state is complete (see [`Self::expect`]).
    pending: watch::Sender<BTreeSet<String>>,
}

impl Default for StateHub {
    fn default() -> Self {
        Self::new()
    }
}

impl StateHub {
    #[must_use]
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            per_provider: Mutex::new(BTreeMap::new()),
            generation: watch::channel(0).0,
            pending: watch::channel(BTreeSet::new()).0,
        }
    }

    /// Replaces `provider`'s state and publishes the merge of all providers.
    /// Returns the new generation.
    pub fn publish(&self, provider: &str, mut state: MeshState) -> u64 {
        state.shrink_to_fit();
        let mut slots = self.per_provider.lock().expect("state hub lock poisoned");
        slots.insert(provider.to_owned(), state);
        let generation = self.merge(&slots);
        self.fulfil(provider);
        generation
    }

    /// Says that `source` will publish (or [`Self::fulfil`]) before the state is complete: a
    /// new agent does not serve requests from half a state (its providers' first answers).
    pub fn expect(&self, source: &str) {
        let published = self.per_provider.lock().expect("state hub lock poisoned").contains_key(source);
        if !published {
            self.pending.send_modify(|p| {
                p.insert(source.to_owned());
            });
        }
    }

    /// `source` has said what it had to say.
    pub fn fulfil(&self, source: &str) {
        self.pending.send_if_modified(|p| p.remove(source));
    }

    /// The sources still awaited; empty once the state is complete.
    #[must_use]
    pub fn pending(&self) -> BTreeSet<String> {
        self.pending.borrow().clone()
    }

    /// Waits until every expected source has published.
    pub async fn complete(&self) {
        let mut pending = self.pending.subscribe();
        let _ = pending.wait_for(BTreeSet::is_empty).await;
    }

    /// Publishes the merge of `slots` (the locked per-provider states).
    fn merge(&self, slots: &BTreeMap<String, MeshState>) -> u64 {
        let merged = MeshState {
            services: slots.values().flat_map(|s| s.services.iter().cloned()).collect(),
            problems: slots.values().flat_map(|s| s.problems.iter().cloned()).collect(),
            nodes: slots.values().flat_map(|s| s.nodes.iter().cloned()).collect(),
            local_addresses: slots.values().flat_map(|s| s.local_addresses.clone()).collect(),
        };
        let generation = self.current.load().generation + 1;
        self.current.store(Arc::new(Snapshot { generation, state: merged }));
        self.generation.send_replace(generation);
        generation
    }

    /// Edits `provider`'s state in place and publishes the merge if `edit` says it changed
    /// anything (under the same lock as [`Self::publish`], so no update is lost). Returns the
    /// new generation, if any.
    pub fn amend(&self, provider: &str, edit: impl FnOnce(&mut MeshState) -> bool) -> Option<u64> {
        let mut slots = self.per_provider.lock().expect("state hub lock poisoned");
        if !edit(slots.get_mut(provider)?) {
            return None;
        }
        Some(self.merge(&slots))
    }

    /// The newest snapshot.
    #[must_use]
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that wakes on every new generation.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_parse_and_normalise() {
        assert_eq!(
            HostPattern::parse("App.Example.COM.").ok(),
            Some(HostPattern::Exact("app.example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.example.com").ok(),
            Some(HostPattern::Suffix(".example.com".into()))
        );
        assert_eq!(HostPattern::parse("example.*").ok(), Some(HostPattern::Prefix("example.".into())));
        assert_eq!(
            HostPattern::parse("~^a[0-9]+\\.test$").ok(),
            Some(HostPattern::Regex("^a[0-9]+\\.test$".into()))
        );
        assert!(HostPattern::parse("~(unclosed").is_err());
        for bad in ["", "a..b", "*", "a.*.b", "exa mple.com", "*.", "-/x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn publish_merges_providers_and_bumps_generation() {
        let hub = StateHub::new();
        let mut rx = hub.subscribe();
        let svc = |name: &str| Service {
            name: name.into(),
            stack: None,
            provider: "t".into(),
            tasks: vec![],
            http: vec![],
            l4: vec![],
        };
        assert_eq!(hub.publish("a", MeshState::of_services([svc("one")])), 1);
        assert_eq!(hub.publish("b", MeshState::of_services([svc("two")])), 2);
        assert_eq!(hub.publish("a", MeshState::of_services([svc("three")])), 3);
        let names: Vec<_> = hub.load().state.services.iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["three", "two"]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
    }

    #[test]
    fn sizes_as_users_write_them() {
        assert_eq!(super::parse_size("1048576"), Ok(1_048_576));
        assert_eq!(super::parse_size("512k"), Ok(512 * 1024));
        assert_eq!(super::parse_size(" 10M "), Ok(10 << 20));
        assert_eq!(super::parse_size("1g"), Ok(1 << 30));
        for bad in ["", "k", "1.5m", "-1", "10mb", "99999999999999999999g"] {
            assert!(super::parse_size(bad).is_err(), "{bad}");
        }
    }
}
