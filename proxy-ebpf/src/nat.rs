//! Address/port rewriting with incremental L3/L4 checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::IPPROTO_ICMP;

use crate::packet::{ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR, Packet};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    /// Destination (DNAT toward a backend).
    Dst,
    /// Source (reverse NAT of a reply back to the frontend).
    Src,
}

/// Rewrites one end of `pkt` to `addr:port` (network-order octets, host-order
/// port), keeping IPv4, TCP and UDP checksums correct. A UDP checksum of zero
/// ("none") stays zero. A later fragment has no L4 header: only its address
/// changes (the datagram's checksum was fixed in the first fragment). ICMP has
/// no ports and no pseudo-header.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, side: Side, addr: [u8; 4], port: u16) -> Result<(), ()> {
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Dst => (pkt.l3 + IP_DADDR, pkt.l4_off + 2, pkt.daddr, pkt.dport),
        Side::Src => (pkt.l3 + IP_SADDR, pkt.l4_off, pkt.saddr, pkt.sport),
    };
    let l4 = pkt.has_l4() && pkt.proto != IPPROTO_ICMP;
    let old_a = u32::from_ne_bytes(old_addr);
    let new_a = u32::from_ne_bytes(addr);
    let old_p = old_port.to_be();
    let new_p = port.to_be();
    let mangled = if pkt.is_tcp() { 0 } else { u64::from(BPF_F_MARK_MANGLED_0) };
    let csum_off = pkt.l4_csum_off();

    if old_a != new_a {
        if l4 {
            ctx.l4_csum_replace(
                csum_off,
                u64::from(old_a),
                u64::from(new_a),
                u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
            )
            .map_err(|_| ())?;
        }
        ctx.l3_csum_replace(pkt.l3 + IP_CSUM, u64::from(old_a), u64::from(new_a), 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_a, 0).map_err(|_| ())?;
    }
    if l4 && old_p != new_p {
        ctx.l4_csum_replace(csum_off, u64::from(old_p), u64::from(new_p), mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_p, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Swaps the Ethernet addresses, for a frame sent back out of the interface
/// it came in on (the peer must see its own address as destination). L3
/// devices have none.
#[inline(always)]
pub fn swap_macs<const L3: usize>(ctx: &TcContext) -> Result<(), ()> {
    if L3 != ETH_HLEN {
        return Ok(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut out = [0u8; 12];
    out[..6].copy_from_slice(&macs[6..]);
    out[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &out, 0).map_err(|_| ())
}
