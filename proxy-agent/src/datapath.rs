//! Loading, pinning and attaching the eBPF datapath, and map access.
//!
//! Maps are pinned under `<bpffs>/<pin dir>/<map name>` and links under
//! `<pin dir>/links/in_<ifindex>_<interface>` and `eg_<ifindex>_<interface>`
//! (the index tells an interface recreated under the same name from the old
//! one). A restarted agent opens the pinned maps (keeping services, backends
//! and conntrack) and atomically replaces the program behind each pinned tcx
//! link, so no packet meets a detached hook.
//!
//! Attach positions (tcx): ingress first, so Service addresses are translated
//! before other programs (a CNI's policy) see the packet, as they would after
//! kube-proxy's DNAT; egress last, so the others see the reply as
//! backend -> client, like the stack did. Both return "next" for everything
//! they let through (see the datapath's chaining contract).
use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap as AyaHashMap, IterableMap as _, Map, MapData, PerCpuArray, lpm_trie::{Key as LpmKey, LpmTrie}},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use proxy_common::{
    ALL_MAPS, AffinityKey, AffinityValue, Backend, CtKey, CtValue, MAP_AFFINITY, MAP_BACKENDS, MAP_CT_ANY,
    MAP_CONFIG, MAP_CT_TCP, MAP_MAGLEV, MAP_MEMBERS, MAP_META, MAP_SERVICES, MAP_SNAT, MAP_SRC_RANGES, MAP_STATS,
    MAP_VIPS, META_COUNT, MaglevTable, MemberKey, NodeConfig, PROG_TC_EGRESS, PROG_TC_EGRESS_L3, PROG_TC_INGRESS,
    PROG_TC_INGRESS_EXT, PROG_TC_INGRESS_EXT_L3, PROG_TC_INGRESS_L3, RETIRED_MAPS, STAT_COUNT, ServiceKey,
    ServiceValue, SrcRange, Stat, VipValue,
};

use crate::sync::{MapError, MapOps, Op, Pending, RangeEntry};

/// Every TC program, in load order.
const TC_PROGRAMS: [&str; 6] =
    [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_TC_INGRESS_L3, PROG_TC_EGRESS_L3, PROG_TC_INGRESS_EXT, PROG_TC_INGRESS_EXT_L3];

/// The datapath object, built by build.rs and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where pins live and how large maps are.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs mount point (mounted by the agent when missing).
    pub bpffs: PathBuf,
    /// Directory below `bpffs` for our pins.
    pub pin_dir_name: String,
    pub max_services: u32,
    pub max_backends: u32,
    /// TCP conntrack capacity (two entries per flow).
    pub max_conntrack: u32,
    /// UDP and other conntrack capacity (two entries per flow).
    pub max_conntrack_other: u32,
    pub max_affinity: u32,
    /// SNAT map capacity (one entry per SNATed flow).
    pub max_snat: u32,
    /// Which sockets the cgroup programs translate.
    pub socket_lb: SocketLb,
    /// cgroup v2 directory the socket programs attach to (`None`: the root
    /// of the unified hierarchy, mounted when there is none).
    pub cgroup_root: Option<PathBuf>,
    /// Names or `prefix*` patterns of the node's external interfaces
    /// (uplinks): their clients are outside the cluster, and their flows to
    /// backends on other nodes are SNATed. Every other attached interface
    /// is a pod's (or the CNI's).
    pub external_interfaces: Vec<String>,
    /// SNAT port range (first, last).
    pub snat_ports: (u16, u16),
    /// XDP on the external interfaces.
    pub acceleration: Acceleration,
    /// Datapath debug events (new flows, drops of new flows) to the log.
    pub debug_events: bool,
}

/// Socket-level load balancing (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SocketLb {
    /// Every socket in the cgroup (pods and the host).
    #[default]
    All,
    /// Only sockets of the host network namespace (for service meshes that
    /// must see Service addresses inside pods); pods use the TC path.
    HostOnly,
    /// No socket programs: the TC path translates everything it sees.
    Off,
}

impl std::str::FromStr for SocketLb {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "host-only" => Ok(Self::HostOnly),
            "off" => Ok(Self::Off),
            other => Err(format!("--socket-lb must be all, host-only or off, not {other:?}")),
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            pin_dir_name: proxy_common::PIN_DIR_NAME.to_owned(),
            max_services: proxy_common::DEFAULT_MAX_SERVICE_ENTRIES,
            max_backends: proxy_common::DEFAULT_MAX_BACKENDS,
            max_conntrack: proxy_common::DEFAULT_MAX_CT_TCP,
            max_conntrack_other: proxy_common::DEFAULT_MAX_CT_ANY,
            max_affinity: proxy_common::DEFAULT_MAX_AFFINITY,
            max_snat: proxy_common::DEFAULT_MAX_SNAT,
            socket_lb: SocketLb::Off,
            cgroup_root: None,
            external_interfaces: default_external_interfaces(),
            snat_ports: (proxy_common::DEFAULT_SNAT_PORT_MIN, proxy_common::DEFAULT_SNAT_PORT_MAX),
            acceleration: Acceleration::None,
            debug_events: false,
        }
    }
}

/// XDP on external interfaces (`--nodeport-acceleration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Acceleration {
    /// TC only.
    #[default]
    None,
    /// XDP in the driver (veth, most physical NICs); falls back to generic
    /// where the driver has no XDP.
    Native,
    /// XDP after the driver (any device; slower than native).
    Generic,
}

impl std::str::FromStr for Acceleration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "disabled" => Ok(Self::None),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            other => Err(format!("--nodeport-acceleration must be none, native or generic, not {other:?}")),
        }
    }
}

/// `--external-interfaces` default: the usual names of a node's uplinks.
#[must_use]
pub fn default_external_interfaces() -> Vec<String> {
    ["eth*", "en*", "bond*"].map(String::from).to_vec()
}

impl DatapathConfig {
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(&self.pin_dir_name)
    }

    /// Capacity of each map whose size is configurable.
    fn sizes(&self) -> [(&'static str, u32); 8] {
        [
            (MAP_SERVICES, self.max_services),
            (MAP_MEMBERS, self.max_services),
            (MAP_VIPS, self.max_services),
            (MAP_BACKENDS, self.max_backends),
            (MAP_CT_TCP, self.max_conntrack),
            (MAP_CT_ANY, self.max_conntrack_other),
            (MAP_AFFINITY, self.max_affinity),
            (MAP_SNAT, self.max_snat),
        ]
    }
}

/// Mounts bpffs at `path` unless one is mounted there already.
pub fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs with a valid C string and an out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    if st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf")?;
    // SAFETY: plain mount(2) call with valid C strings.
    if unsafe { libc::mount(fstype.as_ptr(), c.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "{} is not a bpffs and mounting one failed; run as root (CAP_SYS_ADMIN) or `mount -t bpf bpf {}`",
                path.display(),
                path.display()
            )
        });
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

/// What kind of device an interface is, which decides the program it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Frames start with an Ethernet header (veth, NICs, bridge ports, VXLAN).
    Ethernet,
    /// Packets start with the IP header (WireGuard, IPIP, GRE, tun).
    L3,
}

/// An interface to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub kind: DeviceKind,
}

/// A map whose pinned size differs from the configured one: its entries are
/// copied into the new map, and conntrack copied once more after the new
/// program is attached (flows the old program created meanwhile).
struct Migration {
    name: &'static str,
    old: MapData,
}

/// Loaded programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    cfg: DatapathConfig,
    migrations: Vec<Migration>,
    /// The tail-call maps (kept open with the programs that use them).
    _calls: [aya::maps::ProgramArray<MapData>; 2],
}

/// Forwards the datapath's debug events (aya-log ring buffer) to the log,
/// on a thread of its own, for as long as the agent runs.
fn spawn_debug_events(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut logger = aya_log::EbpfLogger::init(ebpf).context("opening the debug event ring buffer")?;
    std::thread::Builder::new().name("kproxy-debug".into()).spawn(move || {
        loop {
            let mut pfd = libc::pollfd { fd: logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on one valid descriptor with a timeout.
            unsafe { libc::poll(&raw mut pfd, 1, 1000) };
            logger.flush();
        }
    })?;
    tracing::info!("datapath debug events on (--debug-events): new flows and dropped new flows are logged");
    Ok(())
}

/// A second handle on a pinned map, typed.
fn typed<K: Pod, V: Pod>(map: &MapData) -> anyhow::Result<AyaHashMap<MapData, K, V>> {
    let fd = map.fd().as_fd().try_clone_to_owned()?;
    Ok(AyaHashMap::try_from(Map::from_map_data(MapData::from_fd(fd)?)?)?)
}

/// Copies every entry of `old` into `new` (or only counts them when `new`
/// is `None`).
fn copy_typed<K: Pod, V: Pod>(old: &MapData, new: Option<&mut Map>, flags: u64) -> anyhow::Result<usize> {
    let old: AyaHashMap<MapData, K, V> = typed(old)?;
    let Some(new) = new else { return Ok(old.keys().count()) };
    let mut new: AyaHashMap<&mut MapData, K, V> = AyaHashMap::try_from(new)?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(Result::ok) {
        match new.insert(k, v, flags) {
            Ok(()) => n += 1,
            // BPF_NOEXIST: the new program already wrote a newer entry.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn copy_entries(name: &str, old: &MapData, new: Option<&mut Map>, flags: u64) -> anyhow::Result<usize> {
    match name {
        MAP_SERVICES => copy_typed::<ServiceKey, ServiceValue>(old, new, flags),
        MAP_MEMBERS => copy_typed::<MemberKey, u32>(old, new, flags),
        MAP_VIPS => copy_typed::<[u8; 16], VipValue>(old, new, flags),
        MAP_BACKENDS => copy_typed::<u32, Backend>(old, new, flags),
        MAP_CT_TCP | MAP_CT_ANY => copy_typed::<CtKey, CtValue>(old, new, flags),
        MAP_AFFINITY => copy_typed::<AffinityKey, AffinityValue>(old, new, flags),
        MAP_SNAT => copy_typed::<CtKey, CtKey>(old, new, flags),
        other => bail!("map {other} cannot be migrated"),
    }
}

impl Datapath {
    /// Loads the object, adopting maps pinned by a previous agent. A pinned
    /// map whose size differs from the configured one is migrated into a
    /// map of the new size with its entries, or the load fails saying why.
    pub fn load(cfg: &DatapathConfig) -> anyhow::Result<Self> {
        ensure_bpffs(&cfg.bpffs)?;
        let pin_dir = cfg.pin_dir();
        fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        raise_memlock();
        // Every resize is checked before any pin is touched: a refusal
        // leaves all maps as they were.
        let mut planned = Vec::new();
        for (name, want) in cfg.sizes() {
            let path = pin_dir.join(name);
            if !path.exists() {
                continue;
            }
            let old = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {} (remove it with `proxy-agent cleanup`)", path.display()))?;
            let info = old.info()?;
            if info.max_entries() == want {
                continue;
            }
            let entries = copy_entries(name, &old, None, 0)?;
            if entries > want as usize {
                bail!(
                    "map {name} holds {entries} entries, more than the configured capacity {want}; \
                     start with a capacity of at least {entries} (it is {} now), or run `proxy-agent cleanup` to start empty",
                    info.max_entries()
                );
            }
            tracing::info!(map = name, from = info.max_entries(), to = want, entries, "resizing pinned map");
            planned.push((name, path, old));
        }
        let mut migrations = Vec::new();
        for (name, path, old) in planned {
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            migrations.push(Migration { name, old });
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in cfg.sizes() {
            loader.map_max_entries(name, size);
        }
        let host_only = u32::from(cfg.socket_lb == SocketLb::HostOnly);
        // Socket LB needs Linux >= 5.18 (bpf_set_retval) and SO_NETNS_COOKIE;
        // with --socket-lb=off neither is touched, so older kernels run the TC path.
        let netns_cookie = if cfg.socket_lb == SocketLb::Off {
            0
        } else {
            netns_cookie().context("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux >= 5.14); use --socket-lb=off on older kernels")?
        };
        loader.override_global(proxy_common::GLOBAL_SOCK_HOST_ONLY, &host_only, true);
        // Debug events: 0 (off) makes every event dead code the verifier
        // removes; aya-log's own level keeps info and above when on.
        let debug = u32::from(cfg.debug_events);
        let log_level: u8 = if cfg.debug_events { 3 } else { 0 };
        loader.override_global(proxy_common::GLOBAL_DEBUG, &debug, true);
        loader.override_global("AYA_LOG_LEVEL", &log_level, true);
        loader.override_global(proxy_common::GLOBAL_HOST_NETNS_COOKIE, &netns_cookie, true);
        let loaded = loader.load(EBPF_OBJECT);
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                // Put the old maps back, so nothing is lost.
                for m in &migrations {
                    let _ = m.old.pin(pin_dir.join(m.name));
                }
                return Err(anyhow::Error::new(e).context(
                    "loading the eBPF object failed (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF); \
                     if a pinned map has an incompatible layout, run `proxy-agent cleanup`",
                ));
            }
        };
        for m in &migrations {
            let new = ebpf.map_mut(m.name).ok_or_else(|| anyhow!("map {} missing from the object", m.name))?;
            let n = copy_entries(m.name, &m.old, Some(new), 0).with_context(|| format!("copying the entries of {}", m.name))?;
            tracing::info!(map = m.name, entries = n, "entries migrated");
        }
        for name in TC_PROGRAMS.into_iter().chain(proxy_common::PROG_TC_NEW_FLOW).chain([proxy_common::PROG_TC_DEBUG, proxy_common::PROG_TC_PASS]) {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the verifier rejected the TC program {name}"))?;
        }
        for name in [proxy_common::PROG_XDP, proxy_common::PROG_XDP_NEW_FLOW, proxy_common::PROG_XDP_PASS] {
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the verifier rejected the XDP program {name}"))?;
        }
        let mut xcalls: aya::maps::ProgramArray<MapData> = aya::maps::ProgramArray::try_from(
            ebpf.take_map(proxy_common::MAP_XCALLS).ok_or_else(|| anyhow!("map {} missing", proxy_common::MAP_XCALLS))?,
        )?;
        {
            let prog: &aya::programs::Xdp = ebpf
                .program(proxy_common::PROG_XDP_NEW_FLOW)
                .ok_or_else(|| anyhow!("program {} missing", proxy_common::PROG_XDP_NEW_FLOW))?
                .try_into()?;
            xcalls.set(0, prog.fd()?, 0).context("filling the XDP tail-call map")?;
        }
        // The tail calls, before any ingress program can run.
        let mut calls: aya::maps::ProgramArray<MapData> = aya::maps::ProgramArray::try_from(
            ebpf.take_map(proxy_common::MAP_CALLS).ok_or_else(|| anyhow!("map {} missing", proxy_common::MAP_CALLS))?,
        )?;
        // (Taken out of `ebpf`, the map stays pinned and referenced by the programs.)
        // The debug program first: a new-flow program of this load (events
        // on) must never reach the previous load's, whose event slot it does
        // not write.
        {
            let prog: &SchedClassifier =
                ebpf.program(proxy_common::PROG_TC_DEBUG).ok_or_else(|| anyhow!("program kp_tc_debug missing"))?.try_into()?;
            calls.set(proxy_common::CALL_DEBUG, prog.fd()?, 0).context("filling the tail-call map with kp_tc_debug")?;
        }
        for (i, name) in proxy_common::PROG_TC_NEW_FLOW.iter().enumerate() {
            let prog: &SchedClassifier =
                ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            let fd = prog.fd()?;
            calls
                .set(proxy_common::CALL_NEW_FLOW + i as u32, fd, 0)
                .with_context(|| format!("filling the tail-call map with {name}"))?;
        }
        for name in proxy_common::SOCK_PROGRAMS {
            if cfg.socket_lb == SocketLb::Off {
                break;
            }
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| {
                format!("the verifier rejected the socket program {name} (socket LB needs Linux >= 5.18; --socket-lb=off runs without it)")
            })?;
        }
        for old in RETIRED_MAPS {
            // Programs still running use them by fd; the pins only go.
            let _ = fs::remove_file(pin_dir.join(old));
        }
        ensure_meta(&pin_dir)?;
        if cfg.debug_events {
            spawn_debug_events(&mut ebpf)?;
        }
        Ok(Self { ebpf, cfg: cfg.clone(), migrations, _calls: [calls, xcalls] })
    }

    /// Once the new programs are attached everywhere: copies the conntrack
    /// entries the old programs created since the load, then lets the old
    /// maps go.
    pub fn finish_migration(&mut self) {
        for m in std::mem::take(&mut self.migrations) {
            if m.name != MAP_CT_TCP && m.name != MAP_CT_ANY && m.name != MAP_SNAT {
                continue;
            }
            if let Some(new) = self.ebpf.map_mut(m.name) {
                match copy_entries(m.name, &m.old, Some(new), 1 /* BPF_NOEXIST */) {
                    Ok(n) => tracing::info!(map = m.name, entries = n, "late conntrack entries migrated"),
                    Err(e) => tracing::warn!(map = m.name, error = format!("{e:#}"), "late conntrack migration"),
                }
            }
        }
    }

    /// Whether `iface` is one of the node's external interfaces.
    #[must_use]
    pub fn is_external(&self, iface: &Iface) -> bool {
        matches_patterns(&iface.name, &self.cfg.external_interfaces)
    }

    /// Writes the node-wide settings: the SNAT address (`None`: no SNAT,
    /// remote backends of external flows are only DNATed) and port range.
    pub fn set_node_config(&mut self, snat: Option<std::net::Ipv4Addr>) -> anyhow::Result<()> {
        let mut arr: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).ok_or_else(|| anyhow!("map {MAP_CONFIG} missing"))?)?;
        let cfg = NodeConfig {
            snat_addr: snat.map_or([0; 16], |a| proxy_common::v4_mapped(a.octets())),
            snat_port_min: self.cfg.snat_ports.0,
            snat_port_max: self.cfg.snat_ports.1,
            _pad: 0,
        };
        if arr.get(&0, 0).ok() != Some(cfg) {
            arr.set(0, cfg, 0).context("writing the node config map")?;
            tracing::info!(snat_address = ?snat, ports = ?self.cfg.snat_ports, "SNAT for external flows to remote backends");
        }
        Ok(())
    }

    fn program_named(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?)
    }

    /// Runs the Ethernet ingress program on `packet` with `BPF_PROG_TEST_RUN`.
    /// Returns the verdict, the output frame and the mean time per run.
    pub fn test_run(&mut self, packet: &[u8], repeat: u32) -> anyhow::Result<(i32, Vec<u8>, std::time::Duration)> {
        self.test_run_program(PROG_TC_INGRESS, packet, repeat)
    }

    /// Runs program `name` on `packet` with `BPF_PROG_TEST_RUN`.
    pub fn test_run_program(
        &mut self,
        name: &str,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(i32, Vec<u8>, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let r = self.program_named(name)?.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value as i32, out, r.duration))
    }

    /// Runs the XDP program on `packet` with `BPF_PROG_TEST_RUN` as if it
    /// arrived on interface `ifindex` (of the calling thread's network
    /// namespace; FIB lookups happen there). Returns the action, the
    /// output frame and the mean time per run.
    pub fn test_run_xdp(&mut self, packet: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        self.test_run_xdp_program(proxy_common::PROG_XDP, packet, ifindex, repeat)
    }

    /// [`Datapath::test_run_xdp`] for XDP program `name`.
    pub fn test_run_xdp_program(
        &mut self,
        name: &str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions, Xdp};
        let mut out = vec![0u8; packet.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat.max(1);
        let prog: &mut Xdp = self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN (XDP)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
    }

    /// Attaches ingress and egress programs for `iface`'s kind (in the
    /// calling thread's network namespace). With tcx the links are pinned,
    /// and links pinned by a previous agent for the same interface are
    /// updated in place, atomically.
    pub fn attach(&mut self, iface: &Iface) -> anyhow::Result<()> {
        let external = self.is_external(iface);
        let (ing, eg) = match (iface.kind, external) {
            (DeviceKind::Ethernet, false) => (PROG_TC_INGRESS, PROG_TC_EGRESS),
            (DeviceKind::L3, false) => (PROG_TC_INGRESS_L3, PROG_TC_EGRESS_L3),
            (DeviceKind::Ethernet, true) => (PROG_TC_INGRESS_EXT, PROG_TC_EGRESS),
            (DeviceKind::L3, true) => (PROG_TC_INGRESS_EXT_L3, PROG_TC_EGRESS_L3),
        };
        let [pin_in, pin_eg] = link_pin_names(iface);
        self.attach_one(iface, ing, TcAttachType::Ingress, pin_in, LinkOrder::first())?;
        self.attach_one(iface, eg, TcAttachType::Egress, pin_eg, LinkOrder::last())?;
        let xdp = if external && iface.kind == DeviceKind::Ethernet { self.cfg.acceleration } else { Acceleration::None };
        match self.attach_xdp(iface, xdp) {
            Ok(mode) => tracing::info!(iface = %iface.name, xdp = mode, "XDP acceleration"),
            // TC translates everything XDP would: a failed XDP attach costs speed only.
            Err(e) => tracing::warn!(iface = %iface.name, error = format!("{e:#}"), "XDP not attached; the TC path serves this interface"),
        }
        Ok(())
    }

    /// Attaches (or removes) the XDP program on `iface`; returns the mode it
    /// got. Links are pinned as `links/xn_` (native) or `xg_` (generic)
    /// `<ifindex>_<name>`; a restarted agent swaps the program behind its
    /// pinned link atomically. XDP only accelerates: while it is absent the
    /// TC path translates the same flows, so switching modes loses nothing.
    fn attach_xdp(&mut self, iface: &Iface, want: Acceleration) -> anyhow::Result<&'static str> {
        use aya::programs::{Xdp, XdpMode};
        let links = self.cfg.pin_dir().join("links");
        let safe = iface.name.replace('.', "_");
        let native = links.join(format!("xn_{}_{safe}", iface.index));
        let generic = links.join(format!("xg_{}_{safe}", iface.index));
        let keep = match want {
            Acceleration::None => None,
            Acceleration::Native => Some(&native),
            Acceleration::Generic => Some(&generic),
        };
        for pin in [&native, &generic] {
            if Some(pin) != keep && pin.exists() {
                unpin_link(pin);
            }
        }
        let Some(pin) = keep.cloned() else { return Ok("none") };
        let prog: &mut Xdp =
            self.ebpf.program_mut(proxy_common::PROG_XDP).ok_or_else(|| anyhow!("program kp_xdp missing"))?.try_into()?;
        let prog_fd = prog.fd()?.as_fd().try_clone_to_owned()?;
        if pin.exists() {
            match PinnedLink::from_pin(&pin) {
                Ok(p) => {
                    let link: FdLink = p.into();
                    if link_update(&link, prog_fd.as_fd()).is_ok() {
                        std::mem::forget(link);
                        return Ok(if want == Acceleration::Native { "native" } else { "generic" });
                    }
                }
                Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "unreadable XDP link pin; attaching anew"),
            }
            unpin_link(&pin);
        }
        let (id, got, pin) = match want {
            Acceleration::Native => match prog.attach_to_if_index(iface.index, XdpMode::Driver) {
                Ok(id) => (id, "native", pin),
                Err(e) => {
                    tracing::warn!(iface = %iface.name, error = %e, "native XDP unavailable on this device; using generic XDP");
                    (prog.attach_to_if_index(iface.index, XdpMode::Skb)?, "generic", generic.clone())
                }
            },
            _ => (prog.attach_to_if_index(iface.index, XdpMode::Skb)?, "generic", pin),
        };
        let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| anyhow!("XDP link is not a bpf link: {e:?}"))?;
        link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        Ok(got)
    }

    fn attach_one(
        &mut self,
        iface: &Iface,
        name: &str,
        dir: TcAttachType,
        pin_name: String,
        order: LinkOrder,
    ) -> anyhow::Result<()> {
        let link_pin = self.cfg.pin_dir().join("links").join(pin_name);
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let ifname = iface.name.as_str();
        let prog = self.program_named(name)?;
        if !tcx {
            // clsact + netlink filter: replace our own filter, keep others.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                if !matches!(&e, tc::TcError::IoError(io) if io.kind() == io::ErrorKind::AlreadyExists) {
                    tracing::debug!(iface = ifname, error = %e, "clsact qdisc");
                }
            }
            for old in TC_PROGRAMS {
                let _ = tc::qdisc_detach_program(ifname, dir, old);
            }
            let id = prog
                .attach_with_options(ifname, dir, TcAttachOptions::Netlink(Default::default()))
                .with_context(|| format!("attaching to {ifname} via netlink"))?;
            // Keep the filter when the agent exits, like a pinned link.
            let link = prog.take_link(id)?;
            std::mem::forget(link);
            return Ok(());
        }
        if link_pin.exists() {
            match PinnedLink::from_pin(&link_pin) {
                Ok(pinned) => {
                    let fd_link: FdLink = pinned.into();
                    let link: SchedClassifierLink = fd_link.try_into()?;
                    match prog.attach_to_link(link) {
                        Ok(id) => {
                            // The pin still holds the link; drop our handle
                            // without detaching.
                            let link = prog.take_link(id)?;
                            std::mem::forget(link);
                            tracing::info!(iface = ifname, program = name, "replaced program on pinned tcx link");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::warn!(iface = ifname, error = %e, "pinned link is stale; attaching anew");
                        }
                    }
                }
                Err(e) => tracing::warn!(iface = ifname, error = %e, "unreadable link pin; attaching anew"),
            }
            let _ = fs::remove_file(&link_pin);
        }
        let id = prog.attach_with_options(ifname, dir, TcAttachOptions::TcxOrder(order)).with_context(|| {
            format!("attaching the TC program to interface {ifname:?} (does it exist in this network namespace?)")
        })?;
        let link = prog.take_link(id)?;
        let fd_link: FdLink = link.try_into()?;
        fd_link.pin(&link_pin).with_context(|| format!("pinning link {}", link_pin.display()))?;
        tracing::info!(iface = ifname, index = iface.index, program = name, "attached (tcx)");
        Ok(())
    }

    /// Attaches (or, with `--socket-lb=off`, detaches) the socket programs
    /// at the configured cgroup. Links are pinned as
    /// `links/sock_<cgroup id>_<program>`;
    /// a restarted agent swaps the program behind each pinned link
    /// atomically (`BPF_LINK_UPDATE`), so no connect() meets a gap. Returns
    /// the cgroup attached to.
    pub fn attach_sockets(&mut self) -> anyhow::Result<Option<PathBuf>> {
        let links = self.cfg.pin_dir().join("links");
        if self.cfg.socket_lb == SocketLb::Off {
            for e in fs::read_dir(&links).into_iter().flatten().flatten() {
                let pin = e.file_name().to_string_lossy().into_owned();
                if pin.starts_with("sock_") {
                    unpin_link(&e.path());
                    tracing::info!(pin, "socket program detached (--socket-lb=off)");
                }
            }
            return Ok(None);
        }
        let root = match &self.cfg.cgroup_root {
            Some(p) => p.clone(),
            None => cgroup2_root()?,
        };
        let cgroup = fs::File::open(&root)
            .with_context(|| format!("opening cgroup {} (set --cgroup-root to a cgroup v2 directory)", root.display()))?;
        // The pins carry the cgroup's id (its inode): links on another
        // cgroup (an earlier --cgroup-root) are detached, not reused.
        let cgroup_id = {
            use std::os::unix::fs::MetadataExt as _;
            cgroup.metadata()?.ino()
        };
        if let Ok(entries) = fs::read_dir(&links) {
            for e in entries.flatten() {
                let pin = e.file_name().to_string_lossy().into_owned();
                if pin.starts_with("sock_") && !pin.starts_with(&format!("sock_{cgroup_id}_")) {
                    unpin_link(&e.path());
                    tracing::info!(pin, "detached a socket program from a previous cgroup");
                }
            }
        }
        for name in proxy_common::SOCK_PROGRAMS {
            let pin = links.join(format!("sock_{cgroup_id}_{name}"));
            let prog: &mut CgroupSockAddr =
                self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
            if pin.exists() {
                match PinnedLink::from_pin(&pin) {
                    Ok(link) => {
                        let fd: FdLink = link.into();
                        match link_update(&fd, prog.fd()?.as_fd()) {
                            Ok(()) => {
                                // Dropping our fd leaves the pinned link attached.
                                tracing::info!(program = name, cgroup = %root.display(), "replaced socket program on pinned link");
                                continue;
                            }
                            Err(e) => tracing::warn!(program = name, error = %e, "pinned socket link is stale; attaching anew"),
                        }
                    }
                    Err(e) => tracing::warn!(program = name, error = %e, "unreadable socket link pin; attaching anew"),
                }
                let _ = fs::remove_file(&pin);
            }
            let id = prog
                // A cgroup bpf_link always coexists with other programs (multi);
                // the kernel refuses attach flags on links.
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", root.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
            tracing::info!(program = name, cgroup = %root.display(), mode = ?self.cfg.socket_lb, "socket program attached");
        }
        Ok(Some(root))
    }

    /// Removes the pinned links of interfaces that are gone (or were
    /// recreated: same name, new index). `present` maps index -> name.
    /// Returns the pins removed.
    pub fn prune_links(&self, present: &BTreeMap<u32, String>) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = fs::read_dir(self.cfg.pin_dir().join("links")) else { return removed };
        for e in entries.flatten() {
            let pin = e.file_name().to_string_lossy().into_owned();
            if parse_link_pin(&pin).is_none() {
                continue; // socket program links are not per interface
            }
            let keep = parse_link_pin(&pin)
                .is_some_and(|(index, name)| present.get(&index).is_some_and(|n| n.replace('.', "_") == name));
            if !keep {
                unpin_link(&e.path());
                removed.push(pin);
            }
        }
        removed
    }
}

/// Removes a link pin; dropping the last reference detaches the link.
fn unpin_link(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(p) => {
            let _ = p.unpin();
        }
        Err(_) => {
            let _ = fs::remove_file(path);
        }
    }
}

/// `BPF_LINK_UPDATE`: swaps the program behind `link` for `prog`.
fn link_update(link: &FdLink, prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // aya keeps the link's fd private; reopen the link by its id.
    let id = link.info().map_err(io::Error::other)?.id();
    let fd = link_fd_by_id(id)?;
    let mut attr = [0u8; 32];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: bpf(BPF_LINK_UPDATE) with a zeroed attribute of its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 29 /* BPF_LINK_UPDATE */, attr.as_ptr(), attr.len() as u32) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An fd for the link with `id` (`BPF_LINK_GET_FD_BY_ID`).
fn link_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: bpf(BPF_LINK_GET_FD_BY_ID) with a zeroed attribute of its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 30 /* BPF_LINK_GET_FD_BY_ID */, attr.as_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_NETNS_COOKIE) into a u64 on our own socket.
    let r = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, 71, (&raw mut v).cast(), &raw mut len) };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(v) }
}

/// The mount point of the cgroup v2 (unified) hierarchy; one is mounted at
/// `/run/kproxy/cgroup2` when there is none.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in mounts.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp.replace("\\040", " ")));
        }
    }
    let mp = PathBuf::from("/run/kproxy/cgroup2");
    fs::create_dir_all(&mp)?;
    let c = CString::new(mp.as_os_str().as_bytes())?;
    let fstype = CString::new("cgroup2")?;
    // SAFETY: plain mount(2) call with valid C strings.
    if unsafe { libc::mount(fstype.as_ptr(), c.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("no cgroup2 mount, and mounting one at {} failed; pass --cgroup-root", mp.display()));
    }
    tracing::info!(path = %mp.display(), "mounted cgroup2");
    Ok(mp)
}

/// Pin names of an interface's ingress and egress links. bpffs refuses
/// names with a dot; interface names may have one (VLANs).
fn link_pin_names(iface: &Iface) -> [String; 2] {
    let safe = iface.name.replace('.', "_");
    [format!("in_{}_{safe}", iface.index), format!("eg_{}_{safe}", iface.index)]
}

/// (index, name) of a link pin made by [`link_pin_names`].
fn parse_link_pin(pin: &str) -> Option<(u32, &str)> {
    let rest = ["in_", "eg_", "xn_", "xg_"].iter().find_map(|p| pin.strip_prefix(p))?;
    let (index, name) = rest.split_once('_')?;
    Some((index.parse().ok()?, name))
}

/// Creates and pins the agent's meta map unless it is pinned already.
fn ensure_meta(pin_dir: &Path) -> anyhow::Result<()> {
    let path = pin_dir.join(MAP_META);
    if path.exists() {
        return Ok(());
    }
    let meta: Array<MapData, u64> = Array::create(META_COUNT, 0).context("creating the meta map")?;
    meta.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct; failure only matters on pre-5.11 kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lim) };
}

fn open_pinned(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is the agent running?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The maps the agent writes, opened from their pins.
pub struct PinnedMaps {
    services: AyaHashMap<MapData, ServiceKey, ServiceValue>,
    backends: AyaHashMap<MapData, u32, Backend>,
    members: AyaHashMap<MapData, MemberKey, u32>,
    maglev: AyaHashMap<MapData, u32, MaglevTable>,
    vips: AyaHashMap<MapData, [u8; 16], VipValue>,
    meta: Array<MapData, u64>,
    ranges: LpmTrie<MapData, SrcRange, u32>,
    maglev_cap: Option<usize>,
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut maps = Self {
            services: AyaHashMap::try_from(open_pinned(pin_dir, MAP_SERVICES)?)?,
            backends: AyaHashMap::try_from(open_pinned(pin_dir, MAP_BACKENDS)?)?,
            members: AyaHashMap::try_from(open_pinned(pin_dir, MAP_MEMBERS)?)?,
            maglev: AyaHashMap::try_from(open_pinned(pin_dir, MAP_MAGLEV)?)?,
            vips: AyaHashMap::try_from(open_pinned(pin_dir, MAP_VIPS)?)?,
            meta: Array::try_from(open_pinned(pin_dir, MAP_META)?)?,
            ranges: LpmTrie::try_from(open_pinned(pin_dir, MAP_SRC_RANGES)?)?,
            maglev_cap: None,
        };
        maps.maglev_cap = maps.maglev.map().info().ok().map(|i| i.max_entries() as usize);
        Ok(maps)
    }
}

fn map_err(map: &'static str, e: aya::maps::MapError) -> MapError {
    if let aya::maps::MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return MapError::Full { map };
    }
    MapError::Io { map, source: io::Error::other(e.to_string()) }
}

/// Deleting an absent key is not an error.
fn removed(map: &'static str, r: Result<(), aya::maps::MapError>) -> Result<(), MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r.map_err(|e| map_err(map, e)),
    }
}

/// Every entry of a hash map: in batches, or one by one where the kernel
/// has no batch lookup.
fn read_all<K: Pod, V: Pod>(name: &'static str, map: &AyaHashMap<MapData, K, V>) -> Result<Vec<(K, V)>, MapError> {
    match crate::batch::lookup_all(map.map().fd().as_fd()) {
        Ok(v) => Ok(v),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */)) => {
            map.iter().map(|r| r.map_err(|e| map_err(name, e))).collect()
        }
        Err(e) => Err(MapError::Io { map: name, source: e }),
    }
}

/// A batch update's error as the engine sees it (E2BIG: the map is full).
fn batch_err(map: &'static str, e: io::Error) -> MapError {
    if e.raw_os_error() == Some(libc::E2BIG) { MapError::Full { map } } else { MapError::Io { map, source: e } }
}

fn put_batch<K: Pod, V: Pod>(name: &'static str, map: &AyaHashMap<MapData, K, V>, entries: Vec<(K, V)>) -> Result<(), MapError> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.into_iter().unzip();
    crate::batch::update(map.map().fd().as_fd(), &keys, &values).map_err(|(_, e)| batch_err(name, e))
}

fn del_batch<K: Pod, V: Pod>(name: &'static str, map: &AyaHashMap<MapData, K, V>, keys: Vec<K>) -> Result<(), MapError> {
    crate::batch::delete(map.map().fd().as_fd(), &keys).map_err(|e| batch_err(name, e))
}

impl MapOps for PinnedMaps {
    fn batches(&self) -> bool {
        true
    }
    fn maglev_capacity(&self) -> Option<usize> {
        self.maglev_cap
    }
    /// A batch per map and group (`BPF_MAP_UPDATE_BATCH`, `..._DELETE_BATCH`).
    fn apply_batch(&mut self, pending: Pending) -> Result<(), MapError> {
        for group in pending.groups {
            let Some(first) = group.first() else { continue };
            match first {
                Op::PutBackend(..) => put_batch(MAP_BACKENDS, &self.backends, group.into_iter().filter_map(|o| match o { Op::PutBackend(k, v) => Some((k, v)), _ => None }).collect())?,
                Op::PutVip(..) => put_batch(MAP_VIPS, &self.vips, group.into_iter().filter_map(|o| match o { Op::PutVip(k, v) => Some((k, v)), _ => None }).collect())?,
                Op::PutMember(..) => put_batch(MAP_MEMBERS, &self.members, group.into_iter().filter_map(|o| match o { Op::PutMember(k) => Some((k, 1u32)), _ => None }).collect())?,
                Op::PutMaglev(..) => put_batch(MAP_MAGLEV, &self.maglev, group.into_iter().filter_map(|o| match o { Op::PutMaglev(k, v) => Some((k, *v)), _ => None }).collect())?,
                Op::PutService(..) => put_batch(MAP_SERVICES, &self.services, group.into_iter().filter_map(|o| match o { Op::PutService(k, v) => Some((k, v)), _ => None }).collect())?,
                Op::DelService(..) => del_batch(MAP_SERVICES, &self.services, group.into_iter().filter_map(|o| match o { Op::DelService(k) => Some(k), _ => None }).collect())?,
                Op::DelMaglev(..) => del_batch(MAP_MAGLEV, &self.maglev, group.into_iter().filter_map(|o| match o { Op::DelMaglev(k) => Some(k), _ => None }).collect())?,
                Op::DelMember(..) => del_batch(MAP_MEMBERS, &self.members, group.into_iter().filter_map(|o| match o { Op::DelMember(k) => Some(k), _ => None }).collect())?,
                Op::DelBackend(..) => del_batch(MAP_BACKENDS, &self.backends, group.into_iter().filter_map(|o| match o { Op::DelBackend(k) => Some(k), _ => None }).collect())?,
                Op::DelVip(..) => del_batch(MAP_VIPS, &self.vips, group.into_iter().filter_map(|o| match o { Op::DelVip(k) => Some(k), _ => None }).collect())?,
            }
        }
        Ok(())
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        read_all(MAP_SERVICES, &self.services)
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        read_all(MAP_BACKENDS, &self.backends)
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value, 0).map_err(|e| map_err(MAP_SERVICES, e))
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        removed(MAP_SERVICES, self.services.remove(&key))
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend, 0).map_err(|e| map_err(MAP_BACKENDS, e))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        removed(MAP_BACKENDS, self.backends.remove(&id))
    }
    fn members(&self) -> Result<Vec<MemberKey>, MapError> {
        Ok(read_all(MAP_MEMBERS, &self.members)?.into_iter().map(|(k, _)| k).collect())
    }
    fn put_member(&mut self, key: MemberKey) -> Result<(), MapError> {
        self.members.insert(key, 1, 0).map_err(|e| map_err(MAP_MEMBERS, e))
    }
    fn del_member(&mut self, key: MemberKey) -> Result<(), MapError> {
        removed(MAP_MEMBERS, self.members.remove(&key))
    }
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        self.maglev.insert(svc_id, table, 0).map_err(|e| map_err(MAP_MAGLEV, e))
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), MapError> {
        removed(MAP_MAGLEV, self.maglev.remove(&svc_id))
    }
    fn vips(&self) -> Result<Vec<([u8; 16], VipValue)>, MapError> {
        read_all(MAP_VIPS, &self.vips)
    }
    fn put_vip(&mut self, addr: [u8; 16], value: VipValue) -> Result<(), MapError> {
        self.vips.insert(addr, value, 0).map_err(|e| map_err(MAP_VIPS, e))
    }
    fn del_vip(&mut self, addr: [u8; 16]) -> Result<(), MapError> {
        removed(MAP_VIPS, self.vips.remove(&addr))
    }
    fn meta(&self, slot: u32) -> Result<u64, MapError> {
        self.meta.get(&slot, 0).map_err(|e| map_err(MAP_META, e))
    }
    fn put_meta(&mut self, slot: u32, value: u64) -> Result<(), MapError> {
        self.meta.set(slot, value, 0).map_err(|e| map_err(MAP_META, e))
    }
    fn src_ranges(&self) -> Result<Vec<(u32, RangeEntry)>, MapError> {
        self.ranges
            .keys()
            .map(|r| {
                r.map(|k| {
                    let d = k.data();
                    (u32::from_be_bytes(d.svc_id), (d.addr, k.prefix_len()))
                })
                .map_err(|e| map_err(MAP_SRC_RANGES, e))
            })
            .collect()
    }
    fn put_src_range(&mut self, svc_id: u32, (addr, len): RangeEntry) -> Result<(), MapError> {
        let key = LpmKey::new(len, SrcRange { svc_id: svc_id.to_be_bytes(), addr });
        self.ranges.insert(&key, 1, 0).map_err(|e| map_err(MAP_SRC_RANGES, e))
    }
    fn del_src_range(&mut self, svc_id: u32, (addr, len): RangeEntry) -> Result<(), MapError> {
        let key = LpmKey::new(len, SrcRange { svc_id: svc_id.to_be_bytes(), addr });
        removed(MAP_SRC_RANGES, self.ranges.remove(&key))
    }
}

/// Datapath counters summed over CPUs, by name.
pub fn read_stats(pin_dir: &Path) -> anyhow::Result<Vec<(Stat, u64)>> {
    let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_pinned(pin_dir, MAP_STATS)?)?;
    let mut out = Vec::with_capacity(STAT_COUNT as usize);
    for stat in Stat::ALL {
        let v = arr.get(&(stat as u32), 0)?;
        out.push((stat, v.iter().sum()));
    }
    Ok(out)
}

/// Both conntrack maps, opened from their pins.
pub struct Conntrack {
    maps: [(&'static str, AyaHashMap<MapData, CtKey, CtValue>); 2],
    members: AyaHashMap<MapData, MemberKey, u32>,
    sock_rev: AyaHashMap<MapData, proxy_common::SockRevKey, proxy_common::SockRevValue>,
    snat: AyaHashMap<MapData, CtKey, CtKey>,
    /// SNAT entries without a live flow at the last pass: removed when
    /// still so at the next (the datapath claims the port just before it
    /// writes the flow).
    snat_suspects: std::collections::HashSet<(CtKey, CtKey)>,
}

/// What one collector pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries left in the TCP and the other map.
    pub tcp_entries: usize,
    pub other_entries: usize,
    /// Forward entries past their lifetime (removed with their reply entry).
    pub expired: usize,
    /// Non-TCP flows whose backend left their frontend.
    pub left_backend: usize,
    /// Reply entries without a forward entry.
    pub orphans: usize,
    /// Socket reverse entries of backends that left their frontend.
    pub sockets: usize,
    /// SNAT entries left, and removed (their flow is gone).
    pub snat_entries: usize,
    pub snat_collected: usize,
}

/// Reply entries younger than this are never orphans: the datapath writes
/// the reply entry just before the forward one.
const ORPHAN_GRACE_NS: u64 = 5_000_000_000;

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime with a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Conntrack {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            maps: [
                (MAP_CT_TCP, AyaHashMap::try_from(open_pinned(pin_dir, MAP_CT_TCP)?)?),
                (MAP_CT_ANY, AyaHashMap::try_from(open_pinned(pin_dir, MAP_CT_ANY)?)?),
            ],
            members: AyaHashMap::try_from(open_pinned(pin_dir, MAP_MEMBERS)?)?,
            sock_rev: AyaHashMap::try_from(open_pinned(pin_dir, proxy_common::MAP_SOCK_REV)?)?,
            snat: AyaHashMap::try_from(open_pinned(pin_dir, MAP_SNAT)?)?,
            snat_suspects: std::collections::HashSet::new(),
        })
    }

    /// SNAT entries whose flow is gone (no forward entry, expired, or one
    /// that no longer uses this port): removed once seen so at two passes
    /// in a row. Returns (entries left, removed).
    pub fn collect_snat(&mut self, now: u64) -> (usize, usize) {
        let all: Vec<(CtKey, CtKey)> = self.snat.iter().filter_map(Result::ok).collect();
        let live = |maps: &[(&'static str, AyaHashMap<MapData, CtKey, CtValue>); 2], skey: &CtKey, fkey: &CtKey| {
            let i = usize::from(fkey.proto != proxy_common::IPPROTO_TCP);
            maps[i].1.get(fkey, 0).is_ok_and(|f| {
                f.flags & proxy_common::CT_F_REPLY == 0
                    && f.snat_port == skey.dport
                    && now.saturating_sub(f.last_seen_ns) <= proxy_common::ct_lifetime_ns(fkey.proto, f.flags)
            })
        };
        // Suspects are (entry, the flow it pointed at): an entry the
        // datapath gave to another flow meanwhile is no suspect any more.
        let mut suspects = std::collections::HashSet::new();
        for (skey, fkey) in &all {
            if !live(&self.maps, skey, fkey) {
                suspects.insert((*skey, *fkey));
            }
        }
        let mut removed = 0;
        for (skey, fkey) in suspects.intersection(&self.snat_suspects) {
            // Still the same entry, still without a live flow, right now.
            if self.snat.get(skey, 0).ok() == Some(*fkey) && !live(&self.maps, skey, fkey) && self.snat.remove(skey).is_ok() {
                removed += 1;
            }
        }
        self.snat_suspects = suspects.into_iter().filter(|k| !self.snat_suspects.contains(k)).collect();
        (all.len() - removed, removed)
    }

    /// Socket reverse entries of backends that left their frontend (the
    /// socket LB's per-socket state): removed, counted.
    pub fn collect_sockets(&mut self) -> usize {
        let stale: Vec<proxy_common::SockRevKey> = self
            .sock_rev
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| self.members.get(&MemberKey { svc_id: v.svc_id, backend_id: v.backend_id }, 0).is_err())
            .map(|(k, _)| k)
            .collect();
        stale.iter().filter(|k| self.sock_rev.remove(k).is_ok()).count()
    }

    /// Every entry of both maps.
    #[must_use]
    pub fn entries(&self) -> Vec<(CtKey, CtValue)> {
        self.maps.iter().flat_map(|(_, m)| m.iter().filter_map(Result::ok)).collect()
    }

    /// Inserts an entry (tests, migrations).
    pub fn insert(&mut self, key: CtKey, value: CtValue) -> anyhow::Result<()> {
        let i = usize::from(key.proto != proxy_common::IPPROTO_TCP);
        Ok(self.maps[i].1.insert(key, value, 0)?)
    }

    /// One collector pass at `now` (monotonic ns): removes expired flows,
    /// non-TCP flows whose backend left their frontend (their next packet
    /// would choose again anyway), and reply entries whose forward entry is
    /// gone. Walks the maps outside the sync loop.
    pub fn collect(&mut self, now: u64) -> GcReport {
        let mut r = GcReport::default();
        for (i, (_, map)) in self.maps.iter_mut().enumerate() {
            let all: Vec<(CtKey, CtValue)> = map.iter().filter_map(Result::ok).collect();
            let forward: std::collections::HashSet<CtKey> =
                all.iter().filter(|(_, v)| v.flags & proxy_common::CT_F_REPLY == 0).map(|(k, _)| *k).collect();
            let mut doomed: Vec<CtKey> = Vec::new();
            for (k, v) in &all {
                if v.flags & proxy_common::CT_F_REPLY != 0 {
                    let fk = proxy_common::ct_forward_key_of_reply(k, v);
                    if !forward.contains(&fk) && now.saturating_sub(v.last_seen_ns) > ORPHAN_GRACE_NS {
                        doomed.push(*k);
                        r.orphans += 1;
                    }
                    continue;
                }
                let expired = now.saturating_sub(v.last_seen_ns) > proxy_common::ct_lifetime_ns(k.proto, v.flags);
                let left = !expired
                    && k.proto != proxy_common::IPPROTO_TCP
                    && self.members.get(&MemberKey { svc_id: v.svc_id, backend_id: v.backend_id }, 0).is_err();
                if expired || left {
                    doomed.push(*k);
                    doomed.push(proxy_common::ct_reply_key(k, v.nat_addr, v.nat_port, v.flags & proxy_common::CT_F_HAIRPIN != 0));
                    if expired {
                        r.expired += 1;
                    } else {
                        r.left_backend += 1;
                    }
                }
            }
            // The datapath may have rebuilt a flow on the same tuple while
            // we walked: delete only what is still exactly as seen.
            let snapshot: std::collections::HashMap<CtKey, CtValue> = all.iter().copied().collect();
            let mut gone = 0;
            for k in doomed {
                let unchanged = match (map.get(&k, 0), snapshot.get(&k)) {
                    (Ok(now_v), Some(seen)) => now_v == *seen,
                    _ => false,
                };
                let orphan_still = snapshot.get(&k).is_none_or(|v| {
                    v.flags & proxy_common::CT_F_REPLY == 0
                        || forward.contains(&proxy_common::ct_forward_key_of_reply(&k, v))
                        || map.get(&proxy_common::ct_forward_key_of_reply(&k, v), 0).is_err()
                });
                if unchanged && orphan_still && map.remove(&k).is_ok() {
                    gone += 1;
                }
            }
            let left = all.len().saturating_sub(gone);
            if i == 0 {
                r.tcp_entries = left;
            } else {
                r.other_entries = left;
            }
        }
        r.sockets = self.collect_sockets();
        (r.snat_entries, r.snat_collected) = self.collect_snat(now);
        r
    }
}

/// Every conntrack entry (forward and reply) of both maps.
pub fn conntrack_entries(pin_dir: &Path) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
    Ok(Conntrack::open(pin_dir)?.entries())
}

/// Detaches every pinned link and removes every pin under `pin_dir` (and
/// the frontend names file kept for it).
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    crate::inspect::remove_names(pin_dir);
    if !pin_dir.exists() {
        return Ok(());
    }
    let links = pin_dir.join("links");
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            unpin_link(&e.path());
        }
        let _ = fs::remove_dir(&links);
    }
    for entry in fs::read_dir(pin_dir)?.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(())
}

/// Whether interface `name` matches one of `patterns` (exact names, or a
/// prefix ending in `*`).
#[must_use]
pub fn matches_patterns(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}
