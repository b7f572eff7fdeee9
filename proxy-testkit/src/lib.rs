//! Network-namespace topologies, echo servers and clients for the project's
//! privileged tests, demo and benchmarks.
//!
//! Every topology lives in namespaces with no link to the host's interfaces:
//! a packet the datapath fails to translate dies inside. Everything created
//! is removed on drop, also when a test fails.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Fails loudly unless we can do privileged network work.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (network namespaces, BPF); run it as root, e.g. `sudo -E cargo xtask test`"
    );
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = run("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name])?;
        let file = File::open(format!("/run/netns/{name}")).context("opening netns")?;
        let ns = Self { name: name.to_owned(), file };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Turns transmit checksum offload off on `ifname` (`ethtool -K tx
    /// off`, by ioctl): the namespace then sends complete checksums, as
    /// frames from a wire have. A veth otherwise passes locally generated
    /// packets on with a partial checksum, which native XDP on the
    /// receiving side cannot tell (a NIC never hands it such frames).
    pub fn disable_tx_checksum(&self, ifname: &str) -> anyhow::Result<()> {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct Ifreq {
            name: [u8; 16],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        let name = ifname.as_bytes();
        if name.len() >= 16 {
            bail!("interface name {ifname:?} too long");
        }
        self.run(|| {
            let mut v = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: 0 };
            let mut req = Ifreq { name: [0; 16], data: &raw mut v, _pad: [0; 16] };
            req.name[..name.len()].copy_from_slice(name);
            // SAFETY: a datagram socket for the ioctl, closed below; the
            // request points at live locals.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    bail!("socket: {}", std::io::Error::last_os_error());
                }
                let r = libc::ioctl(fd, SIOCETHTOOL as _, &raw mut req);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if r != 0 {
                    bail!("ETHTOOL_STXCSUM on {ifname}: {err}");
                }
            }
            Ok(())
        })
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets
    /// created there stay in the namespace wherever they are used later.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.file.as_raw_fd();
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only, with an open netns fd.
                let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert!(r == 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Runs `program args...` in this namespace (see [`Netns::command`]),
    /// failing with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(program).args(args).output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!("{program} {} in {}: {}", args.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command that runs in this namespace (network only: the mount
    /// namespace, and so bpffs, stays the host's, unlike `ip netns exec`).
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A pod: a namespace with one veth to the node.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Interface name of this pod's veth on the node side.
    pub node_if: String,
    pub ns: Netns,
}

/// Client pods, backend pods and a node between them.
///
/// Pod i has `10.200.<subnet>.2/24`, the node side `10.200.<subnet>.1/24`;
/// clients use subnets 0.., backends 100... The node forwards between pods
/// and has no other route, so service VIPs are unroutable unless translated.
pub struct Topology {
    pub prefix: String,
    pub clients: Vec<Pod>,
    pub backends: Vec<Pod>,
    pub node: Netns,
    pub opts: TopoOptions,
}

/// Builds short unique namespace prefixes per process.
#[must_use]
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("kp{}-{}{}", tag, std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Real-node conditions a [`Topology`] can be built with.
#[derive(Clone, Copy, Debug, Default)]
pub struct TopoOptions {
    /// Strict reverse-path filtering on every interface of the node.
    pub rp_filter: bool,
    /// Pods as ports of a Linux bridge `br0` holding the node's address
    /// `10.200.0.1/24`, all pods in that one subnet (the reference bridge
    /// CNI and flannel wire pods this way), instead of routed veths.
    pub bridge: bool,
}

impl Topology {
    pub fn build(prefix: &str, clients: usize, backends: usize) -> anyhow::Result<Self> {
        Self::build_with(prefix, clients, backends, TopoOptions::default())
    }

    pub fn build_with(prefix: &str, clients: usize, backends: usize, opts: TopoOptions) -> anyhow::Result<Self> {
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let rp = if opts.rp_filter { "1" } else { "0" };
        node.sysctl("net.ipv4.conf.all.rp_filter", rp)?;
        node.sysctl("net.ipv4.conf.default.rp_filter", rp)?;
        if opts.bridge {
            node.ip(&["link", "add", "br0", "type", "bridge"])?;
            node.ip(&["addr", "add", "10.200.0.1/24", "dev", "br0"])?;
            node.ip(&["link", "set", "br0", "up"])?;
        }
        let mut topo =
            Topology { prefix: prefix.to_owned(), clients: Vec::new(), backends: Vec::new(), node, opts };
        for i in 0..clients {
            let pod = topo.add_pod(&format!("c{i}"), i as u8)?;
            topo.clients.push(pod);
        }
        for i in 0..backends {
            let pod = topo.add_pod(&format!("b{i}"), 100 + i as u8)?;
            topo.backends.push(pod);
        }
        Ok(topo)
    }

    /// Adds one pod namespace wired to the node: routed, pod `i` is
    /// `10.200.<i>.2/24` behind `10.200.<i>.1`; on a bridge, `10.200.0.<i+10>`
    /// for clients (i < 90) and `10.200.0.<i>` for backends (i >= 100).
    pub fn add_pod(&self, name: &str, subnet: u8) -> anyhow::Result<Pod> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let node_if = format!("veth{name}");
        self.wire_pod(&ns, &node_if, subnet)?;
        let ip = if self.opts.bridge {
            Ipv4Addr::new(10, 200, 0, if subnet >= 100 { subnet } else { subnet + 10 })
        } else {
            Ipv4Addr::new(10, 200, subnet, 2)
        };
        Ok(Pod { name: name.to_owned(), ip, node_if, ns })
    }

    /// (Re)creates the veth pair of a pod namespace (also after the node
    /// side was deleted: a pod recreated under the same interface name).
    pub fn wire_pod(&self, ns: &Netns, node_if: &str, subnet: u8) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "link", "add", node_if, "netns", &self.node.name, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.name,
            ],
        )?;
        let (ip, gw, plen) = if self.opts.bridge {
            let host = if subnet >= 100 { subnet } else { subnet + 10 };
            (Ipv4Addr::new(10, 200, 0, host), "10.200.0.1".to_owned(), 24)
        } else {
            (Ipv4Addr::new(10, 200, subnet, 2), format!("10.200.{subnet}.1"), 24)
        };
        if self.opts.bridge {
            self.node.ip(&["link", "set", node_if, "master", "br0"])?;
        } else {
            self.node.ip(&["addr", "add", &format!("{gw}/{plen}"), "dev", node_if])?;
        }
        self.node.ip(&["link", "set", node_if, "up"])?;
        let rp = if self.opts.rp_filter { "1" } else { "0" };
        self.node.sysctl(&format!("net.ipv4.conf.{node_if}.rp_filter"), rp)?;
        ns.ip(&["addr", "add", &format!("{ip}/{plen}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw])?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(())
    }

    /// Index of interface `name` in the node namespace.
    pub fn node_ifindex(&self, name: &str) -> anyhow::Result<u32> {
        let c = std::ffi::CString::new(name)?;
        // SAFETY: if_nametoindex with a valid C string, in the node's netns.
        let i = self.node.run(|| unsafe { libc::if_nametoindex(c.as_ptr()) });
        if i == 0 {
            bail!("no interface {name} in {}", self.node.name);
        }
        Ok(i)
    }
}

/// TCP and UDP echo server answering every request with `<name>\n`, on
/// its own single-threaded tokio runtime (cheap per connection, so it does
/// not limit connection-rate benchmarks).
pub struct EchoServer {
    pub name: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl EchoServer {
    /// Starts serving on `0.0.0.0:port` (TCP and UDP) inside `ns`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> anyhow::Result<Self> {
        let (tcp, udp) = ns.run(|| -> anyhow::Result<_> {
            let tcp = TcpListener::bind(("0.0.0.0", port)).context("bind tcp")?;
            let udp = UdpSocket::bind(("0.0.0.0", port)).context("bind udp")?;
            tcp.set_nonblocking(true)?;
            udp.set_nonblocking(true)?;
            Ok((tcp, udp))
        })?;
        // Keep the server on the last CPU, away from load generators pinned
        // to the first (see pin_to_cpu).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(|| pin_to_cpu(cpus().saturating_sub(1)))
            .build()?;
        let reply: Arc<Vec<u8>> = Arc::new(format!("{name}\n").into_bytes());
        {
            let reply = reply.clone();
            rt.spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let Ok(l) = tokio::net::TcpListener::from_std(tcp) else { return };
                while let Ok((mut conn, peer)) = l.accept().await {
                    let reply = reply.clone();
                    tokio::spawn(async move {
                        let _ = conn.set_nodelay(true);
                        let mut buf = [0u8; 2048];
                        loop {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let out = answer(&reply, &buf[..n], peer);
                                    if conn.write_all(&out).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                }
            });
        }
        rt.spawn(async move {
            let Ok(u) = tokio::net::UdpSocket::from_std(udp) else { return };
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = u.recv_from(&mut buf).await {
                let _ = u.send_to(&answer(&reply, &buf[..n], from), from).await;
            }
        });
        Ok(Self { name: name.to_owned(), rt: Some(rt) })
    }
}

/// The echo server's answer: its name, or to a request starting with
/// `peer?`, its name and the client address it saw (`b0 10.0.0.1:4242`).
fn answer(name: &[u8], req: &[u8], peer: SocketAddr) -> Vec<u8> {
    if req.starts_with(b"peer?") {
        let n = String::from_utf8_lossy(name);
        format!("{} {peer}\n", n.trim()).into_bytes()
    } else {
        name.to_vec()
    }
}

/// Asks the server behind `to` (TCP, new connection from `ns`) who it is
/// and whom it saw: (name, the client address the server saw).
pub fn tcp_who(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<(String, SocketAddr)> {
    let mut s = tcp_connect(ns, to, timeout)?;
    s.write_all(b"peer?\n")?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    parse_who(&buf[..n])
}

/// Like [`tcp_who`], over UDP (unconnected socket); also checks that the
/// answer came from `to` (the client sees the address it sent to).
pub fn udp_who(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<(String, SocketAddr)> {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"peer?", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf).with_context(|| format!("udp answer from {to}"))?;
    if from != SocketAddr::V4(to) {
        bail!("the answer came from {from}, not {to}");
    }
    parse_who(&buf[..n])
}

fn parse_who(b: &[u8]) -> anyhow::Result<(String, SocketAddr)> {
    let text = String::from_utf8_lossy(b);
    let mut it = text.split_whitespace();
    let (Some(name), Some(peer)) = (it.next(), it.next()) else { bail!("unexpected answer {text:?}") };
    Ok((name.to_owned(), peer.parse().with_context(|| format!("answer {text:?}"))?))
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

/// One TCP request/response on a new connection from `ns`. Returns the
/// answer (trimmed) and the peer address the client saw.
pub fn tcp_request(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<(String, SocketAddr)> {
    let mut s = tcp_connect(ns, to, timeout)?;
    let answer = tcp_exchange(&mut s)?;
    Ok((answer, s.peer_addr()?))
}

/// Opens a TCP connection from `ns`.
pub fn tcp_connect(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    let s = ns.run(|| TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One request/response on an open connection.
pub fn tcp_exchange(s: &mut TcpStream) -> anyhow::Result<String> {
    s.write_all(b"hello\n")?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    if n == 0 {
        bail!("connection closed by peer");
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// One UDP request from `ns` on an unconnected socket. Returns the answer
/// and the address it came from.
pub fn udp_request(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<(String, SocketAddr)> {
    let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"hello\n", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf).with_context(|| format!("udp answer from {to}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
}

/// One request on a connected UDP socket: the answer (trimmed). Panics on
/// a timeout (tests set one).
#[must_use]
pub fn udp_ask(sock: &UdpSocket) -> String {
    sock.send(b"q").expect("UDP send");
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("UDP answer");
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Number of online CPUs.
#[must_use]
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Pins the calling thread to `cpu` (no-op on a single-CPU machine).
pub fn pin_to_cpu(cpu: usize) {
    if cpus() < 2 {
        return;
    }
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// A TCP SYN frame (Ethernet/IPv4/TCP) for BPF_PROG_TEST_RUN.
#[must_use]
pub fn tcp_syn_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// `GET path` on `127.0.0.1:port` inside `ns`; the raw response, or an
/// empty string when nothing answers.
#[must_use]
pub fn http_get(ns: &Netns, port: u16, path: &str) -> String {
    ns.run(|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

/// What a [`RequestStream`] saw.
#[derive(Debug, Default)]
pub struct StreamResult {
    pub ok: u32,
    pub failed: u32,
    /// Successful answers by backend name.
    pub seen: std::collections::BTreeMap<String, u32>,
}

/// A bounded stream of one-request TCP connections from `ns` to `to`, on
/// its own thread, until stopped, `max` requests or 30 s.
pub struct RequestStream {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<StreamResult>>,
}

impl RequestStream {
    pub fn start(ns: &Netns, to: SocketAddrV4, max: u32) -> anyhow::Result<Self> {
        let ns_file = ns.file.try_clone()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            // SAFETY: setns on this thread only, with an open netns fd.
            assert_eq!(unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut r = StreamResult::default();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && r.ok + r.failed < max {
                let answer = (|| -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"x\n")?;
                    let mut buf = [0u8; 64];
                    let k = s.read(&mut buf)?;
                    Ok(String::from_utf8_lossy(&buf[..k]).trim().to_owned())
                })();
                match answer {
                    Ok(who) if !who.is_empty() => {
                        r.ok += 1;
                        *r.seen.entry(who).or_default() += 1;
                    }
                    _ => r.failed += 1,
                }
            }
            r
        });
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops the stream and returns what it saw.
    pub fn finish(mut self) -> StreamResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("request stream panicked")).unwrap_or_default()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub mod bpf;
pub mod tun;
pub mod two_node;

/// Opens a TCP connection from `ns` using local port `local_port`
/// (`SO_REUSEADDR`, so a port whose earlier connection is in TIME_WAIT
/// toward another destination can be used again).
pub fn tcp_connect_from(ns: &Netns, local_port: u16, to: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let s = ns.run(|| -> anyhow::Result<TcpStream> {
        // SAFETY: plain socket calls on a socket we own; the fd is handed to
        // TcpStream, which closes it.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4);
            let mut local: libc::sockaddr_in = std::mem::zeroed();
            local.sin_family = libc::AF_INET as libc::sa_family_t;
            local.sin_port = local_port.to_be();
            if libc::bind(fd, (&raw const local).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
                bail!("bind to port {local_port}: {}", std::io::Error::last_os_error());
            }
            let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as libc::suseconds_t };
            // A connect() on a blocking socket honours SO_SNDTIMEO.
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&raw const tv).cast(), std::mem::size_of::<libc::timeval>() as u32);
            let mut remote: libc::sockaddr_in = std::mem::zeroed();
            remote.sin_family = libc::AF_INET as libc::sa_family_t;
            remote.sin_port = to.port().to_be();
            remote.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
            if libc::connect(fd, (&raw const remote).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
                bail!("connect {to} from port {local_port}: {}", std::io::Error::last_os_error());
            }
            Ok(stream)
        }
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A child cgroup of the unified (v2) hierarchy that this whole process is
/// moved into, so socket programs attached to it see only this test
/// process's own sockets. Dropping it moves the process back and removes
/// the cgroup.
pub struct ChildCgroup {
    pub path: std::path::PathBuf,
    parent_procs: std::path::PathBuf,
}

impl ChildCgroup {
    /// Creates `<unified root>/<name>` and moves this process into it.
    pub fn enter(name: &str) -> anyhow::Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = mounts
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next() == Some("cgroup2")).then(|| left.split_whitespace().nth(4).map(str::to_owned))?
            })
            .context("no cgroup2 mount on this machine")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).context("not in a cgroup v2 hierarchy")?.trim().to_owned();
        let parent = std::path::Path::new(&root).join(rel.trim_start_matches('/'));
        let path = std::path::Path::new(&root).join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let me = std::process::id().to_string();
        if let Err(e) = std::fs::write(path.join("cgroup.procs"), &me) {
            let _ = std::fs::remove_dir(&path);
            bail!("moving this process into {}: {e}", path.display());
        }
        Ok(Self { path, parent_procs: parent.join("cgroup.procs") })
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        let _ = std::fs::write(&self.parent_procs, &me);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
