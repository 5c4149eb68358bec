//! HTTPS with certificates from a directory (nginx-proxy's layout), checked with curl.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::harness::{curl, eventually, service_with, Backend, Mesh};

/// A test CA that signs host certificates into a directory.
pub(crate) struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(dir: &Path) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A subject of its own: OpenSSL takes a leaf whose issuer equals its subject for
        // self-signed.
        params.distinguished_name.push(rcgen::DnType::CommonName, "meshgate test CA");
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Self { params, key }
    }

    /// Writes `<file>.crt`/`.key` for `names`; returns the certificate's DER.
    pub(crate) fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &issuer).unwrap();
        // Written to temporary names first, then renamed: a watcher never sees half a pair.
        std::fs::write(dir.join(format!("{file}.key.tmp")), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.crt.tmp")), cert.pem()).unwrap();
        std::fs::rename(dir.join(format!("{file}.key.tmp")), dir.join(format!("{file}.key"))).unwrap();
        std::fs::rename(dir.join(format!("{file}.crt.tmp")), dir.join(format!("{file}.crt"))).unwrap();
        cert.der().to_vec()
    }
}

/// curl over HTTPS to `host` at the agent's HTTPS port, trusting the test CA.
async fn https(mesh: &Mesh, ca: &Path, host: &str, extra: &[&str]) -> (bool, String) {
    let port = mesh.agent.https_addr.unwrap().port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let cacert = ca.join("ca.pem");
    let mut args = vec!["--resolve", &resolve, "--cacert", cacert.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).await
}

#[derive(Debug)]
/// Accepts any server certificate: these tests look at which one is presented.
struct AcceptAll;
impl rustls::client::danger::ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// The DER of the certificate the agent presents for `host`.
async fn presented(mesh: &Mesh, host: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let config = crate::harness::tls_client_builder()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAll))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(mesh.agent.https_addr.unwrap()).await.unwrap();
    let tls =
        connector.connect(ServerName::try_from(host.to_owned()).unwrap(), tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_certificates_from_a_directory_redirects_and_hot_swaps() {
    let web = Backend::start("web").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    let first = ca.issue(certs.path(), "secure.test", &["secure.test"]);
    ca.issue(certs.path(), "wild.test", &["wild.test", "*.wild.test"]);
    let routes = [service_with(
        "web",
        &["secure.test", "a.wild.test", "plain.test"],
        "/",
        "http",
        &[web.addr.to_string()],
    )]
    .concat();
    let mesh = Mesh::start_with(&routes, |c| {
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.certs_dir = Some(certs.path().to_owned());
        c.tls.poll_interval = Duration::from_millis(50);
    })
    .await;

    // HTTP/1.1 and HTTP/2 over TLS, verified against the test CA.
    let (ok, out) =
        https(&mesh, certs.path(), "secure.test", &["--http1.1", "-w", "\n%{http_version}"]).await;
    assert!(ok && out.contains("x-forwarded-proto: https") && out.ends_with("\n1.1"), "{out}");
    let (ok, out) =
        https(&mesh, certs.path(), "secure.test", &["--http2", "-w", "\n%{http_version}", "-D", "-"]).await;
    assert!(ok && out.ends_with("\n2"), "HTTP/2 over TLS (ALPN h2): {out}");
    assert!(
        out.to_ascii_lowercase().contains("strict-transport-security: max-age="),
        "HSTS by default: {out}"
    );
    let (ok, out) = https(&mesh, certs.path(), "a.wild.test", &[]).await;
    assert!(ok, "a parent domain's certificate covers its subdomains: {out}");
    let (ok, out) = https(&mesh, certs.path(), "secure.test", &["--tlsv1.1", "--tls-max", "1.1"]).await;
    assert!(!ok, "TLS 1.1 is refused: {out}");

    // A name without a certificate gets the self-signed fallback: not trusted, but served.
    let (ok, _) = https(&mesh, certs.path(), "plain.test", &[]).await;
    assert!(!ok, "the fallback certificate is not trusted");
    let (ok, out) = https(&mesh, certs.path(), "plain.test", &["-k"]).await;
    assert!(ok && out.contains("Name: web"), "{out}");

    // Plain HTTP: a host with a certificate is redirected, one without is served.
    let http = mesh.agent.http_addr;
    let https_port = mesh.agent.https_addr.unwrap().port();
    let (_, out) = curl(&[
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: secure.test",
        &format!("http://{http}/p?q=1"),
    ])
    .await;
    assert_eq!(out, format!("301 https://secure.test:{https_port}/p?q=1"));
    let (_, out) = curl(&["-H", "Host: plain.test", &format!("http://{http}/")]).await;
    assert!(out.contains("Name: web"), "{out}");

    // Hot swap: a new certificate in the directory is served without a restart, and no
    // handshake fails while it changes.
    assert_eq!(presented(&mesh, "secure.test").await, first);
    let second = ca.issue(certs.path(), "secure.test", &["secure.test"]);
    eventually("the new certificate is served", Duration::from_secs(10), async || {
        presented(&mesh, "secure.test").await == second
    })
    .await;
    for _ in 0..20 {
        let (ok, out) = https(&mesh, certs.path(), "secure.test", &[]).await;
        assert!(ok, "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_can_be_refused_at_the_handshake() {
    let web = Backend::start("web").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    ca.issue(certs.path(), "known.test", &["known.test"]);
    let routes = service_with("web", &["known.test", "other.test"], "/", "http", &[web.addr.to_string()]);
    let mesh = Mesh::start_with(&routes, |c| {
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.certs_dir = Some(certs.path().to_owned());
        c.tls.unknown_names = meshgate::tls::UnknownNames::Reject;
    })
    .await;
    assert!(https(&mesh, certs.path(), "known.test", &[]).await.0);
    let (ok, out) = https(&mesh, certs.path(), "other.test", &["-k"]).await;
    assert!(!ok, "no certificate, no handshake: {out}");

    // What an operator's board shows: handshakes by result, each certificate's expiry.
    let metrics = String::from_utf8(mesh.agent.metrics.render()).unwrap();
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
    };
    assert!(value("meshgate_tls_handshakes_total{result=\"ok\"}") >= 1.0);
    assert!(value("meshgate_tls_handshakes_total{result=\"failed\"}") >= 1.0);
    let not_after = value("meshgate_tls_certificate_not_after_seconds{name=\"known.test\",source=\"files\"}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(not_after > now, "the test CA's certificate is valid: {not_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_speak_https_are_reached_over_tls() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    // A task serving whoami over TLS with a self-signed certificate, as many images do.
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["task.internal".to_owned()]).unwrap().self_signed(&key).unwrap();
    let config = crate::harness::tls_server_builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let svc = hyper::service::service_fn(move |req| {
                    meshgate::whoami::answer(req, peer, "tls-task".into())
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let mesh =
        Mesh::start(&service_with("secure", &["tls-task.test"], "/", "https", &[addr.to_string()])).await;
    for _ in 0..5 {
        let (status, body) = mesh.get("tls-task.test", "/x").await;
        assert_eq!(status, http::StatusCode::OK, "{body}");
        assert!(body.contains("Name: tls-task") && body.contains("GET /x HTTP/1.1"), "{body}");
    }
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one pooled TLS connection serves every request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_sni_gets_the_default_certificate() {
    let web = Backend::start("web").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    let default = ca.issue(certs.path(), "default", &["default.test"]);
    let mesh =
        Mesh::start_with(&service_with("web", &["ip.test"], "/", "http", &[web.addr.to_string()]), |c| {
            c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
            c.tls.certs_dir = Some(certs.path().to_owned());
        })
        .await;
    // curl sends no SNI for an IP address.
    let addr = mesh.agent.https_addr.unwrap();
    let (ok, out) = curl(&["-k", "-H", "Host: ip.test", &format!("https://{addr}/")]).await;
    assert!(ok && out.contains("Name: web"), "{out}");
    let (ok, out) = curl(&["-k", "-o", "/dev/null", "-w", "%{certs}", &format!("https://{addr}/")]).await;
    assert!(ok, "{out}");
    let pem = rustls::pki_types::pem::PemObject::from_pem_slice(out.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec());
    assert_eq!(pem.ok(), Some(default), "the default certificate is presented without SNI");
}

/// Two connections with one rustls client (which keeps a session cache): how the second
/// handshake went.
async fn second_handshake(addr: std::net::SocketAddr) -> rustls::HandshakeKind {
    let config = std::sync::Arc::new({
        let mut c = crate::harness::tls_client_builder()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAll))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c
    });
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut kind = None;
    for _ in 0..2 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(rustls::pki_types::ServerName::try_from("resume.test").unwrap(), tcp)
            .await
            .unwrap();
        // Read the answer, so the TLS 1.3 tickets sent after the handshake arrive.
        tls.write_all(b"GET / HTTP/1.1\r\nHost: resume.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut body = Vec::new();
        let _ = tls.read_to_end(&mut body).await;
        kind = tls.get_ref().1.handshake_kind();
    }
    kind.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption_can_be_turned_off() {
    let web = Backend::start("web").await;
    let routes = service_with("web", &["resume.test"], "/", "http", &[web.addr.to_string()]);
    let on = Mesh::start_with(&routes, |c| c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    assert_eq!(second_handshake(on.agent.https_addr.unwrap()).await, rustls::HandshakeKind::Resumed);
    let off = Mesh::start_with(&routes, |c| {
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.session_resumption = false;
    })
    .await;
    assert_eq!(second_handshake(off.agent.https_addr.unwrap()).await, rustls::HandshakeKind::Full);
}

/// SIGHUP's reload ("Hold under abuse", finding 3): with the directory polled hourly, a new
/// certificate is served as soon as the agent is told to reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_new_certificate_before_the_next_poll() {
    let web = Backend::start("web").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    let first = ca.issue(certs.path(), "secure.test", &["secure.test"]);
    let mesh =
        Mesh::start_with(&service_with("web", &["secure.test"], "/", "http", &[web.addr.to_string()]), |c| {
            c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
            c.tls.certs_dir = Some(certs.path().to_owned());
            c.tls.poll_interval = Duration::from_secs(3600);
        })
        .await;
    assert_eq!(presented(&mesh, "secure.test").await, first);
    let second = ca.issue(certs.path(), "secure.test", &["secure.test"]);
    mesh.agent.reload();
    eventually("the reloaded certificate is served", Duration::from_secs(5), async || {
        presented(&mesh, "secure.test").await == second
    })
    .await;
}

/// A task serving whoami over TLS with `dir/<file>.crt`/`.key`, asking clients for a
/// certificate signed by `client_ca` when given; records the SNI of each handshake.
async fn tls_task(
    dir: &Path,
    file: &str,
    client_ca: Option<&Path>,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{file}.crt"))).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{file}.key"))).unwrap();
    let builder = crate::harness::tls_server_builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    crate::harness::tls_provider(),
                )
                .build()
                .unwrap(),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sni: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
    let seen = sni.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                seen.lock().unwrap().push(tls.get_ref().1.server_name().unwrap_or("").to_owned());
                let svc = hyper::service::service_fn(move |req| {
                    meshgate::whoami::answer(req, peer, "verified".into())
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, sni)
}

/// Certificates issue, item 4: https tasks verified against an internal CA, with SNI and a
/// client certificate (mutual TLS to the task); a task whose certificate another CA signed
/// is refused (502, never served unverified); without `upstream_tls` nothing is verified,
/// as nginx-proxy's `VIRTUAL_PROTO=https`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_tasks_are_verified_against_the_routes_internal_ca_with_sni_and_a_client_certificate() {
    let internal = tempfile::tempdir().unwrap();
    let ca = Ca::new(internal.path());
    ca.issue(internal.path(), "api", &["api.internal"]);
    ca.issue(internal.path(), "client", &["meshgate.internal"]);
    let rogue_dir = tempfile::tempdir().unwrap();
    Ca::new(rogue_dir.path()).issue(rogue_dir.path(), "api", &["api.internal"]);
    let ca_pem = internal.path().join("ca.pem");
    let (good, sni) = tls_task(internal.path(), "api", Some(&ca_pem)).await;
    let (rogue, _) = tls_task(rogue_dir.path(), "api", None).await;
    let (open, _) = tls_task(internal.path(), "api", None).await;
    let d = internal.path().display();
    let verified = format!(
        "upstream_tls = {{ verify = true, ca = \"{d}/ca.pem\", server_name = \"api.internal\", client_cert = \"{d}/client.crt\", client_key = \"{d}/client.key\" }}"
    );
    let no_client =
        format!("upstream_tls = {{ verify = true, ca = \"{d}/ca.pem\", server_name = \"api.internal\" }}");
    let service = |name: &str, task: std::net::SocketAddr, tls: &str| {
        format!("[[services]]\nname = \"{name}\"\ntasks = [{{ address = \"{task}\" }}]\n[[services.http]]\nhosts = [\"{name}.test\"]\nport = {}\nprotocol = \"https\"\n{tls}\n", task.port())
    };
    let routes = [
        service("verified", good, &verified),
        service("rogue", rogue, &verified),
        service("unverified", rogue, ""),
        service("noclient", good, &no_client),
        service("plain", open, &no_client),
    ]
    .concat();
    let mesh = Mesh::start(&routes).await;
    let (status, body) = mesh.get("verified.test", "/").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    assert!(sni.lock().unwrap().iter().all(|n| n == "api.internal"), "SNI sent: {:?}", sni.lock().unwrap());
    let (status, body) = mesh.get("rogue.test", "/").await;
    assert_eq!(status, http::StatusCode::BAD_GATEWAY, "another CA's certificate is refused: {body}");
    let (status, body) = mesh.get("unverified.test", "/").await;
    assert_eq!(status, http::StatusCode::OK, "not verified unless asked: {body}");
    let (status, body) = mesh.get("noclient.test", "/").await;
    assert_eq!(status, http::StatusCode::BAD_GATEWAY, "the task requires a client certificate: {body}");
    let (status, body) = mesh.get("plain.test", "/").await;
    assert_eq!(status, http::StatusCode::OK, "verified, no client certificate asked: {body}");
}

/// An agent following the Docker engine with an HTTPS listener, and a certificates
/// directory (a test CA's `ca.pem`, and a pair per name in `names`).
async fn docker_https(names: &[String]) -> (tempfile::TempDir, Mesh) {
    let (certs, mesh, ()) = docker_https_with(|ca, dir| {
        for name in names {
            ca.issue(dir, name, &[name]);
        }
    })
    .await;
    (certs, mesh)
}

/// The same with the pairs `issue` makes in the directory (it returns what the test needs of
/// them).
async fn docker_https_with<T>(issue: impl FnOnce(&Ca, &Path) -> T) -> (tempfile::TempDir, Mesh, T) {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    let made = issue(&ca, certs.path());
    let dir = certs.path().to_owned();
    let mesh = Mesh::start_docker(|c| {
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.certs_dir = Some(dir);
        c.tls.poll_interval = Duration::from_millis(50);
    })
    .await;
    (certs, mesh, made)
}

/// Drop-in issue, item 2: nginx-proxy's `HTTPS_METHOD` and `HSTS`, every form, on real
/// containers with certificates in the certificates directory (nginx-proxy's docs, "SSL
/// Support" and "HSTS", and its test/test_ssl/test_https_method cases): `redirect` (301 to
/// HTTPS, HSTS there), `noredirect` (both served, no HSTS whatever `HSTS` says), `nohttp`
/// (never served over plain HTTP: redirected while it has a certificate), `nohttps` (plain
/// only, even with a certificate), `HSTS=off` and a custom `HSTS`; a host without a
/// certificate is served over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_method_and_hsts_in_every_form() {
    let hosts = ["redirect", "noredirect", "nohttp", "nohttps", "hstsoff", "hstscustom"];
    let (certs, mesh) = docker_https(&hosts.map(|h| format!("{h}.docker.test"))).await;
    let env = |host: &str, more: &[&'static str]| {
        let mut args = vec!["-e".to_owned(), format!("VIRTUAL_HOST={host}.docker.test")];
        for m in more {
            args.extend(["-e".to_owned(), (*m).to_owned()]);
        }
        args
    };
    let specs = [
        env("redirect", &[]),
        env("noredirect", &["HTTPS_METHOD=noredirect", "HSTS=max-age=600"]),
        env("nohttp", &["HTTPS_METHOD=nohttp"]),
        env("nohttps", &["HTTPS_METHOD=nohttps"]),
        env("hstsoff", &["HSTS=off"]),
        env("hstscustom", &["HSTS=max-age=600; includeSubDomains; preload"]),
        env("nocert", &[]),
    ];
    let mut running = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let args: Vec<&str> = spec.iter().map(String::as_str).collect();
        running.push(crate::docker::Container::run(&format!("https{i}"), &args, 80).await);
    }
    let http = mesh.agent.http_addr;
    let https_port = mesh.agent.https_addr.unwrap().port();
    // Over plain HTTP: the status, and where a redirect goes.
    let plain = async |host: &str| {
        let url = format!("http://{http}/?q=1");
        let h = format!("Host: {host}.docker.test");
        curl(&["-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", &h, &url]).await.1
    };
    // Over HTTPS: the status and the HSTS header, if any.
    let secure = async |host: &str| {
        let (_, out) =
            https(&mesh, certs.path(), &format!("{host}.docker.test"), &["-s", "-D", "-", "-o", "/dev/null"])
                .await;
        let out = out.replace('\r', "").to_ascii_lowercase();
        let status = out.split_whitespace().nth(1).unwrap_or("").to_owned();
        let hsts = out.lines().find_map(|l| l.strip_prefix("strict-transport-security: ")).map(str::to_owned);
        (status, hsts)
    };
    eventually("every container is routed", Duration::from_secs(30), async || {
        plain("nocert").await.starts_with("200")
    })
    .await;
    for h in hosts {
        eventually(&format!("{h} is routed"), Duration::from_secs(30), async || {
            !plain(h).await.starts_with("404")
        })
        .await;
    }
    let moved = |h: &str| format!("301 https://{h}.docker.test:{https_port}/?q=1");
    assert_eq!(plain("redirect").await, moved("redirect"));
    assert_eq!(secure("redirect").await, ("200".into(), Some("max-age=31536000".into())));
    assert_eq!(plain("noredirect").await, "200 ");
    assert_eq!(secure("noredirect").await, ("200".into(), None), "noredirect: no HSTS, whatever HSTS says");
    assert_eq!(plain("nohttp").await, moved("nohttp"));
    assert_eq!(secure("nohttp").await.0, "200");
    assert_eq!(plain("nohttps").await, "200 ", "nohttps: plain, even with a certificate");
    assert_eq!(secure("nohttps").await.0, "404");
    assert_eq!(secure("hstsoff").await, ("200".into(), None));
    assert_eq!(
        secure("hstscustom").await,
        ("200".into(), Some("max-age=600; includesubdomains; preload".into()))
    );
    assert_eq!(plain("nocert").await, "200 ", "no certificate: served over plain HTTP");
}

/// Drop-in issue, item 2: nginx-proxy's `CERT_NAME` (its docs, "SSL Support": a container
/// may name the certificate files to use): the named pair is served even where a pair named
/// after the host exists; a name this node does not have is not served (503), never with
/// another certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_name_picks_the_named_certificate_and_a_missing_one_is_not_served() {
    let (certs, mesh, (shared, own)) = docker_https_with(|ca, dir| {
        (
            ca.issue(dir, "shared", &["a.cert.test", "b.cert.test"]),
            ca.issue(dir, "a.cert.test", &["a.cert.test"]),
        )
    })
    .await;
    let _named = crate::docker::Container::run(
        "certname",
        &["-e", "VIRTUAL_HOST=a.cert.test", "-e", "CERT_NAME=shared", "-e", "HTTPS_METHOD=noredirect"],
        80,
    )
    .await;
    let _missing = crate::docker::Container::run(
        "nocertname",
        &["-e", "VIRTUAL_HOST=c.cert.test", "-e", "CERT_NAME=gone"],
        80,
    )
    .await;
    eventually("the named certificate is served", Duration::from_secs(30), async || {
        presented(&mesh, "a.cert.test").await == shared
    })
    .await;
    assert_ne!(shared, own);
    let (ok, out) = https(&mesh, certs.path(), "a.cert.test", &[]).await;
    assert!(ok, "verified against the CA, for the host's name: {out}");
    let http = mesh.agent.http_addr;
    eventually("a missing named certificate is not served", Duration::from_secs(30), async || {
        let (_, out) =
            curl(&["-s", "-w", " %{http_code}", "-H", "Host: c.cert.test", &format!("http://{http}/")]).await;
        out.ends_with(" 503") && out.contains("certificate `gone`")
    })
    .await;
}

/// Drop-in issue, item 2: nginx-proxy's `SSL_POLICY` (its docs, "SSL Support"):
/// `Mozilla-Modern` takes TLS 1.3 only, `Mozilla-Intermediate` 1.2 and 1.3 (rustls's own);
/// `Mozilla-Old` (TLS 1.0) is served with the stricter rustls settings and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_policy_tls13_only_is_honoured_and_an_older_one_is_served_stricter_and_reported() {
    let (certs, mesh) = docker_https(&["modern", "inter", "old"].map(|h| format!("{h}.policy.test"))).await;
    let mut running = Vec::new();
    for (h, policy) in
        [("modern", "Mozilla-Modern"), ("inter", "Mozilla-Intermediate"), ("old", "Mozilla-Old")]
    {
        let (host, policy) = (format!("VIRTUAL_HOST={h}.policy.test"), format!("SSL_POLICY={policy}"));
        running.push(crate::docker::Container::run(h, &["-e", &host, "-e", &policy], 80).await);
    }
    let tls12 = ["--tlsv1.2", "--tls-max", "1.2"];
    eventually("TLS 1.2 is refused for the modern host", Duration::from_secs(30), async || {
        https(&mesh, certs.path(), "inter.policy.test", &tls12).await.0
            && !https(&mesh, certs.path(), "modern.policy.test", &tls12).await.0
    })
    .await;
    let (ok, out) = https(&mesh, certs.path(), "modern.policy.test", &["--tlsv1.3"]).await;
    assert!(ok, "TLS 1.3 is taken: {out}");
    // (Discovery may not have seen the third container yet: a busy engine.)
    eventually(
        "the old policy's host is routed and its policy reported",
        Duration::from_secs(30),
        async || {
            let state = crate::resilience::reqwest_text(&mesh.admin_url("/api/state")).await;
            state.contains("\"old.policy.test/\"")
                && state.contains("SSL_POLICY=Mozilla-Old")
                && state.contains("stricter")
        },
    )
    .await;
    let (ok, out) = https(&mesh, certs.path(), "old.policy.test", &tls12).await;
    assert!(ok, "the old policy's host is served with TLS 1.2: {out}");
    let (ok, _) = https(&mesh, certs.path(), "old.policy.test", &["--tlsv1.1", "--tls-max", "1.1"]).await;
    assert!(!ok, "but not TLS 1.1, which rustls does not have");
}

/// Runs `openssl` with `args` in `dir` (the test's CAs are made as an operator makes them).
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed (the README's test command installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An `openssl`-made CA (`<ca>.pem`, `<ca>.key`) and one client certificate it signs for each
/// of `clients` (`<client>.crt`, `<client>.key`, with `extendedKeyUsage=clientAuth`).
fn openssl_client_ca(dir: &Path, ca: &str, clients: &[&str]) {
    let key = |name: &str| format!("{name}.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &key(ca),
            "-out",
            &format!("{ca}.pem"),
        ],
    );
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for client in clients {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={client}"),
                "-keyout",
                &key(client),
                "-out",
                &format!("{client}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{client}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &key(ca),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "client.ext",
                "-out",
                &format!("{client}.crt"),
            ],
        );
    }
}

/// Certificates issue, item 4: client certificates required per host (mutual TLS from
/// clients, a CA per route), with `openssl`-made CAs and `curl --cert`. A host whose routes
/// all ask fails the handshake without a certificate from its CA; a host with one asking
/// path serves the others to anyone and answers 403 there; a request whose Host is not the
/// name the handshake verified gets 421 (over HTTP/1.1 and HTTP/2), both ways, so neither a
/// Host header nor connection reuse skips a route's CA; plain HTTP gets 403; a CA file this
/// node cannot read fails the handshake (never served unchecked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_show_a_certificate_from_the_hosts_ca_or_are_refused() {
    let web = Backend::start("web").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new(certs.path());
    for host in ["secure.test", "mixed.test", "open.test", "rogue.test", "missing.test"] {
        ca.issue(certs.path(), host, &[host]);
    }
    let clients = tempfile::tempdir().unwrap();
    let dir = clients.path();
    openssl_client_ca(dir, "clients-ca", &["alice"]);
    openssl_client_ca(dir, "rogue-ca", &["mallory"]);
    let d = dir.display();
    let route = |host: &str, path: &str, extra: &str| {
        format!(
            "[[services]]\nname = \"{}\"\ntasks = [{{ address = \"{}\" }}]\n[[services.http]]\nhosts = [\"{host}\"]\npath = \"{path}\"\nport = 1\n{extra}\n",
            format!("{host}{path}").replace(['.', '/'], "-"),
            web.addr
        )
    };
    let routes = [
        route("secure.test", "/", &format!("client_ca = \"{d}/clients-ca.pem\"")),
        route("mixed.test", "/", ""),
        route(
            "mixed.test",
            "/admin",
            &format!("client_ca = \"{d}/clients-ca.pem\"\nhttps_method = \"noredirect\""),
        ),
        route("open.test", "/", ""),
        route("rogue.test", "/", &format!("client_ca = \"{d}/rogue-ca.pem\"")),
        route("missing.test", "/", &format!("client_ca = \"{d}/no-such-ca.pem\"")),
    ]
    .concat();
    let mesh = Mesh::start_with(&routes, |c| {
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.certs_dir = Some(certs.path().to_owned());
    })
    .await;
    // curl's arguments: a client certificate (`None`: none), then `more`.
    let args = |client: Option<&str>, more: &[&str]| {
        let cert =
            client.map(|c| ["--cert".into(), format!("{d}/{c}.crt"), "--key".into(), format!("{d}/{c}.key")]);
        cert.into_iter().flatten().chain(more.iter().map(|m| (*m).to_owned())).collect::<Vec<String>>()
    };
    let code = ["-o", "/dev/null", "-w", "%{http_code}"];
    let ask = async |host: &str, path: &str, extra: Vec<String>| {
        let port = mesh.agent.https_addr.unwrap().port();
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}{path}");
        let cacert = certs.path().join("ca.pem");
        let mut all = vec!["--resolve", &resolve, "--cacert", cacert.to_str().unwrap()];
        all.extend(extra.iter().map(String::as_str));
        all.push(&url);
        curl(&all).await
    };
    let refused = |(ok, out): (bool, String)| !ok || !out.starts_with('2');

    // Every route of the host asks: alice (its CA) is served, no certificate and mallory
    // (another CA) fail the handshake.
    let (ok, out) = ask("secure.test", "/", args(Some("alice"), &[])).await;
    assert!(ok && out.contains("Name: web"), "alice's certificate is from the host's CA: {out}");
    assert!(refused(ask("secure.test", "/", args(None, &code)).await), "no certificate");
    assert!(refused(ask("secure.test", "/", args(Some("mallory"), &code)).await), "another CA's certificate");

    // One path of the host asks: the others are served to anyone, that one takes alice.
    assert_eq!(ask("mixed.test", "/", args(None, &code)).await, (true, "200".into()));
    assert_eq!(ask("mixed.test", "/admin", args(None, &code)).await, (true, "403".into()));
    // A certificate from another CA is refused at the handshake even where none is needed.
    assert!(refused(ask("mixed.test", "/admin", args(Some("mallory"), &code)).await), "mallory");
    assert_eq!(ask("mixed.test", "/admin", args(Some("alice"), &code)).await, (true, "200".into()));
    let plain = format!("http://{}/admin", mesh.agent.http_addr);
    let (_, out) = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: mixed.test", &plain]).await;
    assert_eq!(out, "403", "plain HTTP to a path that takes a client certificate");

    // A Host that is not the name the handshake was for: 421, over HTTP/1.1 and HTTP/2.
    for version in ["--http1.1", "--http2"] {
        let more = [&code[..], &[version, "-H", "Host: secure.test"]].concat();
        let (ok, out) = ask("open.test", "/", args(None, &more)).await;
        assert_eq!((ok, out.as_str()), (true, "421"), "{version}: SNI open.test, Host secure.test");
        let more = [&code[..], &[version, "-H", "Host: open.test"]].concat();
        let (ok, out) = ask("secure.test", "/", args(Some("alice"), &more)).await;
        assert_eq!(
            (ok, out.as_str()),
            (true, "421"),
            "{version}: SNI secure.test (verified), Host open.test"
        );
    }
    assert_eq!(
        ask("open.test", "/", args(None, &code)).await,
        (true, "200".into()),
        "a host that asks nothing"
    );

    // A CA of its own per route; a CA this node cannot read fails the handshake.
    let (ok, out) = ask("rogue.test", "/", args(Some("mallory"), &[])).await;
    assert!(ok && out.contains("Name: web"), "mallory's CA is rogue.test's: {out}");
    assert!(refused(ask("rogue.test", "/", args(Some("alice"), &code)).await), "alice's is not");
    let (ok, out) = ask("missing.test", "/", args(Some("alice"), &code)).await;
    assert!(!ok, "an unreadable CA: the handshake fails, {out}");
}
