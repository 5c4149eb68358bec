//! The request path: route lookup, header rewriting, endpoint choice with one retry on a
//! failed connect, upstream exchange with timeouts, upgrades, and error responses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use super::access_log::AccessLog;
use super::body::Timer;
use super::body::{ProxyBody, RequestGuard, UpstreamBody};
use super::endpoint::{ConnectError, Endpoint, EndpointRegistry, Reach, Sender};
use super::router::{Route, RouteTable};
use super::server::ConnActivity;
use crate::config::ProxyConfig;
use crate::metrics::{Metrics, RequestKind, RouteMetrics};
use crate::state::{HttpsMethod, StateHub, UpstreamProtocol};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
/// Headers that name the client and that backends believe: kept only from a trusted front
/// proxy (`proxy.trusted_networks`), like `X-Forwarded-*`.
static CLIENT_CLAIMS: [HeaderName; 5] = [
    header::FORWARDED,
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-original-uri"),
];

/// What went wrong, and so what the client is told.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("service has no task to send the request to")]
    NoTask,
    #[error("{0}")]
    Connect(ConnectError),
    #[error("task sent no response head within {0:?}")]
    ResponseTimeout(Duration),
    #[error("task took nothing of the request body for {0:?} (it stopped reading)")]
    SendTimeout(Duration),
    #[error("upstream exchange failed: {0}")]
    Upstream(hyper::Error),
    /// What its answer says (408 stalled, 413 too large, 400 broken), and why.
    #[error("{1}")]
    ClientBody(StatusCode, String),
    #[error("task switched protocols to {0:?}, which the client did not ask for")]
    UnaskedSwitch(String),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NoTask => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect(ConnectError::Timeout(_)) | Self::ResponseTimeout(_) | Self::SendTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Connect(_) | Self::Upstream(_) | Self::UnaskedSwitch(_) => StatusCode::BAD_GATEWAY,
            Self::ClientBody(status, _) => *status,
        }
    }

    /// The client's body failed: 408 stalled, 413 too large, 400 broken.
    fn of_client_body(body: &super::body::ClientBodyError) -> Self {
        let status = match body.0 {
            super::body::BodyError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            super::body::BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            super::body::BodyError::Peer(_) => StatusCode::BAD_REQUEST,
        };
        Self::ClientBody(status, body.to_string())
    }

    /// A failed exchange: the client's fault when its own body failed, else the task's.
    fn of_exchange(e: hyper::Error) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(c) = cause {
            if let Some(body) = c.downcast_ref::<super::body::ClientBodyError>() {
                return Self::of_client_body(body);
            }
            cause = c.source();
        }
        Self::Upstream(e)
    }
}

/// The reverse proxy: a route table swapped in whole by the state consumer, and the
/// settings the request path needs.
pub struct Proxy {
    pub table: ArcSwap<RouteTable>,
    cfg: ProxyConfig,
    metrics: Arc<Metrics>,
    unrouted: RouteMetrics,
    /// The HTTPS side, when there is one: where to redirect to, and which hosts have a
    /// certificate.
    https: Option<Https>,
    access: Option<Arc<AccessLog>>,
}

/// What the plain-HTTP side needs to know about HTTPS.
pub struct Https {
    pub port: u16,
    pub certs: Arc<crate::tls::CertResolver>,
}

impl Proxy {
    /// The agent's metrics (the listeners count their connections there).
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    #[must_use]
    pub fn new(
        cfg: ProxyConfig,
        metrics: Arc<Metrics>,
        https: Option<Https>,
        access: Option<Arc<AccessLog>>,
    ) -> Self {
        Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            unrouted: metrics.route("none", "none"),
            cfg,
            metrics,
            https,
            access,
        }
    }

    /// The largest request body `route` takes: its own, else the agent's, and no more than
    /// a `buffering` middleware allows.
    fn body_limit(&self, route: &Route) -> u64 {
        let chain = route.middlewares.1.limits().max_body.unwrap_or(u64::MAX);
        route.max_body.unwrap_or(self.default_body_limit()).min(chain)
    }

    /// The body limit of routes that set none: `proxy.max_body_bytes` (0: none).
    fn default_body_limit(&self) -> u64 {
        if self.cfg.max_body_bytes == 0 {
            u64::MAX
        } else {
            self.cfg.max_body_bytes
        }
    }

    /// The access log, when there is one.
    #[must_use]
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access.as_deref()
    }

    /// Ends a request meshgate answered itself (or refused): counted on `metrics` (those
    /// of `route`, or of no route), its log line told the status and route.
    fn answered(
        &self,
        resp: Response<ProxyBody>,
        mut guard: RequestGuard,
        route: Option<&Route>,
        (started, kind): (Instant, RequestKind),
    ) -> Response<ProxyBody> {
        let metrics = route.map_or(&self.unrouted, |r| &r.metrics);
        metrics.observe(resp.status(), kind, started.elapsed().as_secs_f64());
        guard.metrics = Some(metrics.clone());
        note(&mut guard, resp.status(), false, route);
        resp.map(|b| b.with_guard(guard))
    }

    /// Compiles the route table from the hub's state now (so the listener never serves an
    /// empty table once the agent has started), then again on every new generation. Tasks
    /// that cannot be reached are logged when they become so.
    pub fn follow(
        self: Arc<Self>,
        hub: Arc<StateHub>,
        default_host: Option<String>,
        reach: Reach,
    ) -> tokio::task::JoinHandle<()> {
        let registry = EndpointRegistry::new(self.metrics.backend_up.clone());
        let shared = super::middleware::Shared::default();
        let mut changes = hub.subscribe();
        changes.mark_unchanged();
        let mut told = std::collections::HashSet::new();
        let mut compile = move || {
            let snapshot = hub.load();
            let named = named_certificates(&snapshot.state);
            let mut missing: Vec<String> = named
                .iter()
                .filter(|(_, name)| !self.https.as_ref().is_some_and(|h| h.certs.has_named(name)))
                .map(|(host, name)| format!("host `{host}`: CERT_NAME `{name}` is not in tls.certs_dir on this node (or HTTPS is off); not served"))
                .collect();
            missing.extend(unreadable_client_cas(&snapshot.state));
            if let Some(https) = &self.https {
                https.certs.set_named(named);
                https.certs.set_tls13_only(tls13_only_hosts(&snapshot.state));
            }
            let table = RouteTable::compile(
                &snapshot.state,
                snapshot.generation,
                default_host.as_deref(),
                &registry,
                &reach,
                &self.metrics,
                &shared,
            );
            // Each problem and conflict logged once, while it lasts.
            let conflicts: Vec<String> = table
                .conflicts
                .iter()
                .map(|c| {
                    format!(
                        "two services claim host `{}` path `{}` and are served differently: `{}` keeps it, `{}` is not routed there",
                        c.host, c.path, c.kept, c.ignored
                    )
                })
                .collect();
            told.retain(|p| table.unreachable.contains(p) || conflicts.contains(p) || missing.contains(p));
            for problem in table.unreachable.iter().chain(&conflicts).chain(&missing) {
                if told.insert(problem.clone()) {
                    tracing::warn!("{problem}");
                }
            }
            self.table.store(Arc::new(table));
            registry.prune();
            self.metrics.state_generation.set(snapshot.generation as i64);
            // The old table is gone: its pages go back to the system, else each reload of a
            // large routes file leaves them in the allocator (measured: 10,000 services, 106
            // MiB at start, 243 MiB after six reloads without this, 177 MiB with it).
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(tokio::task::spawn_blocking(crate::memory::give_back));
            }
        };
        compile();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                compile();
            }
        })
    }

    /// The answer HTTPS settings give before proxying: a redirect to HTTPS, or a refusal
    /// (`HTTPS_METHOD=nohttp` / `nohttps`). `None`: proxy the request.
    fn https_policy(
        &self,
        route: &Route,
        req: &Request<Incoming>,
        secure: bool,
    ) -> Option<Response<ProxyBody>> {
        match (secure, route.https_method) {
            (true, HttpsMethod::Nohttps) => {
                Some(local(StatusCode::NOT_FOUND, "meshgate: this host is not served over HTTPS\n".into()))
            }
            (false, HttpsMethod::Redirect | HttpsMethod::Nohttp) => {
                // HTTPS only: refused over plain HTTP until there is HTTPS to send it to
                // (no certificate yet, or no HTTPS listener on this node), never served.
                let refuse = || {
                    (route.https_method == HttpsMethod::Nohttp).then(|| {
                        local(StatusCode::FORBIDDEN, "meshgate: this host is served over HTTPS only\n".into())
                    })
                };
                let Some(https) = self.https.as_ref() else { return refuse() };
                let host = request_host(req).unwrap_or("");
                let name = super::router::normalise_host(host);
                if !https.certs.has_certificate(&name) {
                    return refuse();
                }
                let port = if https.port == 443 { String::new() } else { format!(":{}", https.port) };
                let path = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
                let location = format!("https://{name}{port}{path}");
                let mut resp =
                    local(StatusCode::MOVED_PERMANENTLY, format!("meshgate: moved to {location}\n"));
                resp.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
                Some(resp)
            }
            _ => None,
        }
    }

    /// A route told to use a certificate (`CERT_NAME`) that this node does not have is not
    /// served here at all (503), over either scheme, rather than with another certificate.
    fn missing_certificate(&self, route: &Route) -> Option<Response<ProxyBody>> {
        let name = route.cert_name.as_deref()?;
        let present = self.https.as_ref().is_some_and(|h| h.certs.has_named(name));
        (!present).then(|| {
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("meshgate: this host's certificate `{name}` is not on this node\n"),
            )
        })
    }

    /// The answer to a CA's HTTP-01 validation, over plain HTTP.
    fn http01_answer(&self, req: &Request<Incoming>, secure: bool) -> Option<Response<ProxyBody>> {
        let https = self.https.as_ref().filter(|_| !secure)?;
        let path = req.uri().path();
        if !path.starts_with(crate::acme::HTTP01_PREFIX) {
            return None;
        }
        let mut resp = local(StatusCode::OK, https.certs.challenges.http_answer(path)?);
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        Some(resp)
    }

    /// Serves one request. Never fails: errors become 4xx/5xx responses.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: Arc<ConnActivity>) -> Response<ProxyBody> {
        let started = Instant::now();
        if req.version() == Version::HTTP_2 {
            conn.mark_http2();
        }
        let upgrade = is_upgrade(&req);
        let (secure, conn_ip) = (conn.secure, conn.client_ip);
        let access = self.access.as_ref().map(|log| log.begin(&req, conn.peer, secure));
        let kind = RequestKind::of(&req);
        // Two Host headers: which one routes is ambiguous (a proxy in front may have used the
        // other), so neither does (RFC 9112 3.2).
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            let resp = local(StatusCode::BAD_REQUEST, "meshgate: a request has one Host header\n".to_owned());
            return self.answered(
                resp,
                RequestGuard::new(conn, &self.metrics.http_in_flight, access),
                None,
                (started, kind),
            );
        }
        prepare_request(&mut req, &conn, upgrade);
        let mut guard = RequestGuard::new(conn, &self.metrics.http_in_flight, access);
        // ACME HTTP-01 validation comes before any routing or redirect.
        if let Some(resp) = self.http01_answer(&req, secure) {
            return self.answered(resp, guard, None, (started, kind));
        }
        let route = self.route_for(&req, conn_ip);
        let Some(route) = route else {
            let host = request_host(&req).unwrap_or("").to_owned();
            let resp = local(StatusCode::NOT_FOUND, format!("meshgate: no route for host `{host}`\n"));
            return self.answered(resp, guard, None, (started, kind));
        };

        let cx = super::middleware::Context { client: conn_ip, secure, trusted: guard.trusted() };
        let mut passed = match self.admit(&route, &mut req, &cx, guard.client_certificate()).await {
            Ok(passed) => passed,
            Err(resp) => return self.answered(resp, guard, Some(&route), (started, kind)),
        };
        guard.permits = std::mem::take(&mut passed.permits);
        let asked = upgrade.then(|| req.headers().get(header::UPGRADE).cloned()).flatten();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        set_upstream_form(&mut req, &route);

        let limit = self.body_limit(&route);
        if let Some(mut resp) = too_large(req.headers(), limit) {
            passed.finish(resp.headers_mut());
            return self.answered(resp, guard, Some(&route), (started, kind));
        }
        let wish = super::affinity::wish_of(route.affinity.as_ref(), req.headers(), conn_ip);
        let gzip = route.middlewares.1.compress().filter(|_| gzip_allowed(&req));
        let req =
            req.map(|body| UpstreamBody::of(body, self.cfg.client_body_timeout, &mut guard.received, limit));
        let exchanged =
            self.exchange(&route, req, &mut guard, &wish).await.and_then(|(resp, endpoint, timer)| {
                match check_switch(&resp, asked.as_ref()) {
                    Ok(()) => Ok((resp, endpoint, timer)),
                    Err(e) => Err((e, Some(endpoint))),
                }
            });
        match exchanged {
            Ok((mut resp, endpoint, timer)) => {
                let cookie = super::affinity::set_cookie(route.affinity.as_ref(), &wish, &endpoint);
                note(&mut guard, resp.status(), true, Some(&route));
                guard.metrics = Some(route.metrics.clone());
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        // The upgraded connection's line and bytes are told when it ends.
                        let line = guard.access.take();
                        super::tunnel::spawn(
                            (client, hyper::upgrade::on(&mut resp)),
                            route.clone(),
                            endpoint,
                            line,
                            self.cfg.tunnel_idle_timeout,
                        );
                    }
                } else {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                dress(&route, resp.headers_mut(), secure, &passed, cookie);
                route.metrics.observe(resp.status(), kind, started.elapsed().as_secs_f64());
                let gzip = gzip.is_some_and(|c| c.wants(resp.status(), resp.headers()));
                gzipped_if(
                    gzip,
                    resp.map(|b| {
                        ProxyBody::upstream(
                            b,
                            route.response_timeout.unwrap_or(self.cfg.upstream_body_timeout),
                            timer,
                            guard,
                        )
                    }),
                )
            }
            Err((error, endpoint)) => {
                let status = error.status();
                let task = endpoint.as_ref().map_or("-", |e| &*e.task);
                let addr = endpoint.as_ref().map(|e| e.addr.to_string()).unwrap_or_default();
                tracing::warn!(route = %route.name, service = %route.service, task, addr, %status, "{error}");
                let mut resp =
                    local(status, format!("meshgate: {}\n", status.canonical_reason().unwrap_or("error")));
                passed.finish(resp.headers_mut());
                self.answered(resp, guard, Some(&route), (started, kind))
            }
        }
    }

    /// The route a request goes to, in the current table.
    fn route_for(&self, req: &Request<Incoming>, client: std::net::IpAddr) -> Option<Arc<Route>> {
        let ask = super::condition::Ask {
            host: request_host(req).unwrap_or(""),
            path: req.uri().path(),
            method: req.method(),
            headers: req.headers(),
            query: req.uri().query(),
            client,
        };
        self.table.load().find(&ask).cloned()
    }

    /// What the route asks before the request goes on: served at all, from this address,
    /// over this scheme, with this client certificate, by this user, then its middlewares in
    /// order. `Err`: the client's
    /// answer instead.
    async fn admit<'r>(
        &self,
        route: &'r Route,
        req: &mut Request<Incoming>,
        cx: &super::middleware::Context,
        verified: Option<&crate::tls::client_auth::Verified>,
    ) -> Result<super::middleware::Passed<'r>, Response<ProxyBody>> {
        if let Some(resp) = barred(route, cx.client) {
            return Err(resp);
        }
        // A task behind a path (nginx-proxy's `VIRTUAL_PATH`) learns the URI the client
        // asked for, before anything rewrites it, as nginx-proxy tells it.
        if route.path != "/" || route.rewrite.is_some() {
            let asked = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
            if let Ok(v) = HeaderValue::from_str(asked) {
                req.headers_mut().insert(HeaderName::from_static("x-original-uri"), v);
            }
        }
        if let Some(resp) = self.https_policy(route, req, cx.secure) {
            return Err(resp);
        }
        if let Some(resp) = self.missing_certificate(route) {
            return Err(resp);
        }
        if let Some(resp) = client_certificate(route, req, cx.secure, verified) {
            return Err(resp);
        }
        if let Some(resp) = authenticate(route, req).await {
            return Err(resp);
        }
        match route.middlewares.1.run(req, cx).await {
            (passed, None) => Ok(passed),
            (passed, Some(mut resp)) => {
                passed.finish(resp.headers_mut());
                Err(resp)
            }
        }
    }

    /// Sends the request to one endpoint; when the connect fails (nothing was sent), ejects
    /// that endpoint and tries once more on another.
    async fn exchange(
        &self,
        route: &Route,
        mut req: Request<UpstreamBody>,
        guard: &mut RequestGuard,
        wish: &super::affinity::Wish,
    ) -> Result<(Response<Incoming>, Arc<Endpoint>, Timer), (ProxyError, Option<Arc<Endpoint>>)> {
        let mut failed: Option<Arc<Endpoint>> = None;
        let mut last_error = ProxyError::NoTask;
        // One more try on another task by default; a `retry` middleware says how many, and
        // how long to wait between them.
        let (tries, mut wait) = route.middlewares.1.limits().attempts.unwrap_or((2, Duration::ZERO));
        if route.request_buffering {
            let (parts, body) = req.into_parts();
            let body = body.read_ahead(self.cfg.request_buffer_bytes).await;
            let body = body.map_err(|e| (ProxyError::of_client_body(&e), None))?;
            req = Request::from_parts(parts, body);
        }
        for attempt in 0..tries {
            if attempt > 0 && !wait.is_zero() {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
            let Some(endpoint) = route.choose(failed.as_ref(), wish) else { break };
            guard.set_endpoint(&endpoint);
            match self.send(&endpoint, req, route, guard.addresses()).await {
                Ok((resp, timer)) => {
                    endpoint.record_success();
                    return Ok((resp, endpoint, timer));
                }
                Err(Failure::NotSent(error, back)) => {
                    let ejected = endpoint.record_failure(self.cfg.eject_base, self.cfg.eject_max);
                    tracing::warn!(route = %route.name, service = %route.service, task = %endpoint.task, addr = %endpoint.addr,
                        ejected_for = ?ejected, "{error}; trying another task");
                    req = *back;
                    last_error = ProxyError::Connect(error);
                    failed = Some(endpoint);
                    route.metrics.retried();
                }
                Err(Failure::Sent(error)) => return Err((error, Some(endpoint))),
            }
        }
        Err((last_error, failed))
    }

    /// One request on one endpoint (`client`: its address and the one it connected to, for
    /// a task that wants a PROXY header). A pooled connection that turns out closed before the
    /// request was written is replaced by a fresh one transparently; so is one that closes
    /// under an idempotent request without a body (once): nothing of it can have been acted
    /// on twice. (A task, or the agent a hop goes through, closing an idle kept-alive
    /// connection as a request is written on it: the classic keep-alive race.)
    async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        mut req: Request<UpstreamBody>,
        route: &Route,
        client: (std::net::SocketAddr, std::net::SocketAddr),
    ) -> Result<(Response<Incoming>, Timer), Failure> {
        if !route.pass_host {
            task_host(&mut req, endpoint.addr);
        }
        let (timeout, metrics) =
            (route.response_timeout.unwrap_or(self.cfg.upstream_response_timeout), &route.metrics);
        let sending = route.send_timeout.unwrap_or(self.cfg.upstream_send_timeout);
        // One timer for the whole request: each attempt's response head, then the body.
        let mut timer: Timer = Box::pin(tokio::time::sleep(timeout));
        let mut replays = 1;
        loop {
            timer.as_mut().reset(tokio::time::Instant::now() + timeout);
            let connect = route.connect_timeout.unwrap_or(self.cfg.connect_timeout);
            let sender = match endpoint.checkout(connect, Some(client)).await {
                Ok(s) => s,
                Err(e) => return Err(Failure::NotSent(e, Box::new(req))),
            };
            let head = HeadWait { timer: &mut timer, timeout, sending, progress: req.body().progress() };
            let result = match sender {
                Sender::H1 { mut sender, reused } => {
                    let replay = (reused && replays > 0).then(|| replayable(&req)).flatten();
                    match head.of(sender.try_send_request(req)).await {
                        Err(e) => return Err(Failure::Sent(e)),
                        Ok(Ok(resp)) => {
                            endpoint.recycle(sender);
                            Ok(resp)
                        }
                        Ok(Err(mut e)) => match (e.take_message(), replay) {
                            (Some(back), _) if reused => {
                                metrics.retried();
                                req = back;
                                continue;
                            }
                            (_, Some(copy)) => {
                                metrics.retried();
                                replays -= 1;
                                req = copy;
                                continue;
                            }
                            _ => Err(e.into_error()),
                        },
                    }
                }
                Sender::H2(mut sender) => match head.of(sender.try_send_request(req)).await {
                    Err(e) => return Err(Failure::Sent(e)),
                    Ok(r) => r.map_err(hyper::client::conn::TrySendError::into_error),
                },
            };
            return result.map(|resp| (resp, timer)).map_err(|e| Failure::Sent(ProxyError::of_exchange(e)));
        }
    }
}

/// A 413 for a request whose declared length is past `limit`: refused before anything of
/// it goes to the task (a body that turns out longer is cut with 413 as it streams).
fn too_large(headers: &HeaderMap, limit: u64) -> Option<Response<ProxyBody>> {
    let declared = super::body::declared_length(headers)?;
    (declared > limit).then(|| {
        local(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("meshgate: the request body is larger than the {limit} bytes this route takes\n"),
        )
    })
}

/// What a route answers before anything else: 503 when it asks for a restriction meshgate
/// does not honour (fail closed), 403 to a client outside its allowed networks.
fn barred(route: &Route, client: std::net::IpAddr) -> Option<Response<ProxyBody>> {
    if route.refused.is_some() {
        return Some(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "meshgate: this route is not served: it asks for a restriction meshgate does not honour (see /api/state)\n"
                .to_owned(),
        ));
    }
    if route.allow_from.as_ref().is_some_and(|nets| !nets.iter().any(|n| n.contains(&client))) {
        return Some(local(StatusCode::FORBIDDEN, "meshgate: not allowed from your address\n".to_owned()));
    }
    None
}

/// A client certificate the route asks for, and the connection's: a request on a connection
/// set up for another name or another CA (HTTP/2 reuse, a Host that is not the SNI) gets
/// 421 (the client opens a new connection for this host); without the certificate, or over
/// plain HTTP, 403.
fn client_certificate(
    route: &Route,
    req: &Request<Incoming>,
    secure: bool,
    verified: Option<&crate::tls::client_auth::Verified>,
) -> Option<Response<ProxyBody>> {
    let forbidden = |why: &str| local(StatusCode::FORBIDDEN, format!("meshgate: {why}\n"));
    match (&route.client_ca, verified) {
        (None, None) => None,
        (Some(_), _) if !secure => Some(forbidden("this host takes a client certificate, over HTTPS only")),
        (need, Some(v)) if need.as_ref() == Some(&v.ca) || need.is_none() => {
            let host = super::router::normalise_host(request_host(req).unwrap_or(""));
            if v.name.as_deref() != Some(&*host) {
                Some(local(
                    StatusCode::MISDIRECTED_REQUEST,
                    "meshgate: this connection was set up for another host; connect again for this one\n".into(),
                ))
            } else if need.is_some() && !v.certificate {
                Some(forbidden("this host needs a client certificate"))
            } else {
                None
            }
        }
        (_, _) => Some(local(
            StatusCode::MISDIRECTED_REQUEST,
            "meshgate: this connection was not set up for this host's client certificates; connect again for this one\n".into(),
        )),
    }
}

/// The route's own basic authentication (nginx-proxy's htpasswd, the routes file's).
async fn authenticate(route: &Route, req: &mut Request<Incoming>) -> Option<Response<ProxyBody>> {
    let (auth, checker) = route.basic_auth.as_ref()?;
    super::middleware::basic_auth(auth, checker, req).await
}

/// Tells the request's log line its status (`origin`: the task's) and route; a route with
/// its log turned off writes none.
fn note(guard: &mut RequestGuard, status: StatusCode, origin: bool, route: Option<&Route>) {
    if route.is_some_and(|r| !r.access_log) {
        guard.access = None;
    }
    if let Some(access) = &mut guard.access {
        access.status(status.as_u16(), origin);
        if let Some(route) = route {
            access.route(&route.log_names);
        }
    }
}

/// `work`, unless `timer` fires first.
/// The wait for a task's response head. Its timeout counts from the end of the request body
/// (nginx's `proxy_read_timeout`: a long upload is not cut for taking long); while the body
/// is still going out, the task must take each piece within `sending` (nginx's
/// `proxy_send_timeout`).
struct HeadWait<'t> {
    timer: &'t mut Timer,
    timeout: Duration,
    sending: Duration,
    progress: Option<Arc<super::body::Progress>>,
}

impl HeadWait<'_> {
    async fn of<T>(self, exchange: impl std::future::Future<Output = T>) -> Result<T, ProxyError> {
        let Some(progress) = self.progress.filter(|p| !p.all_sent()) else {
            return within(self.timer, exchange)
                .await
                .map_err(|()| ProxyError::ResponseTimeout(self.timeout));
        };
        tokio::pin!(exchange);
        let every =
            (self.sending.min(self.timeout) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut check = tokio::time::interval(every);
        loop {
            tokio::select! {
                biased;
                done = &mut exchange => return Ok(done),
                () = self.timer.as_mut() => return Err(ProxyError::ResponseTimeout(self.timeout)),
                _ = check.tick() => {
                    if !progress.all_sent() {
                        self.timer.as_mut().reset(tokio::time::Instant::now() + self.timeout);
                        if progress.stuck_for() >= self.sending {
                            return Err(ProxyError::SendTimeout(self.sending));
                        }
                    }
                }
            }
        }
    }
}

async fn within<T>(timer: &mut Timer, work: impl std::future::Future<Output = T>) -> Result<T, ()> {
    tokio::select! {
        biased;
        done = work => Ok(done),
        () = timer.as_mut() => Err(()),
    }
}

enum Failure {
    /// Nothing reached the task: the request comes back for a retry elsewhere.
    NotSent(ConnectError, Box<Request<UpstreamBody>>),
    Sent(ProxyError),
}

/// A copy of an idempotent request without a body, to send again (its extensions stay
/// behind: the proxy sets none that the task needs).
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    if !req.method().is_idempotent() || !matches!(req.body(), UpstreamBody::Empty) {
        return None;
    }
    let mut copy = Request::new(UpstreamBody::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

fn local(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// The host the client asked for: `Host`, or the `:authority` of an HTTP/2 request.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
}

/// An HTTP/1.1 `Connection: upgrade` request with an `Upgrade` header (WebSocket and co)
/// that the proxy tunnels. An upgrade to `h2c` is never tunnelled: after it, the client would
/// speak HTTP/2 straight to the task, past routing and header rewriting (request smuggling),
/// so its `Upgrade` is stripped and the request goes on as a plain one (as nginx and
/// Traefik do).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some_and(|v| !names_h2c(v))
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Whether an `Upgrade` value names `h2c` among its protocols.
fn names_h2c(value: &HeaderValue) -> bool {
    value.to_str().map_or(true, |v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
}

/// A `101` is passed on only as the answer to an upgrade the client asked for, to one of
/// the protocols it named; anything else would turn the connection into a tunnel the client
/// did not negotiate through us.
fn check_switch<B>(resp: &Response<B>, asked: Option<&HeaderValue>) -> Result<(), ProxyError> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    let to = resp.headers().get(header::UPGRADE);
    let to_text = to.and_then(|v| v.to_str().ok()).unwrap_or("").trim().to_owned();
    let offered = asked.and_then(|v| v.to_str().ok()).unwrap_or("");
    let agreed = to.is_some_and(|v| !names_h2c(v))
        && !to_text.is_empty()
        && offered.split(',').any(|p| p.trim().eq_ignore_ascii_case(&to_text));
    if agreed {
        Ok(())
    } else {
        Err(ProxyError::UnaskedSwitch(to_text))
    }
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) and those named in `Connection`.
/// For an upgrade, `Connection: upgrade` and `Upgrade` stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // `Upgrade` last: an upgrade keeps it.
    const HOP_BY_HOP: [&HeaderName; 10] = [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &HTTP2_SETTINGS,
        &header::UPGRADE,
    ];
    // One pass over the (few) names present; most requests carry none of these.
    if !upgrade && !headers.keys().any(|k| HOP_BY_HOP.contains(&k)) {
        return;
    }
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP[..HOP_BY_HOP.len() - 1] {
        headers.remove(*name);
    }
    if te_trailers {
        // gRPC needs it end to end, and it is the one TE value HTTP/2 allows.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Turns the client's request into the one a task gets: hop-by-hop headers out,
/// forwarding headers in, `Host` kept (an HTTP/2 client's `:authority` becomes `Host`).
fn prepare_request(req: &mut Request<Incoming>, client: &ConnActivity, upgrade: bool) {
    let host = req
        .headers()
        .get(header::HOST)
        .cloned()
        .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);

    let trusted = client.trusted;
    if !trusted {
        for name in &CLIENT_CLAIMS {
            headers.remove(name);
        }
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if trusted => HeaderValue::from_str(&format!("{prior}, {}", client.client_ip))
            .unwrap_or_else(|_| client.client_ip_header.clone()),
        _ => client.client_ip_header.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    let mut keep_or = |name: &HeaderName, value: Option<HeaderValue>| {
        if !(trusted && headers.contains_key(name)) {
            match value {
                Some(v) => headers.insert(name.clone(), v),
                None => headers.remove(name),
            };
        }
    };
    keep_or(&X_REAL_IP, Some(client.client_ip_header.clone()));
    keep_or(&X_FORWARDED_PROTO, Some(HeaderValue::from_static(if client.secure { "https" } else { "http" })));
    keep_or(&X_FORWARDED_HOST, host.clone());
    keep_or(&X_FORWARDED_PORT, Some(client.port_header.clone()));
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
}

/// The hosts told to use a named certificate (`CERT_NAME`): host to name.
fn named_certificates(state: &crate::state::MeshState) -> std::collections::HashMap<String, String> {
    let mut named = std::collections::HashMap::new();
    for http in state.services.iter().flat_map(|s| &s.http) {
        let Some(name) = &http.cert_name else { continue };
        for host in &http.hosts {
            if let crate::state::HostPattern::Exact(h) = host {
                named.insert(h.clone(), name.to_ascii_lowercase());
            }
        }
    }
    named
}

/// Client certificate CAs this node cannot read: their hosts' handshakes fail (never
/// served without the check).
fn unreadable_client_cas(state: &crate::state::MeshState) -> Vec<String> {
    let routes = state.services.iter().flat_map(|s| &s.http);
    let cas: std::collections::BTreeSet<&std::path::Path> =
        routes.filter_map(|h| h.client_ca.as_deref()).collect();
    cas.into_iter()
        .filter_map(|ca| crate::tls::ca_roots(ca).err())
        .map(|why| {
            format!(
                "client certificate CA {why}: the handshakes of the hosts that ask for it fail on this node"
            )
        })
        .collect()
}

/// The hosts whose policy takes TLS 1.3 only.
fn tls13_only_hosts(state: &crate::state::MeshState) -> std::collections::HashSet<String> {
    let routes = state.services.iter().flat_map(|s| &s.http).filter(|h| h.tls13_only);
    routes
        .flat_map(|h| &h.hosts)
        .filter_map(|host| match host {
            crate::state::HostPattern::Exact(h) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

/// What the route adds to its task's response headers: the affinity cookie, HSTS over
/// HTTPS, its middlewares' headers.
fn dress(
    route: &Route,
    headers: &mut HeaderMap,
    secure: bool,
    passed: &super::middleware::Passed<'_>,
    cookie: Option<HeaderValue>,
) {
    if let Some(cookie) = cookie {
        headers.append(header::SET_COOKIE, cookie);
    }
    if let (true, Some(hsts)) = (secure, &route.hsts) {
        headers.entry(header::STRICT_TRANSPORT_SECURITY).or_insert(hsts.clone());
    }
    passed.finish(headers);
}

/// Whether the request's answer may be gzipped: it accepts gzip and wants a body.
fn gzip_allowed<B>(req: &Request<B>) -> bool {
    req.method() != http::Method::HEAD && super::middleware::accepts_gzip(req.headers())
}

/// `resp` with its body gzipped, if `gzip`: `Content-Encoding: gzip`, no length,
/// `Vary: Accept-Encoding`.
fn gzipped_if(gzip: bool, resp: Response<ProxyBody>) -> Response<ProxyBody> {
    if !gzip {
        return resp;
    }
    let (mut head, body) = resp.into_parts();
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    head.headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    // Other bytes than the task's: a strong validator becomes a weak one (as nginx does).
    if let Some(etag) = head.headers.get(header::ETAG).filter(|e| !e.as_bytes().starts_with(b"W/")) {
        if let Ok(weak) = HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat()) {
            head.headers.insert(header::ETAG, weak);
        }
    }
    Response::from_parts(head, body.gzipped())
}

/// Names the task's own address as the host (Traefik's `passHostHeader=false`): in `Host`,
/// or in the URI's authority over HTTP/2.
fn task_host(req: &mut Request<UpstreamBody>, addr: std::net::SocketAddr) {
    let Ok(value) = HeaderValue::from_str(&addr.to_string()) else { return };
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = value.to_str().ok().and_then(|a| a.parse().ok());
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    } else {
        req.headers_mut().insert(header::HOST, value);
    }
}

/// Sets the URI form and version the task's protocol needs: origin-form over HTTP/1.1, or
/// an absolute URI (scheme + `:authority` from `Host`) over HTTP/2.
fn set_upstream_form(req: &mut Request<Incoming>, route: &Route) {
    match route.protocol {
        UpstreamProtocol::H2c => {
            let host = req.headers_mut().remove(header::HOST);
            let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            let path = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
            let path = route.upstream_path(path);
            if let Ok(uri) =
                Uri::builder().scheme("http").authority(authority).path_and_query(path.as_ref()).build()
            {
                *req.uri_mut() = uri;
            }
            *req.version_mut() = Version::HTTP_2;
        }
        UpstreamProtocol::Http | UpstreamProtocol::Https => {
            if req.uri().scheme().is_some() || req.uri().authority().is_some() || route.rewrite.is_some() {
                let path = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
                if let Ok(uri) = route.upstream_path(path).parse() {
                    *req.uri_mut() = uri;
                }
            }
            *req.version_mut() = Version::HTTP_11;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_connection_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }
}
