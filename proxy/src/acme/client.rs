//! The HTTP client instant-acme talks to the CA with: rustls with the public web roots (plus
//! a configured root for a private CA or a test server such as pebble), a deadline on every
//! request (a CA that hangs must not hang the order), and a note of the `Retry-After` of the
//! last error answer (instant-acme does not surface it with a rate-limit problem).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

type Hyper = Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// One client per order, so a `Retry-After` is never read by another order.
#[derive(Clone)]
pub struct AcmeHttp {
    client: Hyper,
    timeout: Duration,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

/// Why the CA's client cannot be made: the extra roots (`acme.trust_roots`).
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("acme.trust_roots: cannot read {}: {error}", .path.display())]
    Read { path: std::path::PathBuf, error: rustls::pki_types::pem::Error },
    #[error("acme.trust_roots: {} holds no PEM certificate", .0.display())]
    Empty(std::path::PathBuf),
    #[error("acme.trust_roots: {}: {error}", .path.display())]
    Refused { path: std::path::PathBuf, error: rustls::Error },
}

impl AcmeHttp {
    /// `extra_root`: a PEM file of CA certificates to trust besides the public roots.
    pub fn new(extra_root: Option<&Path>, timeout: Duration) -> Result<Self, RootsError> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = extra_root {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect)
                .map_err(|error| RootsError::Read { path: path.to_owned(), error })?;
            if certs.is_empty() {
                return Err(RootsError::Empty(path.to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|error| RootsError::Refused { path: path.to_owned(), error })?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            retry_after: Arc::default(),
        })
    }

    /// A copy with its own `Retry-After` note (same connection pool).
    #[must_use]
    pub fn for_order(&self) -> Self {
        Self { retry_after: Arc::default(), ..self.clone() }
    }

    /// The `Retry-After` of the newest error answer, if it had one.
    #[must_use]
    pub fn retry_after(&self) -> Option<SystemTime> {
        *self.retry_after.lock().expect("retry-after lock")
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let (fut, timeout, note) = (self.client.request(req), self.timeout, self.retry_after.clone());
        Box::pin(async move {
            let rsp = tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| {
                    instant_acme::Error::Other(format!("the CA did not answer within {timeout:?}").into())
                })?
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            if !rsp.status().is_success() {
                if let Some(at) = rsp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after)
                {
                    *note.lock().expect("retry-after lock") = Some(at);
                }
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn parse_retry_after(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let soon = parse_retry_after(" 120 ").unwrap();
        let left = soon.duration_since(SystemTime::now()).unwrap().as_secs();
        assert!((118..=120).contains(&left), "{left}");
        let date = parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT").unwrap();
        assert_eq!(date.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 946_684_799);
        assert!(parse_retry_after("soon").is_none());
    }
}
