//! Standalone mode: Services, EndpointSlices and Nodes from YAML/JSON files,
//! the same objects `kubectl get -o yaml` prints (single objects, `---`
//! separated streams, or `kind: List`).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

/// Objects read from one file.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

impl Objects {
    pub fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.nodes.extend(other.nodes);
    }
}

fn add_value(objs: &mut Objects, value: serde_norway::Value, src: &str) -> anyhow::Result<()> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_owned();
    match kind.as_str() {
        "Service" => objs
            .services
            .push(serde_norway::from_value(value).with_context(|| format!("{src}: Service {name}"))?),
        "EndpointSlice" => objs
            .slices
            .push(serde_norway::from_value(value).with_context(|| format!("{src}: EndpointSlice {name}"))?),
        "Node" => objs.nodes.push(serde_norway::from_value(value).with_context(|| format!("{src}: Node {name}"))?),
        k if k.ends_with("List") => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    add_value(objs, item, src)?;
                }
            }
        }
        _ => tracing::debug!(src, kind, name, "ignoring object of another kind"),
    }
    Ok(())
}

/// Which object a document is: (kind, namespace, name).
type DocId = (String, String, String);

fn doc_id(value: &serde_norway::Value) -> DocId {
    let s = |v: Option<&serde_norway::Value>| v.and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let meta = value.get("metadata");
    (s(value.get("kind")), s(meta.and_then(|m| m.get("namespace"))), s(meta.and_then(|m| m.get("name"))))
}

fn meta_id(kind: &str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> DocId {
    (kind.to_owned(), m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

/// A Service or EndpointSlice as standalone mode keeps it between syncs:
/// stripped as the Kubernetes mode's watchers keep objects
/// ([`crate::store`]), as compact JSON behind a header naming the Service
/// it belongs to, in one allocation. A decoded object costs several times
/// more (a `Service` alone is most of a kilobyte before its strings); the
/// objects are decoded one Service at a time when a sync needs them.
///
/// Layout: kind, namespace length and Service name length (u32, little
/// endian), namespace, Service name, JSON.
struct Stored(Box<[u8]>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredKind {
    Service,
    Slice,
    /// A slice that names no Service: nothing reads it.
    OrphanSlice,
}

const HEADER: usize = 9;

impl Stored {
    fn service(mut svc: Service, buf: &mut Vec<u8>) -> Self {
        crate::store::strip_service(&mut svc);
        let (ns, name) = crate::incremental::service_id(&svc);
        Self::new(StoredKind::Service, &ns, &name, &svc, buf)
    }

    fn slice(mut slice: EndpointSlice, buf: &mut Vec<u8>) -> Self {
        crate::store::strip_slice(&mut slice);
        match crate::incremental::slice_owner(&slice) {
            Some((ns, svc)) => Self::new(StoredKind::Slice, &ns, &svc, &slice, buf),
            None => Self::new(StoredKind::OrphanSlice, "", "", &slice, buf),
        }
    }

    /// Encodes into `buf` (reused: the kept copy is allocated once, at
    /// its size).
    fn new(kind: StoredKind, ns: &str, svc: &str, obj: &impl serde::Serialize, buf: &mut Vec<u8>) -> Self {
        let v = buf;
        v.clear();
        v.push(kind as u8);
        v.extend_from_slice(&(ns.len() as u32).to_le_bytes());
        v.extend_from_slice(&(svc.len() as u32).to_le_bytes());
        v.extend_from_slice(ns.as_bytes());
        v.extend_from_slice(svc.as_bytes());
        // Writing to memory fails only for maps with non-string keys, which
        // API objects do not have.
        serde_json::to_writer(&mut *v, obj).expect("an API object serializes to JSON");
        Self(Box::from(&v[..]))
    }

    fn kind(&self) -> StoredKind {
        match self.0[0] {
            0 => StoredKind::Service,
            1 => StoredKind::Slice,
            _ => StoredKind::OrphanSlice,
        }
    }

    fn lens(&self) -> (usize, usize) {
        let n = |i: usize| u32::from_le_bytes(self.0[i..i + 4].try_into().expect("4 bytes")) as usize;
        (n(1), n(5))
    }

    /// The Service this object belongs to: (namespace, name).
    fn owner(&self) -> (&str, &str) {
        let (ns, svc) = self.lens();
        let text = |r: std::ops::Range<usize>| std::str::from_utf8(&self.0[r]).expect("written from a str");
        (text(HEADER..HEADER + ns), text(HEADER + ns..HEADER + ns + svc))
    }

    fn json(&self) -> &[u8] {
        let (ns, svc) = self.lens();
        &self.0[HEADER + ns + svc..]
    }

    fn decode<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(self.json()).context("decoding a stored object")
    }

    /// (kind, namespace, name) as the document named it.
    fn doc_id(&self) -> Option<DocId> {
        match self.kind() {
            StoredKind::Service => self.decode::<Service>().ok().map(|o| meta_id("Service", &o.metadata)),
            StoredKind::Slice | StoredKind::OrphanSlice => {
                self.decode::<EndpointSlice>().ok().map(|o| meta_id("EndpointSlice", &o.metadata))
            }
        }
    }
}

/// What one file holds: its Services and slices, compact, in file order,
/// and its Nodes (few; kept as they are).
#[derive(Default)]
struct FileObjects {
    docs: Vec<Stored>,
    nodes: Vec<Node>,
}

impl FileObjects {
    fn add(&mut self, objs: Objects, buf: &mut Vec<u8>) {
        self.docs.extend(objs.services.into_iter().map(|o| Stored::service(o, buf)));
        self.docs.extend(objs.slices.into_iter().map(|o| Stored::slice(o, buf)));
        self.nodes.extend(objs.nodes);
    }
}

/// Parses a file's stream document by document. A document that is valid
/// YAML but not a valid object keeps `previous`'s version of the same
/// object (kind, namespace, name): one bad edit in a multi-document file
/// never drops the file's other objects, nor that object's last good
/// version. Invalid YAML fails the whole stream (its documents cannot be
/// told apart).
fn parse_file_keeping(text: &str, src: &str, previous: &FileObjects) -> anyhow::Result<(FileObjects, Vec<anyhow::Error>)> {
    let mut objs = FileObjects::default();
    let mut errors = Vec::new();
    // The previous objects' ids, read when a document first fails.
    let mut old: Option<Vec<Option<DocId>>> = None;
    let mut buf = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(doc).with_context(|| format!("{src}: invalid YAML"))?;
        let id = doc_id(&value);
        let mut one = Objects::default();
        match add_value(&mut one, value, src) {
            Ok(()) => objs.add(one, &mut buf),
            Err(e) => {
                let old = old.get_or_insert_with(|| previous.docs.iter().map(Stored::doc_id).collect());
                let mut kept = 0;
                for (d, _) in previous.docs.iter().zip(old.iter()).filter(|(_, i)| i.as_ref() == Some(&id)) {
                    objs.docs.push(Stored(d.0.clone()));
                    kept += 1;
                }
                for n in previous.nodes.iter().filter(|n| meta_id("Node", &n.metadata) == id) {
                    objs.nodes.push(n.clone());
                    kept += 1;
                }
                errors.push(e.context(if kept == 0 {
                    format!("{src}: {} {}/{} skipped", id.0, id.1, id.2)
                } else {
                    format!("{src}: keeping the last good {} {}/{}", id.0, id.1, id.2)
                }));
            }
        }
    }
    objs.docs.shrink_to_fit();
    Ok((objs, errors))
}

/// Parses one YAML/JSON stream.
pub fn parse_str(text: &str, src: &str) -> anyhow::Result<Objects> {
    let mut objs = Objects::default();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(doc).with_context(|| format!("{src}: invalid YAML"))?;
        add_value(&mut objs, value, src)?;
    }
    Ok(objs)
}

/// Watches a directory of manifests. A file that fails to parse keeps its
/// last good contents, so one bad edit never drops other Services.
#[derive(Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, FileObjects)>,
}

/// What tells a file changed: modification time, length, and the file
/// itself (device, inode) *behind* any symlink. Kubelet updates a ConfigMap
/// volume by swapping a `..data` symlink to a new directory: the name's own
/// link never changes, the file it resolves to does.
type Stamp = (SystemTime, u64, u64, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path)?;
    Ok((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.dev(), m.ino()))
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), files: BTreeMap::new() }
    }

    /// Re-reads changed files. Returns whether anything changed, and the
    /// errors of files that could not be read (named in each message).
    pub fn refresh(&mut self) -> anyhow::Result<(bool, Vec<anyhow::Error>)> {
        let mut changed = false;
        let mut errors = Vec::new();
        let mut present = Vec::new();
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("reading manifest directory {}", self.dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            present.push(path.clone());
            let Ok(stamp) = stamp(&path) else { continue };
            if self.files.get(&path).is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            let old = self.files.remove(&path).map(|f| f.1).unwrap_or_default();
            let parsed = fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))
                .and_then(|t| parse_file_keeping(&t, &path.display().to_string(), &old));
            match parsed {
                Ok((objs, errs)) => {
                    drop(old);
                    self.files.insert(path, (stamp, objs));
                    errors.extend(errs);
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so the error is reported once per edit.
                    self.files.insert(path, (stamp, old));
                    errors.push(e);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= before != self.files.len();
        Ok((changed, errors))
    }

    /// Every Service currently known, one at a time, as
    /// [`crate::agent::Agent::apply_groups`] takes them: its id, its
    /// Service object (`None`: only slices name it; the last one read when
    /// files repeat it, files in name order) and its EndpointSlices, decoded
    /// as the iteration reaches them.
    #[must_use]
    pub fn groups(&self) -> Groups<'_> {
        let mut order: Vec<&Stored> = self
            .files
            .values()
            .flat_map(|(_, o)| o.docs.iter())
            .filter(|d| d.kind() != StoredKind::OrphanSlice)
            .collect();
        // Stable: a Service's objects stay in file order.
        order.sort_by(|a, b| a.owner().cmp(&b.owner()));
        Groups { order, at: 0 }
    }

    /// Every Node currently known.
    #[must_use]
    pub fn nodes(&self) -> Vec<k8s_openapi::api::core::v1::Node> {
        self.files.values().flat_map(|(_, o)| o.nodes.iter().cloned()).collect()
    }
}

/// See [`ManifestDir::groups`].
pub struct Groups<'a> {
    order: Vec<&'a Stored>,
    at: usize,
}

impl Iterator for Groups<'_> {
    type Item = (crate::incremental::ServiceId, Option<Service>, Vec<EndpointSlice>);

    fn next(&mut self) -> Option<Self::Item> {
        let owner = self.order.get(self.at)?.owner();
        let mut svc = None;
        let mut slices = Vec::new();
        while let Some(d) = self.order.get(self.at).filter(|d| d.owner() == owner) {
            self.at += 1;
            // Stored objects were encoded from valid ones: decoding fails
            // only on a bug, which must not stop the other Services.
            let failed = match d.kind() {
                StoredKind::Service => d.decode().map(|s| svc = Some(s)).err(),
                StoredKind::Slice => d.decode().map(|s| slices.push(s)).err(),
                StoredKind::OrphanSlice => None,
            };
            if let Some(e) = failed {
                tracing::error!(namespace = owner.0, service = owner.1, error = format!("{e:#}"), "a stored object does not decode; left out");
            }
        }
        Some(((owner.0.to_owned(), owner.1.to_owned()), svc, slices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{port: {port}}}]}}\n")
    }

    fn ports(d: &ManifestDir) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = d
            .groups()
            .filter_map(|(_, s, _)| s)
            .map(|s| (s.metadata.name.clone().unwrap(), s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port))
            .collect();
        v.sort();
        v
    }

    /// Objects with most of what translation reads, and what stripping drops.
    const RICH: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: lb
  namespace: web
  resourceVersion: "7"
  creationTimestamp: "2026-01-02T03:04:05Z"
  labels: {app: web}
  annotations: {note: x}
  managedFields: [{manager: kubectl}]
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  externalIPs: [192.0.2.9]
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Cluster
  healthCheckNodePort: 32000
  publishNotReadyAddresses: true
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1, ipMode: VIP}, {ip: 198.51.100.2, ipMode: Proxy}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: web
  resourceVersion: "9"
  labels: {kubernetes.io/service-name: lb, other: y}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-01-02T03:04:05Z", big: z}
  ownerReferences: [{apiVersion: v1, kind: Service, name: lb, uid: u}]
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.1.0.1]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  zone: a
  hints: {forZones: [{name: a}], forNodes: [{name: n1}]}
  targetRef: {kind: Pod, name: p}
- addresses: [10.1.0.2]
  nodeName: n2
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: stray, namespace: web}
addressType: IPv4
endpoints: [{addresses: [10.1.0.3]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: only-1, labels: {kubernetes.io/service-name: only}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.4]}]
"#;

    #[test]
    fn groups_give_each_service_its_stripped_objects() {
        let dir = std::env::temp_dir().join(format!("kproxy-groups-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), RICH).unwrap();
        let mut d = ManifestDir::new(&dir);
        assert!(d.refresh().unwrap().0);
        let mut want = parse_str(RICH, "t").unwrap();
        want.services.iter_mut().for_each(crate::store::strip_service);
        want.slices.iter_mut().for_each(crate::store::strip_slice);
        let groups: Vec<_> = d.groups().collect();
        // By (namespace, name); the slice naming no Service is in none.
        assert_eq!(groups.len(), 2, "{groups:?}");
        let (id, svc, slices) = &groups[0];
        assert_eq!(id, &("default".to_owned(), "only".to_owned()));
        assert!(svc.is_none());
        assert_eq!(slices, &want.slices[2..3]);
        let (id, svc, slices) = &groups[1];
        assert_eq!(id, &("web".to_owned(), "lb".to_owned()));
        assert_eq!(svc.as_ref(), Some(&want.services[0]));
        assert_eq!(slices, &want.slices[0..1]);
        // What translation reads survives; what it never reads is gone.
        let svc = svc.as_ref().unwrap();
        assert!(svc.metadata.labels.is_none() && svc.metadata.managed_fields.is_none());
        assert_eq!(svc.metadata.resource_version.as_deref(), Some("7"));
        assert!(slices[0].endpoints[0].target_ref.is_none());
        assert_eq!(slices[0].metadata.labels.as_ref().unwrap().len(), 1);
        let node = crate::translate::NodeInfo { name: "n1".into(), addresses: vec!["192.168.0.1".parse().unwrap()], ..Default::default() };
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let unstripped = parse_str(RICH, "t").unwrap();
        let unstripped_refs: Vec<&EndpointSlice> = unstripped.slices[0..1].iter().collect();
        assert_eq!(
            crate::translate::translate_service(svc, &refs, &node),
            crate::translate::translate_service(&unstripped.services[0], &unstripped_refs, &node)
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_service_repeated_across_files_keeps_the_last_read() {
        let dir = std::env::temp_dir().join(format!("kproxy-repeat-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), svc("web", "80") + &svc("web", "81")).unwrap();
        fs::write(dir.join("b.yaml"), svc("web", "82")).unwrap();
        let mut d = ManifestDir::new(&dir);
        d.refresh().unwrap();
        assert_eq!(ports(&d), [("web".to_owned(), 82)]);
        fs::remove_file(dir.join("b.yaml")).unwrap();
        assert!(d.refresh().unwrap().0);
        assert_eq!(ports(&d), [("web".to_owned(), 81)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_config_map_update_by_symlink_swap_is_seen() {
        let dir = std::env::temp_dir().join(format!("kproxy-cm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("..2026_a")).unwrap();
        fs::write(dir.join("..2026_a/web.yaml"), svc("web", "80")).unwrap();
        std::os::unix::fs::symlink("..2026_a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", dir.join("web.yaml")).unwrap();
        let mut d = ManifestDir::new(&dir);
        assert!(d.refresh().unwrap().0);
        assert_eq!(ports(&d), [("web".to_owned(), 80)]);
        // Kubelet's atomic writer: a new directory, then `..data` swapped.
        fs::create_dir_all(dir.join("..2026_b")).unwrap();
        fs::write(dir.join("..2026_b/web.yaml"), svc("web", "81")).unwrap();
        std::os::unix::fs::symlink("..2026_b", dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        fs::remove_dir_all(dir.join("..2026_a")).unwrap();
        let (changed, errors) = d.refresh().unwrap();
        assert!(changed && errors.is_empty(), "the swap is a change: {errors:?}");
        assert_eq!(ports(&d), [("web".to_owned(), 81)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_document_keeps_its_last_good_version_and_the_others_update() {
        let dir = std::env::temp_dir().join(format!("kproxy-docs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("all.yaml"), svc("a", "80") + &svc("b", "90")).unwrap();
        let mut d = ManifestDir::new(&dir);
        d.refresh().unwrap();
        assert_eq!(ports(&d), [("a".to_owned(), 80), ("b".to_owned(), 90)]);
        // `a` changes, `b` is broken in the same edit.
        fs::write(dir.join("all.yaml"), svc("a", "81") + &svc("b", "notanumber")).unwrap();
        let (changed, errors) = d.refresh().unwrap();
        assert!(changed);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(format!("{:#}", errors[0]).contains("keeping the last good Service default/b"), "{:#}", errors[0]);
        assert_eq!(ports(&d), [("a".to_owned(), 81), ("b".to_owned(), 90)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
