//! A route's middlewares at work: compiled once per route table ([`Chain::compile`]), run in
//! order on each request ([`Chain::run`]). A step either lets the request on (maybe
//! changed) or answers it (a redirect, 401, 403, 429, the authentication server's answer);
//! the response headers of the steps the request went through are set on whatever answer
//! the client gets ([`Passed::finish`]).
//!
//! Limits (rate, in flight) keep their counts across route table reloads ([`Shared`]), so a
//! resync every few seconds does not reset them. They count per node, as Traefik's do per
//! instance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use regex::Regex;

use super::basic_auth::Checker;
use super::body::ProxyBody;
use crate::state::{BasicAuth, Middleware, Source};

/// How long the authentication server of a `forwardauth` has to answer.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer of an authentication server passed on to a client (a login page).
const AUTH_BODY_LIMIT: usize = 256 * 1024;
/// Past this many sources, a rate limit forgets the ones whose bucket is full again.
const SOURCES_KEPT: usize = 16_384;

static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
static X_REPLACED_PATH: HeaderName = HeaderName::from_static("x-replaced-path");

type AuthClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// What outlives one route table: the limits' counts, the client to authentication
/// servers, and the active health checks.
pub struct Shared {
    limiters: Mutex<HashMap<String, Weak<Limiter>>>,
    auth: AuthClient,
    pub health: super::health::Checks,
}

impl Default for Shared {
    fn default() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            limiters: Mutex::default(),
            auth: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector),
            health: super::health::Checks::default(),
        }
    }
}

impl Shared {
    /// The limiter named `key` (route, position and settings), kept from the last table if
    /// it is still there.
    fn limiter(&self, key: String, make: impl FnOnce() -> Limiter) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, l| l.strong_count() > 0);
        if let Some(l) = map.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(make());
        map.insert(key, Arc::downgrade(&l));
        l
    }
}

/// The request as the steps see it.
pub struct Context {
    pub client: IpAddr,
    pub secure: bool,
    /// The client is a trusted front proxy (its `X-Forwarded-*` are kept).
    pub trusted: bool,
}

/// A route's compiled middlewares.
#[derive(Clone, Default)]
pub struct Chain(Arc<[Step]>, Limits, Option<Arc<Compress>>);

/// When responses are gzipped (Traefik's `compress`).
pub struct Compress {
    min_bytes: u64,
    excluded: Vec<String>,
    included: Vec<String>,
}

impl Compress {
    /// Whether a response with these headers, to a request that accepts gzip, is gzipped:
    /// not already encoded, not partial, of a content type it takes, not known to be small.
    #[must_use]
    pub fn wants(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let kind = kind.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let listed = |list: &[String]| list.iter().any(|t| t.eq_ignore_ascii_case(&kind));
        status.is_success()
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::PARTIAL_CONTENT
            && !headers.contains_key(header::CONTENT_ENCODING)
            && !headers.contains_key(header::CONTENT_RANGE)
            && kind != "application/grpc"
            && !listed(&self.excluded)
            && (self.included.is_empty() || listed(&self.included))
            && super::body::declared_length(headers).is_none_or(|n| n >= self.min_bytes)
    }
}

/// Whether a request's `Accept-Encoding` takes gzip (`gzip` or `*`, not with `q=0`).
#[must_use]
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// What the chain sets of the route's own limits (Traefik's `retry` and `buffering`).
#[derive(Clone, Copy, Default)]
pub struct Limits {
    /// Tries in all while a task cannot be reached, and the first wait between them.
    pub attempts: Option<(u32, Duration)>,
    /// The largest request body.
    pub max_body: Option<u64>,
}

enum Step {
    RedirectScheme { scheme: String, port: Option<u16>, permanent: bool },
    RedirectRegex { regex: Regex, replacement: String, permanent: bool },
    StripPrefix(Vec<String>),
    StripPrefixRegex(Vec<Regex>),
    AddPrefix(String),
    ReplacePath(String),
    ReplacePathRegex(Regex, String),
    Headers(Headers),
    BasicAuth(BasicAuth, Arc<Checker>),
    AllowFrom(Vec<ipnet::IpNet>),
    Limit(Arc<Limiter>),
    ForwardAuth(crate::state::ForwardAuth, Uri, AuthClient),
}

struct Headers {
    request: Vec<(HeaderName, Option<HeaderValue>)>,
    response: Vec<(HeaderName, Option<HeaderValue>)>,
    sts: Option<(HeaderValue, bool)>,
    cors: Option<Cors>,
}

struct Cors {
    origins: Vec<String>,
    regexes: Vec<Regex>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    vary: bool,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.origins.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?;
        (self.origins.iter().any(|o| o == text) || self.regexes.iter().any(|r| r.is_match(text)))
            .then(|| origin.clone())
    }
}

fn value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("`{text}` is not a header value"))
}

fn joined(list: &[String]) -> Result<Option<HeaderValue>, String> {
    (!list.is_empty()).then(|| value(&list.join(", "))).transpose()
}

fn compile_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
}

fn pairs(list: &[(String, String)]) -> Result<Vec<(HeaderName, Option<HeaderValue>)>, String> {
    list.iter()
        .map(|(name, v)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a header name"))?;
            Ok((name, (!v.is_empty()).then(|| value(v)).transpose()?))
        })
        .collect()
}

impl Chain {
    /// Compiles a route's middlewares; `key` names the route (its limits are kept under it).
    ///
    /// # Errors
    /// A step that cannot work as written (the route is then refused).
    pub fn compile(specs: &[Middleware], key: &str, shared: &Shared) -> Result<Self, String> {
        let mut steps = Vec::with_capacity(specs.len());
        let mut limits = Limits::default();
        let mut compress = None;
        for (i, spec) in specs.iter().enumerate() {
            steps.push(match spec {
                Middleware::Compress { min_bytes, excluded, included } => {
                    compress = Some(Arc::new(Compress {
                        min_bytes: *min_bytes,
                        excluded: excluded.clone(),
                        included: included.clone(),
                    }));
                    continue;
                }
                Middleware::Retry { attempts, initial_interval_ms } => {
                    limits.attempts = Some((*attempts, Duration::from_millis(*initial_interval_ms)));
                    continue;
                }
                Middleware::Buffering { max_request_body } => {
                    limits.max_body = match (limits.max_body, max_request_body) {
                        (Some(a), Some(b)) => Some(a.min(*b)),
                        (a, b) => a.or(*b),
                    };
                    continue;
                }
                Middleware::RedirectScheme { scheme, port, permanent } => {
                    Step::RedirectScheme { scheme: scheme.clone(), port: *port, permanent: *permanent }
                }
                Middleware::RedirectRegex { regex, replacement, permanent } => Step::RedirectRegex {
                    regex: compile_regex(regex)?,
                    replacement: replacement.clone(),
                    permanent: *permanent,
                },
                Middleware::StripPrefix { prefixes } => Step::StripPrefix(prefixes.clone()),
                Middleware::StripPrefixRegex { regexes } => Step::StripPrefixRegex(
                    regexes.iter().map(|r| compile_regex(r)).collect::<Result<_, _>>()?,
                ),
                Middleware::AddPrefix { prefix } => Step::AddPrefix(prefix.clone()),
                Middleware::ReplacePath { path } => Step::ReplacePath(path.clone()),
                Middleware::ReplacePathRegex { regex, replacement } => {
                    Step::ReplacePathRegex(compile_regex(regex)?, replacement.clone())
                }
                Middleware::Headers(h) => Step::Headers(Headers {
                    request: pairs(&h.request)?,
                    response: pairs(&h.response)?,
                    sts: h.sts.as_deref().map(value).transpose()?.map(|v| (v, h.sts_always)),
                    cors: h
                        .cors
                        .as_ref()
                        .map(|c| -> Result<Cors, String> {
                            Ok(Cors {
                                origins: c.allow_origins.clone(),
                                regexes: c
                                    .allow_origin_regexes
                                    .iter()
                                    .map(|r| compile_regex(r))
                                    .collect::<Result<_, _>>()?,
                                methods: joined(&c.allow_methods)?,
                                headers: joined(&c.allow_headers)?,
                                expose: joined(&c.expose_headers)?,
                                credentials: c.allow_credentials,
                                max_age: c.max_age.map(HeaderValue::from),
                                vary: c.add_vary,
                            })
                        })
                        .transpose()?,
                }),
                Middleware::BasicAuth(auth) => Step::BasicAuth(auth.clone(), Arc::new(Checker::new(auth))),
                Middleware::AllowFrom { networks } => Step::AllowFrom(networks.clone()),
                Middleware::RateLimit { average, period_ms, burst, source } => {
                    #[allow(clippy::cast_precision_loss)] // rates far below 2^52
                    let kind =
                        Kind::Rate { per_ms: *average as f64 / *period_ms as f64, burst: *burst as f64 };
                    Step::Limit(
                        shared.limiter(format!("{key}#{i}{spec:?}"), || Limiter::new(kind, source.clone())),
                    )
                }
                Middleware::InFlight { amount, source } => {
                    Step::Limit(shared.limiter(format!("{key}#{i}{spec:?}"), || {
                        Limiter::new(Kind::InFlight(*amount), source.clone())
                    }))
                }
                Middleware::ForwardAuth(f) => {
                    let uri =
                        f.address.parse::<Uri>().map_err(|e| format!("address `{}`: {e}", f.address))?;
                    Step::ForwardAuth(f.clone(), uri, shared.auth.clone())
                }
            });
        }
        Ok(Self(steps.into(), limits, compress))
    }

    /// When responses are gzipped, if they are.
    #[must_use]
    pub fn compress(&self) -> Option<&Compress> {
        self.2.as_deref()
    }

    /// The route limits the chain sets.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.1
    }

    /// Whether a step changes the path (which `VIRTUAL_DEST` also does: not both on a route).
    #[must_use]
    pub fn changes_path(&self) -> bool {
        self.0.iter().any(|s| {
            matches!(
                s,
                Step::StripPrefix(_)
                    | Step::StripPrefixRegex(_)
                    | Step::AddPrefix(_)
                    | Step::ReplacePath(_)
                    | Step::ReplacePathRegex(..)
            )
        })
    }

    /// Runs the steps in order on `req`. `Err`: the answer the client gets instead of the
    /// task's (to be [`Passed::finish`]ed too).
    pub async fn run<'a>(
        &'a self,
        req: &mut Request<Incoming>,
        cx: &Context,
    ) -> (Passed<'a>, Option<Response<ProxyBody>>) {
        let mut passed = Passed {
            headers: Vec::new(),
            origin: req.headers().get(header::ORIGIN).cloned(),
            secure: cx.secure,
            permits: Vec::new(),
            cookies: Vec::new(),
        };
        for step in self.0.iter() {
            if let Some(answer) = step.run(req, cx, &mut passed).await {
                return (passed, Some(answer));
            }
        }
        (passed, None)
    }
}

/// What the steps a request went through leave for its response.
pub struct Passed<'a> {
    headers: Vec<&'a Headers>,
    origin: Option<HeaderValue>,
    secure: bool,
    /// In-flight counts, held until the response is done.
    pub permits: Vec<Permit>,
    cookies: Vec<HeaderValue>,
}

impl Passed<'_> {
    /// Sets the response headers of the steps passed on the client's answer.
    pub fn finish(&self, headers: &mut HeaderMap) {
        for h in &self.headers {
            for (name, v) in &h.response {
                match v {
                    Some(v) => headers.insert(name.clone(), v.clone()),
                    None => headers.remove(name),
                };
            }
            if let Some((sts, always)) = &h.sts {
                if self.secure || *always {
                    headers.insert(header::STRICT_TRANSPORT_SECURITY, sts.clone());
                }
            }
            if let (Some(cors), Some(origin)) = (&h.cors, &self.origin) {
                cors_headers(cors, origin, headers);
            }
        }
        for cookie in &self.cookies {
            headers.append(header::SET_COOKIE, cookie.clone());
        }
    }
}

fn cors_headers(cors: &Cors, origin: &HeaderValue, headers: &mut HeaderMap) {
    let Some(allowed) = cors.allow(origin) else { return };
    let named = allowed != "*";
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if cors.credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if let Some(v) = &cors.expose {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
    if cors.vary && named {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn local(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(format!("meshgate: {text}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn redirect(location: &str, permanent: bool, method: &Method) -> Response<ProxyBody> {
    let status = match (permanent, method == Method::GET) {
        (true, true) => StatusCode::MOVED_PERMANENTLY,
        (true, false) => StatusCode::PERMANENT_REDIRECT,
        (false, true) => StatusCode::FOUND,
        (false, false) => StatusCode::TEMPORARY_REDIRECT,
    };
    let mut resp = local(status, &format!("moved to {location}"));
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The host the client asked for, as written (maybe with a port).
fn host_of(req: &Request<Incoming>) -> &str {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
        .unwrap_or("")
}

/// Replaces the request's path, keeping its query (and the URI's scheme and authority).
fn set_path(req: &mut Request<Incoming>, path: &str) {
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

impl Headers {
    /// Sets its request headers, or answers a CORS preflight itself.
    fn on_request(&self, req: &mut Request<Incoming>) -> Option<Response<ProxyBody>> {
        if let (Some(cors), Some(origin)) = (&self.cors, req.headers().get(header::ORIGIN)) {
            let preflight = req.method() == Method::OPTIONS
                && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
            if preflight {
                let mut resp = local(StatusCode::OK, "preflight");
                let headers = resp.headers_mut();
                if cors.allow(origin).is_some() {
                    for (name, v) in [
                        (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.methods),
                        (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.headers),
                        (header::ACCESS_CONTROL_MAX_AGE, &cors.max_age),
                    ] {
                        if let Some(v) = v {
                            headers.insert(name, v.clone());
                        }
                    }
                }
                return Some(resp);
            }
        }
        for (name, v) in &self.request {
            match v {
                Some(v) => req.headers_mut().insert(name.clone(), v.clone()),
                None => req.headers_mut().remove(name),
            };
        }
        None
    }
}

impl Step {
    /// A redirect step's answer, if the request is to be redirected.
    fn redirection(&self, req: &Request<Incoming>, cx: &Context) -> Option<Response<ProxyBody>> {
        match self {
            Self::RedirectScheme { scheme, port, permanent } => {
                let current = if cx.secure { "https" } else { "http" };
                let host = host_of(req);
                let name = host
                    .rsplit_once(':')
                    .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                    .map_or(host, |(n, _)| n);
                let port = match (port, scheme.as_str()) {
                    (Some(443), "https") | (Some(80), "http") | (None, _) => String::new(),
                    (Some(p), _) => format!(":{p}"),
                };
                if current == scheme && (port.is_empty() || host.ends_with(&port)) {
                    return None;
                }
                let pq = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
                Some(redirect(&format!("{scheme}://{name}{port}{pq}"), *permanent, req.method()))
            }
            Self::RedirectRegex { regex, replacement, permanent } => {
                let scheme = if cx.secure { "https" } else { "http" };
                let pq = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
                let old = format!("{scheme}://{}{pq}", host_of(req));
                if !regex.is_match(&old) {
                    return None;
                }
                let new = regex.replace_all(&old, replacement.as_str());
                (new != old).then(|| redirect(&new, *permanent, req.method()))
            }
            _ => None,
        }
    }

    async fn run<'a>(
        &'a self,
        req: &mut Request<Incoming>,
        cx: &Context,
        passed: &mut Passed<'a>,
    ) -> Option<Response<ProxyBody>> {
        let path = req.uri().path().to_owned();
        match self {
            Self::RedirectScheme { .. } | Self::RedirectRegex { .. } => self.redirection(req, cx),
            Self::StripPrefix(prefixes) => {
                if let Some(prefix) = prefixes.iter().find(|p| path.starts_with(p.as_str())) {
                    set_path(req, &path[prefix.len()..]);
                    if let Ok(v) = HeaderValue::from_str(prefix) {
                        req.headers_mut().insert(X_FORWARDED_PREFIX.clone(), v);
                    }
                }
                None
            }
            Self::StripPrefixRegex(regexes) => {
                let found = regexes.iter().find_map(|r| r.find(&path).filter(|m| m.start() == 0));
                if let Some(m) = found {
                    set_path(req, &path[m.end()..]);
                    if let Ok(v) = HeaderValue::from_str(m.as_str()) {
                        req.headers_mut().insert(X_FORWARDED_PREFIX.clone(), v);
                    }
                }
                None
            }
            Self::AddPrefix(prefix) => {
                set_path(req, &format!("{}{path}", prefix.trim_end_matches('/')));
                None
            }
            Self::ReplacePath(new) => {
                set_path(req, new);
                if let Ok(v) = HeaderValue::from_str(&path) {
                    req.headers_mut().insert(X_REPLACED_PATH.clone(), v);
                }
                None
            }
            Self::ReplacePathRegex(regex, replacement) => {
                if regex.is_match(&path) {
                    set_path(req, &regex.replace_all(&path, replacement.as_str()));
                    if let Ok(v) = HeaderValue::from_str(&path) {
                        req.headers_mut().insert(X_REPLACED_PATH.clone(), v);
                    }
                }
                None
            }
            Self::Headers(h) => {
                passed.headers.push(h);
                h.on_request(req)
            }
            Self::BasicAuth(auth, checker) => basic_auth(auth, checker, req).await,
            Self::AllowFrom(networks) => (!networks.iter().any(|n| n.contains(&cx.client)))
                .then(|| local(StatusCode::FORBIDDEN, "not allowed from your address")),
            Self::Limit(limiter) => match limiter.admit(req, cx) {
                Ok(permit) => {
                    passed.permits.extend(permit);
                    None
                }
                Err(wait) => {
                    let mut resp = local(StatusCode::TOO_MANY_REQUESTS, "too many requests");
                    if let Some(wait) = wait {
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
                    }
                    Some(resp)
                }
            },
            Self::ForwardAuth(spec, uri, client) => forward_auth(spec, uri, client, req, cx, passed).await,
        }
    }
}

/// Basic authentication: `Some` 401 (with the realm) until the request names a user with the
/// right password; its `Authorization` removed after when `auth` says so.
pub async fn basic_auth(
    auth: &BasicAuth,
    checker: &Arc<Checker>,
    req: &mut Request<Incoming>,
) -> Option<Response<ProxyBody>> {
    let given = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    if !checker.allows(given).await {
        let mut resp = local(StatusCode::UNAUTHORIZED, "authentication required");
        let challenge = format!("Basic realm=\"{}\"", auth.realm.replace('"', "'"));
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return Some(resp);
    }
    if let Some(field) = &auth.header_field {
        // The client's own header of that name never reaches the task: it names the user
        // that was checked, or nothing.
        let user = req.headers().get(header::AUTHORIZATION).and_then(|v| basic_user(v.as_bytes()));
        req.headers_mut().remove(field.as_str());
        if let (Some(user), Ok(name)) = (user, http::HeaderName::from_bytes(field.as_bytes())) {
            if let Ok(value) = HeaderValue::from_str(&user) {
                req.headers_mut().insert(name, value);
            }
        }
    }
    if auth.remove_header {
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    None
}

/// The user name of a `Basic` authorization value.
fn basic_user(value: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let encoded = value.strip_prefix(b"Basic ").or_else(|| value.strip_prefix(b"basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(user, _)| user.to_owned())
}

/// Asks the authentication server about `req`: `None` lets it on (with the server's
/// `response_headers` on it), `Some` is the client's answer (the server's own, or 502 when
/// it cannot be asked: never let through).
async fn forward_auth(
    spec: &crate::state::ForwardAuth,
    uri: &Uri,
    client: &AuthClient,
    req: &mut Request<Incoming>,
    cx: &Context,
    passed: &mut Passed<'_>,
) -> Option<Response<ProxyBody>> {
    let mut ask = Request::get(uri.clone()).body(Empty::<Bytes>::new()).ok()?;
    let headers = ask.headers_mut();
    for (name, v) in req.headers() {
        let wanted = spec.request_headers.is_empty()
            || spec.request_headers.iter().any(|h| h.eq_ignore_ascii_case(name.as_str()));
        if wanted
            && name != header::HOST
            && name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
        {
            headers.append(name.clone(), v.clone());
        }
    }
    // What the request is, as the proxy saw it: a client's own claims only from a trusted
    // front proxy, and only when the middleware trusts them too.
    let keep = spec.trust_forward_header && cx.trusted;
    let mut claim = |name: &'static str, v: &str| {
        let name = HeaderName::from_static(name);
        if !(keep && req.headers().contains_key(&name)) {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.insert(name, v);
            }
        }
    };
    claim("x-forwarded-method", req.method().as_str());
    claim("x-forwarded-uri", req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str));
    claim("x-forwarded-proto", if cx.secure { "https" } else { "http" });
    claim("x-forwarded-host", host_of(req));
    let answer = match tokio::time::timeout(AUTH_TIMEOUT, client.request(ask)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::warn!(address = %spec.address, "authentication server cannot be asked: {e}; request refused");
            return Some(local(StatusCode::BAD_GATEWAY, "the authentication server cannot be reached"));
        }
        Err(_) => {
            tracing::warn!(address = %spec.address, "authentication server did not answer within {AUTH_TIMEOUT:?}; request refused");
            return Some(local(StatusCode::BAD_GATEWAY, "the authentication server did not answer"));
        }
    };
    let (head, body) = answer.into_parts();
    if head.status.is_success() {
        // What the server vouches for replaces whatever the client sent under those names.
        for name in &spec.response_headers {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
            req.headers_mut().remove(&name);
            for v in head.headers.get_all(&name) {
                req.headers_mut().append(name.clone(), v.clone());
            }
        }
        for cookie in head.headers.get_all(header::SET_COOKIE) {
            let name = cookie.to_str().ok().and_then(|c| c.split('=').next()).unwrap_or("");
            if spec.add_cookies_to_response.iter().any(|n| n == name.trim()) {
                passed.cookies.push(cookie.clone());
            }
        }
        return None;
    }
    let body = http_body_util::Limited::new(body, AUTH_BODY_LIMIT)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let mut resp = Response::new(ProxyBody::local(body));
    *resp.status_mut() = head.status;
    for (name, v) in &head.headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING && name != header::CONNECTION {
            resp.headers_mut().append(name.clone(), v.clone());
        }
    }
    Some(resp)
}

/// A rate or in-flight limit's counts, by source.
pub struct Limiter {
    kind: Kind,
    source: Source,
    counts: Mutex<HashMap<String, Count>>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A token bucket: `per_ms` tokens a millisecond, at most `burst`.
    Rate {
        per_ms: f64,
        burst: f64,
    },
    InFlight(u64),
}

struct Count {
    tokens: f64,
    at: Instant,
    in_flight: u64,
}

/// One request counted as in flight until it is dropped (with the response).
pub struct Permit(Arc<Limiter>, String);

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.0.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = counts.get_mut(&self.1) {
            c.in_flight = c.in_flight.saturating_sub(1);
            if c.in_flight == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

impl Limiter {
    fn new(kind: Kind, source: Source) -> Self {
        Self { kind, source, counts: Mutex::default() }
    }

    fn key(&self, req: &Request<Incoming>, cx: &Context) -> String {
        match &self.source {
            Source::ClientIp => cx.client.to_string(),
            Source::Host => super::router::normalise_host(host_of(req)).into_owned(),
            Source::Header(name) => {
                req.headers().get(name.as_str()).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
            }
        }
    }

    /// `Ok`: the request may go on (holding a permit while in flight). `Err`: refused, with
    /// how long until a rate limit lets the source in again.
    fn admit(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        cx: &Context,
    ) -> Result<Option<Permit>, Option<Duration>> {
        let key = self.key(req, cx);
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.kind {
            Kind::Rate { per_ms, burst } => {
                if counts.len() >= SOURCES_KEPT && !counts.contains_key(&key) {
                    counts.retain(|_, c| refill(c, now, per_ms, burst) < burst);
                }
                let c = counts.entry(key).or_insert(Count { tokens: burst, at: now, in_flight: 0 });
                if refill(c, now, per_ms, burst) >= 1.0 {
                    c.tokens -= 1.0;
                    Ok(None)
                } else {
                    Err(Some(Duration::from_secs_f64((1.0 - c.tokens) / per_ms / 1000.0)))
                }
            }
            Kind::InFlight(amount) => {
                let c = counts.entry(key.clone()).or_insert(Count { tokens: 0.0, at: now, in_flight: 0 });
                if c.in_flight >= amount {
                    return Err(None);
                }
                c.in_flight += 1;
                Ok(Some(Permit(self.clone(), key)))
            }
        }
    }
}

/// Tops a bucket up for the time gone by; its tokens.
#[allow(clippy::cast_precision_loss)]
fn refill(c: &mut Count, now: Instant, per_ms: f64, burst: f64) -> f64 {
    let gone = now.duration_since(c.at).as_secs_f64() * 1000.0;
    c.tokens = (c.tokens + gone * per_ms).min(burst);
    c.at = now;
    c.tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_accepted_as_clients_say_it() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&h)
        };
        assert!(accepts("gzip, deflate, br") && accepts("br;q=1.0, gzip;q=0.5") && accepts("*"));
        assert!(!accepts("br") && !accepts("gzip;q=0") && !accepts("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
