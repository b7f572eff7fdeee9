//! The agent binary in standalone mode, in the node namespace: programs from
//! files, reprograms on change, survives bad files, and a kill -9 + restart
//! interrupts no connection.
mod common;

use std::{
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use common::{service, slice};
use proxy_testkit::{EchoServer, RequestStream, Topology, require_root, tcp_connect, tcp_exchange, tcp_request, unique_prefix, wait_until};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(2);

struct Harness {
    child: Option<Child>,
    pin_dir: String,
    manifests: PathBuf,
    _servers: Vec<EchoServer>,
    topo: Topology,
}

impl Harness {
    fn new() -> Self {
        require_root();
        let prefix = unique_prefix("p");
        let topo = Topology::build(&prefix, 1, 3).unwrap();
        let servers = topo.backends.iter().map(|b| EchoServer::start(&b.ns, &b.name, 8080).unwrap()).collect();
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        std::fs::create_dir_all(&manifests).unwrap();
        Harness { child: None, pin_dir: prefix, manifests, _servers: servers, topo }
    }

    fn write(&self, file: &str, text: &str) {
        // Write then rename, as a config-map update does.
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join(file)).unwrap();
    }

    fn web(&self, backends: &[usize]) -> String {
        let ports = [(80, "TCP")];
        let ips: Vec<Ipv4Addr> = backends.iter().map(|i| self.topo.backends[*i].ip).collect();
        service("web", "10.96.0.10", &ports, "") + &slice("web", "web-1", &ports, &ips)
    }

    fn start(&mut self) {
        self.start_with(&[]);
    }

    fn start_with(&mut self, extra: &[&str]) {
        let mut args = vec!["--poll-interval-ms", "100"];
        args.extend_from_slice(extra);
        let child = common::spawn_agent(&self.topo.node, &self.pin_dir, &["--manifests", self.manifests.to_str().unwrap()], &args);
        self.child = Some(child);
        assert!(wait_until(Duration::from_secs(15), || proxy_testkit::http_get(&self.topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")), "agent ready");
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // nsenter execs the agent, so the child pid is the agent's.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    fn answers(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| tcp_request(&self.topo.clients[0].ns, common::sa(VIP, 80), T).map(|r| r.0).unwrap_or_else(|e| format!("error: {e:#}"))).collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill9();
        let _ = proxy_agent::datapath::cleanup(&Path::new("/sys/fs/bpf").join(&self.pin_dir));
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}


#[test]
fn standalone_agent_follows_manifest_changes() {
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0, 1]));
    h.start();
    let a = h.answers(30);
    assert!(a.iter().all(|x| x == "b0" || x == "b1"), "{a:?}");

    // Endpoints change in the file: the agent reprograms.
    h.write("web.yaml", &h.web(&[2]));
    assert!(wait_until(Duration::from_secs(5), || h.answers(5).iter().all(|x| x == "b2")), "reprogrammed to b2");

    // A broken file is reported and ignored; the Service keeps working.
    h.write("broken.yaml", "kind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: notanumber}]}\n");
    std::thread::sleep(Duration::from_millis(400));
    assert!(h.child.as_mut().unwrap().try_wait().unwrap().is_none(), "agent still running");
    assert!(h.answers(5).iter().all(|x| x == "b2"));

    let metrics = proxy_testkit::http_get(&h.topo.node, 10249, "/metrics");
    assert!(metrics.contains("kproxy_programmed_frontends 1"), "{metrics}");
    assert!(metrics.contains("kproxy_datapath_packets_total{reason=\"new_flow\"}"), "{metrics}");

    // Deleting the file removes the Service: the VIP is no longer translated.
    std::fs::remove_file(h.manifests.join("web.yaml")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(&h.topo.clients[0].ns, common::sa(VIP, 80), Duration::from_millis(300)).is_err()));
}

#[test]
fn kill_and_restart_interrupts_no_connection() {
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0, 1, 2]));
    h.start();
    // Long-lived connections opened before the restart.
    let mut conns: Vec<(TcpStream, String)> = (0..6)
        .map(|_| {
            let mut s = tcp_connect(&h.topo.clients[0].ns, common::sa(VIP, 80), T).unwrap();
            let who = tcp_exchange(&mut s).unwrap();
            (s, who)
        })
        .collect();

    // A bounded stream of new connections across kill -9 and restart.
    let stream = RequestStream::start(&h.topo.clients[0].ns, common::sa(VIP, 80), 20_000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    h.kill9();
    std::thread::sleep(Duration::from_millis(500)); // no agent at all meanwhile
    h.start();
    std::thread::sleep(Duration::from_millis(300));
    let r = stream.finish();

    let (ok, failed) = (r.ok, r.failed);
    assert!(ok > 50, "the stream made progress ({ok} requests)");
    assert_eq!(failed, 0, "no request failed across kill -9 and restart ({ok} succeeded)");
    for (s, who) in &mut conns {
        assert_eq!(&tcp_exchange(s).expect("connection opened before the restart still works"), who);
    }
}

fn link_pins(h: &Harness) -> Vec<String> {
    let dir = Path::new("/sys/fs/bpf").join(&h.pin_dir).join("links");
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_recreated_interface_is_attached_again_within_a_second() {
    // Calico names a pod's veth after the pod: a StatefulSet pod recreated
    // on the same node gets an interface of the same name, new index.
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0, 1]));
    h.start();
    assert!(h.answers(3).iter().all(|x| x == "b0" || x == "b1"));
    let old = h.topo.node_ifindex("vethc0").unwrap();
    assert!(link_pins(&h).contains(&format!("in_{old}_vethc0")), "{:?}", link_pins(&h));

    h.topo.node.ip(&["link", "del", "vethc0"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !link_pins(&h).iter().any(|p| p.contains(&format!("_{old}_")))),
        "the pinned links of the vanished interface are removed: {:?}",
        link_pins(&h)
    );
    let client_ns = &h.topo.clients[0].ns;
    h.topo.wire_pod(client_ns, "vethc0", 0).unwrap();
    let created = std::time::Instant::now();
    let ok = wait_until(Duration::from_secs(3), || {
        tcp_request(client_ns, common::sa(VIP, 80), Duration::from_millis(200)).is_ok_and(|(who, _)| who == "b0" || who == "b1")
    });
    let took = created.elapsed();
    assert!(ok, "Service traffic through the recreated interface");
    assert!(took < Duration::from_secs(1), "attached again in {took:?}");
    let new = h.topo.node_ifindex("vethc0").unwrap();
    assert_ne!(new, old);
    assert!(link_pins(&h).contains(&format!("in_{new}_vethc0")), "{:?}", link_pins(&h));
}

#[test]
fn a_resized_conntrack_keeps_its_flows_and_a_too_small_one_is_refused() {
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0, 1, 2]));
    h.start_with(&["--max-conntrack", "8192"]);
    let mut conns: Vec<(TcpStream, String)> = (0..5)
        .map(|_| {
            let mut s = tcp_connect(&h.topo.clients[0].ns, common::sa(VIP, 80), T).unwrap();
            let who = tcp_exchange(&mut s).unwrap();
            (s, who)
        })
        .collect();
    let new_flows = |h: &Harness| {
        let stats = proxy_agent::datapath::read_stats(&Path::new("/sys/fs/bpf").join(&h.pin_dir)).unwrap();
        stats.iter().find(|(s, _)| *s == proxy_common::Stat::NewFlow).unwrap().1
    };
    let flows_before = new_flows(&h);
    h.kill9();
    h.start_with(&["--max-conntrack", "16384"]);
    let ct = Path::new("/sys/fs/bpf").join(&h.pin_dir).join(proxy_common::MAP_CT_TCP);
    let info = aya::maps::MapData::from_pin(&ct).unwrap().info().unwrap();
    assert_eq!(info.max_entries(), 16384, "the pinned map was resized");
    for (s, who) in &mut conns {
        assert_eq!(&tcp_exchange(s).expect("a flow survives the resize"), who);
    }
    // The entries were carried over, not rebuilt by the next packets.
    assert_eq!(new_flows(&h), flows_before, "no flow had to start again after the resize");
    h.kill9();
    let out = common::agent_command(&h.topo.node, &h.pin_dir, &["--manifests", h.manifests.to_str().unwrap()], &["--max-conntrack", "4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an agent that cannot fit the entries in the new size does not start");
    assert!(err.contains("more than the configured capacity"), "says why: {err}");
    // Nothing was lost: the next agent with a fitting size serves the flows.
    h.start_with(&["--max-conntrack", "16384"]);
    for (s, who) in &mut conns {
        assert_eq!(&tcp_exchange(s).expect("flows kept after a refused resize"), who);
    }
}

#[test]
fn debug_events_report_new_flows_and_refusals() {
    let mut h = Harness::new();
    let ports = [(80, "TCP")];
    let b0 = h.topo.backends[0].ip;
    h.write("web.yaml", &(service("web", "10.96.0.10", &ports, "") + &slice("web", "web-1", &ports, &[b0])));
    h.write("empty.yaml", &(service("empty", "10.96.0.11", &ports, "") + &slice("empty", "empty-1", &ports, &[])));
    let log = std::env::temp_dir().join(format!("{}-agent.log", h.pin_dir));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = common::agent_command(&h.topo.node, &h.pin_dir, &["--manifests", h.manifests.to_str().unwrap()], &["--poll-interval-ms", "100", "--debug-events"]);
    let child = cmd.env("RUST_LOG", "info").stdout(std::process::Stdio::null()).stderr(file).spawn().unwrap();
    h.child = Some(child);
    assert!(wait_until(Duration::from_secs(15), || proxy_testkit::http_get(&h.topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")), "agent ready");
    let client = &h.topo.clients[0];
    assert_eq!(tcp_request(&client.ns, common::sa(VIP, 80), T).unwrap().0, "b0");
    let refused = tcp_connect(&client.ns, common::sa(Ipv4Addr::new(10, 96, 0, 11), 80), T);
    assert!(refused.is_err(), "a Service without endpoints refuses");
    let want_flow = format!("-> 10.96.0.10:80 proto 6 -> backend");
    let want_backend = format!("{b0}:8080");
    let ok = wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().any(|l| l.contains("new flow") && l.contains(&want_flow) && l.contains(&want_backend))
            && text.lines().any(|l| l.contains("reject_no_backend") && l.contains("10.96.0.11:80"))
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(ok, "debug events in the agent's log:\n{text}");
}

#[test]
fn healthz_reports_a_node_being_drained() {
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0]));
    let node = |taint: &str| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nspec: {{{taint}}}\n");
    h.write("node.yaml", &node(""));
    h.start();
    let get = |h: &Harness| proxy_testkit::http_get(&h.topo.node, 10256, "/healthz");
    let r = get(&h);
    assert!(r.starts_with("HTTP/1.1 200"), "healthy node: {r}");
    let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["nodeEligible"], true);
    assert!(body["lastUpdated"].as_str().is_some_and(|s| s.starts_with("20")), "lastUpdated is a timestamp: {body}");
    assert!(body["currentTime"].as_str().is_some_and(|s| s.starts_with("20")));
    // The cluster autoscaler marks the node for deletion: load balancers
    // must drain it.
    h.write("node.yaml", &node("taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]"));
    assert!(wait_until(Duration::from_secs(5), || get(&h).starts_with("HTTP/1.1 503")), "503 while tainted: {}", get(&h));
    assert!(get(&h).contains("\"nodeEligible\":false"));
    // Traffic is still translated meanwhile (draining, not broken).
    assert_eq!(h.answers(1), vec!["b0".to_owned()]);
    h.write("node.yaml", &node(""));
    assert!(wait_until(Duration::from_secs(5), || get(&h).starts_with("HTTP/1.1 200")));
}

/// The value of the first sample of `name` in a Prometheus text scrape.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn kube_proxy_metrics_follow_changes() {
    let mut h = Harness::new();
    h.write("web.yaml", &h.web(&[0]));
    h.start();
    let scrape = |h: &Harness| proxy_testkit::http_get(&h.topo.node, 10249, "/metrics");
    let before = scrape(&h);
    let ep0 = metric(&before, "kubeproxy_sync_proxy_rules_endpoint_changes_total").expect("endpoint changes counter");
    assert!(metric(&before, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").is_some_and(|t| t > 1.7e9));
    // An endpoint change whose slice carries the trigger time the
    // EndpointSlice controller writes.
    let trigger = k8s_openapi::jiff::Timestamp::now().to_string();
    let slice = h.web(&[1]).replace(
        "  name: web-1\n",
        &format!("  name: web-1\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"\n"),
    );
    assert!(slice.contains("last-change-trigger-time"), "annotation placed: {slice}");
    h.write("web.yaml", &slice);
    assert!(wait_until(Duration::from_secs(5), || {
        let t = scrape(&h);
        metric(&t, "kubeproxy_sync_proxy_rules_endpoint_changes_total").is_some_and(|v| v > ep0)
            && metric(&t, "kubeproxy_network_programming_duration_seconds_count").is_some_and(|v| v >= 1.0)
    }), "counters moved:\n{}", scrape(&h));
    assert!(h.answers(1)[0] == "b1");
    let t = scrape(&h);
    assert!(metric(&t, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds").is_some_and(|v| v > 1.7e9));
    assert!(proxy_testkit::http_get(&h.topo.node, 10256, "/healthz").starts_with("HTTP/1.1 200"));
}
