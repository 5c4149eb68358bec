//! HTTPS serving: the `[tls]` settings, certificates chosen by SNI through a resolver that
//! swaps atomically, loaded from a directory named as nginx-proxy names `/etc/nginx/certs`.
//! (Certificates from ACME arrive with their own work and use the same resolver.)

mod resolver;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use resolver::{load_dir, CertResolver, LoadedCerts};

/// What a client gets for a name without a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownNames {
    /// A certificate generated at start (clients warn, but the handshake completes).
    #[default]
    SelfSigned,
    /// No certificate: the handshake fails.
    Reject,
}

/// The `[tls]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the HTTPS listener (e.g. `0.0.0.0:443`). Unset: no HTTPS.
    pub https_listen: Option<SocketAddr>,
    /// Certificates as nginx-proxy names them: `<host>.crt` and `<host>.key` (a parent
    /// domain's pair also covers its subdomains), `default.crt`/`default.key` for the rest.
    pub certs_dir: Option<PathBuf>,
    pub unknown_names: UnknownNames,
    /// How often `certs_dir` is checked for changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { https_listen: None, certs_dir: None, unknown_names: UnknownNames::SelfSigned, poll_interval: Duration::from_secs(1) }
    }
}

/// The rustls server settings: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
#[must_use]
pub fn server_config(resolver: Arc<CertResolver>) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// Loads `dir` now, then reloads it whenever a file in it changes; a reload swaps the
/// certificates in one store, so handshakes in progress are never disturbed.
pub async fn watch_dir(dir: PathBuf, poll: Duration, resolver: Arc<CertResolver>) {
    let mut seen = None;
    let mut tick = tokio::time::interval(poll);
    loop {
        tick.tick().await;
        let stamp = resolver::dir_stamp(&dir);
        if seen.as_ref() == Some(&stamp) {
            continue;
        }
        seen = Some(stamp);
        let LoadedCerts { certs, problems } = load_dir(&dir);
        for p in &problems {
            tracing::warn!("certificates: {p}; skipped");
        }
        tracing::info!(dir = %dir.display(), certificates = certs.len(), "certificates loaded");
        resolver.replace(certs);
    }
}
