//! TC datapath: ClusterIP-style DNAT with conntrack and reply reverse-NAT.
//!
//! One entry point; parsing, service lookup, backend selection, conntrack,
//! rewriting and rejection live in small `#[inline(always)]` modules so the
//! verifier sees one straight program.
#![no_std]
#![no_main]

mod ct;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::Stat;

use crate::maps::count;

/// Attached at ingress of pod-facing (and node-facing) interfaces: DNATs
/// packets to a service frontend, reverse-NATs replies of tracked flows,
/// passes everything else untouched.
#[classifier]
pub fn kp_tc_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => {
            // A helper failed half-way through a rewrite: the packet may be
            // inconsistent, never let it through.
            count(Stat::DropMalformed);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = match packet::parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return Ok(TC_ACT_OK);
        }
    };
    if let Some(svc) = lb::lookup_frontend(&pkt) {
        return lb::forward(ctx, &pkt, &svc);
    }
    if let Some(verdict) = ct::reply_nat(ctx, &pkt)? {
        count(Stat::ReplyNat);
        return Ok(verdict);
    }
    count(Stat::PassNoService);
    Ok(TC_ACT_OK)
}

/// Attached at egress of the same interfaces: reverse-NATs replies that the
/// node's own stack sends toward a client (a backend in the host network
/// namespace, such as the API server behind the `kubernetes` Service), which
/// never cross an ingress hook. Everything else passes untouched.
#[classifier]
pub fn kp_tc_egress(ctx: TcContext) -> i32 {
    // Forwarded packets (the pod-to-pod and pod-to-service path) were
    // already handled at ingress; only locally generated ones matter here.
    // SAFETY: reading a field of the skb we were handed.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    let Ok(pkt) = packet::parse(&ctx) else {
        return TC_ACT_OK;
    };
    match ct::reply_nat_in_place(&ctx, &pkt) {
        Ok(true) => {
            count(Stat::ReplyNatEgress);
            TC_ACT_OK
        }
        Ok(false) => TC_ACT_OK,
        Err(()) => {
            count(Stat::DropMalformed);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
