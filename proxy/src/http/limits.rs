//! How many client connections a listener holds: at most `proxy.max_connections` in all and
//! `proxy.max_connections_per_client` from one address (clients in `proxy.trusted_networks`,
//! a load balancer in front, are not counted per address). Past a limit a connection is
//! refused gracefully (plain HTTP: a 503 with `Retry-After`, then closed; TLS: closed),
//! counted in `meshgate_connections_refused_total` and logged once per episode.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;

use crate::metrics::Metrics;

/// A listener's limits and what it holds now.
pub struct ConnLimits {
    max_total: usize,
    max_per_client: usize,
    held: Mutex<Held>,
    /// While refusing, so the log says it once per episode.
    refusing: AtomicBool,
    refused_full: IntCounter,
    refused_client: IntCounter,
}

#[derive(Default)]
struct Held {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    /// The most held since memory was last given back.
    peak: usize,
}

/// A storm this big (connections at once) gives its memory back once it has passed.
const STORM: usize = 1_000;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    ListenerFull,
    ClientFull,
}

/// A connection counted against the limits until dropped.
pub struct Admitted {
    limits: Arc<ConnLimits>,
    client: Option<IpAddr>,
}

impl ConnLimits {
    #[must_use]
    pub fn new(listener: &str, max_total: usize, max_per_client: usize, metrics: &Metrics) -> Arc<Self> {
        let refused = |reason| metrics.connections_refused.with_label_values(&[listener, reason]);
        Arc::new(Self {
            max_total,
            max_per_client,
            held: Mutex::new(Held::default()),
            refusing: AtomicBool::new(false),
            refused_full: refused("listener_full"),
            refused_client: refused("client_full"),
        })
    }

    /// Counts a new connection from `client` (`per_client`: whether its address is counted
    /// on its own), or says why it cannot be taken.
    pub fn admit(self: &Arc<Self>, client: IpAddr, per_client: bool) -> Result<Admitted, Refused> {
        let mut held = self.held.lock().expect("limits lock");
        let refused = if held.total >= self.max_total {
            Some(Refused::ListenerFull)
        } else if per_client && held.per_client.get(&client).copied().unwrap_or(0) >= self.max_per_client {
            Some(Refused::ClientFull)
        } else {
            None
        };
        if let Some(why) = refused {
            drop(held);
            self.refused(why, client);
            return Err(why);
        }
        held.total += 1;
        held.peak = held.peak.max(held.total);
        if per_client {
            *held.per_client.entry(client).or_default() += 1;
        }
        if self.refusing.swap(false, Ordering::Relaxed) {
            tracing::info!(open = held.total, "connections are taken again");
        }
        Ok(Admitted { limits: self.clone(), client: per_client.then_some(client) })
    }

    fn refused(&self, why: Refused, client: IpAddr) {
        match why {
            Refused::ListenerFull => self.refused_full.inc(),
            Refused::ClientFull => self.refused_client.inc(),
        }
        if !self.refusing.swap(true, Ordering::Relaxed) {
            match why {
                Refused::ListenerFull => tracing::warn!(
                    limit = self.max_total,
                    "refusing connections: the listener holds proxy.max_connections ({})",
                    self.max_total
                ),
                Refused::ClientFull => tracing::warn!(
                    %client,
                    limit = self.max_per_client,
                    "refusing connections from {client}: it holds proxy.max_connections_per_client ({})",
                    self.max_per_client
                ),
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.limits.held.lock().expect("limits lock");
        held.total -= 1;
        if let Some(client) = self.client {
            if let Some(n) = held.per_client.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    held.per_client.remove(&client);
                }
            }
        }
        // A storm is passing (down to a quarter of its peak): a second later, once its last
        // connections have closed too, the memory they used goes back to the system, which
        // glibc's allocator does not do by itself.
        if held.peak >= STORM && held.total * 4 <= held.peak {
            held.peak = held.total;
            drop(held);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let _ = tokio::task::spawn_blocking(crate::memory::give_back).await;
                });
            }
        }
    }
}

/// What a plain-HTTP client that is refused reads before the connection closes.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 37\r\n\r\nmeshgate: too many connections, retry\n";
