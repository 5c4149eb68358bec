//! A CA with the answers Debian's pebble 2.4 cannot give: a small HTTPS proxy in front of it
//! (test code, a mock only for what pebble lacks) that adds renewal information (ARI, RFC
//! 9773) to the directory and answers new orders with `rateLimited` and a `Retry-After`.
//! Everything else is pebble's own answer: pebble builds its URLs from the request's `Host`,
//! so the proxy passes it unchanged and the whole protocol runs through the proxy.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::acme::{handshake, routes, wait_for_certificate, AcmeAgent, Pebble, PebbleSetup, Ports};
use crate::harness::{eventually, Backend};

/// What the proxy adds to pebble's answers.
#[derive(Default)]
pub(crate) struct Faults {
    /// New orders answered `rateLimited` before pebble sees one.
    pub(crate) rate_limited_orders: u32,
    /// The `Retry-After` of those answers, in seconds.
    pub(crate) retry_after: u64,
    /// The directory offers renewal information: each query gets the next window (the last
    /// one again when they run out).
    pub(crate) renewal_windows: Option<VecDeque<(SystemTime, SystemTime)>>,
}

/// One request the proxy saw: when, and `METHOD /path`.
pub(crate) type Seen = (Instant, String);

pub(crate) struct FaultyCa {
    addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultyCa {
    /// Starts the proxy in front of `pebble`, with pebble's own listener certificate (the
    /// agent already trusts its CA).
    pub(crate) async fn start(pebble: &Pebble, faults: Faults) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        let (cert, key) = pebble.listener_pair();
        let chain =
            rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config =
            crate::harness::tls_server_builder().with_no_client_auth().with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Upstream::new(pebble);
        let faults = Arc::new(Mutex::new(faults));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream, faults, log) =
                    (acceptor.clone(), upstream.clone(), faults.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req| {
                        let (upstream, faults, log) = (upstream.clone(), faults.clone(), log.clone());
                        async move {
                            log.lock()
                                .unwrap()
                                .push((Instant::now(), format!("{} {}", req.method(), req.uri().path())));
                            Ok::<_, std::convert::Infallible>(answer(req, &upstream, &faults).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub(crate) fn directory(&self) -> String {
        format!("https://{}/dir", self.addr)
    }

    /// The times of the requests whose `METHOD /path` starts with `what`.
    pub(crate) fn times(&self, what: &str) -> Vec<Instant> {
        self.seen.lock().unwrap().iter().filter(|(_, r)| r.starts_with(what)).map(|(t, _)| *t).collect()
    }
}

/// Pebble, reached over TLS (trusting its listener CA), one connection per request.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
}

impl Upstream {
    fn new(pebble: &Pebble) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&pebble.trust).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = crate::harness::tls_client_builder().with_root_certificates(roots).with_no_client_auth();
        Self { addr: pebble.listen(), connector: tokio_rustls::TlsConnector::from(Arc::new(config)) }
    }

    /// Pebble's answer; `Err` (pebble closed early): the agent gets a 502 and retries.
    async fn send(&self, req: hyper::Request<Full<Bytes>>) -> Result<hyper::Response<Bytes>, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
        let tls = self.connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        Ok(hyper::Response::from_parts(parts, body.collect().await.map_err(|e| e.to_string())?.to_bytes()))
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    upstream: &Upstream,
    faults: &Mutex<Faults>,
) -> hyper::Response<Full<Bytes>> {
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    let path = req.uri().path().to_owned();
    if req.method() == hyper::Method::POST && path == "/order-plz" {
        let mut f = faults.lock().unwrap();
        if f.rate_limited_orders > 0 {
            f.rate_limited_orders -= 1;
            let problem = r#"{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many new orders (fault proxy)", "status": 429}"#;
            return hyper::Response::builder()
                .status(429)
                .header("content-type", "application/problem+json")
                .header("retry-after", f.retry_after.to_string())
                .body(Full::new(Bytes::from(problem)))
                .unwrap();
        }
    }
    if path.starts_with("/renewal-info/") {
        let mut f = faults.lock().unwrap();
        let windows = f.renewal_windows.as_mut().expect("only offered with windows");
        let (start, end) = if windows.len() > 1 { windows.pop_front().unwrap() } else { windows[0] };
        let body = format!(
            r#"{{"suggestedWindow": {{"start": "{}", "end": "{}"}}}}"#,
            humantime::format_rfc3339_seconds(start),
            humantime::format_rfc3339_seconds(end)
        );
        return hyper::Response::builder()
            .header("content-type", "application/json")
            .header("retry-after", "3600")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut forward =
        hyper::Request::builder().method(parts.method).uri(parts.uri.path_and_query().unwrap().as_str());
    for (name, value) in &parts.headers {
        forward = forward.header(name, value);
    }
    let resp = match upstream.send(forward.body(Full::new(body)).unwrap()).await {
        Ok(resp) => resp,
        Err(e) => return hyper::Response::builder().status(502).body(Full::new(Bytes::from(e))).unwrap(),
    };
    let (mut parts, mut body) = resp.into_parts();
    let ari = faults.lock().unwrap().renewal_windows.is_some();
    if path == "/dir" && ari {
        let mut dir: serde_json::Value = serde_json::from_slice(&body).unwrap();
        dir["renewalInfo"] = format!("https://{host}/renewal-info").into();
        body = Bytes::from(serde_json::to_vec(&dir).unwrap());
        parts.headers.remove(hyper::header::CONTENT_LENGTH);
    }
    parts.headers.remove(hyper::header::TRANSFER_ENCODING);
    hyper::Response::from_parts(parts, Full::new(body))
}

/// Certificates issue, item 5: a CA that offers renewal information (ARI) gets the
/// certificate renewed in the window it suggests (here within seconds of issuance, where
/// two thirds of its hour-long lifetime would be 40 minutes away), and asked again after
/// the renewal (its next window is far away: no second order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cas_renewal_window_ari_decides_when_a_certificate_is_renewed() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let now = SystemTime::now();
    let soon = (now + Duration::from_secs(3), now + Duration::from_secs(5));
    let far = (now + Duration::from_secs(3000), now + Duration::from_secs(3100));
    let faults = Faults { renewal_windows: Some(VecDeque::from([soon, far])), ..Faults::default() };
    let ca = FaultyCa::start(&pebble, faults).await;
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes(&web, &["ari.acme.test"]), &ports, &pebble, storage.path(), |c| {
        c.acme.directory = ca.directory();
    })
    .await;
    let first = wait_for_certificate(&agent, "ari.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    eventually("renewed in the window the CA suggested", Duration::from_secs(30), async || {
        handshake(agent.https_addr(), "ari.acme.test", &root).await.is_ok_and(|d| d != first)
    })
    .await;
    let asked = ca.times("GET /renewal-info/");
    let orders = ca.times("POST /order-plz");
    assert_eq!(orders.len(), 2, "one order, one renewal");
    let seen: Vec<String> = ca.seen.lock().unwrap().iter().map(|(_, r)| r.clone()).collect();
    assert!(!asked.is_empty() && asked[0] < orders[1], "the window was asked before the renewal: {seen:?}");
    eventually("the renewed certificate's window is asked for", Duration::from_secs(10), async || {
        ca.times("GET /renewal-info/").last().is_some_and(|t| *t > orders[1])
    })
    .await;
    assert_eq!(ca.times("POST /order-plz").len(), 2, "the far window: no third order");
}

/// Certificates issue, items 5 and 8: a CA that answers `rateLimited` with a `Retry-After`
/// is not asked again before that time (the agent's own back-off is far shorter here),
/// never in a loop, the failure is counted under its reason, and the order succeeds after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_order_waits_for_retry_after_then_succeeds() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let faults = Faults { rate_limited_orders: 2, retry_after: 3, ..Faults::default() };
    let ca = FaultyCa::start(&pebble, faults).await;
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["limited.acme.test"]), &ports, &pebble, storage.path(), |c| {
            c.acme.directory = ca.directory();
        })
        .await;
    wait_for_certificate(&agent, "limited.acme.test", &pebble, Duration::from_secs(60)).await;
    let orders = ca.times("POST /order-plz");
    assert_eq!(orders.len(), 3, "two refused, then the one that succeeded: {orders:?}");
    for pair in orders.windows(2) {
        let waited = pair[1] - pair[0];
        assert!(
            waited >= Duration::from_millis(2900),
            "Retry-After: 3 honoured, asked again after {waited:?}"
        );
    }
    let limited = "meshgate_acme_failures_total{certificate=\"limited.acme.test\",reason=\"rate_limited\"}";
    assert_eq!(agent.counter(limited).await, 2);
}
