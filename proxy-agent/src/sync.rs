//! Desired state -> map writes.
//!
//! The engine keeps a mirror of what the maps hold, diffs the desired state
//! against it and writes only the difference, in an order that never lets a
//! packet see a frontend with a partial or empty backend set:
//! 0. new service addresses are written before their frontends;
//! 1. new backends are written before any slot refers to them;
//! 2. a frontend's new members and slots (and its Maglev table) are written
//!    before its count (slot 0) grows, and its count shrinks before surplus
//!    slots and members are deleted;
//! 3. removed frontends lose slot 0 first, then their slots, table, members;
//! 4. backends no slot refers to any more are deleted last, then addresses
//!    no frontend uses.
//!
//! On start the mirror is read back from the (pinned) maps, so a restarted
//! agent adopts what its predecessor wrote and only fixes the difference.
//! Backend and frontend ids are never reused, across restarts too: the
//! next free id is reserved in the meta map before any id is handed out, so
//! a conntrack or affinity entry can never refer to a recycled id.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use proxy_common::{
    BACKEND_F_LOCAL, Backend, META_NEXT_BACKEND_ID, META_NEXT_SVC_ID, MaglevTable, MemberKey, SVC_F_AFFINITY,
    SVC_F_DROP_EMPTY, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, SVC_F_TWO_SCOPES, ServiceKey, ServiceValue, VipValue,
    src_range_prefix_v4, v4_mapped,
};

use std::net::IpAddr;

use crate::translate::{BackendAddr, Desired, Frontend, FrontendAddr};

/// A source range as the LPM map holds it: (IPv4-mapped prefix, prefix
/// length in bits of the whole key data, frontend id included).
pub type RangeEntry = ([u8; 16], u32);

/// Ids are reserved in blocks, so the meta map is written once per block.
const ID_BLOCK: u32 = 1024;

/// Largest number of backends one frontend can hold (slot index is u16).
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("map {map}: {source}")]
    Io { map: &'static str, source: std::io::Error },
    #[error("{count} backends exceed the limit of {limit} per frontend")]
    TooManyBackends { count: usize, limit: usize },
}

/// The map operations the engine needs; implemented over aya maps and, for
/// tests, over in-memory maps.
pub trait MapOps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    fn del_service(&mut self, key: ServiceKey) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError>;
    fn del_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn members(&self) -> Result<Vec<MemberKey>, MapError>;
    fn put_member(&mut self, key: MemberKey) -> Result<(), MapError>;
    fn del_member(&mut self, key: MemberKey) -> Result<(), MapError>;
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError>;
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), MapError>;
    fn vips(&self) -> Result<Vec<([u8; 16], VipValue)>, MapError>;
    fn put_vip(&mut self, addr: [u8; 16], value: VipValue) -> Result<(), MapError>;
    fn del_vip(&mut self, addr: [u8; 16]) -> Result<(), MapError>;
    fn meta(&self, slot: u32) -> Result<u64, MapError>;
    fn put_meta(&mut self, slot: u32, value: u64) -> Result<(), MapError>;
    /// Source ranges of every frontend: (frontend id, range).
    fn src_ranges(&self) -> Result<Vec<(u32, RangeEntry)>, MapError>;
    fn put_src_range(&mut self, svc_id: u32, range: RangeEntry) -> Result<(), MapError>;
    fn del_src_range(&mut self, svc_id: u32, range: RangeEntry) -> Result<(), MapError>;
}

/// What a frontend looks like in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Programmed {
    value: ServiceValue,
    /// `slots[i]` is the backend id at slot i+1 (whatever is in the map,
    /// which may be more than `value.count` mid-update).
    slots: Vec<u32>,
    /// Backend ids in the membership map for this frontend.
    members: BTreeSet<u32>,
    /// Backend ids the programmed Maglev table was computed from.
    maglev: Option<Vec<u32>>,
    /// Source ranges in the LPM map for this frontend.
    ranges: BTreeSet<RangeEntry>,
}

/// Outcome of one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Frontends that could not be (fully) programmed: owner and reason.
    pub failed: Vec<(String, String)>,
    /// Backends deleted by this sync (no frontend refers to them any more).
    pub removed_backends: Vec<(u32, Backend)>,
}

/// Monotonic ids reserved in the meta map ahead of use.
#[derive(Debug)]
struct IdAlloc {
    slot: u32,
    next: u32,
    reserved: u32,
}

impl IdAlloc {
    fn take<M: MapOps>(&mut self, maps: &mut M) -> Result<u32, MapError> {
        if self.next >= self.reserved {
            let reserved = self.next.saturating_add(ID_BLOCK);
            maps.put_meta(self.slot, u64::from(reserved))?;
            self.reserved = reserved;
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }
}

pub struct SyncEngine<M: MapOps> {
    maps: M,
    /// Maglev tables computed during the current sync, by backend set: the
    /// frontends of one Service port (ClusterIP, NodePorts, external IPs)
    /// share their set, and so their table.
    tables: HashMap<Vec<u32>, Box<MaglevTable>>,
    frontends: BTreeMap<ServiceKey, Programmed>,
    backend_ids: HashMap<Backend, u32>,
    backends: BTreeMap<u32, Backend>,
    vips: BTreeMap<[u8; 16], VipValue>,
    backend_alloc: IdAlloc,
    svc_alloc: IdAlloc,
    maglev: bool,
    /// Backend id -> number of programmed frontends whose slots or members
    /// name it; a backend lives while its count is above zero.
    refs: HashMap<u32, u32>,
    /// Backends whose count fell to zero (or that were never referenced):
    /// deleted at the end of the sync unless referenced again.
    unreferenced: BTreeSet<u32>,
    /// ClientIP affinity group per Service port (owner), shared by its
    /// frontends.
    groups: HashMap<String, u32>,
    /// Entries of the services map the mirror holds (frontends plus slots).
    entries: usize,
}

/// The backend ids a programmed frontend refers to (slots and members).
fn referenced(p: &Programmed) -> BTreeSet<u32> {
    p.slots.iter().chain(p.members.iter()).copied().collect()
}

/// The map key of a frontend (slot 0).
#[must_use]
pub fn frontend_key(addr: &FrontendAddr) -> ServiceKey {
    ServiceKey {
        addr: ip16(addr.ip),
        port: addr.port,
        proto: addr.proto.number(),
        scope: addr.scope.number(),
        slot: 0,
        _pad: 0,
    }
}

/// The LPM entries of a frontend's source ranges.
fn range_entries(fe: &Frontend) -> BTreeSet<RangeEntry> {
    fe.source_ranges
        .iter()
        .flatten()
        .map(|r| (v4_mapped(r.ip.octets()), src_range_prefix_v4(r.len)))
        .collect()
}

fn ip16(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

fn backend_value(b: &BackendAddr, proto: u8) -> Backend {
    Backend { addr: ip16(b.ip), port: b.port, proto, flags: if b.local { BACKEND_F_LOCAL } else { 0 } }
}

/// What the maps hold, as the engine mirrors it.
struct State {
    frontends: BTreeMap<ServiceKey, Programmed>,
    backends: BTreeMap<u32, Backend>,
    vips: BTreeMap<[u8; 16], VipValue>,
    orphans: Vec<ServiceKey>,
    stale_members: Vec<MemberKey>,
    stale_ranges: Vec<(u32, RangeEntry)>,
    max_svc_id: u32,
    max_backend_id: u32,
}

fn read_state<M: MapOps>(maps: &M) -> Result<State, MapError> {
    let mut frontends: BTreeMap<ServiceKey, Programmed> = BTreeMap::new();
    let mut slot_entries: Vec<(ServiceKey, ServiceValue)> = Vec::new();
    let mut max_svc_id = 0;
    for (k, v) in maps.services()? {
        if k.slot == 0 {
            // Slot 0's backend_id is its affinity group, from the same ids.
            max_svc_id = max_svc_id.max(v.svc_id).max(v.backend_id);
            frontends.entry(k).or_default().value = v;
        } else {
            slot_entries.push((k, v));
        }
    }
    slot_entries.sort_by_key(|(k, _)| k.slot);
    let mut orphans = Vec::new();
    for (k, v) in slot_entries {
        let fk = ServiceKey { slot: 0, ..k };
        match frontends.get_mut(&fk) {
            Some(p) if p.slots.len() + 1 == usize::from(k.slot) => p.slots.push(v.backend_id),
            _ => orphans.push(k),
        }
    }
    let by_svc: HashMap<u32, ServiceKey> = frontends.iter().map(|(k, p)| (p.value.svc_id, *k)).collect();
    let mut stale_members = Vec::new();
    let mut stale_ranges = Vec::new();
    for m in maps.members()? {
        match by_svc.get(&m.svc_id).and_then(|k| frontends.get_mut(k)) {
            Some(p) => {
                p.members.insert(m.backend_id);
            }
            None => stale_members.push(m),
        }
    }
    for (svc_id, range) in maps.src_ranges()? {
        if let Some(p) = by_svc.get(&svc_id).and_then(|k| frontends.get_mut(k)) {
            p.ranges.insert(range);
        } else {
            stale_ranges.push((svc_id, range));
        }
    }
    for p in frontends.values_mut() {
        // A table is trusted only if the frontend says it has one; it is
        // recomputed on the first sync anyway (the ids are unknown here).
        p.maglev = (p.value.flags & SVC_F_MAGLEV != 0).then(Vec::new);
    }
    let backends: BTreeMap<u32, Backend> = maps.backends()?.into_iter().collect();
    let max_backend_id = backends.keys().next_back().copied().unwrap_or(0);
    let vips = maps.vips()?.into_iter().collect();
    Ok(State { frontends, backends, vips, orphans, stale_members, stale_ranges, max_svc_id, max_backend_id })
}

impl<M: MapOps> SyncEngine<M> {
    /// Reads the current map contents into the mirror.
    pub fn adopt(maps: M) -> Result<Self, MapError> {
        let st = read_state(&maps)?;
        let alloc = |slot: u32, max_seen: u32, maps: &M| -> Result<IdAlloc, MapError> {
            let reserved = u32::try_from(maps.meta(slot)?).unwrap_or(u32::MAX);
            let next = reserved.max(max_seen + 1).max(1);
            Ok(IdAlloc { slot, next, reserved: 0 })
        };
        let backend_alloc = alloc(META_NEXT_BACKEND_ID, st.max_backend_id, &maps)?;
        let svc_alloc = alloc(META_NEXT_SVC_ID, st.max_svc_id, &maps)?;
        let mut engine = SyncEngine {
            maps,
            tables: HashMap::new(),
            frontends: BTreeMap::new(),
            backend_ids: HashMap::new(),
            backends: BTreeMap::new(),
            vips: BTreeMap::new(),
            backend_alloc,
            svc_alloc,
            maglev: true,
            refs: HashMap::new(),
            unreferenced: BTreeSet::new(),
            groups: HashMap::new(),
            entries: 0,
        };
        engine.install(st)?;
        Ok(engine)
    }

    /// Re-reads the mirror from the maps (a periodic full resync): the next
    /// [`SyncEngine::sync`] then repairs whatever changed behind the agent's
    /// back (an entry deleted or rewritten by hand, a write that was lost).
    /// Maglev tables are trusted where the frontend is as the mirror had it.
    pub fn reload(&mut self) -> Result<(), MapError> {
        let mut st = read_state(&self.maps)?;
        for (k, p) in &mut st.frontends {
            if let Some(old) = self.frontends.get(k)
                && old.value == p.value
                && old.slots == p.slots
            {
                p.maglev.clone_from(&old.maglev);
            }
        }
        self.backend_alloc.next = self.backend_alloc.next.max(st.max_backend_id + 1);
        self.svc_alloc.next = self.svc_alloc.next.max(st.max_svc_id + 1);
        self.install(st)
    }

    fn install(&mut self, st: State) -> Result<(), MapError> {
        self.frontends = st.frontends;
        self.backend_ids = st.backends.iter().map(|(id, b)| (*b, *id)).collect();
        self.backends = st.backends;
        self.vips = st.vips;
        self.refs.clear();
        for p in self.frontends.values() {
            for id in referenced(p) {
                *self.refs.entry(id).or_default() += 1;
            }
        }
        self.unreferenced = self.backends.keys().filter(|id| !self.refs.contains_key(id)).copied().collect();
        self.entries = self.frontends.values().map(|p| 1 + p.slots.len()).sum();
        // Slots with no frontend or a gap before them, and members of no
        // frontend, are leftovers of an interrupted write; nothing reaches them.
        for k in st.orphans {
            self.maps.del_service(k)?;
        }
        for m in st.stale_members {
            self.maps.del_member(m)?;
        }
        for (svc_id, r) in st.stale_ranges {
            self.maps.del_src_range(svc_id, r)?;
        }
        Ok(())
    }

    /// Chooses backends by Maglev tables (`true`, the default) or at random.
    pub fn set_maglev(&mut self, on: bool) {
        self.maglev = on;
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Entries the services map holds (frontends plus their slots).
    #[must_use]
    pub fn service_entries(&self) -> usize {
        self.entries
    }

    /// Number of programmed frontends and backends.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Brings the maps to `desired`, writing only the difference (the full
    /// diff: every frontend is compared with the mirror).
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted: BTreeMap<ServiceKey, &Frontend> =
            desired.frontends.values().map(|f| (frontend_key(&f.addr), f)).collect();
        let wanted_vips: BTreeMap<[u8; 16], VipValue> =
            desired.vips.iter().map(|(ip, flags)| (ip16(*ip), VipValue { flags: *flags, _pad: 0 })).collect();
        // Service addresses first: a frontend is only looked up once its
        // address is known to be a Service's.
        for (addr, v) in &wanted_vips {
            self.put_vip(*addr, *v, &mut report);
        }
        // Removals first: they free map space the additions may need.
        let stale: Vec<ServiceKey> =
            self.frontends.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in stale {
            if let Err(e) = self.remove_frontend(key, &mut report) {
                report.failed.push((format!("{key:?}"), e.to_string()));
            }
        }
        let wanted_backends: std::collections::HashSet<Backend> = wanted
            .iter()
            .flat_map(|(k, fe)| fe.backends.iter().map(|b| backend_value(b, k.proto)))
            .collect();
        self.delete_unused_backends(|b| wanted_backends.contains(b), &mut report);
        // ClientIP affinity is per Service port: one group id shared by the
        // port's frontends, kept from what is programmed when possible.
        // A programmed group is kept only by the owner it was given to (a
        // frontend address may have changed hands), and by one owner only.
        let prev: HashMap<u32, String> = self.groups.drain().map(|(o, g)| (g, o)).collect();
        let mut taken: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for (key, fe) in &wanted {
            if fe.affinity_timeout_s.is_some()
                && !self.groups.contains_key(&fe.owner)
                && let Some(p) = self.frontends.get(key)
                && p.value.backend_id != 0
                && prev.get(&p.value.backend_id).is_none_or(|o| *o == fe.owner)
                && taken.insert(p.value.backend_id)
            {
                self.groups.insert(fe.owner.clone(), p.value.backend_id);
            }
        }
        // Frontends: add or update, a Service port's frontends together, so
        // its Maglev table is computed once and only a few are held.
        let mut order: Vec<(&ServiceKey, &&Frontend)> = wanted.iter().collect();
        order.sort_by(|a, b| a.1.owner.cmp(&b.1.owner).then(a.0.cmp(b.0)));
        for (key, fe) in order {
            self.add_or_update(*key, fe, &mut report);
        }
        // Backends nothing refers to any more (after the updates).
        self.delete_unused_backends(|_| false, &mut report);
        // Addresses no frontend uses any more.
        let gone: Vec<[u8; 16]> = self.vips.keys().filter(|a| !wanted_vips.contains_key(*a)).copied().collect();
        for addr in gone {
            self.del_vip_if_unused(addr, &mut report);
        }
        self.tables.clear();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report
    }

    /// Applies the changes of some frontends and Service addresses (the
    /// incremental path): `frontends` pairs an address with its desired
    /// frontend, `None` to remove it; `vips` an address with its flags,
    /// `None` to remove it. Nothing else is looked at: backends are freed by
    /// reference count, not by a scan. Same write order as [`SyncEngine::sync`].
    pub fn sync_changes(&mut self, frontends: &[(FrontendAddr, Option<&Frontend>)], vips: &[(IpAddr, Option<u32>)]) -> SyncReport {
        let mut report = SyncReport::default();
        for (ip, flags) in vips {
            if let Some(f) = flags {
                self.put_vip(ip16(*ip), VipValue { flags: *f, _pad: 0 }, &mut report);
            }
        }
        for (addr, fe) in frontends {
            if fe.is_none() {
                let key = frontend_key(addr);
                if let Err(e) = self.remove_frontend(key, &mut report) {
                    report.failed.push((format!("{key:?}"), e.to_string()));
                }
            }
        }
        let wanted_backends: std::collections::HashSet<Backend> = frontends
            .iter()
            .filter_map(|(a, fe)| Some((a, (*fe)?)))
            .flat_map(|(a, fe)| fe.backends.iter().map(|b| backend_value(b, a.proto.number())))
            .collect();
        self.delete_unused_backends(|b| wanted_backends.contains(b), &mut report);
        for (addr, fe) in frontends {
            if let Some(fe) = fe {
                self.add_or_update(frontend_key(addr), fe, &mut report);
            }
        }
        self.delete_unused_backends(|_| false, &mut report);
        for (ip, flags) in vips {
            if flags.is_none() {
                self.del_vip_if_unused(ip16(*ip), &mut report);
            }
        }
        self.tables.clear();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report
    }

    fn put_vip(&mut self, addr: [u8; 16], v: VipValue, report: &mut SyncReport) {
        if self.vips.get(&addr) == Some(&v) {
            return;
        }
        match self.maps.put_vip(addr, v) {
            Ok(()) => {
                report.writes += 1;
                self.vips.insert(addr, v);
            }
            Err(e) => report.failed.push((format!("service address {addr:?}"), e.to_string())),
        }
    }

    /// Deletes a Service address unless a programmed frontend still uses it.
    fn del_vip_if_unused(&mut self, addr: [u8; 16], report: &mut SyncReport) {
        if !self.vips.contains_key(&addr) {
            return;
        }
        let lo = ServiceKey { addr, port: 0, proto: 0, scope: 0, slot: 0, _pad: 0 };
        let hi = ServiceKey { addr, port: u16::MAX, proto: u8::MAX, scope: u8::MAX, slot: u16::MAX, _pad: u16::MAX };
        if self.frontends.range(lo..=hi).next().is_some() {
            return;
        }
        match self.maps.del_vip(addr) {
            Ok(()) => {
                report.deletes += 1;
                self.vips.remove(&addr);
            }
            Err(e) => report.failed.push((format!("service address {addr:?}"), e.to_string())),
        }
    }

    /// Programs one frontend, with its Service port's affinity group.
    fn add_or_update(&mut self, key: ServiceKey, fe: &Frontend, report: &mut SyncReport) {
        let group = if fe.affinity_timeout_s.is_some() {
            match self.groups.get(fe.owner.as_str()).copied() {
                Some(g) => g,
                None => match self.svc_alloc.take(&mut self.maps) {
                    Ok(g) => g,
                    Err(e) => {
                        report.failed.push((fe.owner.clone(), e.to_string()));
                        return;
                    }
                },
            }
        } else {
            0
        };
        if group != 0 {
            self.groups.insert(fe.owner.clone(), group);
        }
        if let Err(e) = self.sync_frontend(key, fe, group, report) {
            report.failed.push((fe.owner.clone(), e.to_string()));
        }
    }

    /// Deletes backends no programmed slot refers to, except those `keep`
    /// says a frontend about to be written wants.
    fn delete_unused_backends(&mut self, keep: impl Fn(&Backend) -> bool, report: &mut SyncReport) {
        let unused: Vec<u32> = std::mem::take(&mut self.unreferenced)
            .into_iter()
            .filter(|id| !self.refs.contains_key(id))
            .collect();
        for id in unused {
            let Some(b) = self.backends.get(&id) else { continue };
            if keep(b) {
                self.unreferenced.insert(id);
                continue;
            }
            match self.maps.del_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    if let Some(b) = self.backends.remove(&id) {
                        self.backend_ids.remove(&b);
                        report.removed_backends.push((id, b));
                    }
                }
                Err(e) => {
                    self.unreferenced.insert(id);
                    report.failed.push((format!("backend {id}"), e.to_string()));
                }
            }
        }
    }

    fn backend_id(&mut self, b: Backend, report: &mut SyncReport) -> Result<u32, MapError> {
        if let Some(id) = self.backend_ids.get(&b) {
            return Ok(*id);
        }
        let id = self.backend_alloc.take(&mut self.maps)?;
        self.unreferenced.insert(id);
        self.maps.put_backend(id, b)?;
        report.writes += 1;
        self.backends.insert(id, b);
        self.backend_ids.insert(b, id);
        Ok(id)
    }

    fn sync_frontend(&mut self, key: ServiceKey, fe: &Frontend, affinity_group: u32, report: &mut SyncReport) -> Result<(), MapError> {
        if fe.backends.len() > MAX_BACKENDS_PER_FRONTEND {
            return Err(MapError::TooManyBackends { count: fe.backends.len(), limit: MAX_BACKENDS_PER_FRONTEND });
        }
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            ids.push(self.backend_id(backend_value(b, key.proto), report)?);
        }
        let current = self.frontends.get(&key);
        let svc_id = match current {
            Some(p) if p.value.svc_id != 0 => p.value.svc_id,
            _ => self.svc_alloc.take(&mut self.maps)?,
        };
        let want_maglev = self.maglev && !ids.is_empty();
        let ranges = range_entries(fe);
        let mut value = ServiceValue {
            backend_id: affinity_group,
            count: ids.len() as u16,
            flags: if fe.affinity_timeout_s.is_some() { SVC_F_AFFINITY } else { 0 }
                | if fe.drop_when_empty { SVC_F_DROP_EMPTY } else { 0 }
                | if fe.two_scopes { SVC_F_TWO_SCOPES } else { 0 }
                | if fe.source_ranges.is_some() { SVC_F_SOURCE_RANGES } else { 0 },
            svc_id,
            affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
        };
        if want_maglev {
            value.flags |= SVC_F_MAGLEV;
        }
        // The common case on a large cluster: nothing changed; no copy.
        if current.is_some_and(|p| {
            p.value == value
                && p.slots == ids
                && p.members.len() == ids.len()
                && ids.iter().all(|id| p.members.contains(id))
                && (!want_maglev || p.maglev.as_ref() == Some(&ids))
                && p.ranges == ranges
        }) {
            return Ok(());
        }
        let is_new = current.is_none();
        let mut prog = current.cloned().unwrap_or_default();
        prog.value.svc_id = svc_id;
        // Members first: a flow may only stay on, or be sent to, a backend
        // the frontend has.
        for id in &ids {
            if prog.members.contains(id) {
                continue;
            }
            if let Err(e) = self.maps.put_member(MemberKey { svc_id, backend_id: *id }) {
                self.store(key, prog, is_new);
                return Err(e);
            }
            report.writes += 1;
            prog.members.insert(*id);
        }
        // New source ranges before the frontend can require them.
        let new_ranges: Vec<RangeEntry> = ranges.difference(&prog.ranges).copied().collect();
        for r in &new_ranges {
            if let Err(e) = self.maps.put_src_range(svc_id, *r) {
                self.store(key, prog, is_new);
                return Err(e);
            }
            report.writes += 1;
            prog.ranges.insert(*r);
        }
        // Then slots. Readers use the old count meanwhile; every slot they
        // can reach holds a backend that exists.
        for (i, id) in ids.iter().enumerate() {
            if prog.slots.get(i) == Some(id) {
                continue;
            }
            let slot_key = ServiceKey { slot: (i + 1) as u16, ..key };
            let r = self.maps.put_service(slot_key, ServiceValue { backend_id: *id, ..Default::default() });
            if let Err(e) = r {
                self.store(key, prog, is_new);
                return Err(e);
            }
            report.writes += 1;
            if i < prog.slots.len() {
                prog.slots[i] = *id;
            } else {
                prog.slots.push(*id);
            }
        }
        // The Maglev table, written whole (readers see the old or the new one).
        if want_maglev && prog.maglev.as_ref() != Some(&ids) {
            if !self.tables.contains_key(&ids) {
                if self.tables.len() >= 16 {
                    self.tables.clear();
                }
                let pairs: Vec<(u32, Backend)> = ids.iter().map(|id| (*id, self.backends[id])).collect();
                self.tables.insert(ids.clone(), Box::new(crate::maglev::table(&pairs)));
            }
            match self.maps.put_maglev(svc_id, &self.tables[&ids]) {
                Ok(()) => {
                    report.writes += 1;
                    prog.maglev = Some(ids.clone());
                }
                Err(e) => {
                    // Random choice still works; say why the table is missing.
                    report.failed.push((fe.owner.clone(), format!("Maglev table: {e}; choosing backends at random")));
                    value.flags &= !SVC_F_MAGLEV;
                    prog.maglev = None;
                }
            }
        }
        // Then the count: from here on readers see exactly the new set.
        if is_new || prog.value != value {
            if let Err(e) = self.maps.put_service(key, value) {
                self.store(key, prog, is_new);
                return Err(e);
            }
            report.writes += 1;
            prog.value = value;
        }
        // Then what no reader can reach any more: surplus slots, a table the
        // frontend no longer uses, members that left.
        while prog.slots.len() > ids.len() {
            let slot_key = ServiceKey { slot: prog.slots.len() as u16, ..key };
            if let Err(e) = self.maps.del_service(slot_key) {
                self.set_prog(key, prog);
                return Err(e);
            }
            report.deletes += 1;
            prog.slots.pop();
        }
        if value.flags & SVC_F_MAGLEV == 0 && prog.maglev.is_some() {
            if let Err(e) = self.maps.del_maglev(svc_id) {
                self.set_prog(key, prog);
                return Err(e);
            }
            report.deletes += 1;
            prog.maglev = None;
        }
        let old_ranges: Vec<RangeEntry> = prog.ranges.difference(&ranges).copied().collect();
        for r in old_ranges {
            if let Err(e) = self.maps.del_src_range(svc_id, r) {
                self.set_prog(key, prog);
                return Err(e);
            }
            report.deletes += 1;
            prog.ranges.remove(&r);
        }
        let keep: BTreeSet<u32> = ids.iter().copied().collect();
        let leaving: Vec<u32> = prog.members.difference(&keep).copied().collect();
        for id in leaving {
            if let Err(e) = self.maps.del_member(MemberKey { svc_id, backend_id: id }) {
                self.set_prog(key, prog);
                return Err(e);
            }
            report.deletes += 1;
            prog.members.remove(&id);
        }
        self.set_prog(key, prog);
        Ok(())
    }

    /// Stores a frontend's programmed state, moving the backend reference
    /// counts from what it referred to before to what it refers to now.
    fn set_prog(&mut self, key: ServiceKey, prog: Programmed) {
        let now = referenced(&prog);
        self.entries += 1 + prog.slots.len();
        let before = match self.frontends.insert(key, prog) {
            Some(p) => {
                self.entries -= 1 + p.slots.len();
                referenced(&p)
            }
            None => BTreeSet::new(),
        };
        for id in now.difference(&before) {
            *self.refs.entry(*id).or_default() += 1;
        }
        for id in before.difference(&now) {
            self.unref(*id);
        }
    }

    fn unref(&mut self, id: u32) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
                self.unreferenced.insert(id);
            }
        }
    }

    /// Keeps the mirror exact after a partial write. A new frontend whose
    /// slot 0 was never written is not programmed: what was written for it
    /// is removed again (its id stays retired).
    fn store(&mut self, key: ServiceKey, prog: Programmed, is_new: bool) {
        if !is_new {
            self.set_prog(key, prog);
            return;
        }
        for i in (1..=prog.slots.len()).rev() {
            let _ = self.maps.del_service(ServiceKey { slot: i as u16, ..key });
        }
        if prog.maglev.is_some() {
            let _ = self.maps.del_maglev(prog.value.svc_id);
        }
        for id in prog.members {
            let _ = self.maps.del_member(MemberKey { svc_id: prog.value.svc_id, backend_id: id });
        }
        for r in prog.ranges {
            let _ = self.maps.del_src_range(prog.value.svc_id, r);
        }
    }

    fn remove_frontend(&mut self, key: ServiceKey, report: &mut SyncReport) -> Result<(), MapError> {
        let Some(mut prog) = self.frontends.remove(&key) else { return Ok(()) };
        if let Err(e) = self.maps.del_service(key) {
            self.frontends.insert(key, prog);
            return Err(e);
        }
        report.deletes += 1;
        self.entries -= 1 + prog.slots.len();
        for id in referenced(&prog) {
            self.unref(id);
        }
        let svc_id = prog.value.svc_id;
        // From here on nothing can reach what is left; delete it all, and
        // keep what failed tracked under a removed frontend so a later sync
        // retries (an entry with no slot 0 is invisible to the datapath).
        let mut first_err = None;
        while !prog.slots.is_empty() {
            let slot_key = ServiceKey { slot: prog.slots.len() as u16, ..key };
            match self.maps.del_service(slot_key) {
                Ok(()) => {
                    report.deletes += 1;
                    prog.slots.pop();
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                    break;
                }
            }
        }
        if prog.maglev.is_some() {
            match self.maps.del_maglev(svc_id) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for id in std::mem::take(&mut prog.members) {
            match self.maps.del_member(MemberKey { svc_id, backend_id: id }) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for r in std::mem::take(&mut prog.ranges) {
            match self.maps.del_src_range(svc_id, r) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// In-memory maps, for tests and dry runs. Records every state after each
/// write when `trace` is set, so tests can check invariants on intermediate
/// states.
#[derive(Clone, Debug, Default)]
pub struct MemMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeSet<MemberKey>,
    pub maglev: BTreeMap<u32, Box<MaglevTable>>,
    pub vips: BTreeMap<[u8; 16], VipValue>,
    pub meta: BTreeMap<u32, u64>,
    pub src_ranges: BTreeSet<(u32, RangeEntry)>,
    pub capacity_services: Option<usize>,
    pub capacity_backends: Option<usize>,
    /// Called after each write with the new state.
    pub observer: Option<fn(&MemMaps)>,
}

impl MemMaps {
    fn observe(&self) {
        if let Some(f) = self.observer {
            f(self);
        }
    }

    /// The backend set a reader would see for a frontend right now, or None
    /// when the frontend is absent. `Err` when a reachable slot is missing or
    /// points at a missing backend.
    pub fn reader_view(&self, key: &ServiceKey) -> Option<Result<Vec<Backend>, String>> {
        let v = self.services.get(key)?;
        let mut out = Vec::new();
        for slot in 1..=v.count {
            let Some(s) = self.services.get(&ServiceKey { slot, ..*key }) else {
                return Some(Err(format!("slot {slot} missing")));
            };
            let Some(b) = self.backends.get(&s.backend_id) else {
                return Some(Err(format!("backend {} missing", s.backend_id)));
            };
            if !self.members.contains(&MemberKey { svc_id: v.svc_id, backend_id: s.backend_id }) {
                return Some(Err(format!("backend {} of slot {slot} is not a member", s.backend_id)));
            }
            out.push(*b);
        }
        if v.flags & SVC_F_MAGLEV != 0 {
            let Some(t) = self.maglev.get(&v.svc_id) else {
                return Some(Err("Maglev flag without a table".into()));
            };
            if let Some(id) = t.backend_ids.iter().find(|id| !self.backends.contains_key(id)) {
                return Some(Err(format!("Maglev table points at missing backend {id}")));
            }
        }
        Some(Ok(out))
    }
}

impl MapOps for MemMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        if !self.services.contains_key(&key) && self.capacity_services.is_some_and(|c| self.services.len() >= c) {
            return Err(MapError::Full { map: proxy_common::MAP_SERVICES });
        }
        self.services.insert(key, value);
        self.observe();
        Ok(())
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        self.services.remove(&key);
        self.observe();
        Ok(())
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        if !self.backends.contains_key(&id) && self.capacity_backends.is_some_and(|c| self.backends.len() >= c) {
            return Err(MapError::Full { map: proxy_common::MAP_BACKENDS });
        }
        self.backends.insert(id, backend);
        self.observe();
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends.remove(&id);
        self.observe();
        Ok(())
    }
    fn members(&self) -> Result<Vec<MemberKey>, MapError> {
        Ok(self.members.iter().copied().collect())
    }
    fn put_member(&mut self, key: MemberKey) -> Result<(), MapError> {
        self.members.insert(key);
        self.observe();
        Ok(())
    }
    fn del_member(&mut self, key: MemberKey) -> Result<(), MapError> {
        self.members.remove(&key);
        self.observe();
        Ok(())
    }
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        self.maglev.insert(svc_id, Box::new(*table));
        self.observe();
        Ok(())
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), MapError> {
        self.maglev.remove(&svc_id);
        self.observe();
        Ok(())
    }
    fn vips(&self) -> Result<Vec<([u8; 16], VipValue)>, MapError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_vip(&mut self, addr: [u8; 16], value: VipValue) -> Result<(), MapError> {
        self.vips.insert(addr, value);
        self.observe();
        Ok(())
    }
    fn del_vip(&mut self, addr: [u8; 16]) -> Result<(), MapError> {
        self.vips.remove(&addr);
        self.observe();
        Ok(())
    }
    fn meta(&self, slot: u32) -> Result<u64, MapError> {
        Ok(self.meta.get(&slot).copied().unwrap_or(0))
    }
    fn put_meta(&mut self, slot: u32, value: u64) -> Result<(), MapError> {
        self.meta.insert(slot, value);
        Ok(())
    }
    fn src_ranges(&self) -> Result<Vec<(u32, RangeEntry)>, MapError> {
        Ok(self.src_ranges.iter().copied().collect())
    }
    fn put_src_range(&mut self, svc_id: u32, range: RangeEntry) -> Result<(), MapError> {
        self.src_ranges.insert((svc_id, range));
        self.observe();
        Ok(())
    }
    fn del_src_range(&mut self, svc_id: u32, range: RangeEntry) -> Result<(), MapError> {
        self.src_ranges.remove(&(svc_id, range));
        self.observe();
        Ok(())
    }
}
