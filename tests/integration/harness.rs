//! A small fluent harness: backends that can be killed for real, an in-process agent on
//! ephemeral ports, the agent binary as a child process, and HTTP clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::agent::{self, RunningAgent, Sources};
use meshgate::config::Config;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Polls `check` until it returns true or `deadline` passes (then panics with `what`).
pub async fn eventually(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A whoami backend on an ephemeral loopback port that counts requests and can be killed.
pub struct Backend {
    pub addr: SocketAddr,
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::start_with_delay(name, Duration::ZERO).await
    }

    /// A backend that holds every request for `delay` before answering.
    pub async fn start_with_delay(name: &str, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let task = {
            let (name, started, finished) = (Arc::<str>::from(name), started.clone(), finished.clone());
            tokio::spawn(async move {
                let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()));
                // Dropping the JoinSet (when this task is aborted) closes every connection.
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let (stream, peer) = listener.accept().await.unwrap();
                    let (name, started, finished, builder) =
                        (name.clone(), started.clone(), finished.clone(), builder.clone());
                    conns.spawn(async move {
                        let svc = service_fn(move |req| {
                            let (name, started, finished) = (name.clone(), started.clone(), finished.clone());
                            async move {
                                started.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(delay).await;
                                let resp = meshgate::whoami::answer(req, peer, name).await;
                                finished.fetch_add(1, Ordering::SeqCst);
                                resp
                            }
                        });
                        let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
                    });
                    while conns.try_join_next().is_some() {}
                }
            })
        };
        Self { addr, started, finished, task }
    }

    /// Requests received and not yet answered.
    pub fn held(&self) -> usize {
        self.started.load(Ordering::SeqCst) - self.finished.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    /// Kills the backend: the listener and every connection close. Returns how many
    /// requests it was holding at that moment.
    pub async fn kill(self) -> usize {
        self.task.abort();
        let Self { task, started, finished, .. } = self;
        let _ = task.await;
        started.load(Ordering::SeqCst) - finished.load(Ordering::SeqCst)
    }
}

/// TOML for one service in the routes file.
pub fn service(name: &str, hosts: &[&str], path: &str, tasks: &[&Backend]) -> String {
    service_with(name, hosts, path, "http", &tasks.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>())
}

pub fn service_with(name: &str, hosts: &[&str], path: &str, protocol: &str, addrs: &[String]) -> String {
    let tasks: Vec<String> = addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[services]]\nname = \"{name}\"\ntasks = [{}]\n[[services.http]]\nhosts = [{}]\npath = \"{path}\"\nport = 1\nprotocol = \"{protocol}\"\n\n",
        tasks.join(", "),
        hosts.join(", ")
    )
}

/// An agent running in this process on ephemeral ports, fed by a routes file.
pub struct Mesh {
    pub agent: RunningAgent,
    dir: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A test config: ephemeral ports, fast polling, short timeouts.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.proxy.http_listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.routes.poll_interval = Duration::from_millis(50);
    cfg.proxy.shutdown_grace = Duration::from_secs(5);
    // No load balancer to tell: a test agent closes at once on shutdown.
    cfg.proxy.shutdown_delay = Duration::ZERO;
    // Many agents share the test process's stdout: a test that reads the access log gives
    // it a file.
    cfg.log.access = "off".into();
    cfg
}

impl Mesh {
    pub async fn start(routes: &str) -> Self {
        Self::start_with(routes, |_| {}).await
    }

    pub async fn start_with(routes: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_sources(routes, false, tweak).await
    }

    /// An agent following the Docker engine (plus a routes file).
    pub async fn start_docker(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_sources("", true, |c| {
            c.docker.debounce = Duration::from_millis(50);
            tweak(c);
        })
        .await
    }

    pub async fn start_sources(routes: &str, docker: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, routes).unwrap();
        let mut cfg = test_config();
        cfg.routes.file = Some(path.clone());
        tweak(&mut cfg);
        cfg.validate().unwrap();
        let sources = Sources { file: Some(path), docker, example: false };
        let agent = agent::start(cfg, sources).await.expect("agent starts");
        // With Docker as a source it listens once the engine answered (or could not be
        // reached): the state is complete then.
        let readiness = agent.readiness.clone();
        eventually("the agent listens for HTTP", Duration::from_secs(20), async || {
            readiness.report().1.get("http").is_some_and(|s| s.ready)
        })
        .await;
        Self { agent, dir, client: Client::builder(TokioExecutor::new()).build_http() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.agent.http_addr)
    }

    /// The routes file the agent watches.
    pub fn routes_path(&self) -> std::path::PathBuf {
        self.dir.path().join("routes.toml")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.agent.admin_addr)
    }

    /// GET with a `Host` header over a pooled HTTP/1.1 client.
    pub async fn get(&self, host: &str, path: &str) -> (StatusCode, String) {
        let req = Request::get(self.url(path)).header("host", host).body(Full::default()).unwrap();
        send(&self.client, req).await
    }

    pub fn client(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.client
    }
}

/// Sends a request and reads the whole answer; a transport error is a 599 with the error.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, String) {
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body =
                resp.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (StatusCode::from_u16(599).unwrap(), format!("client error: {e:?}")),
    }
}

/// The `Name:` line of a whoami answer.
pub fn name_of(body: &str) -> &str {
    body.lines().find_map(|l| l.strip_prefix("Name: ")).unwrap_or("")
}

/// A header line (lower-case name) of a whoami answer.
pub fn header_of<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// The agent binary as a child process with JSON logs on stderr.
pub struct Binary {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

/// The binary's arguments for a test of its own: ephemeral ports, no Docker.
pub(crate) const ALONE: &[&str] =
    &["--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--docker-mode", "off"];

impl Binary {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_env(args, &[])
    }

    /// The binary serving a routes file polled every `poll`, on ephemeral ports, without
    /// Docker.
    pub fn with_routes(routes: &std::path::Path, poll: &str) -> Self {
        Self::with_routes_and(routes, poll, &[])
    }

    /// [`Binary::with_routes`], with `more` flags.
    pub fn with_routes_and(routes: &std::path::Path, poll: &str, more: &[&str]) -> Self {
        Self::with_routes_env(routes, poll, more, &[])
    }

    /// [`Binary::with_routes_and`], with `env` variables set.
    pub fn with_routes_env(
        routes: &std::path::Path,
        poll: &str,
        more: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let routes = routes.to_str().unwrap();
        let mut args = vec!["--routes-file", routes, "--routes-poll-interval", poll];
        args.extend(ALONE);
        args.extend(more);
        Self::spawn_env(&args, env)
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        cmd.args(["--log-format", "json"]).args(args).envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Runs `cmd` (the binary, possibly behind a wrapper such as `ip netns exec`, already
    /// given `--log-format json`) and collects its log lines.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("meshgate binary runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, log: Vec::new() }
    }

    /// Waits for a log line containing `needle`; returns it parsed as JSON.
    pub fn wait_for_log(&mut self, needle: &str, deadline: Duration) -> serde_json::Value {
        let start = Instant::now();
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return serde_json::from_str(line).unwrap_or_default();
        }
        loop {
            let left = deadline.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!(
                    "no log line with {needle:?} within {deadline:?}; log so far:\n{}",
                    self.log.join("\n")
                )
            });
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return serde_json::from_str(&line).unwrap_or_default();
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?} within {deadline:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits until `needle` has appeared in `n` log lines.
    pub fn wait_for_count(&mut self, needle: &str, n: usize, deadline: Duration) {
        let start = Instant::now();
        while self.log.iter().filter(|l| l.contains(needle)).count() < n {
            let left = deadline
                .checked_sub(start.elapsed())
                .unwrap_or_else(|| panic!("{needle:?} not seen {n} times within {deadline:?}"));
            if let Ok(line) = self.lines.recv_timeout(left) {
                self.log.push(line);
            }
        }
    }

    /// The HTTP and admin addresses, from the "meshgate is serving" line.
    pub fn addresses(&mut self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for_log("meshgate is serving", Duration::from_secs(10));
        (line["http"].as_str().unwrap().parse().unwrap(), line["admin"].as_str().unwrap().parse().unwrap())
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY-free: `kill` via the command line keeps this crate free of unsafe code.
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (panics after `deadline`).
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.try_recv() {
                    self.log.push(line);
                }
                return status;
            }
            assert!(start.elapsed() < deadline, "meshgate did not exit within {deadline:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// CPU time the process used so far (user and system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<u64> = rest.split(' ').skip(11).take(2).map(|f| f.parse().unwrap()).collect();
        let ticks = 100; // USER_HZ on Linux
        Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks)
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's arguments that make it a task answering as `--whoami-listen` does on port 80
/// (its request line and headers), with nothing else reachable.
pub(crate) const WHOAMI: &[&str] = &[
    "--docker-mode",
    "off",
    "--whoami-listen",
    "0.0.0.0:80",
    "--http-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
    "--example",
];

/// Runs curl with `args`; returns (exit ok, stdout).
/// (Async: the agent under test runs on the same runtime.)
pub async fn curl(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl is installed (the README's test command installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A dnsmasq on the loopback's `port` answering what `records` say (dnsmasq options such as
/// `--address=/name/192.0.2.7`), nothing else; stopped on drop.
pub struct Dnsmasq {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl Dnsmasq {
    pub fn start(port: u16, records: &[String]) -> Self {
        let child = std::process::Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--conf-file=/dev/null", "--pid-file=", &format!("--port={port}")])
            .args(records)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq runs (the test command installs dnsmasq-base)");
        Self { child, addr: ([127, 0, 0, 1], port).into() }
    }

    /// dnsmasq on a free port. A port found free can be taken before dnsmasq binds it (by
    /// another test's connection): dnsmasq then exits at once, and another port is tried.
    pub fn start_anywhere(records: &[String]) -> Self {
        for _ in 0..5 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut dns = Self::start(port, records);
            let deadline = Instant::now() + Duration::from_secs(5);
            while dns.child.try_wait().ok().flatten().is_none() {
                if std::net::TcpStream::connect(dns.addr).is_ok() || Instant::now() > deadline {
                    return dns;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("dnsmasq did not start on any of five free ports");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real WebSocket server (tungstenite) as a task: it echoes every text and binary message.
/// A request that is no WebSocket handshake is closed unanswered (the proxy says 502).
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt as _, StreamExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Agents sharing one HTTP port (`--reuse-port`, as two agents of a node during an update),
/// routing `web.test` to one backend: start as many as a test needs with [`SharedPort::spawn`].
pub struct SharedPort {
    _dir: tempfile::TempDir,
    pub listen: String,
    args: Vec<String>,
}

impl SharedPort {
    pub fn new(web: &Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.toml");
        std::fs::write(&routes, service("web", &["web.test"], "/", &[web])).unwrap();
        let listen = format!("127.0.0.1:{}", crate::acme::free_port());
        let args = [
            "--routes-file",
            routes.to_str().unwrap(),
            "--http-listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--docker-mode",
            "off",
            "--reuse-port",
            "true",
        ]
        .map(str::to_owned)
        .into();
        Self { _dir: dir, listen, args }
    }

    /// Another agent on the port; returns once it serves.
    pub fn spawn(&self) -> Binary {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut agent = Binary::spawn(&args);
        agent.addresses();
        agent
    }
}

/// meshgate's rustls provider, aws-lc-rs (ring is compiled in too, through the Docker
/// client, so rustls has no default of its own).
pub fn tls_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls server config builder on [`tls_provider`].
pub fn tls_server_builder() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    rustls::ServerConfig::builder_with_provider(tls_provider()).with_safe_default_protocol_versions().unwrap()
}

/// A rustls client config builder on [`tls_provider`].
pub fn tls_client_builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(tls_provider()).with_safe_default_protocol_versions().unwrap()
}
