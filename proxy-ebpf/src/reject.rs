//! Refusing new flows to a frontend without backends, and packets to a
//! ClusterIP port that no Service serves, as kube-proxy does: an ICMP
//! port-unreachable sent straight back, so the client fails at once
//! (ECONNREFUSED) instead of timing out.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::{
    nat::swap_macs,
    packet::{Packet, is_icmp_error},
};

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// Original IP header plus the first 8 bytes of its payload (RFC 792).
const QUOTE_LEN: usize = IP_HLEN + 8;
const OUT_L3_LEN: usize = IP_HLEN + ICMP_HLEN + QUOTE_LEN;

#[repr(C, align(4))]
struct Buf([u8; OUT_L3_LEN]);

#[inline(always)]
fn fold(csum: i64) -> u16 {
    let mut s = csum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Turns `pkt` into an ICMP port unreachable from its destination to its
/// source and sends it back out of the interface it came in on. Packets with
/// IP options, later fragments and ICMP errors are dropped instead (no ICMP
/// error is ever sent about an ICMP error, RFC 1122).
#[inline(always)]
pub fn port_unreachable<const L3: usize>(ctx: &TcContext, pkt: &Packet) -> i32 {
    if pkt.ihl != IP_HLEN || !pkt.has_l4() || (pkt.proto == proxy_common::IPPROTO_ICMP && is_icmp_error(pkt.icmp_type)) {
        return TC_ACT_SHOT;
    }
    let Ok(quote) = ctx.load::<[u8; QUOTE_LEN]>(L3) else {
        return TC_ACT_SHOT;
    };
    let mut out = Buf([0; OUT_L3_LEN]);
    let b = &mut out.0;
    b[0] = 0x45;
    b[2..4].copy_from_slice(&(OUT_L3_LEN as u16).to_be_bytes());
    b[6] = 0x40; // DF
    b[8] = 64; // TTL
    b[9] = 1; // ICMP
    b[12..16].copy_from_slice(&pkt.daddr);
    b[16..20].copy_from_slice(&pkt.saddr);
    b[20] = 3; // destination unreachable
    b[21] = 3; // port unreachable
    b[28..].copy_from_slice(&quote);
    let base = b.as_mut_ptr();
    // SAFETY: the buffer is on the stack, 4-byte aligned, sizes are multiples of 4.
    let ip_csum = fold(unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, base.cast(), IP_HLEN as u32, 0) });
    let icmp_csum = fold(unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            base.add(IP_HLEN).cast(),
            (ICMP_HLEN + QUOTE_LEN) as u32,
            0,
        )
    });
    b[10..12].copy_from_slice(&ip_csum.to_ne_bytes());
    b[22..24].copy_from_slice(&icmp_csum.to_ne_bytes());

    let skb = ctx.skb.skb;
    // SAFETY: valid skb pointer from the program context.
    if unsafe { bpf_skb_change_tail(skb.cast(), (L3 + OUT_L3_LEN) as u32, 0) } != 0 {
        return TC_ACT_SHOT;
    }
    if swap_macs::<L3>(ctx).is_err() || ctx.store(L3, &out.0, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: reading the ifindex of the skb we were handed.
    let ifindex = unsafe { (*skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
