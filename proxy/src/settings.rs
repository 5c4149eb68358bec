//! Every setting, declared once: its key in the config file, what its value looks like and a
//! line of help. Its flag and its environment variable follow from the key (`tls.certs_dir`:
//! `--tls-certs-dir`, `MESHGATE_TLS_CERTS_DIR`; the `proxy.` section is left out:
//! `--http-listen`, `MESHGATE_HTTP_LISTEN`), its default is [`Config::default`]'s. `--help`,
//! the overrides from the environment and the flags, and the configuration reference
//! (`docs/configuration.md`, checked by a test) are all made from [`SETTINGS`].
//!
//! A value from a flag or the environment is read as the config file would read it (the
//! same types, the same checks), and a bad one is reported with the name it was given by.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches};

use crate::config::Config;

/// One setting.
#[derive(Debug)]
pub struct Setting {
    /// `section.field` in the config file.
    pub key: &'static str,
    /// What a value looks like, for `--help` (`ADDR`, `DURATION`, `CIDR,...`).
    pub value: &'static str,
    /// One line: what it does.
    pub help: &'static str,
}

const fn s(key: &'static str, value: &'static str, help: &'static str) -> Setting {
    Setting { key, value, help }
}

/// Every setting, in the order `--help` and the reference list them.
pub const SETTINGS: &[Setting] = &[
    s("proxy.http_listen", "ADDR", "Address of the plain-HTTP listener"),
    s("proxy.trusted_networks", "CIDR,...", "Clients (a load balancer in front) whose X-Forwarded-* and X-Real-IP headers are kept"),
    s("proxy.proxy_protocol_networks", "CIDR,...", "Load balancers that send the PROXY protocol (v1/v2): the client it names is the client"),
    s("proxy.default_host", "HOST", "Host that answers requests for unknown hosts (nginx-proxy's DEFAULT_HOST); unset: 404"),
    s("proxy.connect_timeout", "DURATION", "Time to connect to a task before it counts as down"),
    s("proxy.request_head_timeout", "DURATION", "Time a client has to send a complete request head"),
    s("proxy.idle_timeout", "DURATION", "A client connection with no request in flight is closed after this"),
    s("proxy.upstream_response_timeout", "DURATION", "Time a task has to start its response, counted from the end of the request body"),
    s("proxy.upstream_send_timeout", "DURATION", "A task that takes nothing of a request body this long gets the request abandoned (504)"),
    s("proxy.upstream_body_timeout", "DURATION", "A task's response body that sends nothing this long is cut"),
    s("proxy.client_body_timeout", "DURATION", "A client's request body that sends nothing this long ends the request (408)"),
    s("proxy.tunnel_idle_timeout", "DURATION", "A WebSocket or other upgraded connection idle both ways this long is closed"),
    s("proxy.shutdown_delay", "DURATION", "On SIGTERM, /readyz says not ready this long before the listeners close"),
    s("proxy.shutdown_grace", "DURATION", "Time in-flight requests get on SIGTERM"),
    s("proxy.max_header_bytes", "BYTES", "Largest request head; larger gets 431"),
    s("proxy.max_body_bytes", "BYTES", "Largest request body a route takes unless it sets its own (413); 0: no limit"),
    s("proxy.request_buffer_bytes", "BYTES", "With request buffering on (per route), the part of a request body read before the task gets any (in memory); the rest streams"),
    s("proxy.max_headers", "N", "Most header fields per request; more gets 431"),
    s("proxy.max_connections", "N", "Client connections one listener holds at most; more are refused (503, then closed)"),
    s("proxy.max_connections_per_client", "N", "Client connections one address holds at most on a listener (trusted_networks are not counted)"),
    s("proxy.eject_base", "DURATION", "First ejection of a failing task; doubles per failure in a row"),
    s("proxy.eject_max", "DURATION", "Longest ejection of a failing task"),
    s("proxy.reuse_port", "BOOL", "Share listening addresses with another agent on this host (SO_REUSEPORT): updates without a gap"),
    s("tls.https_listen", "ADDR", "Address of the HTTPS listener (e.g. 0.0.0.0:443); unset: no HTTPS"),
    s("tls.certs_dir", "DIR", "Certificates named <host>.crt/<host>.key (nginx-proxy's layout), watched"),
    s("tls.unknown_names", "POLICY", "self-signed or reject, for names without a certificate"),
    s("tls.session_resumption", "BOOL", "Let clients resume TLS sessions (no full handshake on reconnect)"),
    s("tls.poll_interval", "DURATION", "How often the certificates directory is checked"),
    s("acme.enabled", "BOOL", "Order certificates for routes that ask (LETSENCRYPT_HOST, meshgate.tls=acme, a Traefik certresolver)"),
    s("acme.directory", "URL", "letsencrypt, letsencrypt-staging, or any RFC 8555 directory URL"),
    s("acme.fallback_directories", "URL,...", "Other CAs, tried in order for a certificate when the one before keeps failing"),
    s("acme.email", "ADDRESS", "Contact address for the ACME account (expiry warnings)"),
    s("acme.storage_dir", "DIR", "Account, certificates and locks; keep it on a volume"),
    s("acme.challenge", "KIND", "http-01 (port 80), tls-alpn-01 (port 443) or dns-01 (a TXT record), tried first; wildcards always use dns-01"),
    s("acme.fallback", "BOOL", "Try the other challenge when the first fails"),
    s("acme.trust_roots", "FILE", "Extra CA certificates (PEM) to trust for the ACME server's HTTPS"),
    s("acme.eab_kid", "ID", "External account binding key id (CAs that require one)"),
    s("acme.eab_hmac_key", "KEY", "External account binding HMAC key, base64url"),
    s("acme.renew_before", "DURATION", "Renew when this much validity is left; unset: a third of the lifetime"),
    s("acme.max_names", "N", "Host names per certificate at most (Let's Encrypt allows 100)"),
    s("acme.retry_base", "DURATION", "First wait after a failed order; doubles per failure (a CA's Retry-After is honoured)"),
    s("acme.retry_max", "DURATION", "Longest wait between failed orders"),
    s("acme.request_timeout", "DURATION", "One request to the CA may take this long"),
    s("acme.dns_provider", "PROVIDER", "Who publishes DNS-01 records: mesh-dns (delegate _acme-challenge names to the cluster; needs dns.listen) or rfc2136"),
    s("acme.dns_resolvers", "ADDR,...", "Where a DNS-01 record must be seen before the CA is asked; unset: mesh-dns's listener or the RFC 2136 server"),
    s("acme.dns_propagation_timeout", "DURATION", "How long a DNS-01 record may take to be seen there"),
    s("acme.on_demand_ask", "URL", "On-demand TLS: order a certificate at a name's first handshake if GET <URL>?domain=<name> answers 2xx"),
    s("acme.on_demand_concurrent", "N", "On-demand orders at once, at most"),
    s("acme.on_demand_per_minute", "N", "On-demand orders a minute, at most"),
    s("acme.import", "PATH,...", "Certificates to take over instead of ordering: Traefik's acme.json, or acme-companion's certs directory"),
    s("acme.rfc2136_server", "ADDR", "RFC 2136: your authoritative DNS server that takes the updates"),
    s("acme.rfc2136_zone", "NAME", "RFC 2136: the zone the challenge records go in"),
    s("acme.rfc2136_tsig_key", "NAME", "RFC 2136: the name of the TSIG key (unset: unsigned updates)"),
    s("acme.rfc2136_tsig_algorithm", "ALGORITHM", "RFC 2136: hmac-sha256, hmac-sha384 or hmac-sha512"),
    s("acme.rfc2136_tsig_secret_file", "FILE", "RFC 2136: the TSIG secret, base64, alone or in a BIND or Knot key file"),
    s("mesh.uplink", "IFACE", "Serve published ports (XDP) on this interface, or auto (the one of the node's address); unset: no L4 mesh"),
    s("mesh.node_address", "IP", "This node's IPv4 address on the uplink; unset: its Swarm node address"),
    s("mesh.node_name", "NAME", "This node's name as tasks name their node (Swarm node name); unset: local"),
    s("mesh.drain", "DURATION", "A task gone from the state keeps its established connections this long, then they are reset"),
    s("mesh.pin_dir", "DIR", "A directory on a bpffs where the reply table is kept for the next agent of the node (updates without a failed connection)"),
    s("cluster.role", "ROLE", "auto (from the engine), standalone, leader, manager or worker"),
    s("cluster.listen", "ADDR", "Where managers serve the cluster feed (mutual TLS)"),
    s("cluster.hop_listen", "ADDR", "Where other nodes reach this node's tasks (mutual TLS; same port on every node)"),
    s("cluster.peers", "ADDR,...", "Feeds to follow (host:port); empty: the managers the engine knows"),
    s("cluster.secret_file", "FILE", "The cluster secret (PEM, from --new-cluster-secret)"),
    s("cluster.state_file", "FILE", "Where a worker keeps the last state received, for restarts while no manager answers"),
    s("cluster.heartbeat", "DURATION", "A quiet feed sends a heartbeat this often"),
    s("cluster.timeout", "DURATION", "A feed silent this long is left for the next manager"),
    s("admin.listen", "ADDR", "Address of the admin endpoints: metrics and health for anyone who reaches it, the dashboard for the node itself and admin.users_file"),
    s("admin.socket", "PATH", "Also serve the admin endpoints on this Unix socket (for --probe in a container)"),
    s("admin.users_file", "FILE", "htpasswd file: its users may open the dashboard and /api/state from beyond the node (unset: the node itself only)"),
    s("routes.file", "FILE", "Routes file to serve and watch"),
    s("routes.poll_interval", "DURATION", "How often the routes file is checked"),
    s("docker.mode", "MODE", "auto (on if DOCKER_HOST is set or the socket exists), on or off"),
    s("docker.endpoint", "URL", "Engine address; unset: DOCKER_HOST, else unix:///var/run/docker.sock"),
    s("docker.expose_by_default", "BOOL", "Route containers that did not opt in"),
    s("docker.default_domain", "DOMAIN", "With expose_by_default: <name>.<domain> for workloads without a host"),
    s("docker.traefik_entrypoints_http", "NAME,...", "Traefik entrypoints served on the HTTP listener (a router on an entrypoint named nowhere is refused)"),
    s("docker.traefik_entrypoints_https", "NAME,...", "Traefik entrypoints served on the HTTPS listener"),
    s("docker.traefik_insecure_skip_verify", "BOOL", "Traefik's serversTransport.insecureSkipVerify: Traefik-labelled https services are not verified"),
    s("docker.htpasswd_dir", "DIR", "nginx-proxy's htpasswd directory: a file named after a host holds its users"),
    s("docker.network", "NAME", "Network to reach tasks on when a workload names none"),
    s("docker.debounce", "DURATION", "Events closer than this make one update"),
    s("docker.resync_interval", "DURATION", "Full resync period"),
    s("dns.listen", "ADDR", "Run mesh-dns on this address, UDP and TCP (e.g. 0.0.0.0:53)"),
    s("dns.domain", "DOMAIN", "Cluster domain"),
    s("dns.ttl", "DURATION", "TTL of local answers"),
    s("dns.upstreams", "ADDR,...", "Resolvers (IP:port) for other names; empty: those of /etc/resolv.conf"),
    s("dns.upstream_timeout", "DURATION", "Forwarded queries answer SERVFAIL after this"),
    s("dns.udp_rate_limit", "N", "UDP answers per second per client (address, IPv6 /64); beyond, empty answers with TC set (ask over TCP): the node amplifies nothing; 0: off"),
    s("dns.cache_size", "N", "Forwarded answers cached at most"),
    s("dns.recursion_networks", "CIDR,...", "Clients that get the cluster's names and other names forwarded; others get ACME challenge names only"),
    s("dns.answer_routed_hosts", "BOOL", "Answer routed HTTP host names with node addresses"),
    s("dns.node_addresses", "IP,...", "Addresses for routed host names; empty: the Swarm nodes'"),
    s("dns.challenge_zone", "NAME", "Also answer ACME DNS-01 records under this zone (the target of CNAME delegations)"),
    s("whoami.listen", "ADDR", "Run the whoami demo backend on this address"),
    s("whoami.name", "NAME", "The name the demo backend answers with"),
    s("log.format", "FORMAT", "human or json"),
    s("log.level", "FILTER", "Filter such as info or meshgate=debug"),
    s("log.access", "WHERE", "Access log: stdout, stderr, a file (reopened on SIGUSR1) or off"),
    s("log.access_format", "FORMAT", "combined, common, vhost (nginx-proxy's) or json (Traefik's field names)"),
    s("log.access_status", "CODES,...", "Log only these statuses (404, 500-599); empty: all"),
    s("log.access_min_duration", "DURATION", "Log only requests this slow (either filter suffices); 0: all"),
    s("log.access_headers", "NAME,...", "Request headers added to JSON lines (credentials and cookies redacted)"),
];

/// Names settings had before their names followed the keys: (old flag, old variable, key).
/// Still accepted, with a warning naming the new one.
pub const RENAMED: &[(&str, &str, &str)] = &[
    ("https-listen", "MESHGATE_HTTPS_LISTEN", "tls.https_listen"),
    ("certs-dir", "MESHGATE_CERTS_DIR", "tls.certs_dir"),
    ("unknown-names", "MESHGATE_UNKNOWN_NAMES", "tls.unknown_names"),
    ("certs-poll-interval", "MESHGATE_CERTS_POLL_INTERVAL", "tls.poll_interval"),
    ("acme", "MESHGATE_ACME", "acme.enabled"),
    ("routes", "MESHGATE_ROUTES", "routes.file"),
    ("docker", "MESHGATE_DOCKER", "docker.mode"),
    ("expose-by-default", "MESHGATE_EXPOSE_BY_DEFAULT", "docker.expose_by_default"),
    ("default-domain", "MESHGATE_DEFAULT_DOMAIN", "docker.default_domain"),
];

/// Variables named MESHGATE_* that are not settings but are read all the same.
const OTHER_VARIABLES: &[&str] = &["MESHGATE_CONFIG"];

impl Setting {
    /// The flag, without its `--`.
    #[must_use]
    pub fn flag(&self) -> String {
        self.key.strip_prefix("proxy.").unwrap_or(self.key).replace(['.', '_'], "-")
    }

    /// The environment variable.
    #[must_use]
    pub fn env(&self) -> String {
        format!("MESHGATE_{}", self.flag().replace('-', "_").to_uppercase())
    }

    fn section(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(section, _)| section)
    }

    /// The `--help` heading of its section.
    #[must_use]
    pub fn heading(&self) -> &'static str {
        match self.section() {
            "proxy" => "Proxy",
            "tls" => "TLS",
            "acme" => "ACME certificates",
            "mesh" => "L4 mesh",
            "cluster" => "Cluster",
            "admin" => "Admin",
            "routes" => "Routes file",
            "docker" => "Docker discovery",
            "dns" => "DNS (mesh-dns)",
            "whoami" => "Demo",
            "log" => "Logging",
            other => other,
        }
    }

    /// Its default as the config file writes it; `None` when unset by default.
    #[must_use]
    pub fn default_value(&self, defaults: &toml::Table) -> Option<String> {
        lookup(defaults, self.key).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        })
    }
}

/// The setting declared for `key`.
#[must_use]
pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The built-in defaults as a TOML table.
#[must_use]
pub fn defaults() -> toml::Table {
    toml::Table::try_from(Config::default()).expect("the config serializes")
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (section, field) = key.split_once('.')?;
    table.get(section)?.as_table()?.get(field)
}

/// One flag per setting, for `--help` and parsing; the help ends with the key and default.
#[must_use]
pub fn args() -> Vec<Arg> {
    let defaults = defaults();
    SETTINGS
        .iter()
        .map(|s| {
            let default = match s.default_value(&defaults) {
                Some(d) if !d.is_empty() => format!(" [default: {d}]"),
                _ => String::new(),
            };
            Arg::new(s.key)
                .long(s.flag())
                .env(s.env())
                .value_name(s.value)
                .help(format!("{}{default} [{}]", s.help, s.key))
                .help_heading(s.heading())
                .num_args(1)
        })
        .collect()
}

/// A value given by flag or environment.
#[derive(Debug)]
pub struct Given {
    pub setting: &'static Setting,
    pub raw: String,
    /// `--flag` or `MESHGATE_...`: the name the user gave it by.
    pub by: String,
}

/// The settings given on the command line or in the environment.
#[must_use]
pub fn given(matches: &ArgMatches) -> Vec<Given> {
    SETTINGS
        .iter()
        .filter_map(|s| {
            let raw = matches.get_one::<String>(s.key)?.clone();
            let by = match matches.value_source(s.key) {
                Some(ValueSource::EnvVariable) => s.env(),
                _ => format!("--{}", s.flag()),
            };
            Some(Given { setting: s, raw, by })
        })
        .collect()
}

/// A value given by flag or environment that the setting cannot take.
#[derive(Debug, thiserror::Error)]
#[error("{by}={raw:?} ({key}): {message}")]
pub struct BadValue {
    pub by: String,
    pub raw: String,
    pub key: &'static str,
    pub message: String,
}

/// `config` with `given` over it. Each value is read as the config file reads the key: a
/// whole number or a boolean where the default is one, a comma-separated list where it is a
/// list, text otherwise (addresses, durations, paths, names), then the whole is checked by
/// the config's own types.
pub fn apply(config: &Config, given: &[Given]) -> Result<Config, BadValue> {
    let mut table = toml::Table::try_from(config).expect("the config serializes");
    let defaults = defaults();
    for g in given {
        let bad =
            |message: String| BadValue { by: g.by.clone(), raw: g.raw.clone(), key: g.setting.key, message };
        let value = typed(lookup(&defaults, g.setting.key), &g.raw).map_err(bad)?;
        let mut alone = toml::Table::try_from(config).expect("the config serializes");
        set(&mut alone, g.setting.key, value.clone());
        // Each alone first: the error names the value that is wrong.
        toml::Value::Table(alone)
            .try_into::<Config>()
            .map_err(|e| bad(format!("{}{}", first_line(&e.to_string()), hint(g.setting.value))))?;
        set(&mut table, g.setting.key, value);
    }
    toml::Value::Table(table).try_into::<Config>().map_err(|e| BadValue {
        by: "the flags and environment".into(),
        raw: String::new(),
        key: "",
        message: first_line(&e.to_string()),
    })
}

/// How to write a value of this kind, after an error.
fn hint(value: &str) -> &'static str {
    match value {
        "ADDR" => " (write IP:port, e.g. 0.0.0.0:80)",
        "DURATION" => " (write e.g. 500ms, 2s or 1m)",
        "IP" => " (write an IPv4 address, e.g. 192.0.2.10)",
        "CIDR,..." => " (write networks separated by commas, e.g. 10.0.0.0/8,192.168.0.0/16)",
        _ => "",
    }
}

fn first_line(message: &str) -> String {
    message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim().to_owned()
}

fn typed(default: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    Ok(match default {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.trim().parse().map_err(|_| "expected a whole number, e.g. 100".to_owned())?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err("expected true or false".into()),
        }),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| toml::Value::String(i.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    })
}

fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    let (section, field) = key.split_once('.').expect("keys are section.field");
    let section = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(section) = section.as_table_mut() {
        section.insert(field.to_owned(), value);
    }
}

/// Takes the old names of [`RENAMED`] settings (in `args` and the environment) as the new
/// ones, and notes variables named like settings that are none. Returns the arguments and
/// one warning per old or unknown name, for the log.
#[must_use]
pub fn accept_old_names(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let mut warnings = Vec::new();
    for &(_, old_env, key) in RENAMED {
        let new_env = find(key).expect("renamed to a setting").env();
        if let Some(value) = std::env::var_os(old_env) {
            std::env::remove_var(old_env);
            if std::env::var_os(&new_env).is_none() {
                std::env::set_var(&new_env, value);
            }
            warnings
                .push(format!("{old_env} is now {new_env} ({key}): the old name will go in a later version"));
        }
    }
    let args = args
        .into_iter()
        .map(|arg| {
            let Some(text) = arg.to_str() else { return arg };
            for &(old_flag, _, key) in RENAMED {
                let (old, new) = (
                    format!("--{old_flag}"),
                    format!("--{}", find(key).expect("renamed to a setting").flag()),
                );
                let renamed = if text == old {
                    Some(new.clone())
                } else {
                    text.strip_prefix(&format!("{old}=")).map(|value| format!("{new}={value}"))
                };
                if let Some(renamed) = renamed {
                    warnings
                        .push(format!("{old} is now {new} ({key}): the old name will go in a later version"));
                    return renamed.into();
                }
            }
            arg
        })
        .collect();
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("MESHGATE_")
            && !OTHER_VARIABLES.contains(&name)
            && !SETTINGS.iter().any(|s| s.env() == name)
        {
            warnings.push(format!("{name} is not a setting, ignored (meshgate --help lists them)"));
        }
    }
    (args, warnings)
}

/// The configuration reference (a Markdown table), as `docs/configuration.md` holds it.
#[must_use]
pub fn reference() -> String {
    let defaults = defaults();
    let mut by_section: BTreeMap<usize, Vec<&Setting>> = BTreeMap::new();
    let mut order = Vec::new();
    for s in SETTINGS {
        let i = order.iter().position(|h| *h == s.heading()).unwrap_or_else(|| {
            order.push(s.heading());
            order.len() - 1
        });
        by_section.entry(i).or_default().push(s);
    }
    let mut out = String::new();
    for (i, settings) in by_section {
        let _ = write!(out, "\n### {}\n\n", order[i]);
        out.push_str("| key | default | environment | flag | what it does |\n|---|---|---|---|---|\n");
        for s in settings {
            let default = match s.default_value(&defaults) {
                Some(d) if !d.is_empty() => format!("`{d}`"),
                Some(_) => "empty".into(),
                None => "unset".into(),
            };
            let _ = writeln!(
                out,
                "| `{}` | {default} | `{}` | `--{}` | {} |",
                s.key,
                s.env(),
                s.flag(),
                s.help.replace('|', "\\|").replace('<', "&lt;")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of the config file, as the defaults write them out (unset keys aside).
    fn keys(table: &toml::Table) -> Vec<String> {
        table
            .iter()
            .flat_map(|(section, fields)| {
                fields
                    .as_table()
                    .into_iter()
                    .flat_map(move |f| f.keys().map(move |k| format!("{section}.{k}")))
            })
            .collect()
    }

    #[test]
    fn every_key_of_the_config_is_declared_once_and_every_declared_key_exists() {
        for key in keys(&defaults()) {
            assert!(find(&key).is_some(), "{key} is in the config but not in SETTINGS");
        }
        for (i, s) in SETTINGS.iter().enumerate() {
            assert!(SETTINGS[i + 1..].iter().all(|o| o.key != s.key), "{} is declared twice", s.key);
            // A value of the right shape is taken; an unknown key would be refused.
            let sample = match s.default_value(&defaults()) {
                Some(d) => d,
                None if s.value == "IP" => "192.0.2.1".into(),
                None if s.value == "ADDR" => "127.0.0.1:1".into(),
                None if s.value == "DURATION" => "1s".into(),
                None => "x".into(),
            };
            let given = [Given { setting: s, raw: sample.clone(), by: s.env() }];
            if let Err(e) = apply(&Config::default(), &given) {
                panic!("{} = {sample:?}: {e}", s.key);
            }
        }
    }

    #[test]
    fn a_bad_value_is_reported_with_the_name_it_was_given_by() {
        let s = find("proxy.http_listen").unwrap();
        let given = [Given { setting: s, raw: "abc".into(), by: s.env() }];
        let e = apply(&Config::default(), &given).unwrap_err().to_string();
        assert!(e.starts_with("MESHGATE_HTTP_LISTEN=\"abc\" (proxy.http_listen): "), "{e}");
        let s = find("dns.cache_size").unwrap();
        let given = [Given { setting: s, raw: "many".into(), by: "--dns-cache-size".into() }];
        let e = apply(&Config::default(), &given).unwrap_err().to_string();
        assert!(e.contains("--dns-cache-size") && e.contains("whole number"), "{e}");
    }

    #[test]
    fn values_are_read_as_the_config_file_reads_them() {
        let given =
            |key: &str, raw: &str| Given { setting: find(key).unwrap(), raw: raw.into(), by: String::new() };
        let c = apply(
            &Config::default(),
            &[
                given("proxy.trusted_networks", "10.0.0.0/8, 192.168.0.0/16"),
                given("proxy.connect_timeout", "500ms"),
                given("proxy.reuse_port", "true"),
                given("proxy.max_headers", "7"),
                given("tls.https_listen", "0.0.0.0:8443"),
                given("routes.file", "/etc/meshgate/routes.toml"),
            ],
        )
        .unwrap();
        assert_eq!(c.proxy.trusted_networks.len(), 2);
        assert_eq!(c.proxy.connect_timeout, std::time::Duration::from_millis(500));
        assert!(c.proxy.reuse_port);
        assert_eq!(c.proxy.max_headers, 7);
        assert_eq!(c.tls.https_listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(c.routes.file.as_deref(), Some(std::path::Path::new("/etc/meshgate/routes.toml")));
    }

    #[test]
    fn names_follow_the_keys() {
        let s = find("tls.certs_dir").unwrap();
        assert_eq!((s.flag().as_str(), s.env().as_str()), ("tls-certs-dir", "MESHGATE_TLS_CERTS_DIR"));
        let s = find("proxy.http_listen").unwrap();
        assert_eq!((s.flag().as_str(), s.env().as_str()), ("http-listen", "MESHGATE_HTTP_LISTEN"));
    }

    #[test]
    fn the_reference_in_the_docs_is_the_declared_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (begin, end) = ("<!-- settings: begin -->\n", "<!-- settings: end -->");
        let start = doc.find(begin).expect("docs/configuration.md has the settings markers") + begin.len();
        let stop = doc.find(end).expect("docs/configuration.md has the settings markers");
        if doc[start..stop] != reference() {
            if std::env::var_os("WRITE_REFERENCE").is_some() {
                std::fs::write(path, format!("{}{}{}", &doc[..start], reference(), &doc[stop..])).unwrap();
            } else {
                panic!(
                    "docs/configuration.md differs from SETTINGS: run `WRITE_REFERENCE=1 cargo test -p meshgate --lib settings` to write it"
                );
            }
        }
    }
}
