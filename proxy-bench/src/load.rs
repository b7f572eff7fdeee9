//! Bounded load generator (threads in the client namespace, pinned to the
//! first CPU) and the agent memory measurement.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_testkit::{Netns, pin_to_cpu};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// New TCP connection per request.
    TcpCrr,
    /// Requests on persistent TCP connections.
    TcpRr,
    /// UDP request/response.
    UdpRr,
}

#[derive(Clone, Debug, Default)]
pub struct Result {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub ops: u64,
    pub errors: u64,
}

impl Result {
    pub fn json(&self) -> serde_json::Value {
        json!({"rate": self.rate, "p50_us": self.p50_us, "p99_us": self.p99_us, "ops": self.ops, "errors": self.errors})
    }
}

/// Hard cap on operations per worker, besides the time bound.
const MAX_OPS: usize = 2_000_000;
const IO_TIMEOUT: Duration = Duration::from_secs(1);

fn one(kind: Kind, to: SocketAddrV4, tcp: &mut Option<TcpStream>, udp: &Option<UdpSocket>) -> std::io::Result<()> {
    let mut buf = [0u8; 64];
    match kind {
        Kind::TcpCrr => {
            let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            s.write_all(b"x\n")?;
            if s.read(&mut buf)? == 0 {
                return Err(std::io::Error::other("closed"));
            }
        }
        Kind::TcpRr => {
            if tcp.is_none() {
                let s = TcpStream::connect_timeout(&SocketAddr::V4(to), IO_TIMEOUT)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                *tcp = Some(s);
            }
            let s = tcp.as_mut().unwrap();
            s.write_all(b"x\n")?;
            if s.read(&mut buf)? == 0 {
                *tcp = None;
                return Err(std::io::Error::other("closed"));
            }
        }
        Kind::UdpRr => {
            let u = udp.as_ref().unwrap();
            u.send(b"x")?;
            u.recv(&mut buf)?;
        }
    }
    Ok(())
}

/// Runs `conc` workers for `dur` from inside `ns`; worker i uses target
/// `targets[i % len]` (direct mode spreads over the backends like a Service).
pub fn run(ns: &Netns, kind: Kind, targets: &[SocketAddrV4], conc: usize, dur: Duration) -> anyhow::Result<Result> {
    let ns_file = std::fs::File::open(format!("/run/netns/{}", ns.name))?;
    let fd = ns_file.as_raw_fd();
    let start = Instant::now();
    let deadline = start + dur;
    let per_worker: Vec<(Vec<u32>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conc)
            .map(|i| {
                let to = targets[i % targets.len()];
                s.spawn(move || {
                    // SAFETY: setns on this worker thread only.
                    assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0, "setns");
                    pin_to_cpu(0);
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut errors = 0u64;
                    let mut tcp = None;
                    let udp = matches!(kind, Kind::UdpRr).then(|| {
                        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
                        u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                        u.connect(to).unwrap();
                        u
                    });
                    while lat.len() < MAX_OPS && Instant::now() < deadline {
                        let t = Instant::now();
                        match one(kind, to, &mut tcp, &udp) {
                            Ok(()) => lat.push(t.elapsed().as_micros() as u32),
                            Err(e) => {
                                if errors < 3 && std::env::var_os("KPROXY_BENCH_DEBUG").is_some() {
                                    eprintln!("    {kind:?} {to}: {e}");
                                }
                                errors += 1;
                            }
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let errors: u64 = per_worker.iter().map(|w| w.1).sum();
    let mut all: Vec<u32> = per_worker.into_iter().flat_map(|w| w.0).collect();
    if all.is_empty() {
        bail!("no request succeeded against {targets:?} ({errors} errors)");
    }
    all.sort_unstable();
    let pct = |p: f64| f64::from(all[((all.len() - 1) as f64 * p) as usize]);
    Ok(Result { rate: all.len() as f64 / elapsed, p50_us: pct(0.5), p99_us: pct(0.99), ops: all.len() as u64, errors })
}

pub struct Memory {
    pub services: usize,
    pub endpoints: usize,
    pub rss_mb: f64,
    pub maps_mb: f64,
}

/// Runs the agent binary in standalone mode on `services` × `endpoints`
/// objects in a scratch namespace, and reads its RSS and map memory.
pub fn memory(services: usize, endpoints: usize) -> anyhow::Result<Memory> {
    let agent = std::env::current_exe()?.with_file_name("proxy-agent");
    if !agent.exists() {
        bail!("{} missing: build it with `cargo build --release -p proxy-agent`", agent.display());
    }
    let prefix = proxy_testkit::unique_prefix("mem");
    let ns = Netns::create(&prefix)?;
    // An interface to attach to (the agent is ready only with one attached).
    ns.ip(&["link", "add", "memv0", "type", "veth", "peer", "name", "memv1"])?;
    ns.ip(&["link", "set", "memv0", "up"])?;
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir)?;
    let mut y = String::new();
    for i in 0..services {
        let vip = crate::vip(i);
        y.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: m}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: m, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n"));
        for e in 0..endpoints {
            let n = i * endpoints + e;
            y.push_str(&format!("- {{addresses: [\"10.{}.{}.{}\"]}}\n", 1 + n / 65_536, (n / 256) % 256, n % 256));
        }
    }
    std::fs::write(dir.join("objects.yaml"), y)?;
    let mut child = ns
        .command(agent.to_str().unwrap())
        .args(["--manifests", dir.to_str().unwrap(), "--interfaces", "memv0", "--pin-dir", &prefix])
        .args(["--metrics-addr", "127.0.0.1:10249", "--health-addr", "127.0.0.1:10256"])
        // Never attach socket programs at this machine's root cgroup.
        .args(["--socket-lb", "off"])
        // Maps sized for the objects, so every frontend is programmed.
        .args(["--max-services", &(services * (endpoints + 2)).max(262_144).to_string()])
        .args(["--max-backends", &(services * endpoints + 1024).max(262_144).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let pin = std::path::Path::new("/sys/fs/bpf").join(&prefix);
    let result = (|| -> anyhow::Result<Memory> {
        let ready = proxy_testkit::wait_until(Duration::from_secs(120), || {
            proxy_testkit::http_get(&ns, 10256, "/readyz").starts_with("HTTP/1.1 200")
        });
        if !ready {
            bail!("agent not ready with {services} Services");
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let rss_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .context("VmRSS")?;
        let mut maps = 0.0;
        for m in proxy_common::ALL_MAPS {
            let out = proxy_testkit::run("bpftool", &["-j", "map", "show", "pinned", pin.join(m).to_str().unwrap()])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            maps += v["bytes_memlock"].as_f64().unwrap_or(0.0);
        }
        Ok(Memory { services, endpoints, rss_mb: rss_kb / 1024.0, maps_mb: maps / 1_048_576.0 })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = proxy_agent::datapath::cleanup(&pin);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
