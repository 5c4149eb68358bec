//! The three-engine lab (`tests/lab/swarm-lab.sh`): real, separate Docker engines in network
//! namespaces forming a real Swarm. One lab at a time; it is torn down (by PID, the machine's
//! own engine untouched) when the guard is dropped.

use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/lab/swarm-lab.sh");

/// One lab at a time: the underlay's addresses are fixed.
static ONE_LAB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which Swarm the lab forms.
#[derive(Clone, Copy)]
pub enum Shape {
    /// Node 1 manages, nodes 2 and 3 work.
    OneManager,
    /// All three manage.
    ThreeManagers,
}

pub struct Lab {
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Lab {
    /// The machine's own address on the underlay (where a test's CA can listen).
    pub const MACHINE: &str = "198.18.50.1";

    pub async fn up(shape: Shape) -> Self {
        let one = ONE_LAB.lock().await;
        let arg = match shape {
            Shape::OneManager => "one",
            Shape::ThreeManagers => "managers",
        };
        let out = script(&["up", arg]).await;
        assert!(out.status.success(), "the lab did not come up: {}", String::from_utf8_lossy(&out.stderr));
        Self { _one: one }
    }

    /// Node `i`'s (1-based) address on the underlay, which the machine reaches.
    pub fn addr(i: usize) -> String {
        format!("198.18.50.1{i}")
    }

    /// Node `i`'s engine, for `docker -H`.
    pub fn docker_host(i: usize) -> String {
        format!("unix:///var/lib/mglab/n{i}/docker.sock")
    }

    /// Runs the docker CLI against node `i`; panics with its stderr if it fails.
    pub async fn docker(i: usize, args: &[&str]) -> String {
        let out = Self::docker_output(i, args).await;
        assert!(
            out.status.success(),
            "docker (node {i}) {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub async fn docker_output(i: usize, args: &[&str]) -> Output {
        Command::new("docker").arg("-H").arg(Self::docker_host(i)).args(args).output().await.unwrap()
    }

    /// Stops node `i`'s engine by its PID (its containers, the agent among them, stop too).
    pub async fn stop_engine(i: usize) {
        let out = script(&["stop", &i.to_string()]).await;
        assert!(out.status.success(), "stopping node {i}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts node `i`'s engine again; returns once it answers.
    pub async fn start_engine(i: usize) {
        let out = script(&["start", &i.to_string()]).await;
        assert!(out.status.success(), "starting node {i}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Pulls node `i`'s cable (its port on the underlay's bridge goes down: nothing reaches
    /// it or leaves it), or plugs it back.
    pub async fn cable(i: usize, plugged: bool) {
        let state = if plugged { "up" } else { "down" };
        let out = Command::new("ip")
            .args(["-n", "mglab-br", "link", "set", &format!("v{i}"), state])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "ip link set v{i} {state}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Node `i`'s state as the manager (node 1) sees it: `ready`, `down`, ...
    pub async fn node_state(i: usize) -> String {
        let out =
            Self::docker_output(1, &["node", "inspect", "-f", "{{.Status.State}}", &format!("mglab-n{i}")])
                .await;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Node `i`'s agent's metric lines starting with `prefix`, their values summed.
    pub async fn metric(i: usize, prefix: &str) -> u64 {
        Self::admin(i, "/metrics")
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// TCP and UDP packets that reached the sink (every node's default route) for task or
    /// overlay addresses or the lab's routed and published ports.
    pub async fn sink_count() -> u64 {
        let out = script(&["sink-count"]).await;
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a packet count")
    }

    /// GET `path` of node `i`'s admin endpoints (on the node's loopback).
    pub async fn admin(i: usize, path: &str) -> String {
        let ns = format!("mglab-n{i}");
        let url = format!("http://127.0.0.1:9090{path}");
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-s", "--max-time", "3", &url])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Node `i`'s agent's `/readyz`.
    pub async fn readyz(i: usize) -> String {
        Self::admin(i, "/readyz").await
    }

    /// Node `i`'s agent's `/api/state`.
    pub async fn api_state(i: usize) -> serde_json::Value {
        serde_json::from_str(&Self::admin(i, "/api/state").await).unwrap_or_default()
    }

    /// curl from the machine to `url` with `Host: host`; (exit ok, body).
    pub async fn curl(host: &str, url: &str) -> (bool, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-H", &format!("Host: {host}"), url])
            .output()
            .await
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = std::process::Command::new("bash").args([SCRIPT, "down"]).output();
        if let Some(out) = out.ok().filter(|o| !o.status.success()) {
            eprintln!("lab teardown: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

async fn script(args: &[&str]) -> Output {
    let run = Command::new("bash").arg(SCRIPT).args(args).output();
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("the lab script finishes").unwrap()
}

/// Steady load from the machine: one loop of new connections per URL (curl, as a user
/// would), each answer's HTTP code and curl's exit code on a line of its own file.
pub struct Load {
    children: Vec<(String, std::process::Child)>,
    dir: tempfile::TempDir,
}

impl Load {
    /// `targets`: (Host header, URL).
    pub fn start(targets: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stop = dir.path().join("stop");
        let children = targets
            .iter()
            .enumerate()
            .map(|(i, (host, url))| {
                let codes = dir.path().join(format!("codes-{i}"));
                let script = format!(
                    "while [ ! -e {stop} ]; do curl -s -o /dev/null --max-time 5 -H 'Host: {host}' -w '%{{http_code}} %{{exitcode}} connect=%{{time_connect}} total=%{{time_total}} port=%{{local_port}} at='\"$(date +%T.%N)\"'\\n' {url} >> {codes}; done",
                    stop = stop.display(),
                    codes = codes.display()
                );
                let child = std::process::Command::new("sh").args(["-c", &script]).spawn().unwrap();
                (format!("{host} {url}"), child)
            })
            .collect();
        Self { children, dir }
    }

    /// Answers seen so far, all targets together.
    pub fn answers(&self) -> usize {
        (0..self.children.len())
            .map(|i| {
                let codes =
                    std::fs::read_to_string(self.dir.path().join(format!("codes-{i}"))).unwrap_or_default();
                codes.lines().count()
            })
            .sum()
    }

    /// Stops the loops; per target: (its name, answered with 200, the other lines).
    pub async fn finish(mut self) -> Vec<(String, usize, Vec<String>)> {
        std::fs::write(self.dir.path().join("stop"), "").unwrap();
        let mut out = Vec::new();
        for (i, (name, child)) in self.children.iter_mut().enumerate() {
            crate::harness::eventually("the load stops", Duration::from_secs(10), async || {
                child.try_wait().unwrap().is_some()
            })
            .await;
            let codes =
                std::fs::read_to_string(self.dir.path().join(format!("codes-{i}"))).unwrap_or_default();
            let failed: Vec<String> =
                codes.lines().filter(|l| !l.starts_with("200 0 ")).map(str::to_owned).collect();
            out.push((name.clone(), codes.lines().count() - failed.len(), failed));
        }
        out
    }
}
