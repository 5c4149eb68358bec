//! The shipped Grafana board and Prometheus alert rules (`helm-free-deploy/monitoring/`),
//! checked with the real tools: `promtool` for the rules, and a real Prometheus scraping a
//! real agent (L4 mesh, HTTPS, mesh-dns on, traffic flowing) for every panel's query.

use std::process::Command;
use std::time::Duration;

use crate::harness::eventually;
use crate::mesh::{underlay, Agent, Namespaces, NODE_MESH};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm-free-deploy/monitoring");

#[test]
fn promtool_checks_the_rules_and_shows_every_alert_firing_and_silent() {
    let check =
        Command::new("promtool").args(["check", "rules", "alerts.yml"]).current_dir(DIR).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let test = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(DIR)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success() && out.contains("SUCCESS"), "{out}");
    // Every alert of the file has a firing case in the tests.
    let rules = std::fs::read_to_string(format!("{DIR}/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(format!("{DIR}/alerts.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.matches(&format!("alertname: {alert}\n")).count() >= 2, "{alert}: firing and silent");
    }
}

/// Each panel's queries, with the board's variables as Grafana substitutes them (all nodes;
/// a rate interval of a few scrapes).
fn panel_queries() -> Vec<(String, String)> {
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut out = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr =
                target["expr"].as_str().unwrap().replace("$__rate_interval", "30s").replace("$node", ".*");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    assert!(out.len() >= 12, "{out:?}");
    out
}

/// Runs `args` in `ns`; a failure is only one data point less.
fn quietly(ns: &str, args: &[&str]) {
    let _ = Command::new("ip").args(["netns", "exec", ns]).args(args).output();
}

#[test]
fn every_panel_of_the_board_has_data_from_a_real_prometheus_scraping_an_agent() {
    let mut nets = Namespaces::new();
    let (client, node) = underlay(&mut nets, "mgm");

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    crate::tls::Ca::new(&certs).issue(&certs, "board.test", &["board.test"]);
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[services]]\nname = \"web\"\ntasks = [{ address = \"127.0.0.1:18080\" }]\n[[services.http]]\nhosts = [\"board.test\"]\nport = 18080\n",
    )
    .unwrap();
    let agent = Agent::start(
        &node,
        &[
            &[
                "--routes-file",
                routes.to_str().unwrap(),
                "--whoami-listen",
                "127.0.0.1:18080",
                "--http-listen",
                "0.0.0.0:8080",
                "--tls-https-listen",
                "0.0.0.0:8443",
                "--tls-certs-dir",
                certs.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:19190",
                "--dns-listen",
                "127.0.0.1:5353",
            ][..],
            &NODE_MESH[..],
        ]
        .concat(),
    );
    agent.wait_for("L4 mesh attached");
    agent.wait_for("meshgate is serving");

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        "global: { scrape_interval: 1s, evaluation_interval: 1s }\nscrape_configs:\n  - job_name: meshgate\n    static_configs: [{ targets: ['127.0.0.1:19190'] }]\n",
    )
    .unwrap();
    let data = dir.path().join("tsdb");
    nets.spawn(
        &node,
        &[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:19191",
        ],
    );

    // Traffic of every kind the board shows, while it is checked: HTTP (routed and not),
    // HTTPS, DNS; its packets cross the uplink, where the mesh counts them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, client, node) = (stop.clone(), client.clone(), node.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for host in ["board.test", "nowhere.test"] {
                    quietly(
                        &client,
                        &["curl", "-s", "-H", &format!("Host: {host}"), "http://192.0.2.10:8080/"],
                    );
                }
                quietly(
                    &client,
                    &["curl", "-sk", "--resolve", "board.test:8443:192.0.2.10", "https://board.test:8443/"],
                );
                quietly(
                    &node,
                    &["dig", "+short", "+tries=1", "@127.0.0.1", "-p", "5353", "web.mesh.internal"],
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (title, expr) in panel_queries() {
        runtime.block_on(eventually(
            &format!("panel `{title}` has data: {expr}"),
            Duration::from_secs(60),
            async || {
                // (Refused until Prometheus listens.)
                let out = Command::new("ip")
                    .args(["netns", "exec", &node, "curl", "-s", "http://127.0.0.1:19191/api/v1/query"])
                    .args(["--data-urlencode", &format!("query={expr}")])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let answer: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                assert_ne!(answer["status"], "error", "Prometheus refuses `{expr}`: {out}");
                answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
            },
        ));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    agent.stop();
}
