//! Opt-in datapath debug events (`--debug-events`): every new flow and
//! every dropped or refused new flow with its reason, through aya-log.
//!
//! Off by default, and then free: `KP_DEBUG` is a load-time global, so with
//! it 0 the verifier removes every event as dead code. On, the new-flow
//! program records the event in a per-CPU slot and tail-calls
//! `kp_tc_debug`, which logs it and returns the verdict the new-flow
//! program decided (the logging code needs stack the new-flow program does
//! not have to spare).
use aya_ebpf::{Global, btf_maps::PerCpuArray, macros::btf_map, programs::TcContext};
use aya_log_ebpf::{info, warn};
use proxy_common::{CALL_DEBUG, Stat};

use crate::{maps::CALLS, packet::Packet};

/// 1: debug events on (set at load by the agent).
#[unsafe(no_mangle)]
static KP_DEBUG: Global<u32> = Global::new(0);

/// One event, handed from the new-flow program to `kp_tc_debug`.
#[derive(Clone, Copy)]
pub struct Event {
    pub verdict: i32,
    /// `u32::MAX`: a new flow; otherwise the `Stat` of a drop or refusal.
    pub what: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u32,
    pub backend_id: u32,
    pub baddr: [u8; 4],
    pub bport: u16,
    pub snat_port: u16,
}

#[btf_map(name = "kp_debug_v1")]
static EVENT: PerCpuArray<Event, 1> = PerCpuArray::new();

const NEW_FLOW: u32 = u32::MAX;

#[inline(always)]
pub fn on() -> bool {
    KP_DEBUG.load() != 0
}

/// With events on: records one and tail-calls `kp_tc_debug`, which logs it
/// and returns `verdict`. Off (or if the tail call fails): `verdict`.
#[inline(always)]
pub fn report(ctx: &TcContext, pkt: &Packet, what: u32, flow: Option<(u32, [u8; 4], u16, u16)>, verdict: i32) -> i32 {
    if !on() {
        return verdict;
    }
    if let Some(e) = EVENT.get_ptr_mut(0) {
        let (backend_id, baddr, bport, snat_port) = flow.unwrap_or((0, [0; 4], 0, 0));
        // SAFETY: this CPU's slot; the tail call below runs on this CPU.
        unsafe {
            *e = Event {
                verdict,
                what,
                saddr: pkt.saddr,
                daddr: pkt.daddr,
                sport: pkt.sport,
                dport: pkt.dport,
                proto: u32::from(pkt.proto),
                backend_id,
                baddr,
                bport,
                snat_port,
            };
        }
        // SAFETY: a tail call on our own context.
        unsafe { CALLS.tail_call(ctx, CALL_DEBUG) };
    }
    verdict
}

/// A new flow's event.
#[inline(always)]
pub fn new_flow(ctx: &TcContext, pkt: &Packet, f: &crate::ct::NewFlow, verdict: i32) -> i32 {
    report(ctx, pkt, NEW_FLOW, Some((f.backend_id, f.baddr, f.bport, f.snat_port)), verdict)
}

/// A dropped or refused new flow's event.
#[inline(always)]
pub fn event(ctx: &TcContext, pkt: &Packet, why: Stat, verdict: i32) -> i32 {
    report(ctx, pkt, why as u32, None, verdict)
}

#[inline(always)]
fn ip(a: [u8; 4]) -> u32 {
    u32::from_be_bytes(a)
}

/// `kp_tc_debug`: logs the recorded event, returns its verdict.
#[inline(always)]
pub fn log(ctx: &TcContext) -> i32 {
    let Some(e) = EVENT.get_ptr(0) else { return crate::TC_ACT_NEXT };
    // SAFETY: this CPU's slot, written just before the tail call.
    let e = unsafe { *e };
    if e.what == NEW_FLOW {
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {} -> backend {} {:i}:{} snat port {}",
            ip(e.saddr),
            e.sport,
            ip(e.daddr),
            e.dport,
            e.proto,
            e.backend_id,
            ip(e.baddr),
            e.bport,
            e.snat_port
        );
    } else {
        let why = Stat::ALL.get(e.what as usize).map_or("?", |s| s.name());
        warn!(ctx, "{} {:i}:{} -> {:i}:{} proto {}", why, ip(e.saddr), e.sport, ip(e.daddr), e.dport, e.proto);
    }
    e.verdict
}
