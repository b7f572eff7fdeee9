//! The datapath under the conditions of a real node, not a quiet lab:
//! strict rp_filter, netfilter's ct-invalid drop, masquerade toward a
//! backend outside the pod network, other programs on the same hooks,
//! pods on a Linux bridge, an L3 device, a client reusing the ports of its
//! Service flows for direct connections, conntrack under UDP churn, ICMP
//! errors and fragments through a Service.
mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use common::{BACKEND_PORT, Env, EnvOpts, sa, service, slice};
use proxy_common::Stat;
use proxy_testkit::{
    EchoServer, Netns, TopoOptions,
    bpf::{ForeignProgram, Position, attach_legacy},
    run, tcp_connect, tcp_connect_from, tcp_exchange, tcp_request, udp_request,
};

const T: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The node's address facing client 0 (routed and bridged topologies alike).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_PORT: u16 = 30080;

fn stat(env: &Env, which: Stat) -> u64 {
    proxy_agent::datapath::read_stats(&env.pin_dir()).unwrap().iter().find(|(s, _)| *s == which).unwrap().1
}

/// `web`: ClusterIP 10.96.0.10 and NodePort 30080, TCP 80 and UDP 53, on `backends`.
fn web(backends: &[Ipv4Addr]) -> String {
    let ports = [(80, "TCP"), (53, "UDP")];
    service("web", "10.96.0.10", &ports, "")
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: 8080\n", &format!("targetPort: 8080\n    nodePort: {NODE_PORT}\n"))
        + &slice("web", "web-1", &ports, backends)
}

/// ClusterIP and NodePort, TCP and UDP, from client 0: every answer comes
/// from one of `names` and from the address the client asked.
fn assert_service_works(env: &Env, names: &[&str]) {
    for (addr, tcp_port, udp_port) in [(VIP, 80, 53), (NODE_IP, NODE_PORT, NODE_PORT)] {
        for _ in 0..5 {
            let (answer, peer) = tcp_request(env.client(0), sa(addr, tcp_port), T)
                .unwrap_or_else(|e| panic!("TCP {addr}:{tcp_port}: {e:#}"));
            assert!(names.contains(&answer.as_str()), "TCP {addr}:{tcp_port} answered {answer:?}");
            assert_eq!(peer, SocketAddr::from(sa(addr, tcp_port)));
            let (answer, from) = udp_request(env.client(0), sa(addr, udp_port), T)
                .unwrap_or_else(|e| panic!("UDP {addr}:{udp_port}: {e:#}"));
            assert!(names.contains(&answer.as_str()), "UDP {addr}:{udp_port} answered {answer:?}");
            assert_eq!(from, SocketAddr::from(sa(addr, udp_port)), "UDP reply source");
        }
    }
}

fn env_with(tag: &str, topo: TopoOptions) -> Env {
    Env::build(tag, 1, 2, EnvOpts { node_ips: vec![NODE_IP.into()], topo, ..EnvOpts::default() })
}

fn ct_invalid_drop(env: &Env) {
    // Calico and others install this; a reply rewritten before the stack
    // matches no netfilter conntrack entry and is INVALID.
    env.topo.node.exec("iptables", &["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]).expect("iptables");
}

#[test]
fn strict_rp_filter_on_every_interface() {
    let mut env = env_with("ra", TopoOptions { rp_filter: true, ..TopoOptions::default() });
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    assert_service_works(&env, &["b0", "b1"]);
}

#[test]
fn netfilter_drops_invalid_conntrack_state() {
    let mut env = env_with("rb", TopoOptions::default());
    ct_invalid_drop(&env);
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    assert_service_works(&env, &["b0", "b1"]);
}

/// A backend outside the pod network that can only answer the node
/// (the `kubernetes` Service seen from a worker, selector-less Services
/// with external endpoints): the node masquerades toward it.
fn add_masqueraded_backend(env: &Env) -> (Netns, EchoServer, Ipv4Addr) {
    let ns = Netns::create(&format!("{}-ext", env.topo.prefix)).unwrap();
    run("ip", &["link", "add", "vethext", "netns", &env.topo.node.name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]).unwrap();
    env.topo.node.ip(&["addr", "add", "10.201.0.1/24", "dev", "vethext"]).unwrap();
    env.topo.node.ip(&["link", "set", "vethext", "up"]).unwrap();
    ns.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    // No default route: without masquerade its replies have nowhere to go.
    env.topo.node.exec("iptables", &["-t", "nat", "-A", "POSTROUTING", "-d", "10.201.0.0/24", "-j", "MASQUERADE"]).unwrap();
    let server = EchoServer::start(&ns, "ext", BACKEND_PORT).unwrap();
    (ns, server, Ipv4Addr::new(10, 201, 0, 2))
}

#[test]
fn masquerade_toward_a_backend_outside_the_pod_network() {
    let mut env = env_with("rc", TopoOptions { rp_filter: true, ..TopoOptions::default() });
    ct_invalid_drop(&env);
    let (_ns, _server, ext) = add_masqueraded_backend(&env);
    assert!(env.reattach() <= 1);
    env.apply(&web(&[ext]));
    assert_service_works(&env, &["ext"]);
}

#[test]
fn pods_on_a_linux_bridge() {
    // Flannel and the reference bridge CNI: pods share one L2 segment; the
    // backend's reply reaches the client without crossing the node's IP
    // stack, so it can only be reverse-translated at the client's port.
    let mut env = env_with("rd", TopoOptions { bridge: true, ..TopoOptions::default() });
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    assert_service_works(&env, &["b0", "b1"]);
    // The pod reaches its own Service through the bridge too (hairpin).
    let me = env.topo.clients[0].ip;
    let _self_server = EchoServer::start(env.client(0), "self", BACKEND_PORT).unwrap();
    let ports = [(80, "TCP")];
    env.apply(&(web(&[env.backend_ip(0), env.backend_ip(1)]) + &service("hp", "10.96.0.70", &ports, "") + &slice("hp", "hp-1", &ports, &[me])));
    let (answer, peer) = tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 70), 80), T).expect("hairpin on a bridge");
    assert_eq!((answer.as_str(), peer), ("self", SocketAddr::from(sa(Ipv4Addr::new(10, 96, 0, 70), 80))));
}

#[test]
fn pods_on_a_bridge_with_the_bridge_attached_too() {
    // The chart's interface patterns match both a CNI bridge (cni0) and its
    // ports: a packet translated at its pod's port meets our ingress again
    // on the bridge, and must stay its flow's.
    let mut env = Env::build(
        "rn",
        1,
        2,
        EnvOpts {
            node_ips: vec![NODE_IP.into()],
            topo: TopoOptions { bridge: true, ..TopoOptions::default() },
            interfaces: vec!["veth*".into(), "br0".into()],
            ..EnvOpts::default()
        },
    );
    assert_eq!(env.reattach(), 0, "br0 was attached at start");
    assert!(env.agent().attached().contains("br0"));
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    assert_service_works(&env, &["b0", "b1"]);
    assert_eq!(stat(&env, Stat::StaleReplyEvicted), 0, "no live flow was evicted");
}

#[test]
fn other_programs_on_the_same_hooks_keep_seeing_traffic() {
    let mut env = env_with("re", TopoOptions::default());
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let pin = |n: &str| std::path::PathBuf::from(format!("/sys/fs/bpf/{}-{n}", env.topo.prefix));
    let (after, before, legacy_in, legacy_eg) = (
        ForeignProgram::load(&pin("after")).unwrap(),
        ForeignProgram::load(&pin("before")).unwrap(),
        ForeignProgram::load(&pin("legacy-in")).unwrap(),
        ForeignProgram::load(&pin("legacy-eg")).unwrap(),
    );
    let mut links = Vec::new();
    for pod in env.topo.clients.iter().chain(&env.topo.backends) {
        let idx = env.topo.node_ifindex(&pod.node_if).unwrap();
        env.topo.node.run(|| {
            // Appended behind ours at ingress and egress, and one in front of ours.
            links.push(after.attach_tcx(idx, true, Position::Last).unwrap());
            links.push(after.attach_tcx(idx, false, Position::Last).unwrap());
            links.push(before.attach_tcx(idx, true, Position::First).unwrap());
        });
        attach_legacy(&env.topo.node, &pod.node_if, true, &legacy_in).unwrap();
        attach_legacy(&env.topo.node, &pod.node_if, false, &legacy_eg).unwrap();
    }
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    let runs = |p: &ForeignProgram| aya::programs::ProgramInfo::from_pin(&p.pin).unwrap().run_count();
    let before_counts = [runs(&after), runs(&before), runs(&legacy_in), runs(&legacy_eg)];
    assert_service_works(&env, &["b0", "b1"]);
    let after_counts = [runs(&after), runs(&before), runs(&legacy_in), runs(&legacy_eg)];
    // 20 TCP exchanges (>= 5 packets each way) and 20 UDP ones crossed two
    // interfaces each: every program saw well over 100 packets.
    for (i, name) in ["tcx after ours", "tcx before ours", "legacy clsact ingress", "legacy clsact egress"].iter().enumerate() {
        let seen = after_counts[i] - before_counts[i];
        assert!(seen >= 100, "{name} saw only {seen} packets: a verdict of ours ended its chain");
    }
    drop(links);
}

#[test]
fn an_l3_device_without_ethernet_header() {
    // WireGuard, IPIP and tun devices carry bare IP packets: the L3 program.
    let mut env = Env::build(
        "rf",
        1,
        2,
        EnvOpts { interfaces: vec!["veth*".into(), "ktun*".into()], ..EnvOpts::default() },
    );
    let mut tun = proxy_testkit::tun::Tun::create(&env.topo.node, "ktun0", Ipv4Addr::new(10, 210, 0, 1)).unwrap();
    assert_eq!(env.reattach(), 1, "the tun device is attached");
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1)]));
    let peer = Ipv4Addr::new(10, 210, 0, 2);
    for sport in 40000..40010u16 {
        tun.send(&proxy_testkit::tun::udp_packet(peer, VIP, sport, 53, b"hi")).unwrap();
        let reply = tun
            .recv_matching(T, |p| p.len() >= 28 && p[9] == 17 && p[16..20] == peer.octets() && u16::from_be_bytes([p[22], p[23]]) == sport)
            .unwrap_or_else(|| panic!("no UDP reply to port {sport} came out of the L3 device"));
        assert_eq!(&reply[12..16], &VIP.octets(), "reply source is the ClusterIP");
        assert_eq!(u16::from_be_bytes([reply[20], reply[21]]), 53, "reply source port is the Service port");
        assert_eq!(proxy_testkit::tun::checksum(&reply[..20], 0), 0, "IPv4 checksum");
        let name = String::from_utf8_lossy(&reply[28..]).trim().to_owned();
        assert!(name == "b0" || name == "b1", "answered by {name:?}");
    }
}

#[test]
fn direct_connections_reusing_service_flow_ports_all_succeed() {
    // A client talks to a Service, then straight to the backend pod from the
    // same source ports (headless Services, StatefulSets, scrapers).
    let mut env = Env::new("rg", 1, 1);
    let ports = [(80, "TCP")];
    env.apply(&(service("one", "10.96.0.10", &ports, "") + &slice("one", "one-1", &ports, &[env.backend_ip(0)])));
    let range = 21000..21300u16;
    for p in range.clone() {
        let mut s = tcp_connect_from(env.client(0), p, sa(VIP, 80), T).unwrap_or_else(|e| panic!("via the Service: {e:#}"));
        assert_eq!(tcp_exchange(&mut s).unwrap(), "b0");
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut failed = Vec::new();
    for p in range {
        let r = tcp_connect_from(env.client(0), p, sa(env.backend_ip(0), BACKEND_PORT), T).and_then(|mut s| {
            let peer = s.peer_addr()?;
            Ok((tcp_exchange(&mut s)?, peer))
        });
        match r {
            Ok((who, peer)) if who == "b0" && peer == SocketAddr::from(sa(env.backend_ip(0), BACKEND_PORT)) => {}
            other => failed.push((p, format!("{other:?}"))),
        }
    }
    assert!(failed.is_empty(), "{} of 300 direct connections failed, e.g. {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(stat(&env, Stat::StaleReplyEvicted) >= 300, "the stale entries were evicted");
}

#[test]
fn an_idle_tcp_flow_survives_udp_churn_on_a_small_conntrack() {
    let mut env = Env::build("rh", 1, 3, EnvOpts { max_conntrack: 4096, max_conntrack_other: 4096, ..EnvOpts::default() });
    env.apply(&web(&[env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)]));
    let mut conn = tcp_connect(env.client(0), sa(VIP, 80), T).unwrap();
    let first = tcp_exchange(&mut conn).unwrap();
    // 20,000 UDP flows from distinct source ports through the same Service.
    let sent = env.client(0).run(|| {
        let mut ports = BTreeSet::new();
        for _ in 0..20_000 {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            ports.insert(s.local_addr().unwrap().port());
            let _ = s.send_to(b"x", sa(VIP, 53));
        }
        ports.len()
    });
    assert!(sent > 15_000, "{sent} distinct source ports");
    std::thread::sleep(Duration::from_millis(200));
    let again = tcp_exchange(&mut conn).expect("the idle TCP flow still works");
    assert_eq!(again, first, "on the same backend");
    let ct = proxy_agent::datapath::conntrack_entries(&env.pin_dir()).unwrap();
    let tcp = ct.iter().filter(|(k, _)| k.proto == proxy_common::IPPROTO_TCP).count();
    assert_eq!(tcp, 2, "its forward and reply entries are still there");
}

#[test]
fn affinity_ends_when_the_backend_leaves_the_service_even_if_another_keeps_it() {
    let mut env = Env::new("ri", 1, 2);
    let ports = [(80, "TCP")];
    let sticky = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n";
    let mk = |a: &[Ipv4Addr], b: &[Ipv4Addr]| {
        service("a", "10.96.0.31", &ports, sticky) + &slice("a", "a-1", &ports, a) + &service("b", "10.96.0.32", &ports, "") + &slice("b", "b-1", &ports, b)
    };
    let both = [env.backend_ip(0), env.backend_ip(1)];
    env.apply(&mk(&both, &both));
    let a = sa(Ipv4Addr::new(10, 96, 0, 31), 80);
    let affine = tcp_request(env.client(0), a, T).unwrap().0;
    for _ in 0..10 {
        assert_eq!(tcp_request(env.client(0), a, T).unwrap().0, affine, "affinity holds");
    }
    let (gone, stays) = if affine == "b0" { (0, 1) } else { (1, 0) };
    env.apply(&mk(&[env.backend_ip(stays)], &both));
    for _ in 0..30 {
        let who = tcp_request(env.client(0), a, T).unwrap().0;
        assert_eq!(who, format!("b{stays}"), "A no longer sends its client to b{gone}");
    }
    // Service B still has the backend and reaches it.
    let seen: BTreeSet<String> = (0..40).map(|_| tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 32), 80), T).unwrap().0).collect();
    assert!(seen.contains(&format!("b{gone}")), "B still uses b{gone}: {seen:?}");
}

#[test]
fn a_udp_flow_moves_when_its_backend_leaves_one_service_but_not_the_other() {
    let mut env = Env::new("rj", 1, 2);
    let ports = [(53, "UDP")];
    let mk = |a: &[Ipv4Addr], b: &[Ipv4Addr]| {
        service("a", "10.96.0.61", &ports, "") + &slice("a", "a-1", &ports, a) + &service("b", "10.96.0.62", &ports, "") + &slice("b", "b-1", &ports, b)
    };
    let both = [env.backend_ip(0), env.backend_ip(1)];
    env.apply(&mk(&both, &both));
    let connected = |vip: Ipv4Addr| {
        let s = env.client(0).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.connect(sa(vip, 53)).unwrap();
        s
    };
    let ask = proxy_testkit::udp_ask;
    let sa_ = connected(Ipv4Addr::new(10, 96, 0, 61));
    let on = ask(&sa_);
    // A flow of B on the same backend.
    let sb = (0..64)
        .map(|_| connected(Ipv4Addr::new(10, 96, 0, 62)))
        .find(|s| ask(s) == on)
        .expect("some flow of B lands on the same backend");
    let other = if on == "b0" { env.backend_ip(1) } else { env.backend_ip(0) };
    env.apply(&mk(&[other], &both));
    assert_ne!(ask(&sa_), on, "A's flow moved off the backend A dropped, at once");
    assert_eq!(ask(&sb), on, "B's flow keeps the backend B still has");
}

#[test]
fn icmp_fragmentation_needed_reaches_the_client_translated() {
    let mut env = Env::new("rk", 1, 1);
    let ports = [(53, "UDP")];
    env.apply(&(service("dns", "10.96.0.10", &ports, "") + &slice("dns", "dns-1", &ports, &[env.backend_ip(0)])));
    // The path to the backend has a smaller MTU than the client's link.
    env.topo.node.ip(&["link", "set", &env.topo.backends[0].node_if, "mtu", "1000"]).unwrap();
    let sock = env.client(0).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.connect(sa(VIP, 53)).unwrap();
    let fd = sock.as_raw_fd();
    let pmtu_do: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt/getsockopt on our own socket with int-sized values.
    unsafe { libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, (&raw const pmtu_do).cast(), 4) };
    let mtu = || {
        let mut v: libc::c_int = 0;
        let mut len: libc::socklen_t = 4;
        unsafe { libc::getsockopt(fd, libc::IPPROTO_IP, libc::IP_MTU, (&raw mut v).cast(), &raw mut len) };
        v
    };
    assert_eq!(mtu(), 1500);
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let big = vec![b'x'; 1200];
    let mut learned = false;
    for _ in 0..10 {
        let _ = sock.send(&big);
        let mut buf = [0u8; 64];
        let _ = sock.recv(&mut buf); // EMSGSIZE once the error arrived
        if mtu() == 1000 {
            learned = true;
            break;
        }
    }
    assert!(learned, "the client learned the path MTU through the Service (IP_MTU {})", mtu());
    assert!(stat(&env, Stat::IcmpErrorNat) >= 1, "the ICMP error was translated");
}

#[test]
fn fragmented_udp_through_a_service_works() {
    let mut env = Env::new("rl", 1, 2);
    let ports = [(53, "UDP")];
    env.apply(&(service("big", "10.96.0.10", &ports, "") + &slice("big", "big-1", &ports, &[env.backend_ip(0), env.backend_ip(1)])));
    let sock = env.client(0).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut answers = BTreeSet::new();
    for _ in 0..5 {
        // 4000 bytes over a 1500-byte link: three fragments.
        sock.send_to(&vec![b'y'; 4000], sa(VIP, 53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("an answer to a fragmented datagram");
        assert_eq!(from, SocketAddr::from(sa(VIP, 53)));
        answers.insert(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
    }
    assert_eq!(answers.len(), 1, "one flow, one backend: {answers:?}");
    assert!(stat(&env, Stat::FragmentNat) >= 10, "later fragments were translated");
    assert_eq!(stat(&env, Stat::DropFragment), 0);
}

#[test]
fn an_external_ip_that_is_a_node_address_answers_like_a_node_port() {
    let mut env = env_with("rm", TopoOptions { rp_filter: true, ..TopoOptions::default() });
    ct_invalid_drop(&env);
    let ports = [(8443, "TCP")];
    let svc = service("ext", "10.96.0.80", &ports, &format!("  externalIPs: [\"{NODE_IP}\"]\n"));
    env.apply(&(svc + &slice("ext", "ext-1", &ports, &[env.backend_ip(0)])));
    let (answer, peer) = tcp_request(env.client(0), sa(NODE_IP, 8443), T).expect("externalIP on the node's address");
    assert_eq!((answer.as_str(), peer), ("b0", SocketAddr::from(sa(NODE_IP, 8443))));
}
