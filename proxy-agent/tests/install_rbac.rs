//! deploy/install.yaml (the chart's default render) grants the agent
//! exactly what its watchers use, no more and no less.
use std::collections::BTreeSet;

use proxy_agent::kube::{WATCH_VERBS, WATCHED};

#[test]
fn cluster_role_is_exactly_what_the_watchers_use() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/install.yaml")).unwrap();
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut roles = 0;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = serde_norway::Value::deserialize(doc).unwrap();
        if v.get("kind").and_then(|k| k.as_str()) != Some("ClusterRole") {
            continue;
        }
        roles += 1;
        for rule in v["rules"].as_sequence().unwrap() {
            let list = |k: &str| -> Vec<String> {
                rule[k].as_sequence().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for verb in list("verbs") {
                        granted.insert((g.clone(), r.clone(), verb));
                    }
                }
            }
        }
    }
    assert_eq!(roles, 1, "one ClusterRole");
    let wanted: BTreeSet<(String, String, String)> = WATCHED
        .iter()
        .flat_map(|(g, r)| WATCH_VERBS.iter().map(move |v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned())))
        .collect();
    assert_eq!(granted, wanted, "ClusterRole rules vs the watchers' needs");
}

use serde::Deserialize as _;
