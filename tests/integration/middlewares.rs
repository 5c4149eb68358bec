//! Drop-in issue, items 4 and 5: Traefik's middlewares, rule matchers and service options,
//! as labels on real containers on the real engine, checked with curl as a user would (what
//! the task got, from busybox httpd's CGI environment; what the client got, from the
//! answer's head). The cases follow Traefik's documentation, traefik/traefik
//! `docs/content/middlewares/http/`: `stripprefix.md` @ 4644ab2a, `headers.md` @ f22e13b8,
//! `redirectregex.md` @ baceafbd, `redirectscheme.md` @ 3a304371, `ratelimit.md` @ cdc80926,
//! `forwardauth.md` @ f938bcab, `compress.md` @ 627827c0; and its routing pages for rules,
//! priority, sticky cookies and health checks (`docs/content/routing/`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::docker::Container;
use crate::harness::{curl, eventually, Mesh};

/// `curl -si` with a Host header (and more arguments): the answer's head and body, lower-case
/// header names as curl prints them over HTTP/1.1.
async fn head_and_body(mesh: &Mesh, host: &str, path: &str, more: &[&str]) -> String {
    let url = mesh.url(path);
    let host = format!("Host: {host}");
    let mut args = vec!["-si", "-H", host.as_str()];
    args.extend_from_slice(more);
    args.push(&url);
    curl(&args).await.1.replace('\r', "").to_ascii_lowercase()
}

/// An authentication server as Authelia answers a forward-auth: 200 with `Remote-User` for
/// the session cookie `session=good`, else a redirect to its login page. Keeps the headers of
/// every question.
async fn auth_server() -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    log.lock().unwrap().push(req.headers().clone());
                    let good = req.headers().get("cookie").is_some_and(|c| c == "session=good");
                    let resp = if good {
                        Response::builder().header("remote-user", "ann").body(Full::new(Bytes::new()))
                    } else {
                        Response::builder()
                            .status(StatusCode::FOUND)
                            .header("location", "https://login.test/")
                            .body(Full::new(Bytes::from_static(b"log in first")))
                    };
                    async move { Ok::<_, Infallible>(resp.unwrap()) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_middlewares_change_requests_and_answers_as_traefik_does() {
    let (auth, asked) = auth_server().await;
    let mesh = Mesh::start_docker(|_| {}).await;
    let forward = format!("traefik.http.middlewares.fa.forwardauth.address=http://{auth}/verify");
    let labels = [
        "traefik.enable=true",
        // Path and headers (Traefik's docs, "StripPrefix" and "Headers": customRequestHeaders,
        // frameDeny, CORS).
        "traefik.http.routers.api.rule=Host(`mw.docker.test`) && PathPrefix(`/api`)",
        "traefik.http.routers.api.middlewares=strip,sec",
        "traefik.http.middlewares.strip.stripprefix.prefixes=/api",
        "traefik.http.middlewares.sec.headers.customRequestHeaders.X-Script-Name=test",
        "traefik.http.middlewares.sec.headers.customResponseHeaders.X-Served-By=meshgate",
        "traefik.http.middlewares.sec.headers.frameDeny=true",
        "traefik.http.middlewares.sec.headers.accessControlAllowOriginList=https://app.test",
        "traefik.http.middlewares.sec.headers.accessControlAllowMethods=GET,PUT",
        "traefik.http.middlewares.sec.headers.addVaryHeader=true",
        // Redirects ("RedirectRegex", "RedirectScheme").
        "traefik.http.routers.old.rule=Host(`old.docker.test`)",
        "traefik.http.routers.old.middlewares=moved",
        "traefik.http.middlewares.moved.redirectregex.regex=^http://old\\.docker\\.test/(.*)",
        "traefik.http.middlewares.moved.redirectregex.replacement=http://new.docker.test/$1",
        "traefik.http.middlewares.moved.redirectregex.permanent=true",
        "traefik.http.routers.sec.rule=Host(`tls.docker.test`)",
        "traefik.http.routers.sec.middlewares=tohttps",
        "traefik.http.middlewares.tohttps.redirectscheme.scheme=https",
        "traefik.http.middlewares.tohttps.redirectscheme.permanent=true",
        // "RateLimit": 2 at once, then 1 a minute.
        "traefik.http.routers.lim.rule=Host(`lim.docker.test`)",
        "traefik.http.routers.lim.middlewares=rl",
        "traefik.http.middlewares.rl.ratelimit.average=1",
        "traefik.http.middlewares.rl.ratelimit.period=1m",
        "traefik.http.middlewares.rl.ratelimit.burst=2",
        // "ForwardAuth", as Authelia's docs set it: defined on the authentication server's
        // container, named by the application's router.
        "traefik.http.routers.fa.rule=Host(`fa.docker.test`)",
        "traefik.http.routers.fa.middlewares=fa@docker",
    ];
    let args: Vec<&str> = labels.iter().flat_map(|l| ["-l", l]).collect();
    let task = Container::run("mw", &args, 80).await;
    let _definer = Container::run(
        "authdef",
        &["-l", &forward, "-l", "traefik.http.middlewares.fa.forwardauth.authResponseHeaders=Remote-User"],
        80,
    )
    .await;
    eventually("the routers are served", Duration::from_secs(30), async || {
        mesh.get("old.docker.test", "/x").await.0 == StatusCode::MOVED_PERMANENTLY
            && mesh.get("fa.docker.test", "/").await.0 == StatusCode::FOUND
    })
    .await;

    // stripprefix + headers: the task gets `/cgi-bin/env` with the prefix and the custom
    // header; the client gets the response headers.
    let got = head_and_body(&mesh, "mw.docker.test", "/api/cgi-bin/env", &[]).await;
    assert!(got.starts_with("http/1.1 200"), "{got}");
    for want in [
        "request_uri=/cgi-bin/env",
        "http_x_forwarded_prefix=/api",
        "http_x_script_name=test",
        // As nginx-proxy tells a task behind a path: what the client asked, before rewrites.
        "http_x_original_uri=/api/cgi-bin/env",
    ] {
        assert!(got.contains(want), "the task got {want}: {got}");
    }
    assert!(got.contains("x-frame-options: deny") && got.contains("x-served-by: meshgate"), "{got}");
    assert!(!got.contains("access-control-allow-origin"), "no Origin, no CORS headers: {got}");
    let got = head_and_body(&mesh, "mw.docker.test", "/api/", &["-H", "Origin: https://app.test"]).await;
    assert!(
        got.contains("access-control-allow-origin: https://app.test") && got.contains("vary: origin"),
        "{got}"
    );
    assert!(got.contains(&task.id), "{got}");
    let got = head_and_body(&mesh, "mw.docker.test", "/api/", &["-H", "Origin: https://evil.test"]).await;
    assert!(!got.contains("access-control-allow-origin"), "another origin is not allowed: {got}");
    // A preflight is answered by the proxy.
    let preflight =
        ["-X", "OPTIONS", "-H", "Origin: https://app.test", "-H", "Access-Control-Request-Method: PUT"];
    let got = head_and_body(&mesh, "mw.docker.test", "/api/cgi-bin/env", &preflight).await;
    assert!(
        got.starts_with("http/1.1 200") && got.contains("access-control-allow-methods: get, put"),
        "{got}"
    );
    assert!(!got.contains("request_uri"), "a preflight does not reach the task: {got}");

    // Redirects: the URL rewritten by the regex (301 for GET); the scheme (308 keeps a POST).
    let got = head_and_body(&mesh, "old.docker.test", "/a/b?c=1", &[]).await;
    assert!(
        got.starts_with("http/1.1 301") && got.contains("location: http://new.docker.test/a/b?c=1"),
        "{got}"
    );
    let got = head_and_body(&mesh, "tls.docker.test", "/form", &["-X", "POST", "-d", "x=1"]).await;
    assert!(
        got.starts_with("http/1.1 308") && got.contains("location: https://tls.docker.test/form"),
        "{got}"
    );

    // The rate limit: the burst, then 429 with when to come back.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let got = head_and_body(&mesh, "lim.docker.test", "/", &[]).await;
        codes.push(got[9..12].to_owned());
        if codes.len() == 3 {
            assert!(got.contains("retry-after:"), "{got}");
        }
    }
    assert_eq!(codes, ["200", "200", "429"]);

    // forwardauth: the server's redirect to its login page without a session; with one, the
    // task gets the user the server vouches for, never the one the client claims.
    let got = head_and_body(&mesh, "fa.docker.test", "/cgi-bin/env", &[]).await;
    assert!(got.starts_with("http/1.1 302") && got.contains("location: https://login.test/"), "{got}");
    assert!(got.contains("log in first") && !got.contains("request_uri"), "{got}");
    let claims = ["-H", "Cookie: session=good", "-H", "Remote-User: admin"];
    let got = head_and_body(&mesh, "fa.docker.test", "/cgi-bin/env?q=1", &claims).await;
    assert!(got.starts_with("http/1.1 200") && got.contains("http_remote_user=ann"), "{got}");
    assert!(!got.contains("admin"), "{got}");
    let last = asked.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["x-forwarded-uri"], "/cgi-bin/env?q=1");
    assert_eq!(last["x-forwarded-host"], "fa.docker.test");
    assert_eq!(last["x-forwarded-method"], "GET");
}

/// Drop-in issue, item 4: Traefik rule matchers beyond `Host` and `PathPrefix` (its docs,
/// "Routers: Rule"), on three real containers sharing one host: a request goes to the router
/// whose whole rule it meets, the highest priority first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_rule_matchers_choose_among_routers_of_one_host() {
    let mesh = Mesh::start_docker(|_| {}).await;
    let run = async |tag: &str, rule: &str, more: &[&str]| {
        let rule = format!("traefik.http.routers.{tag}.rule={rule}");
        let mut args = vec!["-l", "traefik.enable=true", "-l", rule.as_str()];
        args.extend(more.iter().flat_map(|m| ["-l", *m]));
        Container::run(tag, &args, 80).await
    };
    let site = run("site", "Host(`rules.docker.test`)", &[]).await;
    let writes = run("writes", "Host(`rules.docker.test`) && (Method(`POST`) || Method(`PUT`))", &[]).await;
    let canary = run(
        "canary",
        "Host(`rules.docker.test`) && (Header(`X-Canary`, `on`) || Query(`canary`, `1`)) && !ClientIP(`192.0.2.0/24`)",
        &[],
    )
    .await;
    let ping = run(
        "ping",
        "Host(`rules.docker.test`) && Path(`/app/`)",
        &["traefik.http.routers.ping.priority=1000"],
    )
    .await;
    let url = |path: &str| mesh.url(path);
    // Which container answered: its page, or (busybox httpd takes a POST only for a CGI
    // script) the HOSTNAME its CGI environment shows.
    let who = async |args: &[&str]| {
        let mut all = vec!["-s", "-H", "Host: rules.docker.test"];
        all.extend_from_slice(args);
        let body = curl(&all).await.1;
        body.lines().find_map(|l| l.strip_prefix("HOSTNAME=")).unwrap_or(body.trim()).to_owned()
    };
    let root = url("/");
    let cgi = url("/cgi-bin/env");
    let ping_url = url("/app/");
    eventually("all four routers are served", Duration::from_secs(30), async || {
        who(&[&root]).await == site.id
            && who(&["-X", "POST", &cgi]).await == writes.id
            && who(&["-H", "X-Canary: on", &root]).await == canary.id
            && who(&[&ping_url]).await == ping.id
    })
    .await;
    assert_eq!(who(&[&cgi]).await, site.id, "a GET is not a write");
    assert_eq!(who(&[&url("/?canary=1")]).await, canary.id);
    assert_eq!(who(&[&url("/?canary=2")]).await, site.id);
    assert_eq!(who(&["-H", "X-Canary: off", &root]).await, site.id);
    // `Path` is exact: `/app/` only, and above every other router by its priority (a canary
    // too).
    assert_eq!(who(&["-H", "X-Canary: on", &ping_url]).await, ping.id);
    assert_eq!(who(&[&url("/app/index.html")]).await, site.id);
}

/// Drop-in issue, item 2 and 4: affinity as nginx-proxy (`loadbalance` label, `hash
/// $remote_addr`) and Traefik (a sticky cookie) give it, over two real containers sharing a
/// host; Traefik's `passHostHeader=false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_keeps_a_client_to_its_task_and_pass_host_header_false_names_the_task() {
    let mesh = Mesh::start_docker(|_| {}).await;
    let hashed = [
        "-e",
        "VIRTUAL_HOST=hashed.docker.test",
        "-l",
        "com.github.nginx-proxy.nginx-proxy.loadbalance=hash $remote_addr;",
    ];
    let sticky = [
        "-l",
        "traefik.enable=true",
        "-l",
        "traefik.http.routers.web.rule=Host(`sticky.docker.test`)",
        "-l",
        "traefik.http.services.web.loadbalancer.sticky.cookie.name=srv",
        "-l",
        "traefik.http.services.web.loadbalancer.sticky.cookie.httponly=true",
        "-l",
        "traefik.http.services.web.loadbalancer.passhostheader=false",
    ];
    let mut tasks = Vec::new();
    for tag in ["a", "b"] {
        let mut args: Vec<&str> = hashed.to_vec();
        args.extend_from_slice(&sticky);
        tasks.push(Container::run(tag, &args, 80).await);
    }
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let seen = async |host: &str, n: usize, more: &[&str]| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let mut args = vec!["-s", "-H"];
            let h = format!("Host: {host}");
            args.push(&h);
            args.extend_from_slice(more);
            let url = mesh.url("/");
            args.push(&url);
            *seen.entry(curl(&args).await.1.trim().to_owned()).or_default() += 1;
        }
        seen
    };
    eventually("both tasks serve the sticky host", Duration::from_secs(30), async || {
        seen("sticky.docker.test", 20, &[]).await.keys().filter(|k| ids.contains(k)).count() == 2
    })
    .await;
    // The client's address: always the same task.
    let hashed = seen("hashed.docker.test", 20, &[]).await;
    assert_eq!(hashed.len(), 1, "{hashed:?}");
    assert!(ids.contains(hashed.keys().next().unwrap()), "{hashed:?}");
    // The cookie: set on the first answer, naming its task; sent back, the same task.
    let url = mesh.url("/");
    let (_, head) = curl(&["-si", "-H", "Host: sticky.docker.test", &url]).await;
    let head = head.replace('\r', "");
    let cookie =
        head.lines().find_map(|l| l.strip_prefix("set-cookie: ")).unwrap_or_else(|| panic!("{head}"));
    assert!(cookie.starts_with("srv=") && cookie.contains("HttpOnly"), "{cookie}");
    let first = head.lines().last().unwrap().trim().to_owned();
    let pair = format!("Cookie: {}", cookie.split(';').next().unwrap());
    let kept = seen("sticky.docker.test", 20, &["-H", &pair]).await;
    assert_eq!(kept.keys().collect::<Vec<_>>(), vec![&first], "{kept:?}");
    // passHostHeader=false: the task gets its own address as Host.
    let (_, env) =
        curl(&["-s", "-H", "Host: sticky.docker.test", "-H", &pair, &mesh.url("/cgi-bin/env")]).await;
    let host = env.lines().find_map(|l| l.strip_prefix("HTTP_HOST=")).unwrap_or_else(|| panic!("{env}"));
    assert!(host.ends_with(":80") && host != "sticky.docker.test", "{env}");
}

/// Drop-in issue, item 4: Traefik's `loadbalancer.healthcheck` (its docs, "Services: Health
/// Check"): a task whose check path fails takes no traffic until it passes again; it shows
/// as `meshgate_backend_up 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_health_check_takes_a_failing_task_out_of_rotation_and_back() {
    let mesh = Mesh::start_docker(|_| {}).await;
    let labels = [
        "-l",
        "traefik.enable=true",
        "-l",
        "traefik.http.routers.hc.rule=Host(`hc.docker.test`)",
        "-l",
        "traefik.http.services.hc.loadbalancer.healthcheck.path=/t/",
        "-l",
        "traefik.http.services.hc.loadbalancer.healthcheck.interval=300ms",
        "-l",
        "traefik.http.services.hc.loadbalancer.healthcheck.timeout=1s",
    ];
    let (a, b) = (Container::run("hca", &labels, 80).await, Container::run("hcb", &labels, 80).await);
    let answers = async || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            seen.insert(
                curl(&["-s", "-H", "Host: hc.docker.test", &mesh.url("/")]).await.1.trim().to_owned(),
            );
        }
        seen
    };
    let both: std::collections::BTreeSet<String> = [a.id.clone(), b.id.clone()].into();
    eventually("both tasks take traffic", Duration::from_secs(30), async || answers().await == both).await;
    b.exec(&["rm", "-r", "/w/t"]).await;
    let only_a: std::collections::BTreeSet<String> = [a.id.clone()].into();
    eventually("the failing task takes none", Duration::from_secs(30), async || answers().await == only_a)
        .await;
    let metrics = crate::resilience::reqwest_text(&mesh.admin_url("/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshgate_backend_up{") && l.contains(&b.id[..12]) && l.ends_with(" 0"))
            || metrics.lines().any(|l| l.starts_with("meshgate_backend_up{") && l.ends_with(" 0")),
        "{metrics}"
    );
    b.exec(&["sh", "-c", "mkdir /w/t && hostname > /w/t/index.html"]).await;
    eventually("it is back once its check passes", Duration::from_secs(30), async || answers().await == both)
        .await;
}

/// Drop-in issue, item 4: Traefik's `compress` (its docs, "Compress": gzip for clients that
/// accept it, not below `minResponseBodyBytes`, not for excluded types), on a real container
/// and checked with curl, which decompresses what it gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compress_middleware_gzips_what_clients_accept() {
    let mesh = Mesh::start_docker(|_| {}).await;
    let labels = [
        "-l",
        "traefik.enable=true",
        "-l",
        "traefik.http.routers.z.rule=Host(`zip.docker.test`)",
        "-l",
        "traefik.http.routers.z.middlewares=zip",
        "-l",
        "traefik.http.middlewares.zip.compress=true",
        "-l",
        "traefik.http.middlewares.zip.compress.excludedcontenttypes=image/png",
    ];
    // A 20,000-byte page, a small one, and a "picture".
    let serve = "mkdir -p /w && i=0; while [ $i -lt 1000 ]; do echo 'meshgate compress test' >> /w/big.html; i=$((i+1)); done \
                 && echo small > /w/small.html && cp /w/big.html /w/pic.png && exec httpd -f -p 80 -h /w";
    let _task = Container::run_script("zip", &labels, serve).await;
    let head = async |path: &str, more: &[&str]| {
        let url = mesh.url(path);
        let mut args = vec!["-s", "-D", "-", "-o", "/dev/null", "-H", "Host: zip.docker.test"];
        args.extend_from_slice(more);
        args.push(&url);
        curl(&args).await.1.replace('\r', "").to_ascii_lowercase()
    };
    eventually("the route is served", Duration::from_secs(30), async || {
        head("/small.html", &[]).await.starts_with("http/1.1 200")
    })
    .await;
    let gz = ["-H", "Accept-Encoding: gzip"];
    let got = head("/big.html", &gz).await;
    assert!(got.contains("content-encoding: gzip") && got.contains("vary: accept-encoding"), "{got}");
    assert!(!got.contains("content-length"), "its length is not the task's any more: {got}");
    // What curl decompresses is the page, byte for byte, and far fewer bytes came.
    let url = mesh.url("/big.html");
    let (_, body) = curl(&["-s", "--compressed", "-H", "Host: zip.docker.test", &url]).await;
    assert_eq!(body, "meshgate compress test\n".repeat(1000));
    let (_, size) = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "-H",
        "Accept-Encoding: gzip",
        "-H",
        "Host: zip.docker.test",
        &url,
    ])
    .await;
    assert!(size.parse::<u64>().unwrap() < 2_000, "{size} bytes for a 23,000-byte page");
    // Not without Accept-Encoding, not a small body, not an excluded type.
    assert!(!head("/big.html", &[]).await.contains("content-encoding"));
    assert!(!head("/small.html", &gz).await.contains("content-encoding"));
    assert!(!head("/pic.png", &gz).await.contains("content-encoding"));
}
