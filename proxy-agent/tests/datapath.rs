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
