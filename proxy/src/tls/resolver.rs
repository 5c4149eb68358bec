//! The SNI certificate resolver and the certificate directory loader.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::cert_info::CertInfo;
use crate::acme::{Challenges, ACME_TLS_ALPN};

/// Where a set of certificates comes from. On a name both have, `Files` wins: a certificate
/// the operator put in place overrides one meshgate ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CertSource {
    Acme,
    Files,
}

/// Certificates by lower-case name (`example.com`, or `default`), swapped whole.
#[derive(Debug)]
pub struct CertResolver {
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    /// Hosts served with a named certificate (nginx-proxy's `CERT_NAME`): host to name.
    named: ArcSwap<HashMap<String, String>>,
    /// Hosts that take TLS 1.3 only (`SSL_POLICY=Mozilla-Modern`).
    tls13_only: ArcSwap<std::collections::HashSet<String>>,
    /// Each source's newest set; `certs` is their merge. Only `replace` writes, under the lock.
    sources: Mutex<BTreeMap<CertSource, HashMap<String, Arc<CertifiedKey>>>>,
    fallback: Option<Arc<CertifiedKey>>,
    /// Answers to TLS-ALPN-01 challenges in progress.
    pub challenges: Arc<Challenges>,
}

impl CertResolver {
    /// `fallback` answers names without a certificate (`None`: the handshake fails).
    #[must_use]
    pub fn new(fallback: Option<Arc<CertifiedKey>>) -> Self {
        Self {
            certs: ArcSwap::from_pointee(HashMap::new()),
            named: ArcSwap::from_pointee(HashMap::new()),
            tls13_only: ArcSwap::default(),
            sources: Mutex::default(),
            fallback,
            challenges: Arc::default(),
        }
    }

    /// A self-signed certificate for names meshgate has no certificate for.
    #[must_use]
    pub fn self_signed() -> Arc<CertifiedKey> {
        let key = rcgen::KeyPair::generate().expect("key generation");
        let cert = rcgen::CertificateParams::new(vec!["meshgate.invalid".to_owned()])
            .expect("valid name")
            .self_signed(&key)
            .expect("self-signing");
        Arc::new(certified(cert.der().clone(), &key))
    }

    /// Replaces the certificates of one source and publishes the merge in one store.
    pub fn replace(&self, source: CertSource, certs: HashMap<String, Arc<CertifiedKey>>) {
        let mut sources = self.sources.lock().expect("resolver lock poisoned");
        sources.insert(source, certs);
        let mut merged = HashMap::new();
        for set in sources.values() {
            merged.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.certs.store(Arc::new(merged));
    }

    /// Serves each host of `named` with the certificate it names (nginx-proxy's
    /// `CERT_NAME`), from the next handshake on.
    pub fn set_named(&self, named: HashMap<String, String>) {
        if **self.named.load() != named {
            self.named.store(Arc::new(named));
        }
    }

    /// The hosts that take TLS 1.3 only, from the next handshake on.
    pub fn set_tls13_only(&self, hosts: std::collections::HashSet<String>) {
        if **self.tls13_only.load() != hosts {
            self.tls13_only.store(Arc::new(hosts));
        }
    }

    /// Whether some host takes TLS 1.3 only (handshakes must then look at the name first).
    #[must_use]
    pub fn any_tls13_only(&self) -> bool {
        !self.tls13_only.load().is_empty()
    }

    /// Whether `name` takes TLS 1.3 only.
    #[must_use]
    pub fn tls13_only(&self, name: &str) -> bool {
        self.tls13_only.load().contains(&name.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Whether the certificate called `name` (`<name>.crt`) is here.
    #[must_use]
    pub fn has_named(&self, name: &str) -> bool {
        self.certs.load().contains_key(&name.to_ascii_lowercase())
    }

    /// The certificate for `name`: the one it is told to use (`CERT_NAME`; none if that one
    /// is missing here, never another), else its own, else a wildcard certificate for its
    /// parent (`*.example.com` covers one label), else the nearest parent domain's (as
    /// nginx-proxy does), else `default`.
    #[must_use]
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(cert_name) = self.named.load().get(&name) {
            return certs.get(cert_name).cloned();
        }
        if let Some(c) = certs.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = certs.get(&format!("*.{parent}")) {
                return Some(c.clone());
            }
        }
        let mut candidate = name.as_str();
        loop {
            if let Some(c) = certs.get(candidate) {
                return Some(c.clone());
            }
            match candidate.split_once('.') {
                Some((_, parent)) if parent.contains('.') => candidate = parent,
                _ => break,
            }
        }
        certs.get("default").cloned()
    }

    /// Every certificate served, with its source's label and the name it is served for.
    #[must_use]
    pub fn served(&self) -> Vec<(&'static str, String, Arc<CertifiedKey>)> {
        let sources = self.sources.lock().expect("resolver lock poisoned");
        sources
            .iter()
            .flat_map(|(source, certs)| {
                let label = match source {
                    CertSource::Acme => "acme",
                    CertSource::Files => "files",
                };
                certs.iter().map(move |(name, key)| (label, name.clone(), key.clone()))
            })
            .collect()
    }

    /// Whether `name` has a certificate of its own (not the fallback): plain HTTP for it is
    /// redirected to HTTPS.
    #[must_use]
    pub fn has_certificate(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN)) {
            // A CA validating TLS-ALPN-01: only the challenge certificate will do.
            return hello.server_name().and_then(|n| self.challenges.alpn_certificate(n));
        }
        // No SNI (an old client, or one that connects by IP address): `default`, as nginx-proxy.
        let found = match hello.server_name() {
            Some(name) => self.find(name),
            None => self.certs.load().get("default").cloned(),
        };
        found.or_else(|| self.fallback.clone())
    }
}

/// A rustls signing key for a generated certificate.
#[must_use]
pub fn certified(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> CertifiedKey {
    let der = PrivateKeyDer::try_from(key.serialize_der()).expect("a generated key is valid DER");
    let signer =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).expect("a generated key is supported");
    CertifiedKey::new(vec![cert], signer)
}

/// One certificate file with its key, and the names it covers.
#[derive(Clone, Debug)]
pub struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// What a directory held: pairs by file name (without `.crt`), and what could not be used.
#[derive(Debug, Default)]
pub struct LoadedCerts {
    pub files: BTreeMap<String, LoadedPair>,
    pub problems: Vec<String>,
}

impl LoadedCerts {
    /// Certificates by name: each file under its own name (nginx-proxy's naming) and, where
    /// no file has that name, under every DNS name it covers (an ACME certificate for
    /// several host names is one file), wildcards as `*.example.com`.
    #[must_use]
    pub fn index(&self) -> HashMap<String, Arc<CertifiedKey>> {
        let mut out: HashMap<String, Arc<CertifiedKey>> =
            self.files.iter().map(|(n, p)| (n.clone(), p.key.clone())).collect();
        for pair in self.files.values() {
            for name in &pair.info.dns_names {
                out.entry(name.clone()).or_insert_with(|| pair.key.clone());
            }
        }
        out
    }
}

/// Loads every `<name>.crt` with its `<name>.key` from `dir`. A pair that does not load
/// (caught half-written, or broken) keeps its version from `previous`, so a certificate that
/// is being replaced is never missing for a moment.
#[must_use]
pub fn load_dir(dir: &Path, previous: Option<&LoadedCerts>) -> LoadedCerts {
    let mut out = LoadedCerts::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.problems.push(format!("cannot read {}: {e}", dir.display()));
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("crt") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_ascii_lowercase) else {
            continue;
        };
        match load_pair(&path, &path.with_extension("key")) {
            Ok(pair) => {
                out.files.insert(name, pair);
            }
            Err(e) => {
                out.problems.push(format!("{}: {e}", path.display()));
                if let Some(old) = previous.and_then(|p| p.files.get(&name)) {
                    out.files.insert(name, old.clone());
                }
            }
        }
    }
    out
}

/// Why a certificate and key pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("cannot read the certificate: {0}")]
    ReadCertificate(rustls::pki_types::pem::Error),
    #[error("no certificate in the file")]
    NoCertificate,
    #[error("{}: no usable private key: {error}", .path.display())]
    NoKey { path: std::path::PathBuf, error: rustls::pki_types::pem::Error },
    #[error("{}: unsupported key: {error}", .path.display())]
    UnsupportedKey { path: std::path::PathBuf, error: rustls::Error },
    #[error(transparent)]
    NotX509(#[from] super::cert_info::NotX509),
    #[error("the key does not match the certificate ({0})")]
    Mismatch(rustls::Error),
}

/// Reads a certificate chain and its key, and checks that they belong together.
pub fn load_pair(crt: &Path, key: &Path) -> Result<LoadedPair, PairError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(crt).and_then(Iterator::collect).map_err(PairError::ReadCertificate)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| PairError::NoKey { path: key.to_owned(), error })?;
    pair(chain, &der, key)
}

/// [`load_pair`] for PEM held in memory (`key_from` names it in errors).
pub fn pair_from_pem(chain_pem: &[u8], key_pem: &[u8], key_from: &Path) -> Result<LoadedPair, PairError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(PairError::ReadCertificate)?;
    let der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|error| PairError::NoKey { path: key_from.to_owned(), error })?;
    pair(chain, &der, key_from)
}

fn pair(
    chain: Vec<CertificateDer<'static>>,
    der: &PrivateKeyDer<'_>,
    key_from: &Path,
) -> Result<LoadedPair, PairError> {
    if chain.is_empty() {
        return Err(PairError::NoCertificate);
    }
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(der)
        .map_err(|error| PairError::UnsupportedKey { path: key_from.to_owned(), error })?;
    let info = CertInfo::parse(&chain[0])?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(PairError::Mismatch)?;
    Ok(LoadedPair { key: Arc::new(certified), info })
}

/// Names, sizes and times of the files in `dir`: changes when any file does.
#[must_use]
pub fn dir_stamp(dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let mut stamp: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), m.len(), m.modified().ok()?))
        })
        .collect();
    stamp.sort();
    stamp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, file: &str, names: &[&str]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn nginx_proxy_naming_exact_parent_and_default() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "shop.example.com", &["shop.example.com"]);
        pair(dir.path(), "example.org", &["example.org", "*.example.org"]);
        std::fs::write(dir.path().join("broken.crt"), "nope").unwrap();
        let loaded = load_dir(dir.path(), None);
        assert_eq!(loaded.files.len(), 2);
        assert!(loaded.problems[0].contains("broken.crt"), "{:?}", loaded.problems);
        let resolver = CertResolver::new(None);
        resolver.replace(CertSource::Files, loaded.index());
        assert!(resolver.has_certificate("SHOP.example.com"));
        assert!(
            resolver.has_certificate("a.b.example.org"),
            "a parent domain's certificate covers subdomains"
        );
        assert!(!resolver.has_certificate("other.example.com"));
        pair(dir.path(), "default", &["default.invalid"]);
        resolver.replace(CertSource::Files, load_dir(dir.path(), None).index());
        assert!(resolver.has_certificate("anything.test"));
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "a.test", &["a.test"]);
        pair(dir.path(), "b.test", &["b.test"]);
        std::fs::copy(dir.path().join("b.test.key"), dir.path().join("a.test.key")).unwrap();
        let loaded = load_dir(dir.path(), None);
        assert!(loaded.problems.iter().any(|p| p.contains("does not match")), "{:?}", loaded.problems);
        assert_eq!(loaded.files.len(), 1);
    }

    #[test]
    fn a_pair_caught_half_written_keeps_its_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "a.test", &["a.test"]);
        let first = load_dir(dir.path(), None);
        let next = tempfile::tempdir().unwrap();
        pair(next.path(), "a.test", &["a.test"]);
        // The new key is in place, the new certificate not yet.
        std::fs::rename(next.path().join("a.test.key"), dir.path().join("a.test.key")).unwrap();
        let second = load_dir(dir.path(), Some(&first));
        assert_eq!(second.problems.len(), 1, "{:?}", second.problems);
        assert!(Arc::ptr_eq(&second.files["a.test"].key, &first.files["a.test"].key));
        assert!(!load_dir(dir.path(), None).files.contains_key("a.test"));
    }

    #[test]
    fn a_certificate_for_several_names_is_found_under_each_and_files_beat_acme() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "a.test", &["a.test", "www.a.test", "*.wild.test"]);
        let resolver = CertResolver::new(None);
        resolver.replace(CertSource::Acme, load_dir(dir.path(), None).index());
        assert!(resolver.has_certificate("www.a.test"));
        let wild = resolver.find("x.wild.test").expect("a wildcard SAN covers one label");
        assert!(Arc::ptr_eq(&wild, &resolver.find("a.test").unwrap()));
        assert!(!resolver.has_certificate("y.x.wild.test"), "and only one");
        assert!(!resolver.has_certificate("wild.test"), "nor the base name");
        let acme = resolver.find("a.test").unwrap();
        let files = tempfile::tempdir().unwrap();
        pair(files.path(), "a.test", &["a.test"]);
        resolver.replace(CertSource::Files, load_dir(files.path(), None).index());
        assert!(!Arc::ptr_eq(&resolver.find("a.test").unwrap(), &acme), "the operator's file wins");
        assert!(Arc::ptr_eq(&resolver.find("www.a.test").unwrap(), &acme));
    }
}
