//! The agent core shared by standalone and Kubernetes modes: objects in,
//! translation, map sync, interface attachment, metrics.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    datapath::{self, Datapath, DatapathConfig, PinnedMaps},
    metrics::Metrics,
    sync::{SyncEngine, SyncReport},
    translate::{self, NodeInfo, Skip, ZONE_LABEL},
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    /// Interface names or `prefix*` patterns to attach to.
    pub interfaces: Vec<String>,
    pub node_name: String,
    /// NodePort addresses when no Node object says otherwise.
    pub node_ips: Vec<IpAddr>,
}

pub struct Agent {
    cfg: AgentConfig,
    datapath: Datapath,
    engine: SyncEngine<PinnedMaps>,
    metrics: Arc<Metrics>,
    attached: BTreeSet<String>,
    last_skipped: BTreeSet<Skip>,
    last_failed: BTreeSet<(String, String)>,
    cache: translate::TranslationCache,
}

/// This node's translation inputs: the Node object when there is one,
/// otherwise the configured name and addresses.
#[must_use]
pub fn node_info(cfg: &AgentConfig, nodes: &[Node]) -> NodeInfo {
    let node = nodes.iter().find(|n| n.metadata.name.as_deref() == Some(cfg.node_name.as_str()));
    let zone = node.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(ZONE_LABEL)).cloned();
    let mut addresses: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    for ip in &cfg.node_ips {
        if !addresses.contains(ip) {
            addresses.push(*ip);
        }
    }
    NodeInfo { name: cfg.node_name.clone(), zone, addresses }
}

impl Agent {
    /// Loads the datapath (adopting pinned maps) and reads back the maps.
    pub fn start(cfg: AgentConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let datapath = Datapath::load(&cfg.datapath)?;
        let maps = PinnedMaps::open(&cfg.datapath.pin_dir())?;
        let engine = SyncEngine::adopt(maps)?;
        let (f, b) = engine.counts();
        tracing::info!(frontends = f, backends = b, pin_dir = %cfg.datapath.pin_dir().display(), "datapath loaded, maps adopted");
        Ok(Self { cfg, datapath, engine, metrics, attached: BTreeSet::new(), last_skipped: BTreeSet::new(), last_failed: BTreeSet::new(), cache: translate::TranslationCache::default() })
    }

    /// Attaches to every matching interface not attached yet. Errors are
    /// logged per interface and never stop the agent.
    pub fn attach_interfaces(&mut self) -> anyhow::Result<usize> {
        let names = datapath::matching_interfaces(&self.cfg.interfaces)?;
        let mut n = 0;
        for name in &names {
            if self.attached.contains(name) {
                continue;
            }
            match self.datapath.attach(name) {
                Ok(()) => {
                    self.attached.insert(name.clone());
                    n += 1;
                }
                Err(e) => tracing::warn!(iface = %name, error = format!("{e:#}"), "cannot attach"),
            }
        }
        self.attached.retain(|a| names.contains(a));
        if names.is_empty() {
            tracing::warn!(patterns = ?self.cfg.interfaces, "no interface matches --interfaces; no traffic is translated");
        }
        Ok(n)
    }

    #[must_use]
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    #[must_use]
    pub fn attached(&self) -> &BTreeSet<String> {
        &self.attached
    }

    /// Programs the maps from the full set of objects.
    pub fn apply(&mut self, services: &[Service], slices: &[EndpointSlice], nodes: &[Node], seen_at: Instant) -> SyncReport {
        let start = Instant::now();
        let node = node_info(&self.cfg, nodes);
        let desired = translate::translate_all_cached(services, slices, &node, &mut self.cache);
        let report = self.engine.sync(&desired);
        let udp_gone: BTreeSet<u32> = report
            .removed_backends
            .iter()
            .filter(|(_, b)| b.proto == proxy_common::IPPROTO_UDP)
            .map(|(id, _)| *id)
            .collect();
        let flushed = self.engine.maps_mut().flush_conntrack(&udp_gone);
        if flushed > 0 {
            tracing::info!(entries = flushed, backends = udp_gone.len(), "flushed conntrack of removed UDP backends");
        }
        let now = Instant::now();
        self.metrics.observe_sync(now - start);
        if report.writes + report.deletes > 0 {
            self.metrics.observe_change_to_write(now - seen_at);
        }
        self.report(&desired.skipped, &report);
        report
    }

    fn report(&mut self, skipped: &[Skip], report: &SyncReport) {
        let now: BTreeSet<Skip> = skipped.iter().cloned().collect();
        for s in now.difference(&self.last_skipped) {
            if s.reason == translate::SkipReason::NotProxied {
                tracing::debug!(object = %s.owner, reason = %s.reason, "not programmed");
            } else {
                tracing::warn!(object = %s.owner, reason = %s.reason, "skipped");
            }
        }
        let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
        for s in &now {
            *by_reason.entry(s.reason.label().to_owned()).or_default() += 1;
        }
        self.metrics.set_skipped(by_reason);
        self.last_skipped = now;
        // Warn once per (object, error), not on every sync.
        let failed: BTreeSet<(String, String)> = report.failed.iter().cloned().collect();
        for (owner, err) in failed.difference(&self.last_failed) {
            tracing::warn!(object = %owner, error = %err, "could not program; other Services are unaffected");
        }
        self.last_failed = failed;
        self.metrics.sync_errors.fetch_add(report.failed.len() as u64, Ordering::Relaxed);
        self.metrics.frontends.store(report.frontends as u64, Ordering::Relaxed);
        self.metrics.backends.store(report.backends as u64, Ordering::Relaxed);
        let entries = self.engine.service_entries();
        self.metrics.set_map_fill(proxy_common::MAP_SERVICES, entries as u64, u64::from(self.cfg.datapath.max_services));
        self.metrics.set_map_fill(proxy_common::MAP_BACKENDS, report.backends as u64, u64::from(self.cfg.datapath.max_backends));
        if report.writes + report.deletes > 0 {
            tracing::info!(
                writes = report.writes,
                deletes = report.deletes,
                frontends = report.frontends,
                backends = report.backends,
                "maps synced"
            );
        }
    }
}
