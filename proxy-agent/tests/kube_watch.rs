//! The Kubernetes path end to end: the agent binary watches a minimal fake
//! API server (list + watch over HTTP, as kube-rs speaks it) in the node
//! namespace, programs the datapath, follows watch events and readiness.
mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Child,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{sa, service, slice};
use proxy_testkit::{EchoServer, Topology, require_root, tcp_connect, tcp_request, unique_prefix, wait_until};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::broadcast,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(2);

/// Collections by API path, and a feed of watch events.
struct FakeApi {
    objects: Mutex<BTreeMap<&'static str, Vec<Value>>>,
    events: broadcast::Sender<(u64, &'static str, Value)>,
    /// Every event, for watches that resume from a resourceVersion.
    log: Mutex<Vec<(u64, &'static str, Value)>>,
    rv: Mutex<u64>,
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

impl FakeApi {
    fn list_kind(path: &str) -> &'static str {
        match path {
            SERVICES => "ServiceList",
            SLICES => "EndpointSliceList",
            _ => "NodeList",
        }
    }

    fn next_rv(&self) -> u64 {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        *rv
    }

    /// Adds, replaces or deletes an object and emits the watch event.
    fn change(&self, path: &'static str, mut obj: Value, delete: bool) {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = obj["metadata"]["name"].clone();
        let mut all = self.objects.lock().unwrap();
        let list = all.entry(path).or_default();
        let existed = list.iter().any(|o| o["metadata"]["name"] == name);
        list.retain(|o| o["metadata"]["name"] != name);
        let kind = if delete {
            "DELETED"
        } else {
            list.push(obj.clone());
            if existed { "MODIFIED" } else { "ADDED" }
        };
        let ev = json!({"type": kind, "object": obj});
        self.log.lock().unwrap().push((rv, path, ev.clone()));
        let _ = self.events.send((rv, path, ev));
    }
}

async fn serve_conn(api: Arc<FakeApi>, mut sock: tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let req = String::from_utf8_lossy(&buf).into_owned();
    let target = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let path: &'static str = match path {
        SERVICES => SERVICES,
        SLICES => SLICES,
        NODES => NODES,
        _ => {
            let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
            return;
        }
    };
    if query.contains("watch=true") || query.contains("watch=1") {
        let from: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut rx = api.events.subscribe();
        let backlog: Vec<(u64, &'static str, Value)> =
            api.log.lock().unwrap().iter().filter(|(rv, p, _)| *rv > from && *p == path).cloned().collect();
        let mut sent = from;
        let _ = sock
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        for (rv, _, ev) in backlog {
            sent = rv;
            let line = format!("{ev}\n");
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if sock.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        loop {
            let (rv, p, ev) = match rx.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            if p != path || rv <= sent {
                continue;
            }
            let line = format!("{ev}\n");
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if sock.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    }
    let items = api.objects.lock().unwrap().get(path).cloned().unwrap_or_default();
    let rv = api.rv.lock().unwrap().to_string();
    let body = json!({"apiVersion": "v1", "kind": FakeApi::list_kind(path), "metadata": {"resourceVersion": rv}, "items": items}).to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

fn yaml_objects(y: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_norway::Deserializer::from_str(y)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

struct Harness {
    child: Option<Child>,
    pin_dir: String,
    kubeconfig: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    api: Arc<FakeApi>,
    _servers: Vec<EchoServer>,
    topo: Topology,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = proxy_agent::datapath::cleanup(&std::path::Path::new("/sys/fs/bpf").join(&self.pin_dir));
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}


fn harness() -> Harness {
    require_root();
    let prefix = unique_prefix("k");
    let topo = Topology::build(&prefix, 1, 3).unwrap();
    let servers = topo.backends.iter().map(|b| EchoServer::start(&b.ns, &b.name, 8080).unwrap()).collect();
    let (events, _) = broadcast::channel(256);
    let api = Arc::new(FakeApi { objects: Mutex::new(BTreeMap::new()), events, log: Mutex::new(Vec::new()), rv: Mutex::new(1) });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = topo.node.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    {
        let api = api.clone();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve_conn(api.clone(), s));
            }
        });
    }
    let kubeconfig = std::env::temp_dir().join(format!("{prefix}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\nusers:\n- name: u\n  user: {{token: t}}\n"
        ),
    )
    .unwrap();
    Harness { child: None, pin_dir: prefix, kubeconfig, rt, api, _servers: servers, topo }
}

impl Harness {
    fn start(&mut self) {
        let child = common::spawn_agent(&self.topo.node, &self.pin_dir, &["--kubeconfig", self.kubeconfig.to_str().unwrap()], &[]);
        self.child = Some(child);
    }

    fn answers(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| tcp_request(&self.topo.clients[0].ns, sa(VIP, 80), T).map(|r| r.0).unwrap_or_else(|e| format!("error: {e:#}")))
            .collect()
    }

    fn web_slice(&self, backends: &[usize]) -> Value {
        let ips: Vec<Ipv4Addr> = backends.iter().map(|i| self.topo.backends[*i].ip).collect();
        yaml_objects(&slice("web", "web-1", &[(80, "TCP")], &ips)).remove(0)
    }
}

#[test]
fn agent_follows_the_api_server() {
    let mut h = harness();
    let svc = yaml_objects(&service("web", "10.96.0.10", &[(80, "TCP")], "")).remove(0);
    h.api.change(SERVICES, svc.clone(), false);
    h.api.change(SLICES, h.web_slice(&[0, 1]), false);
    h.api.change(NODES, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}), false);
    h.start();
    assert!(
        wait_until(Duration::from_secs(20), || proxy_testkit::http_get(&h.topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")),
        "ready after the first full sync"
    );
    let a = h.answers(20);
    assert!(a.iter().all(|x| x == "b0" || x == "b1"), "{a:?}");

    // A watch event replaces the endpoints.
    h.api.change(SLICES, h.web_slice(&[2]), false);
    assert!(wait_until(Duration::from_secs(5), || h.answers(5).iter().all(|x| x == "b2")), "followed the MODIFIED event");

    // Another Service claims web's ClusterIP as an externalIP (incremental
    // path: only `other` is translated): web keeps it (ClusterIP first).
    let other = yaml_objects(&service("other", "10.96.0.11", &[(80, "TCP")], "  externalIPs: [10.96.0.10]\n")).remove(0);
    h.api.change(SERVICES, other.clone(), false);
    let ips = [h.topo.backends[1].ip];
    h.api.change(SLICES, yaml_objects(&slice("other", "other-1", &[(80, "TCP")], &ips)).remove(0), false);
    assert!(wait_until(Duration::from_secs(5), || {
        proxy_testkit::http_get(&h.topo.node, 10249, "/metrics").contains("kproxy_programmed_frontends 2")
    }), "other's ClusterIP programmed");
    assert!(h.answers(5).iter().all(|x| x == "b2"), "web keeps its ClusterIP against other's externalIP");

    // Deleting web: the loser of the contested address takes it over.
    h.api.change(SERVICES, svc, true);
    assert!(wait_until(Duration::from_secs(5), || h.answers(5).iter().all(|x| x == "b1")), "other's externalIP took over");

    // Deleting other removes every frontend.
    h.api.change(SERVICES, other, true);
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(&h.topo.clients[0].ns, sa(VIP, 80), Duration::from_millis(300)).is_err()));
    let metrics = proxy_testkit::http_get(&h.topo.node, 10249, "/metrics");
    assert!(metrics.contains("kproxy_programmed_frontends 0"), "{metrics}");
    let _ = &h.rt;
}
