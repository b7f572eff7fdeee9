//! SNAT of external flows toward backends on other nodes (kube-proxy
//! masquerades them; Cilium SNATs them in BPF). The backend's reply must
//! come back through this node to be reverse-translated, so the flow's
//! source becomes the node's address and a port from the SNAT range, chosen
//! so that the reply tuple (backend -> node:port) is unique: it is claimed
//! in the SNAT map with BPF_NOEXIST before use. The range lies outside the
//! node's ephemeral ports (and the agent reserves it), so it cannot collide
//! with the node's own sockets.
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use proxy_common::{
    Backend, CT_F_CLOSING, CT_F_REPLY, CtKey, CtValue, NodeConfig, SNAT_TRIES, ct_lifetime_ns, v4_of_mapped,
};

use crate::{
    ct,
    maps::{SNAT, config, ct_get},
    packet::Packet,
};

/// The reply tuple of a flow SNATed to `node:port` toward `backend:bport`.
#[inline(always)]
pub fn reply_key(backend: [u8; 16], bport: u16, node: [u8; 16], port: u16, proto: u8) -> CtKey {
    CtKey { saddr: backend, daddr: node, sport: bport, dport: port, proto, _pad: [0; 3] }
}

/// [`claim`] returns this when SNAT is not configured (no node address).
pub const NO_SNAT: u32 = u32::MAX;

/// Claims a SNAT port for `pkt`'s flow (client -> frontend) going to
/// `backend`. 0: every port tried was taken by a live flow (or the map is
/// full); [`NO_SNAT`]: the node has no SNAT address.
#[inline(always)]
pub fn claim(pkt: &Packet, backend: &Backend, now: u64) -> u32 {
    let Some(cfg) = config() else { return NO_SNAT };
    if node_addr(&cfg).is_none() {
        return NO_SNAT;
    }
    claim_inner(&cfg, &ct::key_of(pkt), backend.addr, backend.port, now).map_or(0, u32::from)
}

/// A closing flow's port is taken over only after this long without a
/// packet (its last ACK and FIN retransmissions are over).
const TAKEOVER_GRACE_NS: u64 = 2_000_000_000;

/// Whether the flow an SNAT entry points at is over, so its port may be
/// taken (as the kernel reuses a TIME_WAIT tuple) instead of waiting for
/// the collector: its forward entry expired, is closing and quiet for
/// [`TAKEOVER_GRACE_NS`], or uses another port now. A missing forward
/// entry counts as in use: another CPU may be between claiming the port and
/// recording its flow (the collector removes true orphans).
#[inline(always)]
fn finished(fkey: &CtKey, port: u16, now: u64) -> bool {
    let Some(f) = ct_get(fkey) else { return false };
    // SAFETY: copied out at once.
    let f: CtValue = unsafe { *f };
    if f.flags & CT_F_REPLY != 0 || f.snat_port != port {
        return true;
    }
    let quiet = now.wrapping_sub(f.last_seen_ns);
    quiet > ct_lifetime_ns(fkey.proto, f.flags) || (f.flags & CT_F_CLOSING != 0 && quiet > TAKEOVER_GRACE_NS)
}

/// Claims a port: free ports first (every try), then the port of a flow
/// that is over. After a take-over the entry is read back: a CPU that took
/// the same port at the same moment and lost moves on.
#[inline(always)]
fn claim_inner(cfg: &NodeConfig, fwd: &CtKey, backend: [u8; 16], bport: u16, now: u64) -> Option<u16> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if min == 0 || max < min {
        return None;
    }
    let span = max - min + 1;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        let off = start.wrapping_add(i.wrapping_mul(7_919)).checked_rem(span).unwrap_or(0);
        let port = (min + off) as u16;
        let key = reply_key(backend, bport, cfg.snat_addr, port, fwd.proto);
        if SNAT.insert(&key, fwd, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
    }
    for i in 0..SNAT_TRIES {
        let off = start.wrapping_add(i.wrapping_mul(7_919)).checked_rem(span).unwrap_or(0);
        let port = (min + off) as u16;
        let key = reply_key(backend, bport, cfg.snat_addr, port, fwd.proto);
        // SAFETY: copied out at once.
        if let Some(old) = unsafe { SNAT.get(&key) }.copied()
            && finished(&old, port, now)
            && SNAT.insert(&key, fwd, u64::from(BPF_EXIST)).is_ok()
            // SAFETY: copied out at once.
            && unsafe { SNAT.get(&key) }.copied() == Some(*fwd)
        {
            return Some(port);
        }
    }
    None
}

/// Gives a claimed port back (the flow could not be created after all).
#[inline(always)]
pub fn release(pkt: &Packet, backend: &Backend, port: u16) {
    if let Some(cfg) = config() {
        let _ = SNAT.remove(&reply_key(backend.addr, backend.port, cfg.snat_addr, port, pkt.proto));
    }
}

/// A reply of an SNATed flow: the packet (backend -> node:port) belongs to
/// a live forward entry that still goes to this backend with this port.
/// Returns the flow's forward key (client and frontend) with its state
/// updated for the reply. Anything else is not ours: `None`.
#[inline(always)]
pub fn reply(pkt: &Packet, now: u64) -> Option<CtKey> {
    // SAFETY: copied out at once.
    let fkey = unsafe { SNAT.get(&ct::key_of(pkt)) }.copied()?;
    let fentry = ct_get(&fkey)?;
    // SAFETY: copied out at once.
    let f: CtValue = unsafe { *fentry };
    if f.flags & CT_F_REPLY != 0
        || f.snat_port != pkt.dport
        || f.nat_port != pkt.sport
        || v4_of_mapped(&f.nat_addr) != Some(pkt.saddr)
        || ct::expired(&f, pkt.proto, now)
    {
        return None;
    }
    ct::touch_reply(fentry, &f, pkt, now);
    Some(fkey)
}

/// The client and frontend of a forward key, as IPv4 octets and ports.
#[inline(always)]
pub fn ends(fkey: &CtKey) -> Option<(([u8; 4], u16), ([u8; 4], u16))> {
    Some(((v4_of_mapped(&fkey.saddr)?, fkey.sport), (v4_of_mapped(&fkey.daddr)?, fkey.dport)))
}

/// The node's SNAT address as IPv4 octets, if SNAT is configured.
#[inline(always)]
pub fn node_addr(cfg: &NodeConfig) -> Option<[u8; 4]> {
    let a = v4_of_mapped(&cfg.snat_addr)?;
    if a == [0; 4] { None } else { Some(a) }
}
