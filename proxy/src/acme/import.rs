//! Certificates from the proxy a user moves from, so that the move orders nothing the CA
//! already issued (and hits none of its rate limits): Traefik's `acme.json` (the
//! certificates of every resolver in it) and a directory in nginx-proxy's layout
//! (`<name>.crt` with `<name>.key`, as acme-companion fills `/etc/nginx/certs`).
//!
//! Read once at start. When meshgate would order a certificate, a valid imported one that
//! covers the same names and is not yet due for renewal is put in the store instead; from
//! then on it is meshgate's, renewed as any other. Accounts are not imported: meshgate's ACME
//! client signs with ECDSA P-256 keys, Traefik's and acme.sh's are RSA by default, and a new
//! account costs no rate limit that matters.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use crate::tls::{pair_from_pem, LoadedPair};

/// A certificate found in an import source, with its PEM as it goes into the store.
#[derive(Clone)]
pub struct Candidate {
    pub pair: LoadedPair,
    pub chain_pem: String,
    pub key_pem: String,
    /// Where it was found, for the log.
    pub from: String,
}

/// Every usable certificate of `sources`, and what could not be read (each problem names
/// its file).
#[must_use]
pub fn load(sources: &[PathBuf]) -> (Vec<Candidate>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for source in sources {
        if source.is_dir() {
            from_directory(source, &mut found, &mut problems);
        } else {
            match std::fs::read(source) {
                Ok(bytes) => from_traefik(source, &bytes, &mut found, &mut problems),
                Err(e) => problems.push(format!("{}: {e}", source.display())),
            }
        }
    }
    (found, problems)
}

/// The newest valid candidate that covers every one of `names` and is not due for renewal
/// yet (`due` says when, from the certificate's validity).
#[must_use]
pub fn best<'a>(
    candidates: &'a [Candidate],
    names: &[String],
    due: impl Fn(&LoadedPair) -> SystemTime,
) -> Option<&'a Candidate> {
    let now = SystemTime::now();
    candidates
        .iter()
        .filter(|c| c.pair.info.covers(names) && c.pair.info.not_before <= now && due(&c.pair) > now)
        .max_by_key(|c| c.pair.info.not_after)
}

fn from_directory(dir: &Path, found: &mut Vec<Candidate>, problems: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        problems.push(format!("{}: cannot be read", dir.display()));
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "crt") {
            continue;
        }
        let key = path.with_extension("key");
        // acme-companion's are symbolic links into `<name>/`: read follows them.
        match (std::fs::read_to_string(&path), std::fs::read_to_string(&key)) {
            (Ok(chain), Ok(key_pem)) => {
                push(found, problems, chain, key_pem, &key, path.display().to_string());
            }
            (Err(e), _) | (_, Err(e)) => problems.push(format!("{}: {e}", path.display())),
        }
    }
}

/// Traefik's `acme.json`: `{ "<resolver>": { "Certificates": [ { "domain": {…},
/// "certificate": base64(PEM chain), "key": base64(PEM key) } ] } }`.
#[derive(Deserialize)]
struct Resolver {
    #[serde(rename = "Certificates", default)]
    certificates: Option<Vec<TraefikCertificate>>,
}

#[derive(Deserialize)]
struct TraefikCertificate {
    certificate: String,
    key: String,
}

fn from_traefik(file: &Path, bytes: &[u8], found: &mut Vec<Candidate>, problems: &mut Vec<String>) {
    use base64::Engine as _;
    let resolvers: std::collections::BTreeMap<String, Resolver> = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!("{}: not a Traefik acme.json ({e})", file.display()));
            return;
        }
    };
    for (resolver, content) in resolvers {
        for (i, cert) in content.certificates.unwrap_or_default().into_iter().enumerate() {
            let decode = |b64: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
                    .and_then(|pem| String::from_utf8(pem).ok())
            };
            let from = format!("{} ({resolver}, certificate {i})", file.display());
            match (decode(&cert.certificate), decode(&cert.key)) {
                (Some(chain), Some(key_pem)) => {
                    push(found, problems, chain, key_pem, file, from);
                }
                _ => problems.push(format!("{from}: not base64 PEM")),
            }
        }
    }
}

fn push(
    found: &mut Vec<Candidate>,
    problems: &mut Vec<String>,
    chain_pem: String,
    key_pem: String,
    key_from: &Path,
    from: String,
) {
    match pair_from_pem(chain_pem.as_bytes(), key_pem.as_bytes(), key_from) {
        Ok(pair) => found.push(Candidate { pair, chain_pem, key_pem, from }),
        Err(e) => problems.push(format!("{from}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::test_pem_pair as pem_pair;

    #[test]
    fn traefik_json_and_a_companion_directory_and_what_is_wrong_with_them() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = pem_pair(&["a.test", "b.test"]);
        let json = format!(
            r#"{{"le": {{"Account": {{"Email": "x@a.test"}}, "Certificates": [
                {{"domain": {{"main": "a.test", "sans": ["b.test"]}}, "certificate": "{}", "key": "{}", "Store": "default"}},
                {{"domain": {{"main": "c.test"}}, "certificate": "bm9wZQ==", "key": "bm9wZQ==", "Store": "default"}}]}},
               "empty": {{"Certificates": null}}}}"#,
            b64(&chain),
            b64(&key)
        );
        let acme_json = dir.path().join("acme.json");
        std::fs::write(&acme_json, json).unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(certs.join("d.test")).unwrap();
        let (chain, key) = pem_pair(&["d.test"]);
        std::fs::write(certs.join("d.test/fullchain.pem"), chain).unwrap();
        std::fs::write(certs.join("d.test/key.pem"), key).unwrap();
        std::os::unix::fs::symlink("./d.test/fullchain.pem", certs.join("d.test.crt")).unwrap();
        std::os::unix::fs::symlink("./d.test/key.pem", certs.join("d.test.key")).unwrap();

        let (found, problems) = load(&[acme_json, certs, dir.path().join("missing.json")]);
        assert_eq!(found.len(), 2, "{problems:?}");
        assert_eq!(problems.len(), 2, "the broken certificate and the missing file: {problems:?}");
        let far = |_: &LoadedPair| SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(best(&found, &["b.test".into(), "a.test".into()], far).is_some());
        assert!(best(&found, &["d.test".into()], far).is_some());
        assert!(best(&found, &["a.test".into(), "e.test".into()], far).is_none(), "all names or none");
        assert!(best(&found, &["d.test".into()], |_| SystemTime::UNIX_EPOCH).is_none(), "not when due");
    }
}
