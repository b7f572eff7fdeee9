//! Header parsing. Reads go through `bpf_skb_load_bytes`, which checks the
//! packet length itself, so nothing here can read past the packet end.
//!
//! Every function is generic over `L3`, the offset of the IPv4 header:
//! [`ETH_HLEN`] on Ethernet devices, 0 on L3 devices (WireGuard, IPIP, tun),
//! which have no link-layer header at TC. The agent attaches the matching
//! program by device type.
use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets of IPv4 fields from the start of the IPv4 header.
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// First fragment: carries the L4 header, more follow.
    First,
    /// A later fragment: no L4 header; ports come from the fragment map.
    Later,
}

/// The parts of an IPv4 TCP/UDP/ICMP packet the datapath needs.
pub struct Packet {
    pub l3: usize,      // offset of the IPv4 header from the frame start
    pub saddr: [u8; 4], // network order
    pub daddr: [u8; 4], // network order
    pub sport: u16,     // host order (ICMP: 0)
    pub dport: u16,     // host order (ICMP: 0)
    pub proto: u8,
    pub tcp_flags: u8,  // 0 for UDP and ICMP
    pub icmp_type: u8,  // ICMP only
    pub l4_off: usize,  // offset of the L4 header from the frame start
    pub ihl: usize,     // IPv4 header length in bytes
    pub frag: Frag,
    pub ip_id: u16,     // IPv4 identification, host order
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        match self.proto {
            IPPROTO_TCP => self.l4_off + 16,
            IPPROTO_UDP => self.l4_off + 6,
            _ => self.l4_off + 2,
        }
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// A TCP SYN without ACK: the client opens a connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Whether the L4 header (ports, checksum) is in this packet.
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != Frag::Later
    }
}

/// Parses an IPv4 TCP/UDP/ICMP packet whose IPv4 header starts at `L3`.
/// `Err` carries the pass reason for anything that is not ours to look at.
#[inline(always)]
pub fn parse<const L3: usize>(ctx: &TcContext) -> Result<Packet, Stat> {
    // The skb's protocol is what the stack will treat the packet as; on
    // Ethernet devices the frame's own EtherType must agree (a VLAN tag
    // left in the frame shows up as 0x8100 here, and passes).
    // SAFETY: reading a field of the skb we were handed.
    let skb_proto = unsafe { (*ctx.skb.skb).protocol };
    if skb_proto != u32::from(ETH_P_IP.to_be()) {
        return Err(Stat::PassNotIpv4);
    }
    if L3 == ETH_HLEN {
        let eth_proto: u16 = ctx.load::<u16>(12).map_err(|_| Stat::PassNotIpv4)?;
        if u16::from_be(eth_proto) != ETH_P_IP {
            return Err(Stat::PassNotIpv4);
        }
    }
    // The IPv4 header as five words (read as words, not 20 separate bytes,
    // which the compiler would keep in as many stack slots).
    let ip: [u32; 5] = ctx.load(L3).map_err(|_| Stat::PassNotIpv4)?;
    let w0 = u32::from_be(ip[0]); // version, IHL, TOS, total length
    let w1 = u32::from_be(ip[1]); // identification, flags, fragment offset
    let w2 = u32::from_be(ip[2]); // TTL, protocol, checksum
    if w0 >> 28 != 4 {
        return Err(Stat::PassNotIpv4);
    }
    let ihl = ((w0 >> 24) & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(Stat::PassNotIpv4);
    }
    let proto = ((w2 >> 16) & 0xff) as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Err(Stat::PassOtherProto);
    }
    let frag_field = (w1 & 0xffff) as u16;
    let frag = if frag_field & 0x1fff != 0 {
        Frag::Later
    } else if frag_field & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let l4_off = L3 + ihl;
    let mut pkt = Packet {
        l3: L3,
        saddr: ip[3].to_ne_bytes(),
        daddr: ip[4].to_ne_bytes(),
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        icmp_type: 0,
        l4_off,
        ihl,
        frag,
        ip_id: (w1 >> 16) as u16,
    };
    if frag == Frag::Later {
        return Ok(pkt);
    }
    if proto == IPPROTO_ICMP {
        pkt.icmp_type = ctx.load::<u8>(l4_off).map_err(|_| Stat::PassOtherProto)?;
        return Ok(pkt);
    }
    let ports = u32::from_be(ctx.load::<u32>(l4_off).map_err(|_| Stat::PassOtherProto)?);
    pkt.sport = (ports >> 16) as u16;
    pkt.dport = (ports & 0xffff) as u16;
    if proto == IPPROTO_TCP {
        pkt.tcp_flags = ctx.load::<u8>(l4_off + 13).map_err(|_| Stat::PassOtherProto)?;
    }
    Ok(pkt)
}

/// ICMP types that quote the packet they are about (RFC 792).
#[inline(always)]
pub fn is_icmp_error(icmp_type: u8) -> bool {
    icmp_type == 3 || icmp_type == 11 || icmp_type == 12
}
