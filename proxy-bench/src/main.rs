//! Side-by-side datapath benchmark (run through `cargo xtask bench`).
//!
//! For each Service count and mode, a fresh namespace topology (client pod,
//! node, two backend pods) is built, the mode's translation is loaded in the
//! node namespace, and a bounded load generator in the client pod measures
//! connection rate, persistent request/response rate and UDP request rate.
//! Modes: direct (no translation), ebpf (our TC datapath, programmed through
//! the agent's sync code), ebpf-sock (the same with socket-level load
//! balancing: the load generator's process sits in a child cgroup the socket
//! programs are attached to, never the machine's root), iptables and
//! nftables (the rule structures kube-proxy writes, loaded with
//! iptables-restore / nft -f).
mod load;
mod north_south;
mod rules;
mod sync;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, Datapath, DatapathConfig},
    manifests::Objects,
    metrics::Metrics,
};
use proxy_testkit::{EchoServer, Topology, tcp_syn_frame, unique_prefix};
use serde_json::json;

#[derive(Parser, Debug)]
struct Opts {
    /// Stop at 10,000 Services, shorter runs (under 5 minutes).
    #[arg(long)]
    quick: bool,
    /// One Service count, a few seconds: proves the benchmark still runs.
    #[arg(long)]
    smoke: bool,
    /// Control plane only, no traffic: full sync and incremental endpoint
    /// changes on real maps at 10,000 Services (and 50,000 without
    /// --quick), and agent memory. Prints the sync figures and summary.
    #[arg(long)]
    sync_only: bool,
    /// Agent memory only: RSS at 10,000 Services x 10 endpoints and at
    /// 100,000 x 2, printed as `rss10k_mb=.. rss100k_mb=..`.
    #[arg(long)]
    memory_only: bool,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Override the Service counts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    counts: Vec<usize>,
    /// Override the seconds per load test.
    #[arg(long)]
    seconds: Option<f64>,
    /// Override the number of interleaved rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Only these modes (comma-separated: direct,ebpf,ebpf-sock,iptables,nftables).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Largest Service count loaded into nftables.
    #[arg(long, default_value_t = 10_000)]
    nft_max: usize,
    /// Only the north-south section (outside client -> NodePort -> backend on another node).
    #[arg(long)]
    north_south_only: bool,
    /// Print the iptables and nftables rule sets for this many Services and exit.
    #[arg(long)]
    print_rules: Option<usize>,
    /// Where docs/benchmarks.md and the plot go (the workspace root).
    #[arg(long)]
    root: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    Ebpf,
    EbpfSock,
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ebpf => "ebpf",
            Mode::EbpfSock => "ebpf-sock",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

const BACKEND_PORT: u16 = 8080;
/// The endpoint swapped in by the timed one-endpoint change.
const CHANGED_EP: Ipv4Addr = Ipv4Addr::new(10, 200, 250, 2);

/// VIP of Service `i` (the measured one is the last).
fn vip(i: usize) -> Ipv4Addr {
    // 250 addresses per /24, 256 /24s per /16: every Service its own VIP.
    Ipv4Addr::new(10, 96 + (i / 64_000) as u8, ((i % 64_000) / 250) as u8, (i % 250 + 1) as u8)
}

/// N Services with 2 endpoints each, as API objects.
fn objects(n: usize, backends: &[Ipv4Addr]) -> Objects {
    let mut y = String::with_capacity(n * 700);
    for i in 0..n {
        let v = vip(i);
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench, resourceVersion: \"1\"}}\nspec: {{clusterIP: {v}, ports: [{{name: http, port: 80, protocol: TCP, targetPort: {BACKEND_PORT}}}, {{name: udp, port: 53, protocol: UDP, targetPort: {BACKEND_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: bench, resourceVersion: \"1\", labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}, {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}]\nendpoints:\n"
        );
        for b in backends {
            let _ = writeln!(y, "- {{addresses: [\"{b}\"], conditions: {{ready: true}}}}");
        }
    }
    proxy_agent::manifests::parse_str(&y, "bench").expect("generated objects parse")
}

#[derive(Debug, Default, Clone)]
struct Sample {
    mode: &'static str,
    services: usize,
    round: usize,
    tcp_crr: load::Result,
    tcp_rr: load::Result,
    udp_rr: load::Result,
    program_ms: f64,
    change_ms: f64,
    change_engine_ms: f64,
    prog_hit_ns: f64,
    prog_miss_ns: f64,
}

/// Loaded translation for one measurement; removed on drop.
enum Loaded {
    None,
    /// The agent, its config, a second handle for BPF_PROG_TEST_RUN, and
    /// (ebpf-sock) the child cgroup this process sits in meanwhile.
    Ebpf(Box<Agent>, DatapathConfig, Box<Datapath>, Option<proxy_testkit::ChildCgroup>),
    Rules,
}

fn setup(mode: Mode, n: usize, topo: &Topology, s: &mut Sample) -> anyhow::Result<Loaded> {
    let backends: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    match mode {
        Mode::Direct => Ok(Loaded::None),
        Mode::Ebpf | Mode::EbpfSock => {
            let objs = objects(n, &backends);
            let cgroup = if mode == Mode::EbpfSock {
                Some(proxy_testkit::ChildCgroup::enter(&format!("{}-bench", topo.prefix))?)
            } else {
                None
            };
            let cfg = AgentConfig {
                datapath: DatapathConfig {
                    pin_dir_name: topo.prefix.clone(),
                    // Two ports, each a frontend plus two slots, with headroom.
                    max_services: proxy_common::DEFAULT_MAX_SERVICE_ENTRIES.max((n * 8) as u32),
                    socket_lb: if mode == Mode::EbpfSock { datapath::SocketLb::All } else { datapath::SocketLb::Off },
                    cgroup_root: cgroup.as_ref().map(|c| c.path.clone()),
                    ..Default::default()
                },
                interfaces: vec!["veth*".into()],
                node_name: "bench".into(),
                node_ips: vec![],
                maglev: true,
                nodeport_cidrs: vec![],
            };
            let dcfg = cfg.datapath.clone();
            let mut agent = topo.node.run(|| -> anyhow::Result<Agent> {
                let mut a = Agent::start(cfg, std::sync::Arc::new(Metrics::default()))?;
                a.attach_interfaces()?;
                Ok(a)
            })?;
            let t = Instant::now();
            let r = agent.apply(&objs.services, &objs.slices, &objs.nodes, t);
            s.program_ms = t.elapsed().as_secs_f64() * 1e3;
            if !r.failed.is_empty() {
                bail!("programming failed: {:?}", &r.failed[..r.failed.len().min(3)]);
            }
            // One endpoint of the last Service changes.
            let mut changed = objs.clone();
            let last = changed.slices.last_mut().unwrap();
            last.endpoints[0].addresses[0] = CHANGED_EP.to_string();
            last.metadata.resource_version = Some("2".into());
            let t = Instant::now();
            let last_svc = changed.services.last().unwrap();
            let id = proxy_agent::incremental::service_id(last_svc);
            if agent.apply_changes([(id, Some(last_svc), vec![changed.slices.last().unwrap()])], &changed.nodes, t).is_none() {
                bail!("the incremental path fell back to a full sync");
            }
            s.change_ms = t.elapsed().as_secs_f64() * 1e3;
            // Engine only (diff + map writes, translation excluded): the
            // same one-endpoint change, back to the original set.
            let node = proxy_agent::agent::node_info(
                &AgentConfig { datapath: dcfg.clone(), interfaces: vec![], node_name: "bench".into(), node_ips: vec![], maglev: true, nodeport_cidrs: vec![] },
                &[],
            );
            let d0 = proxy_agent::translate::translate_all(&objs.services, &objs.slices, &node);
            let mut engine = proxy_agent::sync::SyncEngine::adopt(datapath::PinnedMaps::open(&dcfg.pin_dir())?)?;
            let t = Instant::now();
            let r = engine.sync(&d0);
            s.change_engine_ms = t.elapsed().as_secs_f64() * 1e3;
            if r.writes + r.deletes == 0 {
                bail!("the endpoint change wrote nothing");
            }
            // Per-packet cost with the kernel's own timing.
            let mut dp = Datapath::load(&dcfg)?;
            let hit = tcp_syn_frame(topo.clients[0].ip, vip(n - 1), 40000, 80);
            let miss = tcp_syn_frame(topo.clients[0].ip, Ipv4Addr::new(10, 200, 100, 2), 40000, 9);
            // One run per call (with `repeat` the kernel hands every run the
            // frame the previous run rewrote: after the first, a "hit" would
            // time a packet to the backend), less an empty program's run.
            dp.test_run(&hit, 1)?;
            let (mut hits, mut misses, mut empty) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..20_000 {
                hits.push(dp.test_run(&hit, 1)?.2.as_nanos() as f64);
                misses.push(dp.test_run(&miss, 1)?.2.as_nanos() as f64);
                empty.push(dp.test_run_program(proxy_common::PROG_TC_PASS, &hit, 1)?.2.as_nanos() as f64);
            }
            let base = median(&mut empty);
            s.prog_hit_ns = median(&mut hits) - base;
            s.prog_miss_ns = median(&mut misses) - base;
            Ok(Loaded::Ebpf(Box::new(agent), dcfg, Box::new(dp), cgroup))
        }
        Mode::Iptables => {
            // The timed change swaps in an absent endpoint; a second change
            // (untimed) restores the set before traffic is measured.
            let (full, change) = rules::iptables(n, &backends, CHANGED_EP, "N");
            let (_, revert) = rules::iptables(n, &backends, backends[0], "R");
            s.program_ms = rules::load(topo, "iptables-restore", &[], &full)?;
            s.change_ms = rules::load(topo, "iptables-restore", &["--noflush"], &change)?;
            rules::load(topo, "iptables-restore", &["--noflush"], &revert)?;
            s.change_engine_ms = s.change_ms;
            Ok(Loaded::Rules)
        }
        Mode::Nftables => {
            let (full, change) = rules::nftables(n, &backends, CHANGED_EP, "n");
            let (_, revert) = rules::nftables(n, &backends, backends[0], "r");
            s.program_ms = rules::load(topo, "nft", &["-f", "-"], &full)?;
            s.change_ms = rules::load(topo, "nft", &["-f", "-"], &change)?;
            rules::load(topo, "nft", &["-f", "-"], &revert)?;
            s.change_engine_ms = s.change_ms;
            Ok(Loaded::Rules)
        }
    }
}

fn measure(mode: Mode, n: usize, round: usize, opts: &Opts, secs: f64) -> anyhow::Result<Sample> {
    // A fresh topology per measurement: TIME_WAIT sockets and conntrack
    // entries from the previous one would skew this one.
    let topo = Topology::build(&unique_prefix("bn"), 1, 2)?;
    let _servers: Vec<EchoServer> =
        topo.backends.iter().map(|b| EchoServer::start(&b.ns, &b.name, BACKEND_PORT)).collect::<anyhow::Result<_>>()?;
    let mut s = Sample { mode: mode.name(), services: n, round, ..Sample::default() };
    let loaded = setup(mode, n, &topo, &mut s);
    let result = loaded.and_then(|loaded| {
        // Direct: each worker talks to one backend pod, workers spread over
        // both, so the servers carry the same load as behind a Service.
        let (tcp, udp): (Vec<SocketAddrV4>, Vec<SocketAddrV4>) = if mode == Mode::Direct {
            let b: Vec<SocketAddrV4> = topo.backends.iter().map(|b| SocketAddrV4::new(b.ip, BACKEND_PORT)).collect();
            (b.clone(), b)
        } else {
            (vec![SocketAddrV4::new(vip(n - 1), 80)], vec![SocketAddrV4::new(vip(n - 1), 53)])
        };
        let d = Duration::from_secs_f64(secs);
        let ns = &topo.clients[0].ns;
        s.tcp_crr = load::run(ns, load::Kind::TcpCrr, &tcp, opts.concurrency, d)?;
        s.tcp_rr = load::run(ns, load::Kind::TcpRr, &tcp, opts.concurrency, d)?;
        s.udp_rr = load::run(ns, load::Kind::UdpRr, &udp, opts.concurrency, d)?;
        if let Loaded::Ebpf(_, cfg, _, _) = &loaded
            && s.tcp_crr.errors + s.tcp_rr.errors + s.udp_rr.errors > 0
        {
            let stats = datapath::read_stats(&cfg.pin_dir())?;
            let ct = datapath::conntrack_entries(&cfg.pin_dir())?.len();
            eprintln!("  ebpf errors; datapath counters: {:?}; conntrack entries: {ct}", stats.iter().filter(|(_, n)| *n > 0).map(|(s, n)| (s.name(), *n)).collect::<Vec<_>>());
        }
        if let Loaded::Ebpf(agent, cfg, dp, cgroup) = loaded {
            drop(dp);
            drop(agent);
            datapath::cleanup(&cfg.pin_dir())?;
            drop(cgroup);
        }
        Ok(())
    });
    let _ = datapath::cleanup(&DatapathConfig { pin_dir_name: topo.prefix.clone(), ..Default::default() }.pin_dir());
    result.with_context(|| format!("{} at {n} Services", mode.name()))?;
    eprintln!(
        "  {:<9} {:>6} svc  crr {:>8.0}/s  rr {:>8.0}/s  udp {:>8.0}/s  program {:>8.1} ms  change {:>6.2} ms",
        s.mode, n, s.tcp_crr.rate, s.tcp_rr.rate, s.udp_rr.rate, s.program_ms, s.change_ms
    );
    Ok(s)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    if let Some(n) = opts.print_rules {
        let b = [Ipv4Addr::new(10, 200, 100, 2), Ipv4Addr::new(10, 200, 101, 2)];
        let (full, change) = rules::iptables(n, &b, CHANGED_EP, "N");
        println!("{full}\n# change\n{change}");
        let (full, change) = rules::nftables(n, &b, CHANGED_EP, "n");
        println!("{full}\n# change\n{change}");
        return Ok(());
    }
    if opts.memory_only {
        let small = load::memory(10_000, 10)?;
        let big = load::memory(100_000, 2)?;
        println!(
            "rss10k_mb={:.1} rss100k_mb={:.1} maps10k_mb={:.1} maps100k_mb={:.1}",
            small.rss_mb, big.rss_mb, small.maps_mb, big.maps_mb
        );
        return Ok(());
    }
    let counts: Vec<usize> = if opts.smoke {
        vec![100]
    } else if opts.quick {
        vec![1, 1_000, 10_000]
    } else {
        vec![1, 1_000, 10_000, 50_000]
    };
    let counts = if opts.counts.is_empty() { counts } else { opts.counts.clone() };
    // Medians of three interleaved rounds, with their spread: on this shared
    // machine one figure is noise.
    let rounds = opts.rounds.unwrap_or(if opts.smoke { 1 } else { 3 });
    let secs = opts.seconds.unwrap_or(if opts.smoke { 1.0 } else if opts.quick { 1.0 } else { 3.0 });
    let modes: Vec<Mode> = [Mode::Direct, Mode::Ebpf, Mode::EbpfSock, Mode::Iptables, Mode::Nftables]
        .into_iter()
        .filter(|m| opts.modes.is_empty() || opts.modes.iter().any(|x| x == m.name()))
        .collect();
    let started = Instant::now();
    // The control plane at scale (no traffic): incremental endpoint changes
    // and full syncs on real maps.
    let sync_counts: Vec<usize> = if opts.smoke {
        vec![]
    } else if opts.quick {
        vec![10_000]
    } else {
        vec![10_000, 50_000]
    };
    let mut syncs = Vec::new();
    for &n in &sync_counts {
        eprintln!("control plane: {n} Services x 10 endpoints, 50 endpoint changes");
        syncs.push(sync::measure(n, 10, 50)?);
    }
    if opts.sync_only {
        let memory = load::memory(10_000, 10)?;
        let big = if opts.quick { None } else { Some(load::memory(100_000, 2)?) };
        let (md, summary) = sync_report(&syncs, &memory, big.as_ref());
        print!("{md}");
        println!("{summary}");
        return Ok(());
    }
    let mut samples = Vec::new();
    let mut ns_samples = Vec::new();
    // Interleaved: every mode once per round, rounds repeated (A B A B).
    for round in 0..rounds {
        eprintln!("round {round}, north-south");
        for mode in north_south::Mode::ALL {
            ns_samples.push(north_south::measure(mode, secs)?);
        }
        if opts.north_south_only {
            continue;
        }
        for &n in &counts {
            eprintln!("round {round}, {n} Services");
            for &mode in &modes {
                // nft -f of kube-proxy's structure grows quadratically here
                // (~100 s of kernel time at 10,000 Services): measure large
                // nftables sets once, and not beyond --nft-max.
                if mode == Mode::Nftables && (n > opts.nft_max || (n >= 10_000 && round > 0)) {
                    continue;
                }
                samples.push(measure(mode, n, round, &opts, secs)?);
            }
        }
    }
    if opts.north_south_only {
        let (md, summary) = north_south_report(&ns_samples);
        print!("{md}");
        println!("{summary}");
        return Ok(());
    }
    let memory = load::memory(if opts.smoke { 100 } else { 10_000 }, 10)?;
    let big = if opts.smoke || opts.quick { None } else { Some(load::memory(100_000, 2)?) };
    let mut report = report(&opts, &counts, &samples, &memory, started.elapsed());
    let (ns_md, ns_summary) = north_south_report(&ns_samples);
    report.markdown = report.markdown.replacen("\n## Per-packet cost", &format!("\n{ns_md}\n## Per-packet cost"), 1);
    report.summary = format!("{} {ns_summary}", report.summary);
    let (sync_md, sync_summary) = sync_report(&syncs, &memory, big.as_ref());
    report.markdown.push_str(&sync_md);
    report.summary = format!("{} {}", report.summary, sync_summary.trim_start_matches("bench-sync: "));
    report.json["sync"] = json!(syncs.iter().map(|r| json!({"services": r.services, "endpoints": r.endpoints,
        "full_ms": r.full_ms, "resync_ms": r.resync_ms, "reload_ms": r.reload_ms, "change_p50_ms": r.change_p50_ms,
        "change_p99_ms": r.change_p99_ms, "change_max_ms": r.change_max_ms, "changes": r.changes})).collect::<Vec<_>>());
    print!("{}", report.markdown);
    let out = opts.root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report.json)?)?;
    if !opts.smoke {
        // The analysis of targets lives beside the generated figures.
        let notes = std::fs::read_to_string(opts.root.join("docs/benchmark-notes.md")).unwrap_or_default();
        let notes = notes.replacen("# Benchmark notes", "# Notes", 1);
        std::fs::write(opts.root.join("docs/benchmarks.md"), format!("{}\n{notes}", report.markdown))?;
        std::fs::write(opts.root.join("docs/bench-rate.svg"), plot(&counts, &samples))?;
    }
    println!("{}", report.summary);
    Ok(())
}

/// The control-plane section and its summary fields.
fn sync_report(syncs: &[sync::SyncResult], memory: &load::Memory, big: Option<&load::Memory>) -> (String, String) {
    let mut md = String::new();
    let _ = writeln!(md, "\n## Control plane at scale (real maps, no traffic)\n");
    let _ = writeln!(
        md,
        "One endpoint change = one EndpointSlice event through the incremental path (`Agent::apply_changes`: re-translate that Service, diff, write), timed from the event to the last map write.\n"
    );
    let _ = writeln!(md, "| Services × endpoints | first full sync ms (map writes) | resync, nothing changed, ms | periodic resync (maps read back, full diff) ms | change p50 ms | change p99 ms | max ms | changes | agent state MB |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in syncs {
        let _ = writeln!(
            md,
            "| {} × {} | {:.1} ({}) | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {} | {:.1} |",
            r.services, r.endpoints, r.full_ms, r.full_writes, r.resync_ms, r.reload_ms, r.change_p50_ms, r.change_p99_ms, r.change_max_ms, r.changes, r.state_mb
        );
    }
    let _ = writeln!(md, "\nAgent RSS (standalone, release): {:.1} MB at {} × {}", memory.rss_mb, memory.services, memory.endpoints);
    if let Some(b) = big {
        let _ = writeln!(md, "; {:.1} MB at {} × {}", b.rss_mb, b.services, b.endpoints);
    }
    let at = |n: usize| syncs.iter().find(|r| r.services == n);
    let f = |v: Option<f64>, p: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.p$}"));
    let mut summary = format!(
        "bench-sync: change10k_ms={} full10k_ms={} resync10k_ms={} rss10k_mb={}",
        f(at(10_000).map(|r| r.change_p99_ms), 2),
        f(at(10_000).map(|r| r.full_ms), 0),
        f(at(10_000).map(|r| r.resync_ms), 0),
        f((memory.services == 10_000).then_some(memory.rss_mb), 0),
    );
    if let Some(r) = at(50_000) {
        summary.push_str(&format!(" change50k_ms={:.2}", r.change_p99_ms));
    }
    if let Some(b) = big {
        summary.push_str(&format!(" rss100k_mb={:.0}", b.rss_mb));
    }
    (md, summary)
}

struct Report {
    markdown: String,
    json: serde_json::Value,
    summary: String,
}

fn med(samples: &[Sample], mode: &str, n: usize, f: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().filter(|s| s.mode == mode && s.services == n).map(&f).collect();
    median(&mut v)
}

/// (min, max) of a figure over the rounds.
fn spread(samples: &[Sample], mode: &str, n: usize, f: impl Fn(&Sample) -> f64) -> (f64, f64) {
    samples
        .iter()
        .filter(|s| s.mode == mode && s.services == n)
        .map(&f)
        .fold((f64::NAN, f64::NAN), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn report(opts: &Opts, counts: &[usize], samples: &[Sample], memory: &load::Memory, took: Duration) -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = proxy_testkit::run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Run: `cargo xtask bench{}` on {} ({} CPUs), kernel {}, {}; took {:.0} s. Every figure is the median of {} interleaved rounds; each measurement uses a fresh namespace topology (client pod -> node -> 2 backend pods over veth), concurrency {}. The measured Service is the one added last. iptables is `{}`.\n",
        if opts.quick { " --quick" } else if opts.smoke { " --smoke" } else { "" },
        cpu,
        proxy_testkit::cpus(),
        kernel.trim(),
        date.trim(),
        took.as_secs_f64(),
        samples.iter().map(|s| s.round).max().unwrap_or(0) + 1,
        opts.concurrency,
        proxy_testkit::run("iptables-restore", &["--version"]).unwrap_or_default().trim(),
    );
    let _ = writeln!(md, "## Data path (rates per second; latency in µs)\n");
    let _ = writeln!(md, "| Services | mode | TCP conn/s | (min–max) | ×direct | ×iptables | p50 | p99 | TCP req/s (persistent) | ×direct | p99 | UDP req/s | (min–max) | ×direct | p99 |");
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in counts {
        let d_crr = med(samples, "direct", n, |s| s.tcp_crr.rate);
        let i_crr = med(samples, "iptables", n, |s| s.tcp_crr.rate);
        let d_rr = med(samples, "direct", n, |s| s.tcp_rr.rate);
        let d_udp = med(samples, "direct", n, |s| s.udp_rr.rate);
        for mode in ["direct", "ebpf", "ebpf-sock", "iptables", "nftables"] {
            let crr = med(samples, mode, n, |s| s.tcp_crr.rate);
            let range = |(lo, hi): (f64, f64)| if lo.is_finite() { format!("{lo:.0}–{hi:.0}") } else { "n/a".into() };
            let tcp_range = range(spread(samples, mode, n, |s| s.tcp_crr.rate));
            let udp_range = range(spread(samples, mode, n, |s| s.udp_rr.rate));
            let _ = writeln!(
                md,
                "| {n} | {mode} | {crr:.0} | {tcp_range} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {udp_range} | {:.2} | {:.0} |",
                crr / d_crr,
                crr / i_crr,
                med(samples, mode, n, |s| s.tcp_crr.p50_us),
                med(samples, mode, n, |s| s.tcp_crr.p99_us),
                med(samples, mode, n, |s| s.tcp_rr.rate),
                med(samples, mode, n, |s| s.tcp_rr.rate) / d_rr,
                med(samples, mode, n, |s| s.tcp_rr.p99_us),
                med(samples, mode, n, |s| s.udp_rr.rate),
                med(samples, mode, n, |s| s.udp_rr.rate) / d_udp,
                med(samples, mode, n, |s| s.udp_rr.p99_us),
            );
        }
    }
    let _ = writeln!(md, "\n## Per-packet cost of the TC program (BPF_PROG_TEST_RUN: median of 20,000 single runs less an empty program's)\n");
    let _ = writeln!(md, "| Services | service hit (tracked flow) ns | no-service miss ns |\n|---:|---:|---:|");
    for &n in counts {
        let _ = writeln!(md, "| {n} | {:.1} | {:.1} |", med(samples, "ebpf", n, |s| s.prog_hit_ns), med(samples, "ebpf", n, |s| s.prog_miss_ns));
    }
    let _ = writeln!(md, "\n## Control plane (ms)\n");
    let _ = writeln!(md, "| Services | ebpf: program all (translate + sync) | iptables-restore all | nft -f all | ebpf: one endpoint change (incremental path) | ebpf: change, sync engine only | iptables-restore --noflush change | nft change |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in counts {
        let _ = writeln!(
            md,
            "| {n} | {:.1} | {:.1} | {:.1} | {:.2} | {:.3} | {:.2} | {:.2} |",
            med(samples, "ebpf", n, |s| s.program_ms),
            med(samples, "iptables", n, |s| s.program_ms),
            med(samples, "nftables", n, |s| s.program_ms),
            med(samples, "ebpf", n, |s| s.change_ms),
            med(samples, "ebpf", n, |s| s.change_engine_ms),
            med(samples, "iptables", n, |s| s.change_ms),
            med(samples, "nftables", n, |s| s.change_ms),
        );
    }
    let _ = writeln!(
        md,
        "\n## Memory\n\nAgent (standalone, release build) at {} Services × {} endpoints: RSS {:.1} MB; BPF maps (memlock as the kernel accounts it): {:.1} MB.\n",
        memory.services, memory.endpoints, memory.rss_mb, memory.maps_mb
    );
    let crr = |m: &str, n: usize| med(samples, m, n, |s| s.tcp_crr.rate);
    let first = counts[0];
    let big = if counts.contains(&10_000) { 10_000 } else { *counts.last().unwrap() };
    let last = *counts.last().unwrap();
    let worst_direct = counts.iter().map(|&n| crr("ebpf", n) / crr("direct", n)).fold(f64::INFINITY, f64::min);
    let worst_sock_direct = counts.iter().map(|&n| crr("ebpf-sock", n) / crr("direct", n)).fold(f64::INFINITY, f64::min);
    let summary = format!(
        "bench: ebpf/direct={:.2} ebpf-sock/direct={:.2} ebpf/iptables@{k}={:.2} ebpf/nftables@{k}={:.2} ebpf-sock/nftables@{k}={:.2} ebpf@{l}/ebpf@{f}={:.2} program{k}_ms={:.0}",
        worst_direct,
        worst_sock_direct,
        crr("ebpf", big) / crr("iptables", big),
        crr("ebpf", big) / crr("nftables", big),
        crr("ebpf-sock", big) / crr("nftables", big),
        crr("ebpf", last) / crr("ebpf", first),
        med(samples, "ebpf", big, |s| s.program_ms),
        k = short(big),
        l = short(last),
        f = short(first),
    );
    let _ = writeln!(md, "Summary (ebpf/direct and ebpf-sock/direct are the worst Service count): `{summary}`\n");
    let _ = writeln!(
        md,
        "nftables: loading kube-proxy's nftables structure with `nft -f` took ~100 s of kernel time at 10,000 Services on this kernel (it grows quadratically with the number of chains), so large nftables sets are measured in one round only and not beyond {} Services (`--nft-max`); `n/a` marks what was not measured.\n",
        opts.nft_max
    );
    let _ = writeln!(md, "![TCP connection rate against Service count](bench-rate.svg)\n");
    let _ = writeln!(md, "What these figures mean against the targets, and what limits them: [benchmark-notes.md](benchmark-notes.md).\n");
    let raw: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            json!({"mode": s.mode, "services": s.services, "round": s.round,
                "tcp_crr": s.tcp_crr.json(), "tcp_rr": s.tcp_rr.json(), "udp_rr": s.udp_rr.json(),
                "program_ms": s.program_ms, "change_ms": s.change_ms, "change_engine_ms": s.change_engine_ms,
                "prog_hit_ns": s.prog_hit_ns, "prog_miss_ns": s.prog_miss_ns})
        })
        .collect();
    let json = json!({"kernel": kernel.trim(), "date": date.trim(), "samples": raw,
        "memory": {"services": memory.services, "endpoints": memory.endpoints, "rss_mb": memory.rss_mb, "maps_mb": memory.maps_mb},
        "summary": summary});
    let md = md.replace("| NaN", "| n/a").replace("=NaN", "=n/a");
    let summary = summary.replace("NaN", "n/a");
    Report { markdown: md, json, summary }
}

/// The north-south table and its summary keys.
fn north_south_report(samples: &[north_south::Sample]) -> (String, String) {
    let med_of = |mode: &str, f: &dyn Fn(&north_south::Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().filter(|s| s.mode == mode).map(f).collect();
        median(&mut v)
    };
    let range_of = |mode: &str, f: &dyn Fn(&north_south::Sample) -> f64| {
        let v: Vec<f64> = samples.iter().filter(|s| s.mode == mode).map(f).collect();
        let lo = v.iter().copied().fold(f64::NAN, f64::min);
        let hi = v.iter().copied().fold(f64::NAN, f64::max);
        if lo.is_finite() { format!("{lo:.0}–{hi:.0}") } else { "n/a".into() }
    };
    let mut md = String::new();
    let _ = writeln!(md, "## North-south: outside client -> node A NodePort -> backend on node B (SNAT)\n");
    let _ = writeln!(md, "Two-node topology (fabric bridge, veth uplinks), fresh per measurement; medians of the rounds with (min–max). UDP: one sender floods the NodePort with 64-byte datagrams; the rate is what the backend received.\n");
    let _ = writeln!(md, "| mode | TCP conn/s | (min–max) | ×nftables | UDP pps delivered | (min–max) | ×nftables | UDP pps sent |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let n_crr = med_of("nftables", &|s| s.tcp_crr.rate);
    let n_udp = med_of("nftables", &|s| s.udp_pps);
    for mode in north_south::Mode::ALL.map(north_south::Mode::name) {
        let crr = med_of(mode, &|s| s.tcp_crr.rate);
        let udp = med_of(mode, &|s| s.udp_pps);
        let _ = writeln!(
            md,
            "| {mode} | {crr:.0} | {} | {:.2} | {udp:.0} | {} | {:.2} | {:.0} |",
            range_of(mode, &|s| s.tcp_crr.rate),
            crr / n_crr,
            range_of(mode, &|s| s.udp_pps),
            udp / n_udp,
            med_of(mode, &|s| s.udp_sent_pps),
        );
    }
    let xdp_ns = med_of("ebpf-xdp", &|s| s.xdp_ns);
    let _ = writeln!(
        md,
        "\nkp_xdp per packet (BPF_PROG_TEST_RUN, median of 20,000 single runs less an empty program's): established SNAT flow (conntrack, FIB lookup, rewrite, XDP_TX) {xdp_ns:.0} ns ({:.0} ns per run as measured); a packet to no Service {:.0} ns.\n",
        med_of("ebpf-xdp", &|s| s.xdp_run_ns),
        med_of("ebpf-xdp", &|s| s.xdp_miss_ns)
    );
    let summary = format!(
        "ns_xdp/nftables_udp={:.2} ns_xdp/tc_crr={:.2} ns_xdp/nftables_crr={:.2} xdp_ns={:.0}",
        med_of("ebpf-xdp", &|s| s.udp_pps) / n_udp,
        med_of("ebpf-xdp", &|s| s.tcp_crr.rate) / med_of("ebpf", &|s| s.tcp_crr.rate),
        med_of("ebpf-xdp", &|s| s.tcp_crr.rate) / n_crr,
        xdp_ns,
    );
    (md.replace("| NaN", "| n/a"), summary.replace("NaN", "n/a"))
}

fn short(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 { format!("{}k", n / 1000) } else { n.to_string() }
}

/// A small SVG line chart: TCP connection rate against Service count.
fn plot(counts: &[usize], samples: &[Sample]) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let modes = [("direct", "#555"), ("ebpf", "#1f77b4"), ("ebpf-sock", "#9467bd"), ("iptables", "#d62728"), ("nftables", "#2ca02c")];
    let max = samples.iter().map(|s| s.tcp_crr.rate).fold(1.0, f64::max) * 1.1;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (counts.len().max(2) - 1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / max;
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(svg, "<text x=\"{}\" y=\"20\" text-anchor=\"middle\">TCP connections/s (one request each) vs Services</text>", w / 2.0);
    let _ = writeln!(svg, "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - pad, w - pad, h - pad);
    let _ = writeln!(svg, "<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>", h - pad);
    for (i, n) in counts.iter().enumerate() {
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>", x(i), h - pad + 16.0);
    }
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>", pad - 4.0, y(v) + 4.0, v);
    }
    for (j, (mode, color)) in modes.iter().enumerate() {
        // Counts a mode was not measured at (n/a) leave a gap.
        let pts: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| (i, med(samples, mode, n, |s| s.tcp_crr.rate)))
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = writeln!(svg, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>", pts.join(" "));
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{mode}</text>", w - pad - 60.0, pad + 14.0 * j as f64);
    }
    svg.push_str("</svg>\n");
    svg
}
