//! Client certificates (mutual TLS from clients, Traefik's `clientAuth`): a host whose routes
//! name a CA (`client_ca`) asks the client for a certificate at the handshake and verifies
//! it against that CA. rustls decides client authentication per server configuration, not
//! per name, so each CA gets its own configuration, chosen by the name the client asks for
//! ([`crate::http::server`]'s named handshake). What a connection proved is checked again on
//! each request (421 when its Host is not the name that was verified, 403 without the
//! certificate), so neither HTTP/2 connection reuse nor a Host header skips a route's CA.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::CertResolver;

/// What a host asks of clients at the handshake: a certificate from `ca`; `required` when
/// every route of the host asks for it (else a client without one completes the handshake
/// and only the routes that ask refuse it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Demand {
    pub ca: Arc<Path>,
    pub required: bool,
}

/// What a TLS connection that asked for a client certificate proved, kept for its requests.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The name the client asked for (SNI), lower-case.
    pub name: Option<String>,
    /// The CA the handshake asked a client certificate from.
    pub ca: Arc<Path>,
    /// The client sent a certificate and it verified against `ca`.
    pub certificate: bool,
}

/// The server configurations for client certificates, one per CA file (rebuilt when the file
/// changes: a CA rotated on disk takes effect at the next handshake).
pub struct ClientAuthConfigs {
    resolver: Arc<CertResolver>,
    built: Mutex<HashMap<(Demand, bool), Built>>,
}

/// A configuration, and the CA file's size and time it was built from.
type Built = ((u64, Option<SystemTime>), Arc<rustls::ServerConfig>);

impl ClientAuthConfigs {
    #[must_use]
    pub fn new(resolver: Arc<CertResolver>) -> Self {
        Self { resolver, built: Mutex::default() }
    }

    /// The configuration for `demand` (TLS 1.3 only when `tls13_only`). An error (the CA
    /// cannot be read on this node) fails the handshake: never served without the check.
    pub fn config(&self, demand: &Demand, tls13_only: bool) -> Result<Arc<rustls::ServerConfig>, String> {
        let meta = std::fs::metadata(&demand.ca).map_err(|e| format!("{}: {e}", demand.ca.display()))?;
        let stamp = (meta.len(), meta.modified().ok());
        let key = (demand.clone(), tls13_only);
        if let Some((seen, config)) = self.built.lock().expect("client auth lock").get(&key) {
            if *seen == stamp {
                return Ok(config.clone());
            }
        }
        let config = Arc::new(self.build(demand, tls13_only)?);
        self.built.lock().expect("client auth lock").insert(key, (stamp, config.clone()));
        Ok(config)
    }

    fn build(&self, demand: &Demand, tls13_only: bool) -> Result<rustls::ServerConfig, String> {
        let roots = Arc::new(super::ca_roots(&demand.ca)?);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider);
        let builder = if demand.required { builder } else { builder.allow_unauthenticated() };
        let verifier = builder.build().map_err(|e| format!("{}: {e}", demand.ca.display()))?;
        // No session resumption: a session resumed here would carry no fresh proof, and
        // one from another name's configuration must never stand in for the certificate.
        Ok(super::server_config_with(self.resolver.clone(), false, tls13_only, verifier))
    }
}
