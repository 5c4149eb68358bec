//! The compiled routing table: host and path to a route and its endpoints.
//!
//! Built from a [`MeshState`] off the request path and swapped in whole. Lookup order
//! follows nginx: an exact host, then `*.suffix` wildcards (longest first), then `prefix.*`
//! wildcards (longest first), then the default host; within a host, the longest path prefix.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use super::affinity::{rendezvous, task_token, Wish};
use super::condition::Ask;
use super::endpoint::{Endpoint, EndpointRegistry, Reach};
use crate::metrics::{Metrics, RouteMetrics};
use crate::state::{HostPattern, HttpsMethod, MeshState, UpstreamProtocol};

/// One HTTP route with its healthy endpoints.
pub struct Route {
    /// `host/path` of the route's first host: the label in logs and metrics.
    pub name: String,
    pub service: String,
    pub path: String,
    /// Replacement for the matched path prefix (`VIRTUAL_DEST`).
    pub rewrite: Option<String>,
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub metrics: RouteMetrics,
    pub https_method: HttpsMethod,
    /// `Strict-Transport-Security` for HTTPS responses.
    pub hsts: Option<http::HeaderValue>,
    /// Why it is not served (it asks for a restriction meshgate does not honour): 503.
    pub refused: Option<String>,
    /// Whether its requests are written to the access log.
    pub access_log: bool,
    /// Its names in access log lines.
    pub log_names: Arc<super::access_log::RouteNames>,
    /// Who may use it (basic authentication), as configured and as checked.
    pub basic_auth: Option<(crate::state::BasicAuth, Arc<super::basic_auth::Checker>)>,
    /// Only clients from these networks; others get 403.
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// Largest request body it takes (`None`: the agent's limit).
    pub max_body: Option<u64>,
    /// Time its tasks have for a response head (`None`: the agent's).
    pub response_timeout: Option<std::time::Duration>,
    /// Time to connect to its tasks (`None`: the agent's).
    pub connect_timeout: Option<std::time::Duration>,
    /// Time its tasks have to take each piece of a request body (`None`: the agent's).
    pub send_timeout: Option<std::time::Duration>,
    /// Its request bodies are read before its tasks get them (its own setting, or a
    /// `buffering` middleware).
    pub request_buffering: bool,
    /// Its middlewares, as configured (claims of one host and path merge only when alike)
    /// and compiled.
    pub middlewares: (Vec<crate::state::Middleware>, super::middleware::Chain),
    /// What a request must also be for this route (as configured, and compiled).
    pub conditions: (Vec<crate::state::Condition>, super::condition::Conditions),
    /// Its rank among a host's routes (see [`crate::state::HttpRoute::priority`]).
    pub priority: Option<i64>,
    /// Which task a client keeps to.
    pub affinity: Option<crate::state::Affinity>,
    /// The task gets the client's `Host` (else its own address).
    pub pass_host: bool,
    /// The certificate its hosts are served with (`CERT_NAME`).
    pub cert_name: Option<String>,
    /// The CA whose certificate clients must show (mutual TLS).
    pub client_ca: Option<Arc<std::path::Path>>,
}

impl Route {
    /// The path and query the task gets: the matched prefix replaced by `rewrite`, if set.
    #[must_use]
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        let Some(dest) = &self.rewrite else { return path_and_query.into() };
        let rest = path_and_query.get(self.path.len()..).unwrap_or("");
        let joined = match (dest.ends_with('/'), rest.starts_with('/')) {
            (true, true) => format!("{dest}{}", &rest[1..]),
            (false, false) if !rest.is_empty() && !rest.starts_with('?') => format!("{dest}/{rest}"),
            _ => format!("{dest}{rest}"),
        };
        joined.into()
    }

    /// The endpoint for a request that wishes for one (affinity), else as [`Route::pick`].
    #[must_use]
    pub fn choose(&self, exclude: Option<&Arc<Endpoint>>, wish: &Wish) -> Option<Arc<Endpoint>> {
        let usable = |e: &&Arc<Endpoint>| {
            e.unreachable().is_none() && !e.is_ejected() && exclude.is_none_or(|x| !Arc::ptr_eq(x, e))
        };
        let wished = match wish {
            Wish::Any => None,
            Wish::Hash(client) => rendezvous(*client, self.endpoints.iter().filter(usable)),
            Wish::Token(token) => {
                self.endpoints.iter().filter(usable).find(|e| task_token(&e.task) == *token)
            }
        };
        wished.cloned().or_else(|| self.pick(exclude))
    }

    /// Power of two choices on in-flight requests among endpoints that are not ejected
    /// (all of them if every one is ejected: better a try than a certain 503), never
    /// `exclude` (the endpoint that just failed).
    #[must_use]
    pub fn pick(&self, exclude: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let allowed =
            |e: &&Arc<Endpoint>| e.unreachable().is_none() && exclude.is_none_or(|x| !Arc::ptr_eq(x, e));
        let healthy = self.endpoints.iter().filter(allowed).filter(|e| !e.is_ejected()).count();
        let candidates =
            || self.endpoints.iter().filter(allowed).filter(move |e| healthy == 0 || !e.is_ejected());
        let n = if healthy > 0 { healthy } else { candidates().count() };
        match n {
            0 => None,
            1 => candidates().next().cloned(),
            _ => {
                let i = fastrand::usize(..n);
                let mut j = fastrand::usize(..n - 1);
                if j >= i {
                    j += 1;
                }
                match (candidates().nth(i), candidates().nth(j)) {
                    (Some(a), Some(b)) => Some(if b.in_flight() < a.in_flight() { b } else { a }.clone()),
                    // Another request ejected one since the count (a task that just died):
                    // any endpoint still allowed, never a 503 while one is there.
                    (a, b) => a
                        .or(b)
                        .or_else(|| candidates().next())
                        .or_else(|| self.endpoints.iter().find(allowed))
                        .cloned(),
                }
            }
        }
    }
}

/// Two services claimed the same host and path; the first by name keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct Conflict {
    pub host: String,
    pub path: String,
    pub kept: String,
    pub ignored: String,
}

#[derive(Default)]
struct HostRoutes(Vec<Arc<Route>>);

impl HostRoutes {
    fn find(&self, ask: &Ask<'_>) -> Option<&Arc<Route>> {
        self.0.iter().find(|r| ask.path.starts_with(r.path.as_str()) && r.conditions.1.hold(ask))
    }

    /// Puts the routes in the order a request tries them: by priority when every route has
    /// one (Traefik's routers), else routes with a path regex first (nginx's regex
    /// locations win over prefixes), then the longest path prefix; then the one with more
    /// conditions (the more specific).
    fn sort(&mut self) {
        let all_ranked = self.0.iter().all(|r| r.priority.is_some());
        let len = |r: &Arc<Route>| r.path.len();
        let specific = |r: &Arc<Route>| r.conditions.0.len();
        let regex = |r: &Arc<Route>| {
            r.conditions
                .0
                .iter()
                .any(|c| !c.negated && matches!(c.test, crate::state::Test::PathRegexp { .. }))
        };
        self.0.sort_by(|a, b| {
            let by_rank = b.priority.cmp(&a.priority);
            let by_path = regex(b).cmp(&regex(a)).then(len(b).cmp(&len(a)));
            let first = if all_ranked { by_rank.then(by_path) } else { by_path.then(by_rank) };
            first.then(specific(b).cmp(&specific(a)))
        });
    }
}

/// One route for two claims of a host and path that are served alike (neither refused, same
/// protocol, path rewrite and HTTPS behaviour): the tasks of both. `None`: they differ, a
/// conflict.
fn merged(a: &Route, b: &Route) -> Option<Route> {
    let auth = |r: &Route| r.basic_auth.as_ref().map(|(data, _)| data.clone());
    // What decides who may use the route and how it is served, then how it reaches tasks.
    let access = |r: &Route| {
        (
            r.protocol,
            r.rewrite.clone(),
            r.https_method,
            r.hsts.clone(),
            auth(r),
            r.allow_from.clone(),
            r.cert_name.clone(),
            r.client_ca.clone(),
        )
    };
    let reach = |r: &Route| {
        let timeouts = (r.response_timeout, r.connect_timeout, r.send_timeout);
        (r.max_body, timeouts, r.affinity.clone(), (r.pass_host, r.request_buffering))
    };
    let alike = a.refused.is_none()
        && b.refused.is_none()
        && access(a) == access(b)
        && reach(a) == reach(b)
        && a.middlewares.0 == b.middlewares.0
        && a.conditions.0 == b.conditions.0;
    alike.then(|| Route {
        name: a.name.clone(),
        service: format!("{}+{}", a.service, b.service),
        path: a.path.clone(),
        rewrite: a.rewrite.clone(),
        protocol: a.protocol,
        endpoints: a.endpoints.iter().chain(&b.endpoints).cloned().collect(),
        metrics: a.metrics.clone(),
        https_method: a.https_method,
        hsts: a.hsts.clone(),
        refused: None,
        access_log: a.access_log || b.access_log,
        basic_auth: a.basic_auth.clone(),
        allow_from: a.allow_from.clone(),
        max_body: a.max_body,
        response_timeout: a.response_timeout,
        connect_timeout: a.connect_timeout,
        send_timeout: a.send_timeout,
        request_buffering: a.request_buffering,
        middlewares: a.middlewares.clone(),
        conditions: a.conditions.clone(),
        priority: a.priority,
        affinity: a.affinity.clone(),
        pass_host: a.pass_host,
        cert_name: a.cert_name.clone(),
        client_ca: a.client_ca.clone(),
        log_names: Arc::new(super::access_log::RouteNames {
            router: a.name.clone(),
            service: format!("{}+{}", a.service, b.service),
        }),
    })
}

/// A route's basic authentication, as configured and as checked.
fn checked_auth(
    http: &crate::state::HttpRoute,
) -> Option<(crate::state::BasicAuth, Arc<super::basic_auth::Checker>)> {
    http.basic_auth.as_ref().map(|a| (a.clone(), Arc::new(super::basic_auth::Checker::new(a))))
}

/// Whether a route reads request bodies before its tasks get them: its own setting, or a
/// Traefik `buffering` middleware (which buffers).
fn buffers(http: &crate::state::HttpRoute) -> bool {
    http.request_buffering
        || http.middlewares.iter().any(|m| matches!(m, crate::state::Middleware::Buffering { .. }))
}

/// The endpoints of the routable tasks of `svc` for one HTTP route, each reached the way
/// this node can (directly, through a hop, or not at all: reported).
fn endpoints_of(
    svc: &crate::state::Service,
    http: &crate::state::HttpRoute,
    state: &MeshState,
    registry: &EndpointRegistry,
    reach: &Reach,
) -> Vec<Arc<Endpoint>> {
    svc.tasks
        .iter()
        .filter(|t| t.health.routable())
        .map(|t| {
            let how = (http.protocol, http.upstream_tls.as_ref(), http.proxy_protocol);
            registry.get(reach.resolve(state, t, http.port), how, &svc.name, &t.id, &t.node)
        })
        .collect()
}

/// Tasks this node cannot reach, each told once with the reason (never dialled).
fn note_unreachable(svc: &crate::state::Service, endpoints: &[Arc<Endpoint>], unreachable: &mut Vec<String>) {
    for e in endpoints {
        if let Some(why) = e.unreachable() {
            let problem = format!("service `{}` task `{}` ({}): {why}; not routed", svc.name, e.task, e.addr);
            if !unreachable.contains(&problem) {
                unreachable.push(problem);
            }
        }
    }
}

/// The active checks a route asks of its endpoints, with the `Host` they send (the check's
/// own, else the route's first exact host).
fn health_checks(
    http: &crate::state::HttpRoute,
    endpoints: &[Arc<Endpoint>],
) -> Vec<(Arc<Endpoint>, crate::state::HealthCheck, String)> {
    let Some(check) = &http.health_check else { return Vec::new() };
    let host = check.hostname.clone().unwrap_or_else(|| match &http.hosts[0] {
        HostPattern::Exact(h) => h.clone(),
        _ => String::from("localhost"),
    });
    endpoints.iter().map(|e| (e.clone(), check.clone(), host.clone())).collect()
}

/// A route's compiled middlewares, or why it is refused (its own reason, or a middleware
/// that does not compile, or one that changes the path beside `VIRTUAL_DEST`).
fn chain_of(
    http: &crate::state::HttpRoute,
    key: &str,
    shared: &super::middleware::Shared,
) -> (super::middleware::Chain, Option<String>) {
    if http.middlewares.is_empty() || http.refused.is_some() {
        return (super::middleware::Chain::default(), http.refused.clone());
    }
    match super::middleware::Chain::compile(&http.middlewares, key, shared) {
        Ok(chain) if chain.changes_path() && http.rewrite.is_some() => (
            super::middleware::Chain::default(),
            Some("a path rewrite and a middleware that changes the path on one route: not served".into()),
        ),
        Ok(chain) => (chain, None),
        Err(e) => (super::middleware::Chain::default(), Some(format!("middleware: {e}; not served"))),
    }
}

#[derive(Default)]
pub struct RouteTable {
    exact: HashMap<String, HostRoutes>,
    /// `.example.com` for `*.example.com`: a lookup tries each of the host's own suffixes,
    /// longest first, so its cost follows the host's labels, not the number of wildcards.
    suffix: HashMap<String, HostRoutes>,
    /// `example.` for `example.*`, likewise by the host's own prefixes.
    prefix: HashMap<String, HostRoutes>,
    /// Host regexes, in name order.
    regex: Vec<(regex::Regex, HostRoutes)>,
    /// The same regexes as one set, matched in one pass (a request tried each in turn
    /// before); `None` when the set would be too large to build, and then they are.
    regex_set: Option<regex::RegexSet>,
    default_host: Option<String>,
    /// Some route asks clients for a certificate.
    client_cas: bool,
    pub conflicts: Vec<Conflict>,
    /// Tasks this node cannot reach, each with the reason (never dialled).
    pub unreachable: Vec<String>,
    pub generation: u64,
}

impl RouteTable {
    /// Compiles a state. Services are taken in name order so conflicts resolve the same
    /// way on every node and every reload.
    #[must_use]
    pub fn compile(
        state: &MeshState,
        generation: u64,
        default_host: Option<&str>,
        registry: &EndpointRegistry,
        reach: &Reach,
        metrics: &Metrics,
        shared: &super::middleware::Shared,
    ) -> Self {
        let mut by_pattern: HashMap<HostPattern, Vec<Arc<Route>>> = HashMap::new();
        let mut conflicts = Vec::new();
        let mut unreachable = Vec::new();
        let mut checked = Vec::new();
        let mut services: Vec<_> = state.services.iter().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        metrics.route_refused.reset();
        for svc in services {
            for http in &svc.http {
                let name = format!("{}{}", http.hosts[0], http.path);
                let (chain, mut refused) = chain_of(http, &format!("{}|{name}", svc.name), shared);
                let conditions =
                    super::condition::Conditions::compile(&http.conditions).unwrap_or_else(|e| {
                        refused.get_or_insert_with(|| format!("condition: {e}; not served"));
                        super::condition::Conditions::default()
                    });
                // A refused route dials nothing.
                let endpoints = if refused.is_some() {
                    Vec::new()
                } else {
                    endpoints_of(svc, http, state, registry, reach)
                };
                note_unreachable(svc, &endpoints, &mut unreachable);
                if refused.is_some() {
                    metrics.route_refused.with_label_values(&[&name, &svc.name]).set(1);
                }
                checked.extend(health_checks(http, &endpoints));
                let route = Arc::new(Route {
                    metrics: metrics.route(&name, &svc.name),
                    log_names: Arc::new(super::access_log::RouteNames {
                        router: name.clone(),
                        service: svc.name.clone(),
                    }),
                    name,
                    service: svc.name.clone(),
                    path: http.path.clone(),
                    rewrite: http.rewrite.clone(),
                    https_method: http.https_method,
                    hsts: http.hsts.as_deref().and_then(|h| http::HeaderValue::from_str(h).ok()),
                    refused,
                    access_log: http.access_log,
                    middlewares: (http.middlewares.clone(), chain),
                    conditions: (http.conditions.clone(), conditions),
                    priority: http.priority,
                    affinity: http.affinity.clone(),
                    pass_host: http.pass_host,
                    cert_name: http.cert_name.clone(),
                    client_ca: http.client_ca.as_deref().map(Arc::from),
                    allow_from: http.allow_from.clone(),
                    max_body: http.max_body,
                    response_timeout: http.response_timeout,
                    connect_timeout: http.connect_timeout,
                    send_timeout: http.send_timeout,
                    request_buffering: buffers(http),
                    basic_auth: checked_auth(http),
                    protocol: http.protocol,
                    endpoints,
                });
                for host in &http.hosts {
                    let routes = by_pattern.entry(host.clone()).or_default();
                    if let Some(kept) =
                        routes.iter_mut().find(|r| r.path == http.path && r.conditions.0 == http.conditions)
                    {
                        // As nginx-proxy: workloads sharing a host and path, alike in how they
                        // are served, are one upstream.
                        if let Some(merged) = merged(kept, &route) {
                            *kept = Arc::new(merged);
                            continue;
                        }
                        // Fails closed: of two claims that differ in what restricts access,
                        // the refused one is kept (503), never the open one.
                        let (kept_name, ignored) = if route.refused.is_some() && kept.refused.is_none() {
                            let open = std::mem::replace(kept, route.clone());
                            (svc.name.clone(), open.service.clone())
                        } else {
                            (kept.service.clone(), svc.name.clone())
                        };
                        conflicts.push(Conflict {
                            host: host.to_string(),
                            path: http.path.clone(),
                            kept: kept_name,
                            ignored,
                        });
                        continue;
                    }
                    routes.push(route.clone());
                }
            }
        }
        shared.health.keep(checked);
        let mut table = Self {
            default_host: default_host.map(str::to_ascii_lowercase),
            conflicts,
            unreachable,
            generation,
            ..Self::default()
        };
        table.index(by_pattern);
        let client_cas = table.routes().any(|(_, r)| r.client_ca.is_some());
        table.client_cas = client_cas;
        table
    }

    /// Whether any route asks clients for a certificate (else handshakes need not look at
    /// the name first).
    #[must_use]
    pub fn asks_client_certificates(&self) -> bool {
        self.client_cas
    }

    /// What a handshake for `name` asks of the client: the CA of the first route a request
    /// to that name could reach that has one, required when all of them have one. (Routes
    /// of one host with another CA answer 403 to the certificate this one asked for.)
    #[must_use]
    pub fn client_demand(&self, name: &str) -> Option<crate::tls::client_auth::Demand> {
        let host = normalise_host(name);
        let mut routes = self.reachable_from(&host);
        let ca = routes.clone().find_map(|r| r.client_ca.clone())?;
        let required = routes.all(|r| r.client_ca.is_some());
        Some(crate::tls::client_auth::Demand { ca, required })
    }

    /// Every route a request to `host` could reach, whatever its path and conditions, in the
    /// order a lookup tries them (the default host's last).
    fn reachable_from<'a, 'h>(
        &'a self,
        host: &'h str,
    ) -> impl Iterator<Item = &'a Arc<Route>> + Clone + use<'a, 'h> {
        let default = self.default_host.as_deref().into_iter().flat_map(|d| self.groups(d));
        self.groups(host).chain(default).flat_map(|r| r.0.iter())
    }

    /// Files each host pattern's routes (longest path first) where lookups find them:
    /// exact names and wildcards in maps, regexes in a stable order.
    fn index(&mut self, by_pattern: HashMap<HostPattern, Vec<Arc<Route>>>) {
        let table = self;
        for (pattern, routes) in by_pattern {
            let mut routes = HostRoutes(routes);
            routes.sort();
            match pattern {
                HostPattern::Exact(h) => {
                    table.exact.insert(h, routes);
                }
                HostPattern::Suffix(s) => {
                    table.suffix.insert(s, routes);
                }
                HostPattern::Prefix(p) => {
                    table.prefix.insert(p, routes);
                }
                HostPattern::Regex(r) => match regex::Regex::new(&r) {
                    Ok(re) => table.regex.push((re, routes)),
                    Err(e) => {
                        tracing::warn!(regex = %r, error = %e, "host regex does not compile; route skipped");
                    }
                },
            }
        }
        table.regex.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        if !table.regex.is_empty() {
            table.regex_set = regex::RegexSet::new(table.regex.iter().map(|(re, _)| re.as_str()))
                .inspect_err(
                    |e| tracing::warn!(error = %e, "host regexes as one set: {e}; each is tried in turn"),
                )
                .ok();
        }
    }

    /// Every (host pattern, route) pair, for `/api/state` and the status page.
    pub fn routes(&self) -> impl Iterator<Item = (String, &Arc<Route>)> {
        let exact = self.exact.iter().map(|(h, r)| (h.clone(), r));
        let suffix = self.suffix.iter().map(|(s, r)| (format!("*{s}"), r));
        let prefix = self.prefix.iter().map(|(p, r)| (format!("{p}*"), r));
        let regex = self.regex.iter().map(|(re, r)| (format!("~{}", re.as_str()), r));
        exact
            .chain(suffix)
            .chain(prefix)
            .chain(regex)
            .flat_map(|(host, routes)| routes.0.iter().map(move |r| (host.clone(), r)))
    }

    /// The route for a request to `host` (the raw `Host` value: any case, maybe a port) and
    /// `path`, with no other condition met (the request is a GET from nowhere).
    #[must_use]
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let headers = http::HeaderMap::new();
        let ask = Ask {
            host,
            path,
            method: &http::Method::GET,
            headers: &headers,
            query: None,
            client: std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        self.find(&ask)
    }

    /// The route a request goes to.
    #[must_use]
    pub fn find(&self, ask: &Ask<'_>) -> Option<&Arc<Route>> {
        let host = normalise_host(ask.host);
        self.find_on(&host, ask).or_else(|| {
            let default = self.default_host.as_deref()?;
            self.find_on(default, ask)
        })
    }

    fn find_on(&self, host: &str, ask: &Ask<'_>) -> Option<&Arc<Route>> {
        self.groups(host).find_map(|r| r.find(ask))
    }

    /// The route groups a request to `host` tries, in order: the exact name; `*.example.com`
    /// for `a.b.example.com` as `.b.example.com`, then `.example.com`, then `.com` (the
    /// longest wildcard first, as nginx; never the whole host); `example.*` for
    /// `example.co.uk` as `example.co.`, then `example.`; then the regexes that match.
    fn groups<'a, 'h>(&'a self, host: &'h str) -> impl Iterator<Item = &'a HostRoutes> + Clone + use<'a, 'h> {
        let dots = move || host.match_indices('.').map(|(i, _)| i);
        let suffix = dots().filter(|&i| i > 0).filter_map(move |i| self.suffix.get(&host[i..]));
        let prefix = dots()
            .rev()
            .filter(move |&i| i + 1 < host.len())
            .filter_map(move |i| self.prefix.get(&host[..=i]));
        // Only reached when nothing before took the request: the regexes are matched lazily,
        // as one set when there is one.
        let regex = std::iter::once(()).flat_map(move |()| {
            let hits: Vec<usize> = match &self.regex_set {
                Some(set) => set.matches(host).into_iter().collect(),
                None => (0..self.regex.len()).filter(|&i| self.regex[i].0.is_match(host)).collect(),
            };
            hits.into_iter().map(|i| &self.regex[i].1)
        });
        self.exact.get(host).into_iter().chain(suffix).chain(prefix).chain(regex)
    }
}

/// Lower-cases a `Host` value and strips the port and a trailing dot, without allocating
/// in the common (already lower-case) case.
#[must_use]
pub fn normalise_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Health, HttpRoute, Service, Task};

    fn svc(name: &str, hosts: &[&str], path: &str, tasks: usize) -> Service {
        Service {
            name: name.into(),
            stack: None,
            provider: "test".into(),
            tasks: (0..tasks)
                .map(|i| Task {
                    id: format!("{name}.{i}"),
                    address: [127, 0, 0, 1].into(),
                    port: Some(10_000 + i as u16),
                    node: "n".into(),
                    health: Health::Unknown,
                    network: None,
                    aliases: vec![],
                    node_local: false,
                })
                .collect(),
            http: vec![HttpRoute::new(
                hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect(),
                path.into(),
                80,
            )],
            l4: vec![],
        }
    }

    fn table(services: Vec<Service>, default: Option<&str>) -> RouteTable {
        let m = Metrics::new();
        let reg = EndpointRegistry::new(m.backend_up.clone());
        RouteTable::compile(
            &MeshState::of_services(services),
            1,
            default,
            &reg,
            &Reach::default(),
            &m,
            &crate::http::middleware::Shared::default(),
        )
    }

    fn svc_of<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        t.lookup(host, path).map(|r| r.service.as_str())
    }

    #[test]
    fn exact_before_wildcards_and_longest_suffix_first() {
        let t = table(
            vec![
                svc("exact", &["a.example.com"], "/", 1),
                svc("wild", &["*.example.com"], "/", 1),
                svc("deeper", &["*.b.example.com"], "/", 1),
                svc("pre", &["example.*"], "/", 1),
                svc("re", &["~^api[0-9]+\\.test$"], "/", 1),
                // Drop-in issue: nginx searches a `~regex` (its anchors are its own).
                svc("search", &["~^web3\\..*\\.example"], "/", 1),
            ],
            None,
        );
        assert_eq!(svc_of(&t, "web3.x.example-and-more", "/"), Some("search"));
        assert_eq!(svc_of(&t, "www.web3.x.example", "/"), None);
        assert_eq!(svc_of(&t, "A.Example.Com:8080", "/x"), Some("exact"));
        assert_eq!(svc_of(&t, "z.example.com", "/"), Some("wild"));
        assert_eq!(svc_of(&t, "x.b.example.com.", "/"), Some("deeper"));
        assert_eq!(svc_of(&t, "example.com", "/"), Some("pre"));
        assert_eq!(svc_of(&t, "example.org", "/"), Some("pre"));
        assert_eq!(svc_of(&t, "other.net", "/"), None);
        assert_eq!(svc_of(&t, "API42.test", "/"), Some("re"));
        assert_eq!(svc_of(&t, "api.test", "/"), None);
        assert_eq!(svc_of(&t, "[::1]:80", "/"), None);
    }

    #[test]
    fn host_regexes_match_in_name_order_as_one_set_and_each_in_turn() {
        let mut t = table(
            vec![
                svc("b", &["~^b[0-9]+\\.test$"], "/", 1),
                svc("any", &["~\\.test$"], "/api", 1),
                svc("a", &["~^a[0-9]+\\.test$"], "/", 1),
            ],
            None,
        );
        for set in [true, false] {
            assert_eq!(t.regex_set.is_some(), set);
            assert_eq!(svc_of(&t, "a1.test", "/"), Some("a"), "set: {set}");
            assert_eq!(svc_of(&t, "b7.test", "/"), Some("b"));
            // `\.test$` sorts before `^b...` and has the longer path for /api.
            assert_eq!(svc_of(&t, "b7.test", "/api"), Some("any"));
            assert_eq!(svc_of(&t, "c.test", "/api"), Some("any"));
            assert_eq!(svc_of(&t, "c.test", "/"), None);
            t.regex_set = None;
        }
    }

    #[test]
    fn longest_path_prefix_wins_and_falls_through_to_wildcards() {
        let t = table(
            vec![
                svc("api", &["a.test"], "/api", 1),
                svc("apiv2", &["a.test"], "/api/v2", 1),
                svc("wild", &["*.test"], "/", 1),
            ],
            None,
        );
        assert_eq!(svc_of(&t, "a.test", "/api/v2/x"), Some("apiv2"));
        assert_eq!(svc_of(&t, "a.test", "/api/v1"), Some("api"));
        assert_eq!(svc_of(&t, "a.test", "/"), Some("wild"));
    }

    #[test]
    fn default_host_catches_unknown_hosts() {
        let t = table(vec![svc("web", &["www.test"], "/", 1)], Some("www.test"));
        assert_eq!(svc_of(&t, "nobody.test", "/"), Some("web"));
    }

    #[test]
    fn services_sharing_a_host_are_one_upstream_and_different_ones_conflict() {
        // Drop-in issue: as nginx-proxy, two workloads with one VIRTUAL_HOST are balanced.
        let t = table(vec![svc("zeta", &["c.test"], "/", 1), svc("alpha", &["c.test"], "/", 2)], None);
        assert_eq!(svc_of(&t, "c.test", "/"), Some("alpha+zeta"));
        assert_eq!(t.lookup("c.test", "/").unwrap().endpoints.len(), 3);
        assert!(t.conflicts.is_empty());
        // Served differently (here: another HTTPS behaviour): the first by name keeps it.
        let mut other = svc("zeta", &["d.test"], "/", 1);
        other.http[0].https_method = crate::state::HttpsMethod::Noredirect;
        let t = table(vec![other, svc("alpha", &["d.test"], "/", 1)], None);
        assert_eq!(svc_of(&t, "d.test", "/"), Some("alpha"));
        assert_eq!(t.conflicts.len(), 1);
        assert_eq!(t.conflicts[0].ignored, "zeta");
        // One refused: it is kept, never the open one.
        let mut refused = svc("zeta", &["e.test"], "/", 1);
        refused.http[0].refused = Some("a middleware".into());
        let t = table(vec![refused, svc("alpha", &["e.test"], "/", 1)], None);
        assert!(t.lookup("e.test", "/").unwrap().refused.is_some());
    }

    #[test]
    fn p2c_spreads_and_skips_excluded() {
        let t = table(vec![svc("web", &["w.test"], "/", 3)], None);
        let route = t.lookup("w.test", "/").unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(route.pick(None).unwrap().addr);
        }
        assert_eq!(seen.len(), 3);
        let first = route.endpoints[0].clone();
        for _ in 0..50 {
            assert!(!Arc::ptr_eq(&route.pick(Some(&first)).unwrap(), &first));
        }
        // A busy endpoint loses every comparison it takes part in.
        for _ in 0..10 {
            first.begin();
        }
        let picks = (0..300).filter(|_| Arc::ptr_eq(&route.pick(None).unwrap(), &first)).count();
        assert_eq!(picks, 0);
    }

    #[test]
    fn ejected_endpoints_are_skipped_unless_all_are() {
        let t = table(vec![svc("web", &["w.test"], "/", 2)], None);
        let route = t.lookup("w.test", "/").unwrap();
        let (a, b) = (&route.endpoints[0], &route.endpoints[1]);
        a.record_failure(std::time::Duration::from_secs(60), std::time::Duration::from_secs(60));
        for _ in 0..50 {
            assert!(Arc::ptr_eq(&route.pick(None).unwrap(), b));
        }
        b.record_failure(std::time::Duration::from_secs(60), std::time::Duration::from_secs(60));
        assert!(route.pick(None).is_some(), "all ejected: still try one");
        a.record_success();
        assert!(!a.is_ejected());
    }

    #[test]
    fn conditions_pick_among_a_hosts_routes_and_priority_orders_ranked_routes() {
        use crate::state::{Condition, Test};
        let mut post = svc("post", &["c.test"], "/", 1);
        post.http[0].conditions = vec![Condition::is(Test::Method { methods: vec!["POST".into()] })];
        let any = svc("any", &["c.test"], "/", 1);
        let t = table(vec![post, any], None);
        let headers = http::HeaderMap::new();
        let ask = |method| Ask {
            host: "c.test",
            path: "/x",
            method,
            headers: &headers,
            query: None,
            client: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        assert_eq!(t.find(&ask(&http::Method::POST)).unwrap().service, "post");
        assert_eq!(t.find(&ask(&http::Method::GET)).unwrap().service, "any");
        assert!(t.conflicts.is_empty(), "different conditions are not a conflict");
        // Ranked routes (Traefik's): the highest priority first, whatever the path length.
        let mut short = svc("short", &["p.test"], "/", 1);
        short.http[0].priority = Some(100);
        let mut long = svc("long", &["p.test"], "/api", 1);
        long.http[0].priority = Some(10);
        let t = table(vec![short.clone(), long.clone()], None);
        assert_eq!(t.lookup("p.test", "/api/x").unwrap().service, "short");
        // Unranked among them: the longest prefix, as nginx.
        long.http[0].priority = None;
        let t = table(vec![short, long], None);
        assert_eq!(t.lookup("p.test", "/api/x").unwrap().service, "long");
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix() {
        let mut t = svc("r", &["r.test"], "/api", 1);
        for (dest, path, want) in [
            ("/", "/api/users?x=1", "/users?x=1"),
            ("/", "/api", "/"),
            ("/v2", "/api/users", "/v2/users"),
            ("/v2/", "/api/users", "/v2/users"),
            ("/v2", "/api?q", "/v2?q"),
        ] {
            t.http[0].rewrite = Some(dest.into());
            let table = table(vec![t.clone()], None);
            assert_eq!(table.lookup("r.test", path).unwrap().upstream_path(path), want, "{dest} {path}");
        }
    }
}
