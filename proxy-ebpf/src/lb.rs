//! Service address and frontend lookup, backend selection (ClientIP
//! affinity, Maglev, random) and the forward (client -> service) path.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, AffinityValue, CT_F_HAIRPIN, MAGLEV_M, SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_MAGLEV,
    affinity_group,
    ServiceKey, ServiceValue, Stat, VipValue, v4_mapped, v4_of_mapped,
};

use crate::{
    TC_ACT_NEXT, ct, frag,
    maps::{AFFINITY, BACKENDS, MAGLEV, SERVICES, VIPS, count, is_member},
    nat::{Side, rewrite, swap_macs},
    packet::Packet,
    reject,
};

/// The service address entry of `addr`, if it is one.
#[inline(always)]
pub fn lookup_vip(addr: [u8; 4]) -> Option<VipValue> {
    // SAFETY: copied out at once.
    unsafe { VIPS.get(&v4_mapped(addr)) }.copied()
}

/// The frontend (slot 0) this packet is addressed to, if any.
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<(ServiceKey, ServiceValue)> {
    let key = ServiceKey {
        addr: v4_mapped(pkt.daddr),
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: the value is copied out before any other map operation.
    let svc = unsafe { SERVICES.get(&key) }.copied()?;
    Some((key, svc))
}

/// Handles a packet addressed to a frontend: existing flows keep their
/// backend, new flows pick one, a frontend without backends is rejected.
#[inline(always)]
pub fn forward<const L3: usize>(
    ctx: &TcContext,
    pkt: &Packet,
    svc: &(ServiceKey, ServiceValue),
    now: u64,
) -> Result<i32, ()> {
    if let Some(v) = ct::forward_lookup(pkt, now) {
        count(if pkt.has_l4() { Stat::CtHit } else { Stat::FragmentNat });
        let addr = v4_of_mapped(&v.nat_addr).ok_or(())?;
        frag::remember(pkt);
        return nat_forward::<L3>(ctx, pkt, addr, v.nat_port, v.flags & CT_F_HAIRPIN != 0);
    }
    if !pkt.has_l4() {
        // A later fragment of a flow we do not know: never let it leak.
        count(Stat::DropFragment);
        return Ok(TC_ACT_SHOT);
    }
    let (key, value) = svc;
    if value.count == 0 {
        if value.flags & SVC_F_DROP_EMPTY != 0 {
            count(Stat::DropNoLocal);
            return Ok(TC_ACT_SHOT);
        }
        count(Stat::RejectNoBackend);
        return Ok(reject::port_unreachable::<L3>(ctx, pkt));
    }
    let Some(backend_id) = select_backend(key, value, v4_mapped(pkt.saddr), || flow_hash(pkt), now) else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    let Some(baddr) = v4_of_mapped(&backend.addr) else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    let Ok(hairpin) = ct::create(pkt, value.svc_id, backend_id, baddr, backend.port, now) else {
        // Fail closed: an untracked flow's replies could not be translated.
        count(Stat::DropCtFull);
        return Ok(TC_ACT_SHOT);
    };
    count(Stat::NewFlow);
    frag::remember(pkt);
    nat_forward::<L3>(ctx, pkt, baddr, backend.port, hairpin != 0)
}

/// DNATs to the backend and lets the packet continue (to the other programs
/// on this hook, then the stack). A hairpin flow also gets the frontend as
/// source, so the pod's reply comes back through us, and is sent straight
/// back out of the interface it came in on.
#[inline(always)]
fn nat_forward<const L3: usize>(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16, hairpin: bool) -> Result<i32, ()> {
    rewrite(ctx, pkt, Side::Dst, addr, port)?;
    if !hairpin {
        return Ok(TC_ACT_NEXT);
    }
    count(Stat::Hairpin);
    rewrite(ctx, pkt, Side::Src, pkt.daddr, pkt.sport)?;
    swap_macs::<L3>(ctx)?;
    // SAFETY: reading the ingress ifindex of the skb we were handed.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// A hash of the flow's tuple, the same for every packet of the flow.
#[inline(always)]
fn flow_hash(pkt: &Packet) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    for w in [
        u32::from_ne_bytes(pkt.saddr),
        u32::from_ne_bytes(pkt.daddr),
        (u32::from(pkt.sport) << 16) | u32::from(pkt.dport),
        u32::from(pkt.proto),
    ] {
        h ^= w.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Picks a backend id for a new flow of `client` (the affinity key: an
/// address on the TC path, a network namespace at the socket): the client's
/// affine backend while the affinity is fresh and the backend is still one
/// of this frontend's, otherwise by the frontend's Maglev table indexed by
/// `hash` (the same flow lands on the same backend while the backend set is
/// unchanged), otherwise a random slot. Shared by the TC and socket paths.
#[inline(always)]
pub fn select_backend(
    key: &ServiceKey,
    svc: &ServiceValue,
    client: [u8; 16],
    hash: impl FnOnce() -> u32,
    now: u64,
) -> Option<u32> {
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = AffinityKey { client, svc_id: affinity_group(svc) };
    if affinity {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { AFFINITY.get(&akey) }.copied() {
            let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            if now.wrapping_sub(a.last_used_ns) < timeout_ns && is_member(svc.svc_id, a.backend_id) {
                count(Stat::AffinityHit);
                let v = AffinityValue { backend_id: a.backend_id, _pad: 0, last_used_ns: now };
                let _ = AFFINITY.insert(&akey, &v, 0);
                return Some(a.backend_id);
            }
        }
    }
    let id = pick(key, svc, hash)?;
    if affinity {
        let v = AffinityValue { backend_id: id, _pad: 0, last_used_ns: now };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Some(id)
}

#[inline(always)]
fn pick(key: &ServiceKey, svc: &ServiceValue, hash: impl FnOnce() -> u32) -> Option<u32> {
    if svc.flags & SVC_F_MAGLEV != 0
        && let Some(table) = MAGLEV.get_ptr(&svc.svc_id)
    {
        let idx = (hash() % MAGLEV_M as u32) as usize;
        // LLVM knows the remainder is in range and drops the check below;
        // the verifier does not know it. Hide the value from LLVM.
        // SAFETY: volatile read of a local.
        let idx = unsafe { core::ptr::read_volatile(&raw const idx) };
        if idx < MAGLEV_M {
            // SAFETY: idx is bounded by the table length just above.
            let id = unsafe { (*table).backend_ids[idx] };
            if id != 0 {
                count(Stat::SelectMaglev);
                return Some(id);
            }
        }
    }
    count(Stat::SelectRandom);
    let n = u32::from(svc.count);
    if n == 0 {
        return None;
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % n) as u16 + 1;
    let slot_key = ServiceKey { slot, ..*key };
    // SAFETY: copied out at once.
    Some(unsafe { SERVICES.get(&slot_key) }?.backend_id)
}
