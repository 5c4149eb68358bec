//! Drop-in issue, item 5: cases ported from nginx-proxy's own test suite and documentation,
//! each naming the file and commit it comes from, run against the real engine with
//! `docker run` and checked with curl. nginx-proxy's `web` image answers `/port` with its
//! port; the test image answers with its container id, so "served by web1" is checked as
//! "answered with web1's id". (Traefik's documented label examples are in `middlewares.rs`,
//! each test citing the documentation page.)
//!
//! Known difference, kept on purpose: for a host no container claims, nginx-proxy answers
//! 503, meshgate 404 ("no route for host", docs/routes.md).

use std::time::Duration;

use crate::docker::Container;
use crate::harness::{curl, eventually, Mesh};

/// What a request must get.
enum Want {
    /// 200 from this container (by its tag in the case).
    From(&'static str),
    Status(&'static str),
}

struct Case {
    /// Where it comes from: nginx-proxy's repository, file and commit.
    source: &'static str,
    /// Containers: a tag, and `docker run` arguments.
    containers: &'static [(&'static str, &'static [&'static str])],
    /// Requests (`host`, `path`) and what they get.
    checks: &'static [(&'static str, &'static str, Want)],
}

const CASES: &[Case] = &[
    Case {
        source: "nginx-proxy/nginx-proxy test/test_multiple-hosts/test_multiple-hosts.{yml,py} @ 5db318e8",
        containers: &[("web", &["-e", "VIRTUAL_HOST=webA.nginx-proxy.tld,webB.nginx-proxy.tld"])],
        checks: &[
            ("webA.nginx-proxy.tld", "/", Want::From("web")),
            ("webB.nginx-proxy.tld", "/", Want::From("web")),
            ("unknown.nginx-proxy.tld", "/", Want::Status("404")),
        ],
    },
    Case {
        // Left out: its `web4.whatever.nginx-proxy.regexp-to-infinity-and-beyond` expects 503
        // although web4's own (unanchored) regex matches it, as nginx searches a regex.
        source: "nginx-proxy/nginx-proxy test/test_wildcard_host.{yml,py} @ 03117214",
        containers: &[
            ("web1", &["-e", "VIRTUAL_HOST=*.nginx-proxy.test"]),
            ("web2", &["-e", "VIRTUAL_HOST=test.nginx-proxy.*"]),
            ("web3", &["-e", "VIRTUAL_HOST=~^web3\\..*\\.nginx-proxy\\.regexp"]),
            ("web4", &["-e", "VIRTUAL_HOST=~^web4\\..*\\.nginx-proxy\\.regexp"]),
        ],
        checks: &[
            ("f00.nginx-proxy.test", "/", Want::From("web1")),
            ("bar.nginx-proxy.test", "/", Want::From("web1")),
            ("test.nginx-proxy.f00", "/", Want::From("web2")),
            ("test.nginx-proxy.bar", "/", Want::From("web2")),
            ("web3.123.nginx-proxy.regexp", "/", Want::From("web3")),
            ("web3.ABC.nginx-proxy.regexp", "/", Want::From("web3")),
            ("web3.123.ABC.nginx-proxy.regexp", "/", Want::From("web3")),
            ("web3.123-ABC.nginx-proxy.regexp", "/", Want::From("web3")),
            ("web3.whatever.nginx-proxy.regexp-to-infinity-and-beyond", "/", Want::From("web3")),
            ("web4.123.nginx-proxy.regexp", "/", Want::From("web4")),
            ("web4.ABC.nginx-proxy.regexp", "/", Want::From("web4")),
            ("web4.123.ABC.nginx-proxy.regexp", "/", Want::From("web4")),
            ("web4.whatever.nginx-proxy.regexp", "/", Want::From("web4")),
            ("unexpected.nginx-proxy.tld", "/", Want::Status("404")),
        ],
    },
    Case {
        source: "nginx-proxy/nginx-proxy test/test_virtual-path/test_virtual-paths.{yml,py} @ 4af15de9",
        containers: &[
            ("foo", &["-e", "VIRTUAL_HOST=foo.nginx-proxy.test"]),
            (
                "web1",
                &["-e", "VIRTUAL_HOST=nginx-proxy.test", "-e", "VIRTUAL_PATH=/web1/", "-e", "VIRTUAL_DEST=/"],
            ),
            (
                "web2",
                &["-e", "VIRTUAL_HOST=nginx-proxy.test", "-e", "VIRTUAL_PATH=/web2/", "-e", "VIRTUAL_DEST=/"],
            ),
            ("web3", &["-e", "VIRTUAL_HOST=nginx-proxy.test", "-e", "VIRTUAL_PATH=/"]),
        ],
        checks: &[
            ("nginx-proxy.test", "/web1/", Want::From("web1")),
            ("nginx-proxy.test", "/web2/", Want::From("web2")),
            ("nginx-proxy.test", "/", Want::From("web3")),
            ("foo.nginx-proxy.test", "/", Want::From("foo")),
            // No such page on web3, which has `/`: its own 404.
            ("nginx-proxy.test", "/foo", Want::Status("404")),
            ("bar.nginx-proxy.test", "/", Want::Status("404")),
        ],
    },
    Case {
        // "It is also possible to specify multiple paths with regex locations like
        // `VIRTUAL_PATH=~^/(app1|alternative1)/`": a regex location wins over a prefix one
        // (nginx), here over `/app/` too.
        source: "nginx-proxy/nginx-proxy docs/README.md, \"Path-based Routing\" @ 023a3d17",
        containers: &[
            ("regex", &["-e", "VIRTUAL_HOST=paths.nginx-proxy.test", "-e", "VIRTUAL_PATH=~^/(app|t)/"]),
            ("prefix", &["-e", "VIRTUAL_HOST=paths.nginx-proxy.test", "-e", "VIRTUAL_PATH=/app/"]),
            ("root", &["-e", "VIRTUAL_HOST=paths.nginx-proxy.test", "-e", "VIRTUAL_PATH=/"]),
        ],
        checks: &[
            ("paths.nginx-proxy.test", "/app/", Want::From("regex")),
            ("paths.nginx-proxy.test", "/t/", Want::From("regex")),
            ("paths.nginx-proxy.test", "/", Want::From("root")),
        ],
    },
];

/// The answer to `host` + `path`: its status, and its body.
async fn get(mesh: &Mesh, host: &str, path: &str) -> (String, String) {
    let url = mesh.url(path);
    let (_, out) = curl(&["-s", "-w", "\n%{http_code}", "-H", &format!("Host: {host}"), &url]).await;
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.to_owned(), body.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxys_own_cases_behave_the_same() {
    let mesh = Mesh::start_docker(|_| {}).await;
    for case in CASES {
        let mut running = Vec::new();
        for (tag, args) in case.containers {
            running.push((*tag, Container::run(tag, args, 80).await));
        }
        let id = |tag: &str| running.iter().find(|(t, _)| *t == tag).map(|(_, c)| c.id.clone()).unwrap();
        for (host, path, want) in case.checks {
            let expected = match want {
                Want::From(tag) => ("200".to_owned(), id(tag)),
                Want::Status(code) => ((*code).to_owned(), String::new()),
            };
            let mut last = (String::new(), String::new());
            eventually(&format!("{}: {host}{path}", case.source), Duration::from_secs(30), async || {
                last = get(&mesh, host, path).await;
                last.0 == expected.0 && (expected.1.is_empty() || last.1 == expected.1)
            })
            .await;
        }
        // The case's containers go, and their routes with them, before the next case.
        drop(running);
        for (host, path, _) in case.checks {
            eventually(&format!("{host} unrouted"), Duration::from_secs(30), async || {
                get(&mesh, host, path).await.0 == "404"
            })
            .await;
        }
    }
}

/// nginx-proxy's `VIRTUAL_HOST_MULTIPORTS`, the two examples of its documentation
/// (docs/README.md, "Multiple ports" @ 023a3d17), in YAML and in JSON, on a container serving
/// ports 80, 8000 and 9000 (each answers with its port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_host_multiports_as_nginx_proxy_documents_it() {
    let mesh = Mesh::start_docker(|_| {}).await;
    let serve = "for p in 80 8000 9000; do mkdir -p /p$p && echo port $p > /p$p/index.html; done \
                 && httpd -p 8000 -h /p8000 && httpd -p 9000 -h /p9000 && exec httpd -f -p 80 -h /p80";
    let yaml = "VIRTUAL_HOST_MULTIPORTS=www.example.org:\nservice1.example.org:\n  \"/\":\n    port: 8000\nservice2.example.org:\n  \"/\":\n    port: 9000\n";
    let json = r#"VIRTUAL_HOST_MULTIPORTS={"paths.example.org": {"/": {}, "/service1/": {"port": 8000, "dest": "/"}, "/service2/": {"port": 9000, "dest": "/"}}}"#;
    let _hosts = Container::run_script("multi-yaml", &["-e", yaml], serve).await;
    let _paths = Container::run_script("multi-json", &["-e", json], serve).await;
    for (host, path, want) in [
        ("www.example.org", "/", "port 80"),
        ("service1.example.org", "/", "port 8000"),
        ("service2.example.org", "/", "port 9000"),
        ("paths.example.org", "/", "port 80"),
        ("paths.example.org", "/service1/", "port 8000"),
        ("paths.example.org", "/service2/", "port 9000"),
    ] {
        eventually(&format!("{host}{path} answers {want}"), Duration::from_secs(30), async || {
            get(&mesh, host, path).await == ("200".to_owned(), want.to_owned())
        })
        .await;
    }
}

/// nginx-proxy's htpasswd cases (test/test_htpasswd/test_htpasswd-virtual-host,
/// -virtual-path and -regex-virtual-host .{yml,py} @ 4af15de9; the files named as its
/// test/test_htpasswd/htpasswd/ directory names them @ 24592e39): a file per host, per host
/// and path (`<host>_<sha1 of the path>`), and per regex (the sha1 of `~regex`), each with
/// nginx-proxy's realm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxys_htpasswd_cases_behave_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let user = |name: &str| {
        let made = std::process::Command::new("htpasswd").args(["-nbB", name, "password"]).output().unwrap();
        String::from_utf8(made.stdout).unwrap()
    };
    let regex = r"~^regex.*\.nginx-proxy\.example$";
    let regex_file = {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, regex.as_bytes());
        digest.as_ref().iter().fold(String::new(), |mut hex, b| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
            hex
        })
    };
    std::fs::write(dir.path().join("htpasswd.nginx-proxy.tld"), user("vhost")).unwrap();
    std::fs::write(
        dir.path().join("htpasswd.nginx-proxy.tld_8d960560c82f4e6c8b1b0f03eb30a1afd00e5696"),
        user("vpath"),
    )
    .unwrap();
    std::fs::write(dir.path().join(regex_file), user("vhost")).unwrap();
    let htpasswd = dir.path().to_owned();
    let mesh = Mesh::start_docker(|c| c.docker.htpasswd_dir = Some(htpasswd)).await;
    let _host = Container::run("vhost", &["-e", "VIRTUAL_HOST=htpasswd.nginx-proxy.tld"], 80).await;
    let _path = Container::run(
        "vpath",
        &["-e", "VIRTUAL_HOST=htpasswd.nginx-proxy.tld", "-e", "VIRTUAL_PATH=/foo/", "-e", "VIRTUAL_DEST=/"],
        80,
    )
    .await;
    let env = format!("VIRTUAL_HOST={regex}");
    let _regex = Container::run("regex", &["-e", &env], 80).await;
    for (host, path, realm, who) in [
        ("htpasswd.nginx-proxy.tld", "/", "Restricted htpasswd.nginx-proxy.tld", "vhost"),
        ("htpasswd.nginx-proxy.tld", "/foo/", "Restricted htpasswd.nginx-proxy.tld/foo/", "vpath"),
        ("regex.htpasswd.nginx-proxy.example", "/", "Restricted access", "vhost"),
    ] {
        let url = mesh.url(path);
        let h = format!("Host: {host}");
        let challenge = format!("www-authenticate: basic realm=\"{}\"", realm.to_ascii_lowercase());
        eventually(&format!("{host}{path} asks for {who}"), Duration::from_secs(30), async || {
            let (_, head) = curl(&["-si", "-H", &h, &url]).await;
            let head = head.to_ascii_lowercase();
            head.starts_with("http/1.1 401") && head.contains(&challenge)
        })
        .await;
        let credentials = format!("{who}:password");
        let (_, code) =
            curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", &credentials, "-H", &h, &url]).await;
        assert_eq!(code, "200", "{host}{path} lets {who} in");
    }
}
