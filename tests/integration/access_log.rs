//! The access log as an operator reads it: lines in a file, rotated with SIGUSR1, filtered,
//! off for a route, a WebSocket's line when it ends, and requests never held up by it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{curl, eventually, service, service_with, Backend, Binary, Mesh};

/// The file's lines so far.
fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Waits until `path` has `n` lines; returns them.
async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    eventually(&format!("{} has {n} lines", path.display()), Duration::from_secs(10), async || {
        lines(path).len() >= n
    })
    .await;
    lines(path)
}

#[tokio::test]
async fn json_lines_with_traefiks_fields_a_route_turned_off_and_a_new_file_after_sigusr1() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    let quiet =
        service("health", &["health.test"], "/", &[&web]).replace("protocol", "access_log = false\nprotocol");
    std::fs::write(&routes, service("web", &["app.test"], "/", &[&web]) + &quiet).unwrap();
    let log = dir.path().join("access.log");
    let log_arg = log.to_str().unwrap();
    let mut agent = Binary::with_routes_and(
        &routes,
        "200ms",
        &[
            "--log-access",
            log_arg,
            "--log-access-format",
            "json",
            "--log-access-headers",
            "x-request-id,authorization",
        ],
    );
    let (http, _) = agent.addresses();
    let url = |path: &str| format!("http://{http}{path}");

    let (ok, _) = curl(&[
        "-sf",
        "-H",
        "Host: app.test",
        "-H",
        "X-Request-Id: r-1",
        "-H",
        "Authorization: Bearer s3cret",
        "-A",
        "probe/1",
        &url("/hello?x=1"),
    ])
    .await;
    assert!(ok);
    curl(&["-s", "-H", "Host: health.test", &url("/")]).await;
    curl(&["-s", "-H", "Host: nowhere.test", &url("/")]).await;
    let first = wait_lines(&log, 2).await;
    assert_eq!(first.len(), 2, "one line per request, none for the route turned off: {first:?}");
    let line: serde_json::Value = serde_json::from_str(&first[0]).unwrap();
    assert_eq!(line["RequestHost"], "app.test");
    assert_eq!(line["RequestMethod"], "GET");
    assert_eq!(line["RequestPath"], "/hello?x=1");
    assert_eq!(line["RequestProtocol"], "HTTP/1.1");
    assert_eq!(line["DownstreamStatus"], 200);
    assert_eq!(line["OriginStatus"], 200);
    assert_eq!(line["ClientHost"], "127.0.0.1");
    assert_eq!(line["RouterName"], "app.test/");
    assert_eq!(line["ServiceName"], "web");
    assert_eq!(line["ServiceAddr"], web.addr.to_string());
    assert_eq!(line["entryPointName"], "web");
    assert_eq!(line["request_User-Agent"], "probe/1");
    assert_eq!(line["request_X-Request-Id"], "r-1");
    assert_eq!(line["request_Authorization"], "REDACTED", "credentials never reach the log");
    assert!(!first[0].contains("s3cret"));
    assert!(line["DownstreamContentSize"].as_u64().unwrap() > 0);
    assert!(line["Duration"].as_u64().unwrap() > 0);
    let unrouted: serde_json::Value = serde_json::from_str(&first[1]).unwrap();
    assert_eq!(
        (unrouted["DownstreamStatus"].as_u64(), unrouted["OriginStatus"].as_u64()),
        (Some(404), Some(0))
    );
    assert!(unrouted.get("RouterName").is_none());

    // logrotate: the file is moved away, SIGUSR1, and the next lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    agent.signal(10);
    agent.wait_for_log("reopening the access log", Duration::from_secs(5));
    curl(&["-sf", "-H", "Host: app.test", &url("/after")]).await;
    let after = wait_lines(&log, 1).await;
    assert!(after[0].contains("\"/after\""), "{after:?}");
    assert_eq!(lines(&rotated).len(), 2, "the old file keeps its lines");
}

#[tokio::test]
async fn combined_lines_filtered_by_status_and_a_websockets_line_when_it_ends() {
    let ws_addr = crate::harness::websocket_echo().await;
    let slow = Backend::start_with_delay("slow", Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let path = log.clone();
    let routes = service_with("ws", &["ws.test"], "/", "http", &[ws_addr.to_string()])
        + &service("slow", &["slow.test"], "/", &[&slow]);
    let mesh = Mesh::start_with(&routes, |c| {
        c.log.access = path.to_str().unwrap().into();
        c.log.access_status = vec!["101".into(), "400-499".into()];
    })
    .await;

    // A client that gives up before the answer: 499, as nginx and Traefik write it.
    let (gave_up, _) =
        curl(&["-s", "-m", "0.5", "-H", "Host: slow.test", &format!("http://{}/gone", mesh.agent.http_addr)])
            .await;
    assert!(!gave_up, "curl timed out");
    eventually("the abandoned request's line", Duration::from_secs(10), async || {
        lines(&log).iter().any(|l| l.contains("/gone"))
    })
    .await;
    let gone = lines(&log).into_iter().find(|l| l.contains("/gone")).unwrap();
    assert!(gone.contains("\"GET /gone HTTP/1.1\" 499 0"), "{gone}");

    // Filtered out: a 5xx (the WebSocket task answers plain HTTP with an error).
    let (status, _) = mesh.get("ws.test", "/plain").await;
    assert!(status.is_server_error() || status.is_client_error(), "{status}");
    let (status, _) = mesh.get("nowhere.test", "/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.test/chat", stream).await.unwrap();
    ws.send(Message::text("x".repeat(1000))).await.unwrap();
    ws.next().await.unwrap().unwrap();
    assert!(
        !lines(&log).iter().any(|l| l.contains("/chat")),
        "an upgraded connection's line is written when it ends: {:?}",
        lines(&log)
    );
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("the WebSocket's line", Duration::from_secs(10), async || {
        lines(&log).iter().any(|l| l.contains("/chat"))
    })
    .await;
    let all = lines(&log);
    let missing = all.iter().find(|l| l.contains("/missing")).expect("the 404 is kept by the filter");
    assert!(
        missing.starts_with("127.0.0.1 - - [") && missing.contains("] \"GET /missing HTTP/1.1\" 404 "),
        "combined format: {missing}"
    );
    assert!(!all.iter().any(|l| l.contains("/plain")), "filtered out: {all:?}");
    let chat = all.iter().find(|l| l.contains("/chat")).unwrap();
    let bytes: u64 = chat.split("\" 101 ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
    assert!(bytes >= 1000, "the WebSocket's line counts what the task sent: {chat}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_never_holds_a_request_up_lines_are_dropped_and_counted() {
    // A FIFO opened by a reader that never reads: the writer blocks once the pipe is full,
    // the queue fills, and requests go on being answered.
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let _reader = std::fs::File::options().read(true).write(true).open(&fifo).unwrap();
    let path = fifo.clone();
    let mesh = Mesh::start_with(&service("web", &["app.test"], "/", &[&web]), |c| {
        c.log.access = path.to_str().unwrap().into();
    })
    .await;
    let dropped = || mesh.agent.metrics.access_log_dropped.get();
    let mut answered = 0;
    while dropped() == 0 {
        for _ in 0..500 {
            let (status, _) = mesh.get("app.test", "/").await;
            assert_eq!(status, StatusCode::OK);
            answered += 1;
        }
        assert!(answered < 100_000, "no line was ever dropped");
    }
    assert!(web.served() >= answered);
}
