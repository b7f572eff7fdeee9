//! kproxy datapath. One thin entry per attach point and device kind; the
//! shared modules (packet parsing, conntrack, backend selection, NAT, ICMP,
//! fragments, refusal) are small `#[inline(always)]` functions so the
//! verifier sees one straight program per entry.
#![no_std]
#![no_main]

mod ct;
mod debug;
mod frag;
mod fwd;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod snat;
mod sock;
mod tc;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action::XDP_PASS},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use proxy_common::Stat;

use crate::{maps::count, packet::ETH_HLEN};

/// `TC_ACT_UNSPEC`: continue with the next program on the hook (tcx's
/// `TCX_NEXT`), then the stack. Never ends another program's chain.
pub const TC_ACT_NEXT: i32 = -1;

#[inline(always)]
pub fn verdict(r: Result<i32, ()>) -> i32 {
    match r {
        Ok(v) => v,
        Err(()) => {
            // A helper failed half-way through a rewrite: the packet may be
            // inconsistent, never let it through.
            count(Stat::DropMalformed);
            TC_ACT_SHOT
        }
    }
}

/// Ingress of Ethernet devices: DNAT toward Services.
#[classifier]
pub fn kp_tc_ingress(ctx: TcContext) -> i32 {
    verdict(tc::ingress::<ETH_HLEN, false>(&ctx))
}

/// Ingress of external Ethernet devices (uplinks): DNAT, SNAT toward
/// remote backends and its replies.
#[classifier]
pub fn kp_tc_ingress_ext(ctx: TcContext) -> i32 {
    verdict(tc::ingress::<ETH_HLEN, true>(&ctx))
}

/// Passes everything: the baseline of per-packet cost measurements (what a
/// BPF_PROG_TEST_RUN call costs with no work).
#[classifier]
pub fn kp_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_NEXT
}

/// Debug events (tail call from the new-flow programs, `--debug-events`).
#[classifier]
pub fn kp_tc_debug(ctx: TcContext) -> i32 {
    debug::log(&ctx)
}

/// New flows of `kp_tc_ingress` (tail call).
#[classifier]
pub fn kp_tc_new_flow(ctx: TcContext) -> i32 {
    lb::new_flow_entry::<ETH_HLEN, false>(&ctx)
}

/// New flows of `kp_tc_ingress_l3` (tail call).
#[classifier]
pub fn kp_tc_new_flow_l3(ctx: TcContext) -> i32 {
    lb::new_flow_entry::<0, false>(&ctx)
}

/// New flows of `kp_tc_ingress_ext` (tail call).
#[classifier]
pub fn kp_tc_new_flow_ext(ctx: TcContext) -> i32 {
    lb::new_flow_entry::<ETH_HLEN, true>(&ctx)
}

/// New flows of `kp_tc_ingress_ext_l3` (tail call).
#[classifier]
pub fn kp_tc_new_flow_ext_l3(ctx: TcContext) -> i32 {
    lb::new_flow_entry::<0, true>(&ctx)
}

/// Ingress of external L3 devices.
#[classifier]
pub fn kp_tc_ingress_ext_l3(ctx: TcContext) -> i32 {
    verdict(tc::ingress::<0, true>(&ctx))
}

/// Egress of Ethernet devices: reverse NAT of replies.
#[classifier]
pub fn kp_tc_egress(ctx: TcContext) -> i32 {
    verdict(tc::egress::<ETH_HLEN>(&ctx))
}

/// Ingress of L3 devices (no Ethernet header).
#[classifier]
pub fn kp_tc_ingress_l3(ctx: TcContext) -> i32 {
    verdict(tc::ingress::<0, false>(&ctx))
}

/// Egress of L3 devices (no Ethernet header).
#[classifier]
pub fn kp_tc_egress_l3(ctx: TcContext) -> i32 {
    verdict(tc::egress::<0>(&ctx))
}

/// XDP on external interfaces (`--nodeport-acceleration`).
#[xdp]
pub fn kp_xdp(ctx: XdpContext) -> u32 {
    xdp::ingress(&ctx)
}

/// New flows of `kp_xdp` (tail call).
#[xdp]
pub fn kp_xdp_new_flow(ctx: XdpContext) -> u32 {
    xdp::new_flow(&ctx)
}

/// Passes everything: for the peer of a veth that receives XDP_TX or
/// redirected frames (a veth needs an XDP program on the receiving side).
#[xdp]
pub fn kp_xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// cgroup connect(): TCP and connected UDP to a Service go to a backend.
#[cgroup_sock_addr(connect4)]
pub fn kp_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, sock::Hook::Connect)
}

/// cgroup sendmsg(): unconnected UDP datagrams to a Service go to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn kp_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, sock::Hook::Sendmsg)
}

/// cgroup recvmsg(): a reply's source shows as the Service again.
#[cgroup_sock_addr(recvmsg4)]
pub fn kp_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup getpeername(): the peer shows as the Service.
#[cgroup_sock_addr(getpeername4)]
pub fn kp_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
