//! Prometheus metrics, rendered in the text exposition format.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Mutex, atomic::{AtomicBool, AtomicU64, Ordering}},
    time::Duration,
};

const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct Inner {
    sync_duration: Histogram,
    change_to_write: Histogram,
    skipped: BTreeMap<String, u64>,
    map_entries: BTreeMap<&'static str, (u64, u64)>,
    datapath: Vec<(&'static str, u64)>,
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
}

impl Metrics {
    pub fn observe_sync(&self, d: Duration) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_updated_ms.store(now.as_millis() as u64, Ordering::Relaxed);
        self.inner.lock().unwrap().sync_duration.observe(d.as_secs_f64());
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
        let counters = [
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
