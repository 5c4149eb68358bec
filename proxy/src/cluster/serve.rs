//! The feed server on managers: every follower gets the hello, then the state, the
//! certificates and the challenges, each again whenever it changes, and a heartbeat when
//! nothing does.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::identity::Identity;
use super::wire::{self, CertPair, Frame};
use super::{CertShare, ClusterConfig};
use crate::state::StateHub;

/// A follower has this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Bound {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

pub fn bind(cfg: &ClusterConfig, identity: &Identity) -> Result<Bound, super::StartError> {
    let tls = identity.server_config().map_err(super::StartError::Tls)?;
    let listener = crate::net::reusable_listener(cfg.listen, true).map_err(|error| {
        super::StartError::Listen { what: "the cluster feed", key: "cluster.listen", addr: cfg.listen, error }
    })?;
    tracing::info!(addr = %cfg.listen, "cluster: serving the feed");
    Ok(Bound { listener, acceptor: TlsAcceptor::from(Arc::new(tls)) })
}

/// What the feed is made of.
#[derive(Clone)]
pub struct Source {
    pub hub: Arc<StateHub>,
    pub certs: Option<CertShare>,
    pub node: String,
    /// Whether this agent is the issuer now.
    pub leader: watch::Receiver<bool>,
    pub heartbeat: Duration,
    pub followers: IntGauge,
}

pub async fn run(bound: Bound, src: Source) {
    let (certs, watcher) = watch_certs(src.certs.clone());
    // Stops the watcher when this task is aborted (the agent stopped serving the feed).
    let _watcher = AbortOnDrop(watcher);
    // Dropped (and so aborted) with this task, like the watcher.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = crate::net::accept(&bound.listener, "cluster feed").await;
        let (acceptor, src, certs) = (bound.acceptor.clone(), src.clone(), certs.clone());
        conns.spawn(async move {
            let _counted = Counted::new(src.followers.clone());
            if let Err(e) = feed(stream, &acceptor, &src, certs).await {
                tracing::info!(%peer, "cluster: follower gone: {e}");
            }
        });
    }
}

async fn feed(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    src: &Source,
    mut certs: watch::Receiver<Arc<Vec<CertPair>>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
        .map_err(|e| std::io::Error::other(format!("refused (not the cluster secret?): {e}")))?;
    let (mut acks, mut tls) = tokio::io::split(tls);
    let leader = *src.leader.borrow();
    wire::write(&mut tls, &Frame::Hello { node: src.node.clone(), leader }).await?;
    // The follower's acknowledgements come back on the same connection, read apart so a
    // read is never cut in the middle by the writes below.
    let follower = src.certs.as_ref().map(|c| c.challenges.follower());
    let relay = src.certs.as_ref().map(|c| c.relay.clone());
    let (refuse, mut refusals) = tokio::sync::mpsc::unbounded_channel();
    let node = src.node.clone();
    let _reader = AbortOnDrop(Some(tokio::spawn(async move {
        while let Ok(frame) = wire::read(&mut acks).await {
            match (frame, &follower) {
                (Frame::Ack { challenges }, Some(f)) => f.acknowledged(challenges),
                (Frame::Wanted { name }, _) => wanted(name, relay.as_deref(), &node, refuse.clone()),
                _ => {}
            }
        }
    })));
    let mut states = src.hub.subscribe();
    let mut challenges = src.certs.as_ref().map(|c| c.challenges.subscribe());
    let (mut send_state, mut send_certs, mut send_challenges) = (true, true, challenges.is_some());
    loop {
        if send_state {
            states.mark_unchanged();
            let snapshot = src.hub.load();
            wire::write(
                &mut tls,
                &Frame::State { generation: snapshot.generation, state: wire::for_the_wire(&snapshot.state) },
            )
            .await?;
        }
        if send_certs {
            let pairs = certs.borrow_and_update().as_ref().clone();
            wire::write(&mut tls, &Frame::Certs { certs: pairs }).await?;
        }
        if send_challenges {
            if let (Some(rx), Some(share)) = (challenges.as_mut(), src.certs.as_ref()) {
                rx.mark_unchanged();
                let version = share.challenges.version();
                wire::write(&mut tls, &Frame::Challenges { version, set: share.challenges.snapshot() })
                    .await?;
            }
        }
        let challenge_change = async {
            match challenges.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        (send_state, send_certs, send_challenges) = tokio::select! {
            r = states.changed() => (r.is_ok(), false, false),
            r = certs.changed() => (false, r.is_ok(), false),
            ok = challenge_change => (false, false, ok),
            Some((name, why)) = refusals.recv() => {
                wire::write(&mut tls, &Frame::NotObtained { name, why }).await?;
                (false, false, false)
            }
            () = tokio::time::sleep(src.heartbeat) => {
                wire::write(&mut tls, &Frame::Heartbeat).await?;
                (false, false, false)
            }
        };
    }
}

/// A follower's handshake wants an on-demand certificate for `name`: this agent obtains it
/// (the issuer orders; a manager asks its own feed in turn), and the certificate reaches the
/// follower with the feed's; a refusal goes back to it on `refuse`.
fn wanted(
    name: String,
    relay: Option<&crate::acme::on_demand::Relay>,
    node: &str,
    refuse: tokio::sync::mpsc::UnboundedSender<(String, String)>,
) {
    let Some(on_demand) = relay.and_then(crate::acme::on_demand::Relay::local) else {
        let _ = refuse.send((name, format!("on-demand TLS is off on {node}")));
        return;
    };
    tokio::spawn(async move {
        if let Err(why) = on_demand.ensure(&name).await {
            let _ = refuse.send((name, why));
        }
    });
}

/// The stored certificates, read again whenever the directory changes (checked every
/// second).
fn watch_certs(
    share: Option<CertShare>,
) -> (watch::Receiver<Arc<Vec<CertPair>>>, Option<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    let Some(share) = share else { return (rx, None) };
    let task = tokio::spawn(async move {
        let dir = share.store.certs_dir();
        let mut stamp = None;
        loop {
            let now = crate::tls::dir_stamp(&dir);
            if stamp.as_ref() != Some(&now) {
                tx.send_replace(Arc::new(read_pairs(&dir)));
                stamp = Some(now);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (rx, Some(task))
}

/// Counts a follower while it lives, however its task ends.
struct Counted(IntGauge);

impl Counted {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Aborts its task when dropped (the connection it serves is gone).
pub(super) struct AbortOnDrop(pub(super) Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Every complete `<name>.crt` + `<name>.key` pair in `dir`.
fn read_pairs(dir: &std::path::Path) -> Vec<CertPair> {
    let mut pairs = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return pairs };
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(name), Some("crt")) =
            (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str()))
        else {
            continue;
        };
        if let (Ok(chain_pem), Ok(key_pem)) =
            (std::fs::read_to_string(&path), std::fs::read_to_string(path.with_extension("key")))
        {
            pairs.push(CertPair { name: name.to_owned(), chain_pem, key_pem });
        }
    }
    pairs.sort_by(|a, b| a.name.cmp(&b.name));
    pairs
}
