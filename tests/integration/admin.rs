//! The admin listener: metrics, health, readiness, state and the status page.

use http::StatusCode;

use crate::harness::{service, Backend, Mesh};
use crate::resilience::reqwest_text;

#[tokio::test]
async fn admin_endpoints_show_traffic_state_and_health() {
    let web = Backend::start("web").await;
    let mesh = Mesh::start(&service("web", &["Admin.test", "*.admin.test"], "/app", &[&web])).await;
    for _ in 0..3 {
        assert_eq!(mesh.get("admin.test", "/app/x").await.0, StatusCode::OK);
    }
    assert_eq!(mesh.get("admin.test", "/elsewhere").await.0, StatusCode::NOT_FOUND);

    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    for needle in [
        "meshgate_http_requests_total{class=\"2xx\",route=\"admin.test/app\"} 3",
        "meshgate_http_requests_total{class=\"4xx\",route=\"none\"} 1",
        "meshgate_http_request_duration_seconds_count{route=\"admin.test/app\"} 3",
        "meshgate_http_requests_in_flight 0",
        "meshgate_state_generation 1",
        "meshgate_provider_reloads_total{provider=\"file\"} 1",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}:\n{metrics}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with("meshgate_backend_up{")
            && l.contains(&web.addr.to_string())
            && l.ends_with(" 1")),
        "{metrics}"
    );

    assert_eq!(reqwest_text(&mesh.admin_url("/healthz")).await, "ok\n");
    let ready: serde_json::Value =
        serde_json::from_str(&reqwest_text(&mesh.admin_url("/readyz")).await).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["components"]["file"]["ready"], true);

    let state: serde_json::Value =
        serde_json::from_str(&reqwest_text(&mesh.admin_url("/api/state")).await).unwrap();
    assert_eq!(state["generation"], 1);
    let routes = state["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "one entry per host pattern: {state:#}");
    assert_eq!(routes[0]["host"], "*.admin.test");
    assert_eq!(routes[1]["host"], "admin.test");
    assert_eq!(routes[1]["path"], "/app");
    assert_eq!(routes[1]["endpoints"][0]["address"], web.addr.to_string());
    assert_eq!(state["services"][0]["tasks"][0]["node"], "local");

    let page = reqwest_text(&mesh.admin_url("/")).await;
    assert!(page.contains("<td>admin.test</td>") && page.contains(&web.addr.to_string()), "{page}");
}
