//! Every map of the datapath. Types and names come from proxy-common.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CT, DEFAULT_MAX_SERVICE_ENTRIES, STAT_COUNT, ServiceKey,
    ServiceValue, Stat,
};

/// Frontends (slot 0) and their backend slots; written only by the agent.
#[btf_map(name = "kp_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_MAX_SERVICE_ENTRIES as usize }> =
    HashMap::new();

/// Backend id -> address; written only by the agent.
#[btf_map(name = "kp_backend_v1")]
pub static BACKENDS: HashMap<u32, Backend, { DEFAULT_MAX_BACKENDS as usize }> = HashMap::new();

/// Conntrack: forward (client -> frontend) and reply (backend -> client) tuples.
#[btf_map(name = "kp_ct_v1")]
pub static CT: LruHashMap<CtKey, CtValue, { DEFAULT_MAX_CT as usize }> = LruHashMap::new();

/// ClientIP session affinity: (client, frontend) -> backend.
#[btf_map(name = "kp_affin_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Per-CPU counters indexed by `Stat`.
#[btf_map(name = "kp_stats_v1")]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}
