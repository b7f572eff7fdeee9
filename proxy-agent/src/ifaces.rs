//! Interfaces, from rtnetlink: a dump of the links at start and a watcher
//! subscribed to link events (RTMGRP_LINK), so an interface that appears,
//! or is recreated under the same name with a new index (Calico names veths
//! after the pod, so a recreated StatefulSet pod gets the same name), is
//! attached within milliseconds of its RTM_NEWLINK, and a vanished one's
//! pinned links are removed. Runs in the network namespace of the thread
//! that opens the socket.
use std::{thread, time::Duration};

use anyhow::{Context as _, bail};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkLayerType, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc::UnboundedSender;

use crate::datapath::{DeviceKind, Iface};

/// `RTMGRP_LINK`: the link event multicast group.
const RTMGRP_LINK: u32 = 1;

/// A link as netlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `None` for devices we do not attach to (loopback, unknown types).
    pub kind: Option<DeviceKind>,
}

impl Link {
    /// The interface to attach to, when its device type is supported.
    #[must_use]
    pub fn iface(&self) -> Option<Iface> {
        Some(Iface { index: self.index, name: self.name.clone(), kind: self.kind? })
    }
}

/// What the watcher reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Every link present now (at start, and again after a lost event).
    All(Vec<Link>),
    /// A link appeared or changed.
    New(Link),
    /// A link is gone.
    Gone { index: u32, name: String },
}

/// The program kind for a device type: Ethernet framing, or bare IP.
#[must_use]
pub fn kind_of(t: LinkLayerType) -> Option<DeviceKind> {
    match t {
        LinkLayerType::Ether => Some(DeviceKind::Ethernet),
        LinkLayerType::None
        | LinkLayerType::Tunnel
        | LinkLayerType::Tunnel6
        | LinkLayerType::Ipgre
        | LinkLayerType::Ip6gre
        | LinkLayerType::Sit => Some(DeviceKind::L3),
        _ => None,
    }
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Link { index: msg.header.index, name, kind: kind_of(msg.header.link_layer_type) })
}

fn send_dump_request(sock: &Socket) -> anyhow::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(LinkMessage::default())));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).context("sending RTM_GETLINK")?;
    Ok(())
}

/// What one datagram holds: the messages that parsed, and whether it ended
/// a dump (`NLMSG_DONE`, recognised from the raw header even when a message
/// of a kind we cannot parse came before it).
fn messages(buf: &[u8]) -> (Vec<NetlinkMessage<RouteNetlinkMessage>>, bool) {
    const NLMSG_DONE: u16 = 3;
    let mut out = Vec::new();
    let mut done = false;
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < 16 || off + len > buf.len() {
            break;
        }
        done |= kind == NLMSG_DONE;
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len]) {
            Ok(msg) => out.push(msg),
            Err(e) => tracing::debug!(error = %e, kind, "skipping a netlink message we cannot parse"),
        }
        off += (len + 3) & !3;
    }
    (out, done)
}

/// Every link in the calling thread's network namespace.
pub fn dump() -> anyhow::Result<Vec<Link>> {
    let mut sock = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    sock.bind_auto().context("binding the netlink socket")?;
    set_recv_timeout(&sock, 5);
    send_dump_request(&sock)?;
    let mut links = Vec::new();
    loop {
        let (buf, _) = sock.recv_from_full().context("reading the link dump (no answer within 5 s?)")?;
        let (msgs, done) = messages(&buf);
        for msg in msgs {
            match msg.payload {
                NetlinkPayload::Error(e) => bail!("link dump failed: {e:?}"),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => links.extend(link_of(&l)),
                _ => {}
            }
        }
        if done {
            return Ok(links);
        }
    }
}

fn set_recv_timeout(sock: &Socket, secs: i64) {
    let tv = libc::timeval { tv_sec: secs, tv_usec: 0 };
    // SAFETY: setsockopt with a valid timeval on our own socket.
    unsafe {
        use std::os::fd::AsRawFd as _;
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// Opens an event socket subscribed to link events.
fn event_socket() -> anyhow::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    sock.bind(&SocketAddr::new(0, RTMGRP_LINK)).context("subscribing to link events")?;
    let _ = sock.set_rx_buf_sz(4 << 20);
    // Wake up once a second, so the thread notices when the agent is done.
    set_recv_timeout(&sock, 1);
    Ok(sock)
}

/// Starts a thread that reports link events on `tx`, beginning with
/// [`LinkEvent::All`]. The socket is opened here, in the caller's network
/// namespace. When events are lost (the socket overflowed) the thread
/// re-subscribes and reports every link again; it ends when `tx` closes.
pub fn watch(tx: UnboundedSender<LinkEvent>) -> anyhow::Result<thread::JoinHandle<()>> {
    // Subscribe before the dump, so nothing falls between the two.
    let sock = event_socket()?;
    let all = dump()?;
    tx.send(LinkEvent::All(all)).ok();
    let netns = std::fs::File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    Ok(thread::Builder::new().name("kproxy-links".into()).spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on this thread only, with an open netns fd: the
        // thread re-subscribes in the same namespace after an overflow.
        unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        let mut sock = sock;
        loop {
            match sock.recv_from_full() {
                Ok((buf, _)) => {
                    for msg in messages(&buf).0 {
                        let ev = match msg.payload {
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => link_of(&l).map(LinkEvent::New),
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                                link_of(&l).map(|l| LinkEvent::Gone { index: l.index, name: l.name })
                            }
                            _ => None,
                        };
                        if let Some(ev) = ev
                            && tx.send(ev).is_err()
                        {
                            return;
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "link events lost; listing every link again");
                    thread::sleep(Duration::from_millis(100));
                    match event_socket().and_then(|s| Ok((s, dump()?))) {
                        Ok((s, all)) => {
                            sock = s;
                            if tx.send(LinkEvent::All(all)).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "re-subscribing to link events"),
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    })?)
}
