//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/api/state` and the dashboard
//! (`/`). It binds its own address (loopback by default); who may see what is [`access`]'s.

mod access;
mod state;

pub use access::Viewers;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;

use self::access::{Decision, Peer};

use crate::http::proxy::Proxy;
use crate::metrics::Metrics;
use crate::net::{self, Accept};
use crate::readiness::Readiness;
use crate::state::StateHub;

/// What the admin endpoints read from.
#[derive(Clone)]
pub struct AdminState {
    pub hub: Arc<StateHub>,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// The L4 mesh's port table in force.
    pub mesh: Arc<crate::mesh::MeshView>,
    /// The HTTPS listener's certificates (`None` without HTTPS).
    pub certificates: Option<Arc<crate::tls::CertResolver>>,
    /// What the ACME manager keeps (`None` without ACME).
    pub acme: Option<crate::acme::manager::Inventory>,
    /// Who may see the dashboard from beyond the node (`admin.users_file`).
    pub viewers: Viewers,
    /// A client has this long to send a request head (`proxy.request_head_timeout`, as on the
    /// proxy's listeners).
    pub head_timeout: std::time::Duration,
}

/// The dashboard: one self-contained page that draws `/api/state`.
const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// Serves the endpoints on a TCP listener, or on a Unix socket: a health check run inside
/// the agent's container reaches exactly that agent, even while a second one shares the TCP
/// port (an update).
pub async fn serve<L: Accept>(listener: L, state: AdminState)
where
    L::Peer: Peer,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(state.head_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = net::accept(&listener, "admin").await;
        spawn_connection(stream, peer.is_local(), state.clone(), builder.clone());
    }
}

fn spawn_connection<S>(stream: S, local: bool, state: AdminState, builder: Arc<auto::Builder<TokioExecutor>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(answer(&req, local, &state).await) }
        });
        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
    });
}

/// The request's answer once [`access`] let it through, else a refusal.
async fn answer(req: &Request<Incoming>, local: bool, s: &AdminState) -> Response<Full<Bytes>> {
    let authorization = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    match s.viewers.decide(req.uri().path(), local, authorization).await {
        Decision::Allow => route(req, s),
        Decision::Refuse => respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the dashboard and /api/state are shown to this node only; set admin.users_file to open them to its users\n",
        ),
        Decision::Challenge => {
            let mut resp = respond(StatusCode::UNAUTHORIZED, "text/plain", "credentials of admin.users_file needed\n");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"meshgate\""));
            resp
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn route(req: &Request<Incoming>, s: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(StatusCode::OK, "text/plain; version=0.0.4", s.metrics.render()),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let (ready, components) = s.readiness.report();
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = json!({ "ready": ready, "components": components });
            respond(status, "application/json", format!("{body:#}\n"))
        }
        "/api/state" => respond(StatusCode::OK, "application/json", format!("{:#}\n", state::state_json(s))),
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /metrics, /healthz, /readyz or /api/state\n",
        ),
    }
}
