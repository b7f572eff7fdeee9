//! Connection tracking. A forward entry (client -> frontend) pins a flow to
//! its backend and holds the flow's state; a reply entry (backend -> client)
//! lets answers be rewritten back to the frontend. A reply entry is honoured
//! only while its forward entry is alive and agrees with it, so a stale reply
//! entry can never rewrite a packet of another flow.
use proxy_common::{
    CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_HAIRPIN, CT_F_REPLY, CT_F_SEEN_REPLY,
    CT_F_SYN_SEEN, CT_REFRESH_NS, CtKey, CtValue, Stat, ct_done, ct_forward_key_of_reply, ct_lifetime_ns, ct_reply_key,
    v4_mapped,
};

use crate::{
    maps::{count, ct_get, ct_insert, ct_remove, is_member},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The tuple of `pkt` as a conntrack key.
#[inline(always)]
pub fn key_of(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: v4_mapped(pkt.saddr),
        daddr: v4_mapped(pkt.daddr),
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// The tuple of a packet going the other way.
#[inline(always)]
fn reverse_key_of(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: v4_mapped(pkt.daddr),
        daddr: v4_mapped(pkt.saddr),
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// TCP state after a packet with `tcp` flags went the `reply` way.
#[inline(always)]
fn next_flags(flags: u8, tcp: u8, is_tcp: bool, reply: bool) -> u8 {
    let mut f = flags;
    if reply {
        f |= CT_F_SEEN_REPLY;
    }
    if !is_tcp {
        return f;
    }
    if !reply && tcp & TCP_SYN != 0 {
        f |= CT_F_SYN_SEEN;
    }
    if !reply && f & CT_F_SEEN_REPLY != 0 && tcp & TCP_ACK != 0 {
        f |= CT_F_ESTABLISHED;
    }
    if tcp & TCP_FIN != 0 {
        f |= if reply { CT_F_FIN_REV } else { CT_F_FIN_FWD };
    }
    if tcp & TCP_RST != 0 || (f & CT_F_FIN_FWD != 0 && f & CT_F_FIN_REV != 0) {
        f |= CT_F_CLOSING;
    }
    f
}

/// Writes new flags and a fresh timestamp when either is due.
#[inline(always)]
fn touch(entry: *mut CtValue, old: &CtValue, flags: u8, now: u64) {
    if flags != old.flags || now.wrapping_sub(old.last_seen_ns) > CT_REFRESH_NS {
        // SAFETY: pointer from a successful lookup; a racing writer can only
        // refresh the same fields.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).flags = flags;
        }
    }
}

#[inline(always)]
pub fn expired(v: &CtValue, proto: u8, now: u64) -> bool {
    now.wrapping_sub(v.last_seen_ns) > ct_lifetime_ns(proto, v.flags)
}

/// The live forward entry of this client -> frontend packet, updated for it.
/// `None` starts a new flow: no entry, an expired one, a SYN on a closing
/// flow, a SYN or a non-TCP packet whose backend left the frontend (UDP
/// clients switch at once when their backend goes; TCP connections already
/// established keep theirs).
#[inline(always)]
pub fn forward_lookup(pkt: &Packet, now: u64) -> Option<CtValue> {
    let entry = ct_get(&key_of(pkt))?;
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    let v = unsafe { *entry };
    if v.flags & CT_F_REPLY != 0 || expired(&v, pkt.proto, now) {
        return None;
    }
    let syn = pkt.is_syn();
    if (syn || !pkt.is_tcp()) && !is_member(v.svc_id, v.backend_id) {
        return None;
    }
    if syn && v.flags & CT_F_CLOSING != 0 {
        return None;
    }
    let flags = next_flags(v.flags, pkt.tcp_flags, pkt.is_tcp(), false);
    touch(entry, &v, flags, now);
    // An SNATed flow's replies are found through the SNAT map instead.
    if !pkt.is_tcp() && v.snat_port == 0 {
        keep_reply(pkt, &v);
    }
    Some(v)
}

/// Updates a forward entry's state for a reply packet `pkt` of its flow.
#[inline(always)]
pub fn touch_reply(fentry: *mut CtValue, f: &CtValue, pkt: &Packet, now: u64) {
    let flags = next_flags(f.flags, pkt.tcp_flags, pkt.is_tcp(), true);
    touch(fentry, f, flags, now);
}

/// Non-TCP flows live in an LRU map: a mostly one-way flow must not lose
/// its reply entry to churn while its forward entry stays hot. Looking the
/// reply entry up refreshes it; a missing one is written again.
#[inline(always)]
fn keep_reply(pkt: &Packet, v: &CtValue) {
    let rkey = ct_reply_key(&key_of(pkt), v.nat_addr, v.nat_port, v.flags & CT_F_HAIRPIN != 0);
    if ct_get(&rkey).is_some() {
        return;
    }
    let rev = CtValue {
        nat_addr: v4_mapped(pkt.daddr),
        nat_port: pkt.dport,
        flags: CT_F_REPLY | (v.flags & CT_F_HAIRPIN),
        _pad: 0,
        backend_id: v.backend_id,
        last_seen_ns: v.last_seen_ns,
        svc_id: v.svc_id,
        snat_port: 0,
        _pad2: 0,
    };
    let _ = ct_insert(&rkey, &rev);
}

/// A new flow's choice, passed to [`create`] by reference (BPF calls take
/// five arguments at most).
pub struct NewFlow {
    pub svc_id: u32,
    pub backend_id: u32,
    pub baddr: [u8; 4],
    pub bport: u16,
    pub snat_port: u16,
    pub now: u64,
}

/// The hairpin flag of a new flow: the client picked itself (see CT_F_HAIRPIN).
#[inline(always)]
pub fn hairpin_of(pkt: &Packet, f: &NewFlow) -> u8 {
    if f.baddr == pkt.saddr { CT_F_HAIRPIN } else { 0 }
}

/// The reply key of a new flow.
#[inline(always)]
fn new_reply_key(pkt: &Packet, f: &NewFlow) -> CtKey {
    ct_reply_key(&key_of(pkt), v4_mapped(f.baddr), f.bport, hairpin_of(pkt, f) != 0)
}

/// Records a new flow from `pkt`'s client to a backend: the reply entry
/// first (a forward entry without it would blackhole replies), then the
/// forward entry. Returns the hairpin flag, or -1 when the table is full
/// (the packet must be dropped). An SNATed flow (`snat_port != 0`) gets no
/// reply entry: its replies are addressed to the node and found through
/// the SNAT map. Three BPF-to-BPF calls, so no frame holds every key.
#[inline(always)]
pub fn create(pkt: &Packet, f: &NewFlow) -> i32 {
    if f.snat_port == 0 && insert_reply(pkt, f) < 0 {
        return -1;
    }
    if insert_forward(pkt, f) < 0 {
        if f.snat_port == 0 {
            remove_reply(pkt, f);
        }
        return -1;
    }
    i32::from(hairpin_of(pkt, f))
}

#[inline(always)]
fn insert_reply(pkt: &Packet, f: &NewFlow) -> i32 {
    let rev = CtValue {
        nat_addr: v4_mapped(pkt.daddr),
        nat_port: pkt.dport,
        flags: CT_F_REPLY | hairpin_of(pkt, f),
        _pad: 0,
        backend_id: f.backend_id,
        last_seen_ns: f.now,
        svc_id: f.svc_id,
        snat_port: 0,
        _pad2: 0,
    };
    if ct_insert(&new_reply_key(pkt, f), &rev).is_ok() { 0 } else { -1 }
}

#[inline(always)]
fn remove_reply(pkt: &Packet, f: &NewFlow) {
    ct_remove(&new_reply_key(pkt, f));
}

#[inline(always)]
fn insert_forward(pkt: &Packet, f: &NewFlow) -> i32 {
    let fwd = CtValue {
        nat_addr: v4_mapped(f.baddr),
        nat_port: f.bport,
        flags: next_flags(hairpin_of(pkt, f), pkt.tcp_flags, pkt.is_tcp(), false),
        _pad: 0,
        backend_id: f.backend_id,
        last_seen_ns: f.now,
        svc_id: f.svc_id,
        snat_port: f.snat_port,
        _pad2: 0,
    };
    if ct_insert(&key_of(pkt), &fwd).is_ok() { 0 } else { -1 }
}

/// A reply entry and its forward entry, when the reply entry is ours: its
/// forward entry exists, is alive, agrees on the backend, and (for a SYN-ACK)
/// saw the SYN it answers. A reply entry without a forward entry is removed.
#[inline(always)]
fn reply_entry(rkey: &CtKey, synack: bool, now: u64) -> Option<(CtValue, *mut CtValue, CtValue)> {
    let rentry = ct_get(rkey)?;
    // SAFETY: copied out at once.
    let r = unsafe { *rentry };
    if r.flags & CT_F_REPLY == 0 {
        return None;
    }
    let fkey = ct_forward_key_of_reply(rkey, &r);
    let Some(fentry) = ct_get(&fkey) else {
        count(Stat::ReplyNotOurs);
        ct_remove(rkey);
        return None;
    };
    // SAFETY: copied out at once.
    let f = unsafe { *fentry };
    if f.flags & CT_F_REPLY != 0
        || f.backend_id != r.backend_id
        || expired(&f, rkey.proto, now)
        || (synack && f.flags & CT_F_SYN_SEEN == 0)
    {
        count(Stat::ReplyNotOurs);
        return None;
    }
    Some((r, fentry, f))
}

/// The reply entry for this backend -> client packet, when it is a reply of
/// a live translated flow; the flow's state is updated for it. A reply entry
/// whose forward entry is gone or points elsewhere, or a SYN-ACK answering a
/// SYN we never translated, is not ours: the packet is left alone.
#[inline(always)]
pub fn reply_lookup(pkt: &Packet, now: u64) -> Option<CtValue> {
    let synack = pkt.is_tcp() && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let (r, fentry, f) = reply_entry(&key_of(pkt), synack, now)?;
    let flags = next_flags(f.flags, pkt.tcp_flags, pkt.is_tcp(), true);
    touch(fentry, &f, flags, now);
    Some(r)
}

/// The reply entry under `rkey` if it is ours (no state change: for ICMP
/// errors about a flow).
#[inline(always)]
pub fn reply_of(rkey: &CtKey, now: u64) -> Option<CtValue> {
    reply_entry(rkey, false, now).map(|(r, _, _)| r)
}

/// The live forward entry under `fkey` (no state change: for ICMP errors).
#[inline(always)]
pub fn forward_of(fkey: &CtKey, now: u64) -> Option<CtValue> {
    // SAFETY: copied out at once.
    let f = unsafe { *ct_get(fkey)? };
    if f.flags & CT_F_REPLY != 0 || expired(&f, fkey.proto, now) {
        return None;
    }
    Some(f)
}

/// A client sends straight to an address and port that a finished Service
/// flow of the same tuple used as its backend (headless Services,
/// StatefulSets and metrics scrapers do this): the old flow's entries would
/// rewrite this flow's replies, so they go. Only a TCP SYN or a non-TCP
/// packet can start such a flow, and only a finished one (closing, or past
/// its lifetime) is evicted: the packet of a live Service flow that meets a
/// second ingress hook of ours (a bridge and its ports both attached) is
/// that flow's own, already translated.
#[inline(always)]
pub fn evict_stale(pkt: &Packet, now: u64) {
    if pkt.is_tcp() && !pkt.is_syn() {
        return;
    }
    let rkey = reverse_key_of(pkt);
    let Some(rentry) = ct_get(&rkey) else { return };
    // SAFETY: copied out at once.
    let r = unsafe { *rentry };
    if r.flags & CT_F_REPLY == 0 || r.flags & CT_F_HAIRPIN != 0 {
        return;
    }
    let fkey = ct_forward_key_of_reply(&rkey, &r);
    if let Some(f) = ct_get(&fkey) {
        // SAFETY: copied out at once.
        let f = unsafe { *f };
        if !ct_done(pkt.proto, &f, now) {
            return;
        }
    }
    ct_remove(&fkey);
    ct_remove(&rkey);
    count(Stat::StaleReplyEvicted);
}
