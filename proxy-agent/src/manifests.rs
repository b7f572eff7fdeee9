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

fn ids_of(objs: &Objects) -> Vec<(DocId, Objects)> {
    let id = |kind: &str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (kind.to_owned(), m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
    };
    let mut out = Vec::new();
    for o in &objs.services {
        out.push((id("Service", &o.metadata), Objects { services: vec![o.clone()], ..Objects::default() }));
    }
    for o in &objs.slices {
        out.push((id("EndpointSlice", &o.metadata), Objects { slices: vec![o.clone()], ..Objects::default() }));
    }
    for o in &objs.nodes {
        out.push((id("Node", &o.metadata), Objects { nodes: vec![o.clone()], ..Objects::default() }));
    }
    out
}

/// Parses a stream document by document. A document that is valid YAML but
/// not a valid object keeps `previous`'s version of the same object (kind,
/// namespace, name): one bad edit in a multi-document file never drops the
/// file's other objects, nor that object's last good version. Invalid YAML
/// fails the whole stream (its documents cannot be told apart).
pub fn parse_str_keeping(text: &str, src: &str, previous: &Objects) -> anyhow::Result<(Objects, Vec<anyhow::Error>)> {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    let old = ids_of(previous);
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(doc).with_context(|| format!("{src}: invalid YAML"))?;
        let id = doc_id(&value);
        let mut one = Objects::default();
        match add_value(&mut one, value, src) {
            Ok(()) => objs.extend(one),
            Err(e) => {
                let kept: Vec<Objects> = old.iter().filter(|(i, _)| *i == id).map(|(_, o)| o.clone()).collect();
                errors.push(e.context(if kept.is_empty() {
                    format!("{src}: {} {}/{} skipped", id.0, id.1, id.2)
                } else {
                    format!("{src}: keeping the last good {} {}/{}", id.0, id.1, id.2)
                }));
                for k in kept {
                    objs.extend(k);
                }
            }
        }
    }
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
    files: BTreeMap<PathBuf, (Stamp, Objects)>,
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
                .and_then(|t| parse_str_keeping(&t, &path.display().to_string(), &old));
            match parsed {
                Ok((objs, errs)) => {
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

    /// Every Service currently known (borrowed: a sync needs no copy).
    pub fn services(&self) -> impl Iterator<Item = &k8s_openapi::api::core::v1::Service> {
        self.files.values().flat_map(|(_, o)| o.services.iter())
    }

    /// Every EndpointSlice currently known.
    pub fn slices(&self) -> impl Iterator<Item = &k8s_openapi::api::discovery::v1::EndpointSlice> {
        self.files.values().flat_map(|(_, o)| o.slices.iter())
    }

    /// Every Node currently known.
    #[must_use]
    pub fn nodes(&self) -> Vec<k8s_openapi::api::core::v1::Node> {
        self.files.values().flat_map(|(_, o)| o.nodes.iter().cloned()).collect()
    }

    /// All objects currently known.
    #[must_use]
    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for (_, objs) in self.files.values() {
            all.extend(objs.clone());
        }
        all
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
            .objects()
            .services
            .iter()
            .map(|s| (s.metadata.name.clone().unwrap(), s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port))
            .collect();
        v.sort();
        v
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
