//! One task as the proxy sees it: its address, passive health and pooled connections.
//!
//! Endpoints outlive route-table swaps: the [`EndpointRegistry`] hands the same `Arc` to
//! every compiled table while the task exists, so health, in-flight counts and idle
//! connections carry over a reload. When the last table that names a task is dropped, its
//! endpoint and idle connections go with it; requests still in flight hold their own `Arc`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{IntGauge, IntGaugeVec};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use crate::cluster::hop::{Dialer, HopError, HopStream};
use crate::state::{MeshState, Task, UpstreamProtocol};

/// Idle upstream connections kept per task; more are closed.
const MAX_IDLE_PER_TASK: usize = 256;
/// An idle upstream connection older than this is closed rather than reused, to stay under
/// the keep-alive timeout of common servers (Node.js uses 5 s, nginx 75 s).
const MAX_IDLE_AGE: Duration = Duration::from_secs(4);

/// Milliseconds on a process-wide monotonic clock (cheap to store in an atomic).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Why a connection to a task could not be made. Nothing was sent, so a retry is safe.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("TLS handshake with the task failed: {0}")]
    Tls(std::io::Error),
    #[error("the route's TLS to its tasks cannot be set up on this node: {0}")]
    TlsSetup(String),
    #[error("{0}")]
    Hop(#[from] HopError),
    #[error("not reachable from this node: {0}")]
    Nowhere(Arc<str>),
}

/// How this node reaches a task.
#[derive(Clone)]
pub enum Via {
    /// At its address, from here.
    Direct,
    /// Through the agent of the task's node, at this address (see [`crate::cluster::hop`]).
    Hop(Arc<Dialer>, IpAddr),
    /// Not at all: never dialled (least of all through the default route), reported.
    Nowhere(Arc<str>),
}

impl Via {
    fn hop_node(&self) -> Option<IpAddr> {
        match self {
            Self::Hop(_, node) => Some(*node),
            _ => None,
        }
    }
}

/// What this node knows to decide how it reaches each task.
#[derive(Clone, Default)]
pub struct Reach {
    /// This node's name, as tasks name their node.
    pub node: String,
    /// Hops to other nodes' agents, when this agent has the cluster credential.
    pub hop: Option<Arc<Dialer>>,
}

impl Reach {
    /// Where and how a task's `port` is dialled. An address the user wrote is dialled as it
    /// is; a node-local task (Docker's) at the address this node's engine gives for it, or
    /// through its node's agent, or not at all.
    #[must_use]
    pub fn resolve(&self, state: &MeshState, task: &Task, port: u16) -> (SocketAddr, Via) {
        let port = task.port.unwrap_or(port);
        if !task.node_local {
            return (SocketAddr::new(task.address, port), Via::Direct);
        }
        if let Some(local) = state.local_addresses.get(&task.id) {
            return (SocketAddr::new(*local, port), Via::Direct);
        }
        let at = SocketAddr::new(task.address, port);
        let node = state.nodes.iter().find(|n| n.name == task.node).and_then(|n| n.address);
        let why = match (&self.hop, node) {
            _ if task.node == self.node => {
                "it runs on this node, whose engine gives no address to reach it at (see the problems)".into()
            }
            (Some(dialer), Some(node)) => return (at, Via::Hop(dialer.clone(), node)),
            (None, _) => format!(
                "it runs on node `{}` and is reached through that node's agent, which needs the cluster secret on both (cluster.secret_file)",
                task.node
            ),
            (Some(_), None) => format!("it runs on node `{}`, whose address is not known", task.node),
        };
        (at, Via::Nowhere(why.into()))
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    H1 { sender: http1::SendRequest<UpstreamBody>, reused: bool },
    H2(http2::SendRequest<UpstreamBody>),
}

pub struct Endpoint {
    /// The address dialled (directly, or by the agent a hop goes through).
    pub addr: SocketAddr,
    pub via: Via,
    pub protocol: UpstreamProtocol,
    /// How TLS to the task is checked (https only; `None`: not verified).
    tls: Option<crate::state::UpstreamTls>,
    /// The task wants a PROXY header first: its connections are one client's, never pooled.
    send_proxy: Option<crate::state::ProxyProtocol>,
    pub service: Arc<str>,
    pub task: Arc<str>,
    pub node: Arc<str>,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Its active health check fails (see `health`).
    check_failing: std::sync::atomic::AtomicBool,
    idle: Mutex<Vec<(http1::SendRequest<UpstreamBody>, Instant)>>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    up: IntGauge,
    up_vec: IntGaugeVec,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.up_vec.remove_label_values(&[&*self.service, &*self.task, &self.addr.to_string()]);
    }
}

impl Endpoint {
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// True while the task is ejected after connect failures.
    #[must_use]
    pub fn is_ejected(&self) -> bool {
        self.check_failing.load(Ordering::Relaxed) || self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records the outcome of an active health check: a failing task is out of rotation
    /// (as an ejected one) until a check passes.
    pub fn set_check(&self, passing: Result<(), String>) {
        let was_failing = self.check_failing.swap(passing.is_err(), Ordering::Relaxed);
        match passing {
            Err(why) if !was_failing => {
                self.up.set(0);
                tracing::warn!(service = %self.service, task = %self.task, addr = %self.addr, "health check fails: {why}; out of rotation");
            }
            Ok(()) if was_failing => {
                self.up.set(1);
                tracing::info!(service = %self.service, task = %self.task, addr = %self.addr, "health check passes; back in rotation");
            }
            _ => {}
        }
    }

    /// Why this node cannot reach the task at all, if it cannot.
    #[must_use]
    pub fn unreachable(&self) -> Option<&str> {
        match &self.via {
            Via::Nowhere(why) => Some(why),
            _ => None,
        }
    }

    /// Records a refused or timed-out connect: eject for `base * 2^(failures-1)`, capped.
    /// Returns the ejection time.
    pub fn record_failure(&self, base: Duration, max: Duration) -> Duration {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = base.saturating_mul(1 << (failures - 1).min(16)).min(max);
        self.ejected_until_ms.store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        self.up.set(0);
        backoff
    }

    /// Records a connection that worked: the task takes traffic again.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.up.set(1);
            tracing::info!(service = %self.service, task = %self.task, addr = %self.addr, "task back in rotation");
        }
    }

    /// An idle pooled connection, or a new one. `client` (its address, and the one it
    /// connected to) is what a task that wants the PROXY protocol is told (`None`: a
    /// connection of the proxy's own); such a connection is new each time.
    pub async fn checkout(
        &self,
        connect_timeout: Duration,
        client: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<Sender, ConnectError> {
        let shared = self.send_proxy.is_none();
        if self.protocol == UpstreamProtocol::H2c {
            if let Some(sender) =
                self.h2.lock().expect("h2 lock").as_ref().filter(|s| shared && !s.is_closed())
            {
                return Ok(Sender::H2(sender.clone()));
            }
            let io = TokioIo::new(self.connect(connect_timeout, client).await?);
            let (sender, conn) =
                http2::handshake(TokioExecutor::new(), io).await.map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            if shared {
                *self.h2.lock().expect("h2 lock") = Some(sender.clone());
            }
            return Ok(Sender::H2(sender));
        }
        if let Some(sender) = self.take_idle().filter(|_| shared) {
            return Ok(Sender::H1 { sender, reused: true });
        }
        let tcp = self.connect(connect_timeout, client).await?;
        let sender = if self.protocol == UpstreamProtocol::Https {
            let (connector, name) = self.tls_connector()?;
            let tls = tokio::time::timeout(connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| ConnectError::Timeout(connect_timeout))?
                .map_err(ConnectError::Tls)?;
            h1_handshake(tls).await?
        } else {
            h1_handshake(tcp).await?
        };
        Ok(Sender::H1 { sender, reused: false })
    }

    /// The TLS connector for this task and the name it must present (SNI, and what is
    /// verified when the route asks): the route's `server_name`, else the task's address.
    fn tls_connector(
        &self,
    ) -> Result<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>), ConnectError> {
        let Some(tls) = &self.tls else {
            let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
            return Ok((crate::tls::upstream::connector(), name));
        };
        let connector = crate::tls::upstream::connector_for(tls).map_err(ConnectError::TlsSetup)?;
        let name = match &tls.server_name {
            Some(n) => rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|e| ConnectError::TlsSetup(format!("server name `{n}`: {e}")))?,
            None => rustls::pki_types::ServerName::IpAddress(self.addr.ip().into()),
        };
        Ok((connector, name))
    }

    async fn connect(
        &self,
        timeout: Duration,
        client: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<Upstream, ConnectError> {
        let connecting = async {
            match &self.via {
                Via::Direct => {
                    let stream = TcpStream::connect(self.addr).await?;
                    stream.set_nodelay(true)?;
                    Ok(Upstream::Tcp(stream))
                }
                Via::Hop(dialer, node) => {
                    Ok(Upstream::Hop(Box::new(dialer.dial(*node, &self.task, self.addr.port()).await?)))
                }
                Via::Nowhere(why) => Err(ConnectError::Nowhere(why.clone())),
            }
        };
        let mut stream =
            tokio::time::timeout(timeout, connecting).await.map_err(|_| ConnectError::Timeout(timeout))??;
        if let Some(version) = self.send_proxy {
            let header = super::proxy_protocol::header(version, client);
            tokio::io::AsyncWriteExt::write_all(&mut stream, &header).await.map_err(ConnectError::Io)?;
        }
        Ok(stream)
    }

    fn take_idle(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < MAX_IDLE_AGE {
                return Some(sender);
            }
        }
        None
    }

    /// Puts an HTTP/1.1 connection back in the pool once its response has been read.
    pub fn recycle(self: &Arc<Self>, mut sender: http1::SendRequest<UpstreamBody>) {
        // A connection that began with one client's PROXY header is that client's only.
        if self.send_proxy.is_some() {
            return;
        }
        // A response whose body came with its head leaves the connection ready at once.
        if sender.is_ready() {
            self.park(sender);
            return;
        }
        let endpoint: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            if let Some(endpoint) = endpoint.upgrade() {
                endpoint.park(sender);
            }
        });
    }

    fn park(&self, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE_PER_TASK {
            idle.push((sender, Instant::now()));
        }
    }
}

/// An HTTP/1.1 connection over `io` (TCP or TLS), driven by its own task.
async fn h1_handshake<S>(io: S) -> Result<http1::SendRequest<UpstreamBody>, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        // Errors here are seen by the request that used the connection.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// A connection to a task: straight, or through its node's agent.
pub enum Upstream {
    Tcp(TcpStream),
    Hop(Box<HopStream>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Hop(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Hop(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Hop(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Hop(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Hop(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Hop(s) => s.is_write_vectored(),
        }
    }
}

/// Hands out one shared [`Endpoint`] per task and upstream protocol.
pub struct EndpointRegistry {
    live: Mutex<HashMap<Key, Weak<Endpoint>>>,
    up_vec: IntGaugeVec,
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    addr: SocketAddr,
    hop: Option<IpAddr>,
    nowhere: bool,
    protocol: UpstreamProtocol,
    tls: Option<crate::state::UpstreamTls>,
    send_proxy: Option<crate::state::ProxyProtocol>,
    service: Arc<str>,
    task: Arc<str>,
}

impl EndpointRegistry {
    #[must_use]
    pub fn new(up_vec: IntGaugeVec) -> Self {
        Self { live: Mutex::new(HashMap::new()), up_vec }
    }

    /// The endpoint for a task, shared with the table in force if it already knows it.
    pub fn get(
        &self,
        (addr, via): (SocketAddr, Via),
        (protocol, tls, send_proxy): (
            UpstreamProtocol,
            Option<&crate::state::UpstreamTls>,
            Option<crate::state::ProxyProtocol>,
        ),
        service: &str,
        task: &str,
        node: &str,
    ) -> Arc<Endpoint> {
        let nowhere = matches!(via, Via::Nowhere(_));
        let tls = tls.filter(|_| protocol == UpstreamProtocol::Https).cloned();
        let key = Key {
            addr,
            hop: via.hop_node(),
            nowhere,
            protocol,
            tls: tls.clone(),
            send_proxy,
            service: service.into(),
            task: task.into(),
        };
        let mut live = self.live.lock().expect("registry lock");
        if let Some(existing) = live.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let up = self.up_vec.with_label_values(&[service, task, &addr.to_string()]);
        up.set(i64::from(!nowhere));
        let endpoint = Arc::new(Endpoint {
            addr,
            via,
            protocol,
            tls,
            send_proxy,
            service: key.service.clone(),
            task: key.task.clone(),
            node: node.into(),
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            check_failing: std::sync::atomic::AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            up,
            up_vec: self.up_vec.clone(),
        });
        live.insert(key, Arc::downgrade(&endpoint));
        endpoint
    }

    /// Forgets endpoints no table uses any more.
    pub fn prune(&self) {
        self.live.lock().expect("registry lock").retain(|_, w| w.strong_count() > 0);
    }
}
