//! The SNI certificate resolver and the certificate directory loader.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Certificates by lower-case name (`example.com`, or `default`), swapped whole.
#[derive(Debug)]
pub struct CertResolver {
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// `fallback` answers names without a certificate (`None`: the handshake fails).
    #[must_use]
    pub fn new(fallback: Option<Arc<CertifiedKey>>) -> Self {
        Self { certs: ArcSwap::from_pointee(HashMap::new()), fallback }
    }

    /// A self-signed certificate for names meshgate has no certificate for.
    #[must_use]
    pub fn self_signed() -> Arc<CertifiedKey> {
        let key = rcgen::KeyPair::generate().expect("key generation");
        let cert = rcgen::CertificateParams::new(vec!["meshgate.invalid".to_owned()]).expect("valid name").self_signed(&key).expect("self-signing");
        let der = PrivateKeyDer::try_from(key.serialize_der()).expect("a generated key is valid DER");
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("a generated key is supported");
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer))
    }

    pub fn replace(&self, certs: HashMap<String, Arc<CertifiedKey>>) {
        self.certs.store(Arc::new(certs));
    }

    /// The certificate for `name`: its own, else the nearest parent domain's (as
    /// nginx-proxy does), else `default`.
    #[must_use]
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
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

    /// Whether `name` has a certificate of its own (not the fallback): plain HTTP for it is
    /// redirected to HTTPS.
    #[must_use]
    pub fn has_certificate(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello.server_name().and_then(|n| self.find(n)).or_else(|| self.fallback.clone())
    }
}

/// What a directory held.
#[derive(Debug, Default)]
pub struct LoadedCerts {
    pub certs: HashMap<String, Arc<CertifiedKey>>,
    pub problems: Vec<String>,
}

/// Loads every `<name>.crt` with its `<name>.key` from `dir`.
#[must_use]
pub fn load_dir(dir: &Path) -> LoadedCerts {
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
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_ascii_lowercase) else { continue };
        match load_pair(&path, &path.with_extension("key")) {
            Ok(key) => {
                out.certs.insert(name, Arc::new(key));
            }
            Err(e) => out.problems.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

fn load_pair(crt: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(crt)
        .map_err(|e| format!("cannot read the certificate: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the file".into());
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| format!("{}: unsupported key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| format!("the key does not match the certificate ({e})"))?;
    Ok(certified)
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
        let cert = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn nginx_proxy_naming_exact_parent_and_default() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "shop.example.com", &["shop.example.com"]);
        pair(dir.path(), "example.org", &["example.org", "*.example.org"]);
        std::fs::write(dir.path().join("broken.crt"), "nope").unwrap();
        let loaded = load_dir(dir.path());
        assert_eq!(loaded.certs.len(), 2);
        assert!(loaded.problems[0].contains("broken.crt"), "{:?}", loaded.problems);
        let resolver = CertResolver::new(None);
        resolver.replace(loaded.certs);
        assert!(resolver.has_certificate("SHOP.example.com"));
        assert!(resolver.has_certificate("a.b.example.org"), "a parent domain's certificate covers subdomains");
        assert!(!resolver.has_certificate("other.example.com"));
        pair(dir.path(), "default", &["default.invalid"]);
        resolver.replace(load_dir(dir.path()).certs);
        assert!(resolver.has_certificate("anything.test"));
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "a.test", &["a.test"]);
        pair(dir.path(), "b.test", &["b.test"]);
        std::fs::copy(dir.path().join("b.test.key"), dir.path().join("a.test.key")).unwrap();
        let loaded = load_dir(dir.path());
        assert!(loaded.problems.iter().any(|p| p.contains("does not match")), "{:?}", loaded.problems);
        assert_eq!(loaded.certs.len(), 1);
    }
}
