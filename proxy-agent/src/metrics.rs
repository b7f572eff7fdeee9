//! Prometheus metrics, rendered in the text exposition format.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Mutex, atomic::{AtomicBool, AtomicU64, Ordering}},
    time::Duration,
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

struct Histogram {
    buckets: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with_buckets(BUCKETS.to_vec())
    }
}

impl Histogram {
    fn with_buckets(buckets: Vec<f64>) -> Self {
        Self { counts: vec![0; buckets.len()], buckets, sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
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
            sync_duration: Histogram::default(),
            change_to_write: Histogram::default(),
            kp_sync_duration: Histogram::with_buckets(kube_proxy_sync_buckets()),
            kp_programming: Histogram::with_buckets(kube_proxy_programming_buckets()),
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
        let mut inner = self.inner.lock().unwrap();
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

    #[must_use]
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        inner.sync_duration.render(&mut out, "kproxy_sync_duration_seconds", "Time to bring the maps to the desired state.");
        inner.change_to_write.render(
            &mut out,
            "kproxy_change_to_write_seconds",
            "Time from an object change being seen to the maps being written.",
        );
        inner.kp_sync_duration.render(&mut out, "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds");
        inner.kp_programming.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
        );
        let secs = |ms: u64| ms as f64 / 1000.0;
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}",
            secs(self.last_updated_ms.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds The last time a sync of proxy rules was queued\n# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_queued_timestamp_seconds {}",
            secs(self.last_queued_ms.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total Number of services with a Local traffic policy and no endpoints\n# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge\nkubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"internal\"}} {}\nkubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"external\"}} {}",
            inner.no_local[0], inner.no_local[1]
        );
        let counters = [
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
                &self.endpoint_changes,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
                &self.service_changes,
            ),
            ("kproxy_syncs_total", "Syncs performed.", &self.syncs),
            ("kproxy_sync_errors_total", "Frontends or backends a sync could not program.", &self.sync_errors),
            ("kproxy_api_errors_total", "Errors talking to the Kubernetes API.", &self.api_errors),
            ("kproxy_attach_errors_total", "Failed attempts to attach to an interface (each is retried).", &self.attach_errors),
            ("kproxy_conntrack_collected_total", "Conntrack entries removed by the collector.", &self.ct_collected),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let gauges = [
            ("kproxy_programmed_frontends", "Frontends (address, port, protocol) in the datapath.", &self.frontends),
            ("kproxy_programmed_backends", "Distinct backends in the datapath.", &self.backends),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP kproxy_skipped_objects Service parts not programmed, by reason.\n# TYPE kproxy_skipped_objects gauge");
        for (reason, n) in &inner.skipped {
            let _ = writeln!(out, "kproxy_skipped_objects{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kproxy_map_fill_ratio Entries over capacity, per map.\n# TYPE kproxy_map_fill_ratio gauge");
        for (map, (n, cap)) in &inner.map_entries {
            let ratio = if *cap == 0 { 0.0 } else { *n as f64 / *cap as f64 };
            let _ = writeln!(out, "kproxy_map_fill_ratio{{map=\"{map}\"}} {ratio}");
        }
        let _ = writeln!(out, "# HELP kproxy_map_entries Entries per map.\n# TYPE kproxy_map_entries gauge");
        for (map, (n, _)) in &inner.map_entries {
            let _ = writeln!(out, "kproxy_map_entries{{map=\"{map}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP kproxy_datapath_packets_total Packets by datapath verdict.\n# TYPE kproxy_datapath_packets_total counter");
        for (reason, n) in &inner.datapath {
            let _ = writeln!(out, "kproxy_datapath_packets_total{{reason=\"{reason}\"}} {n}");
        }
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
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 1",
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
