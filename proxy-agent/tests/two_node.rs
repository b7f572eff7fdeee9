//! Traffic from outside the node on a two-node topology (see
//! `proxy_testkit::two_node`): NodePort, LoadBalancer and externalIP flows
//! to backends on the other node (SNAT), externalTrafficPolicy Local,
//! loadBalancerSourceRanges, ipMode Proxy. Two real agents, one per node,
//! each attached to its uplink `eth0` (external) and its pods' veths.
mod common;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{BACKEND_PORT, sa};
use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, DatapathConfig},
    manifests,
    metrics::Metrics,
};
use proxy_common::Stat;
use proxy_testkit::{
    EchoServer, Netns, require_root, tcp_connect, tcp_who, two_node::TwoNode, udp_who, unique_prefix,
};

const T: Duration = Duration::from_secs(2);
/// How long a flow that must not be answered is given.
const SILENT: Duration = Duration::from_millis(700);

struct Env {
    /// `kp_xdp_pass` on the fabric side of each uplink (a veth that
    /// receives XDP_TX frames needs an XDP program); dropped last.
    _xdp_peers: Option<aya::Ebpf>,
    agents: Vec<Agent>,
    cfgs: Vec<AgentConfig>,
    servers: Vec<EchoServer>,
    topo: TwoNode,
}

impl Env {
    /// Two nodes with `pods` backend pods each (each serving TCP and UDP on
    /// BACKEND_PORT, named `p<node><i>`), `clients` outside clients, and an
    /// agent on each node.
    fn new(tag: &str, pods: usize, clients: usize) -> Self {
        Self::with(tag, pods, clients, datapath::Acceleration::None)
    }

    fn with(tag: &str, pods: usize, clients: usize, acceleration: datapath::Acceleration) -> Self {
        Self::build(tag, pods, clients, acceleration, vec![])
    }

    fn build(
        tag: &str,
        pods: usize,
        clients: usize,
        acceleration: datapath::Acceleration,
        nodeport_cidrs: Vec<(Ipv4Addr, u8)>,
    ) -> Self {
        require_root();
        let prefix = unique_prefix(tag);
        let topo = TwoNode::build(&prefix, pods, clients, true).expect("two-node topology");
        let mut servers = Vec::new();
        for n in &topo.nodes {
            for p in &n.pods {
                servers.push(EchoServer::start(&p.ns, &p.name, BACKEND_PORT).expect("echo server"));
            }
        }
        let mut agents = Vec::new();
        let mut cfgs = Vec::new();
        for (i, n) in topo.nodes.iter().enumerate() {
            let cfg = AgentConfig {
                datapath: DatapathConfig {
                    pin_dir_name: format!("{prefix}-{i}"),
                    max_conntrack: 65536,
                    max_conntrack_other: 65536,
                    max_snat: 4096,
                    external_interfaces: vec!["eth0".into()],
                    acceleration,
                    ..Default::default()
                },
                interfaces: vec!["eth0".into(), "veth*".into()],
                node_name: n.name.clone(),
                node_ips: vec![n.ip.into()],
                maglev: true,
                nodeport_cidrs: nodeport_cidrs.clone(),
            };
            let agent = n.ns.run(|| {
                let mut a = Agent::start(cfg.clone(), Arc::new(Metrics::default())).expect("agent start");
                let k = a.attach_interfaces().expect("attach");
                assert_eq!(k, 1 + n.pods.len(), "attached to the uplink and every pod interface");
                a
            });
            agents.push(agent);
            cfgs.push(cfg);
        }
        let xdp_peers = (acceleration != datapath::Acceleration::None).then(|| {
            topo.fabric.run(|| {
                let mut loader = aya::EbpfLoader::new();
                loader.map_max_entries(proxy_common::MAP_CT_TCP, 16).map_max_entries(proxy_common::MAP_CT_ANY, 16);
                let mut ebpf = loader.load(datapath::EBPF_OBJECT).expect("loading the object for kp_xdp_pass");
                let prog: &mut aya::programs::Xdp =
                    ebpf.program_mut(proxy_common::PROG_XDP_PASS).unwrap().try_into().unwrap();
                prog.load().expect("kp_xdp_pass");
                for peer in ["up0", "up1"] {
                    prog.attach(peer, aya::programs::XdpMode::Driver).expect("kp_xdp_pass on the fabric side");
                }
                ebpf
            })
        });
        Self { _xdp_peers: xdp_peers, agents, cfgs, servers, topo }
    }

    /// Programs both nodes from the same objects.
    fn apply(&mut self, yaml: &str) {
        let objs = manifests::parse_str(yaml, "test").expect("test YAML");
        for a in &mut self.agents {
            let r = a.apply(&objs.services, &objs.slices, &objs.nodes, Instant::now());
            assert!(r.failed.is_empty(), "sync failures: {:?}", r.failed);
        }
    }

    fn node_ip(&self, n: usize) -> Ipv4Addr {
        self.topo.nodes[n].ip
    }

    fn pod_ip(&self, n: usize, i: usize) -> Ipv4Addr {
        self.topo.nodes[n].pods[i].ip
    }

    fn client(&self, c: usize) -> &Netns {
        &self.topo.clients[c]
    }

    fn client_ip(&self, c: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 50, 100 + c as u8)
    }

    /// Every non-zero counter of both nodes, for failure messages.
    fn stats(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.cfgs.iter().enumerate() {
            let s = datapath::read_stats(&c.datapath.pin_dir()).unwrap();
            let nz: Vec<String> = s.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{}={v}", k.name())).collect();
            out.push_str(&format!("node {i}: {}\n", nz.join(" ")));
        }
        out
    }

    fn stat(&self, n: usize, stat: Stat) -> u64 {
        datapath::read_stats(&self.cfgs[n].datapath.pin_dir()).unwrap().into_iter().find(|(s, _)| *s == stat).unwrap().1
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.agents.clear();
        self._xdp_peers = None;
        for c in &self.cfgs {
            let _ = datapath::cleanup(&c.datapath.pin_dir());
        }
        self.servers.clear();
    }
}

/// A Service `name` of `type_` with one port 80 (TCP and UDP) on
/// `nodePort`, extra spec lines, and endpoints `(ip, node)`.
fn service(name: &str, cluster_ip: &str, type_: &str, node_port: u16, extra: &str, eps: &[(Ipv4Addr, &str)]) -> String {
    service_with_status(name, cluster_ip, type_, node_port, extra, eps, "")
}

/// [`service`] with a `status:` block for the Service.
fn service_with_status(
    name: &str,
    cluster_ip: &str,
    type_: &str,
    node_port: u16,
    extra: &str,
    eps: &[(Ipv4Addr, &str)],
    status: &str,
) -> String {
    let mut e = String::new();
    for (ip, node) in eps {
        e.push_str(&format!("  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions: {{ready: true}}\n"));
    }
    if eps.is_empty() {
        e.push_str("  []\n");
    }
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {type_}
  clusterIP: {cluster_ip}
{extra}  ports:
  - {{name: tcp, port: 80, protocol: TCP, targetPort: {BACKEND_PORT}, nodePort: {node_port}}}
  - {{name: udp, port: 80, protocol: UDP, targetPort: {BACKEND_PORT}, nodePort: {node_port}}}
{status}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}
- {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}
endpoints:
{e}"
    )
}

/// LoadBalancer status lines for `ips` (`ip` or `ip:Proxy`).
fn lb_status(ips: &[&str]) -> String {
    let mut s = String::from("status:\n  loadBalancer:\n    ingress:\n");
    for ip in ips {
        match ip.split_once(':') {
            Some((ip, mode)) => s.push_str(&format!("    - {{ip: {ip}, ipMode: {mode}}}\n")),
            None => s.push_str(&format!("    - {{ip: {ip}}}\n")),
        }
    }
    s
}

fn assert_silent(ns: &Netns, to: SocketAddrV4, what: &str) {
    match tcp_connect(ns, to, SILENT) {
        Ok(_) => panic!("{what}: {to} answered"),
        Err(e) => {
            let kind = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
            assert_ne!(kind, Some(std::io::ErrorKind::ConnectionRefused), "{what}: dropped, not refused: {e:#}");
        }
    }
}

#[test]
fn nodeport_to_a_backend_on_the_other_node_is_snated_both_ways() {
    let mut env = Env::new("2s", 1, 1);
    // Service a: its only endpoint on node B; Service b: on node A.
    let a = service("a", "10.96.1.1", "NodePort", 30081, "", &[(env.pod_ip(1, 0), "node-b")]);
    let b = service("b", "10.96.1.2", "NodePort", 30082, "", &[(env.pod_ip(0, 0), "node-a")]);
    env.apply(&(a + &b));
    for (node, port, backend, backend_node) in [(0, 30081, "p10", 1), (1, 30082, "p00", 0)] {
        let to = sa(env.node_ip(node), port);
        let (who, peer) = tcp_who(env.client(0), to, T).unwrap_or_else(|e| panic!("TCP via node {node}: {e:#}"));
        assert_eq!(who, backend);
        let SocketAddr::V4(peer) = peer else { panic!("IPv6 peer") };
        assert_eq!(*peer.ip(), env.node_ip(node), "the backend on node {backend_node} sees the SNAT address of the node the client used");
        assert!(peer.port() >= proxy_common::DEFAULT_SNAT_PORT_MIN, "a port from the SNAT range: {peer}");
        // UDP: the answer comes back from the address the client sent to.
        let (who, peer) = udp_who(env.client(0), to, T).unwrap_or_else(|e| panic!("UDP via node {node}: {e:#}"));
        assert_eq!(who, backend);
        assert_eq!(peer.ip(), std::net::IpAddr::V4(env.node_ip(node)));
        assert!(env.stat(node, Stat::SnatNew) >= 2, "SNAT counted on node {node}");
        assert!(env.stat(node, Stat::SnatReply) >= 2, "replies reverse-translated on node {node}");
    }
    // Many connections in a row: each gets its own SNAT port, none fails.
    let to = sa(env.node_ip(0), 30081);
    for i in 0..50 {
        let (who, _) = tcp_who(env.client(0), to, T).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_eq!(who, "p10");
    }
    // Pods call the NodePort of either node, whichever node runs the backend.
    for (from, node, port, backend) in [(0, 1, 30081, "p10"), (0, 1, 30082, "p00"), (1, 0, 30081, "p10"), (1, 1, 30081, "p10")] {
        let pod = &env.topo.nodes[from].pods[0].ns;
        let (who, _) = tcp_who(pod, sa(env.node_ip(node), port), T)
            .unwrap_or_else(|e| panic!("pod on node {from} -> node {node}:{port}: {e:#}"));
        assert_eq!(who, backend);
        let (who, _) = udp_who(pod, sa(env.node_ip(node), port), T)
            .unwrap_or_else(|e| panic!("UDP pod on node {from} -> node {node}:{port}: {e:#}"));
        assert_eq!(who, backend);
    }
    // A local backend is reached without SNAT (it sees the client).
    let (who, peer) = tcp_who(env.client(0), sa(env.node_ip(0), 30082), T).unwrap();
    assert_eq!((who.as_str(), peer.ip()), ("p00", std::net::IpAddr::V4(env.client_ip(0))));
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_on_nodes_without_endpoints() {
    let mut env = Env::new("2l", 1, 1);
    let svc = service_with_status(
        "l",
        "10.96.2.1",
        "LoadBalancer",
        30091,
        "  externalTrafficPolicy: Local\n",
        &[(env.pod_ip(0, 0), "node-a")],
        &lb_status(&["172.18.0.50"]),
    );
    env.apply(&svc);
    // Node A has the endpoint: the backend sees the outside client itself.
    let (who, peer) = tcp_who(env.client(0), sa(env.node_ip(0), 30091), T).unwrap();
    assert_eq!((who.as_str(), peer.ip()), ("p00", std::net::IpAddr::V4(env.client_ip(0))));
    let (who, peer) = udp_who(env.client(0), sa(env.node_ip(0), 30091), T).unwrap();
    assert_eq!((who.as_str(), peer.ip()), ("p00", std::net::IpAddr::V4(env.client_ip(0))));
    // The LoadBalancer IP (routed to node A) too.
    let (who, peer) = tcp_who(env.client(0), sa(Ipv4Addr::new(172, 18, 0, 50), 80), T).unwrap();
    assert_eq!((who.as_str(), peer.ip()), ("p00", std::net::IpAddr::V4(env.client_ip(0))));
    // Node B has none: outside clients are dropped there, not refused.
    assert_silent(env.client(0), sa(env.node_ip(1), 30091), "eTP=Local on a node without endpoints");
    assert!(env.stat(1, Stat::DropNoLocal) >= 1, "counted as drop_no_local on node B");
    assert_eq!(env.stat(0, Stat::SnatNew) + env.stat(1, Stat::SnatNew), 0, "nothing SNATed under a Local policy");
    // A pod on node B (inside the cluster) reaches the LoadBalancer IP and
    // the NodePort on its own node: every endpoint, through node B.
    let pod_b = &env.topo.nodes[1].pods[0].ns;
    let (who, _) = tcp_who(pod_b, sa(Ipv4Addr::new(172, 18, 0, 50), 80), T).expect("pod on node B -> eTP=Local LB IP");
    assert_eq!(who, "p00");
    let (who, _) = tcp_who(pod_b, sa(env.node_ip(1), 30091), T).expect("pod on node B -> its node's eTP=Local NodePort");
    assert_eq!(who, "p00");
}

#[test]
fn load_balancer_source_ranges_admit_one_client_and_drop_another_and_proxy_ip_mode_is_not_translated() {
    let mut env = Env::new("2r", 1, 2);
    let svc = service_with_status(
        "r",
        "10.96.3.1",
        "LoadBalancer",
        30101,
        &format!("  loadBalancerSourceRanges: [\"{}/32\"]\n", env.client_ip(0)),
        &[(env.pod_ip(1, 0), "node-b")],
        &lb_status(&["172.18.0.60", "172.18.0.61:Proxy"]),
    );
    env.apply(&svc);
    let lb = sa(Ipv4Addr::new(172, 18, 0, 60), 80);
    let (who, _) = tcp_who(env.client(0), lb, T).expect("client 0 is in the source ranges");
    assert_eq!(who, "p10");
    assert_silent(env.client(1), lb, "client 1 is outside the source ranges");
    assert!(env.stat(0, Stat::DropSourceRange) >= 1, "counted as drop_source_range");
    // The NodePort of the same Service is not limited by the ranges (kube-proxy).
    let (who, _) = tcp_who(env.client(1), sa(env.node_ip(0), 30101), T).expect("NodePort from client 1");
    assert_eq!(who, "p10");
    // ipMode Proxy: the load balancer proxies; the node does not translate
    // its IP (it has no route for it, so the packet dies there).
    assert_silent(env.client(0), sa(Ipv4Addr::new(172, 18, 0, 61), 80), "an ipMode Proxy ingress IP");
    let vips = proxy_agent::datapath::PinnedMaps::open(&env.cfgs[0].datapath.pin_dir()).unwrap();
    use proxy_agent::sync::MapOps as _;
    let addrs: Vec<[u8; 16]> = vips.vips().unwrap().into_iter().map(|(a, _)| a).collect();
    assert!(!addrs.contains(&proxy_common::v4_mapped([172, 18, 0, 61])), "no Service address for the Proxy-mode IP");
    assert!(addrs.contains(&proxy_common::v4_mapped([172, 18, 0, 60])));
}

#[test]
fn xdp_takes_the_fast_path_for_nodeport_flows_to_either_node() {
    let mut env = Env::with("2x", 1, 1, datapath::Acceleration::Native);
    let a = service("a", "10.96.4.1", "NodePort", 30121, "", &[(env.pod_ip(1, 0), "node-b")]);
    let b = service("b", "10.96.4.2", "NodePort", 30122, "", &[(env.pod_ip(0, 0), "node-a")]);
    env.apply(&(a + &b));
    // Remote backend (SNAT, forwarded by XDP both ways) and local backend
    // (translated by XDP, delivered by the stack), TCP and UDP, on both nodes.
    for (node, remote, local, remote_name, local_name) in [(0, 30121, 30122, "p10", "p00"), (1, 30122, 30121, "p00", "p10")] {
        for _ in 0..10 {
            let (who, peer) = tcp_who(env.client(0), sa(env.node_ip(node), remote), T)
                .unwrap_or_else(|e| panic!("TCP via node {node}, remote backend: {e:#}\n{}", env.stats()));
            assert_eq!((who.as_str(), peer.ip()), (remote_name, std::net::IpAddr::V4(env.node_ip(node))));
            let (who, _) = udp_who(env.client(0), sa(env.node_ip(node), remote), T).expect("UDP, remote backend");
            assert_eq!(who, remote_name);
            let (who, peer) = tcp_who(env.client(0), sa(env.node_ip(node), local), T).expect("TCP, local backend");
            assert_eq!((who.as_str(), peer.ip()), (local_name, std::net::IpAddr::V4(env.client_ip(0))));
        }
        assert!(env.stat(node, Stat::XdpTx) >= 40, "node {node} forwarded SNAT flows with XDP_TX\n{}", env.stats());
    }
    // Long-lived flow: every packet after the first few goes through XDP.
    let mut s = tcp_connect(env.client(0), sa(env.node_ip(0), 30121), T).unwrap();
    for _ in 0..50 {
        assert_eq!(proxy_testkit::tcp_exchange(&mut s).unwrap(), "p10");
    }
    let tx = env.stat(0, Stat::XdpTx);
    let to_stack = env.stat(0, Stat::XdpPassTranslated);
    assert!(tx >= 100, "SNAT flows forwarded by XDP_TX: {tx}");
    assert!(to_stack >= 10, "local-backend flows translated in XDP: {to_stack}");
    assert!(env.stat(0, Stat::SnatNew) >= 20 && env.stat(0, Stat::SnatReply) >= 20);
}

#[test]
fn nodeport_addresses_select_the_local_addresses_nodeports_answer_on() {
    // --nodeport-addresses 10.244.0.0/16: node A serves NodePorts on its pod
    // gateway address only, not on its uplink address; SNAT still uses the
    // Node's primary address.
    let mut env = Env::build("2p", 1, 1, datapath::Acceleration::None, vec![(Ipv4Addr::new(10, 244, 0, 0), 16)]);
    let svc = service("p", "10.96.5.1", "NodePort", 30131, "", &[(env.pod_ip(1, 0), "node-b")]);
    env.apply(&svc);
    let pod_a = &env.topo.nodes[0].pods[0].ns;
    let (who, _) = tcp_who(pod_a, sa(Ipv4Addr::new(10, 244, 0, 1), 30131), T).expect("NodePort on the selected address");
    assert_eq!(who, "p10");
    // Node A's uplink address is no NodePort address now: nothing listens
    // there, so the node's stack refuses (no translation happened).
    let err = tcp_connect(env.client(0), sa(env.node_ip(0), 30131), SILENT).expect_err("not a NodePort address");
    assert_eq!(err.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused));
    // SNAT keeps the Node's primary address (the uplink's).
    let pin = env.cfgs[0].datapath.pin_dir().join(proxy_common::MAP_CONFIG);
    let map = aya::maps::Map::Array(aya::maps::MapData::from_pin(&pin).unwrap());
    let cfg: aya::maps::Array<_, proxy_common::NodeConfig> = aya::maps::Array::try_from(map).unwrap();
    assert_eq!(cfg.get(&0, 0).unwrap().snat_addr, proxy_common::v4_mapped(env.node_ip(0).octets()));
}

/// `GET /healthz` on `addr` from `ns`: (status code, body).
fn hc_get(ns: &Netns, addr: SocketAddrV4) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read as _, Write as _};
    let mut s = tcp_connect(ns, addr, T).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1)?;
    Some((status, serde_json::from_str(body).ok()?))
}

#[test]
fn health_check_node_ports_answer_per_node_and_follow_endpoints() {
    let mut env = Env::new("2h", 1, 1);
    let hc_port = 32_500;
    let svc = |node: &str, ip: Ipv4Addr| {
        service_with_status(
            "hc",
            "10.96.6.1",
            "LoadBalancer",
            30141,
            &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc_port}\n"),
            &[(ip, node)],
            &lb_status(&["172.18.0.70"]),
        )
    };
    env.apply(&svc("node-a", env.pod_ip(0, 0)));
    let probe = |env: &Env, n: usize| hc_get(env.client(0), sa(env.node_ip(n), hc_port));
    // A client that connects and says nothing does not hold the port.
    let _idle = tcp_connect(env.client(0), sa(env.node_ip(0), hc_port), T).expect("idle connection");
    let (status, body) = probe(&env, 0).expect("node A answers its health check port");
    assert_eq!(status, 200);
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "hc");
    let (status, body) = probe(&env, 1).expect("node B answers too");
    assert_eq!((status, body["localEndpoints"].as_u64()), (503, Some(0)), "no local endpoint on node B");
    // The endpoint moves to node B: the answers follow.
    env.apply(&svc("node-b", env.pod_ip(1, 0)));
    assert_eq!(probe(&env, 0).map(|r| r.0), Some(503));
    assert_eq!(probe(&env, 1).map(|r| r.0), Some(200));
    // The Service goes: the port closes on both nodes.
    env.apply("");
    for n in 0..2 {
        assert!(env.agents[n].health_check_ports().is_empty());
        let err = tcp_connect(env.client(0), sa(env.node_ip(n), hc_port), SILENT).expect_err("port closed");
        assert_eq!(err.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused));
    }
}
