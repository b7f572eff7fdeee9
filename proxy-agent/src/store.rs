//! What the watchers keep: API objects stripped to the fields translation
//! (and the metrics) read, and the EndpointSlices indexed by their Service,
//! so an event's Service finds its slices without a scan.
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    incremental::{ServiceId, slice_owner},
    translate::{SERVICE_NAME_LABEL, ZONE_LABEL},
};

/// EndpointSlice annotation kube-proxy's network programming latency is
/// measured from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Keeps only the labels/annotations named in `keep`.
fn keep_only(map: &mut Option<BTreeMap<String, String>>, keep: &[&str]) {
    if let Some(m) = map {
        m.retain(|k, _| keep.contains(&k.as_str()));
        if m.is_empty() {
            *map = None;
        }
    }
}

fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
}

/// A Service as translation reads it: no managedFields, labels,
/// annotations, owners or selector.
pub fn strip_service(svc: &mut Service) {
    strip_meta(&mut svc.metadata);
    svc.metadata.labels = None;
    svc.metadata.annotations = None;
    if let Some(spec) = svc.spec.as_mut() {
        spec.selector = None;
    }
}

/// An EndpointSlice as translation reads it: the service-name label, the
/// trigger-time annotation, and per endpoint its addresses, conditions,
/// node and hints (no targetRef, hostname, zone).
pub fn strip_slice(slice: &mut EndpointSlice) {
    strip_meta(&mut slice.metadata);
    keep_only(&mut slice.metadata.labels, &[SERVICE_NAME_LABEL]);
    keep_only(&mut slice.metadata.annotations, &[TRIGGER_TIME_ANNOTATION]);
    for ep in &mut slice.endpoints {
        ep.target_ref = None;
        ep.hostname = None;
        ep.zone = None;
        ep.deprecated_topology = None;
    }
}

/// A Node as the agent reads it: name, zone label, addresses, deletion.
pub fn strip_node(node: &mut Node) {
    strip_meta(&mut node.metadata);
    keep_only(&mut node.metadata.labels, &[ZONE_LABEL]);
    node.metadata.annotations = None;
    node.spec = None;
    if let Some(st) = node.status.as_mut() {
        *st = k8s_openapi::api::core::v1::NodeStatus { addresses: st.addresses.take(), ..Default::default() };
    }
}

/// EndpointSlices by the Service they belong to, fed by watch events with
/// the reflector's semantics: a re-list (`Init` .. `InitDone`) replaces the
/// whole set, so slices not listed again are gone.
#[derive(Default)]
pub struct SliceIndex {
    by_service: HashMap<ServiceId, BTreeMap<String, EndpointSlice>>,
    /// Slice (namespace, name) -> its Service, to find it when the label
    /// changes or the slice goes.
    owner: HashMap<(String, String), ServiceId>,
    relist: Option<Vec<EndpointSlice>>,
    ready: bool,
}

fn slice_id(s: &EndpointSlice) -> (String, String) {
    (s.metadata.namespace.clone().unwrap_or_else(|| "default".into()), s.metadata.name.clone().unwrap_or_default())
}

impl SliceIndex {
    /// Whether a first full list has been received.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Applies one watch event; returns the Services it touches, or `None`
    /// when a re-list completed (every Service may have changed).
    pub fn on_event(&mut self, ev: kube::runtime::watcher::Event<EndpointSlice>) -> Option<Vec<ServiceId>> {
        use kube::runtime::watcher::Event;
        match ev {
            Event::Apply(s) => Some(self.apply(s)),
            Event::Delete(s) => Some(self.delete(&slice_id(&s)).into_iter().collect()),
            Event::Init => {
                self.relist = Some(Vec::new());
                Some(Vec::new())
            }
            Event::InitApply(s) => {
                match self.relist.as_mut() {
                    Some(buf) => buf.push(s),
                    None => return Some(self.apply(s)),
                }
                Some(Vec::new())
            }
            Event::InitDone => {
                let all = self.relist.take().unwrap_or_default();
                self.by_service.clear();
                self.owner.clear();
                for s in all {
                    self.apply(s);
                }
                self.ready = true;
                None
            }
        }
    }

    /// Adds or replaces a slice; returns its Service and, if the slice moved,
    /// the Service it left.
    pub fn apply(&mut self, s: EndpointSlice) -> Vec<ServiceId> {
        let id = slice_id(&s);
        let mut touched: Vec<ServiceId> = self.delete(&id).into_iter().collect();
        if let Some(owner) = slice_owner(&s) {
            self.owner.insert(id.clone(), owner.clone());
            self.by_service.entry(owner.clone()).or_default().insert(id.1, s);
            if !touched.contains(&owner) {
                touched.push(owner);
            }
        }
        touched
    }

    /// Removes a slice; returns the Service it belonged to.
    pub fn delete(&mut self, id: &(String, String)) -> Option<ServiceId> {
        let owner = self.owner.remove(id)?;
        if let Some(m) = self.by_service.get_mut(&owner) {
            m.remove(&id.1);
            if m.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        Some(owner)
    }

    /// The slices of one Service.
    #[must_use]
    pub fn slices_of(&self, svc: &ServiceId) -> Vec<&EndpointSlice> {
        self.by_service.get(svc).map(|m| m.values().collect()).unwrap_or_default()
    }

    /// Every slice.
    pub fn all(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.by_service.values().flat_map(|m| m.values())
    }

    /// Number of slices held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;

    use super::*;

    fn slice(name: &str, svc: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {SERVICE_NAME_LABEL: svc, "other": "x"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z", "big": "y"},
                "managedFields": [{"manager": "kcm"}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.1"], "targetRef": {"kind": "Pod", "name": "p"}, "nodeName": "n1"}]
        }))
        .unwrap()
    }

    fn id(s: &str) -> ServiceId {
        ("ns".into(), s.into())
    }

    #[test]
    fn events_name_the_services_they_touch() {
        let mut ix = SliceIndex::default();
        assert_eq!(ix.on_event(Event::Init), Some(vec![]));
        assert_eq!(ix.on_event(Event::InitApply(slice("a-1", "a"))), Some(vec![]));
        assert!(!ix.is_ready());
        assert_eq!(ix.on_event(Event::InitDone), None, "a re-list touches everything");
        assert!(ix.is_ready());
        assert_eq!(ix.slices_of(&id("a")).len(), 1);
        assert_eq!(ix.on_event(Event::Apply(slice("a-2", "a"))), Some(vec![id("a")]));
        // A slice relabelled to another Service touches both.
        assert_eq!(ix.on_event(Event::Apply(slice("a-2", "b"))), Some(vec![id("a"), id("b")]));
        assert_eq!(ix.slices_of(&id("a")).len(), 1);
        assert_eq!(ix.on_event(Event::Delete(slice("a-1", "a"))), Some(vec![id("a")]));
        assert!(ix.slices_of(&id("a")).is_empty());
        // A re-list without b's slice drops it.
        ix.on_event(Event::Init);
        ix.on_event(Event::InitApply(slice("c-1", "c")));
        assert_eq!(ix.on_event(Event::InitDone), None);
        assert!(ix.slices_of(&id("b")).is_empty());
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn stripping_keeps_what_translation_and_metrics_read() {
        let mut s = slice("a-1", "a");
        strip_slice(&mut s);
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[SERVICE_NAME_LABEL], "a");
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann.keys().collect::<Vec<_>>(), vec![TRIGGER_TIME_ANNOTATION]);
        assert!(s.metadata.managed_fields.is_none());
        assert!(s.endpoints[0].target_ref.is_none());
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(s.endpoints[0].addresses, vec!["10.1.0.1".to_string()]);
    }
}
