//! TLS towards tasks (`VIRTUAL_PROTO=https`). By default, like nginx-proxy (nginx's default
//! `proxy_ssl_verify off`), the task's certificate is not verified: tasks sit on a private
//! network, usually with self-signed certificates; the TLS protects the bytes, not the
//! identity. A route that asks ([`UpstreamTls`]) gets its tasks verified against its
//! internal CA (or the web roots), with SNI and, where the task asks, a client certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::state::UpstreamTls;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AnyCertificate {
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.0.signature_verification_algorithms
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // Signatures are still checked: the peer must hold the key of the certificate it sent.
    super::signature_checks!(algorithms);
}

/// The one client configuration for every https task (built once).
pub fn connector() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// The connector for a route's TLS settings, and the name to present and verify (`None`: the
/// task's address). Built once per distinct setting; an error (a file that cannot be read on
/// this node) is the route's failure, never an unverified connection.
pub fn connector_for(tls: &UpstreamTls) -> Result<tokio_rustls::TlsConnector, String> {
    static BUILT: OnceLock<Mutex<HashMap<UpstreamTls, tokio_rustls::TlsConnector>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    if let Some(c) = built.lock().expect("connector lock").get(tls) {
        return Ok(c.clone());
    }
    let connector = if tls.verify { verified(tls)? } else { connector() };
    built.lock().expect("connector lock").insert(tls.clone(), connector.clone());
    Ok(connector)
}

fn verified(tls: &UpstreamTls) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject as _;
    let roots = match &tls.ca {
        Some(ca) => super::ca_roots(ca)?,
        None => rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect)
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
