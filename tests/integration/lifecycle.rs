//! The binary as users run it: the bundled example, routes file edits, signals, bad input.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::harness::{curl, eventually, name_of, send, service, Backend, Binary, SharedPort};

fn spawn_with_routes(routes: &std::path::Path) -> Binary {
    Binary::with_routes(routes, "50ms")
}

#[tokio::test]
async fn the_bundled_example_serves_whoami_with_no_config_and_no_docker() {
    // A machine without a Docker socket: DOCKER_HOST names one that does not exist.
    let mut agent = Binary::spawn_env(
        &["--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    let line = agent.wait_for_log("serving the bundled example", Duration::from_secs(10));
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains("whoami.localhost")
            && message.contains("no Docker socket at /nonexistent/docker.sock"),
        "{line}"
    );
    let (http, admin) = agent.addresses();
    let (ok, out) = curl(&["-H", "Host: whoami.localhost", &format!("http://{http}/")]).await;
    assert!(ok && name_of(&out) == "whoami", "{out}");
    let (ok, out) = curl(&[&format!("http://{admin}/readyz")]).await;
    assert!(ok && out.contains("\"ready\": true"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_file_edits_apply_live_and_broken_edits_keep_the_old_routes() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, service("web", &["web.test"], "/", &[&a])).unwrap();
    let mut agent = spawn_with_routes(&routes);
    let (http, admin) = agent.addresses();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let get = move |client: Client<_, Full<bytes::Bytes>>, host: &'static str| async move {
        let req = Request::get(format!("http://{http}/")).header("host", host).body(Full::default()).unwrap();
        send(&client, req).await
    };

    // Load on web.test during every edit.
    let (stop, failed, ok) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, stop, failed, ok) = (client.clone(), stop.clone(), failed.clone(), ok.clone());
        load.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (status, _) = get(client.clone(), "web.test").await;
                if status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::SeqCst)
                } else {
                    failed.fetch_add(1, Ordering::SeqCst)
                };
            }
        });
    }

    // A valid edit: web.test moves to `b`, new.test appears. Applied well within a second.
    let edited =
        [service("web", &["web.test"], "/", &[&b]), service("new", &["new.test"], "/", &[&a])].concat();
    let tmp = routes.with_extension("tmp");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, &routes).unwrap();
    let edited_at = Instant::now();
    eventually("the edit is served", Duration::from_secs(5), async || {
        get(client.clone(), "new.test").await.0 == StatusCode::OK
    })
    .await;
    let took = edited_at.elapsed();
    println!("routes edit applied in {took:?}");
    eventually("web.test follows the edit", Duration::from_secs(5), async || {
        name_of(&get(client.clone(), "web.test").await.1) == "b"
    })
    .await;

    // A broken edit (line 3 has a bad address): one log line with file, line and problem.
    let broken = "[[services]]\nname = \"web\"\ntasks = [{ address = \"not-an-ip\" }]\n";
    std::fs::write(&tmp, broken).unwrap();
    std::fs::rename(&tmp, &routes).unwrap();
    let line = agent.wait_for_log("routes file rejected", Duration::from_secs(5));
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains(routes.to_str().unwrap())
            && message.contains("line 3")
            && message.contains("not-an-ip"),
        "{message}"
    );
    let (status, body) = get(client.clone(), "web.test").await;
    assert_eq!((status, name_of(&body)), (StatusCode::OK, "b"), "the routes in force stay");
    let (_, metrics) = curl(&[&format!("http://{admin}/metrics")]).await;
    assert!(metrics.contains("meshgate_provider_reload_rejected_total{provider=\"file\"} 1"), "{metrics}");
    assert!(metrics.contains("meshgate_provider_reloads_total{provider=\"file\"} 2"), "{metrics}");

    stop.store(true, Ordering::SeqCst);
    while load.join_next().await.is_some() {}
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request failed across the edits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_finishes_requests_in_flight() {
    let slow = Backend::start_with_delay("slow", Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, service("slow", &["slow.test"], "/", &[&slow])).unwrap();
    let mut agent = spawn_with_routes(&routes);
    let (http, _) = agent.addresses();

    let in_flight = tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        send(
            &client,
            Request::get(format!("http://{http}/"))
                .header("host", "slow.test")
                .body(Full::default())
                .unwrap(),
        )
        .await
    });
    eventually("the request reached the task", Duration::from_secs(5), async || slow.held() == 1).await;
    agent.signal(15);
    agent.wait_for_log("draining", Duration::from_secs(5));
    // New connections are refused while the old request is still running.
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "the listener is closed during the drain");
    assert_eq!(slow.held(), 1, "the request is still in flight");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, name_of(&body)), (StatusCode::OK, "slow"), "the in-flight request finished");
    let exit = agent.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "clean exit after the drain: {exit:?}");
}

/// An update on one node: the new agent shares the port (SO_REUSEPORT), the old one gets
/// SIGTERM. Clients sending request after request on kept-alive connections are told
/// `Connection: close` and reconnect to the new agent: none of their requests fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_hands_kept_alive_clients_to_the_next_one_without_a_failed_request() {
    let web = Backend::start("web").await;
    let port = SharedPort::new(&web);
    let listen = port.listen.clone();
    let mut old = port.spawn();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, url) =
                (stop.clone(), ok.clone(), failed.clone(), format!("http://{listen}/"));
            tokio::spawn(async move {
                let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
                while !stop.load(Ordering::SeqCst) {
                    let (status, body) = send(
                        &client,
                        Request::get(&url).header("host", "web.test").body(Full::default()).unwrap(),
                    )
                    .await;
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.lock().unwrap().push(format!("{status} {body}"));
                    }
                }
            })
        })
        .collect();
    eventually("the clients are answered", Duration::from_secs(5), async || ok.load(Ordering::SeqCst) > 200)
        .await;
    let new = port.spawn();
    old.signal(15);
    assert!(old.wait_exit(Duration::from_secs(10)).success(), "the old agent drains and exits");
    let at_exit = ok.load(Ordering::SeqCst);
    eventually("the new agent answers the clients", Duration::from_secs(5), async || {
        ok.load(Ordering::SeqCst) > at_exit + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the hand-over: {failed:?}",
        failed.len(),
        ok.load(Ordering::SeqCst) + failed.len()
    );
    new.signal(15);
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_key_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshgate.toml");
    std::fs::write(&config, "[proxy]\nhttp_listen = \"127.0.0.1:0\"\nconect_timeout = \"1s\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--config", config.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("line 3") && err.contains("conect_timeout") && err.contains("connect_timeout"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--connect-timeout", "soon"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--connect-timeout") && err.contains("500ms"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .env("MESHGATE_EJECT_BASE", "0s")
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("proxy.eject_base"), "{err}");

    // A port already taken: the error names the address and the way out.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args([
            "--example",
            "--http-listen",
            &addr,
            "--admin-listen",
            "127.0.0.1:0",
            "--whoami-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&addr), "{err}");
    assert!(
        err.contains("proxy.http_listen in the config file, --http-listen or MESHGATE_HTTP_LISTEN"),
        "{err}"
    );
}

/// Names from before the names followed the keys still work, and say the new one; a bad
/// value is reported with the name it was given by, not as a flag.
#[test]
fn old_setting_names_still_work_and_bad_values_name_their_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .env("MESHGATE_ROUTES", "/etc/meshgate/routes.toml")
        .args(["--https-listen", "127.0.0.1:8443", "--print-config"])
        .output()
        .unwrap();
    let (config, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(config.contains("[routes]\nfile = \"/etc/meshgate/routes.toml\""), "{config}");
    assert!(config.contains("https_listen = \"127.0.0.1:8443\""), "{config}");
    assert!(err.contains("MESHGATE_ROUTES is now MESHGATE_ROUTES_FILE"), "{err}");
    assert!(err.contains("--https-listen is now --tls-https-listen"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .env("MESHGATE_HTTP_LISTEN", "abc")
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("MESHGATE_HTTP_LISTEN=\"abc\" (proxy.http_listen)") && !err.contains("--http-listen"),
        "{err}"
    );
}

#[test]
fn help_teaches_with_examples_and_env_vars() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Examples:",
        "curl -H 'Host: whoami.localhost'",
        "MESHGATE_HTTP_LISTEN",
        "[proxy.connect_timeout]",
        "/metrics",
    ] {
        assert!(help.contains(needle), "--help should mention {needle}:\n{help}");
    }
}

/// A stack file passes an optional setting the user left out as `${NAME:-}`, an empty
/// variable: it means "not set", for every setting.
#[test]
fn an_empty_variable_means_the_setting_is_not_set() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .envs([
            ("MESHGATE_MESH_NODE_ADDRESS", ""),
            ("MESHGATE_MESH_UPLINK", ""),
            ("MESHGATE_HTTP_LISTEN", ""),
        ])
        .args(["--check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .env("MESHGATE_HTTP_LISTEN", "")
        .args(["--print-config"])
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&out.stdout);
    assert!(config.contains("http_listen = \"0.0.0.0:80\""), "the default stays: {config}");
}

/// The bundled example routes whoami.localhost to the whoami backend wherever
/// `--whoami-listen` puts it (it went to the default port 8001 whatever was set: 502).
#[tokio::test]
async fn the_bundled_example_follows_the_whoami_backend_where_it_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let whoami = format!("127.0.0.1:{port}");
    let mut agent =
        Binary::spawn(&[&["--example", "--whoami-listen", &whoami], crate::harness::ALONE].concat());
    let (http, _) = agent.addresses();
    let url = format!("http://{http}/");
    let answer = async || curl(&["-f", "-H", "Host: whoami.localhost", &url]).await;
    eventually("whoami.localhost answers 200", Duration::from_secs(10), async || answer().await.0).await;
    let (_, body) = answer().await;
    assert!(body.contains("GET / HTTP/1.1"), "the whoami backend answered: {body}");
}

/// An error says each cause once; the human log has no colour codes when it goes to a file
/// or a pipe (journald, `docker logs`).
#[test]
fn errors_say_each_cause_once_and_a_piped_log_has_no_colour_codes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--config", "/nonexistent/meshgate.toml", "--check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--example", "--log-format", "human", "--http-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--whoami-listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = agent.stderr.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| l.contains("serving the bundled example"));
    let _ = agent.kill();
    let _ = agent.wait();
    let line = line.expect("the agent says what it serves");
    assert!(!line.contains('\u{1b}'), "no escape codes: {line:?}");
}

/// Finding 7 of "Hold under abuse", and the signals: on SIGTERM `/readyz` says not ready at
/// once while the listeners still accept for `proxy.shutdown_delay`, so a load balancer
/// stops sending before they close; SIGUSR1 (logrotate's habit) stops nothing.
#[tokio::test]
async fn sigterm_first_says_not_ready_then_closes_and_sigusr1_stops_nothing() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, service("web", &["web.test"], "/", &[&web])).unwrap();
    let mut agent = Binary::with_routes_and(&routes, "200ms", &["--shutdown-delay", "3s"]);
    let (http, admin) = agent.addresses();
    let ready = format!("http://{admin}/readyz");
    eventually("ready", Duration::from_secs(10), async || curl(&["-f", &ready]).await.0).await;
    agent.signal(10); // SIGUSR1
    agent.wait_for_log("SIGUSR1", Duration::from_secs(5));
    assert!(curl(&["-f", &ready]).await.0, "still ready after SIGUSR1");

    agent.signal(15);
    eventually("/readyz says not ready", Duration::from_secs(2), async || {
        let (ok, body) = curl(&[&ready]).await;
        ok && body.contains("stopping")
    })
    .await;
    let (ok, out) = curl(&["-H", "Host: web.test", &format!("http://{http}/")]).await;
    assert!(ok && name_of(&out) == "web", "still served during the delay: {out}");
    agent.wait_for_log("draining", Duration::from_secs(10));
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "closed after the delay");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}
