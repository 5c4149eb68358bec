//! Hostile clients and signals (issue "Hold under abuse"): each test names the finding it
//! reproduces.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{curl, eventually, service, service_with, Backend, Binary, Mesh};

/// What the h2c task saw: one line per request, `<protocol> <path> xff=<x-forwarded-for>`.
type Seen = Arc<Mutex<Vec<String>>>;

/// A task that honours `Upgrade: h2c` as a naive HTTP server would: it answers `101` and
/// then serves HTTP/2 on the connection. `/switch-anyway` answers `101` to anything.
async fn h2c_task() -> (std::net::SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let lower = head.to_ascii_lowercase();
                log.lock()
                    .unwrap()
                    .push(format!("http/1.1 {path} upgrade={}", lower.contains("\nupgrade: h2c")));
                if lower.contains("\nupgrade: h2c") || path == "/switch-anyway" {
                    let _ = stream.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n").await;
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let xff = req
                                .headers()
                                .get("x-forwarded-for")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            log.lock().unwrap().push(format!("h2 {} xff={xff}", req.uri().path()));
                            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                                Bytes::from("smuggled\n"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                } else {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nplain\n",
                        )
                        .await;
                }
            });
        }
    });
    (addr, seen)
}

/// Reads an HTTP/1 head (up to the blank line) byte by byte.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Finding 1: an `Upgrade: h2c` request (without `HTTP2-Settings` in `Connection`) must not
/// become a tunnel through which HTTP/2 requests reach the task past routing and header
/// rewriting.
#[tokio::test]
async fn an_h2c_upgrade_never_opens_a_tunnel_past_the_router() {
    let (task, seen) = h2c_task().await;
    let routes = service_with("public", &["h2c.test"], "/public", "http", &[task.to_string()]);
    let mesh = Mesh::start(&routes).await;

    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    stream
        .write_all(b"GET /public HTTP/1.1\r\nHost: h2c.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    if head.starts_with("HTTP/1.1 101") {
        // The attack as reproduced: HTTP/2 through the tunnel, to an unrouted path, with a
        // forged client address.
        if let Ok((mut sender, conn)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await
        {
            tokio::spawn(conn);
            let req = Request::get("http://h2c.test/internal-admin")
                .header("x-forwarded-for", "6.6.6.6")
                .body(Empty::<Bytes>::new())
                .unwrap();
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await
            {
                let _ = resp.into_body().collect().await;
            }
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the upgrade must be refused and the request served plainly; got {head:?}, the task saw {seen:?}"
    );
    assert_eq!(
        seen,
        ["http/1.1 /public upgrade=false"],
        "the task saw only the routed request, without the h2c upgrade"
    );
}

/// Finding 1, the other side: a task that switches protocols unasked gets a 502, not a tunnel.
#[tokio::test]
async fn a_task_switching_protocols_unasked_is_a_bad_gateway() {
    let (task, _) = h2c_task().await;
    let mesh = Mesh::start(&service_with("sneaky", &["sneaky.test"], "/", "http", &[task.to_string()])).await;
    let (status, body) = mesh.get("sneaky.test", "/switch-anyway").await;
    assert_eq!(status.as_u16(), 502, "{body}");
}

/// Finding 3: SIGHUP reloads the routes file at once (its poll is an hour here, so only the
/// signal can apply the edit), logs it, and neither stops the process nor cuts a request in
/// flight. The agent runs with one worker (`TOKIO_WORKER_THREADS=1`: the current-thread
/// scheduler, as in the benchmarks); the other tests of the binary run the multi-thread one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_routes_file_and_keeps_serving() {
    let slow = Backend::start_with_delay("slow", Duration::from_millis(800)).await;
    let other = Backend::start("other").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, service("slow", &["slow.test"], "/", &[&slow])).unwrap();
    let mut agent = Binary::with_routes_env(&routes, "1h", &[], &[("TOKIO_WORKER_THREADS", "1")]);
    let (http, _) = agent.addresses();

    let in_flight =
        tokio::spawn(async move { curl(&["-H", "Host: slow.test", &format!("http://{http}/")]).await });
    eventually("the slow request reaches its task", Duration::from_secs(5), async || slow.held() == 1).await;
    let edited =
        service("slow", &["slow.test"], "/", &[&slow]) + &service("other", &["other.test"], "/", &[&other]);
    std::fs::write(&routes, edited).unwrap();
    agent.signal(1);
    agent.wait_for_log("routes file reloaded", Duration::from_secs(5));
    assert!(agent.log.iter().any(|l| l.contains("SIGHUP")), "the reload is logged as the signal's");

    let (ok, out) = in_flight.await.unwrap();
    assert!(ok && out.contains("Name: slow"), "the request in flight finished: {out}");
    let (ok, out) = curl(&["-H", "Host: other.test", &format!("http://{http}/")]).await;
    assert!(ok && out.contains("Name: other"), "the route added before the SIGHUP is served: {out}");
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent still runs after SIGHUP");
}

/// Finding 5: headers that claim a client address (`Forwarded`, `True-Client-IP`,
/// `X-Client-IP`, `CF-Connecting-IP`) reach the task only from a trusted front proxy.
#[tokio::test]
async fn client_address_claims_from_untrusted_clients_never_reach_the_task() {
    let web = Backend::start("web").await;
    let routes = service("web", &["claims.test"], "/", &[&web]);
    let claims = [
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("cf-connecting-ip", "6.6.6.6"),
    ];
    let ask = async |mesh: &Mesh| {
        let mut args = vec!["-H".to_owned(), "Host: claims.test".to_owned()];
        for (name, value) in claims {
            args.extend(["-H".to_owned(), format!("{name}: {value}")]);
        }
        args.push(mesh.url("/"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, body) = curl(&args).await;
        assert!(ok, "{body}");
        body
    };
    let untrusted = Mesh::start(&routes).await;
    let body = ask(&untrusted).await;
    for (name, _) in claims {
        assert_eq!(crate::harness::header_of(&body, name), None, "{name} from an untrusted client: {body}");
    }
    let trusted =
        Mesh::start_with(&routes, |c| c.proxy.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let body = ask(&trusted).await;
    for (name, value) in claims {
        assert_eq!(
            crate::harness::header_of(&body, name),
            Some(value),
            "{name} from a trusted proxy is kept"
        );
    }
}

/// Finding 7: a client's own mistakes are the client's: a bad chunk size answers 400 (not a
/// 502 blamed on the task), and a request with two `Host` headers is refused with 400
/// instead of routed by the first.
#[tokio::test]
async fn a_bad_chunk_and_a_duplicate_host_are_the_clients_400() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start(&service("web", &["chunk.test"], "/", &[&web])).await;
    let ask = async |request: &[u8]| {
        let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        read_head(&mut stream).await
    };
    let head = ask(
        b"POST / HTTP/1.1\r\nHost: chunk.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "bad chunk size: {head}");
    let head = ask(b"GET / HTTP/1.1\r\nHost: chunk.test\r\nHost: other.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "two Host headers: {head}");
    let head = ask(b"GET / HTTP/1.1\r\nHost: chunk.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "one Host: {head}");
}

/// Finding 4 and "every timeout has a name": a task that stalls in the middle of its body
/// is cut after `proxy.upstream_body_timeout`; a client that stops sending its body gets 408
/// after `proxy.client_body_timeout`; an incomplete head on the admin listener is closed
/// after `proxy.request_head_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_either_way_and_a_slow_admin_head_are_cut_by_their_timeouts() {
    // A task that sends half its body, then nothing.
    let stall = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let task = stall.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = stall.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf").await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let web = Backend::start("web").await;
    let routes = format!(
        "{}\n{}",
        service_with("stall", &["stall.test"], "/", "http", &[task.to_string()]),
        service("web", &["web.test"], "/", &[&web])
    );
    let mesh = Mesh::start_with(&routes, |c| {
        c.proxy.upstream_body_timeout = Duration::from_secs(1);
        c.proxy.client_body_timeout = Duration::from_secs(1);
        c.proxy.request_head_timeout = Duration::from_secs(1);
    })
    .await;

    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: stall.test\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(read.is_ok(), "the stalled body is cut, not held: {got}");
    assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("half"), "{got}");
    eprintln!("stalled task body cut after {:?}", started.elapsed());

    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    stream.write_all(b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 100\r\n\r\nhalf").await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(20), read_head(&mut stream)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 408"), "a stalled request body: {head}");

    let mut stream = TcpStream::connect(mesh.agent.admin_addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the admin listener closes an incomplete head");
}

/// Finding 2: limits an operator can read and set. Past `proxy.max_connections_per_client`
/// a client's next connection gets a 503 and is closed; past `proxy.max_connections` (a
/// trusted load balancer is not counted per address) so does anyone's; both are counted in
/// `/metrics`, and a connection that ends makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_gracefully_count_and_recover() {
    let web = Backend::start("web").await;
    let routes = service("web", &["limit.test"], "/", &[&web]);
    let open = async |mesh: &Mesh| {
        let mut s = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: limit.test\r\n\r\n").await.unwrap();
        let head = read_head(&mut s).await;
        (s, head)
    };
    let per_client = Mesh::start_with(&routes, |c| c.proxy.max_connections_per_client = 2).await;
    let (a, head_a) = open(&per_client).await;
    let (b, head_b) = open(&per_client).await;
    assert!(head_a.starts_with("HTTP/1.1 200") && head_b.starts_with("HTTP/1.1 200"), "{head_a}{head_b}");
    let (_, refused) = open(&per_client).await;
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("Retry-After: 1"), "{refused}");
    let metrics = curl(&[&per_client.admin_url("/metrics")]).await.1;
    assert!(
        metrics.contains("meshgate_connections_refused_total{listener=\"http\",reason=\"client_full\"} 1"),
        "{metrics}"
    );
    drop(a);
    eventually("room again after a connection ends", Duration::from_secs(5), async || {
        open(&per_client).await.1.starts_with("HTTP/1.1 200")
    })
    .await;
    drop(b);

    let full = Mesh::start_with(&routes, |c| {
        c.proxy.max_connections = 2;
        c.proxy.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let held = [open(&full).await.0, open(&full).await.0];
    let (_, refused) = open(&full).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let metrics = curl(&[&full.admin_url("/metrics")]).await.1;
    assert!(
        metrics.contains("meshgate_connections_open{listener=\"http\",protocol=\"http/1.1\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"listener_full\"} 1"), "{metrics}");
    drop(held);
}

/// Finding 2, memory: after a storm of connections has passed, the memory they used goes
/// back to the system (it stayed at the storm's peak: glibc keeps freed memory). Sizes, not
/// times: the resident size after is held under half of what the storm took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_after_a_connection_storm() {
    let mut agent = Binary::spawn_env(
        &[
            "--example",
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--max-connections-per-client",
            "5000",
        ],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    agent.wait_for_log("serving the bundled example", Duration::from_secs(10));
    let (http, _) = agent.addresses();
    let idle = agent.rss_kib();
    let mut storm = Vec::new();
    for _ in 0..3000 {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: whoami.localhost\r\n\r\n").await.unwrap();
        storm.push(s);
    }
    for s in &mut storm {
        assert!(read_head(s).await.starts_with("HTTP/1.1 200"));
    }
    let during = agent.rss_kib();
    drop(storm);
    let took = during.saturating_sub(idle);
    eventually("the storm's memory goes back", Duration::from_secs(10), async || {
        agent.rss_kib().saturating_sub(idle) * 2 < took
    })
    .await;
    eprintln!("RSS idle {idle} KiB, during 3000 connections {during} KiB, after {} KiB", agent.rss_kib());
}

/// Finding 2, descriptor exhaustion: with its descriptors used up by idle connections, the
/// agent's accept loops (HTTP, admin, DNS over TCP) pause rather than spin, and everything
/// answers again once the connections go.
#[test]
fn at_descriptor_exhaustion_no_accept_loop_spins() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, "").unwrap();
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=64:64", env!("CARGO_BIN_EXE_meshgate"), "--log-format", "json"]);
    cmd.args(["--docker-mode", "off", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    cmd.args([
        "--dns-listen",
        "127.0.0.1:0",
        "--log-access",
        "off",
        "--routes-file",
        routes.to_str().unwrap(),
    ]);
    let mut agent = Binary::spawn_command(cmd);
    let line = agent.wait_for_log("meshgate is serving", Duration::from_secs(10));
    let addr = |k: &str| line[k].as_str().unwrap().parse::<std::net::SocketAddr>().unwrap();
    let (http, admin, dns) = (addr("http"), addr("admin"), addr("dns"));
    // Fill its descriptors, then leave connections waiting in every listener's queue.
    let mut held = Vec::new();
    for target in [http, admin, dns].iter().cycle().take(150) {
        if let Ok(s) = std::net::TcpStream::connect_timeout(target, Duration::from_secs(1)) {
            held.push(s);
        }
    }
    let before = agent.cpu_time();
    std::thread::sleep(Duration::from_secs(2)); // the window measured, not a synchronisation
    let spent = agent.cpu_time().saturating_sub(before);
    assert!(
        spent < Duration::from_millis(600),
        "the agent used {spent:?} of CPU in 2 s while out of descriptors: an accept loop spins"
    );
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = std::process::Command::new("curl")
            .args(["-sf", "--max-time", "1", &format!("http://{admin}/healthz")])
            .status()
            .unwrap()
            .success();
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/healthz answers again once the connections went");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.signal(15);
    agent.wait_exit(Duration::from_secs(10));
}
