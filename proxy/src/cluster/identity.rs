//! The cluster credential: one self-signed certificate and its key, shared by every agent
//! (a Docker secret in a Swarm). The feed is mutual TLS 1.3 where each side accepts exactly
//! that certificate and nothing else, so only holders of the secret can read the state or
//! the certificates' private keys, and the traffic is encrypted.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;

/// The name in the credential's certificate (and the SNI the followers send).
pub const CLUSTER_NAME: &str = "meshgate-cluster";

/// A new credential as PEM (certificate, then key): `meshgate --new-cluster-secret`.
pub fn generate() -> Result<String, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![CLUSTER_NAME.to_owned()])?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(4000, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

/// A loaded credential.
#[derive(Clone)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(..)")
    }
}

/// Why the cluster secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the cluster secret {}: {error}", .path.display())]
    Read { path: std::path::PathBuf, error: std::io::Error },
    #[error("the cluster secret {} {problem} (make a new one with `meshgate --new-cluster-secret`)", .path.display())]
    Broken { path: std::path::PathBuf, problem: PemProblem },
}

/// What is wrong with a secret's PEM.
#[derive(Debug, thiserror::Error)]
pub enum PemProblem {
    #[error("holds no certificate")]
    NoCertificate,
    #[error("has a broken certificate: {0}")]
    BrokenCertificate(rustls::pki_types::pem::Error),
    #[error("has no usable private key: {0}")]
    NoKey(rustls::pki_types::pem::Error),
}

impl Identity {
    /// Reads the PEM file written by [`generate`].
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let pem = std::fs::read(path).map_err(|error| SecretError::Read { path: path.to_owned(), error })?;
        Self::from_pem(&pem).map_err(|problem| SecretError::Broken { path: path.to_owned(), problem })
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, PemProblem> {
        use rustls::pki_types::pem::PemObject as _;
        let cert = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or(PemProblem::NoCertificate)?
            .map_err(PemProblem::BrokenCertificate)?;
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(PemProblem::NoKey)?;
        Ok(Self { cert, key: Arc::new(key) })
    }

    /// For the agents that serve the feed: present the credential, demand it back.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, rustls::Error> {
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(Pinned::new(self.cert.clone())))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
    }

    /// For the agents that follow it: accept only the credential, present it too.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, rustls::Error> {
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::new(self.cert.clone())))
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
    }
}

/// Accepts a peer that presents exactly `cert` and proves it holds its key (the handshake
/// signature is verified as usual); no chains, no names, no expiry games.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn new(cert: CertificateDer<'static>) -> Self {
        Self { cert, provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()) }
    }

    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    crate::tls::signature_checks!(algorithms);
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    crate::tls::signature_checks!(algorithms);
}
