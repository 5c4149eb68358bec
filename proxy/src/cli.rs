//! Command-line flags. Every setting of the config file has a flag and a `MESHGATE_*`
//! environment variable; a flag beats the variable, which beats the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::config::{Config, LogFormat};
use crate::provider::docker::DockerMode;

const ABOUT: &str = "Routing mesh and reverse proxy for Docker and Docker Swarm nodes";

const LONG_ABOUT: &str = "\
meshgate routes HTTP(S) requests to your services by host name, following the routes you
describe in a routes file and the containers and Swarm services it discovers from Docker
(VIRTUAL_HOST, meshgate.* or traefik.* labels); it orders their certificates, answers
their names (mesh-dns) and serves published ports on every node (L4 mesh). Run one agent
per node.

With no routes file and no Docker engine it serves the bundled example: whoami.localhost is
routed to a built-in demo backend, so you can try it at once.";

const EXAMPLES: &str = "\
Examples:
  Try it (no Docker needed):
    meshgate --http-listen 127.0.0.1:8080
    curl -H 'Host: whoami.localhost' http://127.0.0.1:8080/

  Route the containers of this Docker engine (nginx-proxy style):
    meshgate --http-listen 0.0.0.0:80
    docker run -d -e VIRTUAL_HOST=app.example.com nginx

  HTTPS, with Let's Encrypt certificates for the routes that ask (LETSENCRYPT_HOST=...,
  meshgate.tls=acme); try --acme-directory letsencrypt-staging first:
    meshgate --https-listen 0.0.0.0:443 --acme-email ops@example.com
    docker run -d -e VIRTUAL_HOST=app.example.com -e LETSENCRYPT_HOST=app.example.com nginx

  Every node of a Swarm (workers see the whole cluster through the managers' agents;
  one agent orders the certificates), from a manager:
    meshgate --new-cluster-secret | docker secret create meshgate_cluster -
    docker stack deploy -c helm-free-deploy/stack.yml meshgate

  Serve your own routes, reloaded when the file changes:
    meshgate --routes /etc/meshgate/routes.toml

  Everything from a config file, one setting overridden:
    MESHGATE_LOG_FORMAT=json meshgate --config /etc/meshgate/meshgate.toml

  Check a config and routes file without starting:
    meshgate --config meshgate.toml --check

Admin endpoints (default 127.0.0.1:9090): / (status page), /metrics, /healthz, /readyz,
/api/state. Documentation: README.md, section \"Configuration reference\".";

// Independent one-shot switches, not a state machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(short, long, env = "MESHGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve the bundled example (whoami.localhost to the built-in whoami backend), even if
    /// a routes file is configured.
    #[arg(long)]
    pub example: bool,

    /// Validate the config (and routes file) and exit: 0 if valid, 1 with the reason if not.
    #[arg(long)]
    pub check: bool,

    /// Print the effective configuration (file + environment + flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// GET this http:// URL, or /readyz on a unix:PATH admin socket, and exit 0 if it answers
    /// 200, else 1 (a health check for images without curl, e.g. `meshgate --probe
    /// http://127.0.0.1:9090/readyz` or `meshgate --probe unix:/tmp/meshgate-admin.sock`).
    #[arg(long, value_name = "URL")]
    pub probe: Option<String>,

    /// Print a new cluster secret (a certificate and key, PEM) and exit. Every agent of a
    /// Swarm gets the same one: `meshgate --new-cluster-secret | docker secret create meshgate_cluster -`
    #[arg(long)]
    pub new_cluster_secret: bool,

    #[command(flatten)]
    pub overrides: Overrides,
}

/// One optional override per config key.
#[derive(Debug, Default, clap::Args)]
pub struct Overrides {
    /// [proxy.http_listen] Address of the plain-HTTP listener [default: 0.0.0.0:80]
    #[arg(long, env = "MESHGATE_HTTP_LISTEN", value_name = "ADDR", help_heading = "Proxy")]
    pub http_listen: Option<SocketAddr>,
    /// [proxy.trusted_networks] Comma-separated networks whose X-Forwarded-* headers are kept
    #[arg(
        long,
        env = "MESHGATE_TRUSTED_NETWORKS",
        value_name = "CIDR,...",
        value_delimiter = ',',
        help_heading = "Proxy"
    )]
    pub trusted_networks: Option<Vec<IpNet>>,
    /// [proxy.default_host] Host that answers requests for unknown hosts (else 404)
    #[arg(long, env = "MESHGATE_DEFAULT_HOST", value_name = "HOST", help_heading = "Proxy")]
    pub default_host: Option<String>,
    /// [proxy.connect_timeout] Time to connect to a task [default: 2s]
    #[arg(long, env = "MESHGATE_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub connect_timeout: Option<Duration>,
    /// [proxy.request_head_timeout] Time a client has to send a request head [default: 10s]
    #[arg(long, env = "MESHGATE_REQUEST_HEAD_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub request_head_timeout: Option<Duration>,
    /// [proxy.idle_timeout] Idle client connections are closed after this [default: 60s]
    #[arg(long, env = "MESHGATE_IDLE_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub idle_timeout: Option<Duration>,
    /// [proxy.upstream_response_timeout] Time a task has to start its response [default: 60s]
    #[arg(long, env = "MESHGATE_UPSTREAM_RESPONSE_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub upstream_response_timeout: Option<Duration>,
    /// [proxy.shutdown_grace] Time in-flight requests get on SIGTERM [default: 30s]
    #[arg(long, env = "MESHGATE_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub shutdown_grace: Option<Duration>,
    /// [proxy.max_header_bytes] Largest request head; larger gets 431 [default: 32768]
    #[arg(long, env = "MESHGATE_MAX_HEADER_BYTES", value_name = "BYTES", help_heading = "Proxy")]
    pub max_header_bytes: Option<usize>,
    /// [proxy.max_headers] Most header fields per request; more gets 431 [default: 100]
    #[arg(long, env = "MESHGATE_MAX_HEADERS", value_name = "N", help_heading = "Proxy")]
    pub max_headers: Option<usize>,
    /// [proxy.eject_base] First ejection of a failing task [default: 1s]
    #[arg(long, env = "MESHGATE_EJECT_BASE", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub eject_base: Option<Duration>,
    /// [proxy.eject_max] Longest ejection of a failing task [default: 30s]
    #[arg(long, env = "MESHGATE_EJECT_MAX", value_name = "DURATION", value_parser = duration, help_heading = "Proxy")]
    pub eject_max: Option<Duration>,

    /// [tls.https_listen] Address of the HTTPS listener (e.g. 0.0.0.0:443); unset: no HTTPS
    #[arg(long, env = "MESHGATE_HTTPS_LISTEN", value_name = "ADDR", help_heading = "TLS")]
    pub https_listen: Option<SocketAddr>,
    /// [tls.certs_dir] Certificates named <host>.crt/<host>.key (nginx-proxy's layout), watched
    #[arg(long, env = "MESHGATE_CERTS_DIR", value_name = "DIR", help_heading = "TLS")]
    pub certs_dir: Option<PathBuf>,
    /// [tls.unknown_names] self-signed or reject, for names without a certificate [default: self-signed]
    #[arg(long, env = "MESHGATE_UNKNOWN_NAMES", value_name = "POLICY", help_heading = "TLS")]
    pub unknown_names: Option<crate::tls::UnknownNames>,
    /// [tls.session_resumption] Let clients resume TLS sessions (skip the full handshake on reconnect) [default: true]
    #[arg(long, env = "MESHGATE_TLS_SESSION_RESUMPTION", value_name = "BOOL", help_heading = "TLS")]
    pub tls_session_resumption: Option<bool>,
    /// [tls.poll_interval] How often the certificates directory is checked [default: 1s]
    #[arg(long, env = "MESHGATE_CERTS_POLL_INTERVAL", value_name = "DURATION", value_parser = duration, help_heading = "TLS")]
    pub certs_poll_interval: Option<Duration>,

    /// [acme.enabled] Order certificates for routes that ask for TLS (LETSENCRYPT_HOST, meshgate.tls=acme, a Traefik certresolver) [default: true]
    #[arg(long = "acme", env = "MESHGATE_ACME", value_name = "BOOL", help_heading = "ACME certificates")]
    pub acme_enabled: Option<bool>,
    /// [acme.directory] letsencrypt, letsencrypt-staging, or any RFC 8555 directory URL [default: letsencrypt]
    #[arg(long, env = "MESHGATE_ACME_DIRECTORY", value_name = "URL", help_heading = "ACME certificates")]
    pub acme_directory: Option<String>,
    /// [acme.email] Contact address for the ACME account (expiry warnings)
    #[arg(long, env = "MESHGATE_ACME_EMAIL", value_name = "ADDRESS", help_heading = "ACME certificates")]
    pub acme_email: Option<String>,
    /// [acme.storage_dir] Account, certificates and locks; keep it on a volume [default: /var/lib/meshgate/acme]
    #[arg(long, env = "MESHGATE_ACME_STORAGE_DIR", value_name = "DIR", help_heading = "ACME certificates")]
    pub acme_storage_dir: Option<PathBuf>,
    /// [acme.challenge] http-01 (port 80) or tls-alpn-01 (port 443), tried first [default: http-01]
    #[arg(long, env = "MESHGATE_ACME_CHALLENGE", value_name = "KIND", help_heading = "ACME certificates")]
    pub acme_challenge: Option<crate::acme::ChallengeKind>,
    /// [acme.fallback] Try the other challenge when the first fails [default: true]
    #[arg(long, env = "MESHGATE_ACME_FALLBACK", value_name = "BOOL", help_heading = "ACME certificates")]
    pub acme_fallback: Option<bool>,
    /// [acme.trust_roots] Extra CA certificates (PEM) to trust for the ACME server's HTTPS
    #[arg(long, env = "MESHGATE_ACME_TRUST_ROOTS", value_name = "FILE", help_heading = "ACME certificates")]
    pub acme_trust_roots: Option<PathBuf>,
    /// [acme.eab_kid] External account binding key id (CAs that require one)
    #[arg(long, env = "MESHGATE_ACME_EAB_KID", value_name = "ID", help_heading = "ACME certificates")]
    pub acme_eab_kid: Option<String>,
    /// [acme.eab_hmac_key] External account binding HMAC key, base64url
    #[arg(long, env = "MESHGATE_ACME_EAB_HMAC_KEY", value_name = "KEY", help_heading = "ACME certificates")]
    pub acme_eab_hmac_key: Option<String>,
    /// [acme.renew_before] Renew when this much validity is left [default: a third of the lifetime]
    #[arg(long, env = "MESHGATE_ACME_RENEW_BEFORE", value_name = "DURATION", value_parser = duration, help_heading = "ACME certificates")]
    pub acme_renew_before: Option<Duration>,

    /// [mesh.uplink] Serve published ports (XDP) on this interface, e.g. eth0; unset: no L4 mesh
    #[arg(long, env = "MESHGATE_MESH_UPLINK", value_name = "IFACE", help_heading = "L4 mesh")]
    pub mesh_uplink: Option<String>,
    /// [mesh.node_address] This node's IPv4 address on the uplink [default: its Swarm node address]
    #[arg(long, env = "MESHGATE_MESH_NODE_ADDRESS", value_name = "IP", help_heading = "L4 mesh")]
    pub mesh_node_address: Option<std::net::Ipv4Addr>,
    /// [mesh.node_name] This node's name as task nodes are named (Swarm node name) [default: local]
    #[arg(long, env = "MESHGATE_MESH_NODE_NAME", value_name = "NAME", help_heading = "L4 mesh")]
    pub mesh_node_name: Option<String>,
    /// [mesh.drain] A task gone from the state keeps its established connections this long, then they are reset [default: 10s]
    #[arg(long, env = "MESHGATE_MESH_DRAIN", value_name = "DURATION", value_parser = duration, help_heading = "L4 mesh")]
    pub mesh_drain: Option<Duration>,
    /// [mesh.pin_dir] A directory on a bpffs where the reply table is kept for the next agent of the node (updates without a failed connection)
    #[arg(long, env = "MESHGATE_MESH_PIN_DIR", value_name = "DIR", help_heading = "L4 mesh")]
    pub mesh_pin_dir: Option<PathBuf>,

    /// [proxy.reuse_port] Share listening addresses with another agent on this host, for updates without a gap [default: false]
    #[arg(long, env = "MESHGATE_REUSE_PORT", value_name = "BOOL", help_heading = "Proxy")]
    pub reuse_port: Option<bool>,

    /// [cluster.role] auto (from the engine), standalone, leader, manager or worker [default: auto]
    #[arg(long, env = "MESHGATE_CLUSTER_ROLE", value_name = "ROLE", help_heading = "Cluster")]
    pub cluster_role: Option<crate::cluster::RoleSetting>,
    /// [cluster.listen] Where managers serve the cluster feed (mutual TLS) [default: 0.0.0.0:7380]
    #[arg(long, env = "MESHGATE_CLUSTER_LISTEN", value_name = "ADDR", help_heading = "Cluster")]
    pub cluster_listen: Option<SocketAddr>,
    /// [cluster.hop_listen] Where other nodes reach this node's tasks (mutual TLS; same port on every node) [default: 0.0.0.0:7381]
    #[arg(long, env = "MESHGATE_CLUSTER_HOP_LISTEN", value_name = "ADDR", help_heading = "Cluster")]
    pub cluster_hop_listen: Option<SocketAddr>,
    /// [cluster.peers] Comma-separated feeds to follow (host:port) [default: from the engine]
    #[arg(
        long,
        env = "MESHGATE_CLUSTER_PEERS",
        value_name = "ADDR,...",
        value_delimiter = ',',
        help_heading = "Cluster"
    )]
    pub cluster_peers: Option<Vec<String>>,
    /// [cluster.secret_file] The cluster secret (PEM, from --new-cluster-secret) [default: /run/secrets/meshgate_cluster]
    #[arg(long, env = "MESHGATE_CLUSTER_SECRET_FILE", value_name = "FILE", help_heading = "Cluster")]
    pub cluster_secret_file: Option<PathBuf>,
    /// [cluster.state_file] Where a worker keeps the last state received, for restarts while no manager answers
    #[arg(long, env = "MESHGATE_CLUSTER_STATE_FILE", value_name = "FILE", help_heading = "Cluster")]
    pub cluster_state_file: Option<PathBuf>,
    /// [cluster.timeout] A feed silent this long is left for the next manager [default: 6s]
    #[arg(long, env = "MESHGATE_CLUSTER_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "Cluster")]
    pub cluster_timeout: Option<Duration>,

    /// [admin.listen] Address of the admin endpoints [default: 127.0.0.1:9090]
    #[arg(long, env = "MESHGATE_ADMIN_LISTEN", value_name = "ADDR", help_heading = "Admin")]
    pub admin_listen: Option<SocketAddr>,
    /// [admin.socket] Also serve the admin endpoints on this Unix socket
    #[arg(long, env = "MESHGATE_ADMIN_SOCKET", value_name = "PATH", help_heading = "Admin")]
    pub admin_socket: Option<PathBuf>,

    /// [file.path] Routes file to serve and watch
    #[arg(long, env = "MESHGATE_ROUTES", value_name = "FILE", help_heading = "Routes file")]
    pub routes: Option<PathBuf>,
    /// [file.poll_interval] How often the routes file is checked [default: 200ms]
    #[arg(long, env = "MESHGATE_ROUTES_POLL_INTERVAL", value_name = "DURATION", value_parser = duration, help_heading = "Routes file")]
    pub routes_poll_interval: Option<Duration>,

    /// [docker.mode] auto (on if DOCKER_HOST is set or the socket exists), on or off [default: auto]
    #[arg(long = "docker", env = "MESHGATE_DOCKER", value_name = "MODE", help_heading = "Docker discovery")]
    pub docker_mode: Option<DockerMode>,
    /// [docker.endpoint] Engine address; default: DOCKER_HOST, else unix:///var/run/docker.sock
    #[arg(long, env = "MESHGATE_DOCKER_ENDPOINT", value_name = "URL", help_heading = "Docker discovery")]
    pub docker_endpoint: Option<String>,
    /// [docker.expose_by_default] Route containers that did not opt in [default: false]
    #[arg(long, env = "MESHGATE_EXPOSE_BY_DEFAULT", value_name = "BOOL", help_heading = "Docker discovery")]
    pub expose_by_default: Option<bool>,
    /// [docker.default_domain] With expose_by_default: `<name>.<domain>` for workloads without a host
    #[arg(long, env = "MESHGATE_DEFAULT_DOMAIN", value_name = "DOMAIN", help_heading = "Docker discovery")]
    pub default_domain: Option<String>,
    /// [docker.network] Network to reach tasks on when a workload names none
    #[arg(long, env = "MESHGATE_DOCKER_NETWORK", value_name = "NAME", help_heading = "Docker discovery")]
    pub docker_network: Option<String>,
    /// [docker.debounce] Events closer than this make one update [default: 100ms]
    #[arg(long, env = "MESHGATE_DOCKER_DEBOUNCE", value_name = "DURATION", value_parser = duration, help_heading = "Docker discovery")]
    pub docker_debounce: Option<Duration>,
    /// [docker.resync_interval] Full resync period [default: 10s]
    #[arg(long, env = "MESHGATE_DOCKER_RESYNC_INTERVAL", value_name = "DURATION", value_parser = duration, help_heading = "Docker discovery")]
    pub docker_resync_interval: Option<Duration>,

    /// [dns.listen] Run mesh-dns on this address, UDP and TCP (e.g. 0.0.0.0:53)
    #[arg(long, env = "MESHGATE_DNS_LISTEN", value_name = "ADDR", help_heading = "DNS")]
    pub dns_listen: Option<SocketAddr>,
    /// [dns.domain] Cluster domain [default: mesh.internal]
    #[arg(long, env = "MESHGATE_DNS_DOMAIN", value_name = "DOMAIN", help_heading = "DNS")]
    pub dns_domain: Option<String>,
    /// [dns.ttl] TTL of local answers [default: 5s]
    #[arg(long, env = "MESHGATE_DNS_TTL", value_name = "DURATION", value_parser = duration, help_heading = "DNS")]
    pub dns_ttl: Option<Duration>,
    /// [dns.upstreams] Comma-separated resolvers (IP:port) for other names [default: /etc/resolv.conf]
    #[arg(
        long,
        env = "MESHGATE_DNS_UPSTREAMS",
        value_name = "ADDR,...",
        value_delimiter = ',',
        help_heading = "DNS"
    )]
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    /// [dns.upstream_timeout] Forwarded queries answer SERVFAIL after this [default: 2s]
    #[arg(long, env = "MESHGATE_DNS_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = duration, help_heading = "DNS")]
    pub dns_upstream_timeout: Option<Duration>,
    /// [dns.cache_size] Forwarded answers cached at most [default: 10000]
    #[arg(long, env = "MESHGATE_DNS_CACHE_SIZE", value_name = "N", help_heading = "DNS")]
    pub dns_cache_size: Option<usize>,
    /// [dns.recursion_networks] Comma-separated clients allowed to have names forwarded
    #[arg(
        long,
        env = "MESHGATE_DNS_RECURSION_NETWORKS",
        value_name = "CIDR,...",
        value_delimiter = ',',
        help_heading = "DNS"
    )]
    pub dns_recursion_networks: Option<Vec<IpNet>>,
    /// [dns.answer_routed_hosts] Answer routed HTTP host names with node addresses [default: false]
    #[arg(long, env = "MESHGATE_DNS_ANSWER_ROUTED_HOSTS", value_name = "BOOL", help_heading = "DNS")]
    pub dns_answer_routed_hosts: Option<bool>,
    /// [dns.node_addresses] Comma-separated addresses for routed host names [default: Swarm nodes]
    #[arg(
        long,
        env = "MESHGATE_DNS_NODE_ADDRESSES",
        value_name = "IP,...",
        value_delimiter = ',',
        help_heading = "DNS"
    )]
    pub dns_node_addresses: Option<Vec<std::net::IpAddr>>,

    /// [whoami.listen] Run the whoami demo backend on this address
    #[arg(long, env = "MESHGATE_WHOAMI_LISTEN", value_name = "ADDR", help_heading = "Demo")]
    pub whoami_listen: Option<SocketAddr>,
    /// [whoami.name] The name the demo backend answers with [default: whoami]
    #[arg(long, env = "MESHGATE_WHOAMI_NAME", value_name = "NAME", help_heading = "Demo")]
    pub whoami_name: Option<String>,

    /// [log.format] human or json [default: human]
    #[arg(long, env = "MESHGATE_LOG_FORMAT", value_name = "FORMAT", help_heading = "Logging")]
    pub log_format: Option<LogFormat>,
    /// [log.level] Filter such as `info` or `meshgate=debug` [default: info]
    #[arg(long, env = "MESHGATE_LOG_LEVEL", value_name = "FILTER", help_heading = "Logging")]
    pub log_level: Option<String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 2s or 1m)"))
}

impl Overrides {
    /// Applies every override that was given.
    pub fn apply(self, c: &mut Config) {
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        let p = &mut c.proxy;
        set(&mut p.http_listen, self.http_listen);
        set(&mut p.trusted_networks, self.trusted_networks);
        set(&mut p.default_host, self.default_host.map(Some));
        set(&mut p.connect_timeout, self.connect_timeout);
        set(&mut p.request_head_timeout, self.request_head_timeout);
        set(&mut p.idle_timeout, self.idle_timeout);
        set(&mut p.upstream_response_timeout, self.upstream_response_timeout);
        set(&mut p.shutdown_grace, self.shutdown_grace);
        set(&mut p.max_header_bytes, self.max_header_bytes);
        set(&mut p.max_headers, self.max_headers);
        set(&mut p.eject_base, self.eject_base);
        set(&mut p.eject_max, self.eject_max);
        set(&mut p.reuse_port, self.reuse_port);
        let k = &mut c.cluster;
        set(&mut k.role, self.cluster_role);
        set(&mut k.listen, self.cluster_listen);
        set(&mut k.hop_listen, self.cluster_hop_listen);
        set(&mut k.peers, self.cluster_peers);
        set(&mut k.secret_file, self.cluster_secret_file);
        set(&mut k.state_file, self.cluster_state_file.map(Some));
        set(&mut k.timeout, self.cluster_timeout);
        set(&mut c.admin.listen, self.admin_listen);
        set(&mut c.admin.socket, self.admin_socket.map(Some));
        let t = &mut c.tls;
        set(&mut t.https_listen, self.https_listen.map(Some));
        set(&mut t.certs_dir, self.certs_dir.map(Some));
        set(&mut t.unknown_names, self.unknown_names);
        set(&mut t.poll_interval, self.certs_poll_interval);
        set(&mut t.session_resumption, self.tls_session_resumption);
        // Empty means unset (a stack file passes `${MESHGATE_MESH_UPLINK:-}`).
        set(&mut c.mesh.uplink, self.mesh_uplink.filter(|u| !u.is_empty()).map(Some));
        set(&mut c.mesh.node_address, self.mesh_node_address.map(Some));
        set(&mut c.mesh.node_name, self.mesh_node_name.map(Some));
        set(&mut c.mesh.drain, self.mesh_drain);
        set(&mut c.mesh.pin_dir, self.mesh_pin_dir.map(Some));
        let a = &mut c.acme;
        set(&mut a.enabled, self.acme_enabled);
        set(&mut a.directory, self.acme_directory);
        set(&mut a.email, self.acme_email.map(Some));
        set(&mut a.storage_dir, self.acme_storage_dir);
        set(&mut a.challenge, self.acme_challenge);
        set(&mut a.fallback, self.acme_fallback);
        set(&mut a.trust_roots, self.acme_trust_roots.map(Some));
        set(&mut a.eab_kid, self.acme_eab_kid.map(Some));
        set(&mut a.eab_hmac_key, self.acme_eab_hmac_key.map(Some));
        set(&mut a.renew_before, self.acme_renew_before.map(Some));
        set(&mut c.file.path, self.routes.map(Some));
        set(&mut c.file.poll_interval, self.routes_poll_interval);
        let d = &mut c.docker;
        set(&mut d.mode, self.docker_mode);
        set(&mut d.endpoint, self.docker_endpoint.map(Some));
        set(&mut d.expose_by_default, self.expose_by_default);
        set(&mut d.default_domain, self.default_domain.map(Some));
        set(&mut d.network, self.docker_network.map(Some));
        set(&mut d.debounce, self.docker_debounce);
        set(&mut d.resync_interval, self.docker_resync_interval);
        let n = &mut c.dns;
        set(&mut n.listen, self.dns_listen.map(Some));
        set(&mut n.domain, self.dns_domain);
        set(&mut n.ttl, self.dns_ttl);
        set(&mut n.upstreams, self.dns_upstreams);
        set(&mut n.upstream_timeout, self.dns_upstream_timeout);
        set(&mut n.cache_size, self.dns_cache_size);
        set(&mut n.recursion_networks, self.dns_recursion_networks);
        set(&mut n.answer_routed_hosts, self.dns_answer_routed_hosts);
        set(&mut n.node_addresses, self.dns_node_addresses);
        set(&mut c.whoami.listen, self.whoami_listen.map(Some));
        set(&mut c.whoami.name, self.whoami_name);
        set(&mut c.log.format, self.log_format);
        set(&mut c.log.level, self.log_level);
    }
}
