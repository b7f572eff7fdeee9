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
        let child = common::spawn_agent(
            &self.topo.node,
            &self.pin_dir,
            &["--manifests", self.manifests.to_str().unwrap()],
            &["--poll-interval-ms", "100"],
        );
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
