//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.
use std::{net::SocketAddr, sync::{Arc, atomic::Ordering}};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::metrics::Metrics;

/// Serves until the task is dropped. `refresh` runs before each /metrics.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            // Read the request head (it may arrive in several segments),
            // bounded in size and time.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(head, Ok(true)) {
                return;
            }
            let req = String::from_utf8_lossy(&buf);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/healthz" => healthz(&metrics),
                "/livez" => ("200 OK", "ok\n".to_owned()),
                "/readyz" => match metrics.readiness() {
                    Ok(()) => ("200 OK", "ready\n".to_owned()),
                    Err(why) => ("503 Service Unavailable", format!("{why}\n")),
                },
                "/metrics" => {
                    refresh();
                    ("200 OK", metrics.render())
                }
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
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
