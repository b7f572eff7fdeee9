//! `proxy-agent cleanup-kube-proxy` against kube-proxy-style iptables rules
//! and an nftables `kube-proxy` table loaded into a fresh network namespace:
//! the dry run changes nothing, the real run removes exactly kube-proxy's
//! objects, and a second run finds nothing left.
use std::io::Write as _;
use std::process::{Output, Stdio};

use proxy_testkit::{Netns, require_root, unique_prefix};

const RULES: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:MY-CHAIN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -p tcp -m tcp --dport 8080 -j MY-CHAIN
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 10.244.0.5/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.0.5:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/web:http -> 10.244.0.5:8080" -j KUBE-SEP-6E7XQMQ4RAYOWTTM
-A MY-CHAIN -p tcp -j ACCEPT
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"#;

const NFT: &str = "table ip kube-proxy {\n  chain services { type nat hook prerouting priority -100; policy accept; }\n}\n\
table ip mine {\n  chain input { type filter hook input priority 0; policy accept; tcp dport 9999 accept; }\n}\n";

fn feed(ns: &Netns, program: &str, args: &[&str], input: &str) {
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every table's `iptables-save` plus the nft table list, in the namespace.
fn state(ns: &Netns) -> (String, String) {
    let mut ipt = String::new();
    for t in ["nat", "filter"] {
        ipt += &ns.exec("iptables-save", &["-t", t]).expect("iptables-save");
    }
    let strip = |s: String| s.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect::<String>();
    // Packet counters in chain declarations do not change without traffic.
    (strip(ipt), ns.exec("nft", &["list", "tables"]).expect("nft list tables"))
}

fn agent(ns: &Netns, dry_run: bool) -> (Output, String) {
    let mut c = ns.command(env!("CARGO_BIN_EXE_proxy-agent"));
    c.arg("cleanup-kube-proxy");
    if dry_run {
        c.arg("--dry-run");
    }
    let out = c.output().expect("running proxy-agent");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cleanup-kube-proxy (dry run {dry_run}) failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn removes_kube_proxy_leftovers_and_nothing_else() {
    require_root();
    let ns = Netns::create(&unique_prefix("ckp")).expect("creating the namespace");
    feed(&ns, "iptables-restore", &[], RULES);
    feed(&ns, "nft", &["-f", "-"], NFT);
    // kube-proxy's IPVS mode holds Service addresses on a dummy device of
    // this name (a veth here: this kernel may have no dummy module; the
    // name is what cleanup looks for).
    ns.ip(&["link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kipvs-peer"]).expect("creating kube-ipvs0");
    ns.ip(&["link", "add", "mine0", "type", "veth", "peer", "name", "mine1"]).expect("creating mine0");
    let before = state(&ns);
    assert!(before.0.contains(":KUBE-SERVICES"), "rules not loaded:\n{}", before.0);
    assert!(before.1.contains("table ip kube-proxy"), "nft table not loaded:\n{}", before.1);

    // Dry run: names everything, changes nothing.
    let (_, text) = agent(&ns, true);
    for name in
        ["kube-ipvs0", "KUBE-SERVICES", "KUBE-SVC-NPX46M4PTMTKRN6Y", "KUBE-SEP-6E7XQMQ4RAYOWTTM", "KUBE-MARK-MASQ", "KUBE-POSTROUTING", "KUBE-FORWARD", "kube-proxy"]
    {
        assert!(text.contains(name), "dry run does not name {name}:\n{text}");
    }
    assert!(!text.contains("MY-CHAIN") && !text.contains(" mine"), "dry run would touch unrelated objects:\n{text}");
    assert_eq!(state(&ns), before, "the dry run changed something");
    assert!(ns.ip(&["link", "show", "kube-ipvs0"]).is_ok(), "the dry run removed kube-ipvs0");

    // Real run.
    let (_, text) = agent(&ns, false);
    let (ipt, nft) = state(&ns);
    assert!(!ipt.contains("KUBE-"), "KUBE-* chains or jumps left after cleanup ({text}):\n{ipt}");
    assert!(!nft.contains("kube-proxy"), "nft kube-proxy table left:\n{nft}");
    for want in [":MY-CHAIN - [0:0]", "-A MY-CHAIN -p tcp -j ACCEPT", "-A PREROUTING -p tcp -m tcp --dport 8080 -j MY-CHAIN"] {
        assert!(ipt.contains(want), "unrelated rule {want:?} was removed:\n{ipt}");
    }
    assert!(nft.contains("table ip mine"), "unrelated nft table removed:\n{nft}");
    assert!(ns.ip(&["link", "show", "kube-ipvs0"]).is_err(), "kube-ipvs0 left after cleanup");
    assert!(ns.ip(&["link", "show", "mine0"]).is_ok(), "unrelated device mine0 removed");
    let mine = ns.exec("nft", &["list", "table", "ip", "mine"]).expect("nft list table ip mine");
    assert!(mine.contains("tcp dport 9999 accept"), "unrelated nft rule changed:\n{mine}");

    // Idempotent: nothing left to remove, nothing changes.
    let after = state(&ns);
    let (_, text) = agent(&ns, false);
    assert!(text.contains("nothing to remove"), "second run found work:\n{text}");
    assert_eq!(state(&ns), after, "the second run changed something");
}

/// The same rules in the legacy (x_tables) backend, which kube-proxy uses
/// on nodes whose iptables is iptables-legacy.
#[test]
fn removes_legacy_iptables_chains() {
    require_root();
    let ns = Netns::create(&unique_prefix("ckl")).expect("creating the namespace");
    feed(&ns, "iptables-legacy-restore", &[], RULES);
    let save = |ns: &Netns| ns.exec("iptables-legacy-save", &[]).expect("iptables-legacy-save");
    assert!(save(&ns).contains(":KUBE-FORWARD"), "legacy rules not loaded:\n{}", save(&ns));
    let (_, text) = agent(&ns, true);
    assert!(text.contains("iptables-legacy -w -t nat -X KUBE-SERVICES"), "dry run does not name the legacy chains:\n{text}");
    assert!(save(&ns).contains(":KUBE-SERVICES"), "the dry run changed the legacy tables");
    agent(&ns, false);
    let after = save(&ns);
    assert!(!after.contains("KUBE-"), "legacy KUBE-* chains or jumps left:\n{after}");
    for want in [":MY-CHAIN - [0:0]", "-A MY-CHAIN -p tcp -j ACCEPT", "-A PREROUTING -p tcp -m tcp --dport 8080 -j MY-CHAIN"] {
        assert!(after.contains(want), "unrelated legacy rule {want:?} removed:\n{after}");
    }
    let (_, text) = agent(&ns, false);
    assert!(text.contains("nothing to remove"), "second run found work:\n{text}");
}
