//! North-south section: an outside client -> node A's NodePort -> the
//! backend on node B (so every flow is SNATed on node A), on the two-node
//! topology of `proxy_testkit::two_node`, fresh for every measurement.
//! Modes: `ebpf` (TC), `ebpf-xdp` (native XDP on node A's uplink) and
//! kube-proxy's nftables rules for a NodePort with masquerade. Measured:
//! TCP connection rate and UDP packets per second delivered to the backend
//! (one sender flooding the NodePort; the node's per-packet work dominates),
//! plus the XDP program's own cost per packet with BPF_PROG_TEST_RUN.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, Acceleration, Datapath, DatapathConfig},
    metrics::Metrics,
};
use proxy_testkit::{EchoServer, Netns, two_node::TwoNode, unique_prefix};

use crate::load;

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tc,
    Xdp,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Tc, Mode::Xdp, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Tc => "ebpf",
            Mode::Xdp => "ebpf-xdp",
            Mode::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub mode: &'static str,
    pub tcp_crr: load::Result,
    /// UDP datagrams per second received by the backend.
    pub udp_pps: f64,
    /// UDP datagrams per second the client sent.
    pub udp_sent_pps: f64,
    /// kp_xdp per packet (established SNAT flow, FIB lookup, XDP_TX), ns,
    /// less an empty run's cost.
    pub xdp_ns: f64,
    /// The same, as measured (one run per BPF_PROG_TEST_RUN call).
    pub xdp_run_ns: f64,
    /// kp_xdp on a packet to no Service, less an empty run's cost.
    pub xdp_miss_ns: f64,
}

/// The NodePort Service (TCP on 80, UDP sink on 9000) with its endpoint on node B.
fn objects(backend: Ipv4Addr) -> proxy_agent::manifests::Objects {
    let y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: ns, namespace: bench}}
spec:
  type: NodePort
  clusterIP: 10.96.200.1
  ports:
  - {{name: tcp, port: 80, protocol: TCP, targetPort: {BACKEND_PORT}, nodePort: {NODE_PORT}}}
  - {{name: udp, port: 90, protocol: UDP, targetPort: {SINK_PORT}, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ns-1, namespace: bench, labels: {{kubernetes.io/service-name: ns}}}}
addressType: IPv4
ports:
- {{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}
- {{name: udp, port: {SINK_PORT}, protocol: UDP}}
endpoints:
- {{addresses: [\"{backend}\"], nodeName: node-b, conditions: {{ready: true}}}}
"
    );
    proxy_agent::manifests::parse_str(&y, "north-south").expect("generated objects parse")
}

/// kube-proxy's nftables structure for this one NodePort (masquerade of
/// traffic to NodePorts, endpoint chains with DNAT), in its `kube-proxy` table.
fn nft_rules(backend: Ipv4Addr) -> String {
    format!(
        "table ip kube-proxy {{
  chain mark-for-masquerade {{
    meta mark set meta mark | 0x4000
  }}
  chain masquerading {{
    meta mark & 0x4000 == 0 return
    meta mark set meta mark ^ 0x4000
    masquerade fully-random
  }}
  chain ep-tcp {{
    ip saddr {backend} jump mark-for-masquerade
    meta l4proto tcp dnat to {backend}:{BACKEND_PORT}
  }}
  chain ep-udp {{
    ip saddr {backend} jump mark-for-masquerade
    meta l4proto udp dnat to {backend}:{SINK_PORT}
  }}
  chain svc-tcp {{
    numgen random mod 1 vmap {{ 0 : goto ep-tcp }}
  }}
  chain svc-udp {{
    numgen random mod 1 vmap {{ 0 : goto ep-udp }}
  }}
  chain external-tcp {{
    jump mark-for-masquerade
    goto svc-tcp
  }}
  chain external-udp {{
    jump mark-for-masquerade
    goto svc-udp
  }}
  map service-nodeports {{
    type inet_proto . inet_service : verdict
    elements = {{ tcp . {NODE_PORT} : goto external-tcp, udp . {NODE_PORT} : goto external-udp }}
  }}
  chain services {{
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state invalid drop
  }}
}}
"
    )
}

fn nft(ns: &Netns, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("nft (install nftables, or run `cargo xtask bench` which does)")?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft failed: {}", String::from_utf8_lossy(&out.stderr).lines().take(4).collect::<Vec<_>>().join(" | "));
    }
    Ok(())
}

/// A UDP sink in `ns` counting datagrams until stopped.
struct Sink {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(ns: &Netns) -> anyhow::Result<Self> {
        let sock = ns.run(|| UdpSocket::bind(("0.0.0.0", SINK_PORT)))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            proxy_testkit::pin_to_cpu(proxy_testkit::cpus().saturating_sub(1));
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self { count, stop, thread: Some(thread) })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Floods `to` with 64-byte datagrams from `ns` for `dur` (bounded);
/// returns the datagrams sent.
fn flood(ns: &Netns, to: SocketAddrV4, dur: Duration) -> anyhow::Result<u64> {
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name))?;
    let fd = file.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<u64> {
            // SAFETY: setns on this thread only.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                bail!("setns");
            }
            proxy_testkit::pin_to_cpu(0);
            let u = UdpSocket::bind("0.0.0.0:0")?;
            u.connect(to)?;
            let payload = [0x5au8; 64];
            let end = Instant::now() + dur;
            let mut sent = 0u64;
            while sent < 50_000_000 {
                for _ in 0..64 {
                    if u.send(&payload).is_ok() {
                        sent += 1;
                    }
                }
                if Instant::now() >= end {
                    break;
                }
            }
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
    })
}

/// One measurement of `mode` on a fresh two-node topology.
pub fn measure(mode: Mode, secs: f64) -> anyhow::Result<Sample> {
    let topo = TwoNode::build(&unique_prefix("bns"), 1, 1, false)?;
    let backend = &topo.nodes[1].pods[0];
    let _echo = EchoServer::start(&backend.ns, &backend.name, BACKEND_PORT)?;
    let sink = Sink::start(&backend.ns)?;
    let node_a = &topo.nodes[0];
    let client = &topo.clients[0];
    let mut s = Sample { mode: mode.name(), ..Sample::default() };
    let pin_dir = format!("{}-a", topo.prefix);
    let dcfg = DatapathConfig {
        pin_dir_name: pin_dir,
        external_interfaces: vec!["eth0".into()],
        acceleration: if mode == Mode::Xdp { Acceleration::Native } else { Acceleration::None },
        ..Default::default()
    };
    // A veth receiving XDP_TX frames needs an XDP program of its own.
    let _peer = if mode == Mode::Xdp { Some(xdp_pass_on(&topo.fabric, "up0")?) } else { None };
    let result = (|| -> anyhow::Result<()> {
        let agent = match mode {
            Mode::Nftables => {
                nft(&node_a.ns, &nft_rules(backend.ip))?;
                None
            }
            Mode::Tc | Mode::Xdp => {
                let cfg = AgentConfig {
                    datapath: dcfg.clone(),
                    interfaces: vec!["eth0".into(), "veth*".into()],
                    node_name: node_a.name.clone(),
                    node_ips: vec![node_a.ip.into()],
                    maglev: true,
                    nodeport_cidrs: vec![],
                };
                let objs = objects(backend.ip);
                let agent = node_a.ns.run(|| -> anyhow::Result<Agent> {
                    let mut a = Agent::start(cfg, Arc::new(Metrics::default()))?;
                    a.attach_interfaces()?;
                    let r = a.apply(&objs.services, &objs.slices, &objs.nodes, Instant::now());
                    if !r.failed.is_empty() {
                        bail!("programming failed: {:?}", r.failed);
                    }
                    Ok(a)
                })?;
                Some(agent)
            }
        };
        let d = Duration::from_secs_f64(secs);
        let to = SocketAddrV4::new(node_a.ip, NODE_PORT);
        s.tcp_crr = load::run(client, load::Kind::TcpCrr, &[to], 2, d)?;
        if s.tcp_crr.errors > 0 && agent.is_some() {
            let stats = datapath::read_stats(&dcfg.pin_dir())?;
            eprintln!(
                "    {} errors; datapath counters: {:?}",
                s.tcp_crr.errors,
                stats.iter().filter(|(_, n)| *n > 0).map(|(s, n)| (s.name(), *n)).collect::<Vec<_>>()
            );
        }
        let before = sink.count.load(Ordering::Relaxed);
        let t = Instant::now();
        let sent = flood(client, to, d)?;
        std::thread::sleep(Duration::from_millis(100));
        let got = sink.count.load(Ordering::Relaxed) - before;
        let el = t.elapsed().as_secs_f64();
        s.udp_pps = got as f64 / el;
        s.udp_sent_pps = sent as f64 / el;
        if got == 0 {
            bail!("no UDP datagram reached the backend ({sent} sent)");
        }
        if mode == Mode::Xdp {
            // The XDP program alone: a datagram of the flood's (established,
            // SNATed) flow is not one of the flood's: use a fresh client port,
            // run once to create the flow, then time the established path.
            let mut dp = node_a.ns.run(|| Datapath::load(&dcfg))?;
            let ifindex = node_a.ns.run(|| {
                let c = std::ffi::CString::new("eth0").unwrap();
                // SAFETY: if_nametoindex with a valid C string.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            });
            let frame = udp_frame(Ipv4Addr::new(192, 168, 50, 100), node_a.ip, 45_000, NODE_PORT);
            // One run per call: with `repeat` the kernel reuses the frame the
            // previous run rewrote, so later runs would time a non-Service packet.
            // The same for kp_xdp_pass gives what a run costs with no work:
            // the program's own cost is the difference.
            // And a packet to no Service (the cost every other packet pays).
            let other = udp_frame(Ipv4Addr::new(192, 168, 50, 100), Ipv4Addr::new(10, 245, 0, 2), 45_000, 53);
            let (mut times, mut empty, mut miss) = node_a.ns.run(|| -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
                let first = dp.test_run_xdp(&frame, ifindex, 1)?.0;
                let (mut times, mut empty, mut miss) =
                    (Vec::with_capacity(20_000), Vec::with_capacity(20_000), Vec::with_capacity(20_000));
                for _ in 0..20_000 {
                    miss.push(dp.test_run_xdp(&other, ifindex, 1)?.2.as_nanos() as f64);
                    let (act, _, d) = dp.test_run_xdp(&frame, ifindex, 1)?;
                    if act != 3 {
                        bail!("kp_xdp did not XDP_TX an established SNAT flow (first run {first}, then {act})");
                    }
                    times.push(d.as_nanos() as f64);
                    let (_, _, d) = dp.test_run_xdp_program(proxy_common::PROG_XDP_PASS, &frame, ifindex, 1)?;
                    empty.push(d.as_nanos() as f64);
                }
                Ok((times, empty, miss))
            })?;
            s.xdp_run_ns = crate::median(&mut times);
            let base = crate::median(&mut empty);
            s.xdp_ns = s.xdp_run_ns - base;
            s.xdp_miss_ns = crate::median(&mut miss) - base;
        }
        drop(agent);
        Ok(())
    })();
    let _ = datapath::cleanup(&dcfg.pin_dir());
    result.with_context(|| format!("north-south {}", mode.name()))?;
    eprintln!(
        "  {:<9} north-south  crr {:>8.0}/s (p50 {:.0} µs, p99 {:.0} µs, {} errors)  udp {:>9.0} pps delivered ({:.0} sent){}",
        s.mode,
        s.tcp_crr.rate,
        s.tcp_crr.p50_us,
        s.tcp_crr.p99_us,
        s.tcp_crr.errors,
        s.udp_pps,
        s.udp_sent_pps,
        if s.xdp_ns > 0.0 { format!("  kp_xdp {:.0} ns/packet ({:.0} per run; no-Service packet {:.0} ns)", s.xdp_ns, s.xdp_run_ns, s.xdp_miss_ns) } else { String::new() }
    );
    Ok(s)
}

/// An Ethernet/IPv4/UDP frame with complete checksums.
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x0a, 0x02, 0, 0, 0, 0, 0x64, 0x08, 0x00];
    f.extend_from_slice(&proxy_testkit::tun::udp_packet(src, dst, sport, dport, &[0x5a; 18]));
    f
}

/// `kp_xdp_pass` on `ifname` in `ns` (detached when the returned object drops).
fn xdp_pass_on(ns: &Netns, ifname: &str) -> anyhow::Result<aya::Ebpf> {
    ns.run(|| -> anyhow::Result<aya::Ebpf> {
        let mut loader = aya::EbpfLoader::new();
        loader.map_max_entries(proxy_common::MAP_CT_TCP, 16).map_max_entries(proxy_common::MAP_CT_ANY, 16);
        let mut ebpf = loader.load(datapath::EBPF_OBJECT)?;
        let prog: &mut aya::programs::Xdp = ebpf.program_mut(proxy_common::PROG_XDP_PASS).context("kp_xdp_pass")?.try_into()?;
        prog.load()?;
        prog.attach(ifname, aya::programs::XdpMode::Driver)?;
        Ok(ebpf)
    })
}
