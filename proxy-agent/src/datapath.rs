//! Loading, pinning and attaching the eBPF datapath, and map access.
//!
//! Maps are pinned under `<bpffs>/<pin dir>/<map name>` and links under
//! `<pin dir>/links/in_<interface>` and `eg_<interface>`. A restarted agent opens the pinned maps
//! (keeping services, backends and conntrack) and atomically replaces the
//! program behind each pinned tcx link, so no packet meets a detached hook.
use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as AyaHashMap, Map, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use proxy_common::{
    ALL_MAPS, Backend, CtKey, CtValue, MAP_AFFINITY, MAP_BACKENDS, MAP_CT, MAP_SERVICES, MAP_STATS,
    PROG_TC_EGRESS, PROG_TC_INGRESS, STAT_COUNT, ServiceKey, ServiceValue, Stat,
};

use crate::sync::{MapError, MapOps};

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
    pub max_conntrack: u32,
    pub max_affinity: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            pin_dir_name: proxy_common::PIN_DIR_NAME.to_owned(),
            max_services: proxy_common::DEFAULT_MAX_SERVICE_ENTRIES,
            max_backends: proxy_common::DEFAULT_MAX_BACKENDS,
            max_conntrack: proxy_common::DEFAULT_MAX_CT,
            max_affinity: proxy_common::DEFAULT_MAX_AFFINITY,
        }
    }
}

impl DatapathConfig {
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(&self.pin_dir_name)
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

/// Loaded programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    cfg: DatapathConfig,
}

impl Datapath {
    /// Loads the object, adopting maps pinned by a previous agent.
    pub fn load(cfg: &DatapathConfig) -> anyhow::Result<Self> {
        ensure_bpffs(&cfg.bpffs)?;
        let pin_dir = cfg.pin_dir();
        fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        raise_memlock();
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(MAP_SERVICES, cfg.max_services)
            .map_max_entries(MAP_BACKENDS, cfg.max_backends)
            .map_max_entries(MAP_CT, cfg.max_conntrack)
            .map_max_entries(MAP_AFFINITY, cfg.max_affinity);
        let mut ebpf = loader.load(EBPF_OBJECT).context(
            "loading the eBPF object failed (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF); \
             if a pinned map has an incompatible layout, run `proxy-agent cleanup`",
        )?;
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the verifier rejected the TC program {name}"))?;
        }
        Ok(Self { ebpf, cfg: cfg.clone() })
    }

    fn program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        self.program_named(PROG_TC_INGRESS)
    }

    fn program_named(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?)
    }

    /// Runs the ingress program on `packet` with `BPF_PROG_TEST_RUN`.
    /// Returns the verdict, the output frame and the mean time per run.
    pub fn test_run(&mut self, packet: &[u8], repeat: u32) -> anyhow::Result<(i32, Vec<u8>, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let r = self.program()?.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value as i32, out, r.duration))
    }

    /// Attaches the ingress program to `iface` (in the calling thread's
    /// network namespace). With tcx the link is pinned, and a link pinned by
    /// a previous agent is updated in place, atomically.
    pub fn attach(&mut self, iface: &str) -> anyhow::Result<()> {
        // bpffs refuses names with a dot; interface names may have one (VLANs).
        let safe = iface.replace('.', "_");
        self.attach_one(iface, PROG_TC_INGRESS, TcAttachType::Ingress, format!("in_{safe}"))?;
        self.attach_one(iface, PROG_TC_EGRESS, TcAttachType::Egress, format!("eg_{safe}"))
    }

    fn attach_one(&mut self, iface: &str, name: &str, dir: TcAttachType, pin_name: String) -> anyhow::Result<()> {
        let link_pin = self.cfg.pin_dir().join("links").join(pin_name);
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let prog = self.program_named(name)?;
        if !tcx {
            // clsact + netlink filter: replace our own filter, keep others.
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                if !matches!(&e, tc::TcError::IoError(io) if io.kind() == io::ErrorKind::AlreadyExists) {
                    tracing::debug!(iface, error = %e, "clsact qdisc");
                }
            }
            let _ = tc::qdisc_detach_program(iface, dir, name);
            let id = prog
                .attach_with_options(iface, dir, TcAttachOptions::Netlink(Default::default()))
                .with_context(|| format!("attaching to {iface} via netlink"))?;
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
                            tracing::info!(iface, program = name, "replaced program on pinned tcx link");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::warn!(iface, error = %e, "pinned link is stale; attaching anew");
                        }
                    }
                }
                Err(e) => tracing::warn!(iface, error = %e, "unreadable link pin; attaching anew"),
            }
            let _ = fs::remove_file(&link_pin);
        }
        let id = prog
            .attach_with_options(iface, dir, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("attaching the TC program to interface {iface:?} (does it exist in this network namespace?)"))?;
        let link = prog.take_link(id)?;
        let fd_link: FdLink = link.try_into()?;
        fd_link.pin(&link_pin).with_context(|| format!("pinning link {}", link_pin.display()))?;
        tracing::info!(iface, program = name, "attached (tcx)");
        Ok(())
    }
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

/// The services and backends maps, opened from their pins.
pub struct PinnedMaps {
    services: AyaHashMap<MapData, ServiceKey, ServiceValue>,
    backends: AyaHashMap<MapData, u32, Backend>,
    ct: AyaHashMap<MapData, CtKey, CtValue>,
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: AyaHashMap::try_from(open_pinned(pin_dir, MAP_SERVICES)?)?,
            backends: AyaHashMap::try_from(open_pinned(pin_dir, MAP_BACKENDS)?)?,
            ct: AyaHashMap::try_from(open_pinned(pin_dir, MAP_CT)?)?,
        })
    }

    /// Deletes every conntrack entry (both directions) of flows to the given
    /// backends. kube-proxy does this for UDP endpoints that go away, so a
    /// client reusing its source port is not blackholed to a dead pod.
    pub fn flush_conntrack(&mut self, backend_ids: &std::collections::BTreeSet<u32>) -> usize {
        if backend_ids.is_empty() {
            return 0;
        }
        let stale: Vec<CtKey> = self
            .ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| backend_ids.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in stale {
            if self.ct.remove(&k).is_ok() {
                n += 1;
            }
        }
        n
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

impl MapOps for PinnedMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        self.services.iter().map(|r| r.map_err(|e| map_err(MAP_SERVICES, e))).collect()
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        self.backends.iter().map(|r| r.map_err(|e| map_err(MAP_BACKENDS, e))).collect()
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value, 0).map_err(|e| map_err(MAP_SERVICES, e))
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        match self.services.remove(&key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r.map_err(|e| map_err(MAP_SERVICES, e)),
        }
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend, 0).map_err(|e| map_err(MAP_BACKENDS, e))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        match self.backends.remove(&id) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r.map_err(|e| map_err(MAP_BACKENDS, e)),
        }
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

/// Number of conntrack entries (forward and reply), by walking the map.
pub fn conntrack_entries(pin_dir: &Path) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
    let ct: AyaHashMap<MapData, CtKey, CtValue> = AyaHashMap::try_from(open_pinned(pin_dir, MAP_CT)?)?;
    Ok(ct.iter().filter_map(Result::ok).collect())
}

/// Detaches every pinned link and removes every pin under `pin_dir`.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let links = pin_dir.join("links");
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            match PinnedLink::from_pin(e.path()) {
                Ok(p) => {
                    // Unpinning and dropping the last reference detaches it.
                    let _ = p.unpin();
                }
                Err(_) => {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&links);
    }
    for entry in fs::read_dir(pin_dir)?.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(())
}

/// Interfaces in the current network namespace whose names match one of
/// `patterns` (exact names, or a prefix ending in `*`).
pub fn matching_interfaces(patterns: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let dir = Path::new("/sys/class/net");
    // /sys/class/net reflects the netns sysfs was mounted in, which under
    // nsenter may be another one; if_nameindex asks the kernel directly.
    let names = if_names().or_else(|_| -> anyhow::Result<Vec<String>> {
        Ok(fs::read_dir(dir)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
    })?;
    for name in names {
        if patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => *p == name,
        }) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

fn if_names() -> anyhow::Result<Vec<String>> {
    // SAFETY: if_nameindex returns a NULL-terminated array we free below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        bail!("if_nameindex: {}", io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}
