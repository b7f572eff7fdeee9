//! Forwarding a translated packet ourselves (the TC path's version of what
//! XDP does for every flow): a packet whose source became one of the node's
//! own addresses (SNAT toward a remote backend, or the reply of such a flow
//! whose source became a NodePort address again) would be dropped by the
//! stack as a martian, so it is routed with `bpf_fib_lookup` and redirected
//! out of the interface the FIB names, as Cilium's nodeport path does.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup, bpf_fib_lookup__bindgen_ty_1,
        bpf_fib_lookup__bindgen_ty_2, bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4,
        bpf_fib_lookup__bindgen_ty_5, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::Stat;

use crate::{maps::count, packet::{ETH_HLEN, IP_CSUM}};

const AF_INET: u8 = 2;
/// Offset of the IPv4 TTL (and, after it, the protocol byte).
const IP_TTL: usize = 8;

/// An IPv4 FIB lookup from `ifindex` for `saddr -> daddr`.
#[inline(always)]
pub fn lookup(ifindex: u32, saddr: [u8; 4], daddr: [u8; 4], proto: u8, tot_len: u16) -> bpf_fib_lookup {
    // Every field written out (no zeroed(): it becomes a memset call).
    bpf_fib_lookup {
        family: AF_INET,
        l4_protocol: proto,
        sport: 0,
        dport: 0,
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 { tot_len },
        ifindex,
        __bindgen_anon_2: bpf_fib_lookup__bindgen_ty_2 { rt_metric: 0 },
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 { ipv6_src: [u32::from_ne_bytes(saddr), 0, 0, 0] },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 { ipv6_dst: [u32::from_ne_bytes(daddr), 0, 0, 0] },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    }
}

/// Routes the (already translated) packet to `daddr` and redirects it out
/// of the FIB's interface with the FIB's MACs and the TTL decremented; an
/// unresolved neighbour is left to `bpf_redirect_neigh`. No route: dropped
/// and counted (the stack could not deliver it either).
#[inline(always)]
pub fn redirect<const L3: usize>(ctx: &TcContext, saddr: [u8; 4], daddr: [u8; 4], proto: u8) -> i32 {
    crate::verdict(redirect_inner::<L3>(ctx, saddr, daddr, proto))
}

#[inline(always)]
fn redirect_inner<const L3: usize>(ctx: &TcContext, saddr: [u8; 4], daddr: [u8; 4], proto: u8) -> Result<i32, ()> {
    if L3 != ETH_HLEN {
        // Only Ethernet frames are forwarded here (the callers check).
        return Ok(TC_ACT_SHOT);
    }
    // SAFETY: reading fields of the skb we were handed.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // tot_len 0: the kernel checks the MTU with is_skb_forwardable, which
    // knows GSO/GRO packets (a merged skb is larger than the MTU and must
    // not fail the lookup as FRAG_NEEDED).
    let mut p = lookup(ifindex, saddr, daddr, proto, 0);
    // SAFETY: p is a valid bpf_fib_lookup on our stack, its size passed.
    let rc = unsafe {
        fib_lookup(ctx.skb.skb.cast(), &raw mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        decrement_ttl(ctx)?;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        ctx.store(0, &macs, 0).map_err(|_| ())?;
        // SAFETY: helper with an ifindex and no memory arguments.
        return Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32);
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        decrement_ttl(ctx)?;
        let mut nh = bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            // SAFETY: the FIB wrote the next hop into ipv4_dst.
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv6_nh: [unsafe { p.__bindgen_anon_4.ipv4_dst }, 0, 0, 0] },
        };
        // SAFETY: nh is a valid bpf_redir_neigh on our stack, its size passed.
        return Ok(unsafe {
            bpf_redirect_neigh(p.ifindex, &raw mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0)
        } as i32);
    }
    count(Stat::DropNoRoute);
    Ok(TC_ACT_SHOT)
}

/// TTL - 1 with the IPv4 checksum fixed (we forward, as a router does).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), ()> {
    let old: [u8; 2] = ctx.load(ETH_HLEN + IP_TTL).map_err(|_| ())?;
    if old[0] <= 1 {
        // Leave the expiry (and its ICMP) to the stack: it will not
        // forward it either. Rare enough not to be worth an ICMP here.
        return Err(());
    }
    let new = [old[0] - 1, old[1]];
    ctx.l3_csum_replace(
        ETH_HLEN + IP_CSUM,
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
        2,
    )
    .map_err(|_| ())?;
    ctx.store(ETH_HLEN + IP_TTL, &new, 0).map_err(|_| ())
}
