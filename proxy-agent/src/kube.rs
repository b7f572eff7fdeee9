//! Kubernetes mode: reflectors on Services, EndpointSlices and this node's
//! Node; every change (coalesced) recomputes the desired state from the
//! stores and syncs the maps. Level-triggered: a lost event is repaired by
//! the next one or by the watcher's re-list, never by trusting deletes.
use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::mpsc;

use crate::{agent::Agent, metrics::Metrics};

/// Objects labelled for another proxy implementation, and headless
/// Services' slices, are not ours (the selectors kube-proxy uses).
const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
const SLICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Builds a client from `--kubeconfig`, else in-cluster config, else the
/// default kubeconfig.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context(
            "no in-cluster config and no kubeconfig; pass --kubeconfig, or --manifests DIR for standalone mode",
        )?,
    };
    Ok(Client::try_from(config)?)
}

/// What the watchers read: (API group, resource). kube-rs watchers list and
/// watch, nothing else; the chart's ClusterRole grants exactly these.
pub const WATCHED: [(&str, &str); 3] = [("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "nodes")];
/// The verbs the watchers use on each of [`WATCHED`].
pub const WATCH_VERBS: [&str; 2] = ["list", "watch"];

/// Drives a reflector stream, signalling every change and counting errors.
/// The stream retries with backoff (including 410 Gone re-lists) forever.
fn drive<S, K>(stream: S, kind: &'static str, tx: mpsc::Sender<Instant>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => {
                    metrics.queued(crate::metrics::unix_ms());
                    let _ = tx.try_send(Instant::now());
                }
                Err(e) => {
                    metrics.api_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind, error = %e, "watch error; retrying with backoff");
                }
            }
        }
    })
}

pub async fn run(
    agent: &mut Agent,
    kubeconfig: Option<&Path>,
    metrics: &Arc<Metrics>,
    coalesce: Duration,
    sync_period: Duration,
    links: &mut mpsc::UnboundedReceiver<crate::ifaces::LinkEvent>,
) -> anyhow::Result<()> {
    let client = client(kubeconfig).await?;
    let node_name = agent.node_name().to_owned();
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let (node_store, node_writer) = reflector::store::<Node>();
    let (tx, mut rx) = mpsc::channel::<Instant>(1024);

    let svc_stream = reflector(
        svc_writer,
        watcher(Api::<Service>::all(client.clone()), watcher::Config::default().labels(SERVICE_SELECTOR)).default_backoff(),
    );
    let slice_stream = reflector(
        slice_writer,
        watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default().labels(SLICE_SELECTOR))
            .default_backoff(),
    );
    let node_stream = reflector(
        node_writer,
        watcher(Api::<Node>::all(client), watcher::Config::default().fields(&format!("metadata.name={node_name}")))
            .default_backoff(),
    );
    let tasks = [
        drive(svc_stream, "Service", tx.clone(), metrics.clone()),
        drive(slice_stream, "EndpointSlice", tx.clone(), metrics.clone()),
        drive(node_stream, "Node", tx, metrics.clone()),
    ];

    tracing::info!(node = %node_name, "waiting for the initial list of Services, EndpointSlices and the Node");
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => { for t in &tasks { t.abort(); } return Ok(()); }
        r = async {
            svc_store.wait_until_ready().await?;
            slice_store.wait_until_ready().await?;
            node_store.wait_until_ready().await
        } => { r.context("watch ended before the first list")?; }
    }
    let mut rescan = tokio::time::interval(Duration::from_millis(500));
    let mut full = tokio::time::interval(sync_period);
    full.tick().await; // the first tick is immediate
    // A sync that left something unprogrammed is retried with backoff.
    let mut backoff = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut first = true;
    let mut pending: Option<Instant> = Some(Instant::now());
    loop {
        if let Some(seen) = pending.take() {
            // Coalesce a burst: take everything already queued.
            tokio::time::sleep(coalesce).await;
            let mut oldest = seen;
            while let Ok(t) = rx.try_recv() {
                oldest = oldest.min(t);
            }
            let services: Vec<Service> = svc_store.state().iter().map(|s| (**s).clone()).collect();
            let slices: Vec<EndpointSlice> = slice_store.state().iter().map(|s| (**s).clone()).collect();
            let nodes: Vec<Node> = node_store.state().iter().map(|s| (**s).clone()).collect();
            agent.apply(&services, &slices, &nodes, oldest);
            if agent.has_failures() {
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            } else {
                retry_at = None;
                backoff = Duration::from_secs(1);
            }
            if first {
                // Ready means programmed and attached (interfaces were
                // attached before the first sync).
                metrics.ready.store(true, Ordering::Relaxed);
                tracing::info!(services = services.len(), slices = slices.len(), "first full sync programmed; ready");
                first = false;
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            t = rx.recv() => match t {
                Some(t) => pending = Some(t),
                None => break,
            },
            ev = links.recv() => {
                if let Some(ev) = ev {
                    agent.on_link_event(ev);
                }
            }
            _ = rescan.tick() => agent.retry_attach(),
            _ = full.tick() => {
                agent.request_resync();
                pending = Some(Instant::now());
            }
            () = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => pending = Some(Instant::now()),
        }
    }
    for t in &tasks {
        t.abort();
    }
    Ok(())
}
