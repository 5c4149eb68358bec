//! Several agents as the nodes of one cluster, each in its own network namespace on one
//! bridge (the "LAN"), the test in the root namespace on the bridge too: a leader and a
//! manager that both see the cluster (here through the same routes file, as two Swarm
//! managers see the same Swarm) and a worker that sees nothing by itself and follows the
//! feed. ACME against a real pebble, validating through the worker (HTTP-01, TLS-ALPN-01, and
//! DNS-01 through the worker's mesh-dns).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use crate::acme::{Pebble, PebbleSetup};
use crate::harness::{curl, eventually};
use crate::mesh::{run, Agent, Namespaces};

const WAIT: Duration = Duration::from_secs(30);

/// A switch (a bridge in a namespace of its own, away from the host's firewall), the root
/// namespace on it with `.254`, and one namespace per node with `.1`, `.2`… on `eth0`, all
/// in `10.98.<subnet>.0/24`.
struct Lan {
    nets: Namespaces,
    switch: String,
    uplink: String,
    subnet: u8,
    nodes: Vec<String>,
}

impl Lan {
    fn new(subnet: u8, nodes: usize) -> Self {
        let mut nets = Namespaces::new();
        let switch = nets.add("mgsw");
        run(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
        let uplink = format!("cb{}{subnet}", std::process::id() % 100_000);
        let _ = std::process::Command::new("ip").args(["link", "del", &uplink]).output();
        run(&["ip", "link", "add", &uplink, "type", "veth", "peer", "name", "trunk", "netns", &switch]);
        run(&["ip", "-n", &switch, "link", "set", "trunk", "master", "br0", "up"]);
        run(&["ip", "addr", "add", &format!("10.98.{subnet}.254/24"), "dev", &uplink]);
        run(&["ip", "link", "set", &uplink, "up"]);
        let mut lan = Self { nets, switch, uplink, subnet, nodes: Vec::new() };
        for i in 1..=nodes {
            let ns = lan.nets.add("mgcl");
            let port = format!("p{i}");
            run(&[
                "ip",
                "-n",
                &lan.switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ]);
            run(&["ip", "-n", &lan.switch, "link", "set", &port, "master", "br0", "up"]);
            run(&["ip", "-n", &ns, "addr", "add", &format!("10.98.{subnet}.{i}/24"), "dev", "eth0"]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            lan.nodes.push(ns);
        }
        lan
    }

    fn ip(&self, node: usize) -> String {
        format!("10.98.{}.{}", self.subnet, node + 1)
    }

    fn ns(&self, node: usize) -> &str {
        &self.nodes[node]
    }

    /// pebble on the test's address on the LAN, resolving every name through mesh-dns on
    /// `node`, which answers with that node's address: each validation reaches it, never the
    /// agent that ordered.
    async fn pebble_through(&self, node: usize) -> Pebble {
        let setup = PebbleSetup {
            http_port: 80,
            tls_port: 443,
            dns: format!("{}:53", self.ip(node)).parse().unwrap(),
            validity_secs: 3600,
            eab: None,
            blocklist: vec![],
        };
        Pebble::start_on(setup, [10, 98, self.subnet, 254].into()).await
    }

    /// The arguments of a worker on `node` that follows `manager`, with a whoami task on
    /// port 8001 and mesh-dns answering routed hosts with its own address.
    fn worker_args(&self, node: usize, manager: usize) -> Vec<String> {
        let ip = self.ip(node);
        [
            "--cluster-role",
            "worker",
            "--cluster-peers",
            &format!("{}:7380", self.ip(manager)),
            "--whoami-listen",
            &format!("{ip}:8001"),
            "--dns-listen",
            &format!("{ip}:53"),
            "--dns-answer-routed-hosts",
            "true",
            "--dns-node-addresses",
            &ip,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Cuts (or restores) a node's cable: its feed goes silent without closing.
    fn cable(&self, node: usize, up: bool) {
        run(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("p{}", node + 1),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.uplink]).output();
    }
}

fn new_secret(dir: &Path, name: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--new-cluster-secret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = dir.join(name);
    std::fs::write(&path, &out.stdout).unwrap();
    path.to_str().unwrap().to_owned()
}

fn route(host: &str, task: &str, acme: bool) -> String {
    format!("[[services]]\nname = \"{host}\"\ntasks = [{{ address = \"{task}\" }}]\n[[services.http]]\nhosts = [\"{host}\"]\nport = 8001\n{}", if acme { "tls = { acme = true }\n" } else { "" })
}

/// An agent's arguments for HTTP on 80, HTTPS on 443, the cluster `secret`, and ACME from
/// `pebble` with `challenge` only, stored in `storage`.
fn acme_args(secret: &str, pebble: &Pebble, storage: &str, challenge: &str) -> Vec<String> {
    [
        "--http-listen",
        "0.0.0.0:80",
        "--tls-https-listen",
        "0.0.0.0:443",
        "--cluster-secret-file",
        secret,
        "--tls-poll-interval",
        "100ms",
        "--acme-directory",
        &pebble.directory(),
        "--acme-trust-roots",
        pebble.trust.to_str().unwrap(),
        "--acme-storage-dir",
        storage,
        "--acme-challenge",
        challenge,
        "--acme-fallback",
        "false",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// GET through the proxy of the node at `ip` with a Host header, from the root namespace.
async fn get(ip: &str, host: &str) -> (bool, String) {
    curl(&["-fsS", "-m", "3", "-H", &format!("Host: {host}"), &format!("http://{ip}/")]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_the_managers_fails_over_and_keeps_its_last_state_when_none_answers() {
    let lan = Lan::new(1, 3);
    let (leader_ip, manager_ip, worker_ip) = (lan.ip(0), lan.ip(1), lan.ip(2));
    let dir = tempfile::tempdir().unwrap();
    let secret = new_secret(dir.path(), "cluster.pem");
    // The task runs on the worker's node (its whoami), so it outlives both managers.
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, route("app.cluster.test", &worker_ip, false)).unwrap();
    let routes = routes.to_str().unwrap();
    let common = ["--http-listen", "0.0.0.0:80", "--cluster-secret-file", &secret, "--cluster-timeout", "3s"];
    let with =
        |extra: &[&str]| -> Vec<String> { common.iter().chain(extra).map(ToString::to_string).collect() };
    let leader =
        Agent::start(lan.ns(0), &refs(&with(&["--routes-file", routes, "--cluster-role", "leader"])));
    let manager = Agent::start(
        lan.ns(1),
        &refs(&with(&[
            "--routes-file",
            routes,
            "--cluster-role",
            "manager",
            "--cluster-peers",
            &format!("{leader_ip}:7380"),
        ])),
    );
    // Both feeds listen before the worker starts, so it takes its first peer.
    for (agent, ns) in [(&leader, lan.ns(0)), (&manager, lan.ns(1))] {
        eventually("the feed is served", WAIT, async || {
            agent.admin(ns, "/readyz").contains("serving the feed")
        })
        .await;
    }
    let state_file = dir.path().join("worker-state.json");
    let peers = format!("{manager_ip}:7380,{leader_ip}:7380");
    let worker_args = with(&[
        "--cluster-role",
        "worker",
        "--cluster-peers",
        &peers,
        "--whoami-listen",
        &format!("{worker_ip}:8001"),
        "--whoami-name",
        "task-on-worker",
        "--cluster-state-file",
        state_file.to_str().unwrap(),
    ]);
    let worker = Agent::start(lan.ns(2), &refs(&worker_args));

    // The worker has no routes of its own; it serves the cluster's.
    eventually("the worker routes the cluster's service", WAIT, async || {
        get(&worker_ip, "app.cluster.test").await.1.contains("task-on-worker")
    })
    .await;
    assert!(
        worker.admin(lan.ns(2), "/readyz").contains(&format!("following {manager_ip}:7380")),
        "it follows the first peer"
    );
    assert_eq!(manager.metric(lan.ns(1), "meshgate_cluster_followers"), 1);
    assert_eq!(leader.metric(lan.ns(0), "meshgate_cluster_issuer"), 1);
    assert_eq!(worker.metric(lan.ns(2), "meshgate_cluster_issuer"), 0);

    // A change on the managers reaches the worker.
    std::fs::write(
        routes,
        format!(
            "{}{}",
            route("app.cluster.test", &worker_ip, false),
            route("new.cluster.test", &worker_ip, false)
        ),
    )
    .unwrap();
    eventually("a new route reaches the worker", WAIT, async || get(&worker_ip, "new.cluster.test").await.0)
        .await;

    // The manager's cable is cut: its feed goes silent, the worker moves to the leader.
    lan.cable(1, false);
    eventually("the worker fails over to the leader", WAIT, async || {
        worker.admin(lan.ns(2), "/readyz").contains(&format!("following {leader_ip}:7380"))
    })
    .await;
    assert!(worker.metric(lan.ns(2), "meshgate_cluster_reconnects_total") >= 1);
    assert!(get(&worker_ip, "new.cluster.test").await.0, "routes stay in force during the failover");

    // No manager left: the last state stays, and the worker says so.
    leader.stop();
    eventually("the worker says its state is stale", WAIT, async || {
        worker.metric(lan.ns(2), "meshgate_cluster_state_stale") == 1
    })
    .await;
    let readyz = worker.admin(lan.ns(2), "/readyz");
    assert!(readyz.contains("stale: no manager reachable") && readyz.contains("\"ready\": true"), "{readyz}");
    assert_eq!(worker.metric(lan.ns(2), "meshgate_cluster_feed_connected"), 0);
    let (ok, body) = get(&worker_ip, "app.cluster.test").await;
    assert!(ok && body.contains("task-on-worker"), "the last known routes are still served: {body}");

    // A worker restarted while no manager answers serves the saved state.
    worker.stop();
    let worker = Agent::start(lan.ns(2), &refs(&worker_args));
    worker.wait_for("serving the state saved before the restart");
    eventually("the restarted worker serves the saved routes", WAIT, async || {
        get(&worker_ip, "new.cluster.test").await.0
    })
    .await;

    // The manager comes back: the worker follows it again, the state is confirmed.
    lan.cable(1, true);
    eventually("the worker follows the manager again", WAIT, async || {
        worker.metric(lan.ns(2), "meshgate_cluster_feed_connected") == 1
    })
    .await;
    assert_eq!(worker.metric(lan.ns(2), "meshgate_cluster_state_stale"), 0);

    // An agent with another secret gets nothing.
    let other = new_secret(dir.path(), "other.pem");
    let intruder = Agent::start(
        lan.ns(0),
        &[
            "--http-listen",
            "0.0.0.0:80",
            "--cluster-secret-file",
            &other,
            "--cluster-role",
            "worker",
            "--cluster-peers",
            &format!("{manager_ip}:7380"),
        ],
    );
    eventually("the intruder is refused", WAIT, async || {
        intruder.admin(lan.ns(0), "/readyz").contains("TLS refused")
    })
    .await;
    assert!(!get(&leader_ip, "app.cluster.test").await.0, "nothing of the cluster reaches it");
    drop(manager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_orders_every_node_serves_the_certificate_and_challenges_are_answered_on_a_worker() {
    let lan = Lan::new(2, 3);
    let (leader_ip, manager_ip, worker_ip) = (lan.ip(0), lan.ip(1), lan.ip(2));
    let dir = tempfile::tempdir().unwrap();
    let secret = new_secret(dir.path(), "cluster.pem");
    let pebble = lan.pebble_through(2).await;
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, route("http.cluster.test", &worker_ip, true)).unwrap();
    let routes = routes.to_str().unwrap();
    let store = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (leader_store, manager_store, worker_store) = (store("leader"), store("manager"), store("worker"));
    let acme = |storage: &str, challenge: &str| acme_args(&secret, &pebble, storage, challenge);
    let args = |mut base: Vec<String>, extra: &[&str]| {
        base.extend(extra.iter().map(ToString::to_string));
        base
    };
    let leader_args =
        args(acme(&leader_store, "http-01"), &["--routes-file", routes, "--cluster-role", "leader"]);
    let leader = Agent::start(lan.ns(0), &refs(&leader_args));
    let manager_args = args(
        acme(&manager_store, "http-01"),
        &[
            "--routes-file",
            routes,
            "--cluster-role",
            "manager",
            "--cluster-peers",
            &format!("{leader_ip}:7380"),
        ],
    );
    let manager = Agent::start(lan.ns(1), &refs(&manager_args));
    let worker_args = args(acme(&worker_store, "http-01"), &refs(&lan.worker_args(2, 1)));
    let worker = Agent::start(lan.ns(2), &refs(&worker_args));

    // HTTP-01 through the worker, which relays the answers the leader published via the
    // manager; then every node serves the certificate.
    let verified = async |ip: &str, host: &str| {
        let root = pebble.root().await;
        curl(&[
            "-fsS",
            "-m",
            "3",
            "--resolve",
            &format!("{host}:443:{ip}"),
            "--cacert",
            root.to_str().unwrap(),
            &format!("https://{host}/"),
        ])
        .await
    };
    for ip in [&worker_ip, &manager_ip, &leader_ip] {
        eventually(
            &format!("{ip} serves http.cluster.test with pebble's certificate"),
            Duration::from_secs(60),
            async || verified(ip, "http.cluster.test").await.0,
        )
        .await;
    }
    assert_eq!(
        leader
            .metric(lan.ns(0), "meshgate_acme_certificates_issued_total{certificate=\"http.cluster.test\"}"),
        1,
        "the leader ordered once"
    );
    for (agent, ns) in [(&manager, lan.ns(1)), (&worker, lan.ns(2))] {
        assert_eq!(
            agent.metric(ns, "meshgate_acme_certificates_issued_total{certificate=\"http.cluster.test\"}"),
            0,
            "followers order nothing"
        );
        let metrics = agent.admin(ns, "/metrics");
        assert!(
            !metrics.contains("meshgate_acme_failures_total{certificate=\"http.cluster.test\""),
            "{metrics}"
        );
    }
    // Received keys are stored as the issuer stores them: owner-only.
    for store in [&manager_store, &worker_store] {
        let mode =
            std::fs::metadata(format!("{store}/certs/http.cluster.test.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{store}");
    }

    // TLS-ALPN-01 through the worker: it answers with a validation certificate it makes
    // itself from the digest the leader published.
    leader.stop();
    let leader = Agent::start(
        lan.ns(0),
        &refs(&args(
            acme(&leader_store, "tls-alpn-01"),
            &["--routes-file", routes, "--cluster-role", "leader"],
        )),
    );
    std::fs::write(
        routes,
        format!(
            "{}{}",
            route("http.cluster.test", &worker_ip, true),
            route("alpn.cluster.test", &worker_ip, true)
        ),
    )
    .unwrap();
    eventually(
        "the worker serves alpn.cluster.test with pebble's certificate",
        Duration::from_secs(60),
        async || verified(&worker_ip, "alpn.cluster.test").await.0,
    )
    .await;
    let (ok, body) = verified(&worker_ip, "alpn.cluster.test").await;
    assert!(ok && body.contains("Name: whoami"), "{body}");
    assert_eq!(
        leader
            .metric(lan.ns(0), "meshgate_acme_certificates_issued_total{certificate=\"alpn.cluster.test\"}"),
        1
    );
    assert_eq!(
        leader
            .metric(lan.ns(0), "meshgate_acme_certificates_issued_total{certificate=\"http.cluster.test\"}"),
        0,
        "the stored certificate was not ordered again"
    );
    assert_eq!(
        worker
            .metric(lan.ns(2), "meshgate_acme_certificates_issued_total{certificate=\"alpn.cluster.test\"}"),
        0
    );

    // DNS-01 for a wildcard (certificates issue, item 1): pebble asks the worker's mesh-dns,
    // which answers the TXT values the leader published, relayed by the manager.
    leader.stop();
    let leader_dns = format!("{leader_ip}:53");
    let leader = Agent::start(
        lan.ns(0),
        &refs(&args(
            acme(&leader_store, "dns-01"),
            &["--routes-file", routes, "--cluster-role", "leader", "--dns-listen", &leader_dns],
        )),
    );
    std::fs::write(
        routes,
        format!(
            "{}{}[[services]]\nname = \"wild\"\ntasks = [{{ address = \"{worker_ip}\" }}]\n[[services.http]]\nhosts = [\"*.wild.cluster.test\"]\nport = 8001\ntls = {{ acme = true }}\n",
            route("http.cluster.test", &worker_ip, true),
            route("alpn.cluster.test", &worker_ip, true)
        ),
    )
    .unwrap();
    eventually(
        "the worker serves x.wild.cluster.test with pebble's wildcard certificate",
        Duration::from_secs(60),
        async || verified(&worker_ip, "x.wild.cluster.test").await.0,
    )
    .await;
    assert_eq!(
        leader.metric(
            lan.ns(0),
            "meshgate_acme_certificates_issued_total{certificate=\"_wildcard.wild.cluster.test\"}"
        ),
        1
    );
    drop(manager);
}

/// Certificates issue, item 3, in a cluster: a handshake on a worker for a name nobody
/// configured a certificate for gets one from the leader (the only agent that orders),
/// asked for over the feed through the manager the worker follows; the leader asks the
/// operator's endpoint once, orders once, and the certificate comes back through the feed
/// while the worker's handshake waits. A refused name fails the worker's handshake when the
/// refusal comes back (not at the end of the order wait), and is not asked about again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_handshake_gets_an_on_demand_certificate_that_the_leader_orders() {
    let lan = Lan::new(3, 3);
    let (leader_ip, manager_ip, worker_ip) = (lan.ip(0), lan.ip(1), lan.ip(2));
    let dir = tempfile::tempdir().unwrap();
    let secret = new_secret(dir.path(), "cluster.pem");
    let pebble = lan.pebble_through(2).await;
    let ask = crate::on_demand::Ask::start_on([10, 98, 3, 254].into(), &["shop.ondemand.test"]).await;
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[services]]\nname = \"shop\"\ntasks = [{{ address = \"{worker_ip}\" }}]\n[[services.http]]\nhosts = [\"shop.ondemand.test\", \"refused.ondemand.test\"]\nport = 8001\n"),
    )
    .unwrap();
    let routes = routes.to_str().unwrap();
    let store = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let args = |storage: &str, extra: &[&str]| {
        let mut all = acme_args(&secret, &pebble, &store(storage), "http-01");
        all.extend(["--acme-on-demand-ask", &ask.url, "--tls-unknown-names", "reject"].map(String::from));
        all.extend(extra.iter().map(ToString::to_string));
        all
    };
    let leader = Agent::start(
        lan.ns(0),
        &refs(&args("leader", &["--routes-file", routes, "--cluster-role", "leader"])),
    );
    let to_leader = format!("{leader_ip}:7380");
    let manager_args = args(
        "manager",
        &["--routes-file", routes, "--cluster-role", "manager", "--cluster-peers", &to_leader],
    );
    let manager = Agent::start(lan.ns(1), &refs(&manager_args));
    let worker_args = args("worker", &refs(&lan.worker_args(2, 1)));
    let worker = Agent::start(lan.ns(2), &refs(&worker_args));
    eventually("the worker serves the routes", WAIT, async || get(&worker_ip, "shop.ondemand.test").await.0)
        .await;
    let root = pebble.root().await;
    let on_worker: std::net::SocketAddr = format!("{worker_ip}:443").parse().unwrap();

    let first = crate::acme::handshake(on_worker, "shop.ondemand.test", &root)
        .await
        .expect("the worker's first handshake waits for the leader's order");
    let (ok, body) = curl(&[
        "-fsS",
        "--resolve",
        &format!("shop.ondemand.test:443:{worker_ip}"),
        "--cacert",
        root.to_str().unwrap(),
        "https://shop.ondemand.test/",
    ])
    .await;
    assert!(ok && body.contains("Name: whoami"), "{body}");
    assert_eq!(ask.asked("shop.ondemand.test"), 1, "asked once, by the leader");
    let issued = "meshgate_acme_certificates_issued_total{certificate=\"shop.ondemand.test\"}";
    assert_eq!(leader.metric(lan.ns(0), issued), 1, "the leader ordered it");
    for (agent, ns) in [(&manager, lan.ns(1)), (&worker, lan.ns(2))] {
        assert_eq!(agent.metric(ns, issued), 0, "followers order nothing");
    }
    let on_manager: std::net::SocketAddr = format!("{manager_ip}:443").parse().unwrap();
    assert_eq!(
        crate::acme::handshake(on_manager, "shop.ondemand.test", &root).await.unwrap(),
        first,
        "the manager has the same certificate, with no wait"
    );

    // Refused by the ask endpoint: the refusal travels back and fails the handshake well
    // before the 60 s a handshake waits for an order (a lost refusal would wait all of it).
    let started = std::time::Instant::now();
    assert!(crate::acme::handshake(on_worker, "refused.ondemand.test", &root).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(30), "refused after {:?}", started.elapsed());
    assert!(crate::acme::handshake(on_worker, "refused.ondemand.test", &root).await.is_err());
    assert_eq!(ask.asked("refused.ondemand.test"), 1, "remembered as refused along the way");
}
