//! Certificates from an ACME CA (Let's Encrypt by default), ordered and renewed unattended.
//!
//! The [`manager`] derives the wanted certificates from each new state (routes whose TLS wish
//! is ACME: `LETSENCRYPT_HOST`, `meshgate.tls=acme`, a Traefik `certresolver`, the routes
//! file's `tls.acme`), keeps one task per certificate that orders it when missing and renews
//! it when due, and writes it to the [`store`]. The store's `certs/` directory is loaded into
//! the SNI resolver like any certificate directory, so a new certificate is served by the
//! next handshake and the old one until then.

mod challenges;
mod client;
pub mod dns01;
mod import;
pub mod manager;
pub mod on_demand;
mod order;
mod rfc2136;
mod schedule;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

pub use challenges::{ChallengeSet, Challenges, HTTP01_PREFIX};
pub use client::RootsError;
pub use dns01::{Dns01, DnsProvider};
pub use manager::Manager;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Let's Encrypt's production and staging directories.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How the CA checks that a name points at this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
pub enum ChallengeKind {
    /// The CA fetches `http://<name>/.well-known/acme-challenge/<token>` on port 80.
    #[default]
    #[serde(rename = "http-01")]
    #[value(name = "http-01")]
    Http01,
    /// The CA opens TLS to `<name>:443` offering ALPN `acme-tls/1`.
    #[serde(rename = "tls-alpn-01")]
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
    /// The CA looks up the TXT record `_acme-challenge.<name>` (the only way to a wildcard).
    #[serde(rename = "dns-01")]
    #[value(name = "dns-01")]
    Dns01,
}

impl ChallengeKind {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Dns01 => "dns-01",
        }
    }

    /// The challenge tried when this one failed (`acme.fallback`).
    #[must_use]
    pub fn other(self) -> Self {
        match self {
            Self::Http01 => Self::TlsAlpn01,
            Self::TlsAlpn01 | Self::Dns01 => Self::Http01,
        }
    }
}

/// The directory URL a name (`letsencrypt`, `letsencrypt-staging`) or URL stands for.
fn url_of(directory: &str) -> &str {
    match directory {
        "letsencrypt" => LETSENCRYPT,
        "letsencrypt-staging" => LETSENCRYPT_STAGING,
        url => url,
    }
}

/// The `[acme]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// Order certificates for the routes that ask for them (needs `tls.https_listen`).
    pub enabled: bool,
    /// The CA: `letsencrypt`, `letsencrypt-staging`, or the URL of any RFC 8555 directory.
    pub directory: String,
    /// Other CAs (names or URLs as `directory`), tried in order for a certificate when the
    /// one before keeps failing (unreachable, rate limits, errors); the first again after a
    /// success.
    pub fallback_directories: Vec<String>,
    /// Contact address given to the CA when the account is created (expiry warnings).
    pub email: Option<String>,
    /// External account binding, for CAs that require one (key id and base64url HMAC key).
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<String>,
    /// Account, certificates and locks. Keep it on a volume; agents may share it.
    pub storage_dir: PathBuf,
    /// The challenge tried first.
    pub challenge: ChallengeKind,
    /// When the first challenge fails, try the other one before backing off.
    pub fallback: bool,
    /// PEM file of extra CA certificates to trust for the ACME server's own HTTPS (a private
    /// CA, or a test server such as pebble). The public web roots are always trusted.
    pub trust_roots: Option<PathBuf>,
    /// Renew when this much validity is left. Unset: at two thirds of the lifetime, or in
    /// the window the CA suggests through ACME Renewal Information when it offers it.
    #[serde(with = "humantime_serde")]
    pub renew_before: Option<Duration>,
    /// Host names per certificate at most (Let's Encrypt allows 100).
    pub max_names: usize,
    /// First wait after a failed order; doubles per failure up to `retry_max` (a CA's
    /// `Retry-After` is always honoured).
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// One request to the CA may take this long.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// DNS-01 (wildcards, or `challenge = "dns-01"`): who publishes the TXT records.
    pub dns_provider: DnsProvider,
    /// Where a DNS-01 record must be seen before the CA is asked. Empty: mesh-dns's own
    /// listener, or the RFC 2136 server.
    pub dns_resolvers: Vec<SocketAddr>,
    /// How long a DNS-01 record may take to be seen there.
    #[serde(with = "humantime_serde")]
    pub dns_propagation_timeout: Duration,
    /// RFC 2136: the authoritative server that takes the updates, the zone they go in, and
    /// the TSIG key (name, algorithm, and a file holding the base64 secret).
    pub rfc2136_server: Option<SocketAddr>,
    pub rfc2136_zone: Option<String>,
    pub rfc2136_tsig_key: Option<String>,
    pub rfc2136_tsig_algorithm: String,
    pub rfc2136_tsig_secret_file: Option<PathBuf>,
    /// Certificates of the proxy you move from, used instead of a new order where they cover
    /// the names: Traefik's `acme.json`, or a directory of `<name>.crt`/`<name>.key`
    /// (acme-companion's `/etc/nginx/certs`).
    pub import: Vec<PathBuf>,
    /// On-demand TLS: a name without a certificate gets one at its first handshake if this
    /// URL answers 2xx to `GET <url>?domain=<name>` (http://, on your side). Unset: off.
    pub on_demand_ask: Option<String>,
    /// On-demand orders at once, at most.
    pub on_demand_concurrent: usize,
    /// On-demand orders a minute, at most.
    pub on_demand_per_minute: usize,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            directory: "letsencrypt".into(),
            fallback_directories: Vec::new(),
            email: None,
            eab_kid: None,
            eab_hmac_key: None,
            storage_dir: PathBuf::from("/var/lib/meshgate/acme"),
            challenge: ChallengeKind::Http01,
            fallback: true,
            trust_roots: None,
            renew_before: None,
            max_names: 100,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
            dns_provider: DnsProvider::MeshDns,
            dns_resolvers: Vec::new(),
            dns_propagation_timeout: Duration::from_secs(120),
            rfc2136_server: None,
            rfc2136_zone: None,
            rfc2136_tsig_key: None,
            rfc2136_tsig_algorithm: "hmac-sha256".into(),
            rfc2136_tsig_secret_file: None,
            import: Vec::new(),
            on_demand_ask: None,
            on_demand_concurrent: 2,
            on_demand_per_minute: 10,
        }
    }
}

impl AcmeConfig {
    /// The directory URL `directory` stands for.
    #[must_use]
    pub fn directory_url(&self) -> &str {
        url_of(&self.directory)
    }

    /// Every CA in order: `directory`, then `fallback_directories`.
    #[must_use]
    pub fn directory_urls(&self) -> Vec<String> {
        std::iter::once(&self.directory)
            .chain(&self.fallback_directories)
            .map(|d| url_of(d).to_owned())
            .collect()
    }

    /// The external account key, when one is configured.
    pub fn external_account(&self) -> Result<Option<instant_acme::ExternalAccountKey>, Invalid> {
        use base64::Engine as _;
        match (&self.eab_kid, &self.eab_hmac_key) {
            (None, None) => Ok(None),
            (Some(kid), Some(key)) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim().trim_end_matches('='))
                    .map_err(|e| Invalid::new("acme.eab_hmac_key", "(hidden)", format!("base64url ({e})")))?;
                Ok(Some(instant_acme::ExternalAccountKey::new(kid.clone(), &bytes)))
            }
            (kid, _) => Err(Invalid::new(
                if kid.is_some() { "acme.eab_kid" } else { "acme.eab_hmac_key" },
                "set alone",
                "acme.eab_kid and acme.eab_hmac_key go together: set both or neither",
            )),
        }
    }

    /// Checks what types cannot; each error names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        let keys = std::iter::once(("acme.directory", &self.directory))
            .chain(self.fallback_directories.iter().map(|d| ("acme.fallback_directories", d)));
        for (key, directory) in keys {
            if !url_of(directory).starts_with("https://") {
                return Err(Invalid::new(
                    key,
                    directory,
                    "letsencrypt, letsencrypt-staging or an https:// directory URL",
                ));
            }
        }
        self.external_account()?;
        if let Some(ask) = &self.on_demand_ask {
            if !ask.parse::<hyper::Uri>().is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some())
            {
                return Err(Invalid::new(
                    "acme.on_demand_ask",
                    ask,
                    "an http:// URL, e.g. http://127.0.0.1:5555/check",
                ));
            }
        }
        if !(1..=100).contains(&self.max_names) {
            return Err(Invalid::new("acme.max_names", self.max_names, "between 1 and 100"));
        }
        for (key, value) in [
            ("acme.retry_base", self.retry_base),
            ("acme.request_timeout", self.request_timeout),
            ("acme.dns_propagation_timeout", self.dns_propagation_timeout),
        ] {
            if value.is_zero() {
                return Err(Invalid::new(key, "0s", "above zero, e.g. \"30s\""));
            }
        }
        if self.retry_max < self.retry_base {
            return Err(Invalid::new(
                "acme.retry_max",
                humantime::format_duration(self.retry_max),
                "at least acme.retry_base",
            ));
        }
        if let Some(email) = self.email.as_ref().filter(|e| !e.contains('@')) {
            return Err(Invalid::new("acme.email", email, "an address such as ops@example.com"));
        }
        Ok(())
    }
}

/// A self-signed certificate for `names` and its key, PEM, for unit tests.
#[cfg(test)]
pub(crate) fn test_pem_pair(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_and_validation() {
        let mut c = AcmeConfig::default();
        assert_eq!(c.directory_url(), LETSENCRYPT);
        c.validate().unwrap();
        c.directory = "letsencrypt-staging".into();
        assert_eq!(c.directory_url(), LETSENCRYPT_STAGING);
        c.directory = "http://ca.test/dir".into();
        assert!(c.validate().unwrap_err().to_string().contains("acme.directory"));
        c.directory = "https://ca.test/dir".into();
        c.eab_kid = Some("kid".into());
        assert!(c.validate().unwrap_err().to_string().contains("together"));
        c.eab_hmac_key = Some("not base64!".into());
        assert!(c.validate().unwrap_err().to_string().contains("base64url"));
        c.eab_hmac_key = Some("c2VjcmV0".into());
        c.validate().unwrap();
        c.fallback_directories = vec!["letsencrypt".into(), "http://ca.test/dir".into()];
        assert!(c.validate().unwrap_err().to_string().contains("acme.fallback_directories"));
        c.fallback_directories.pop();
        assert_eq!(c.directory_urls(), ["https://ca.test/dir", LETSENCRYPT]);
    }
}
