//! The response body the proxy hands to hyper: a streamed upstream body or a short local one,
//! plus a guard that ends the request's accounting when hyper drops the body (fully sent or
//! aborted). Streaming keeps back-pressure end to end: a frame is pulled from the task only
//! when the client side is ready for it.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntGauge;

use super::access_log::Pending;
use super::endpoint::Endpoint;
use super::server::ConnActivity;
use crate::metrics::RouteMetrics;

enum Kind {
    Upstream(Idle),
    Local(Option<Bytes>),
}

/// A peer's body that must move: a frame at least every `limit`, else it ends with
/// [`Stalled`] (a task stuck in the middle of its response, a client that stops sending its
/// request's body).
pub struct Idle {
    body: Incoming,
    limit: Duration,
    /// Made (or, handed over from the wait for the response head, reused: one timer per
    /// request) and armed the first time the body has nothing ready; moved on at each frame.
    timer: Option<Timer>,
    armed: bool,
}

/// A request's one timer: the response head's deadline, then its body's idle limit.
pub type Timer = Pin<Box<tokio::time::Sleep>>;

/// A body that sent nothing for its idle limit.
#[derive(Debug, thiserror::Error)]
#[error("{0}: no data for {1:?}")]
pub struct Stalled(&'static str, Duration);

impl Idle {
    #[must_use]
    pub fn new(body: Incoming, limit: Duration) -> Self {
        Self { body, limit, timer: None, armed: false }
    }

    /// An idle limit that reuses `timer` (the request's, done with).
    #[must_use]
    pub fn with_timer(body: Incoming, limit: Duration, timer: Timer) -> Self {
        Self { body, limit, timer: Some(timer), armed: false }
    }

    /// The next frame, or [`Stalled`] (`whose` body) when none came in time.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        whose: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let (true, Some(timer)) = (self.armed, &mut self.timer) {
                    timer.as_mut().reset(tokio::time::Instant::now() + self.limit);
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Peer)))
            }
            Poll::Pending => {
                let limit = self.limit;
                let deadline = tokio::time::Instant::now() + limit;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !std::mem::replace(&mut self.armed, true) {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled(Stalled(whose, limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Why a streamed body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Peer(hyper::Error),
    #[error(transparent)]
    Stalled(Stalled),
    /// More than the route takes (`max_body`): 413.
    #[error("larger than the {0} bytes this route takes")]
    TooLarge(u64),
}

/// The body length a request or response declares (`Content-Length`), if it declares one
/// that parses.
#[must_use]
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

pub struct ProxyBody {
    kind: Kind,
    /// Dropping it ends the request's accounting; counts the bytes sent for the access log.
    guard: Option<RequestGuard>,
    /// Gzips the body as it streams (each frame flushed, so nothing waits for the next).
    gzip: Option<Box<flate2::write::GzEncoder<Vec<u8>>>>,
}

impl ProxyBody {
    #[must_use]
    pub fn local(text: impl Into<Bytes>) -> Self {
        Self { kind: Kind::Local(Some(text.into())), guard: None, gzip: None }
    }

    /// The task's response body, which must send a frame at least every `idle` (`timer`:
    /// the request's, reused).
    #[must_use]
    pub fn upstream(body: Incoming, idle: Duration, timer: Timer, guard: RequestGuard) -> Self {
        Self { kind: Kind::Upstream(Idle::with_timer(body, idle, timer)), guard: Some(guard), gzip: None }
    }

    /// The same body, gzipped (the caller sets `Content-Encoding` and drops the length).
    #[must_use]
    pub fn gzipped(mut self) -> Self {
        self.gzip = Some(Box::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())));
        self
    }

    /// Ties the request's accounting to this body.
    #[must_use]
    pub fn with_guard(mut self, guard: RequestGuard) -> Self {
        self.guard = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let mut frame = match &mut this.kind {
            Kind::Upstream(body) => body.poll_frame(cx, "the task's response body"),
            Kind::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Some(gzip) = &mut this.gzip {
            use std::io::Write as _;
            // Writing into a Vec does not fail.
            match &mut frame {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(data) = f.data_mut() {
                        let _ = gzip.write_all(data).and_then(|()| gzip.flush());
                        *data = Bytes::from(std::mem::take(gzip.get_mut()));
                    }
                }
                Poll::Ready(None) => {
                    let _ = gzip.try_finish();
                    let tail = std::mem::take(gzip.get_mut());
                    this.gzip = None;
                    frame = Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(Bytes::from(tail)))));
                }
                _ => {}
            }
        }
        if let (Poll::Ready(Some(Ok(f))), Some(guard)) = (&frame, &mut this.guard) {
            if let Some(data) = f.data_ref() {
                guard.sent += data.len() as u64;
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        if self.gzip.is_some() {
            return false;
        }
        match &self.kind {
            Kind::Upstream(idle) => idle.body.is_end_stream(),
            Kind::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.gzip.is_some() {
            return SizeHint::default();
        }
        match &self.kind {
            Kind::Upstream(idle) => idle.body.size_hint(),
            Kind::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Counts a request as in flight (globally, on its client connection and on its endpoint)
/// from the moment its head arrives until its response body is done.
pub struct RequestGuard {
    conn: Arc<ConnActivity>,
    in_flight: IntGauge,
    endpoint: Option<Arc<Endpoint>>,
    /// The request's access log line, written when the guard goes (the response is done).
    pub access: Option<Pending>,
    /// Where its bytes are counted, once a route (or none) answered it.
    pub metrics: Option<RouteMetrics>,
    /// Body bytes sent to the client so far.
    sent: u64,
    /// Body bytes received from the client, counted as they go to the task (requests with
    /// a body).
    pub received: Option<Arc<AtomicU64>>,
    /// The request's places under in-flight limits, given back with the response.
    pub permits: Vec<super::middleware::Permit>,
}

impl RequestGuard {
    #[must_use]
    pub fn new(conn: Arc<ConnActivity>, in_flight: &IntGauge, access: Option<Pending>) -> Self {
        conn.request_started();
        in_flight.inc();
        Self {
            conn,
            in_flight: in_flight.clone(),
            endpoint: None,
            access,
            metrics: None,
            sent: 0,
            received: None,
            permits: Vec::new(),
        }
    }

    /// The client's address and the one it connected to.
    #[must_use]
    pub fn addresses(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        (self.conn.peer, self.conn.local)
    }

    /// The client is a trusted front proxy.
    #[must_use]
    pub fn trusted(&self) -> bool {
        self.conn.trusted
    }

    /// What the connection's TLS handshake proved of a client certificate, if it asked.
    #[must_use]
    pub fn client_certificate(&self) -> Option<&crate::tls::client_auth::Verified> {
        self.conn.client_certificate.get()
    }

    /// Moves the request's endpoint accounting to `endpoint` (on the first try or a retry).
    pub fn set_endpoint(&mut self, endpoint: &Arc<Endpoint>) {
        endpoint.begin();
        if let Some(access) = &mut self.access {
            access.task(endpoint.addr);
        }
        if let Some(old) = self.endpoint.replace(endpoint.clone()) {
            old.end();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(e) = &self.endpoint {
            e.end();
        }
        self.in_flight.dec();
        self.conn.request_finished();
        let received = self.received.as_ref().map(|r| r.load(Ordering::Relaxed));
        if let Some(metrics) = &self.metrics {
            metrics.bytes(received.unwrap_or(0), self.sent);
        }
        if let Some(mut access) = self.access.take() {
            access.sent(self.sent);
            if let Some(received) = received {
                access.received_exactly(received);
            }
            access.finish();
        }
    }
}

/// The body a task gets: the client's, streamed, or none. A request without a body can be
/// sent again when the connection it went out on turns out closed (see `Proxy::send`).
pub enum UpstreamBody {
    /// The body, its bytes so far, the most it may carry, and how far it went.
    Client(Idle, Arc<AtomicU64>, u64, Arc<Progress>),
    /// Read ahead (request buffering): its first frames, then the rest of it when it was
    /// longer than the buffer.
    Buffered(std::collections::VecDeque<Frame<Bytes>>, Option<Box<UpstreamBody>>),
    Empty,
}

/// How far a request body went to its task: all of it (the wait for the response head
/// starts), or a piece handed to the connection and not taken yet (the task stopped
/// reading once that lasts).
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// All of it was handed to the connection.
    sent: std::sync::atomic::AtomicBool,
    /// When the piece being written was handed over (ms on `origin`'s clock, +1); 0: the
    /// connection came back for more since.
    handed: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            sent: std::sync::atomic::AtomicBool::new(false),
            handed: AtomicU64::new(0),
        }
    }

    /// Whether the whole body was handed to the connection.
    #[must_use]
    pub fn all_sent(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }

    /// How long the connection has been writing one piece (the task not reading it).
    #[must_use]
    pub fn stuck_for(&self) -> Duration {
        match self.handed.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => self.origin.elapsed().saturating_sub(Duration::from_millis(at - 1)),
        }
    }

    fn handed_over(&self, last: bool) {
        if last {
            self.sent.store(true, Ordering::Relaxed);
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        self.handed.store(now, Ordering::Relaxed);
    }
}

impl UpstreamBody {
    /// The client's body, which must send a frame at least every `idle`, or `Empty` when it
    /// has none; its bytes are counted in a counter left in `count`.
    #[must_use]
    pub fn of(body: Incoming, idle: Duration, count: &mut Option<Arc<AtomicU64>>, limit: u64) -> Self {
        if body.is_end_stream() {
            Self::Empty
        } else {
            let count = count.get_or_insert_with(Arc::default).clone();
            Self::Client(Idle::new(body, idle), count, limit, Arc::new(Progress::new()))
        }
    }

    /// How far the body went (`None`: there is none, or it was all read ahead).
    #[must_use]
    pub fn progress(&self) -> Option<Arc<Progress>> {
        match self {
            Self::Client(.., progress) => Some(progress.clone()),
            Self::Buffered(_, rest) => rest.as_ref().and_then(|r| r.progress()),
            Self::Empty => None,
        }
    }

    /// Reads up to `cap` bytes of the body ahead (request buffering, nginx's default): the
    /// task gets it at once however slowly the client sent it; a longer body streams on
    /// after that part. The client's body errors (stall, too large, broken) come out here.
    pub async fn read_ahead(mut self, cap: u64) -> Result<Self, ClientBodyError> {
        use http_body_util::BodyExt as _;
        if matches!(self, Self::Empty) {
            return Ok(self);
        }
        let (mut frames, mut held) = (std::collections::VecDeque::new(), 0u64);
        while held < cap {
            match self.frame().await {
                None => return Ok(Self::Buffered(frames, None)),
                Some(Ok(frame)) => {
                    held += frame.data_ref().map_or(0, |d| d.len() as u64);
                    frames.push_back(frame);
                }
                Some(Err(e)) => return Err(e),
            }
        }
        Ok(Self::Buffered(frames, Some(Box::new(self))))
    }
}

/// The client's request body failed on its way to the task (a malformed chunk, a cut
/// connection, a stall): the client's fault, answered 400 (408 for a stall), never blamed
/// on the task.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body: {0}")]
pub struct ClientBodyError(pub BodyError);

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Client(body, count, limit, progress) => {
                // The connection asks for more: the piece before was taken.
                progress.handed.store(0, Ordering::Relaxed);
                let frame = body.poll_frame(cx, "the client's request body").map_err(ClientBodyError);
                match &frame {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(data) = f.data_ref() {
                            let so_far =
                                count.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                            if so_far > *limit {
                                return Poll::Ready(Some(Err(ClientBodyError(BodyError::TooLarge(*limit)))));
                            }
                        }
                        progress.handed_over(body.body.is_end_stream());
                    }
                    Poll::Ready(None) => progress.sent.store(true, Ordering::Relaxed),
                    _ => {}
                }
                frame
            }
            Self::Buffered(frames, rest) => match (frames.pop_front(), rest) {
                (Some(frame), _) => Poll::Ready(Some(Ok(frame))),
                (None, Some(rest)) => Pin::new(rest.as_mut()).poll_frame(cx),
                (None, None) => Poll::Ready(None),
            },
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client(idle, ..) => idle.body.is_end_stream(),
            Self::Buffered(frames, rest) => {
                frames.is_empty() && rest.as_ref().is_none_or(http_body::Body::is_end_stream)
            }
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client(idle, ..) => idle.body.size_hint(),
            Self::Buffered(frames, rest) => {
                let held: u64 = frames.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
                match rest {
                    None => SizeHint::with_exact(held),
                    Some(rest) => {
                        let more = rest.size_hint();
                        let mut hint = SizeHint::new();
                        hint.set_lower(held + more.lower());
                        if let Some(upper) = more.upper() {
                            hint.set_upper(held + upper);
                        }
                        hint
                    }
                }
            }
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}
