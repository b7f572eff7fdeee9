//! End-to-end datapath tests in network namespaces: a client pod reaches
//! Services through the TC program in the node namespace.
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::{Env, sa, service, slice, slice_with};
use proxy_testkit::{tcp_connect, tcp_exchange, tcp_request, udp_request};

const T: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn three_backend_env(tag: &str) -> (Env, String) {
    let mut env = Env::new(tag, 1, 3);
    let ports = [(80, "TCP"), (53, "UDP")];
    let yaml = service("web", "10.96.0.10", &ports, "")
        + &slice("web", "web-1", &ports, &[env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)]);
    env.apply(&yaml);
    (env, yaml)
}

#[test]
fn tcp_and_udp_reach_a_backend_and_replies_come_from_the_vip() {
    let (env, _) = three_backend_env("a");
    let (answer, peer) = tcp_request(env.client(0), sa(VIP, 80), T).expect("TCP through the VIP");
    assert!(["b0", "b1", "b2"].contains(&answer.as_str()), "answer {answer:?}");
    assert_eq!(peer, SocketAddr::from(sa(VIP, 80)));

    let (answer, from) = udp_request(env.client(0), sa(VIP, 53), T).expect("UDP through the VIP");
    assert!(["b0", "b1", "b2"].contains(&answer.as_str()), "answer {answer:?}");
    assert_eq!(from, SocketAddr::from(sa(VIP, 53)), "UDP reply must come from VIP:port");

    // Same UDP flow (same source port) keeps its backend.
    let sock = env.client(0).run(|| std::net::UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut first = None;
    for _ in 0..20 {
        sock.send_to(b"x", sa(VIP, 53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(from, SocketAddr::from(sa(VIP, 53)));
        let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        assert_eq!(first.get_or_insert(name.clone()), &name, "a UDP flow must stay on one backend");
    }
}

#[test]
fn new_connections_spread_over_backends() {
    let (env, _) = three_backend_env("b");
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..300 {
        let (answer, _) = tcp_request(env.client(0), sa(VIP, 80), T).expect("request");
        *counts.entry(answer).or_default() += 1;
    }
    // Binomial(300, 1/3): mean 100, sd ~8.2; [60, 140] is ~5 sd.
    assert_eq!(counts.len(), 3, "every backend answers: {counts:?}");
    for (b, n) in &counts {
        assert!((60..=140).contains(n), "backend {b} got {n} of 300: {counts:?}");
    }
}

#[test]
fn removed_backend_keeps_established_flows_and_gets_no_new_ones() {
    let (mut env, _) = three_backend_env("c");
    let ports = [(80, "TCP"), (53, "UDP")];
    // Open enough connections that every backend holds some.
    let mut conns = Vec::new();
    for _ in 0..30 {
        let mut s = tcp_connect(env.client(0), sa(VIP, 80), T).unwrap();
        let who = tcp_exchange(&mut s).unwrap();
        conns.push((s, who));
    }
    assert!(conns.iter().any(|(_, w)| w == "b0"), "some connection reached b0");

    // Remove b0.
    let yaml = service("web", "10.96.0.10", &ports, "") + &slice("web", "web-1", &ports, &[env.backend_ip(1), env.backend_ip(2)]);
    env.apply(&yaml);
    for (s, who) in &mut conns {
        let again = tcp_exchange(s).expect("established connection survives the backend removal");
        assert_eq!(&again, who, "an established flow keeps its backend");
    }
    for _ in 0..100 {
        let (answer, _) = tcp_request(env.client(0), sa(VIP, 80), T).unwrap();
        assert_ne!(answer, "b0", "a removed backend receives no new connection");
    }

    // Add b0 back under a new slice: it receives new flows again.
    let yaml = service("web", "10.96.0.10", &ports, "")
        + &slice("web", "web-1", &ports, &[env.backend_ip(1), env.backend_ip(2)])
        + &slice("web", "web-2", &ports, &[env.backend_ip(0)]);
    env.apply(&yaml);
    let mut saw_b0 = 0;
    for _ in 0..100 {
        let (answer, _) = tcp_request(env.client(0), sa(VIP, 80), T).unwrap();
        saw_b0 += u32::from(answer == "b0");
    }
    assert!(saw_b0 >= 10, "an added backend receives new flows (got {saw_b0} of 100)");
}

#[test]
fn service_without_ready_endpoints_rejects_at_once() {
    let mut env = Env::new("d", 1, 1);
    let ports = [(80, "TCP"), (53, "UDP")];
    // Only a not-ready, not-serving endpoint: no usable backend.
    let yaml = service("empty", "10.96.0.20", &ports, "")
        + &slice_with("empty", "empty-1", &ports, &[(env.backend_ip(0), "ready: false, serving: false")]);
    env.apply(&yaml);

    let start = Instant::now();
    let err = tcp_connect(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 20), 80), Duration::from_secs(5))
        .expect_err("connecting to a Service without endpoints must fail");
    let elapsed = start.elapsed();
    let io = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
    assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "expected ECONNREFUSED, got {err:#}");
    assert!(elapsed < Duration::from_secs(1), "rejected at once, not after a timeout ({elapsed:?})");

    // UDP: a connected socket sees the ICMP error as ECONNREFUSED.
    let sock = env.client(0).run(|| std::net::UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.connect(sa(Ipv4Addr::new(10, 96, 0, 20), 53)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send(b"x").unwrap();
    let mut buf = [0u8; 16];
    let e = sock.recv(&mut buf).expect_err("no answer from an empty Service");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "UDP gets port unreachable: {e}");
}

#[test]
fn traffic_to_other_addresses_passes_untouched() {
    let (env, _) = three_backend_env("e");
    // Straight to a pod IP: not a Service, must pass as is.
    let (answer, peer) = tcp_request(env.client(0), sa(env.backend_ip(1), 8080), T).unwrap();
    assert_eq!(answer, "b1");
    assert_eq!(peer, SocketAddr::from(sa(env.backend_ip(1), 8080)));
    // A VIP port that is not part of the Service is not translated; the
    // node has no route for the VIP range, so it fails rather than leaks.
    assert!(tcp_connect(env.client(0), sa(VIP, 81), Duration::from_millis(500)).is_err());
    let stats = proxy_agent::datapath::read_stats(&env.pin_dir()).unwrap();
    let passed = stats.iter().find(|(s, _)| *s == proxy_common::Stat::PassNoService).unwrap().1;
    assert!(passed > 0, "pass counter moved");
}

#[test]
fn thousand_services_programmed_at_once_all_answer() {
    let mut env = Env::new("f", 1, 3);
    let ports = [(80, "TCP")];
    let mut yaml = String::new();
    for i in 0..1000u32 {
        let vip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8);
        let name = format!("svc{i}");
        let b = env.backend_ip((i % 3) as usize);
        yaml += &service(&name, &vip.to_string(), &ports, "");
        yaml += &slice(&name, &format!("{name}-1"), &ports, &[b]);
    }
    let r = env.apply(&yaml);
    assert_eq!(r.frontends, 1000);
    for i in 0..1000u32 {
        let vip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8);
        let (answer, peer) = tcp_request(env.client(0), sa(vip, 80), T).unwrap_or_else(|e| panic!("service {i} ({vip}): {e:#}"));
        assert_eq!(answer, format!("b{}", i % 3), "service {i} reaches its own backend");
        assert_eq!(peer, SocketAddr::from(sa(vip, 80)));
    }
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let mut env = Env::new("g", 1, 3);
    let ports = [(80, "TCP")];
    let yaml = service("sticky", "10.96.0.30", &ports, "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n")
        + &slice("sticky", "sticky-1", &ports, &[env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)]);
    env.apply(&yaml);
    let answers: Vec<String> =
        (0..30).map(|_| tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 30), 80), T).unwrap().0).collect();
    assert!(answers.iter().all(|a| a == &answers[0]), "every new connection goes to the affine backend: {answers:?}");
}

#[test]
fn nodeport_on_the_node_address() {
    let node_ip = Ipv4Addr::new(10, 200, 0, 1); // the node's address facing the client
    let mut env = Env::with_node_ips("h", 1, 2, vec![node_ip.into()]);
    let ports = [(80, "TCP")];
    let svc = service("np", "10.96.0.40", &ports, "")
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: 8080\n", "targetPort: 8080\n    nodePort: 30080\n");
    env.apply(&(svc + &slice("np", "np-1", &ports, &[env.backend_ip(0), env.backend_ip(1)])));
    let (answer, peer) = tcp_request(env.client(0), sa(node_ip, 30080), T).expect("NodePort through the node address");
    assert!(answer == "b0" || answer == "b1", "{answer}");
    assert_eq!(peer, SocketAddr::from(sa(node_ip, 30080)));
    // The ClusterIP of the same Service works too.
    assert!(tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 40), 80), T).is_ok());
}

#[test]
fn rolling_endpoint_replacement_fails_no_request() {
    let mut env = Env::new("i", 1, 3);
    let ports = [(80, "TCP")];
    let b = |env: &Env, idx: &[usize]| -> String {
        let ips: Vec<Ipv4Addr> = idx.iter().map(|i| env.backend_ip(*i)).collect();
        service("roll", "10.96.0.50", &ports, "") + &slice("roll", "roll-1", &ports, &ips)
    };
    env.apply(&b(&env, &[0]));
    let stream = proxy_testkit::RequestStream::start(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 50), 80), 50_000).unwrap();
    // A rolling update: one endpoint in, one out, repeatedly.
    for step in [&[0, 1][..], &[1], &[1, 2], &[2], &[2, 0], &[0], &[0, 1, 2], &[2]] {
        std::thread::sleep(Duration::from_millis(150));
        env.apply(&b(&env, step));
    }
    std::thread::sleep(Duration::from_millis(150));
    let r = stream.finish();
    let (ok, failed) = (r.ok, r.failed);
    assert!(ok > 100, "progress: {ok}");
    assert_eq!(failed, 0, "no failed request during the rolling replacement ({ok} ok)");
    assert_eq!(r.seen.len(), 3, "every backend served at some point: {:?}", r.seen);
}

#[test]
fn removing_a_udp_backend_flushes_its_flows() {
    let mut env = Env::new("j", 1, 2);
    let ports = [(53, "UDP")];
    let mk = |env: &Env, idx: &[usize]| -> String {
        let ips: Vec<Ipv4Addr> = idx.iter().map(|i| env.backend_ip(*i)).collect();
        service("dns", "10.96.0.60", &ports, "") + &slice("dns", "dns-1", &ports, &ips)
    };
    env.apply(&mk(&env, &[0, 1]));
    // One long-lived UDP flow (fixed source port).
    let sock = env.client(0).run(|| std::net::UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.connect(sa(Ipv4Addr::new(10, 96, 0, 60), 53)).unwrap();
    let ask = || proxy_testkit::udp_ask(&sock);
    let first = ask();
    assert_eq!(ask(), first, "the flow is sticky");
    let keep = if first == "b0" { 1 } else { 0 };
    env.apply(&mk(&env, &[keep]));
    assert_eq!(ask(), format!("b{keep}"), "after its backend is removed the flow moves to a live one");
}

#[test]
fn backend_in_the_host_network_namespace() {
    // Like the `kubernetes` Service, whose endpoint is the API server on the
    // node itself: its replies leave through the node's stack, not a pod veth.
    let mut env = Env::new("k", 1, 1);
    let node_server = proxy_testkit::EchoServer::start(&env.topo.node, "node", 9090).unwrap();
    let node_ip = Ipv4Addr::new(10, 200, 100, 1);
    let ports = [(443, "TCP")];
    let yaml = (service("kubernetes", "10.96.0.1", &ports, "") + &slice("kubernetes", "kubernetes", &ports, &[node_ip]))
        .replace("8080", "9090");
    env.apply(&yaml);
    let (answer, peer) = tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 1), 443), T).expect("host-network backend");
    assert_eq!(answer, "node");
    assert_eq!(peer, SocketAddr::from(sa(Ipv4Addr::new(10, 96, 0, 1), 443)));
    drop(node_server);
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    // Kubernetes e2e: "should allow pods to hairpin back to themselves
    // through services". The client pod is the Service's only backend.
    let mut env = Env::new("l", 1, 0);
    let me = env.topo.clients[0].ip;
    let server = proxy_testkit::EchoServer::start(env.client(0), "self", 8080).unwrap();
    let ports = [(80, "TCP"), (53, "UDP")];
    env.apply(&(service("hairpin", "10.96.0.70", &ports, "") + &slice("hairpin", "hairpin-1", &ports, &[me])));
    for _ in 0..5 {
        let r = tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 70), 80), T);
        if r.is_err() {
            eprintln!("stats: {:?}", proxy_agent::datapath::read_stats(&env.pin_dir()).unwrap().iter().filter(|x| x.1 > 0).map(|(s, n)| (s.name(), *n)).collect::<Vec<_>>());
            eprintln!("ct: {:?}", proxy_agent::datapath::conntrack_entries(&env.pin_dir()).unwrap());
        }
        let (answer, peer) = r.expect("hairpin TCP");
        assert_eq!(answer, "self");
        assert_eq!(peer, SocketAddr::from(sa(Ipv4Addr::new(10, 96, 0, 70), 80)));
    }
    let (answer, from) = udp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 70), 53), T).expect("hairpin UDP");
    assert_eq!(answer, "self");
    assert_eq!(from, SocketAddr::from(sa(Ipv4Addr::new(10, 96, 0, 70), 53)));
    drop(server);
}

#[test]
fn client_ip_affinity_is_shared_by_a_service_ports_frontends() {
    // kube-proxy keeps affinity per Service port: the ClusterIP and the
    // NodePort of one port send a client to the same backend.
    let node_ip = Ipv4Addr::new(10, 200, 0, 1);
    let mut env = Env::with_node_ips("m", 1, 3, vec![node_ip.into()]);
    let ports = [(80, "TCP")];
    let svc = service("sticky", "10.96.0.33", &ports, "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n")
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: 8080\n", "targetPort: 8080\n    nodePort: 30033\n");
    env.apply(&(svc + &slice("sticky", "sticky-1", &ports, &[env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)])));
    let first = tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 33), 80), T).unwrap().0;
    for _ in 0..10 {
        assert_eq!(tcp_request(env.client(0), sa(node_ip, 30033), T).unwrap().0, first, "the NodePort shares the affinity");
        assert_eq!(tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 33), 80), T).unwrap().0, first);
    }
}

#[test]
fn a_pod_reaches_every_endpoint_of_a_local_policy_nodeport_from_a_node_without_local_ones() {
    // externalTrafficPolicy: Local narrows what clients outside the cluster
    // reach; a pod (an in-cluster client, on a pod interface) gets every
    // endpoint, as with kube-proxy. The external side is in two_node.rs.
    let node_ip = Ipv4Addr::new(10, 200, 0, 1);
    let mut env = Env::with_node_ips("n", 1, 1, vec![node_ip.into()]);
    let ports = [(80, "TCP")];
    let svc = service("local", "10.96.0.34", &ports, "  externalTrafficPolicy: Local\n")
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: 8080\n", "targetPort: 8080\n    nodePort: 30034\n");
    // The only endpoint runs on another node.
    let eps = slice("local", "local-1", &ports, &[env.backend_ip(0)]).replace("nodeName: node-a", "nodeName: node-b");
    env.apply(&(svc + &eps));
    assert_eq!(tcp_request(env.client(0), sa(node_ip, 30034), T).unwrap().0, "b0", "the internal scope serves pods");
    let drops = proxy_agent::datapath::read_stats(&env.pin_dir()).unwrap().iter().find(|(s, _)| *s == proxy_common::Stat::DropNoLocal).unwrap().1;
    assert_eq!(drops, 0, "nothing dropped for an in-cluster client");
    assert_eq!(tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 34), 80), T).unwrap().0, "b0");
}

#[test]
fn a_full_resync_repairs_a_frontend_deleted_behind_the_agents_back() {
    use proxy_agent::sync::MapOps as _;
    let (mut env, yaml) = three_backend_env("o");
    assert!(tcp_request(env.client(0), sa(VIP, 80), T).is_ok());
    let mut maps = proxy_agent::datapath::PinnedMaps::open(&env.pin_dir()).unwrap();
    let key = proxy_common::ServiceKey {
        addr: proxy_common::v4_mapped(VIP.octets()),
        port: 80,
        proto: proxy_common::IPPROTO_TCP,
        scope: 0,
        slot: 0,
        _pad: 0,
    };
    maps.del_service(key).unwrap();
    let err = tcp_connect(env.client(0), sa(VIP, 80), Duration::from_millis(500)).expect_err("the frontend is gone");
    assert_eq!(err.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused));
    env.agent().request_resync();
    env.apply(&yaml);
    let (answer, _) = tcp_request(env.client(0), sa(VIP, 80), T).expect("repaired by the full resync");
    assert!(["b0", "b1", "b2"].contains(&answer.as_str()));
}

/// A Service that does not fit the services map fails, keeps failing on
/// every full apply of the same objects (the apply that finds nothing
/// changed still retries what failed), and is programmed once another
/// Service's removal frees the space: traffic then reaches it.
#[test]
fn a_service_that_did_not_fit_is_retried_and_programmed_once_space_is_freed() {
    // web (1 frontend + 3 slots) fits; big (1 + 3) does not: 6 entries.
    let mut env = Env::build("fit", 1, 3, common::EnvOpts { max_services: 6, ..common::EnvOpts::default() });
    let ports = [(80, "TCP")];
    let all = [env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)];
    let web = service("web", "10.96.0.10", &ports, "") + &slice("web", "web-1", &ports, &all);
    // (Service ports are programmed in name order: web first.)
    let big = service("zbig", "10.96.0.20", &ports, "") + &slice("zbig", "zbig-1", &ports, &all);
    let both = proxy_agent::manifests::parse_str(&(web + &big), "test").unwrap();
    let apply = |env: &mut Env, objs: &proxy_agent::manifests::Objects| {
        env.agent().apply(&objs.services, &objs.slices, &objs.nodes, Instant::now())
    };
    let r = apply(&mut env, &both);
    assert_eq!(r.failed.len(), 1, "one Service fails: {r:?}");
    assert!(r.failed[0].1.contains("full"), "{r:?}");
    assert!(tcp_request(env.client(0), sa(VIP, 80), T).is_ok(), "the Service that fit works");
    for _ in 0..2 {
        let again = apply(&mut env, &both);
        assert_eq!(again.failed.len(), 1, "retried, not skipped: {again:?}");
    }
    // web goes: big fits now.
    let only_big = proxy_agent::manifests::parse_str(&big, "test").unwrap();
    let r = apply(&mut env, &only_big);
    assert!(r.failed.is_empty(), "{r:?}");
    let (answer, _) = tcp_request(env.client(0), sa(Ipv4Addr::new(10, 96, 0, 20), 80), T).expect("big is programmed");
    assert!(["b0", "b1", "b2"].contains(&answer.as_str()));
}
