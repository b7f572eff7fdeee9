//! An L3 device (a tun interface, no Ethernet header, like WireGuard or
//! IPIP) in a namespace, with the test playing the far end: it writes IPv4
//! packets into the node and reads what the node sends out.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// A tun interface; removed when dropped.
pub struct Tun {
    file: File,
    pub name: String,
}

impl Tun {
    /// Creates tun interface `name` in `ns` with `addr/24`, up.
    pub fn create(ns: &crate::Netns, name: &str, addr: Ipv4Addr) -> anyhow::Result<Self> {
        let file = ns.run(|| -> anyhow::Result<File> {
            let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
            let mut req = [0u8; 40];
            req[..name.len()].copy_from_slice(name.as_bytes());
            req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
            // SAFETY: TUNSETIFF with an ifreq-sized buffer.
            if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } != 0 {
                bail!("TUNSETIFF: {}", std::io::Error::last_os_error());
            }
            Ok(f)
        })?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", name])?;
        ns.ip(&["link", "set", name, "up"])?;
        // SAFETY: fcntl on our own fd.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Self { file, name: name.to_owned() })
    }

    /// Sends an IPv4 packet into the node (as if it arrived on the device).
    pub fn send(&mut self, packet: &[u8]) -> anyhow::Result<()> {
        self.file.write_all(packet).context("writing to the tun device")
    }

    /// The next packet the node sends out of the device that `accept`s,
    /// within `timeout`.
    pub fn recv_matching(&mut self, timeout: Duration, accept: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            match self.file.read(&mut buf) {
                Ok(n) if accept(&buf[..n]) => return Some(buf[..n].to_vec()),
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    }
}

/// One's-complement checksum over `data`, starting from `init`.
#[must_use]
pub fn checksum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IPv4/UDP packet with correct checksums.
#[must_use]
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p, 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(udp_len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = 0u32;
    for c in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    pseudo += 17 + udp_len as u32;
    let c = checksum(&u, pseudo);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&u);
    p
}
