//! Timeouts and limits on the client side: slowloris, idle keep-alive, header limits.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{service, Backend, Mesh};

/// Reads until the peer closes; returns what was read and when it closed.
async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> (String, Instant) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), Instant::now()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after {deadline:?}; read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_even_when_it_trickles() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start_with(&service("web", &["s.test"], "/", &[&web]), |c| {
        c.proxy.request_head_timeout = Duration::from_millis(400);
    })
    .await;
    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    let started = Instant::now();
    // One header line every 100 ms: each write is "activity", but the head never completes.
    let mut closed = false;
    for i in 0..40 {
        if stream.write_all(format!("GET / HTTP/1.1\r\nX-{i}: y\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickling request head must be cut off");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off near the 400ms head timeout, not at the end of the trickle"
    );
    assert_eq!(web.served(), 0);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_busy_ones_are_not() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start_with(&service("web", &["i.test"], "/", &[&web]), |c| {
        c.proxy.idle_timeout = Duration::from_millis(300);
        c.proxy.request_head_timeout = Duration::from_secs(5);
    })
    .await;
    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    // A response that takes longer than the idle timeout is not cut: the connection is busy.
    stream.write_all(b"GET /?wait=700ms HTTP/1.1\r\nHost: i.test\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "busy connection survives the idle timeout"
    );
    // Then, idle, it is closed.
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(!rest.contains("HTTP/1.1"), "nothing else was sent: {rest}");
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start_with(&service("web", &["l.test"], "/", &[&web]), |c| {
        c.proxy.max_header_bytes = 8192;
        c.proxy.max_headers = 20;
    })
    .await;
    let big = format!("GET / HTTP/1.1\r\nHost: l.test\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let headers = |n: usize| "X-Filler: v\r\n".repeat(n);
    let many = format!("GET / HTTP/1.1\r\nHost: l.test\r\n{}\r\n", headers(30));
    let fine = format!("GET / HTTP/1.1\r\nHost: l.test\r\nConnection: close\r\n{}\r\n", headers(10));
    for (what, request, status) in
        [("a 20 kB header", &big, "431"), ("30 headers", &many, "431"), ("10 headers", &fine, "200")]
    {
        let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: expected {status}, got {answer:?}"
        );
    }
    assert_eq!(web.served(), 1, "only the acceptable request reached the task");
}

/// Drop-in issue, per-host limits: a route's own body limit (`max_body`) and the agent's
/// default (`proxy.max_body_bytes`) answer 413, whether the length is declared or the body
/// streams in chunks past it; a body within the limit goes through.
#[tokio::test]
async fn request_bodies_past_the_routes_limit_get_413() {
    let web = Backend::start("web").await;
    let routes = service("upload", &["small.test"], "/", &[&web])
        .replace("protocol = ", "max_body = \"1k\"\nprotocol = ")
        + &service("other", &["default.test"], "/", &[&web]);
    let mesh = Mesh::start_with(&routes, |c| c.proxy.max_body_bytes = 4096).await;
    let post = async |host: &str, len: usize, chunked: bool| {
        let body = "x".repeat(len);
        let framing = if chunked {
            format!("Transfer-Encoding: chunked\r\n\r\n{len:x}\r\n{body}\r\n0\r\n\r\n")
        } else {
            format!("Content-Length: {len}\r\n\r\n{body}")
        };
        let req = format!("POST /up HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{framing}");
        let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        stream.write_all(req.as_bytes()).await.unwrap();
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        answer.lines().next().unwrap_or_default().to_owned()
    };
    let served = web.served();
    assert!(
        post("small.test", 2000, false).await.starts_with("HTTP/1.1 413"),
        "declared, past the route's 1k"
    );
    assert_eq!(web.served(), served, "refused before anything went to the task");
    assert!(post("small.test", 2000, true).await.starts_with("HTTP/1.1 413"), "chunked, past the route's 1k");
    assert!(post("small.test", 1000, false).await.starts_with("HTTP/1.1 200"), "within the route's limit");
    assert!(post("default.test", 3000, true).await.starts_with("HTTP/1.1 200"), "within the agent's 4k");
    assert!(post("default.test", 5000, false).await.starts_with("HTTP/1.1 413"), "past the agent's 4k");
}

/// Drop-in issue, per-host limits: a route's own `response_timeout` gives its slow task
/// the time the agent's default does not.
#[tokio::test]
async fn a_routes_response_timeout_overrides_the_agents() {
    let slow = Backend::start_with_delay("slow", Duration::from_millis(800)).await;
    let routes = service("report", &["report.test"], "/", &[&slow])
        .replace("protocol = ", "response_timeout = \"5s\"\nprotocol = ")
        + &service("other", &["other.test"], "/", &[&slow]);
    let mesh =
        Mesh::start_with(&routes, |c| c.proxy.upstream_response_timeout = Duration::from_millis(300)).await;
    assert_eq!(mesh.get("other.test", "/").await.0, http::StatusCode::GATEWAY_TIMEOUT, "the agent's 300 ms");
    assert_eq!(mesh.get("report.test", "/").await.0, http::StatusCode::OK, "the route's 5 s");
}

/// A task on loopback that reads each request's whole chunked body, then answers 200 with
/// the number of `x` it read (`deaf`: it reads the head, then nothing more, holding
/// the connection).
async fn body_reader(deaf: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if deaf && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        // Holds the connection and reads no more of it.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    if seen.ends_with(b"0\r\n\r\n") {
                        break;
                    }
                }
                let head = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let body = String::from_utf8_lossy(&seen[head..]).matches('x').count();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.to_string().len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// Drop-in issue, item 3 (timeouts, as nginx's): a route's response timeout counts from the
/// end of the request body (nginx's `proxy_read_timeout`), so an upload that takes longer
/// than it is not cut; a task that stops taking a request body is cut by the send timeout
/// (`send_timeout`, nginx's `proxy_send_timeout`): 504, where only the response timeout
/// (a minute here) would have held the client that long.
#[tokio::test]
async fn a_long_upload_is_not_cut_by_the_response_timeout_and_a_task_that_stops_reading_is_by_the_send_timeout(
) {
    let (reader, deaf) = (body_reader(false).await, body_reader(true).await);
    let routes = crate::harness::service_with("upload", &["upload.test"], "/", "http", &[reader.to_string()])
        + &crate::harness::service_with("deaf", &["deaf.test"], "/", "http", &[deaf.to_string()])
            .replace("protocol = ", "response_timeout = \"60s\"\nsend_timeout = \"1s\"\nprotocol = ");
    let mesh =
        Mesh::start_with(&routes, |c| c.proxy.upstream_response_timeout = Duration::from_secs(1)).await;

    // 8 KiB in 8 chunks, one every 400 ms: 3.2 s of upload against a 1 s response timeout.
    let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    stream
        .write_all(b"POST /up HTTP/1.1\r\nHost: upload.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..8 {
        stream
            .write_all(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes())
            .await
            .expect("the agent keeps taking the upload");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the slow upload went through: {answer}");
    assert!(answer.contains("\r\n\r\n8192"), "the task read all of it: {answer}");

    // 64 MiB to a task that reads none of it: cut after its route's 1 s send timeout.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 64 << 20]).unwrap();
    let (_, code) = crate::harness::curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: deaf.test",
        "-H",
        "Expect:",
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("http://{}/up", mesh.agent.http_addr),
    ])
    .await;
    assert_eq!(code, "504", "the task stopped reading: its send timeout answers");
}

/// A task that notes when each request head arrives (in `events`), reads the body (its
/// `Content-Length`, or chunks to the last), and answers 200 with the request head it got.
async fn length_reader(events: std::sync::Arc<std::sync::Mutex<Vec<String>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                events.lock().unwrap().push("the task got the request head".into());
                let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let chunked = head.contains("transfer-encoding: chunked");
                while (chunked && !seen.ends_with(b"0\r\n\r\n")) || (!chunked && seen.len() < end + length) {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// Drop-in issue, item 3: request buffering per route (`request_buffering`, nginx's
/// `proxy_request_buffering on`; a Traefik `buffering` middleware too): a body the client
/// sends slowly reaches the task only once it is complete, with its length declared; with
/// buffering off (meshgate's default, as Traefik) it streams as it comes.
#[tokio::test]
async fn request_buffering_holds_a_slow_body_until_it_is_complete() {
    let events: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
    let task = length_reader(events.clone()).await.to_string();
    let routes = crate::harness::service_with(
        "buffered",
        &["buffered.test"],
        "/",
        "http",
        std::slice::from_ref(&task),
    )
    .replace("protocol = ", "request_buffering = true\nprotocol = ")
        + &crate::harness::service_with(
            "traefik",
            &["traefik.test"],
            "/",
            "http",
            std::slice::from_ref(&task),
        )
        .replace(
            "protocol = ",
            "middlewares = [{ kind = \"buffering\", max_request_body = 100000 }]\nprotocol = ",
        )
        + &crate::harness::service_with("streamed", &["streamed.test"], "/", "http", &[task]);
    let mesh = Mesh::start(&routes).await;
    // The same routes, with a buffer smaller than the body: its first part is read ahead,
    // the rest streams.
    let small = Mesh::start_with(&routes, |c| c.proxy.request_buffer_bytes = 2048).await;
    let upload = async |mesh: &Mesh, host: &str| {
        events.lock().unwrap().clear();
        let mut stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        let head = format!(
            "POST /up HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..5 {
            stream.write_all(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        events.lock().unwrap().push("the client sends its last chunk".into());
        stream.write_all(b"0\r\n\r\n").await.unwrap();
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        (answer, events.lock().unwrap().clone())
    };
    for host in ["buffered.test", "traefik.test"] {
        let (answer, order) = upload(&mesh, host).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
        assert!(
            answer.contains("content-length: 5120"),
            "{host}: the task got the length declared: {answer}"
        );
        assert_eq!(
            order[0], "the client sends its last chunk",
            "{host}: nothing before the body was complete"
        );
    }
    let (answer, order) = upload(&mesh, "streamed.test").await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("transfer-encoding: chunked"), "{answer}");
    assert_eq!(order[0], "the task got the request head", "streamed: the task had it while the client sent");
    let (answer, order) = upload(&small, "buffered.test").await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("transfer-encoding: chunked"), "{answer}");
    assert_eq!(order[0], "the task got the request head", "past the buffer, the rest streams");
}
