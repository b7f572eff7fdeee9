//! IPv4 fragments. Only the first fragment of a datagram carries the ports;
//! it records them under the datagram's (source, destination, id, protocol),
//! so the later fragments find their flow and are translated the same way
//! (Cilium does the same). A later fragment whose first one was not seen
//! cannot be translated: it is dropped when it is addressed to a Service.
use proxy_common::{FragKey, FragValue};

use crate::{
    maps::FRAGS,
    packet::{Frag, Packet},
};

#[inline(always)]
fn key_of(pkt: &Packet) -> FragKey {
    FragKey { saddr: pkt.saddr, daddr: pkt.daddr, id: pkt.ip_id, proto: pkt.proto, _pad: 0 }
}

/// Records the ports of a first fragment (before it is rewritten).
#[inline(always)]
pub fn remember(pkt: &Packet) {
    if pkt.frag == Frag::First {
        let _ = FRAGS.insert(&key_of(pkt), &FragValue { sport: pkt.sport, dport: pkt.dport }, 0);
    }
}

/// Fills in the ports of a later fragment from its first fragment. Returns
/// false when the first fragment was not seen.
#[inline(always)]
pub fn recall(pkt: &mut Packet) -> bool {
    if pkt.frag != Frag::Later {
        return true;
    }
    // SAFETY: copied out at once.
    match unsafe { FRAGS.get(&key_of(pkt)) }.copied() {
        Some(v) => {
            pkt.sport = v.sport;
            pkt.dport = v.dport;
            true
        }
        None => false,
    }
}
