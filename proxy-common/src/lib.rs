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
/// Connection tracking map (LRU): forward and reply tuples.
pub const MAP_CT: &str = "kp_ct_v1";
/// ClientIP session affinity map (LRU).
pub const MAP_AFFINITY: &str = "kp_affin_v1";
/// Per-CPU counters indexed by [`Stat`].
pub const MAP_STATS: &str = "kp_stats_v1";
/// Every map, in the order the agent adopts/creates them.
pub const ALL_MAPS: [&str; 5] = [MAP_SERVICES, MAP_BACKENDS, MAP_CT, MAP_AFFINITY, MAP_STATS];

/// Name of the TC ingress program in the object file.
pub const PROG_TC_INGRESS: &str = "kp_tc_ingress";
/// Name of the TC egress program (reply reverse-NAT for host-stack replies).
pub const PROG_TC_EGRESS: &str = "kp_tc_egress";

/// Default capacities; the agent can override them at load time.
pub const DEFAULT_MAX_SERVICE_ENTRIES: u32 = 262_144;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAX_CT: u32 = 524_288;
pub const DEFAULT_MAX_AFFINITY: u32 = 131_072;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Key of the services map. Slot 0 is the frontend itself (value holds the
/// backend count); slots 1..=count hold one backend id each. Writing new slots
/// before the count means a reader never sees a half-written backend set.
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

/// Frontend reachable by every client.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Frontend variant used for in-cluster clients when the policy differs
/// (internalTrafficPolicy vs externalTrafficPolicy).
pub const SCOPE_INTERNAL: u8 = 1;

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,         // slot > 0: backend id; slot 0: unused (0)
    pub count: u16,              // slot 0: number of backend slots; 0 = reject
    pub flags: u16,              // slot 0: SVC_F_*
    pub svc_id: u32,             // slot 0: id of this frontend (affinity, stats)
    pub affinity_timeout_s: u32, // slot 0: ClientIP affinity timeout, seconds
}

/// ClientIP session affinity enabled.
pub const SVC_F_AFFINITY: u16 = 1 << 0;
/// The frontend address is one of the node's own (NodePort): replies are
/// redirected to the client's interface, since the stack would drop a
/// forwarded packet whose source is a local address.
pub const SVC_F_NODE_ADDR: u16 = 1 << 1;

/// Value of the backends map (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: [u8; 16], // backend address, IPv6 or IPv4-mapped, network order
    pub port: u16,      // backend port, host order
    pub proto: u8,      // IPPROTO_*
    pub flags: u8,      // reserved, zero
}

/// Key of the conntrack map: the tuple as it appears on the wire at our hook.
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

/// Value of the conntrack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub nat_addr: [u8; 16], // forward: backend address; reply: frontend address
    pub nat_port: u16,      // forward: backend port; reply: frontend port
    pub flags: u8,          // CT_F_*
    pub _pad: u8,           // zero
    pub backend_id: u32,    // backend chosen for this flow
    pub last_seen_ns: u64,  // bpf_ktime_get_ns() when last refreshed
    pub ifindex: u32,       // reply: interface the client's packets came in on
    pub _pad2: u32,         // zero
}

/// Entry is the reply direction (rewrite the source back to the frontend).
pub const CT_F_REPLY: u8 = 1 << 0;
/// A TCP FIN or RST was seen: a new SYN on this tuple selects again.
pub const CT_F_CLOSING: u8 = 1 << 1;
/// Hairpin flow: the client is its own backend. The source is rewritten to
/// the frontend too (so the reply comes back through the node) and packets
/// are sent straight back out of the interface they came in on.
pub const CT_F_HAIRPIN: u8 = 1 << 2;

/// Lifetimes, checked when a forward entry is looked up.
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_NONTCP_NS: u64 = 120 * 1_000_000_000;
/// Entries are refreshed at most this often, to keep writes off the fast path.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Key of the ClientIP affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u8; 16], // client address, network order
    pub svc_id: u32,      // frontend id (ServiceValue::svc_id)
}

/// Value of the ClientIP affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,   // backend chosen for this client
    pub _pad: u32,         // zero
    pub last_used_ns: u64, // bpf_ktime_get_ns() of the last new flow
}

/// Datapath counters (per-CPU array index). Drop and pass reasons are shared
/// codes so the agent can export them as metrics by name.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    PassNotIpv4 = 0,
    PassFragment = 1,
    PassOtherProto = 2,
    PassNoService = 3,
    NewFlow = 4,
    CtHit = 5,
    ReplyNat = 6,
    RejectNoBackend = 7,
    DropBackendMissing = 8,
    DropCtFull = 9,
    DropMalformed = 10,
    AffinityHit = 11,
    PassIpOptions = 12,
    ReplyNatEgress = 13,
    Hairpin = 14,
}

pub const STAT_COUNT: u32 = 15;

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
        Stat::PassIpOptions,
        Stat::ReplyNatEgress,
        Stat::Hairpin,
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
            Stat::PassIpOptions => "pass_ip_options",
            Stat::ReplyNatEgress => "reply_nat_egress",
            Stat::Hairpin => "hairpin",
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
}
