//! Frontend lookup, backend selection and the forward (client -> service) path.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, AffinityValue, CT_F_HAIRPIN, SCOPE_EXTERNAL, SVC_F_AFFINITY, SVC_F_NODE_ADDR, ServiceKey, ServiceValue, Stat,
    v4_mapped,
};

use crate::{
    ct,
    maps::{AFFINITY, BACKENDS, SERVICES, count},
    nat::{Side, rewrite, swap_macs},
    packet::Packet,
    reject,
};

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
pub fn forward(ctx: &TcContext, pkt: &Packet, svc: &(ServiceKey, ServiceValue)) -> Result<i32, ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some((addr, port, flags)) = ct::forward_lookup(pkt, now) {
        count(Stat::CtHit);
        return nat_forward(ctx, pkt, addr, port, flags & CT_F_HAIRPIN != 0);
    }

    let (key, value) = svc;
    if value.count == 0 {
        count(Stat::RejectNoBackend);
        return Ok(reject::port_unreachable(ctx, pkt));
    }
    let Some(backend_id) = select_backend(key, value, pkt, now) else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    let Some(baddr) = proxy_common::v4_of_mapped(&backend.addr) else {
        count(Stat::DropBackendMissing);
        return Ok(TC_ACT_SHOT);
    };
    // Replies of NodePort flows must bypass the stack (see SVC_F_NODE_ADDR);
    // the others take the ordinary path, which is as fast and keeps the
    // node's neighbour handling out of our hands.
    let ifindex = if value.flags & SVC_F_NODE_ADDR != 0 {
        // SAFETY: reading the ingress ifindex of the skb we were handed.
        unsafe { (*ctx.skb.skb).ifindex }
    } else {
        0
    };
    let Ok(hairpin) = ct::create(pkt, backend_id, baddr, backend.port, now, ifindex) else {
        // Fail closed: without a reply entry the answer could not be
        // reverse-NATed and the client would see a stray source.
        count(Stat::DropCtFull);
        return Ok(TC_ACT_SHOT);
    };
    count(Stat::NewFlow);
    nat_forward(ctx, pkt, baddr, backend.port, hairpin != 0)
}

/// DNATs to the backend. A hairpin flow also gets the frontend as source,
/// so the pod's reply comes back through us, and is sent straight back out
/// of the interface it came in on.
#[inline(always)]
fn nat_forward(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16, hairpin: bool) -> Result<i32, ()> {
    rewrite(ctx, pkt, Side::Dst, addr, port)?;
    if !hairpin {
        return Ok(TC_ACT_OK);
    }
    count(Stat::Hairpin);
    rewrite(ctx, pkt, Side::Src, pkt.daddr, pkt.sport)?;
    swap_macs(ctx)?;
    // SAFETY: reading the ingress ifindex of the skb we were handed.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Picks a backend id for a new flow: the client's affine backend while the
/// affinity is fresh and the backend still exists, otherwise a random slot.
#[inline(always)]
fn select_backend(key: &ServiceKey, svc: &ServiceValue, pkt: &Packet, now: u64) -> Option<u32> {
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = AffinityKey { client: v4_mapped(pkt.saddr), svc_id: svc.svc_id };
    if affinity {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { AFFINITY.get(&akey) }.copied() {
            let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            if now.wrapping_sub(a.last_used_ns) < timeout_ns
                && unsafe { BACKENDS.get(&a.backend_id) }.is_some()
            {
                count(Stat::AffinityHit);
                let v = AffinityValue { backend_id: a.backend_id, _pad: 0, last_used_ns: now };
                let _ = AFFINITY.insert(&akey, &v, 0);
                return Some(a.backend_id);
            }
        }
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(svc.count)) as u16 + 1;
    let slot_key = ServiceKey { slot, ..*key };
    // SAFETY: copied out at once.
    let id = unsafe { SERVICES.get(&slot_key) }?.backend_id;
    if affinity {
        let v = AffinityValue { backend_id: id, _pad: 0, last_used_ns: now };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Some(id)
}
