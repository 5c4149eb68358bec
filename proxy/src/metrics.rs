//! Prometheus metrics, named `meshgate_<area>_<what>_<unit>`.
//!
//! Per-route handles are resolved once when the route table is compiled (see
//! [`RouteMetrics`]), so the request path only touches atomics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus::core::Collector;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_request_bytes: IntCounterVec,
    pub http_response_bytes: IntCounterVec,
    pub http_retries: IntCounterVec,
    pub http_in_flight: IntGauge,
    pub access_log_dropped: IntCounter,
    pub connections_open: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub route_refused: IntGaugeVec,
    pub backend_up: IntGaugeVec,
    pub state_generation: IntGauge,
    pub provider_reloads: IntCounterVec,
    pub provider_reload_rejected: IntCounterVec,
    pub provider_up: IntGaugeVec,
    pub acme_days_left: GaugeVec,
    pub acme_issued: IntCounterVec,
    pub acme_failures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = request_metrics(&registry);
        let (connections_open, connections_refused, tls_handshakes) = connection_metrics(&registry);
        let (route_refused, backend_up, state_generation) = routing_metrics(&registry);
        let (provider_reloads, provider_reload_rejected, provider_up) = provider_metrics(&registry);
        let (acme_days_left, acme_issued, acme_failures) = acme_metrics(&registry);
        process_metrics(&registry);
        Self {
            registry,
            http_requests: requests.answered,
            http_duration: requests.duration,
            http_request_bytes: requests.request_bytes,
            http_response_bytes: requests.response_bytes,
            http_retries: requests.retries,
            http_in_flight: requests.in_flight,
            access_log_dropped: requests.access_log_dropped,
            connections_open,
            connections_refused,
            tls_handshakes,
            route_refused,
            backend_up,
            state_generation,
            provider_reloads,
            provider_reload_rejected,
            provider_up,
            acme_days_left,
            acme_issued,
            acme_failures,
        }
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }

    /// The metrics of one route (`none`/`none`: requests no route took). Its series appear
    /// with its first request, as Traefik's: series for every route of a large table, most
    /// of them idle, took 2.5 KiB a route and made every scrape long.
    #[must_use]
    pub fn route(&self, route: &str, service: &str) -> RouteMetrics {
        RouteMetrics(Arc::new(RouteHandles {
            service: service.to_owned(),
            route: route.to_owned(),
            requests: self.http_requests.clone(),
            by_kind: RwLock::new(HashMap::new()),
            vecs: [
                self.http_request_bytes.clone(),
                self.http_response_bytes.clone(),
                self.http_retries.clone(),
            ],
            duration_vec: self.http_duration.clone(),
            series: OnceLock::new(),
        }))
    }
}

/// The methods requests are counted by; any other is `other` (bounded label values).
const METHODS: [&str; 10] =
    ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"];

/// What kind of exchange a request is, for the `protocol` label (Traefik's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http = 0,
    Websocket = 1,
    /// Server-sent events (`Accept: text/event-stream`).
    Sse = 2,
    Grpc = 3,
}

impl Protocol {
    const LABELS: [&str; 4] = ["http", "websocket", "sse", "grpc"];

    /// The kind of `req`, from its headers.
    #[must_use]
    pub fn of<B>(req: &http::Request<B>) -> Self {
        let h = req.headers();
        let has = |name: http::header::HeaderName, prefix: &[u8]| {
            h.get(name).is_some_and(|v| {
                v.as_bytes().len() >= prefix.len()
                    && v.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix)
            })
        };
        if has(http::header::UPGRADE, b"websocket") {
            Self::Websocket
        } else if has(http::header::CONTENT_TYPE, b"application/grpc") {
            Self::Grpc
        } else if has(http::header::ACCEPT, b"text/event-stream") {
            Self::Sse
        } else {
            Self::Http
        }
    }
}

/// A request's labels besides its route: method and protocol, packed once per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestKind(u16);

impl RequestKind {
    #[must_use]
    pub fn of<B>(req: &http::Request<B>) -> Self {
        let method = METHODS.iter().position(|m| *m == req.method().as_str()).unwrap_or(METHODS.len() - 1);
        Self(u16::try_from(method).unwrap_or(9) << 4 | Protocol::of(req) as u16)
    }
}

/// A route's counters, made once per compile; its series appear with its first request
/// (those by status, method and protocol when each is first seen).
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteHandles>);

struct RouteHandles {
    service: String,
    route: String,
    requests: IntCounterVec,
    /// By `status << 16 | kind`.
    by_kind: RwLock<HashMap<u32, IntCounter>>,
    /// Request bytes, response bytes and retries, by service and route.
    vecs: [IntCounterVec; 3],
    duration_vec: HistogramVec,
    /// This route's series of those, made when first needed.
    series: OnceLock<RouteSeries>,
}

struct RouteSeries {
    duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    retries: IntCounter,
}

impl RouteHandles {
    fn series(&self) -> &RouteSeries {
        self.series.get_or_init(|| {
            let labels = [self.service.as_str(), self.route.as_str()];
            let [request_bytes, response_bytes, retries] = &self.vecs;
            RouteSeries {
                duration: self.duration_vec.with_label_values(&labels),
                request_bytes: request_bytes.with_label_values(&labels),
                response_bytes: response_bytes.with_label_values(&labels),
                retries: retries.with_label_values(&labels),
            }
        })
    }
}

impl RouteMetrics {
    /// One answered request: its count, by status, method and protocol, and its duration.
    pub fn observe(&self, status: http::StatusCode, kind: RequestKind, seconds: f64) {
        let key = u32::from(status.as_u16()) << 16 | u32::from(kind.0);
        let known = self.0.by_kind.read().ok().and_then(|m| m.get(&key).cloned());
        let counter = known.unwrap_or_else(|| {
            let method = METHODS[usize::from(kind.0 >> 4).min(METHODS.len() - 1)];
            let protocol = Protocol::LABELS[usize::from(kind.0 & 0xf).min(3)];
            let code = status.as_str();
            let c =
                self.0.requests.with_label_values(&[&self.0.service, &self.0.route, code, method, protocol]);
            if let Ok(mut m) = self.0.by_kind.write() {
                m.insert(key, c.clone());
            }
            c
        });
        counter.inc();
        self.0.series().duration.observe(seconds);
    }

    /// Bytes of a request's body (from the client) and of its response's (to the client).
    pub fn bytes(&self, received: u64, sent: u64) {
        let series = self.0.series();
        series.request_bytes.inc_by(received);
        series.response_bytes.inc_by(sent);
    }

    /// A request sent again (on another task, or on a fresh connection).
    pub fn retried(&self) {
        self.0.series().retries.inc();
    }
}

/// Request metrics, made together.
struct Requests {
    answered: IntCounterVec,
    duration: HistogramVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    retries: IntCounterVec,
    in_flight: IntGauge,
    access_log_dropped: IntCounter,
}

/// Requests answered: counts by service, route, status, method and protocol; durations,
/// bytes and retries by service and route; those in flight; access log lines lost.
fn request_metrics(r: &Registry) -> Requests {
    let by_route = ["service", "route"];
    Requests {
        answered: counter_vec(
            r,
            "meshgate_http_requests_total",
            "HTTP requests answered, by service, route, status code, method and protocol (http, websocket, sse, grpc). route=\"none\": no route took it.",
            &["service", "route", "code", "method", "protocol"],
        ),
        duration: register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_http_request_duration_seconds",
                    "Time from request head received to response head sent, by service and route.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &by_route,
            ),
        ),
        request_bytes: counter_vec(
            r,
            "meshgate_http_request_bytes_total",
            "Bytes of request bodies received from clients (both ways of an upgraded connection: this way), by service and route.",
            &by_route,
        ),
        response_bytes: counter_vec(
            r,
            "meshgate_http_response_bytes_total",
            "Bytes of response bodies sent to clients, by service and route.",
            &by_route,
        ),
        retries: counter_vec(
            r,
            "meshgate_http_retries_total",
            "Requests sent again: on another task after a failed connect, or on a fresh connection after a kept-alive one closed under them.",
            &by_route,
        ),
        in_flight: register(r, IntGauge::new("meshgate_http_requests_in_flight", "HTTP requests being served now.")),
        access_log_dropped: register(
            r,
            IntCounter::new(
                "meshgate_access_log_dropped_total",
                "Access log lines not written because the writer fell behind (requests are never held up for the log).",
            ),
        ),
    }
}

/// The process (`process_cpu_seconds_total`, `process_resident_memory_bytes`, open fds, ...)
/// and the build (`meshgate_build_info{version}`).
fn process_metrics(r: &Registry) {
    register_collector(r, prometheus::process_collector::ProcessCollector::for_self());
    let info = register(
        r,
        IntGaugeVec::new(
            Opts::new("meshgate_build_info", "1, labelled with the running version."),
            &["version"],
        ),
    );
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
}

/// Client connections held and refused, by listener; TLS handshakes.
fn connection_metrics(r: &Registry) -> (IntGaugeVec, IntCounterVec, IntCounterVec) {
    (
        gauge_vec(
            r,
            "meshgate_connections_open",
            "Client connections held now, by listener (http, https) and protocol (http/1.1, h2; a connection is http/1.1 until its first HTTP/2 request).",
            &["listener", "protocol"],
        ),
        counter_vec(
            r,
            "meshgate_connections_refused_total",
            "Client connections refused at a limit, by listener and reason (listener_full: proxy.max_connections; client_full: proxy.max_connections_per_client).",
            &["listener", "reason"],
        ),
        counter_vec(
            r,
            "meshgate_tls_handshakes_total",
            "TLS handshakes on the HTTPS listener, by result (ok, failed, timeout).",
            &["result"],
        ),
    )
}

/// What routing stands on: refused routes, tasks up, the state's generation.
fn routing_metrics(r: &Registry) -> (IntGaugeVec, IntGaugeVec, IntGauge) {
    (
        gauge_vec(
            r,
            "meshgate_route_refused",
            "1 for each route not served because it asks for a restriction meshgate does not honour (its hosts answer 503; /api/state says why).",
            &["route", "service"],
        ),
        gauge_vec(
            r,
            "meshgate_backend_up",
            "1 while a task takes traffic, 0 while it is ejected after connect failures.",
            &["service", "task", "address"],
        ),
        register(
            r,
            IntGauge::new("meshgate_state_generation", "Generation of the routing state in force."),
        ),
    )
}

/// The providers' updates and connections.
fn provider_metrics(r: &Registry) -> (IntCounterVec, IntCounterVec, IntGaugeVec) {
    (
        counter_vec(
            r,
            "meshgate_provider_reloads_total",
            "States accepted from a provider.",
            &["provider"],
        ),
        counter_vec(
            r,
            "meshgate_provider_reload_rejected_total",
            "Provider updates rejected as invalid (the previous state stays).",
            &["provider"],
        ),
        gauge_vec(
            r,
            "meshgate_provider_up",
            "1 while a provider is connected to its source (e.g. the Docker engine), 0 while it serves its last known state.",
            &["provider"],
        ),
    )
}

/// Certificates: days left, orders issued and failed.
fn acme_metrics(r: &Registry) -> (GaugeVec, IntCounterVec, IntCounterVec) {
    (
        register(
            r,
            GaugeVec::new(
                Opts::new(
                    "meshgate_acme_certificate_days_left",
                    "Days until the stored ACME certificate expires, by certificate (its first host name).",
                ),
                &["certificate"],
            ),
        ),
        counter_vec(
            r,
            "meshgate_acme_certificates_issued_total",
            "Certificates issued or renewed through ACME by this agent.",
            &["certificate"],
        ),
        counter_vec(
            r,
            "meshgate_acme_failures_total",
            "Failed ACME orders, by certificate and reason (ca_unreachable, rate_limited, challenge_failed, ca_error, storage).",
            &["certificate", "reason"],
        ),
    )
}

/// Registers a metric the agent defines itself: its name and labels are fixed in the code,
/// so an invalid or duplicate one is a bug found by the first test, not a runtime condition.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<C>) -> C {
    let metric = metric.expect("valid metric definition");
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

/// Registers a collector the agent defines itself (metrics made at scrape time).
pub fn register_collector(registry: &Registry, collector: impl Collector + 'static) {
    registry.register(Box::new(collector)).expect("metric names are unique");
}

/// An integer counter with labels, registered.
#[must_use]
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

/// An integer gauge with labels, registered.
#[must_use]
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// The samples of counter or gauge `family` among `gathered` (one `Registry::gather`, read
/// for several families) summed by the values of `labels`: what the dashboard shows
/// (requests by route and code, mesh packets by verdict).
#[must_use]
pub fn sum_by(gathered: &[MetricFamily], family: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut out = BTreeMap::new();
    for f in gathered.iter().filter(|f| f.name() == family) {
        for m in f.get_metric() {
            let value = match f.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                _ => continue,
            };
            let label = |name: &str| {
                m.get_label().iter().find(|p| p.name() == name).map_or("", |p| p.value()).to_owned()
            };
            *out.entry(labels.iter().map(|l| label(l)).collect()).or_insert(0.0) += value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series_of(metrics: &Metrics, route: &str) -> usize {
        let text = String::from_utf8(metrics.render()).unwrap();
        text.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("route=\"{route}\""))).count()
    }

    #[test]
    fn a_routes_series_appear_with_its_first_request() {
        let metrics = Metrics::new();
        let idle: Vec<_> = (0..1000).map(|i| metrics.route(&format!("r{i}.test/"), "idle")).collect();
        let busy = metrics.route("busy.test/", "web");
        assert_eq!(series_of(&metrics, "r7.test/"), 0, "an idle route has no series");
        assert_eq!(series_of(&metrics, "busy.test/"), 0);
        busy.observe(http::StatusCode::OK, RequestKind::of(&http::Request::new(())), 0.002);
        busy.bytes(10, 20);
        let text = String::from_utf8(metrics.render()).unwrap();
        for want in [
            "meshgate_http_requests_total{code=\"200\"",
            "meshgate_http_request_duration_seconds_count{route=\"busy.test/\",service=\"web\"} 1",
            "meshgate_http_request_bytes_total{route=\"busy.test/\",service=\"web\"} 10",
            "meshgate_http_response_bytes_total{route=\"busy.test/\",service=\"web\"} 20",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert_eq!(series_of(&metrics, "r7.test/"), 0);
        drop(idle);
    }
}
