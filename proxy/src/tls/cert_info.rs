//! What a certificate says about itself: the names it covers and when it is valid.
//! Read from the leaf's DER with x509-parser; used to index a SAN certificate under every
//! name it covers and to decide when an ACME certificate is due for renewal.

use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The parts of a leaf certificate meshgate cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names of the subject alternative name extension, lower-case.
    pub dns_names: Vec<String>,
    /// Who signed it: the issuer's common name (else its whole name), for the inventory.
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A certificate that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("not an X.509 certificate: {0}")]
pub struct NotX509(x509_parser::nom::Err<x509_parser::error::X509Error>);

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, NotX509> {
        let (_, cert) = X509Certificate::from_der(der).map_err(NotX509)?;
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    dns_names.push(n.to_ascii_lowercase());
                }
            }
        }
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let issuer = cert
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_owned))
            .unwrap_or_else(|| cert.issuer().to_string());
        Ok(Self {
            dns_names,
            issuer,
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }

    /// Whether the certificate names every one of `names` (exactly; wildcards are not ordered).
    #[must_use]
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(n)))
    }

    /// Time left until expiry (zero once expired).
    #[must_use]
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_validity_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["A.test".to_owned(), "b.test".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1);
        let cert = params.self_signed(&key).unwrap();
        let info = CertInfo::parse(cert.der()).unwrap();
        assert_eq!(info.dns_names, ["a.test", "b.test"]);
        assert!(info.covers(&["b.test".into(), "a.test".into()]));
        assert!(!info.covers(&["c.test".into()]));
        let days = info.not_after.duration_since(info.not_before).unwrap().as_secs() / 86400;
        assert_eq!(days, 90);
        assert!(CertInfo::parse(b"garbage").is_err());
    }
}
