//! See-it issue, the dashboard: the page of the admin listener, loaded in a real headless
//! browser (Debian's `chromium`, driven over the DevTools protocol), shows what the state
//! says (routes, tasks, certificates, readiness) and follows a container that starts without
//! being reloaded; beyond the node's loopback it is shown only to the users of
//! `admin.users_file` (curl from a network namespace), while metrics and health stay open.
//! A screenshot is kept in `target/test-artefacts/dashboard.png`.

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::docker::{until_served, Container};
use crate::harness::{curl, eventually, Mesh};
use crate::mesh::{run, Namespaces};
use crate::tls::Ca;

const WAIT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page, driven over the DevTools protocol. Its network stays
/// on this machine: no name but the agent's address resolves (`--host-resolver-rules`), and
/// background services are off.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Browser {
    /// `host`: the only host the browser may reach (the agent's admin address).
    async fn start(host: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox", // root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1400",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {host}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium (Debian's package; the test command installs it)");
        // It says where its DevTools endpoint listens on stderr.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://") {
                    return rest.split('/').next().unwrap().to_owned();
                }
            }
            panic!("chromium ended without a DevTools endpoint");
        })
        .await
        .expect("chromium starts within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ok, target) =
            curl(&["-sf", "-X", "PUT", &format!("http://{endpoint}/json/new?about:blank")]).await;
        assert!(ok, "a page from chromium: {target}");
        let target: serde_json::Value = serde_json::from_str(&target).unwrap();
        let ws = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (page, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
        let mut browser = Self { child, _profile: profile, page, next_id: 0 };
        browser.call("Network.enable", serde_json::json!({})).await;
        browser.call("Page.enable", serde_json::json!({})).await;
        browser
    }

    /// Sends a DevTools command; returns its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.page.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = self.page.next().await else {
                panic!("the DevTools connection ended")
            };
            let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Sends `header: value` with every request of the page.
    async fn always_send(&mut self, header: &str, value: &str) {
        self.call("Network.setExtraHTTPHeaders", serde_json::json!({"headers": {header: value}})).await;
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", serde_json::json!({"url": url})).await;
    }

    /// The page's text as a reader sees it.
    async fn text(&mut self) -> String {
        let r = self
            .call("Runtime.evaluate", serde_json::json!({"expression": "document.body ? document.body.innerText : ''", "returnByValue": true}))
            .await;
        r["result"]["value"].as_str().unwrap_or_default().to_owned()
    }

    async fn screenshot(&mut self, path: &std::path::Path) {
        let r = self.call("Page.captureScreenshot", serde_json::json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A namespace reaching this machine at 198.18.`net`.1 (which the admin listener binds),
/// itself at .2: a client of the admin endpoints that is not on the node's loopback.
fn client_namespace(nets: &mut Namespaces, net: u8) -> String {
    let client = nets.add("mgdash");
    let host_side = format!("mgd{net}-{}", std::process::id());
    run(&["ip", "link", "add", &host_side, "type", "veth", "peer", "name", "c0", "netns", &client]);
    run(&["ip", "addr", "add", &format!("198.18.{net}.1/24"), "dev", &host_side]);
    run(&["ip", "link", "set", &host_side, "up"]);
    run(&["ip", "-n", &client, "addr", "add", &format!("198.18.{net}.2/24"), "dev", "c0"]);
    run(&["ip", "-n", &client, "link", "set", "c0", "up"]);
    client
}

/// HTTP status of GET `url` from namespace `ns`, with `more` curl arguments.
fn status_from(ns: &str, url: &str, more: &[&str]) -> String {
    let mut args = vec!["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"];
    args.extend_from_slice(more);
    args.push(url);
    Namespaces::exec(ns, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_state_to_its_users_and_follows_a_container_that_starts() {
    let mut nets = Namespaces::new();
    let client = client_namespace(&mut nets, 77);
    let made =
        std::process::Command::new("htpasswd").args(["-nbB", "ops", "s3cret"]).output().expect("htpasswd");
    let users = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(users.path(), &made.stdout).unwrap();
    let certs = tempfile::tempdir().unwrap();
    // For a name the containers do not use: theirs stay on plain HTTP (no redirect).
    Ca::new(certs.path()).issue(certs.path(), "shop.dash.test", &["shop.dash.test", "www.shop.dash.test"]);
    let mesh = Mesh::start_docker(|c| {
        c.admin.listen = "198.18.77.1:0".parse().unwrap();
        c.admin.users_file = Some(users.path().to_owned());
        c.tls.https_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls.certs_dir = Some(certs.path().to_owned());
        // Other tests' containers on this engine may ask for certificates: never a real CA.
        c.acme.enabled = false;
    })
    .await;
    let first = Container::run("dash1", &["-e", "VIRTUAL_HOST=one.dash.test"], 80).await;
    until_served(&mesh, "one.dash.test", "/", &first.id).await;

    // Beyond loopback: health and metrics open; the dashboard and the state to users only.
    let admin = |path: &str| mesh.admin_url(path);
    assert_eq!(status_from(&client, &admin("/healthz"), &[]), "200");
    assert_eq!(status_from(&client, &admin("/metrics"), &[]), "200");
    for path in ["/", "/api/state"] {
        assert_eq!(status_from(&client, &admin(path), &[]), "401", "{path} without credentials");
        assert_eq!(status_from(&client, &admin(path), &["-u", "ops:wrong"]), "401", "{path}, wrong password");
        assert_eq!(status_from(&client, &admin(path), &["-u", "ops:s3cret"]), "200", "{path} as ops");
    }

    // The page in a browser: what the state says is on it.
    let mut browser = Browser::start(&mesh.agent.admin_addr.ip().to_string()).await;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("ops:s3cret"));
    browser.always_send("Authorization", &basic).await;
    browser.navigate(&admin("/")).await;
    let address = |c: &Container| {
        let ip = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &c.id])
            .output()
            .unwrap();
        String::from_utf8(ip.stdout).unwrap().trim().to_owned()
    };
    let first_address = address(&first);
    let mut seen = String::new();
    eventually("the dashboard shows the route, its task, the certificate and readiness", WAIT, async || {
        seen = browser.text().await;
        seen.contains("one.dash.test")
            && seen.contains(&first_address)
            && seen.contains("www.shop.dash.test")
            && seen.contains("files")
            && seen.contains("ready")
    })
    .await;
    assert!(!seen.contains("two.dash.test"), "{seen}");

    // A container starts: the page shows it by itself, not reloaded.
    let second = Container::run("dash2", &["-e", "VIRTUAL_HOST=two.dash.test"], 80).await;
    let second_address = address(&second);
    eventually("the dashboard shows the new container without a reload", WAIT, async || {
        let text = browser.text().await;
        text.contains("two.dash.test") && text.contains(&second_address)
    })
    .await;
    let loads = browser
        .call("Runtime.evaluate", serde_json::json!({"expression": "performance.getEntriesByType('navigation').length", "returnByValue": true}))
        .await;
    assert_eq!(loads["result"]["value"], 1, "the page was loaded once");
    let artefact =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artefacts/dashboard.png");
    browser.screenshot(&artefact).await;
    assert!(std::fs::metadata(&artefact).unwrap().len() > 10_000, "a screenshot with something on it");
}

/// Without `admin.users_file`, nobody beyond the node's loopback sees the dashboard or the
/// state (refused, not asked for credentials), while the node itself does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_users_the_dashboard_is_the_nodes_own() {
    let mut nets = Namespaces::new();
    let client = client_namespace(&mut nets, 78);
    let mesh = Mesh::start_with("", |c| c.admin.listen = "0.0.0.0:0".parse().unwrap()).await;
    let port = mesh.agent.admin_addr.port();
    let from_client = |path: &str| status_from(&client, &format!("http://198.18.78.1:{port}{path}"), &[]);
    assert_eq!(from_client("/"), "403");
    assert_eq!(from_client("/api/state"), "403");
    assert_eq!(from_client("/metrics"), "200");
    assert_eq!(from_client("/readyz"), "200");
    let (ok, page) = curl(&["-sf", &format!("http://127.0.0.1:{port}/")]).await;
    assert!(ok && page.contains("<title>meshgate</title>"), "{page}");
}
