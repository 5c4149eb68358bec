//! One task as the proxy sees it: its address, passive health and pooled connections.
//!
//! Endpoints outlive route-table swaps: the [`EndpointRegistry`] hands the same `Arc` to
//! every compiled table while the task exists, so health, in-flight counts and idle
//! connections carry over a reload. When the last table that names a task is dropped, its
//! endpoint and idle connections go with it; requests still in flight hold their own `Arc`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{IntGauge, IntGaugeVec};
use tokio::net::TcpStream;

use crate::state::UpstreamProtocol;

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
}

/// A connection ready to carry one request.
pub enum Sender {
    H1 { sender: http1::SendRequest<Incoming>, reused: bool },
    H2(http2::SendRequest<Incoming>),
}

pub struct Endpoint {
    pub addr: SocketAddr,
    pub protocol: UpstreamProtocol,
    pub service: Arc<str>,
    pub task: Arc<str>,
    pub node: Arc<str>,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    idle: Mutex<Vec<(http1::SendRequest<Incoming>, Instant)>>,
    h2: Mutex<Option<http2::SendRequest<Incoming>>>,
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
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
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

    /// An idle pooled connection, or a new one.
    pub async fn checkout(&self, connect_timeout: Duration) -> Result<Sender, ConnectError> {
        if self.protocol == UpstreamProtocol::H2c {
            if let Some(sender) = self.h2.lock().expect("h2 lock").as_ref().filter(|s| !s.is_closed()) {
                return Ok(Sender::H2(sender.clone()));
            }
            let io = TokioIo::new(self.connect(connect_timeout).await?);
            let (sender, conn) =
                http2::handshake(TokioExecutor::new(), io).await.map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            *self.h2.lock().expect("h2 lock") = Some(sender.clone());
            return Ok(Sender::H2(sender));
        }
        if let Some(sender) = self.take_idle() {
            return Ok(Sender::H1 { sender, reused: true });
        }
        let tcp = self.connect(connect_timeout).await?;
        let sender = if self.protocol == UpstreamProtocol::Https {
            let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
            let tls =
                tokio::time::timeout(connect_timeout, crate::tls::upstream::connector().connect(name, tcp))
                    .await
                    .map_err(|_| ConnectError::Timeout(connect_timeout))?
                    .map_err(ConnectError::Tls)?;
            h1_handshake(tls).await?
        } else {
            h1_handshake(tcp).await?
        };
        Ok(Sender::H1 { sender, reused: false })
    }

    async fn connect(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn take_idle(&self) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < MAX_IDLE_AGE {
                return Some(sender);
            }
        }
        None
    }

    /// Puts an HTTP/1.1 connection back in the pool once its response has been read.
    pub fn recycle(self: &Arc<Self>, mut sender: http1::SendRequest<Incoming>) {
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

    fn park(&self, sender: http1::SendRequest<Incoming>) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE_PER_TASK {
            idle.push((sender, Instant::now()));
        }
    }
}

/// An HTTP/1.1 connection over `io` (TCP or TLS), driven by its own task.
async fn h1_handshake<S>(io: S) -> Result<http1::SendRequest<Incoming>, ConnectError>
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

/// Hands out one shared [`Endpoint`] per task and upstream protocol.
pub struct EndpointRegistry {
    live: Mutex<HashMap<Key, Weak<Endpoint>>>,
    up_vec: IntGaugeVec,
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    addr: SocketAddr,
    protocol: UpstreamProtocol,
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
        addr: SocketAddr,
        protocol: UpstreamProtocol,
        service: &str,
        task: &str,
        node: &str,
    ) -> Arc<Endpoint> {
        let key = Key { addr, protocol, service: service.into(), task: task.into() };
        let mut live = self.live.lock().expect("registry lock");
        if let Some(existing) = live.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let up = self.up_vec.with_label_values(&[service, task, &addr.to_string()]);
        up.set(1);
        let endpoint = Arc::new(Endpoint {
            addr,
            protocol,
            service: key.service.clone(),
            task: key.task.clone(),
            node: node.into(),
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
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
