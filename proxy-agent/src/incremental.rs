//! Incremental translation: the desired state of the node kept up to date
//! one Service at a time.
//!
//! Watch events name the Services they touch; [`Index::update`] re-translates
//! only those and reports which frontend addresses and Service addresses
//! changed, so the sync engine diffs and writes only them. Frontend
//! precedence stays exact: every (address, port, protocol, scope) keeps the
//! list of Services that claim it (best first), so when the winner changes
//! or goes, the next claimant takes over. [`Index::sync_all`] brings the
//! index to a full set of objects (start, re-list, periodic resync) with the
//! same code, reusing unchanged Services' translations (by resourceVersion).
//! The result equals [`crate::translate::translate_all`] of the same
//! objects; a property test checks it.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::translate::{
    Desired, Frontend, FrontendAddr, NodeInfo, Proto, SERVICE_NAME_LABEL, Scope, Skip, Translation, conflict,
    fingerprint, kind_rank, translate_service, vip_flags,
};

/// A Service by (namespace, name).
pub type ServiceId = (String, String);

/// The Service an EndpointSlice belongs to (its namespace and
/// `kubernetes.io/service-name` label), if it names one.
#[must_use]
pub fn slice_owner(slice: &EndpointSlice) -> Option<ServiceId> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.clone().unwrap_or_else(|| "default".into()), svc.clone()))
}

/// The id of a Service object.
#[must_use]
pub fn service_id(svc: &Service) -> ServiceId {
    (
        svc.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// Who keeps a contested frontend address: ClusterIP before NodePort before
/// LoadBalancer/externalIP, then the older Service, then namespace/name,
/// then the order within the Service (as `translate_all` resolves it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    kind: u8,
    created: Option<k8s_openapi::jiff::Timestamp>,
    id: Arc<ServiceId>,
    /// Index of the frontend in the Service's translation.
    idx: usize,
}

struct Entry {
    created: Option<k8s_openapi::jiff::Timestamp>,
    fingerprint: Option<String>,
    t: Translation,
    /// The full sync that last saw the Service ([`Index::begin_full`]).
    generation: u64,
}

/// A full sync in progress: [`Index::begin_full`], [`Index::full_service`]
/// for every Service, [`Index::finish_full`].
#[derive(Debug, Default)]
pub struct FullSync {
    delta: Delta,
}

/// What one update changed in the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Frontend addresses whose desired frontend changed (look it up in
    /// [`Index::desired`]; absent means remove).
    pub frontends: BTreeSet<FrontendAddr>,
    /// Service addresses whose flags changed (absent from
    /// [`Desired::vips`] means remove).
    pub vips: BTreeSet<IpAddr>,
}

impl Delta {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.vips.is_empty()
    }
}

/// The desired state, by Service, with the claimants of every address.
#[derive(Default)]
pub struct Index {
    node: Option<NodeInfo>,
    services: HashMap<Arc<ServiceId>, Entry>,
    /// Claimants of each frontend address, best first (a sorted `Vec`: most
    /// addresses have one, and a B-tree node would cost a kilobyte each).
    claims: HashMap<FrontendAddr, Vec<Claim>>,
    /// The winners (`skipped` is not kept here: see [`Index::skipped`]).
    desired: Desired,
    /// Services whose translation skipped something.
    with_skips: HashSet<ServiceId>,
    /// Addresses with more than one claimant (conflicts to report).
    contested: HashSet<FrontendAddr>,
    /// Counts full syncs: a Service a full sync did not see is gone.
    generation: u64,
}

/// Every frontend address at `ip`, as a range of the ordered map.
fn ip_range(ip: IpAddr) -> std::ops::RangeInclusive<FrontendAddr> {
    let lo = FrontendAddr { ip, port: 0, proto: Proto::Tcp, scope: Scope::External };
    let hi = FrontendAddr { ip, port: u16::MAX, proto: Proto::Sctp, scope: Scope::Internal };
    lo..=hi
}

impl Index {
    /// The desired state of every Service the index holds.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Whether the index was built for `node` (else every Service must be
    /// translated again: [`Index::sync_all`]).
    #[must_use]
    pub fn is_for(&self, node: &NodeInfo) -> bool {
        self.node.as_ref() == Some(node)
    }

    /// Number of Services held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// What was not programmed and why: the Services' own skips and the
    /// losers of contested addresses.
    #[must_use]
    pub fn skipped(&self) -> Vec<Skip> {
        let mut out: Vec<Skip> = Vec::new();
        for id in &self.with_skips {
            if let Some(e) = self.services.get(id) {
                out.extend(e.t.skipped.iter().cloned());
            }
        }
        for claims in self.contested.iter().filter_map(|a| self.claims.get(a)) {
            let mut it = claims.iter();
            let Some(winner) = it.next().and_then(|c| self.frontend(c)) else { continue };
            for c in it {
                if let Some(lost) = self.frontend(c) {
                    out.push(conflict(lost, &winner.owner));
                }
            }
        }
        out
    }

    fn frontend(&self, c: &Claim) -> Option<&Frontend> {
        self.services.get(&c.id)?.t.frontends.get(c.idx)
    }

    /// Brings the index to exactly `services` and their `slices`; returns
    /// what changed. A different `node` re-translates everything.
    pub fn sync_all<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        node: &NodeInfo,
    ) -> Delta {
        let mut full = self.begin_full(node);
        let mut by_owner: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::with_capacity(self.services.len());
        for s in slices {
            if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                let ns = s.metadata.namespace.as_deref().unwrap_or("default");
                by_owner.entry((ns, svc.as_str())).or_default().push(s);
            }
        }
        let empty = Vec::new();
        for svc in services {
            let id = service_id(svc);
            let svc_slices = by_owner.get(&(id.0.as_str(), id.1.as_str())).unwrap_or(&empty);
            self.full_service(&mut full, &id, svc, svc_slices);
        }
        self.finish_full(full)
    }

    /// Starts bringing the index to a full set of Services (what
    /// [`Index::sync_all`] does, one Service at a time, so the caller need
    /// not hold every object at once). A different `node` re-translates
    /// everything.
    pub fn begin_full(&mut self, node: &NodeInfo) -> FullSync {
        let mut delta = Delta::default();
        if !self.is_for(node) {
            // Every Service's translation depends on the node: start over,
            // reporting every address that was or will be programmed.
            delta.frontends.extend(self.desired.frontends.keys().copied());
            delta.vips.extend(self.desired.vips.keys().copied());
            self.services.clear();
            self.claims.clear();
            self.with_skips.clear();
            self.contested.clear();
            self.node = Some(node.clone());
            if let Some(a) = node.snat_address() {
                delta.vips.insert(IpAddr::V4(a));
            }
        }
        self.generation += 1;
        FullSync { delta }
    }

    /// One Service of a full sync, with its slices. A Service given twice
    /// keeps the last.
    pub fn full_service(&mut self, full: &mut FullSync, id: &ServiceId, svc: &Service, slices: &[&EndpointSlice]) {
        self.update_one(id, Some(svc), slices, &mut full.delta);
        if let Some(e) = self.services.get_mut(id) {
            e.generation = self.generation;
        }
    }

    /// Ends a full sync: the Services it did not see go. Returns what changed.
    pub fn finish_full(&mut self, full: FullSync) -> Delta {
        let FullSync { mut delta } = full;
        let gone: Vec<Arc<ServiceId>> =
            self.services.iter().filter(|(_, e)| e.generation != self.generation).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.update_one(&id, None, &[], &mut delta);
        }
        self.settle(&mut delta);
        // Settling inserts in address order, which leaves B-tree nodes a
        // little over half full; when most of the map was written (the
        // first sync, a node change) it is rebuilt packed, ~40% smaller.
        let n = self.desired.frontends.len();
        if n >= 1024 && delta.frontends.len() >= n / 2 {
            self.desired.frontends = std::mem::take(&mut self.desired.frontends).into_iter().collect();
            self.desired.vips = std::mem::take(&mut self.desired.vips).into_iter().collect();
        }
        delta
    }

    /// Re-translates the named Services (`None`: deleted) with their slices;
    /// returns what changed. The index must be for the current node
    /// ([`Index::is_for`]); otherwise call [`Index::sync_all`].
    pub fn update<'a>(&mut self, changed: impl IntoIterator<Item = (ServiceId, Option<&'a Service>, Vec<&'a EndpointSlice>)>) -> Delta {
        let mut delta = Delta::default();
        for (id, svc, slices) in changed {
            self.update_one(&id, svc, &slices, &mut delta);
        }
        self.settle(&mut delta);
        delta
    }

    /// Replaces one Service's claims; the touched addresses go to `delta`
    /// (as candidates, settled by [`Index::settle`]).
    fn update_one(&mut self, id: &ServiceId, svc: Option<&Service>, slices: &[&EndpointSlice], delta: &mut Delta) {
        let fp = svc.and_then(|s| fingerprint(s, slices));
        if let (Some(fp), Some(e)) = (&fp, self.services.get(id))
            && e.fingerprint.as_ref() == Some(fp)
        {
            return; // unchanged
        }
        let fresh = svc.map(|svc| {
            let no_node = NodeInfo::default();
            let mut t = translate_service(svc, slices, self.node.as_ref().unwrap_or(&no_node));
            // Kept until the Service changes: no spare capacity (most have
            // one or two frontends, a growing Vec holds four).
            t.frontends.shrink_to_fit();
            t.skipped.shrink_to_fit();
            (svc.metadata.creation_timestamp.as_ref().map(|t| t.0), t)
        });
        // The same translation (objects without resourceVersions, as in
        // standalone mode, are translated on every full sync): the claims
        // stand, and the entry is kept rather than rebuilt.
        if let (Some((created, t)), Some(e)) = (&fresh, self.services.get_mut(id))
            && e.created == *created
            && e.t == *t
        {
            e.fingerprint = fp;
            return;
        }
        let mut key = None;
        if let Some((k, old)) = self.services.remove_entry(id) {
            for (idx, fe) in old.t.frontends.iter().enumerate() {
                let c = Claim { kind: kind_rank(fe.kind), created: old.created, id: k.clone(), idx };
                if let Some(set) = self.claims.get_mut(&fe.addr) {
                    if let Ok(i) = set.binary_search(&c) {
                        set.remove(i);
                    }
                    if set.len() < 2 {
                        self.contested.remove(&fe.addr);
                    }
                    if set.is_empty() {
                        self.claims.remove(&fe.addr);
                    }
                }
                delta.frontends.insert(fe.addr);
            }
            self.with_skips.remove(id);
            key = Some(k);
        }
        let Some((created, t)) = fresh else { return };
        // One copy of the id, shared by the entry and its claims.
        let key = key.unwrap_or_else(|| Arc::new(id.clone()));
        for (idx, fe) in t.frontends.iter().enumerate() {
            let c = Claim { kind: kind_rank(fe.kind), created, id: key.clone(), idx };
            let set = self.claims.entry(fe.addr).or_insert_with(|| Vec::with_capacity(1));
            if let Err(i) = set.binary_search(&c) {
                set.insert(i, c);
            }
            if set.len() > 1 {
                self.contested.insert(fe.addr);
            }
            delta.frontends.insert(fe.addr);
        }
        if !t.skipped.is_empty() {
            self.with_skips.insert(id.clone());
        }
        self.services.insert(key, Entry { created, fingerprint: fp, t, generation: self.generation });
    }

    /// Resolves the touched addresses to their winners, keeps in `delta`
    /// only those whose desired frontend changed, and recomputes the flags
    /// of their Service addresses.
    fn settle(&mut self, delta: &mut Delta) {
        let mut ips: BTreeSet<IpAddr> = std::mem::take(&mut delta.vips);
        let node = self.node.clone().unwrap_or_default();
        delta.frontends.retain(|addr| {
            let winner = self
                .claims
                .get(addr)
                .and_then(|set| set.first())
                .and_then(|c| self.services.get(&c.id)?.t.frontends.get(c.idx));
            let same = match (winner, self.desired.frontends.get(addr)) {
                (Some(w), Some(cur)) => w == cur,
                (None, None) => true,
                _ => false,
            };
            if same {
                return false;
            }
            match winner {
                Some(w) => {
                    self.desired.frontends.insert(*addr, w.clone());
                }
                None => {
                    self.desired.frontends.remove(addr);
                }
            }
            ips.insert(addr.ip);
            true
        });
        for ip in ips {
            let mut flags: Option<u32> = None;
            for fe in self.desired.frontends.range(ip_range(ip)).map(|(_, fe)| fe) {
                *flags.get_or_insert(0) |= vip_flags(fe, &node);
            }
            // Replies of SNATed flows come back to the SNAT address.
            if node.snat_address().map(IpAddr::V4) == Some(ip) {
                *flags.get_or_insert(0) |= proxy_common::VIP_F_NODE;
            }
            if self.desired.vips.get(&ip).copied() != flags {
                match flags {
                    Some(f) => self.desired.vips.insert(ip, f),
                    None => self.desired.vips.remove(&ip),
                };
                delta.vips.insert(ip);
            }
        }
    }
}

/// The frontends of `delta` as the engine takes them: address and desired
/// frontend (`None`: remove).
#[must_use]
pub fn frontend_changes<'a>(desired: &'a Desired, delta: &Delta) -> Vec<(FrontendAddr, Option<&'a Frontend>)> {
    delta.frontends.iter().map(|a| (*a, desired.frontends.get(a))).collect()
}

/// The Service addresses of `delta` with their desired flags (`None`:
/// remove).
#[must_use]
pub fn vip_changes(desired: &Desired, delta: &Delta) -> Vec<(IpAddr, Option<u32>)> {
    delta.vips.iter().map(|ip| (*ip, desired.vips.get(ip).copied())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::translate_all;

    fn svc(name: &str, ip: &str, node_port: u16) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"type": "NodePort", "clusterIP": ip, "ports": [{"name": "p", "port": 80, "nodePort": node_port}]},
        }))
        .unwrap()
    }

    fn node(addr: &str) -> NodeInfo {
        NodeInfo { name: "n".into(), zone: None, addresses: vec![addr.parse().unwrap()], snat: None }
    }

    #[test]
    fn objects_without_resource_versions_are_retranslated_and_unchanged_ones_change_nothing() {
        let mk = |name: &str, ip: &str, port: u16| -> Service {
            let mut s = svc(name, ip, port);
            s.metadata.resource_version = None;
            s
        };
        let n = node("192.168.0.1");
        let mut services = vec![mk("a", "10.96.0.1", 30001), mk("b", "10.96.0.2", 30002)];
        let mut ix = Index::default();
        assert_eq!(ix.sync_all(&services, [], &n).frontends.len(), 4);
        assert!(ix.sync_all(&services, [], &n).is_empty(), "the same translations: nothing moves");
        // A change is still seen without a resourceVersion.
        services[1] = mk("b", "10.96.0.2", 30003);
        let d = ix.sync_all(&services, [], &n);
        assert_eq!(d.frontends.len(), 2, "b's old and new NodePort: {d:?}");
        assert_eq!(ix.desired().frontends, translate_all(&services, &[], &n).frontends);
        // b now claims a's ClusterIP too: a (older by name) keeps it, and
        // gets it back unchanged when b lets go.
        services[1] = mk("b", "10.96.0.1", 30003);
        ix.sync_all(&services, [], &n);
        assert_eq!(ix.desired().frontends, translate_all(&services, &[], &n).frontends);
        assert_eq!(ix.skipped().len(), 1, "{:?}", ix.skipped());
        services.truncate(1);
        ix.sync_all(&services, [], &n);
        assert_eq!(ix.desired().frontends, translate_all(&services, &[], &n).frontends);
        assert!(ix.skipped().is_empty());
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn a_large_first_sync_packs_the_desired_state_and_keeps_it_exact() {
        let n = node("192.168.0.1");
        let services: Vec<Service> = (0..1500u16)
            .map(|i| svc(&format!("s{i}"), &format!("10.96.{}.{}", i / 250, i % 250 + 1), 30000 + i))
            .collect();
        let mut ix = Index::default();
        assert_eq!(ix.sync_all(&services, [], &n).frontends.len(), 3000);
        let want = translate_all(&services, &[], &n);
        assert_eq!(ix.desired().frontends, want.frontends);
        assert_eq!(ix.desired().vips, want.vips);
        // Later changes land in the packed map as in any other.
        let d = ix.update([(("ns".to_owned(), "s7".to_owned()), None, vec![])]);
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(ix.desired().frontends, translate_all(&services[..7], &[], &n).frontends.into_iter().chain(translate_all(&services[8..], &[], &n).frontends).collect());
    }

    #[test]
    fn a_node_change_retranslates_everything_and_reports_what_went() {
        let services = vec![svc("a", "10.96.0.1", 30001), svc("b", "10.96.0.2", 30002)];
        let mut ix = Index::default();
        let first = ix.sync_all(&services, [], &node("192.168.0.1"));
        assert_eq!(ix.desired().frontends, translate_all(&services, &[], &node("192.168.0.1")).frontends);
        assert_eq!(first.frontends.len(), 4, "two ClusterIPs and two NodePorts");
        // Same objects, same node: nothing to do.
        assert!(ix.sync_all(&services, [], &node("192.168.0.1")).is_empty());
        // The node's address changes: the old NodePorts go, new ones come.
        let d = ix.sync_all(&services, [], &node("192.168.0.2"));
        let want = translate_all(&services, &[], &node("192.168.0.2"));
        assert_eq!(ix.desired().frontends, want.frontends);
        assert_eq!(ix.desired().vips, want.vips);
        let old: IpAddr = "192.168.0.1".parse().unwrap();
        assert!(d.frontends.iter().filter(|a| a.ip == old).count() == 2, "the old NodePorts are reported: {d:?}");
        assert!(d.vips.contains(&old) && !ix.desired().vips.contains_key(&old), "the old node address goes");
        // A deleted Service's frontends go in an update.
        let d = ix.update([(("ns".to_owned(), "a".to_owned()), None, vec![])]);
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(ix.desired().frontends, translate_all(&services[1..], &[], &node("192.168.0.2")).frontends);
    }
}
