//! The agent's configuration: one typed tree read from TOML, then overridden by
//! `MESHGATE_*` environment variables and command-line flags (see [`crate::cli`]).
//!
//! Every section rejects unknown keys, so a typo is an error at start, not a silent default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::invalid::Invalid;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    /// `[routes]`; `[file]` before (still read).
    #[serde(alias = "file")]
    pub routes: RoutesConfig,
    pub docker: crate::provider::docker::DockerConfig,
    pub dns: crate::dns::DnsConfig,
    pub tls: crate::tls::TlsConfig,
    pub acme: crate::acme::AcmeConfig,
    pub mesh: crate::mesh::MeshConfig,
    pub cluster: crate::cluster::ClusterConfig,
    pub whoami: WhoamiConfig,
    pub log: LogConfig,
}

/// The HTTP reverse proxy.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address the plain-HTTP listener binds.
    pub http_listen: SocketAddr,
    /// Clients whose `X-Forwarded-*` and `X-Real-IP` headers are kept (e.g. a load balancer
    /// in front of the nodes). From anyone else those headers are replaced.
    pub trusted_networks: Vec<IpNet>,
    /// Load balancers in front that send the PROXY protocol (v1 or v2): a connection from
    /// one of these networks starts with a header naming the client, used as its address.
    pub proxy_protocol_networks: Vec<IpNet>,
    /// Requests for a host no route claims are served as if they asked for this host
    /// (nginx-proxy's `DEFAULT_HOST`). Unset: they get a 404 from the proxy.
    pub default_host: Option<String>,
    /// Time to establish a TCP connection to a task before it counts as down.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a client has to send a complete request head once it started (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub request_head_timeout: Duration,
    /// A client connection with no request in flight for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a task has to send the response head once the request is sent (counted from
    /// the end of its body, as nginx's `proxy_read_timeout`).
    #[serde(with = "humantime_serde")]
    pub upstream_response_timeout: Duration,
    /// A task that takes nothing of a request body this long (it stopped reading) gets the
    /// request abandoned, 504 (nginx's `proxy_send_timeout`).
    #[serde(with = "humantime_serde")]
    pub upstream_send_timeout: Duration,
    /// A task's response body that sends nothing this long is cut (the client sees it end).
    #[serde(with = "humantime_serde")]
    pub upstream_body_timeout: Duration,
    /// A client's request body that sends nothing this long ends the request (408).
    #[serde(with = "humantime_serde")]
    pub client_body_timeout: Duration,
    /// An upgraded connection (WebSocket) over which nothing moved either way this long is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long `/readyz` says "not ready" while the listeners still
    /// accept, so a load balancer stops sending before they close.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest request head accepted; bigger heads get 431.
    pub max_header_bytes: usize,
    /// Largest request body a route takes when it sets none of its own (413 past it); 0:
    /// no limit (as Traefik; nginx's default is 1 MiB).
    pub max_body_bytes: u64,
    /// Of a route with request buffering on, this much of a request body is read before
    /// anything goes to the task; a longer body streams on after it.
    pub request_buffer_bytes: u64,
    /// Most header fields accepted in one request; more get 431.
    pub max_headers: usize,
    /// Client connections one listener holds at most; more are refused (503, then closed).
    pub max_connections: usize,
    /// Client connections one address holds at most on a listener (not counted for
    /// `trusted_networks`: a load balancer in front).
    pub max_connections_per_client: usize,
    /// First ejection of a task that refused a connection or timed out; doubles on each
    /// failure in a row up to `eject_max`.
    #[serde(with = "humantime_serde")]
    pub eject_base: Duration,
    #[serde(with = "humantime_serde")]
    pub eject_max: Duration,
    /// Share the listening addresses (HTTP, HTTPS, admin, DNS) with another agent on the same
    /// host (SO_REUSEPORT), so a new agent can start before the old one stops: no gap in a
    /// rolling update. Off: a second agent fails to start with "address in use".
    pub reuse_port: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            trusted_networks: Vec::new(),
            proxy_protocol_networks: Vec::new(),
            default_host: None,
            connect_timeout: Duration::from_secs(2),
            request_head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_response_timeout: Duration::from_secs(60),
            upstream_send_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(3600),
            shutdown_delay: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_body_bytes: 0,
            request_buffer_bytes: 8 << 20,
            max_headers: 100,
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            reuse_port: false,
        }
    }
}

/// The admin listener: metrics, health, state.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz`, `/api/state` and the dashboard.
    pub listen: SocketAddr,
    /// Also serve them on this Unix socket (for `meshgate --probe unix:PATH` in a container).
    pub socket: Option<PathBuf>,
    /// An htpasswd file: its users may see the dashboard and `/api/state` from beyond the
    /// node. Unset: only from the node itself (loopback, the Unix socket).
    pub users_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)), socket: None, users_file: None }
    }
}

/// The file provider: services and routes from a watched TOML file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutesConfig {
    /// The routes file (`path` before, still read). Unset: the file provider is off.
    #[serde(alias = "path")]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self { file: None, poll_interval: Duration::from_millis(200) }
    }
}

/// The built-in `whoami` demo backend.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WhoamiConfig {
    /// Address the demo backend binds. Unset: it does not run.
    pub listen: Option<SocketAddr>,
    /// The name it answers with (`Name:`), to tell several apart.
    pub name: String,
}

impl Default for WhoamiConfig {
    fn default() -> Self {
        Self { listen: None, name: "whoami".into() }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `meshgate=debug,info`. `RUST_LOG` wins if set.
    pub level: String,
    /// Where the access log goes: `stdout` (as nginx-proxy's, so `docker logs` shows it),
    /// `stderr`, a file path (reopened on SIGUSR1, for logrotate), or `off`.
    pub access: String,
    pub access_format: AccessFormat,
    /// Only requests whose status is in one of these (`404`, `500-599`) are logged; empty:
    /// all. With `access_min_duration`, a request matching either is logged (as Traefik).
    pub access_status: Vec<String>,
    /// Only requests at least this slow are logged (0: no such filter).
    #[serde(with = "humantime_serde")]
    pub access_min_duration: Duration,
    /// Request headers written into each line (JSON only); credentials and cookies are
    /// written as `REDACTED`.
    pub access_headers: Vec<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
            access: "stdout".into(),
            access_format: AccessFormat::Combined,
            access_status: Vec::new(),
            access_min_duration: Duration::ZERO,
            access_headers: Vec::new(),
        }
    }
}

/// The access log's line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    /// NCSA common: client, user, time, request line, status, bytes.
    Common,
    /// NCSA combined: common plus referer and user agent (nginx's default).
    #[default]
    Combined,
    /// nginx-proxy's `vhost`: the host first, then combined, then the task's address.
    Vhost,
    /// One JSON object per line, with Traefik's access log field names.
    Json,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// A configuration problem, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}, line {line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{first} and {second} both listen on {addr}: give each its own port")]
    SameListener { first: &'static str, second: &'static str, addr: SocketAddr },
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: line_of(&text, e.span().map_or(0, |s| s.start)),
            message: e.message().to_owned(),
        })
    }

    /// Parses config text (no validation beyond types and unknown keys).
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Two of the agent's own listeners on one port would fail to bind, or worse, with
    /// `proxy.reuse_port`, bind and share the connections between two protocols.
    fn listeners_apart(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        let feed = match cluster.role {
            crate::cluster::RoleSetting::Leader | crate::cluster::RoleSetting::Manager => true,
            crate::cluster::RoleSetting::Auto => cluster.secret_file.exists(),
            _ => false,
        };
        let listeners: Vec<(&'static str, SocketAddr)> = [
            Some(("proxy.http_listen", self.proxy.http_listen)),
            self.tls.https_listen.map(|a| ("tls.https_listen", a)),
            Some(("admin.listen", self.admin.listen)),
            self.dns.listen.map(|a| ("dns.listen", a)),
            feed.then_some(("cluster.listen", cluster.listen)),
        ]
        .into_iter()
        .flatten()
        .filter(|(_, a)| a.port() != 0)
        .collect();
        for (i, (first, a)) in listeners.iter().enumerate() {
            for (second, b) in &listeners[i + 1..] {
                if a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                {
                    return Err(ConfigError::SameListener { first, second, addr: *b });
                }
            }
        }
        Ok(())
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.proxy;
        let positive = [
            ("proxy.connect_timeout", p.connect_timeout),
            ("proxy.request_head_timeout", p.request_head_timeout),
            ("proxy.idle_timeout", p.idle_timeout),
            ("proxy.upstream_response_timeout", p.upstream_response_timeout),
            ("proxy.upstream_send_timeout", p.upstream_send_timeout),
            ("proxy.upstream_body_timeout", p.upstream_body_timeout),
            ("proxy.client_body_timeout", p.client_body_timeout),
            ("proxy.tunnel_idle_timeout", p.tunnel_idle_timeout),
            ("proxy.eject_base", p.eject_base),
            ("routes.poll_interval", self.routes.poll_interval),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(Invalid::new(key, "0s", "a duration above zero, e.g. \"2s\" or \"500ms\"").into());
            }
        }
        if p.eject_max < p.eject_base {
            return Err(Invalid::new(
                "proxy.eject_max",
                humantime::format_duration(p.eject_max),
                "a duration at least as long as proxy.eject_base",
            )
            .into());
        }
        if p.max_header_bytes < 8192 {
            return Err(
                Invalid::new("proxy.max_header_bytes", p.max_header_bytes, "at least 8192 bytes").into()
            );
        }
        if p.max_headers == 0 {
            return Err(Invalid::new("proxy.max_headers", 0, "at least 1").into());
        }
        self.acme.validate()?;
        // DNS-01 as configured must be able to work: checked where both sections are known.
        if self.acme.enabled {
            let dns01 = crate::acme::Dns01::new(&self.acme, self.dns.listen)?;
            if dns01.is_none() && self.acme.challenge == crate::acme::ChallengeKind::Dns01 {
                return Err(Invalid::new(
                    "acme.challenge",
                    "dns-01",
                    "dns.listen set (mesh-dns answers the challenges), or acme.dns_provider = \"rfc2136\"",
                )
                .into());
            }
        }
        self.mesh.validate()?;
        self.cluster.validate()?;
        self.listeners_apart()?;
        if let Some(zone) = &self.dns.challenge_zone {
            crate::dns::challenge_zone(zone)
                .map_err(|e| Invalid::new("dns.challenge_zone", zone, format!("a DNS name ({e})")))?;
        }
        if mesh_dns::ZoneBuilder::new(&self.dns.domain, 5).is_err() {
            return Err(Invalid::new(
                "dns.domain",
                &self.dns.domain,
                "a domain name such as `mesh.internal`",
            )
            .into());
        }
        if let Some(host) = &p.default_host {
            crate::state::HostPattern::parse(host).map_err(|_| {
                ConfigError::from(Invalid::new(
                    "proxy.default_host",
                    host,
                    "a host name such as `www.example.com`",
                ))
            })?;
        }
        Ok(())
    }
}

/// The 1-based line of a byte offset, for error messages.
#[must_use]
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let err = Config::from_toml("[proxy]\nconect_timeout = \"1s\"\n").unwrap_err();
        assert!(err.message().contains("conect_timeout"), "{err}");
        assert_eq!(line_of("[proxy]\nconect_timeout = \"1s\"\n", err.span().unwrap().start), 2);
    }

    #[test]
    fn durations_and_defaults() {
        let c = Config::from_toml("[proxy]\nconnect_timeout = \"250ms\"\n").unwrap();
        assert_eq!(c.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_key() {
        let c = Config::from_toml("[proxy]\neject_base = \"10s\"\neject_max = \"1s\"\n").unwrap();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("proxy.eject_max"), "{msg}");
    }

    #[test]
    fn a_bad_dns_domain_is_refused_not_an_empty_zone() {
        let c = Config::from_toml("[dns]\ndomain = \"bad..domain\"\n").unwrap();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("dns.domain") && msg.contains("bad..domain"), "{msg}");
        let old = Config::from_toml("[file]\npath = \"/etc/meshgate/routes.toml\"\n").unwrap();
        assert_eq!(
            old.routes.file.as_deref(),
            Some(Path::new("/etc/meshgate/routes.toml")),
            "[file] is read as [routes]"
        );
    }

    #[test]
    fn two_listeners_on_one_port_are_refused() {
        let c = Config::from_toml("[proxy]\nhttp_listen = \"0.0.0.0:8443\"\nreuse_port = true\n[tls]\nhttps_listen = \"127.0.0.1:8443\"\n").unwrap();
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("proxy.http_listen and tls.https_listen both listen on 127.0.0.1:8443"),
            "{msg}"
        );
        let c = Config::from_toml("[proxy]\nhttp_listen = \"127.0.0.2:80\"\n[tls]\nhttps_listen = \"127.0.0.1:80\"\n[cluster]\nrole = \"leader\"\nlisten = \"0.0.0.0:9090\"\n").unwrap();
        assert!(
            c.validate().unwrap_err().to_string().contains("admin.listen and cluster.listen"),
            "the feed's port is checked when it serves"
        );
        let c = Config::from_toml(
            "[proxy]\nhttp_listen = \"127.0.0.2:80\"\n[tls]\nhttps_listen = \"127.0.0.1:80\"\n",
        )
        .unwrap();
        c.validate().unwrap();
    }
}
