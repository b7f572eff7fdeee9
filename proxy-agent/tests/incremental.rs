//! Property test of the incremental path: random interleavings of Service
//! and EndpointSlice add/update/delete events, applied as the Kubernetes
//! loop applies them (slice index -> the Services an event names ->
//! `Index::update` -> `SyncEngine::sync_changes`), leave the desired state
//! equal to `translate_all` of the final objects and the maps equal to a
//! full sync of that, up to the ids the engines chose. Services share
//! addresses on purpose, so precedence and conflicts change hands.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::prelude::*;
use proxy_agent::{
    incremental::{self, Index, ServiceId},
    store::SliceIndex,
    sync::{MemMaps, SyncEngine},
    translate::{self, NodeInfo},
};
use proxy_common::{Backend, SVC_F_MAGLEV, ServiceKey};

/// A backend as an ordered value.
type Bk = ([u8; 16], u16, u8, u32);

fn bk(b: &Backend) -> Bk {
    (b.addr, b.port, b.proto, u32::from(b.flags))
}
use serde_json::json;

fn node() -> NodeInfo {
    NodeInfo { name: "node-a".into(), zone: None, addresses: vec!["192.168.0.1".parse().unwrap()], snat: None }
}

/// A Service drawn from a small space, so addresses collide.
#[derive(Clone, Debug)]
struct SvcSpec {
    cluster_ip: u8,
    external_ip: Option<u8>,
    port: u16,
    node_port: Option<u16>,
    created: u8,
    affinity: bool,
    local: bool,
}

fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (1u8..4, prop::option::of(1u8..4), prop::sample::select(vec![80u16, 81]), prop::option::of(prop::sample::select(vec![30000u16, 30001])), 0u8..3, any::<bool>(), any::<bool>())
        .prop_map(|(cluster_ip, external_ip, port, node_port, created, affinity, local)| SvcSpec {
            cluster_ip,
            external_ip,
            port,
            node_port,
            created,
            affinity,
            local,
        })
}

/// Endpoints: (address index, ready, on this node).
type Eps = Vec<(u8, bool, bool)>;

#[derive(Clone, Debug)]
enum Ev {
    UpsertService(u8, SvcSpec),
    DeleteService(u8),
    /// Slice j of the universe, labelled for Service `owner`.
    UpsertSlice(u8, u8, Eps),
    DeleteSlice(u8),
}

fn event() -> impl Strategy<Value = Ev> {
    let eps = prop::collection::vec((1u8..6, any::<bool>(), any::<bool>()), 0..4);
    prop_oneof![
        3 => (0u8..4, svc_spec()).prop_map(|(i, s)| Ev::UpsertService(i, s)),
        1 => (0u8..4).prop_map(Ev::DeleteService),
        4 => (0u8..5, 0u8..4, eps).prop_map(|(j, o, e)| Ev::UpsertSlice(j, o, e)),
        1 => (0u8..5).prop_map(Ev::DeleteSlice),
    ]
}

fn service(i: u8, s: &SvcSpec, rv: u64) -> Service {
    let mut ports = json!({"name": "p", "port": s.port, "protocol": "TCP"});
    if let Some(np) = s.node_port {
        ports["nodePort"] = json!(np);
    }
    let mut spec = json!({
        "type": if s.node_port.is_some() { "NodePort" } else { "ClusterIP" },
        "clusterIP": format!("10.96.0.{}", s.cluster_ip),
        "ports": [ports],
    });
    if let Some(e) = s.external_ip {
        spec["externalIPs"] = json!([format!("10.96.0.{e}")]);
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    if s.local {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}"), "namespace": "ns", "resourceVersion": rv.to_string(),
            "creationTimestamp": format!("2026-01-0{}T00:00:00Z", s.created + 1)},
        "spec": spec,
    }))
    .unwrap()
}

fn slice(j: u8, owner: u8, eps: &Eps, rv: u64) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(a, ready, local)| {
            json!({"addresses": [format!("10.1.0.{a}")], "conditions": {"ready": ready},
                "nodeName": if *local { "node-a" } else { "node-b" }})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("slice{j}"), "namespace": "ns", "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": format!("s{owner}")}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// One frontend as a reader sees it: flags, affinity timeout, backends in
/// slot order, a digest of its Maglev table as backends, source ranges.
type FrontendView = (u16, u32, Vec<Bk>, Option<u64>, BTreeSet<([u8; 16], u32)>);

/// The maps as a reader sees them, with ids replaced by what they name.
#[derive(Debug, PartialEq, Eq)]
struct Canon {
    frontends: BTreeMap<ServiceKey, FrontendView>,
    /// Frontends sharing an affinity group.
    groups: BTreeSet<BTreeSet<ServiceKey>>,
    vips: BTreeMap<[u8; 16], u32>,
    backends: BTreeSet<Bk>,
    entries: (usize, usize, usize, usize),
}

fn canon(m: &MemMaps) -> Canon {
    let mut frontends = BTreeMap::new();
    let mut groups: BTreeMap<u32, BTreeSet<ServiceKey>> = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
        let backends: Vec<Bk> = m.reader_view(k).unwrap().expect("consistent").iter().map(bk).collect();
        used.extend(backends.iter().copied());
        let table = (v.flags & SVC_F_MAGLEV != 0).then(|| {
            // A digest of the table as backends (the ids differ by engine).
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for id in &m.maglev[&v.svc_id].backend_ids {
                std::hash::Hash::hash(&bk(&m.backends[id]), &mut h);
            }
            std::hash::Hasher::finish(&h)
        });
        let ranges = m.src_ranges.iter().filter(|(id, _)| *id == v.svc_id).map(|(_, r)| *r).collect();
        frontends.insert(*k, (v.flags, v.affinity_timeout_s, backends, table, ranges));
        if v.backend_id != 0 {
            groups.entry(v.backend_id).or_default().insert(*k);
        }
    }
    Canon {
        frontends,
        groups: groups.into_values().collect(),
        vips: m.vips.iter().map(|(a, v)| (*a, v.flags)).collect(),
        backends: m.backends.values().map(bk).collect(),
        entries: (m.services.len(), m.members.len(), m.maglev.len(), m.src_ranges.len()),
    }
    .check_no_stale(&used)
}

impl Canon {
    fn check_no_stale(self, used: &BTreeSet<Bk>) -> Self {
        assert_eq!(&self.backends, used, "no backend without a frontend");
        self
    }
}

/// The world the events build, and the incremental agent state beside it.
struct World {
    services: BTreeMap<u8, Service>,
    slices: BTreeMap<u8, EndpointSlice>,
    rv: u64,
    index: Index,
    slice_index: SliceIndex,
    engine: SyncEngine<MemMaps>,
}

impl World {
    fn new() -> Self {
        let mut slice_index = SliceIndex::default();
        slice_index.on_event(kube::runtime::watcher::Event::Init);
        slice_index.on_event(kube::runtime::watcher::Event::InitDone);
        let mut index = Index::default();
        let mut engine = SyncEngine::adopt(MemMaps::default()).unwrap();
        index.sync_all(std::iter::empty(), std::iter::empty(), &node());
        engine.sync(index.desired());
        World { services: BTreeMap::new(), slices: BTreeMap::new(), rv: 1, index, slice_index, engine }
    }

    /// Applies one batch of events as the Kubernetes loop does.
    fn apply(&mut self, batch: &[Ev]) -> proxy_agent::sync::SyncReport {
        use kube::runtime::watcher::Event;
        let mut dirty: BTreeSet<ServiceId> = BTreeSet::new();
        for ev in batch {
            self.rv += 1;
            match ev {
                Ev::UpsertService(i, s) => {
                    let svc = service(*i, s, self.rv);
                    dirty.insert(incremental::service_id(&svc));
                    self.services.insert(*i, svc);
                }
                Ev::DeleteService(i) => {
                    if let Some(svc) = self.services.remove(i) {
                        dirty.insert(incremental::service_id(&svc));
                    }
                }
                Ev::UpsertSlice(j, o, eps) => {
                    let s = slice(*j, *o, eps, self.rv);
                    self.slices.insert(*j, s.clone());
                    dirty.extend(self.slice_index.on_event(Event::Apply(s)).unwrap());
                }
                Ev::DeleteSlice(j) => {
                    if let Some(s) = self.slices.remove(j) {
                        dirty.extend(self.slice_index.on_event(Event::Delete(s)).unwrap());
                    }
                }
            }
        }
        let by_id: HashMap<ServiceId, &Service> =
            self.services.values().map(|s| (incremental::service_id(s), s)).collect();
        let changed = dirty.iter().map(|id| (id.clone(), by_id.get(id).copied(), self.slice_index.slices_of(id)));
        let delta = self.index.update(changed);
        let d = self.index.desired();
        self.engine.sync_changes(&incremental::frontend_changes(d, &delta), &incremental::vip_changes(d, &delta))
    }

    fn check(&self) {
        let services: Vec<Service> = self.services.values().cloned().collect();
        let slices: Vec<EndpointSlice> = self.slices.values().cloned().collect();
        let full = translate::translate_all(&services, &slices, &node());
        assert_eq!(self.index.desired().frontends, full.frontends, "desired frontends = a full recompute");
        assert_eq!(self.index.desired().vips, full.vips, "service addresses = a full recompute");
        let mut skipped = self.index.skipped();
        let mut want = full.skipped.clone();
        skipped.sort();
        want.sort();
        assert_eq!(skipped, want, "skips and conflicts = a full recompute");
        assert_eq!(self.engine.service_entries(), self.engine.maps().services.len(), "entry count kept exactly");
        let mut fresh = SyncEngine::adopt(MemMaps::default()).unwrap();
        assert!(fresh.sync(&full).failed.is_empty());
        let (got, want) = (canon(self.engine.maps()), canon(fresh.maps()));
        for (k, v) in &want.frontends {
            assert_eq!(got.frontends.get(k), Some(v), "frontend {k:?} as a full sync programs it");
        }
        assert_eq!(got.frontends.len(), want.frontends.len(), "no extra frontends");
        assert_eq!(got.groups, want.groups, "affinity groups");
        assert_eq!(got, want, "maps = a full sync of the final objects");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn incremental_events_equal_a_full_recompute(batches in prop::collection::vec(prop::collection::vec(event(), 1..4), 1..25)) {
        let mut w = World::new();
        for batch in &batches {
            let r = w.apply(batch);
            prop_assert!(r.failed.is_empty(), "{:?}", r.failed);
            w.check();
        }
        // The full path over the same engine afterwards writes nothing.
        let services: Vec<Service> = w.services.values().cloned().collect();
        let slices: Vec<EndpointSlice> = w.slices.values().cloned().collect();
        let d = translate::translate_all(&services, &slices, &node());
        let again = w.engine.sync(&d);
        prop_assert_eq!(again.writes + again.deletes, 0, "{:?}", again);
    }
}

#[test]
fn the_loser_of_a_contested_address_takes_over_when_the_winner_goes() {
    let mut w = World::new();
    let base = SvcSpec { cluster_ip: 1, external_ip: None, port: 80, node_port: None, created: 1, affinity: false, local: false };
    // s1's externalIP is s0's ClusterIP: s0 keeps it.
    w.apply(&[Ev::UpsertService(0, base.clone()), Ev::UpsertSlice(0, 0, vec![(1, true, true)])]);
    w.apply(&[
        Ev::UpsertService(1, SvcSpec { cluster_ip: 2, external_ip: Some(1), created: 0, ..base.clone() }),
        Ev::UpsertSlice(1, 1, vec![(2, true, true)]),
    ]);
    w.check();
    let vip = translate::FrontendAddr {
        ip: "10.96.0.1".parse().unwrap(),
        port: 80,
        proto: translate::Proto::Tcp,
        scope: translate::Scope::External,
    };
    assert_eq!(w.index.desired().frontends[&vip].owner, "ns/s0:p", "ClusterIP before externalIP, even older");
    assert!(w.index.skipped().iter().any(|s| s.owner == "ns/s1:p" && s.reason.label() == "conflict"));
    // The winner goes: the loser is programmed in the same (incremental) sync.
    w.apply(&[Ev::DeleteService(0)]);
    w.check();
    assert_eq!(w.index.desired().frontends[&vip].owner, "ns/s1:p");
    let key = proxy_agent::sync::frontend_key(&vip);
    let got = w.engine.maps().reader_view(&key).unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].addr, proxy_common::v4_mapped([10, 1, 0, 2]));
}

#[test]
fn a_port_with_more_than_65535_endpoints_is_rejected_and_others_are_programmed() {
    let svc = |name: &str, ip: &str| -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}}))
        .unwrap()
    };
    let eps = |n: usize| -> Vec<serde_json::Value> {
        (0..n).map(|i| json!({"addresses": [format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256)]})).collect()
    };
    let sl = |name: &str, owner: &str, n: usize| -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": eps(n)}))
        .unwrap()
    };
    let services = vec![svc("huge", "10.96.0.1"), svc("small", "10.96.0.2")];
    let slices = vec![sl("huge-a", "huge", 65_536), sl("small-a", "small", 2)];
    let d = translate::translate_all(&services, &slices, &node());
    let skip = d.skipped.iter().find(|s| s.owner == "ns/huge:p").expect("the huge port is reported");
    assert_eq!(skip.reason.label(), "too_many_endpoints");
    let msg = skip.reason.to_string();
    assert!(msg.contains("65536") && msg.contains("65535"), "names the count and the limit: {msg}");
    assert_eq!(d.frontends.len(), 1, "the other Service is programmed");
    assert_eq!(d.frontends.values().next().unwrap().owner, "ns/small:p");
    // At the limit itself the port is programmed.
    let slices = vec![sl("huge-a", "huge", 65_535)];
    let d = translate::translate_all(&services[..1], &slices, &node());
    assert_eq!(d.frontends.values().next().unwrap().backends.len(), 65_535);
    assert!(d.skipped.is_empty(), "{:?}", d.skipped);
    // The engine refuses a frontend beyond the limit with the same clear
    // reason (a desired state not from translation), and programs the rest.
    let mut big = d.clone();
    let fe = big.frontends.values_mut().next().unwrap();
    fe.backends.push(translate::BackendAddr { ip: "10.9.9.9".parse().unwrap(), port: 8080, local: false });
    let mut engine = SyncEngine::adopt(MemMaps::default()).unwrap();
    let r = engine.sync(&big);
    assert_eq!(r.failed.len(), 1);
    assert!(r.failed[0].0 == "ns/huge:p" && r.failed[0].1.contains("65536 backends exceed the limit of 65535"), "{:?}", r.failed);
}
