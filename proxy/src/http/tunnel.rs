//! An upgraded connection (WebSocket and the like): the client's and the task's byte streams
//! joined, until either end closes or nothing moves either way for
//! `proxy.tunnel_idle_timeout` (a forgotten tunnel must not hold a connection forever). Its
//! bytes go to the route's metrics and its access log line when it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;

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
        // Each side counts what is read from it and notes when.
        let (from_client, from_task) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let side = |io, count: Arc<AtomicU64>| {
            let activity = activity.clone();
            crate::net::OnRead::new(TokioIo::new(io), move |n: usize| {
                count.fetch_add(n as u64, Ordering::Relaxed);
                activity.touch();
            })
        };
        let mut client = side(client, from_client.clone());
        let mut upstream = side(upstream, from_task.clone());
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
        let (received, sent) = (from_client.load(Ordering::Relaxed), from_task.load(Ordering::Relaxed));
        route.metrics.bytes(received, sent);
        if let Some(mut line) = line {
            line.received(received);
            line.sent(sent);
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
