//! proxy-agent: programs the kproxy eBPF datapath from Kubernetes objects.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_agent::{
    agent::{Agent, AgentConfig},
    datapath::{self, DatapathConfig},
    explain, http, inspect,
    manifests::ManifestDir,
    metrics::Metrics,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(version, about = "eBPF replacement for kube-proxy", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    /// Standalone mode: program Services and EndpointSlices from the YAML/JSON
    /// files in this directory, re-reading them when they change.
    #[arg(long, env = "KPROXY_MANIFESTS")]
    manifests: Option<PathBuf>,

    /// kubeconfig for the Kubernetes mode (default: in-cluster config, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// This node's name (NodePort addresses, Local traffic policies, topology).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Extra NodePort addresses (comma-separated), besides the Node's InternalIP/ExternalIP.
    #[arg(long, env = "KPROXY_NODE_IPS", value_delimiter = ',')]
    node_ips: Vec<IpAddr>,

    /// NodePort addresses, as kube-proxy's --nodeport-addresses: CIDRs
    /// (comma-separated) selecting this node's local addresses, e.g.
    /// `0.0.0.0/0` for every one; `primary` (the default): the Node's
    /// InternalIP/ExternalIP and --node-ips.
    #[arg(long, env = "KPROXY_NODEPORT_ADDRESSES", value_delimiter = ',', default_value = "primary")]
    nodeport_addresses: Vec<String>,

    /// Interfaces to attach to: names or `prefix*` patterns, comma-separated.
    /// New matching interfaces are attached as they appear.
    #[arg(long, env = "KPROXY_INTERFACES", value_delimiter = ',', default_value = "eth0")]
    interfaces: Vec<String>,

    #[command(flatten)]
    dp: DpArgs,

    /// Address for /metrics.
    /// Bound to loopback by default, as kube-proxy's metrics are.
    #[arg(long, env = "KPROXY_METRICS_ADDR", default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,

    /// Address for /healthz and /readyz.
    #[arg(long, env = "KPROXY_HEALTH_ADDR", default_value = "0.0.0.0:10256")]
    health_addr: SocketAddr,

    /// How often to look for manifest changes and new interfaces.
    #[arg(long, env = "KPROXY_POLL_INTERVAL_MS", default_value_t = 500)]
    poll_interval_ms: u64,

    /// Seconds between full resyncs: the kernel maps are read back and
    /// repaired against the desired state (kube-proxy's --sync-period).
    #[arg(long, env = "KPROXY_SYNC_PERIOD_S", default_value_t = 30)]
    sync_period_s: u64,

    /// Kubernetes mode: wait this long after a change to coalesce a burst.
    #[arg(long, env = "KPROXY_COALESCE_MS", default_value_t = 5)]
    coalesce_ms: u64,

    /// Backend choice for new flows: `maglev` (a consistent hash of the flow:
    /// a flow whose conntrack entry was lost lands on the same backend while
    /// the backends are unchanged) or `random`.
    #[arg(long, env = "KPROXY_LB_ALGORITHM", default_value = "maglev", value_parser = ["maglev", "random"])]
    lb_algorithm: String,

    /// Seconds between conntrack collector passes (expired flows, stale entries).
    #[arg(long, env = "KPROXY_CONNTRACK_GC_INTERVAL_S", default_value_t = 10)]
    conntrack_gc_interval_s: u64,

    /// Detach and remove every pin when the agent exits (default: leave the
    /// datapath running, so a restart interrupts no connection).
    #[arg(long, env = "KPROXY_CLEANUP_ON_EXIT")]
    cleanup_on_exit: bool,

    /// Log format: text or json.
    #[arg(long, env = "KPROXY_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(clap::Args, Debug, Clone)]
struct DpArgs {
    /// bpffs mount point (mounted when missing).
    #[arg(global = true, long, env = "KPROXY_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Directory under bpffs for maps and links.
    #[arg(global = true, long, env = "KPROXY_PIN_DIR", default_value = proxy_common::PIN_DIR_NAME)]
    pin_dir: String,
    /// Capacity of the services map (frontends plus backend slots).
    #[arg(global = true, long, env = "KPROXY_MAX_SERVICES", default_value_t = proxy_common::DEFAULT_MAX_SERVICE_ENTRIES)]
    max_services: u32,
    /// Capacity of the backends map.
    #[arg(global = true, long, env = "KPROXY_MAX_BACKENDS", default_value_t = proxy_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the TCP conntrack map (two entries per flow). When full,
    /// new connections are refused and established ones keep working.
    #[arg(global = true, long, env = "KPROXY_MAX_CONNTRACK", default_value_t = proxy_common::DEFAULT_MAX_CT_TCP)]
    max_conntrack: u32,
    /// Capacity of the UDP (and other) conntrack map, an LRU (two entries per flow).
    #[arg(global = true, long, env = "KPROXY_MAX_CONNTRACK_OTHER", default_value_t = proxy_common::DEFAULT_MAX_CT_ANY)]
    max_conntrack_other: u32,
    /// Socket-level load balancing: `all` (pods and host processes
    /// translated at connect()), `host-only` (only the host network
    /// namespace; pods use the TC path), `off`.
    #[arg(global = true, long, env = "KPROXY_SOCKET_LB", default_value = "all")]
    socket_lb: datapath::SocketLb,
    /// cgroup v2 directory for the socket programs (default: the root of the
    /// unified hierarchy, mounted when there is none).
    #[arg(global = true, long, env = "KPROXY_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// The node's external interfaces (uplinks), names or `prefix*`
    /// patterns, comma-separated: their clients are outside the cluster
    /// (externalTrafficPolicy applies), and their flows to backends on
    /// other nodes are SNATed to the node. Other attached interfaces are pods'.
    #[arg(global = true, long, env = "KPROXY_EXTERNAL_INTERFACES", value_delimiter = ',', default_value = "eth*,en*,bond*")]
    external_interfaces: Vec<String>,
    /// SNAT ports for external flows to remote backends, `FIRST-LAST`
    /// (reserved in net.ipv4.ip_local_reserved_ports).
    #[arg(global = true, long, env = "KPROXY_SNAT_PORT_RANGE", default_value = "1024-29999", value_parser = parse_port_range)]
    snat_port_range: (u16, u16),
    /// XDP on the external interfaces: `native` (in the driver; generic
    /// where the driver has none), `generic`, or `none`. NodePort,
    /// LoadBalancer and externalIP flows are then translated and forwarded
    /// before the stack; TC still handles what XDP cannot.
    #[arg(global = true, long, env = "KPROXY_NODEPORT_ACCELERATION", default_value = "none")]
    nodeport_acceleration: datapath::Acceleration,
    /// Datapath debug events: every new flow (client, Service, backend,
    /// SNAT port) and every dropped or refused new flow with its reason, in
    /// the agent's log (aya-log). Off by default, and then free: the events
    /// are removed from the programs at load.
    #[arg(global = true, long, env = "KPROXY_DEBUG_EVENTS")]
    debug_events: bool,
    /// Capacity of the SNAT map (one entry per SNATed flow; when full, new
    /// SNATed flows are dropped, others keep working).
    #[arg(global = true, long, env = "KPROXY_MAX_SNAT", default_value_t = proxy_common::DEFAULT_MAX_SNAT)]
    max_snat: u32,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("bad first port in {s:?}"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("bad last port in {s:?}"))?;
    if a == 0 || b < a {
        return Err(format!("{s:?}: need 1 <= FIRST <= LAST"));
    }
    Ok((a, b))
}

impl DpArgs {
    fn config(&self) -> DatapathConfig {
        DatapathConfig {
            bpffs: self.bpffs.clone(),
            pin_dir_name: self.pin_dir.clone(),
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_conntrack: self.max_conntrack,
            max_conntrack_other: self.max_conntrack_other,
            socket_lb: self.socket_lb,
            cgroup_root: self.cgroup_root.clone(),
            external_interfaces: self.external_interfaces.clone(),
            snat_ports: self.snat_port_range,
            acceleration: self.nodeport_acceleration,
            debug_events: self.debug_events,
            max_snat: self.max_snat,
            ..DatapathConfig::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Detach the datapath from every interface and remove all pins.
    Cleanup,
    /// Print the datapath counters.
    Stats,
    /// Show the pinned maps by Service name: services, backends, conntrack
    /// or affinity. Reads the maps only; works while the agent runs and
    /// after it stopped.
    Inspect {
        #[arg(value_enum)]
        what: inspect::What,
        #[arg(long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Show what the datapath does with a packet and why: runs the real TC
    /// ingress program on a synthetic TCP SYN or UDP datagram with
    /// BPF_PROG_TEST_RUN (no packet is sent). The conntrack and affinity
    /// entries the run writes are put back as they were afterwards; the
    /// datapath counters do count the packet.
    Explain {
        /// Client address, with an optional source port (default 61999;
        /// Maglev choices depend on it).
        #[arg(long, value_name = "CLIENT_IP[:PORT]", value_parser = explain::parse_from)]
        from: std::net::SocketAddrV4,
        /// Destination, e.g. 10.96.0.10:80/tcp (tcp or udp).
        #[arg(long, value_name = "ADDR:PORT/PROTO", value_parser = explain::parse_to)]
        to: (std::net::SocketAddrV4, u8),
        /// Interface the packet arrives on (must exist in this network namespace).
        #[arg(long, value_name = "NAME")]
        interface: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Remove kube-proxy's leftovers from this node: iptables KUBE-* chains
    /// (nat, filter; nf_tables and legacy) and the jumps to them, the
    /// nftables `kube-proxy` tables, the IPVS kube-ipvs0 device and virtual
    /// servers. Safe to run again.
    CleanupKubeProxy {
        /// Print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match cli.cmd {
        Some(Cmd::Cleanup) => {
            let dir = cli.dp.config().pin_dir();
            datapath::cleanup(&dir)?;
            println!("removed {}", dir.display());
            return Ok(());
        }
        Some(Cmd::Stats) => {
            for (stat, n) in datapath::read_stats(&cli.dp.config().pin_dir())? {
                println!("{:<22} {n}", stat.name());
            }
            return Ok(());
        }
        Some(Cmd::Inspect { what, output }) => {
            print!("{}", inspect::inspect(&cli.dp.config().pin_dir(), what, output)?);
            return Ok(());
        }
        Some(Cmd::Explain { from, to: (to, proto), interface, output }) => {
            let req = explain::Request { from, to, proto, interface };
            let e = explain::explain(&cli.dp.config().pin_dir(), &req)?;
            match output {
                inspect::Output::Table => print!("{}", explain::render(&e)),
                inspect::Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
            }
            return Ok(());
        }
        Some(Cmd::CleanupKubeProxy { dry_run }) => return cleanup_kube_proxy(dry_run),
        None => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(cli))
}

fn cleanup_kube_proxy(dry_run: bool) -> anyhow::Result<()> {
    use proxy_agent::cleanup;
    let plan = cleanup::plan()?;
    for n in &plan.notes {
        println!("note: {n}");
    }
    if plan.steps.is_empty() {
        println!("nothing to remove: no kube-proxy leftovers found");
        return Ok(());
    }
    if dry_run {
        for s in &plan.steps {
            println!("would remove {}: {s}", s.what);
        }
        return Ok(());
    }
    cleanup::execute(&plan, |s| println!("removing {}: {s}", s.what))?;
    println!("removed {} kube-proxy leftovers", plan.steps.len());
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let node_name = cli
        .node_name
        .clone()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_owned()))
        .unwrap_or_default();
    let cfg = AgentConfig {
        datapath: cli.dp.config(),
        interfaces: cli.interfaces.clone(),
        node_name,
        node_ips: cli.node_ips.clone(),
        maglev: cli.lb_algorithm == "maglev",
        nodeport_cidrs: proxy_agent::agent::parse_nodeport_cidrs(&cli.nodeport_addresses)?,
    };
    let metrics = Arc::new(Metrics::default());
    let pin_dir = cfg.datapath.pin_dir();
    let refresh: Arc<dyn Fn() + Send + Sync> = {
        let metrics = metrics.clone();
        let pin_dir = pin_dir.clone();
        Arc::new(move || {
            if let Ok(stats) = datapath::read_stats(&pin_dir) {
                metrics.set_datapath(stats.into_iter().map(|(s, n)| (s.name(), n)).collect());
            }
        })
    };
    let mut servers = Vec::new();
    servers.push(tokio::spawn(http::serve(cli.metrics_addr, metrics.clone(), refresh.clone())));
    if cli.health_addr != cli.metrics_addr {
        servers.push(tokio::spawn(http::serve(cli.health_addr, metrics.clone(), refresh)));
    }

    let dp_cfg = cfg.datapath.clone();
    let sync_period = Duration::from_secs(cli.sync_period_s.max(1));
    // kube-proxy's healthz timeout: twice the sync period.
    metrics.health_timeout_ms.store(2 * sync_period.as_millis() as u64, Ordering::Relaxed);
    let mut agent = Agent::start(cfg, metrics.clone()).context("starting the datapath")?;
    proxy_agent::agent::spawn_conntrack_gc(
        pin_dir.clone(),
        dp_cfg,
        Duration::from_secs(cli.conntrack_gc_interval_s.max(1)),
        metrics.clone(),
    );
    let (link_tx, mut links) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = proxy_agent::ifaces::watch(link_tx).context("watching interfaces (netlink)")?;
    // The first event lists every link: attach before the first sync.
    if let Some(ev) = links.recv().await {
        agent.on_link_event(ev);
    }
    let result = match &cli.manifests {
        Some(dir) => run_standalone(&mut agent, dir, &metrics, Duration::from_millis(cli.poll_interval_ms), sync_period, &mut links).await,
        None => {
            proxy_agent::kube::run(
                &mut agent,
                cli.kubeconfig.as_deref(),
                &metrics,
                Duration::from_millis(cli.coalesce_ms),
                sync_period,
                &mut links,
            )
            .await
        }
    };
    for s in servers {
        s.abort();
    }
    if cli.cleanup_on_exit {
        datapath::cleanup(&pin_dir)?;
        tracing::info!("datapath detached and pins removed");
    } else {
        tracing::info!(pin_dir = %pin_dir.display(), "exiting; the datapath stays attached (use `proxy-agent cleanup` to remove it)");
    }
    result
}

async fn run_standalone(
    agent: &mut Agent,
    dir: &std::path::Path,
    metrics: &Metrics,
    poll: Duration,
    sync_period: Duration,
    links: &mut tokio::sync::mpsc::UnboundedReceiver<proxy_agent::ifaces::LinkEvent>,
) -> anyhow::Result<()> {
    let mut last_full = Instant::now();
    let mut manifests = ManifestDir::new(dir);
    let mut tick = tokio::time::interval(poll);
    let shutdown = proxy_agent::shutdown_signal();
    tokio::pin!(shutdown);
    let mut first = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ev = links.recv() => {
                if let Some(ev) = ev {
                    agent.on_link_event(ev);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        agent.retry_attach();
        let seen = Instant::now();
        let (changed, errors) = match manifests.refresh() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "reading manifests");
                continue;
            }
        };
        for e in errors {
            tracing::warn!(error = format!("{e:#}"), "manifest skipped, keeping its last good contents");
        }
        // A failed frontend is retried on every tick; every sync period the
        // maps are read back and repaired.
        let resync = last_full.elapsed() >= sync_period;
        if resync {
            agent.request_resync();
            last_full = Instant::now();
        }
        if changed {
            metrics.queued(proxy_agent::metrics::unix_ms());
        }
        if changed || first || resync || agent.has_failures() {
            agent.apply_groups(manifests.groups(), &manifests.nodes(), seen);
            if first {
                metrics.ready.store(true, Ordering::Relaxed);
                tracing::info!("first sync programmed; ready");
                first = false;
            }
        }
    }
}
