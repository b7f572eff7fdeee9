//! Service health checks (`healthCheckNodePort`), as kube-proxy serves them
//! for `type: LoadBalancer` Services with `externalTrafficPolicy: Local`:
//! the cloud load balancer probes every node and sends traffic only to nodes
//! that answer 200, that is, nodes with local endpoints.
//!
//! The pure part computes, from the Services and EndpointSlices, which port
//! answers for which Service with how many local endpoints; the listeners
//! (one per Service, a thread each, in the agent's network namespace) are
//! opened and closed as Services come and go, and answer from shared counts.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::translate::slice_belongs_to;

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: u64,
}

/// The node taint the cluster autoscaler sets before deleting a node.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether this node should receive load-balancer traffic: not being
/// deleted, not tainted for deletion by the cluster autoscaler (kube-proxy's
/// node eligibility). No Node object: eligible.
#[must_use]
pub fn node_eligible(nodes: &[Node], node_name: &str) -> bool {
    let Some(node) = nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node_name)) else { return true };
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// Health check ports of this node: every LoadBalancer Service with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`, with the
/// number of its ready endpoints on `node_name` (as kube-proxy counts
/// them). A port two
/// Services claim (an API conflict) goes to the first by namespace/name.
#[must_use]
pub fn health_checks(services: &[Service], slices: &[EndpointSlice], node_name: &str) -> BTreeMap<u16, HealthCheck> {
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| {
        (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
            .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
    });
    let checks: Vec<(u16, HealthCheck)> = sorted
        .into_iter()
        .filter_map(|svc| {
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            let mine: Vec<&EndpointSlice> = slices.iter().filter(|s| slice_belongs_to(s, ns, name)).collect();
            health_check_of(svc, &mine, node_name)
        })
        .collect();
    by_port(checks.iter())
}

/// The listeners to open from per-Service health checks given in
/// namespace/name order: a port two Services claim (an API conflict) goes
/// to the first.
pub fn by_port<'a>(checks: impl Iterator<Item = &'a (u16, HealthCheck)>) -> BTreeMap<u16, HealthCheck> {
    let mut out = BTreeMap::new();
    for (port, hc) in checks {
        out.entry(*port).or_insert_with(|| hc.clone());
    }
    out
}

/// The health check port of one Service (given its own slices), if it has one.
#[must_use]
pub fn health_check_of(svc: &Service, slices: &[&EndpointSlice], node_name: &str) -> Option<(u16, HealthCheck)> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    let port = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)?;
    let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let mut local: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            // kube-proxy counts this node's ready endpoints.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if ep.node_name.as_deref() == Some(node_name)
                && ready
                && let Some(a) = ep.addresses.first()
            {
                local.insert(a.as_str());
            }
        }
    }
    Some((port, HealthCheck { namespace: ns, name, local_endpoints: local.len() as u64 }))
}

/// kube-proxy's answer: status and JSON body.
#[must_use]
pub fn response(hc: &HealthCheck, node_healthy: bool) -> (u16, String) {
    let status = if hc.local_endpoints > 0 && node_healthy { 200 } else { 503 };
    let body = serde_json::json!({
        "service": {"namespace": hc.namespace, "name": hc.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": node_healthy,
    });
    (status, body.to_string())
}

/// One open health check port.
struct Listener {
    state: Arc<std::sync::Mutex<HealthCheck>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Listener {
    /// Closes the port before returning (the thread owns the socket).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The open health check ports. Listeners live in the network namespace
/// the agent started in (also when `sync` is called from another thread).
pub struct HealthServer {
    netns: Option<Arc<OwnedFd>>,
    listeners: BTreeMap<u16, Listener>,
    node_healthy: Arc<AtomicBool>,
    /// Failed binds, counted (each is retried at the next sync).
    pub bind_errors: Arc<AtomicU64>,
}

impl Default for HealthServer {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthServer {
    /// Remembers the calling thread's network namespace for the listeners.
    #[must_use]
    pub fn new() -> Self {
        let netns = std::fs::File::open("/proc/thread-self/ns/net").ok().map(|f| Arc::new(OwnedFd::from(f)));
        Self {
            netns,
            listeners: BTreeMap::new(),
            node_healthy: Arc::new(AtomicBool::new(true)),
            bind_errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens, updates and closes listeners to match `wanted`.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, node_healthy: bool) {
        self.node_healthy.store(node_healthy, Ordering::Relaxed);
        self.listeners.retain(|port, l| {
            let keep = wanted.get(port).is_some_and(|w| {
                let cur = l.state.lock().unwrap();
                cur.namespace == w.namespace && cur.name == w.name
            });
            if !keep {
                tracing::info!(port, "health check port closed");
            }
            keep
        });
        for (port, hc) in wanted {
            if let Some(l) = self.listeners.get(port) {
                *l.state.lock().unwrap() = hc.clone();
                continue;
            }
            match self.open(*port, hc.clone()) {
                Ok(l) => {
                    tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check port open");
                    self.listeners.insert(*port, l);
                }
                Err(e) => {
                    self.bind_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        port,
                        service = %format!("{}/{}", hc.namespace, hc.name),
                        error = %e,
                        "cannot open the healthCheckNodePort (is another process using it?); retrying at the next sync"
                    );
                }
            }
        }
    }

    /// Ports open now.
    #[must_use]
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    fn open(&self, port: u16, hc: HealthCheck) -> std::io::Result<Listener> {
        let netns = self.netns.clone();
        let listener = thread::scope(|s| {
            s.spawn(|| {
                if let Some(ns) = &netns {
                    // SAFETY: setns on this short-lived thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))
        })?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(std::sync::Mutex::new(hc));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, healthy) = (state.clone(), stop.clone(), self.node_healthy.clone());
        let thread = thread::Builder::new().name(format!("kproxy-hc-{port}")).spawn(move || {
            // Requests are answered on threads of their own (at most
            // MAX_CONNS at once, each bounded in time), so a slow client
            // cannot hold the port against the load balancer's probes.
            let busy = Arc::new(AtomicU64::new(0));
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if busy.load(Ordering::Relaxed) >= MAX_CONNS {
                            continue; // dropped: the prober retries
                        }
                        busy.fetch_add(1, Ordering::Relaxed);
                        let hc = st.lock().unwrap().clone();
                        let (healthy, busy) = (healthy.load(Ordering::Relaxed), busy.clone());
                        let spawned = thread::Builder::new().name(format!("kproxy-hc-{port}-req")).spawn(move || {
                            serve(conn, &hc, healthy);
                            busy.fetch_sub(1, Ordering::Relaxed);
                        });
                        if spawned.is_err() {
                            tracing::warn!(port, "cannot spawn a health check request thread");
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
        Ok(Listener { state, stop, thread: Some(thread) })
    }
}

/// Concurrent health check requests per port.
const MAX_CONNS: u64 = 32;

/// Answers one request (any path, as kube-proxy does), within 2 s overall.
fn serve(mut conn: TcpStream, hc: &HealthCheck, node_healthy: bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = response(hc, node_healthy);
    let reason = if status == 200 { "OK" } else { "Service Unavailable" };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        hc.local_endpoints,
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(y: &str) -> (Vec<Service>, Vec<EndpointSlice>, Vec<Node>) {
        let o = crate::manifests::parse_str(y, "t").unwrap();
        (o.services, o.slices, o.nodes)
    }

    const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: lb, namespace: web}
spec: {type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32001, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: cluster, namespace: web}
spec: {type: LoadBalancer, clusterIP: 10.96.0.2, healthCheckNodePort: 32002, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: web, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
endpoints:
- {addresses: [10.1.0.1], nodeName: a}
- {addresses: [10.1.0.2], nodeName: a, conditions: {ready: false}}
- {addresses: [10.1.0.3], nodeName: b}
";

    #[test]
    fn ports_and_local_ready_counts_per_node() {
        let (s, e, _) = objs(SVC);
        let a = health_checks(&s, &e, "a");
        assert_eq!(a.keys().copied().collect::<Vec<_>>(), vec![32001], "only eTP=Local LoadBalancers");
        assert_eq!(a[&32001], HealthCheck { namespace: "web".into(), name: "lb".into(), local_endpoints: 1 });
        assert_eq!(health_checks(&s, &e, "b")[&32001].local_endpoints, 1);
        assert_eq!(health_checks(&s, &e, "c")[&32001].local_endpoints, 0);
    }

    #[test]
    fn responses_follow_kube_proxy() {
        let hc = HealthCheck { namespace: "web".into(), name: "lb".into(), local_endpoints: 2 };
        let (status, body) = response(&hc, true);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "lb");
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(response(&HealthCheck { local_endpoints: 0, ..hc.clone() }, true).0, 503);
        assert_eq!(response(&hc, false).0, 503, "a node being deleted fails its health checks");
    }

    #[test]
    fn node_eligibility() {
        let (_, _, n) = objs(
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
        );
        assert!(!node_eligible(&n, "a"));
        assert!(node_eligible(&n, "b"));
        assert!(node_eligible(&n, "unknown"));
    }
}
