//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/api/state` and a status page.
//! It binds its own address (loopback by default) because it shows every route and task.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;

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
    /// A client has this long to send a request head (`proxy.request_head_timeout`, as on the
    /// proxy's listeners).
    pub head_timeout: std::time::Duration,
}

/// Serves the endpoints on a TCP listener, or on a Unix socket: a health check run inside
/// the agent's container reaches exactly that agent, even while a second one shares the TCP
/// port (an update).
pub async fn serve<L: Accept>(listener: L, state: AdminState) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(state.head_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = net::accept(&listener, "admin").await;
        spawn_connection(stream, state.clone(), builder.clone());
    }
}

fn spawn_connection<S>(stream: S, state: AdminState, builder: Arc<auto::Builder<TokioExecutor>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&req, &state)) }
        });
        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
    });
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
        "/api/state" => respond(StatusCode::OK, "application/json", format!("{:#}\n", state_json(s))),
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", status_page(s)),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /metrics, /healthz, /readyz or /api/state\n",
        ),
    }
}

/// The routes as the proxy uses them, with each endpoint's live state, plus the raw state.
fn state_json(s: &AdminState) -> serde_json::Value {
    let snapshot = s.hub.load();
    let table = s.proxy.table.load();
    let mut routes: Vec<_> = table
        .routes()
        .map(|(host, r)| {
            json!({
                "host": host,
                "path": r.path,
                "service": r.service,
                "protocol": r.protocol,
                "endpoints": r.endpoints.iter().map(|e| json!({
                    "task": &*e.task,
                    "node": &*e.node,
                    "address": e.addr.to_string(),
                    "in_flight": e.in_flight(),
                    "ejected": e.is_ejected(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    routes.sort_by(|a, b| {
        (a["host"].as_str(), a["path"].as_str()).cmp(&(b["host"].as_str(), b["path"].as_str()))
    });
    json!({
        "generation": snapshot.generation,
        "routes": routes,
        "conflicts": table.conflicts,
        "problems": snapshot.state.problems.iter().chain(&table.unreachable).collect::<Vec<_>>(),
        "nodes": snapshot.state.nodes,
        "mesh": s.mesh.get(),
        "services": without_secrets(serde_json::to_value(&snapshot.state.services).unwrap_or_default()),
    })
}

/// The services as `/api/state` shows them: basic auth users by name only (their hashes
/// stay in the agent and the cluster feed).
fn without_secrets(mut services: serde_json::Value) -> serde_json::Value {
    for service in services.as_array_mut().into_iter().flatten() {
        for route in service["http"].as_array_mut().into_iter().flatten() {
            if let Some(users) = route.pointer_mut("/basic_auth/users").and_then(|u| u.as_array_mut()) {
                for user in users.iter_mut() {
                    let name = user.as_str().and_then(|u| u.split_once(':')).map(|(n, _)| n.to_owned());
                    *user = json!(format!("{}:REDACTED", name.unwrap_or_default()));
                }
            }
        }
    }
    services
}

fn status_page(s: &AdminState) -> String {
    let state = state_json(s);
    let (ready, components) = s.readiness.report();
    let mut html = String::from(
        "<!doctype html><meta charset=utf-8><title>meshgate</title>\
         <style>body{font:14px system-ui;margin:2em}td,th{padding:.2em .8em;text-align:left}\
         .down{color:#b00}</style><h1>meshgate</h1>",
    );
    let _ = write!(
        html,
        "<p>State generation {} &middot; {}</p><ul>",
        state["generation"],
        if ready { "ready" } else { "<b class=down>not ready</b>" }
    );
    for (name, c) in components {
        let _ = write!(
            html,
            "<li>{}: {} {}</li>",
            esc(&name),
            if c.ready { "ready" } else { "<b class=down>down</b>" },
            esc(&c.detail)
        );
    }
    html.push_str(
        "</ul><h2>Routes</h2><table><tr><th>Host</th><th>Path</th><th>Service</th><th>Tasks</th></tr>",
    );
    for r in state["routes"].as_array().into_iter().flatten() {
        let tasks: Vec<String> = r["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let class = if e["ejected"].as_bool() == Some(true) { " class=down" } else { "" };
                format!(
                    "<span{class}>{} ({})</span>",
                    esc(e["address"].as_str().unwrap_or("")),
                    esc(e["node"].as_str().unwrap_or(""))
                )
            })
            .collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(r["host"].as_str().unwrap_or("")),
            esc(r["path"].as_str().unwrap_or("")),
            esc(r["service"].as_str().unwrap_or("")),
            tasks.join(", ")
        );
    }
    html.push_str("</table><p><a href=/metrics>/metrics</a> &middot; <a href=/api/state>/api/state</a> &middot; <a href=/readyz>/readyz</a></p>");
    html
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
