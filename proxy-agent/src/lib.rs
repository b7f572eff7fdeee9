//! kproxy agent: Kubernetes Services -> eBPF maps.
pub mod agent;
pub mod batch;
pub mod cleanup;
pub mod datapath;
pub mod explain;
pub mod healthcheck;
pub mod http;
pub mod ifaces;
pub mod incremental;
pub mod inspect;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod store;
pub mod sync;
pub mod translate;
pub mod kube;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
