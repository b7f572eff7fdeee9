//! `proxy-agent explain`: what the datapath does with one packet, and why.
//!
//! Builds a TCP SYN (or a UDP datagram) from a client to an address, runs
//! the real TC ingress program (the embedded object, loaded over the pinned
//! maps exactly as the agent loads it) on it with `BPF_PROG_TEST_RUN`, and
//! reads the answer from the verdict, the output packet and the per-CPU
//! counters of the CPU the run happened on. No packet is sent anywhere.
//!
//! The run is the real thing, so it writes what a real first packet would:
//! a conntrack entry pair and, for ClientIP affinity, an affinity entry.
//! Afterwards every such entry is put back as it was (removed when the run
//! created it, rewritten when the run refreshed it). The datapath counters
//! do count the synthetic packet.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{HashMap as AyaHashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use proxy_common::{
    ALL_MAPS, AffinityKey, AffinityValue, Backend, CT_F_HAIRPIN, CtKey, CtValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    MAP_AFFINITY, MAP_BACKENDS, MAP_CT_ANY, MAP_CT_TCP, MAP_SERVICES, MAP_STATS, PROG_TC_INGRESS, SCOPE_EXTERNAL,
    ServiceKey, ServiceValue, Stat, affinity_group, ct_reply_key, v4_mapped,
};
use serde::Serialize;

use crate::inspect::{Names, names_path, proto_name};

/// Client port when `--from` has none: above Linux's default ephemeral
/// range (32768-60999), so it does not meet a real connection's tuple.
pub const DEFAULT_CLIENT_PORT: u16 = 61_999;

/// TC verdicts the program returns.
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// A malformed `--from` or `--to`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("--from {0:?}: expected CLIENT_IP or CLIENT_IP:PORT (IPv4, e.g. 10.244.1.5:40000)")]
    From(String),
    #[error("--to {0:?}: expected ADDR:PORT/PROTO (IPv4, PROTO tcp or udp, e.g. 10.96.0.10:80/tcp)")]
    To(String),
}

/// Parses `--from`: an IPv4 address with an optional port.
pub fn parse_from(s: &str) -> Result<SocketAddrV4, ArgError> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(SocketAddrV4::new(ip, DEFAULT_CLIENT_PORT));
    }
    s.parse::<SocketAddrV4>().ok().filter(|a| a.port() != 0).ok_or_else(|| ArgError::From(s.to_owned()))
}

/// Parses `--to`: `ADDR:PORT/PROTO` (`/tcp` when the protocol is left out).
pub fn parse_to(s: &str) -> Result<(SocketAddrV4, u8), ArgError> {
    let err = || ArgError::To(s.to_owned());
    let (addr, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        _ => return Err(err()),
    };
    let addr: SocketAddrV4 = addr.parse().map_err(|_| err())?;
    if addr.port() == 0 {
        return Err(err());
    }
    Ok((addr, proto))
}

/// The Internet checksum of `data`, starting from the partial sum `init`.
fn checksum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet + IPv4 + TCP SYN (or UDP datagram) frame with valid
/// checksums, from `from` to `to`.
#[must_use]
pub fn packet(from: SocketAddrV4, to: SocketAddrV4, proto: u8) -> Vec<u8> {
    let payload: &[u8] = if proto == IPPROTO_TCP { b"" } else { b"kproxy-explain" };
    let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 } + payload.len();
    let (src, dst) = (from.ip().octets(), to.ip().octets());
    // Locally administered MACs; the program does not look at them.
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x6b, 0x70, 0x40, 0x00, 64, proto, 0, 0]); // id "kp", DF, TTL 64
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut l4 = Vec::with_capacity(l4_len);
    l4.extend_from_slice(&from.port().to_be_bytes());
    l4.extend_from_slice(&to.port().to_be_bytes());
    if proto == IPPROTO_TCP {
        // seq 1, ack 0, data offset 5, SYN, window 65535.
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let init = pseudo.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    let c = checksum(&l4, init);
    let off = if proto == IPPROTO_TCP { 16 } else { 6 };
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// The parts of the output frame explain reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutPacket {
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// ICMP type and code (ICMP only).
    pub icmp: Option<(u8, u8)>,
}

/// Parses an Ethernet + IPv4 frame (ports are 0 for ICMP).
#[must_use]
pub fn parse_frame(f: &[u8]) -> Option<OutPacket> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = f.get(14 + ihl..)?;
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let proto = f[23];
    let (sport, dport, icmp) = if proto == IPPROTO_ICMP {
        (0, 0, Some((*l4.first()?, *l4.get(1)?)))
    } else {
        let p = l4.get(..4)?;
        (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), None)
    };
    Some(OutPacket { proto, src: SocketAddrV4::new(ip(26), sport), dst: SocketAddrV4::new(ip(30), dport), icmp })
}

/// What happened to the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Destination rewritten to a backend; the packet continues.
    Translated,
    /// Translated back to the client itself (a pod through its own Service):
    /// sent back out of the interface it came in on.
    Hairpin,
    /// Answered with an ICMP port unreachable (the client sees ECONNREFUSED).
    Refused,
    /// Dropped.
    Dropped,
    /// Not for a Service: continues untouched.
    Passed,
}

impl Verdict {
    #[must_use]
    pub fn text(self) -> &'static str {
        match self {
            Verdict::Translated => "translated and continued",
            Verdict::Hairpin => "translated to the client itself (hairpin) and sent back",
            Verdict::Refused => "refused with ICMP port unreachable",
            Verdict::Dropped => "dropped",
            Verdict::Passed => "not a Service: passed untouched",
        }
    }
}

/// Why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A live conntrack entry of this exact flow decided.
    ExistingFlow,
    /// The client's ClientIP affinity.
    Affinity,
    /// The frontend's Maglev table (a consistent hash of the flow).
    Maglev,
    /// A random backend slot.
    Random,
    /// The Service has no usable endpoint.
    NoEndpoints,
    /// A ClusterIP on a port or protocol no Service port serves.
    UnknownPort,
    /// A Local traffic policy and no endpoint on this node.
    NoLocalEndpoints,
    /// The address is not a Service address.
    NotAService,
    /// The address is one of the node's, and no Service listens on this port.
    NodeAddressNotAService,
    ConntrackFull,
    BackendMissing,
    RewriteFailed,
    /// No counter this run moved explains the verdict.
    Unknown,
}

impl Reason {
    #[must_use]
    pub fn text(self) -> &'static str {
        match self {
            Reason::ExistingFlow => "an existing flow of this client address and port (conntrack); try another --from port for a new flow",
            Reason::Affinity => "ClientIP session affinity: the backend this client used before",
            Reason::Maglev => "consistent hash of the flow (Maglev table)",
            Reason::Random => "random choice among the backends",
            Reason::NoEndpoints => "the Service has no usable endpoint",
            Reason::UnknownPort => "a ClusterIP on a port or protocol none of its Services serves",
            Reason::NoLocalEndpoints => "Local traffic policy and no endpoint on this node",
            Reason::NotAService => "the destination is not a Service address",
            Reason::NodeAddressNotAService => "a node address, but no Service port (NodePort) on this port and protocol",
            Reason::ConntrackFull => "the conntrack map is full (new flows are dropped)",
            Reason::BackendMissing => "the chosen backend vanished mid-update",
            Reason::RewriteFailed => "a rewrite failed half-way",
            Reason::Unknown => "no datapath counter explains it (traffic on the same CPU may have blurred the counters)",
        }
    }
}

/// The verdict from the program's return code and output, and the reason
/// from the counters the run moved (only those that fit the verdict, so a
/// packet of other traffic counted on the same CPU cannot mislead).
#[must_use]
pub fn classify(rc: i32, to: SocketAddrV4, out: Option<&OutPacket>, moved: &[Stat], node_address: bool) -> (Verdict, Reason) {
    let has = |s: Stat| moved.contains(&s);
    let verdict = match rc {
        TC_ACT_SHOT => Verdict::Dropped,
        TC_ACT_REDIRECT if out.is_some_and(|o| o.proto == IPPROTO_ICMP) => Verdict::Refused,
        TC_ACT_REDIRECT => Verdict::Hairpin,
        _ if out.is_some_and(|o| o.dst != to) => Verdict::Translated,
        _ => Verdict::Passed,
    };
    let reason = match verdict {
        Verdict::Translated | Verdict::Hairpin => [
            (Stat::CtHit, Reason::ExistingFlow),
            (Stat::AffinityHit, Reason::Affinity),
            (Stat::SelectMaglev, Reason::Maglev),
            (Stat::SelectRandom, Reason::Random),
        ]
        .into_iter()
        .find(|(s, _)| has(*s)),
        Verdict::Refused => [(Stat::RejectNoBackend, Reason::NoEndpoints), (Stat::RejectUnknownPort, Reason::UnknownPort)]
            .into_iter()
            .find(|(s, _)| has(*s)),
        Verdict::Dropped => [
            (Stat::DropNoLocal, Reason::NoLocalEndpoints),
            (Stat::DropCtFull, Reason::ConntrackFull),
            (Stat::DropBackendMissing, Reason::BackendMissing),
            (Stat::DropMalformed, Reason::RewriteFailed),
        ]
        .into_iter()
        .find(|(s, _)| has(*s)),
        Verdict::Passed => has(Stat::PassNoService)
            .then_some((Stat::PassNoService, if node_address { Reason::NodeAddressNotAService } else { Reason::NotAService })),
    };
    (verdict, reason.map_or(Reason::Unknown, |(_, r)| r))
}

/// The backend a run chose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChosenBackend {
    /// Backend id (`None` when no backends-map entry has this address).
    pub id: Option<u32>,
    pub address: String,
}

/// What explain found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub interface: Option<String>,
    pub verdict: Verdict,
    pub verdict_text: &'static str,
    pub reason: Reason,
    pub reason_text: &'static str,
    /// `namespace/name:port` of the frontend, `?` when programmed but not
    /// named, `None` when no frontend matches.
    pub service: Option<String>,
    pub kind: Option<String>,
    /// For a refused unknown port: the Services on that ClusterIP.
    pub services_on_address: Vec<String>,
    pub backend: Option<ChosenBackend>,
    /// Counters the run moved on its CPU.
    pub counters: Vec<&'static str>,
    /// Conntrack entries the run created and explain removed.
    pub conntrack_removed: usize,
    /// Entries the run changed (an existing flow refreshed) and explain restored.
    pub conntrack_restored: usize,
    /// Whether an affinity entry was removed or restored.
    pub affinity_cleaned: bool,
}

/// A request.
#[derive(Clone, Debug)]
pub struct Request {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub proto: u8,
    /// Interface the packet is taken to arrive on (must exist in this
    /// network namespace); `None`: loopback.
    pub interface: Option<String>,
}

fn open_hash<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> anyhow::Result<AyaHashMap<MapData, K, V>> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening the pinned map {}", path.display()))?;
    Ok(AyaHashMap::try_from(aya::maps::Map::from_map_data(data)?)?)
}

/// Loads the embedded object over the pinned maps (every one must exist:
/// explain never creates a map) and the Ethernet TC ingress program.
fn load(pin_dir: &Path) -> anyhow::Result<Ebpf> {
    let missing: Vec<&str> = ALL_MAPS.iter().copied().filter(|m| !pin_dir.join(m).exists()).collect();
    if !missing.is_empty() {
        bail!(
            "no complete datapath pinned at {} (missing {}): start the agent (of this version) first, or pass the --bpffs and --pin-dir it runs with",
            pin_dir.display(),
            missing.join(", ")
        );
    }
    let mut loader = EbpfLoader::new();
    for m in ALL_MAPS {
        loader.map_pin_path(m, pin_dir.join(m));
    }
    let mut ebpf = loader
        .load(crate::datapath::EBPF_OBJECT)
        .context("loading the eBPF object over the pinned maps (needs root or CAP_BPF; run `proxy-agent cleanup` if a pinned map has an older layout)")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_TC_INGRESS)
        .ok_or_else(|| anyhow!("program {PROG_TC_INGRESS} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("the verifier rejected {PROG_TC_INGRESS}"))?;
    Ok(ebpf)
}

/// Pins the calling thread to the CPU it runs on; restores the old
/// affinity when dropped. Returns the CPU.
struct CpuPin(libc::cpu_set_t);

impl CpuPin {
    fn here() -> anyhow::Result<(Self, usize)> {
        // SAFETY: sched_* calls on the calling thread with valid cpu sets.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut old) != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
            }
            let cpu = usize::try_from(libc::sched_getcpu()).context("sched_getcpu")?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const one) != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
            }
            Ok((Self(old), cpu))
        }
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        // SAFETY: restoring the mask read in `here`.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const self.0) };
    }
}

fn cpu_counters(stats: &PerCpuArray<MapData, u64>, cpu: usize) -> anyhow::Result<Vec<u64>> {
    Stat::ALL
        .iter()
        .map(|s| Ok(stats.get(&(*s as u32), 0)?.get(cpu).copied().unwrap_or(0)))
        .collect()
}

/// Puts `key` back to `before` (removing it when it did not exist).
/// Returns (removed, restored).
fn put_back<K: Pod, V: Pod + PartialEq>(map: &mut AyaHashMap<MapData, K, V>, key: &K, before: Option<V>) -> (usize, usize) {
    let now = map.get(key, 0).ok();
    match (before, now) {
        (None, Some(_)) => (usize::from(map.remove(key).is_ok()), 0),
        (Some(b), Some(n)) if b != n => (0, usize::from(map.insert(key, b, 0).is_ok())),
        (Some(b), None) => (0, usize::from(map.insert(key, b, 0).is_ok())),
        _ => (0, 0),
    }
}

/// Runs the packet of `req` through the datapath pinned at `pin_dir`.
pub fn explain(pin_dir: &Path, req: &Request) -> anyhow::Result<Explanation> {
    let names = Names::load_or_warn(&names_path(pin_dir));
    let ifindex = match &req.interface {
        None => None,
        Some(name) => {
            let c = std::ffi::CString::new(name.as_str())?;
            // SAFETY: if_nametoindex with a valid C string.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if i == 0 {
                bail!("no interface {name:?} in this network namespace (run explain in the node's network namespace, e.g. with nsenter --net)");
            }
            Some(i)
        }
    };
    let mut ebpf = load(pin_dir)?;
    let services: AyaHashMap<MapData, ServiceKey, ServiceValue> = open_hash(pin_dir, MAP_SERVICES)?;
    let backends: AyaHashMap<MapData, u32, Backend> = open_hash(pin_dir, MAP_BACKENDS)?;
    let vips: AyaHashMap<MapData, [u8; 16], proxy_common::VipValue> = open_hash(pin_dir, proxy_common::MAP_VIPS)?;
    let mut ct: AyaHashMap<MapData, CtKey, CtValue> =
        open_hash(pin_dir, if req.proto == IPPROTO_TCP { MAP_CT_TCP } else { MAP_CT_ANY })?;
    let mut affinity: AyaHashMap<MapData, AffinityKey, AffinityValue> = open_hash(pin_dir, MAP_AFFINITY)?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::from_map_data(MapData::from_pin(pin_dir.join(MAP_STATS))?)?)?;

    let (client, to) = (v4_mapped(req.from.ip().octets()), v4_mapped(req.to.ip().octets()));
    let fkey = ServiceKey { addr: to, port: req.to.port(), proto: req.proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    let frontend = services.get(&fkey, 0).ok();
    let fwd = CtKey { saddr: client, daddr: to, sport: req.from.port(), dport: req.to.port(), proto: req.proto, _pad: [0; 3] };
    let reply_key = |v: &CtValue| ct_reply_key(&fwd, v.nat_addr, v.nat_port, v.flags & CT_F_HAIRPIN != 0);
    let fwd_before = ct.get(&fwd, 0).ok();
    let reply_before = fwd_before.map(|v| (reply_key(&v), ct.get(&reply_key(&v), 0).ok()));
    let akey = frontend.map(|v| AffinityKey { client, svc_id: affinity_group(&v) });
    let aff_before = akey.map(|k| affinity.get(&k, 0).ok());

    let frame = packet(req.from, req.to, req.proto);
    let mut out = vec![0u8; frame.len() + 256];
    // struct __sk_buff up to `ifindex`: ingress_ifindex at 36, ifindex at 40.
    let mut skb = [0u8; 48];
    if let Some(i) = ifindex {
        skb[36..40].copy_from_slice(&i.to_ne_bytes());
        skb[40..44].copy_from_slice(&i.to_ne_bytes());
    }
    let prog: &mut SchedClassifier = ebpf.program_mut(PROG_TC_INGRESS).ok_or_else(|| anyhow!("program missing"))?.try_into()?;
    let (rc, out_len, moved) = {
        let (_pin, cpu) = CpuPin::here()?;
        let before = cpu_counters(&stats, cpu)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.data_out = Some(&mut out);
        if ifindex.is_some() {
            opts.ctx_in = Some(&skb);
        }
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN of the TC ingress program")?;
        let after = cpu_counters(&stats, cpu)?;
        let moved: Vec<Stat> = Stat::ALL.iter().zip(before.iter().zip(&after)).filter(|(_, (b, a))| a > b).map(|(s, _)| *s).collect();
        (r.return_value as i32, r.data_size_out as usize, moved)
    };
    out.truncate(out_len);

    // Leave no trace: the flow's entries (and the client's affinity) as before.
    let fwd_after = ct.get(&fwd, 0).ok();
    let mut keys: Vec<(CtKey, Option<CtValue>)> = vec![(fwd, fwd_before)];
    if let Some((k, v)) = reply_before {
        keys.push((k, v));
    }
    if let Some(v) = fwd_after {
        let k = reply_key(&v);
        if !keys.iter().any(|(x, _)| *x == k) {
            keys.push((k, None));
        }
    }
    let (mut removed, mut restored) = (0, 0);
    for (k, before) in keys {
        let (r, s) = put_back(&mut ct, &k, before);
        removed += r;
        restored += s;
    }
    let affinity_cleaned = match (akey, aff_before) {
        (Some(k), Some(before)) => put_back(&mut affinity, &k, before) != (0, 0),
        _ => false,
    };

    let out_pkt = parse_frame(&out);
    let node_address = vips.get(&to, 0).is_ok_and(|v| v.flags & proxy_common::VIP_F_NODE != 0);
    let (verdict, reason) = classify(rc, req.to, out_pkt.as_ref(), &moved, node_address);
    let named = names.get(&to, req.to.port(), req.proto, SCOPE_EXTERNAL);
    let service = frontend.map(|_| named.map_or_else(|| "?".to_owned(), |n| n.owner.clone()));
    let backend = match (verdict, out_pkt) {
        (Verdict::Translated | Verdict::Hairpin, Some(o)) => {
            let id = fwd_after
                .filter(|v| v.nat_addr == v4_mapped(o.dst.ip().octets()) && v.nat_port == o.dst.port())
                .map(|v| v.backend_id)
                .or_else(|| {
                    backends.iter().filter_map(Result::ok).find_map(|(id, b)| {
                        (b.addr == v4_mapped(o.dst.ip().octets()) && b.port == o.dst.port() && b.proto == req.proto).then_some(id)
                    })
                });
            Some(ChosenBackend { id, address: o.dst.to_string() })
        }
        _ => None,
    };
    Ok(Explanation {
        from: req.from.to_string(),
        to: format!("{}/{}", req.to, proto_name(req.proto)),
        interface: req.interface.clone(),
        verdict,
        verdict_text: verdict.text(),
        reason,
        reason_text: reason.text(),
        service,
        kind: named.map(|n| n.kind.clone()),
        services_on_address: if reason == Reason::UnknownPort { names.owners_on(&to).into_iter().collect() } else { vec![] },
        backend,
        counters: moved.iter().map(|s| s.name()).collect(),
        conntrack_removed: removed,
        conntrack_restored: restored,
        affinity_cleaned,
    })
}

/// The human-readable report.
#[must_use]
pub fn render(e: &Explanation) -> String {
    let mut s = format!("packet:   {} -> {}", e.from, e.to);
    if let Some(i) = &e.interface {
        s += &format!(" arriving on {i}");
    }
    s += &format!("\nverdict:  {}\n", e.verdict_text);
    match &e.service {
        Some(svc) => s += &format!("service:  {svc}{}\n", e.kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default()),
        None if !e.services_on_address.is_empty() => {
            s += &format!("service:  none on this port; the address belongs to {}\n", e.services_on_address.join(", "));
        }
        None => s += "service:  none\n",
    }
    if let Some(b) = &e.backend {
        s += &format!("backend:  {}{}\n", b.address, b.id.map(|i| format!(" (#{i})")).unwrap_or_default());
    }
    s += &format!("why:      {}\n", e.reason_text);
    s += &format!("counters: {}\n", if e.counters.is_empty() { "-".to_owned() } else { e.counters.join(", ") });
    s += &format!(
        "cleanup:  {} conntrack entries removed, {} restored{}\n",
        e.conntrack_removed,
        e.conntrack_restored,
        if e.affinity_cleaned { ", affinity entry put back" } else { "" }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn from_and_to_parse() {
        assert_eq!(parse_from("10.0.0.5"), Ok(sa(&format!("10.0.0.5:{DEFAULT_CLIENT_PORT}"))));
        assert_eq!(parse_from("10.0.0.5:4000"), Ok(sa("10.0.0.5:4000")));
        for bad in ["", "10.0.0", "10.0.0.5:0", "10.0.0.5:x", "::1"] {
            assert!(parse_from(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_to("10.96.0.10:80/tcp"), Ok((sa("10.96.0.10:80"), IPPROTO_TCP)));
        assert_eq!(parse_to("10.96.0.10:53/UDP"), Ok((sa("10.96.0.10:53"), IPPROTO_UDP)));
        assert_eq!(parse_to("10.96.0.10:80"), Ok((sa("10.96.0.10:80"), IPPROTO_TCP)));
        for bad in ["10.96.0.10/tcp", "10.96.0.10:80/icmp", "10.96.0.10:0/tcp", "x:80/tcp"] {
            assert!(parse_to(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn packets_have_valid_checksums_and_parse_back() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let f = packet(sa("10.0.0.5:40000"), sa("10.96.0.10:80"), proto);
            assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header checksum");
            let l4 = &f[34..];
            let mut pseudo = f[26..34].to_vec();
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            let init = pseudo.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
            assert_eq!(checksum(l4, init), 0, "L4 checksum of proto {proto}");
            let p = parse_frame(&f).unwrap();
            assert_eq!((p.proto, p.src, p.dst, p.icmp), (proto, sa("10.0.0.5:40000"), sa("10.96.0.10:80"), None));
        }
        assert_eq!(packet(sa("1.1.1.1:1"), sa("2.2.2.2:2"), IPPROTO_TCP)[47], 0x02, "a SYN");
    }

    #[test]
    fn verdicts_and_reasons() {
        let to = sa("10.96.0.10:80");
        let tcp = |dst: &str| OutPacket { proto: IPPROTO_TCP, src: sa("10.0.0.5:40000"), dst: sa(dst), icmp: None };
        let icmp = OutPacket { proto: IPPROTO_ICMP, src: sa("10.96.0.10:0"), dst: sa("10.0.0.5:0"), icmp: Some((3, 3)) };
        let moved_to = tcp("10.1.0.2:8080");
        let same = tcp("10.96.0.10:80");
        use Stat::*;
        for (rc, out, moved, node, want) in [
            (-1, Some(&moved_to), vec![NewFlow, SelectMaglev], false, (Verdict::Translated, Reason::Maglev)),
            (-1, Some(&moved_to), vec![NewFlow, AffinityHit], false, (Verdict::Translated, Reason::Affinity)),
            (-1, Some(&moved_to), vec![NewFlow, SelectRandom], false, (Verdict::Translated, Reason::Random)),
            (-1, Some(&moved_to), vec![CtHit], false, (Verdict::Translated, Reason::ExistingFlow)),
            (7, Some(&moved_to), vec![NewFlow, SelectMaglev, Hairpin], false, (Verdict::Hairpin, Reason::Maglev)),
            (7, Some(&icmp), vec![RejectNoBackend], false, (Verdict::Refused, Reason::NoEndpoints)),
            (7, Some(&icmp), vec![RejectUnknownPort], false, (Verdict::Refused, Reason::UnknownPort)),
            (2, Some(&same), vec![DropNoLocal], false, (Verdict::Dropped, Reason::NoLocalEndpoints)),
            (2, Some(&same), vec![DropCtFull], false, (Verdict::Dropped, Reason::ConntrackFull)),
            (-1, Some(&same), vec![PassNoService], false, (Verdict::Passed, Reason::NotAService)),
            (-1, Some(&same), vec![PassNoService], true, (Verdict::Passed, Reason::NodeAddressNotAService)),
            // A counter of other traffic on the CPU that does not fit the verdict is ignored.
            (-1, Some(&same), vec![SelectMaglev], false, (Verdict::Passed, Reason::Unknown)),
            (2, Some(&same), vec![PassNoService], false, (Verdict::Dropped, Reason::Unknown)),
        ] {
            assert_eq!(classify(rc, to, out, &moved, node), want, "rc {rc} {moved:?}");
        }
    }
}
