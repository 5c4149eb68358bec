//! `whoami`: a tiny built-in demo backend, handy for trying meshgate and in tests.
//!
//! It answers with its name, the request line, the headers and the client address (like
//! traefik/whoami). `?wait=500ms` delays the answer, `/data?size=N` streams N bytes, and a
//! request with a body is read to the end and its size reported.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves `listener` until the returned future is dropped; dropping it also closes every
/// open connection (so a test can kill a "task" for real).
pub async fn serve(listener: TcpListener, name: String) {
    let name: Arc<str> = name.into();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            (stream, peer) = crate::net::accept(&listener, "whoami") => {
                let _ = stream.set_nodelay(true);
                let name = name.clone();
                let builder = builder.clone();
                connections.spawn(async move {
                    let svc = service_fn(move |req| answer(req, peer, name.clone()));
                    let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn query_param<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Answers one request (public so tests can wrap it with their own accounting).
pub async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: Arc<str>,
) -> Result<Response<Body>, Infallible> {
    if let Some(wait) = query_param(&req, "wait").and_then(|w| humantime::parse_duration(w).ok()) {
        tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
    }
    if req.uri().path() == "/data" {
        let size: u64 = query_param(&req, "size").and_then(|s| s.parse().ok()).unwrap_or(1024);
        return Ok(Response::new(stream_bytes(size)));
    }
    let mut text = String::with_capacity(512);
    let _ = writeln!(text, "Name: {name}");
    let _ = writeln!(text, "Hostname: {}", hostname());
    let _ = writeln!(text, "RemoteAddr: {peer}");
    let _ = writeln!(text, "{} {} {:?}", req.method(), req.uri(), req.version());
    for (k, v) in req.headers() {
        let _ = writeln!(text, "{k}: {}", String::from_utf8_lossy(v.as_bytes()));
    }
    let mut body = req.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => received += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if received > 0 {
        let _ = writeln!(text, "Received: {received} bytes");
    }
    Ok(Response::new(http_body_util::Full::new(Bytes::from(text)).boxed()))
}

/// `size` bytes in 64 KiB frames, produced only as fast as the client reads them.
fn stream_bytes(size: u64) -> Body {
    Filler { left: size }.boxed()
}

struct Filler {
    left: u64,
}

impl hyper::body::Body for Filler {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        static BLOCK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = self.left.min(BLOCK.len() as u64);
        self.left -= len;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&BLOCK[..len as usize])))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".into(), |h| h.trim().to_owned())
}
