//! The client-facing listener: accepts connections, speaks HTTP/1.1 and h2c (prior
//! knowledge) through hyper's auto builder, enforces the request-head and idle timeouts,
//! and drains on shutdown.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::limits::{self, ConnLimits};
use super::proxy::Proxy;
use crate::config::ProxyConfig;

/// What one client connection is doing, for the head and idle timeouts.
///
/// hyper's own `header_read_timeout` also closes idle keep-alive connections, so one knob
/// would serve two purposes; tracking this ourselves keeps them apart (like nginx's
/// `client_header_timeout` and `keepalive_timeout`) and covers HTTP/2 too.
pub struct ConnActivity {
    /// Whether the connection came in over TLS, and the listener's port as a header value
    /// (for `X-Forwarded-Proto` and `-Port`).
    pub secure: bool,
    pub port_header: HeaderValue,
    /// The client's address and port (for the access log).
    pub peer: std::net::SocketAddr,
    /// The address the client connected to (for a PROXY header to tasks that want one).
    pub local: std::net::SocketAddr,
    /// The client's address, and the same as a header value (made once per connection).
    pub client_ip: IpAddr,
    pub client_ip_header: HeaderValue,
    /// Whether the client is in `proxy.trusted_networks`.
    pub trusted: bool,
    origin: Instant,
    /// Requests whose response is not finished.
    active: AtomicUsize,
    /// When the connection last became idle (ms on `origin`'s clock, +1).
    idle_since: AtomicU64,
    /// When the first byte of a request head arrived on an idle HTTP/1 connection; 0: none.
    head_since: AtomicU64,
    /// HTTP/2 connections have no head-by-head timing (pings and settings are not requests).
    http2: AtomicBool,
    /// The agent is stopping: HTTP/1 responses say `Connection: close`.
    draining: AtomicBool,
    /// What the TLS handshake asked a client certificate for, and whether it got one (set
    /// only when it asked).
    pub client_certificate: std::sync::OnceLock<crate::tls::client_auth::Verified>,
    /// `meshgate_connections_open` of this listener for HTTP/1.1 and HTTP/2: the connection
    /// counts in one of them while it lasts.
    open: [IntGauge; 2],
}

impl Drop for ConnActivity {
    fn drop(&mut self) {
        self.open[usize::from(self.is_http2())].dec();
    }
}

impl ConnActivity {
    fn new(
        (peer, local): (std::net::SocketAddr, std::net::SocketAddr),
        trusted: &[IpNet],
        listener: &Listener,
        open: [IntGauge; 2],
    ) -> Self {
        let client_ip = peer.ip();
        open[0].inc();
        Self {
            open,
            peer,
            local,
            secure: listener.tls.is_some(),
            port_header: HeaderValue::from(listener.port),
            client_ip,
            client_ip_header: HeaderValue::from_str(&client_ip.to_string())
                .expect("an IP is a valid header value"),
            trusted: trusted.iter().any(|n| n.contains(&client_ip)),
            origin: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(1),
            head_since: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            client_certificate: std::sync::OnceLock::new(),
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub(crate) fn request_started(&self) {
        self.head_since.store(0, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
        }
    }

    pub(crate) fn mark_http2(&self) {
        if !self.http2.swap(true, Ordering::Relaxed) {
            self.open[0].dec();
            self.open[1].inc();
        }
    }

    fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn bytes_received(&self) {
        if self.active.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// What the connection's watcher should do now.
    fn verdict(&self, head_timeout: Duration, idle_timeout: Duration) -> Verdict {
        let now = self.now();
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 && now.saturating_sub(head) >= head_timeout.as_millis() as u64 {
            return Verdict::HeadTimeout;
        }
        if head == 0
            && self.active.load(Ordering::Relaxed) == 0
            && now.saturating_sub(self.idle_since.load(Ordering::Relaxed)) >= idle_timeout.as_millis() as u64
        {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

enum Verdict {
    Fine,
    HeadTimeout,
    Idle,
}

/// Builds the hyper connection builder once, from the config.
fn builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(cfg.max_headers)
        .header_read_timeout(None);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    b
}

/// What a listener is: its port, and TLS for HTTPS.
#[derive(Clone)]
pub struct Listener {
    pub port: u16,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// On-demand TLS (`acme.on_demand_ask`): a handshake for a name without a certificate
    /// waits while one is obtained.
    pub on_demand: Option<Arc<crate::acme::on_demand::OnDemand>>,
    /// TLS 1.3 only, for the hosts whose policy asks for it, and what says which those are.
    pub strict: Option<(tokio_rustls::TlsAcceptor, Arc<crate::tls::CertResolver>)>,
    /// The settings for hosts that ask clients for a certificate.
    pub client_auth: Option<Arc<crate::tls::client_auth::ClientAuthConfigs>>,
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and gives in-flight
/// requests up to `cfg.shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    proxy: Arc<Proxy>,
    cfg: ProxyConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&cfg));
    let (drain, stop) = watch::channel(false);
    let mut connections = JoinSet::new();
    let name = if kind.tls.is_some() { "https" } else { "http" };
    let shared = Arc::new(Shared {
        limits: ConnLimits::new(name, cfg.max_connections, cfg.max_connections_per_client, proxy.metrics()),
        open: ["http/1.1", "h2"].map(|p| proxy.metrics().connections_open.with_label_values(&[name, p])),
        handshakes: ["ok", "failed", "timeout"]
            .map(|r| proxy.metrics().tls_handshakes.with_label_values(&[r])),
        proxy,
        builder,
        cfg: cfg.clone(),
        kind,
    });
    loop {
        tokio::select! {
            (stream, peer) = crate::net::accept(&listener, "proxy") => {
                let (shared, stop) = (shared.clone(), stop.clone());
                if cfg.proxy_protocol_networks.iter().any(|n| n.contains(&peer.ip())) {
                    // A balancer in front: the client is the one its header names.
                    connections.spawn(through_balancer(stream, peer, shared, stop));
                    continue;
                }
                let trusted = cfg.trusted_networks.iter().any(|n| n.contains(&peer.ip()));
                match shared.limits.admit(peer.ip(), !trusted) {
                    Ok(admitted) => {
                        connections.spawn(take(stream, peer, admitted, shared, stop));
                    }
                    Err(_) if shared.kind.tls.is_none() => {
                        connections.spawn(refuse(stream));
                    }
                    Err(_) => {}
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut shutdown) => break,
        }
    }
    // Closed before the connections are told to drain: a client told `Connection: close`
    // reconnects to another agent on the port (SO_REUSEPORT), never into this listener's
    // queue, which the kernel resets when it closes.
    drop(listener);
    drain.send_replace(true);
    let open = connections.len();
    tracing::info!(open_connections = open, grace = ?cfg.shutdown_grace, "HTTP listener closed; draining");
    let drained =
        tokio::time::timeout(cfg.shutdown_grace, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(cut = connections.len(), "shutdown grace over; closing the remaining connections");
        connections.shutdown().await;
    }
}

/// Tells a refused plain-HTTP client to come back (503, `Retry-After`), then closes.
/// What every connection of a listener shares.
struct Shared {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    cfg: ProxyConfig,
    kind: Listener,
    limits: Arc<ConnLimits>,
    open: [IntGauge; 2],
    handshakes: [IntCounter; 3],
}

/// A connection from `proxy.proxy_protocol_networks`: its PROXY header read (the client it
/// names counts against the limits), then served; a bad or missing-in-time header closes it.
async fn through_balancer(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let client = match super::proxy_protocol::read_header(&mut stream, shared.cfg.request_head_timeout).await
    {
        Ok(carried) => carried.unwrap_or(peer),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "closed: its PROXY header could not be read");
            return;
        }
    };
    let trusted = shared.cfg.trusted_networks.iter().any(|n| n.contains(&client.ip()));
    match shared.limits.admit(client.ip(), !trusted) {
        Ok(admitted) => take(stream, client, admitted, shared, stop).await,
        Err(_) if shared.kind.tls.is_none() => refuse(stream).await,
        Err(_) => {}
    }
}

/// Serves an admitted connection from `client`: the TLS handshake first on HTTPS.
async fn take(
    stream: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    admitted: limits::Admitted,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let _admitted = admitted;
    let _ = stream.set_nodelay(true);
    let s = &*shared;
    let local =
        stream.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], s.kind.port)));
    let activity =
        Arc::new(ConnActivity::new((client, local), &s.cfg.trusted_networks, &s.kind, s.open.clone()));
    let (proxy, builder, cfg) = (s.proxy.clone(), s.builder.clone(), s.cfg.clone());
    let Some(acceptor) = &s.kind.tls else {
        return serve_connection(stream, activity, proxy, builder, cfg, stop).await;
    };
    // The handshake counts as part of the request head: same deadline (an on-demand order
    // has its own).
    let handshake = async {
        let strict = s.kind.strict.as_ref().filter(|(_, resolver)| resolver.any_tls13_only());
        let clients = s.kind.client_auth.is_some() && s.proxy.table.load().asks_client_certificates();
        if s.kind.on_demand.is_none() && strict.is_none() && !clients {
            tokio::time::timeout(s.cfg.request_head_timeout, acceptor.accept(stream)).await
        } else {
            named_handshake(stream, acceptor, s, &activity).await
        }
    };
    match handshake.await {
        // A TLS-ALPN-01 validation ends with the handshake (RFC 8737).
        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) => {
            s.handshakes[0].inc();
        }
        Ok(Ok(tls)) => {
            s.handshakes[0].inc();
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                activity.mark_http2();
            }
            serve_connection(tls, activity, proxy, builder, cfg, stop).await;
        }
        Ok(Err(e)) => {
            s.handshakes[1].inc();
            tracing::debug!(%client, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            s.handshakes[2].inc();
            tracing::debug!(%client, "TLS handshake timed out");
        }
    }
}

/// A handshake that looks at the name the client asks for first: an on-demand certificate
/// is obtained for it (a refused name fails at once), a host whose policy wants TLS 1.3 only
/// gets the settings that allow nothing else, and a host that asks clients for a
/// certificate gets the settings that verify it against its CA (what was proved is kept in
/// `activity`).
async fn named_handshake(
    stream: tokio::net::TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    s: &Shared,
    activity: &ConnActivity,
) -> Result<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    tokio::time::error::Elapsed,
> {
    let (listener, head_timeout) = (&s.kind, s.cfg.request_head_timeout);
    let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match tokio::time::timeout(head_timeout, lazy).await? {
        Ok(start) => start,
        Err(e) => return Ok(Err(e)),
    };
    let hello = start.client_hello();
    let validation = hello.alpn().is_some_and(|mut p| p.any(|p| p == crate::acme::ACME_TLS_ALPN));
    let name = hello.server_name().map(str::to_ascii_lowercase);
    let tls13_only =
        matches!((&listener.strict, &name), (Some((_, resolver)), Some(n)) if resolver.tls13_only(n));
    let demand = match (&listener.client_auth, &name) {
        (Some(_), Some(n)) if !validation => s.proxy.table.load().client_demand(n),
        _ => None,
    };
    let config = match (&listener.client_auth, &demand, &listener.strict) {
        (Some(configs), Some(demand), _) => match configs.config(demand, tls13_only) {
            Ok(config) => config,
            Err(why) => {
                // Said once as a problem when the routes change (`Proxy::follow`); here per
                // handshake, so at debug level.
                tracing::debug!(
                    name = name.as_deref().unwrap_or(""),
                    "client certificates cannot be checked: {why}; handshake refused"
                );
                return Ok(Err(std::io::Error::other(why)));
            }
        },
        (_, None, Some((strict, _))) if tls13_only => strict.config().clone(),
        _ => acceptor.config().clone(),
    };
    if let (Some(on_demand), Some(name)) = (&listener.on_demand, name.clone().filter(|_| !validation)) {
        if on_demand.wanted(&name) {
            if let Err(why) = on_demand.ensure(&name).await {
                return Ok(Err(std::io::Error::other(format!("no certificate for {name}: {why}"))));
            }
        }
    }
    let tls = tokio::time::timeout(head_timeout, start.into_stream(config)).await?;
    if let (Ok(tls), Some(demand)) = (&tls, demand) {
        let certificate = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
        let _ = activity.client_certificate.set(crate::tls::client_auth::Verified {
            name,
            ca: demand.ca,
            certificate,
        });
    }
    Ok(tls)
}

async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(limits::REFUSAL)).await;
}

async fn serve_connection<S>(
    stream: S,
    activity: Arc<ConnActivity>,
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    cfg: ProxyConfig,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = activity.client_ip;
    // Tells the connection's activity when bytes arrive (a request head in progress).
    let tracked = activity.clone();
    let io = TokioIo::new(crate::net::OnRead::new(stream, move |_| tracked.bytes_received()));
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            let activity = activity.clone();
            let http1 = req.version() < http::Version::HTTP_2;
            async move {
                let mut response = proxy.handle(req, activity.clone()).await;
                if http1
                    && activity.is_draining()
                    && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    response
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let check_every = cfg.request_head_timeout.min(cfg.idle_timeout) / 2;
    // `graceful_shutdown` was called: the connection ends once its requests are answered.
    let mut closing = false;
    loop {
        let draining = activity.is_draining();
        let (tick, idle_limit) = if draining {
            (check_every.min(DRAIN_CHECK), cfg.idle_timeout.min(DRAIN_IDLE))
        } else {
            (check_every, cfg.idle_timeout)
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep(tick) => match activity.verdict(cfg.request_head_timeout, idle_limit) {
                Verdict::Fine => {}
                Verdict::HeadTimeout => {
                    tracing::debug!(%peer, "request head not received in time; closing");
                    return;
                }
                Verdict::Idle if closing => return,
                Verdict::Idle => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            },
            () = stopped(&mut shutdown), if !draining => {
                activity.draining.store(true, Ordering::Relaxed);
                // HTTP/2 says so with GOAWAY, which no request can cross. Closing an idle
                // HTTP/1 connection can: a request may be on its way. So HTTP/1 connections
                // stay open, their next response says `Connection: close`, and only one idle
                // for DRAIN_IDLE is closed.
                if activity.is_http2() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// While draining: how long an HTTP/1 connection may stay idle before it is closed, and how
/// often that is checked.
const DRAIN_IDLE: Duration = Duration::from_secs(1);
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// Resolves once the shutdown flag is set (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
