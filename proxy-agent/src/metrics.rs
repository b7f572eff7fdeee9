//! Prometheus metrics: kept as atomics and prometheus-client histograms,
//! encoded by prometheus-client (OpenMetrics text) at each scrape.
use std::{
    collections::BTreeMap,
    sync::{Mutex, atomic::{AtomicBool, AtomicU64, Ordering}},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets: 1 ms doubling, 15 of them.
fn kube_proxy_sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// kube-proxy's `network_programming_duration_seconds` buckets.
fn kube_proxy_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b.dedup();
    b
}

struct Inner {
    sync_duration: Histogram,
    change_to_write: Histogram,
    kp_sync_duration: Histogram,
    kp_programming: Histogram,
    no_local: [u64; 2],
    skipped: BTreeMap<String, u64>,
    map_entries: BTreeMap<&'static str, (u64, u64)>,
    datapath: Vec<(&'static str, u64)>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            sync_duration: Histogram::new(BUCKETS),
            change_to_write: Histogram::new(BUCKETS),
            kp_sync_duration: Histogram::new(kube_proxy_sync_buckets()),
            kp_programming: Histogram::new(kube_proxy_programming_buckets()),
            no_local: [0; 2],
            skipped: BTreeMap::new(),
            map_entries: BTreeMap::new(),
            datapath: Vec::new(),
        }
    }
}

/// Unix time in milliseconds.
#[must_use]
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Every metric the agent exports.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub api_errors: AtomicU64,
    pub attach_errors: AtomicU64,
    pub ct_collected: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    pub ready: AtomicBool,
    /// The Node is being deleted or tainted ToBeDeletedByClusterAutoscaler:
    /// /healthz answers 503 so load balancers drain it (kube-proxy's node health).
    pub node_ineligible: AtomicBool,
    /// Unix time (ms) of the last completed sync (0: none yet).
    pub last_updated_ms: AtomicU64,
    /// Unix time (ms) of the oldest change not programmed yet (kube-proxy's
    /// last queued timestamp; not after `last_updated_ms` when none is).
    pub last_queued_ms: AtomicU64,
    /// /healthz turns 503 when a queued change waits longer than this (ms;
    /// kube-proxy: twice the sync period). 0: never.
    pub health_timeout_ms: AtomicU64,
    pub endpoint_changes: AtomicU64,
    pub service_changes: AtomicU64,
    /// The last sync programmed everything (nothing left to retry).
    pub last_sync_failed: AtomicBool,
    /// No interface is attached and the socket path is off: nothing translates.
    pub nothing_attached: AtomicBool,
}

impl Metrics {
    pub fn observe_sync(&self, d: Duration) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.last_updated_ms.store(unix_ms(), Ordering::Relaxed);
        let inner = self.inner.lock().unwrap();
        inner.sync_duration.observe(d.as_secs_f64());
        inner.kp_sync_duration.observe(d.as_secs_f64());
    }

    /// `/readyz`: the first full sync is done, the last sync succeeded, and
    /// an interface (or the socket path) is attached. `Err` says why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err("not synced yet");
        }
        if self.last_sync_failed.load(Ordering::Relaxed) {
            return Err("the last sync left something unprogrammed (retrying)");
        }
        if self.nothing_attached.load(Ordering::Relaxed) {
            return Err("no interface attached and socket LB off: nothing is translated");
        }
        Ok(())
    }

    /// A change was seen (watch event, file change) at unix time `at_ms`:
    /// the oldest one not programmed yet is remembered.
    pub fn queued(&self, at_ms: u64) {
        let updated = self.last_updated_ms.load(Ordering::Relaxed);
        let queued = self.last_queued_ms.load(Ordering::Relaxed);
        if queued <= updated {
            self.last_queued_ms.store(at_ms.max(updated + 1), Ordering::Relaxed);
        }
    }

    /// kube-proxy's proxier health: not healthy while a queued change has
    /// waited longer than the health timeout.
    #[must_use]
    pub fn proxier_healthy(&self, now_ms: u64) -> bool {
        let timeout = self.health_timeout_ms.load(Ordering::Relaxed);
        let updated = self.last_updated_ms.load(Ordering::Relaxed);
        let queued = self.last_queued_ms.load(Ordering::Relaxed);
        timeout == 0 || queued <= updated || now_ms.saturating_sub(queued) < timeout
    }

    /// Time from an EndpointSlice's last-change-trigger-time to the sync
    /// that programmed it.
    pub fn observe_network_programming(&self, d: Duration) {
        self.inner.lock().unwrap().kp_programming.observe(d.as_secs_f64());
    }

    /// Services with a Local policy and no local endpoint: (internal, external).
    pub fn set_no_local_endpoints(&self, internal: u64, external: u64) {
        self.inner.lock().unwrap().no_local = [internal, external];
    }

    pub fn observe_change_to_write(&self, d: Duration) {
        self.inner.lock().unwrap().change_to_write.observe(d.as_secs_f64());
    }

    /// Current count of skipped objects by reason (replaces the last set).
    pub fn set_skipped(&self, by_reason: BTreeMap<String, u64>) {
        self.inner.lock().unwrap().skipped = by_reason;
    }

    pub fn set_map_fill(&self, map: &'static str, entries: u64, capacity: u64) {
        self.inner.lock().unwrap().map_entries.insert(map, (entries, capacity));
    }

    pub fn set_datapath(&self, stats: Vec<(&'static str, u64)>) {
        self.inner.lock().unwrap().datapath = stats;
    }

    /// The exposition text (OpenMetrics) of every metric now.
    #[must_use]
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut r = Registry::default();
        r.register("kproxy_sync_duration_seconds", "Time to bring the maps to the desired state", inner.sync_duration.clone());
        r.register(
            "kproxy_change_to_write_seconds",
            "Time from an object change being seen to the maps being written",
            inner.change_to_write.clone(),
        );
        r.register("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", inner.kp_sync_duration.clone());
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            inner.kp_programming.clone(),
        );
        let seconds = |ms: u64| {
            let g = Gauge::<f64, AtomicU64>::default();
            g.set(ms as f64 / 1000.0);
            g
        };
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            seconds(self.last_updated_ms.load(Ordering::Relaxed)),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            seconds(self.last_queued_ms.load(Ordering::Relaxed)),
        );
        let no_local = Family::<Vec<(String, String)>, Gauge>::default();
        for (policy, n) in [("internal", inner.no_local[0]), ("external", inner.no_local[1])] {
            no_local.get_or_create(&vec![("traffic_policy".into(), policy.into())]).set(n as i64);
        }
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            no_local,
        );
        // Counters: prometheus-client appends `_total`.
        let counters = [
            ("kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", &self.endpoint_changes),
            ("kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", &self.service_changes),
            ("kproxy_syncs", "Syncs performed", &self.syncs),
            ("kproxy_sync_errors", "Frontends or backends a sync could not program", &self.sync_errors),
            ("kproxy_api_errors", "Errors talking to the Kubernetes API", &self.api_errors),
            ("kproxy_attach_errors", "Failed attempts to attach to an interface (each is retried)", &self.attach_errors),
            ("kproxy_conntrack_collected", "Conntrack entries removed by the collector", &self.ct_collected),
        ];
        for (name, help, v) in counters {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Ordering::Relaxed));
            r.register(name, help, c);
        }
        let gauges = [
            ("kproxy_programmed_frontends", "Frontends (address, port, protocol, scope) in the datapath", &self.frontends),
            ("kproxy_programmed_backends", "Distinct backends in the datapath", &self.backends),
        ];
        for (name, help, v) in gauges {
            let g = Gauge::<i64>::default();
            g.set(v.load(Ordering::Relaxed) as i64);
            r.register(name, help, g);
        }
        let labeled = |key: &str, values: &mut dyn Iterator<Item = (String, i64)>| {
            let f = Family::<Vec<(String, String)>, Gauge>::default();
            for (label, v) in values {
                f.get_or_create(&vec![(key.to_owned(), label)]).set(v);
            }
            f
        };
        r.register(
            "kproxy_skipped_objects",
            "Service parts not programmed, by reason",
            labeled("reason", &mut inner.skipped.iter().map(|(k, v)| (k.clone(), *v as i64))),
        );
        let fill = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        for (map, (n, cap)) in &inner.map_entries {
            fill.get_or_create(&vec![("map".into(), (*map).to_owned())]).set(if *cap == 0 { 0.0 } else { *n as f64 / *cap as f64 });
        }
        r.register("kproxy_map_fill_ratio", "Entries over capacity, per map", fill);
        r.register(
            "kproxy_map_entries",
            "Entries per map",
            labeled("map", &mut inner.map_entries.iter().map(|(k, (n, _))| ((*k).to_owned(), *n as i64))),
        );
        let packets = Family::<Vec<(String, String)>, Counter>::default();
        for (reason, n) in &inner.datapath {
            packets.get_or_create(&vec![("reason".into(), (*reason).to_owned())]).inc_by(*n);
        }
        r.register("kproxy_datapath_packets", "Packets by datapath verdict", packets);
        let mut out = String::new();
        let _ = encode(&mut out, &r);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxier_health_follows_kube_proxy_through_its_transitions() {
        let m = Metrics::default();
        m.health_timeout_ms.store(60_000, Ordering::Relaxed);
        assert!(m.proxier_healthy(1_000), "nothing queued, nothing synced: healthy");
        m.queued(10_000);
        assert!(m.proxier_healthy(69_999), "a queued change younger than the timeout");
        assert!(!m.proxier_healthy(70_001), "a queued change older than the timeout, never programmed");
        m.last_updated_ms.store(70_500, Ordering::Relaxed);
        assert!(m.proxier_healthy(200_000), "programmed: healthy however long nothing happens");
        m.queued(200_000);
        m.queued(250_000);
        assert!(!m.proxier_healthy(260_001), "the oldest pending change counts, not the newest");
        m.health_timeout_ms.store(0, Ordering::Relaxed);
        assert!(m.proxier_healthy(10_000_000), "no timeout configured");
    }

    #[test]
    fn kube_proxy_metric_names_are_exported() {
        let m = Metrics::default();
        m.observe_sync(Duration::from_millis(3));
        m.observe_network_programming(Duration::from_millis(700));
        m.set_no_local_endpoints(1, 2);
        m.endpoint_changes.fetch_add(5, Ordering::Relaxed);
        let text = m.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 2",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
    }
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[test]
    fn readyz_needs_a_first_sync_a_clean_last_sync_and_something_attached() {
        let m = Metrics::default();
        assert!(m.readiness().is_err(), "before the first sync");
        m.ready.store(true, Ordering::Relaxed);
        assert!(m.readiness().is_ok());
        m.last_sync_failed.store(true, Ordering::Relaxed);
        assert!(m.readiness().is_err(), "a frontend failed to program");
        m.last_sync_failed.store(false, Ordering::Relaxed);
        m.nothing_attached.store(true, Ordering::Relaxed);
        assert!(m.readiness().is_err(), "nothing attached");
        m.nothing_attached.store(false, Ordering::Relaxed);
        assert!(m.readiness().is_ok());
    }
}
