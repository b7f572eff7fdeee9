//! `proxy-agent cleanup-kube-proxy`: removes what kube-proxy leaves behind
//! on a node (iptables `KUBE-*` chains in the nat and filter tables and the
//! jumps to them, the nftables `kube-proxy` tables, the IPVS `kube-ipvs0`
//! device and virtual servers).
//!
//! Pure functions turn what the tools print (`iptables-save -t TABLE`,
//! `nft -j list tables`, `ip -j link show`) into the commands to run; a thin
//! executor at the end gathers that output and runs the commands. Running it
//! twice is harmless: the second plan is empty.
use std::{fmt, path::Path, process::Command};

use serde_json::Value;

/// iptables tables kube-proxy writes `KUBE-*` chains into.
pub const TABLES: [&str; 2] = ["nat", "filter"];
/// Prefix of kube-proxy's iptables chains.
pub const CHAIN_PREFIX: &str = "KUBE-";
/// kube-proxy's nftables table (families ip and ip6).
pub const NFT_TABLE: &str = "kube-proxy";
/// The dummy device kube-proxy's IPVS mode holds Service addresses on.
pub const IPVS_DEVICE: &str = "kube-ipvs0";

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("`{cmd}` could not be started: {source}; {fix}")]
    Spawn { cmd: String, source: std::io::Error, fix: String },
    #[error("`{cmd}` failed: {stderr}; {fix}")]
    Failed { cmd: String, stderr: String, fix: String },
    #[error("`{cmd}` printed output that is not understood: {reason}")]
    Parse { cmd: String, reason: String },
    #[error("{} of {} removals failed:\n{}", .failed.len(), .total, .failed.join("\n"))]
    Partial { failed: Vec<String>, total: usize },
}

/// One command of the plan, with what it removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub program: String,
    pub args: Vec<String>,
    /// Human description, e.g. `iptables nat chain KUBE-SERVICES`.
    pub what: String,
}

impl Step {
    fn new(program: &str, args: &[&str], what: String) -> Self {
        Self { program: program.to_owned(), args: args.iter().map(|&s| s.to_owned()).collect(), what }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        for a in &self.args {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                write!(f, " '{}'", a.replace('\'', r"'\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// What to run, and what was skipped (tools not installed, ...).
#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
}

/// One table of `iptables-save` output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Chains in order, with `true` for built-in ones (a policy other than `-`).
    pub chains: Vec<(String, bool)>,
    /// `(chain, rule arguments after "-A CHAIN")`, in order.
    pub rules: Vec<(String, Vec<String>)>,
}

/// Splits an `iptables-save` rule line into arguments: whitespace
/// separates, double quotes group (`--comment "a b"`), a backslash escapes
/// the next character inside quotes.
#[must_use]
pub fn split_rule(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Parses the part of `iptables-save` output for `table` (`*table` up to
/// `COMMIT`); other tables and comments are ignored.
#[must_use]
pub fn parse_save(save: &str, table: &str) -> SavedTable {
    let mut t = SavedTable::default();
    let mut inside = false;
    for line in save.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            inside = name == table;
        } else if line == "COMMIT" {
            inside = false;
        } else if !inside || line.starts_with('#') {
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut it = decl.split_whitespace();
            if let Some(name) = it.next() {
                let builtin = it.next().is_some_and(|p| p != "-");
                t.chains.push((name.to_owned(), builtin));
            }
        } else if line.starts_with("-A ") {
            let mut args = split_rule(line);
            if args.len() >= 2 {
                let chain = args[1].clone();
                args.drain(..2);
                t.rules.push((chain, args));
            }
        }
    }
    t
}

/// The target of a rule (`-j`/`--jump` or `-g`/`--goto`), if any.
fn rule_target(args: &[String]) -> Option<&str> {
    args.windows(2)
        .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1].as_str())
}

fn is_kube(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The commands that remove kube-proxy's chains from one table, given
/// `iptables-save -t TABLE` output: first every rule outside a `KUBE-*`
/// chain that jumps to one (the built-in chains' PREROUTING, OUTPUT,
/// POSTROUTING, FORWARD, INPUT hooks), deleted by its exact spec; then
/// every `KUBE-*` chain is flushed, and then deleted (all flushed first, so
/// their jumps to each other are gone). Everything else is left alone.
#[must_use]
pub fn iptables_steps(program: &str, table: &str, save: &str) -> Vec<Step> {
    let t = parse_save(save, table);
    let mut steps = Vec::new();
    for (chain, args) in &t.rules {
        if is_kube(chain) || !rule_target(args).is_some_and(is_kube) {
            continue;
        }
        let mut a: Vec<&str> = vec!["-w", "-t", table, "-D", chain];
        a.extend(args.iter().map(String::as_str));
        let what = format!("{program} {table} rule in {chain} jumping to {}", rule_target(args).unwrap_or_default());
        steps.push(Step::new(program, &a, what));
    }
    let kube: Vec<&str> = t.chains.iter().filter(|(c, builtin)| !builtin && is_kube(c)).map(|(c, _)| c.as_str()).collect();
    for c in &kube {
        steps.push(Step::new(program, &["-w", "-t", table, "-F", c], format!("{program} {table} chain {c} (flush)")));
    }
    for c in &kube {
        steps.push(Step::new(program, &["-w", "-t", table, "-X", c], format!("{program} {table} chain {c}")));
    }
    steps
}

/// `(family, name)` of every table in `nft -j list tables` output.
///
/// # Errors
/// When the text is not nft's JSON.
pub fn nft_tables(json: &str) -> Result<Vec<(String, String)>, CleanupError> {
    let bad = |reason: String| CleanupError::Parse { cmd: "nft -j list tables".into(), reason };
    let v: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let items = v.get("nftables").and_then(Value::as_array).ok_or_else(|| bad("no \"nftables\" array".into()))?;
    Ok(items
        .iter()
        .filter_map(|i| i.get("table"))
        .filter_map(|t| Some((t.get("family")?.as_str()?.to_owned(), t.get("name")?.as_str()?.to_owned())))
        .collect())
}

/// The commands that delete kube-proxy's nftables tables (`ip kube-proxy`,
/// `ip6 kube-proxy`) from the listed tables.
#[must_use]
pub fn nft_steps(tables: &[(String, String)]) -> Vec<Step> {
    tables
        .iter()
        .filter(|(family, name)| name == NFT_TABLE && (family == "ip" || family == "ip6"))
        .map(|(family, name)| Step::new("nft", &["delete", "table", family, name], format!("nftables table {family} {name}")))
        .collect()
}

/// The command that deletes `kube-ipvs0`, given `ip -j link show` output.
///
/// # Errors
/// When the text is not ip's JSON.
pub fn ipvs_device_step(links_json: &str) -> Result<Option<Step>, CleanupError> {
    let v: Value = serde_json::from_str(links_json)
        .map_err(|e| CleanupError::Parse { cmd: "ip -j link show".into(), reason: e.to_string() })?;
    let present = v.as_array().is_some_and(|a| a.iter().any(|l| l.get("ifname").and_then(Value::as_str) == Some(IPVS_DEVICE)));
    Ok(present.then(|| Step::new("ip", &["link", "del", IPVS_DEVICE], format!("IPVS device {IPVS_DEVICE}"))))
}

/// Whether `/proc/net/ip_vs` (this namespace's IPVS table) lists a virtual
/// server: lines after the two header lines.
#[must_use]
pub fn ipvs_has_services(proc_ip_vs: &str) -> bool {
    proc_ip_vs.lines().skip(3).any(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("SCTP") || l.starts_with("FWM"))
}

/// Names of the tables listed in `/proc/net/ip_tables_names` (legacy
/// iptables tables that exist in this namespace).
#[must_use]
pub fn legacy_tables(names: &str) -> Vec<&str> {
    names.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

// ---- edges: running the tools ----

fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn output(program: &str, args: &[&str], fix: &str) -> Result<String, CleanupError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CleanupError::Spawn { cmd: cmd.clone(), source, fix: fix.to_owned() })?;
    if !out.status.success() {
        return Err(CleanupError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            fix: fix.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const ROOT_FIX: &str = "run it as root (CAP_NET_ADMIN) in the node's network namespace";

/// Reads the node's state and returns what to remove.
///
/// # Errors
/// When an installed tool fails to list its state.
pub fn plan() -> Result<Plan, CleanupError> {
    let mut plan = Plan::default();
    let nft = if installed("nft") {
        Some(nft_tables(&output("nft", &["-j", "list", "tables"], ROOT_FIX)?)?)
    } else {
        plan.notes.push("nft is not installed: nftables kube-proxy tables not checked".into());
        None
    };
    // iptables (nf_tables or legacy, whichever `iptables` is) and the legacy
    // variant when it is a different backend.
    for (family, nft_family, legacy_names) in [("iptables", "ip", "/proc/net/ip_tables_names"), ("ip6tables", "ip6", "/proc/net/ip6_tables_names")] {
        let legacy = format!("{family}-legacy");
        let main_is_legacy = installed(family) && output(family, &["-V"], ROOT_FIX).is_ok_and(|v| v.contains("legacy"));
        if installed(family) && !main_is_legacy {
            for table in TABLES {
                // Listing a table through iptables-nft creates it: only
                // read tables nft lists (when nft is there to ask).
                if nft.as_ref().is_some_and(|t| !t.iter().any(|(f, n)| f == nft_family && n == table)) {
                    continue;
                }
                let save = output(&format!("{family}-save"), &["-t", table], ROOT_FIX)?;
                plan.steps.extend(iptables_steps(family, table, &save));
            }
        } else if !installed(family) {
            plan.notes.push(format!("{family} is not installed: its KUBE-* chains not checked"));
        }
        let legacy_prog = if main_is_legacy { family.to_owned() } else { legacy };
        if installed(&legacy_prog) {
            // The legacy tables that exist here; saving another would
            // load its kernel module and create it.
            let names = std::fs::read_to_string(legacy_names).unwrap_or_default();
            for table in legacy_tables(&names) {
                if !TABLES.contains(&table) {
                    continue;
                }
                let save = output(&format!("{legacy_prog}-save"), &["-t", table], ROOT_FIX)?;
                plan.steps.extend(iptables_steps(&legacy_prog, table, &save));
            }
        }
    }
    if let Some(tables) = &nft {
        plan.steps.extend(nft_steps(tables));
    }
    if installed("ip") {
        if let Some(s) = ipvs_device_step(&output("ip", &["-j", "link", "show"], ROOT_FIX)?)? {
            plan.steps.push(s);
        }
    } else {
        plan.notes.push(format!("ip (iproute2) is not installed: device {IPVS_DEVICE} not checked"));
    }
    let ip_vs = std::fs::read_to_string(Path::new("/proc/net/ip_vs")).unwrap_or_default();
    if ipvs_has_services(&ip_vs) {
        if installed("ipvsadm") {
            plan.steps.push(Step::new("ipvsadm", &["-C"], "IPVS virtual servers".into()));
        } else {
            plan.notes.push("IPVS virtual servers exist but ipvsadm is not installed: install ipvsadm and run `ipvsadm -C`".into());
        }
    } else if !installed("ipvsadm") {
        plan.notes.push("ipvsadm is not installed; /proc/net/ip_vs lists no IPVS virtual server".into());
    }
    Ok(plan)
}

/// Runs every step, going on past failures; `report` is told each command.
///
/// # Errors
/// When a step failed; every failed command is named.
pub fn execute(plan: &Plan, mut report: impl FnMut(&Step)) -> Result<(), CleanupError> {
    let mut failed = Vec::new();
    for s in &plan.steps {
        report(s);
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        if let Err(e) = output(&s.program, &args, ROOT_FIX) {
            failed.push(e.to_string());
        }
    }
    if failed.is_empty() { Ok(()) } else { Err(CleanupError::Partial { failed, total: plan.steps.len() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed `iptables-save` of a node running kube-proxy in iptables mode.
    const KUBE_NAT: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Fri Dec  4 20:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
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
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 172.18.0.2/32 -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 172.18.0.2:6443
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment "default/kubernetes:https -> 172.18.0.2:6443" -j KUBE-SEP-6E7XQMQ4RAYOWTTM
-A MY-CHAIN -j RETURN
COMMIT
# Completed on Fri Dec  4 20:00:00 2026
"#;

    const KUBE_FILTER: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -o eth0 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"#;

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn split_rule_cases() {
        let cases: &[(&str, &[&str])] = &[
            ("-A X -j Y", &["-A", "X", "-j", "Y"]),
            (r#"-A X -m comment --comment "a b" -j Y"#, &["-A", "X", "-m", "comment", "--comment", "a b", "-j", "Y"]),
            (r#"-A X --comment "say \"hi\"" -j Y"#, &["-A", "X", "--comment", r#"say "hi""#, "-j", "Y"]),
            (r#"-A X --comment """#, &["-A", "X", "--comment", ""]),
            ("  -A   X  ", &["-A", "X"]),
        ];
        for (line, want) in cases {
            assert_eq!(split_rule(line), *want, "{line}");
        }
    }

    #[test]
    fn nat_plan_removes_kube_only() {
        let got = lines(&iptables_steps("iptables", "nat", KUBE_NAT));
        let want = [
            "iptables -w -t nat -D PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES",
            "iptables -w -t nat -D OUTPUT -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES",
            "iptables -w -t nat -D POSTROUTING -m comment --comment 'kubernetes postrouting rules' -j KUBE-POSTROUTING",
            "iptables -w -t nat -F KUBE-MARK-MASQ",
            "iptables -w -t nat -F KUBE-NODEPORTS",
            "iptables -w -t nat -F KUBE-POSTROUTING",
            "iptables -w -t nat -F KUBE-SEP-6E7XQMQ4RAYOWTTM",
            "iptables -w -t nat -F KUBE-SERVICES",
            "iptables -w -t nat -F KUBE-SVC-NPX46M4PTMTKRN6Y",
            "iptables -w -t nat -X KUBE-MARK-MASQ",
            "iptables -w -t nat -X KUBE-NODEPORTS",
            "iptables -w -t nat -X KUBE-POSTROUTING",
            "iptables -w -t nat -X KUBE-SEP-6E7XQMQ4RAYOWTTM",
            "iptables -w -t nat -X KUBE-SERVICES",
            "iptables -w -t nat -X KUBE-SVC-NPX46M4PTMTKRN6Y",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn filter_plan_and_table_selection() {
        let both = format!("{KUBE_NAT}{KUBE_FILTER}");
        let got = lines(&iptables_steps("iptables-legacy", "filter", &both));
        let want = [
            "iptables-legacy -w -t filter -D INPUT -m conntrack --ctstate NEW -m comment --comment 'kubernetes load balancer firewall' -j KUBE-PROXY-FIREWALL",
            "iptables-legacy -w -t filter -D FORWARD -m comment --comment 'kubernetes forwarding rules' -j KUBE-FORWARD",
            "iptables-legacy -w -t filter -F KUBE-FORWARD",
            "iptables-legacy -w -t filter -F KUBE-PROXY-FIREWALL",
            "iptables-legacy -w -t filter -X KUBE-FORWARD",
            "iptables-legacy -w -t filter -X KUBE-PROXY-FIREWALL",
        ];
        assert_eq!(got, want);
        // The comment is one argument, unquoted, when run.
        let s = &iptables_steps("iptables", "filter", KUBE_FILTER)[1];
        assert_eq!(s.args[7..], ["--comment", "kubernetes forwarding rules", "-j", "KUBE-FORWARD"].map(String::from));
    }

    #[test]
    fn clean_tables_plan_nothing() {
        let clean = "*nat\n:PREROUTING ACCEPT [0:0]\n:MY-CHAIN - [0:0]\n-A PREROUTING -j MY-CHAIN\n-A MY-CHAIN -g MY-KUBE-LIKE\nCOMMIT\n";
        for t in TABLES {
            assert!(iptables_steps("iptables", t, clean).is_empty(), "{t}");
            assert!(iptables_steps("iptables", t, "").is_empty(), "{t}");
        }
        // A goto into a KUBE-* chain counts as a jump.
        let goto = "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-X - [0:0]\n-A OUTPUT -g KUBE-X\nCOMMIT\n";
        assert_eq!(lines(&iptables_steps("iptables", "nat", goto))[0], "iptables -w -t nat -D OUTPUT -g KUBE-X");
    }

    #[test]
    fn nft_plan() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "kube-proxy", "handle": 3}},
            {"table": {"family": "ip6", "name": "kube-proxy", "handle": 4}},
            {"table": {"family": "inet", "name": "kube-proxy", "handle": 5}},
            {"table": {"family": "ip", "name": "nat", "handle": 1}},
            {"table": {"family": "ip", "name": "mine", "handle": 2}}]}"#;
        let tables = nft_tables(json).unwrap();
        assert_eq!(tables.len(), 5);
        assert_eq!(lines(&nft_steps(&tables)), ["nft delete table ip kube-proxy", "nft delete table ip6 kube-proxy"]);
        let empty = nft_tables(r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}]}"#).unwrap();
        assert!(nft_steps(&empty).is_empty());
        assert!(matches!(nft_tables("table ip nat"), Err(CleanupError::Parse { .. })));
    }

    #[test]
    fn ipvs_plan() {
        let links = r#"[{"ifindex":1,"ifname":"lo"},{"ifindex":5,"ifname":"kube-ipvs0","link_type":"ether"}]"#;
        assert_eq!(ipvs_device_step(links).unwrap().unwrap().to_string(), "ip link del kube-ipvs0");
        assert!(ipvs_device_step(r#"[{"ifindex":1,"ifname":"lo"}]"#).unwrap().is_none());
        assert!(ipvs_device_step("lo: <LOOPBACK>").is_err());
        let empty = "IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n";
        assert!(!ipvs_has_services(empty));
        assert!(!ipvs_has_services(""));
        let one = format!("{empty}TCP  0A600001:01BB rr\n  -> AC120002:192B      Masq    1      0          0\n");
        assert!(ipvs_has_services(&one));
    }
}
