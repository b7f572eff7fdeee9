//! The agent core shared by standalone and Kubernetes modes: objects in,
//! translation, map sync, interface attachment, metrics.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use anyhow::Context as _;

use crate::{
    datapath::{self, Datapath, DatapathConfig, Iface, PinnedMaps},
    ifaces::{Link, LinkEvent},
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
    /// Choose backends by Maglev tables (consistent) instead of at random.
    pub maglev: bool,
    /// `--nodeport-addresses`: NodePorts on the local IPv4 addresses in
    /// these prefixes instead of the Node's primary addresses (empty).
    pub nodeport_cidrs: Vec<(std::net::Ipv4Addr, u8)>,
}

/// An interface whose attach failed, retried with backoff.
struct Retry {
    iface: Iface,
    at: Instant,
    backoff: Duration,
}

pub struct Agent {
    cfg: AgentConfig,
    datapath: Datapath,
    engine: SyncEngine<PinnedMaps>,
    metrics: Arc<Metrics>,
    /// Attached interfaces by index.
    attached: BTreeMap<u32, Iface>,
    retry: BTreeMap<u32, Retry>,
    /// Every link present (index -> name), for pruning stale pins.
    links: BTreeMap<u32, String>,
    migration_done: bool,
    /// The next sync re-reads the maps first (periodic full resync).
    reload_due: bool,
    last_skipped: BTreeSet<Skip>,
    last_failed: BTreeSet<(String, String)>,
    /// The desired state by Service, updated incrementally.
    index: crate::incremental::Index,
    /// Frontends changed since the names file was last written.
    names_due: bool,
    /// The last full sync, and every incremental one since, programmed
    /// everything desired (nothing waits for a retry).
    clean: bool,
    /// Backend sets without a Maglev table at the last sync (map full).
    last_no_table: usize,
    /// This network namespace's IPv4 addresses (for `--nodeport-addresses`),
    /// refreshed with the interfaces.
    local_addrs: Vec<std::net::Ipv4Addr>,
    /// The SNAT address last written to the datapath.
    snat: Option<Option<std::net::Ipv4Addr>>,
    /// healthCheckNodePort listeners.
    health: crate::healthcheck::HealthServer,
    /// What was last seen of each Service and its slices (kube-proxy's
    /// change counters, network programming latency).
    versions: std::collections::HashMap<ServiceId, SeenVersions>,
    /// Health check port of each Service that has one.
    health_checks: BTreeMap<ServiceId, (u16, crate::healthcheck::HealthCheck)>,
    /// Counts full syncs: a Service a full sync did not see is gone.
    generation: u64,
}

type ServiceId = crate::incremental::ServiceId;

/// A Service's resourceVersion (`None`: no Service object, only slices) and
/// its slices' (name, resourceVersion, trigger time).
#[derive(Default)]
struct SeenVersions {
    service: Option<Option<String>>,
    /// Sorted by name, one entry per name: a `Vec`, as most Services have
    /// one slice and a B-tree node would cost most of a kilobyte each.
    slices: Vec<SeenSlice>,
    /// The full sync that last saw the Service ([`Agent::full_sync`]).
    generation: u64,
}

/// A slice's name, resourceVersion and trigger time.
type SeenSlice = (String, Option<String>, Option<String>);

impl SeenVersions {
    fn slice(&self, name: &str) -> Option<&SeenSlice> {
        self.slices.binary_search_by(|s| s.0.as_str().cmp(name)).ok().map(|i| &self.slices[i])
    }
}

/// Whether `ip` lies in `net/len`.
fn in_prefix(ip: std::net::Ipv4Addr, (net, len): (std::net::Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Parses `--nodeport-addresses` (CIDRs; `primary` or nothing: the Node's
/// primary addresses).
pub fn parse_nodeport_cidrs(list: &[String]) -> anyhow::Result<Vec<(std::net::Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    for s in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty() && *s != "primary") {
        let (ip, len) = s.split_once('/').ok_or_else(|| anyhow::anyhow!("--nodeport-addresses: {s:?} is not a CIDR (a.b.c.d/n)"))?;
        if ip.contains(':') {
            tracing::warn!(cidr = s, "--nodeport-addresses: IPv6 is not supported by the datapath yet; ignored");
            continue;
        }
        let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("--nodeport-addresses: {s:?}"))?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| anyhow::anyhow!("--nodeport-addresses: bad prefix length in {s:?}"))?;
        out.push((ip, len));
    }
    Ok(out)
}

/// This network namespace's IPv4 addresses (getifaddrs).
fn local_ipv4_addrs() -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            out.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

/// Reserves the SNAT ports in `net.ipv4.ip_local_reserved_ports`, so the
/// node's own sockets never bind one implicitly; warns when the ephemeral
/// range overlaps it.
fn reserve_snat_ports((min, max): (u16, u16)) {
    let path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let range = format!("{min}-{max}");
    match std::fs::read_to_string(path) {
        Ok(cur) if cur.split(',').any(|r| r.trim() == range || (min == max && r.trim() == min.to_string())) => {}
        Ok(cur) => {
            let new = if cur.trim().is_empty() { range.clone() } else { format!("{},{range}", cur.trim()) };
            if let Err(e) = std::fs::write(path, &new) {
                tracing::warn!(error = %e, ports = %range, "cannot reserve the SNAT ports in {path}; the node's own connections might pick one");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read {path}"),
    }
    if let Ok(r) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        let v: Vec<u16> = r.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if let [lo, hi] = v[..]
            && lo <= max
            && hi >= min
        {
            tracing::info!(ephemeral = %r.trim(), snat = %range, "the ephemeral port range overlaps the SNAT ports (they are reserved, so connect() skips them)");
        }
    }
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
    NodeInfo { name: cfg.node_name.clone(), zone, addresses, snat: None }
}

impl Agent {
    /// Loads the datapath (adopting pinned maps) and reads back the maps.
    pub fn start(cfg: AgentConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let datapath = Datapath::load(&cfg.datapath)?;
        let maps = PinnedMaps::open(&cfg.datapath.pin_dir())?;
        let mut engine = SyncEngine::adopt(maps)?;
        engine.set_maglev(cfg.maglev);
        let mut datapath = datapath;
        reserve_snat_ports(cfg.datapath.snat_ports);
        if let Some(root) = datapath.attach_sockets().context("attaching the socket programs (--socket-lb)")? {
            tracing::info!(cgroup = %root.display(), mode = ?cfg.datapath.socket_lb, "socket-level load balancing on");
        }
        let (f, b) = engine.counts();
        tracing::info!(frontends = f, backends = b, pin_dir = %cfg.datapath.pin_dir().display(), "datapath loaded, maps adopted");
        Ok(Self {
            cfg,
            datapath,
            engine,
            metrics,
            attached: BTreeMap::new(),
            retry: BTreeMap::new(),
            links: BTreeMap::new(),
            migration_done: false,
            reload_due: false,
            last_skipped: BTreeSet::new(),
            last_failed: BTreeSet::new(),
            index: crate::incremental::Index::default(),
            names_due: true,
            clean: false,
            last_no_table: 0,
            local_addrs: local_ipv4_addrs(),
            snat: None,
            health: crate::healthcheck::HealthServer::new(),
            versions: std::collections::HashMap::new(),
            health_checks: BTreeMap::new(),
            generation: 0,
        })
    }

    /// Lists the links now (netlink dump) and attaches to every matching
    /// interface not attached yet. Returns how many were attached.
    pub fn attach_interfaces(&mut self) -> anyhow::Result<usize> {
        let links = crate::ifaces::dump()?;
        self.local_addrs = local_ipv4_addrs();
        Ok(self.on_link_event(LinkEvent::All(links)))
    }

    /// Applies one link event: attaches new matching interfaces (an index
    /// not seen before, also under a known name), forgets vanished ones and
    /// removes their pinned links. Errors are logged per interface, retried
    /// with backoff, and never stop the agent. Returns how many were attached.
    pub fn on_link_event(&mut self, ev: LinkEvent) -> usize {
        let mut new: Vec<Link> = Vec::new();
        match ev {
            LinkEvent::All(all) => {
                self.links = all.iter().map(|l| (l.index, l.name.clone())).collect();
                self.attached.retain(|i, a| self.links.get(i) == Some(&a.name));
                self.retry.retain(|i, r| self.links.get(i) == Some(&r.iface.name));
                new = all;
            }
            LinkEvent::New(l) => {
                if self.attached.get(&l.index).is_some_and(|a| a.name != l.name) {
                    // Renamed: attach again under the new name.
                    self.attached.remove(&l.index);
                }
                self.links.insert(l.index, l.name.clone());
                new.push(l);
            }
            LinkEvent::Gone { index, name } => {
                self.links.remove(&index);
                self.attached.remove(&index);
                self.retry.remove(&index);
                tracing::info!(iface = %name, index, "interface gone");
            }
        }
        for pin in self.datapath.prune_links(&self.links) {
            tracing::info!(pin, "removed the pinned link of a vanished interface");
        }
        let mut n = 0;
        for l in new {
            if self.attached.contains_key(&l.index) || !datapath::matches_patterns(&l.name, &self.cfg.interfaces) {
                continue;
            }
            let Some(iface) = l.iface() else {
                tracing::warn!(iface = %l.name, "device type not supported (neither Ethernet nor an L3 tunnel); not attached");
                continue;
            };
            n += usize::from(self.try_attach(iface, Duration::from_millis(100)));
        }
        if n > 0 {
            self.local_addrs = local_ipv4_addrs();
        }
        if self.attached.is_empty() && self.retry.is_empty() {
            tracing::warn!(patterns = ?self.cfg.interfaces, "no interface matches --interfaces; no traffic is translated");
        }
        self.note_attached();
        if n > 0 && !self.migration_done {
            self.datapath.finish_migration();
            self.migration_done = true;
        }
        n
    }

    /// Tells /readyz whether anything translates (an interface attached, or
    /// the socket path on).
    fn note_attached(&self) {
        let none = self.attached.is_empty() && self.cfg.datapath.socket_lb == crate::datapath::SocketLb::Off;
        self.metrics.nothing_attached.store(none, Ordering::Relaxed);
    }

    fn try_attach(&mut self, iface: Iface, backoff: Duration) -> bool {
        match self.datapath.attach(&iface) {
            Ok(()) => {
                let role = if self.datapath.is_external(&iface) { "external" } else { "pod" };
                tracing::info!(iface = %iface.name, index = iface.index, kind = ?iface.kind, role, "attached");
                self.retry.remove(&iface.index);
                self.attached.insert(iface.index, iface);
                true
            }
            Err(e) => {
                tracing::warn!(iface = %iface.name, error = format!("{e:#}"), retry_in = ?backoff, "cannot attach; will retry");
                self.metrics.attach_errors.fetch_add(1, Ordering::Relaxed);
                let at = Instant::now() + backoff;
                self.retry.insert(iface.index, Retry { iface, at, backoff });
                false
            }
        }
    }

    /// Retries failed attaches whose backoff has passed (doubling, up to 30 s).
    pub fn retry_attach(&mut self) {
        let now = Instant::now();
        let due: Vec<Retry> = {
            let idx: Vec<u32> = self.retry.iter().filter(|(_, r)| r.at <= now).map(|(i, _)| *i).collect();
            idx.into_iter().filter_map(|i| self.retry.remove(&i)).collect()
        };
        for r in due {
            self.try_attach(r.iface, (r.backoff * 2).min(Duration::from_secs(30)));
        }
    }

    /// The healthCheckNodePorts open now.
    #[must_use]
    pub fn health_check_ports(&self) -> Vec<u16> {
        self.health.ports()
    }

    #[must_use]
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    #[must_use]
    pub fn attached(&self) -> BTreeSet<String> {
        self.attached.values().map(|i| i.name.clone()).collect()
    }

    /// Makes the next [`Agent::apply`] re-read the kernel maps first, so it
    /// repairs entries changed behind the agent's back (kube-proxy's
    /// periodic full sync).
    pub fn request_resync(&mut self) {
        self.reload_due = true;
    }

    /// Whether the last sync left frontends or backends unprogrammed (they
    /// are retried by the next sync).
    #[must_use]
    pub fn has_failures(&self) -> bool {
        !self.last_failed.is_empty()
    }

    /// This node's translation inputs now (and the SNAT address written to
    /// the datapath when it changed).
    fn current_node(&mut self, nodes: &[Node]) -> NodeInfo {
        let mut node = node_info(&self.cfg, nodes);
        if !self.cfg.nodeport_cidrs.is_empty() {
            // kube-proxy's --nodeport-addresses: the local addresses in
            // these prefixes; SNAT keeps the Node's primary address.
            node.snat = node.snat_address();
            node.addresses = self
                .local_addrs
                .iter()
                .filter(|a| !a.is_loopback() && self.cfg.nodeport_cidrs.iter().any(|c| in_prefix(**a, *c)))
                .map(|a| IpAddr::V4(*a))
                .collect();
        }
        let snat = node.snat_address();
        if self.snat != Some(snat) {
            match self.datapath.set_node_config(snat) {
                Ok(()) => self.snat = Some(snat),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot write the node config (SNAT address)"),
            }
        }
        node
    }

    /// Programs the maps from the full set of objects: every Service is
    /// brought up to date (unchanged ones by resourceVersion) and every
    /// frontend diffed against the mirror. The safety net of the
    /// incremental path ([`Agent::apply_changes`]).
    pub fn apply<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        nodes: &[Node],
        seen_at: Instant,
    ) -> SyncReport {
        let mut groups: BTreeMap<ServiceId, (Option<&Service>, Vec<&EndpointSlice>)> = BTreeMap::new();
        for svc in services {
            groups.entry(crate::incremental::service_id(svc)).or_default().0 = Some(svc);
        }
        for sl in slices {
            if let Some(id) = crate::incremental::slice_owner(sl) {
                groups.entry(id).or_default().1.push(sl);
            }
        }
        self.full_sync(nodes, seen_at, |one| {
            for (id, (svc, sl)) in &groups {
                one(id, *svc, sl);
            }
        })
    }

    /// [`Agent::apply`] from owned objects, one Service at a time: its id,
    /// its Service object (`None`: only slices) and its EndpointSlices. Every
    /// Service comes once; none needs to be held after its turn (standalone
    /// mode decodes them from compact copies as they are needed).
    pub fn apply_groups(
        &mut self,
        groups: impl IntoIterator<Item = (ServiceId, Option<Service>, Vec<EndpointSlice>)>,
        nodes: &[Node],
        seen_at: Instant,
    ) -> SyncReport {
        self.full_sync(nodes, seen_at, |one| {
            for (id, svc, slices) in groups {
                let slices: Vec<&EndpointSlice> = slices.iter().collect();
                one(&id, svc.as_ref(), &slices);
            }
        })
    }

    /// The full sync of [`Agent::apply`]: `feed` gives every Service id
    /// once, with its Service (`None`: only slices) and its slices.
    fn full_sync(
        &mut self,
        nodes: &[Node],
        seen_at: Instant,
        feed: impl FnOnce(&mut dyn FnMut(&ServiceId, Option<&Service>, &[&EndpointSlice])),
    ) -> SyncReport {
        let start = Instant::now();
        let reload = std::mem::take(&mut self.reload_due);
        if reload && let Err(e) = self.engine.reload() {
            tracing::warn!(error = %e, "re-reading the maps for a full resync; syncing from the mirror");
        }
        let node = self.current_node(nodes);
        let mut full = self.index.begin_full(&node);
        self.generation += 1;
        feed(&mut |id, svc, slices| {
            if let Some(svc) = svc {
                self.index.full_service(&mut full, id, svc, slices);
            }
            // Health check ports and kube-proxy's change counters.
            self.observe_service(id, svc, slices, &node.name);
        });
        let delta = self.index.finish_full(full);
        // Services gone since the last full sync count as changes too.
        let gone: Vec<ServiceId> =
            self.versions.iter().filter(|(_, v)| v.generation != self.generation).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.observe_service(&id, None, &[], &node.name);
        }
        self.after_observe(nodes, &node.name);
        // UDP flows of a backend that left a frontend move at their next
        // packet (the datapath checks membership); the collector removes
        // their entries in the background.
        let report = if delta.is_empty() && !reload && self.clean {
            // Nothing changed since a sync that programmed everything, and
            // no re-read of the maps is due: they hold the desired state.
            let (frontends, backends) = self.engine.counts();
            SyncReport { frontends, backends, no_table: self.last_no_table, ..SyncReport::default() }
        } else {
            self.engine.sync(self.index.desired())
        };
        self.clean = report.failed.is_empty();
        self.names_due |= !delta.is_empty();
        self.finish(start, seen_at, &report, true);
        self.flush_names();
        // A full sync's temporaries (translations, tables, the objects the
        // caller copied) go back to the system, not into the heap's slack.
        // SAFETY: malloc_trim has no preconditions.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        report
    }

    /// The incremental path: re-translates only the named Services (with
    /// their Service object, `None` when deleted, and their EndpointSlices)
    /// and writes only the frontends whose desired state changed. Returns
    /// `None` when this node's translation inputs changed (every Service
    /// depends on them): the caller then runs [`Agent::apply`].
    pub fn apply_changes<'a>(
        &mut self,
        changed: impl IntoIterator<Item = (crate::incremental::ServiceId, Option<&'a Service>, Vec<&'a EndpointSlice>)>,
        nodes: &[Node],
        seen_at: Instant,
    ) -> Option<SyncReport> {
        let start = Instant::now();
        let node = self.current_node(nodes);
        if self.reload_due || !self.index.is_for(&node) {
            return None;
        }
        let changed: Vec<_> = changed.into_iter().collect();
        let delta = self.index.update(changed.iter().map(|(id, svc, sl)| (id.clone(), *svc, sl.clone())));
        for (id, svc, sl) in &changed {
            self.observe_service(id, *svc, sl, &node.name);
        }
        self.after_observe(nodes, &node.name);
        let desired = self.index.desired();
        let fes = crate::incremental::frontend_changes(desired, &delta);
        let vips = crate::incremental::vip_changes(desired, &delta);
        let report = self.engine.sync_changes(&fes, &vips);
        self.clean &= report.failed.is_empty();
        self.names_due |= !delta.is_empty();
        self.finish(start, seen_at, &report, !delta.is_empty());
        Some(report)
    }

    fn finish(&mut self, start: Instant, seen_at: Instant, report: &SyncReport, changed: bool) {
        let now = Instant::now();
        self.metrics.observe_sync(now - start);
        self.no_local_metrics();
        if report.writes + report.deletes > 0 {
            self.metrics.observe_change_to_write(now - seen_at);
        }
        if changed {
            let skipped = self.index.skipped();
            self.report(&skipped, report);
        } else {
            self.report_counts(report);
        }
    }

    /// Writes the frontend names for `proxy-agent inspect` and `explain`
    /// beside the maps, when frontends changed since the last write. Kept
    /// out of the sync itself (it writes every frontend's name).
    pub fn flush_names(&mut self) {
        if std::mem::take(&mut self.names_due) {
            crate::inspect::record_names(&self.cfg.datapath.pin_dir(), self.index.desired());
        }
    }

    /// One Service (`None`: deleted) and its slices as they are now:
    /// kube-proxy's change counters and network programming latency (from
    /// the slices' trigger times), and its health check port.
    fn observe_service(&mut self, id: &ServiceId, svc: Option<&Service>, slices: &[&EndpointSlice], node_name: &str) {
        let unseen = SeenVersions::default();
        let old = self.versions.get(id).unwrap_or(&unseen);
        let service = svc.map(|s| s.metadata.resource_version.clone());
        if old.service != service || service.as_ref().is_some_and(Option::is_none) {
            self.metrics.service_changes.fetch_add(1, Ordering::Relaxed);
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut seen: Vec<SeenSlice> = Vec::with_capacity(slices.len());
        for sl in slices {
            let name = sl.metadata.name.clone().unwrap_or_default();
            let rv = sl.metadata.resource_version.clone();
            let trigger = sl.metadata.annotations.as_ref().and_then(|a| a.get(crate::store::TRIGGER_TIME_ANNOTATION)).cloned();
            let prev = old.slice(&name);
            match prev {
                Some((_, orv, _)) if *orv == rv && rv.is_some() => {}
                _ => {
                    self.metrics.endpoint_changes.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(t) = &trigger
                && prev.and_then(|(_, _, ot)| ot.as_ref()) != Some(t)
                && let Ok(at) = t.parse::<k8s_openapi::jiff::Timestamp>()
                && let Ok(d) = std::time::Duration::try_from(now.duration_since(at))
            {
                self.metrics.observe_network_programming(d);
            }
            seen.push((name, rv, trigger));
        }
        // One entry per name, the last one given (as a map insert keeps).
        seen.reverse();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        seen.dedup_by(|later, kept| later.0 == kept.0);
        seen.shrink_to_fit();
        let now_seen = SeenVersions { service, slices: seen, generation: self.generation };
        let removed = old.slices.iter().filter(|(n, _, _)| now_seen.slice(n).is_none()).count() as u64;
        self.metrics.endpoint_changes.fetch_add(removed, Ordering::Relaxed);
        if svc.is_none() && slices.is_empty() {
            self.versions.remove(id);
        } else if let Some(v) = self.versions.get_mut(id) {
            // Updated in place: what did not change keeps its allocation.
            if v.service != now_seen.service {
                v.service = now_seen.service;
            }
            if v.slices != now_seen.slices {
                v.slices = now_seen.slices;
            }
            v.generation = now_seen.generation;
        } else {
            self.versions.insert(id.clone(), now_seen);
        }
        match svc.and_then(|s| crate::healthcheck::health_check_of(s, slices, node_name)) {
            Some(hc) => {
                self.health_checks.insert(id.clone(), hc);
            }
            None => {
                self.health_checks.remove(id);
            }
        }
    }

    /// Health check listeners and node eligibility after observing changes.
    fn after_observe(&mut self, nodes: &[Node], node_name: &str) {
        let eligible = crate::healthcheck::node_eligible(nodes, node_name);
        if self.metrics.node_ineligible.swap(!eligible, Ordering::Relaxed) == eligible {
            tracing::info!(node = %node_name, eligible, "node eligibility for load-balancer traffic changed (/healthz, health check ports)");
        }
        let ports = crate::healthcheck::by_port(self.health_checks.values());
        self.health.sync(&ports, eligible);
    }

    /// Services (not ports) with a Local policy and no local endpoint.
    fn no_local_metrics(&self) {
        let mut internal = BTreeSet::new();
        let mut external = BTreeSet::new();
        for fe in self.index.desired().frontends.values().filter(|f| f.drop_when_empty) {
            let svc = fe.owner.rsplit_once(':').map_or(fe.owner.as_str(), |(s, _)| s);
            if fe.kind == translate::FrontendKind::ClusterIp {
                internal.insert(svc);
            } else if fe.addr.scope == translate::Scope::External {
                external.insert(svc);
            }
        }
        self.metrics.set_no_local_endpoints(internal.len() as u64, external.len() as u64);
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
        self.report_counts(report);
    }

    fn report_counts(&mut self, report: &SyncReport) {
        // Warn once per (object, error), not on every sync.
        let failed: BTreeSet<(String, String)> = report.failed.iter().cloned().collect();
        for (owner, err) in failed.difference(&self.last_failed) {
            tracing::warn!(object = %owner, error = %err, "could not program; other Services are unaffected");
        }
        self.last_failed = failed;
        if report.no_table > 0 && report.no_table != self.last_no_table {
            tracing::warn!(
                sets = report.no_table,
                "the Maglev map is full: these backend sets choose backends at random (consistent hashing needs room for one 4 KiB table per set)"
            );
        }
        self.last_no_table = report.no_table;
        self.metrics.sync_errors.fetch_add(report.failed.len() as u64, Ordering::Relaxed);
        self.metrics.last_sync_failed.store(!report.failed.is_empty(), Ordering::Relaxed);
        self.note_attached();
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

/// Starts the conntrack collector: every `interval` it removes expired
/// flows and stale entries (see [`datapath::Conntrack::collect`]) and
/// reports the maps' fill. Runs on its own thread, outside the sync loop.
pub fn spawn_conntrack_gc(pin_dir: PathBuf, cfg: DatapathConfig, interval: Duration, metrics: Arc<Metrics>) {
    std::thread::Builder::new()
        .name("kproxy-ct-gc".into())
        .spawn(move || {
            let mut ct = match datapath::Conntrack::open(&pin_dir) {
                Ok(ct) => ct,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "conntrack collector cannot open the maps; not running");
                    return;
                }
            };
            loop {
                let r = ct.collect(datapath::monotonic_ns());
                metrics.set_map_fill(proxy_common::MAP_CT_TCP, r.tcp_entries as u64, u64::from(cfg.max_conntrack));
                metrics.set_map_fill(proxy_common::MAP_CT_ANY, r.other_entries as u64, u64::from(cfg.max_conntrack_other));
                metrics.set_map_fill(proxy_common::MAP_SNAT, r.snat_entries as u64, u64::from(cfg.max_snat));
                metrics.ct_collected.fetch_add(
                    (r.expired + r.left_backend + r.orphans + r.sockets + r.snat_collected) as u64,
                    Ordering::Relaxed,
                );
                if r.expired + r.left_backend + r.orphans + r.snat_collected > 0 {
                    tracing::debug!(?r, "conntrack collected");
                }
                std::thread::sleep(interval);
            }
        })
        .expect("spawning the conntrack collector");
}
