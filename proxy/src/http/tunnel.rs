//! An upgraded connection (WebSocket and the like): the client's and the task's byte streams
//! joined, until either end closes or nothing moves either way for
//! `proxy.tunnel_idle_timeout` (a forgotten tunnel must not hold a connection forever). Its
//! bytes go to the route's metrics and its access log line when it ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::access_log::Pending;
use super::endpoint::Endpoint;
use super::router::Route;

/// Joins the client's and the task's upgraded connections once both are ready, in a task of
/// its own.
pub fn spawn(
    (client, upstream): (hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade),
    route: Arc<Route>,
    endpoint: Arc<Endpoint>,
    line: Option<Pending>,
    idle: Duration,
) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(route = %route.name, task = %endpoint.task, error = %e, "upgrade did not complete");
                if let Some(line) = line {
                    line.finish();
                }
                return;
            }
        };
        let activity = Arc::new(Activity { origin: Instant::now(), last_ms: AtomicU64::new(0) });
        let mut client = Watched { inner: TokioIo::new(client), read: 0, activity: activity.clone() };
        let mut upstream = Watched { inner: TokioIo::new(upstream), read: 0, activity: activity.clone() };
        tokio::select! {
            done = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = done {
                    tracing::debug!(route = %route.name, task = %endpoint.task, error = %e, "upgraded connection ended with an error");
                }
            }
            () = activity.idle_for(idle) => {
                tracing::debug!(route = %route.name, task = %endpoint.task, ?idle, "upgraded connection idle: closed");
            }
        }
        // What the client sent is what the task read from it, and the other way round.
        route.metrics.bytes(client.read, upstream.read);
        if let Some(mut line) = line {
            line.received(client.read);
            line.sent(upstream.read);
            line.finish();
        }
    });
}

/// When either side of a tunnel last sent something.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Returns once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// One side of a tunnel, counting what is read from it and noting when.
struct Watched<T> {
    inner: T,
    read: u64,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
