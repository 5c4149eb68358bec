//! What a route does to a request on its way to a task, in the order the route lists it
//! (Traefik's middlewares): plain data that travels in the cluster feed, so every node serves
//! a route the same way. `http::middleware` compiles and runs it.

use serde::{Deserialize, Serialize};

use super::BasicAuth;

/// One step of a route's chain. Steps that answer (a redirect, a refusal) end the chain;
/// the others change the request and, through [`Headers`], the response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Middleware {
    /// Redirects a request on another scheme to `scheme` (and `port`); 301/308 when
    /// permanent, else 302/307 (the 30x that keeps the method for other methods than GET).
    RedirectScheme { scheme: String, port: Option<u16>, permanent: bool },
    /// Redirects a request whose URL (`scheme://host/path?query`) matches `regex` to
    /// `replacement` (`$1`, `${name}` expanded).
    RedirectRegex { regex: String, replacement: String, permanent: bool },
    /// Removes the first of `prefixes` the path starts with; the task learns it from
    /// `X-Forwarded-Prefix`.
    StripPrefix { prefixes: Vec<String> },
    /// Removes what the first of `regexes` matches at the start of the path
    /// (`X-Forwarded-Prefix` says what).
    StripPrefixRegex { regexes: Vec<String> },
    /// Puts `prefix` before the path.
    AddPrefix { prefix: String },
    /// Replaces the path (the old one goes in `X-Replaced-Path`).
    ReplacePath { path: String },
    /// Replaces what `regex` matches in the path with `replacement` (`X-Replaced-Path`: the
    /// old one).
    ReplacePathRegex { regex: String, replacement: String },
    /// Request and response headers, security headers, CORS.
    Headers(Headers),
    /// Users who may go on (401 with `WWW-Authenticate` to the others).
    BasicAuth(BasicAuth),
    /// Only clients from these networks go on; others get 403.
    AllowFrom { networks: Vec<ipnet::IpNet> },
    /// At most `average` requests per `period_ms` per source, with bursts of `burst`; 429
    /// past it.
    RateLimit { average: u64, period_ms: u64, burst: u64, source: Source },
    /// At most `amount` requests in flight per source; 429 past it.
    InFlight { amount: u64, source: Source },
    /// Asks `address` (a GET with the request's headers) whether the request may go on: 2xx
    /// lets it on, anything else is the client's answer.
    ForwardAuth(ForwardAuth),
    /// Tries a request `attempts` times in all while its task cannot be reached (nothing was
    /// sent), waiting `initial_interval_ms`, doubled each time, between tries.
    Retry { attempts: u32, initial_interval_ms: u64 },
    /// Request bodies larger than `max_request_body` bytes are refused (413).
    Buffering { max_request_body: Option<u64> },
    /// Responses are gzipped for clients that accept it: those of at least `min_bytes`
    /// (when their length is known), of a content type in `included` (if any) and not in
    /// `excluded`.
    Compress {
        min_bytes: u64,
        #[serde(default)]
        excluded: Vec<String>,
        #[serde(default)]
        included: Vec<String>,
    },
}

/// What a rate or in-flight limit counts by.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The client's address (the one a trusted balancer's PROXY header names).
    #[default]
    ClientIp,
    /// The `Host` asked for.
    Host,
    /// The value of a request header (requests without it share one count).
    Header(String),
}

/// Header changes (Traefik's `headers` middleware). An empty value removes the header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headers {
    /// Set on the request before it goes to the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request: Vec<(String, String)>,
    /// Set on the response the client gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response: Vec<(String, String)>,
    /// `Strict-Transport-Security`, sent over HTTPS only unless `sts_always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts: Option<String>,
    #[serde(default)]
    pub sts_always: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
}

/// Cross-origin resource sharing: which origins may read the responses, and the answer to
/// a preflight `OPTIONS` (given by the proxy, as Traefik does).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cors {
    /// Origins allowed as written (`*`: any).
    pub allow_origins: Vec<String>,
    /// Origins allowed by a regular expression.
    #[serde(default)]
    pub allow_origin_regexes: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default)]
    pub max_age: Option<u64>,
    /// `Vary: Origin` on answers that name the origin.
    #[serde(default)]
    pub add_vary: bool,
}

/// Delegated authentication (Traefik's `forwardAuth`, as Authelia, Authentik and
/// oauth2-proxy use it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardAuth {
    /// `http://` URL of the authentication server.
    pub address: String,
    /// Keep the client's `X-Forwarded-*` (else the proxy's own view of them).
    #[serde(default)]
    pub trust_forward_header: bool,
    /// Headers of the server's 2xx answer copied onto the request.
    #[serde(default)]
    pub response_headers: Vec<String>,
    /// Only these request headers go to the server (empty: all).
    #[serde(default)]
    pub request_headers: Vec<String>,
    /// `Set-Cookie` of the server's 2xx answer added to the response.
    #[serde(default)]
    pub add_cookies_to_response: Vec<String>,
}
