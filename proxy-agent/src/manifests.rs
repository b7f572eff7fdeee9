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

fn add_value(objs: &mut Objects, value: serde_yaml::Value, src: &str) -> anyhow::Result<()> {
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
            .push(serde_yaml::from_value(value).with_context(|| format!("{src}: Service {name}"))?),
        "EndpointSlice" => objs
            .slices
            .push(serde_yaml::from_value(value).with_context(|| format!("{src}: EndpointSlice {name}"))?),
        "Node" => objs.nodes.push(serde_yaml::from_value(value).with_context(|| format!("{src}: Node {name}"))?),
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

/// Parses one YAML/JSON stream.
pub fn parse_str(text: &str, src: &str) -> anyhow::Result<Objects> {
    let mut objs = Objects::default();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).with_context(|| format!("{src}: invalid YAML"))?;
        add_value(&mut objs, value, src)?;
    }
    Ok(objs)
}

/// Watches a directory of manifests. A file that fails to parse keeps its
/// last good contents, so one bad edit never drops other Services.
#[derive(Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (SystemTime, u64, Objects)>,
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
            let Ok(meta) = entry.metadata() else { continue };
            let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
            if self.files.get(&path).is_some_and(|(m, l, _)| (*m, *l) == stamp) {
                continue;
            }
            let parsed = fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))
                .and_then(|t| parse_str(&t, &path.display().to_string()));
            match parsed {
                Ok(objs) => {
                    self.files.insert(path, (stamp.0, stamp.1, objs));
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so the error is reported once per edit.
                    let old = self.files.remove(&path).map(|f| f.2).unwrap_or_default();
                    self.files.insert(path, (stamp.0, stamp.1, old));
                    errors.push(e);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= before != self.files.len();
        Ok((changed, errors))
    }

    /// All objects currently known.
    #[must_use]
    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for (_, _, objs) in self.files.values() {
            all.extend(objs.clone());
        }
        all
    }
}
