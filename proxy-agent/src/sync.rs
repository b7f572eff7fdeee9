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

    /// How many Maglev tables the maps hold at most, if known.
    fn maglev_capacity(&self) -> Option<usize> {
        None
    }

    /// Whether a full sync should queue its writes and send them with
    /// [`MapOps::apply_batch`] at each ordering barrier.
    fn batches(&self) -> bool {
        false
    }

    /// One write.
    fn apply(&mut self, op: Op) -> Result<(), MapError> {
        match op {
            Op::PutBackend(id, b) => self.put_backend(id, b),
            Op::PutVip(a, v) => self.put_vip(a, v),
            Op::PutMember(k) => self.put_member(k),
            Op::PutMaglev(id, t) => self.put_maglev(id, &t),
            Op::PutService(k, v) => self.put_service(k, v),
            Op::DelService(k) => self.del_service(k),
            Op::DelMaglev(id) => self.del_maglev(id),
            Op::DelMember(k) => self.del_member(k),
            Op::DelBackend(id) => self.del_backend(id),
            Op::DelVip(a) => self.del_vip(a),
        }
    }

    /// Queued writes, group by group in order (a batch per group where the
    /// maps can). On error the rest is not written.
    fn apply_batch(&mut self, pending: Pending) -> Result<(), MapError> {
        for group in pending.groups {
            for op in group {
                self.apply(op)?;
            }
        }
        Ok(())
    }
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
    /// Backend sets left without a Maglev table because the Maglev map is
    /// full (their frontends choose backends at random): programmed, not
    /// failed, and not retried until a table is freed.
    pub no_table: usize,
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

/// One map write, as the engine queues it while batching.
#[derive(Clone, Debug)]
pub enum Op {
    PutBackend(u32, Backend),
    PutVip([u8; 16], VipValue),
    PutMember(MemberKey),
    PutMaglev(u32, Box<MaglevTable>),
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    DelMaglev(u32),
    DelMember(MemberKey),
    DelBackend(u32),
    DelVip([u8; 16]),
}

impl Op {
    /// The group a write is applied in: what a reader follows is written
    /// before what leads to it (backends and members before slots and
    /// frontends), and removed after it.
    fn group(&self) -> usize {
        match self {
            Op::PutBackend(..) => 0,
            Op::PutVip(..) => 1,
            Op::PutMember(..) => 2,
            Op::PutMaglev(..) => 3,
            Op::PutService(..) => 4,
            Op::DelService(..) => 5,
            Op::DelMaglev(..) => 6,
            Op::DelMember(..) => 7,
            Op::DelBackend(..) => 8,
            Op::DelVip(..) => 9,
        }
    }
}

/// Writes queued between two barriers of a batched sync, by group; within
/// a group their order does not matter to a reader.
#[derive(Debug, Default)]
pub struct Pending {
    pub groups: [Vec<Op>; 10],
    len: usize,
}

impl Pending {
    fn push(&mut self, op: Op) {
        self.groups[op.group()].push(op);
        self.len += 1;
    }
}

/// Writes queued before a batch is sent (Maglev tables are 4 KiB each).
const BATCH_CHUNK: usize = 8192;

/// A backend set as the maps hold it: slots, members, Maglev table and
/// source ranges under one id (`ServiceValue::svc_id` of its frontends),
/// shared by the frontends of a Service port that serve the same endpoint
/// list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SetProg {
    /// `slots[i]` is the backend id at slot i+1 (whatever is in the map,
    /// which may be more than a frontend's count mid-update).
    slots: Vec<u32>,
    /// Backend ids in the membership map for this set.
    members: BTreeSet<u32>,
    /// Backend ids the programmed Maglev table was computed from.
    maglev: Option<Vec<u32>>,
    /// Source ranges in the LPM map for this set.
    ranges: BTreeSet<RangeEntry>,
    /// Frontends whose value names this set.
    users: Users,
    /// Who claimed the set in this agent's life (`None` after a restart
    /// until a sync claims it again).
    claim: Option<SetKey>,
}

/// The frontends of a set: a few, kept sorted in a vector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Users(Vec<ServiceKey>);

impl Users {
    fn insert(&mut self, k: ServiceKey) {
        if let Err(i) = self.0.binary_search(&k) {
            self.0.insert(i, k);
        }
    }
    fn remove(&mut self, k: &ServiceKey) {
        if let Ok(i) = self.0.binary_search(k) {
            self.0.remove(i);
        }
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn iter(&self) -> impl Iterator<Item = &ServiceKey> {
        self.0.iter()
    }
}

/// Who a backend set belongs to: a Service port (owner), which of its
/// endpoint lists, and, only when frontends of one list disagree (which
/// translation never produces), the one frontend it is private to.
type SetKey = (String, u8, Option<ServiceKey>);

/// The backend ids a set refers to (slots and members).
fn referenced(p: &SetProg) -> BTreeSet<u32> {
    p.slots.iter().chain(p.members.iter()).copied().collect()
}

pub struct SyncEngine<M: MapOps> {
    maps: M,
    /// Maglev tables computed during the current sync, by backend list:
    /// sets with the same backends (a Service port's sets often are) share
    /// a computation.
    tables: HashMap<Vec<u32>, Box<MaglevTable>>,
    /// Programmed frontends (slot 0 values).
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Programmed backend sets by id.
    sets: HashMap<u32, SetProg>,
    /// Claimed sets by who claimed them.
    set_ids: HashMap<SetKey, u32>,
    /// Backend slots of the earlier layout (one copy per frontend, keyed by
    /// the frontend's address), deleted after the first full sync.
    legacy: Vec<ServiceKey>,
    backend_ids: HashMap<Backend, u32>,
    backends: BTreeMap<u32, Backend>,
    vips: BTreeMap<[u8; 16], VipValue>,
    backend_alloc: IdAlloc,
    svc_alloc: IdAlloc,
    maglev: bool,
    /// Backend id -> number of programmed sets whose slots or members name
    /// it; a backend lives while its count is above zero.
    refs: HashMap<u32, u32>,
    /// Backends whose count fell to zero (or that were never referenced):
    /// deleted at the end of the sync unless referenced again.
    unreferenced: BTreeSet<u32>,
    /// ClientIP affinity group per Service port (owner), shared by its
    /// frontends.
    groups: HashMap<String, u32>,
    /// Writes queued during a batched full sync.
    pending: Option<Pending>,
    /// The first batch of this sync that failed.
    batch_error: Option<MapError>,
    /// The mirror must be read back from the maps before the next sync.
    needs_reload: bool,
    /// Sets with a Maglev table (or one the mirror cannot rule out).
    tables_held: usize,
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
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    sets: HashMap<u32, SetProg>,
    backends: BTreeMap<u32, Backend>,
    vips: BTreeMap<[u8; 16], VipValue>,
    /// Set slots after a gap (a reader never reaches them).
    orphans: Vec<ServiceKey>,
    legacy: Vec<ServiceKey>,
    /// Sets of the earlier layout's frontends, to be given their frontend's
    /// slots (set id, backend ids in slot order).
    seeds: Vec<(u32, Vec<u32>)>,
    max_svc_id: u32,
    max_backend_id: u32,
}

fn read_state<M: MapOps>(maps: &M) -> Result<State, MapError> {
    let mut frontends: BTreeMap<ServiceKey, ServiceValue> = BTreeMap::new();
    let mut slot_entries: Vec<(u32, u16, u32, ServiceKey)> = Vec::new();
    let mut legacy = Vec::new();
    let mut max_svc_id = 0;
    for (k, v) in maps.services()? {
        if let Some(set) = k.set_id() {
            slot_entries.push((set, k.slot, v.backend_id, k));
        } else if k.slot == 0 {
            // Slot 0's backend_id is its affinity group, from the same ids.
            max_svc_id = max_svc_id.max(v.svc_id).max(v.backend_id);
            frontends.insert(k, v);
        } else {
            legacy.push((k, v.backend_id));
        }
    }
    let mut sets: HashMap<u32, SetProg> = HashMap::new();
    for (k, v) in &frontends {
        let set = sets.entry(v.svc_id).or_default();
        set.users.insert(*k);
        // A table is trusted only if a frontend says it has one; it is
        // recomputed on the first sync anyway (the ids are unknown here).
        if v.flags & SVC_F_MAGLEV != 0 {
            set.maglev = Some(Vec::new());
        }
    }
    slot_entries.sort_unstable();
    let mut orphans = Vec::new();
    for (id, slot, backend, k) in slot_entries {
        max_svc_id = max_svc_id.max(id);
        let set = sets.entry(id).or_default();
        if set.slots.len() + 1 == usize::from(slot) {
            set.slots.push(backend);
        } else {
            orphans.push(k);
        }
    }
    for m in maps.members()? {
        max_svc_id = max_svc_id.max(m.svc_id);
        sets.entry(m.svc_id).or_default().members.insert(m.backend_id);
    }
    for (svc_id, range) in maps.src_ranges()? {
        max_svc_id = max_svc_id.max(svc_id);
        sets.entry(svc_id).or_default().ranges.insert(range);
    }
    // An agent of the per-frontend layout left each frontend's slots under
    // the frontend's own key, and its id names the frontend's members and
    // table: that id becomes a set, seeded with those slots when the maps
    // are adopted, so the new new-flow programs (in the tail-call map from
    // the load on) find slots without waiting for the first sync.
    legacy.sort_unstable_by_key(|(k, _)| (ServiceKey { slot: 0, ..*k }, k.slot));
    let mut seeds: Vec<(u32, Vec<u32>)> = Vec::new();
    for run in legacy.chunk_by(|a, b| ServiceKey { slot: 0, ..a.0 } == ServiceKey { slot: 0, ..b.0 }) {
        let fk = ServiceKey { slot: 0, ..run[0].0 };
        let Some(v) = frontends.get(&fk) else { continue };
        let contiguous = run.iter().enumerate().all(|(i, (k, _))| usize::from(k.slot) == i + 1);
        if contiguous
            && run.len() >= usize::from(v.count)
            && sets.get(&v.svc_id).is_some_and(|s| s.slots.is_empty())
            && !seeds.iter().any(|(id, _)| *id == v.svc_id)
        {
            seeds.push((v.svc_id, run.iter().map(|(_, b)| *b).collect()));
        }
    }
    let legacy = legacy.into_iter().map(|(k, _)| k).collect();
    let backends: BTreeMap<u32, Backend> = maps.backends()?.into_iter().collect();
    let max_backend_id = backends.keys().next_back().copied().unwrap_or(0);
    let vips = maps.vips()?.into_iter().collect();
    Ok(State { frontends, sets, backends, vips, orphans, legacy, seeds, max_svc_id, max_backend_id })
}

/// A Service port's frontends resolved for one sync: its backend sets with
/// their desired contents, and which frontends use which.
struct OwnerPlan<'a> {
    owner: &'a str,
    /// ClientIP affinity group (0: none).
    group: u32,
    /// Sets its frontends left in this sync.
    left: BTreeSet<u32>,
    sets: Vec<SetPlan>,
    /// (frontend key, frontend, index in `sets`)
    items: Vec<(ServiceKey, &'a Frontend, usize)>,
}

struct SetPlan {
    key: SetKey,
    id: u32,
    ids: Vec<u32>,
    ranges: BTreeSet<RangeEntry>,
    /// The set's Maglev table matches `ids` after the grow step.
    table: bool,
    failed: bool,
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
            sets: HashMap::new(),
            set_ids: HashMap::new(),
            legacy: Vec::new(),
            backend_ids: HashMap::new(),
            backends: BTreeMap::new(),
            vips: BTreeMap::new(),
            backend_alloc,
            svc_alloc,
            maglev: true,
            refs: HashMap::new(),
            unreferenced: BTreeSet::new(),
            groups: HashMap::new(),
            pending: None,
            batch_error: None,
            needs_reload: false,
            tables_held: 0,
        };
        engine.install(st)?;
        Ok(engine)
    }

    /// Re-reads the mirror from the maps (a periodic full resync): the next
    /// [`SyncEngine::sync`] then repairs whatever changed behind the agent's
    /// back (an entry deleted or rewritten by hand, a write that was lost).
    /// Maglev tables are trusted where the set is as the mirror had it.
    pub fn reload(&mut self) -> Result<(), MapError> {
        self.reload_trusting(true)
    }

    /// [`SyncEngine::reload`]; `trust_tables` false after a failed batch,
    /// when the mirror may name tables that were never written (they are
    /// all computed and written again).
    fn reload_trusting(&mut self, trust_tables: bool) -> Result<(), MapError> {
        let mut st = read_state(&self.maps)?;
        for (id, set) in &mut st.sets {
            if let Some(old) = self.sets.get(id) {
                if trust_tables && old.slots == set.slots && set.maglev.is_some() {
                    set.maglev.clone_from(&old.maglev);
                }
                set.claim.clone_from(&old.claim);
            }
        }
        self.backend_alloc.next = self.backend_alloc.next.max(st.max_backend_id + 1);
        self.svc_alloc.next = self.svc_alloc.next.max(st.max_svc_id + 1);
        self.install(st)
    }

    fn install(&mut self, st: State) -> Result<(), MapError> {
        self.frontends = st.frontends;
        self.sets = st.sets;
        self.tables_held = self.sets.values().filter(|s| s.maglev.is_some()).count();
        self.set_ids = self.sets.iter().filter_map(|(id, s)| Some((s.claim.clone()?, *id))).collect();
        self.legacy = st.legacy;
        self.backend_ids = st.backends.iter().map(|(id, b)| (*b, *id)).collect();
        self.backends = st.backends;
        self.vips = st.vips;
        for (id, slots) in st.seeds {
            let mut written = Vec::with_capacity(slots.len());
            for (i, b) in slots.iter().enumerate() {
                let key = ServiceKey::set_slot(id, (i + 1) as u16);
                if let Err(e) = self.op(Op::PutService(key, ServiceValue { backend_id: *b, ..ServiceValue::default() })) {
                    // The first sync writes the set in full instead.
                    tracing::warn!(error = %e, set = id, "copying a frontend's slots of the earlier layout");
                    break;
                }
                written.push(*b);
            }
            if let Some(set) = self.sets.get_mut(&id) {
                set.slots = written;
            }
        }
        self.refs.clear();
        for set in self.sets.values() {
            for id in referenced(set) {
                *self.refs.entry(id).or_default() += 1;
            }
        }
        self.unreferenced = self.backends.keys().filter(|id| !self.refs.contains_key(id)).copied().collect();
        // Slots after a gap, and sets no frontend names, are leftovers of
        // an interrupted write; nothing reaches them. (A set this agent
        // claimed stays for the next sync to refill: a reload after a
        // frontend was deleted by hand.)
        for k in st.orphans {
            self.op(Op::DelService(k))?;
        }
        let mut report = SyncReport::default();
        self.remove_unused_sets(false, true, &mut report);
        for (what, e) in report.failed {
            // Retried at the end of the next full sync.
            tracing::warn!(object = %what, error = %e, "removing a leftover backend set");
        }
        Ok(())
    }

    /// Removes the sets no frontend names (`claimed`: also those a Service
    /// port claimed in this agent's life; `guessed_tables`: also a table the
    /// mirror cannot rule out). Failures go to `report`.
    fn remove_unused_sets(&mut self, claimed: bool, guessed_tables: bool, report: &mut SyncReport) {
        let unused: Vec<u32> = self
            .sets
            .iter()
            .filter(|(_, s)| s.users.is_empty() && (claimed || s.claim.is_none()))
            .map(|(id, _)| *id)
            .collect();
        for id in unused {
            if guessed_tables && let Some(set) = self.sets.get_mut(&id) {
                // A table may be there without a frontend flagging it.
                set.maglev.get_or_insert_with(Vec::new);
            }
            if let Err(e) = self.remove_set(id, report) {
                report.failed.push((format!("backend set {id}"), e.to_string()));
            }
        }
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

    /// Entries the services map holds (frontends plus set slots).
    #[must_use]
    pub fn service_entries(&self) -> usize {
        self.frontends.len() + self.sets.values().map(|s| s.slots.len()).sum::<usize>()
    }

    /// Number of programmed frontends and backends.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Number of programmed backend sets.
    #[must_use]
    pub fn set_count(&self) -> usize {
        self.sets.len()
    }

    /// Brings the maps to `desired`, writing only the difference (the full
    /// diff: every frontend is compared with the mirror).
    ///
    /// Where the maps take batches, the writes are queued and sent a batch
    /// per map at each ordering barrier (removals; backends; sets grown;
    /// frontends; what nothing reaches any more). A batch that fails leaves
    /// the mirror unsure of what was written: the maps are read back and
    /// the sync is done again write by write, which pins each failure on
    /// its frontend.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        if self.maps.batches() && !self.needs_reload {
            self.pending = Some(Pending::default());
            self.batch_error = None;
            let r = self.sync_inner(desired, true);
            self.pending = None;
            match r {
                Ok(report) => return report,
                Err(e) => {
                    tracing::warn!(error = %e, "a batched map write failed; re-reading the maps and syncing write by write");
                    self.needs_reload = true;
                }
            }
        }
        let mut failed = Vec::new();
        if std::mem::take(&mut self.needs_reload) {
            match self.reload_trusting(false) {
                Ok(()) => {
                    // Sets the failed batches wrote for frontends they did
                    // not reach hold map space the retry may need.
                    let mut report = SyncReport::default();
                    self.remove_unused_sets(true, true, &mut report);
                    failed.extend(report.failed);
                }
                Err(e) => {
                    // The mirror may say more than the maps hold: retried at
                    // the next sync, which the failure below makes happen.
                    self.needs_reload = true;
                    failed.push(("re-reading the maps after a failed batch".into(), e.to_string()));
                }
            }
        }
        let mut report = if self.needs_reload {
            SyncReport::default()
        } else {
            self.sync_inner(desired, false).unwrap_or_else(|e| SyncReport { failed: vec![("sync".into(), e.to_string())], ..SyncReport::default() })
        };
        report.failed.extend(failed);
        report
    }

    fn sync_inner(&mut self, desired: &Desired, batched: bool) -> Result<SyncReport, MapError> {
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
        self.flush()?;
        let wanted_backends: std::collections::HashSet<Backend> = wanted
            .iter()
            .flat_map(|(k, fe)| fe.backends.iter().map(|b| backend_value(b, k.proto)))
            .collect();
        self.delete_unused_backends(|b| wanted_backends.contains(b), &mut report);
        self.flush()?;
        // ClientIP affinity is per Service port: one group id shared by the
        // port's frontends, kept from what is programmed when possible.
        // A programmed group is kept only by the owner it was given to (a
        // frontend address may have changed hands), and by one owner only.
        let prev: HashMap<u32, String> = self.groups.drain().map(|(o, g)| (g, o)).collect();
        let mut taken: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for (key, fe) in &wanted {
            if fe.affinity_timeout_s.is_some()
                && !self.groups.contains_key(&fe.owner)
                && let Some(v) = self.frontends.get(key)
                && v.backend_id != 0
                && prev.get(&v.backend_id).is_none_or(|o| *o == fe.owner)
                && taken.insert(v.backend_id)
            {
                self.groups.insert(fe.owner.clone(), v.backend_id);
            }
        }
        // Frontends: a Service port's together, so its sets are written
        // once and its Maglev table computed once.
        let mut order: Vec<(ServiceKey, &Frontend)> = wanted.iter().map(|(k, f)| (*k, *f)).collect();
        order.sort_by(|a, b| a.1.owner.cmp(&b.1.owner).then(a.0.cmp(&b.0)));
        if batched {
            // Each step for a run of Service ports, a barrier between
            // steps; runs of 2,048 ports keep the plans held at once (and
            // the heap they fragment) small.
            let owners: Vec<&[(ServiceKey, &Frontend)]> = order.chunk_by(|a, b| a.1.owner == b.1.owner).collect();
            for run in owners.chunks(2048) {
                let mut plans = Vec::with_capacity(run.len());
                for items in run {
                    plans.extend(self.plan_owner(items, &mut report));
                }
                self.flush()?;
                let mut grown = Vec::with_capacity(plans.len());
                for plan in plans {
                    grown.extend(self.owner_grow(plan, &mut report));
                }
                self.flush()?;
                for plan in &mut grown {
                    self.owner_values(plan, &mut report);
                }
                self.flush()?;
                for plan in &grown {
                    self.owner_shrink(plan, &mut report);
                }
            }
        } else {
            for chunk in order.chunk_by(|a, b| a.1.owner == b.1.owner) {
                self.sync_owner(chunk, &mut report);
            }
        }
        // Backends nothing refers to any more (after the updates).
        self.delete_unused_backends(|_| false, &mut report);
        // Addresses no frontend uses any more.
        let gone: Vec<[u8; 16]> = self.vips.keys().filter(|a| !wanted_vips.contains_key(*a)).copied().collect();
        for addr in gone {
            self.del_vip_if_unused(addr, &mut report);
        }
        // Sets no frontend names after a full sync (one whose removal failed
        // before, under a claim no Service port holds any more).
        self.remove_unused_sets(true, false, &mut report);
        // The earlier layout's per-frontend slots: no program reads them now.
        for k in std::mem::take(&mut self.legacy) {
            match self.op(Op::DelService(k)) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    report.failed.push((format!("{k:?}"), e.to_string()));
                    self.legacy.push(k);
                }
            }
        }
        self.flush()?;
        self.tables.clear();
        self.tables_held = self.sets.values().filter(|s| s.maglev.is_some()).count();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        Ok(report)
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
        let mut order: Vec<(ServiceKey, &Frontend)> =
            frontends.iter().filter_map(|(a, fe)| Some((frontend_key(a), (*fe)?))).collect();
        order.sort_by(|a, b| a.1.owner.cmp(&b.1.owner).then(a.0.cmp(&b.0)));
        for chunk in order.chunk_by(|a, b| a.1.owner == b.1.owner) {
            self.sync_owner(chunk, &mut report);
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

    /// One write: applied now, or queued while batching (a full queue is
    /// sent at once, in group order).
    fn op(&mut self, op: Op) -> Result<(), MapError> {
        match &mut self.pending {
            None => self.maps.apply(op),
            Some(p) => {
                p.push(op);
                if p.len >= BATCH_CHUNK
                    && let Err(e) = self.flush()
                {
                    // Seen at the next barrier, which abandons the batches.
                    self.batch_error.get_or_insert(e);
                }
                Ok(())
            }
        }
    }

    /// Sends the queued writes (an ordering barrier of a batched sync).
    fn flush(&mut self) -> Result<(), MapError> {
        if let Some(e) = self.batch_error.take() {
            return Err(e);
        }
        match &mut self.pending {
            Some(p) if p.len > 0 => {
                let p = std::mem::take(p);
                self.maps.apply_batch(p)
            }
            _ => Ok(()),
        }
    }

    fn put_vip(&mut self, addr: [u8; 16], v: VipValue, report: &mut SyncReport) {
        if self.vips.get(&addr) == Some(&v) {
            return;
        }
        match self.op(Op::PutVip(addr, v)) {
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
        match self.op(Op::DelVip(addr)) {
            Ok(()) => {
                report.deletes += 1;
                self.vips.remove(&addr);
            }
            Err(e) => report.failed.push((format!("service address {addr:?}"), e.to_string())),
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
            match self.op(Op::DelBackend(id)) {
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
        self.op(Op::PutBackend(id, b))?;
        report.writes += 1;
        self.backends.insert(id, b);
        self.backend_ids.insert(b, id);
        Ok(id)
    }

    /// Programs the frontends of one Service port (`items`, all of one
    /// owner): backends, then each backend set grown (members, ranges,
    /// slots, Maglev table), then the frontends' values, then each set
    /// shrunk to what its frontends can still reach.
    fn sync_owner(&mut self, items: &[(ServiceKey, &Frontend)], report: &mut SyncReport) {
        let Some(plan) = self.plan_owner(items, report) else { return };
        let Some(mut plan) = self.owner_grow(plan, report) else { return };
        self.owner_values(&mut plan, report);
        self.owner_shrink(&plan, report);
    }

    /// The affinity group, then each set grown. `None`: nothing to do.
    fn owner_grow<'a>(&mut self, mut plan: OwnerPlan<'a>, report: &mut SyncReport) -> Option<OwnerPlan<'a>> {
        plan.group = if plan.items.iter().any(|(_, fe, _)| fe.affinity_timeout_s.is_some()) {
            match self.groups.get(plan.owner).copied() {
                Some(g) => g,
                None => match self.svc_alloc.take(&mut self.maps) {
                    Ok(g) => {
                        self.groups.insert(plan.owner.to_owned(), g);
                        g
                    }
                    Err(e) => {
                        report.failed.push((plan.owner.to_owned(), e.to_string()));
                        return None;
                    }
                },
            }
        } else {
            0
        };
        for sp in &mut plan.sets {
            if let Err(e) = self.grow_set(sp, plan.owner, report) {
                report.failed.push((plan.owner.to_owned(), e.to_string()));
                sp.failed = true;
            }
        }
        Some(plan)
    }

    /// Each frontend's value: its count, flags and set.
    fn owner_values(&mut self, plan: &mut OwnerPlan<'_>, report: &mut SyncReport) {
        for (key, fe, si) in &plan.items {
            let sp = &plan.sets[*si];
            if sp.failed {
                continue;
            }
            let value = ServiceValue {
                backend_id: if fe.affinity_timeout_s.is_some() { plan.group } else { 0 },
                count: sp.ids.len() as u16,
                flags: if fe.affinity_timeout_s.is_some() { SVC_F_AFFINITY } else { 0 }
                    | if fe.drop_when_empty { SVC_F_DROP_EMPTY } else { 0 }
                    | if fe.two_scopes { SVC_F_TWO_SCOPES } else { 0 }
                    | if fe.source_ranges.is_some() { SVC_F_SOURCE_RANGES } else { 0 }
                    | if sp.table { SVC_F_MAGLEV } else { 0 },
                svc_id: sp.id,
                affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
            };
            let old = self.frontends.get(key).copied();
            if old == Some(value) {
                continue;
            }
            if let Err(e) = self.op(Op::PutService(*key, value)) {
                report.failed.push((fe.owner.clone(), e.to_string()));
                continue;
            }
            report.writes += 1;
            self.frontends.insert(*key, value);
            if let Some(old) = old
                && old.svc_id != sp.id
                && let Some(s) = self.sets.get_mut(&old.svc_id)
            {
                s.users.remove(key);
                plan.left.insert(old.svc_id);
            }
            self.sets.entry(sp.id).or_default().users.insert(*key);
        }
    }

    /// Each set shrunk to what its frontends reach; sets frontends left
    /// (for another set, perhaps another owner's) gone with their last
    /// frontend or shrunk to what the rest still reach; new sets whose
    /// frontends all failed removed.
    fn owner_shrink(&mut self, plan: &OwnerPlan<'_>, report: &mut SyncReport) {
        for (si, sp) in plan.sets.iter().enumerate().filter(|(_, sp)| !sp.failed) {
            // The set's ranges are those of this plan only if it holds every
            // frontend of the set (an incremental sync passes only the
            // frontends that changed).
            let covers = self.sets.get(&sp.id).is_some_and(|set| {
                set.users.iter().all(|k| plan.items.iter().any(|(key, _, i)| key == k && *i == si))
            });
            let ranges = covers.then_some(&sp.ranges);
            if let Err(e) = self.shrink_set(sp.id, sp.ids.len(), ranges, report) {
                report.failed.push((plan.owner.to_owned(), e.to_string()));
            }
        }
        for id in plan.left.iter().copied().chain(plan.sets.iter().map(|sp| sp.id)) {
            let r = match self.sets.get(&id) {
                Some(s) if s.users.is_empty() => self.remove_set(id, report),
                Some(_) if !plan.sets.iter().any(|sp| sp.id == id) => self.shrink_set(id, 0, None, report),
                _ => Ok(()),
            };
            if let Err(e) = r {
                report.failed.push((plan.owner.to_owned(), e.to_string()));
            }
        }
    }

    /// Backend ids, set keys and set ids for one owner's frontends.
    fn plan_owner<'a>(&mut self, items: &[(ServiceKey, &'a Frontend)], report: &mut SyncReport) -> Option<OwnerPlan<'a>> {
        let owner: &'a str = &items.first()?.1.owner;
        let mut plan = OwnerPlan { owner, group: 0, left: BTreeSet::new(), sets: Vec::new(), items: Vec::new() };
        for (key, fe) in items {
            if fe.backends.len() > MAX_BACKENDS_PER_FRONTEND {
                let e = MapError::TooManyBackends { count: fe.backends.len(), limit: MAX_BACKENDS_PER_FRONTEND };
                report.failed.push((fe.owner.clone(), e.to_string()));
                continue;
            }
            let mut ids = Vec::with_capacity(fe.backends.len());
            let mut err = None;
            for b in &fe.backends {
                match self.backend_id(backend_value(b, key.proto), report) {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = err {
                report.failed.push((fe.owner.clone(), e.to_string()));
                continue;
            }
            let mut sk: SetKey = (owner.to_owned(), fe.list.number(), None);
            let si = match plan.sets.iter().position(|s| s.key == sk) {
                Some(i) if plan.sets[i].ids == ids => i,
                found => {
                    if found.is_some() {
                        // Same list, other backends: a set of its own.
                        sk.2 = Some(*key);
                    }
                    plan.sets.push(SetPlan { key: sk, id: 0, ids, ranges: BTreeSet::new(), table: false, failed: false });
                    plan.sets.len() - 1
                }
            };
            plan.sets[si].ranges.extend(range_entries(fe));
            plan.items.push((*key, *fe, si));
        }
        for si in 0..plan.sets.len() {
            if let Some(id) = self.set_ids.get(&plan.sets[si].key).filter(|id| self.sets.contains_key(id)) {
                // Claimed already (the common case): nothing to record.
                plan.sets[si].id = *id;
                continue;
            }
            let id = {
                let users: BTreeSet<ServiceKey> =
                    plan.items.iter().filter(|(_, _, i)| *i == si).map(|(k, _, _)| *k).collect();
                // After a restart: the set these frontends already share,
                // if no one else uses it.
                let adopt = users.iter().filter_map(|k| self.frontends.get(k)).map(|v| v.svc_id).find(|id| {
                    self.sets.get(id).is_some_and(|s| s.claim.is_none() && s.users.iter().all(|k| users.contains(k)))
                });
                match adopt {
                    Some(id) => Some(id),
                    None => match self.svc_alloc.take(&mut self.maps) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            report.failed.push((owner.to_owned(), e.to_string()));
                            None
                        }
                    },
                }
            };
            match id {
                Some(id) => {
                    let key = plan.sets[si].key.clone();
                    self.sets.entry(id).or_default().claim = Some(key.clone());
                    self.set_ids.insert(key, id);
                    plan.sets[si].id = id;
                }
                None => plan.sets[si].failed = true,
            }
        }
        Some(plan)
    }

    /// Stores a set's programmed state, moving the backend reference counts
    /// from what it referred to before to what it refers to now.
    fn store_set(&mut self, id: u32, set: SetProg) {
        let now = referenced(&set);
        let table = set.maglev.is_some();
        let old = self.sets.insert(id, set);
        let had_table = old.as_ref().is_some_and(|s| s.maglev.is_some());
        // (Saturating: a guessed table may be forced on a set in place;
        // the count is recomputed after every full sync.)
        self.tables_held = (self.tables_held + usize::from(table)).saturating_sub(usize::from(had_table));
        let before = old.map(|s| referenced(&s)).unwrap_or_default();
        for b in now.difference(&before) {
            *self.refs.entry(*b).or_default() += 1;
        }
        for b in before.difference(&now) {
            self.unref(*b);
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

    /// Writes what a set gains: members (a flow may only stay on, or be
    /// sent to, a backend the set has), source ranges, slots (readers use
    /// their frontend's old count meanwhile; every slot they can reach
    /// holds a backend that exists), then the Maglev table, written whole.
    fn grow_set(&mut self, sp: &mut SetPlan, owner: &str, report: &mut SyncReport) -> Result<(), MapError> {
        if sp.failed {
            return Ok(());
        }
        let cur = self.sets.get(&sp.id);
        // A set that has no table gets one while the Maglev map has room;
        // past that its frontends choose at random (said once per sync).
        let room = cur.is_some_and(|s| s.maglev.is_some())
            || self.maps.maglev_capacity().is_none_or(|cap| self.tables_held < cap);
        let want_maglev = self.maglev && !sp.ids.is_empty() && room;
        if self.maglev && !sp.ids.is_empty() && !room {
            report.no_table += 1;
        }
        if let Some(s) = cur
            && sp.ids.iter().all(|id| s.members.contains(id))
            && sp.ranges.is_subset(&s.ranges)
            && s.slots.len() >= sp.ids.len()
            && s.slots[..sp.ids.len()] == sp.ids[..]
            && (!want_maglev || s.maglev.as_ref() == Some(&sp.ids))
        {
            sp.table = want_maglev;
            return Ok(());
        }
        let mut set = cur.cloned().unwrap_or_default();
        let id = sp.id;
        let r = (|| {
            for b in &sp.ids {
                if !set.members.contains(b) {
                    self.op(Op::PutMember(MemberKey { svc_id: id, backend_id: *b }))?;
                    report.writes += 1;
                    set.members.insert(*b);
                }
            }
            for r in sp.ranges.difference(&set.ranges.clone()) {
                self.maps.put_src_range(id, *r)?;
                report.writes += 1;
                set.ranges.insert(*r);
            }
            for (i, b) in sp.ids.iter().enumerate() {
                if set.slots.get(i) == Some(b) {
                    continue;
                }
                self.op(Op::PutService(ServiceKey::set_slot(id, (i + 1) as u16), ServiceValue { backend_id: *b, ..Default::default() }))?;
                report.writes += 1;
                if i < set.slots.len() {
                    set.slots[i] = *b;
                } else {
                    set.slots.push(*b);
                }
            }
            Ok::<(), MapError>(())
        })();
        if let Err(e) = r {
            self.store_set(id, set);
            return Err(e);
        }
        if want_maglev && set.maglev.as_ref() != Some(&sp.ids) {
            if !self.tables.contains_key(&sp.ids) {
                if self.tables.len() >= 16 {
                    self.tables.clear();
                }
                let pairs: Vec<(u32, Backend)> = sp.ids.iter().map(|id| (*id, self.backends[id])).collect();
                self.tables.insert(sp.ids.clone(), Box::new(crate::maglev::table(&pairs)));
            }
            match self.op(Op::PutMaglev(id, self.tables[&sp.ids].clone())) {
                Ok(()) => {
                    report.writes += 1;
                    set.maglev = Some(sp.ids.clone());
                }
                Err(e) => {
                    // Random choice still works; say why the table is missing.
                    report.failed.push((owner.to_owned(), format!("Maglev table: {e}; choosing backends at random")));
                }
            }
        }
        sp.table = want_maglev && set.maglev.as_ref() == Some(&sp.ids);
        self.store_set(id, set);
        Ok(())
    }

    /// Deletes what no frontend of the set can reach any more: slots past
    /// the largest count its frontends hold (and past `min_len`), a table
    /// none of them uses, ranges not in `ranges` (`None`: kept while a
    /// frontend checks ranges), members no kept slot names.
    fn shrink_set(&mut self, id: u32, min_len: usize, ranges: Option<&BTreeSet<RangeEntry>>, report: &mut SyncReport) -> Result<(), MapError> {
        let Some(cur) = self.sets.get(&id) else { return Ok(()) };
        let users: Vec<ServiceValue> = cur.users.iter().filter_map(|k| self.frontends.get(k)).copied().collect();
        let keep_len = users.iter().map(|v| usize::from(v.count)).max().unwrap_or(0).max(min_len).min(cur.slots.len());
        let table_used = users.iter().any(|v| v.flags & SVC_F_MAGLEV != 0);
        let ranges_used = users.iter().any(|v| v.flags & SVC_F_SOURCE_RANGES != 0);
        let keep_ranges: BTreeSet<RangeEntry> = match ranges {
            Some(r) => r.clone(),
            None if ranges_used => cur.ranges.clone(),
            None => BTreeSet::new(),
        };
        // Members the kept slots name, and those of a table still in use.
        let mut keep_members: BTreeSet<u32> = cur.slots[..keep_len].iter().copied().collect();
        if table_used && let Some(ids) = &cur.maglev {
            keep_members.extend(ids.iter().copied());
        }
        if cur.slots.len() == keep_len
            && (table_used || cur.maglev.is_none())
            && cur.members.is_subset(&keep_members)
            && cur.ranges.is_subset(&keep_ranges)
        {
            return Ok(());
        }
        let mut set = cur.clone();
        let r = (|| {
            while set.slots.len() > keep_len {
                self.op(Op::DelService(ServiceKey::set_slot(id, set.slots.len() as u16)))?;
                report.deletes += 1;
                set.slots.pop();
            }
            if !table_used && set.maglev.is_some() {
                self.op(Op::DelMaglev(id))?;
                report.deletes += 1;
                set.maglev = None;
            }
            for r in set.ranges.difference(&keep_ranges).copied().collect::<Vec<_>>() {
                self.maps.del_src_range(id, r)?;
                report.deletes += 1;
                set.ranges.remove(&r);
            }
            for b in set.members.difference(&keep_members).copied().collect::<Vec<_>>() {
                self.op(Op::DelMember(MemberKey { svc_id: id, backend_id: b }))?;
                report.deletes += 1;
                set.members.remove(&b);
            }
            Ok::<(), MapError>(())
        })();
        self.store_set(id, set);
        r
    }

    /// Deletes a set no frontend names: slots from the last, its table,
    /// members, ranges. What fails stays in the mirror for a later sync.
    fn remove_set(&mut self, id: u32, report: &mut SyncReport) -> Result<(), MapError> {
        let Some(cur) = self.sets.get(&id) else { return Ok(()) };
        let mut set = cur.clone();
        let r = (|| {
            while !set.slots.is_empty() {
                self.op(Op::DelService(ServiceKey::set_slot(id, set.slots.len() as u16)))?;
                report.deletes += 1;
                set.slots.pop();
            }
            if set.maglev.is_some() {
                // (A table the mirror only guessed at may not exist: deleting
                // an absent key is not an error.)
                self.op(Op::DelMaglev(id))?;
                report.deletes += 1;
                set.maglev = None;
            }
            for b in std::mem::take(&mut set.members) {
                if let Err(e) = self.op(Op::DelMember(MemberKey { svc_id: id, backend_id: b })) {
                    set.members.insert(b);
                    return Err(e);
                }
                report.deletes += 1;
            }
            for r in std::mem::take(&mut set.ranges) {
                if let Err(e) = self.maps.del_src_range(id, r) {
                    set.ranges.insert(r);
                    return Err(e);
                }
                report.deletes += 1;
            }
            Ok::<(), MapError>(())
        })();
        if r.is_ok() {
            if let Some(k) = &set.claim
                && self.set_ids.get(k) == Some(&id)
            {
                self.set_ids.remove(k);
            }
            set.claim = None;
            self.store_set(id, SetProg::default());
            self.sets.remove(&id);
        } else {
            self.store_set(id, set);
        }
        r
    }

    fn remove_frontend(&mut self, key: ServiceKey, report: &mut SyncReport) -> Result<(), MapError> {
        let Some(value) = self.frontends.get(&key).copied() else { return Ok(()) };
        self.op(Op::DelService(key))?;
        report.deletes += 1;
        self.frontends.remove(&key);
        // From here on nothing reaches the set through this frontend; the
        // set goes with its last frontend (what fails to go stays in the
        // mirror, and a later sync retries).
        if let Some(s) = self.sets.get_mut(&value.svc_id) {
            s.users.remove(&key);
            if s.users.is_empty() {
                self.remove_set(value.svc_id, report)?;
            } else {
                self.shrink_set(value.svc_id, 0, None, report)?;
            }
        }
        Ok(())
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
    /// Take the full sync's writes in batches (applied one by one, group
    /// by group, as the real maps apply them).
    pub batches: bool,
    /// Room for this many Maglev tables (`None`: unbounded).
    pub capacity_maglev: Option<usize>,
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
            let Some(s) = self.services.get(&ServiceKey::set_slot(v.svc_id, slot)) else {
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
    fn batches(&self) -> bool {
        self.batches
    }
    fn maglev_capacity(&self) -> Option<usize> {
        self.capacity_maglev
    }
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
