//! DNS-01 against pebble's validation, both ways: mesh-dns answering the challenge itself
//! (pebble's `-dnsserver` is the agent's mesh-dns, as a CA's resolver reaches it through the
//! user's delegation), and RFC 2136 updates signed with TSIG to a real authoritative server
//! (Debian's `knot`) that pebble asks. Wildcard certificates come only this way.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::acme::{
    free_port, handshake, routes, wait_for_certificate, AcmeAgent, Pebble, PebbleSetup, Ports,
};
use crate::dns::{dig, status};
use crate::harness::{eventually, Backend};

/// The `.crt` files of an ACME store.
fn stored_certificates(storage: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(storage.join("certs"))
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

fn pebble_setup(dns: std::net::SocketAddr) -> PebbleSetup {
    // HTTP-01 and TLS-ALPN-01 would go to ports where nothing listens: only DNS-01 can pass.
    PebbleSetup {
        http_port: free_port(),
        tls_port: free_port(),
        dns,
        validity_secs: 3600,
        eab: None,
        blocklist: vec![],
    }
}

/// Certificates issue, item 1 (mesh-dns answers the challenge), item 2 (a wildcard covers
/// the routes it matches, no second certificate), and "facing the internet, the challenge
/// names and nothing else": pebble is outside the recursion networks here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_dns_answers_dns01_and_a_wildcard_certificate_covers_every_route_it_matches() {
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let ports = Ports::new();
    let pebble = Pebble::start(pebble_setup(ports.dns())).await;
    let storage = tempfile::tempdir().unwrap();
    let routes = routes(&web, &["wild.acme.test", "*.wild.acme.test"]) + &format!(
        "[[services]]\nname = \"api\"\ntasks = [{{ address = \"{}\" }}]\n[[services.http]]\nhosts = [\"api.wild.acme.test\"]\nport = 1\ntls = {{ acme = true }}\n",
        api.addr
    );
    let started = Instant::now();
    let agent = AcmeAgent::start(&routes, &ports, &pebble, storage.path(), |c| {
        // The default challenge is http-01: a wildcard takes DNS-01 all the same.
        c.acme.challenge = meshgate::acme::ChallengeKind::Http01;
        c.acme.fallback = false;
        c.dns.answer_routed_hosts = false;
        // pebble asks from 127.0.0.1: an outsider, as a CA's resolver on the internet.
        c.dns.recursion_networks = vec!["10.255.255.0/24".parse().unwrap()];
    })
    .await;
    let wildcard = wait_for_certificate(&agent, "x.wild.acme.test", &pebble, Duration::from_secs(60)).await;
    println!(
        "route to first verified HTTPS handshake: {} ms (DNS-01, mesh-dns, pebble)",
        started.elapsed().as_millis()
    );

    let root = pebble.root().await;
    for host in ["wild.acme.test", "api.wild.acme.test", "other.wild.acme.test"] {
        assert_eq!(
            handshake(agent.https_addr(), host, &root).await.unwrap(),
            wildcard,
            "{host} is served the one certificate for wild.acme.test and *.wild.acme.test"
        );
    }
    let (ok, out) = agent.curl(&root, "api.wild.acme.test", &[]).await;
    assert!(ok && out.contains("Name: api"), "{out}");
    let (ok, out) = agent.curl(&root, "x.wild.acme.test", &[]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
    assert_eq!(stored_certificates(storage.path()), ["wild.acme.test.crt"], "no second certificate for api");
    assert_eq!(agent.counter("meshgate_acme_certificates_issued_total").await, 1);

    // The challenge is withdrawn once the order ended; the cluster's own names never reach
    // an outsider.
    eventually("the challenge record is withdrawn", Duration::from_secs(10), async || {
        status(&dig(ports.dns(), &["_acme-challenge.wild.acme.test", "TXT"]).await) == "REFUSED"
    })
    .await;
    let out = dig(ports.dns(), &["web", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
}

/// Knot DNS, authoritative for `zone`, taking updates signed with the TSIG key `meshgate`.
struct Knot {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Knot {
    async fn start(zone: &str, secret_b64: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        std::fs::write(
            dir.path().join(format!("{zone}.zone")),
            format!(
                "$ORIGIN {zone}.\n$TTL 60\n@ SOA ns hostmaster 1 60 30 3600 5\n@ NS ns\nns A 127.0.0.1\n"
            ),
        )
        .unwrap();
        let conf = format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n\
             database:\n  storage: {d}\n\
             key:\n  - id: meshgate\n    algorithm: hmac-sha256\n    secret: {secret_b64}\n\
             acl:\n  - id: update\n    key: meshgate\n    action: update\n\
             zone:\n  - domain: {zone}\n    storage: {d}\n    file: {zone}.zone\n    acl: update\n    zonefile-sync: -1\n\
             log:\n  - target: stderr\n    any: warning\n"
        );
        let conf_file = dir.path().join("knot.conf");
        std::fs::write(&conf_file, conf).unwrap();
        let child = Command::new("knotd")
            .args(["-c", conf_file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("knot is installed (the README's test command installs it)");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("knot answers", Duration::from_secs(15), async || {
            status(&dig(addr, &[zone, "SOA"]).await) == "NOERROR"
        })
        .await;
        Self { child, addr, _dir: dir }
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Certificates issue, item 1 (RFC 2136 with TSIG to the user's server, a real one that
/// pebble asks), with a wildcard; an update with the wrong key is refused by the server,
/// reported, and no certificate is made from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2136_updates_signed_with_tsig_get_a_wildcard_from_the_users_own_server() {
    const SECRET: &str = "bWVzaGdhdGUtdGVzdC1zZWNyZXQtMzItYnl0ZXMhIQ==";
    let knot = Knot::start("rfc.acme.test", SECRET).await;
    let web = Backend::start("web").await;
    let pebble = Pebble::start(pebble_setup(knot.addr)).await;
    let keys = tempfile::tempdir().unwrap();
    // As `keymgr -t meshgate hmac-sha256` writes it.
    let key_file = keys.path().join("meshgate.key");
    std::fs::write(
        &key_file,
        format!("key:\n  - id: meshgate\n    algorithm: hmac-sha256\n    secret: {SECRET}\n"),
    )
    .unwrap();
    let wrong_file = keys.path().join("wrong.key");
    std::fs::write(&wrong_file, "d3JvbmctdGVzdC1zZWNyZXQtMzItYnl0ZXMtbG9uZyE=\n").unwrap();
    let rfc2136 = |c: &mut meshgate::config::Config, secret: &Path| {
        c.acme.dns_provider = meshgate::acme::DnsProvider::Rfc2136;
        c.acme.rfc2136_server = Some(knot.addr);
        c.acme.rfc2136_zone = Some("rfc.acme.test".into());
        c.acme.rfc2136_tsig_key = Some("meshgate".into());
        c.acme.rfc2136_tsig_secret_file = Some(secret.to_owned());
        c.acme.challenge = meshgate::acme::ChallengeKind::Dns01;
        c.acme.fallback = false;
    };

    // The wrong key first: knot answers NOTAUTH, the order fails before the CA is asked.
    let wrong_storage = tempfile::tempdir().unwrap();
    let wrong = AcmeAgent::start(
        &routes(&web, &["bad.rfc.acme.test"]),
        &Ports::new(),
        &pebble,
        wrong_storage.path(),
        |c| rfc2136(c, &wrong_file),
    )
    .await;
    eventually("the refused update is reported", Duration::from_secs(20), async || {
        wrong
            .counter(
                "meshgate_acme_failures_total{certificate=\"bad.rfc.acme.test\",reason=\"challenge_failed\"}",
            )
            .await
            >= 1
    })
    .await;
    assert!(stored_certificates(wrong_storage.path()).is_empty());
    drop(wrong);

    let storage = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let agent = AcmeAgent::start(
        &routes(&web, &["rfc.acme.test", "*.rfc.acme.test"]),
        &ports,
        &pebble,
        storage.path(),
        |c| rfc2136(c, &key_file),
    )
    .await;
    let cert = wait_for_certificate(&agent, "www.rfc.acme.test", &pebble, Duration::from_secs(60)).await;
    let root = pebble.root().await;
    assert_eq!(handshake(agent.https_addr(), "rfc.acme.test", &root).await.unwrap(), cert);
    let (ok, out) = agent.curl(&root, "www.rfc.acme.test", &[]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
    // The records were deleted from the user's zone once the order ended.
    eventually("the challenge records are deleted", Duration::from_secs(10), async || {
        !dig(knot.addr, &["_acme-challenge.rfc.acme.test", "TXT"]).await.contains("\tTXT\t")
    })
    .await;
}
