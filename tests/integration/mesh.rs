//! The L4 mesh in real network namespaces: the agent binary attaches XDP to a node's uplink,
//! a client namespace reaches published ports on the node's address, tasks in their own
//! namespaces behind the node's task bridge answer, over real TCP and UDP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs a command, panicking with its output if it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces (and the processes in them) that disappear with the value.
struct Namespaces {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Namespaces {
    fn new() -> Self {
        Self { names: Vec::new(), children: Vec::new() }
    }

    /// A new namespace `<prefix><pid>` with loopback up; returns its name.
    fn add(&mut self, prefix: &str) -> String {
        let name = format!("{prefix}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.names.push(name.clone());
        name
    }

    fn exec(ns: &str, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts `args` inside `ns`, killed when this value drops.
    fn spawn(&mut self, ns: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip").args(["netns", "exec", ns]).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
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
const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\ns.sendto(b'ping',(sys.argv[1],int(sys.argv[2])))\nprint(s.recvfrom(2048)[0].decode())\n";

/// The agent binary inside a namespace, with its JSON log lines.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: std::cell::RefCell<Vec<String>>,
}

impl Agent {
    fn start(ns: &str, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_meshgate"), "--log-format", "json", "--docker", "off"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, log: std::cell::RefCell::default() }
    }

    /// The first log line containing `needle`, waiting for it if it has not come yet.
    fn wait_for(&self, needle: &str) -> String {
        if let Some(line) = self.log.borrow().iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else { break };
            self.log.borrow_mut().push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("no log line with {needle:?}; log:\n{}", self.log.borrow().join("\n"));
    }

    /// A metric's value from the agent's admin endpoint (inside `ns`).
    fn metric(&self, ns: &str, series: &str) -> u64 {
        let serving: serde_json::Value = serde_json::from_str(&self.wait_for("meshgate is serving")).unwrap();
        let admin = serving["admin"].as_str().unwrap().to_owned();
        let text = Namespaces::exec(ns, &["curl", "-s", &format!("http://{admin}/metrics")]);
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
    }

    fn stop(mut self) {
        run(&["kill", "-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the agent did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the uplink has attached: XDP and tc programs, as `bpftool net` lists them.
fn attached(ns: &str, dev: &str) -> String {
    Namespaces::exec(ns, &["bpftool", "net", "show", "dev", dev])
}

#[test]
fn published_ports_reach_local_tasks_with_the_client_address_kept_and_leave_nothing_behind() {
    let mut nets = Namespaces::new();
    let client = nets.add("mgc");
    let node = nets.add("mgn");
    // Underlay: client 192.0.2.1 -- node 192.0.2.10 (the node's uplink is u0).
    run(&["ip", "link", "add", "c0", "netns", &client, "type", "veth", "peer", "name", "u0", "netns", &node]);
    run(&["ip", "-n", &client, "addr", "add", "192.0.2.1/24", "dev", "c0"]);
    run(&["ip", "-n", &client, "link", "set", "c0", "up"]);
    // A local sender's checksums are partial on a veth; XDP rewrites full ones (as from a NIC).
    Namespaces::exec(&client, &["ethtool", "-K", "c0", "tx", "off"]);
    run(&["ip", "-n", &node, "addr", "add", "192.0.2.10/24", "dev", "u0"]);
    run(&["ip", "-n", &node, "link", "set", "u0", "up"]);
    Namespaces::exec(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The node's task bridge, 10.0.9.0/24, with two tasks.
    run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &node, "addr", "add", "10.0.9.1/24", "dev", "br0"]);
    run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    let mut tasks = Vec::new();
    for i in 1..=2 {
        let task = nets.add(&format!("mgt{i}"));
        let host_side = format!("t{i}");
        run(&["ip", "link", "add", "e0", "netns", &task, "type", "veth", "peer", "name", &host_side, "netns", &node]);
        run(&["ip", "-n", &node, "link", "set", &host_side, "master", "br0", "up"]);
        run(&["ip", "-n", &task, "addr", "add", &format!("10.0.9.{}/24", i + 1), "dev", "e0"]);
        run(&["ip", "-n", &task, "link", "set", "e0", "up"]);
        run(&["ip", "-n", &task, "route", "add", "default", "via", "10.0.9.1"]);
        let name = format!("task{i}");
        nets.spawn(&task, &[env!("CARGO_BIN_EXE_meshgate"), "--docker", "off", "--whoami-listen", "0.0.0.0:80", "--whoami-name", &name, "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--example"]);
        nets.spawn(&task, &["python3", "-c", UDP_ECHO, &name]);
        tasks.push(task);
    }
    let before = attached(&node, "u0");

    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[services]]\nname = \"web\"\ntasks = [{ address = \"10.0.9.2\", node = \"n1\" }, { address = \"10.0.9.3\", node = \"n1\" }]\n\
         [[services.l4]]\nprotocol = \"tcp\"\npublished = 8080\ntarget = 80\n\
         [[services.l4]]\nprotocol = \"udp\"\npublished = 5353\ntarget = 53\n",
    )
    .unwrap();
    let agent = Agent::start(&node, &[
        "--routes", routes.to_str().unwrap(), "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--mesh-uplink", "u0", "--mesh-node-address", "192.0.2.10", "--mesh-node-name", "n1",
    ]);
    agent.wait_for("L4 mesh attached");
    agent.wait_for("port table synced");
    let now = attached(&node, "u0");
    assert!(now.contains("u0(") && now.contains(" id ") && now != before, "XDP attached to the uplink: {now}");

    // TCP: every connection reaches a task, both tasks are used, each sees the client's address.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let out = Namespaces::exec(&client, &["curl", "-sS", "--max-time", "5", "http://192.0.2.10:8080/"]);
        let name = out.lines().find_map(|l| l.strip_prefix("Name: ")).unwrap_or_else(|| panic!("a task answered: {out}")).to_owned();
        let remote = out.lines().find_map(|l| l.strip_prefix("RemoteAddr: ")).unwrap();
        assert!(remote.starts_with("192.0.2.1:"), "the task sees the client's own address, not the node's: {remote}");
        seen.insert(name);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["task1", "task2"]);

    // UDP, answered from the address the client asked.
    for _ in 0..4 {
        let out = Namespaces::exec(&client, &["python3", "-c", UDP_ASK, "192.0.2.10", "5353"]);
        assert!(out.contains("ping from 192.0.2.1"), "{out}");
    }
    // Other ports of the node are the kernel's, untouched.
    let refused = Command::new("ip").args(["netns", "exec", &client, "curl", "-sS", "--max-time", "5", "http://192.0.2.10:8081/"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(7), "the node's own stack refuses it (curl: could not connect): {refused:?}");

    // The counters (read from the BPF maps each second) saw both directions: balanced packets
    // in, and the tasks' replies translated back (tc egress).
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric(&node, "meshgate_mesh_packets_total{verdict=\"reply\"}") < 24 || agent.metric(&node, "meshgate_mesh_packets_total{verdict=\"local\"}") < 24 {
        assert!(Instant::now() < deadline, "the mesh counters did not count the traffic");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.metric(&node, "meshgate_mesh_port_packets_total{port=\"5353\",protocol=\"udp\"}") >= 4);

    // Stopping the agent leaves the uplink as it was.
    agent.stop();
    assert_eq!(attached(&node, "u0"), before, "no program left on the uplink");
    drop(tasks);
}

#[test]
fn a_mesh_that_cannot_attach_is_reported_and_the_proxy_keeps_serving() {
    let mut nets = Namespaces::new();
    let node = nets.add("mgx");
    let agent = Agent::start(&node, &["--example", "--http-listen", "127.0.0.1:18980", "--admin-listen", "127.0.0.1:18981", "--mesh-uplink", "nosuch0", "--mesh-node-address", "192.0.2.10"]);
    let line = agent.wait_for("L4 mesh is down");
    assert!(line.contains("nosuch0"), "{line}");
    let ready = Command::new("ip").args(["netns", "exec", &node, "curl", "-s", "http://127.0.0.1:18981/readyz"]).output().unwrap();
    let ready = String::from_utf8_lossy(&ready.stdout);
    assert!(ready.contains("\"mesh\"") && ready.contains("\"ready\": false"), "{ready}");
    let out = Namespaces::exec(&node, &["curl", "-sS", "-H", "Host: whoami.localhost", "http://127.0.0.1:18980/"]);
    assert!(out.contains("Name: whoami"), "{out}");
}
