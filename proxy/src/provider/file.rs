//! The file provider: services, tasks, routes and published ports from a TOML file.
//!
//! The file is polled (cheap: one `stat` and, on change, one read), so it also works on
//! bind mounts and network file systems where inotify does not. A valid edit is published
//! at the next poll; an invalid one is logged once, with the file, the line and the
//! problem, and the state in force stays as it was.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use toml::Spanned;

use crate::config::line_of;
use crate::metrics::Metrics;
use crate::state::{
    Health, HostPattern, HttpRoute, HttpsMethod, L4Protocol, MeshState, PublishedPort, Service, StateHub,
    Task, TlsWish, UpstreamProtocol,
};

/// The provider name used in the hub, metrics and `/api/state`.
pub const NAME: &str = "file";

/// An invalid routes file, worded for the person editing it.
#[derive(Debug, thiserror::Error)]
#[error("{path}, line {line}: {message}")]
pub struct RoutesError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    services: Vec<Spanned<ServiceEntry>>,
    /// The cluster's nodes and their addresses (for the L4 mesh: tasks on other nodes are
    /// reached through their node). Docker Swarm provides these by itself.
    #[serde(default)]
    nodes: Vec<NodeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    address: std::net::IpAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: Spanned<String>,
    stack: Option<String>,
    #[serde(default)]
    tasks: Vec<Spanned<TaskEntry>>,
    #[serde(default)]
    http: Vec<HttpEntry>,
    #[serde(default)]
    l4: Vec<Spanned<L4Entry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    /// `ip` or `ip:port`.
    address: Spanned<String>,
    id: Option<String>,
    #[serde(default = "local_node")]
    node: String,
    #[serde(default)]
    health: Health,
}

fn local_node() -> String {
    crate::state::THIS_NODE.into()
}

// Allowed because: each flag is a setting of its own in the routes file.
#[allow(clippy::struct_excessive_bools)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpEntry {
    hosts: Vec<Spanned<String>>,
    #[serde(default = "root_path")]
    path: Spanned<String>,
    port: Spanned<u16>,
    #[serde(default)]
    protocol: UpstreamProtocol,
    #[serde(default)]
    tls: TlsEntry,
    rewrite: Option<Spanned<String>>,
    #[serde(default)]
    https_method: HttpsMethod,
    hsts: Option<String>,
    /// `false`: its requests are not written to the access log.
    #[serde(default = "yes")]
    access_log: bool,
    /// Users who may use the route: `users = ["name:hash", ...]`, `realm`, `remove_header`.
    basic_auth: Option<Spanned<BasicAuthEntry>>,
    /// Only clients from these networks (`["10.0.0.0/8", "192.0.2.7"]`).
    allow_from: Option<Vec<String>>,
    /// Largest request body (`10m`).
    max_body: Option<String>,
    /// Time its tasks have for a response head (`5m`).
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<std::time::Duration>,
    /// Time to connect to its tasks (`3s`).
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<std::time::Duration>,
    /// `true`: the request body is read before the task gets any (nginx's default).
    #[serde(default)]
    request_buffering: bool,
    /// Time its tasks have to take each piece of a request body (`1m`).
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<std::time::Duration>,
    /// With `protocol = "https"`: `{ verify = true, ca = "...", server_name = "...",
    /// client_cert = "...", client_key = "..." }`; unset: the tasks' certificates are not
    /// verified.
    upstream_tls: Option<crate::state::UpstreamTls>,
    /// Traefik's middlewares, in order: `[{ kind = "strip_prefix", prefixes = ["/api"] }, ...]`
    /// (see docs/routes.md).
    #[serde(default)]
    middlewares: Vec<crate::state::Middleware>,
    /// What a request must also be: `[{ test = "method", methods = ["GET"] }, { test =
    /// "header", name = "x-canary", value = "1", negated = true }]` (see docs/routes.md).
    #[serde(default)]
    conditions: Vec<crate::state::Condition>,
    priority: Option<i64>,
    /// `{ by = "client_ip" }` or `{ by = "cookie", name = "srv", secure = true, http_only =
    /// true, same_site = "lax", max_age = 3600 }`.
    affinity: Option<crate::state::Affinity>,
    /// `false`: the tasks get their own address as `Host`.
    #[serde(default = "yes")]
    pass_host: bool,
    /// `{ path = "/health", interval = "10s", timeout = "2s", status = 200 }`.
    health_check: Option<crate::state::HealthCheck>,
    /// `"v1"` or `"v2"`: the tasks get a PROXY header naming the client.
    proxy_protocol: Option<crate::state::ProxyProtocol>,
    /// `true`: its hosts take TLS 1.3 only.
    #[serde(default)]
    tls13_only: bool,
    /// A CA (PEM file): clients must show a certificate it signed.
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthEntry {
    users: Vec<String>,
    #[serde(default = "default_realm")]
    realm: String,
    #[serde(default)]
    remove_header: bool,
    header_field: Option<String>,
}

fn default_realm() -> String {
    "meshgate".into()
}

fn yes() -> bool {
    true
}

fn root_path() -> Spanned<String> {
    Spanned::new(0..0, "/".into())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsEntry {
    #[serde(default)]
    acme: bool,
    email: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct L4Entry {
    protocol: L4Protocol,
    published: u16,
    target: u16,
    #[serde(default)]
    local_only: bool,
}

/// Parses routes text into a state. `path` only names the file in errors.
pub fn parse(path: &Path, text: &str, provider: &str) -> Result<MeshState, RoutesError> {
    let fail = |span: Range<usize>, message: String| RoutesError {
        path: path.to_owned(),
        line: line_of(text, span.start),
        message,
    };
    let file: RoutesFile =
        toml::from_str(text).map_err(|e| fail(e.span().unwrap_or(0..0), e.message().trim().to_owned()))?;

    let mut services: Vec<Service> = Vec::with_capacity(file.services.len());
    // Names seen so far, for the duplicate check (scanning the services read so far made
    // loading 100,000 of them take half a minute).
    let mut names = std::collections::HashSet::with_capacity(file.services.len());
    for entry in file.services {
        let entry = entry.into_inner();
        let name = entry.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err(fail(entry.name.span(), "service `name` is empty".into()));
        }
        if !names.insert(name.clone()) {
            return Err(fail(entry.name.span(), format!("service `{name}` is defined twice")));
        }
        let tasks = entry
            .tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| parse_task(&name, i, t.into_inner()).map_err(|(s, m)| fail(s, m)))
            .collect::<Result<_, _>>()?;
        let http = entry
            .http
            .into_iter()
            .map(|h| parse_http(h).map_err(|(s, m)| fail(s, m)))
            .collect::<Result<_, _>>()?;
        let l4 = entry
            .l4
            .into_iter()
            .map(|l| {
                let span = l.span();
                let l = l.into_inner();
                if l.published == 0 || l.target == 0 {
                    return Err(fail(span, "l4 ports must be between 1 and 65535".into()));
                }
                Ok(PublishedPort {
                    protocol: l.protocol,
                    published: l.published,
                    target: l.target,
                    local_only: l.local_only,
                })
            })
            .collect::<Result<_, _>>()?;
        services.push(Service { name, stack: entry.stack, provider: provider.into(), tasks, http, l4 });
    }
    let nodes = file
        .nodes
        .into_iter()
        .map(|n| crate::state::Node {
            id: n.name.clone(),
            name: n.name,
            address: Some(n.address),
            manager: false,
            leader: false,
            ready: true,
        })
        .collect();
    Ok(MeshState { services: services.into_iter().map(Arc::new).collect(), nodes, ..MeshState::default() })
}

fn parse_task(service: &str, index: usize, t: TaskEntry) -> Result<Task, (Range<usize>, String)> {
    let raw = t.address.get_ref().trim();
    let (address, port) = if let Ok(sa) = raw.parse::<SocketAddr>() {
        (sa.ip(), Some(sa.port()))
    } else if let Ok(ip) = raw.parse::<IpAddr>() {
        (ip, None)
    } else {
        return Err((t.address.span(), format!("task address `{raw}` is not an IP address or IP:port (e.g. \"10.0.1.5\" or \"127.0.0.1:8001\")")));
    };
    Ok(Task {
        id: t.id.unwrap_or_else(|| format!("{service}.{}", index + 1)),
        address,
        port,
        node: t.node,
        health: t.health,
        network: None,
        aliases: Vec::new(),
        node_local: false,
    })
}

/// What a route says of how its tasks are reached, checked: TLS settings only with https,
/// timeouts above zero.
fn check_upstream(h: &HttpEntry) -> Result<(), (Range<usize>, String)> {
    if let Some(tls) = &h.upstream_tls {
        if h.protocol != UpstreamProtocol::Https {
            return Err((h.port.span(), "upstream_tls needs protocol = \"https\"".into()));
        }
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err((h.port.span(), "upstream_tls: client_cert and client_key go together".into()));
        }
    }
    if h.connect_timeout.is_some_and(|t| t.is_zero()) {
        return Err((h.port.span(), "connect_timeout must be above zero, e.g. \"3s\"".into()));
    }
    if h.response_timeout.is_some_and(|t| t.is_zero()) {
        return Err((h.port.span(), "response_timeout must be above zero, e.g. \"5m\"".into()));
    }
    if h.send_timeout.is_some_and(|t| t.is_zero()) {
        return Err((h.port.span(), "send_timeout must be above zero, e.g. \"5m\"".into()));
    }
    Ok(())
}

fn parse_http(h: HttpEntry) -> Result<HttpRoute, (Range<usize>, String)> {
    check_upstream(&h)?;
    if h.hosts.is_empty() {
        return Err((h.port.span(), "an http route needs at least one entry in `hosts`".into()));
    }
    let hosts = h
        .hosts
        .iter()
        .map(|s| HostPattern::parse(s.get_ref()).map_err(|m| (s.span(), m.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let path = h.path.get_ref();
    if !path.starts_with('/') {
        return Err((h.path.span(), format!("path `{path}` must start with `/`")));
    }
    if *h.port.get_ref() == 0 {
        return Err((h.port.span(), "port must be between 1 and 65535".into()));
    }
    let tls = if h.tls.acme { TlsWish::Acme { email: h.tls.email, names: None } } else { TlsWish::None };
    if let Some(r) = &h.rewrite {
        if !r.get_ref().starts_with('/') {
            return Err((r.span(), format!("rewrite `{}` must start with `/`", r.get_ref())));
        }
    }
    let basic_auth = match h.basic_auth {
        None => None,
        Some(spanned) => {
            let span = spanned.span();
            let e = spanned.into_inner();
            let auth = crate::state::BasicAuth {
                users: e.users,
                realm: e.realm,
                remove_header: e.remove_header,
                header_field: e.header_field,
            };
            if let Some(bad) = auth.bad_entry() {
                return Err((span, format!("basic_auth: {bad}")));
            }
            Some(auth)
        }
    };
    let allow_from = match h.allow_from {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|n| {
                    crate::state::parse_network(n).map_err(|e| (h.port.span(), format!("allow_from: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let max_body = h
        .max_body
        .as_deref()
        .map(crate::state::parse_size)
        .transpose()
        .map_err(|e| (h.port.span(), format!("max_body: {e}")))?;
    crate::http::middleware::Chain::compile(
        &h.middlewares,
        "check",
        &crate::http::middleware::Shared::default(),
    )
    .map_err(|e| (h.port.span(), format!("middlewares: {e}")))?;
    Ok(HttpRoute {
        hosts,
        path: path.clone(),
        port: *h.port.get_ref(),
        protocol: h.protocol,
        tls,
        rewrite: h.rewrite.map(Spanned::into_inner),
        https_method: h.https_method,
        // As nginx-proxy: HSTS for a year unless turned off.
        hsts: match h.hsts.as_deref() {
            Some("off") => None,
            Some(v) => Some(v.to_owned()),
            None => Some("max-age=31536000".to_owned()),
        },
        refused: None,
        access_log: h.access_log,
        basic_auth,
        allow_from,
        max_body,
        upstream_tls: h.upstream_tls,
        response_timeout: h.response_timeout,
        connect_timeout: h.connect_timeout,
        send_timeout: h.send_timeout,
        request_buffering: h.request_buffering,
        middlewares: h.middlewares,
        conditions: h.conditions,
        priority: h.priority,
        affinity: h.affinity,
        pass_host: h.pass_host,
        health_check: h.health_check,
        proxy_protocol: h.proxy_protocol,
        cert_name: None,
        tls13_only: h.tls13_only,
        client_ca: h.client_ca,
        wire_lock: None,
    })
}

/// Reads the file once, publishes it if valid, then keeps polling for changes; a change of
/// `reload` (the operator's SIGHUP) reads it at once, changed stamp or not.
/// Returns the first load's result so the caller can refuse to start on a broken file.
pub fn load_and_watch(
    path: PathBuf,
    poll: Duration,
    hub: Arc<StateHub>,
    metrics: Arc<Metrics>,
    mut reload: tokio::sync::watch::Receiver<()>,
) -> Result<tokio::task::JoinHandle<()>, RoutesError> {
    let mut seen = Stamp::read(&path);
    let text = std::fs::read_to_string(&path).map_err(|e| RoutesError {
        path: path.clone(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    let state = parse(&path, &text, NAME)?;
    let mut last_text = text;
    hub.publish(NAME, state);
    metrics.provider_reloads.with_label_values(&[NAME]).inc();
    tracing::info!(file = %path.display(), "routes file loaded");

    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Ok(()) = reload.changed() => true,
            };
            let stamp = Stamp::read(&path);
            if stamp == seen && !forced {
                continue;
            }
            seen = stamp;
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    metrics.provider_reload_rejected.with_label_values(&[NAME]).inc();
                    tracing::warn!(file = %path.display(), error = %e, "routes file unreadable; keeping the routes in force");
                    continue;
                }
            };
            if text == last_text {
                if forced {
                    tracing::info!(file = %path.display(), "routes file unchanged");
                }
                continue;
            }
            match parse(&path, &text, NAME) {
                Ok(state) => {
                    let generation = hub.publish(NAME, state);
                    metrics.provider_reloads.with_label_values(&[NAME]).inc();
                    tracing::info!(file = %path.display(), generation, "routes file reloaded");
                }
                Err(e) => {
                    metrics.provider_reload_rejected.with_label_values(&[NAME]).inc();
                    tracing::warn!("routes file rejected, keeping the routes in force: {e}");
                }
            }
            last_text = text;
        }
    }))
}

/// What tells us the file may have changed, without reading it.
#[derive(PartialEq, Eq)]
struct Stamp(Option<(SystemTime, u64, u64)>);

impl Stamp {
    fn read(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self(
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[[services]]
name = "web"
stack = "shop"
tasks = [{ address = "10.0.0.5" }, { address = "127.0.0.1:8001", node = "n2", health = "healthy" }]

[[services.http]]
hosts = ["Shop.Example.com", "*.shop.example.com"]
path = "/api"
port = 8080
protocol = "h2c"
tls = { acme = true, email = "ops@example.com" }

[[services.l4]]
protocol = "udp"
published = 5353
target = 53
"#;

    fn p(text: &str) -> Result<MeshState, RoutesError> {
        parse(Path::new("routes.toml"), text, NAME)
    }

    #[test]
    fn full_example_parses() {
        let state = p(FULL).unwrap();
        let web = &state.services[0];
        assert_eq!(web.stack.as_deref(), Some("shop"));
        assert_eq!(web.tasks[0].id, "web.1");
        assert_eq!(web.tasks[0].socket_addr(8080).to_string(), "10.0.0.5:8080");
        assert_eq!(web.tasks[1].socket_addr(8080).to_string(), "127.0.0.1:8001");
        assert_eq!(web.http[0].hosts[0], HostPattern::Exact("shop.example.com".into()));
        assert_eq!(web.http[0].protocol, UpstreamProtocol::H2c);
        assert_eq!(web.http[0].tls, TlsWish::Acme { email: Some("ops@example.com".into()), names: None });
        assert_eq!(web.l4[0].protocol, L4Protocol::Udp);
    }

    #[test]
    fn errors_name_the_line_and_problem() {
        let cases = [
            ("[[services]]\nname = \"a\"\ntasks = [{ address = \"nope\" }]\n", 3, "not an IP address"),
            (
                "[[services]]\nname = \"a\"\n[[services.http]]\nhosts = [\"bad host\"]\nport = 80\n",
                4,
                "not a valid host",
            ),
            (
                "[[services]]\nname = \"a\"\n[[services.http]]\nhosts = [\"a\"]\nport = 80\npath = \"x\"\n",
                6,
                "must start with",
            ),
            ("[[services]]\nname = \"a\"\n\n[[services]]\nname = \"a\"\n", 5, "defined twice"),
            ("[[services]]\nname = \"a\"\nprot = 1\n", 3, "unknown field"),
            (
                "[[services]]\nname = \"a\"\n[[services.http]]\nhosts = [\"a\"]\nport = \"abc\"\n",
                5,
                "invalid type",
            ),
        ];
        for (text, line, needle) in cases {
            let err = p(text).unwrap_err();
            assert_eq!(err.line, line, "{err}");
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
            assert!(err.to_string().starts_with("routes.toml, line"), "{err}");
        }
    }

    #[test]
    fn fuzzed_routes_files_are_taken_or_refused_with_a_line_never_a_crash() {
        let valid =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/routes.example.toml"))
                .unwrap();
        crate::fuzz::run(
            "routes file",
            |rng| crate::fuzz::mutated(rng, &valid),
            |text| {
                let _ = parse(Path::new("routes.toml"), text, NAME);
            },
        );
    }
}
