//! `proxy-agent inspect`: the pinned maps as tables by Service name.
//!
//! The maps know frontends only by address, port and protocol; the names
//! come from a small file the agent writes beside them after each sync
//! ([`names_path`]: `/run/kproxy/<pin dir name>/frontends.json`), never from
//! the API server, so `inspect` works while the agent runs, after it
//! stopped, and on a node whose API server is unreachable. A frontend the
//! file does not name still shows, as `?`.
//!
//! Reading and rendering are split: [`Snapshot::read`] is the only I/O; the
//! views and tables are pure functions of a snapshot and the names.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap as AyaHashMap, Map, MapData},
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_HAIRPIN,
    CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SYN_SEEN, CtKey, CtValue, MAP_AFFINITY, MAP_BACKENDS, MAP_CT_ANY, MAP_CT_TCP,
    MAP_MEMBERS, MAP_SERVICES, MemberKey, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_DROP_EMPTY,
    SVC_F_MAGLEV, ServiceKey, ServiceValue, affinity_group, ct_reply_key, v4_of_mapped,
};
use serde::{Deserialize, Serialize};

use crate::translate::{Desired, FrontendKind};

/// Directory for the agent's runtime files; one subdirectory per pin
/// directory name, so agents (and tests) with their own pins have their own.
pub const RUN_DIR: &str = "/run/kproxy";
/// The frontend names file inside it.
pub const NAMES_FILE: &str = "frontends.json";
/// Version of the names file's layout.
pub const NAMES_VERSION: u32 = 1;

/// Errors of the names file.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("writing the frontend names file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading the frontend names file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the frontend names file {path} is not valid (remove it; the agent writes it again at its next sync): {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// The names file of the datapath pinned at `pin_dir`
/// (`<bpffs>/<name>` -> `/run/kproxy/<name>/frontends.json`).
#[must_use]
pub fn names_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.file_name().map_or_else(|| proxy_common::PIN_DIR_NAME.into(), |n| n.to_string_lossy().into_owned());
    Path::new(RUN_DIR).join(name).join(NAMES_FILE)
}

/// One frontend's names, as the file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub address: IpAddr,
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
    /// `external` or `internal` (the frontend's scope in the services map).
    pub scope: String,
    /// `namespace/name:port`.
    pub owner: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP`, `LoadBalancer`.
    pub kind: String,
    /// `ip:port` of each backend the sync programmed.
    pub backends: Vec<String>,
}

/// The names file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamesFile {
    pub version: u32,
    pub frontends: Vec<NameEntry>,
}

#[must_use]
pub fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "ExternalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        proxy_common::IPPROTO_TCP => "TCP".into(),
        proxy_common::IPPROTO_UDP => "UDP".into(),
        proxy_common::IPPROTO_SCTP => "SCTP".into(),
        proxy_common::IPPROTO_ICMP => "ICMP".into(),
        n => n.to_string(),
    }
}

fn proto_number(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Some(proxy_common::IPPROTO_TCP),
        "UDP" => Some(proxy_common::IPPROTO_UDP),
        "SCTP" => Some(proxy_common::IPPROTO_SCTP),
        _ => None,
    }
}

#[must_use]
pub fn scope_name(scope: u8) -> String {
    match scope {
        SCOPE_EXTERNAL => "external".into(),
        SCOPE_INTERNAL => "internal".into(),
        n => n.to_string(),
    }
}

fn scope_number(name: &str) -> Option<u8> {
    match name {
        "external" => Some(SCOPE_EXTERNAL),
        "internal" => Some(SCOPE_INTERNAL),
        n => n.parse().ok(),
    }
}

/// A 16-byte map address as an IP address (IPv4-mapped ones as IPv4).
#[must_use]
pub fn ip_of(addr: &[u8; 16]) -> IpAddr {
    match v4_of_mapped(addr) {
        Some(o) => IpAddr::V4(Ipv4Addr::from(o)),
        None => IpAddr::V6(Ipv6Addr::from(*addr)),
    }
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => proxy_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn endpoint(addr: &[u8; 16], port: u16) -> String {
    match ip_of(addr) {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The names of a sync's desired state (sorted as the frontends are).
#[must_use]
pub fn names_of(desired: &Desired) -> NamesFile {
    let frontends = desired
        .frontends
        .values()
        .map(|f| {
            let key = crate::sync::frontend_key(&f.addr);
            NameEntry {
                address: f.addr.ip,
                port: f.addr.port,
                protocol: proto_name(key.proto),
                scope: scope_name(key.scope),
                owner: f.owner.clone(),
                kind: kind_name(f.kind).into(),
                backends: f
                    .backends
                    .iter()
                    .map(|b| match b.ip {
                        IpAddr::V4(v4) => format!("{v4}:{}", b.port),
                        IpAddr::V6(v6) => format!("[{v6}]:{}", b.port),
                    })
                    .collect(),
            }
        })
        .collect();
    NamesFile { version: NAMES_VERSION, frontends }
}

/// Writes `names` to `path` atomically (a temporary file renamed over it),
/// unless the file already holds exactly this. Returns whether it wrote.
pub fn write_names(path: &Path, names: &NamesFile) -> Result<bool, NamesError> {
    let err = |source| NamesError::Write { path: path.to_owned(), source };
    let text = serde_json::to_string_pretty(names).map_err(|e| err(io::Error::other(e)))? + "\n";
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    fs::write(&tmp, text).map_err(err)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })?;
    Ok(true)
}

/// The agent's hook after a sync: writes the names file of `pin_dir`,
/// logging (never failing) when it cannot.
pub fn record_names(pin_dir: &Path, desired: &Desired) {
    let path = names_path(pin_dir);
    match write_names(&path, &names_of(desired)) {
        Ok(true) => tracing::debug!(path = %path.display(), "frontend names written"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "`proxy-agent inspect` will show frontends without names"),
    }
}

/// Removes the names file of `pin_dir` and its directory, and the run
/// directory when nothing else is left in it (`cleanup`).
pub fn remove_names(pin_dir: &Path) {
    let path = names_path(pin_dir);
    let _ = fs::remove_file(&path);
    for dir in path.ancestors().skip(1).take(2) {
        // Only empty directories go.
        let _ = fs::remove_dir(dir);
    }
}

/// Frontend names by map key, for lookups.
#[derive(Clone, Debug, Default)]
pub struct Names {
    by_key: HashMap<([u8; 16], u16, u8, u8), NameEntry>,
}

impl Names {
    /// Reads the names file; a missing file is an empty set of names.
    pub fn load(path: &Path) -> Result<Self, NamesError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(NamesError::Read { path: path.to_owned(), source }),
        };
        let file: NamesFile =
            serde_json::from_str(&text).map_err(|source| NamesError::Parse { path: path.to_owned(), source })?;
        Ok(Self::from_file(&file))
    }

    /// Reads the names file, or warns on stderr and goes on without names:
    /// inspect never fails because of the file.
    #[must_use]
    pub fn load_or_warn(path: &Path) -> Self {
        Self::load(path).unwrap_or_else(|e| {
            eprintln!("warning: {e}; frontends show without names");
            Self::default()
        })
    }

    #[must_use]
    pub fn from_file(file: &NamesFile) -> Self {
        let mut by_key = HashMap::new();
        for e in &file.frontends {
            let (Some(proto), Some(scope)) = (proto_number(&e.protocol), scope_number(&e.scope)) else { continue };
            by_key.insert((ip16(e.address), e.port, proto, scope), e.clone());
        }
        Self { by_key }
    }

    /// The names of frontend `key` (its scope first, then any scope).
    #[must_use]
    pub fn get(&self, addr: &[u8; 16], port: u16, proto: u8, scope: u8) -> Option<&NameEntry> {
        self.by_key
            .get(&(*addr, port, proto, scope))
            .or_else(|| [SCOPE_EXTERNAL, SCOPE_INTERNAL].iter().find_map(|s| self.by_key.get(&(*addr, port, proto, *s))))
    }

    /// Owners of every named frontend on `addr` (a ClusterIP's Services).
    #[must_use]
    pub fn owners_on(&self, addr: &[u8; 16]) -> BTreeSet<String> {
        self.by_key.iter().filter(|(k, _)| k.0 == *addr).map(|(_, e)| e.owner.clone()).collect()
    }
}

/// Everything inspect shows, read from the pinned maps at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Frontends (slot 0) and backend slots.
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeSet<MemberKey>,
    /// Forward and reply entries of both conntrack maps.
    pub conntrack: Vec<(CtKey, CtValue)>,
    pub affinity: Vec<(AffinityKey, AffinityValue)>,
    /// `CLOCK_MONOTONIC` when read (the datapath's clock).
    pub now_ns: u64,
}

fn open_hash<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> anyhow::Result<AyaHashMap<MapData, K, V>> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening the pinned map {} (no datapath pinned there: check --bpffs and --pin-dir, or start the agent)",
            path.display()
        )
    })?;
    Ok(AyaHashMap::try_from(Map::from_map_data(data)?)?)
}

fn entries<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> anyhow::Result<Vec<(K, V)>> {
    // Entries deleted while we walk are skipped, not errors.
    Ok(open_hash::<K, V>(pin_dir, name)?.iter().filter_map(Result::ok).collect())
}

impl Snapshot {
    /// Reads the pinned maps under `pin_dir` (read-only).
    pub fn read(pin_dir: &Path) -> anyhow::Result<Self> {
        if !pin_dir.is_dir() {
            anyhow::bail!(
                "no datapath pinned at {}: start the agent, or pass the --bpffs and --pin-dir it runs with",
                pin_dir.display()
            );
        }
        let mut conntrack = entries::<CtKey, CtValue>(pin_dir, MAP_CT_TCP)?;
        conntrack.extend(entries::<CtKey, CtValue>(pin_dir, MAP_CT_ANY)?);
        Ok(Self {
            services: entries(pin_dir, MAP_SERVICES)?,
            backends: entries(pin_dir, MAP_BACKENDS)?.into_iter().collect(),
            members: entries::<MemberKey, u32>(pin_dir, MAP_MEMBERS)?.into_iter().map(|(k, _)| k).collect(),
            conntrack,
            affinity: entries(pin_dir, MAP_AFFINITY)?,
            now_ns: crate::datapath::monotonic_ns(),
        })
    }

    fn frontends(&self) -> impl Iterator<Item = &(ServiceKey, ServiceValue)> {
        self.services.iter().filter(|(k, _)| k.slot == 0)
    }

    fn forward_flows(&self) -> impl Iterator<Item = &(CtKey, CtValue)> {
        self.conntrack.iter().filter(|(_, v)| v.flags & CT_F_REPLY == 0)
    }
}

/// A frontend's backend and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceBackend {
    pub id: u32,
    /// `ip:port`, or `?` when the id is missing from the backends map.
    pub address: String,
    /// In the frontend's slot list: new flows may pick it.
    pub in_slots: bool,
    /// In the membership map: its existing flows (and affinities) stay.
    pub member: bool,
    /// `active`, `draining` (member only), `slot-only` (not a member), or
    /// `missing` (no such backend).
    pub state: String,
}

/// One frontend, by Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// `namespace/name:port`, or `?` when the names file does not know it.
    pub service: String,
    pub kind: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub scope: String,
    pub svc_id: u32,
    /// `ok`, `no endpoints (refused)`, `no local endpoints (dropped)`.
    pub status: String,
    pub maglev: bool,
    pub affinity_timeout_s: Option<u32>,
    pub backends: Vec<ServiceBackend>,
    /// Forward conntrack entries of this frontend.
    pub flows: usize,
}

impl ServiceRow {
    #[must_use]
    pub fn frontend(&self) -> String {
        let ip = match self.address {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        format!("{ip}:{}/{}", self.port, self.protocol)
    }
}

/// The services view: every frontend with its name, backends and flows.
#[must_use]
pub fn services_view(snap: &Snapshot, names: &Names) -> Vec<ServiceRow> {
    let mut flows: HashMap<u32, usize> = HashMap::new();
    for (_, v) in snap.forward_flows() {
        *flows.entry(v.svc_id).or_default() += 1;
    }
    let slots: HashMap<ServiceKey, u32> = snap.services.iter().filter(|(k, _)| k.slot != 0).map(|(k, v)| (*k, v.backend_id)).collect();
    let mut rows: Vec<ServiceRow> = snap
        .frontends()
        .map(|(k, v)| {
            let name = names.get(&k.addr, k.port, k.proto, k.scope);
            let in_slots: BTreeSet<u32> =
                (1..=v.count).filter_map(|slot| slots.get(&ServiceKey::set_slot(v.svc_id, slot)).copied()).collect();
            let members: BTreeSet<u32> =
                snap.members.iter().filter(|m| m.svc_id == v.svc_id).map(|m| m.backend_id).collect();
            let backends = in_slots
                .union(&members)
                .map(|id| {
                    let (s, m) = (in_slots.contains(id), members.contains(id));
                    let b = snap.backends.get(id);
                    let state = match (b, s, m) {
                        (None, ..) => "missing",
                        (_, true, true) => "active",
                        (_, false, _) => "draining",
                        (_, true, false) => "slot-only",
                    };
                    ServiceBackend {
                        id: *id,
                        address: b.map_or_else(|| "?".into(), |b| endpoint(&b.addr, b.port)),
                        in_slots: s,
                        member: m,
                        state: state.into(),
                    }
                })
                .collect();
            let status = if v.count > 0 {
                "ok"
            } else if v.flags & SVC_F_DROP_EMPTY != 0 {
                "no local endpoints (dropped)"
            } else {
                "no endpoints (refused)"
            };
            ServiceRow {
                service: name.map_or_else(|| "?".into(), |n| n.owner.clone()),
                kind: name.map_or_else(|| "?".into(), |n| n.kind.clone()),
                address: ip_of(&k.addr),
                port: k.port,
                protocol: proto_name(k.proto),
                scope: scope_name(k.scope),
                svc_id: v.svc_id,
                status: status.into(),
                maglev: v.flags & SVC_F_MAGLEV != 0,
                affinity_timeout_s: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
                backends,
                flows: flows.get(&v.svc_id).copied().unwrap_or(0),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, a.address, a.port, &a.protocol, &a.scope).cmp(&(&b.service, b.address, b.port, &b.protocol, &b.scope)));
    rows
}

/// One backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Services whose frontends have it (slot or member), by name (`?` unnamed).
    pub services: Vec<String>,
    /// Forward conntrack entries going to it.
    pub flows: usize,
}

/// The backends view.
#[must_use]
pub fn backends_view(snap: &Snapshot, names: &Names) -> Vec<BackendRow> {
    let owner_of: HashMap<u32, String> = services_view(snap, names).into_iter().map(|r| (r.svc_id, r.service)).collect();
    let mut users: HashMap<u32, BTreeSet<String>> = HashMap::new();
    for (k, v) in snap.services.iter().filter(|(k, _)| k.slot != 0) {
        if let Some(set) = k.set_id().filter(|set| owner_of.contains_key(set)) {
            users.entry(v.backend_id).or_default().insert(owner_of[&set].clone());
        }
    }
    for m in &snap.members {
        users.entry(m.backend_id).or_default().insert(owner_of.get(&m.svc_id).cloned().unwrap_or_else(|| "?".into()));
    }
    let mut flows: HashMap<u32, usize> = HashMap::new();
    for (_, v) in snap.forward_flows() {
        *flows.entry(v.backend_id).or_default() += 1;
    }
    snap.backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            address: ip_of(&b.addr),
            port: b.port,
            protocol: proto_name(b.proto),
            services: users.remove(id).map(|s| s.into_iter().collect()).unwrap_or_default(),
            flows: flows.get(id).copied().unwrap_or(0),
        })
        .collect()
}

/// The names of a conntrack entry's state flags.
#[must_use]
pub fn ct_state(flags: u8) -> Vec<&'static str> {
    [
        (CT_F_REPLY, "REPLY"),
        (CT_F_SYN_SEEN, "SYN_SEEN"),
        (CT_F_SEEN_REPLY, "SEEN_REPLY"),
        (CT_F_ESTABLISHED, "ESTABLISHED"),
        (CT_F_FIN_FWD, "FIN_FWD"),
        (CT_F_FIN_REV, "FIN_REV"),
        (CT_F_CLOSING, "CLOSING"),
        (CT_F_HAIRPIN, "HAIRPIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, n)| n)
    .collect()
}

/// One flow (a forward conntrack entry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    /// `ip:port` of the client.
    pub client: String,
    /// `ip:port/PROTO` the client sent to.
    pub frontend: String,
    pub service: String,
    pub backend_id: u32,
    /// `ip:port` the flow is translated to.
    pub backend: String,
    pub state: Vec<&'static str>,
    /// Seconds since the flow's last packet.
    pub idle_s: u64,
    /// Past its lifetime (the collector removes it at its next pass).
    pub expired: bool,
    /// Whether its reply entry exists.
    pub reply_entry: bool,
}

/// The conntrack view: forward entries, newest first.
#[must_use]
pub fn conntrack_view(snap: &Snapshot, names: &Names) -> Vec<FlowRow> {
    let keys: BTreeSet<CtKeyOrd> = snap.conntrack.iter().map(|(k, _)| CtKeyOrd::of(k)).collect();
    let by_id: HashMap<u32, &ServiceKey> = snap.frontends().map(|(k, v)| (v.svc_id, k)).collect();
    let mut rows: Vec<(u64, FlowRow)> = snap
        .forward_flows()
        .map(|(k, v)| {
            let scope = by_id.get(&v.svc_id).map_or(SCOPE_EXTERNAL, |f| f.scope);
            let service = names.get(&k.daddr, k.dport, k.proto, scope).map_or_else(|| "?".into(), |n| n.owner.clone());
            let idle = snap.now_ns.saturating_sub(v.last_seen_ns);
            let rkey = ct_reply_key(k, v.nat_addr, v.nat_port, v.flags & CT_F_HAIRPIN != 0);
            (
                idle,
                FlowRow {
                    client: endpoint(&k.saddr, k.sport),
                    frontend: format!("{}/{}", endpoint(&k.daddr, k.dport), proto_name(k.proto)),
                    service,
                    backend_id: v.backend_id,
                    backend: endpoint(&v.nat_addr, v.nat_port),
                    state: ct_state(v.flags),
                    idle_s: idle / 1_000_000_000,
                    expired: idle > proxy_common::ct_lifetime_ns(k.proto, v.flags),
                    reply_entry: keys.contains(&CtKeyOrd::of(&rkey)),
                },
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.client.cmp(&b.1.client)));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// `CtKey` as an ordered tuple (the shared type is not `Ord`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct CtKeyOrd([u8; 16], [u8; 16], u16, u16, u8);

impl CtKeyOrd {
    fn of(k: &CtKey) -> Self {
        Self(k.saddr, k.daddr, k.sport, k.dport, k.proto)
    }
}

/// One ClientIP affinity entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AffinityRow {
    pub client: IpAddr,
    /// The Service port the affinity belongs to (every frontend of it
    /// shares it), `?` when unnamed.
    pub service: String,
    pub backend_id: u32,
    pub backend: String,
    /// Seconds since the client's last new flow.
    pub age_s: u64,
    pub timeout_s: Option<u32>,
    /// Older than the timeout: the next flow chooses again.
    pub expired: bool,
}

/// The affinity view.
#[must_use]
pub fn affinity_view(snap: &Snapshot, names: &Names) -> Vec<AffinityRow> {
    // The affinity key holds the Service port's group: find a frontend of it.
    let mut group: BTreeMap<u32, (String, u32)> = BTreeMap::new();
    let mut frontends: Vec<&(ServiceKey, ServiceValue)> = snap.frontends().collect();
    frontends.sort_by_key(|(k, _)| (k.scope, k.addr, k.port, k.proto));
    for (k, v) in frontends {
        let name = names.get(&k.addr, k.port, k.proto, k.scope).map(|n| n.owner.clone());
        let e = group.entry(affinity_group(v)).or_insert_with(|| ("?".into(), v.affinity_timeout_s));
        if e.0 == "?"
            && let Some(n) = name
        {
            e.0 = n;
        }
    }
    let mut rows: Vec<AffinityRow> = snap
        .affinity
        .iter()
        .map(|(k, v)| {
            let (service, timeout) = group.get(&k.svc_id).cloned().map_or(("?".to_owned(), None), |(s, t)| (s, Some(t)));
            let age = snap.now_ns.saturating_sub(v.last_used_ns);
            AffinityRow {
                client: ip_of(&k.client),
                service,
                backend_id: v.backend_id,
                backend: snap.backends.get(&v.backend_id).map_or_else(|| "?".into(), |b| endpoint(&b.addr, b.port)),
                age_s: age / 1_000_000_000,
                timeout_s: timeout,
                expired: timeout.is_some_and(|t| age >= u64::from(t) * 1_000_000_000),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, a.client).cmp(&(&b.service, b.client)));
    rows
}

/// Left-aligned columns separated by two spaces.
#[must_use]
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

#[must_use]
pub fn render_services(rows: &[ServiceRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let backends = if r.backends.is_empty() {
                "-".to_owned()
            } else {
                r.backends.iter().map(|b| format!("{} (#{} {})", b.address, b.id, b.state)).collect::<Vec<_>>().join(", ")
            };
            let mut lb = match (r.backends.is_empty(), r.maglev) {
                (true, _) => "-".to_owned(),
                (false, true) => "maglev".to_owned(),
                (false, false) => "random".to_owned(),
            };
            if let Some(t) = r.affinity_timeout_s {
                let _ = write!(lb, ", affinity {t}s");
            }
            vec![
                r.service.clone(),
                r.kind.clone(),
                r.frontend(),
                r.scope.clone(),
                r.status.clone(),
                lb,
                r.flows.to_string(),
                backends,
            ]
        })
        .collect();
    table(&["SERVICE", "KIND", "FRONTEND", "SCOPE", "STATUS", "SELECTION", "FLOWS", "BACKENDS"], &cells)
}

#[must_use]
pub fn render_backends(rows: &[BackendRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let addr = match r.address {
                IpAddr::V4(v4) => format!("{v4}:{}/{}", r.port, r.protocol),
                IpAddr::V6(v6) => format!("[{v6}]:{}/{}", r.port, r.protocol),
            };
            let services = if r.services.is_empty() { "-".to_owned() } else { r.services.join(", ") };
            vec![r.id.to_string(), addr, r.flows.to_string(), services]
        })
        .collect();
    table(&["ID", "BACKEND", "FLOWS", "SERVICES"], &cells)
}

#[must_use]
pub fn render_conntrack(rows: &[FlowRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut state = r.state.join(",");
            if state.is_empty() {
                state.push('-');
            }
            if r.expired {
                state.push_str(" (expired)");
            }
            if !r.reply_entry {
                state.push_str(" (no reply entry)");
            }
            vec![
                r.client.clone(),
                r.frontend.clone(),
                r.service.clone(),
                format!("{} (#{})", r.backend, r.backend_id),
                state,
                format!("{}s", r.idle_s),
            ]
        })
        .collect();
    table(&["CLIENT", "FRONTEND", "SERVICE", "BACKEND", "STATE", "IDLE"], &cells)
}

#[must_use]
pub fn render_affinity(rows: &[AffinityRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let timeout = r.timeout_s.map_or_else(|| "?".into(), |t| format!("{t}s"));
            let age = if r.expired { format!("{}s (expired)", r.age_s) } else { format!("{}s", r.age_s) };
            vec![r.client.to_string(), r.service.clone(), format!("{} (#{})", r.backend, r.backend_id), age, timeout]
        })
        .collect();
    table(&["CLIENT", "SERVICE", "BACKEND", "AGE", "TIMEOUT"], &cells)
}

/// What `inspect` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Conntrack,
    Affinity,
}

/// Output format of `inspect` and `explain`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

/// `proxy-agent inspect WHAT`: the text to print.
pub fn inspect(pin_dir: &Path, what: What, output: Output) -> anyhow::Result<String> {
    let snap = Snapshot::read(pin_dir)?;
    let names = Names::load_or_warn(&names_path(pin_dir));
    let json = |v: serde_json::Result<String>| v.map(|s| s + "\n").context("encoding JSON");
    Ok(match (what, output) {
        (What::Services, Output::Table) => render_services(&services_view(&snap, &names)),
        (What::Services, Output::Json) => json(serde_json::to_string_pretty(&services_view(&snap, &names)))?,
        (What::Backends, Output::Table) => render_backends(&backends_view(&snap, &names)),
        (What::Backends, Output::Json) => json(serde_json::to_string_pretty(&backends_view(&snap, &names)))?,
        (What::Conntrack, Output::Table) => {
            let rows = conntrack_view(&snap, &names);
            let replies = snap.conntrack.len() - snap.forward_flows().count();
            render_conntrack(&rows) + &format!("{} flows, {replies} reply entries\n", rows.len())
        }
        (What::Conntrack, Output::Json) => json(serde_json::to_string_pretty(&conntrack_view(&snap, &names)))?,
        (What::Affinity, Output::Table) => render_affinity(&affinity_view(&snap, &names)),
        (What::Affinity, Output::Json) => json(serde_json::to_string_pretty(&affinity_view(&snap, &names)))?,
    })
}

#[cfg(test)]
mod tests {
    use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, v4_mapped};

    use super::*;

    const VIP: [u8; 4] = [10, 96, 0, 10];
    const EMPTY: [u8; 4] = [10, 96, 0, 20];
    const B1: [u8; 4] = [10, 0, 0, 1];
    const B2: [u8; 4] = [10, 0, 0, 2];
    const CLIENT: [u8; 4] = [10, 1, 0, 5];
    const SEC: u64 = 1_000_000_000;

    fn key(addr: [u8; 4], port: u16, proto: u8, slot: u16) -> ServiceKey {
        ServiceKey { addr: v4_mapped(addr), port, proto, scope: 0, slot, _pad: 0 }
    }

    fn names() -> Names {
        let entry = |addr: [u8; 4], owner: &str| NameEntry {
            address: IpAddr::V4(Ipv4Addr::from(addr)),
            port: 80,
            protocol: "TCP".into(),
            scope: "external".into(),
            owner: owner.into(),
            kind: "ClusterIP".into(),
            backends: vec![],
        };
        Names::from_file(&NamesFile { version: 1, frontends: vec![entry(VIP, "default/web:http"), entry(EMPTY, "default/empty:80")] })
    }

    /// web (VIP:80/TCP, backends 1 and 2, 2 draining), empty (no
    /// backends), an unnamed UDP frontend; one flow to backend 1.
    fn snapshot() -> Snapshot {
        let fwd = CtKey { saddr: v4_mapped(CLIENT), daddr: v4_mapped(VIP), sport: 40000, dport: 80, proto: IPPROTO_TCP, _pad: [0; 3] };
        let fv = CtValue {
            nat_addr: v4_mapped(B1),
            nat_port: 8080,
            flags: CT_F_SYN_SEEN | CT_F_SEEN_REPLY | CT_F_ESTABLISHED,
            backend_id: 1,
            last_seen_ns: 95 * SEC,
            svc_id: 7,
            ..Default::default()
        };
        let rkey = ct_reply_key(&fwd, fv.nat_addr, fv.nat_port, false);
        let rv = CtValue { nat_addr: v4_mapped(VIP), nat_port: 80, flags: CT_F_REPLY, backend_id: 1, svc_id: 7, ..Default::default() };
        Snapshot {
            services: vec![
                (key(VIP, 80, IPPROTO_TCP, 0), ServiceValue { backend_id: 0, count: 1, flags: SVC_F_MAGLEV | SVC_F_AFFINITY, svc_id: 7, affinity_timeout_s: 60 }),
                (ServiceKey::set_slot(7, 1), ServiceValue { backend_id: 1, ..Default::default() }),
                (key(EMPTY, 80, IPPROTO_TCP, 0), ServiceValue { svc_id: 8, ..Default::default() }),
                (key(VIP, 53, IPPROTO_UDP, 0), ServiceValue { count: 1, svc_id: 9, ..Default::default() }),
                (ServiceKey::set_slot(9, 1), ServiceValue { backend_id: 3, ..Default::default() }),
            ],
            backends: [
                (1, Backend { addr: v4_mapped(B1), port: 8080, proto: IPPROTO_TCP, flags: 0 }),
                (2, Backend { addr: v4_mapped(B2), port: 8080, proto: IPPROTO_TCP, flags: 0 }),
            ]
            .into(),
            members: [MemberKey { svc_id: 7, backend_id: 1 }, MemberKey { svc_id: 7, backend_id: 2 }].into(),
            conntrack: vec![(fwd, fv), (rkey, rv)],
            affinity: vec![
                (AffinityKey { client: v4_mapped(CLIENT), svc_id: 7 }, AffinityValue { backend_id: 1, _pad: 0, last_used_ns: 90 * SEC }),
                (AffinityKey { client: v4_mapped([10, 1, 0, 6]), svc_id: 7 }, AffinityValue { backend_id: 1, _pad: 0, last_used_ns: 10 * SEC }),
            ],
            now_ns: 100 * SEC,
        }
    }

    #[test]
    fn services_are_named_with_backend_states_and_flows() {
        let rows = services_view(&snapshot(), &names());
        let got: Vec<(&str, String, &str, usize)> = rows.iter().map(|r| (r.service.as_str(), r.frontend(), r.status.as_str(), r.flows)).collect();
        assert_eq!(
            got,
            [
                ("?", "10.96.0.10:53/UDP".into(), "ok", 0),
                ("default/empty:80", "10.96.0.20:80/TCP".into(), "no endpoints (refused)", 0),
                ("default/web:http", "10.96.0.10:80/TCP".into(), "ok", 1),
            ]
        );
        let web = &rows[2];
        assert_eq!(web.kind, "ClusterIP");
        assert_eq!(web.affinity_timeout_s, Some(60));
        let states: Vec<(u32, &str, &str)> = web.backends.iter().map(|b| (b.id, b.address.as_str(), b.state.as_str())).collect();
        assert_eq!(states, [(1, "10.0.0.1:8080", "active"), (2, "10.0.0.2:8080", "draining")]);
        // Backend 3 is in a slot but neither a member nor a backend.
        assert_eq!(rows[0].backends[0].state, "missing");
        assert_eq!(rows[0].backends[0].address, "?");
        let table = render_services(&rows);
        assert!(table.starts_with("SERVICE"), "{table}");
        assert!(table.contains("default/web:http") && table.contains("10.0.0.2:8080 (#2 draining)"), "{table}");
    }

    #[test]
    fn backends_list_their_services_and_flows() {
        let rows = backends_view(&snapshot(), &names());
        let got: Vec<(u32, Vec<String>, usize)> = rows.iter().map(|r| (r.id, r.services.clone(), r.flows)).collect();
        assert_eq!(got, [(1, vec!["default/web:http".to_owned()], 1), (2, vec!["default/web:http".to_owned()], 0)]);
    }

    #[test]
    fn conntrack_shows_forward_flows_with_decoded_state() {
        let rows = conntrack_view(&snapshot(), &names());
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.client.as_str(), r.frontend.as_str(), r.service.as_str(), r.backend.as_str(), r.idle_s, r.reply_entry, r.expired),
            ("10.1.0.5:40000", "10.96.0.10:80/TCP", "default/web:http", "10.0.0.1:8080", 5, true, false)
        );
        assert_eq!(r.state, ["SYN_SEEN", "SEEN_REPLY", "ESTABLISHED"]);
    }

    #[test]
    fn state_flags_decode() {
        for (flags, want) in [
            (0, vec![]),
            (CT_F_SYN_SEEN, vec!["SYN_SEEN"]),
            (CT_F_SYN_SEEN | CT_F_FIN_FWD | CT_F_FIN_REV | CT_F_CLOSING, vec!["SYN_SEEN", "FIN_FWD", "FIN_REV", "CLOSING"]),
            (CT_F_REPLY | CT_F_HAIRPIN, vec!["REPLY", "HAIRPIN"]),
        ] {
            assert_eq!(ct_state(flags), want, "{flags:#x}");
        }
    }

    #[test]
    fn affinity_names_the_service_port_and_expiry() {
        let rows = affinity_view(&snapshot(), &names());
        let got: Vec<(String, &str, u64, bool)> = rows.iter().map(|r| (r.client.to_string(), r.service.as_str(), r.age_s, r.expired)).collect();
        assert_eq!(got, [("10.1.0.5".into(), "default/web:http", 10, false), ("10.1.0.6".into(), "default/web:http", 90, true)]);
    }

    #[test]
    fn names_file_round_trips_and_missing_is_empty() {
        let dir = std::env::temp_dir().join(format!("kproxy-names-{}", std::process::id()));
        let path = dir.join(NAMES_FILE);
        assert!(Names::load(&path).unwrap().by_key.is_empty());
        let file = NamesFile { version: 1, frontends: vec![names().by_key.values().next().unwrap().clone()] };
        assert!(write_names(&path, &file).unwrap());
        assert!(!write_names(&path, &file).unwrap(), "unchanged contents are not written again");
        assert_eq!(Names::load(&path).unwrap().by_key.len(), 1);
        fs::write(&path, "{").unwrap();
        assert!(matches!(Names::load(&path), Err(NamesError::Parse { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_path_follows_the_pin_dir_name() {
        assert_eq!(names_path(Path::new("/sys/fs/bpf/kproxy")), Path::new("/run/kproxy/kproxy/frontends.json"));
        assert_eq!(names_path(Path::new("/sys/fs/bpf/t-123")), Path::new("/run/kproxy/t-123/frontends.json"));
    }

    #[test]
    fn names_lookup_falls_back_to_any_scope() {
        let n = names();
        assert_eq!(n.get(&v4_mapped(VIP), 80, IPPROTO_TCP, SCOPE_INTERNAL).map(|e| e.owner.as_str()), Some("default/web:http"));
        assert!(n.get(&v4_mapped(VIP), 81, IPPROTO_TCP, SCOPE_EXTERNAL).is_none());
        assert_eq!(n.owners_on(&v4_mapped(VIP)).into_iter().collect::<Vec<_>>(), ["default/web:http"]);
    }
}
