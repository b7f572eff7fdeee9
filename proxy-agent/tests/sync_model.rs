//! Property test of the sync engine: random sequences of Service/endpoint
//! changes (and agent restarts) leave the maps equal to the model, and no
//! intermediate map state exposes a frontend with a partial, dangling or
//! empty backend set when it had backends before and after the change.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use proptest::prelude::*;
use proxy_agent::{
    sync::{MemMaps, SyncEngine, frontend_key},
    translate::{BackendAddr, BackendList, Desired, Frontend, FrontendAddr, FrontendKind, Proto, Scope, SourceRange},
};
use proxy_common::ServiceKey;

thread_local! {
    /// Frontends that must show a complete non-empty set in every state.
    static MUST_STAY: RefCell<BTreeSet<ServiceKey>> = const { RefCell::new(BTreeSet::new()) };
    static VIOLATIONS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn observe(m: &MemMaps) {
    for (k, _) in m.services.iter().filter(|(k, _)| k.slot == 0) {
        if let Some(Err(e)) = m.reader_view(k) {
            VIOLATIONS.with(|v| v.borrow_mut().push(format!("{k:?}: {e}")));
        }
    }
    MUST_STAY.with(|s| {
        for k in s.borrow().iter() {
            match m.reader_view(k) {
                Some(Ok(b)) if !b.is_empty() => {}
                other => VIOLATIONS.with(|v| v.borrow_mut().push(format!("{k:?} lost its backends: {other:?}"))),
            }
        }
    });
}

fn fe_addr(i: u8) -> FrontendAddr {
    FrontendAddr {
        ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, i)),
        port: 80,
        proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp },
        scope: if i % 5 == 0 { Scope::Internal } else { Scope::External },
    }
}

fn backend(i: u8) -> BackendAddr {
    BackendAddr { ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, i)), port: 8080, local: i % 3 == 0 }
}

/// A desired state: for each of 6 frontends, absent or a set of backends
/// (bitmask over 8 backends), with or without affinity.
fn desired_strategy() -> impl Strategy<Value = Vec<Option<(u8, bool)>>> {
    prop::collection::vec(prop::option::of((any::<u8>(), any::<bool>())), 6)
}

fn build(state: &[Option<(u8, bool)>]) -> Desired {
    let mut d = Desired::default();
    for (i, s) in state.iter().enumerate() {
        if let Some((mask, aff)) = s {
            let addr = fe_addr(i as u8 + 1);
            let backends = (0..8).filter(|b| mask & (1 << b) != 0).map(|b| backend(b + 1)).collect();
            d.frontends.insert(
                addr,
                Frontend {
                    addr,
                    kind: FrontendKind::ClusterIp,
                    // Frontends 1 and 3, 2 and 4 (same protocol) have one
                    // owner each: with the same backends they share one
                    // backend set, otherwise each has its own.
                    owner: format!("ns/svc{}", if i < 4 { i % 2 } else { i }),
                    backends,
                    list: BackendList::Internal,
                    affinity_timeout_s: aff.then_some(30),
                    drop_when_empty: false,
                    two_scopes: i % 5 == 1,
                    source_ranges: aff.then(|| {
                        vec![SourceRange { ip: Ipv4Addr::new(192, 168, i as u8, 0), len: 24 }]
                    }),
                },
            );
        }
    }
    d
}

fn assert_maps_equal_model(m: &MemMaps, d: &Desired) {
    let mut expected_entries = 0;
    let mut used = BTreeSet::new();
    let mut sets: BTreeMap<u32, usize> = BTreeMap::new();
    for f in d.frontends.values() {
        let key = frontend_key(&f.addr);
        let view = m.reader_view(&key).expect("frontend programmed").expect("consistent");
        let got: Vec<(Vec<u8>, u16)> = view.iter().map(|b| (b.addr.to_vec(), b.port)).collect();
        let want: Vec<(Vec<u8>, u16)> = f
            .backends
            .iter()
            .map(|b| match b.ip {
                IpAddr::V4(v4) => (proxy_common::v4_mapped(v4.octets()).to_vec(), b.port),
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, want, "backends of {:?}", f.addr);
        let v = m.services[&key];
        assert_eq!(v.affinity_timeout_s, f.affinity_timeout_s.unwrap_or(0));
        expected_entries += 1;
        for slot in 1..=v.count {
            used.insert(m.services[&ServiceKey::set_slot(v.svc_id, slot)].backend_id);
        }
        sets.entry(v.svc_id).or_insert_with(|| f.backends.len());
    }
    // Frontends of one owner with the same backends share a set.
    let mut by_owner: BTreeMap<&str, Vec<&Frontend>> = BTreeMap::new();
    for f in d.frontends.values() {
        by_owner.entry(f.owner.as_str()).or_default().push(f);
    }
    for fs in by_owner.values() {
        let share = fs.len() == 2 && fs[0].backends == fs[1].backends;
        let ids: BTreeSet<u32> = fs.iter().map(|f| m.services[&frontend_key(&f.addr)].svc_id).collect();
        assert_eq!(ids.len(), if share { 1 } else { fs.len() }, "sets of {}", fs[0].owner);
    }
    expected_entries += sets.values().sum::<usize>();
    assert_eq!(m.services.len(), expected_entries, "no stale frontends or slots");
    let ids: BTreeSet<u32> = m.backends.keys().copied().collect();
    assert_eq!(ids, used, "no stale backends");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn sync_engine_matches_model(steps in prop::collection::vec((desired_strategy(), any::<bool>()), 1..12), batches in any::<bool>()) {
        // Batched: the full sync's writes queued and applied group by group
        // at each barrier, as the real maps take them; every intermediate
        // state is checked all the same.
        let maps = MemMaps { observer: Some(observe), batches, ..MemMaps::default() };
        let mut engine = SyncEngine::adopt(maps).unwrap();
        let mut before: BTreeMap<ServiceKey, usize> = BTreeMap::new();
        for (state, restart) in steps {
            if restart {
                // A new agent adopting what the old one left.
                let maps = engine.maps().clone();
                engine = SyncEngine::adopt(maps).unwrap();
            }
            let d = build(&state);
            let after: BTreeMap<ServiceKey, usize> =
                d.frontends.values().map(|f| (frontend_key(&f.addr), f.backends.len())).collect();
            let stay: BTreeSet<ServiceKey> = after
                .iter()
                .filter(|(k, n)| **n > 0 && before.get(*k).is_some_and(|b| *b > 0))
                .map(|(k, _)| *k)
                .collect();
            MUST_STAY.with(|s| *s.borrow_mut() = stay);
            VIOLATIONS.with(|v| v.borrow_mut().clear());
            let report = engine.sync(&d);
            MUST_STAY.with(|s| s.borrow_mut().clear());
            prop_assert!(report.failed.is_empty(), "{:?}", report.failed);
            let violations = VIOLATIONS.with(|v| v.borrow().clone());
            prop_assert!(violations.is_empty(), "intermediate states: {:?}", violations);
            assert_maps_equal_model(engine.maps(), &d);
            // A second sync of the same state writes nothing.
            let again = engine.sync(&d);
            prop_assert_eq!(again.writes + again.deletes, 0);
            before = after;
        }
    }
}

#[test]
fn full_map_fails_one_frontend_not_the_others() {
    for batches in [false, true] {
        full_map_fails_one_frontend_not_the_others_with(batches);
    }
}

/// With batches, the failed batch sends the sync back to write-by-write,
/// which pins the failure on the one frontend.
fn full_map_fails_one_frontend_not_the_others_with(batches: bool) {
    let maps = MemMaps { capacity_services: Some(5), batches, ..MemMaps::default() };
    let mut engine = SyncEngine::adopt(maps).unwrap();
    // Frontend 1 needs 1+2 entries, frontend 2 needs 1+3: only one fits.
    let d = build(&[Some((0b11, false)), Some((0b111, false))]);
    let r = engine.sync(&d);
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(r.failed[0].1.contains("full"), "{r:?}");
    let k1 = frontend_key(&fe_addr(1));
    assert_eq!(engine.maps().reader_view(&k1).unwrap().unwrap().len(), 2, "the frontend that fit is programmed");
    // No half-programmed frontend 2 left behind.
    let k2 = frontend_key(&fe_addr(2));
    assert!(engine.maps().reader_view(&k2).is_none());
    assert!(engine.maps().services.len() <= 5);
}

#[test]
fn ids_are_never_reused_across_restarts() {
    use proxy_agent::sync::MapOps as _;
    let mut engine = SyncEngine::adopt(MemMaps::default()).unwrap();
    let one = build(&[Some((0b11, false))]);
    engine.sync(&one);
    let ids = |m: &MemMaps| -> (BTreeSet<u32>, BTreeSet<u32>) {
        (m.backends.keys().copied().collect(), m.services.iter().filter(|(k, _)| k.slot == 0).map(|(_, v)| v.svc_id).collect())
    };
    let (b1, s1) = ids(engine.maps());
    // Everything removed, then the agent restarts on the same maps.
    engine.sync(&Desired::default());
    assert!(engine.maps().services().unwrap().is_empty() && engine.maps().backends().unwrap().is_empty());
    let maps = engine.maps().clone();
    let mut engine = SyncEngine::adopt(maps).unwrap();
    engine.sync(&build(&[Some((0b1100, false))]));
    let (b2, s2) = ids(engine.maps());
    assert!(b2.iter().all(|id| b1.iter().all(|old| id > old)), "backend ids {b2:?} reuse none of {b1:?}");
    assert!(s2.iter().all(|id| s1.iter().all(|old| id > old)), "frontend ids {s2:?} reuse none of {s1:?}");
}

#[test]
fn membership_and_maglev_tables_follow_the_backend_set() {
    let mut engine = SyncEngine::adopt(MemMaps::default()).unwrap();
    engine.sync(&build(&[Some((0b111, false))]));
    let m = engine.maps();
    let fe = m.services.iter().find(|(k, _)| k.slot == 0).map(|(_, v)| *v).unwrap();
    assert_eq!(m.members.iter().filter(|k| k.svc_id == fe.svc_id).count(), 3);
    let table = m.maglev.get(&fe.svc_id).expect("a Maglev table");
    let used: BTreeSet<u32> = table.backend_ids.iter().copied().collect();
    assert_eq!(used.len(), 3, "the table spreads over the three backends");
    engine.sync(&build(&[Some((0b011, false))]));
    let m = engine.maps();
    assert_eq!(m.members.iter().filter(|k| k.svc_id == fe.svc_id).count(), 2, "the member that left is gone");
    let used: BTreeSet<u32> = m.maglev[&fe.svc_id].backend_ids.iter().copied().collect();
    assert_eq!(used.len(), 2, "the table no longer names it");
    engine.sync(&Desired::default());
    assert!(engine.maps().members.is_empty() && engine.maps().maglev.is_empty(), "removed with the frontend");
}

#[test]
fn removals_free_space_for_additions_in_the_same_sync_and_failures_are_retried() {
    for batches in [false, true] {
        removals_free_space_with(batches);
    }
}

fn removals_free_space_with(batches: bool) {
    let maps = MemMaps { capacity_services: Some(5), batches, ..MemMaps::default() };
    let mut engine = SyncEngine::adopt(maps).unwrap();
    // Frontend 1 takes 3 entries.
    assert!(engine.sync(&build(&[Some((0b11, false))])).failed.is_empty());
    // One batch: frontend 1 goes, frontend 2 (4 entries) comes: it fits
    // only because the removal runs first.
    let r = engine.sync(&build(&[None, Some((0b111, false))]));
    assert!(r.failed.is_empty(), "{r:?}");
    let k2 = frontend_key(&fe_addr(2));
    assert_eq!(engine.maps().reader_view(&k2).unwrap().unwrap().len(), 3);
    // A frontend that does not fit fails, and succeeds at a later sync of the
    // same desired state once space is freed.
    let both = build(&[Some((0b1, false)), Some((0b111, false))]);
    assert_eq!(engine.sync(&both).failed.len(), 1);
    engine.maps_mut().capacity_services = Some(10);
    let r = engine.sync(&both);
    assert!(r.failed.is_empty(), "retried and programmed: {r:?}");
    assert!(engine.maps().reader_view(&frontend_key(&fe_addr(1))).is_some());
}

#[test]
fn a_full_resync_repairs_entries_changed_behind_the_agents_back() {
    let mut engine = SyncEngine::adopt(MemMaps::default()).unwrap();
    let d = build(&[Some((0b11, false)), Some((0b1, false))]);
    engine.sync(&d);
    let want = engine.maps().clone();
    let k1 = frontend_key(&fe_addr(1));
    // Someone deletes a frontend and a backend slot by hand.
    engine.maps_mut().services.remove(&k1);
    let set2 = want.services[&frontend_key(&fe_addr(2))].svc_id;
    engine.maps_mut().services.remove(&ServiceKey::set_slot(set2, 1));
    // Without a reload the mirror says all is well: nothing is written.
    assert_eq!(engine.sync(&d).writes, 0);
    engine.reload().unwrap();
    let r = engine.sync(&d);
    assert!(r.writes > 0 && r.failed.is_empty(), "{r:?}");
    // The deleted frontend comes back (under a new id: ids are never reused).
    let keys: Vec<_> = want.services.keys().copied().collect();
    assert_eq!(engine.maps().services.keys().copied().collect::<Vec<_>>(), keys, "every entry is back");
    for k in keys.iter().filter(|k| k.slot == 0) {
        assert_eq!(engine.maps().reader_view(k), want.reader_view(k), "{k:?} reads as before");
    }
    assert_eq!(engine.maps().members.len(), want.members.len(), "no stale member left");
}

/// A Service port's frontends share backend sets by endpoint list, as
/// kube-proxy's per-port cluster and local chains: a NodePort Service on a
/// node with three addresses keeps one copy of its slots, not four.
#[test]
fn frontends_of_a_service_port_share_backend_sets_by_endpoint_list() {
    use proxy_agent::translate::{NodeInfo, translate_all};
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: ["192.168.0.1", "192.168.1.1", "192.168.2.1"].iter().map(|a| a.parse().unwrap()).collect(),
        snat: None,
    };
    let objects = |etp: &str, itp: &str| {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]},
        }))
        .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-a", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}, "nodeName": "node-a"},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "nodeName": "node-b"},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": true}, "nodeName": "node-c"},
            ],
        }))
        .unwrap();
        translate_all(&[svc], &[slice], &node)
    };
    // (policies, frontends, sets, slots, members)
    let cases = [
        // ClusterIP + 3 NodePorts, one list of 3.
        (("Cluster", "Cluster"), 4, 1, 3),
        // 3 external NodePorts with the local endpoint; ClusterIP and the 3
        // internal twins with all three.
        (("Local", "Cluster"), 7, 2, 4),
        // ClusterIP with the local endpoint; NodePorts with all three.
        (("Cluster", "Local"), 4, 2, 4),
    ];
    let mut engine = SyncEngine::adopt(MemMaps { observer: Some(observe), ..MemMaps::default() }).unwrap();
    for ((etp, itp), frontends, sets, slots) in cases {
        let d = objects(etp, itp);
        assert_eq!(d.frontends.len(), frontends, "{etp}/{itp}: {:?}", d.frontends.keys());
        // Each case follows the previous one on the same maps, as a policy
        // change would.
        let r = engine.sync(&d);
        assert!(r.failed.is_empty(), "{r:?}");
        let m = engine.maps();
        let set_ids: BTreeSet<u32> = m.services.iter().filter(|(k, _)| k.slot == 0).map(|(_, v)| v.svc_id).collect();
        assert_eq!(set_ids.len(), sets, "{etp}/{itp}: backend sets");
        assert_eq!(engine.set_count(), sets, "{etp}/{itp}: the mirror agrees");
        assert_eq!(m.services.len(), frontends + slots, "{etp}/{itp}: frontends plus one copy of each set's slots");
        assert_eq!(m.members.len(), slots, "{etp}/{itp}: members once per set");
        assert_eq!(m.maglev.len(), sets, "{etp}/{itp}: one Maglev table per set");
        for f in d.frontends.values() {
            let view = m.reader_view(&frontend_key(&f.addr)).unwrap().unwrap();
            assert_eq!(view.len(), f.backends.len(), "{etp}/{itp}: {:?} reads its own list", f.addr);
        }
        assert!(VIOLATIONS.with(|v| v.borrow().is_empty()), "{:?}", VIOLATIONS.with(|v| v.borrow().clone()));
    }
    // A restarted agent adopts the shared sets as they are: nothing to write.
    let mut again = SyncEngine::adopt(engine.maps().clone()).unwrap();
    let r = again.sync(&objects("Cluster", "Local"));
    assert_eq!((r.writes, r.deletes), (2, 0), "only the Maglev tables are rewritten (their ids are not read back): {r:?}");
}

/// An incremental sync that passes only one new frontend of a Service port
/// (an externalIP added) keeps the source ranges its LoadBalancer frontend
/// checks in the set they share.
#[test]
fn a_partial_change_keeps_the_source_ranges_of_a_shared_set() {
    let lb = FrontendAddr { ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), port: 80, proto: Proto::Tcp, scope: Scope::External };
    let ext = FrontendAddr { ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)), ..lb };
    let fe = |addr: FrontendAddr, kind: FrontendKind, ranges: bool| Frontend {
        addr,
        kind,
        owner: "ns/web:http".into(),
        backends: vec![backend(1), backend(2)],
        list: BackendList::Internal,
        affinity_timeout_s: None,
        drop_when_empty: false,
        two_scopes: false,
        source_ranges: ranges.then(|| vec![SourceRange { ip: Ipv4Addr::new(203, 0, 113, 0), len: 24 }]),
    };
    let mut engine = SyncEngine::adopt(MemMaps { observer: Some(observe), ..MemMaps::default() }).unwrap();
    let lb_fe = fe(lb, FrontendKind::LoadBalancer, true);
    let mut d = Desired::default();
    d.frontends.insert(lb, lb_fe.clone());
    assert!(engine.sync(&d).failed.is_empty());
    assert_eq!(engine.maps().src_ranges.len(), 1);
    let ext_fe = fe(ext, FrontendKind::ExternalIp, false);
    let r = engine.sync_changes(&[(ext, Some(&ext_fe))], &[]);
    assert!(r.failed.is_empty(), "{r:?}");
    let m = engine.maps();
    let (lv, ev) = (m.services[&frontend_key(&lb)], m.services[&frontend_key(&ext)]);
    assert_eq!(lv.svc_id, ev.svc_id, "one set for the port's two frontends");
    assert_eq!(m.src_ranges.len(), 1, "the LoadBalancer's range stays");
    // The full sync of the same state agrees and writes nothing.
    d.frontends.insert(ext, ext_fe);
    let again = engine.sync(&d);
    assert_eq!((again.writes, again.deletes), (0, 0), "{again:?}");
}

/// A full Maglev map leaves the sets past it without a table: their
/// frontends are programmed and choose at random, nothing fails, and a set
/// gets its table once another's is freed.
#[test]
fn a_full_maglev_map_degrades_to_random_choice_without_failing() {
    for batches in [false, true] {
        let maps = MemMaps { observer: Some(observe), capacity_maglev: Some(1), batches, ..MemMaps::default() };
        let mut engine = SyncEngine::adopt(maps).unwrap();
        // Frontends 1 and 2: two owners, two sets, room for one table.
        let d = build(&[Some((0b11, false)), Some((0b110, false))]);
        let r = engine.sync(&d);
        assert!(r.failed.is_empty(), "{r:?}");
        assert_eq!(r.no_table, 1, "{r:?}");
        let m = engine.maps();
        assert_eq!(m.maglev.len(), 1);
        for k in [frontend_key(&fe_addr(1)), frontend_key(&fe_addr(2))] {
            assert_eq!(m.reader_view(&k).unwrap().unwrap().len(), 2, "{k:?} is programmed");
        }
        let flagged = m.services.iter().filter(|(k, v)| k.slot == 0 && v.flags & proxy_common::SVC_F_MAGLEV != 0).count();
        assert_eq!(flagged, 1, "only the frontend with a table says so");
        // Frontend 1 goes: frontend 2's set gets the table at the next change.
        let d = build(&[None, Some((0b111, false))]);
        let r = engine.sync(&d);
        assert!(r.failed.is_empty() && r.no_table == 0, "{r:?}");
        let v = engine.maps().services[&frontend_key(&fe_addr(2))];
        assert!(v.flags & proxy_common::SVC_F_MAGLEV != 0 && engine.maps().maglev.contains_key(&v.svc_id));
    }
}

/// An agent upgraded from the per-frontend slot layout: each frontend's id
/// becomes its backend set, seeded with the frontend's old slots when the
/// maps are adopted (not at the first sync, which may come seconds later),
/// so readers find slots from the start; the first full sync keeps the id
/// and deletes the old slots.
#[test]
fn the_per_frontend_layout_is_adopted_without_a_window() {
    use proxy_common::{Backend, MemberKey, ServiceValue, v4_mapped};
    let addr = fe_addr(2);
    let key = frontend_key(&addr);
    let b = |i: u8| Backend { addr: v4_mapped([10, 1, 0, i]), port: 8080, proto: proxy_common::IPPROTO_TCP, flags: u8::from(i % 3 == 0) };
    let mut m = MemMaps::default();
    m.services.insert(key, ServiceValue { backend_id: 0, count: 2, flags: 0, svc_id: 7, affinity_timeout_s: 0 });
    m.services.insert(ServiceKey { slot: 1, ..key }, ServiceValue { backend_id: 1, ..ServiceValue::default() });
    m.services.insert(ServiceKey { slot: 2, ..key }, ServiceValue { backend_id: 2, ..ServiceValue::default() });
    m.backends.insert(1, b(1));
    m.backends.insert(2, b(2));
    m.members.insert(MemberKey { svc_id: 7, backend_id: 1 });
    m.members.insert(MemberKey { svc_id: 7, backend_id: 2 });
    m.meta.insert(proxy_common::META_NEXT_SVC_ID, 8);
    m.meta.insert(proxy_common::META_NEXT_BACKEND_ID, 3);
    m.observer = Some(observe);
    let mut engine = SyncEngine::adopt(m).unwrap();
    // The seeding's own intermediate states (slot 1 copied, slot 2 not
    // yet) are the short window this test leaves aside: the new new-flow
    // programs are in the tail-call map from the load on, a moment before
    // adoption; a frontend with a Maglev table does not read slots.
    VIOLATIONS.with(|v| v.borrow_mut().clear());
    let view = engine.maps().reader_view(&key).unwrap().expect("slots readable right after adoption");
    assert_eq!(view, vec![b(1), b(2)]);
    // The same frontend desired: the set keeps id 7, the old slots go.
    let d = build(&[None, Some((0b11, false))]);
    let r = engine.sync(&d);
    assert!(r.failed.is_empty(), "{r:?}");
    let m = engine.maps();
    assert_eq!(m.services[&key].svc_id, 7, "the frontend's id is its set's");
    assert!(!m.services.contains_key(&ServiceKey { slot: 1, ..key }), "old slots deleted");
    assert_eq!(m.reader_view(&key).unwrap().unwrap(), vec![b(1), b(2)]);
    assert_maps_equal_model(m, &d);
    assert!(VIOLATIONS.with(|v| v.borrow().is_empty()), "{:?}", VIOLATIONS.with(|v| v.borrow().clone()));
}
