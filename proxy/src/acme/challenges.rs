//! Answers to the ACME challenges in progress: HTTP-01 key authorizations by token (served on
//! the plain-HTTP listener before any routing), TLS-ALPN-01 certificates by host name
//! (chosen by the SNI resolver when a client offers `acme-tls/1`).
//!
//! DNS-01 TXT values by record name (`_acme-challenge.example.com`), answered by mesh-dns.
//!
//! HTTP-01 answers are also written to `<storage>/challenges/`, so an agent that shares the
//! storage directory but did not place the order still answers a validation that reaches it.
//! In a cluster, the issuer's challenges reach the other agents through the feed
//! ([`Challenges::set_remote`]), so a validation that reaches any node is answered.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The path prefix of HTTP-01 validation requests.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug)]
pub struct Challenges {
    http: RwLock<HashMap<String, String>>,
    /// This agent's DNS-01 TXT values by record name (an order for `a.test` and `*.a.test`
    /// publishes two values under one name).
    dns: RwLock<BTreeMap<String, Vec<String>>>,
    /// This agent's TLS-ALPN-01 certificates, with the digest they carry (for the feed).
    alpn: RwLock<HashMap<String, (Arc<CertifiedKey>, String)>>,
    /// The issuer's challenges, received through the cluster feed.
    remote: RwLock<Remote>,
    /// Where other agents sharing the storage put their HTTP-01 answers.
    shared_dir: RwLock<Option<PathBuf>>,
    /// Bumped on every change, for the feed.
    changed: watch::Sender<u64>,
    /// The feed's followers: the challenge version each has acknowledged.
    followers: std::sync::Mutex<HashMap<u64, u64>>,
    /// Bumped on every acknowledgement.
    acked: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Remote {
    set: ChallengeSet,
    alpn: HashMap<String, Arc<CertifiedKey>>,
}

impl Default for Challenges {
    fn default() -> Self {
        Self {
            http: RwLock::default(),
            dns: RwLock::default(),
            alpn: RwLock::default(),
            remote: RwLock::default(),
            shared_dir: RwLock::default(),
            changed: watch::channel(0).0,
            followers: std::sync::Mutex::default(),
            acked: watch::channel(0).0,
        }
    }
}

impl Challenges {
    /// Wakes on every change of [`Challenges::snapshot`].
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The version of the current set (what [`Challenges::subscribe`] carries).
    #[must_use]
    pub fn version(&self) -> u64 {
        *self.changed.borrow()
    }

    /// A feed follower to wait for; forgotten when the returned guard drops.
    pub fn follower(self: &Arc<Self>) -> Follower {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.followers.lock().expect("challenges lock").insert(id, 0);
        Follower { challenges: self.clone(), id }
    }

    /// Waits until every follower acknowledged the current challenges, at most `limit`.
    /// Returns false on timeout (the CA is asked anyway: a follower that is too slow only
    /// risks a validation that reaches it).
    pub async fn propagated(&self, limit: std::time::Duration) -> bool {
        let version = self.version();
        let mut acks = self.acked.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            acks.borrow_and_update();
            if self.followers.lock().expect("challenges lock").values().all(|v| *v >= version) {
                return true;
            }
            if !matches!(tokio::time::timeout_at(deadline, acks.changed()).await, Ok(Ok(()))) {
                return false;
            }
        }
    }

    /// Every challenge this agent answers: its own and the issuer's (a manager relays them
    /// to the workers that follow it).
    #[must_use]
    pub fn snapshot(&self) -> ChallengeSet {
        let mut set = self.remote.read().expect("challenges lock").set.clone();
        set.http
            .extend(self.http.read().expect("challenges lock").iter().map(|(k, v)| (k.clone(), v.clone())));
        set.alpn.extend(
            self.alpn.read().expect("challenges lock").iter().map(|(k, (_, d))| (k.clone(), d.clone())),
        );
        for (name, values) in self.dns.read().expect("challenges lock").iter() {
            set.dns.entry(name.clone()).or_default().extend(values.iter().cloned());
        }
        set
    }

    /// Replaces the issuer's challenges. TLS-ALPN-01 certificates are made here from the
    /// digests (kept for names that stay), so no private key crosses the network.
    pub fn set_remote(&self, set: ChallengeSet) {
        let mut remote = self.remote.write().expect("challenges lock");
        if remote.set == set {
            return;
        }
        let mut alpn = HashMap::new();
        for (name, digest) in &set.alpn {
            if remote.set.alpn.get(name) == Some(digest) {
                if let Some(cert) = remote.alpn.get(name) {
                    alpn.insert(name.clone(), cert.clone());
                    continue;
                }
            }
            match hex_decode(digest)
                .ok_or_else(|| "not hex".to_owned())
                .and_then(|d| alpn_certificate(name, &d).map_err(|e| e.to_string()))
            {
                Ok(cert) => {
                    alpn.insert(name.clone(), cert);
                }
                Err(e) => {
                    tracing::warn!(host = %name, "cluster: cannot make the TLS-ALPN-01 certificate the issuer asked for: {e}");
                }
            }
        }
        *remote = Remote { set, alpn };
        drop(remote);
        self.bump();
    }

    /// Also look for HTTP-01 answers in `dir` (the store's `challenges/`).
    pub fn share_through(&self, dir: PathBuf) {
        *self.shared_dir.write().expect("challenges lock") = Some(dir);
    }

    /// The key authorization for an HTTP-01 request path, if it is one of ours.
    #[must_use]
    pub fn http_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
        if let Some(answer) = self.http.read().expect("challenges lock").get(token) {
            return Some(answer.clone());
        }
        if let Some(answer) = self.remote.read().expect("challenges lock").set.http.get(token) {
            return Some(answer.clone());
        }
        let dir = self.shared_dir.read().expect("challenges lock").clone()?;
        std::fs::read_to_string(dir.join(token)).ok()
    }

    /// The TLS-ALPN-01 certificate for `name`, while its validation is in progress.
    #[must_use]
    pub fn alpn_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some((cert, _)) = self.alpn.read().expect("challenges lock").get(&name) {
            return Some(cert.clone());
        }
        self.remote.read().expect("challenges lock").alpn.get(&name).cloned()
    }

    /// Publishes an HTTP-01 answer until the returned guard is dropped.
    pub fn add_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Answer {
        self.http.write().expect("challenges lock").insert(token.to_owned(), key_authorization.to_owned());
        self.bump();
        let shared = self.shared_dir.read().expect("challenges lock").as_ref().map(|d| d.join(token));
        if let Some(path) = &shared {
            if let Err(e) = super::store::write_atomic(path, key_authorization.as_bytes()) {
                tracing::debug!(path = %path.display(), "acme: HTTP-01 answer not shared with other agents: {e}");
            }
        }
        Answer { challenges: self.clone(), kind: AnswerKind::Http { token: token.to_owned(), shared } }
    }

    /// Publishes a DNS-01 TXT value under `record` (`_acme-challenge.<name>`) until the
    /// returned guard is dropped.
    pub fn add_dns(self: &Arc<Self>, record: &str, value: &str) -> Answer {
        let record = record.trim_end_matches('.').to_ascii_lowercase();
        self.dns.write().expect("challenges lock").entry(record.clone()).or_default().push(value.to_owned());
        self.bump();
        Answer { challenges: self.clone(), kind: AnswerKind::Dns { record, value: value.to_owned() } }
    }

    /// Publishes a TLS-ALPN-01 certificate for `name` (RFC 8737: a self-signed certificate for
    /// the name with the `acmeIdentifier` extension holding the key authorization's digest)
    /// until the returned guard is dropped.
    pub fn add_alpn(self: &Arc<Self>, name: &str, digest: &[u8]) -> Result<Answer, rcgen::Error> {
        let certified = alpn_certificate(name, digest)?;
        let name = name.to_ascii_lowercase();
        let hex = digest.iter().fold(String::new(), |mut hex, b| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
            hex
        });
        self.alpn.write().expect("challenges lock").insert(name.clone(), (certified, hex));
        self.bump();
        Ok(Answer { challenges: self.clone(), kind: AnswerKind::Alpn { name } })
    }
}

/// A follower of the feed, as the issuer's challenges see it.
pub struct Follower {
    challenges: Arc<Challenges>,
    id: u64,
}

impl Follower {
    /// The follower answers the challenges of `version` (and its own followers do).
    pub fn acknowledged(&self, version: u64) {
        if let Some(v) = self.challenges.followers.lock().expect("challenges lock").get_mut(&self.id) {
            *v = (*v).max(version);
        }
        self.challenges.acked.send_modify(|n| *n += 1);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.challenges.followers.lock().expect("challenges lock").remove(&self.id);
        self.challenges.acked.send_modify(|n| *n += 1);
    }
}

/// The RFC 8737 validation certificate for `name` carrying `digest`.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok(Arc::new(crate::tls::certified(cert.der().clone(), &key)))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A published challenge answer; withdrawn when dropped (the order ended, or was abandoned).
pub struct Answer {
    challenges: Arc<Challenges>,
    kind: AnswerKind,
}

enum AnswerKind {
    Http { token: String, shared: Option<PathBuf> },
    Dns { record: String, value: String },
    Alpn { name: String },
}

impl Drop for Answer {
    fn drop(&mut self) {
        match &self.kind {
            AnswerKind::Http { token, shared } => {
                self.challenges.http.write().expect("challenges lock").remove(token);
                self.challenges.bump();
                if let Some(path) = shared {
                    let _ = std::fs::remove_file(path);
                }
            }
            AnswerKind::Dns { record, value } => {
                let mut dns = self.challenges.dns.write().expect("challenges lock");
                if let Some(values) = dns.get_mut(record) {
                    if let Some(at) = values.iter().position(|v| v == value) {
                        values.remove(at);
                    }
                    if values.is_empty() {
                        dns.remove(record);
                    }
                }
                drop(dns);
                self.challenges.bump();
            }
            AnswerKind::Alpn { name } => {
                self.challenges.alpn.write().expect("challenges lock").remove(name);
                self.challenges.bump();
            }
        }
    }
}

/// HTTP-01 answers by token; TLS-ALPN-01 by host name, as the hex SHA-256 of the key
/// authorization (each node makes its own validation certificate from it: no key travels);
/// DNS-01 TXT values by record name (every node's mesh-dns answers them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeSet {
    pub http: BTreeMap<String, String>,
    pub alpn: BTreeMap<String, String>,
    /// Absent in the feed of an agent older than DNS-01.
    #[serde(default)]
    pub dns: BTreeMap<String, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_exist_while_their_guard_lives() {
        let c = Arc::new(Challenges::default());
        let dir = tempfile::tempdir().unwrap();
        c.share_through(dir.path().to_owned());
        let answer = c.add_http("tok-EN_1", "tok-EN_1.thumb");
        assert_eq!(c.http_answer("/.well-known/acme-challenge/tok-EN_1").as_deref(), Some("tok-EN_1.thumb"));
        assert_eq!(std::fs::read_to_string(dir.path().join("tok-EN_1")).unwrap(), "tok-EN_1.thumb");
        assert_eq!(c.http_answer("/.well-known/acme-challenge/../etc/passwd"), None);
        assert_eq!(c.http_answer("/other/tok-EN_1"), None);
        drop(answer);
        assert_eq!(c.http_answer("/.well-known/acme-challenge/tok-EN_1"), None);
        assert!(!dir.path().join("tok-EN_1").exists());

        // Another agent's answer, found through the shared directory.
        std::fs::write(dir.path().join("theirs"), "theirs.thumb").unwrap();
        assert_eq!(c.http_answer("/.well-known/acme-challenge/theirs").as_deref(), Some("theirs.thumb"));

        let wild = c.add_dns("_acme-challenge.A.test.", "v-wild");
        let apex = c.add_dns("_acme-challenge.a.test", "v-apex");
        assert_eq!(c.snapshot().dns["_acme-challenge.a.test"], ["v-wild", "v-apex"]);
        drop(wild);
        assert_eq!(c.snapshot().dns["_acme-challenge.a.test"], ["v-apex"]);
        drop(apex);
        assert!(c.snapshot().dns.is_empty(), "a name without values is gone");

        let alpn = c.add_alpn("A.test", &[7; 32]).unwrap();
        assert!(c.alpn_certificate("a.test.").is_some());
        assert_eq!(c.snapshot().alpn["a.test"], "07".repeat(32));
        drop(alpn);
        assert!(c.alpn_certificate("a.test").is_none());
    }

    #[test]
    fn the_issuers_challenges_are_answered_and_relayed() {
        let c = Arc::new(Challenges::default());
        let mut changes = c.subscribe();
        let own = c.add_http("mine", "mine.t");
        c.set_remote(ChallengeSet {
            http: [("theirs".into(), "theirs.t".into())].into(),
            alpn: [("b.test".into(), "ab".repeat(32)), ("bad.test".into(), "zz".into())].into(),
            dns: [("_acme-challenge.b.test".into(), vec!["theirs".into()])].into(),
        });
        assert!(changes.has_changed().unwrap());
        assert_eq!(c.http_answer("/.well-known/acme-challenge/theirs").as_deref(), Some("theirs.t"));
        let cert = c.alpn_certificate("B.test").expect("made from the digest");
        assert!(c.alpn_certificate("bad.test").is_none(), "a digest that is not hex makes no certificate");
        let relayed = c.snapshot();
        assert_eq!(relayed.http.len(), 2, "own and remote answers are both relayed: {relayed:?}");
        assert_eq!(
            relayed.dns["_acme-challenge.b.test"],
            ["theirs"],
            "the issuer's DNS-01 values are relayed"
        );
        // The same set again changes nothing, and the certificate is kept.
        changes.mark_unchanged();
        let mut same = relayed.clone();
        same.http.remove("mine");
        c.set_remote(same);
        assert!(!changes.has_changed().unwrap());
        assert!(Arc::ptr_eq(&cert, &c.alpn_certificate("b.test").unwrap()));
        c.set_remote(ChallengeSet::default());
        assert!(c.alpn_certificate("b.test").is_none());
        assert_eq!(c.http_answer("/.well-known/acme-challenge/theirs"), None);
        drop(own);
    }

    #[tokio::test]
    async fn the_issuer_waits_until_every_follower_acknowledged() {
        let c = Arc::new(Challenges::default());
        assert!(c.propagated(std::time::Duration::from_millis(1)).await, "no follower: nothing to wait for");
        let follower = c.follower();
        let _answer = c.add_http("tok", "tok.t");
        let version = c.version();
        assert!(
            !c.propagated(std::time::Duration::from_millis(50)).await,
            "a follower that did not acknowledge holds the validation back until the limit"
        );
        follower.acknowledged(version - 1);
        assert!(!c.propagated(std::time::Duration::from_millis(50)).await, "an older set does not count");
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.propagated(std::time::Duration::from_secs(30)).await }
        });
        follower.acknowledged(version);
        assert!(waiting.await.unwrap(), "the acknowledgement wakes the issuer");
        let slow = c.follower();
        assert!(!c.propagated(std::time::Duration::from_millis(50)).await);
        drop(slow);
        assert!(
            c.propagated(std::time::Duration::from_millis(1)).await,
            "a follower that left is not waited for"
        );
    }
}
