//! The real TC program run on crafted frames with BPF_PROG_TEST_RUN: output
//! bytes, checksums and verdicts, without attaching anything.
use std::net::{IpAddr, Ipv4Addr};

use proxy_agent::{
    datapath::{self, Datapath, DatapathConfig, PinnedMaps},
    sync::SyncEngine,
    translate::{BackendAddr, Desired, Frontend, FrontendAddr, FrontendKind, Proto, Scope},
};
use proxy_testkit::{require_root, unique_prefix};

/// TC_ACT_UNSPEC: "continue with the next program" (tcx's TCX_NEXT).
const TC_ACT_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const CLIENT: [u8; 4] = [10, 200, 0, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 11];
const BACKEND: [u8; 4] = [10, 200, 100, 2];

struct Fixture {
    dp: Datapath,
    cfg: DatapathConfig,
    _pins: PinGuard,
}

/// Removes the pins of a load that failed half-way (a verifier rejection
/// after the maps were pinned) too.
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = datapath::cleanup(&self.0);
    }
}

fn fixture() -> Fixture {
    require_root();
    let cfg = DatapathConfig { pin_dir_name: unique_prefix("t"), max_conntrack: 4096, ..Default::default() };
    let pins = PinGuard(cfg.pin_dir());
    let dp = Datapath::load(&cfg).expect("load");
    let mut engine = SyncEngine::adopt(PinnedMaps::open(&cfg.pin_dir()).unwrap()).unwrap();
    let mut d = Desired::default();
    for (vip, port, proto, backends) in [
        (VIP, 80, Proto::Tcp, vec![BackendAddr { ip: ip(BACKEND), port: 8080, local: true }]),
        (VIP, 53, Proto::Udp, vec![BackendAddr { ip: ip(BACKEND), port: 5353, local: true }]),
        (EMPTY_VIP, 80, Proto::Tcp, vec![]),
    ] {
        let addr = FrontendAddr { ip: ip(vip), port, proto, scope: Scope::External };
        d.frontends.insert(addr, Frontend { addr, kind: FrontendKind::ClusterIp, owner: "t".into(), backends, list: Default::default(), affinity_timeout_s: None, drop_when_empty: false, two_scopes: false, source_ranges: None });
        d.vips.insert(ip(vip), proxy_common::VIP_F_CLUSTER_IP);
    }
    let r = engine.sync(&d);
    assert!(r.failed.is_empty());
    Fixture { dp, cfg, _pins: pins }
}

fn ip(o: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(o))
}

use proxy_testkit::tun::checksum as csum;

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    let mut s = 0u32;
    for c in p.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s
}

/// Ethernet + IPv4 + TCP/UDP frame with correct checksums.
fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, frag: u16, udp_zero_csum: bool) -> Vec<u8> {
    frame_flags(src, dst, proto, sport, dport, frag, udp_zero_csum, 0x02)
}

/// Like [`frame`], with explicit TCP flags.
#[expect(clippy::too_many_arguments, reason = "a packet builder: every field is a knob")]
fn frame_flags(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, frag: u16, udp_zero_csum: bool, tcp_flags: u8) -> Vec<u8> {
    let payload = b"ping";
    let l4_len = if proto == 6 { 20 } else { 8 } + payload.len();
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    iph.extend_from_slice(&[0x12, 0x34]);
    iph.extend_from_slice(&frag.to_be_bytes());
    iph.extend_from_slice(&[64, proto, 0, 0]);
    iph.extend_from_slice(&src);
    iph.extend_from_slice(&dst);
    let c = csum(&iph, 0);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let coff = if proto == 6 { 16 } else { 6 };
    if !(proto == 17 && udp_zero_csum) {
        let c = csum(&l4, pseudo(&src, &dst, proto, l4_len));
        l4[coff..coff + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&iph);
    f.extend_from_slice(&l4);
    f
}

struct Parsed {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

/// Checks every checksum of an output frame and returns its addresses.
fn check(f: &[u8]) -> Parsed {
    let ip = &f[14..34];
    assert_eq!(csum(ip, 0), 0, "IPv4 header checksum");
    let proto = ip[9];
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &f[34..14 + tot];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let zero_udp = proto == 17 && l4[6] == 0 && l4[7] == 0;
    if !zero_udp {
        assert_eq!(csum(l4, pseudo(&src, &dst, proto, l4.len())), 0, "L4 checksum (proto {proto})");
    }
    Parsed { src, dst, sport: u16::from_be_bytes([l4[0], l4[1]]), dport: u16::from_be_bytes([l4[2], l4[3]]) }
}

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;

#[test]
fn tcp_dnat_and_reply_rewrite_keep_checksums() {
    let mut fx = fixture();
    let (v, out, _) = fx.dp.test_run(&frame(CLIENT, VIP, 6, 40000, 80, 0x4000, false), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT, "translated packets continue to the next program and the stack");
    let p = check(&out);
    assert_eq!((p.src, p.sport, p.dst, p.dport), (CLIENT, 40000, BACKEND, 8080), "DNAT to the backend");

    // The backend's reply crosses the node's stack as backend -> client and
    // is rewritten back to VIP:80 at egress toward the client.
    let reply = frame_flags(BACKEND, CLIENT, 6, 8080, 40000, 0x4000, false, SYN_ACK);
    let (v, out, _) = fx.dp.test_run_program(proxy_common::PROG_TC_EGRESS, &reply, 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    let p = check(&out);
    assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 80, CLIENT, 40000), "reverse NAT");
    // Ingress leaves a reply alone (it is not addressed to a Service).
    let (v, out, _) = fx.dp.test_run(&reply, 1).unwrap();
    assert_eq!((v, out), (TC_ACT_NEXT, reply), "no reverse NAT before the stack");

    let ct = datapath::conntrack_entries(&fx.cfg.pin_dir()).unwrap();
    assert_eq!(ct.len(), 2, "one forward and one reply entry");
}

#[test]
fn a_direct_connection_reusing_a_service_flows_tuple_is_left_alone() {
    let mut fx = fixture();
    let (v, out, _) = fx.dp.test_run(&frame(CLIENT, VIP, 6, 40100, 80, 0x4000, false), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    // The same translated SYN meets a second ingress hook of ours (a bridge
    // and its ports both attached): that is the live flow's own packet.
    let (v, again, _) = fx.dp.test_run(&out, 1).unwrap();
    assert_eq!((v, &again), (TC_ACT_NEXT, &out), "passes untouched");
    assert_eq!(datapath::conntrack_entries(&fx.cfg.pin_dir()).unwrap().len(), 2, "the live flow keeps its entries");
    // The Service flow ends: FIN from the client, FIN from the backend.
    const FIN_ACK: u8 = 0x11;
    fx.dp.test_run(&frame_flags(CLIENT, VIP, 6, 40100, 80, 0x4000, false, FIN_ACK), 1).unwrap();
    let (_, out, _) = fx.dp
        .test_run_program(proxy_common::PROG_TC_EGRESS, &frame_flags(BACKEND, CLIENT, 6, 8080, 40100, 0x4000, false, FIN_ACK), 1)
        .unwrap();
    assert_eq!(check(&out).src, VIP, "the FIN of the reply is still translated");
    // The client now opens CLIENT:40100 -> BACKEND:8080 directly (a
    // headless Service, a metrics scraper): the SYN evicts the finished
    // flow's entries, and the SYN-ACK keeps the backend's address.
    let direct = frame_flags(CLIENT, BACKEND, 6, 40100, 8080, 0x4000, false, SYN);
    let (v, out, _) = fx.dp.test_run(&direct, 1).unwrap();
    assert_eq!((v, out), (TC_ACT_NEXT, direct.clone()), "the direct SYN passes untouched");
    let synack = frame_flags(BACKEND, CLIENT, 6, 8080, 40100, 0x4000, false, SYN_ACK);
    let (v, out, _) = fx.dp.test_run_program(proxy_common::PROG_TC_EGRESS, &synack, 1).unwrap();
    assert_eq!((v, out), (TC_ACT_NEXT, synack.clone()), "the direct flow's SYN-ACK is not rewritten to the VIP");
    let stats = datapath::read_stats(&fx.cfg.pin_dir()).unwrap();
    assert_eq!(stats.iter().find(|(s, _)| *s == proxy_common::Stat::StaleReplyEvicted).unwrap().1, 1);

    // A SYN-ACK answering a SYN we never translated is not ours either: a
    // flow created mid-stream (no SYN seen) does not adopt it.
    let mid = frame_flags(CLIENT, VIP, 6, 40200, 80, 0x4000, false, 0x10);
    let (v, _, _) = fx.dp.test_run(&mid, 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    let stray = frame_flags(BACKEND, CLIENT, 6, 8080, 40200, 0x4000, false, SYN_ACK);
    let (_, out, _) = fx.dp.test_run_program(proxy_common::PROG_TC_EGRESS, &stray, 1).unwrap();
    assert_eq!(out, stray, "a SYN-ACK without a translated SYN is left alone");
    let ack = frame_flags(BACKEND, CLIENT, 6, 8080, 40200, 0x4000, false, 0x10);
    let (_, out, _) = fx.dp.test_run_program(proxy_common::PROG_TC_EGRESS, &ack, 1).unwrap();
    assert_eq!(check(&out).src, VIP, "an ordinary reply of that flow is translated");
}

#[test]
fn a_half_open_flow_keeps_the_syn_lifetime() {
    use proxy_common::{CT_F_ESTABLISHED, CT_F_REPLY, CT_F_SEEN_REPLY, CT_LIFETIME_TCP_NS, CT_LIFETIME_TCP_SYN_NS, ct_lifetime_ns};
    let mut fx = fixture();
    let forward = |fx: &Fixture, sport: u16| {
        datapath::conntrack_entries(&fx.cfg.pin_dir()).unwrap().into_iter().find(|(k, v)| k.sport == sport && v.flags & CT_F_REPLY == 0).unwrap().1
    };
    fx.dp.test_run(&frame_flags(CLIENT, VIP, 6, 40300, 80, 0x4000, false, SYN), 1).unwrap();
    fx.dp.test_run_program(proxy_common::PROG_TC_EGRESS, &frame_flags(BACKEND, CLIENT, 6, 8080, 40300, 0x4000, false, SYN_ACK), 1).unwrap();
    let f = forward(&fx, 40300);
    assert!(f.flags & CT_F_SEEN_REPLY != 0 && f.flags & CT_F_ESTABLISHED == 0);
    assert_eq!(ct_lifetime_ns(6, f.flags), CT_LIFETIME_TCP_SYN_NS, "answered but never acknowledged: a SYN's lifetime");
    fx.dp.test_run(&frame_flags(CLIENT, VIP, 6, 40300, 80, 0x4000, false, 0x10), 1).unwrap();
    let f = forward(&fx, 40300);
    assert_eq!(ct_lifetime_ns(6, f.flags), CT_LIFETIME_TCP_NS, "the client's ACK establishes it");
}

#[test]
fn udp_checksums_and_zero_checksum() {
    let mut fx = fixture();
    let (v, out, _) = fx.dp.test_run(&frame(CLIENT, VIP, 17, 40001, 53, 0, false), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    let p = check(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 5353));
    assert_ne!(&out[40..42], &[0, 0], "a real UDP checksum stays non-zero");

    let (v, out, _) = fx.dp.test_run(&frame(CLIENT, VIP, 17, 40002, 53, 0, true), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    let p = check(&out);
    assert_eq!((p.dst, p.dport), (BACKEND, 5353));
    assert_eq!(&out[40..42], &[0, 0], "UDP without checksum stays without");
}

#[test]
fn fragments_follow_their_first_fragment_or_are_dropped() {
    let mut fx = fixture();
    // First fragment (MF set, offset 0): translated, ports recorded.
    let first = frame(CLIENT, VIP, 17, 40003, 53, 0x2000, false);
    let (v, out, _) = fx.dp.test_run(&first, 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    assert_eq!(&out[30..34], &BACKEND, "first fragment DNATed");
    // A later fragment of the same datagram (same id): destination only.
    let later = frame(CLIENT, VIP, 17, 40003, 53, 0x0010, false);
    let (v, out, _) = fx.dp.test_run(&later, 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    assert_eq!(&out[30..34], &BACKEND, "later fragment DNATed");
    assert_eq!(csum(&out[14..34], 0), 0, "IPv4 checksum of the later fragment");
    assert_eq!(&out[34..], &later[34..], "a later fragment's payload is not touched");
    // A later fragment of a datagram whose first fragment was not seen.
    let mut orphan = frame(CLIENT, VIP, 17, 40004, 53, 0x0010, false);
    orphan[18..20].copy_from_slice(&[0x99, 0x99]); // another IP id
    let c = csum(&{ let mut h = orphan[14..34].to_vec(); h[10] = 0; h[11] = 0; h }, 0);
    orphan[24..26].copy_from_slice(&c.to_be_bytes());
    let (v, _, _) = fx.dp.test_run(&orphan, 1).unwrap();
    assert_eq!(v, TC_ACT_SHOT, "never leaked untranslated");
    let stats = datapath::read_stats(&fx.cfg.pin_dir()).unwrap();
    let get = |st| stats.iter().find(|(s, _)| *s == st).unwrap().1;
    assert_eq!(get(proxy_common::Stat::DropFragment), 1);
}

#[test]
fn packets_we_do_not_own_pass_untouched() {
    let mut fx = fixture();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("other destination", frame(CLIENT, [10, 200, 100, 2], 6, 40000, 8080, 0, false)),
        ("later fragment to another address", frame(CLIENT, [10, 200, 100, 2], 17, 40000, 53, 0x0010, false)),
    ];
    let mut icmp = frame(CLIENT, [10, 200, 100, 2], 17, 40000, 53, 0, false);
    icmp[23] = 1;
    cases.push(("ICMP", icmp));
    let mut arp = frame(CLIENT, VIP, 6, 40000, 80, 0, false);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("ARP", arp));
    let short = frame(CLIENT, VIP, 6, 40000, 80, 0, false)[..36].to_vec();
    cases.push(("truncated L4 header", short));
    let mut ipv6 = frame(CLIENT, VIP, 6, 40000, 80, 0, false);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    cases.push(("IPv6 ethertype", ipv6));
    let mut vlan = frame(CLIENT, VIP, 6, 40000, 80, 0, false);
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    cases.push(("VLAN-tagged frame", vlan));
    for (name, pkt) in cases {
        let (v, out, _) = fx.dp.test_run(&pkt, 1).unwrap();
        assert_eq!(v, TC_ACT_NEXT, "{name}: verdict");
        assert_eq!(out, pkt, "{name}: bytes untouched");
    }
}

fn assert_port_unreachable(out: &[u8], orig: &[u8], from: [u8; 4]) {
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(&out[0..6], &orig[6..12], "to the client's MAC");
    let ip = &out[14..34];
    assert_eq!(csum(ip, 0), 0, "IPv4 checksum");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!((&ip[12..16], &ip[16..20]), (&from[..], &CLIENT[..]));
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
    assert_eq!(csum(icmp, 0), 0, "ICMP checksum");
    assert_eq!(&icmp[8..36], &orig[14..42], "quotes the original header and 8 bytes");
}

#[test]
fn service_without_backends_answers_icmp_port_unreachable() {
    let mut fx = fixture();
    let syn = frame(CLIENT, EMPTY_VIP, 6, 40000, 80, 0x4000, false);
    let (v, out, _) = fx.dp.test_run(&syn, 1).unwrap();
    assert_eq!(v, TC_ACT_REDIRECT, "sent back out of the ingress interface");
    assert_port_unreachable(&out, &syn, EMPTY_VIP);
}

#[test]
fn a_cluster_ip_refuses_ports_it_does_not_serve() {
    let mut fx = fixture();
    for (proto, port) in [(6u8, 81u16), (17, 80)] {
        let pkt = frame(CLIENT, VIP, proto, 40000, port, 0x4000, false);
        let (v, out, _) = fx.dp.test_run(&pkt, 1).unwrap();
        assert_eq!(v, TC_ACT_REDIRECT, "proto {proto} port {port}: refused");
        assert_port_unreachable(&out, &pkt, VIP);
    }
    let stats = datapath::read_stats(&fx.cfg.pin_dir()).unwrap();
    assert_eq!(stats.iter().find(|(s, _)| *s == proxy_common::Stat::RejectUnknownPort).unwrap().1, 2);
}

#[test]
fn the_collector_removes_expired_flows_orphans_and_flows_whose_backend_left() {
    use proxy_common::{CT_F_REPLY, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP, v4_mapped};
    let mut fx = fixture();
    // A live TCP flow, made by the datapath itself.
    let (v, _, _) = fx.dp.test_run(&frame(CLIENT, VIP, 6, 41000, 80, 0x4000, false), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    // A live UDP flow whose backend is still a member.
    let (v, _, _) = fx.dp.test_run(&frame(CLIENT, VIP, 17, 41001, 53, 0, false), 1).unwrap();
    assert_eq!(v, TC_ACT_NEXT);
    let mut ct = datapath::Conntrack::open(&fx.cfg.pin_dir()).unwrap();
    let live_udp = ct.entries().into_iter().find(|(k, v)| k.proto == IPPROTO_UDP && v.flags & CT_F_REPLY == 0).unwrap();
    let now = datapath::monotonic_ns();
    let key = |sport: u16, proto: u8| CtKey {
        saddr: v4_mapped(CLIENT),
        daddr: v4_mapped(VIP),
        sport,
        dport: 80,
        proto,
        _pad: [0; 3],
    };
    // A TCP flow that never got past its SYN, idle past that state's
    // lifetime, with its reply entry (the machine has been up for longer).
    assert!(now > proxy_common::CT_LIFETIME_TCP_SYN_NS + 2_000_000_000, "uptime too short for this test");
    let old = CtValue {
        nat_addr: v4_mapped(BACKEND),
        nat_port: 8080,
        flags: 0,
        backend_id: live_udp.1.backend_id,
        last_seen_ns: now - proxy_common::CT_LIFETIME_TCP_SYN_NS - 1_000_000_000,
        svc_id: live_udp.1.svc_id,
        ..Default::default()
    };
    ct.insert(key(42000, IPPROTO_TCP), old).unwrap();
    let reply_key = CtKey { saddr: v4_mapped(BACKEND), daddr: v4_mapped(CLIENT), sport: 8080, dport: 42000, proto: IPPROTO_TCP, _pad: [0; 3] };
    ct.insert(reply_key, CtValue { nat_addr: v4_mapped(VIP), nat_port: 80, flags: CT_F_REPLY, ..old }).unwrap();
    // A reply entry whose forward entry is gone (older than the grace time).
    let orphan = CtKey { dport: 42001, ..reply_key };
    ct.insert(orphan, CtValue { nat_addr: v4_mapped(VIP), nat_port: 80, flags: CT_F_REPLY, last_seen_ns: now - 10_000_000_000, ..old }).unwrap();
    // A UDP flow of a backend that is no frontend's member any more.
    let left = CtValue { last_seen_ns: now, backend_id: 999_999, ..live_udp.1 };
    ct.insert(key(42002, IPPROTO_UDP), left).unwrap();

    let r = ct.collect(datapath::monotonic_ns());
    assert_eq!((r.expired, r.orphans, r.left_backend), (1, 1, 1), "{r:?}");
    assert_eq!((r.tcp_entries, r.other_entries), (2, 2), "the live flows stay: {r:?}");
    let keys: Vec<CtKey> = ct.entries().into_iter().map(|(k, _)| k).collect();
    assert!(!keys.contains(&key(42000, IPPROTO_TCP)) && !keys.contains(&reply_key) && !keys.contains(&orphan));
    assert!(keys.contains(&live_udp.0));
}
