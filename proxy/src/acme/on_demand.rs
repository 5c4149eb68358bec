//! On-demand TLS, as Caddy has it: a certificate for a name nobody configured is ordered
//! during the first handshake that asks for it, and only if the operator's `ask` endpoint
//! answers 2xx for that name (`GET <ask>?domain=<name>`). Orders are capped (at most
//! `acme.on_demand_concurrent` at once, `acme.on_demand_per_minute` a minute), one per name
//! however many handshakes wait for it, and a refused name is remembered for a minute, so a
//! flood of made-up names costs the ask endpoint one request each and the CA nothing.
//!
//! Only the agent that orders (the cluster's issuer) obtains certificates on demand. A
//! handshake on a follower hands the name to the issuer over the feed's connection (TLS with
//! the cluster secret: only members ask), through each manager in between ([`Relay`]); the
//! issuer asks, orders under its caps, and the certificate comes back with the feed's
//! certificates (ordinary store entries, shared like any other), or a refusal does, which
//! fails the waiting handshakes at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch, Semaphore};

use super::Manager;
use crate::tls::CertResolver;

/// How long the `ask` endpoint has to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused name is refused without asking again.
const REFUSED_FOR: Duration = Duration::from_secs(60);
/// Refused names remembered at most: past it, the expired ones are forgotten first, and
/// if a flood of made-up names still fills it, all of them (each costs one more ask).
const REFUSED_KEPT: usize = 4096;
/// A handshake waits this long for its certificate at most.
const ORDER_WAIT: Duration = Duration::from_secs(60);

/// The outcome of one name's order, shared by the handshakes that wait for it.
type Outcome = tokio::sync::OnceCell<Result<(), String>>;

/// Names wanted here on their way to the issuer, and the issuer's refusals on their way back
/// (shared by this agent's on-demand orders, its feed connection to a manager, and the feed
/// it serves to its own followers).
pub struct Relay {
    wanted: mpsc::Sender<String>,
    /// Taken by the feed connection while it lasts.
    outgoing: tokio::sync::Mutex<mpsc::Receiver<String>>,
    refusals: broadcast::Sender<(String, String)>,
    /// This agent's on-demand orders, which followers' wishes go to.
    local: std::sync::OnceLock<std::sync::Weak<OnDemand>>,
}

/// Names waiting for the issuer at most (more fail at once: a flood of made-up names).
const RELAYED_WAITING: usize = 64;

impl Relay {
    #[must_use]
    pub fn new() -> Arc<Self> {
        let (wanted, outgoing) = mpsc::channel(RELAYED_WAITING);
        Arc::new(Self {
            wanted,
            outgoing: tokio::sync::Mutex::new(outgoing),
            refusals: broadcast::channel(RELAYED_WAITING).0,
            local: std::sync::OnceLock::new(),
        })
    }

    /// The agent's on-demand orders, which a follower's wish is handed to.
    pub fn serve_with(&self, on_demand: &Arc<OnDemand>) {
        let _ = self.local.set(Arc::downgrade(on_demand));
    }

    /// What a follower's wish goes to (`None`: on-demand TLS is off here).
    #[must_use]
    pub fn local(&self) -> Option<Arc<OnDemand>> {
        self.local.get().and_then(std::sync::Weak::upgrade)
    }

    /// The names to send to the issuer, for the feed connection while it lasts.
    pub async fn outgoing(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<String>> {
        self.outgoing.lock().await
    }

    /// The issuer refused `name`: its waiting handshakes fail.
    pub fn refused(&self, name: String, why: String) {
        let _ = self.refusals.send((name, why));
    }
}

pub struct OnDemand {
    ask: hyper::Uri,
    manager: Arc<Manager>,
    resolver: Arc<CertResolver>,
    issuer: watch::Receiver<bool>,
    orders: Semaphore,
    per_minute: usize,
    recent: Mutex<VecDeque<Instant>>,
    refused: Mutex<HashMap<String, Instant>>,
    /// One order per name: later handshakes wait for the first one's outcome.
    in_flight: Mutex<HashMap<String, Arc<Outcome>>>,
    relay: Arc<Relay>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl OnDemand {
    #[must_use]
    pub fn new(
        ask: hyper::Uri,
        manager: Arc<Manager>,
        resolver: Arc<CertResolver>,
        issuer: watch::Receiver<bool>,
        concurrent: usize,
        per_minute: usize,
        relay: Arc<Relay>,
    ) -> Self {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        Self {
            ask,
            manager,
            resolver,
            issuer,
            orders: Semaphore::new(concurrent.max(1)),
            per_minute: per_minute.max(1),
            recent: Mutex::default(),
            refused: Mutex::default(),
            in_flight: Mutex::default(),
            relay,
            client,
        }
    }

    /// Whether a handshake for `name` should wait for [`OnDemand::ensure`]: a name this
    /// agent has no certificate of its own for.
    #[must_use]
    pub fn wanted(&self, name: &str) -> bool {
        !self.resolver.has_certificate(name)
    }

    /// Makes sure `name` has a certificate: asks, orders (once, under the caps), and waits
    /// until the resolver serves it. `Err` says why not (the handshake then fails).
    pub async fn ensure(&self, name: &str) -> Result<(), String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !valid_name(&name) {
            return Err("not a host name".into());
        }
        if self
            .refused
            .lock()
            .expect("on-demand lock")
            .get(&name)
            .is_some_and(|at| at.elapsed() < REFUSED_FOR)
        {
            return Err("refused by the ask endpoint a moment ago".into());
        }
        let cell = self.in_flight.lock().expect("on-demand lock").entry(name.clone()).or_default().clone();
        let outcome = cell.get_or_init(|| self.obtain(&name)).await.clone();
        self.in_flight.lock().expect("on-demand lock").remove(&name);
        if let Err(why) = &outcome {
            let mut refused = self.refused.lock().expect("on-demand lock");
            if refused.len() >= REFUSED_KEPT {
                refused.retain(|_, at| at.elapsed() < REFUSED_FOR);
                if refused.len() >= REFUSED_KEPT {
                    refused.clear();
                }
            }
            refused.insert(name.clone(), Instant::now());
            drop(refused);
            tracing::info!(host = %name, "acme: no on-demand certificate: {why}");
        }
        outcome
    }

    async fn obtain(&self, name: &str) -> Result<(), String> {
        if !*self.issuer.borrow() {
            return self.ask_the_issuer(name).await;
        }
        self.ask(name).await?;
        {
            let mut recent = self.recent.lock().expect("on-demand lock");
            while recent.front().is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                recent.pop_front();
            }
            if recent.len() >= self.per_minute {
                return Err(format!("over acme.on_demand_per_minute ({})", self.per_minute));
            }
            recent.push_back(Instant::now());
        }
        let _permit = self.orders.acquire().await.map_err(|e| e.to_string())?;
        tokio::time::timeout(ORDER_WAIT, async {
            self.manager.obtain_on_demand(name).await?;
            // The store's watcher loads it: wait until handshakes get it.
            while !self.resolver.has_certificate(name) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })
        .await
        .map_err(|_| format!("no certificate within {ORDER_WAIT:?}"))?
    }

    /// On a follower: the issuer is asked for `name` over the feed; the certificate comes
    /// with the feed's, or a refusal does.
    async fn ask_the_issuer(&self, name: &str) -> Result<(), String> {
        let mut refusals = self.relay.refusals.subscribe();
        self.relay
            .wanted
            .try_send(name.to_owned())
            .map_err(|_| format!("{RELAYED_WAITING} names already wait for the cluster's issuer"))?;
        tokio::time::timeout(ORDER_WAIT, async {
            loop {
                if self.resolver.has_certificate(name) {
                    return Ok(());
                }
                tokio::select! {
                    refusal = refusals.recv() => match refusal {
                        Ok((refused, why)) if refused == name => return Err(format!("the cluster's issuer: {why}")),
                        Err(broadcast::error::RecvError::Closed) => return Err("the relay to the issuer is gone".into()),
                        _ => {}
                    },
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await
        .map_err(|_| format!("no certificate from the cluster's issuer within {ORDER_WAIT:?}"))?
    }

    /// `GET <ask>?domain=<name>`: 2xx allows it.
    async fn ask(&self, name: &str) -> Result<(), String> {
        let sep = if self.ask.query().is_some() { '&' } else { '?' };
        let uri: hyper::Uri =
            format!("{}{sep}domain={name}", self.ask).parse().map_err(|e| format!("{e}"))?;
        let response = tokio::time::timeout(ASK_TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| format!("the ask endpoint did not answer within {ASK_TIMEOUT:?}"))?
            .map_err(|e| format!("the ask endpoint is unreachable: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the ask endpoint answered {}", response.status()))
        }
    }
}

/// Letters, digits, `-` and `.`, at most 253 characters, at least two labels: no IP address
/// (no certificate for it is ordered), no wildcard.
fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_host_names_are_ordered() {
        assert!(valid_name("shop.example.com"));
        for bad in ["localhost", "10.0.0.1", "*.example.com", "a..b", "a_b.test", &"a".repeat(300)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
