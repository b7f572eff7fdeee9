//! Every map of the datapath. Types and names come from proxy-common.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, lpm_trie::Key},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_CT_ANY, DEFAULT_MAX_CT_TCP, DEFAULT_MAX_MAGLEV, DEFAULT_MAX_SERVICE_ENTRIES, DEFAULT_MAX_SNAT,
    FragKey, FragValue, IPPROTO_TCP, MAX_FRAGS, MAX_SRC_RANGES, DEFAULT_MAX_SOCK_REV, NodeConfig, SockRevKey,
    SockRevValue, MaglevTable, MemberKey, STAT_COUNT, ServiceKey, ServiceValue, SrcRange, Stat, VipValue,
};

/// Maps only the agent writes are allocated as used, not preallocated at
/// their capacity: memory follows the cluster, not the `--max-*` flags.
const AGENT_WRITTEN: usize = BPF_F_NO_PREALLOC as usize;

/// Frontends (slot 0) and their backend slots; written only by the agent.
#[btf_map(name = "kp_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_MAX_SERVICE_ENTRIES as usize }, AGENT_WRITTEN> =
    HashMap::new();

/// Backend id -> address; written only by the agent.
#[btf_map(name = "kp_backend_v1")]
pub static BACKENDS: HashMap<u32, Backend, { DEFAULT_MAX_BACKENDS as usize }, AGENT_WRITTEN> = HashMap::new();

/// TCP conntrack. A plain hash: when it is full new flows are refused and
/// established ones stay (the agent's collector removes expired entries).
#[btf_map(name = "kp_ct_tcp_v2")]
pub static CT_TCP: HashMap<CtKey, CtValue, { DEFAULT_MAX_CT_TCP as usize }> = HashMap::new();

/// Non-TCP conntrack (LRU): UDP churn evicts only other non-TCP flows.
#[btf_map(name = "kp_ct_any_v2")]
pub static CT_ANY: LruHashMap<CtKey, CtValue, { DEFAULT_MAX_CT_ANY as usize }> = LruHashMap::new();

/// ClientIP session affinity: (client, frontend) -> backend.
#[btf_map(name = "kp_affin_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// (frontend id, backend id) -> 1 while the frontend has that backend.
#[btf_map(name = "kp_member_v1")]
pub static MEMBERS: HashMap<MemberKey, u32, { DEFAULT_MAX_SERVICE_ENTRIES as usize }, AGENT_WRITTEN> =
    HashMap::new();

/// Frontend id -> Maglev table; allocated as used (tables are 4 KiB).
#[btf_map(name = "kp_maglev_v1")]
pub static MAGLEV: HashMap<u32, MaglevTable, { DEFAULT_MAX_MAGLEV as usize }, AGENT_WRITTEN> = HashMap::new();

/// Service addresses -> VIP_F_* flags.
#[btf_map(name = "kp_vip_v1")]
pub static VIPS: HashMap<[u8; 16], VipValue, { DEFAULT_MAX_BACKENDS as usize }, AGENT_WRITTEN> = HashMap::new();

/// First-fragment ports of datagrams in flight.
#[btf_map(name = "kp_frag_v1")]
pub static FRAGS: LruHashMap<FragKey, FragValue, { MAX_FRAGS as usize }> = LruHashMap::new();

/// Socket LB: (socket cookie, backend) -> the frontend the socket asked for.
#[btf_map(name = "kp_sock_rev_v1")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { DEFAULT_MAX_SOCK_REV as usize }> = LruHashMap::new();

/// SNAT reply tuple (backend -> node:port) -> the flow's forward conntrack
/// key. A plain hash, like TCP conntrack: under pressure new flows lose;
/// the agent's collector removes entries whose flow is gone.
#[btf_map(name = "kp_snat_v1")]
pub static SNAT: HashMap<CtKey, CtKey, { DEFAULT_MAX_SNAT as usize }> = HashMap::new();

/// Node-wide settings (index 0), written by the agent.
#[btf_map(name = "kp_config_v1")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// loadBalancerSourceRanges: (frontend id, prefix) -> 1.
#[btf_map(name = "kp_srcrange_v1")]
pub static SRC_RANGES: LpmTrie<SrcRange, u32, { MAX_SRC_RANGES as usize }> = LpmTrie::new();

/// Tail calls (see proxy_common::CALL_NEW_FLOW); filled by the agent.
#[btf_map(name = "kp_calls_v1")]
pub static CALLS: ProgramArray<{ proxy_common::CALL_COUNT as usize }> = ProgramArray::new();

/// The XDP program's tail call (slot 0: its new-flow program).
#[btf_map(name = "kp_xcalls_v1")]
pub static XCALLS: ProgramArray<1> = ProgramArray::new();

/// Per-CPU counters indexed by `Stat`.
#[btf_map(name = "kp_stats_v3")]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The conntrack entry for `key`, in the map of its protocol.
#[inline(always)]
pub fn ct_get(key: &CtKey) -> Option<*mut CtValue> {
    if key.proto == IPPROTO_TCP { CT_TCP.get_ptr_mut(key) } else { CT_ANY.get_ptr_mut(key) }
}

#[inline(always)]
pub fn ct_insert(key: &CtKey, value: &CtValue) -> Result<(), ()> {
    let r = if key.proto == IPPROTO_TCP { CT_TCP.insert(key, value, 0) } else { CT_ANY.insert(key, value, 0) };
    r.map_err(|_| ())
}

#[inline(always)]
pub fn ct_remove(key: &CtKey) {
    let _ = if key.proto == IPPROTO_TCP { CT_TCP.remove(key) } else { CT_ANY.remove(key) };
}

/// Whether frontend `svc_id` has backend `backend_id` now.
#[inline(always)]
pub fn is_member(svc_id: u32, backend_id: u32) -> bool {
    MEMBERS.get_ptr(&MemberKey { svc_id, backend_id }).is_some()
}

/// The node's settings (all zero until the agent wrote them).
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    CONFIG.get(0).copied()
}

/// Whether `client` may open flows to frontend `svc_id` under its source ranges.
#[inline(always)]
pub fn source_allowed(svc_id: u32, client: [u8; 16]) -> bool {
    let key = Key::new(proxy_common::src_range_prefix_v4(32), SrcRange { svc_id: svc_id.to_be_bytes(), addr: client });
    SRC_RANGES.get(&key).is_some()
}
