//! Kubernetes mode: watchers on Services, EndpointSlices and this node's
//! Node, their objects stripped to what translation reads. Every event
//! names the Services it touches (an EndpointSlice's is its service-name
//! label); a coalesced batch re-translates only those and writes only what
//! changed (the incremental path). A re-list, a Node change, a retry after a
//! failure and the periodic resync run the full path: every Service from the
//! stores, every frontend diffed against the maps. Level-triggered: a lost
//! event is repaired by the watcher's re-list or the periodic full sync,
//! never by trusting deletes.
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

use crate::{
    agent::Agent,
    incremental::{ServiceId, service_id},
    metrics::Metrics,
    store::{SliceIndex, strip_node, strip_service, strip_slice},
};

/// What a watch event asks of the sync loop.
enum Msg {
    /// One Service (and its slices) to re-translate.
    Service(ServiceId),
    /// An EndpointSlice event, applied to the slice index by the loop.
    Slice(Box<watcher::Event<EndpointSlice>>),
    /// Everything (a re-list, the Node changed).
    All,
}

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

/// Drives a watch stream, passing every event (as `to_msg` names it) to
/// the sync loop and counting errors. The stream retries with backoff
/// (including 410 Gone re-lists) forever.
fn drive<S, K>(
    stream: S,
    kind: &'static str,
    to_msg: fn(watcher::Event<K>) -> Option<Msg>,
    tx: mpsc::UnboundedSender<(Instant, Msg)>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    if let Some(m) = to_msg(ev) {
                        metrics.queued(crate::metrics::unix_ms());
                        let _ = tx.send((Instant::now(), m));
                    }
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
    let (node_store, node_writer) = reflector::store::<Node>();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Msg)>();

    // Stores keep only what translation reads (no managedFields, most
    // labels and annotations, owners, selectors, Node images...).
    let svc_stream = reflector(
        svc_writer,
        watcher(Api::<Service>::all(client.clone()), watcher::Config::default().labels(SERVICE_SELECTOR))
            .default_backoff()
            .modify(strip_service),
    );
    let slice_stream =
        watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default().labels(SLICE_SELECTOR))
            .default_backoff()
            .modify(strip_slice);
    let node_stream = reflector(
        node_writer,
        watcher(Api::<Node>::all(client), watcher::Config::default().fields(&format!("metadata.name={node_name}")))
            .default_backoff()
            .modify(strip_node),
    );
    let tasks = [
        drive(
            svc_stream,
            "Service",
            |ev| match ev {
                watcher::Event::Apply(s) | watcher::Event::Delete(s) => Some(Msg::Service(service_id(&s))),
                watcher::Event::InitDone => Some(Msg::All),
                watcher::Event::Init | watcher::Event::InitApply(_) => None,
            },
            tx.clone(),
            metrics.clone(),
        ),
        drive(slice_stream, "EndpointSlice", |ev| Some(Msg::Slice(Box::new(ev))), tx.clone(), metrics.clone()),
        drive(
            node_stream,
            "Node",
            |ev| match ev {
                watcher::Event::Init | watcher::Event::InitApply(_) => None,
                _ => Some(Msg::All),
            },
            tx,
            metrics.clone(),
        ),
    ];
    // The slices, indexed by Service; fed by the loop from the events.
    let mut slices = SliceIndex::default();
    let mut dirty: std::collections::HashSet<ServiceId> = std::collections::HashSet::new();
    let mut full_due = true;
    let handle = |slices: &mut SliceIndex, dirty: &mut std::collections::HashSet<ServiceId>, full_due: &mut bool, m: Msg| match m {
        Msg::Service(id) => {
            dirty.insert(id);
        }
        Msg::All => *full_due = true,
        Msg::Slice(ev) => match slices.on_event(*ev) {
            Some(ids) => dirty.extend(ids),
            None => *full_due = true,
        },
    };

    tracing::info!(node = %node_name, "waiting for the initial list of Services, EndpointSlices and the Node");
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => { for t in &tasks { t.abort(); } return Ok(()); }
        r = async {
            svc_store.wait_until_ready().await?;
            node_store.wait_until_ready().await?;
            while !slices.is_ready() {
                let Some((_, m)) = rx.recv().await else { anyhow::bail!("EndpointSlice watch ended") };
                handle(&mut slices, &mut dirty, &mut full_due, m);
            }
            anyhow::Ok(())
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
            while let Ok((t, m)) = rx.try_recv() {
                oldest = oldest.min(t);
                handle(&mut slices, &mut dirty, &mut full_due, m);
            }
            let nodes: Vec<Node> = node_store.state().iter().map(|s| (**s).clone()).collect();
            if !full_due && !dirty.is_empty() {
                // The incremental path: only the Services events named.
                let svcs: Vec<(ServiceId, Option<Arc<Service>>)> = dirty
                    .drain()
                    .map(|id| {
                        let svc = svc_store.get(&reflector::ObjectRef::new(&id.1).within(&id.0));
                        (id, svc)
                    })
                    .collect();
                let changed = svcs.iter().map(|(id, svc)| (id.clone(), svc.as_deref(), slices.slices_of(id)));
                full_due = agent.apply_changes(changed, &nodes, oldest).is_none();
            }
            if full_due {
                let services = svc_store.state();
                agent.apply(services.iter().map(|s| &**s), slices.all(), &nodes, oldest);
                full_due = false;
                dirty.clear();
            }
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
                tracing::info!(services = svc_store.state().len(), slices = slices.len(), "first full sync programmed; ready");
                first = false;
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            t = rx.recv() => match t {
                Some((t, m)) => {
                    handle(&mut slices, &mut dirty, &mut full_due, m);
                    pending = Some(t);
                }
                None => break,
            },
            ev = links.recv() => {
                if let Some(ev) = ev {
                    agent.on_link_event(ev);
                }
            }
            _ = rescan.tick() => {
                agent.retry_attach();
                agent.flush_names();
            }
            _ = full.tick() => {
                agent.request_resync();
                full_due = true;
                pending = Some(Instant::now());
            }
            () = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                // Failed frontends are retried by a full diff.
                full_due = true;
                pending = Some(Instant::now());
            }
        }
    }
    for t in &tasks {
        t.abort();
    }
    Ok(())
}
