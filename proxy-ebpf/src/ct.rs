//! Connection tracking: forward entries pin a flow to its backend, reply
//! entries let answers be rewritten back to the frontend.
use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{
    CT_F_CLOSING, CT_F_HAIRPIN, CT_F_REPLY, CT_LIFETIME_NONTCP_NS, CT_LIFETIME_TCP_CLOSING_NS,
    CT_LIFETIME_TCP_NS, CT_REFRESH_NS, CtKey, CtValue, v4_mapped, v4_of_mapped,
};

use crate::{
    maps::{BACKENDS, CT},
    nat::{Side, rewrite, swap_macs},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
fn key_of(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: v4_mapped(pkt.saddr),
        daddr: v4_mapped(pkt.daddr),
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn lifetime_ns(pkt: &Packet, flags: u8) -> u64 {
    if !pkt.is_tcp() {
        CT_LIFETIME_NONTCP_NS
    } else if flags & CT_F_CLOSING != 0 {
        CT_LIFETIME_TCP_CLOSING_NS
    } else {
        CT_LIFETIME_TCP_NS
    }
}

/// The backend of an existing, live flow. A fresh SYN on a closing flow, or on
/// a flow whose backend is gone, starts a new flow instead.
#[inline(always)]
pub fn forward_lookup(pkt: &Packet, now: u64) -> Option<([u8; 4], u16, u8)> {
    let key = key_of(pkt);
    let entry = CT.get_ptr_mut(&key)?;
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    let v = unsafe { *entry };
    if v.flags & CT_F_REPLY != 0 || now.wrapping_sub(v.last_seen_ns) > lifetime_ns(pkt, v.flags) {
        return None;
    }
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn_only
        && (v.flags & CT_F_CLOSING != 0 || unsafe { BACKENDS.get(&v.backend_id) }.is_none())
    {
        return None;
    }
    let closing = pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 && v.flags & CT_F_CLOSING == 0;
    if closing || now.wrapping_sub(v.last_seen_ns) > CT_REFRESH_NS {
        // SAFETY: as above; a racing writer can only refresh the same fields.
        unsafe {
            (*entry).last_seen_ns = now;
            if closing {
                (*entry).flags |= CT_F_CLOSING;
            }
        }
    }
    let addr = v4_of_mapped(&v.nat_addr)?;
    Some((addr, v.nat_port, v.flags))
}

/// Records a new flow to `backend` (forward and reply entries).
#[inline(always)]
pub fn create(pkt: &Packet, backend_id: u32, baddr: [u8; 4], bport: u16, now: u64, ifindex: u32) -> Result<u8, ()> {
    let closing = if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 { CT_F_CLOSING } else { 0 };
    // The client picked itself: hairpin (see CT_F_HAIRPIN).
    let hairpin = if baddr == pkt.saddr { CT_F_HAIRPIN } else { 0 };
    let fwd_key = key_of(pkt);
    let fwd = CtValue {
        nat_addr: v4_mapped(baddr),
        nat_port: bport,
        flags: closing | hairpin,
        _pad: 0,
        backend_id,
        last_seen_ns: now,
        ifindex: 0,
        _pad2: 0,
    };
    // A hairpin reply is addressed to the frontend (the forward packet's
    // source was rewritten to it); an ordinary one to the client.
    let rev_key = CtKey {
        saddr: v4_mapped(baddr),
        daddr: if hairpin != 0 { fwd_key.daddr } else { fwd_key.saddr },
        sport: bport,
        dport: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let rev = CtValue {
        nat_addr: fwd_key.daddr,
        nat_port: pkt.dport,
        flags: CT_F_REPLY | hairpin,
        _pad: 0,
        backend_id,
        last_seen_ns: now,
        ifindex,
        _pad2: 0,
    };
    // Reply entry first: a forward entry without it would blackhole replies.
    CT.insert(&rev_key, &rev, 0).map_err(|_| ())?;
    CT.insert(&fwd_key, &fwd, 0).map_err(|_| ())?;
    Ok(hairpin)
}

/// The reply entry for this packet, if it is a reply of a tracked flow.
#[inline(always)]
fn reply_entry(pkt: &Packet) -> Option<([u8; 4], CtValue)> {
    let key = key_of(pkt);
    // SAFETY: copied out at once.
    let v = (unsafe { CT.get(&key) }).copied()?;
    if v.flags & CT_F_REPLY == 0 {
        return None;
    }
    Some((v4_of_mapped(&v.nat_addr)?, v))
}

/// Rewrites the source of a reply back to the frontend, leaving the packet
/// on its way (egress hook). Returns whether it was a tracked reply.
#[inline(always)]
pub fn reply_nat_in_place(ctx: &TcContext, pkt: &Packet) -> Result<bool, ()> {
    let Some((addr, v)) = reply_entry(pkt) else {
        return Ok(false);
    };
    if v.flags & CT_F_HAIRPIN != 0 {
        // Hairpin replies are handled at ingress only.
        return Ok(false);
    }
    rewrite(ctx, pkt, Side::Src, addr, v.nat_port)?;
    Ok(true)
}

/// Rewrites the source of a reply from a backend back to the frontend and
/// sends it straight to the interface the client's packets came in on.
/// Returns the verdict, or `None` when the packet belongs to no tracked flow.
///
/// The reply is redirected (with a neighbour lookup) instead of handed to
/// the stack: a rewritten source that is one of the node's own addresses (a
/// NodePort) would be dropped there as a martian, and skipping the second
/// routing pass is cheaper anyway.
#[inline(always)]
pub fn reply_nat(ctx: &TcContext, pkt: &Packet) -> Result<Option<i32>, ()> {
    let Some((addr, v)) = reply_entry(pkt) else {
        return Ok(None);
    };
    rewrite(ctx, pkt, Side::Src, addr, v.nat_port)?;
    if v.flags & CT_F_HAIRPIN != 0 {
        // Back to the pod that is both client and backend: destination
        // becomes its own address again, out of the interface it came in on.
        rewrite(ctx, pkt, Side::Dst, pkt.saddr, pkt.dport)?;
        swap_macs(ctx)?;
        // SAFETY: reading the ingress ifindex of the skb we were handed.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        return Ok(Some(unsafe { bpf_redirect(ifindex, 0) } as i32));
    }
    if v.ifindex == 0 {
        return Ok(Some(TC_ACT_OK));
    }
    // SAFETY: helper call with no parameters block.
    Ok(Some(unsafe { bpf_redirect_neigh(v.ifindex, core::ptr::null_mut(), 0, 0) } as i32))
}
