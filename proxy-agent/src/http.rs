//! `/healthz`, `/livez`, `/readyz` and `/metrics`, served with axum.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::metrics::Metrics;

#[derive(Clone)]
struct Ctx {
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
}

/// Serves until the task is dropped. `refresh` runs before each /metrics.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, refresh: Arc<dyn Fn() + Send + Sync>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!(%addr, "serving /healthz /livez /readyz /metrics");
    let app = Router::new()
        .route("/healthz", get(|State(c): State<Ctx>| async move { healthz_response(&c.metrics) }))
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(c): State<Ctx>| async move {
                match c.metrics.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(c): State<Ctx>| async move {
                (c.refresh)();
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], c.metrics.render())
            }),
        )
        .with_state(Ctx { metrics, refresh });
    axum::serve(listener, app).await?;
    Ok(())
}

fn healthz_response(metrics: &Metrics) -> impl IntoResponse + use<> {
    let (status, body) = healthz(metrics);
    let code = if status.starts_with("200") { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

/// kube-proxy's `/healthz`: 503 while a queued change has waited longer
/// than twice the sync period without being programmed, or while the Node is
/// being deleted or tainted for deletion (so load balancers drain it); JSON
/// body with `lastUpdated`, `currentTime` and `nodeEligible`.
fn healthz(metrics: &Metrics) -> (&'static str, String) {
    let rfc3339 = |ms: u64| {
        k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).map(|t| t.to_string()).unwrap_or_default()
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let eligible = !metrics.node_ineligible.load(Ordering::Relaxed);
    let healthy = metrics.proxier_healthy(now) && eligible;
    let body = serde_json::json!({
        "lastUpdated": rfc3339(metrics.last_updated_ms.load(Ordering::Relaxed)),
        "currentTime": rfc3339(now),
        "nodeEligible": eligible,
    })
    .to_string();
    (if healthy { "200 OK" } else { "503 Service Unavailable" }, body)
}
