//! Tasks that die, refuse or stall, and routing changes under load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meshgate::provider::file;
use tokio::task::JoinSet;

use crate::harness::{eventually, name_of, service, service_with, Backend, Mesh};

/// Counts of a load run.
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Workers waiting at the gate (between two requests).
    parked: AtomicUsize,
    /// While false, workers finish their request and wait before sending the next.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            gate: tokio::sync::watch::channel(true).0,
        }
    }
}

/// `workers` clients sending `path` back to back until `stop` is set.
fn load(
    mesh: &Arc<Mesh>,
    host: &'static str,
    path: &'static str,
    workers: usize,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (mesh, stop, tally) = (mesh.clone(), stop.clone(), tally.clone());
        set.spawn(async move {
            let mut gate = tally.gate.subscribe();
            while !stop.load(Ordering::SeqCst) {
                if !*gate.borrow() {
                    tally.parked.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    tally.parked.fetch_sub(1, Ordering::SeqCst);
                }
                let (status, body) = mesh.get(host, path).await;
                if status == StatusCode::OK {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    tally.failed.fetch_add(1, Ordering::SeqCst);
                    eprintln!("failed: {status} {body}");
                }
            }
        });
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_task_fails_only_the_requests_it_was_holding() {
    // `slow` holds every request for an hour; `fast` answers after 20 ms. Power of two
    // choices on in-flight counts soon has half the workers stuck on `slow` and the others
    // busy on `fast`.
    let slow = Backend::start_with_delay("slow", Duration::from_secs(3600)).await;
    let fast = Backend::start_with_delay("fast", Duration::from_millis(20)).await;
    let mesh = Arc::new(Mesh::start(&service("web", &["k.test"], "/", &[&slow, &fast])).await);
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let workers = 8;
    let mut set = load(&mesh, "k.test", "/", workers, &stop, &tally);
    eventually("slow holds requests and fast serves", Duration::from_secs(20), async || {
        slow.held() >= 2 && fast.served() >= 20
    })
    .await;
    // Close the gate: the workers not stuck on `slow` finish their request and wait. Once
    // every worker is either parked or held by `slow`, nothing is on its way to any task,
    // so the count below is exact.
    tally.gate.send_replace(false);
    eventually("every worker parked or held", Duration::from_secs(20), async || {
        tally.parked.load(Ordering::SeqCst) + slow.held() == workers && fast.held() == 0
    })
    .await;
    let held = slow.kill().await;
    tally.gate.send_replace(true);
    let ok_at_kill = tally.ok.load(Ordering::SeqCst);
    eventually("load goes on after the kill", Duration::from_secs(20), async || {
        tally.ok.load(Ordering::SeqCst) > ok_at_kill + 100
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    while set.join_next().await.is_some() {}
    assert!(held >= 2);
    assert_eq!(tally.failed.load(Ordering::SeqCst), held, "exactly the requests the killed task held fail");

    // New requests never go to the dead task: connects to it are refused, retried on
    // `fast`, and the task is ejected.
    for _ in 0..20 {
        let (status, body) = mesh.get("k.test", "/").await;
        assert_eq!((status, name_of(&body)), (StatusCode::OK, "fast"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_state_every_10ms_under_load_fails_no_request() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let one = service("web", &["s.test"], "/", &[&a, &b]);
    let two =
        [service("web", &["s.test", "other.test"], "/", &[&a, &c]), service("x", &["x.test"], "/", &[&b])]
            .concat();
    let mesh = Arc::new(Mesh::start(&one).await);
    let states = [
        file::parse("one".as_ref(), &one, "swap").unwrap(),
        file::parse("two".as_ref(), &two, "swap").unwrap(),
    ];
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let mut set = load(&mesh, "s.test", "/", 8, &stop, &tally);
    let mut swaps = 0;
    let generation_before = mesh.agent.hub.load().generation;
    // Replace the file provider's state directly: 200 swaps, one every 10 ms.
    for i in 0..200 {
        mesh.agent.hub.publish(file::NAME, states[i % 2].clone());
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while set.join_next().await.is_some() {}
    assert_eq!(mesh.agent.hub.load().generation, generation_before + swaps);
    assert_eq!(tally.failed.load(Ordering::SeqCst), 0, "no request fails during {swaps} swaps");
    assert!(tally.ok.load(Ordering::SeqCst) > 200, "the load really ran");
    assert!(b.served() > 0 && c.served() > 0, "both versions of the state served requests");
}

#[tokio::test]
async fn a_refusing_task_is_ejected_and_requests_retry_on_another() {
    let live = Backend::start("live").await;
    // A port nothing listens on: bind, note it, close.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let routes = service_with("web", &["e.test"], "/", "http", &[dead.to_string(), live.addr.to_string()]);
    let mesh = Mesh::start_with(&routes, |c| c.proxy.eject_base = Duration::from_secs(30)).await;
    for _ in 0..30 {
        let (status, body) = mesh.get("e.test", "/").await;
        assert_eq!((status, name_of(&body)), (StatusCode::OK, "live"), "{body}");
    }
    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("meshgate_backend_up") && l.contains(&dead.to_string()))
        .unwrap();
    assert!(line.ends_with(" 0"), "the refusing task is reported down: {line}");
    let state = reqwest_text(&mesh.admin_url("/api/state")).await;
    assert!(state.contains("\"ejected\": true"), "{state}");
}

#[tokio::test]
async fn errors_map_to_502_503_504() {
    let slow = Backend::start("slow").await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let routes = [
        service_with("empty", &["none.test"], "/", "http", &[]),
        service_with("dead", &["dead.test"], "/", "http", &[dead.to_string()]),
        service("slow", &["slow.test"], "/", &[&slow]),
    ]
    .concat();
    let mesh =
        Mesh::start_with(&routes, |c| c.proxy.upstream_response_timeout = Duration::from_millis(300)).await;
    assert_eq!(mesh.get("none.test", "/").await.0, StatusCode::SERVICE_UNAVAILABLE, "no task");
    assert_eq!(mesh.get("dead.test", "/").await.0, StatusCode::BAD_GATEWAY, "connection refused");
    assert_eq!(
        mesh.get("slow.test", "/?wait=5s").await.0,
        StatusCode::GATEWAY_TIMEOUT,
        "no response head in time"
    );
    assert_eq!(mesh.get("slow.test", "/?wait=10ms").await.0, StatusCode::OK, "fast enough");
}

/// A plain GET of an admin URL.
pub async fn reqwest_text(url: &str) -> String {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::get(url).body(http_body_util::Full::<bytes::Bytes>::default()).unwrap();
    crate::harness::send(&client, req).await.1
}

/// A task (or the agent a hop goes through) that closes a kept-alive connection just as the
/// next request is written on it: an idempotent request without a body is sent again on a
/// new connection, once; a request with a body is not (it may have been acted on).
#[tokio::test]
async fn a_kept_alive_connection_closed_under_a_request_replays_only_idempotent_bodiless_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers the first request of each connection (keeping it alive), then reads the
    // second and closes without an answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                let mut answered = false;
                loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    if answered {
                        return; // the second request: closed under it
                    }
                    answered = true;
                    seen.clear();
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
                }
            });
        }
    });
    let mesh = Mesh::start(&service_with("flaky", &["flaky.test"], "/", "http", &[addr.to_string()])).await;
    for i in 0..6 {
        let (status, body) = mesh.get("flaky.test", "/").await;
        assert_eq!(status, StatusCode::OK, "GET {i}: replayed on a new connection: {body}");
    }
    let mut failed = 0;
    for _ in 0..6 {
        let req = http::Request::post(mesh.url("/"))
            .header("host", "flaky.test")
            .body(http_body_util::Full::from("x"))
            .unwrap();
        let (status, _) = crate::harness::send(mesh.client(), req).await;
        failed += usize::from(status == StatusCode::BAD_GATEWAY);
    }
    assert!(failed > 0, "a POST with a body is never sent twice: the closed connection answers 502");
}
