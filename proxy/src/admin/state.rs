//! `/api/state`: what the agent serves and why, in one document the dashboard draws. Routes
//! as the proxy uses them (each task's live state), problems and conflicts, readiness, the
//! cluster's nodes, certificates, the mesh's port table, and running totals (requests by
//! route, mesh packets) that the dashboard turns into rates.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::AdminState;
use crate::metrics::sum_by;
use crate::tls::CertInfo;

pub fn state_json(s: &AdminState) -> Value {
    let snapshot = s.hub.load();
    let table = s.proxy.table.load();
    let mut routes: Vec<_> = table
        .routes()
        .map(|(host, r)| {
            json!({
                "host": host,
                "path": r.path,
                "name": r.name,
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
    let (ready, components) = s.readiness.report();
    json!({
        "generation": snapshot.generation,
        "ready": ready,
        "components": components,
        "routes": routes,
        "conflicts": table.conflicts,
        "problems": snapshot.state.problems.iter().chain(&table.unreachable).collect::<Vec<_>>(),
        "nodes": snapshot.state.nodes,
        "certificates": certificates(s),
        "mesh": s.mesh.get(),
        "traffic": traffic(s, &routes),
        "services": without_secrets(serde_json::to_value(&snapshot.state.services).unwrap_or_default()),
    })
}

/// Every certificate served, by the name it is served for, with its issuer; an ACME one also
/// with its next renewal and last failure. A certificate ACME keeps but has not obtained yet
/// is listed too (`pending`), with why.
fn certificates(s: &AdminState) -> Vec<Value> {
    let Some(resolver) = &s.certificates else { return Vec::new() };
    let kept = s.acme.as_ref().map(|k| k.read().expect("inventory lock").clone()).unwrap_or_default();
    let when = |t: Option<SystemTime>| t.map(httpdate::fmt_http_date);
    let now = SystemTime::now();
    let mut obtained = std::collections::HashSet::new();
    let mut out: Vec<Value> = resolver
        .served()
        .into_iter()
        .filter_map(|(source, name, key)| {
            let info = CertInfo::parse(key.cert.first()?).ok()?;
            let left = match info.not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let acme = (source == "acme")
                .then(|| kept.iter().find(|(_, k)| info.covers(&k.names)))
                .flatten()
                .inspect(|(primary, _)| {
                    obtained.insert((*primary).clone());
                });
            Some(json!({
                "name": name,
                "source": source,
                "covers": info.dns_names,
                "issuer": info.issuer,
                "not_before": httpdate::fmt_http_date(info.not_before),
                "not_after": httpdate::fmt_http_date(info.not_after),
                "not_after_seconds": info.not_after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                "days_left": left / 86_400.0,
                "next_renewal": acme.and_then(|(_, k)| when(k.next_renewal)),
                "last_error": acme.and_then(|(_, k)| k.last_error.clone()),
            }))
        })
        .collect();
    for (primary, k) in kept.iter().filter(|(p, _)| !obtained.contains(*p)) {
        out.push(json!({
            "name": primary,
            "source": "acme",
            "covers": k.names,
            "pending": true,
            "last_error": k.last_error,
        }));
    }
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

/// Running totals from the metrics: requests and server errors by route (the routes in force
/// only: the counters of a route that went stay in the registry), mesh packets by verdict
/// and by published port.
fn traffic(s: &AdminState, in_force: &[Value]) -> Value {
    let names: std::collections::HashSet<&str> = in_force.iter().filter_map(|r| r["name"].as_str()).collect();
    let gathered = s.metrics.registry.gather();
    let mut routes = serde_json::Map::new();
    for (labels, n) in sum_by(&gathered, "meshgate_http_requests_total", &["route", "code"]) {
        let [route, code] = &labels[..] else { continue };
        if !names.contains(route.as_str()) {
            continue;
        }
        let entry = routes.entry(route.clone()).or_insert_with(|| json!({"requests": 0.0, "errors": 0.0}));
        entry["requests"] = json!(entry["requests"].as_f64().unwrap_or(0.0) + n);
        if code.starts_with('5') {
            entry["errors"] = json!(entry["errors"].as_f64().unwrap_or(0.0) + n);
        }
    }
    let by = |family: &str, labels: &[&str]| -> serde_json::Map<String, Value> {
        sum_by(&gathered, family, labels).into_iter().map(|(k, n)| (k.join("/"), json!(n))).collect()
    };
    json!({
        "routes": routes,
        "mesh_verdicts": by("meshgate_mesh_packets_total", &["verdict"]),
        "mesh_ports": by("meshgate_mesh_port_packets_total", &["protocol", "port"]),
    })
}

/// The services as `/api/state` shows them: basic auth users by name only (their hashes
/// stay in the agent and the cluster feed).
fn without_secrets(mut services: Value) -> Value {
    let redact = |users: &mut Value| {
        for user in users.as_array_mut().into_iter().flatten() {
            let name = user.as_str().and_then(|u| u.split_once(':')).map(|(n, _)| n.to_owned());
            *user = json!(format!("{}:REDACTED", name.unwrap_or_default()));
        }
    };
    for service in services.as_array_mut().into_iter().flatten() {
        for route in service["http"].as_array_mut().into_iter().flatten() {
            for (key, value) in route.as_object_mut().into_iter().flatten() {
                match key.as_str() {
                    "basic_auth" => redact(&mut value["users"]),
                    "middlewares" => value
                        .as_array_mut()
                        .into_iter()
                        .flatten()
                        .filter(|m| m["kind"] == "basic_auth")
                        .for_each(|m| redact(&mut m["users"])),
                    _ => {}
                }
            }
        }
    }
    services
}
