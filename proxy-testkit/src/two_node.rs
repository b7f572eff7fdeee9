//! Two nodes, their pods and an outside client, as network namespaces.
//!
//! ```text
//!   client0 192.168.50.100 ─┐                 ┌─ eth0 192.168.50.10  node-a ── veth<pod> ── pods 10.244.<i>.2
//!   client1 192.168.50.101 ─┤ fabric (br0) ───┤
//!                           │                 └─ eth0 192.168.50.11  node-b ── veth<pod> ── pods 10.245.<i>.2
//! ```
//!
//! The fabric is a bridge in a namespace of its own; each node's uplink
//! `eth0` is a veth whose peer is a bridge port. Pod networks are routed
//! between the nodes through their uplinks (the flat pod network of the
//! Kubernetes model). Outside clients know only the fabric subnet and the
//! LoadBalancer range [`LB_RANGE`], routed to node A (a load balancer that
//! sends to one node). Clients and pods send complete checksums (transmit
//! offload off), as frames arriving from a wire have them. No namespace has a route anywhere else, so an
//! untranslated Service address dies inside; everything is removed on drop.
use std::net::Ipv4Addr;

use crate::{Netns, Pod, run};

/// The fabric subnet's prefix (`192.168.50.0/24`).
pub const FABRIC: [u8; 3] = [192, 168, 50];
/// LoadBalancer IPs (`172.18.0.0/24`), routed by outside clients to node A.
pub const LB_RANGE: &str = "172.18.0.0/24";

/// One node: its namespace, uplink address and pods.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    /// Second octet of its pod network (10.<pod_net>.<i>.0/24 per pod).
    pub pod_net: u8,
}

pub struct TwoNode {
    pub prefix: String,
    pub fabric: Netns,
    pub nodes: [Node; 2],
    /// Clients outside the cluster, on the fabric.
    pub clients: Vec<Netns>,
}

impl TwoNode {
    /// Builds the fabric, two nodes with `pods_per_node` pods each, and
    /// `clients` outside clients. `rp_filter`: strict reverse-path
    /// filtering on the nodes.
    pub fn build(prefix: &str, pods_per_node: usize, clients: usize, rp_filter: bool) -> anyhow::Result<Self> {
        let fabric = Netns::create(&format!("{prefix}-fab"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-n{i}"))?;
            let ip = Ipv4Addr::new(FABRIC[0], FABRIC[1], FABRIC[2], 10 + i as u8);
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            let rp = if rp_filter { "1" } else { "0" };
            ns.sysctl("net.ipv4.conf.all.rp_filter", rp)?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", rp)?;
            let peer = format!("up{i}");
            run("ip", &["link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &fabric.name])?;
            fabric.ip(&["link", "set", &peer, "master", "br0"])?;
            fabric.ip(&["link", "set", &peer, "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            nodes.push(Node { name: name.to_owned(), ns, ip, pods: Vec::new(), pod_net: 244 + i as u8 });
        }
        // Pod networks routed through the other node's uplink.
        let ips = [nodes[0].ip, nodes[1].ip];
        for (i, n) in nodes.iter().enumerate() {
            let other = &ips[1 - i];
            n.ns.ip(&["route", "add", &format!("10.{}.0.0/16", 244 + (1 - i)), "via", &other.to_string()])?;
        }
        let mut topo = Self { prefix: prefix.to_owned(), fabric, nodes: nodes.try_into().ok().expect("two nodes"), clients: Vec::new() };
        for n in 0..2 {
            for p in 0..pods_per_node {
                topo.add_pod(n, p as u8)?;
            }
        }
        for c in 0..clients {
            let ns = Netns::create(&format!("{prefix}-c{c}"))?;
            let ip = Ipv4Addr::new(FABRIC[0], FABRIC[1], FABRIC[2], 100 + c as u8);
            let peer = format!("cl{c}");
            run("ip", &["link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &topo.fabric.name])?;
            topo.fabric.ip(&["link", "set", &peer, "master", "br0"])?;
            topo.fabric.ip(&["link", "set", &peer, "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.disable_tx_checksum("eth0")?;
            ns.ip(&["route", "add", LB_RANGE, "via", &topo.nodes[0].ip.to_string()])?;
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            topo.clients.push(ns);
        }
        Ok(topo)
    }

    /// Adds pod `idx` behind node `n`: `10.<244+n>.<idx>.2/24`, its node side
    /// `10.<244+n>.<idx>.1` on `veth<n><idx>`.
    pub fn add_pod(&mut self, n: usize, idx: u8) -> anyhow::Result<()> {
        let node = &self.nodes[n];
        let name = format!("p{n}{idx}");
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let node_if = format!("veth{n}{idx}");
        run("ip", &["link", "add", &node_if, "netns", &node.ns.name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        let gw = Ipv4Addr::new(10, node.pod_net, idx, 1);
        let ip = Ipv4Addr::new(10, node.pod_net, idx, 2);
        node.ns.ip(&["addr", "add", &format!("{gw}/24"), "dev", &node_if])?;
        node.ns.ip(&["link", "set", &node_if, "up"])?;
        let rp = node.ns.exec("sysctl", &["-n", "net.ipv4.conf.all.rp_filter"]).unwrap_or_default();
        node.ns.sysctl(&format!("net.ipv4.conf.{node_if}.rp_filter"), rp.trim())?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.disable_tx_checksum("eth0")?;
        self.nodes[n].pods.push(Pod { name, ip, node_if, ns });
        Ok(())
    }
}
