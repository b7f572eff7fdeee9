//! Table-driven translation tests from fixtures/translate.yaml.
use std::net::IpAddr;

use proxy_agent::{
    manifests,
    translate::{Desired, NodeInfo, Scope, translate_all},
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    objects: String,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    node_ips: Vec<IpAddr>,
    frontends: Vec<String>,
    skipped: Vec<String>,
}

fn render(d: &Desired) -> (Vec<String>, Vec<String>) {
    let fes = d
        .frontends
        .values()
        .map(|f| {
            let b: Vec<String> = f.backends.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
            let mut aff = f.affinity_timeout_s.map(|t| format!(" affinity={t}")).unwrap_or_default();
            if f.drop_when_empty {
                aff.push_str(" drop");
            }
            if let Some(r) = &f.source_ranges {
                let r: Vec<String> = r.iter().map(|r| format!("{}/{}", r.ip, r.len)).collect();
                aff.push_str(&format!(" ranges=[{}]", r.join(", ")));
            }
            let scope = match f.addr.scope {
                Scope::External if f.two_scopes => " external",
                Scope::External => "",
                Scope::Internal => " internal",
            };
            format!("{}:{}/{:?} {:?}{scope} -> [{}]{aff}", f.addr.ip, f.addr.port, f.addr.proto, f.kind, b.join(", "))
                .replace("/Tcp", "/TCP")
                .replace("/Udp", "/UDP")
        })
        .collect();
    let mut skips: Vec<String> = d.skipped.iter().map(|s| s.reason.label().to_owned()).collect();
    skips.sort();
    (fes, skips)
}

#[test]
fn translation_table() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/translate.yaml")).unwrap();
    let cases: Vec<Case> = serde_norway::from_str(&text).unwrap();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let objs = manifests::parse_str(&case.objects, &case.name).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let node = NodeInfo { name: "node-a".into(), zone: case.zone.clone(), addresses: case.node_ips.clone(), snat: None };
        let desired = translate_all(&objs.services, &objs.slices, &node);
        let (mut fes, skips) = render(&desired);
        fes.sort();
        let mut want_fes = case.frontends.clone();
        want_fes.sort();
        let mut want_skips = case.skipped.clone();
        want_skips.sort();
        if fes != want_fes || skips != want_skips {
            failures.push(format!(
                "case {:?}:\n  frontends: got {fes:#?}\n  want {want_fes:#?}\n  skipped: got {skips:?} want {want_skips:?}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn manifests_accept_lists_and_json() {
    let list = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"x"},"spec":{"clusterIP":"10.96.1.1","ports":[{"port":80}]}},
        {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ignored"}}]}"#;
    let objs = manifests::parse_str(list, "list").unwrap();
    assert_eq!(objs.services.len(), 1);
    assert!(manifests::parse_str("kind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n", "bad").is_err());
}

#[test]
fn cached_translation_equals_fresh_translation() {
    use proxy_agent::translate::{TranslationCache, translate_all_cached};
    let mut y = String::new();
    for i in 0..50 {
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n, resourceVersion: \"{i}\"}}\nspec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: n, resourceVersion: \"{i}\", labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 80, protocol: TCP}}]\nendpoints: [{{addresses: [10.1.0.{i}]}}]\n"
        );
    }
    let mut objs = manifests::parse_str(&y, "gen").unwrap();
    let node = NodeInfo { name: "node-a".into(), zone: None, addresses: vec![], snat: None };
    let mut cache = TranslationCache::default();
    assert_eq!(translate_all_cached(&objs.services, &objs.slices, &node, &mut cache), translate_all(&objs.services, &objs.slices, &node));
    // One slice changes (new resourceVersion): only that Service differs.
    objs.slices[7].endpoints[0].addresses[0] = "10.2.2.2".into();
    objs.slices[7].metadata.resource_version = Some("1007".into());
    // One Service goes away.
    objs.services.remove(3);
    let cached = translate_all_cached(&objs.services, &objs.slices, &node, &mut cache);
    let fresh = translate_all(&objs.services, &objs.slices, &node);
    assert_eq!(cached, fresh);
    assert!(fresh.frontends.values().any(|f| f.backends.iter().any(|b| b.ip.to_string() == "10.2.2.2")));
    assert_eq!(fresh.frontends.len(), 49);
}
