//! ACME against a real CA: Debian's `pebble`, started per test with its own listener
//! certificate, validating through the agent's own mesh-dns (`-dnsserver`), which answers the
//! routed host names with 127.0.0.1. Certificates are checked with curl and a rustls client
//! that trust only pebble's root.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate::config::Config;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::harness::{curl, eventually, Backend, Mesh};

/// A free loopback port (TCP and UDP), for parts that must know each other's ports before
/// either starts (pebble validates on fixed ports; the agent needs pebble's URL).
///
/// The port is released before use, so the kernel may offer it again: each port is handed
/// out once per test run, or two listeners of one agent could be given the same port.
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Where pebble validates challenges, and what it issues.
pub(crate) struct PebbleSetup {
    pub(crate) http_port: u16,
    pub(crate) tls_port: u16,
    pub(crate) dns: SocketAddr,
    pub(crate) validity_secs: u64,
    pub(crate) eab: Option<(&'static str, &'static str)>,
    pub(crate) blocklist: Vec<&'static str>,
}

impl PebbleSetup {
    /// Validation on the agent's own ports, names resolved by its mesh-dns.
    pub(crate) fn on(ports: &Ports, validity_secs: u64) -> Self {
        Self {
            http_port: ports.http,
            tls_port: ports.https,
            dns: ports.dns(),
            validity_secs,
            eab: None,
            blocklist: vec![],
        }
    }

    /// As [`PebbleSetup::on`], with TLS-ALPN-01 sent where nothing listens: HTTP-01 only.
    pub(crate) fn http01_only(ports: &Ports) -> Self {
        Self { tls_port: free_port(), ..Self::on(ports, 3600) }
    }
}

/// A pebble process; `kill` and `start_again` simulate a CA that goes away and comes back
/// (as a new CA: pebble keeps no state, so accounts and roots are new).
pub(crate) struct Pebble {
    setup_file: PathBuf,
    dns: SocketAddr,
    listen: SocketAddr,
    mgmt: SocketAddr,
    pub(crate) trust: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Pebble {
    pub(crate) async fn start(setup: PebbleSetup) -> Self {
        Self::start_on(setup, [127, 0, 0, 1].into()).await
    }

    /// Pebble with its directory and management listeners on `ip`.
    pub(crate) async fn start_on(setup: PebbleSetup, ip: std::net::IpAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // pebble's own HTTPS listener needs a certificate: a test CA signs one for 127.0.0.1.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "pebble listener CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![ip.to_string(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let trust = dir.path().join("listener-ca.pem");
        std::fs::write(&trust, ca_cert.pem()).unwrap();

        let listen = SocketAddr::new(ip, free_port());
        let mgmt = SocketAddr::new(ip, free_port());
        let macs = setup.eab.map_or_else(|| "{}".into(), |(kid, key)| format!("{{\"{kid}\": \"{key}\"}}"));
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "{listen}", "managementListenAddress": "{mgmt}", "certificate": "{d}/cert.pem", "privateKey": "{d}/key.pem",
               "httpPort": {http}, "tlsPort": {tls}, "ocspResponderURL": "", "externalAccountBindingRequired": {eab}, "externalAccountMACKeys": {macs},
               "domainBlocklist": {blocked:?}, "certificateValidityPeriod": {validity}}}}}"#,
            d = dir.path().display(),
            http = setup.http_port,
            tls = setup.tls_port,
            eab = setup.eab.is_some(),
            blocked = setup.blocklist,
            validity = setup.validity_secs,
        );
        let setup_file = dir.path().join("pebble.json");
        std::fs::write(&setup_file, config).unwrap();
        let mut pebble = Self { setup_file, dns: setup.dns, listen, mgmt, trust, child: None, dir };
        pebble.start_again().await;
        pebble
    }

    /// Starts the process (again) on the same ports and waits until it answers.
    async fn start_again(&mut self) {
        let child = Command::new("pebble")
            .args(["-config", self.setup_file.to_str().unwrap(), "-dnsserver", &self.dns.to_string()])
            // No random validation delays, no injected bad nonces: the test is about meshgate.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble is installed (the README's test command installs it)");
        self.child = Some(child);
        let url = format!("https://{}/dir", self.listen);
        let trust = self.trust.to_str().unwrap().to_owned();
        eventually("pebble answers", Duration::from_secs(15), async || {
            curl(&["-f", "--cacert", &trust, &url]).await.0
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the process: a CA that hangs without closing.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("pebble runs").id().to_string();
        assert!(Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
    }

    pub(crate) fn directory(&self) -> String {
        format!("https://{}/dir", self.listen)
    }

    /// Where pebble's directory listens.
    pub(crate) fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The certificate and key of pebble's own listener (signed by the CA in `trust`).
    pub(crate) fn listener_pair(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("cert.pem"), self.dir.path().join("key.pem"))
    }

    /// The root pebble signs certificates with (new on every start).
    pub(crate) async fn root(&self) -> PathBuf {
        let (ok, pem) = curl(&[
            "-f",
            "--cacert",
            self.trust.to_str().unwrap(),
            &format!("https://{}/roots/0", self.mgmt),
        ])
        .await;
        assert!(ok, "pebble's root: {pem}");
        let path = self.dir.path().join(format!("root-{}.pem", fastrand::u64(..)));
        std::fs::write(&path, pem).unwrap();
        path
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent with HTTPS, ACME against `pebble` and mesh-dns answering routed hosts with
/// 127.0.0.1, on the ports pebble validates.
pub(crate) struct AcmeAgent {
    pub(crate) mesh: Mesh,
    storage: PathBuf,
}

pub(crate) struct Ports {
    pub(crate) http: u16,
    pub(crate) https: u16,
    pub(crate) dns: u16,
}

impl Ports {
    pub(crate) fn new() -> Self {
        Self { http: free_port(), https: free_port(), dns: free_port() }
    }

    pub(crate) fn dns(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.dns).parse().unwrap()
    }
}

pub(crate) fn routes(backend: &Backend, hosts: &[&str]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!("[[services]]\nname = \"web\"\ntasks = [{{ address = \"{}\" }}]\n[[services.http]]\nhosts = [{}]\nport = 1\ntls = {{ acme = true }}\n", backend.addr, hosts.join(", "))
}

impl AcmeAgent {
    pub(crate) async fn start(
        routes: &str,
        ports: &Ports,
        pebble: &Pebble,
        storage: &Path,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mesh = Mesh::start_with(routes, |c| {
            c.proxy.http_listen = format!("127.0.0.1:{}", ports.http).parse().unwrap();
            c.tls.https_listen = Some(format!("127.0.0.1:{}", ports.https).parse().unwrap());
            c.tls.poll_interval = Duration::from_millis(100);
            c.dns.listen = Some(ports.dns());
            c.dns.answer_routed_hosts = true;
            c.dns.node_addresses = vec!["127.0.0.1".parse().unwrap()];
            c.acme.directory = pebble.directory();
            c.acme.trust_roots = Some(pebble.trust.clone());
            storage.clone_into(&mut c.acme.storage_dir);
            c.acme.email = Some("ops@acme.test".into());
            c.acme.retry_base = Duration::from_millis(200);
            c.acme.retry_max = Duration::from_secs(2);
            c.acme.request_timeout = Duration::from_secs(3);
            tweak(c);
        })
        .await;
        Self { mesh, storage: storage.to_owned() }
    }

    pub(crate) fn https_addr(&self) -> SocketAddr {
        self.mesh.agent.https_addr.unwrap()
    }

    /// curl over HTTPS, trusting only `root`.
    pub(crate) async fn curl(&self, root: &Path, host: &str, extra: &[&str]) -> (bool, String) {
        let port = self.https_addr().port();
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/");
        let mut args = vec!["--resolve", &resolve, "--cacert", root.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args).await
    }

    /// The `/api/state` certificate entry served for `name`.
    async fn inventory_entry(&self, name: &str) -> serde_json::Value {
        let state: serde_json::Value =
            serde_json::from_str(&curl(&[&self.mesh.admin_url("/api/state")]).await.1).unwrap();
        state["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} is listed: {}", state["certificates"]))
            .clone()
    }

    /// A counter: the sum of the samples whose line starts with `prefix`.
    pub(crate) async fn counter(&self, prefix: &str) -> u64 {
        self.metric(prefix).await as u64
    }

    /// Sum of the samples of a metric whose line starts with `prefix`.
    async fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = curl(&[&self.mesh.admin_url("/metrics")]).await;
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A TLS handshake verified against `root` only; returns the leaf's DER.
pub(crate) async fn handshake(addr: SocketAddr, host: &str, root: &Path) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// Waits until `host` presents a certificate that verifies against `root`; returns its DER.
pub(crate) async fn wait_for_certificate(
    agent: &AcmeAgent,
    host: &str,
    root_of: &Pebble,
    deadline: Duration,
) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let root = root_of.root().await;
        if let Ok(der) = handshake(agent.https_addr(), host, &root).await {
            return der;
        }
        assert!(start.elapsed() < deadline, "no certificate for {host} within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_a_certificate_for_every_name_served_over_https_and_h2() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::http01_only(&ports)).await;
    let storage = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let agent = AcmeAgent::start(
        &routes(&web, &["shop.acme.test", "www.shop.acme.test"]),
        &ports,
        &pebble,
        storage.path(),
        |c| {
            c.acme.challenge = meshgate::acme::ChallengeKind::Http01;
            c.acme.fallback = false;
        },
    )
    .await;
    let first = wait_for_certificate(&agent, "shop.acme.test", &pebble, Duration::from_secs(30)).await;
    println!(
        "route to first verified HTTPS handshake: {} ms (HTTP-01, pebble)",
        started.elapsed().as_millis()
    );

    let root = pebble.root().await;
    // Certificates issue, item 7: the inventory says who issued it and when it is renewed.
    let entry = agent.inventory_entry("shop.acme.test").await;
    assert!(entry["issuer"].as_str().unwrap_or("").contains("Pebble"), "{entry}");
    assert!(entry["next_renewal"].is_string() && entry["last_error"].is_null(), "{entry}");
    let (ok, out) = agent.curl(&root, "www.shop.acme.test", &["--http2", "-w", "\n%{http_version}"]).await;
    assert!(ok && out.contains("Name: web") && out.ends_with("\n2"), "both names, HTTP/2 over TLS: {out}");
    let (ok, out) = agent.curl(&root, "shop.acme.test", &["--http1.1", "-w", "\n%{http_version}"]).await;
    assert!(ok && out.ends_with("\n1.1"), "{out}");
    assert_eq!(
        handshake(agent.https_addr(), "www.shop.acme.test", &root).await.unwrap(),
        first,
        "one certificate for both names"
    );

    // Plain HTTP now redirects; the challenge path was answered before that redirect existed.
    let (_, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: shop.acme.test",
        &format!("http://127.0.0.1:{}/", ports.http),
    ])
    .await;
    assert_eq!(out, "301");

    // Stored privately, counted, gauged.
    for file in ["certs/shop.acme.test.crt", "certs/shop.acme.test.key"] {
        let mode = std::fs::metadata(agent.storage.join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert_eq!(
        agent.counter("meshgate_acme_certificates_issued_total{certificate=\"shop.acme.test\"}").await,
        1
    );
    let days = agent.metric("meshgate_acme_certificate_days_left{certificate=\"shop.acme.test\"}").await;
    assert!(
        days > 0.0 && days < 1.0 / 24.0 + 0.001,
        "an hour-long certificate has under an hour left: {days}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_alone_issues_a_certificate() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    // pebble's HTTP-01 port is one nobody listens on: only TLS-ALPN-01 can succeed.
    let pebble = Pebble::start(PebbleSetup {
        http_port: free_port(),
        tls_port: ports.https,
        dns: ports.dns(),
        validity_secs: 3600,
        eab: None,
        blocklist: vec![],
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes(&web, &["alpn.acme.test"]), &ports, &pebble, storage.path(), |c| {
        c.acme.challenge = meshgate::acme::ChallengeKind::TlsAlpn01;
        c.acme.fallback = false;
    })
    .await;
    wait_for_certificate(&agent, "alpn.acme.test", &pebble, Duration::from_secs(30)).await;
    let (ok, out) = agent.curl(&pebble.root().await, "alpn.acme.test", &[]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
    assert_eq!(agent.counter("meshgate_acme_failures_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_challenge_falls_back_to_the_other_kind() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    // TLS-ALPN-01 (tried first) is validated on a closed port and fails; HTTP-01 works.
    let pebble = Pebble::start(PebbleSetup::http01_only(&ports)).await;
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["fallback.acme.test"]), &ports, &pebble, storage.path(), |c| {
            c.acme.challenge = meshgate::acme::ChallengeKind::TlsAlpn01;
        })
        .await;
    wait_for_certificate(&agent, "fallback.acme.test", &pebble, Duration::from_secs(40)).await;
    assert_eq!(
        agent.counter("meshgate_acme_failures_total").await,
        0,
        "the fallback happens within one attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_is_unattended_and_no_handshake_fails_during_the_swap() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    // 20-second certificates: renewed at two thirds (about 13 s) by the default rule.
    let pebble = Pebble::start(PebbleSetup::on(&ports, 20)).await;
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["renew.acme.test"]), &ports, &pebble, storage.path(), |_| {}).await;
    let first = wait_for_certificate(&agent, "renew.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    let start = Instant::now();
    let mut handshakes = 0;
    let renewed = loop {
        let der = handshake(agent.https_addr(), "renew.acme.test", &root)
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed during renewal: {e}"));
        handshakes += 1;
        if der != first {
            break der;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "not renewed within 40 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("renewed after {handshakes} verified handshakes, none failed");
    assert!(handshakes > 10, "the swap was watched from before it happened ({handshakes})");
    // Renewed again by the same rule: the schedule keeps going.
    eventually("a second renewal", Duration::from_secs(40), async || {
        handshake(agent.https_addr(), "renew.acme.test", &root)
            .await
            .is_ok_and(|d| d != renewed && d != first)
    })
    .await;
    assert!(agent.counter("meshgate_acme_certificates_issued_total").await >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_goes_away_keeps_the_old_certificate_served_and_renewal_resumes() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let mut pebble = Pebble::start(PebbleSetup::on(&ports, 30)).await;
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes(&web, &["down.acme.test"]), &ports, &pebble, storage.path(), |c| {
        c.acme.renew_before = Some(Duration::from_secs(25));
    })
    .await;
    let first = wait_for_certificate(&agent, "down.acme.test", &pebble, Duration::from_secs(30)).await;
    let old_root = pebble.root().await;
    pebble.kill();

    // Renewal is due 5 s after issuance; it fails while the CA is gone...
    eventually("a failed renewal", Duration::from_secs(30), async || {
        agent
            .counter("meshgate_acme_failures_total{certificate=\"down.acme.test\",reason=\"ca_unreachable\"}")
            .await
            >= 2
    })
    .await;
    // ...and the old certificate is still served, verified by the old root.
    assert_eq!(handshake(agent.https_addr(), "down.acme.test", &old_root).await.unwrap(), first);

    // The CA comes back (a new pebble: new root, and it does not know the old account).
    pebble.start_again().await;
    let renewed = wait_for_certificate(&agent, "down.acme.test", &pebble, Duration::from_secs(30)).await;
    assert_ne!(renewed, first);
    let (ok, out) = agent.curl(&pebble.root().await, "down.acme.test", &[]).await;
    assert!(ok, "{out}");
    assert!(
        std::fs::read_dir(agent.storage.join("bad")).unwrap().count() >= 1,
        "the account the new CA did not know was set aside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_its_stored_certificate_without_a_new_order() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let mut pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["again.acme.test"]), &ports, &pebble, storage.path(), |_| {}).await;
    let issued = wait_for_certificate(&agent, "again.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    let account = std::fs::read_dir(storage.path().join("accounts")).unwrap().next().unwrap().unwrap().path();
    let account_before = std::fs::read(&account).unwrap();
    let AcmeAgent { mesh: Mesh { agent: running, .. }, .. } = agent;
    running.shutdown().await;

    // The CA is gone: what the new agent serves comes from the store, at its first handshake.
    pebble.kill();
    let again =
        AcmeAgent::start(&routes(&web, &["again.acme.test"]), &Ports::new(), &pebble, storage.path(), |_| {})
            .await;
    assert_eq!(handshake(again.https_addr(), "again.acme.test", &root).await.unwrap(), issued);
    assert_eq!(again.counter("meshgate_acme_certificates_issued_total").await, 0);
    assert_eq!(
        again.counter("meshgate_acme_failures_total").await,
        0,
        "nothing was due, so the CA was not contacted"
    );
    assert_eq!(std::fs::read(&account).unwrap(), account_before, "the stored account is reused");
}

/// Certificates issue, item 5: a stored certificate that has already expired (an agent that
/// was off for months) is replaced by an order at start, and the new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_stored_certificate_is_replaced_at_start() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let storage = tempfile::tempdir().unwrap();
    let certs = storage.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["expired.acme.test".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 4, 1);
    let stale = params.self_signed(&key).unwrap();
    std::fs::write(certs.join("expired.acme.test.crt"), stale.pem()).unwrap();
    std::fs::write(certs.join("expired.acme.test.key"), key.serialize_pem()).unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["expired.acme.test"]), &ports, &pebble, storage.path(), |_| {})
            .await;
    let served = wait_for_certificate(&agent, "expired.acme.test", &pebble, Duration::from_secs(30)).await;
    assert_ne!(served, stale.der().to_vec());
    assert_eq!(agent.counter("meshgate_acme_certificates_issued_total").await, 1);
    let (ok, out) = agent.curl(&pebble.root().await, "expired.acme.test", &[]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
}

/// Certificates issue, item 6: moving from Traefik (its `acme.json`) or from nginx-proxy with
/// acme-companion (its certificate directory, symbolic links into `<name>/`) orders nothing
/// the CA already issued. The CA stays up: an agent that ordered anyway would succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_traefik_and_acme_companion_are_taken_over_without_an_order() {
    use base64::Engine as _;
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let two = |web: &Backend| {
        format!(
            "[[services]]\nname = \"t\"\ntasks = [{{ address = \"{0}\" }}]\n[[services.http]]\nhosts = [\"traefik.acme.test\"]\nport = 1\ntls = {{ acme = true }}\n\
             [[services]]\nname = \"c\"\ntasks = [{{ address = \"{0}\" }}]\n[[services.http]]\nhosts = [\"companion.acme.test\"]\nport = 1\ntls = {{ acme = true }}\n",
            web.addr
        )
    };
    // What the proxies we move from hold: certificates this CA issued.
    let before = tempfile::tempdir().unwrap();
    let first = AcmeAgent::start(&two(&web), &ports, &pebble, before.path(), |_| {}).await;
    let traefik_der =
        wait_for_certificate(&first, "traefik.acme.test", &pebble, Duration::from_secs(30)).await;
    let companion_der =
        wait_for_certificate(&first, "companion.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    let AcmeAgent { mesh: Mesh { agent: running, .. }, .. } = first;
    running.shutdown().await;
    let read = |name: &str| std::fs::read_to_string(before.path().join("certs").join(name)).unwrap();
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let moving = tempfile::tempdir().unwrap();
    let acme_json = moving.path().join("acme.json");
    std::fs::write(
        &acme_json,
        format!(
            r#"{{"letsencrypt": {{"Account": {{"Email": "ops@acme.test", "KeyType": "4096"}}, "Certificates": [{{"domain": {{"main": "traefik.acme.test"}}, "certificate": "{}", "key": "{}", "Store": "default"}}]}}}}"#,
            b64(read("traefik.acme.test.crt")),
            b64(read("traefik.acme.test.key"))
        ),
    )
    .unwrap();
    let companion = moving.path().join("certs");
    std::fs::create_dir_all(companion.join("companion.acme.test")).unwrap();
    std::fs::write(companion.join("companion.acme.test/fullchain.pem"), read("companion.acme.test.crt"))
        .unwrap();
    std::fs::write(companion.join("companion.acme.test/key.pem"), read("companion.acme.test.key")).unwrap();
    std::os::unix::fs::symlink(
        "./companion.acme.test/fullchain.pem",
        companion.join("companion.acme.test.crt"),
    )
    .unwrap();
    std::os::unix::fs::symlink("./companion.acme.test/key.pem", companion.join("companion.acme.test.key"))
        .unwrap();

    let storage = tempfile::tempdir().unwrap();
    let moved = AcmeAgent::start(&two(&web), &ports, &pebble, storage.path(), |c| {
        c.acme.import = vec![acme_json.clone(), companion.clone()];
    })
    .await;
    for (host, der) in [("traefik.acme.test", &traefik_der), ("companion.acme.test", &companion_der)] {
        eventually(&format!("{host} is served its old certificate"), Duration::from_secs(10), async || {
            handshake(moved.https_addr(), host, &root).await.as_ref() == Ok(der)
        })
        .await;
        assert!(
            storage.path().join(format!("certs/{host}.crt")).exists(),
            "{host} is in meshgate's store now"
        );
    }
    assert_eq!(moved.counter("meshgate_acme_certificates_issued_total").await, 0, "nothing was ordered");
    assert_eq!(moved.counter("meshgate_acme_failures_total").await, 0);
}

/// A small tmpfs mounted on a directory of the test's (the store on a disk that fills up).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                dir.path().to_str().unwrap(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (the tests run as root)");
        Self { dir }
    }

    /// Writes zeros until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).and_then(|()| file.flush()).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", self.dir.path().to_str().unwrap()]).status();
    }
}

/// Certificates issue, item 8, and abuse issue (the store's disk full during a renewal):
/// the renewal fails as `storage`, the old certificate stays served and whole on disk (a
/// restart would load it), nothing is left half-written, and renewal succeeds once there
/// is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_renewal_keeps_the_old_certificate_whole_and_served() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    // 20-second certificates: renewed at about 13 s.
    let pebble = Pebble::start(PebbleSetup::on(&ports, 20)).await;
    let disk = SmallDisk::mount("256k");
    let storage = disk.dir.path();
    let agent = AcmeAgent::start(&routes(&web, &["full.acme.test"]), &ports, &pebble, storage, |_| {}).await;
    let first = wait_for_certificate(&agent, "full.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    let account = std::fs::read_dir(storage.join("accounts")).unwrap().next().unwrap().unwrap().path();
    let account_before = std::fs::read(&account).unwrap();
    let filler = disk.fill();

    let storage_failures = "meshgate_acme_failures_total{certificate=\"full.acme.test\",reason=\"storage\"}";
    eventually("the renewal fails to store", Duration::from_secs(30), async || {
        agent.counter(storage_failures).await >= 1
    })
    .await;
    assert_eq!(
        handshake(agent.https_addr(), "full.acme.test", &root).await.unwrap(),
        first,
        "the old one is served"
    );
    let on_disk = meshgate::tls::load_pair(
        &storage.join("certs/full.acme.test.crt"),
        &storage.join("certs/full.acme.test.key"),
    )
    .expect("the stored pair is whole: a restart serves it");
    assert_eq!(on_disk.key.cert[0].as_ref(), first.as_slice());
    let leftovers: Vec<_> = std::fs::read_dir(storage.join("certs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "no half-written file is left: {leftovers:?}");
    assert_eq!(std::fs::read(&account).unwrap(), account_before, "the account is untouched");
    // Certificates issue, item 5: an alert before it expires, in /readyz (still ready).
    let (ready, out) = curl(&["-f", &agent.mesh.admin_url("/readyz")]).await;
    assert!(ready && out.contains("overdue, orders failing: full.acme.test (storage"), "{out}");

    std::fs::remove_file(filler).unwrap();
    eventually("renewed once there is room", Duration::from_secs(30), async || {
        handshake(agent.https_addr(), "full.acme.test", &root).await.is_ok_and(|d| d != first)
    })
    .await;
    let (_, out) = curl(&[&agent.mesh.admin_url("/readyz")]).await;
    assert!(!out.contains("overdue"), "the alert is gone after the renewal: {out}");
}

/// Certificates issue, item 5: an ordered list of CAs; when the first keeps failing for a
/// certificate, the next one issues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_first_ca_keeps_failing_the_next_one_issues() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    // The first CA: nothing listens there.
    let gone = format!("https://127.0.0.1:{}/dir", free_port());
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["second.acme.test"]), &ports, &pebble, storage.path(), |c| {
            c.acme.fallback_directories = vec![c.acme.directory.clone()];
            c.acme.directory.clone_from(&gone);
        })
        .await;
    wait_for_certificate(&agent, "second.acme.test", &pebble, Duration::from_secs(30)).await;
    let unreachable =
        "meshgate_acme_failures_total{certificate=\"second.acme.test\",reason=\"ca_unreachable\"}";
    assert_eq!(agent.counter(unreachable).await, 2, "the first CA failed twice before the next was asked");
    assert_eq!(agent.counter("meshgate_acme_certificates_issued_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_certificate_is_set_aside_and_ordered_again() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 3600)).await;
    let storage = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(storage.path().join("certs")).unwrap();
    std::fs::write(
        storage.path().join("certs/broken.acme.test.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    std::fs::write(storage.path().join("certs/broken.acme.test.key"), "garbage").unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["broken.acme.test"]), &ports, &pebble, storage.path(), |_| {}).await;
    wait_for_certificate(&agent, "broken.acme.test", &pebble, Duration::from_secs(30)).await;
    let bad: Vec<String> = std::fs::read_dir(storage.path().join("bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        bad.iter().any(|f| f.starts_with("broken.acme.test.crt."))
            && bad.iter().any(|f| f.starts_with("broken.acme.test.key.")),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_a_store_order_each_certificate_once() {
    let web = Backend::start("web").await;
    let (a_ports, b_ports) = (Ports::new(), Ports::new());
    // Validation reaches agent A only; whichever agent orders, A answers (the HTTP-01 answer
    // is shared through the store).
    let pebble = Pebble::start(PebbleSetup {
        http_port: a_ports.http,
        tls_port: free_port(),
        dns: a_ports.dns(),
        validity_secs: 3600,
        eab: None,
        blocklist: vec![],
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let routes = routes(&web, &["shared.acme.test"]);
    let http01 = |c: &mut Config| c.acme.fallback = false;
    let (a, b) = tokio::join!(
        AcmeAgent::start("", &a_ports, &pebble, storage.path(), http01),
        AcmeAgent::start("", &b_ports, &pebble, storage.path(), http01)
    );
    // Both agents are running before the route appears, so both want the certificate at once.
    std::fs::write(a.mesh.routes_path(), &routes).unwrap();
    std::fs::write(b.mesh.routes_path(), &routes).unwrap();
    let from_a = wait_for_certificate(&a, "shared.acme.test", &pebble, Duration::from_secs(30)).await;
    let from_b = wait_for_certificate(&b, "shared.acme.test", &pebble, Duration::from_secs(30)).await;
    assert_eq!(from_a, from_b, "both serve the one certificate");
    // Each manager has settled once it gauges the stored certificate (its task is past any
    // order it made, and not due).
    for agent in [&a, &b] {
        eventually("the manager gauges the certificate", Duration::from_secs(30), async || {
            agent.metric("meshgate_acme_certificate_days_left").await > 0.0
        })
        .await;
    }
    let orders = a.counter("meshgate_acme_certificates_issued_total").await
        + b.counter("meshgate_acme_certificates_issued_total").await;
    assert_eq!(orders, 1, "exactly one agent ordered it");
    let failures =
        a.counter("meshgate_acme_failures_total").await + b.counter("meshgate_acme_failures_total").await;
    assert_eq!(failures, 0, "the other agent waited for the lock instead of racing (and failing)");
    assert_eq!(
        std::fs::read_dir(storage.path().join("accounts")).unwrap().count(),
        1,
        "one account between them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_used_when_the_ca_requires_it() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let (kid, hmac) = ("kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W");
    let pebble = Pebble::start(PebbleSetup {
        http_port: ports.http,
        tls_port: ports.https,
        dns: ports.dns(),
        validity_secs: 3600,
        eab: Some((kid, hmac)),
        blocklist: vec![],
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes(&web, &["eab.acme.test"]), &ports, &pebble, storage.path(), |c| {
        c.acme.eab_kid = Some(kid.into());
        c.acme.eab_hmac_key = Some(hmac.into());
    })
    .await;
    wait_for_certificate(&agent, "eab.acme.test", &pebble, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_name_never_blocks_the_others_and_stops_when_its_route_goes() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup {
        http_port: ports.http,
        tls_port: ports.https,
        dns: ports.dns(),
        validity_secs: 3600,
        eab: None,
        blocklist: vec!["refused.acme.test"],
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let two = format!(
        "{}\n[[services]]\nname = \"other\"\ntasks = [{{ address = \"{}\" }}]\n[[services.http]]\nhosts = [\"refused.acme.test\"]\nport = 1\ntls = {{ acme = true }}\n",
        routes(&web, &["fine.acme.test"]),
        web.addr
    );
    let agent = AcmeAgent::start(&two, &ports, &pebble, storage.path(), |_| {}).await;
    wait_for_certificate(&agent, "fine.acme.test", &pebble, Duration::from_secs(30)).await;
    let refused = "meshgate_acme_failures_total{certificate=\"refused.acme.test\",reason=\"ca_error\"}";
    eventually("the refused name is retried with backoff", Duration::from_secs(20), async || {
        agent.counter(refused).await >= 2
    })
    .await;
    // The proxy keeps serving the refused name over plain HTTP and with the fallback certificate.
    let (ok, out) = curl(&[
        "-k",
        "--resolve",
        &format!("refused.acme.test:{}:127.0.0.1", ports.https),
        &format!("https://refused.acme.test:{}/", ports.https),
    ])
    .await;
    assert!(ok && out.contains("Name: web"), "{out}");

    // Its route goes: its task stops, and so do the failures.
    let routes_file = agent.mesh.routes_path();
    std::fs::write(&routes_file, routes(&web, &["fine.acme.test"])).unwrap();
    eventually("the refused name is no longer wanted", Duration::from_secs(10), async || {
        !curl(&[&agent.mesh.admin_url("/api/state")]).await.1.contains("refused.acme.test")
    })
    .await;
    let after = agent.counter(refused).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than retry_max: a live task would have failed again
    assert_eq!(agent.counter(refused).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_that_cannot_succeed_is_reported_and_the_host_stays_served() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    // Validation reaches neither listener (like DNS that does not point at this node).
    let pebble = Pebble::start(PebbleSetup {
        http_port: free_port(),
        tls_port: free_port(),
        dns: ports.dns(),
        validity_secs: 3600,
        eab: None,
        blocklist: vec![],
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let agent =
        AcmeAgent::start(&routes(&web, &["nowhere.acme.test"]), &ports, &pebble, storage.path(), |_| {})
            .await;
    let failed =
        "meshgate_acme_failures_total{certificate=\"nowhere.acme.test\",reason=\"challenge_failed\"}";
    eventually("the failed validation is counted, then retried", Duration::from_secs(30), async || {
        agent.counter(failed).await >= 2
    })
    .await;
    let (ok, out) = curl(&[
        "-k",
        "--resolve",
        &format!("nowhere.acme.test:{}:127.0.0.1", ports.https),
        &format!("https://nowhere.acme.test:{}/", ports.https),
    ])
    .await;
    assert!(ok && out.contains("Name: web"), "served with the fallback certificate meanwhile: {out}");
    let (_, out) =
        curl(&["-H", "Host: nowhere.acme.test", &format!("http://127.0.0.1:{}/", ports.http)]).await;
    assert!(out.contains("Name: web"), "plain HTTP is not redirected without a certificate: {out}");
    let (ok, out) = curl(&["-f", &agent.mesh.admin_url("/readyz")]).await;
    assert!(ok, "ACME failures never make the node unready: {out}");
    // Certificates issue, item 7: the inventory lists the certificate it could not get, and why.
    let entry = agent.inventory_entry("nowhere.acme.test").await;
    assert_eq!(entry["pending"], true, "{entry}");
    assert!(entry["last_error"].as_str().unwrap_or("").contains("challenge_failed"), "{entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_ca_times_out_and_renewal_succeeds_once_it_wakes() {
    let web = Backend::start("web").await;
    let ports = Ports::new();
    let pebble = Pebble::start(PebbleSetup::on(&ports, 30)).await;
    let storage = tempfile::tempdir().unwrap();
    let agent = AcmeAgent::start(&routes(&web, &["hung.acme.test"]), &ports, &pebble, storage.path(), |c| {
        // Due 5 to 6 s after issuance (jitter is at most 1/30 of the 30 s lifetime).
        c.acme.renew_before = Some(Duration::from_secs(24));
    })
    .await;
    let first = wait_for_certificate(&agent, "hung.acme.test", &pebble, Duration::from_secs(30)).await;
    let root = pebble.root().await;
    pebble.signal("STOP");
    let unreachable =
        "meshgate_acme_failures_total{certificate=\"hung.acme.test\",reason=\"ca_unreachable\"}";
    eventually("the hung renewal times out", Duration::from_secs(30), async || {
        agent.counter(unreachable).await >= 1
    })
    .await;
    assert_eq!(
        handshake(agent.https_addr(), "hung.acme.test", &root).await.unwrap(),
        first,
        "the old certificate is still served"
    );
    pebble.signal("CONT");
    eventually("renewed once the CA answers again", Duration::from_secs(30), async || {
        handshake(agent.https_addr(), "hung.acme.test", &root).await.is_ok_and(|d| d != first)
    })
    .await;
}
