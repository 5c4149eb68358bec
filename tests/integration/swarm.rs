//! meshgate on a real multi-node Swarm: three Docker engines of the lab (`lab.rs`), the
//! stack deployed as the README says, services on overlay networks reached from every node.

use std::time::Duration;

use tokio::process::Command;

use crate::harness::eventually;
use crate::lab::{Lab, Load, Shape};

const TEST_IMAGE: &str = "meshgate-test/busybox:local";
/// The test image that serves HTTP on port 80 by itself (in place of a public image).
const WEB_IMAGE: &str = "meshgate-test/web:local";
/// Stand-ins for the field files' images, on the ports the real ones listen on.
const NODE_RED_IMAGE: &str = "meshgate-test/node-red:local";
const PORTAINER_IMAGE: &str = "meshgate-test/portainer:local";
const PORTAINER_AGENT_IMAGE: &str = "meshgate-test/portainer-agent:local";
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CONVERGE: Duration = Duration::from_secs(90);

/// An HTTP server on port 80 answering with its container's host name (the container id).
const HTTPD: &str = "mkdir -p /w && hostname > /w/index.html && exec httpd -f -p 80 -h /w";

/// Builds the test images into every node (busybox-static, imported: nothing is pulled).
async fn import_test_image() {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("/bin/busybox (busybox-static)");
    for applet in ["sh", "httpd", "hostname", "mkdir", "sleep", "cat", "nslookup", "printf", "chmod"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let web = format!("--change 'CMD [\"sh\", \"-c\", \"{HTTPD}\"]'");
    // The field's images (Node-RED, Portainer and its agent) answer on their own ports, and
    // take whatever command their stack file gives them.
    let on_port = |port: u16| {
        let httpd = HTTPD.replace("-p 80", &format!("-p {port}"));
        format!("--change 'ENTRYPOINT [\"sh\", \"-c\", \"{httpd}\"]'")
    };
    let (red, portainer, agent) = (on_port(1880), on_port(9000), on_port(9001));
    for i in 1..=3 {
        for (image, change) in [
            (TEST_IMAGE, ""),
            (WEB_IMAGE, web.as_str()),
            (NODE_RED_IMAGE, red.as_str()),
            (PORTAINER_IMAGE, portainer.as_str()),
            (PORTAINER_AGENT_IMAGE, agent.as_str()),
        ] {
            let import = format!(
                "tar -C {} -c . | docker -H {} import {change} - {image}",
                root.path().display(),
                Lab::docker_host(i)
            );
            let out = Command::new("sh").args(["-c", &import]).output().await.unwrap();
            assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Runs one line of the README's deploy commands against node `node`, from the repository.
async fn readme_line(node: usize, line: &str) {
    let out = Command::new("sh")
        .args(["-c", line])
        .current_dir(REPO)
        .env("DOCKER_HOST", Lab::docker_host(node))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "`{line}` on node {node}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sh block under "Deploy on a Swarm" in the README, line by line.
fn readme_deploy_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(format!("{REPO}/README.md")).unwrap();
    let section = readme.split("## Deploy on a Swarm").nth(1).expect("the README has \"Deploy on a Swarm\"");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What Docker's DNS answers for `name` inside the `proxy` overlay (a container on it asks).
async fn dockers_answer(name: &str) -> Vec<String> {
    let out = Lab::docker(1, &["run", "--rm", "--network", "proxy", TEST_IMAGE, "nslookup", name]).await;
    // After the server's own lines: `Address: 10.0.2.5` per answer.
    let mut addrs: Vec<String> = out
        .split("Name:")
        .skip(1)
        .flat_map(|answer| {
            answer.lines().filter_map(|l| l.strip_prefix("Address:")).map(|a| a.trim().to_owned())
        })
        .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// What node `i`'s mesh-dns answers for `name` (A records), asked by the node itself (its
/// loopback, inside the recursion networks).
async fn mesh_dns_answer(i: usize, name: &str) -> Vec<String> {
    let ns = format!("mglab-n{i}");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "dig", "@127.0.0.1", "+short", "+time=2", name])
        .output()
        .await
        .unwrap();
    let mut addrs: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    addrs.sort();
    addrs
}

/// A user's stack: a service on the stack's default overlay, pinned to node 3, and one on an
/// external attachable overlay (as Traefik and nginx-proxy guides have it), pinned to node 2.
fn user_stack() -> String {
    format!(
        r#"version: "3.8"
services:
  web:
    image: {TEST_IMAGE}
    command: ["sh", "-c", "{HTTPD}"]
    environment:
      VIRTUAL_HOST: web.test
    stop_grace_period: 1s
    deploy:
      placement:
        constraints: ["node.hostname == mglab-n3"]
  api:
    image: {TEST_IMAGE}
    command: ["sh", "-c", "{HTTPD}"]
    labels:
      meshgate.enable: "true"
    environment:
      VIRTUAL_HOST: api.test
    networks: [proxy]
    stop_grace_period: 1s
    deploy:
      placement:
        constraints: ["node.hostname == mglab-n2"]
networks:
  proxy:
    external: true
"#
    )
}

/// The container id (its host name) of the one task of `service`, from the node it runs on.
async fn task_container(service: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        for i in 1..=3 {
            let label = format!("label=com.docker.swarm.service.name={service}");
            let ids = Lab::docker(i, &["ps", "-q", "--filter", &label]).await;
            if let Some(id) = ids.lines().next() {
                return id.to_owned();
            }
        }
        if started.elapsed() > CONVERGE {
            let ps = Lab::docker_output(1, &["service", "ps", "--no-trunc", service]).await;
            panic!(
                "{service} has no running container after {CONVERGE:?}: {}",
                String::from_utf8_lossy(&ps.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_engines_the_readme_stack_deploys_and_every_node_answers_for_services_on_overlays() {
    let _lab = Lab::up(Shape::OneManager).await;
    import_test_image().await;

    // The README's commands, as written: the image on every node, the secret and the stack
    // from the manager. Swapped: the agent binary under test for a release build, and the
    // README's public nginx image for the test image.
    let commands = readme_deploy_commands();
    assert!(commands.len() >= 4, "{commands:?}");
    let binary = env!("CARGO_BIN_EXE_meshgate");
    for i in 1..=3 {
        readme_line(i, &format!("{} {binary}", commands[0])).await;
    }
    readme_line(1, &commands[1]).await;
    readme_line(1, &commands[2]).await;
    let hello =
        commands[3].replace(" nginx", &format!(" --stop-grace-period 1s {TEST_IMAGE} sh -c '{HTTPD}'"));
    readme_line(1, &hello).await;

    eventually("the agent runs healthy on all three nodes", CONVERGE, async || {
        let states = Lab::docker(
            1,
            &[
                "service",
                "ps",
                "meshgate_agent",
                "--filter",
                "desired-state=running",
                "--format",
                "{{.CurrentState}}",
            ],
        )
        .await;
        states.lines().filter(|s| s.starts_with("Running")).count() == 3
    })
    .await;

    let sink_before = Lab::sink_count().await;
    Lab::docker(1, &["network", "create", "-d", "overlay", "--attachable", "proxy"]).await;
    let stack = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stack.path(), user_stack()).unwrap();
    Lab::docker(1, &["stack", "deploy", "-c", stack.path().to_str().unwrap(), "shop"]).await;

    for (host, service) in
        [("web.test", "shop_web"), ("api.test", "shop_api"), ("hello.example.com", "hello")]
    {
        let want = task_container(service).await;
        for i in 1..=3 {
            let url = format!("http://{}/", Lab::addr(i));
            let mut last = String::new();
            eventually(
                &format!(
                    "{host} answers through node {i} from {service}'s task {want} (last answer: see below)"
                ),
                CONVERGE,
                async || {
                    let (ok, body) = Lab::curl(host, &url).await;
                    last = body.clone();
                    ok && body == want
                },
            )
            .await;
            assert_eq!(last, want);
        }
    }
    // The README's hello on no network of its own, its tasks on every node: each node uses
    // all three (the managers do not know the workers' task addresses: their agents do).
    Lab::docker(1, &["service", "scale", "hello=3"]).await;
    for i in 1..=3 {
        let url = format!("http://{}/", Lab::addr(i));
        eventually(&format!("node {i} reaches the three hello tasks"), CONVERGE, async || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                if let (true, body) = Lab::curl("hello.example.com", &url).await {
                    seen.insert(body);
                }
            }
            seen.len() == 3
        })
        .await;
    }
    assert_eq!(
        Lab::sink_count().await,
        sink_before,
        "no packet to a task, an overlay address or a routed port left a node through its default route"
    );

    // mesh-dns on every node answers service and task names with the tasks of all nodes,
    // as Docker's own DNS does inside the overlay (`dnsrr`: the VIP needs IPVS).
    Lab::docker(
        1,
        &[
            "service",
            "create",
            "--name",
            "names",
            "--replicas",
            "3",
            "--endpoint-mode",
            "dnsrr",
            "--network",
            "proxy",
            "--stop-grace-period",
            "1s",
            TEST_IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    )
    .await;
    for name in ["names", "tasks.names", "tasks.shop_api"] {
        let docker = dockers_answer(name).await;
        assert!(!docker.is_empty(), "Docker's DNS knows {name}");
        for i in 1..=3 {
            eventually(
                &format!("node {i}'s mesh-dns answers {name} as Docker does: {docker:?}"),
                CONVERGE,
                async || mesh_dns_answer(i, name).await == docker,
            )
            .await;
        }
    }
    // The machine is outside the recursion networks (198.18.50.1, not a private range): a
    // client from the internet gets none of the cluster's names.
    let out =
        Command::new("dig").args([&format!("@{}", Lab::addr(1)), "+time=2", "names"]).output().await.unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("status: REFUSED"), "{out}");

    // The L4 mesh's capability file added.
    deploy_with_mesh().await;

    // The field's WordPress stack, unchanged but for its images: `ports: - 8080:80` (ingress
    // mode) answers on every node through the L4 mesh, the task being on one node only.
    let field =
        std::fs::read_to_string(format!("{REPO}/../shared/field/wordpress/stack_wordpress.yml")).unwrap();
    let wordpress = field
        .replace("image: wordpress", &format!("image: {WEB_IMAGE}"))
        .replace("image: mysql:5.7", &format!("image: {WEB_IMAGE}"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), wordpress).unwrap();
    Lab::docker(1, &["stack", "deploy", "-c", file.path().to_str().unwrap(), "wordpress"]).await;
    let want = task_container("wordpress_wordpress").await;
    for i in 1..=3 {
        let url = format!("http://{}:8080/", Lab::addr(i));
        eventually(&format!("{url} answers from the WordPress task {want}"), CONVERGE, async || {
            Lab::curl("any", &url).await == (true, want.clone())
        })
        .await;
    }

    field_files_deploy_unchanged().await;
    traefik_examples_on_deploy_labels().await;

    // The client's address reaches the task through any node (ingress mode), and a port
    // published in host mode answers only on the node that runs its task. (busybox httpd
    // writes the address as `[::ffff:198.18.50.1]`.)
    let who = "mkdir -p /w/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' > /w/cgi-bin/ip && chmod +x /w/cgi-bin/ip && exec httpd -f -p 80 -h /w";
    for (name, publish) in [("who", "8091:80"), ("local", "mode=host,published=8092,target=80")] {
        Lab::docker(
            1,
            &[
                "service",
                "create",
                "--name",
                name,
                "--publish",
                publish,
                "--constraint",
                "node.hostname==mglab-n2",
                "--stop-grace-period",
                "1s",
                TEST_IMAGE,
                "sh",
                "-c",
                who,
            ],
        )
        .await;
    }
    for i in 1..=3 {
        let url = format!("http://{}:8091/cgi-bin/ip", Lab::addr(i));
        eventually(&format!("{url}: the task sees the machine's address"), CONVERGE, async || {
            Lab::curl("any", &url).await.1.contains(Lab::MACHINE)
        })
        .await;
        let url = format!("http://{}:8092/cgi-bin/ip", Lab::addr(i));
        if i == 2 {
            eventually(&format!("{url} (host mode, the task's node) answers"), CONVERGE, async || {
                Lab::curl("any", &url).await.1.contains(Lab::MACHINE)
            })
            .await;
        } else {
            assert!(!Lab::curl("any", &url).await.0, "{url}: host mode stays on the task's node");
        }
    }

    // A task this node cannot reach (an internal overlay gives it no docker_gwbridge
    // address) is reported and never dialled: its node says why, the request fails fast.
    Lab::docker(1, &["network", "create", "-d", "overlay", "--internal", "sealed"]).await;
    Lab::docker(
        1,
        &[
            "service",
            "create",
            "--name",
            "sealed",
            "--network",
            "sealed",
            "--constraint",
            "node.hostname==mglab-n1",
            "--stop-grace-period",
            "1s",
            "-e",
            "VIRTUAL_HOST=sealed.test",
            TEST_IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    )
    .await;
    eventually("node 1 reports the sealed task as unreachable", CONVERGE, async || {
        let state = Lab::api_state(1).await;
        state["problems"].as_array().is_some_and(|p| {
            p.iter().any(|p| p.as_str().is_some_and(|p| p.contains("sealed") && p.contains("not reachable")))
        })
    })
    .await;
    let metrics = Lab::admin(1, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("meshgate_backend_up{")
            && l.contains("service=\"sealed\"")
            && l.ends_with(" 0")),
        "the sealed task is shown down: {metrics}"
    );
    let (_, body) = Lab::curl("sealed.test", &format!("http://{}/", Lab::addr(1))).await;
    assert!(body.contains("Service Unavailable"), "no task to send it to, at once: {body}");
    assert_eq!(Lab::sink_count().await, sink_before, "nothing left a node through its default route");
}

/// Reads a field file (`../shared/field/<path>`) with its `image:` lines swapped (the only
/// change allowed: no registry can be reached).
fn field_file(path: &str, images: &[(&str, &str)]) -> tempfile::NamedTempFile {
    let mut text = std::fs::read_to_string(format!("{REPO}/../shared/field/{path}")).unwrap();
    for (from, to) in images {
        assert!(text.contains(&format!("image: {from}")), "{path} names {from}");
        text = text.replace(&format!("image: {from}"), &format!("image: {to}"));
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

/// Drop-in issue, item 6: the users' own files, deployed as they wrote them (images
/// swapped), answer on every node as they did under nginx-proxy and Traefik.
async fn field_files_deploy_unchanged() {
    let all_nodes = async |host: &str, want: &str, what: &str| {
        for i in 1..=3 {
            let url = format!("http://{}/", Lab::addr(i));
            eventually(
                &format!("{what}: {host} answers through node {i} from {want}"),
                CONVERGE,
                async || {
                    let (ok, body) = Lab::curl(host, &url).await;
                    ok && body.contains(want)
                },
            )
            .await;
        }
    };
    // nginx-proxy: Node-RED on its own network and the shared `proxy` one, VIRTUAL_PORT=1880.
    // The file names `environment` twice: Docker's stack loader refuses it ("mapping key
    // already defined"), whatever the proxy, so it cannot deploy as written on this engine.
    // docker-compose v1, where it ran, kept the later one: deployed as that (the earlier
    // `TZ` line dropped), the only change beyond its image.
    let red = field_file("nginx-proxy/node-red.yml", &[("nodered/node-red:latest", NODE_RED_IMAGE)]);
    let refused =
        Lab::docker_output(1, &["stack", "deploy", "-c", red.path().to_str().unwrap(), "nodered"]).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already defined"), "{refused:?}");
    let text = std::fs::read_to_string(red.path()).unwrap();
    let once = text.replacen("    environment:\n      - TZ=Europe/Amsterdam\n", "", 1);
    assert_ne!(once, text, "the first `environment` is dropped");
    std::fs::write(red.path(), once).unwrap();
    Lab::docker(1, &["stack", "deploy", "-c", red.path().to_str().unwrap(), "nodered"]).await;
    all_nodes("nodered.docker.localhost", &task_container("nodered_node-red").await, "node-red.yml").await;

    // nginx-proxy: the override file gives a service `VIRTUAL_PROTO=https` on 443 (the base
    // file is the user's own, not in the report: here meshgate's image serving HTTPS with its
    // self-signed certificate, as such a web server does behind nginx-proxy).
    let base = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        base.path(),
        "version: '3.7'\nservices:\n  webserver:\n    image: meshgate:local\n    command: [\"--example\"]\n    environment:\n    - MESHGATE_TLS_HTTPS_LISTEN=0.0.0.0:443\n    - MESHGATE_HTTP_LISTEN=0.0.0.0:8080\n    - MESHGATE_DEFAULT_HOST=whoami.localhost\n    - MESHGATE_ACME_ENABLED=false\n",
    )
    .unwrap();
    let overlay = field_file("nginx-proxy/docker-compose.proxy-override.yml", &[]);
    let (base, overlay) = (base.path().to_str().unwrap(), overlay.path().to_str().unwrap());
    Lab::docker(1, &["stack", "deploy", "-c", base, "-c", overlay, "site"]).await;
    let hostname = format!("Hostname: {}", task_container("site_webserver").await);
    all_nodes("wp.dckr.sisg.ucl.ac.be", &hostname, "the https override").await;

    // Traefik: Portainer with `deploy.labels` on the external `proxy_net` overlay.
    Lab::docker(1, &["network", "create", "-d", "overlay", "--attachable", "proxy_net"]).await;
    let images = [
        ("portainer/agent:latest", PORTAINER_AGENT_IMAGE),
        ("portainer/portainer-ce:latest", PORTAINER_IMAGE),
    ];
    let stack = field_file("traefik/portainer-stack.yml", &images);
    Lab::docker(1, &["stack", "deploy", "-c", stack.path().to_str().unwrap(), "portainer"]).await;
    let portainer = task_container("portainer_portainer").await;
    all_nodes("portainer.docker.localhost", &portainer, "portainer-stack.yml").await;
    // Its `9000:9000` is published (ingress): every node answers it through the L4 mesh.
    for i in 1..=3 {
        let url = format!("http://{}:9000/", Lab::addr(i));
        eventually(&format!("{url} answers from Portainer"), CONVERGE, async || {
            Lab::curl("any", &url).await == (true, portainer.clone())
        })
        .await;
    }
    // The same stack with a basicauth middleware added (two label lines, `$` doubled as a
    // stack file needs): every node asks for the user, and lets them in.
    let made = Command::new("htpasswd").args(["-nbm", "admin", "s3cret"]).output().await.unwrap();
    let user = String::from_utf8(made.stdout).unwrap().trim().replace('$', "$$");
    let text = std::fs::read_to_string(stack.path()).unwrap().replace(
        "        - \"traefik.http.services.portainer.loadbalancer.server.port=9000\"",
        &format!(
            "        - \"traefik.http.services.portainer.loadbalancer.server.port=9000\"\n        - \"traefik.http.routers.portainer.middlewares=portainer-auth\"\n        - \"traefik.http.middlewares.portainer-auth.basicauth.users={user}\""
        ),
    );
    assert!(text.contains("portainer-auth.basicauth"), "{text}");
    std::fs::write(stack.path(), text).unwrap();
    Lab::docker(1, &["stack", "deploy", "-c", stack.path().to_str().unwrap(), "portainer"]).await;
    for i in 1..=3 {
        let url = format!("http://{}/", Lab::addr(i));
        let status = async |auth: &[&str]| {
            let mut args =
                vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: portainer.docker.localhost"];
            args.extend_from_slice(auth);
            args.push(&url);
            crate::harness::curl(&args).await.1
        };
        eventually(&format!("node {i} asks for Portainer's user"), CONVERGE, async || {
            status(&[]).await == "401"
        })
        .await;
        assert_eq!(status(&["-u", "admin:s3cret"]).await, "200", "node {i}");
        assert_eq!(status(&["-u", "admin:wrong"]).await, "401", "node {i}");
    }
}

/// Drop-in issue, item 4: Traefik's documented examples (`traefik_docs.rs`), each a Swarm
/// service with its labels under `deploy.labels`, answered through every node in turn as on a
/// single engine (the machine's address is not in the allow list's example: 403 there).
async fn traefik_examples_on_deploy_labels() {
    let stack = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stack.path(), crate::traefik_docs::stack("meshgate:local")).unwrap();
    Lab::docker(1, &["stack", "deploy", "-c", stack.path().to_str().unwrap(), "docs"]).await;
    let bases: Vec<String> = (1..=3).map(|i| format!("http://{}", Lab::addr(i))).collect();
    crate::traefik_docs::check_all(&bases, false, CONVERGE, async || Lab::api_state(1).await).await;
    Lab::docker(1, &["stack", "rm", "docs"]).await;
}

/// The test images and the agent's on every node, and the cluster secret, as the README says.
async fn images_and_secret() {
    import_test_image().await;
    let binary = env!("CARGO_BIN_EXE_meshgate");
    for i in 1..=3 {
        readme_line(i, &format!("helm-free-deploy/build-image.sh {binary}")).await;
    }
    readme_line(1, &format!("{binary} --new-cluster-secret | docker secret create meshgate_cluster -")).await;
}

/// The stack with the L4 mesh's capability file, as the README says (this engine is 20.10):
/// no variable to set, the uplink is the device of each node's Swarm address. Waits until
/// every agent has attached, with its reply table on the node's bpffs (kept for the next
/// agent: no connection fails during meshgate's own update).
async fn deploy_with_mesh() {
    readme_line(
        1,
        "docker stack deploy -c helm-free-deploy/stack.yml -c helm-free-deploy/mesh-docker20.yml meshgate",
    )
    .await;
    for i in 1..=3 {
        // (While the agents are replaced, the old one may answer too: asked until the new.)
        eventually(
            &format!("node {i}'s agent has the L4 mesh attached, its reply table kept in the node's bpffs"),
            CONVERGE,
            async || Lab::readyz(i).await.contains("reply table kept in /sys/fs/bpf/meshgate"),
        )
        .await;
    }
}

/// Prints the agents' warnings (every node's, old agents' too): why a request failed. From
/// each engine's containers (`docker service logs` can wait forever on a node).
async fn agents_warnings() {
    agents_log(|l| l.contains("WARN") || l.contains("ERROR")).await;
}

/// Prints the lines of every agent's log (every node, exited ones too) that `keep` keeps.
async fn agents_log(keep: impl Fn(&str) -> bool) {
    for i in 1..=3 {
        let filter = ["ps", "-aq", "--filter", "label=com.docker.swarm.service.name=meshgate_agent"];
        let ids = Lab::docker_output(i, &filter).await;
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let out = Lab::docker_output(i, &["logs", "--timestamps", id]).await;
            let logs = [out.stdout, out.stderr].concat();
            for line in String::from_utf8_lossy(&logs).lines().filter(|l| keep(l)) {
                eprintln!("agent (node {i}, {id}): {line}");
            }
        }
    }
}

/// The agents on every node with the L4 mesh, deployed as the README says; waits until each
/// has attached.
async fn agents_with_mesh() {
    images_and_secret().await;
    deploy_with_mesh().await;
}

/// The load's targets on `nodes`: the routed host and the published port of each.
fn both_ways(nodes: &[usize]) -> Vec<(&'static str, String)> {
    nodes
        .iter()
        .flat_map(|&i| {
            [
                ("load.test", format!("http://{}/", Lab::addr(i))),
                ("any", format!("http://{}:8090/", Lab::addr(i))),
            ]
        })
        .collect()
}

/// Runs `load` until it has some answers, then `change`, then stops it.
async fn through(
    targets: &[(&str, String)],
    change: impl AsyncFnOnce(),
) -> Vec<(String, usize, Vec<String>)> {
    let load = Load::start(targets);
    eventually("the load is answered", CONVERGE, async || load.answers() >= 20 * targets.len()).await;
    // Shown with a failure (a passing test's output is not): what the counters were before.
    eprintln!("before the change (at {}):", clock());
    mesh_counters().await;
    change().await;
    load.finish().await
}

/// No failed HTTP request and no failed connection to a published port: a stopping task
/// takes no new request from the moment its container is killed, and a request that met a
/// closing connection is sent again. Published ports (Docker's default stop grace of 10 s,
/// which an L4 connection in flight needs): a stopping task takes no new connection once
/// every node learned it stops (about 2 s) and finishes the ones it has, its answers still
/// translated; a SYN that went to it as it stopped is sent again to another task. (The soak
/// below ran 44,639 connections over 10 rolling updates with none failed.) A failure is
/// reported with each node's mesh counters.
async fn assert_none_failed(results: &[(String, usize, Vec<String>)], during: &str) {
    assert_l4_failed_at_most(results, during, 0).await;
}

/// No failed HTTP request, and at most `l4_allowed` failed connections to published ports.
async fn assert_l4_failed_at_most(results: &[(String, usize, Vec<String>)], during: &str, l4_allowed: usize) {
    let (mut l4_total, mut l4_failed) = (0, Vec::new());
    for (target, answered, failed) in results {
        assert!(*answered > 0, "{target} answered nothing during {during}");
        if target.starts_with("load.test") {
            assert!(
                failed.is_empty(),
                "{target} during {during}: {} of {} failed: {failed:?}",
                failed.len(),
                answered + failed.len()
            );
        } else {
            l4_total += answered + failed.len();
            l4_failed.extend(failed.iter().map(|f| format!("{target}: {f}")));
        }
    }
    eprintln!(
        "published ports during {during}: {} of {l4_total} new connections failed: {l4_failed:?}",
        l4_failed.len()
    );
    if !l4_failed.is_empty() {
        eprintln!("after the change (at {}):", clock());
        mesh_counters().await;
        agents_log(|l| l.contains("L4 mesh")).await;
    }
    assert!(l4_failed.len() <= l4_allowed, "published ports during {during}: {l4_failed:?}");
}

/// The time of day as the load's lines give it (`date +%T.%N`), to read them side by side.
fn clock() -> String {
    let out = std::process::Command::new("date").arg("+%T.%N").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Prints every node's mesh counters (verdicts): where failed connections' packets went.
async fn mesh_counters() {
    for i in 1..=3 {
        for line in
            Lab::admin(i, "/metrics").await.lines().filter(|l| l.starts_with("meshgate_mesh_packets_total"))
        {
            eprintln!("node {i}: {line}");
        }
    }
}

/// `load`: three tasks of the web image on the overlay `apps`, published on 8090, with
/// `more` arguments (its opt-in variables).
async fn load_service(more: &[&str]) {
    Lab::docker(1, &["network", "create", "-d", "overlay", "apps"]).await;
    let mut args = vec!["service", "create", "--detach", "--name", "load", "--replicas", "3"];
    args.extend(["--network", "apps", "--publish", "8090:80"]);
    args.extend_from_slice(more);
    args.push(WEB_IMAGE);
    Lab::docker(1, &args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_no_request_fails_through_a_rolling_update_a_drain_and_meshgates_own_update() {
    let _lab = Lab::up(Shape::OneManager).await;
    agents_with_mesh().await;
    load_service(&["-e", "VIRTUAL_HOST=load.test"]).await;
    for (host, url) in both_ways(&[1, 2, 3]) {
        eventually(&format!("{url} answers"), CONVERGE, async || Lab::curl(host, &url).await.0).await;
    }

    let results = through(&both_ways(&[1, 2, 3]), async || {
        Lab::docker(1, &["service", "update", "--detach=false", "--env-add", "GENERATION=2", "load"]).await;
    })
    .await;
    assert_none_failed(&results, "a rolling update of the service").await;

    // Draining a node stops its tasks and its agent: the load goes to the two others.
    let results = through(&both_ways(&[1, 2]), async || {
        Lab::docker(1, &["node", "update", "--availability", "drain", "mglab-n3"]).await;
        eventually("node 3 runs no task", CONVERGE, async || Lab::docker(3, &["ps", "-q"]).await.is_empty())
            .await;
    })
    .await;
    assert_none_failed(&results, "the drain of node 3").await;
    Lab::docker(1, &["node", "update", "--availability", "active", "mglab-n3"]).await;
    eventually("node 3's agent is back", CONVERGE, async || Lab::readyz(3).await.contains("XDP")).await;

    let results = through(&both_ways(&[1, 2, 3]), async || {
        Lab::docker(
            1,
            &["service", "update", "--detach=false", "--env-add", "GENERATION=2", "meshgate_agent"],
        )
        .await;
    })
    .await;
    // During meshgate's own update: the failed new connections are reported and stay under
    // 1 in 1,000, for HTTP and published ports alike (none failed in the runs so far: the
    // new agent listens once its state is complete, the reply table is shared through the
    // node's bpffs). A failure's reason is in the agents' warnings, printed with it.
    let mut failed_any = false;
    for kind in ["load.test", "any"] {
        let (mut total, mut failures) = (0, Vec::new());
        for (target, answered, failed) in results.iter().filter(|r| r.0.starts_with(kind)) {
            total += answered + failed.len();
            failures.extend(failed.iter().map(|f| format!("{target}: {f}")));
        }
        eprintln!("{kind} during meshgate's own update: {} of {total} failed: {failures:?}", failures.len());
        failed_any |= !failures.is_empty();
        if failures.len() * 1000 >= total {
            agents_warnings().await;
            panic!("{kind} during meshgate's own update: {} of {total} failed: {failures:?}", failures.len());
        }
    }
    if failed_any {
        agents_warnings().await;
    }
    // Swarm watches each updated task for a while (`update_config.monitor`, 5 s) and rolls
    // the whole update back if one fails then: a chaos stage started before that ends makes
    // the agents on every node restart during it (seen: node 1's agents handed over while
    // node 2's cable was pulled).
    eventually("meshgate's own update is complete, no longer monitored", CONVERGE, async || {
        let state = ["service", "inspect", "--format", "{{.UpdateStatus.State}}", "meshgate_agent"];
        Lab::docker(1, &state).await == "completed"
    })
    .await;

    // A worker's engine stops and starts again while requests flow through the two others
    // (chaos, "Hold under abuse"): no HTTP request fails (a hop to the stopped node is
    // refused at once and goes to another task; a SYN to a task that died is sent again by
    // the client and goes to another), and at most the connection each load loop had open
    // on the node's tasks when they were killed fails; every route stays.
    let results = through(&both_ways(&[1, 2]), async || {
        Lab::stop_engine(3).await;
        Lab::start_engine(3).await;
        eventually("node 3's agent is back", CONVERGE, async || Lab::readyz(3).await.contains("XDP")).await;
    })
    .await;
    // At most one per load loop on published ports: the connection it had open there.
    let l4_loops = results.iter().filter(|r| !r.0.starts_with("load.test")).count();
    assert_l4_failed_at_most(&results, "the restart of node 3's engine", l4_loops).await;
    for (host, url) in both_ways(&[1, 2, 3]) {
        eventually(&format!("{url} answers with node 3 back"), CONVERGE, async || {
            Lab::curl(host, &url).await.0
        })
        .await;
    }

    // A worker's cable is pulled while requests flow through the two others, and plugged
    // back once the manager marked it down (chaos, "Hold under abuse"): both keep answering,
    // and every node answers once it is back. No HTTP request fails, and at most one
    // connection per load loop on published ports (the one it had open on node 2's task when
    // the cable went: nothing can save it); a new connection whose SYN went to node 2's task
    // is sent again to another. No agent of the two other nodes restarts meanwhile (one did
    // in some runs, and refused connections for about a second: meshgate's own update was
    // still going on, see above); if one does, its history and logs are printed.
    // (Node 2's own agent may be replaced when it comes back: only the others' count.)
    let agents = async || {
        let nodes = Lab::docker(1, &["service", "ps", "--format", "{{.Node}}", "meshgate_agent"]).await;
        nodes.lines().filter(|n| !n.ends_with("-n2")).count()
    };
    let agents_before = agents().await;
    let results = through(&both_ways(&[1, 3]), async || {
        Lab::cable(2, false).await;
        eventually("the manager marks node 2 down", CONVERGE, async || Lab::node_state(2).await == "down")
            .await;
        Lab::cable(2, true).await;
        eventually("node 2 is ready again", CONVERGE, async || Lab::node_state(2).await == "ready").await;
    })
    .await;
    for (target, answered, failed) in &results {
        eprintln!("node 2 cut off: {target}: {answered} answered, {} failed: {failed:?}", failed.len());
        assert!(*answered > 0, "{target} answered nothing while node 2 was cut off");
    }
    let restarted = agents().await != agents_before;
    if restarted {
        let update = ["service", "inspect", "--format", "{{json .UpdateStatus}}", "meshgate_agent"];
        eprintln!("the agents' update status: {}", Lab::docker(1, &update).await);
        let history = ["service", "ps", "--no-trunc", "--format", "{{.Node}} {{.CurrentState}} {{.Error}}"];
        eprintln!("{}", Lab::docker(1, &[&history[..], &["meshgate_agent"]].concat()).await);
        let exited =
            Lab::docker(1, &["ps", "-aq", "--filter", "status=exited", "--filter", "name=meshgate"]).await;
        for id in exited.lines() {
            let out = Lab::docker_output(1, &["logs", "--tail", "40", id]).await;
            eprintln!("exited agent {id} on node 1:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert!(!restarted, "no agent on nodes 1 and 3 restarted while node 2 was cut off (history above)");
    let l4_loops = results.iter().filter(|r| !r.0.starts_with("load.test")).count();
    assert_l4_failed_at_most(&results, "node 2's cable pulled", l4_loops).await;
    for (host, url) in both_ways(&[1, 2, 3]) {
        eventually(&format!("{url} answers with node 2 back"), CONVERGE, async || {
            Lab::curl(host, &url).await.0
        })
        .await;
    }

    // No manager reachable: the workers keep serving what they last knew, and say so.
    Lab::stop_engine(1).await;
    for i in 2..=3 {
        eventually(&format!("node {i} says no manager is reachable"), CONVERGE, async || {
            Lab::readyz(i).await.contains("stale: no manager reachable")
        })
        .await;
        let url = format!("http://{}/", Lab::addr(i));
        eventually(&format!("node {i} still serves load.test"), CONVERGE, async || {
            Lab::curl("load.test", &url).await.0
        })
        .await;
    }
}

/// The agents' stack with ACME against `pebble` (its root trusted through a secret) and
/// mesh-dns answering routed hosts with the nodes' addresses (pebble asks it where to
/// validate): the README's deployment plus a file of the test's, added with `-c`.
async fn agents_with_acme(pebble: &crate::acme::Pebble) {
    images_and_secret().await;
    let acme = format!(
        r#"version: "3.8"
services:
  agent:
    environment:
      MESHGATE_ACME_DIRECTORY: "{directory}"
      MESHGATE_ACME_TRUST_ROOTS: /run/secrets/pebble_listener_ca
      MESHGATE_DNS_ANSWER_ROUTED_HOSTS: "true"
    secrets: [pebble_listener_ca]
secrets:
  pebble_listener_ca:
    file: {trust}
"#,
        directory = pebble.directory(),
        trust = pebble.trust.display()
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), acme).unwrap();
    let deploy =
        format!("docker stack deploy -c helm-free-deploy/stack.yml -c {} meshgate", file.path().display());
    readme_line(1, &deploy).await;
    for i in 1..=3 {
        eventually(&format!("node {i}'s agent is ready"), CONVERGE, async || {
            Lab::readyz(i).await.contains("\"ready\": true")
        })
        .await;
    }
}

/// A service that asks for a certificate for `host`, created from manager `node`.
async fn secure_service(node: usize, name: &str, host: &str) {
    Lab::docker(
        node,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--stop-grace-period",
            "1s",
            "-e",
            &format!("VIRTUAL_HOST={host}"),
            "-e",
            &format!("LETSENCRYPT_HOST={host}"),
            TEST_IMAGE,
            "sh",
            "-c",
            HTTPD,
        ],
    )
    .await;
}

/// Whether node `i` serves `host` over HTTPS with a certificate pebble's `root` verifies.
async fn serves_verified(i: usize, host: &str, root: &std::path::Path) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--resolve", &format!("{host}:443:{}", Lab::addr(i))])
        .args(["--cacert", root.to_str().unwrap(), &format!("https://{host}/")])
        .output()
        .await
        .unwrap();
    out.status.success()
}

/// Certificates ordered by each node's agent, from its metrics.
async fn orders_by_node() -> Vec<u64> {
    let mut orders = Vec::new();
    for i in 1..=3 {
        orders.push(Lab::metric(i, "meshgate_acme_certificates_issued_total").await);
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_orders_certificates_and_ordering_moves_with_leadership() {
    let _lab = Lab::up(Shape::ThreeManagers).await;
    // The CA on the machine's side of the underlay. It validates at the address its DNS gives
    // for the name, and that DNS sends it to a node that does not order: node 3 while node 1
    // leads, so the challenge is answered by another node than the one that ordered.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut dns = pinned_dns(port, &[("secure.test", 3)]).await;
    let pebble = crate::acme::Pebble::start_on(
        crate::acme::PebbleSetup {
            http_port: 80,
            tls_port: 443,
            dns: format!("127.0.0.1:{port}").parse().unwrap(),
            validity_secs: 3600,
            eab: None,
            blocklist: Vec::new(),
        },
        Lab::MACHINE.parse().unwrap(),
    )
    .await;
    agents_with_acme(&pebble).await;
    let root = pebble.root().await;

    secure_service(1, "secure", "secure.test").await;
    for i in 1..=3 {
        eventually(
            &format!("node {i} serves secure.test with a verified certificate"),
            CONVERGE,
            async || serves_verified(i, "secure.test", &root).await,
        )
        .await;
    }
    assert_eq!(orders_by_node().await, [1, 0, 0], "the leader (node 1) ordered the one certificate");

    // The leader's engine stops: another manager leads, and its agent orders from now on;
    // the CA validates at the manager that does not lead.
    Lab::stop_engine(1).await;
    let mut leader = 1;
    eventually("another manager leads", CONVERGE, async || {
        let nodes =
            Lab::docker_output(2, &["node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}"]).await;
        let nodes = String::from_utf8_lossy(&nodes.stdout).into_owned();
        let now =
            nodes.lines().find_map(|l| l.strip_suffix(" Leader")?.strip_prefix("mglab-n")?.parse().ok());
        leader = now.unwrap_or(1);
        leader != 1
    })
    .await;
    drop(dns);
    dns = pinned_dns(port, &[("second.test", 5 - leader)]).await;
    secure_service(2, "second", "second.test").await;
    for i in 2..=3 {
        eventually(
            &format!("node {i} serves second.test with a verified certificate"),
            CONVERGE,
            async || serves_verified(i, "second.test", &root).await,
        )
        .await;
        assert!(
            serves_verified(i, "secure.test", &root).await,
            "node {i} still serves the first certificate"
        );
    }
    let orders = orders_by_node().await;
    assert_eq!(orders[leader - 1], 1, "the new leader, node {leader}, ordered second.test: {orders:?}");
    assert_eq!(orders[1] + orders[2], 1, "one certificate ordered since: {orders:?}");
    drop(dns);
}

/// A DNS server for the CA (dnsmasq, on the machine's loopback) that gives each name the
/// address of one node: where the CA sends its validation. Stopped on drop.
async fn pinned_dns(port: u16, names: &[(&str, usize)]) -> crate::harness::Dnsmasq {
    let records: Vec<String> =
        names.iter().map(|(name, node)| format!("--address=/{name}/{}", Lab::addr(*node))).collect();
    let dns = crate::harness::Dnsmasq::start(port, &records);
    let (name, node) = names[0];
    eventually("the CA's DNS answers", CONVERGE, async || {
        let out = Command::new("dig")
            .args(["+short", "-p", &port.to_string(), "@127.0.0.1", name])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == Lab::addr(node)
    })
    .await;
    dns
}

/// Rolling updates of a published service, over and over, with load on its port through all
/// three nodes: for finding what a rare failed connection was (`SOAK_ROUNDS`, default 5).
/// `cargo test -p integration soak -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak for diagnosis, minutes long"]
async fn soak_rolling_updates_of_a_published_service() {
    let _lab = Lab::up(Shape::OneManager).await;
    agents_with_mesh().await;
    load_service(&[]).await;
    let targets: Vec<_> = (1..=3).map(|i| ("any", format!("http://{}:8090/", Lab::addr(i)))).collect();
    for (host, url) in &targets {
        eventually(&format!("{url} answers"), CONVERGE, async || Lab::curl(host, url).await.0).await;
    }
    let rounds: usize = std::env::var("SOAK_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let (mut total, mut failed) = (0, 0);
    for round in 0..rounds {
        let results = through(&targets, async || {
            let generation = format!("GENERATION={round}");
            Lab::docker(1, &["service", "update", "--detach=false", "--env-add", &generation, "load"]).await;
        })
        .await;
        for (target, answered, failures) in &results {
            total += answered + failures.len();
            failed += failures.len();
            for f in failures {
                eprintln!("round {round}: {target}: {f}");
            }
        }
        eprintln!("round {round}: {failed} of {total} failed so far");
    }
    mesh_counters().await;
    assert_eq!(failed, 0, "{failed} of {total} new connections failed");
}
