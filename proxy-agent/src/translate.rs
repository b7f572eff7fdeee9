//! Kubernetes objects -> desired datapath state. Pure functions, no I/O.
//!
//! Follows what kube-proxy programs for a Service: one frontend per
//! (address, port, protocol) for the ClusterIPs, NodePorts on the node's
//! addresses, externalIPs and LoadBalancer ingress IPs; endpoints from every
//! EndpointSlice of the Service, filtered by readiness (with the KEP-1669
//! serving-terminating fallback), traffic policy and topology hints.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label holding the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Default ClientIP affinity timeout (3 hours), as the API server defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::IPPROTO_TCP,
            Proto::Udp => proxy_common::IPPROTO_UDP,
            Proto::Sctp => proxy_common::IPPROTO_SCTP,
        }
    }

    fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

/// Which kind of address a frontend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// Which clients a frontend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scope {
    /// Every client; for a two-scope frontend, clients outside the cluster.
    #[default]
    External,
    /// Clients inside the cluster (pods, the node) of a two-scope frontend:
    /// an `externalTrafficPolicy: Local` Service's NodePort, LoadBalancer
    /// IPs and externalIPs serve them every endpoint, as kube-proxy does.
    Internal,
}

impl Scope {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Scope::External => proxy_common::SCOPE_EXTERNAL,
            Scope::Internal => proxy_common::SCOPE_INTERNAL,
        }
    }
}

/// One (address, port, protocol, scope) a Service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

/// A backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (external flows to it need no SNAT).
    pub local: bool,
}

/// An IPv4 source prefix (loadBalancerSourceRanges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub ip: Ipv4Addr,
    pub len: u8,
}

/// Which of its Service port's endpoint lists a frontend serves, as
/// kube-proxy's per-port cluster and local policy chains: the frontends of
/// one port with the same list share one backend set in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BackendList {
    /// Under the internal policy (ClusterIP, internal twins) and every
    /// external frontend whose policy gives the same list.
    #[default]
    Internal,
    /// This node's endpoints (externalTrafficPolicy Local).
    Local,
    /// Every usable endpoint while internalTrafficPolicy Local narrows the
    /// internal list (external frontends of an eTP=Cluster Service).
    External,
}

impl BackendList {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            BackendList::Internal => 0,
            BackendList::Local => 1,
            BackendList::External => 2,
        }
    }
}

/// Desired state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: FrontendAddr,
    pub kind: FrontendKind,
    /// `namespace/name:port-name`, for logs and metrics.
    pub owner: String,
    /// Sorted, deduplicated.
    pub backends: Vec<BackendAddr>,
    /// The endpoint list `backends` is (frontends of the port with the same
    /// list share their backend slots).
    pub list: BackendList,
    /// ClientIP affinity timeout, if enabled.
    pub affinity_timeout_s: Option<u32>,
    /// No backend here because of a Local traffic policy while the Service
    /// has usable endpoints elsewhere: drop new flows (kube-proxy's DROP)
    /// rather than refuse them.
    pub drop_when_empty: bool,
    /// An external-scope frontend with an internal-scope twin (other backends).
    pub two_scopes: bool,
    /// loadBalancerSourceRanges of a LoadBalancer IP: new flows only from
    /// these (an empty list admits nobody: every range given was invalid).
    pub source_ranges: Option<Vec<SourceRange>>,
}

/// What this node contributes to translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// Addresses NodePorts are served on.
    pub addresses: Vec<IpAddr>,
    /// The address external flows to backends on other nodes are SNATed
    /// to (the Node's primary IPv4 address); `None`: the first IPv4 of
    /// `addresses`.
    pub snat: Option<Ipv4Addr>,
}

impl NodeInfo {
    /// The SNAT address: [`NodeInfo::snat`], else the first IPv4 address.
    #[must_use]
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.snat.or_else(|| {
            self.addresses.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
        })
    }
}

/// Why (part of) an object was not programmed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// Headless or ExternalName: nothing for a proxy to do (not an error).
    NotProxied,
    InvalidIp(String),
    InvalidPort(i32),
    UnknownProtocol(String),
    /// SCTP is translated but the datapath does not handle it yet.
    SctpUnsupported,
    /// IPv6 is translated but the datapath does not handle it yet.
    Ipv6Unsupported,
    UnknownServiceType(String),
    /// Another Service owns this (address, port, protocol): the loser of
    /// the precedence ClusterIP > NodePort > LoadBalancer/externalIP >
    /// older creationTimestamp.
    Conflict(String),
    /// A loadBalancerSourceRanges entry that is no CIDR (ignored; with no
    /// valid entry left the LoadBalancer IPs admit nobody).
    InvalidSourceRange(String),
    /// A LoadBalancer ingress with `ipMode: Proxy`: the load balancer proxies
    /// to the nodes, so its IP is not programmed (kube-proxy skips it too).
    ProxyIpMode(String),
    /// More endpoints for one Service port than a frontend can hold (the
    /// datapath's slot index is 16 bits): the port is not programmed.
    TooManyEndpoints(usize),
}

impl SkipReason {
    /// Metric label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::NotProxied => "not_proxied",
            SkipReason::InvalidIp(_) => "invalid_ip",
            SkipReason::InvalidPort(_) => "invalid_port",
            SkipReason::UnknownProtocol(_) => "unknown_protocol",
            SkipReason::SctpUnsupported => "sctp_unsupported",
            SkipReason::Ipv6Unsupported => "ipv6_unsupported",
            SkipReason::UnknownServiceType(_) => "unknown_service_type",
            SkipReason::Conflict(_) => "conflict",
            SkipReason::InvalidSourceRange(_) => "invalid_source_range",
            SkipReason::ProxyIpMode(_) => "ip_mode_proxy",
            SkipReason::TooManyEndpoints(_) => "too_many_endpoints",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotProxied => write!(f, "headless or ExternalName, not proxied"),
            SkipReason::InvalidIp(s) => write!(f, "invalid IP address {s:?}"),
            SkipReason::InvalidPort(p) => write!(f, "invalid port {p}"),
            SkipReason::UnknownProtocol(p) => write!(f, "unknown protocol {p:?}"),
            SkipReason::SctpUnsupported => write!(f, "SCTP is not supported by the datapath yet"),
            SkipReason::Ipv6Unsupported => write!(f, "IPv6 is not supported by the datapath yet"),
            SkipReason::UnknownServiceType(t) => write!(f, "unknown Service type {t:?}"),
            SkipReason::Conflict(c) => write!(f, "{c}"),
            SkipReason::InvalidSourceRange(r) => {
                write!(f, "loadBalancerSourceRanges entry {r:?} is not a CIDR (ignored)")
            }
            SkipReason::TooManyEndpoints(n) => write!(
                f,
                "{n} endpoints exceed the limit of {} backends per frontend; this port is not programmed (split the Service)",
                crate::sync::MAX_BACKENDS_PER_FRONTEND
            ),
            SkipReason::ProxyIpMode(ip) => {
                write!(f, "LoadBalancer ingress {ip} has ipMode Proxy: left to the load balancer, not programmed")
            }
        }
    }
}

/// A part of a Service that was not programmed, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skip {
    pub owner: String,
    pub reason: SkipReason,
}

/// Result of translating one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub frontends: Vec<Frontend>,
    pub skipped: Vec<Skip>,
}

fn svc_name(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or("")
    )
}

/// Whether `slice` belongs to `svc` (same namespace, service-name label).
#[must_use]
pub fn slice_belongs_to(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref().unwrap_or("default") == namespace
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|n| n == name)
}

/// An endpoint address with its conditions, after deduplication.
#[derive(Clone, Debug)]
struct Ep {
    addr: BackendAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zone_hints: Option<BTreeSet<String>>,
    /// `hints.forNodes` (trafficDistribution: PreferSameNode).
    node_hints: Option<BTreeSet<String>>,
}

/// (ready, serving, terminating) as kube-proxy reads them: an unset
/// `ready` or `serving` means true, an unset `terminating` false.
/// `publishNotReadyAddresses` makes an endpoint ready; it never makes a
/// not-serving endpoint serve.
fn conditions(ep: &Endpoint, publish_not_ready: bool) -> (bool, bool, bool) {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready || publish_not_ready, serving, terminating)
}

/// An IPv4 address as kube-proxy parses the API's (netutils.ParseIPSloppy):
/// leading zeros are allowed and read as decimal (`010.096.0.1` is
/// 10.96.0.1), as Go's parser did before 1.17.
#[must_use]
pub fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut o = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut o {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(o))
}

/// Any address as the API may write it: IPv6, or sloppy IPv4.
fn parse_any_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| parse_ipv4_sloppy(s).map(IpAddr::V4))
}

/// Endpoints of `sp` from every slice, deduplicated by address (the first
/// slice, in name order, wins), IPv4 only.
fn endpoints_for_port(
    sp: &ServicePort,
    slices: &[&EndpointSlice],
    publish_not_ready: bool,
    node_name: &str,
    skipped: &mut BTreeSet<SkipReason>,
) -> Vec<Ep> {
    let want_name = sp.name.as_deref().unwrap_or("");
    let want_proto = sp.protocol.as_deref().unwrap_or("TCP");
    let mut by_addr: BTreeMap<BackendAddr, Ep> = BTreeMap::new();
    let mut seen_ip: BTreeMap<IpAddr, Ep> = BTreeMap::new();
    let mut ordered: Vec<&&EndpointSlice> = slices.iter().collect();
    ordered.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for slice in ordered {
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" => {
                if !slice.endpoints.is_empty() {
                    skipped.insert(SkipReason::Ipv6Unsupported);
                }
                continue;
            }
            _ => continue, // FQDN: not proxied by kube-proxy either
        }
        let Some(port) = slice.ports.as_ref().and_then(|ports| {
            ports.iter().find(|p| {
                p.name.as_deref().unwrap_or("") == want_name
                    && p.protocol.as_deref().unwrap_or("TCP") == want_proto
            })
        }) else {
            continue;
        };
        let Some(port_num) = port.port else { continue };
        let Ok(port_num) = u16::try_from(port_num) else {
            skipped.insert(SkipReason::InvalidPort(port_num));
            continue;
        };
        if port_num == 0 {
            skipped.insert(SkipReason::InvalidPort(0));
            continue;
        }
        for ep in &slice.endpoints {
            // An endpoint lists one address per family; kube-proxy uses the first.
            let Some(a) = ep.addresses.first() else { continue };
            let Some(ip) = parse_ipv4_sloppy(a) else {
                skipped.insert(SkipReason::InvalidIp(a.clone()));
                continue;
            };
            let (ready, serving, terminating) = conditions(ep, publish_not_ready);
            // The same address in two slices (an endpoint moving between
            // slices): a non-terminating copy wins, as in kube-proxy.
            if let Some(prev) = seen_ip.get(&IpAddr::V4(ip)) {
                if terminating || !prev.terminating {
                    continue;
                }
                by_addr.remove(&prev.addr);
            }
            let local = ep.node_name.as_deref() == Some(node_name);
            let addr = BackendAddr { ip: IpAddr::V4(ip), port: port_num, local };
            let zone_hints = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect());
            let node_hints = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect());
            let e = Ep { addr, ready, serving, terminating, node: ep.node_name.clone(), zone_hints, node_hints };
            seen_ip.insert(IpAddr::V4(ip), e.clone());
            by_addr.insert(addr, e);
        }
    }
    by_addr.into_values().collect()
}

/// KEP-1669: ready endpoints; if none, serving-and-terminating ones.
fn usable(eps: &[Ep]) -> Vec<&Ep> {
    let ready: Vec<&Ep> = eps.iter().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.iter().filter(|e| e.serving && e.terminating).collect()
}

/// Topology: when every usable endpoint carries node hints and some are for
/// this node, keep those; else when every one carries zone hints and some
/// are for this node's zone, keep those; otherwise all (kube-proxy's
/// fallback).
fn topology_filter<'a>(eps: Vec<&'a Ep>, node: &NodeInfo) -> Vec<&'a Ep> {
    if !eps.is_empty() && eps.iter().all(|e| e.node_hints.is_some()) {
        let mine: Vec<&Ep> =
            eps.iter().copied().filter(|e| e.node_hints.as_ref().is_some_and(|n| n.contains(&node.name))).collect();
        if !mine.is_empty() {
            return mine;
        }
    }
    let Some(zone) = node.zone.as_deref() else { return eps };
    if eps.is_empty() || eps.iter().any(|e| e.zone_hints.is_none()) {
        return eps;
    }
    let hinted: Vec<&Ep> =
        eps.iter().copied().filter(|e| e.zone_hints.as_ref().is_some_and(|z| z.contains(zone))).collect();
    if hinted.is_empty() { eps } else { hinted }
}

/// A Local policy's endpoints: this node's, with the KEP-1669 fallback to
/// serving-terminating ones decided among this node's endpoints alone (as
/// kube-proxy's CategorizeEndpoints does).
fn node_local<'a>(eps: &'a [Ep], node: &NodeInfo) -> Vec<&'a Ep> {
    let mine: Vec<Ep> = eps.iter().filter(|e| e.node.as_deref() == Some(node.name.as_str())).cloned().collect();
    let keep: BTreeSet<BackendAddr> = usable(&mine).iter().map(|e| e.addr).collect();
    eps.iter().filter(|e| keep.contains(&e.addr)).collect()
}

/// Parses a loadBalancerSourceRanges entry (`a.b.c.d/n`, or a bare address
/// as /32). IPv6 ranges are not enforced yet (the datapath is IPv4).
fn parse_source_range(s: &str) -> Option<SourceRange> {
    let s = s.trim();
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, len.parse::<u8>().ok().filter(|l| *l <= 32)?),
        None => (s, 32),
    };
    let ip = parse_ipv4_sloppy(ip)?;
    // Host bits are masked, as the kernel's LPM trie ignores them anyway.
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some(SourceRange { ip: Ipv4Addr::from(u32::from(ip) & mask), len })
}

fn addrs(eps: &[&Ep]) -> Vec<BackendAddr> {
    let mut v: Vec<BackendAddr> = eps.iter().map(|e| e.addr).collect();
    v.sort();
    v.dedup();
    v
}

fn parse_ip(s: &str, skipped: &mut BTreeSet<SkipReason>) -> Option<IpAddr> {
    match parse_any_ip(s) {
        Some(ip @ IpAddr::V4(_)) => Some(ip),
        Some(IpAddr::V6(_)) => {
            skipped.insert(SkipReason::Ipv6Unsupported);
            None
        }
        None => {
            skipped.insert(SkipReason::InvalidIp(s.to_owned()));
            None
        }
    }
}

/// Translates one Service and its EndpointSlices (already filtered to this
/// Service, see [`slice_belongs_to`]) into frontends.
#[must_use]
pub fn translate_service(svc: &Service, slices: &[&EndpointSlice], node: &NodeInfo) -> Translation {
    let name = svc_name(svc);
    let mut out = Translation::default();
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        out.skipped.push(Skip { owner: name, reason: SkipReason::NotProxied });
        return out;
    }
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        out.skipped
            .push(Skip { owner: name, reason: SkipReason::UnknownServiceType(svc_type.to_owned()) });
        return out;
    }
    let mut cluster_ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    if cluster_ips.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref()
    {
        cluster_ips.push(ip);
    }
    if cluster_ips.iter().any(|ip| *ip == "None") || cluster_ips.is_empty() {
        out.skipped.push(Skip { owner: name, reason: SkipReason::NotProxied });
        return out;
    }
    let mut svc_skips: BTreeSet<SkipReason> = BTreeSet::new();
    let cluster_ips: Vec<IpAddr> = cluster_ips.iter().filter_map(|s| parse_ip(s, &mut svc_skips)).collect();
    if cluster_ips.is_empty() {
        // No usable ClusterIP: kube-proxy programs nothing for the Service,
        // not its NodePorts or external addresses either.
        out.skipped.extend(svc_skips.into_iter().map(|reason| Skip { owner: name.clone(), reason }));
        return out;
    }
    let external_ips: Vec<IpAddr> =
        spec.external_ips.iter().flatten().filter_map(|s| parse_ip(s, &mut svc_skips)).collect();
    let mut lb_ips: Vec<IpAddr> = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten();
        for i in ingress {
            let Some(ip) = i.ip.as_deref() else { continue };
            if i.ip_mode.as_deref() == Some("Proxy") {
                svc_skips.insert(SkipReason::ProxyIpMode(ip.to_owned()));
                continue;
            }
            if let Some(ip) = parse_ip(ip, &mut svc_skips) {
                lb_ips.push(ip);
            }
        }
    }
    let source_ranges: Option<Vec<SourceRange>> =
        spec.load_balancer_source_ranges.as_ref().filter(|r| !r.is_empty()).map(|ranges| {
            let mut v: Vec<SourceRange> = Vec::new();
            for r in ranges {
                match parse_source_range(r) {
                    Some(sr) => v.push(sr),
                    // IPv6 ranges are for IPv6 clients, which cannot reach an
                    // IPv4 LoadBalancer IP: nothing to enforce here.
                    None if r.contains(':') => {}
                    None => {
                        svc_skips.insert(SkipReason::InvalidSourceRange(r.clone()));
                    }
                }
            }
            v.sort();
            v.dedup();
            v
        });
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });

    for sp in spec.ports.iter().flatten() {
        let port_owner = match sp.name.as_deref() {
            Some(n) if !n.is_empty() => format!("{name}:{n}"),
            _ => format!("{name}:{}", sp.port),
        };
        let mut skips: BTreeSet<SkipReason> = BTreeSet::new();
        let Some(proto) = Proto::parse(sp.protocol.as_deref()) else {
            skips.insert(SkipReason::UnknownProtocol(sp.protocol.clone().unwrap_or_default()));
            out.skipped.extend(skips.into_iter().map(|reason| Skip { owner: port_owner.clone(), reason }));
            continue;
        };
        let Some(port) = u16::try_from(sp.port).ok().filter(|p| *p != 0) else {
            out.skipped.push(Skip { owner: port_owner, reason: SkipReason::InvalidPort(sp.port) });
            continue;
        };
        if proto == Proto::Sctp {
            out.skipped.push(Skip { owner: port_owner, reason: SkipReason::SctpUnsupported });
            continue;
        }
        let eps = endpoints_for_port(sp, slices, publish_not_ready, &node.name, &mut skips);
        let usable_eps = usable(&eps);
        // Topology applies only when no Local policy narrows the set already.
        let cluster_set = if internal_local {
            node_local(&eps, node)
        } else {
            topology_filter(usable_eps.clone(), node)
        };
        let cluster_backends = addrs(&cluster_set);
        let local_backends = addrs(&node_local(&eps, node));
        let any_usable = !usable_eps.is_empty();
        let cluster_backends_ext = addrs(&topology_filter(usable_eps.clone(), node));
        let most = cluster_backends.len().max(local_backends.len()).max(cluster_backends_ext.len());
        if most > crate::sync::MAX_BACKENDS_PER_FRONTEND {
            skips.insert(SkipReason::TooManyEndpoints(most));
            out.skipped.extend(skips.into_iter().map(|reason| Skip { owner: port_owner.clone(), reason }));
            continue;
        }
        // eTP=Cluster external frontends share the internal list's set
        // unless internalTrafficPolicy Local narrows that list (decided by
        // the spec, not the endpoints, so a set keeps its id as endpoints
        // come and go).
        let ext_list = if internal_local { BackendList::External } else { BackendList::Internal };
        let base = |ip: IpAddr, port: u16, kind: FrontendKind, scope: Scope, backends: &Vec<BackendAddr>, list: BackendList, local: bool| Frontend {
            addr: FrontendAddr { ip, port, proto, scope },
            kind,
            owner: port_owner.clone(),
            backends: backends.clone(),
            list,
            affinity_timeout_s,
            drop_when_empty: local && backends.is_empty() && any_usable,
            two_scopes: false,
            source_ranges: if kind == FrontendKind::LoadBalancer { source_ranges.clone() } else { None },
        };
        // An external address (NodePort, LoadBalancer IP, externalIP): with
        // externalTrafficPolicy Local, clients outside the cluster get this
        // node's endpoints only, and clients inside it (the internal twin)
        // every endpoint under the internal policy, as kube-proxy does.
        let external = |out: &mut Vec<Frontend>, ip: IpAddr, port: u16, kind: FrontendKind| {
            if external_local {
                let mut fe = base(ip, port, kind, Scope::External, &local_backends, BackendList::Local, true);
                fe.two_scopes = true;
                out.push(fe);
                out.push(base(ip, port, kind, Scope::Internal, &cluster_backends, BackendList::Internal, internal_local));
            } else {
                out.push(base(ip, port, kind, Scope::External, &cluster_backends_ext, ext_list, false));
            }
        };
        for ip in &cluster_ips {
            out.frontends.push(base(*ip, port, FrontendKind::ClusterIp, Scope::External, &cluster_backends, BackendList::Internal, internal_local));
        }
        for ip in &external_ips {
            external(&mut out.frontends, *ip, port, FrontendKind::ExternalIp);
        }
        for ip in &lb_ips {
            external(&mut out.frontends, *ip, port, FrontendKind::LoadBalancer);
        }
        if matches!(svc_type, "NodePort" | "LoadBalancer")
            && let Some(np) = sp.node_port
        {
            match u16::try_from(np).ok().filter(|p| *p != 0) {
                Some(np) => {
                    for ip in &node.addresses {
                        if ip.is_ipv4() {
                            external(&mut out.frontends, *ip, np, FrontendKind::NodePort);
                        }
                    }
                }
                None => {
                    skips.insert(SkipReason::InvalidPort(np));
                }
            }
        }
        out.skipped.extend(skips.into_iter().map(|reason| Skip { owner: port_owner.clone(), reason }));
    }
    out.skipped.extend(svc_skips.into_iter().map(|reason| Skip { owner: name.clone(), reason }));
    out
}

/// Desired state of the whole node: every frontend, keyed by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, Frontend>,
    /// Every frontend address with its `VIP_F_*` flags: ClusterIPs refuse
    /// ports they do not serve; node addresses pass what is not a frontend.
    pub vips: BTreeMap<IpAddr, u32>,
    pub skipped: Vec<Skip>,
}

/// The `VIP_F_*` flags of a frontend address.
pub(crate) fn vip_flags(fe: &Frontend, node: &NodeInfo) -> u32 {
    let mut f = 0;
    if fe.kind == FrontendKind::ClusterIp {
        f |= proxy_common::VIP_F_CLUSTER_IP;
    }
    if fe.kind == FrontendKind::NodePort || node.addresses.contains(&fe.addr.ip) {
        f |= proxy_common::VIP_F_NODE;
    }
    f
}

/// Per-Service translations keyed by the resourceVersions of the Service and
/// its EndpointSlices, so a change to one Service re-translates only that
/// Service. Objects without resourceVersions (standalone files) are always
/// translated afresh.
#[derive(Default)]
pub struct TranslationCache {
    node: Option<NodeInfo>,
    entries: std::collections::HashMap<(String, String), (String, Translation)>,
}

pub(crate) fn fingerprint(svc: &Service, slices: &[&EndpointSlice]) -> Option<String> {
    let mut f = svc.metadata.resource_version.clone()?;
    let mut rvs: Vec<(&str, &str)> = Vec::with_capacity(slices.len());
    for s in slices {
        rvs.push((s.metadata.name.as_deref()?, s.metadata.resource_version.as_deref()?));
    }
    rvs.sort_unstable();
    for (n, rv) in rvs {
        f.push('|');
        f.push_str(n);
        f.push('=');
        f.push_str(rv);
    }
    Some(f)
}

/// Who keeps an (address, port, protocol) two Services claim: a ClusterIP
/// before a NodePort before a LoadBalancer IP or externalIP (so a Service's
/// externalIPs can never take over another's ClusterIP, such as the
/// `kubernetes` Service's), then the older Service, then namespace/name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence<'a> {
    kind: u8,
    created: Option<k8s_openapi::jiff::Timestamp>,
    ns: &'a str,
    name: &'a str,
}

pub(crate) fn kind_rank(k: FrontendKind) -> u8 {
    match k {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort => 1,
        FrontendKind::LoadBalancer | FrontendKind::ExternalIp => 2,
    }
}

pub(crate) fn conflict(lost: &Frontend, winner: &str) -> Skip {
    Skip {
        owner: lost.owner.clone(),
        reason: SkipReason::Conflict(format!(
            "{:?} {}:{}/{:?} is already {winner}'s",
            lost.kind, lost.addr.ip, lost.addr.port, lost.addr.proto
        )),
    }
}

/// Translates every Service. Two Services claiming the same frontend address
/// (an API-level conflict) are resolved by [`Precedence`]; the loser is
/// reported as a conflict.
#[must_use]
pub fn translate_all(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> Desired {
    translate_all_cached(services, slices, node, &mut TranslationCache::default())
}

/// [`translate_all`] reusing unchanged Services' translations from `cache`.
pub fn translate_all_cached(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    cache: &mut TranslationCache,
) -> Desired {
    if cache.node.as_ref() != Some(node) {
        cache.entries.clear();
        cache.node = Some(node.clone());
    }
    let mut by_owner: std::collections::HashMap<(&str, &str), Vec<&EndpointSlice>> =
        std::collections::HashMap::with_capacity(services.len());
    for s in slices {
        if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            by_owner.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| {
        (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
            .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
    });
    let mut desired = Desired::default();
    let mut claims: BTreeMap<FrontendAddr, (Precedence<'_>, Frontend)> = BTreeMap::new();
    let mut lost: Vec<Frontend> = Vec::new();
    let mut live: std::collections::HashSet<(String, String)> = std::collections::HashSet::with_capacity(services.len());
    for svc in sorted {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let empty = Vec::new();
        let svc_slices = by_owner.get(&(ns, name)).unwrap_or(&empty);
        let key = (ns.to_owned(), name.to_owned());
        let fp = fingerprint(svc, svc_slices);
        let t = match (&fp, cache.entries.get(&key)) {
            (Some(fp), Some((cached_fp, t))) if fp == cached_fp => t.clone(),
            _ => {
                let t = translate_service(svc, svc_slices, node);
                if let Some(fp) = fp {
                    cache.entries.insert(key.clone(), (fp, t.clone()));
                }
                t
            }
        };
        live.insert(key);
        let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
        for fe in t.frontends {
            let rank = Precedence { kind: kind_rank(fe.kind), created, ns, name };
            match claims.entry(fe.addr) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((rank, fe));
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if o.get().0 <= rank {
                        lost.push(fe);
                    } else {
                        let (_, l) = o.insert((rank, fe));
                        lost.push(l);
                    }
                }
            }
        }
        desired.skipped.extend(t.skipped);
    }
    // Losers name the final winner of their address.
    for fe in lost {
        desired.skipped.push(conflict(&fe, &claims[&fe.addr].1.owner));
    }
    for (addr, (_, fe)) in claims {
        *desired.vips.entry(addr.ip).or_default() |= vip_flags(&fe, node);
        desired.frontends.insert(addr, fe);
    }
    // Replies of SNATed flows come back to the SNAT address: the datapath
    // looks at it (as at every node address with NodePorts).
    if let Some(a) = node.snat_address() {
        *desired.vips.entry(IpAddr::V4(a)).or_default() |= proxy_common::VIP_F_NODE;
    }
    cache.entries.retain(|k, _| live.contains(k));
    desired
}
