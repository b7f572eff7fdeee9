//! `proxy-agent inspect` and `explain` against the real agent binary in
//! standalone mode, in a namespace topology: what they print is checked
//! against what was programmed and against what real connections reach.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    process::Child,
    time::Duration,
};

use common::{Env, sa, service, slice, slice_with};
use proxy_agent::inspect::names_path;
use proxy_testkit::{tcp_connect, tcp_connect_from, tcp_exchange, tcp_request, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(3);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WEB_NAME: &str = "default/web:p80-tcp";
const EMPTY_NAME: &str = "default/empty:p80-tcp";
const STICKY_NAME: &str = "default/sticky:p80-tcp";

/// (source, destination, source port, destination port, protocol).
type CtTuple = ([u8; 16], [u8; 16], u16, u16, u8);

/// The topology with the agent binary (standalone mode) on its pins.
struct Standalone {
    child: Option<Child>,
    manifests: PathBuf,
    // Dropped last: the pins (and the names file) go with it.
    env: Env,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

impl Standalone {
    /// web (three backends), sticky (three backends, ClientIP affinity) and
    /// empty (no usable endpoint), programmed by the agent binary.
    fn start(tag: &str) -> Self {
        let mut env = Env::new(tag, 1, 3);
        // The binary takes over the pins the in-process agent made.
        env.agent = None;
        let ports = [(80, "TCP")];
        let ips = [env.backend_ip(0), env.backend_ip(1), env.backend_ip(2)];
        let yaml = service("web", &WEB.to_string(), &ports, "")
            + &slice("web", "web-1", &ports, &ips)
            + &service("sticky", &STICKY.to_string(), &ports, "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n")
            + &slice("sticky", "sticky-1", &ports, &ips)
            + &service("empty", &EMPTY.to_string(), &ports, "")
            + &slice_with("empty", "empty-1", &ports, &[(ips[0], "ready: false, serving: false")]);
        let manifests = std::env::temp_dir().join(format!("{}-manifests", env.cfg.datapath.pin_dir_name));
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("services.yaml"), yaml).unwrap();
        let child = common::spawn_agent(
            &env.topo.node,
            &env.cfg.datapath.pin_dir_name,
            &["--manifests", manifests.to_str().unwrap()],
            &["--poll-interval-ms", "100"],
        );
        let mut s = Self { child: Some(child), manifests, env };
        assert!(
            wait_until(Duration::from_secs(15), || proxy_testkit::http_get(&s.env.topo.node, 10256, "/readyz").starts_with("HTTP/1.1 200")),
            "the agent became ready"
        );
        assert!(wait_until(Duration::from_secs(5), || names_path(&s.env.pin_dir()).exists()), "the agent wrote the names file");
        // Programmed: the web Service answers.
        assert!(tcp_request(s.env.client(0), sa(WEB, 80), T).is_ok());
        s.env.agent = None;
        s
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child (nsenter execs the agent).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Runs `proxy-agent ARGS --pin-dir <ours>` in the node's namespace;
    /// its stdout, or a panic with its stderr.
    fn cli(&self, args: &[&str]) -> String {
        let out = self
            .env
            .topo
            .node
            .command(env!("CARGO_BIN_EXE_proxy-agent"))
            .args(args)
            .args(["--pin-dir", &self.env.cfg.datapath.pin_dir_name])
            .env("RUST_LOG", "warn")
            .output()
            .expect("running proxy-agent");
        assert!(out.status.success(), "proxy-agent {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let text = self.cli(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"))
    }

    fn explain(&self, from: &str, to: &str) -> Value {
        self.json(&["explain", "--from", from, "--to", to])
    }

    /// Every conntrack entry (forward and reply), by key as a comparable tuple.
    fn ct_entries(&self) -> BTreeMap<CtTuple, proxy_common::CtValue> {
        proxy_agent::datapath::conntrack_entries(&self.env.pin_dir())
            .unwrap()
            .into_iter()
            .map(|(k, v)| ((k.saddr, k.daddr, k.sport, k.dport, k.proto), v))
            .collect()
    }

    /// Every affinity entry, in a stable order.
    fn affinity(&self) -> Vec<([u8; 16], u32, proxy_common::AffinityValue)> {
        let mut v: Vec<_> = proxy_agent::inspect::Snapshot::read(&self.env.pin_dir())
            .unwrap()
            .affinity
            .into_iter()
            .map(|(k, v)| (k.client, k.svc_id, v))
            .collect();
        v.sort_by_key(|(c, id, _)| (*c, *id));
        v
    }

    fn ct_keys(&self) -> BTreeSet<CtTuple> {
        self.ct_entries().into_keys().collect()
    }

    /// Backend `bN` of the echo server answering from `ip`.
    fn backend_name(&self, ip: &str) -> String {
        let i = (0..3).find(|i| format!("{}:8080", self.env.backend_ip(*i)) == ip).unwrap_or_else(|| panic!("{ip} is no backend"));
        format!("b{i}")
    }
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("no string {field} in {v}"))
}

/// Service name -> backend addresses, from `inspect services --output json`.
fn services_json(v: &Value) -> BTreeMap<String, BTreeSet<String>> {
    v.as_array()
        .expect("an array of frontends")
        .iter()
        .map(|r| {
            let backends = r["backends"].as_array().unwrap().iter().map(|b| str_of(b, "address").to_owned()).collect();
            (str_of(r, "service").to_owned(), backends)
        })
        .collect()
}

#[test]
fn inspect_names_every_service_and_backend_and_flow() {
    let mut s = Standalone::start("ia");
    let backends: BTreeSet<String> = (0..3).map(|i| format!("{}:8080", s.env.backend_ip(i))).collect();
    let want: BTreeMap<String, BTreeSet<String>> = [
        (WEB_NAME.to_owned(), backends.clone()),
        (STICKY_NAME.to_owned(), backends.clone()),
        (EMPTY_NAME.to_owned(), BTreeSet::new()),
    ]
    .into();

    // Services: every one by name, with its frontend, kind and backends.
    let table = s.cli(&["inspect", "services"]);
    for (name, vip) in [(WEB_NAME, WEB), (STICKY_NAME, STICKY), (EMPTY_NAME, EMPTY)] {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in:\n{table}"));
        assert!(line.contains(&format!("{vip}:80/TCP")) && line.contains("ClusterIP"), "{line}");
        if name == EMPTY_NAME {
            assert!(line.contains("no endpoints (refused)"), "{line}");
        } else {
            for b in &backends {
                assert!(line.contains(&format!("{b} (#")) && line.contains("active"), "{b} missing from {line}");
            }
        }
    }
    assert!(table.lines().find(|l| l.starts_with(STICKY_NAME)).unwrap().contains("affinity 600s"), "{table}");
    assert_eq!(services_json(&s.json(&["inspect", "services"])), want);

    // Backends: each one with both Services that use it.
    let v = s.json(&["inspect", "backends"]);
    let got: BTreeMap<String, Vec<String>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let addr = format!("{}:{}", str_of(r, "address"), r["port"]);
            (addr, r["services"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        })
        .collect();
    let both = vec![STICKY_NAME.to_owned(), WEB_NAME.to_owned()];
    assert_eq!(got, backends.iter().map(|b| (b.clone(), both.clone())).collect::<BTreeMap<_, _>>());
    let table = s.cli(&["inspect", "backends"]);
    for b in &backends {
        let line = table.lines().find(|l| l.contains(&format!("{b}/TCP"))).unwrap_or_else(|| panic!("no {b} in:\n{table}"));
        assert!(line.contains(WEB_NAME) && line.contains(STICKY_NAME), "{line}");
    }

    // Conntrack: an open connection shows as an established flow of web.
    let mut conn = tcp_connect(s.env.client(0), sa(WEB, 80), T).unwrap();
    let answer = tcp_exchange(&mut conn).unwrap();
    let local = conn.local_addr().unwrap();
    let client = format!("{}:{}", s.env.topo.clients[0].ip, local.port());
    let v = s.json(&["inspect", "conntrack"]);
    let flow = v.as_array().unwrap().iter().find(|r| str_of(r, "client") == client).unwrap_or_else(|| panic!("no flow of {client}: {v}"));
    assert_eq!(str_of(flow, "frontend"), format!("{WEB}:80/TCP"));
    assert_eq!(str_of(flow, "service"), WEB_NAME);
    assert_eq!(s.backend_name(str_of(flow, "backend")), answer, "the flow's backend is the one that answered");
    assert!(flow["state"].as_array().unwrap().iter().any(|x| x == "ESTABLISHED"), "{flow}");
    assert_eq!(flow["reply_entry"], true);
    let table = s.cli(&["inspect", "conntrack"]);
    let line = table.lines().find(|l| l.starts_with(&client)).unwrap_or_else(|| panic!("no {client} in:\n{table}"));
    assert!(line.contains(WEB_NAME) && line.contains("ESTABLISHED"), "{line}");
    // Services count it.
    let v = s.json(&["inspect", "services"]);
    let web = v.as_array().unwrap().iter().find(|r| str_of(r, "service") == WEB_NAME).unwrap();
    assert!(web["flows"].as_u64().unwrap() >= 1, "{web}");
    drop(conn);

    // Affinity: the client, the Service, the backend it was sent to.
    let (sticky_answer, _) = tcp_request(s.env.client(0), sa(STICKY, 80), T).unwrap();
    let v = s.json(&["inspect", "affinity"]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(str_of(&rows[0], "client"), s.env.topo.clients[0].ip.to_string());
    assert_eq!(str_of(&rows[0], "service"), STICKY_NAME);
    assert_eq!(s.backend_name(str_of(&rows[0], "backend")), sticky_answer);
    let table = s.cli(&["inspect", "affinity"]);
    assert!(table.lines().any(|l| l.starts_with(&s.env.topo.clients[0].ip.to_string()) && l.contains(STICKY_NAME)), "{table}");

    // After the agent stopped: the maps and the names are still read.
    s.stop();
    assert_eq!(services_json(&s.json(&["inspect", "services"])), want);
    // Without the names file, frontends still show, unnamed.
    let names = names_path(&s.env.pin_dir());
    std::fs::remove_file(&names).unwrap();
    let v = s.json(&["inspect", "services"]);
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert!(v.as_array().unwrap().iter().all(|r| str_of(r, "service") == "?"), "{v}");
    // cleanup removes the pins and the names file.
    std::fs::write(&names, "{}").unwrap();
    s.cli(&["cleanup"]);
    assert!(!names.exists() && !s.env.pin_dir().exists(), "cleanup removed {} and the pins", names.display());
}

#[test]
fn explain_agrees_with_real_connections_and_leaves_no_trace() {
    let s = Standalone::start("ib");
    let client_ip = s.env.topo.clients[0].ip;

    // Maglev: explain first, then a real connection from that exact port.
    let mut chosen = BTreeSet::new();
    for port in 41_001..41_011u16 {
        let before = s.ct_keys();
        let e = s.explain(&format!("{client_ip}:{port}"), &format!("{WEB}:80/tcp"));
        assert_eq!(str_of(&e, "verdict"), "translated", "{e}");
        assert_eq!(str_of(&e, "reason"), "maglev", "{e}");
        assert_eq!(str_of(&e, "service"), WEB_NAME);
        assert_eq!(e["conntrack_removed"], 2, "the forward and reply entries it created: {e}");
        let after = s.ct_keys();
        assert!(after.is_subset(&before), "explain left conntrack entries behind: {:?}", after.difference(&before).collect::<Vec<_>>());
        let predicted = s.backend_name(str_of(&e["backend"], "address"));
        assert!(e["backend"]["id"].as_u64().is_some(), "{e}");
        let mut conn = tcp_connect_from(s.env.client(0), port, sa(WEB, 80), T).unwrap();
        assert_eq!(tcp_exchange(&mut conn).unwrap(), predicted, "port {port}: explain and the real connection agree");
        chosen.insert(predicted);
    }
    assert!(chosen.len() >= 2, "ten client ports spread over more than one backend: {chosen:?}");

    // An existing flow decides for its own tuple: explain says so, names
    // the backend the open connection uses, and puts back the entries its
    // SYN refreshed (older than the datapath's 1 s refresh interval).
    let mut conn = tcp_connect_from(s.env.client(0), 41_100, sa(WEB, 80), T).unwrap();
    let answer = tcp_exchange(&mut conn).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let flow = |m: BTreeMap<CtTuple, proxy_common::CtValue>| -> Vec<_> { m.into_iter().filter(|(k, _)| k.2 == 41_100 || k.3 == 41_100).collect() };
    let before = flow(s.ct_entries());
    assert_eq!(before.len(), 2, "the connection's forward and reply entries");
    let e = s.explain(&format!("{client_ip}:41100"), &format!("{WEB}:80/tcp"));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason")), ("translated", "existing_flow"), "{e}");
    assert_eq!(s.backend_name(str_of(&e["backend"], "address")), answer);
    assert_eq!((&e["conntrack_removed"], &e["conntrack_restored"]), (&Value::from(0), &Value::from(1)), "{e}");
    assert_eq!(flow(s.ct_entries()), before, "the flow's entries are exactly as they were");
    assert_eq!(tcp_exchange(&mut conn).unwrap(), answer, "the connection is unaffected");
    drop(conn);

    // The table names the Service, the backend and why.
    let text = s.cli(&["explain", "--from", &format!("{client_ip}:42000"), "--to", &format!("{WEB}:80/tcp"), "--interface", "vethc0"]);
    assert!(text.contains("translated and continued") && text.contains(WEB_NAME) && text.contains("Maglev"), "{text}");
    assert!(text.contains("arriving on vethc0"), "{text}");

    // Affinity: after a real connection, explain reports the affine backend
    // and puts the client's affinity entry back exactly.
    let (answer, _) = tcp_request(s.env.client(0), sa(STICKY, 80), T).unwrap();
    let aff_before = s.affinity();
    let e = s.explain(&client_ip.to_string(), &format!("{STICKY}:80/tcp"));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason"), str_of(&e, "service")), ("translated", "affinity", STICKY_NAME), "{e}");
    assert_eq!(s.backend_name(str_of(&e["backend"], "address")), answer);
    assert_eq!(s.affinity(), aff_before, "affinity entry restored");
    // A client without affinity yet: chosen by Maglev, and the affinity
    // entry the run created is removed again.
    let e = s.explain("10.200.0.99:50000", &format!("{STICKY}:80/tcp"));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason")), ("translated", "maglev"), "{e}");
    assert_eq!(e["affinity_cleaned"], true, "{e}");
    assert_eq!(s.affinity(), aff_before, "no affinity entry left");

    // No endpoints: explain says refused, and a real connection is refused.
    let before = s.ct_keys();
    let e = s.explain(&client_ip.to_string(), &format!("{EMPTY}:80/tcp"));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason"), str_of(&e, "service")), ("refused", "no_endpoints", EMPTY_NAME), "{e}");
    assert!(e["backend"].is_null(), "{e}");
    let err = tcp_connect(s.env.client(0), sa(EMPTY, 80), T).expect_err("no endpoints");
    assert_eq!(err.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
    let text = s.cli(&["explain", "--from", &client_ip.to_string(), "--to", &format!("{EMPTY}:80/tcp")]);
    assert!(text.contains("refused with ICMP port unreachable") && text.contains("no usable endpoint") && text.contains(EMPTY_NAME), "{text}");

    // A port the ClusterIP does not serve, and an address that is no Service.
    let e = s.explain(&client_ip.to_string(), &format!("{WEB}:81/tcp"));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason")), ("refused", "unknown_port"), "{e}");
    assert_eq!(e["services_on_address"], serde_json::json!([WEB_NAME]));
    let e = s.explain(&client_ip.to_string(), &format!("{}:8080/udp", s.env.backend_ip(0)));
    assert_eq!((str_of(&e, "verdict"), str_of(&e, "reason")), ("passed", "not_a_service"), "{e}");
    assert!(e["service"].is_null());
    assert!(s.ct_keys().is_subset(&before), "explain left no conntrack entry");
}
