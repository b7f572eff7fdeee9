//! Control-plane benchmark: the agent's sync paths on real BPF maps, no
//! traffic. An agent is started in its own network namespace (nothing
//! attached), programmed with N Services x E endpoints by a full sync, then
//! fed single endpoint changes through the incremental path the Kubernetes
//! loop uses (`Agent::apply_changes`: re-translate the one Service, diff,
//! write). Each change is timed from the event (the call) to its return,
//! after the last map write.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::bail;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, DatapathConfig},
    metrics::Metrics,
};
use proxy_testkit::{Netns, unique_prefix};
use serde_json::json;

#[derive(Clone, Debug, Default)]
pub struct SyncResult {
    pub services: usize,
    pub endpoints: usize,
    /// First full sync (translate + all map writes).
    pub full_ms: f64,
    /// Map writes of the first full sync.
    pub full_writes: usize,
    /// A full sync of the same objects again: nothing changed, so only
    /// translation fingerprints and observers run.
    pub resync_ms: f64,
    /// The periodic resync of the same objects: every map read back and
    /// the whole desired state diffed against it.
    pub reload_ms: f64,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    pub changes: usize,
    /// RSS growth of this process across the first full sync: the agent's
    /// own state (translations, desired state, map mirror), the objects
    /// excluded (they were built before).
    pub state_mb: f64,
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .unwrap_or(0.0)
        / 1024.0
}

fn endpoint_ip(n: usize) -> String {
    format!("10.{}.{}.{}", 1 + n / 65_536, (n / 256) % 256, n % 256)
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}"), "namespace": "bench", "resourceVersion": "1"},
        "spec": {"clusterIP": crate::vip(i).to_string(), "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .expect("a valid Service")
}

fn slice(i: usize, endpoints: usize, first: &str, rv: u64) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| {
            let ip = if e == 0 { first.to_owned() } else { endpoint_ip(i * endpoints + e) };
            json!({"addresses": [ip], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}-a"), "namespace": "bench", "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .expect("a valid EndpointSlice")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Programs `n` Services x `endpoints` and times `changes` one-endpoint
/// changes through the incremental path.
pub fn measure(n: usize, endpoints: usize, changes: usize) -> anyhow::Result<SyncResult> {
    let prefix = unique_prefix("sync");
    let ns = Netns::create(&prefix)?;
    let cfg = AgentConfig {
        datapath: DatapathConfig {
            pin_dir_name: prefix.clone(),
            max_services: proxy_common::DEFAULT_MAX_SERVICE_ENTRIES.max((n * (endpoints + 2)) as u32),
            max_backends: proxy_common::DEFAULT_MAX_BACKENDS.max((n * endpoints + 1024) as u32),
            socket_lb: datapath::SocketLb::Off,
            ..Default::default()
        },
        interfaces: vec![],
        node_name: "bench".into(),
        node_ips: vec![],
        maglev: true,
        nodeport_cidrs: vec![],
    };
    let pin = cfg.datapath.pin_dir();
    let result = (|| -> anyhow::Result<SyncResult> {
        let services: Vec<Service> = (0..n).map(service).collect();
        let mut slices: Vec<EndpointSlice> = (0..n).map(|i| slice(i, endpoints, &endpoint_ip(i * endpoints), 1)).collect();
        let mut agent = ns.run(|| Agent::start(cfg, std::sync::Arc::new(Metrics::default())))?;
        let rss_before = rss_mb();
        let t = Instant::now();
        let r = agent.apply(&services, &slices, &[], t);
        let full_ms = t.elapsed().as_secs_f64() * 1e3;
        let full_writes = r.writes;
        let state_mb = rss_mb() - rss_before;
        if !r.failed.is_empty() {
            bail!("programming {n} Services failed: {:?}", &r.failed[..r.failed.len().min(3)]);
        }
        let t = Instant::now();
        agent.apply(&services, &slices, &[], t);
        let resync_ms = t.elapsed().as_secs_f64() * 1e3;
        // The periodic resync: the maps are read back and diffed whole.
        agent.request_resync();
        let t = Instant::now();
        agent.apply(&services, &slices, &[], t);
        let reload_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::with_capacity(changes);
        for k in 0..changes {
            // A Service spread over the set; its first endpoint moves to a
            // new address (a pod replaced), as a watch event would say.
            let i = (k * 7_919) % n;
            let rv = 2 + k as u64;
            let new_ip = Ipv4Addr::new(10, 250, (k / 250) as u8, (k % 250 + 1) as u8).to_string();
            slices[i] = slice(i, endpoints, &new_ip, rv);
            let id = ("bench".to_owned(), format!("s{i}"));
            let t = Instant::now();
            let report = agent.apply_changes([(id, Some(&services[i]), vec![&slices[i]])], &[], t);
            let dt = t.elapsed();
            let Some(report) = report else { bail!("the incremental path fell back to a full sync") };
            if report.writes == 0 || !report.failed.is_empty() {
                bail!("change {k} wrote nothing or failed: {report:?}");
            }
            times.push(dt.as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(2));
        }
        times.sort_by(f64::total_cmp);
        drop(agent);
        Ok(SyncResult {
            services: n,
            endpoints,
            full_ms,
            full_writes,
            resync_ms,
            reload_ms,
            change_p50_ms: percentile(&times, 0.5),
            change_p99_ms: percentile(&times, 0.99),
            change_max_ms: *times.last().unwrap_or(&0.0),
            changes,
            state_mb,
        })
    })();
    let _ = datapath::cleanup(&pin);
    result
}
