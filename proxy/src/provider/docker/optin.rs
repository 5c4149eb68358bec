//! How a container or Swarm service opts in: nginx-proxy environment variables
//! (`VIRTUAL_HOST`, ...), our `meshgate.*` labels, and the common Traefik labels.
//!
//! Pure functions over plain maps so every form is unit-tested without an engine. Every
//! problem becomes one message naming the variable or label; the broken route is skipped
//! and the others are kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::traefik_rule;
use crate::state::{HostError, HostPattern, HttpRoute, HttpsMethod, TlsWish, UpstreamProtocol};

/// What discovery knows about one container or service.
pub struct Workload<'a> {
    /// Environment variables (`KEY=value` already split).
    pub env: &'a BTreeMap<String, String>,
    pub labels: &'a HashMap<String, String>,
    /// Ports the image exposes (or a service's target ports), for the default port.
    pub exposed_ports: &'a [u16],
    /// Used for the default host with `expose_by_default` and a `default_domain`.
    pub name: &'a str,
    /// The Traefik middlewares every workload of the engine defines.
    pub middlewares: &'a super::traefik_middleware::Catalogue,
}

/// The routes a workload asks for, the network it wants to be reached on, and what was
/// wrong with its settings.
#[derive(Debug, Default)]
pub struct OptIn {
    pub routes: Vec<HttpRoute>,
    pub network: Option<String>,
    pub problems: Vec<String>,
}

/// Settings that decide what happens without an explicit opt-in.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Route workloads that did not opt in (Traefik's `exposedByDefault`).
    pub expose_by_default: bool,
    /// With `expose_by_default`: route `<name>.<default_domain>` when no host is given.
    pub default_domain: Option<String>,
    /// Traefik-labelled https services are not verified (Traefik's
    /// `serversTransport.insecureSkipVerify`).
    pub traefik_insecure_skip_verify: bool,
    /// The Traefik entrypoint names served on the HTTP listener, and on the HTTPS one.
    pub traefik_entrypoints: (Vec<String>, Vec<String>),
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            expose_by_default: false,
            default_domain: None,
            traefik_insecure_skip_verify: false,
            traefik_entrypoints: (vec!["web".into()], vec!["websecure".into()]),
        }
    }
}

pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Why a label's or variable's value cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("port `{0}` is not a number from 1 to 65535")]
    Port(String),
    #[error("protocol `{0}` is not supported (http, https or h2c)")]
    Protocol(String),
    #[error("path `{0}` must start with `/` (or `~` for a regex)")]
    Path(String),
    #[error("`{0}` is not a regular expression: {1}")]
    Regex(String, String),
    #[error("a path rewrite with a regex VIRTUAL_PATH is not supported (nginx cannot say it either)")]
    DestWithRegex,
    #[error("not host -> path -> port/dest in YAML or JSON: {0}")]
    Multiports(String),
    #[error("no host name given")]
    NoHost,
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("`{0}` is not {1}")]
    NotOneOf(String, &'static str),
    #[error(transparent)]
    Rule(#[from] traefik_rule::RuleError),
    #[error("missing; a router needs a rule such as Host(`app.example.com`)")]
    NoRule,
    #[error("the rule matches no host; meshgate routes by host, add Host(...)")]
    NoHostInRule,
}

/// One opt-in setting that cannot be used: where (`env` or `label`, its name) and why. Its
/// text is what `/api/state` lists as the workload's problem.
#[derive(Debug, thiserror::Error)]
#[error("{kind} `{name}`: {error}")]
pub struct OptInError {
    kind: &'static str,
    name: String,
    error: ValueError,
}

fn env(name: &str) -> impl Fn(ValueError) -> OptInError + '_ {
    move |error| OptInError { kind: "env", name: name.to_owned(), error }
}

fn label(name: &str) -> impl Fn(ValueError) -> OptInError + '_ {
    move |error| OptInError { kind: "label", name: name.to_owned(), error }
}

fn parse_port(v: &str) -> Result<u16, ValueError> {
    v.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| ValueError::Port(v.to_owned()))
}

fn parse_proto(v: &str) -> Result<UpstreamProtocol, ValueError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "http" => Ok(UpstreamProtocol::Http),
        "https" => Ok(UpstreamProtocol::Https),
        "h2c" => Ok(UpstreamProtocol::H2c),
        other => Err(ValueError::Protocol(other.to_owned())),
    }
}

fn parse_path(v: &str) -> Result<String, ValueError> {
    if v.starts_with('/') {
        Ok(v.to_owned())
    } else {
        Err(ValueError::Path(v.to_owned()))
    }
}

fn parse_hosts(v: &str) -> Result<Vec<HostPattern>, ValueError> {
    let hosts: Vec<HostPattern> = v
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|h| !h.is_empty())
        .map(HostPattern::parse)
        .collect::<Result<_, _>>()?;
    if hosts.is_empty() {
        return Err(ValueError::NoHost);
    }
    Ok(hosts)
}

impl Workload<'_> {
    fn default_port(&self) -> u16 {
        match self.exposed_ports {
            [only] => *only,
            _ => 80,
        }
    }
}

/// Reads every opt-in form of a workload.
#[must_use]
pub fn read(w: &Workload<'_>, defaults: &Defaults) -> OptIn {
    let mut out = OptIn::default();
    let label = |k: &str| w.labels.get(k).map(String::as_str);

    // An explicit `meshgate.enable=false` turns every form off.
    let enabled = match label("meshgate.enable").map(|v| (v, parse_bool(v))) {
        Some((_, Some(b))) => Some(b),
        Some((v, None)) => {
            let e = self::label("meshgate.enable")(ValueError::NotOneOf(v.to_owned(), "true or false"));
            out.problems.push(e.to_string());
            None
        }
        None => None,
    };
    if enabled == Some(false) {
        return out;
    }

    if let Some(spec) = w.env.get("VIRTUAL_HOST_MULTIPORTS") {
        match from_multiports(w, spec) {
            Ok(routes) => out.routes.extend(routes),
            Err(p) => out.problems.push(p.to_string()),
        }
    } else if w.env.contains_key("VIRTUAL_HOST") {
        match from_env(w) {
            Ok(route) => out.routes.push(route),
            Err(p) => out.problems.push(p.to_string()),
        }
    }
    if label("meshgate.http.hosts").is_some() {
        match from_our_labels(w) {
            Ok(route) => {
                out.problems.extend(route.refused.clone());
                out.routes.push(route);
            }
            Err(p) => out.problems.push(p.to_string()),
        }
    }
    let traefik_enabled = match label("traefik.enable") {
        Some(v) => parse_bool(v).unwrap_or_else(|| {
            let e = self::label("traefik.enable")(ValueError::NotOneOf(v.to_owned(), "true or false"));
            out.problems.push(e.to_string());
            false
        }),
        None => defaults.expose_by_default,
    };
    if traefik_enabled {
        from_traefik_labels(w, defaults, &mut out);
    }
    if out.routes.is_empty()
        && out.problems.is_empty()
        && (defaults.expose_by_default || enabled == Some(true))
    {
        if let Some(domain) = &defaults.default_domain {
            match HostPattern::parse(&format!("{}.{domain}", w.name)) {
                Ok(host) => out.routes.push(route(
                    vec![host],
                    "/".into(),
                    w.default_port(),
                    UpstreamProtocol::Http,
                    TlsWish::None,
                )),
                Err(p) => out.problems.push(format!("default host for `{}`: {p}", w.name)),
            }
        }
    }
    limits(&label, &mut out);
    upstream_tls(&label, &mut out);
    // `meshgate.http.client_ca=/etc/meshgate/clients-ca.pem`: clients show a certificate
    // that CA signed (the file on every node that serves the workload).
    if let Some(ca) = label("meshgate.http.client_ca").map(str::trim) {
        out.routes.iter_mut().for_each(|r| r.client_ca = Some(ca.into()));
    }
    balancing(&label, &mut out);
    // `meshgate.access_log=false`: none of the workload's requests are logged (a health
    // check, a metrics endpoint).
    match label("meshgate.access_log").map(|v| (v, parse_bool(v))) {
        Some((_, Some(false))) => out.routes.iter_mut().for_each(|r| r.access_log = false),
        Some((v, None)) => out.problems.push(
            self::label("meshgate.access_log")(ValueError::NotOneOf(v.to_owned(), "true or false"))
                .to_string(),
        ),
        _ => {}
    }
    out.network = label("meshgate.network")
        .or_else(|| label("traefik.docker.network"))
        .or_else(|| label("traefik.swarm.network"))
        .map(str::to_owned);
    out.problems.extend(unknown_settings(w));
    if w.env.contains_key("VIRTUAL_HOST") || w.env.contains_key("VIRTUAL_HOST_MULTIPORTS") {
        out.problems.extend(ssl_policy_problem(w));
    }
    out
}

/// nginx-proxy's `loadbalance` label and ours: which task a client keeps to; our
/// `meshgate.http.pass_host=false`: the tasks get their own address as `Host`; our
/// `meshgate.http.health_path` (`_interval`, `_timeout`, `_status`): an active check.
fn balancing<'a>(label: &impl Fn(&str) -> Option<&'a str>, out: &mut OptIn) {
    use crate::state::Affinity;
    const NGINX: &str = "com.github.nginx-proxy.nginx-proxy.loadbalance";
    let mut affinity = None;
    if let Some(v) = label(NGINX) {
        let words: String = v.split_whitespace().collect::<Vec<_>>().join(" ");
        match words.trim_end_matches(';').trim() {
            "hash $remote_addr" | "hash $remote_addr consistent" | "ip_hash" => affinity = Some(Affinity::ClientIp),
            // Least connections: meshgate's own balancing (the less busy of two) is that.
            "least_conn" | "random two least_conn" | "random two" | "" => {}
            other => out.problems.push(format!(
                "label `{NGINX}={other}`: not understood (hash $remote_addr, ip_hash, least_conn); balanced as usual"
            )),
        }
    }
    match label("meshgate.http.affinity").map(str::trim) {
        None => {}
        Some("client_ip") => affinity = Some(Affinity::ClientIp),
        Some("cookie") => {
            affinity = Some(Affinity::Cookie {
                name: label("meshgate.http.affinity_cookie").unwrap_or("meshgate_task").trim().to_owned(),
                secure: false,
                http_only: true,
                same_site: Some("lax".into()),
                max_age: None,
                path: None,
            });
        }
        Some(other) => out.problems.push(
            self::label("meshgate.http.affinity")(ValueError::NotOneOf(
                other.to_owned(),
                "client_ip or cookie",
            ))
            .to_string(),
        ),
    }
    let mut health_check = None;
    if let Some(path) = label("meshgate.http.health_path") {
        match parse_path(path.trim()) {
            Ok(path) => {
                let mut check = crate::state::HealthCheck::of(path);
                for option in ["interval", "timeout", "status"] {
                    let key = format!("meshgate.http.health_{option}");
                    if let Some(Err(e)) = label(&key).map(|v| check.set(option, v)) {
                        out.problems.push(format!("label `{key}`: {e}"));
                    }
                }
                health_check = Some(check);
            }
            Err(e) => out.problems.push(label_error("meshgate.http.health_path", e)),
        }
    }
    let proxy_protocol = match label("meshgate.http.proxy_protocol").map(|v| v.trim().to_ascii_lowercase()) {
        None => None,
        Some(v) if v == "v1" => Some(crate::state::ProxyProtocol::V1),
        Some(v) if v == "v2" => Some(crate::state::ProxyProtocol::V2),
        Some(v) => {
            out.problems
                .push(label_error("meshgate.http.proxy_protocol", ValueError::NotOneOf(v, "v1 or v2")));
            None
        }
    };
    let pass_host = match label("meshgate.http.pass_host").map(|v| (v, parse_bool(v))) {
        Some((_, Some(pass))) => Some(pass),
        Some((v, None)) => {
            out.problems.push(
                self::label("meshgate.http.pass_host")(ValueError::NotOneOf(v.to_owned(), "true or false"))
                    .to_string(),
            );
            None
        }
        None => None,
    };
    for r in &mut out.routes {
        if r.affinity.is_none() {
            r.affinity.clone_from(&affinity);
        }
        if r.health_check.is_none() {
            r.health_check.clone_from(&health_check);
        }
        if proxy_protocol.is_some() {
            r.proxy_protocol = proxy_protocol;
        }
        if let Some(pass) = pass_host {
            r.pass_host = pass;
        }
    }
}

/// Per-route limits: `meshgate.http.max_body`, `meshgate.http.response_timeout`,
/// `meshgate.http.connect_timeout`, `meshgate.http.send_timeout`,
/// `meshgate.http.request_buffering`.
fn limits<'a>(label: &impl Fn(&str) -> Option<&'a str>, out: &mut OptIn) {
    // `meshgate.http.max_body=10m`: the largest request body its routes take.
    if let Some(v) = label("meshgate.http.max_body") {
        match crate::state::parse_size(v) {
            Ok(n) => out.routes.iter_mut().for_each(|r| r.max_body = Some(n)),
            Err(e) => out.problems.push(format!("label `meshgate.http.max_body`: {e}")),
        }
    }
    // `meshgate.http.response_timeout=5m`: the time its tasks have for a response head;
    // `meshgate.http.connect_timeout=5s`: to connect to them; `meshgate.http.send_timeout=5m`:
    // to take each piece of a request body.
    for (key, set) in [
        ("meshgate.http.response_timeout", (|r, d| r.response_timeout = Some(d)) as fn(&mut HttpRoute, _)),
        ("meshgate.http.connect_timeout", |r, d| r.connect_timeout = Some(d)),
        ("meshgate.http.send_timeout", |r, d| r.send_timeout = Some(d)),
    ] {
        if let Some(v) = label(key) {
            match humantime::parse_duration(v.trim()) {
                Ok(d) if !d.is_zero() => out.routes.iter_mut().for_each(|r| set(r, d)),
                _ => out
                    .problems
                    .push(format!("label `{key}`: `{v}` is not a duration above zero (write 5s or 5m)")),
            }
        }
    }
    // `meshgate.http.request_buffering=true`: bodies are read before the task gets them.
    match label("meshgate.http.request_buffering").map(|v| (v, parse_bool(v))) {
        Some((_, Some(on))) => out.routes.iter_mut().for_each(|r| r.request_buffering = on),
        Some((v, None)) => {
            out.problems.push(format!("label `meshgate.http.request_buffering`: `{v}` is not true or false"));
        }
        None => {}
    }
}

/// `meshgate.http.upstream_verify=true` (with `meshgate.http.upstream_ca=/path/ca.pem` and
/// `meshgate.http.upstream_server_name=api.internal`; either of those alone means verify too:
/// a CA given is never ignored): the workload's https tasks are verified.
fn upstream_tls<'a>(label: &impl Fn(&str) -> Option<&'a str>, out: &mut OptIn) {
    let (ca, server_name) = (label("meshgate.http.upstream_ca"), label("meshgate.http.upstream_server_name"));
    let verify = match label("meshgate.http.upstream_verify").map(|v| (v, parse_bool(v))) {
        Some((_, Some(verify))) => Some(verify),
        Some((v, None)) => {
            out.problems.push(
                self::label("meshgate.http.upstream_verify")(ValueError::NotOneOf(
                    v.to_owned(),
                    "true or false",
                ))
                .to_string(),
            );
            Some(true)
        }
        None => (ca.is_some() || server_name.is_some()).then_some(true),
    };
    if let Some(verify) = verify {
        for r in out.routes.iter_mut().filter(|r| r.protocol == UpstreamProtocol::Https) {
            r.upstream_tls = Some(crate::state::UpstreamTls {
                verify,
                server_name: server_name.map(str::to_owned),
                ca: ca.map(std::path::PathBuf::from),
                ..Default::default()
            });
        }
    }
}

/// Variables and labels under the prefixes meshgate reads that it does not know: listed,
/// never silently dropped. (Those that restrict access refuse their route where they are
/// read: `NETWORK_ACCESS`, a router's `middlewares`, `tls.options`, `entrypoints`.)
fn unknown_settings(w: &Workload<'_>) -> Vec<String> {
    const ENV: &[&str] = &[
        "VIRTUAL_HOST",
        "VIRTUAL_PORT",
        "VIRTUAL_PROTO",
        "VIRTUAL_PATH",
        "VIRTUAL_DEST",
        "VIRTUAL_HOST_MULTIPORTS",
        "CERT_NAME",
        "SSL_POLICY",
        "LETSENCRYPT_HOST",
        "LETSENCRYPT_EMAIL",
        "ACME_HOST",
        "ACME_EMAIL",
        "HTTPS_METHOD",
        "HSTS",
        "NETWORK_ACCESS",
    ];
    const ENV_PREFIXES: &[&str] = &["VIRTUAL_", "LETSENCRYPT_", "ACME_"];
    const ENV_OTHERS: &[&str] = &["CERT_NAME", "SSL_POLICY"];
    const OURS: &[&str] = &[
        "meshgate.enable",
        "meshgate.network",
        "meshgate.http.hosts",
        "meshgate.http.port",
        "meshgate.http.proto",
        "meshgate.http.path",
        "meshgate.tls",
        "meshgate.tls.email",
        "meshgate.tls.domains",
        "meshgate.access_log",
        "meshgate.http.max_body",
        "meshgate.http.response_timeout",
        "meshgate.http.connect_timeout",
        "meshgate.http.send_timeout",
        "meshgate.http.request_buffering",
        "meshgate.http.upstream_verify",
        "meshgate.http.upstream_ca",
        "meshgate.http.upstream_server_name",
        "meshgate.http.client_ca",
        "meshgate.http.middlewares",
        "meshgate.http.affinity",
        "meshgate.http.affinity_cookie",
        "meshgate.http.pass_host",
        "meshgate.http.health_path",
        "meshgate.http.health_interval",
        "meshgate.http.health_timeout",
        "meshgate.http.health_status",
        "meshgate.http.proxy_protocol",
    ];
    const NGINX_PROXY: &[&str] =
        &["com.github.nginx-proxy.nginx-proxy.loadbalance", "com.github.nginx-proxy.nginx-proxy.keepalive"];
    let mut out = Vec::new();
    for name in w.env.keys() {
        let ours = ENV_PREFIXES.iter().any(|p| name.starts_with(p)) || ENV_OTHERS.contains(&name.as_str());
        if ours && !ENV.contains(&name.as_str()) {
            out.push(format!("env `{name}` is not supported yet: ignored"));
        }
    }
    let mut labels: Vec<&String> = w.labels.keys().collect();
    labels.sort();
    for name in labels {
        let known = if let Some(rest) = name.strip_prefix("meshgate.middlewares.") {
            known_traefik_label(&format!("traefik.http.middlewares.{rest}"))
        } else if name.starts_with("meshgate.") {
            OURS.contains(&name.as_str())
        } else if name.starts_with("traefik.") {
            known_traefik_label(name)
        } else {
            !name.starts_with("com.github.nginx-proxy.") || NGINX_PROXY.contains(&name.as_str())
        };
        if !known {
            out.push(format!("label `{name}` is not supported yet: ignored"));
        }
    }
    out
}

/// The Traefik labels meshgate reads (v2 and v3 names).
fn known_traefik_label(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["traefik", "http", "routers", _, rest @ ..] => matches!(
            rest,
            ["rule"
                | "service"
                | "entrypoints"
                | "middlewares"
                | "tls"
                | "priority"
                | "ruleSyntax"
                | "rulesyntax"]
                | ["tls", "certresolver" | "options"]
                | ["tls", _, "main" | "sans"]
                | ["observability", "accesslogs"]
        ),
        ["traefik", "http", "middlewares", _, kind, option @ ..] => super::traefik_middleware::known(
            &kind.to_ascii_lowercase(),
            &option.join(".").to_ascii_lowercase(),
        ),
        other => matches!(
            other,
            ["traefik", "enable"]
                | ["traefik", "docker" | "swarm", "network"]
                | ["traefik", "http", "services", _, "loadbalancer", "server", "port" | "scheme"]
                | ["traefik", "http", "services", _, "loadbalancer", "passhostheader" | "sticky"]
                | [
                    "traefik",
                    "http",
                    "services",
                    _,
                    "loadbalancer",
                    "healthcheck",
                    "path" | "interval" | "timeout" | "status" | "hostname"
                ]
                | ["traefik", "http", "services", _, "loadbalancer", "sticky", "cookie"]
                | [
                    "traefik",
                    "http",
                    "services",
                    _,
                    "loadbalancer",
                    "sticky",
                    "cookie",
                    "name" | "secure" | "httponly" | "samesite" | "maxage" | "path"
                ]
        ),
    }
}

fn route(
    hosts: Vec<HostPattern>,
    path: String,
    port: u16,
    protocol: UpstreamProtocol,
    tls: TlsWish,
) -> HttpRoute {
    HttpRoute { protocol, tls, ..HttpRoute::new(hosts, path, port) }
}

/// nginx-proxy's variables.
fn from_env(w: &Workload<'_>) -> Result<HttpRoute, OptInError> {
    let var = |k: &str| w.env.get(k).map(String::as_str).filter(|v| !v.trim().is_empty());
    let hosts = parse_hosts(var("VIRTUAL_HOST").unwrap_or("")).map_err(env("VIRTUAL_HOST"))?;
    let port = var("VIRTUAL_PORT").map_or(Ok(w.default_port()), parse_port).map_err(env("VIRTUAL_PORT"))?;
    let protocol =
        var("VIRTUAL_PROTO").map_or(Ok(UpstreamProtocol::Http), parse_proto).map_err(env("VIRTUAL_PROTO"))?;
    // `VIRTUAL_PATH=~regex` is an nginx regex location: any path it matches (searched).
    let (path, path_regex) = match var("VIRTUAL_PATH").map(str::trim) {
        Some(v) if v.starts_with('~') => {
            let re = v.trim_start_matches('~').trim_start_matches('*').trim();
            let case = if v.starts_with("~*") { "(?i)" } else { "" };
            let re = format!("{case}{re}");
            regex::Regex::new(&re)
                .map_err(|e| env("VIRTUAL_PATH")(ValueError::Regex(re.clone(), e.to_string())))?;
            ("/".to_owned(), Some(re))
        }
        other => (other.map_or(Ok("/".into()), parse_path).map_err(env("VIRTUAL_PATH"))?, None),
    };
    let rewrite = var("VIRTUAL_DEST").map(parse_path).transpose().map_err(env("VIRTUAL_DEST"))?;
    if path_regex.is_some() && rewrite.is_some() {
        return Err(env("VIRTUAL_DEST")(ValueError::DestWithRegex));
    }
    let https_method = match var("HTTPS_METHOD") {
        None => HttpsMethod::Redirect,
        Some(v) => serde_json::from_value(serde_json::Value::String(v.trim().to_ascii_lowercase())).map_err(
            |_| {
                env("HTTPS_METHOD")(ValueError::NotOneOf(
                    v.to_owned(),
                    "redirect, noredirect, nohttp or nohttps",
                ))
            },
        )?,
    };
    // As nginx-proxy: with `noredirect` no HSTS at all (a browser that kept it would never
    // reach the plain site again).
    let hsts = match var("HSTS") {
        _ if https_method == HttpsMethod::Noredirect => None,
        Some("off") => None,
        Some(v) => Some(v.to_owned()),
        None => Some("max-age=31536000".into()),
    };
    // As acme-companion: LETSENCRYPT_HOST (or ACME_HOST) names the certificate's names exactly.
    let tls = match var("LETSENCRYPT_HOST").or_else(|| var("ACME_HOST")) {
        Some(names) => TlsWish::Acme {
            email: var("LETSENCRYPT_EMAIL").or_else(|| var("ACME_EMAIL")).map(str::to_owned),
            names: Some(certificate_names(names)),
        },
        None => TlsWish::None,
    };
    // nginx-proxy's NETWORK_ACCESS=internal: only loopback and private networks; any other
    // value but `external` is not understood, so not served at all.
    let (allow_from, refused) = match var("NETWORK_ACCESS").map(str::trim) {
        None | Some("external") => (None, None),
        Some("internal") => (Some(crate::state::internal_networks()), None),
        Some(v) => (None, Some(format!("env `NETWORK_ACCESS={v}` is neither internal nor external: not served rather than served to anyone"))),
    };
    let tls13_only = var("SSL_POLICY").is_some_and(|p| ssl_policy(p.trim()) == Policy::Tls13);
    let cert_name = var("CERT_NAME").map(|n| n.trim().trim_end_matches(".crt").to_owned());
    if let Some(bad) = cert_name.as_deref().filter(|n| n.contains('/') || n.starts_with('.')) {
        return Err(env("CERT_NAME")(ValueError::NotOneOf(
            bad.to_owned(),
            "a certificate's file name in tls.certs_dir",
        )));
    }
    Ok(HttpRoute {
        tls13_only,
        cert_name,
        conditions: path_regex
            .map(|regex| vec![crate::state::Condition::is(crate::state::Test::PathRegexp { regex })])
            .unwrap_or_default(),
        rewrite,
        https_method,
        hsts,
        refused,
        allow_from,
        ..route(hosts, path, port, protocol, tls)
    })
}

/// What rustls can do of an nginx-proxy `SSL_POLICY`.
#[derive(Debug, PartialEq, Eq)]
enum Policy {
    /// TLS 1.3 only: honoured as such.
    Tls13,
    /// TLS 1.2 and 1.3 with forward-secret AEAD ciphers: rustls's own settings.
    Tls12,
    /// Older versions or ciphers (TLS 1.0/1.1, CBC, RSA key exchange): rustls cannot, so
    /// served with its stricter settings, and reported.
    Older,
    Unknown,
}

/// nginx-proxy's `SSL_POLICY` names (its docs, "SSL Support": Mozilla's and AWS's).
fn ssl_policy(name: &str) -> Policy {
    match name {
        "Mozilla-Modern" | "AWS-TLS13-1-3-2021-06" => Policy::Tls13,
        "Mozilla-Intermediate"
        | "AWS-TLS13-1-2-2021-06"
        | "AWS-TLS13-1-2-Res-2021-06"
        | "AWS-FS-1-2-Res-2020-10"
        | "AWS-FS-1-2-Res-2019-08" => Policy::Tls12,
        "Mozilla-Old"
        | "AWS-TLS13-1-2-Ext1-2021-06"
        | "AWS-TLS13-1-2-Ext2-2021-06"
        | "AWS-TLS13-1-1-2021-06"
        | "AWS-TLS13-1-0-2021-06"
        | "AWS-FS-1-2-2019-08"
        | "AWS-FS-1-1-2019-08"
        | "AWS-FS-2018-06"
        | "AWS-TLS-1-2-Ext-2018-06"
        | "AWS-TLS-1-2-2017-01"
        | "AWS-TLS-1-1-2017-01"
        | "AWS-2016-08"
        | "AWS-2015-05"
        | "AWS-2015-03"
        | "AWS-2015-02" => Policy::Older,
        _ => Policy::Unknown,
    }
}

/// What a workload's `SSL_POLICY` leaves to say: a policy rustls serves more strictly, or
/// one it does not know.
fn ssl_policy_problem(w: &Workload<'_>) -> Option<String> {
    let name = w.env.get("SSL_POLICY")?.trim();
    match ssl_policy(name) {
        Policy::Tls13 | Policy::Tls12 => None,
        Policy::Older => Some(format!("env `SSL_POLICY={name}` allows TLS versions or ciphers rustls does not have (TLS 1.0/1.1, CBC, RSA key exchange): served with TLS 1.2 and 1.3 and forward-secret AEAD ciphers only, which is stricter")),
        Policy::Unknown => Some(format!("env `SSL_POLICY={name}` is not a policy nginx-proxy names (Mozilla-Modern, Mozilla-Intermediate, AWS-...): served with TLS 1.2 and 1.3")),
    }
}

/// nginx-proxy's `VIRTUAL_HOST_MULTIPORTS` (YAML or JSON: host, then path, then `port` and
/// `dest`, each optional): one route per host and path, in place of `VIRTUAL_HOST`,
/// `VIRTUAL_PORT`, `VIRTUAL_PATH` and `VIRTUAL_DEST`; the other variables apply to each.
fn from_multiports(w: &Workload<'_>, spec: &str) -> Result<Vec<HttpRoute>, OptInError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        port: Option<u16>,
        dest: Option<String>,
    }
    type Spec = BTreeMap<String, Option<BTreeMap<String, Option<Entry>>>>;
    let bad = |e: String| env("VIRTUAL_HOST_MULTIPORTS")(ValueError::Multiports(e));
    let spec: Spec = serde_yaml_ng::from_str(spec).map_err(|e| bad(e.to_string()))?;
    if spec.is_empty() {
        return Err(bad("it names no host".into()));
    }
    let mut routes = Vec::new();
    for (host, paths) in spec {
        let paths =
            paths.filter(|p| !p.is_empty()).unwrap_or_else(|| BTreeMap::from([("/".to_owned(), None)]));
        for (path, entry) in paths {
            let mut one = w.env.clone();
            for k in ["VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PATH", "VIRTUAL_DEST"] {
                one.remove(k);
            }
            one.insert("VIRTUAL_HOST".into(), host.clone());
            one.insert("VIRTUAL_PATH".into(), path);
            if let Some(entry) = entry {
                if let Some(port) = entry.port {
                    one.insert("VIRTUAL_PORT".into(), port.to_string());
                }
                if let Some(dest) = entry.dest.filter(|d| !d.is_empty()) {
                    one.insert("VIRTUAL_DEST".into(), dest);
                }
            }
            routes.push(from_env(&Workload { env: &one, ..*w })?);
        }
    }
    Ok(routes)
}

/// The names of a certificate as a workload lists them (commas or spaces; `*.example.com`
/// for a wildcard), lower-case.
fn certificate_names(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// Our own `meshgate.*` labels.
fn from_our_labels(w: &Workload<'_>) -> Result<HttpRoute, OptInError> {
    let get = |k: &str| w.labels.get(k).map(String::as_str);
    let hosts =
        parse_hosts(get("meshgate.http.hosts").unwrap_or("")).map_err(label("meshgate.http.hosts"))?;
    let port = get("meshgate.http.port")
        .map_or(Ok(w.default_port()), parse_port)
        .map_err(label("meshgate.http.port"))?;
    let protocol = get("meshgate.http.proto")
        .map_or(Ok(UpstreamProtocol::Http), parse_proto)
        .map_err(label("meshgate.http.proto"))?;
    let path =
        get("meshgate.http.path").map_or(Ok("/".into()), parse_path).map_err(label("meshgate.http.path"))?;
    let tls = match get("meshgate.tls").map(|v| v.trim().to_ascii_lowercase()) {
        None => TlsWish::None,
        Some(v) if v == "acme" || v == "true" => TlsWish::Acme {
            email: get("meshgate.tls.email").map(str::to_owned),
            names: get("meshgate.tls.domains").map(certificate_names),
        },
        Some(v) if v == "off" || v == "false" || v == "none" => TlsWish::None,
        Some(v) => return Err(label("meshgate.tls")(ValueError::NotOneOf(v, "acme or off"))),
    };
    let mut route = route(hosts, path, port, protocol, tls);
    if let Some(names) = get("meshgate.http.middlewares") {
        // The same middlewares as Traefik's, defined under `meshgate.middlewares.<name>.`.
        let ours: HashMap<String, String> = w
            .labels
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    format!("traefik.http.middlewares.{}", k.strip_prefix("meshgate.middlewares.")?),
                    v.clone(),
                ))
            })
            .collect();
        match super::traefik_middleware::chain(&ours, &super::traefik_middleware::Catalogue::default(), names)
        {
            Ok(chain) => route.middlewares = chain,
            Err(why) => {
                route.refused = Some(format!(
                    "label `meshgate.http.middlewares={names}`: {why}; the route is not served rather than served without it"
                ));
            }
        }
    }
    Ok(route)
}

/// The Traefik subset: routers with rules, their services' ports and schemes, cert resolvers.
fn from_traefik_labels(w: &Workload<'_>, defaults: &Defaults, out: &mut OptIn) {
    let insecure = defaults.traefik_insecure_skip_verify;
    let label = |k: &str| w.labels.get(k).map(String::as_str);
    let names = |prefix: &str| -> BTreeSet<String> {
        w.labels.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next().map(str::to_owned)).collect()
    };
    let routers = names("traefik.http.routers.");
    let services = names("traefik.http.services.");
    for r in &routers {
        let key = |suffix: &str| format!("traefik.http.routers.{r}.{suffix}");
        let rule_key = key("rule");
        let Some(rule) = label(&rule_key) else {
            out.problems.push(self::label(&rule_key)(ValueError::NoRule).to_string());
            continue;
        };
        let alternatives = match traefik_rule::parse(rule) {
            Ok(a) => a,
            Err(e) => {
                out.problems.push(self::label(&rule_key)(e.into()).to_string());
                continue;
            }
        };
        let service = label(&key("service"))
            .map(str::to_owned)
            .or_else(|| (services.len() == 1).then(|| services.iter().next().cloned()).flatten());
        let (port, protocol) = match traefik_server(w, service.as_deref(), label) {
            Ok(server) => server,
            Err(e) => {
                out.problems.push(e);
                continue;
            }
        };
        let tls = if label(&key("tls.certresolver")).is_some() {
            TlsWish::Acme { email: None, names: traefik_tls_domains(&key, label) }
        } else {
            TlsWish::None
        };
        let balanced = traefik_balancing(service.as_deref(), label)
            .and_then(|(a, p)| Ok((a, p, traefik_health_check(service.as_deref(), label)?)));
        let (affinity, pass_host, health_check) = match balanced {
            Ok(b) => b,
            Err(e) => {
                out.problems.push(e);
                continue;
            }
        };
        let (https_method, mut refused) =
            router_access(&key, label, matches!(tls, TlsWish::Acme { .. }), &defaults.traefik_entrypoints);
        let mut honoured = Vec::new();
        if let (None, Some(chain)) = (&refused, label(&key("middlewares"))) {
            match super::traefik_middleware::chain(w.labels, w.middlewares, chain) {
                Ok(c) => honoured = c,
                Err(why) => {
                    refused = Some(format!(
                        "label `{}={chain}`: {why}; the route is not served rather than served without it",
                        key("middlewares")
                    ));
                }
            }
        }
        let access_log = match label(&key("observability.accesslogs")).map(|v| (v, parse_bool(v))) {
            Some((_, Some(on))) => on,
            Some((v, None)) => {
                let k = key("observability.accesslogs");
                out.problems
                    .push(self::label(&k)(ValueError::NotOneOf(v.to_owned(), "true or false")).to_string());
                true
            }
            None => true,
        };
        if let Some(why) = &refused {
            out.problems.push(why.clone());
        }
        let priority = match router_priority(&key, label, rule) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(e);
                continue;
            }
        };
        for alt in alternatives {
            if alt.hosts.is_empty() {
                out.problems.push(self::label(&rule_key)(ValueError::NoHostInRule).to_string());
                continue;
            }
            out.routes.push(HttpRoute {
                affinity: affinity.clone(),
                pass_host,
                health_check: health_check.clone(),
                conditions: alt.conditions,
                priority: Some(priority),
                https_method,
                refused: refused.clone(),
                access_log,
                middlewares: honoured.clone(),
                // As Traefik: an https service's certificate is verified (the web roots)
                // unless its insecureSkipVerify is set.
                upstream_tls: (protocol == UpstreamProtocol::Https)
                    .then(|| crate::state::UpstreamTls { verify: !insecure, ..Default::default() }),
                ..route(alt.hosts, alt.path.unwrap_or_else(|| "/".into()), port, protocol, tls.clone())
            });
        }
    }
}

/// The port and scheme of a Traefik service's server (the workload's default port, http).
fn traefik_server<'a>(
    w: &Workload<'_>,
    service: Option<&str>,
    label: impl Fn(&str) -> Option<&'a str>,
) -> Result<(u16, UpstreamProtocol), String> {
    let setting = |suffix: &str| -> Option<(String, &str)> {
        let k = format!("traefik.http.services.{}.loadbalancer.server.{suffix}", service?);
        let v = label(&k)?;
        Some((k, v))
    };
    let port = setting("port").map(|(k, v)| parse_port(v).map_err(|e| label_error(&k, e))).transpose()?;
    let protocol =
        setting("scheme").map(|(k, v)| parse_proto(v).map_err(|e| label_error(&k, e))).transpose()?;
    Ok((port.unwrap_or_else(|| w.default_port()), protocol.unwrap_or_default()))
}

/// As Traefik: the router's `priority`, else its rule's length.
fn router_priority<'a>(
    key: &dyn Fn(&str) -> String,
    label: impl Fn(&str) -> Option<&'a str>,
    rule: &str,
) -> Result<i64, String> {
    match label(&key("priority")).map(|v| (v, v.trim().parse::<i64>())) {
        None => Ok(i64::try_from(rule.len()).unwrap_or(i64::MAX)),
        Some((_, Ok(p))) => Ok(p),
        Some((v, Err(_))) => {
            Err(label_error(&key("priority"), ValueError::NotOneOf(v.to_owned(), "a whole number")))
        }
    }
}

fn label_error(key: &str, e: ValueError) -> String {
    label(key)(e).to_string()
}

/// A Traefik service's `loadbalancer.healthcheck.*` (`path` turns it on).
fn traefik_health_check<'a>(
    service: Option<&str>,
    label: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<crate::state::HealthCheck>, String> {
    let Some(service) = service else { return Ok(None) };
    let key = |o: &str| format!("traefik.http.services.{service}.loadbalancer.healthcheck.{o}");
    let Some(path) = label(&key("path")) else { return Ok(None) };
    let mut check =
        crate::state::HealthCheck::of(parse_path(path.trim()).map_err(|e| label_error(&key("path"), e))?);
    for option in ["interval", "timeout", "status", "hostname"] {
        if let Some(v) = label(&key(option)) {
            check.set(option, v).map_err(|e| format!("label `{}`: {e}", key(option)))?;
        }
    }
    Ok(Some(check))
}

/// A Traefik service's `loadbalancer.sticky.cookie.*` (a cookie keeps the client to its
/// task; Traefik's default name is derived from the service's) and `passhostheader`.
fn traefik_balancing<'a>(
    service: Option<&str>,
    label: impl Fn(&str) -> Option<&'a str>,
) -> Result<(Option<crate::state::Affinity>, bool), String> {
    let Some(service) = service else { return Ok((None, true)) };
    let key = |suffix: &str| format!("traefik.http.services.{service}.loadbalancer.{suffix}");
    let flag = |suffix: &str| -> Result<Option<bool>, String> {
        label(&key(suffix))
            .map(|v| {
                parse_bool(v).ok_or_else(|| format!("label `{}`: `{v}` is not true or false", key(suffix)))
            })
            .transpose()
    };
    let pass_host = flag("passhostheader")?.unwrap_or(true);
    let cookie_keys = [
        "sticky.cookie.name",
        "sticky.cookie.secure",
        "sticky.cookie.httponly",
        "sticky.cookie.samesite",
        "sticky.cookie.maxage",
        "sticky.cookie.path",
    ];
    let sticky = flag("sticky.cookie")?.or(flag("sticky")?).unwrap_or(false)
        || cookie_keys.iter().any(|k| label(&key(k)).is_some());
    if !sticky {
        return Ok((None, pass_host));
    }
    let default_name = format!("_{}", &crate::http::affinity::task_token(service)[..6]);
    let max_age = match label(&key("sticky.cookie.maxage")) {
        None => None,
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            format!("label `{}`: `{v}` is not a number of seconds", key("sticky.cookie.maxage"))
        })?),
    };
    let affinity = crate::state::Affinity::Cookie {
        name: label(&key("sticky.cookie.name")).map_or(default_name, |n| n.trim().to_owned()),
        secure: flag("sticky.cookie.secure")?.unwrap_or(false),
        http_only: flag("sticky.cookie.httponly")?.unwrap_or(false),
        same_site: label(&key("sticky.cookie.samesite")).map(|s| s.trim().to_ascii_lowercase()),
        max_age,
        path: cookie_path(label(&key("sticky.cookie.path")), &key("sticky.cookie.path"))?,
    };
    Ok((Some(affinity), pass_host))
}

/// A sticky cookie's `path`: an absolute path a `Set-Cookie` can carry as it is.
fn cookie_path(value: Option<&str>, key: &str) -> Result<Option<String>, String> {
    let Some(path) = value.map(str::trim) else { return Ok(None) };
    if !path.starts_with('/') || path.chars().any(|c| c == ';' || c.is_control() || c.is_whitespace()) {
        return Err(format!("label `{key}`: `{path}` is not an absolute path without `;` or spaces"));
    }
    Ok(Some(path.to_owned()))
}

/// A router's `tls.domains[n].main` and `.sans` (Traefik's way to name a certificate's names,
/// wildcards among them), in index order; `None` without any.
fn traefik_tls_domains<'a>(
    key: &dyn Fn(&str) -> String,
    label: impl Fn(&str) -> Option<&'a str>,
) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for n in 0.. {
        let (main, sans) =
            (label(&key(&format!("tls.domains[{n}].main"))), label(&key(&format!("tls.domains[{n}].sans"))));
        if main.is_none() && sans.is_none() {
            break;
        }
        names.extend(main.into_iter().chain(sans).flat_map(certificate_names));
    }
    (!names.is_empty()).then_some(names)
}

/// What a Traefik router's entrypoints, middlewares and TLS options ask of access: the
/// listeners it is served on (`web`: HTTP, `websecure`: HTTPS, both by default), or why it
/// cannot be served as asked (a middleware or TLS option meshgate does not honour yet, an
/// entrypoint it does not have): then not at all.
fn router_access<'a>(
    key: &dyn Fn(&str) -> String,
    label: impl Fn(&str) -> Option<&'a str>,
    certificate: bool,
    entrypoints: &(Vec<String>, Vec<String>),
) -> (HttpsMethod, Option<String>) {
    let (method, refused) = router_entrypoints(key, &label, entrypoints);
    // As Traefik: a router with TLS (`tls=true`, a cert resolver) takes TLS connections
    // only; plain HTTP is redirected once there is a certificate, never served.
    if certificate || label(&key("tls")).and_then(parse_bool) == Some(true) {
        return (HttpsMethod::Nohttp, refused);
    }
    (method, refused)
}

/// A router's TLS options and entrypoints: the listeners it is served on (`web`: HTTP,
/// `websecure`: HTTPS, both by default; `docker.traefik_entrypoints_http`/`_https` name
/// them), or why it cannot be served as asked.
fn router_entrypoints<'a>(
    key: &dyn Fn(&str) -> String,
    label: &impl Fn(&str) -> Option<&'a str>,
    (http, https): &(Vec<String>, Vec<String>),
) -> (HttpsMethod, Option<String>) {
    let refuse = |k: String, v: &str, what: &str| {
        Some(format!("label `{k}={v}`: {what}; the route is not served rather than served without it"))
    };
    if let Some(v) = label(&key("tls.options")) {
        return (HttpsMethod::Redirect, refuse(key("tls.options"), v, "TLS options are not read from Traefik's files (for client certificates, label `meshgate.http.client_ca`)"));
    }
    let Some(v) = label(&key("entrypoints")) else { return (HttpsMethod::Redirect, None) };
    let names: BTreeSet<&str> = v.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    let on = |listener: &[String], n: &str| listener.iter().any(|l| l == n);
    if let Some(other) = names.iter().find(|n| !on(http, n) && !on(https, n)) {
        let what = format!(
            "entrypoint `{other}` is not one of meshgate's (HTTP: {}; HTTPS: {}; name more with docker.traefik_entrypoints_http and _https)",
            http.join(", "),
            https.join(", ")
        );
        return (HttpsMethod::Redirect, refuse(key("entrypoints"), v, &what));
    }
    match (names.iter().any(|n| on(http, n)), names.iter().any(|n| on(https, n))) {
        (true, false) => (HttpsMethod::Nohttps, None),
        (false, true) => (HttpsMethod::Nohttp, None),
        _ => (HttpsMethod::Redirect, None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::traefik_middleware::Catalogue;
    use super::*;

    fn read_with(env: &[(&str, &str)], labels: &[(&str, &str)], exposed: &[u16]) -> OptIn {
        read_by(env, labels, exposed, &Defaults::default())
    }

    fn read_by(env: &[(&str, &str)], labels: &[(&str, &str)], exposed: &[u16], defaults: &Defaults) -> OptIn {
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let labels: HashMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        read(
            &Workload {
                env: &env,
                labels: &labels,
                exposed_ports: exposed,
                name: "app",
                middlewares: &Catalogue::default(),
            },
            defaults,
        )
    }

    /// One Traefik router `adm` for `adm.test`, with `more` labels, read with `defaults`.
    fn router_by<'a>(more: &[(&'a str, &'a str)], defaults: &Defaults) -> OptIn {
        let mut labels =
            vec![("traefik.enable", "true"), ("traefik.http.routers.adm.rule", "Host(`adm.test`)")];
        labels.extend_from_slice(more);
        read_by(&[], &labels, &[80], defaults)
    }

    /// Drop-in issue, "fail closed": a restriction meshgate does not honour refuses the route
    /// (it answers 503), and settings it does not know are listed, never dropped silently.
    #[test]
    fn restrictions_not_honoured_refuse_the_route_and_unknown_settings_are_listed() {
        let traefik = |more: &[(&'static str, &'static str)]| router_by(more, &Defaults::default());
        let o = traefik(&[
            ("traefik.http.routers.adm.middlewares", "adm-cb"),
            ("traefik.http.middlewares.adm-cb.circuitbreaker.expression", "NetworkErrorRatio() > 0.5"),
        ]);
        assert!(o.routes[0].refused.as_deref().is_some_and(|w| w.contains("middlewares")), "{:?}", o.routes);
        assert!(o.problems.iter().any(|p| p.contains("adm-cb")), "{:?}", o.problems);
        assert!(
            o.problems.iter().any(|p| p.contains("circuitbreaker.expression")),
            "the definition is listed: {:?}",
            o.problems
        );
        // Every form of basicauth meshgate cannot honour refuses the route too.
        for more in [
            &[("traefik.http.routers.adm.middlewares", "gone")][..],
            &[("traefik.http.routers.adm.middlewares", "auth@file")][..],
            &[
                ("traefik.http.routers.adm.middlewares", "auth"),
                ("traefik.http.middlewares.auth.basicauth.usersfile", "/etc/users"),
            ][..],
            &[
                ("traefik.http.routers.adm.middlewares", "auth"),
                ("traefik.http.middlewares.auth.basicauth.users", "u:cleartext"),
            ][..],
        ] {
            let o = traefik(more);
            assert!(
                o.routes[0].refused.is_some() && o.routes[0].basic_auth.is_none(),
                "{more:?}: {:?}",
                o.routes
            );
        }

        let o = traefik(&[("traefik.http.routers.adm.entrypoints", "websecure")]);
        assert_eq!((o.routes[0].https_method, o.routes[0].refused.clone()), (HttpsMethod::Nohttp, None));
        let o = traefik(&[("traefik.http.routers.adm.entrypoints", "web")]);
        assert_eq!(o.routes[0].https_method, HttpsMethod::Nohttps);
        let o = traefik(&[("traefik.http.routers.adm.entrypoints", "internal")]);
        assert!(o.routes[0].refused.is_some(), "an entrypoint meshgate does not have");
        // Entrypoints named as the operator's Traefik named them.
        let named = Defaults {
            traefik_entrypoints: (vec!["web".into(), "http".into()], vec!["https".into()]),
            ..Defaults::default()
        };
        let with =
            |v: &str| router_by(&[("traefik.http.routers.adm.entrypoints", v)], &named).routes.remove(0);
        assert_eq!((with("https").https_method, with("https").refused), (HttpsMethod::Nohttp, None));
        assert_eq!((with("http").https_method, with("http").refused), (HttpsMethod::Nohttps, None));
        assert!(with("websecure").refused.is_some(), "not named here any more");
        let o = traefik(&[("traefik.http.routers.adm.tls.options", "mtls@file")]);
        assert!(o.routes[0].refused.is_some(), "TLS options");

        let o = read_with(&[("VIRTUAL_HOST", "in.test"), ("NETWORK_ACCESS", "internal")], &[], &[80]);
        assert!(o.routes[0].refused.is_none() && o.routes[0].allow_from.is_some(), "NETWORK_ACCESS=internal");
        let o = read_with(&[("VIRTUAL_HOST", "in.test"), ("NETWORK_ACCESS", "partners")], &[], &[80]);
        assert!(o.routes[0].refused.is_some(), "NETWORK_ACCESS=partners");
        let o = read_with(&[("VIRTUAL_HOST", "in.test"), ("NETWORK_ACCESS", "external")], &[], &[80]);
        assert!(o.routes[0].refused.is_none(), "external is the default");

        let o = read_with(
            &[
                ("VIRTUAL_HOST", "x.test"),
                ("VIRTUAL_ROOT", "/srv"),
                ("SSL_POLICY", "Mozilla-Old"),
                ("PATH", "/bin"),
            ],
            &[
                ("meshgate.htpasswd", "x"),
                ("com.github.nginx-proxy.nginx", ""),
                ("org.opencontainers.image.title", "x"),
            ],
            &[80],
        );
        assert_eq!(o.problems.len(), 4, "each unknown setting of ours, and no other: {:?}", o.problems);
        assert!(
            o.routes[0].refused.is_none(),
            "unknown settings that do not restrict access are listed, not refused"
        );
    }

    #[test]
    fn nginx_proxy_variables() {
        let o = read_with(
            &[
                ("VIRTUAL_HOST", "a.test, *.b.test ~^c[0-9]\\.test$"),
                ("VIRTUAL_PATH", "/api"),
                ("VIRTUAL_DEST", "/"),
                ("VIRTUAL_PROTO", "h2c"),
                ("HTTPS_METHOD", "noredirect"),
                ("HSTS", "off"),
                ("LETSENCRYPT_HOST", "a.test"),
                ("LETSENCRYPT_EMAIL", "me@a.test"),
            ],
            &[],
            &[8080],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let r = &o.routes[0];
        assert_eq!(r.hosts.len(), 3);
        assert_eq!(
            (r.port, r.protocol, r.path.as_str(), r.rewrite.as_deref()),
            (8080, UpstreamProtocol::H2c, "/api", Some("/"))
        );
        assert_eq!((r.https_method, r.hsts.clone()), (HttpsMethod::Noredirect, None));
        assert_eq!(
            r.tls,
            TlsWish::Acme { email: Some("me@a.test".into()), names: Some(vec!["a.test".into()]) }
        );
    }

    /// Certificates issue, item 2: a certificate's names, wildcards among them, from each
    /// source's own way of naming them.
    #[test]
    fn certificate_names_from_acme_host_traefik_domains_and_our_label() {
        let names = |o: &OptIn| match &o.routes[0].tls {
            TlsWish::Acme { names, .. } => names.clone(),
            TlsWish::None => panic!("no ACME wish: {:?}", o.problems),
        };
        let o = read_with(&[("VIRTUAL_HOST", "a.test"), ("ACME_HOST", "a.test,*.A.test")], &[], &[80]);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(names(&o), Some(vec!["a.test".into(), "*.a.test".into()]));
        let o = read_with(
            &[],
            &[
                ("traefik.enable", "true"),
                ("traefik.http.routers.r.rule", "Host(`a.test`)"),
                ("traefik.http.routers.r.tls.certresolver", "le"),
                ("traefik.http.routers.r.tls.domains[0].main", "a.test"),
                ("traefik.http.routers.r.tls.domains[0].sans", "*.a.test,b.test"),
                ("traefik.http.routers.r.tls.domains[1].main", "*.c.test"),
            ],
            &[80],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(
            names(&o),
            Some(vec!["a.test".into(), "*.a.test".into(), "b.test".into(), "*.c.test".into()])
        );
        let o = read_with(
            &[],
            &[
                ("meshgate.http.hosts", "a.test"),
                ("meshgate.tls", "acme"),
                ("meshgate.tls.domains", "a.test, *.a.test"),
            ],
            &[80],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(names(&o), Some(vec!["a.test".into(), "*.a.test".into()]));
    }

    /// Certificates issue, item 4: our labels ask for verified TLS to the tasks; a CA given
    /// alone is never ignored (it means verify).
    #[test]
    fn upstream_tls_labels_and_a_ca_alone_means_verify() {
        let o = read_with(
            &[],
            &[
                ("meshgate.http.hosts", "a.test"),
                ("meshgate.http.proto", "https"),
                ("meshgate.http.upstream_ca", "/run/secrets/ca.pem"),
                ("meshgate.http.upstream_server_name", "api.internal"),
            ],
            &[443],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let tls = o.routes[0].upstream_tls.clone().expect("verified");
        assert!(tls.verify);
        assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
        let o = read_with(&[("VIRTUAL_HOST", "a.test"), ("VIRTUAL_PROTO", "https")], &[], &[443]);
        assert_eq!(o.routes[0].upstream_tls, None, "VIRTUAL_PROTO=https alone: not verified, as nginx-proxy");
    }

    /// Certificates issue, item 4: our label asks clients for a certificate from a CA.
    #[test]
    fn the_client_ca_label_asks_clients_for_a_certificate() {
        let labels =
            [("meshgate.http.hosts", "a.test"), ("meshgate.http.client_ca", " /run/secrets/clients.pem")];
        let o = read_with(&[], &labels, &[80]);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(o.routes[0].client_ca.as_deref(), Some(std::path::Path::new("/run/secrets/clients.pem")));
    }

    /// Certificates issue, item 4: Traefik labels verify https services as Traefik does.
    #[test]
    fn traefik_https_services_are_verified_unless_insecure_skip_verify() {
        let labels = [
            ("traefik.enable", "true"),
            ("traefik.http.routers.r.rule", "Host(`a.test`)"),
            ("traefik.http.services.s.loadbalancer.server.scheme", "https"),
        ];
        let o = read_with(&[], &labels, &[443]);
        assert_eq!(o.routes[0].upstream_tls.as_ref().map(|t| t.verify), Some(true));
        let (env, labels): (BTreeMap<String, String>, HashMap<String, String>) =
            (BTreeMap::new(), labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect());
        let insecure = Defaults { traefik_insecure_skip_verify: true, ..Defaults::default() };
        let o = read(
            &Workload {
                env: &env,
                labels: &labels,
                exposed_ports: &[443],
                name: "app",
                middlewares: &Catalogue::default(),
            },
            &insecure,
        );
        assert_eq!(o.routes[0].upstream_tls.as_ref().map(|t| t.verify), Some(false));
    }

    #[test]
    fn default_port_is_the_single_exposed_port_else_80() {
        assert_eq!(read_with(&[("VIRTUAL_HOST", "a.test")], &[], &[3000]).routes[0].port, 3000);
        assert_eq!(read_with(&[("VIRTUAL_HOST", "a.test")], &[], &[3000, 3001]).routes[0].port, 80);
        assert_eq!(
            read_with(&[("VIRTUAL_HOST", "a.test"), ("VIRTUAL_PORT", "81")], &[], &[3000]).routes[0].port,
            81
        );
    }

    #[test]
    fn virtual_host_multiports_in_yaml_and_json_and_what_is_wrong_with_it() {
        let yaml = "www.example.org:\nservice1.example.org:\n  \"/\":\n    port: 8000\n  \"/api\":\n    port: 9000\n    dest: \"/\"\n";
        let o = read_with(&[("VIRTUAL_HOST_MULTIPORTS", yaml), ("HTTPS_METHOD", "noredirect")], &[], &[80]);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let got: Vec<_> = o
            .routes
            .iter()
            .map(|r| (r.hosts[0].to_string(), r.path.as_str(), r.port, r.rewrite.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("service1.example.org".to_owned(), "/", 8000, None),
                ("service1.example.org".to_owned(), "/api", 9000, Some("/")),
                ("www.example.org".to_owned(), "/", 80, None),
            ]
        );
        assert!(
            o.routes.iter().all(|r| r.https_method == HttpsMethod::Noredirect),
            "the other variables apply to each"
        );
        let json = r#"{"a.test": {}, "b.test": {"/x": {"port": 81}}}"#;
        assert_eq!(read_with(&[("VIRTUAL_HOST_MULTIPORTS", json)], &[], &[80]).routes.len(), 2);
        for bad in ["a.test:\n  /:\n    prot: 80\n", "[1, 2]", "a.test:\n  \"/\":\n    port: 70000\n"] {
            let o = read_with(&[("VIRTUAL_HOST_MULTIPORTS", bad)], &[], &[80]);
            assert!(
                o.routes.is_empty() && o.problems.iter().any(|p| p.contains("VIRTUAL_HOST_MULTIPORTS")),
                "{bad}: {o:?}"
            );
        }
    }

    #[test]
    fn a_traefik_router_with_tls_is_never_served_over_plain_http() {
        let router = |more: &[(&'static str, &'static str)]| {
            router_by(more, &Defaults::default()).routes[0].https_method
        };
        assert_eq!(router(&[]), HttpsMethod::Redirect);
        assert_eq!(router(&[("traefik.http.routers.adm.tls", "true")]), HttpsMethod::Nohttp);
        assert_eq!(router(&[("traefik.http.routers.adm.tls.certresolver", "le")]), HttpsMethod::Nohttp);
        assert_eq!(router(&[("traefik.http.routers.adm.tls", "false")]), HttpsMethod::Redirect);
    }

    #[test]
    fn our_labels_take_the_same_middlewares_under_names_of_their_own() {
        let ours = |more: &[(&'static str, &'static str)]| {
            let mut labels = vec![
                ("meshgate.http.hosts", "a.test"),
                ("meshgate.http.middlewares", "strip,limit"),
                ("meshgate.middlewares.strip.stripprefix.prefixes", "/api"),
            ];
            labels.extend_from_slice(more);
            read_with(&[], &labels, &[80])
        };
        let o = ours(&[("meshgate.middlewares.limit.ratelimit.average", "5")]);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert!(matches!(
            o.routes[0].middlewares.as_slice(),
            [
                crate::state::Middleware::StripPrefix { .. },
                crate::state::Middleware::RateLimit { average: 5, .. }
            ]
        ));
        let o = ours(&[
            ("meshgate.middlewares.limit.ratelimit.average", "5"),
            ("meshgate.middlewares.limit.ratelimit.sourcecriterion.ipstrategy.depth", "1"),
        ]);
        assert!(o.routes[0].refused.is_some(), "what is not honoured refuses the route: {:?}", o.routes);
        assert!(o.problems.iter().any(|p| p.contains("ipstrategy")), "{:?}", o.problems);
    }

    #[test]
    fn a_traefik_basicauth_middleware_on_the_same_workload_is_honoured() {
        let o = read_with(
            &[],
            &[
                ("traefik.enable", "true"),
                ("traefik.http.routers.adm.rule", "Host(`adm.test`)"),
                ("traefik.http.routers.adm.middlewares", "adm-auth@swarm"),
                (
                    "traefik.http.middlewares.adm-auth.basicauth.users",
                    "u:$apr1$5Ye4DyZe$OfueD4r9hh3Tvz8EwMEI5/, v:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
                ),
                ("traefik.http.middlewares.adm-auth.basicauth.realm", "admins"),
                ("traefik.http.middlewares.adm-auth.basicauth.removeheader", "true"),
            ],
            &[80],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let [crate::state::Middleware::BasicAuth(auth)] = o.routes[0].middlewares.as_slice() else {
            panic!("the route carries its users: {:?}", o.routes[0].middlewares)
        };
        assert_eq!(auth.users.len(), 2);
        assert_eq!((auth.realm.as_str(), auth.remove_header), ("admins", true));
        assert!(o.routes[0].refused.is_none());
    }

    #[test]
    fn a_traefik_ip_allow_list_is_honoured_and_what_it_cannot_say_refuses() {
        let allow = |range: &'static str, more: &[(&'static str, &'static str)]| {
            let mut labels = vec![
                ("traefik.enable", "true"),
                ("traefik.http.routers.r.rule", "Host(`r.test`)"),
                ("traefik.http.routers.r.middlewares", "list"),
                ("traefik.http.middlewares.list.ipallowlist.sourcerange", range),
            ];
            labels.extend_from_slice(more);
            read_with(&[], &labels, &[80])
        };
        let o = allow("10.0.0.0/8, 192.0.2.7", &[]);
        assert!(
            matches!(o.routes[0].middlewares.as_slice(), [crate::state::Middleware::AllowFrom { networks }] if networks.len() == 2),
            "{:?}",
            o.problems
        );
        assert!(o.routes[0].refused.is_none() && o.problems.is_empty(), "{:?}", o.problems);
        assert!(allow("not-a-net", &[]).routes[0].refused.is_some());
        let o = allow("10.0.0.0/8", &[("traefik.http.middlewares.list.ipallowlist.ipstrategy.depth", "1")]);
        assert!(o.routes[0].refused.is_some(), "an IP strategy is not honoured: refused");
    }

    #[test]
    fn the_access_log_is_turned_off_per_workload_or_per_traefik_router() {
        let o = read_with(&[("VIRTUAL_HOST", "a.test")], &[("meshgate.access_log", "false")], &[80]);
        assert!(!o.routes[0].access_log);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert!(read_with(&[("VIRTUAL_HOST", "a.test")], &[], &[80]).routes[0].access_log);
        let o = read_with(
            &[],
            &[
                ("traefik.enable", "true"),
                ("traefik.http.routers.ping.rule", "Host(`a.test`) && Path(`/ping`)"),
                ("traefik.http.routers.ping.observability.accesslogs", "false"),
                ("traefik.http.routers.app.rule", "Host(`a.test`)"),
            ],
            &[80],
        );
        let by_path: std::collections::HashMap<_, _> =
            o.routes.iter().map(|r| (r.path.as_str(), r.access_log)).collect();
        assert_eq!((by_path["/ping"], by_path["/"]), (false, true));
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        let o = read_with(&[("VIRTUAL_HOST", "a.test")], &[("meshgate.access_log", "maybe")], &[80]);
        assert!(o.problems.iter().any(|p| p.contains("meshgate.access_log")), "{:?}", o.problems);
    }

    #[test]
    fn our_labels() {
        let o = read_with(
            &[],
            &[
                ("meshgate.http.hosts", "x.test,y.test"),
                ("meshgate.http.port", "9000"),
                ("meshgate.http.path", "/p"),
                ("meshgate.tls", "acme"),
                ("meshgate.tls.email", "e@x"),
                ("meshgate.network", "front"),
            ],
            &[],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!((o.routes[0].port, o.routes[0].path.as_str()), (9000, "/p"));
        assert_eq!(o.routes[0].tls, TlsWish::Acme { email: Some("e@x".into()), names: None });
        assert_eq!(o.network.as_deref(), Some("front"));
        let off = read_with(&[("VIRTUAL_HOST", "a.test")], &[("meshgate.enable", "false")], &[]);
        assert!(off.routes.is_empty(), "an explicit opt-out wins");
    }

    #[test]
    fn traefik_labels_work_unchanged() {
        let o = read_with(
            &[],
            &[
                ("traefik.enable", "true"),
                (
                    "traefik.http.routers.web.rule",
                    "Host(`shop.test`) && PathPrefix(`/api`) || Host(`www.shop.test`)",
                ),
                ("traefik.http.routers.web.entrypoints", "websecure"),
                ("traefik.http.routers.web.tls.certresolver", "le"),
                ("traefik.http.services.shop.loadbalancer.server.port", "3000"),
                ("traefik.docker.network", "proxy"),
            ],
            &[],
        );
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(o.routes.len(), 2);
        assert_eq!((o.routes[0].path.as_str(), o.routes[0].port), ("/api", 3000));
        assert_eq!(o.routes[1].hosts[0].to_string(), "www.shop.test");
        assert!(matches!(o.routes[0].tls, TlsWish::Acme { .. }));
        assert_eq!(o.network.as_deref(), Some("proxy"));
        let disabled = read_with(&[], &[("traefik.http.routers.web.rule", "Host(`a.test`)")], &[]);
        assert!(disabled.routes.is_empty(), "traefik.enable is needed unless exposed by default");
    }

    #[test]
    fn problems_name_the_key_and_keep_the_rest() {
        let o = read_with(
            &[("VIRTUAL_HOST", "a.test"), ("VIRTUAL_PORT", "abc")],
            &[
                ("traefik.enable", "true"),
                ("traefik.http.routers.bad.rule", "Host(`b.test`"),
                ("traefik.http.routers.good.rule", "Host(`c.test`)"),
            ],
            &[],
        );
        assert_eq!(o.routes.len(), 1, "the good router stays");
        assert!(
            o.problems.iter().any(|p| p.contains("`VIRTUAL_PORT`") && p.contains("abc")),
            "{:?}",
            o.problems
        );
        assert!(o.problems.iter().any(|p| p.contains("traefik.http.routers.bad.rule")), "{:?}", o.problems);
        let empty = read_with(&[("VIRTUAL_HOST", " , ")], &[], &[]);
        assert!(empty.problems[0].contains("no host"), "{:?}", empty.problems);
    }

    #[test]
    fn fuzzed_labels_and_variables_give_routes_or_problems_never_a_crash() {
        let keys = [
            "VIRTUAL_HOST",
            "VIRTUAL_PORT",
            "VIRTUAL_PROTO",
            "VIRTUAL_PATH",
            "VIRTUAL_DEST",
            "HTTPS_METHOD",
            "LETSENCRYPT_HOST",
            "meshgate.enable",
            "meshgate.http.hosts",
            "meshgate.http.port",
            "meshgate.tls",
            "traefik.enable",
            "traefik.http.routers.r.rule",
            "traefik.http.routers.r.service",
            "traefik.http.services.s.loadbalancer.server.port",
            "traefik.http.services.s.loadbalancer.server.scheme",
            "traefik.http.routers.r.tls.certresolver",
        ];
        let values = [
            "a.test",
            "a.test,b.test",
            "*.c.test",
            "80",
            "0",
            "99999",
            "https",
            "h2c",
            "/api",
            "true",
            "off",
            "Host(`x.test`)",
            "",
        ];
        crate::fuzz::run(
            "labels",
            |rng| {
                let mut env = BTreeMap::new();
                let mut labels = HashMap::new();
                for _ in 0..rng.usize(0..8) {
                    let key = keys[rng.usize(..keys.len())].to_owned();
                    let value = crate::fuzz::text(rng, &values, 3);
                    if key.contains('.') {
                        labels.insert(key, value);
                    } else {
                        env.insert(key, value);
                    }
                }
                (env, labels)
            },
            |(env, labels)| {
                let w = Workload {
                    env,
                    labels,
                    exposed_ports: &[80],
                    name: "w",
                    middlewares: &Catalogue::default(),
                };
                let out = read(
                    &w,
                    &Defaults {
                        expose_by_default: true,
                        default_domain: Some("d.test".into()),
                        ..Defaults::default()
                    },
                );
                for r in &out.routes {
                    assert!(!r.hosts.is_empty() && r.path.starts_with('/') && r.port != 0, "{r:?}");
                }
            },
        );
    }
}
