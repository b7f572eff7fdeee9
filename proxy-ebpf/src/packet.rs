//! Header parsing. Reads go through `bpf_skb_load_bytes`, which checks the
//! packet length itself, so nothing here can read past the packet end.
use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, Stat};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets of IPv4 fields from the start of the frame.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The parts of an IPv4 TCP/UDP packet the datapath needs.
pub struct Packet {
    pub saddr: [u8; 4], // network order
    pub daddr: [u8; 4], // network order
    pub sport: u16,     // host order
    pub dport: u16,     // host order
    pub proto: u8,
    pub tcp_flags: u8,  // 0 for UDP
    pub l4_off: usize,  // offset of the L4 header from the frame start
    pub ihl: usize,     // IPv4 header length in bytes
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP { self.l4_off + 16 } else { self.l4_off + 6 }
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }
}

/// Parses an Ethernet/IPv4/TCP|UDP frame. `Err` carries the pass reason for
/// anything that is not ours to translate.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Stat> {
    let eth_proto: u16 = ctx.load::<u16>(12).map_err(|_| Stat::PassNotIpv4)?;
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Err(Stat::PassNotIpv4);
    }
    let ip: [u8; 20] = ctx.load(ETH_HLEN).map_err(|_| Stat::PassNotIpv4)?;
    if ip[0] >> 4 != 4 {
        return Err(Stat::PassNotIpv4);
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Stat::PassNotIpv4);
    }
    if ihl != 20 {
        // IP options are legal but rare; the reject path assumes 20 bytes.
        return Err(Stat::PassIpOptions);
    }
    // More-fragments flag or a non-zero offset: only the first fragment
    // carries ports, so we cannot translate fragments consistently.
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return Err(Stat::PassFragment);
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Stat::PassOtherProto);
    }
    let l4_off = ETH_HLEN + ihl;
    let ports: [u8; 4] = ctx.load(l4_off).map_err(|_| Stat::PassOtherProto)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        ctx.load::<u8>(l4_off + 13).map_err(|_| Stat::PassOtherProto)?
    } else {
        0
    };
    Ok(Packet {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        l4_off,
        ihl,
    })
}
