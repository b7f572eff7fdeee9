//! The TC attach point: ingress translates packets toward Services, egress
//! reverse-translates their replies after the node's stack has routed them
//! (so netfilter and rp_filter see backend -> client, consistent with the
//! client -> backend they saw going in).
//!
//! Chaining contract: everything that continues returns `TC_ACT_NEXT`
//! (`TC_ACT_UNSPEC`, tcx's `TCX_NEXT`), translated or not, so programs after
//! ours on the hook (another CNI's, legacy clsact filters) still see every
//! packet; only hairpin and refusal redirect, and only malformed rewrites,
//! full conntrack and untranslatable fragments to a Service drop.
use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, helpers::bpf_redirect, programs::TcContext};
use proxy_common::{CT_F_HAIRPIN, IPPROTO_ICMP, Stat, VIP_F_CLUSTER_IP, VIP_F_NODE, v4_of_mapped};

use crate::{
    TC_ACT_NEXT, ct, frag, icmp,
    lb::{self, lookup_vip},
    maps::count,
    nat::{Side, rewrite, swap_macs},
    packet::{self, ETH_HLEN, Packet, is_icmp_error},
    reject,
};

/// A ClusterIP (that is not also one of the node's addresses) refuses what
/// no Service port of it serves.
#[inline(always)]
fn refuses_unknown(flags: u32) -> bool {
    flags & VIP_F_CLUSTER_IP != 0 && flags & VIP_F_NODE == 0
}

/// Ingress: DNAT toward Services, refusals, hairpin replies. `EXT`: an
/// external interface (uplink): its clients are outside the cluster (the
/// external scope of two-scope frontends), their flows to backends on other
/// nodes are SNATed, and the replies of those flows come back here.
#[inline(always)]
pub fn ingress<const L3: usize, const EXT: bool>(ctx: &TcContext) -> Result<i32, ()> {
    let mut pkt = match packet::parse::<L3>(ctx) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return Ok(TC_ACT_NEXT);
        }
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let vip = lookup_vip(pkt.daddr);
    if pkt.proto == IPPROTO_ICMP {
        let t = icmp::translate_call(ctx, &pkt, now, false);
        if t < 0 {
            return Err(());
        }
        if t > 0 {
            count(Stat::IcmpErrorNat);
            return Ok(TC_ACT_NEXT);
        }
        // kube-proxy's nftables rules refuse everything to a ClusterIP that
        // no Service port matches, pings included.
        if let Some(v) = vip
            && refuses_unknown(v.flags)
            && !is_icmp_error(pkt.icmp_type)
        {
            count(Stat::RejectUnknownPort);
            return Ok(reject::port_unreachable::<L3>(ctx, &pkt));
        }
        count(Stat::PassOtherProto);
        return Ok(TC_ACT_NEXT);
    }
    if !frag::recall(&mut pkt) {
        if vip.is_some_and(|v| v.flags & VIP_F_NODE == 0) {
            count(Stat::DropFragment);
            return Ok(TC_ACT_SHOT);
        }
        count(Stat::PassFragment);
        return Ok(TC_ACT_NEXT);
    }
    let Some(vip) = vip else {
        ct::evict_stale(&pkt, now);
        count(Stat::PassNoService);
        return Ok(TC_ACT_NEXT);
    };
    if lb::lookup_frontend::<EXT>(&pkt).is_some() {
        return lb::forward::<L3, EXT>(ctx, &pkt, now);
    }
    if EXT && L3 == ETH_HLEN && vip.flags & VIP_F_NODE != 0 {
        let verdict = lb::snat_reply::<L3>(ctx, &pkt, now);
        if verdict != lb::NOT_SNAT {
            return Ok(verdict);
        }
    }
    // A hairpin reply is addressed to the frontend, and comes back here.
    let v = hairpin_reply::<L3>(ctx, &pkt, now);
    if v != NOT_HAIRPIN {
        return Ok(v);
    }
    if refuses_unknown(vip.flags) {
        count(Stat::RejectUnknownPort);
        return Ok(reject::port_unreachable::<L3>(ctx, &pkt));
    }
    count(Stat::PassNoService);
    Ok(TC_ACT_NEXT)
}

const NOT_HAIRPIN: i32 = i32::MIN;

/// The reply of a hairpin flow (a pod through its own Service), addressed
/// to the frontend: back to the pod, out of the interface it came in on.
/// A BPF-to-BPF call; [`NOT_HAIRPIN`] for anything else.
#[inline(always)]
fn hairpin_reply<const L3: usize>(ctx: &TcContext, pkt: &Packet, now: u64) -> i32 {
    let Some(r) = ct::reply_lookup(pkt, now) else { return NOT_HAIRPIN };
    if r.flags & CT_F_HAIRPIN == 0 {
        return NOT_HAIRPIN;
    }
    crate::verdict(hairpin_back::<L3>(ctx, pkt, &r))
}

#[inline(always)]
fn hairpin_back<const L3: usize>(ctx: &TcContext, pkt: &Packet, r: &proxy_common::CtValue) -> Result<i32, ()> {
    let vip_addr = v4_of_mapped(&r.nat_addr).ok_or(())?;
    count(Stat::Hairpin);
    rewrite(ctx, pkt, Side::Src, vip_addr, r.nat_port)?;
    // Back to the pod that is both client and backend: destination
    // becomes its own address again, out of the interface it came in on.
    rewrite(ctx, pkt, Side::Dst, pkt.saddr, pkt.dport)?;
    swap_macs::<L3>(ctx)?;
    // SAFETY: reading the ingress ifindex of the skb we were handed.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Egress: the reverse NAT of replies toward clients (and ICMP errors about
/// translated flows). Everything else continues untouched.
#[inline(always)]
pub fn egress<const L3: usize>(ctx: &TcContext) -> Result<i32, ()> {
    let Ok(mut pkt) = packet::parse::<L3>(ctx) else {
        return Ok(TC_ACT_NEXT);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if pkt.proto == IPPROTO_ICMP {
        match icmp::translate_call(ctx, &pkt, now, true) {
            1 => count(Stat::IcmpErrorNat),
            0 => {}
            _ => return Err(()),
        }
        return Ok(TC_ACT_NEXT);
    }
    if !frag::recall(&mut pkt) {
        return Ok(TC_ACT_NEXT);
    }
    let Some(r) = ct::reply_lookup(&pkt, now) else {
        return Ok(TC_ACT_NEXT);
    };
    if r.flags & CT_F_HAIRPIN != 0 {
        // Hairpin replies are handled at ingress.
        return Ok(TC_ACT_NEXT);
    }
    let vip_addr = v4_of_mapped(&r.nat_addr).ok_or(())?;
    frag::remember(&pkt);
    rewrite(ctx, &pkt, Side::Src, vip_addr, r.nat_port)?;
    count(if pkt.has_l4() { Stat::ReplyNat } else { Stat::FragmentNat });
    Ok(TC_ACT_NEXT)
}
