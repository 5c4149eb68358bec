//! Prometheus metrics, named `meshgate_<area>_<what>_<unit>`.
//!
//! Per-route handles are resolved once when the route table is compiled (see
//! [`RouteMetrics`]), so the request path only touches atomics.

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub access_log_dropped: IntCounter,
    pub connections_open: IntGaugeVec,
    pub connections_refused: IntCounterVec,
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
        let (http_requests, http_duration, http_in_flight, access_log_dropped) = request_metrics(&registry);
        let (connections_open, connections_refused) = connection_metrics(&registry);
        let (route_refused, backend_up, state_generation) = routing_metrics(&registry);
        let (provider_reloads, provider_reload_rejected, provider_up) = provider_metrics(&registry);
        let (acme_days_left, acme_issued, acme_failures) = acme_metrics(&registry);
        Self {
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            access_log_dropped,
            connections_open,
            connections_refused,
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

    /// Resolves the label handles of one route.
    #[must_use]
    pub fn route(&self, route: &str) -> RouteMetrics {
        let class = |c: &str| self.http_requests.with_label_values(&[route, c]);
        RouteMetrics {
            by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: self.http_duration.with_label_values(&[route]),
        }
    }
}

/// A route's counters, resolved once per compile.
#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }
}

/// Requests answered: counts and durations by route, those in flight, access log lines lost.
fn request_metrics(r: &Registry) -> (IntCounterVec, HistogramVec, IntGauge, IntCounter) {
    (
        counter_vec(
            r,
            "meshgate_http_requests_total",
            "HTTP requests answered, by route and status class (2xx, 4xx, ...).",
            &["route", "class"],
        ),
        register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_http_request_duration_seconds",
                    "Time from request head received to response head sent, by route.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["route"],
            ),
        ),
        register(r, IntGauge::new("meshgate_http_requests_in_flight", "HTTP requests being served now.")),
        register(
            r,
            IntCounter::new(
                "meshgate_access_log_dropped_total",
                "Access log lines not written because the writer fell behind (requests are never held up for the log).",
            ),
        ),
    )
}

/// Client connections held and refused, by listener.
fn connection_metrics(r: &Registry) -> (IntGaugeVec, IntCounterVec) {
    (
        gauge_vec(
            r,
            "meshgate_connections_open",
            "Client connections held now, by listener (http, https).",
            &["listener"],
        ),
        counter_vec(
            r,
            "meshgate_connections_refused_total",
            "Client connections refused at a limit, by listener and reason (listener_full: proxy.max_connections; client_full: proxy.max_connections_per_client).",
            &["listener", "reason"],
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
