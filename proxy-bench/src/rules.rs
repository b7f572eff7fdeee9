//! The rule sets kube-proxy writes, for the same Services, and their loading.
use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use proxy_testkit::Topology;

use crate::{BACKEND_PORT, vip};

/// iptables mode: KUBE-SERVICES with one rule per service port, KUBE-SVC-*
/// chains splitting with `statistic --mode random`, KUBE-SEP-* DNAT with
/// the hairpin KUBE-MARK-MASQ; plus the partial restore kube-proxy does
/// when one endpoint of the last Service changes.
pub fn iptables(n: usize, backends: &[Ipv4Addr], replacement: Ipv4Addr, tag: &str) -> (String, String) {
    let mut chains = String::new();
    let mut rules = String::new();
    let _ = writeln!(chains, "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]");
    let _ = writeln!(rules, "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(rules, "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
    let _ = writeln!(rules, "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING");
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MASQUERADE --random-fully");
    let svc = |i: usize, proto: &str, port: u16, chains: &mut String, rules: &mut String, bs: &[Ipv4Addr], tag: &str| {
        let name = format!("KUBE-SVC-{i}{}", proto.to_uppercase());
        let _ = writeln!(chains, ":{name} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"bench/s{i}:{proto} cluster IP\" -m {proto} --dport {port} -j {name}",
            vip(i)
        );
        let _ = writeln!(rules, "-A {name} ! -s 10.200.0.0/16 -d {}/32 -p {proto} -m {proto} --dport {port} -j KUBE-MARK-MASQ", vip(i));
        for (k, b) in bs.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i}{}{k}{tag}", proto.to_uppercase());
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = bs.len() - k;
            if left > 1 {
                let _ = writeln!(rules, "-A {name} -m statistic --mode random --probability {:.11} -j {sep}", 1.0 / left as f64);
            } else {
                let _ = writeln!(rules, "-A {name} -j {sep}");
            }
            let _ = writeln!(rules, "-A {sep} -s {b}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(rules, "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {b}:{BACKEND_PORT}");
        }
    };
    for i in 0..n {
        svc(i, "tcp", 80, &mut chains, &mut rules, backends, "");
        svc(i, "udp", 53, &mut chains, &mut rules, backends, "");
    }
    let full = format!("{chains}{rules}COMMIT\n");
    // Partial sync: the last Service's chains rewritten with one endpoint replaced.
    let mut changed = backends.to_vec();
    changed[0] = replacement;
    let (mut c2, mut r2) = (String::from("*nat\n"), String::new());
    let i = n - 1;
    let _ = writeln!(c2, ":KUBE-SVC-{i}TCP - [0:0]");
    svc(i, "tcp", 80, &mut String::new(), &mut r2, &changed, tag);
    for (k, _) in changed.iter().enumerate() {
        let _ = writeln!(c2, ":KUBE-SEP-{i}TCP{k}{tag} - [0:0]");
    }
    // The KUBE-SERVICES jump exists already; drop the duplicate line.
    let r2: String = r2.lines().filter(|l| !l.starts_with("-A KUBE-SERVICES")).map(|l| format!("{l}\n")).collect();
    let change = format!("{c2}{r2}COMMIT\n");
    (full, change)
}

/// nftables mode: a service-ips verdict map dispatching to per-service
/// chains that pick an endpoint chain with `numgen random`, written as one
/// table block (one transaction, as kube-proxy's nftables mode does).
pub fn nftables(n: usize, backends: &[Ipv4Addr], replacement: Ipv4Addr, tag: &str) -> (String, String) {
    let svc_chains = |i: usize, proto: &str, port: u16, bs: &[Ipv4Addr], tag: &str, s: &mut String| {
        let mut vmap = Vec::new();
        for (k, b) in bs.iter().enumerate() {
            let ep = format!("endpoint-{i}-{proto}-{k}{tag}");
            let _ = writeln!(
                s,
                "  chain {ep} {{\n    ip saddr {b} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {b}:{BACKEND_PORT}\n  }}"
            );
            vmap.push(format!("{k} : goto {ep}"));
        }
        let _ = writeln!(
            s,
            "  chain service-{i}-{proto} {{\n    ip daddr {} {proto} dport {port} ip saddr != 10.200.0.0/16 jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            vip(i),
            bs.len(),
            vmap.join(", ")
        );
    };
    let mut s = String::with_capacity(n * 1200);
    s.push_str("table ip kube-proxy {\n");
    s.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    s.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    s.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000 masquerade fully-random\n  }\n");
    let mut elems = Vec::with_capacity(2 * n);
    for i in 0..n {
        svc_chains(i, "tcp", 80, backends, "", &mut s);
        svc_chains(i, "udp", 53, backends, "", &mut s);
        elems.push(format!("{} . tcp . 80 : goto service-{i}-tcp", vip(i)));
        elems.push(format!("{} . udp . 53 : goto service-{i}-udp", vip(i)));
    }
    let _ = writeln!(
        s,
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}",
        elems.join(",\n      ")
    );
    s.push_str("  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n}\n");
    // One endpoint of the last Service changes: new endpoint chains, the
    // service chain flushed and refilled.
    let mut changed = backends.to_vec();
    changed[0] = replacement;
    let i = n - 1;
    let mut body = String::new();
    svc_chains(i, "tcp", 80, &changed, tag, &mut body);
    let c = format!("flush chain ip kube-proxy service-{i}-tcp\ntable ip kube-proxy {{\n{body}}}\n");
    (s, c)
}

/// Loads `input` with `cmd` in the node namespace; returns milliseconds.
pub fn load(topo: &Topology, cmd: &str, args: &[&str], input: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut child = topo
        .node
        .command(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd} (install it, or run `cargo xtask bench` which does)"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("{cmd} failed: {}", String::from_utf8_lossy(&out.stderr).lines().take(5).collect::<Vec<_>>().join(" | "));
    }
    let _ = Command::new("true").status();
    Ok(ms)
}
