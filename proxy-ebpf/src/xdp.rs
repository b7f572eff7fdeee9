//! XDP on the node's external interfaces (`--nodeport-acceleration`):
//! NodePort, LoadBalancer and externalIP flows are translated before the
//! stack sees them, and flows to backends on other nodes (SNAT) and their
//! replies are sent straight back out of the interface they came in on
//! (`bpf_fib_lookup`, then XDP_TX), as Katran's XDP path does; a flow whose
//! next hop is behind another interface is left to TC, whose redirect
//! works for any device (an XDP redirect needs XDP transmit there). Packets to
//! a local backend are translated and handed to the stack.
//!
//! Whatever XDP cannot finish goes on to the TC path unchanged (XDP_PASS):
//! VLAN tags, IP options, fragments, ICMP, an unresolved neighbour,
//! refusals (TC builds the ICMP error), full maps. The same maps and the
//! same conntrack, backend choice and SNAT code serve both paths, so a flow
//! can move between them at any packet.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    programs::XdpContext,
};
use proxy_common::{
    BACKEND_F_LOCAL, CtKey, IPPROTO_TCP, IPPROTO_UDP, SVC_F_SOURCE_RANGES, Stat, VIP_F_NODE, v4_mapped, v4_of_mapped,
};

use crate::{
    ct, fwd,
    lb::{self, lookup_frontend, lookup_vip},
    maps::{BACKENDS, XCALLS, config, count, source_allowed},
    packet::{ETH_HLEN, Frag, Packet},
    snat,
};

const ETH_P_IP: u16 = 0x0800;
const IP_HLEN: usize = 20;
const L4: usize = ETH_HLEN + IP_HLEN;

/// A bounds-checked pointer `off` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// An untagged Ethernet IPv4 TCP/UDP packet without IP options, not a
/// fragment: what XDP translates. Anything else is for TC.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, ()> {
    // SAFETY: every read is bounds-checked by ptr_at.
    unsafe {
        if u16::from_be(*ptr_at::<u16>(ctx, 12)?) != ETH_P_IP {
            return Err(());
        }
        let ip = ptr_at::<[u32; 5]>(ctx, ETH_HLEN)?;
        let w0 = u32::from_be((*ip)[0]);
        let w1 = u32::from_be((*ip)[1]);
        let w2 = u32::from_be((*ip)[2]);
        if w0 >> 24 != 0x45 || w1 & 0x3fff != 0 {
            return Err(());
        }
        let proto = ((w2 >> 16) & 0xff) as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Err(());
        }
        let ports = u32::from_be(*ptr_at::<u32>(ctx, L4)?);
        let tcp_flags = if proto == IPPROTO_TCP { *ptr_at::<u8>(ctx, L4 + 13)? } else { 0 };
        Ok(Packet {
            l3: ETH_HLEN,
            saddr: (*ip)[3].to_ne_bytes(),
            daddr: (*ip)[4].to_ne_bytes(),
            sport: (ports >> 16) as u16,
            dport: (ports & 0xffff) as u16,
            proto,
            tcp_flags,
            icmp_type: 0,
            l4_off: L4,
            ihl: IP_HLEN,
            frag: Frag::None,
            ip_id: (w1 >> 16) as u16,
        })
    }
}

/// One's-complement checksum update (RFC 1624) for 16-bit words replaced
/// in place; words are read as stored (network order), which the sum does
/// not care about.
#[inline(always)]
fn csum_update(csum: u16, old: [u16; 3], new: [u16; 3]) -> u16 {
    let mut sum: u32 = u32::from(!csum);
    for w in old {
        sum += u32::from(!w);
    }
    for w in new {
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The words of an address and a port as stored in the packet.
#[inline(always)]
fn words(addr: [u8; 4], port: u16) -> [u16; 3] {
    [u16::from_ne_bytes([addr[0], addr[1]]), u16::from_ne_bytes([addr[2], addr[3]]), port.to_be()]
}

/// Rewrites the packet to `saddr:sport -> daddr:dport`, with the TTL
/// decremented (we forward) when `ttl`, and every checksum kept right.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, src: ([u8; 4], u16), dst: ([u8; 4], u16), ttl: bool) -> Result<(), ()> {
    // SAFETY: every pointer is bounds-checked by ptr_at.
    unsafe {
        let ip = ptr_at::<[u16; 10]>(ctx, ETH_HLEN)?;
        let old_s = words(pkt.saddr, pkt.sport);
        let old_d = words(pkt.daddr, pkt.dport);
        let new_s = words(src.0, src.1);
        let new_d = words(dst.0, dst.1);
        // IPv4 header: addresses (and TTL), no ports.
        let mut c = (*ip)[5];
        c = csum_update(c, [old_s[0], old_s[1], old_d[0]], [new_s[0], new_s[1], new_d[0]]);
        c = csum_update(c, [old_d[1], 0, 0], [new_d[1], 0, 0]);
        if ttl {
            let old_ttl = (*ip)[4];
            let b = old_ttl.to_ne_bytes();
            if b[0] <= 1 {
                return Err(());
            }
            let new_ttl = u16::from_ne_bytes([b[0] - 1, b[1]]);
            c = csum_update(c, [old_ttl, 0, 0], [new_ttl, 0, 0]);
            (*ip)[4] = new_ttl;
        }
        (*ip)[5] = c;
        (*ip)[6] = new_s[0];
        (*ip)[7] = new_s[1];
        (*ip)[8] = new_d[0];
        (*ip)[9] = new_d[1];
        // L4: ports, and the addresses through the pseudo-header.
        let ports = ptr_at::<[u16; 2]>(ctx, L4)?;
        (*ports)[0] = new_s[2];
        (*ports)[1] = new_d[2];
        let csum = if pkt.proto == IPPROTO_TCP { ptr_at::<u16>(ctx, L4 + 16)? } else { ptr_at::<u16>(ctx, L4 + 6)? };
        let old = *csum;
        if pkt.proto == IPPROTO_UDP && old == 0 {
            return Ok(()); // no UDP checksum: stays none
        }
        let mut c = csum_update(old, old_s, new_s);
        c = csum_update(c, old_d, new_d);
        if pkt.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        *csum = c;
    }
    Ok(())
}

/// Routes `src -> dst` from the ingress interface; on success the frame
/// is rewritten to it (addresses, ports, TTL, MACs) and sent: XDP_TX out of
/// the same interface, or a redirect. Otherwise the frame is untouched and
/// left to TC (`XDP_PASS`, counted).
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> u32 {
    // SAFETY: reading the context we were handed.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let len = (ctx.data_end() - ctx.data()) as u16;
    let mut p = fwd::lookup(ifindex, src.0, dst.0, pkt.proto, len.saturating_sub(ETH_HLEN as u16));
    // SAFETY: p is a valid bpf_fib_lookup on our stack, its size passed.
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx.cast(), &raw mut p, core::mem::size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32, 0)
    };
    // Another egress device may have no XDP transmit (a tunnel, a veth
    // whose peer runs no XDP program): a redirect there would drop the
    // frame. TC's redirect works for every device: leave it to TC.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || p.ifindex != ifindex {
        count(Stat::XdpToTc);
        return XDP_PASS;
    }
    if rewrite(ctx, pkt, src, dst, true).is_err() {
        count(Stat::DropMalformed);
        return XDP_DROP;
    }
    let Ok(eth) = ptr_at::<[[u8; 6]; 2]>(ctx, 0) else { return XDP_DROP };
    // SAFETY: bounds-checked above.
    unsafe { *eth = [p.dmac, p.smac] };
    count(Stat::XdpTx);
    XDP_TX
}

/// DNAT only, for a local backend: the stack delivers it.
#[inline(always)]
fn to_stack(ctx: &XdpContext, pkt: &Packet, dst: ([u8; 4], u16)) -> u32 {
    if rewrite(ctx, pkt, (pkt.saddr, pkt.sport), dst, false).is_err() {
        count(Stat::DropMalformed);
        return XDP_DROP;
    }
    count(Stat::XdpPassTranslated);
    XDP_PASS
}

/// The external interfaces' XDP program.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse(ctx) else { return XDP_PASS };
    let Some(vip) = lookup_vip(pkt.daddr) else { return XDP_PASS };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Established flows first (one conntrack lookup, no frontend lookup):
    // the common case on the fast path.
    if let Some(v) = ct::forward_lookup(&pkt, now) {
        let Some(baddr) = v4_of_mapped(&v.nat_addr) else { return XDP_PASS };
        count(Stat::CtHit);
        if v.snat_port == 0 {
            return to_stack(ctx, &pkt, (baddr, v.nat_port));
        }
        let Some(node) = config().as_ref().and_then(snat::node_addr) else { return XDP_PASS };
        return forward(ctx, &pkt, (node, v.snat_port), (baddr, v.nat_port));
    }
    if lookup_frontend::<true>(&pkt).is_some() {
        // A new flow: the new-flow program, with a stack of its own.
        // SAFETY: a tail call on our own context.
        unsafe { XCALLS.tail_call(ctx, 0) };
        count(Stat::XdpToTc);
        return XDP_PASS;
    }
    if vip.flags & VIP_F_NODE != 0
        && let Some(fkey) = snat::reply(&pkt, now)
    {
        return reply(ctx, &pkt, &fkey);
    }
    XDP_PASS
}

/// The reply of an SNATed flow: back to its client, from its frontend.
#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, fkey: &CtKey) -> u32 {
    let Some(((client, cport), (front, fport))) = snat::ends(fkey) else { return XDP_PASS };
    count(Stat::SnatReply);
    forward(ctx, pkt, (front, fport), (client, cport))
}

/// New flows (tail-called by [`ingress`]): choose, claim, record, send.
/// What needs an ICMP answer (no endpoints) goes to TC.
#[inline(always)]
pub fn new_flow(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse(ctx) else { return XDP_PASS };
    let Some((_, svc)) = lookup_frontend::<true>(&pkt) else { return XDP_PASS };
    if svc.count == 0 {
        count(Stat::XdpToTc);
        return XDP_PASS;
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, v4_mapped(pkt.saddr)) {
        count(Stat::DropSourceRange);
        return XDP_DROP;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let backend_id = lb::select_for_packet(&svc, &pkt, now);
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        count(Stat::DropBackendMissing);
        return XDP_DROP;
    };
    let Some(baddr) = v4_of_mapped(&backend.addr) else { return XDP_PASS };
    let node = if backend.flags & BACKEND_F_LOCAL == 0 { config().as_ref().and_then(snat::node_addr) } else { None };
    let mut snat_port = 0;
    if node.is_some() {
        match snat::claim(&pkt, &backend, now) {
            snat::NO_SNAT => {}
            0 => {
                count(Stat::DropSnatExhausted);
                return XDP_DROP;
            }
            port => snat_port = port as u16,
        }
    }
    let flow = ct::NewFlow { svc_id: svc.svc_id, backend_id, baddr, bport: backend.port, snat_port, now };
    if ct::create(&pkt, &flow) < 0 {
        if snat_port != 0 {
            snat::release(&pkt, &backend, snat_port);
        }
        count(Stat::DropCtFull);
        return XDP_DROP;
    }
    count(Stat::NewFlow);
    match node {
        Some(node) if snat_port != 0 => {
            count(Stat::SnatNew);
            // An unresolved neighbour leaves the frame to TC, which finds
            // the flow just recorded and translates it the same way.
            forward(ctx, &pkt, (node, snat_port), (baddr, backend.port))
        }
        _ => to_stack(ctx, &pkt, (baddr, backend.port)),
    }
}
