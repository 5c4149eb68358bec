//! Behind the users' own load balancer balancing TCP: the PROXY protocol (v1 and v2) from
//! HAProxy (`send-proxy`, `send-proxy-v2`) and raw clients, believed only from
//! `proxy.proxy_protocol_networks`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{curl, eventually, header_of, service, Backend, Mesh};

/// A TCP connection to `to` from the local address `from` (the loopback has them all).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `bytes` from `from` and reads the answer until the connection closes.
async fn raw(from: &str, to: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = connect_from(from, to).await;
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// HAProxy, killed when dropped (its config's directory with it).
struct Haproxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy in TCP mode on two ports, sending PROXY v1 on the first and v2 on the second to
/// `upstream`.
async fn haproxy(ports: (u16, u16), upstream: SocketAddr) -> Haproxy {
    run_haproxy(
        &format!(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             listen v1\n  bind 127.0.0.1:{}\n  server m {upstream} send-proxy\n\
             listen v2\n  bind 127.0.0.1:{}\n  server m {upstream} send-proxy-v2\n",
            ports.0, ports.1
        ),
        ports,
    )
    .await
}

/// HAProxy as two tasks that want the PROXY protocol (`accept-proxy`), answering each request
/// with the client address the header named.
async fn proxy_protocol_tasks(ports: (u16, u16)) -> Haproxy {
    let frontend = |name: &str, port: u16| {
        format!("frontend {name}\n  bind 127.0.0.1:{port} accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src]\"\n")
    };
    run_haproxy(
        &format!(
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n{}{}",
            frontend("v1", ports.0),
            frontend("v2", ports.1)
        ),
        ports,
    )
    .await
}

/// HAProxy with `config`, once it listens on `ports`.
async fn run_haproxy(config_text: &str, ports: (u16, u16)) -> Haproxy {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, config_text).unwrap();
    let child = std::process::Command::new("haproxy")
        .args(["-db", "-f", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (the test command installs it)");
    for port in [ports.0, ports.1] {
        eventually(&format!("haproxy listens on {port}"), Duration::from_secs(10), async || {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }
    Haproxy { child, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_a_trusted_balancer_names_is_the_client_and_nobody_else_can_name_one() {
    let web = Backend::start("web").await;
    // The balancer is 127.0.0.1; clients come from 127.0.0.2 and 127.0.0.3.
    let mesh = Mesh::start_with(&service("web", &["app.test"], "/", &[&web]), |c| {
        c.proxy.proxy_protocol_networks = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let agent = mesh.agent.http_addr;
    let ports = (crate::acme::free_port(), crate::acme::free_port());
    let _haproxy = haproxy(ports, agent).await;

    // Through HAProxy, v1 and v2: the task sees the client's address, not the balancer's.
    for port in [ports.0, ports.1] {
        let (ok, body) = curl(&[
            "-sS",
            "--interface",
            "127.0.0.2",
            "-H",
            "Host: app.test",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .await;
        assert!(ok, "{body}");
        assert_eq!(header_of(&body, "x-forwarded-for"), Some("127.0.0.2"), "port {port}: {body}");
        assert_eq!(header_of(&body, "x-real-ip"), Some("127.0.0.2"), "{body}");
    }

    // A raw v1 header from the balancer's address names any client.
    let answer = raw(
        "127.0.0.1",
        agent,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header_of(&answer, "x-forwarded-for"), Some("203.0.113.9"), "{answer}");
    // Its own health checks come without a header: served as themselves.
    let answer =
        raw("127.0.0.1", agent, b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(header_of(&answer, "x-forwarded-for"), Some("127.0.0.1"), "{answer}");
    // A malformed header closes the connection, unanswered.
    let answer =
        raw("127.0.0.1", agent, b"PROXY TCP4 203.0.113.9\r\nGET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(answer, "", "a bad PROXY header is not served");

    // Anyone else naming a client is refused: a PROXY line is no request.
    let before = web.served();
    let forged = raw(
        "127.0.0.3",
        agent,
        b"PROXY TCP4 6.6.6.6 127.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(forged.is_empty() || forged.starts_with("HTTP/1.1 400"), "{forged}");
    assert!(!forged.contains("6.6.6.6"), "{forged}");
    assert_eq!(web.served(), before, "nothing of it reached the task");
}

/// An allow list judges the client a trusted balancer names, not the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_judges_the_client_the_balancer_names() {
    let web = Backend::start("web").await;
    let routes = service("web", &["office.test"], "/", &[&web])
        .replace("protocol = ", "allow_from = [\"127.0.0.0/8\"]\nprotocol = ");
    let mesh = Mesh::start_with(&routes, |c| {
        c.proxy.proxy_protocol_networks = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let agent = mesh.agent.http_addr;
    let request = b"GET / HTTP/1.1\r\nHost: office.test\r\nConnection: close\r\n\r\n";
    let near =
        raw("127.0.0.1", agent, &[&b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 80\r\n"[..], request].concat())
            .await;
    assert!(near.starts_with("HTTP/1.1 200"), "{near}");
    let far =
        raw("127.0.0.1", agent, &[&b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n"[..], request].concat())
            .await;
    assert!(far.starts_with("HTTP/1.1 403"), "{far}");
    assert_eq!(web.served(), 1, "the far client never reached the task");
}

/// Drop-in issue, item 7: tasks that want the PROXY protocol (HAProxy's `accept-proxy`) get a
/// header naming the client, v1 or v2, on a connection of that client's only: a second
/// client right after the first is named itself, never the first (pooled connections
/// would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_want_the_proxy_protocol_are_told_each_client() {
    let ports = (crate::acme::free_port(), crate::acme::free_port());
    let _tasks = proxy_protocol_tasks(ports).await;
    let route = |name: &str, port: u16, version: &str| {
        crate::harness::service_with(
            name,
            &[&format!("{name}.test")],
            "/",
            "http",
            &[format!("127.0.0.1:{port}")],
        )
        .replace("protocol = \"http\"", &format!("protocol = \"http\"\nproxy_protocol = \"{version}\""))
    };
    let routes = format!("{}{}", route("one", ports.0, "v1"), route("two", ports.1, "v2"));
    let mesh = Mesh::start(&routes).await;
    let url = mesh.url("/");
    for host in ["one.test", "two.test"] {
        for client in ["127.0.0.2", "127.0.0.3", "127.0.0.2"] {
            let (ok, body) =
                curl(&["-sS", "--interface", client, "-H", &format!("Host: {host}"), &url]).await;
            assert!(ok && body.trim() == client, "{host} from {client}: {body}");
        }
    }
}
