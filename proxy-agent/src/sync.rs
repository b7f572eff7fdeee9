//! Desired state -> map writes.
//!
//! The engine keeps a mirror of what the maps hold, diffs the desired state
//! against it and writes only the difference, in an order that never lets a
//! packet see a frontend with a partial or empty backend set:
//! 1. new backends are written before any slot refers to them;
//! 2. a frontend's new slots are written before its count (slot 0) grows, and
//!    its count shrinks before surplus slots are deleted;
//! 3. removed frontends lose slot 0 first, then their slots;
//! 4. backends no slot refers to any more are deleted last.
//!
//! On start the mirror is read back from the (pinned) maps, so a restarted
//! agent adopts what its predecessor wrote and only fixes the difference.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use proxy_common::{Backend, SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_NODE_ADDR, ServiceKey, ServiceValue, v4_mapped};

use crate::translate::{BackendAddr, Desired, Frontend, FrontendAddr, FrontendKind};

/// Largest number of backends one frontend can hold (slot index is u16).
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("map {map}: {source}")]
    Io { map: &'static str, source: std::io::Error },
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
}

/// What a frontend looks like in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Programmed {
    value: ServiceValue,
    /// `slots[i]` is the backend id at slot i+1 (whatever is in the map,
    /// which may be more than `value.count` mid-update).
    slots: Vec<u32>,
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

pub struct SyncEngine<M: MapOps> {
    maps: M,
    frontends: BTreeMap<ServiceKey, Programmed>,
    backend_ids: HashMap<Backend, u32>,
    backends: BTreeMap<u32, Backend>,
    next_backend_id: u32,
    next_svc_id: u32,
}

/// The map key of a frontend (slot 0).
#[must_use]
pub fn frontend_key(addr: &FrontendAddr) -> ServiceKey {
    ServiceKey {
        addr: ip16(addr.ip),
        port: addr.port,
        proto: addr.proto.number(),
        scope: SCOPE_EXTERNAL,
        slot: 0,
        _pad: 0,
    }
}

fn ip16(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

fn backend_value(b: &BackendAddr, proto: u8) -> Backend {
    Backend { addr: ip16(b.ip), port: b.port, proto, flags: 0 }
}

impl<M: MapOps> SyncEngine<M> {
    /// Reads the current map contents into the mirror.
    pub fn adopt(maps: M) -> Result<Self, MapError> {
        let mut frontends: BTreeMap<ServiceKey, Programmed> = BTreeMap::new();
        let mut slot_entries: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        let mut max_svc_id = 0;
        for (k, v) in maps.services()? {
            if k.slot == 0 {
                max_svc_id = max_svc_id.max(v.svc_id);
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
        let backends: BTreeMap<u32, Backend> = maps.backends()?.into_iter().collect();
        let backend_ids = backends.iter().map(|(id, b)| (*b, *id)).collect();
        let next_backend_id = backends.keys().next_back().map_or(1, |m| m + 1);
        let mut engine = SyncEngine {
            maps,
            frontends,
            backend_ids,
            backends,
            next_backend_id,
            next_svc_id: max_svc_id + 1,
        };
        // Slots with no frontend or a gap before them are leftovers of an
        // interrupted write; nothing can reach them.
        for k in orphans {
            engine.maps.del_service(k)?;
        }
        Ok(engine)
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
        self.frontends.values().map(|p| 1 + p.slots.len()).sum()
    }

    /// Number of programmed frontends and backends.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Brings the maps to `desired`, writing only the difference.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted: BTreeMap<ServiceKey, &Frontend> =
            desired.frontends.values().map(|f| (frontend_key(&f.addr), f)).collect();

        // Frontends: add or update.
        for (key, fe) in &wanted {
            if let Err(e) = self.sync_frontend(*key, fe, &mut report) {
                report.failed.push((fe.owner.clone(), e.to_string()));
            }
        }
        // Frontends: remove.
        let stale: Vec<ServiceKey> =
            self.frontends.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in stale {
            if let Err(e) = self.remove_frontend(key, &mut report) {
                report.failed.push((format!("{key:?}"), e.to_string()));
            }
        }
        // Backends nothing refers to any more.
        let used: BTreeSet<u32> = self.frontends.values().flat_map(|p| p.slots.iter().copied()).collect();
        let unused: Vec<u32> = self.backends.keys().filter(|id| !used.contains(id)).copied().collect();
        for id in unused {
            match self.maps.del_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    if let Some(b) = self.backends.remove(&id) {
                        self.backend_ids.remove(&b);
                        report.removed_backends.push((id, b));
                    }
                }
                Err(e) => report.failed.push((format!("backend {id}"), e.to_string())),
            }
        }
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report
    }

    fn backend_id(&mut self, b: Backend, report: &mut SyncReport) -> Result<u32, MapError> {
        if let Some(id) = self.backend_ids.get(&b) {
            return Ok(*id);
        }
        let id = self.next_backend_id;
        self.maps.put_backend(id, b)?;
        report.writes += 1;
        self.next_backend_id += 1;
        self.backends.insert(id, b);
        self.backend_ids.insert(b, id);
        Ok(id)
    }

    fn sync_frontend(&mut self, key: ServiceKey, fe: &Frontend, report: &mut SyncReport) -> Result<(), MapError> {
        if fe.backends.len() > MAX_BACKENDS_PER_FRONTEND {
            return Err(MapError::Full { map: proxy_common::MAP_SERVICES });
        }
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            ids.push(self.backend_id(backend_value(b, key.proto), report)?);
        }
        let current = self.frontends.get(&key);
        let svc_id = match current {
            Some(p) if p.value.svc_id != 0 => p.value.svc_id,
            _ => {
                let id = self.next_svc_id;
                self.next_svc_id += 1;
                id
            }
        };
        let value = ServiceValue {
            backend_id: 0,
            count: ids.len() as u16,
            flags: if fe.affinity_timeout_s.is_some() { SVC_F_AFFINITY } else { 0 }
                | if fe.kind == FrontendKind::NodePort { SVC_F_NODE_ADDR } else { 0 },
            svc_id,
            affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
        };
        // The common case on a large cluster: nothing changed; no copy.
        if current.is_some_and(|p| p.value == value && p.slots == ids) {
            return Ok(());
        }
        let is_new = current.is_none();
        let mut prog = current.cloned().unwrap_or_default();
        // Slots first. Readers use the old count meanwhile; every slot they
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
        // Then the count: from here on readers see exactly the new set.
        if is_new || prog.value != value {
            if let Err(e) = self.maps.put_service(key, value) {
                self.store(key, prog, is_new);
                return Err(e);
            }
            report.writes += 1;
            prog.value = value;
        }
        // Then surplus slots, which no reader can reach any more.
        while prog.slots.len() > ids.len() {
            let slot_key = ServiceKey { slot: prog.slots.len() as u16, ..key };
            if let Err(e) = self.maps.del_service(slot_key) {
                self.frontends.insert(key, prog);
                return Err(e);
            }
            report.deletes += 1;
            prog.slots.pop();
        }
        self.frontends.insert(key, prog);
        Ok(())
    }

    /// Keeps the mirror exact after a partial write. A new frontend whose
    /// slot 0 was never written is not programmed; its slots stay tracked
    /// under a placeholder so they are cleaned up.
    fn store(&mut self, key: ServiceKey, prog: Programmed, is_new: bool) {
        if is_new && prog.slots.is_empty() {
            return;
        }
        if is_new {
            // Slots written, slot 0 not: delete them again.
            for i in (1..=prog.slots.len()).rev() {
                let _ = self.maps.del_service(ServiceKey { slot: i as u16, ..key });
            }
            return;
        }
        self.frontends.insert(key, prog);
    }

    fn remove_frontend(&mut self, key: ServiceKey, report: &mut SyncReport) -> Result<(), MapError> {
        let Some(mut prog) = self.frontends.remove(&key) else { return Ok(()) };
        if let Err(e) = self.maps.del_service(key) {
            self.frontends.insert(key, prog);
            return Err(e);
        }
        report.deletes += 1;
        while let Some(_) = prog.slots.last() {
            let slot_key = ServiceKey { slot: prog.slots.len() as u16, ..key };
            self.maps.del_service(slot_key)?;
            report.deletes += 1;
            prog.slots.pop();
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
            out.push(*b);
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
}
