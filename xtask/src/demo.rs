//! `cargo xtask demo`: the agent in standalone mode on examples/demo.
//!
//! Topology (all in fresh namespaces, nothing routable off the machine):
//! a client pod, three backend pods running echo servers that answer with
//! their name, and a node namespace running the agent attached to every pod
//! veth. Everything is torn down at the end, also on failure.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use proxy_testkit::{EchoServer, Topology, tcp_request, udp_request, wait_until};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PIN_DIR: &str = "kproxy";

/// Stops the agent and removes pins when dropped.
struct AgentGuard {
    child: Option<Child>,
    agent: std::path::PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = std::process::Command::new(&self.agent)
            .args(["--pin-dir", PIN_DIR, "cleanup"])
            .stdout(Stdio::null())
            .status();
    }
}

fn ready(topo: &Topology) -> bool {
    proxy_testkit::http_get(&topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")
}

pub fn run() -> anyhow::Result<()> {
    let agent_bin = crate::target_dir().join("release/proxy-agent");
    if std::path::Path::new(&format!("/sys/fs/bpf/{PIN_DIR}")).exists() {
        bail!("/sys/fs/bpf/{PIN_DIR} exists: another agent is running here; stop it or run `proxy-agent cleanup`");
    }
    println!("== topology: client c0, node, backends b0 b1 b2 (namespaces kpdemo-*)");
    let topo = Topology::build("kpdemo", 1, 3)?;
    let _servers: Vec<EchoServer> = topo
        .backends
        .iter()
        .map(|b| EchoServer::start(&b.ns, &b.name, 8080))
        .collect::<anyhow::Result<_>>()?;

    let manifests = std::env::temp_dir().join(format!("kproxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&manifests)?;
    let _rm = RemoveDir(manifests.clone());
    let src = crate::root().join("examples/demo/web.yaml");
    std::fs::copy(&src, manifests.join("web.yaml")).with_context(|| format!("copying {}", src.display()))?;

    println!("== agent: proxy-agent --manifests {} --interfaces veth* (in the node namespace)", manifests.display());
    let child = topo
        .node
        .command(agent_bin.to_str().unwrap())
        .args(["--manifests", manifests.to_str().unwrap(), "--interfaces", "veth*", "--pin-dir", PIN_DIR])
        .args(["--node-name", "demo-node", "--metrics-addr", "127.0.0.1:10249", "--health-addr", "127.0.0.1:10256"])
        // The demo's client is a pod: the TC path. Socket programs would
        // attach to this machine's root cgroup, which the demo never touches.
        .args(["--socket-lb", "off"])
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let mut guard = AgentGuard { child: Some(child), agent: agent_bin.clone() };
    if !wait_until(Duration::from_secs(20), || ready(&topo)) {
        bail!("the agent did not become ready within 20 s");
    }
    if let Some(c) = guard.child.as_mut()
        && let Some(st) = c.try_wait()?
    {
        bail!("the agent exited: {st}");
    }

    println!("== 12 TCP connections to {VIP}:80 and 6 UDP requests to {VIP}:53 from c0");
    let client = &topo.clients[0].ns;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..12 {
        let (answer, peer) = tcp_request(client, SocketAddrV4::new(VIP, 80), Duration::from_secs(2))
            .with_context(|| format!("TCP request {i}"))?;
        println!("  tcp #{i:<2} answered by {answer} (reply from {peer})");
        *seen.entry(answer).or_default() += 1;
    }
    for i in 0..6 {
        let (answer, from) = udp_request(client, SocketAddrV4::new(VIP, 53), Duration::from_secs(2))
            .with_context(|| format!("UDP request {i}"))?;
        println!("  udp #{i:<2} answered by {answer} (reply from {from})");
        *seen.entry(answer).or_default() += 1;
    }

    println!("== bpftool map dump pinned /sys/fs/bpf/{PIN_DIR}/kp_svc_v1 (first entries)");
    let dump = proxy_testkit::run("bpftool", &["map", "dump", "pinned", &format!("/sys/fs/bpf/{PIN_DIR}/kp_svc_v1")])?;
    for line in dump.lines().take(40) {
        println!("  {line}");
    }
    println!("== datapath counters");
    let stats = proxy_testkit::run(agent_bin.to_str().unwrap(), &["--pin-dir", PIN_DIR, "stats"])?;
    for line in stats.lines().filter(|l| !l.trim_end().ends_with(" 0")) {
        println!("  {line}");
    }
    drop(guard);
    println!("== torn down: agent stopped, pins removed, namespaces deleted");
    println!("answers per backend: {seen:?}");
    for b in ["b0", "b1", "b2"] {
        if !seen.contains_key(b) {
            bail!("backend {b} never answered through the ClusterIP");
        }
    }
    println!("demo: OK, all three backends answered through the ClusterIP");
    Ok(())
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
