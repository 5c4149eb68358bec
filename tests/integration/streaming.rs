//! Bodies that stream both ways and connections that upgrade.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{service, service_with, Backend, Binary};

const HUNDRED_MB: u64 = 100 * 1024 * 1024;

#[tokio::test]
async fn websocket_echo_passes_through_both_ways() {
    // A real WebSocket server (tungstenite) as the task: it echoes every message.
    let ws_addr = crate::harness::websocket_echo().await;
    let mesh =
        crate::harness::Mesh::start(&service_with("ws", &["ws.test"], "/", "http", &[ws_addr.to_string()]))
            .await;

    let stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", stream)
        .await
        .expect("upgrade through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..50 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo.into_data().len(), big.len());
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_stream_up_and_down_without_being_buffered() {
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, service("web", &["big.test"], "/", &[&web])).unwrap();
    let mut agent = Binary::with_routes(&routes, "200ms");
    let (http, _) = agent.addresses();
    let rss_at_start = agent.peak_rss_kib();

    // Upload: 100 MB produced chunk by chunk as the proxy pulls them.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = (HUNDRED_MB / chunk.len() as u64) as usize;
    let body = StreamBody::new(futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    ));
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{http}/upload")).header("host", "big.test").body(body).unwrap();
    let resp = client.request(req).await.expect("upload");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains(&format!("Received: {HUNDRED_MB} bytes")), "the task got every byte: {text}");

    // Download: 100 MB, counted as it arrives.
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let req = Request::get(format!("http://{http}/data?size={HUNDRED_MB}"))
        .header("host", "big.test")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.expect("download");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, HUNDRED_MB);

    let grown_mib = (agent.peak_rss_kib() - rss_at_start) / 1024;
    assert!(
        grown_mib < 32,
        "the proxy's peak memory grew by {grown_mib} MiB moving 200 MB: bodies must stream, not buffer"
    );
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_its_limit_and_a_busy_one_stays() {
    // Issue 13, timeouts: a forgotten tunnel must not hold a connection forever.
    let ws_addr = crate::harness::websocket_echo().await;
    // Ten times the busy tunnel's cadence: a test slowed by a loaded machine still keeps it busy.
    let idle = Duration::from_millis(1000);
    let mesh = crate::harness::Mesh::start_with(
        &service_with("ws", &["ws.test"], "/", "http", &[ws_addr.to_string()]),
        |c| c.proxy.tunnel_idle_timeout = idle,
    )
    .await;
    let connect = async || {
        let stream = TcpStream::connect(mesh.agent.http_addr).await.unwrap();
        tokio_tungstenite::client_async("ws://ws.test/chat", stream).await.unwrap().0
    };

    // Busy: a message every 100 ms for three times the limit, each echoed.
    let mut busy = connect().await;
    let started = std::time::Instant::now();
    while started.elapsed() < 3 * idle {
        busy.send(Message::text("ping")).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), busy.next()).await.unwrap();
        assert!(matches!(echo, Some(Ok(Message::Text(_)))), "a busy tunnel stays open: {echo:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Idle: the proxy closes it once nothing moved for the limit. Timed from before the
    // connection opens: the proxy's clock starts later, with the upgrade (under load the
    // client may read the answer to its upgrade long after that).
    let started = std::time::Instant::now();
    let mut quiet = connect().await;
    let end =
        tokio::time::timeout(Duration::from_secs(10), quiet.next()).await.expect("the idle tunnel is closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(started.elapsed() >= idle, "closed only once idle for the limit");
}
