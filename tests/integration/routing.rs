//! Routing by host and path, forwarding headers, protocols on both sides.

use base64::Engine as _;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::harness::{curl, header_of, name_of, send, service, service_with, Backend, Mesh};

#[tokio::test]
async fn routes_by_host_case_port_wildcard_and_path() {
    let [exact, wild, deeper, api, apiv2, prefix] = [
        Backend::start("exact").await,
        Backend::start("wild").await,
        Backend::start("deeper").await,
        Backend::start("api").await,
        Backend::start("apiv2").await,
        Backend::start("prefix").await,
    ];
    let routes = [
        service("exact", &["a.example.test"], "/", &[&exact]),
        service("wild", &["*.example.test"], "/", &[&wild]),
        service("deeper", &["*.b.example.test"], "/", &[&deeper]),
        service("api", &["a.example.test"], "/api", &[&api]),
        service("apiv2", &["a.example.test"], "/api/v2", &[&apiv2]),
        service("prefix", &["shop.*"], "/", &[&prefix]),
    ]
    .concat();
    let mesh = Mesh::start(&routes).await;
    let cases = [
        ("a.example.test", "/", "exact"),
        ("A.EXAMPLE.test", "/", "exact"),
        ("a.example.test:8080", "/", "exact"),
        ("a.example.test.", "/", "exact"),
        ("z.example.test", "/", "wild"),
        ("x.y.example.test", "/", "wild"),
        ("c.b.example.test", "/", "deeper"),
        ("a.example.test", "/api", "api"),
        ("a.example.test", "/api/v1/users", "api"),
        ("a.example.test", "/api/v2/users?x=1", "apiv2"),
        ("a.example.test", "/apix", "api"),
        ("shop.example.org", "/", "prefix"),
    ];
    for (host, path, want) in cases {
        let (status, body) = mesh.get(host, path).await;
        assert_eq!(status, StatusCode::OK, "{host}{path}: {body}");
        assert_eq!(name_of(&body), want, "{host}{path} went to the wrong service");
    }
    let (_, body) = mesh.get("a.example.test", "/api/v2/users?x=1").await;
    assert!(
        body.contains("GET /api/v2/users?x=1 HTTP/1.1"),
        "path and query reach the task unchanged: {body}"
    );
}

#[tokio::test]
async fn unknown_host_gets_404_from_the_proxy_or_the_default_host() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start(&service("web", &["www.test"], "/", &[&web])).await;
    let (status, body) = mesh.get("nobody.test", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no route for host `nobody.test`"), "{body}");
    assert_eq!(web.served(), 0, "an unknown host never reaches a backend");

    let fallback = Mesh::start_with(&service("web", &["www.test"], "/", &[&web]), |c| {
        c.proxy.default_host = Some("www.test".into());
    })
    .await;
    let (status, body) = fallback.get("nobody.test", "/").await;
    assert_eq!((status, name_of(&body)), (StatusCode::OK, "web"));
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let web = Backend::start("web").await;
    let routes = service("web", &["h.test"], "/", &[&web]);
    let untrusted = Mesh::start(&routes).await;
    let req = |mesh: &Mesh| {
        Request::get(mesh.url("/"))
            .header("host", "H.test:1234")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-real-ip", "6.6.6.6")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic eA==")
            .header("x-app", "kept")
            .body(Full::default())
            .unwrap()
    };
    let (status, body) = send(untrusted.client(), req(&untrusted)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header_of(&body, "host"), Some("H.test:1234"), "Host is preserved");
    assert_eq!(header_of(&body, "x-forwarded-for"), Some("127.0.0.1"), "spoofed X-Forwarded-For is replaced");
    assert_eq!(header_of(&body, "x-real-ip"), Some("127.0.0.1"));
    assert_eq!(header_of(&body, "x-forwarded-proto"), Some("http"));
    assert_eq!(header_of(&body, "x-forwarded-host"), Some("H.test:1234"));
    assert_eq!(
        header_of(&body, "x-forwarded-port"),
        Some(untrusted.agent.http_addr.port().to_string().as_str())
    );
    assert_eq!(header_of(&body, "x-app"), Some("kept"));
    for gone in ["x-private", "keep-alive", "proxy-authorization"] {
        assert_eq!(header_of(&body, gone), None, "{gone} is hop-by-hop and must not reach the task");
    }

    let trusted =
        Mesh::start_with(&routes, |c| c.proxy.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let (_, body) = send(trusted.client(), req(&trusted)).await;
    assert_eq!(
        header_of(&body, "x-forwarded-for"),
        Some("6.6.6.6, 127.0.0.1"),
        "a trusted proxy's chain is extended"
    );
    assert_eq!(header_of(&body, "x-forwarded-proto"), Some("https"));
    assert_eq!(header_of(&body, "x-real-ip"), Some("6.6.6.6"));
}

#[tokio::test]
async fn http2_prior_knowledge_from_clients_and_h2c_to_tasks() {
    let web = Backend::start("web").await;
    let routes = [
        service("web", &["h1.test"], "/", &[&web]),
        service_with("grpcish", &["h2.test"], "/", "h2c", &[web.addr.to_string()]),
    ]
    .concat();
    let mesh = Mesh::start(&routes).await;

    let h2_client = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = Request::get(format!("http://h1.test:{}/p", mesh.agent.http_addr.port()))
        .body(Full::default())
        .unwrap();
    // The client connects to h1.test's name; point it at the proxy by URI authority instead.
    let req = {
        let (mut parts, body) = req.into_parts();
        parts.uri = mesh.url("/p").parse().unwrap();
        parts.headers.insert("host", "h1.test".parse().unwrap());
        Request::from_parts(parts, body)
    };
    let (status, body) = send(&h2_client, req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("GET /p HTTP/1.1"), "an HTTP/2 client reaches an HTTP/1.1 task: {body}");

    let (status, body) = mesh.get("h2.test", "/q").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("HTTP/2.0"), "an h2c route speaks HTTP/2 to the task: {body}");
    assert_eq!(header_of(&body, "x-forwarded-host"), Some("h2.test"));

    // The same with curl, a client people actually use.
    let url = mesh.url("/c");
    let (ok, out) =
        curl(&["--http2-prior-knowledge", "-H", "Host: h1.test", "-w", "\n%{http_version}", &url]).await;
    assert!(ok && out.ends_with("\n2") && name_of(&out) == "web", "curl over h2c: {out}");
    let (ok, out) = curl(&["-H", "Host: h1.test", "-w", "\n%{http_version}", &url]).await;
    assert!(ok && out.ends_with("\n1.1") && name_of(&out) == "web", "curl over HTTP/1.1: {out}");
}

#[tokio::test]
async fn requests_spread_over_tasks() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let mesh = Mesh::start(&service("web", &["w.test"], "/", &[&a, &b, &c])).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (status, body) = mesh.get("w.test", "/").await;
        assert_eq!(status, StatusCode::OK);
        seen.insert(name_of(&body).to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
}

/// Basic authentication from the routes file, users as `openssl passwd -apr1` writes them:
/// the task never sees the credentials when `remove_header` says so.
#[tokio::test]
async fn basic_auth_from_the_routes_file_and_the_header_kept_or_removed() {
    let made = std::process::Command::new("openssl").args(["passwd", "-apr1", "s3cret"]).output().unwrap();
    let hash = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let web = Backend::start("web").await;
    let route = |host: &str, remove: bool| {
        service(host, &[host], "/", &[&web]).replace(
            "protocol = ",
            &format!("basic_auth = {{ users = [\"ann:{hash}\"], realm = \"staff\", remove_header = {remove} }}\nprotocol = "),
        )
    };
    let mesh = Mesh::start(&(route("kept.test", false) + &route("removed.test", true))).await;
    let credentials = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ann:s3cret"));
    let get = async |host: &str, auth: Option<&str>| {
        let mut req = http::Request::get(mesh.url("/")).header("host", host);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        crate::harness::send(mesh.client(), req.body(http_body_util::Full::default()).unwrap()).await
    };
    assert_eq!(get("kept.test", None).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = get("kept.test", Some(&credentials)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(crate::harness::header_of(&body, "authorization").is_some(), "kept: {body}");
    let (status, body) = get("removed.test", Some(&credentials)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(crate::harness::header_of(&body, "authorization").is_none(), "removed: {body}");
    let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ann:S3cret"));
    assert_eq!(get("removed.test", Some(&wrong)).await.0, StatusCode::UNAUTHORIZED);
    // The admin's state names the users, never their hashes.
    let (_, state) = curl(&[&mesh.admin_url("/api/state")]).await;
    assert!(state.contains("ann:REDACTED") && !state.contains(&hash), "{state}");
}
