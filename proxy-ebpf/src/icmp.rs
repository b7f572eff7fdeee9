//! ICMP errors about translated flows (fragmentation needed, port and host
//! unreachable, time exceeded). The error quotes the header of the packet it
//! is about; that packet was translated, so the quote (and, when the error
//! comes from the translated end itself, the outer address) is translated
//! back, or the sender's socket would never match it: path MTU discovery and
//! UDP errors would break through a Service.
//!
//! - At egress toward a client, an error about a forward packet (client ->
//!   backend after DNAT) gets the frontend back as the quoted destination.
//! - At ingress from a client, an error about a reply (frontend -> client as
//!   the client saw it) gets the backend as the quoted source and as the
//!   outer destination, and so reaches the backend.
//!
//! The quoted transport checksum is left as is: receivers do not check it.
use aya_ebpf::programs::TcContext;
use proxy_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP, v4_mapped, v4_of_mapped};

use crate::{
    ct,
    nat::{Side, rewrite},
    packet::{IP_CSUM, IP_DADDR, IP_SADDR, Packet, is_icmp_error},
};

const ICMP_HLEN: usize = 8;

/// One's-complement checksum `csum` after a 32-bit word changes from `old`
/// to `new` (RFC 1624; every value as it sits in the packet).
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let mut s: u32 = u32::from(!csum);
    s += u32::from(!(old as u16)) + u32::from(!((old >> 16) as u16));
    s += u32::from(new as u16) + u32::from((new >> 16) as u16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Translates an ICMP error about a translated flow. Returns whether it was one.
/// [`translate`] as a BPF-to-BPF call (its stack is not the caller's):
/// 1 translated, 0 not an error about one of our flows, -1 a rewrite failed.
#[inline(always)]
pub fn translate_call(ctx: &TcContext, pkt: &Packet, now: u64, egress: bool) -> i32 {
    match translate(ctx, pkt, now, egress) {
        Ok(true) => 1,
        Ok(false) => 0,
        Err(()) => -1,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, now: u64, egress: bool) -> Result<bool, ()> {
    if !is_icmp_error(pkt.icmp_type) || !pkt.has_l4() {
        return Ok(false);
    }
    let inner = pkt.l4_off + ICMP_HLEN;
    let Ok(ip) = ctx.load::<[u8; 20]>(inner) else { return Ok(false) };
    let iproto = ip[9];
    if ip[0] != 0x45 || (iproto != IPPROTO_TCP && iproto != IPPROTO_UDP) {
        return Ok(false);
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(inner + 20) else { return Ok(false) };
    let isrc = [ip[12], ip[13], ip[14], ip[15]];
    let idst = [ip[16], ip[17], ip[18], ip[19]];
    let isport = u16::from_be_bytes([ports[0], ports[1]]);
    let idport = u16::from_be_bytes([ports[2], ports[3]]);
    // The quoted packet went isrc -> idst; look its flow up from the other end.
    let key = CtKey {
        saddr: v4_mapped(idst),
        daddr: v4_mapped(isrc),
        sport: idport,
        dport: isport,
        proto: iproto,
        _pad: [0; 3],
    };
    // (quoted field to rewrite is the destination?, old address, new address, new port)
    let (inner_dst, old_addr, new_addr, new_port) = if egress {
        let Some(r) = ct::reply_of(&key, now) else { return Ok(false) };
        let Some(vip) = v4_of_mapped(&r.nat_addr) else { return Ok(false) };
        (true, idst, vip, r.nat_port)
    } else {
        let Some(f) = ct::forward_of(&key, now) else { return Ok(false) };
        let Some(backend) = v4_of_mapped(&f.nat_addr) else { return Ok(false) };
        (false, isrc, backend, f.nat_port)
    };
    let (addr_off, port_off, old_port) = if inner_dst {
        (inner + IP_DADDR, inner + 22, idport)
    } else {
        (inner + IP_SADDR, inner + 20, isport)
    };
    let icmp_csum = pkt.l4_off + 2;
    let old_a = u32::from_ne_bytes(old_addr);
    let new_a = u32::from_ne_bytes(new_addr);
    let old_csum = u16::from_ne_bytes([ip[10], ip[11]]);
    let new_csum = csum_replace4(old_csum, old_a, new_a);
    let old_p = old_port.to_be();
    let new_p = new_port.to_be();
    // The ICMP checksum covers the quote: every quoted change moves it.
    ctx.l4_csum_replace(icmp_csum, u64::from(old_a), u64::from(new_a), 4).map_err(|_| ())?;
    ctx.store(addr_off, &new_a, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, u64::from(old_csum), u64::from(new_csum), 2).map_err(|_| ())?;
    ctx.store(inner + IP_CSUM, &new_csum, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, u64::from(old_p), u64::from(new_p), 2).map_err(|_| ())?;
    ctx.store(port_off, &new_p, 0).map_err(|_| ())?;
    // The outer header: an error from the backend itself comes from the
    // frontend; an error toward the frontend goes to the backend.
    if egress && pkt.saddr == old_addr {
        rewrite(ctx, pkt, Side::Src, new_addr, 0)?;
    } else if !egress && pkt.daddr == old_addr {
        rewrite(ctx, pkt, Side::Dst, new_addr, 0)?;
    }
    Ok(true)
}
