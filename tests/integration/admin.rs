//! The admin listener: metrics, health, readiness, state and the dashboard.

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
    let post = http::Request::post(mesh.url("/app/upload"))
        .header("host", "admin.test")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    assert_eq!(crate::harness::send(mesh.client(), post).await.0, StatusCode::OK);
    let weird = http::Request::builder()
        .method("BREW")
        .uri(mesh.url("/app/x"))
        .header("host", "admin.test")
        .body(http_body_util::Full::default())
        .unwrap();
    crate::harness::send(mesh.client(), weird).await;

    let metrics = reqwest_text(&mesh.admin_url("/metrics")).await;
    let app = "route=\"admin.test/app\",service=\"web\"";
    for needle in [
        format!("meshgate_http_requests_total{{code=\"200\",method=\"GET\",protocol=\"http\",{app}}} 3"),
        format!("meshgate_http_requests_total{{code=\"200\",method=\"POST\",protocol=\"http\",{app}}} 1"),
        // Methods outside the standard ones share one label value (bounded cardinality).
        format!("meshgate_http_requests_total{{code=\"200\",method=\"other\",protocol=\"http\",{app}}} 1"),
        "meshgate_http_requests_total{code=\"404\",method=\"GET\",protocol=\"http\",route=\"none\",service=\"none\"} 1".into(),
        format!("meshgate_http_request_duration_seconds_count{{{app}}} 5"),
        format!("meshgate_http_request_bytes_total{{{app}}} 1000"),
        "meshgate_connections_open{listener=\"http\",protocol=\"http/1.1\"} 1".into(),
        format!("meshgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        "process_resident_memory_bytes ".into(),
        "process_open_fds ".into(),
    ] {
        assert!(metrics.contains(&needle), "/metrics lacks {needle}:\n{metrics}");
    }
    let sent: u64 = metrics
        .lines()
        .find(|l| l.starts_with(&format!("meshgate_http_response_bytes_total{{{app}}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("response bytes of the route");
    assert!(sent > 5 * 50, "five whoami answers were sent: {sent} bytes");
    for needle in [
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

    // The dashboard draws this state in the browser (see dashboard.rs).
    let page = reqwest_text(&mesh.admin_url("/")).await;
    assert!(page.contains("<title>meshgate</title>") && page.contains("fetch(\"/api/state\""), "{page}");
    assert_eq!(
        routes[1]["name"], "admin.test/app",
        "the route's metrics label, which the dashboard's rates use"
    );
    assert!(state["traffic"]["routes"].is_object() && state["ready"] == true, "{state:#}");
}
