//! Following a feed: connect to the first peer that answers, apply its frames, move on to the
//! next peer when it goes silent. Whatever was received last stays in force meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::identity::{Identity, CLUSTER_NAME};
use super::wire::{self, CertPair, Frame};
use super::{ClusterConfig, ClusterMetrics, Parts, NAME, PROVIDER};
use crate::state::MeshState;

pub struct Follower {
    pub cfg: ClusterConfig,
    pub identity: Identity,
    pub parts: Arc<Parts>,
    pub metrics: ClusterMetrics,
    pub peers: Vec<String>,
    /// Workers take the state; managers only certificates and challenges.
    pub take_state: bool,
    pub role: &'static str,
}

/// What the follower has received, for `/readyz`.
#[derive(Default)]
struct Progress {
    generation: Option<u64>,
    last_heard: Option<SystemTime>,
}

impl Follower {
    pub async fn run(self) {
        let connector = match self.identity.client_config() {
            Ok(tls) => TlsConnector::from(Arc::new(tls)),
            Err(e) => {
                self.parts.readiness.set(
                    NAME,
                    false,
                    format!("the cluster secret cannot be used for TLS: {e}"),
                );
                return;
            }
        };
        let mut progress = Progress::default();
        if self.take_state {
            if let Some(state) = self.load_saved() {
                self.parts.hub.publish(PROVIDER, state);
                progress.generation = Some(0);
                tracing::info!("cluster: serving the state saved before the restart until a manager answers");
            }
        }
        let mut backoff = Duration::from_millis(200);
        let mut said_unreachable = false;
        let mut connected_once = false;
        loop {
            let mut failures = Vec::new();
            for peer in &self.peers {
                match self.follow_one(peer, &connector, &mut progress).await {
                    Ok(()) => unreachable!("a feed only ends with an error"),
                    Err(Lost::BeforeHello(e)) => failures.push(format!("{peer}: {e}")),
                    Err(Lost::After(e)) => {
                        tracing::warn!(%peer, "cluster: lost the feed: {e}; trying the managers again");
                        self.metrics.reconnects.inc();
                        connected_once = true;
                        said_unreachable = false;
                        backoff = Duration::from_millis(200);
                        failures.push(format!("{peer}: {e}"));
                    }
                }
                self.metrics.feed_connected.set(0);
                self.mark_stale(&progress, &failures);
            }
            // Nothing to wait for any more: the proxy serves what it has.
            self.parts.hub.fulfil(PROVIDER);
            if !said_unreachable {
                tracing::warn!(peers = %failures.join("; "), "cluster: no manager's feed answers; {}", if connected_once || progress.generation.is_some() { "serving the last state received" } else { "nothing to serve from the cluster yet" });
                said_unreachable = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn mark_stale(&self, progress: &Progress, failures: &[String]) {
        let since = progress
            .last_heard
            .map_or_else(|| "never".to_owned(), |t| humantime::format_rfc3339_seconds(t).to_string());
        if self.take_state {
            self.metrics.stale.set(i64::from(progress.generation.is_some()));
            match progress.generation {
                // Still ready: restarting the agent would not bring a manager back, and it
                // would stop the node from serving what it knows.
                Some(g) => self.parts.readiness.set(NAME, true, format!("{}: stale: no manager reachable; serving the state of generation {g} last confirmed {since} ({})", self.role, failures.join("; "))),
                None => self.parts.readiness.set(NAME, false, format!("{}: waiting for a manager's feed ({})", self.role, failures.join("; "))),
            }
        } else {
            self.metrics.stale.set(1);
            self.parts.readiness.set(NAME, true, format!("{}: serving the feed; the leader's feed is unreachable since {since}, certificates stay as received ({})", self.role, failures.join("; ")));
        }
    }

    async fn follow_one(
        &self,
        peer: &str,
        connector: &TlsConnector,
        progress: &mut Progress,
    ) -> Result<(), Lost> {
        let timeout = self.cfg.timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(peer))
            .await
            .map_err(|_| Lost::BeforeHello("connect timed out".into()))?
            .map_err(|e| Lost::BeforeHello(e.to_string()))?;
        tcp.set_nodelay(true).ok();
        let name = rustls::pki_types::ServerName::try_from(CLUSTER_NAME).expect("valid name");
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| Lost::BeforeHello("TLS handshake timed out".into()))?
            .map_err(|e| Lost::BeforeHello(format!("TLS refused (not the same cluster secret?): {e}")))?;
        let (mut rd, wr) = tokio::io::split(tls);
        // Acknowledgements and on-demand wishes go back on the same connection.
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let read = async |rd: &mut tokio::io::ReadHalf<_>| {
            tokio::time::timeout(timeout, wire::read(rd))
                .await
                .map_err(|_| format!("silent for {}", humantime::format_duration(timeout)))?
                .map_err(|e| e.to_string())
        };
        let Frame::Hello { node, leader } = read(&mut rd).await.map_err(Lost::BeforeHello)? else {
            return Err(Lost::BeforeHello("the first frame was not a hello".into()));
        };
        tracing::info!(%peer, %node, leader, "cluster: following");
        self.metrics.feed_connected.set(1);
        self.metrics.stale.set(0);
        let following = format!("{peer} ({node}{})", if leader { ", the leader" } else { "" });
        let relay = self.parts.certs.as_ref().map(|share| share.relay.clone());
        let _wishes =
            super::serve::AbortOnDrop(relay.clone().map(|r| tokio::spawn(send_wishes(r, wr.clone()))));
        self.report_following(&following, progress);
        loop {
            let frame = read(&mut rd).await.map_err(Lost::After)?;
            let now = SystemTime::now();
            progress.last_heard = Some(now);
            self.metrics
                .state_received
                .set(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64);
            match frame {
                Frame::State { generation, state } if self.take_state => {
                    let state = wire::from_the_wire(state);
                    self.save(&state);
                    self.parts.hub.publish(PROVIDER, state);
                    progress.generation = Some(generation);
                    self.report_following(&following, progress);
                }
                Frame::NotObtained { name, why } => {
                    if let Some(relay) = &relay {
                        relay.refused(name, why);
                    }
                }
                Frame::State { .. }
                | Frame::Heartbeat
                | Frame::Hello { .. }
                | Frame::Ack { .. }
                | Frame::Wanted { .. } => {}
                Frame::Certs { certs } => self.store_certs(&certs),
                Frame::Challenges { version, set } => {
                    if let Some(share) = &self.parts.certs {
                        share.challenges.set_remote(set);
                        // A manager relays them: acknowledge once its own followers have them.
                        share.challenges.propagated(timeout / 2).await;
                    }
                    wire::write(&mut *wr.lock().await, &Frame::Ack { challenges: version })
                        .await
                        .map_err(|e| Lost::After(e.to_string()))?;
                }
            }
        }
    }

    /// `/readyz` while a feed is followed: a worker is ready once it has a state.
    fn report_following(&self, following: &str, progress: &Progress) {
        let (ready, what) = match (self.take_state, progress.generation) {
            (true, Some(g)) => (true, format!("{}: following {following}, state generation {g}", self.role)),
            (true, None) => (false, format!("{}: following {following}, waiting for its state", self.role)),
            (false, _) => (
                true,
                format!(
                    "{}: serving the feed; following {following} for certificates and challenges",
                    self.role
                ),
            ),
        };
        self.parts.readiness.set(NAME, ready, what);
    }

    /// Writes the certificates that differ from the stored ones (0600, atomically), then
    /// has the resolver reload. Certificates are never deleted here: the issuer does not
    /// delete them either, and an old one is harmless.
    fn store_certs(&self, certs: &[CertPair]) {
        let Some(share) = &self.parts.certs else { return };
        let dir = share.store.certs_dir();
        let mut wrote = 0;
        for pair in certs {
            if pair.name.is_empty() || pair.name.contains('/') || pair.name.starts_with('.') {
                tracing::warn!(name = %pair.name, "cluster: a certificate with an unusable name was skipped");
                continue;
            }
            let same = |ext: &str, want: &str| {
                std::fs::read_to_string(dir.join(format!("{}.{ext}", pair.name)))
                    .is_ok_and(|have| have == want)
            };
            if same("crt", &pair.chain_pem) && same("key", &pair.key_pem) {
                continue;
            }
            match share.store.write_cert(&pair.name, &pair.chain_pem, &pair.key_pem) {
                Ok(()) => wrote += 1,
                Err(e) => {
                    tracing::error!(certificate = %pair.name, "cluster: cannot store the certificate received from the issuer: {e}");
                }
            }
        }
        if wrote > 0 {
            tracing::info!(count = wrote, "cluster: stored certificates received from the issuer");
            share.reload.notify_one();
        }
    }

    fn save(&self, state: &MeshState) {
        let Some(path) = &self.cfg.state_file else { return };
        let written = serde_json::to_vec(state)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::acme::store::write_atomic(path, &json));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), "cluster: cannot save the state: {e}");
        }
    }

    fn load_saved(&self) -> Option<MeshState> {
        let path = self.cfg.state_file.as_ref()?;
        let json = std::fs::read(path).ok()?;
        serde_json::from_slice(&json).map_err(|e| tracing::warn!(path = %path.display(), "cluster: the saved state is unusable, ignored: {e}")).ok()
    }
}

/// Sends the names this agent's handshakes want certificates for to the feed's server
/// (towards the issuer), while the connection lasts.
async fn send_wishes<W: tokio::io::AsyncWrite + Unpin>(
    relay: Arc<crate::acme::on_demand::Relay>,
    wr: Arc<tokio::sync::Mutex<W>>,
) {
    let mut outgoing = relay.outgoing().await;
    while let Some(name) = outgoing.recv().await {
        if wire::write(&mut *wr.lock().await, &Frame::Wanted { name }).await.is_err() {
            return;
        }
    }
}

enum Lost {
    /// Never got a hello: the peer is down, refused us, or is not a feed.
    BeforeHello(String),
    /// The feed was followed, then ended.
    After(String),
}
