//! Wires the parts together: state hub, providers, route compiler, listeners, shutdown.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::acme::{self, AcmeConfig};
use crate::admin::{self, AdminState};
use crate::cluster;
use crate::config::Config;
use crate::dns::{self, DnsConfig};
use crate::http::access_log::AccessLog;
use crate::http::endpoint::Reach;
use crate::http::proxy::{Https, Proxy};
use crate::http::server::{self, Listener};
use crate::metrics::Metrics;
use crate::net;
use crate::provider::docker;
use crate::provider::file::{self, RoutesError};
use crate::readiness::Readiness;
use crate::state::StateHub;
use crate::tls::{self, CertResolver, CertSource, UnknownNames};
use crate::whoami;

/// The routes of the bundled example: `whoami.localhost` to the built-in whoami backend.
pub const EXAMPLE_ROUTES: &str = include_str!("../../config/routes.example.toml");
/// Where the bundled example runs the whoami backend (the example routes point there).
pub const EXAMPLE_WHOAMI: &str = "127.0.0.1:8001";

/// Where the routes come from. Several providers can run at once; their states are merged.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The routes file, watched.
    pub file: Option<PathBuf>,
    /// Docker discovery with the `[docker]` settings.
    pub docker: bool,
    /// The bundled example (whoami), for a first run or a machine without providers.
    pub example: bool,
}

impl Sources {
    #[must_use]
    pub fn file(path: PathBuf) -> Self {
        Self { file: Some(path), ..Self::default() }
    }

    #[must_use]
    pub fn example() -> Self {
        Self { example: true, ..Self::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} for {}: {source} (is another program using it? choose another address: {})", .setting.0, setting_names(.setting.1))]
    Bind { setting: (&'static str, &'static str), addr: SocketAddr, source: std::io::Error },
    #[error("cannot serve the admin endpoints on the socket {path}: {source} (set admin.socket to a writable place)")]
    BindSocket { path: PathBuf, source: std::io::Error },
    #[error("routes file: {0}")]
    Routes(#[from] RoutesError),
    #[error("bundled example routes are broken: {0}")]
    Example(RoutesError),
    #[error("access log: {0}")]
    AccessLog(#[from] crate::http::access_log::StartError),
    #[error("admin.users_file: {0} (write it with `htpasswd -B -c FILE USER`)")]
    AdminUsers(String),
}

/// A running agent; dropping it does not stop it, call [`RunningAgent::shutdown`].
pub struct RunningAgent {
    pub http_addr: SocketAddr,
    /// The HTTPS listener's address, when there is one.
    pub https_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// mesh-dns's address (UDP and TCP), when it runs.
    pub dns_addr: Option<SocketAddr>,
    pub hub: Arc<StateHub>,
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<Proxy>,
    pub readiness: Arc<Readiness>,
    shutdown: watch::Sender<bool>,
    shutdown_delay: std::time::Duration,
    reload: watch::Sender<()>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Re-reads what can be re-read without a restart (the routes file, the certificate
    /// directories) at once, changed or not: what SIGHUP does.
    pub fn reload(&self) {
        tracing::info!("reloading the routes file and the certificate directories (SIGHUP)");
        self.reload.send_replace(());
    }

    /// Reopens the access log's file (SIGUSR1, after logrotate moved it away).
    pub fn reopen_logs(&self) {
        if let Some(log) = self.proxy.access_log() {
            tracing::info!("SIGUSR1: reopening the access log");
            log.reopen();
        } else {
            tracing::info!("SIGUSR1: no access log to reopen (the agent's own log goes to stderr, which its owner rotates)");
        }
    }

    /// Says "not ready" (`/readyz`) for `proxy.shutdown_delay` while still serving, then
    /// stops accepting, lets in-flight requests finish (up to `proxy.shutdown_grace`), stops
    /// the rest.
    pub async fn shutdown(self) {
        let delay = self.shutdown_delay;
        tracing::info!(?delay, "stopping: /readyz says not ready; the listeners close after the delay");
        self.readiness.set(
            "agent",
            false,
            format!("stopping: the listeners close {delay:?} after SIGTERM, then requests in flight finish"),
        );
        tokio::time::sleep(delay).await;
        self.shutdown.send_replace(true);
        for server in self.servers {
            let _ = server.await;
        }
        for task in self.background {
            task.abort();
        }
    }
}

/// `key`, its flag and its variable, for an error that asks to change it.
fn setting_names(key: &str) -> String {
    crate::settings::find(key).map_or_else(
        || key.to_owned(),
        |s| format!("{key} in the config file, --{} or {}", s.flag(), s.env()),
    )
}

/// `setting`: what listens there, and the key of its address.
fn bind(
    setting: (&'static str, &'static str),
    addr: SocketAddr,
    reuse_port: bool,
) -> Result<TcpListener, StartError> {
    net::reusable_listener(addr, reuse_port).map_err(|source| StartError::Bind { setting, addr, source })
}

/// Claims an address for a proxy listener, which listens once the state is complete.
fn claim(
    setting: (&'static str, &'static str),
    addr: SocketAddr,
    reuse_port: bool,
) -> Result<net::Bound, StartError> {
    net::Bound::new(addr, reuse_port).map_err(|source| StartError::Bind { setting, addr, source })
}

/// Starts every part. Returns once the listeners are bound and the first routes compiled.
/// Async although it never waits: the listeners register with the running Tokio runtime.
#[allow(clippy::unused_async)]
pub async fn start(cfg: Config, sources: Sources) -> Result<RunningAgent, StartError> {
    let Config {
        proxy: proxy_cfg,
        admin: admin_cfg,
        routes: file_cfg,
        docker: docker_cfg,
        dns: dns_cfg,
        tls: tls_cfg,
        acme: acme_cfg,
        mesh: mesh_cfg,
        cluster: cluster_cfg,
        whoami: whoami_cfg,
        log: log_cfg,
    } = cfg;
    // Checked before anything starts: a dashboard meant for its users is never served open.
    let viewers = admin::Viewers::load(admin_cfg.users_file.as_deref()).map_err(StartError::AdminUsers)?;
    let (reload, reloads) = watch::channel(());
    let core = Core {
        hub: Arc::new(StateHub::new()),
        metrics: Arc::new(Metrics::new()),
        readiness: Arc::new(Readiness::default()),
        reloads,
        reuse_port: proxy_cfg.reuse_port,
    };
    let (hub, metrics, readiness, reuse_port) =
        (core.hub.clone(), core.metrics.clone(), core.readiness.clone(), core.reuse_port);
    crate::metrics::register_collector(
        &metrics.registry,
        crate::readiness::ReadyCollector::new(readiness.clone()),
    );
    let mut background = Vec::new();
    let whoami = start_whoami(&whoami_cfg, sources.example, &mut background)?;

    let http_listener = claim(("HTTP", "proxy.http_listen"), proxy_cfg.http_listen, reuse_port)?;
    let http_addr = http_listener.local_addr().expect("bound socket has an address");
    let admin_listener = bind(("the admin endpoints", "admin.listen"), admin_cfg.listen, reuse_port)?;
    let admin_addr = admin_listener.local_addr().expect("bound socket has an address");

    start_files(&sources, &file_cfg, whoami, &core, &mut background)?;
    let dns = dns_cfg.listen.and_then(|listen| start_dns_or_report(listen, &dns_cfg, &core, &mut background));
    let on_demand_cfg = acme_cfg.clone();
    let (https, acme) = start_https(&tls_cfg, acme_cfg, dns.as_ref(), &dns_cfg, &core, &mut background)?;
    let acme_manager = acme.as_ref().and_then(|(manager, _)| manager.as_ref().ok()).cloned();
    let acme_inventory = acme_manager.as_ref().map(|m| m.inventory());
    let relay = acme.as_ref().map(|(_, share)| share.relay.clone());
    let (node_name, (shutdown, shutdown_rx)) = (this_node(&mesh_cfg), watch::channel(false));
    let stopping = (shutdown_rx.clone(), proxy_cfg.shutdown_grace);
    let mut cluster = start_cluster(cluster_cfg, node_name.clone(), acme, stopping, &core, &mut background);
    if sources.docker {
        hub.expect(docker::NAME);
        let parts = (hub.clone(), metrics.clone(), readiness.clone(), cluster.docker.clone());
        background.push(tokio::spawn(docker::run(docker_cfg, parts.0, parts.1, parts.2, parts.3)));
    }
    let https_addr = https.as_ref().map(|(l, _)| l.local_addr().expect("bound socket has an address"));
    let reach = Reach { node: node_name.clone(), hop: cluster.hop.clone() };
    let access = AccessLog::start(&log_cfg, metrics.access_log_dropped.clone())?;
    let proxy = start_proxy(&proxy_cfg, https.as_ref(), reach, access, &core, &mut background);
    let dns_addr = dns.map(|(addr, _)| addr);
    let mesh_view = start_mesh(mesh_cfg, &core, &mut background);

    let admin_state = AdminState {
        certificates: https.as_ref().map(|(_, resolver)| resolver.clone()),
        acme: acme_inventory,
        viewers,
        head_timeout: proxy_cfg.request_head_timeout,
        hub: hub.clone(),
        proxy: proxy.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        mesh: mesh_view,
    };
    start_admin(admin_listener, admin_cfg.socket.as_deref(), admin_state, &mut background)?;

    let on_demand = on_demand(&on_demand_cfg, acme_manager.zip(relay), https.as_ref(), &cluster.issuer);
    let mut servers =
        start_servers(http_listener, https, on_demand, &proxy, &proxy_cfg, &tls_cfg, &core, &shutdown_rx);
    servers.extend(cluster.hop_server.take());
    let off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(http = %http_addr, https = %off(https_addr), admin = %admin_addr, dns = %off(dns_addr), "meshgate is serving");
    Ok(RunningAgent {
        http_addr,
        https_addr,
        admin_addr,
        dns_addr,
        hub,
        metrics,
        proxy,
        readiness,
        shutdown,
        shutdown_delay: proxy_cfg.shutdown_delay,
        reload,
        servers,
        background,
    })
}

/// The proxy, following the state (its route table is compiled from every new one).
fn start_proxy(
    cfg: &crate::config::ProxyConfig,
    https: Option<&HttpsParts>,
    reach: Reach,
    access: Option<Arc<AccessLog>>,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Arc<Proxy> {
    let https =
        https.map(|(l, r)| Https { port: l.local_addr().map_or(443, |a| a.port()), certs: r.clone() });
    let proxy = Arc::new(Proxy::new(cfg.clone(), core.metrics.clone(), https, access));
    background.push(proxy.clone().follow(core.hub.clone(), cfg.default_host.clone(), reach));
    proxy
}

/// mesh-dns; one that cannot bind (port 53 held by the host's resolver) is reported and
/// left off: it must not take HTTP down with it, nor make a health check restart the agent.
fn start_dns_or_report(
    listen: SocketAddr,
    cfg: &DnsConfig,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Option<DnsParts> {
    match start_dns(listen, cfg.clone(), core, background) {
        Ok(parts) => Some(parts),
        Err(e) => {
            tracing::error!("mesh-dns is off: {e}");
            core.readiness.set("dns", true, format!("off: {e}"));
            None
        }
    }
}

/// The L4 mesh when an uplink is set; its port table in force, for the admin endpoints.
fn start_mesh(
    cfg: crate::mesh::MeshConfig,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Arc<crate::mesh::MeshView> {
    let view = Arc::new(crate::mesh::MeshView::default());
    if cfg.uplink.is_some() {
        let parts = (core.hub.clone(), core.metrics.registry.clone(), core.readiness.clone(), view.clone());
        background.push(tokio::spawn(crate::mesh::run(cfg, parts.0, parts.1, parts.2, parts.3)));
    }
    view
}

/// This node's name as tasks name their node: `mesh.node_name`, else the host name.
fn this_node(cfg: &crate::mesh::MeshConfig) -> String {
    let hostname =
        || std::fs::read_to_string("/etc/hostname").map_or_else(|_| "local".into(), |h| h.trim().to_owned());
    cfg.node_name.clone().unwrap_or_else(hostname)
}

/// The cluster feed (which says whether this agent orders certificates) and the ACME manager
/// that waits on it.
fn start_cluster(
    cfg: cluster::ClusterConfig,
    node: String,
    acme: Option<AcmeParts>,
    shutdown: (watch::Receiver<bool>, std::time::Duration),
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> cluster::Handles {
    let parts = cluster::Parts {
        hub: core.hub.clone(),
        readiness: core.readiness.clone(),
        registry: core.metrics.registry.clone(),
        certs: acme.as_ref().map(|(_, share)| share.clone()),
        node,
        shutdown,
    };
    let handles = cluster::start(cfg, parts, background);
    match acme.map(|(manager, _)| manager) {
        Some(Ok(manager)) => {
            background.push(tokio::spawn(manager.run(core.hub.clone(), handles.issuer.clone())));
        }
        Some(Err(why)) => {
            tracing::error!("acme: {why}");
            core.readiness.set("acme", false, why);
        }
        None => {}
    }
    handles
}

/// On-demand TLS, where `acme.on_demand_ask` is set and ACME runs.
fn on_demand(
    cfg: &AcmeConfig,
    acme: Option<(Arc<acme::Manager>, Arc<acme::on_demand::Relay>)>,
    https: Option<&HttpsParts>,
    issuer: &watch::Receiver<bool>,
) -> Option<Arc<acme::on_demand::OnDemand>> {
    let ask = cfg.on_demand_ask.as_ref()?.parse().ok()?;
    let (Some((manager, relay)), Some((_, resolver))) = (acme, https) else {
        tracing::warn!("acme.on_demand_ask is set but ACME does not run here (it needs tls.https_listen, acme.enabled and a usable acme.storage_dir): no on-demand certificates");
        return None;
    };
    tracing::info!(ask = %cfg.on_demand_ask.as_deref().unwrap_or_default(), "acme: on-demand TLS on");
    let on_demand = Arc::new(acme::on_demand::OnDemand::new(
        ask,
        manager,
        resolver.clone(),
        issuer.clone(),
        cfg.on_demand_concurrent,
        cfg.on_demand_per_minute,
        relay.clone(),
    ));
    relay.serve_with(&on_demand);
    Some(on_demand)
}

/// The built-in whoami backend, where asked for (and always with the bundled example): the
/// address it listens on.
fn start_whoami(
    cfg: &crate::config::WhoamiConfig,
    example: bool,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, StartError> {
    let listen = match cfg.listen {
        Some(addr) => addr,
        None if example => EXAMPLE_WHOAMI.parse().expect("valid address"),
        None => return Ok(None),
    };
    let listener = bind(("the whoami demo backend", "whoami.listen"), listen, false)?;
    let addr = listener.local_addr().unwrap_or(listen);
    tracing::info!(%addr, "whoami demo backend listening");
    background.push(tokio::spawn(whoami::serve(listener, cfg.name.clone())));
    Ok(Some(addr))
}

/// The bundled example's routes, to the whoami backend where it listens (`whoami.listen`
/// moves it from [`EXAMPLE_WHOAMI`]; one on every address is reached on loopback).
fn example_routes(whoami: Option<SocketAddr>) -> Result<crate::state::MeshState, RoutesError> {
    let mut state = file::parse(std::path::Path::new("routes.example.toml"), EXAMPLE_ROUTES, "example")?;
    if let Some(mut addr) = whoami {
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
        }
        for service in &mut state.services {
            let service = Arc::make_mut(service);
            for task in &mut service.tasks {
                (task.address, task.port) = (addr.ip(), None);
            }
            for route in &mut service.http {
                route.port = addr.port();
            }
        }
    }
    Ok(state)
}

/// The routes file (read now, refused at start when broken, then watched) and the bundled
/// example.
fn start_files(
    sources: &Sources,
    cfg: &crate::config::RoutesConfig,
    whoami: Option<SocketAddr>,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<(), StartError> {
    if let Some(path) = &sources.file {
        let watcher = file::load_and_watch(
            path.clone(),
            cfg.poll_interval,
            core.hub.clone(),
            core.metrics.clone(),
            core.reloads.clone(),
        )?;
        core.readiness.set(file::NAME, true, format!("watching {}", path.display()));
        background.push(watcher);
    }
    if sources.example {
        let state = example_routes(whoami).map_err(StartError::Example)?;
        core.hub.publish("example", state);
        core.readiness.set("example", true, "bundled example routes (whoami.localhost)");
    }
    Ok(())
}

/// The HTTP and HTTPS servers, which drain when `shutdown_rx` turns true. They listen once every
/// source has given its first state (at once when it is already so, as with a routes file),
/// or after [`crate::state::COMPLETE_PATIENCE`]: before, a new agent sharing the port with the previous
/// one would answer 404 for routes it does not know yet.
#[allow(clippy::too_many_arguments, reason = "the parts of the agent that its servers share")]
fn start_servers(
    http: net::Bound,
    https: Option<HttpsParts>,
    on_demand: Option<Arc<acme::on_demand::OnDemand>>,
    proxy: &Arc<Proxy>,
    proxy_cfg: &crate::config::ProxyConfig,
    tls_cfg: &tls::TlsConfig,
    core: &Core,
    shutdown_rx: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let port = |b: &net::Bound| b.local_addr().expect("bound socket has an address").port();
    let mut listeners = vec![(
        "http",
        Listener { port: port(&http), tls: None, on_demand: None, strict: None, client_auth: None },
        http,
    )];
    if let Some((bound, resolver)) = https {
        let config = tls::server_config(resolver.clone(), tls_cfg.session_resumption);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let strict = tls::tls13_server_config(resolver.clone(), tls_cfg.session_resumption);
        let client_auth = Some(Arc::new(tls::client_auth::ClientAuthConfigs::new(resolver.clone())));
        let strict = Some((tokio_rustls::TlsAcceptor::from(Arc::new(strict)), resolver));
        let listener = Listener { port: port(&bound), tls: Some(acceptor), on_demand, strict, client_auth };
        listeners.push(("https", listener, bound));
    }
    let complete_now = core.hub.pending().is_empty();
    let servers = listeners
        .into_iter()
        .map(|(name, listener, bound)| {
            let (proxy, cfg, shutdown, hub, readiness) =
                (proxy.clone(), proxy_cfg.clone(), shutdown_rx.clone(), core.hub.clone(), core.readiness.clone());
            let listen = move || match bound.listen() {
                Ok(l) => {
                    readiness.set(name, true, format!("listening on port {}", listener.port));
                    Some(server::serve(l, listener, proxy, cfg, shutdown))
                }
                Err(e) => {
                    tracing::error!("cannot listen for {name}: {e}");
                    readiness.set(name, false, format!("cannot listen: {e}"));
                    None
                }
            };
            if complete_now {
                let serve = listen();
                return tokio::spawn(async move {
                    if let Some(serve) = serve {
                        serve.await;
                    }
                });
            }
            core.readiness.set(name, false, "waiting for the first state of every source");
            tokio::spawn(async move {
                if tokio::time::timeout(crate::state::COMPLETE_PATIENCE, hub.complete()).await.is_err() {
                    tracing::warn!(waiting_for = %hub.pending().into_iter().collect::<Vec<_>>().join(","), "serving {name} before every source answered");
                }
                if let Some(serve) = listen() {
                    serve.await;
                }
            })
        })
        .collect();
    servers
}

/// The admin endpoints on their TCP listener, and on the Unix socket if one is configured.
fn start_admin(
    listener: TcpListener,
    socket: Option<&std::path::Path>,
    state: AdminState,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<(), StartError> {
    if let Some(path) = socket {
        // A socket file left by an agent that died would refuse the bind.
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)
            .map_err(|source| StartError::BindSocket { path: path.to_owned(), source })?;
        background.push(tokio::spawn(admin::serve(unix, state.clone())));
    }
    background.push(tokio::spawn(admin::serve(listener, state)));
    Ok(())
}

/// What most parts are started with.
struct Core {
    hub: Arc<StateHub>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Changes on SIGHUP: watchers of files re-read them at once.
    reloads: watch::Receiver<()>,
    /// Listeners share their address with the next agent (see [`net::reusable_socket`]).
    reuse_port: bool,
}

/// What ACME left for later: the manager (started once the cluster says whether this agent
/// orders) and the store and challenges the cluster feed shares.
type AcmeParts = (Result<Arc<acme::Manager>, acme::RootsError>, cluster::CertShare);
/// The HTTPS listener and the resolver its handshakes ask.
type HttpsParts = (net::Bound, Arc<CertResolver>);
/// mesh-dns: where it listens, and its handler (for the ACME challenge records).
type DnsParts = (SocketAddr, Arc<mesh_dns::MeshDns>);

/// HTTPS: a listener, a resolver swapped whole on certificate changes, the fallback, and
/// the ACME store feeding the resolver; mesh-dns answers the DNS-01 challenges in progress.
/// `None` without `tls.https_listen`.
fn start_https(
    tls_cfg: &tls::TlsConfig,
    acme_cfg: AcmeConfig,
    dns: Option<&DnsParts>,
    dns_cfg: &DnsConfig,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<(Option<HttpsParts>, Option<AcmeParts>), StartError> {
    let Some(addr) = tls_cfg.https_listen else {
        background.push(tokio::spawn(warn_unserved_acme_wishes(core.hub.clone(), acme_cfg.enabled)));
        return Ok((None, None));
    };
    let listener = claim(("HTTPS", "tls.https_listen"), addr, core.reuse_port)?;
    let fallback = (tls_cfg.unknown_names == UnknownNames::SelfSigned).then(CertResolver::self_signed);
    let resolver = Arc::new(CertResolver::new(fallback));
    crate::metrics::register_collector(&core.metrics.registry, tls::ExpiryCollector::new(resolver.clone()));
    if let Some((_, handler)) = dns {
        let follow = dns::follow_challenges(resolver.challenges.clone(), handler.clone(), dns_cfg.clone());
        background.push(tokio::spawn(follow));
    }
    if let Some(dir) = &tls_cfg.certs_dir {
        // Loaded before serving, so the first handshake already sees them.
        let loaded = tls::load_into(dir, &resolver, CertSource::Files, None);
        background.push(tokio::spawn(tls::watch_dir(
            dir.clone(),
            tls_cfg.poll_interval,
            resolver.clone(),
            CertSource::Files,
            loaded,
            Arc::default(),
            core.reloads.clone(),
        )));
    }
    let acme = if acme_cfg.enabled {
        start_acme(acme_cfg, tls_cfg.poll_interval, &resolver, dns.map(|(addr, _)| *addr), core, background)
    } else {
        background.push(tokio::spawn(warn_unserved_acme_wishes(core.hub.clone(), false)));
        None
    };
    Ok((Some((listener, resolver)), acme))
}

/// Opens the ACME store, serves what it holds before contacting the CA and watches it
/// (other agents sharing it, and the cluster feed, write there too). A store that cannot be
/// opened leaves HTTPS running with the certificates it has, says so in the log and in the
/// `acme` component of `/readyz`.
fn start_acme(
    cfg: AcmeConfig,
    poll: std::time::Duration,
    resolver: &Arc<CertResolver>,
    dns_addr: Option<SocketAddr>,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Option<AcmeParts> {
    // Checked with the configuration; a TSIG secret file that went away since is reported.
    let (dns01, dns01_off) = match acme::Dns01::new(&cfg, dns_addr) {
        Ok(dns01) => (dns01, String::new()),
        Err(e) => {
            tracing::error!("acme: DNS-01 is off: {e}");
            (None, format!("; DNS-01 off: {e}"))
        }
    };
    let dir = cfg.storage_dir.clone();
    let store = match acme::store::Store::open(&dir) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            // Not a readiness failure: a health check that fails would restart the agent
            // and take plain HTTP and the stored certificates down with it.
            let why = format!("cannot use acme.storage_dir {}: {e} (create it, make it writable, or point acme.storage_dir elsewhere); no certificates will be ordered", dir.display());
            tracing::error!("{why}");
            core.readiness.set("acme", true, format!("off: {why}"));
            return None;
        }
    };
    let loaded = tls::load_into(&store.certs_dir(), resolver, CertSource::Acme, None);
    let reload = Arc::new(tokio::sync::Notify::new());
    background.push(tokio::spawn(tls::watch_dir(
        store.certs_dir(),
        poll,
        resolver.clone(),
        CertSource::Acme,
        loaded,
        reload.clone(),
        core.reloads.clone(),
    )));
    let detail = format!("ordering from {}, stored in {}{dns01_off}", cfg.directory_url(), dir.display());
    core.readiness.set("acme", true, &detail);
    let share = cluster::CertShare {
        store: store.clone(),
        challenges: resolver.challenges.clone(),
        reload: reload.clone(),
        relay: acme::on_demand::Relay::new(),
    };
    let manager =
        acme::Manager::new(cfg, store, resolver.challenges.clone(), core.metrics.clone(), reload, dns01)
            .map(|m| Arc::new(m.reporting_to(core.readiness.clone(), detail)));
    Some((manager, share))
}

/// Routes that ask for a certificate while ACME cannot run: say so once per host.
async fn warn_unserved_acme_wishes(hub: Arc<StateHub>, enabled: bool) {
    let mut told = std::collections::HashSet::new();
    let mut changes = hub.subscribe();
    loop {
        for name in
            acme::manager::wanted_certificates(&hub.load().state, usize::MAX, true).into_values().flatten()
        {
            if told.insert(name.clone()) {
                let why = if enabled {
                    "there is no HTTPS listener (set tls.https_listen, e.g. 0.0.0.0:443)"
                } else {
                    "acme.enabled is false"
                };
                tracing::warn!(host = %name, "a route asks for a certificate but {why}; it is served over plain HTTP only");
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// UDP and TCP on one port. With port 0, the kernel picks the UDP port, which TCP may have
/// taken already: a few picks are tried.
fn bind_dns(
    listen: SocketAddr,
    reuse_port: bool,
) -> Result<(tokio::net::UdpSocket, TcpListener), StartError> {
    let mut tries = if listen.port() == 0 { 8 } else { 1 };
    loop {
        let udp = net::reusable_socket(listen, socket2::Type::DGRAM, reuse_port)
            .and_then(|s| tokio::net::UdpSocket::from_std(s.into()))
            .map_err(|source| StartError::Bind {
                setting: ("DNS over UDP", "dns.listen"),
                addr: listen,
                source,
            })?;
        let addr = udp.local_addr().expect("bound socket has an address");
        match bind(("DNS over TCP", "dns.listen"), addr, reuse_port) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if tries == 1 => return Err(e),
            Err(_) => tries -= 1,
        }
    }
}

/// Binds mesh-dns (UDP, then TCP on the same port), keeps its zone in step with the hub.
fn start_dns(
    listen: SocketAddr,
    cfg: DnsConfig,
    core: &Core,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<DnsParts, StartError> {
    let Core { hub, metrics, readiness, reuse_port, .. } = core;
    let (udp, tcp) = bind_dns(listen, *reuse_port)?;
    let addr = udp.local_addr().expect("bound socket has an address");
    let upstreams = if cfg.upstreams.is_empty() {
        mesh_dns::resolv_conf_upstreams(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            addr.port(),
        )
    } else {
        cfg.upstreams.clone()
    };
    if upstreams.is_empty() {
        tracing::warn!("dns: no upstream resolver (dns.upstreams is empty and /etc/resolv.conf names none usable): names that are not local get SERVFAIL");
    }
    let dns_metrics =
        Some(mesh_dns::DnsMetrics::register(&metrics.registry).expect("metric names are unique"));
    let forwarder = mesh_dns::Forwarder::new(upstreams, cfg.upstream_timeout, cfg.cache_size);
    let handler = Arc::new(mesh_dns::MeshDns::new(
        dns::zone_of(&hub.load().state, &cfg),
        forwarder,
        cfg.recursion_networks.clone(),
        cfg.udp_rate_limit,
        dns_metrics,
    ));
    background.push(tokio::spawn(dns::follow(hub.clone(), handler.clone(), cfg)));
    let (tcp_handler, parts_handler) = (handler.clone(), handler.clone());
    background.push(tokio::spawn(async move {
        if let Err(e) = mesh_dns::serve_udp(handler, udp).await {
            tracing::error!("dns server stopped: {e}");
        }
    }));
    // DNS over TCP: accepted here (a pause when accepting fails, no spin at descriptor
    // exhaustion), each connection answered by mesh-dns.
    background.push(tokio::spawn(async move {
        loop {
            let (stream, peer) = net::accept(&tcp, "dns").await;
            tokio::spawn(mesh_dns::serve_connection(tcp_handler.clone(), stream, peer));
        }
    }));
    readiness.set("dns", true, format!("listening on {addr} (UDP and TCP)"));
    tracing::info!(%addr, "mesh-dns listening");
    Ok((addr, parts_handler))
}
