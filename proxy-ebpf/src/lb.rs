//! Service address and frontend lookup, backend selection (ClientIP
//! affinity, Maglev, random) and the forward (client -> service) path.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, AffinityValue, BACKEND_F_LOCAL, CT_F_HAIRPIN, MAGLEV_M, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, SVC_F_TWO_SCOPES, ServiceKey, ServiceValue,
    Stat, VipValue, affinity_group, v4_mapped, v4_of_mapped,
};

use crate::{
    TC_ACT_NEXT, ct, frag, fwd,
    maps::{AFFINITY, BACKENDS, CALLS, MAGLEV, SERVICES, VIPS, config, count, is_member, source_allowed},
    nat::{Side, rewrite, swap_macs},
    packet::{ETH_HLEN, Packet},
    reject, snat,
};

/// The service address entry of `addr`, if it is one.
#[inline(always)]
pub fn lookup_vip(addr: [u8; 4]) -> Option<VipValue> {
    // SAFETY: copied out at once.
    unsafe { VIPS.get(&v4_mapped(addr)) }.copied()
}

/// The frontend (slot 0) for `addr:port/proto`, if any. A client inside
/// the cluster (`internal`: a pod, the node itself) of a two-scope
/// frontend gets the internal twin (externalTrafficPolicy: Local serves
/// in-cluster clients every endpoint, as kube-proxy does).
#[inline(always)]
pub fn lookup_service(addr: [u8; 16], port: u16, proto: u8, internal: bool) -> Option<(ServiceKey, ServiceValue)> {
    let key = ServiceKey { addr, port, proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    // SAFETY: the value is copied out before any other map operation.
    let svc = unsafe { SERVICES.get(&key) }.copied()?;
    if internal && svc.flags & SVC_F_TWO_SCOPES != 0 {
        let ikey = ServiceKey { scope: SCOPE_INTERNAL, ..key };
        // SAFETY: as above.
        if let Some(isvc) = unsafe { SERVICES.get(&ikey) }.copied() {
            return Some((ikey, isvc));
        }
    }
    Some((key, svc))
}

/// The frontend this packet is addressed to; `EXT`: it arrived on an
/// external interface (its client is outside the cluster).
#[inline(always)]
pub fn lookup_frontend<const EXT: bool>(pkt: &Packet) -> Option<(ServiceKey, ServiceValue)> {
    lookup_service(v4_mapped(pkt.daddr), pkt.dport, pkt.proto, !EXT)
}

/// [`established`] returns this when the packet starts a new flow.
pub const NO_FLOW: i32 = i32::MIN;

/// A packet of a known flow to a frontend keeps its backend (and its SNAT).
/// A BPF-to-BPF call (its keys stay off the caller's stack); [`NO_FLOW`]
/// when the packet starts a new flow.
#[inline(always)]
pub fn established<const L3: usize, const EXT: bool>(ctx: &TcContext, pkt: &Packet, now: u64) -> i32 {
    let Some(v) = ct::forward_lookup(pkt, now) else { return NO_FLOW };
    count(if pkt.has_l4() { Stat::CtHit } else { Stat::FragmentNat });
    let Some(addr) = v4_of_mapped(&v.nat_addr) else { return crate::verdict(Err(())) };
    frag::remember(pkt);
    if EXT && v.snat_port != 0 {
        return snat_forward_call::<L3>(ctx, pkt, addr, v.nat_port, v.snat_port);
    }
    crate::verdict(nat_forward::<L3>(ctx, pkt, addr, v.nat_port, v.flags & CT_F_HAIRPIN != 0))
}

/// Handles a packet addressed to a frontend: existing flows keep their
/// backend, new flows pick one, a frontend without backends is rejected.
/// `EXT`: the packet arrived on an external interface, and a new flow to a
/// backend on another node is SNATed to the node (its reply must come back
/// through here).
#[inline(always)]
pub fn forward<const L3: usize, const EXT: bool>(ctx: &TcContext, pkt: &Packet, now: u64) -> Result<i32, ()> {
    let v = established::<L3, EXT>(ctx, pkt, now);
    if v != NO_FLOW {
        return Ok(v);
    }
    if !pkt.has_l4() {
        // A later fragment of a flow we do not know: never let it leak.
        count(Stat::DropFragment);
        return Ok(TC_ACT_SHOT);
    }
    // The new-flow program of this variant, with a stack of its own.
    let slot = proxy_common::CALL_NEW_FLOW + 2 * u32::from(EXT) + u32::from(L3 != ETH_HLEN);
    // SAFETY: a tail call on our own context; it does not return on success.
    unsafe { CALLS.tail_call(ctx, slot) };
    // The slot is empty (the agent fills it before attaching): fail closed.
    count(Stat::DropMalformed);
    Ok(TC_ACT_SHOT)
}

/// Entry of the new-flow programs (tail-called by ingress): the packet is
/// parsed and its frontend looked up again (the caller's stack is gone).
#[inline(always)]
pub fn new_flow_entry<const L3: usize, const EXT: bool>(ctx: &TcContext) -> i32 {
    let Ok(pkt) = crate::packet::parse::<L3>(ctx) else { return TC_ACT_NEXT };
    let Some(svc) = lookup_frontend::<EXT>(&pkt) else { return TC_ACT_NEXT };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    new_flow::<L3, EXT>(ctx, &pkt, &svc, now)
}

/// A new flow to a frontend: refusal, source ranges, backend choice,
/// SNAT port, conntrack entries, translation. Every heavy step is a
/// BPF-to-BPF call of its own, made one after the other from here, so the
/// deepest call chain stays within the verifier's 512-byte stack.
#[inline(always)]
fn new_flow<const L3: usize, const EXT: bool>(
    ctx: &TcContext,
    pkt: &Packet,
    svc: &(ServiceKey, ServiceValue),
    now: u64,
) -> i32 {
    crate::verdict(new_flow_inner::<L3, EXT>(ctx, pkt, svc, now))
}

#[inline(always)]
fn new_flow_inner<const L3: usize, const EXT: bool>(
    ctx: &TcContext,
    pkt: &Packet,
    svc: &(ServiceKey, ServiceValue),
    now: u64,
) -> Result<i32, ()> {
    let (_, value) = svc;
    if value.count == 0 {
        if value.flags & SVC_F_DROP_EMPTY != 0 {
            return Ok(drop_new(ctx, pkt, Stat::DropNoLocal));
        }
        count(Stat::RejectNoBackend);
        let v = reject::port_unreachable::<L3>(ctx, pkt);
        return Ok(crate::debug::event(ctx, pkt, Stat::RejectNoBackend, v));
    }
    if value.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(value.svc_id, v4_mapped(pkt.saddr)) {
        return Ok(drop_new(ctx, pkt, Stat::DropSourceRange));
    }
    let backend_id = select_for_packet(value, pkt, now);
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        return Ok(drop_new(ctx, pkt, Stat::DropBackendMissing));
    };
    let Some(baddr) = v4_of_mapped(&backend.addr) else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    // An external client's flow to a backend on another node: SNAT.
    let mut snat_port = 0;
    if EXT && L3 == ETH_HLEN && backend.flags & BACKEND_F_LOCAL == 0 {
        match snat::claim(pkt, &backend, now) {
            snat::NO_SNAT => {}
            0 => return Ok(drop_new(ctx, pkt, Stat::DropSnatExhausted)),
            port => snat_port = port as u16,
        }
    }
    let flow = ct::NewFlow { svc_id: value.svc_id, backend_id, baddr, bport: backend.port, snat_port, now };
    let hairpin = ct::create(pkt, &flow);
    if hairpin < 0 {
        if snat_port != 0 {
            snat::release(pkt, &backend, snat_port);
        }
        // Fail closed: an untracked flow's replies could not be translated.
        return Ok(drop_new(ctx, pkt, Stat::DropCtFull));
    }
    count(Stat::NewFlow);
    frag::remember(pkt);
    let v = if EXT && snat_port != 0 {
        count(Stat::SnatNew);
        snat_forward_call::<L3>(ctx, pkt, baddr, backend.port, snat_port)
    } else {
        nat_forward::<L3>(ctx, pkt, baddr, backend.port, hairpin != 0)?
    };
    Ok(crate::debug::new_flow(ctx, pkt, &flow, v))
}

/// Counts a dropped new flow (and reports it with --debug-events).
#[inline(always)]
fn drop_new(ctx: &TcContext, pkt: &Packet, why: Stat) -> i32 {
    count(why);
    crate::debug::event(ctx, pkt, why, TC_ACT_SHOT)
}

/// The backend for a new flow of `pkt` (0: none could be chosen).
#[inline(always)]
pub fn select_for_packet(svc: &ServiceValue, pkt: &Packet, now: u64) -> u32 {
    select_backend(svc, v4_mapped(pkt.saddr), || flow_hash(pkt), now).unwrap_or(0)
}

/// [`snat_forward`] as a BPF-to-BPF call.
#[inline(always)]
fn snat_forward_call<const L3: usize>(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16, snat_port: u16) -> i32 {
    crate::verdict(snat_forward::<L3>(ctx, pkt, addr, port, snat_port))
}

/// DNAT to the backend and SNAT to the node's address and `snat_port`,
/// then forwarded by the FIB (the stack would take the node's own source
/// address on an arriving packet for a martian).
#[inline(always)]
fn snat_forward<const L3: usize>(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16, snat_port: u16) -> Result<i32, ()> {
    let Some(node) = config().as_ref().and_then(snat::node_addr) else {
        count(Stat::DropNoRoute);
        return Ok(TC_ACT_SHOT);
    };
    rewrite(ctx, pkt, Side::Dst, addr, port)?;
    rewrite(ctx, pkt, Side::Src, node, snat_port)?;
    Ok(fwd::redirect::<L3>(ctx, node, addr, pkt.proto))
}

/// [`snat_reply`] returns this when the packet is no reply of an SNATed flow.
pub const NOT_SNAT: i32 = i32::MIN;

/// The reply of an SNATed flow (backend -> node:port, arriving on an
/// external interface): back to client <- frontend, forwarded by the FIB.
/// A BPF-to-BPF call; [`NOT_SNAT`] when the packet is not such a reply.
#[inline(always)]
pub fn snat_reply<const L3: usize>(ctx: &TcContext, pkt: &Packet, now: u64) -> i32 {
    let Some(fkey) = snat::reply(pkt, now) else { return NOT_SNAT };
    crate::verdict(snat_reply_inner::<L3>(ctx, pkt, &fkey))
}

#[inline(always)]
fn snat_reply_inner<const L3: usize>(ctx: &TcContext, pkt: &Packet, fkey: &proxy_common::CtKey) -> Result<i32, ()> {
    let ((client, cport), (front, fport)) = snat::ends(fkey).ok_or(())?;
    rewrite(ctx, pkt, Side::Dst, client, cport)?;
    rewrite(ctx, pkt, Side::Src, front, fport)?;
    count(Stat::SnatReply);
    Ok(fwd::redirect::<L3>(ctx, front, client, pkt.proto))
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
    let id = pick(svc, hash)?;
    if affinity {
        let v = AffinityValue { backend_id: id, _pad: 0, last_used_ns: now };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Some(id)
}

#[inline(always)]
fn pick(svc: &ServiceValue, hash: impl FnOnce() -> u32) -> Option<u32> {
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
    // The slots of the frontend's backend set (shared by the Service
    // port's frontends with the same backends).
    let slot_key = ServiceKey::set_slot(svc.svc_id, slot);
    // SAFETY: copied out at once.
    Some(unsafe { SERVICES.get(&slot_key) }?.backend_id)
}
