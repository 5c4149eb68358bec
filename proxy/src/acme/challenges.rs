//! Answers to the ACME challenges in progress: HTTP-01 key authorizations by token (served on
//! the plain-HTTP listener before any routing), TLS-ALPN-01 certificates by host name
//! (chosen by the SNI resolver when a client offers `acme-tls/1`).
//!
//! HTTP-01 answers are also written to `<storage>/challenges/`, so an agent that shares the
//! storage directory but did not place the order still answers a validation that reaches it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::sign::CertifiedKey;

/// The path prefix of HTTP-01 validation requests.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Default)]
pub struct Challenges {
    http: RwLock<HashMap<String, String>>,
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// Where other agents sharing the storage put their HTTP-01 answers.
    shared_dir: RwLock<Option<PathBuf>>,
}

impl Challenges {
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
        let dir = self.shared_dir.read().expect("challenges lock").clone()?;
        std::fs::read_to_string(dir.join(token)).ok()
    }

    /// The TLS-ALPN-01 certificate for `name`, while its validation is in progress.
    #[must_use]
    pub fn alpn_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.read().expect("challenges lock").get(&name.trim_end_matches('.').to_ascii_lowercase()).cloned()
    }

    /// Publishes an HTTP-01 answer until the returned guard is dropped.
    pub fn add_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Answer {
        self.http.write().expect("challenges lock").insert(token.to_owned(), key_authorization.to_owned());
        let shared = self.shared_dir.read().expect("challenges lock").as_ref().map(|d| d.join(token));
        if let Some(path) = &shared {
            if let Err(e) = super::store::write_atomic(path, key_authorization.as_bytes()) {
                tracing::debug!(path = %path.display(), "acme: HTTP-01 answer not shared with other agents: {e}");
            }
        }
        Answer { challenges: self.clone(), kind: AnswerKind::Http { token: token.to_owned(), shared } }
    }

    /// Publishes a TLS-ALPN-01 certificate for `name` (RFC 8737: a self-signed certificate for
    /// the name with the `acmeIdentifier` extension holding the key authorization's digest)
    /// until the returned guard is dropped.
    pub fn add_alpn(self: &Arc<Self>, name: &str, digest: &[u8]) -> Result<Answer, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key)?;
        let certified = Arc::new(crate::tls::certified(cert.der().clone(), &key));
        let name = name.to_ascii_lowercase();
        self.alpn.write().expect("challenges lock").insert(name.clone(), certified);
        Ok(Answer { challenges: self.clone(), kind: AnswerKind::Alpn { name } })
    }
}

/// A published challenge answer; withdrawn when dropped (the order ended, or was abandoned).
pub struct Answer {
    challenges: Arc<Challenges>,
    kind: AnswerKind,
}

enum AnswerKind {
    Http { token: String, shared: Option<PathBuf> },
    Alpn { name: String },
}

impl Drop for Answer {
    fn drop(&mut self) {
        match &self.kind {
            AnswerKind::Http { token, shared } => {
                self.challenges.http.write().expect("challenges lock").remove(token);
                if let Some(path) = shared {
                    let _ = std::fs::remove_file(path);
                }
            }
            AnswerKind::Alpn { name } => {
                self.challenges.alpn.write().expect("challenges lock").remove(name);
            }
        }
    }
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

        let alpn = c.add_alpn("A.test", &[7; 32]).unwrap();
        assert!(c.alpn_certificate("a.test.").is_some());
        drop(alpn);
        assert!(c.alpn_certificate("a.test").is_none());
    }
}
