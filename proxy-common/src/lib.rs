//! Map keys, values and constants shared by the eBPF datapath and the agent.
//!
//! Every type is `#[repr(C)]`, has explicit padding and no `bool`/enum fields,
//! so the layout the kernel sees is exactly the layout written here. Sizes are
//! asserted at compile time: changing a layout without bumping the map-name
//! version suffix would make a restarted agent adopt an incompatible pinned map.
//!
//! Byte order: addresses are stored as the 16 bytes of an IPv6 address in
//! network order; IPv4 addresses are IPv4-mapped (`::ffff:a.b.c.d`), so one
//! map serves both families. Ports are stored in host order so that
//! `bpftool map dump` prints them as humans read them.
#![no_std]

/// Directory under the bpffs mount that holds our pins by default.
pub const PIN_DIR_NAME: &str = "kproxy";

/// Services map: frontends (slot 0) and their backend slots (1..=count).
pub const MAP_SERVICES: &str = "kp_svc_v1";
/// Backends map: backend id -> address.
pub const MAP_BACKENDS: &str = "kp_backend_v1";
/// TCP connection tracking (plain hash, never evicts: under pressure new
/// flows lose, established ones stay; the agent's collector expires entries).
pub const MAP_CT_TCP: &str = "kp_ct_tcp_v2";
/// Non-TCP connection tracking (LRU): UDP churn can only evict UDP flows.
pub const MAP_CT_ANY: &str = "kp_ct_any_v2";
/// ClientIP session affinity map (LRU).
pub const MAP_AFFINITY: &str = "kp_affin_v1";
/// (frontend id, backend id) pairs: which backends a frontend has now.
pub const MAP_MEMBERS: &str = "kp_member_v1";
/// Per-frontend Maglev lookup tables (consistent backend choice).
pub const MAP_MAGLEV: &str = "kp_maglev_v1";
/// Service addresses (ClusterIPs, external and LoadBalancer IPs, node
/// addresses that carry NodePorts): lets every other packet skip the
/// frontend lookup, and ClusterIPs refuse ports they do not serve.
pub const MAP_VIPS: &str = "kp_vip_v1";
/// First-fragment ports, so later fragments of a datagram are translated too.
pub const MAP_FRAGS: &str = "kp_frag_v1";
/// Socket-level LB: (socket, backend) -> the frontend the socket asked for,
/// so replies and getpeername() show the Service address (LRU).
pub const MAP_SOCK_REV: &str = "kp_sock_rev_v1";
/// Agent bookkeeping that must survive restarts (id high-water marks).
pub const MAP_META: &str = "kp_meta_v1";
/// Per-CPU counters indexed by [`Stat`].
pub const MAP_STATS: &str = "kp_stats_v3";
/// SNAT of external flows to backends on other nodes: the reply tuple
/// (backend -> node address:SNAT port) -> the flow's forward conntrack key.
pub const MAP_SNAT: &str = "kp_snat_v1";
/// Node-wide settings the agent writes (one [`NodeConfig`] at index 0).
pub const MAP_CONFIG: &str = "kp_config_v1";
/// loadBalancerSourceRanges: (frontend id, source prefix) LPM trie.
pub const MAP_SRC_RANGES: &str = "kp_srcrange_v1";
/// Tail calls of the TC programs (see [`CALL_NEW_FLOW`]). Pinned like the
/// others: the kernel empties a program array once no file descriptor or
/// pin holds it, and the datapath outlives the agent. A restarted agent
/// writes its own programs into the same slots, one atomic update each.
pub const MAP_CALLS: &str = "kp_calls_v1";
/// Tail-call slot of the new-flow program for an ingress program variant:
/// `CALL_NEW_FLOW + 2 * external + l3`. The new-flow path (backend choice,
/// SNAT, conntrack creation) runs as a program of its own so that it gets
/// its own 512-byte stack, as Cilium's CILIUM_CALL_* programs do.
pub const CALL_NEW_FLOW: u32 = 0;
/// Tail-call slot of `kp_tc_debug` (debug events, `--debug-events`).
pub const CALL_DEBUG: u32 = 4;
pub const CALL_COUNT: u32 = 5;
/// The debug-event program (tail call, slot [`CALL_DEBUG`]).
pub const PROG_TC_DEBUG: &str = "kp_tc_debug";
/// Load-time global: `u32` 1 = debug events on.
pub const GLOBAL_DEBUG: &str = "KP_DEBUG";
/// The new-flow programs, by tail-call slot.
pub const PROG_TC_NEW_FLOW: [&str; 4] =
    ["kp_tc_new_flow", "kp_tc_new_flow_l3", "kp_tc_new_flow_ext", "kp_tc_new_flow_ext_l3"];
/// Every map of the eBPF object, in the order the agent adopts/creates them
/// ([`MAP_META`] is the agent's own and not part of the object).
pub const ALL_MAPS: [&str; 16] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CT_TCP,
    MAP_CT_ANY,
    MAP_AFFINITY,
    MAP_MEMBERS,
    MAP_MAGLEV,
    MAP_VIPS,
    MAP_FRAGS,
    MAP_SOCK_REV,
    MAP_STATS,
    MAP_SNAT,
    MAP_CONFIG,
    MAP_SRC_RANGES,
    MAP_CALLS,
    MAP_XCALLS,
];
/// Pins of earlier layouts; removed once the new datapath is attached.
pub const RETIRED_MAPS: [&str; 3] = ["kp_ct_v1", "kp_stats_v1", "kp_stats_v2"];

/// TC ingress program for Ethernet devices (veth, physical NICs, bridge ports).
pub const PROG_TC_INGRESS: &str = "kp_tc_ingress";
/// TC egress program for Ethernet devices: reverse NAT of replies.
pub const PROG_TC_EGRESS: &str = "kp_tc_egress";
/// The same two for L3 devices without an Ethernet header (WireGuard, IPIP, tun).
pub const PROG_TC_INGRESS_L3: &str = "kp_tc_ingress_l3";
pub const PROG_TC_EGRESS_L3: &str = "kp_tc_egress_l3";
/// TC ingress of the node's external interfaces (uplinks): clients there
/// are outside the cluster (external scope of two-scope frontends), and
/// their flows to backends on other nodes are SNATed to the node.
pub const PROG_TC_INGRESS_EXT: &str = "kp_tc_ingress_ext";
pub const PROG_TC_INGRESS_EXT_L3: &str = "kp_tc_ingress_ext_l3";
/// XDP on external interfaces (`--nodeport-acceleration`): NodePort,
/// LoadBalancer and externalIP flows translated and forwarded before the
/// stack; anything it cannot finish continues to the TC path.
pub const PROG_XDP: &str = "kp_xdp";
/// `kp_xdp`'s new-flow program (tail call, slot 0 of [`MAP_XCALLS`]).
pub const PROG_XDP_NEW_FLOW: &str = "kp_xdp_new_flow";
/// An XDP program that passes everything (for veth peers that receive
/// XDP_TX or redirected frames).
pub const PROG_XDP_PASS: &str = "kp_xdp_pass";
/// The XDP program's tail calls (pinned, as [`MAP_CALLS`]).
pub const MAP_XCALLS: &str = "kp_xcalls_v1";

/// A TC program that passes everything (baseline of cost measurements).
pub const PROG_TC_PASS: &str = "kp_tc_pass";

/// cgroup socket programs (socket-level load balancing).
pub const PROG_SOCK_CONNECT4: &str = "kp_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "kp_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "kp_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "kp_sock_getpeername4";
/// Every socket program, in attach order.
pub const SOCK_PROGRAMS: [&str; 4] = [PROG_SOCK_CONNECT4, PROG_SOCK_SENDMSG4, PROG_SOCK_RECVMSG4, PROG_SOCK_GETPEERNAME4];

/// Load-time globals of the socket programs.
/// `u32`: 1 = translate only sockets of the host network namespace.
pub const GLOBAL_SOCK_HOST_ONLY: &str = "KP_SOCK_HOST_ONLY";
/// `u64`: the netns cookie of the host network namespace (the agent's).
pub const GLOBAL_HOST_NETNS_COOKIE: &str = "KP_HOST_NETNS_COOKIE";

/// Default capacities; the agent can override them at load time.
pub const DEFAULT_MAX_SERVICE_ENTRIES: u32 = 262_144;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAX_CT_TCP: u32 = 524_288;
pub const DEFAULT_MAX_CT_ANY: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 131_072;
pub const DEFAULT_MAX_MAGLEV: u32 = 65_536;
pub const MAX_FRAGS: u32 = 8_192;
pub const DEFAULT_MAX_SOCK_REV: u32 = 131_072;
pub const DEFAULT_MAX_SNAT: u32 = 131_072;
pub const MAX_SRC_RANGES: u32 = 16_384;
/// SNAT ports: below the NodePort range (30000-32767, whose ports the
/// node answers as frontends) and outside Linux's default ephemeral range
/// (32768-60999), so the node's own connections never pick them (the agent
/// also reserves them in `net.ipv4.ip_local_reserved_ports`). A reply is
/// matched on the whole tuple (backend address and port, node address and
/// port), so a node service listening on one of these ports is unaffected.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 1_024;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 29_999;
/// How many ports a new SNAT flow tries before it is dropped.
pub const SNAT_TRIES: u32 = 32;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Key of the services map, which holds two kinds of entries:
/// - a frontend: its address, port, protocol and scope, slot 0; the value
///   holds the backend count and the id of its backend set;
/// - a backend slot of a backend set ([`ServiceKey::set_slot`]): protocol 0
///   (no frontend has it), the set id in the address, slots 1..=count, one
///   backend id each. The frontends of one Service port that share a
///   backend list (the ClusterIP, every NodePort address, the LoadBalancer
///   IPs) share one set, so a NodePort does not copy its slots per node
///   address.
///
/// Writing new slots before a frontend's count means a reader never sees a
/// half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16], // frontend address, IPv6 or IPv4-mapped, network order
    pub port: u16,      // frontend port, host order
    pub proto: u8,      // IPPROTO_TCP / IPPROTO_UDP
    pub scope: u8,      // SCOPE_* (which clients this frontend serves)
    pub slot: u16,      // 0 = frontend, 1..=count = backend slot
    pub _pad: u16,      // zero
}

impl ServiceKey {
    /// Slot `slot` (1-based) of backend set `set_id` (a frontend's
    /// `ServiceValue::svc_id`).
    #[inline(always)]
    #[must_use]
    pub const fn set_slot(set_id: u32, slot: u16) -> Self {
        let b = set_id.to_be_bytes();
        ServiceKey {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b[0], b[1], b[2], b[3]],
            port: 0,
            proto: 0,
            scope: 0,
            slot,
            _pad: 0,
        }
    }

    /// The backend set of a slot entry ([`ServiceKey::set_slot`]), `None`
    /// for a frontend.
    #[must_use]
    pub fn set_id(&self) -> Option<u32> {
        (self.proto == 0 && self.slot != 0 && self.addr[..12] == [0; 12])
            .then(|| u32::from_be_bytes([self.addr[12], self.addr[13], self.addr[14], self.addr[15]]))
    }
}

/// Frontend reachable by every client.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Frontend variant used for in-cluster clients when the policy differs
/// (internalTrafficPolicy vs externalTrafficPolicy).
pub const SCOPE_INTERNAL: u8 = 1;

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,         // slot > 0: backend id; slot 0: affinity group (the Service port's, shared by its frontends)
    pub count: u16,              // slot 0: number of backend slots; 0 = reject
    pub flags: u16,              // slot 0: SVC_F_*
    pub svc_id: u32,             // slot 0: id of this frontend's backend set (slots, members, Maglev, source ranges)
    pub affinity_timeout_s: u32, // slot 0: ClientIP affinity timeout, seconds
}

/// ClientIP session affinity enabled.
pub const SVC_F_AFFINITY: u16 = 1 << 0;
/// A Maglev table for this frontend is programmed: new flows pick their
/// backend by a consistent hash of the flow instead of at random.
pub const SVC_F_MAGLEV: u16 = 1 << 2;
/// No backend here but some elsewhere (a Local traffic policy on a node
/// without local endpoints): new flows are dropped, as kube-proxy does,
/// instead of refused.
pub const SVC_F_DROP_EMPTY: u16 = 1 << 3;
/// This (external-scope) frontend has an internal-scope twin with other
/// backends: clients inside the cluster (pods, the node) use the twin
/// (externalTrafficPolicy: Local serves them every endpoint, as kube-proxy does).
pub const SVC_F_TWO_SCOPES: u16 = 1 << 4;
/// New flows are admitted only from the frontend's source ranges
/// (loadBalancerSourceRanges, [`MAP_SRC_RANGES`]); others are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 5;

/// The affinity key's id for a frontend: its Service port's group, shared by
/// the port's ClusterIP, NodePort and external frontends (kube-proxy keeps
/// ClientIP affinity per Service port).
#[inline(always)]
#[must_use]
pub const fn affinity_group(svc: &ServiceValue) -> u32 {
    if svc.backend_id != 0 { svc.backend_id } else { svc.svc_id }
}

/// Value of the backends map (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: [u8; 16], // backend address, IPv6 or IPv4-mapped, network order
    pub port: u16,      // backend port, host order
    pub proto: u8,      // IPPROTO_*
    pub flags: u8,      // BACKEND_F_*
}

/// The endpoint runs on this node: external flows reach it without SNAT
/// (its replies come back through this node anyway).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// Key of the membership map: this frontend currently has this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub svc_id: u32,     // backend set (ServiceValue::svc_id of its frontends)
    pub backend_id: u32, // backend id
}

/// Entries of one Maglev table (prime; Maglev wants it well above the
/// backend count: with 1021, up to ~100 backends share load within ~10%).
pub const MAGLEV_M: usize = 1021;

/// Value of the Maglev map (key: frontend id): backend id per table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_M], // backend id for flow hash % MAGLEV_M
    pub _pad: u32,                    // zero (keeps the size a multiple of 8)
}

/// Value of the service address map (key: 16-byte address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipValue {
    pub flags: u32, // VIP_F_*
    pub _pad: u32,  // zero
}

/// A ClusterIP: packets to ports or protocols it does not serve are refused
/// (kube-proxy's nftables mode rejects them too).
pub const VIP_F_CLUSTER_IP: u32 = 1 << 0;
/// One of this node's own addresses (NodePorts): anything that is not a
/// frontend is the node's own traffic and passes.
pub const VIP_F_NODE: u32 = 1 << 1;

/// Key of the conntrack maps: the tuple as it appears on the wire at our hook.
/// Forward entries are keyed by (client, frontend), reply entries by
/// (backend, client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16], // source address, network order
    pub daddr: [u8; 16], // destination address, network order
    pub sport: u16,      // source port, host order
    pub dport: u16,      // destination port, host order
    pub proto: u8,       // IPPROTO_*
    pub _pad: [u8; 3],   // zero
}

/// Value of the conntrack maps. The forward entry holds the flow's state;
/// the reply entry only points back at it and is honoured only while the
/// forward entry is alive and agrees (a reply entry lives and dies with it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub nat_addr: [u8; 16], // forward: backend address; reply: frontend address
    pub nat_port: u16,      // forward: backend port; reply: frontend port
    pub flags: u8,          // CT_F_*
    pub _pad: u8,           // zero
    pub backend_id: u32,    // backend chosen for this flow
    pub last_seen_ns: u64,  // forward: last packet either way (bpf_ktime_get_ns); reply: creation
    pub svc_id: u32,        // backend set id (ServiceValue::svc_id: membership checks)
    pub snat_port: u16,     // forward: SNAT port toward a remote backend (source = NodeConfig::snat_addr); 0 = none
    pub _pad2: u16,         // zero
}

/// Entry is the reply direction (rewrite the source back to the frontend).
pub const CT_F_REPLY: u8 = 1 << 0;
/// TCP: both sides sent FIN, or one sent RST: short lifetime, a new SYN on
/// this tuple selects again.
pub const CT_F_CLOSING: u8 = 1 << 1;
/// Hairpin flow: the client is its own backend. The source is rewritten to
/// the frontend too (so the reply comes back through the node) and packets
/// are sent straight back out of the interface they came in on.
pub const CT_F_HAIRPIN: u8 = 1 << 2;
/// TCP: we translated a SYN of this flow (so a SYN-ACK reply is ours).
pub const CT_F_SYN_SEEN: u8 = 1 << 3;
/// A reply was seen (TCP: the flow is established).
pub const CT_F_SEEN_REPLY: u8 = 1 << 4;
/// TCP: the client sent FIN.
pub const CT_F_FIN_FWD: u8 = 1 << 5;
/// TCP: the backend sent FIN.
pub const CT_F_FIN_REV: u8 = 1 << 6;
/// TCP: the client acknowledged after a reply (the handshake completed):
/// only then does the flow get the established lifetime, so a half-open
/// flow (a SYN flood answered by SYN-ACKs) expires like a SYN.
pub const CT_F_ESTABLISHED: u8 = 1 << 7;

/// Lifetimes by state, checked on lookup and by the agent's collector
/// (Cilium's defaults; netfilter uses the same shape).
pub const CT_LIFETIME_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_NONTCP_NS: u64 = 120 * 1_000_000_000;
/// Entries are refreshed at most this often, to keep writes off the fast path.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Whether a forward entry is finished or past its lifetime at `now`.
#[inline(always)]
#[must_use]
pub const fn ct_done(proto: u8, v: &CtValue, now: u64) -> bool {
    v.flags & CT_F_CLOSING != 0 || now.wrapping_sub(v.last_seen_ns) > ct_lifetime_ns(proto, v.flags)
}

/// How long a forward entry with these flags lives after its last packet.
#[inline(always)]
#[must_use]
pub const fn ct_lifetime_ns(proto: u8, flags: u8) -> u64 {
    if proto != IPPROTO_TCP {
        CT_LIFETIME_NONTCP_NS
    } else if flags & CT_F_CLOSING != 0 {
        CT_LIFETIME_TCP_CLOSING_NS
    } else if flags & CT_F_ESTABLISHED == 0 {
        CT_LIFETIME_TCP_SYN_NS
    } else {
        CT_LIFETIME_TCP_NS
    }
}

/// The reply key of a forward entry (client -> frontend) whose flow went to
/// `backend:bport`. A hairpin reply is addressed to the frontend (the
/// forward packet's source was rewritten to it); an ordinary one to the
/// client.
#[inline(always)]
#[must_use]
pub fn ct_reply_key(fwd: &CtKey, backend: [u8; 16], bport: u16, hairpin: bool) -> CtKey {
    CtKey {
        saddr: backend,
        daddr: if hairpin { fwd.daddr } else { fwd.saddr },
        sport: bport,
        dport: fwd.sport,
        proto: fwd.proto,
        _pad: [0; 3],
    }
}

/// The forward key a reply entry belongs to.
#[inline(always)]
#[must_use]
pub fn ct_forward_key_of_reply(reply_key: &CtKey, reply: &CtValue) -> CtKey {
    CtKey {
        // A hairpin reply goes to the frontend; its client is the backend.
        saddr: if reply.flags & CT_F_HAIRPIN != 0 { reply_key.saddr } else { reply_key.daddr },
        daddr: reply.nat_addr,
        sport: reply_key.dport,
        dport: reply.nat_port,
        proto: reply_key.proto,
        _pad: [0; 3],
    }
}

/// Value of the config map ([`MAP_CONFIG`], index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig {
    pub snat_addr: [u8; 16], // node address for SNAT toward remote backends, network order; zero: no SNAT
    pub snat_port_min: u16,  // first SNAT port, host order
    pub snat_port_max: u16,  // last SNAT port, host order
    pub _pad: u32,           // zero
}

/// Data of a source-range LPM key (the prefix length precedes it).
/// The prefix always covers the whole `svc_id` (32 bits) and then
/// `96 + n` bits of an IPv4-mapped address for an IPv4 /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRange {
    pub svc_id: [u8; 4], // backend set id (ServiceValue::svc_id), big-endian (compared byte by byte)
    pub addr: [u8; 16],  // source prefix, IPv6 or IPv4-mapped, network order
}

/// LPM prefix length of an IPv4 /`len` source range.
#[inline(always)]
#[must_use]
pub const fn src_range_prefix_v4(len: u8) -> u32 {
    32 + 96 + len as u32
}

/// Key of the ClientIP affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u8; 16], // client address, network order
    pub svc_id: u32,      // backend set id (ServiceValue::svc_id)
}

/// Value of the ClientIP affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,   // backend chosen for this client
    pub _pad: u32,         // zero
    pub last_used_ns: u64, // bpf_ktime_get_ns() of the last new flow
}

/// Key of the fragment map: one IPv4 datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 4], // source address, network order
    pub daddr: [u8; 4], // destination address, network order
    pub id: u16,        // IPv4 identification, host order
    pub proto: u8,      // IPPROTO_*
    pub _pad: u8,       // zero
}

/// Value of the fragment map: the ports the first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragValue {
    pub sport: u16, // host order
    pub dport: u16, // host order
}

/// Key of the socket reverse map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,     // bpf_get_socket_cookie()
    pub addr: [u8; 16],  // backend address, network order
    pub port: u16,       // backend port, host order
    pub _pad: [u8; 6],   // zero
}

/// Value of the socket reverse map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevValue {
    pub addr: [u8; 16],  // frontend address, network order
    pub port: u16,       // frontend port, host order
    pub _pad: u16,       // zero
    pub svc_id: u32,     // backend set id (ServiceValue::svc_id)
    pub backend_id: u32, // backend id (the collector drops entries of backends that left)
    pub _pad2: u32,      // zero
}

/// Slots of the meta map (`u64` values).
pub const META_NEXT_BACKEND_ID: u32 = 0;
pub const META_NEXT_SVC_ID: u32 = 1;
pub const META_COUNT: u32 = 4;

/// Datapath counters (per-CPU array index). Drop and pass reasons are shared
/// codes so the agent can export them as metrics by name.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not IPv4 (other EtherType, VLAN-tagged frame, IPv6).
    PassNotIpv4 = 0,
    /// A fragment of a datagram that is not ours.
    PassFragment = 1,
    /// Neither TCP, UDP nor an ICMP error.
    PassOtherProto = 2,
    /// Not addressed to a Service.
    PassNoService = 3,
    /// New flow translated.
    NewFlow = 4,
    /// Packet of a known flow translated.
    CtHit = 5,
    /// Reply reverse-translated at egress.
    ReplyNat = 6,
    /// Refused: the Service has no usable endpoint.
    RejectNoBackend = 7,
    /// Dropped: the chosen backend vanished mid-update.
    DropBackendMissing = 8,
    /// Dropped: the conntrack map is full (new flows lose).
    DropCtFull = 9,
    /// Dropped: a rewrite failed half-way.
    DropMalformed = 10,
    /// New flow sent to its ClientIP-affine backend.
    AffinityHit = 11,
    /// Hairpin packet (a pod through its own Service).
    Hairpin = 12,
    /// Refused: a ClusterIP on a port or protocol it does not serve.
    RejectUnknownPort = 13,
    /// A direct flow reused the tuple of a finished Service flow: its stale entries removed.
    StaleReplyEvicted = 14,
    /// A reply entry matched but its flow is gone or disagrees: left untouched.
    ReplyNotOurs = 15,
    /// ICMP error about a translated flow translated (outer and inner header).
    IcmpErrorNat = 16,
    /// Non-first fragment translated from the first fragment's ports.
    FragmentNat = 17,
    /// Dropped: a fragment to a Service address whose first fragment was not seen.
    DropFragment = 18,
    /// Backend chosen by the Maglev table.
    SelectMaglev = 19,
    /// Backend chosen at random.
    SelectRandom = 20,
    /// Dropped: a ClusterIP with a protocol it does not serve (not TCP, UDP or ICMP).
    DropUnknownProto = 21,
    /// Socket LB: connect() to a Service sent to a backend.
    SockConnect = 22,
    /// Socket LB: an unconnected datagram to a Service sent to a backend.
    SockSendmsg = 23,
    /// Socket LB: a reply's source or getpeername() shown as the Service again.
    SockRevNat = 24,
    /// Socket LB: connect()/sendmsg() to a Service without endpoints or to a ClusterIP port it does not serve refused (ECONNREFUSED).
    SockRefused = 25,
    /// Socket LB in host-only mode: a pod's socket left to the TC path.
    SockSkipNetns = 26,
    /// Dropped: a Local traffic policy and no endpoint on this node (kube-proxy drops too).
    DropNoLocal = 27,
    /// Socket LB: a pod's connected UDP socket left to the TC path (it then follows backend changes per packet).
    SockUdpToTc = 28,
    /// New external flow to a backend on another node, SNATed to the node.
    SnatNew = 29,
    /// Reply of an SNATed flow translated back to its client.
    SnatReply = 30,
    /// Dropped: no free SNAT port for a new flow.
    DropSnatExhausted = 31,
    /// Dropped: source outside the Service's loadBalancerSourceRanges.
    DropSourceRange = 32,
    /// Dropped: no route toward the backend or client of a forwarded flow.
    DropNoRoute = 33,
    /// XDP: translated and sent back out of the interface it came in on.
    XdpTx = 34,
    /// XDP: reserved (flows whose next hop is behind another interface are
    /// left to TC, whose redirect works for any device).
    XdpRedirect = 35,
    /// XDP: translated and handed to the stack (local backend).
    XdpPassTranslated = 36,
    /// XDP: left to the TC path (unknown neighbour, fragment, ICMP, options...).
    XdpToTc = 37,
}

pub const STAT_COUNT: u32 = 38;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::PassNotIpv4,
        Stat::PassFragment,
        Stat::PassOtherProto,
        Stat::PassNoService,
        Stat::NewFlow,
        Stat::CtHit,
        Stat::ReplyNat,
        Stat::RejectNoBackend,
        Stat::DropBackendMissing,
        Stat::DropCtFull,
        Stat::DropMalformed,
        Stat::AffinityHit,
        Stat::Hairpin,
        Stat::RejectUnknownPort,
        Stat::StaleReplyEvicted,
        Stat::ReplyNotOurs,
        Stat::IcmpErrorNat,
        Stat::FragmentNat,
        Stat::DropFragment,
        Stat::SelectMaglev,
        Stat::SelectRandom,
        Stat::DropUnknownProto,
        Stat::SockConnect,
        Stat::SockSendmsg,
        Stat::SockRevNat,
        Stat::SockRefused,
        Stat::SockSkipNetns,
        Stat::DropNoLocal,
        Stat::SockUdpToTc,
        Stat::SnatNew,
        Stat::SnatReply,
        Stat::DropSnatExhausted,
        Stat::DropSourceRange,
        Stat::DropNoRoute,
        Stat::XdpTx,
        Stat::XdpRedirect,
        Stat::XdpPassTranslated,
        Stat::XdpToTc,
    ];

    /// Metric label for this counter.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Stat::PassNotIpv4 => "pass_not_ipv4",
            Stat::PassFragment => "pass_fragment",
            Stat::PassOtherProto => "pass_other_proto",
            Stat::PassNoService => "pass_no_service",
            Stat::NewFlow => "new_flow",
            Stat::CtHit => "ct_hit",
            Stat::ReplyNat => "reply_nat",
            Stat::RejectNoBackend => "reject_no_backend",
            Stat::DropBackendMissing => "drop_backend_missing",
            Stat::DropCtFull => "drop_ct_full",
            Stat::DropMalformed => "drop_malformed",
            Stat::AffinityHit => "affinity_hit",
            Stat::Hairpin => "hairpin",
            Stat::RejectUnknownPort => "reject_unknown_port",
            Stat::StaleReplyEvicted => "stale_reply_evicted",
            Stat::ReplyNotOurs => "reply_not_ours",
            Stat::IcmpErrorNat => "icmp_error_nat",
            Stat::FragmentNat => "fragment_nat",
            Stat::DropFragment => "drop_fragment",
            Stat::SelectMaglev => "select_maglev",
            Stat::SelectRandom => "select_random",
            Stat::DropUnknownProto => "drop_unknown_proto",
            Stat::SockConnect => "sock_connect",
            Stat::SockSendmsg => "sock_sendmsg",
            Stat::SockRevNat => "sock_rev_nat",
            Stat::SockRefused => "sock_refused",
            Stat::SockSkipNetns => "sock_skip_netns",
            Stat::DropNoLocal => "drop_no_local",
            Stat::SockUdpToTc => "sock_udp_to_tc",
            Stat::SnatNew => "snat_new",
            Stat::SnatReply => "snat_reply",
            Stat::DropSnatExhausted => "drop_snat_exhausted",
            Stat::DropSourceRange => "drop_source_range",
            Stat::DropNoRoute => "drop_no_route",
            Stat::XdpTx => "xdp_tx",
            Stat::XdpRedirect => "xdp_redirect",
            Stat::XdpPassTranslated => "xdp_pass_translated",
            Stat::XdpToTc => "xdp_to_tc",
        }
    }

    /// One line on what this counter counts.
    #[must_use]
    pub const fn help(self) -> &'static str {
        match self {
            Stat::PassNotIpv4 => "not IPv4 (other EtherType, VLAN-tagged frame, IPv6)",
            Stat::PassFragment => "a fragment of a datagram that is not ours",
            Stat::PassOtherProto => "neither TCP, UDP nor an ICMP error",
            Stat::PassNoService => "not addressed to a Service",
            Stat::NewFlow => "new flow translated",
            Stat::CtHit => "packet of a known flow translated",
            Stat::ReplyNat => "reply reverse-translated at egress",
            Stat::RejectNoBackend => "refused: the Service has no usable endpoint",
            Stat::DropBackendMissing => "dropped: the chosen backend vanished mid-update",
            Stat::DropCtFull => "dropped: the conntrack map is full (new flows lose)",
            Stat::DropMalformed => "dropped: a rewrite failed half-way",
            Stat::AffinityHit => "new flow sent to its ClientIP-affine backend",
            Stat::Hairpin => "hairpin packet (a pod through its own Service)",
            Stat::RejectUnknownPort => "refused: a ClusterIP on a port or protocol it does not serve",
            Stat::StaleReplyEvicted => "a direct flow reused the tuple of a finished Service flow: its stale entries removed",
            Stat::ReplyNotOurs => "a reply entry matched but its flow is gone or disagrees: left untouched",
            Stat::IcmpErrorNat => "ICMP error about a translated flow translated (outer and inner header)",
            Stat::FragmentNat => "non-first fragment translated from the first fragment's ports",
            Stat::DropFragment => "dropped: a fragment to a Service address whose first fragment was not seen",
            Stat::SelectMaglev => "backend chosen by the Maglev table",
            Stat::SelectRandom => "backend chosen at random",
            Stat::DropUnknownProto => "dropped: a ClusterIP with a protocol it does not serve (not TCP, UDP or ICMP)",
            Stat::SockConnect => "socket LB: connect() to a Service sent to a backend",
            Stat::SockSendmsg => "socket LB: an unconnected datagram to a Service sent to a backend",
            Stat::SockRevNat => "socket LB: a reply's source or getpeername() shown as the Service again",
            Stat::SockRefused => "socket LB: connect()/sendmsg() to a Service without endpoints or to a ClusterIP port it does not serve refused (ECONNREFUSED)",
            Stat::SockSkipNetns => "socket LB in host-only mode: a pod's socket left to the TC path",
            Stat::DropNoLocal => "dropped: a Local traffic policy and no endpoint on this node (kube-proxy drops too)",
            Stat::SockUdpToTc => "socket LB: a pod's connected UDP socket left to the TC path (it then follows backend changes per packet)",
            Stat::SnatNew => "new external flow to a backend on another node, SNATed to the node",
            Stat::SnatReply => "reply of an SNATed flow translated back to its client",
            Stat::DropSnatExhausted => "dropped: no free SNAT port for a new flow",
            Stat::DropSourceRange => "dropped: source outside the Service's loadBalancerSourceRanges",
            Stat::DropNoRoute => "dropped: no route toward the backend or client of a forwarded flow",
            Stat::XdpTx => "XDP: translated and sent back out of the interface it came in on",
            Stat::XdpRedirect => "XDP: reserved (flows toward another interface go to TC)",
            Stat::XdpPassTranslated => "XDP: translated and handed to the stack (local backend)",
            Stat::XdpToTc => "XDP: left to the TC path (unknown neighbour, fragment, ICMP, IP options...)",
        }
    }
}

/// IPv4 address (network-order octets) as the 16-byte IPv4-mapped form.
#[inline(always)]
#[must_use]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 octets of an IPv4-mapped address, if it is one.
#[inline(always)]
#[must_use]
pub fn v4_of_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 24);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 40);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<MemberKey>() == 8);
    assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_M + 4);
    assert!(core::mem::size_of::<VipValue>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<SockRevKey>() == 32);
    assert!(core::mem::size_of::<SockRevValue>() == 32);
    assert!(core::mem::size_of::<NodeConfig>() == 24);
    assert!(core::mem::size_of::<SrcRange>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), contain only integers and byte arrays,
    // and have no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::SrcRange {}
}
