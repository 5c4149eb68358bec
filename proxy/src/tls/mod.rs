//! HTTPS serving: the `[tls]` settings, certificates chosen by SNI through a resolver that
//! swaps atomically, loaded from a directory named as nginx-proxy names `/etc/nginx/certs`.
//! Certificates ordered through ACME (see [`crate::acme`]) are stored in the same layout and
//! loaded through the same resolver, as a second source.

/// The signature checks every rustls certificate verifier repeats (whatever it decides of
/// the certificate, the peer must hold its key), with the algorithms `algorithms` gives for
/// the verifier by its method `algorithms`: `signature_checks!(algorithms)` inside the
/// trait's `impl`.
macro_rules! signature_checks {
    ($algorithms:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, self.$algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, self.$algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$algorithms().supported_schemes()
        }
    };
}
pub(crate) use signature_checks;

pub mod cert_info;
pub mod client_auth;
mod expiry;
mod resolver;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use cert_info::CertInfo;
pub use expiry::ExpiryCollector;
pub use resolver::{
    certified, dir_stamp, load_dir, load_pair, pair_from_pem, CertResolver, CertSource, LoadedCerts,
    LoadedPair, PairError,
};

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
    /// Let clients resume TLS sessions (TLS 1.3 tickets, TLS 1.2 session ids) and skip the
    /// full handshake on reconnect. Off: every connection does a full handshake.
    pub session_resumption: bool,
    /// How often `certs_dir` is checked for changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            https_listen: None,
            certs_dir: None,
            unknown_names: UnknownNames::SelfSigned,
            session_resumption: true,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// The rustls server settings: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
#[must_use]
pub fn server_config(resolver: Arc<CertResolver>, session_resumption: bool) -> rustls::ServerConfig {
    server_config_with(resolver, session_resumption, false, Arc::new(rustls::server::NoClientAuth))
}

/// The same settings with TLS 1.3 only, for hosts whose policy asks for it.
#[must_use]
pub fn tls13_server_config(resolver: Arc<CertResolver>, session_resumption: bool) -> rustls::ServerConfig {
    server_config_with(resolver, session_resumption, true, Arc::new(rustls::server::NoClientAuth))
}

fn server_config_with(
    resolver: Arc<CertResolver>,
    session_resumption: bool,
    tls13_only: bool,
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> rustls::ServerConfig {
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    // The provider named, never the process default: the Docker client compiles ring in too.
    // aws-lc-rs: its RSA signs a full handshake in about 60% of ring's CPU time (bench/RESULTS.md).
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(versions)
            .expect("aws-lc-rs supports TLS 1.2 and 1.3")
            .with_client_cert_verifier(clients)
            .with_cert_resolver(resolver);
    // acme-tls/1 last: only a CA validating TLS-ALPN-01 offers it, and then nothing else.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), crate::acme::ACME_TLS_ALPN.to_vec()];
    if !session_resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    config
}

/// The CA certificates of a PEM file (an internal CA for tasks or for client certificates).
pub fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", path.display()))?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no CA certificate", path.display()));
    }
    Ok(roots)
}

/// Loads `dir` into `resolver` as `source`; a pair that fails keeps its version from
/// `previous`. Returns what was loaded, to pass as `previous` next time.
pub fn load_into(
    dir: &Path,
    resolver: &CertResolver,
    source: CertSource,
    previous: Option<&LoadedCerts>,
) -> LoadedCerts {
    let loaded = load_dir(dir, previous);
    for p in &loaded.problems {
        tracing::warn!("certificates: {p}; skipped");
    }
    tracing::info!(dir = %dir.display(), certificates = loaded.files.len(), "certificates loaded");
    resolver.replace(source, loaded.index());
    loaded
}

/// Reloads `dir` whenever a file in it changes, or at once when `wake` is notified (the ACME
/// manager does so after writing) or `reload` changes (the operator's SIGHUP). A reload swaps
/// the source's certificates in one store, so handshakes in progress are never disturbed.
pub async fn watch_dir(
    dir: PathBuf,
    poll: Duration,
    resolver: Arc<CertResolver>,
    source: CertSource,
    mut loaded: LoadedCerts,
    wake: Arc<Notify>,
    mut reload: tokio::sync::watch::Receiver<()>,
) {
    let mut seen = Some(resolver::dir_stamp(&dir));
    let mut tick = tokio::time::interval(poll);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            () = wake.notified() => true,
            Ok(()) = reload.changed() => true,
        };
        let stamp = resolver::dir_stamp(&dir);
        if !forced && seen.as_ref() == Some(&stamp) {
            continue;
        }
        seen = Some(stamp);
        loaded = load_into(&dir, &resolver, source, Some(&loaded));
    }
}
