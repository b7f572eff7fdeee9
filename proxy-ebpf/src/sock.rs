//! Socket-level load balancing (cgroup/connect4, sendmsg4, recvmsg4,
//! getpeername4), as Cilium's bpf_sock.c does it: a connection to a Service
//! is addressed to the chosen backend once, at connect(), so none of its
//! packets is translated again (TC sees a packet to a backend and lets it
//! pass); unconnected UDP is translated per datagram at sendmsg(); replies
//! and getpeername() show the Service address again from a per-socket
//! reverse map. Processes of the node's own network namespace (kubelet,
//! host-network pods, this agent) are translated here, since their packets
//! never cross a TC ingress hook of ours.
//!
//! A pod's connected UDP socket is left to the TC path (which follows
//! backend changes per packet, so a DNS client switches at once when its
//! server pod leaves); a connected UDP socket of the host namespace is
//! translated here and keeps its backend until it reconnects.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    IPPROTO_TCP, IPPROTO_UDP, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES, ServiceKey, SockRevKey, SockRevValue, Stat,
    VIP_F_CLUSTER_IP, VIP_F_NODE, v4_mapped, v4_of_mapped,
};

use crate::{
    lb::{lookup_service, lookup_vip, select_backend},
    maps::{BACKENDS, SOCK_REV, count},
};

/// 1: translate only sockets of the host network namespace (set at load).
#[unsafe(no_mangle)]
static KP_SOCK_HOST_ONLY: u32 = 0;
/// The host network namespace's cookie (set at load).
#[unsafe(no_mangle)]
static KP_HOST_NETNS_COOKIE: u64 = 0;

const ECONNREFUSED: i32 = 111;
/// cgroup/sock_addr verdicts.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Which hook a translation runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

/// A hash of the socket (and the frontend), the same for every call on it.
#[inline(always)]
fn sock_hash(cookie: u64, key: &ServiceKey) -> u32 {
    let mut h = (cookie as u32) ^ ((cookie >> 32) as u32).rotate_left(16);
    h ^= u32::from(key.port) << 8 | u32::from(key.proto);
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// connect4 / sendmsg4: a destination that is a Service frontend becomes a
/// backend. A Service without endpoints, or a ClusterIP port no Service
/// serves, fails the call with ECONNREFUSED at once.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of the context we were handed.
    let (proto, ip, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let daddr = ip.to_ne_bytes();
    let Some(vip) = lookup_vip(daddr) else { return ALLOW };
    // SAFETY: helper on our own context; the global is read once.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let host = netns == unsafe { core::ptr::read_volatile(&raw const KP_HOST_NETNS_COOKIE) };
    if !host && unsafe { core::ptr::read_volatile(&raw const KP_SOCK_HOST_ONLY) } != 0 {
        count(Stat::SockSkipNetns);
        return ALLOW;
    }
    if !host && hook == Hook::Connect && proto == IPPROTO_UDP {
        count(Stat::SockUdpToTc);
        return ALLOW;
    }
    let dport = u16::from_be(port as u16);
    // Sockets are always inside the cluster (pods, the node): the internal
    // scope of two-scope frontends.
    let Some((key, svc)) = lookup_service(v4_mapped(daddr), dport, proto, true) else {
        if vip.flags & VIP_F_CLUSTER_IP != 0 && vip.flags & VIP_F_NODE == 0 {
            count(Stat::SockRefused);
            // SAFETY: helper without memory arguments.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REFUSE;
        }
        return ALLOW;
    };
    if svc.count == 0 && svc.flags & SVC_F_DROP_EMPTY != 0 {
        // Dropped, not refused, by kube-proxy: leave the packets to TC,
        // which drops them (a host process's have no route anyway).
        return ALLOW;
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        // The source address is not known at connect(): leave the
        // source-range check to TC (pods) or to the LB (host processes).
        return ALLOW;
    }
    if svc.count == 0 {
        count(Stat::SockRefused);
        // SAFETY: helper without memory arguments.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    }
    // SAFETY: helpers on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // The affinity key of a socket is its network namespace (a pod): the
    // source address is not known yet at connect().
    let mut client = [0xffu8; 16];
    client[..8].copy_from_slice(&netns.to_ne_bytes());
    let Some(backend_id) = select_backend(&svc, client, || sock_hash(cookie, &key), now) else { return ALLOW };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else { return ALLOW };
    let Some(baddr) = v4_of_mapped(&backend.addr) else { return ALLOW };
    let rkey = SockRevKey { cookie, addr: backend.addr, port: backend.port, _pad: [0; 6] };
    let rval = SockRevValue { addr: key.addr, port: dport, _pad: 0, svc_id: svc.svc_id, backend_id, _pad2: 0 };
    if SOCK_REV.insert(&rkey, &rval, 0).is_err() {
        // Without the reverse entry replies would show the backend: do not
        // translate at the socket (TC still can, for pods).
        return ALLOW;
    }
    // SAFETY: writing the fields the hook lets us rewrite.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(baddr);
        (*sa).user_port = u32::from(backend.port.to_be());
    }
    count(if hook == Hook::Connect { Stat::SockConnect } else { Stat::SockSendmsg });
    ALLOW
}

/// recvmsg4 / getpeername4: a backend address this socket was sent to is
/// shown as the Service address it asked for.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of the context we were handed, and a helper.
    let (ip, port, cookie) = unsafe { ((*sa).user_ip4, (*sa).user_port, bpf_get_socket_cookie(sa.cast())) };
    let rkey = SockRevKey { cookie, addr: v4_mapped(ip.to_ne_bytes()), port: u16::from_be(port as u16), _pad: [0; 6] };
    // SAFETY: copied out at once.
    let Some(r) = (unsafe { SOCK_REV.get(&rkey) }).copied() else { return ALLOW };
    let Some(vip) = v4_of_mapped(&r.addr) else { return ALLOW };
    // SAFETY: writing the fields the hook lets us rewrite.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(vip);
        (*sa).user_port = u32::from(r.port.to_be());
    }
    count(Stat::SockRevNat);
    ALLOW
}
