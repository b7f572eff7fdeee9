//! Shared fixture for the privileged tests: a namespace topology, echo
//! servers on every backend, and an agent (the real one) attached in the
//! node namespace with its own pin directory.
#![allow(dead_code)]
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, DatapathConfig},
    manifests,
    metrics::Metrics,
};
use proxy_testkit::{EchoServer, TopoOptions, Topology, require_root, unique_prefix};

pub const BACKEND_PORT: u16 = 8080;

pub struct Env {
    pub agent: Option<Agent>,
    pub servers: Vec<EchoServer>,
    pub cfg: AgentConfig,
    pub topo: Topology,
}

/// How an [`Env`] is built.
#[derive(Clone, Debug)]
pub struct EnvOpts {
    pub node_ips: Vec<std::net::IpAddr>,
    pub topo: TopoOptions,
    pub max_conntrack: u32,
    pub max_conntrack_other: u32,
    pub interfaces: Vec<String>,
    pub socket_lb: datapath::SocketLb,
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Capacity of the services map (frontends plus set slots).
    pub max_services: u32,
}

impl Default for EnvOpts {
    fn default() -> Self {
        Self {
            node_ips: vec![],
            topo: TopoOptions::default(),
            max_conntrack: 65536,
            max_conntrack_other: 65536,
            interfaces: vec!["veth*".into()],
            socket_lb: datapath::SocketLb::Off,
            cgroup_root: None,
            max_services: proxy_common::DEFAULT_MAX_SERVICE_ENTRIES,
        }
    }
}

impl Env {
    pub fn new(tag: &str, clients: usize, backends: usize) -> Self {
        Self::build(tag, clients, backends, EnvOpts::default())
    }

    /// Like [`Env::new`], with NodePort addresses for the agent.
    pub fn with_node_ips(tag: &str, clients: usize, backends: usize, node_ips: Vec<std::net::IpAddr>) -> Self {
        Self::build(tag, clients, backends, EnvOpts { node_ips, ..EnvOpts::default() })
    }

    pub fn build(tag: &str, clients: usize, backends: usize, opts: EnvOpts) -> Self {
        require_root();
        let prefix = unique_prefix(tag);
        let topo = Topology::build_with(&prefix, clients, backends, opts.topo).expect("building topology");
        let servers = topo
            .backends
            .iter()
            .map(|b| EchoServer::start(&b.ns, &b.name, BACKEND_PORT).expect("echo server"))
            .collect();
        let cfg = AgentConfig {
            datapath: DatapathConfig {
                pin_dir_name: prefix.clone(),
                max_conntrack: opts.max_conntrack,
                max_conntrack_other: opts.max_conntrack_other,
                socket_lb: opts.socket_lb,
                cgroup_root: opts.cgroup_root.clone(),
                max_services: opts.max_services,
                ..Default::default()
            },
            interfaces: opts.interfaces.clone(),
            node_name: "node-a".into(),
            node_ips: opts.node_ips,
            maglev: true,
            nodeport_cidrs: vec![],
        };
        let mut env = Env { agent: None, servers, cfg: cfg.clone(), topo };
        let agent = env.topo.node.run(|| {
            let mut a = Agent::start(cfg, Arc::new(Metrics::default())).expect("agent start");
            let n = a.attach_interfaces().expect("attach");
            assert!(n >= clients + backends, "attached to every pod interface ({n})");
            a
        });
        env.agent = Some(agent);
        env
    }

    /// Re-lists the node's interfaces and attaches new ones (in the node's
    /// namespace); returns how many were attached.
    pub fn reattach(&mut self) -> usize {
        let Env { agent, topo, .. } = self;
        let agent = agent.as_mut().unwrap();
        topo.node.run(|| agent.attach_interfaces().expect("listing interfaces"))
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().unwrap()
    }

    /// Programs the maps from YAML through the agent's own path.
    pub fn apply(&mut self, yaml: &str) -> proxy_agent::sync::SyncReport {
        let objs = manifests::parse_str(yaml, "test").expect("test YAML");
        let r = self.agent().apply(&objs.services, &objs.slices, &objs.nodes, Instant::now());
        assert!(r.failed.is_empty(), "sync failures: {:?}", r.failed);
        r
    }

    pub fn backend_ip(&self, i: usize) -> Ipv4Addr {
        self.topo.backends[i].ip
    }

    pub fn client(&self, i: usize) -> &proxy_testkit::Netns {
        &self.topo.clients[i].ns
    }

    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.cfg.datapath.pin_dir()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.agent = None;
        let _ = datapath::cleanup(&self.cfg.datapath.pin_dir());
        self.servers.clear();
    }
}

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A ClusterIP Service `name` on `vip` with one port per (port, protocol),
/// each targeting `BACKEND_PORT` under the port name `p<port>-<proto>`.
pub fn service(name: &str, vip: &str, ports: &[(u16, &str)], extra_spec: &str) -> String {
    let mut p = String::new();
    for (port, proto) in ports {
        p.push_str(&format!(
            "  - name: p{port}-{}\n    port: {port}\n    protocol: {proto}\n    targetPort: {BACKEND_PORT}\n",
            proto.to_lowercase()
        ));
    }
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n{extra_spec}  ports:\n{p}"
    )
}

/// An EndpointSlice for `svc` with the given ready endpoints, and ports
/// matching [`service`].
pub fn slice(svc: &str, slice_name: &str, ports: &[(u16, &str)], endpoints: &[Ipv4Addr]) -> String {
    slice_with(svc, slice_name, ports, &endpoints.iter().map(|ip| (*ip, "ready: true")).collect::<Vec<_>>())
}

/// Like [`slice`], with explicit condition YAML per endpoint.
pub fn slice_with(svc: &str, slice_name: &str, ports: &[(u16, &str)], endpoints: &[(Ipv4Addr, &str)]) -> String {
    let mut p = String::new();
    for (port, proto) in ports {
        p.push_str(&format!(
            "  - name: p{port}-{}\n    port: {BACKEND_PORT}\n    protocol: {proto}\n",
            proto.to_lowercase()
        ));
    }
    let mut e = String::new();
    for (ip, cond) in endpoints {
        e.push_str(&format!("  - addresses: [\"{ip}\"]\n    nodeName: node-a\n    conditions: {{{cond}}}\n"));
    }
    if endpoints.is_empty() {
        e.push_str("  []\n");
    }
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice_name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n{p}endpoints:\n{e}"
    )
}

/// Starts the agent binary in `node`'s network namespace with the flags
/// every process-level test shares, plus `mode` (`--manifests DIR` or
/// `--kubeconfig FILE`) and `extra`.
pub fn spawn_agent(node: &proxy_testkit::Netns, pin_dir: &str, mode: &[&str], extra: &[&str]) -> std::process::Child {
    agent_command(node, pin_dir, mode, extra).stdout(std::process::Stdio::null()).spawn().expect("starting proxy-agent")
}

/// The command [`spawn_agent`] runs.
pub fn agent_command(node: &proxy_testkit::Netns, pin_dir: &str, mode: &[&str], extra: &[&str]) -> std::process::Command {
    let mut c = node.command(env!("CARGO_BIN_EXE_proxy-agent"));
    c.args(mode)
        .args(["--interfaces", "veth*", "--pin-dir", pin_dir, "--node-name", "node-a"])
        .args(["--metrics-addr", "127.0.0.1:10249", "--health-addr", "127.0.0.1:10256"])
        // Off unless a test says otherwise (later flags win): socket programs
        // never go to this machine's root cgroup.
        .args(["--socket-lb", "off"])
        .args(extra)
        .env("RUST_LOG", "warn");
    c
}
