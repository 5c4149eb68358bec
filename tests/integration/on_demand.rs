//! On-demand TLS against pebble: a name nobody configured a certificate for gets one during
//! its first handshake, if the operator's `ask` endpoint (a small HTTP server of the test)
//! allows it; refused names fail the handshake and are not asked about again at once; the
//! per-minute cap holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::acme::{handshake, AcmeAgent, Pebble, PebbleSetup, Ports};
use crate::harness::Backend;

/// The operator's `ask` endpoint: 200 for the allowed names, 403 for others; counts asks.
pub(crate) struct Ask {
    pub(crate) url: String,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

impl Ask {
    async fn start(allowed: &[&str]) -> Self {
        Self::start_on([127, 0, 0, 1].into(), allowed).await
    }

    /// The endpoint on `ip` (an address the agents' namespaces reach).
    pub(crate) async fn start_on(ip: std::net::IpAddr, allowed: &[&str]) -> Self {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let allowed: Vec<String> = allowed.iter().map(|a| (*a).to_owned()).collect();
        let counts = asked.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let (counts, allowed) = (counts.clone(), allowed.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let domain = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|target| target.split("domain=").nth(1))
                        .unwrap_or("")
                        .to_owned();
                    *counts.lock().unwrap().entry(domain.clone()).or_default() += 1;
                    let status = if allowed.contains(&domain) { "200 OK" } else { "403 Forbidden" };
                    let _ = stream
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                });
            }
        });
        Self { url, asked }
    }

    pub(crate) fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// Certificates issue, item 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_gets_its_certificate_at_its_first_handshake_only_if_the_ask_endpoint_allows_it() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::http01_only(&ports)).await;
    let ask = Ask::start(&["shop.ondemand.test", "late.ondemand.test"]).await;
    // Routes without a certificate wish: only on-demand TLS can give them one.
    let hosts =
        ["shop.ondemand.test", "refused.ondemand.test", "late.ondemand.test"].map(|h| format!("\"{h}\""));
    let routes = format!(
        "[[services]]\nname = \"web\"\ntasks = [{{ address = \"{}\" }}]\n[[services.http]]\nhosts = [{}]\nport = 1\n",
        web.addr,
        hosts.join(", ")
    );
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes, &ports, &pebble, storage.path(), |c| {
        c.acme.challenge = meshgate::acme::ChallengeKind::Http01;
        c.acme.on_demand_ask = Some(ask.url.clone());
        c.acme.on_demand_per_minute = 1;
        c.tls.unknown_names = meshgate::tls::UnknownNames::Reject;
    })
    .await;
    let root = pebble.root().await;

    let started = Instant::now();
    let first = handshake(agent.https_addr(), "shop.ondemand.test", &root)
        .await
        .expect("the first handshake waits for its certificate");
    println!(
        "first handshake with an on-demand certificate: {} ms (HTTP-01, pebble)",
        started.elapsed().as_millis()
    );
    for _ in 0..3 {
        assert_eq!(handshake(agent.https_addr(), "shop.ondemand.test", &root).await.unwrap(), first);
    }
    let (ok, out) = agent.curl(&root, "shop.ondemand.test", &[]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
    assert_eq!(ask.asked("shop.ondemand.test"), 1, "asked once, ordered once");
    assert_eq!(agent.counter("meshgate_acme_certificates_issued_total").await, 1);
    assert!(storage.path().join("certs/shop.ondemand.test.crt").exists());
    let kept = std::fs::read_to_string(storage.path().join("on-demand")).unwrap();
    assert_eq!(kept.trim(), "shop.ondemand.test", "kept renewed, also after a restart");

    // A refused name: the handshake fails, and the next one does not ask again at once.
    for _ in 0..2 {
        assert!(handshake(agent.https_addr(), "refused.ondemand.test", &root).await.is_err());
    }
    assert_eq!(ask.asked("refused.ondemand.test"), 1);
    // An allowed name over the per-minute cap (1): refused, no order.
    assert!(handshake(agent.https_addr(), "late.ondemand.test", &root).await.is_err());
    assert_eq!(ask.asked("late.ondemand.test"), 1);
    assert_eq!(agent.counter("meshgate_acme_certificates_issued_total").await, 1);
}
