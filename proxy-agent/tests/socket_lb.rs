//! Socket-level load balancing: Services translated at connect() for host
//! processes and pods. The socket programs attach to a child cgroup that
//! holds only this test process (never the machine's root cgroup), and the
//! tests run one at a time, since every socket of the process is in it.
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{Env, EnvOpts, sa, service, slice, slice_with};
use proxy_agent::datapath::SocketLb;
use proxy_common::Stat;
use proxy_testkit::{ChildCgroup, Netns, RequestStream, tcp_connect, tcp_exchange, tcp_request, udp_request, wait_until};

const T: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 1);

/// One socket test at a time: the cgroup holds the whole process.
static SERIAL: Mutex<()> = Mutex::new(());

struct SockEnv {
    env: Env,
    // Dropped after the agent (declaration order): links detach first.
    _cgroup: ChildCgroup,
}

fn sock_env(tag: &str, mode: SocketLb, backends: usize) -> SockEnv {
    let cgroup = ChildCgroup::enter(&format!("kproxy-test-{tag}-{}", std::process::id())).expect("child cgroup");
    let env = Env::build(
        tag,
        1,
        backends,
        EnvOpts {
            node_ips: vec![NODE_IP.into()],
            socket_lb: mode,
            cgroup_root: Some(cgroup.path.clone()),
            ..EnvOpts::default()
        },
    );
    SockEnv { env, _cgroup: cgroup }
}

fn stat(env: &Env, which: Stat) -> u64 {
    proxy_agent::datapath::read_stats(&env.pin_dir()).unwrap().iter().find(|(s, _)| *s == which).unwrap().1
}

fn web(env: &Env, backends: &[usize]) -> String {
    let ports = [(80, "TCP"), (53, "UDP")];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|i| env.backend_ip(*i)).collect();
    service("web", "10.96.0.10", &ports, &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n"))
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: 8080\n", "targetPort: 8080\n    nodePort: 30080\n")
        + &slice("web", "web-1", &ports, &ips)
}

fn node(env: &Env) -> &Netns {
    &env.topo.node
}

#[test]
fn host_processes_reach_cluster_ip_node_port_and_external_ip() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut s = sock_env("sa", SocketLb::All, 2);
    let yaml = web(&s.env, &[0, 1]);
    s.env.apply(&yaml);
    let env = &s.env;
    // A process in the node's own network namespace: its packets never
    // cross a TC ingress hook; the node has no route to the Service range.
    for (addr, port) in [(VIP, 80), (NODE_IP, 30080), (EXTERNAL_IP, 80)] {
        let (answer, peer) = tcp_request(node(env), sa(addr, port), T).unwrap_or_else(|e| panic!("{addr}:{port}: {e:#}"));
        assert!(answer == "b0" || answer == "b1", "{addr}:{port} answered {answer:?}");
        assert_eq!(peer, SocketAddr::from(sa(addr, port)), "getpeername() reports the Service address");
    }
    // Unconnected UDP: sendto/recvfrom, replies from the Service address.
    let (answer, from) = udp_request(node(env), sa(VIP, 53), T).expect("unconnected UDP from the host");
    assert!(answer == "b0" || answer == "b1");
    assert_eq!(from, SocketAddr::from(sa(VIP, 53)), "recvfrom() reports the Service address");
    assert!(stat(env, Stat::SockConnect) >= 3 && stat(env, Stat::SockSendmsg) >= 1 && stat(env, Stat::SockRevNat) >= 4);
    // Addresses that are no Service are never touched.
    let direct = tcp_request(node(env), sa(env.backend_ip(0), common::BACKEND_PORT), T).unwrap();
    assert_eq!(direct.1, SocketAddr::from(sa(env.backend_ip(0), common::BACKEND_PORT)));
}

#[test]
fn pod_clients_get_the_tc_semantics_at_the_socket() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut s = sock_env("sb", SocketLb::All, 3);
    let yaml = web(&s.env, &[0, 1, 2]);
    s.env.apply(&yaml);
    // Spread over backends, one translation per flow (TC sees backends only).
    let tc_before = stat(&s.env, Stat::NewFlow);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..300 {
        let (answer, peer) = tcp_request(s.env.client(0), sa(VIP, 80), T).unwrap();
        assert_eq!(peer, SocketAddr::from(sa(VIP, 80)));
        *counts.entry(answer).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        assert!((60..=140).contains(n), "backend {b} got {n} of 300: {counts:?}");
    }
    assert_eq!(stat(&s.env, Stat::NewFlow), tc_before, "translated at connect(), never again by TC");
    assert!(stat(&s.env, Stat::SockConnect) >= 300);

    // A removed backend gets no new connection; established ones keep working.
    let mut conns: Vec<(std::net::TcpStream, String)> = (0..30)
        .map(|_| {
            let mut c = tcp_connect(s.env.client(0), sa(VIP, 80), T).unwrap();
            let who = tcp_exchange(&mut c).unwrap();
            (c, who)
        })
        .collect();
    assert!(conns.iter().any(|(_, w)| w == "b0"));
    let yaml = web(&s.env, &[1, 2]);
    s.env.apply(&yaml);
    for (c, who) in &mut conns {
        assert_eq!(&tcp_exchange(c).expect("established connection survives"), who);
    }
    for _ in 0..100 {
        assert_ne!(tcp_request(s.env.client(0), sa(VIP, 80), T).unwrap().0, "b0", "a removed backend gets no new connection");
    }

    // A connected UDP client switches at once when its backend is removed.
    let sock = s.env.client(0).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.connect(sa(VIP, 53)).unwrap();
    let ask = || proxy_testkit::udp_ask(&sock);
    let first = ask();
    assert_eq!(ask(), first);
    let keep: Vec<usize> = [1, 2].into_iter().filter(|i| format!("b{i}") != first).collect();
    let yaml = web(&s.env, &keep);
    s.env.apply(&yaml);
    assert_ne!(ask(), first, "the UDP client moved off the removed backend at once");
    // An unconnected UDP client too.
    let (answer, from) = udp_request(s.env.client(0), sa(VIP, 53), T).unwrap();
    assert_eq!(from, SocketAddr::from(sa(VIP, 53)));
    assert!(keep.iter().any(|i| answer == format!("b{i}")), "{answer} is a current backend");
}

#[test]
fn affinity_and_refusal_at_the_socket() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut s = sock_env("sc", SocketLb::All, 3);
    let ports = [(80, "TCP"), (53, "UDP")];
    let ips = [s.env.backend_ip(0), s.env.backend_ip(1), s.env.backend_ip(2)];
    let yaml = service("sticky", "10.96.0.30", &ports, "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n")
        + &slice("sticky", "sticky-1", &ports, &ips)
        + &service("empty", "10.96.0.20", &ports, "")
        + &slice_with("empty", "empty-1", &ports, &[(ips[0], "ready: false, serving: false")]);
    s.env.apply(&yaml);
    let answers: Vec<String> = (0..30).map(|_| tcp_request(s.env.client(0), sa(Ipv4Addr::new(10, 96, 0, 30), 80), T).unwrap().0).collect();
    assert!(answers.iter().all(|a| a == &answers[0]), "ClientIP affinity: {answers:?}");

    for netns in [s.env.client(0), node(&s.env)] {
        let start = Instant::now();
        let err = tcp_connect(netns, sa(Ipv4Addr::new(10, 96, 0, 20), 80), Duration::from_secs(5)).expect_err("no endpoints");
        let took = start.elapsed();
        let kind = err.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
        assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
        assert!(took < Duration::from_millis(100), "refused at once ({took:?})");
        // A ClusterIP port no Service serves is refused too.
        let err = tcp_connect(netns, sa(Ipv4Addr::new(10, 96, 0, 30), 81), Duration::from_secs(5)).expect_err("unknown port");
        assert_eq!(err.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused));
    }
    assert!(stat(&s.env, Stat::SockRefused) >= 4);
}

#[test]
fn host_only_leaves_pods_to_tc() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut s = sock_env("sd", SocketLb::HostOnly, 2);
    let yaml = web(&s.env, &[0, 1]);
    s.env.apply(&yaml);
    let (tc0, sock0) = (stat(&s.env, Stat::NewFlow), stat(&s.env, Stat::SockConnect));
    let (_, peer) = tcp_request(s.env.client(0), sa(VIP, 80), T).expect("pod through TC");
    assert_eq!(peer, SocketAddr::from(sa(VIP, 80)));
    assert_eq!((stat(&s.env, Stat::NewFlow), stat(&s.env, Stat::SockConnect)), (tc0 + 1, sock0), "the pod's flow went by TC");
    let (_, peer) = tcp_request(node(&s.env), sa(VIP, 80), T).expect("host through the socket");
    assert_eq!(peer, SocketAddr::from(sa(VIP, 80)));
    assert_eq!((stat(&s.env, Stat::NewFlow), stat(&s.env, Stat::SockConnect)), (tc0 + 1, sock0 + 1), "the host's at the socket");
    assert!(stat(&s.env, Stat::SockSkipNetns) >= 1);
}

#[test]
fn kill_and_restart_with_socket_lb_fails_no_request() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let s = sock_env("se", SocketLb::All, 2);
    // The in-process agent is replaced by the real binary on the same pins.
    let SockEnv { mut env, _cgroup } = s;
    let pin_dir = env.cfg.datapath.pin_dir_name.clone();
    env.agent = None;
    let manifests = std::env::temp_dir().join(format!("{pin_dir}-manifests"));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("web.yaml"), web(&env, &[0, 1])).unwrap();
    let cg = _cgroup.path.to_str().unwrap().to_owned();
    let extra = ["--poll-interval-ms", "100", "--socket-lb", "all", "--cgroup-root", cg.as_str(), "--node-ips", "10.200.0.1"];
    let mode = ["--manifests", manifests.to_str().unwrap()];
    let start = |env: &Env| {
        let child = common::spawn_agent(&env.topo.node, &pin_dir, &mode, &extra);
        assert!(
            wait_until(Duration::from_secs(15), || proxy_testkit::http_get(&env.topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")),
            "agent ready"
        );
        child
    };
    let mut child = start(&env);
    let before = stat(&env, Stat::SockConnect);
    let stream = RequestStream::start(env.client(0), sa(VIP, 80), 20_000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child (nsenter execs the agent).
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(500));
    let mut child = start(&env);
    std::thread::sleep(Duration::from_millis(300));
    let r = stream.finish();
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&manifests);
    assert!(r.ok > 50, "progress: {}", r.ok);
    assert_eq!(r.failed, 0, "no failed request across kill -9 and restart ({} ok)", r.ok);
    assert!(stat(&env, Stat::SockConnect) - before >= u64::from(r.ok), "every request was translated at the socket");
}
