//! The L4 mesh in real network namespaces: the agent binary attaches XDP to a node's uplink,
//! a client namespace reaches published ports on the node's address, tasks in their own
//! namespaces behind the node's task bridge answer, over real TCP and UDP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::Binary;

/// Runs a command, panicking with its output if it fails.
pub(crate) fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces (and the processes in them) that disappear with the value.
pub(crate) struct Namespaces {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Namespaces {
    pub(crate) fn new() -> Self {
        Self { names: Vec::new(), children: Vec::new() }
    }

    /// A new namespace `<prefix>-<pid>-<n>` with loopback up; returns its name.
    pub(crate) fn add(&mut self, prefix: &str) -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.names.push(name.clone());
        name
    }

    pub(crate) fn exec(ns: &str, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts `args` inside `ns`, killed when this value drops.
    pub(crate) fn spawn(&mut self, ns: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.last_mut().unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A UDP echo server that prefixes answers with its name (python3: part of every machine
/// of this kind).
const UDP_ECHO: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',53))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(sys.argv[1].encode()+b' '+d+b' from '+a[0].encode(),a)\n";

/// One HTTP request from a fixed local port (reused at once, unlike curl's): prints the answer.
const GET_FROM: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(5)
s.bind(("", int(sys.argv[3])))
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"#;

const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\ns.sendto(b'ping',(sys.argv[1],int(sys.argv[2])))\nprint(s.recvfrom(2048)[0].decode())\n";

/// The agent binary inside a namespace (a [`Binary`] behind `ip netns exec`).
pub(crate) struct Agent(std::cell::RefCell<Binary>);

const WAIT: Duration = Duration::from_secs(20);

impl Agent {
    pub(crate) fn start(ns: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_meshgate"),
            "--log-format",
            "json",
            "--docker-mode",
            "off",
        ])
        .args(args);
        Self(std::cell::RefCell::new(Binary::spawn_command(cmd)))
    }

    /// The first log line containing `needle` (waiting for it), as text.
    pub(crate) fn wait_for(&self, needle: &str) -> String {
        self.0.borrow_mut().wait_for_log(needle, WAIT).to_string()
    }

    fn wait_for_count(&self, needle: &str, n: usize) {
        self.0.borrow_mut().wait_for_count(needle, n, WAIT);
    }

    fn pid(&self) -> String {
        self.0.borrow().child.id().to_string()
    }

    /// GET `path` from the agent's admin endpoint (inside `ns`).
    pub(crate) fn admin(&self, ns: &str, path: &str) -> String {
        let admin = self.0.borrow_mut().addresses().1;
        Namespaces::exec(ns, &["curl", "-s", &format!("http://{admin}{path}")])
    }

    /// A metric's value from the agent's admin endpoint (inside `ns`).
    pub(crate) fn metric(&self, ns: &str, series: &str) -> u64 {
        self.admin(ns, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until a metric (refreshed from the BPF maps every second, flows every 5 s)
    /// reaches `at_least`.
    fn wait_for_metric(&self, ns: &str, series: &str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metric(ns, series) < at_least {
            assert!(Instant::now() < deadline, "{series} stayed below {at_least}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn stop(self) {
        let mut bin = self.0.into_inner();
        bin.signal(15);
        bin.wait_exit(WAIT);
    }
}

/// A one-node underlay: namespaces `<prefix>c` (the client, 192.0.2.1 on `c0`) and
/// `<prefix>n` (the node, 192.0.2.10 on its uplink `u0`), cabled. Returns (client, node).
pub(crate) fn underlay(nets: &mut Namespaces, prefix: &str) -> (String, String) {
    let client = nets.add(&format!("{prefix}c"));
    let node = nets.add(&format!("{prefix}n"));
    run(&["ip", "link", "add", "c0", "netns", &client, "type", "veth", "peer", "name", "u0", "netns", &node]);
    run(&["ip", "-n", &client, "addr", "add", "192.0.2.1/24", "dev", "c0"]);
    run(&["ip", "-n", &client, "link", "set", "c0", "up"]);
    run(&["ip", "-n", &node, "addr", "add", "192.0.2.10/24", "dev", "u0"]);
    run(&["ip", "-n", &node, "link", "set", "u0", "up"]);
    (client, node)
}

/// The agent's flags for the L4 mesh on the node of [`underlay`].
pub(crate) const NODE_MESH: [&str; 6] =
    ["--mesh-uplink", "u0", "--mesh-node-address", "192.0.2.10", "--mesh-node-name", "n1"];

/// The [`underlay`] with the node's task bridge `br0` (10.0.9.1/24) and forwarding on; the
/// client sends full checksums (a local sender's are partial on a veth; XDP rewrites full
/// ones, as from a NIC). Returns (client, node).
fn node_with_task_bridge(nets: &mut Namespaces, prefix: &str) -> (String, String) {
    let (client, node) = underlay(nets, prefix);
    Namespaces::exec(&client, &["ethtool", "-K", "c0", "tx", "off"]);
    Namespaces::exec(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &node, "addr", "add", "10.0.9.1/24", "dev", "br0"]);
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    (client, node)
}

/// Task `i`'s namespace on the node's task bridge: 10.0.9.(i+1), its host side `t<i>`, its
/// default route the bridge (no way out of the machine: the node has none).
fn task_on_bridge(nets: &mut Namespaces, node: &str, i: usize) -> String {
    let task = nets.add(&format!("mgt{i}"));
    let host_side = format!("t{i}");
    run(&[
        "ip", "link", "add", "e0", "netns", &task, "type", "veth", "peer", "name", &host_side, "netns", node,
    ]);
    run(&["ip", "-n", node, "link", "set", &host_side, "master", "br0", "up"]);
    run(&["ip", "-n", &task, "addr", "add", &format!("10.0.9.{}/24", i + 1), "dev", "e0"]);
    run(&["ip", "-n", &task, "link", "set", "e0", "up"]);
    run(&["ip", "-n", &task, "route", "add", "default", "via", "10.0.9.1"]);
    task
}

/// The agent's arguments for the L4 mesh on the node of [`underlay`], its routes file (the
/// text `routes`) written into `dir`, its own listeners on the node's loopback.
fn mesh_agent_args(dir: &tempfile::TempDir, routes: &str) -> Vec<String> {
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, routes).unwrap();
    let own = [
        "--routes-file",
        file.to_str().unwrap(),
        "--http-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    own.iter().chain(NODE_MESH.iter()).map(|a| (*a).to_owned()).collect()
}

/// Docker's firewall on the node of [`underlay`]: nothing forwarded but what it published
/// itself (port 8082 to the task 10.0.9.2:80, as `docker run -p 8082:80` does), and the task
/// subnet masqueraded on its way out. The mesh must get through it without opening it.
fn docker_firewall(node: &str) {
    let ipt = |args: &[&str]| run(&[&["ip", "netns", "exec", node, "iptables"], args].concat());
    ipt(&["-P", "FORWARD", "DROP"]);
    ipt(&["-t", "nat", "-A", "POSTROUTING", "-s", "10.0.9.0/24", "!", "-o", "br0", "-j", "MASQUERADE"]);
    let dnat = "-t nat -A PREROUTING -p tcp --dport 8082 -j DNAT --to-destination 10.0.9.2:80";
    ipt(&dnat.split(' ').collect::<Vec<_>>());
    ipt(&["-A", "FORWARD", "-d", "10.0.9.2", "-p", "tcp", "--dport", "80", "-j", "ACCEPT"]);
    ipt(&["-A", "FORWARD", "-i", "br0", "-j", "ACCEPT"]);
}

/// What the uplink has attached: XDP and tc programs, as `bpftool net` lists them.
fn attached(ns: &str, dev: &str) -> String {
    Namespaces::exec(ns, &["bpftool", "net", "show", "dev", dev])
}

#[test]
fn published_ports_reach_local_tasks_with_the_client_address_kept_and_leave_nothing_behind() {
    let mut nets = Namespaces::new();
    let (client, node) = node_with_task_bridge(&mut nets, "mg");
    // Two tasks on the node's task bridge.
    let mut tasks = Vec::new();
    for i in 1..=2 {
        let task = task_on_bridge(&mut nets, &node, i);
        let name = format!("task{i}");
        nets.spawn(
            &task,
            &[
                env!("CARGO_BIN_EXE_meshgate"),
                "--docker-mode",
                "off",
                "--whoami-listen",
                "0.0.0.0:80",
                "--whoami-name",
                &name,
                "--http-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--example",
            ],
        );
        nets.spawn(&task, &["python3", "-c", UDP_ECHO, &name]);
        tasks.push(task);
    }
    // Docker's firewall: nothing forwarded but what it published itself (here port 8082 to
    // task 1, as `docker run -p` does), and the task subnet masqueraded on its way out. The
    // mesh must get through it without opening it.
    docker_firewall(&node);
    let before = attached(&node, "u0");

    let dir = tempfile::tempdir().unwrap();
    let mesh_args = mesh_agent_args(
        &dir,
        "[[services]]\nname = \"web\"\ntasks = [{ address = \"10.0.9.2\", node = \"n1\" }, { address = \"10.0.9.3\", node = \"n1\" }]\n\
         [[services.l4]]\nprotocol = \"tcp\"\npublished = 8080\ntarget = 80\n\
         [[services.l4]]\nprotocol = \"udp\"\npublished = 5353\ntarget = 53\n",
    );
    let mesh_args: Vec<&str> = mesh_args.iter().map(String::as_str).collect();
    let agent = Agent::start(&node, &mesh_args);
    agent.wait_for("L4 mesh attached");
    agent.wait_for("port table synced");
    let now = attached(&node, "u0");
    assert!(
        now.contains("u0(") && now.contains(" id ") && now != before,
        "XDP attached to the uplink: {now}"
    );

    // TCP: every connection reaches a task, both tasks are used, each sees the client's address.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let out = Namespaces::exec(&client, &["curl", "-sS", "--max-time", "5", "http://192.0.2.10:8080/"]);
        let name = out
            .lines()
            .find_map(|l| l.strip_prefix("Name: "))
            .unwrap_or_else(|| panic!("a task answered: {out}"))
            .to_owned();
        let remote = out.lines().find_map(|l| l.strip_prefix("RemoteAddr: ")).unwrap();
        assert!(
            remote.starts_with("192.0.2.1:"),
            "the task sees the client's own address, not the node's: {remote}"
        );
        seen.insert(name);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["task1", "task2"]);

    // Docker's own mapping to the same task, from the client address and port a finished
    // mesh connection used: its replies are not taken for that connection's.
    let port = (41000..41100)
        .find(|p| {
            Namespaces::exec(&client, &["python3", "-c", GET_FROM, "192.0.2.10", "8080", &p.to_string()])
                .contains("Name: task1")
        })
        .expect("some client port goes to task 1");
    let out =
        Namespaces::exec(&client, &["python3", "-c", GET_FROM, "192.0.2.10", "8082", &port.to_string()]);
    assert!(out.contains("Name: task1"), "the DNAT connection from port {port} is answered: {out}");

    // UDP, answered from the address the client asked.
    for _ in 0..4 {
        let out = Namespaces::exec(&client, &["python3", "-c", UDP_ASK, "192.0.2.10", "5353"]);
        assert!(out.contains("ping from 192.0.2.1"), "{out}");
    }
    // Other ports of the node are the kernel's, untouched.
    let refused = Command::new("ip")
        .args(["netns", "exec", &client, "curl", "-sS", "--max-time", "5", "http://192.0.2.10:8081/"])
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(7),
        "the node's own stack refuses it (curl: could not connect): {refused:?}"
    );

    // The counters (read from the BPF maps each second) saw both directions: balanced packets
    // in, and the tasks' replies translated back (tc, on the bridge).
    agent.wait_for_metric(&node, "meshgate_mesh_packets_total{verdict=\"reply\"}", 24);
    agent.wait_for_metric(&node, "meshgate_mesh_packets_total{verdict=\"local\"}", 24);
    agent.wait_for_metric(&node, "meshgate_mesh_port_packets_total{port=\"5353\",protocol=\"udp\"}", 4);
    agent.wait_for_metric(&node, "meshgate_mesh_flows", 24);

    // Stopping the agent leaves the uplink as it was; so does killing it (BPF links die with
    // the process).
    agent.stop();
    assert_eq!(attached(&node, "u0"), before, "no program left on the uplink");

    let again = Agent::start(&node, &mesh_args);
    again.wait_for("L4 mesh attached");
    assert_ne!(attached(&node, "u0"), before);
    run(&["kill", "-KILL", &again.pid()]);
    drop(again);
    assert_eq!(attached(&node, "u0"), before, "a killed agent leaves no program behind");
    drop(tasks);
}

#[test]
fn a_mesh_that_cannot_attach_is_reported_and_the_proxy_keeps_serving() {
    let mut nets = Namespaces::new();
    let node = nets.add("mgx");
    let agent = Agent::start(
        &node,
        &[
            "--example",
            "--http-listen",
            "127.0.0.1:18980",
            "--admin-listen",
            "127.0.0.1:18981",
            "--mesh-uplink",
            "nosuch0",
            "--mesh-node-address",
            "192.0.2.10",
        ],
    );
    let line = agent.wait_for("L4 mesh is down");
    assert!(line.contains("nosuch0"), "{line}");
    let ready = Command::new("ip")
        .args(["netns", "exec", &node, "curl", "-s", "http://127.0.0.1:18981/readyz"])
        .output()
        .unwrap();
    let ready = String::from_utf8_lossy(&ready.stdout);
    assert!(ready.contains("\"mesh\"") && ready.contains("\"ready\": false"), "{ready}");
    let out =
        Namespaces::exec(&node, &["curl", "-sS", "-H", "Host: whoami.localhost", "http://127.0.0.1:18980/"]);
    assert!(out.contains("Name: whoami"), "{out}");
}

/// The issue's topology: a client and three nodes on one underlay bridge; each node has a
/// task bridge with the same subnet (like docker_gwbridge); two tasks on node 1, one on node
/// 2, none on node 3; one agent per node with the same routes.
struct Cluster {
    nets: Namespaces,
    client: String,
    nodes: Vec<String>,
    routes: tempfile::TempDir,
}

const NODE_IPS: [&str; 3] = ["192.0.2.10", "192.0.2.11", "192.0.2.12"];

impl Cluster {
    fn build() -> Self {
        let mut nets = Namespaces::new();
        let underlay = nets.add("mgu");
        run(&["ip", "-n", &underlay, "link", "add", "ub0", "type", "bridge"]);
        run(&["ip", "-n", &underlay, "link", "set", "ub0", "up"]);
        let plug = |ns: &str, port: &str, dev: &str, cidr: &str| {
            run(&[
                "ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                &underlay,
            ]);
            run(&["ip", "-n", &underlay, "link", "set", port, "master", "ub0", "up"]);
            // XDP redirects out of a veth only reach the peer when it has GRO on (XDP-NOTES).
            Namespaces::exec(&underlay, &["ethtool", "-K", port, "gro", "on"]);
            run(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        };
        let client = nets.add("mgc");
        plug(&client, "pc", "c0", "192.0.2.1/24");
        Namespaces::exec(&client, &["ethtool", "-K", "c0", "tx", "off"]);
        let mut nodes = Vec::new();
        for (i, ip) in NODE_IPS.iter().enumerate() {
            let node = nets.add(&format!("mgn{}", i + 1));
            plug(&node, &format!("p{}", i + 1), "u0", &format!("{ip}/24"));
            Namespaces::exec(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
            run(&["ip", "-n", &node, "addr", "add", "10.0.9.1/24", "dev", "br0"]);
            run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
            nodes.push(node);
        }
        let mut cluster = Self { nets, client, nodes, routes: tempfile::tempdir().unwrap() };
        cluster.task(0, 2, "task1");
        cluster.task(0, 3, "task2");
        cluster.task(1, 2, "task3"); // the same address as task1, on another node
        cluster
    }

    /// A task namespace on `node` at 10.0.9.<host> running whoami (HTTP) and a UDP echo.
    fn task(&mut self, node: usize, host: u8, name: &str) {
        let ns = self.nets.add(&format!("mg{name}"));
        let node_ns = self.nodes[node].clone();
        let host_side = format!("v{host}");
        run(&[
            "ip", "link", "add", "e0", "netns", &ns, "type", "veth", "peer", "name", &host_side, "netns",
            &node_ns,
        ]);
        run(&["ip", "-n", &node_ns, "link", "set", &host_side, "master", "br0", "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("10.0.9.{host}/24"), "dev", "e0"]);
        run(&["ip", "-n", &ns, "link", "set", "e0", "up"]);
        run(&["ip", "-n", &ns, "route", "add", "default", "via", "10.0.9.1"]);
        self.nets.spawn(
            &ns,
            &[
                env!("CARGO_BIN_EXE_meshgate"),
                "--docker-mode",
                "off",
                "--whoami-listen",
                "0.0.0.0:80",
                "--whoami-name",
                name,
                "--http-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--example",
            ],
        );
        self.nets.spawn(&ns, &["python3", "-c", UDP_ECHO, name]);
        // Ready when its whoami answers on the task bridge.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("ip")
            .args([
                "netns",
                "exec",
                &node_ns,
                "curl",
                "-sf",
                "--max-time",
                "1",
                &format!("http://10.0.9.{host}/"),
            ])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "task {name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the routes every agent follows: the web service with `tasks` (name, node index,
    /// address), published on TCP 8080 and UDP 5353.
    fn set_routes(&self, tasks: &[(usize, &str)]) -> std::path::PathBuf {
        let tasks: Vec<String> = tasks
            .iter()
            .map(|(node, addr)| format!("{{ address = \"{addr}\", node = \"n{}\" }}", node + 1))
            .collect();
        let nodes: Vec<String> = NODE_IPS
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("[[nodes]]\nname = \"n{}\"\naddress = \"{ip}\"\n", i + 1))
            .collect();
        let nodes = nodes.concat();
        let text = format!(
            "{nodes}[[services]]\nname = \"web\"\ntasks = [{}]\n[[services.l4]]\nprotocol = \"tcp\"\npublished = 8080\ntarget = 80\n[[services.l4]]\nprotocol = \"udp\"\npublished = 5353\ntarget = 53\n",
            tasks.join(", ")
        );
        let path = self.routes.path().join("routes.toml");
        std::fs::write(path.with_extension("tmp"), text).unwrap();
        std::fs::rename(path.with_extension("tmp"), &path).unwrap();
        path
    }

    fn agent(&self, node: usize, routes: &std::path::Path) -> Agent {
        let agent = Agent::start(
            &self.nodes[node],
            &[
                "--routes-file",
                routes.to_str().unwrap(),
                "--routes-poll-interval",
                "50ms",
                "--http-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--mesh-uplink",
                "u0",
                "--mesh-node-address",
                NODE_IPS[node],
                "--mesh-node-name",
                &format!("n{}", node + 1),
                // A removed task's connections end at once (no drain): what the test checks.
                "--mesh-drain",
                "0s",
            ],
        );
        agent.wait_for("L4 mesh attached");
        agent
    }

    /// One HTTP request from the client to `node`'s published port: the task's name and the
    /// client address it saw.
    fn get(&self, node: usize) -> (String, String) {
        let out = Namespaces::exec(
            &self.client,
            &["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", NODE_IPS[node])],
        );
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {out}"))
                .to_owned()
        };
        (field("Name: "), field("RemoteAddr: "))
    }
}

/// A client connection kept open: one HTTP request per line written to it.
/// Short HTTP connections from fixed client ports (`first` .. `first + count`, `threads` at a
/// time), as a busy client reuses its ports: prints `ok <n> failed <m>` and the first failures.
const SHORT_CONNECTIONS: &str = r#"
import socket, sys, threading
host, port, first, count, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ok, failed, lock = [0], [], threading.Lock()
def worker(i):
    for p in range(first + i, first + count, threads):
        try:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(10)
            s.bind(("", p))
            s.connect((host, port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            if not data.startswith(b"HTTP/1.1 200"):
                raise Exception("answer %r" % data[:40])
            with lock:
                ok[0] += 1
        except Exception as e:
            with lock:
                failed.append("port %d: %s" % (p, e))
ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print("ok %d failed %d %s" % (ok[0], len(failed), failed[:5]))
"#;

/// How many short connections each leg of the TIME-WAIT test opens: enough ports for the
/// task's TIME-WAIT to meet the other path many times over.
const CONNECTIONS: &str = "2000";

/// Counts the packets a capture in `ns` sees (`tcpdump` with `filter`) until it is stopped.
struct Capture(Child);

impl Capture {
    fn start(ns: &str, dev: &str, filter: &str) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-l", "-nn", "-i", dev, filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on ..." once its filter is in place.
        let mut said = String::new();
        let mut stderr = BufReader::new(child.stderr.as_mut().unwrap());
        while !said.contains("listening on") {
            assert!(stderr.read_line(&mut said).unwrap() > 0, "tcpdump started: {said}");
        }
        Self(child)
    }

    /// Stops the capture; returns what it saw, one line per packet.
    fn stop(self) -> Vec<String> {
        let Self(tcpdump) = self;
        run(&["kill", "-INT", &tcpdump.id().to_string()]);
        let out = tcpdump.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }
}

/// A TCP counter of `ns` (`/proc/net/snmp`), e.g. "OutRsts".
fn tcp_counter(ns: &str, name: &str) -> u64 {
    let snmp = Namespaces::exec(ns, &["cat", "/proc/net/snmp"]);
    let mut rows = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let at = names.split_whitespace().position(|n| n == name).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

// Issue 17, item 1: whichever path followed a burst of short connections from the same
// client to the same task collapsed. The task holds TIME-WAIT for each finished connection
// (the server closes first); a SYN that comes another way from the same client port meets it
// and gets the TIME-WAIT's ACK, which the mesh took for its own finished flow's and sent to
// the client as from the mesh port: the DNAT connection waiting for it never saw it and
// retried after a second. Every connection must succeed, and the DNAT path's answers must
// come from the DNAT port.
#[test]
fn short_connections_through_the_mesh_then_docker_dnat_then_the_mesh_all_succeed() {
    let mut nets = Namespaces::new();
    let (client, node) = node_with_task_bridge(&mut nets, "mgr");
    let task = task_on_bridge(&mut nets, &node, 1);
    let whoami = [&[env!("CARGO_BIN_EXE_meshgate")][..], crate::harness::WHOAMI].concat();
    nets.spawn(&task, &whoami);
    docker_firewall(&node);
    let dir = tempfile::tempdir().unwrap();
    let args = mesh_agent_args(
        &dir,
        "[[services]]\nname = \"web\"\ntasks = [{ address = \"10.0.9.2\", node = \"n1\" }]\n\
         [[services.l4]]\nprotocol = \"tcp\"\npublished = 8080\ntarget = 80\n",
    );
    let agent = Agent::start(&node, &args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_for("port table synced");
    Namespaces::exec(
        &client,
        &[
            "curl",
            "-sS",
            "--retry",
            "20",
            "--retry-all-errors",
            "--retry-delay",
            "0",
            "--max-time",
            "5",
            // Below the legs' ports: this connection's TIME-WAIT (curl closes first) would
            // refuse a leg's bind of its port.
            "--local-port",
            "30000-30999",
            "http://192.0.2.10:8082/",
        ],
    );

    let leg = |port: &str| {
        let out = Namespaces::exec(
            &client,
            &["python3", "-c", SHORT_CONNECTIONS, "192.0.2.10", port, "40000", CONNECTIONS, "16"],
        );
        assert!(
            out.starts_with(&format!("ok {CONNECTIONS} failed 0")),
            "every connection to port {port} succeeds: {out}"
        );
    };
    leg("8080");
    let resets = tcp_counter(&client, "OutRsts");
    let from_mesh = Capture::start(&client, "c0", "src host 192.0.2.10 and src port 8080");
    leg("8082");
    let stray = from_mesh.stop();
    assert!(
        tcp_counter(&client, "OutRsts") > resets,
        "the task still held TIME-WAIT for some of these ports (its ACKs answered some SYNs, and the client reset them): \
         otherwise this test proves nothing"
    );
    assert!(
        stray.is_empty(),
        "nothing reaches the client from the mesh port while it talks to the DNAT port: {} packets, such as {:?}",
        stray.len(),
        &stray[..stray.len().min(3)]
    );
    leg("8080");
    agent.stop();
}

const KEEP_ALIVE: &str = "import http.client,sys\nc=http.client.HTTPConnection(sys.argv[1],8080,timeout=5)\nfor _ in sys.stdin:\n try:\n  c.request('GET','/')\n  print([l for l in c.getresponse().read().decode().splitlines() if l.startswith('Name: ')][0],flush=True)\n except Exception as e:\n  print(type(e).__name__,flush=True)\n  break\n";

#[test]
fn published_ports_answer_on_every_node_and_reach_tasks_on_any_node() {
    let cluster = Cluster::build();
    let routes = cluster.set_routes(&[(0, "10.0.9.2"), (0, "10.0.9.3"), (1, "10.0.9.2")]);
    let agents: Vec<Agent> = (0..3).map(|n| cluster.agent(n, &routes)).collect();

    // Every node answers, node 3 (no task) included; every task is used; each task sees the
    // client's own address, across nodes too (flows are translated, never source-NATed).
    let mut used = std::collections::BTreeSet::new();
    for (node, ip) in NODE_IPS.iter().enumerate() {
        for _ in 0..12 {
            let (name, remote) = cluster.get(node);
            assert!(remote.starts_with("192.0.2.1:"), "node {node}: the task saw {remote}");
            used.insert(name);
        }
        let udp = Namespaces::exec(&cluster.client, &["python3", "-c", UDP_ASK, ip, "5353"]);
        assert!(udp.contains("ping from 192.0.2.1"), "UDP through node {node}: {udp}");
    }
    assert_eq!(used.into_iter().collect::<Vec<_>>(), ["task1", "task2", "task3"]);
    agents[2].wait_for_metric(&cluster.nodes[2], "meshgate_mesh_packets_total{verdict=\"remote\"}", 12);
    // /api/state shows the port table: which node and task each backend is.
    let state: serde_json::Value =
        serde_json::from_str(&agents[2].admin(&cluster.nodes[2], "/api/state")).unwrap();
    let tcp = &state["mesh"]["ports"][0];
    assert_eq!((tcp["protocol"].as_str(), tcp["port"].as_u64()), (Some("tcp"), Some(8080)), "{state:#}");
    let backends: Vec<(String, String, bool)> = tcp["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["node_address"].as_str().unwrap().to_owned(),
                b["local"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("10.0.9.2:80".to_owned(), "192.0.2.10".to_owned(), false),
            ("10.0.9.3:80".to_owned(), "192.0.2.10".to_owned(), false),
            ("10.0.9.2:80".to_owned(), "192.0.2.11".to_owned(), false)
        ]
    );
    agents[0].wait_for_metric(&cluster.nodes[0], "meshgate_mesh_packets_total{verdict=\"decap\"}", 1);

    // A long-lived connection through node 3 survives other tasks coming and going.
    let mut held = Command::new("ip")
        .args(["netns", "exec", &cluster.client, "python3", "-c", KEEP_ALIVE, NODE_IPS[2]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = held.stdin.take().unwrap();
    let mut output = BufReader::new(held.stdout.take().unwrap()).lines();
    let mut ask = || {
        use std::io::Write as _;
        writeln!(input).unwrap();
        output.next().unwrap().unwrap()
    };
    let first = ask();
    let kept: &str = first.strip_prefix("Name: ").unwrap();
    let others: Vec<(usize, &str)> =
        [(0, "10.0.9.2", "task1"), (0, "10.0.9.3", "task2"), (1, "10.0.9.2", "task3")]
            .iter()
            .filter(|t| t.2 != kept)
            .map(|t| (t.0, t.1))
            .collect();
    let keep = [(0, "10.0.9.2", "task1"), (0, "10.0.9.3", "task2"), (1, "10.0.9.2", "task3")]
        .into_iter()
        .find(|t| t.2 == kept)
        .unwrap();
    // Remove one other task: new flows never reach it, the held connection stays where it is.
    cluster.set_routes(&[(keep.0, keep.1), others[0]]);
    for a in &agents {
        a.wait_for_count("port table synced", 2);
    }
    assert_eq!(ask(), first, "the long-lived connection stays on its task");
    let removed = ["task1", "task2", "task3"]
        .into_iter()
        .find(|n| *n != kept && !others[..1].iter().any(|o| task_name(*o) == *n))
        .unwrap();
    for node in 0..3 {
        for _ in 0..8 {
            assert_ne!(cluster.get(node).0, removed, "a removed task gets no new flow");
        }
    }
    // Add it back: still on its task.
    cluster.set_routes(&[(keep.0, keep.1), others[0], others[1]]);
    for a in &agents {
        a.wait_for_count("port table synced", 3);
    }
    assert_eq!(ask(), first);
    // Remove the held connection's own task: its next request is answered with a reset.
    cluster.set_routes(&[others[0], others[1]]);
    for a in &agents {
        a.wait_for_count("port table synced", 4);
    }
    assert_eq!(ask(), "ConnectionResetError", "a removed task's connection ends with a reset, not a timeout");
    agents[2].wait_for_metric(&cluster.nodes[2], "meshgate_mesh_packets_total{verdict=\"reset\"}", 1);
    drop(input);
    let _ = held.wait();

    // Stopping an agent leaves its node's uplink as it was.
    for (agent, node) in agents.into_iter().zip(&cluster.nodes) {
        agent.stop();
        let left = attached(node, "u0");
        assert!(!left.contains(" id "), "nothing attached after stopping: {left}");
    }
}

fn task_name((node, addr): (usize, &str)) -> &'static str {
    match (node, addr) {
        (0, "10.0.9.2") => "task1",
        (0, "10.0.9.3") => "task2",
        _ => "task3",
    }
}

#[test]
fn without_native_xdp_the_mesh_falls_back_to_generic_mode() {
    // Loopback has no native XDP: the agent says so once and attaches in generic mode.
    let mut nets = Namespaces::new();
    let node = nets.add("mgg");
    let agent = Agent::start(
        &node,
        &[
            "--example",
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--mesh-uplink",
            "lo",
            "--mesh-node-address",
            "127.0.0.1",
        ],
    );
    agent.wait_for("native mode refused");
    let attached = agent.wait_for("L4 mesh attached");
    assert!(attached.contains("Generic"), "{attached}");
    let ready = agent.admin(&node, "/readyz");
    assert!(ready.contains("XDP (Generic) on lo"), "{ready}");
}
