//! "Another CNI's program" for chaining tests: a two-instruction TC program
//! (`r0 = TC_ACT_UNSPEC; exit`) loaded and attached with raw bpf(2) calls,
//! so a test can put it before or after ours on a tcx hook, or attach it as
//! a legacy clsact filter, and read how often it ran.
use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: bpf(2) with a zero-initialised attribute buffer of its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as i32) }
}

fn put_u32(attr: &mut [u8; 128], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A loaded, pinned foreign TC program that lets every packet continue.
pub struct ForeignProgram {
    fd: OwnedFd,
    pub pin: PathBuf,
}

/// Which tcx hook, and where in its chain.
#[derive(Clone, Copy, Debug)]
pub enum Position {
    /// Appended after the programs already there.
    Last,
    /// Before every program already there.
    First,
}

/// A tcx link of a [`ForeignProgram`]; detached on drop.
pub struct ForeignLink {
    _fd: OwnedFd,
}

impl ForeignProgram {
    /// Loads the program and pins it at `pin` (on a bpffs).
    pub fn load(pin: &Path) -> anyhow::Result<Self> {
        // mov64 r0, -1 ; exit
        let insns: [u8; 16] = [0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = CString::new("GPL")?;
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
        put_u32(&mut attr, 4, 2);
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the foreign TC program")?;
        // SAFETY: a new fd the kernel just returned.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
        let mut attr = [0u8; 128];
        put_u64(&mut attr, 0, path.as_ptr() as u64);
        put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
        bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning {}", pin.display()))?;
        Ok(Self { fd, pin: pin.to_owned() })
    }

    /// Attaches to interface `ifindex` of the calling thread's network
    /// namespace with tcx.
    pub fn attach_tcx(&self, ifindex: u32, ingress: bool, pos: Position) -> anyhow::Result<ForeignLink> {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put_u32(&mut attr, 4, ifindex);
        put_u32(&mut attr, 8, if ingress { BPF_TCX_INGRESS } else { BPF_TCX_EGRESS });
        put_u32(&mut attr, 12, match pos {
            Position::Last => 0,
            Position::First => BPF_F_BEFORE,
        });
        let fd = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the foreign program with tcx")?;
        // SAFETY: a new fd the kernel just returned.
        Ok(ForeignLink { _fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }
}

impl Drop for ForeignProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// Attaches `prog` as a legacy clsact filter (`tc filter ... bpf da`) on
/// `dev` in `ns`, at ingress or egress.
pub fn attach_legacy(ns: &crate::Netns, dev: &str, ingress: bool, prog: &ForeignProgram) -> anyhow::Result<()> {
    // tc may say the qdisc exists already; the filter is what matters.
    let _ = ns.command("tc").args(["qdisc", "add", "dev", dev, "clsact"]).output();
    let out = ns
        .command("tc")
        .args(["filter", "add", "dev", dev, if ingress { "ingress" } else { "egress" }, "bpf", "da", "object-pinned"])
        .arg(&prog.pin)
        .output()
        .context("running tc")?;
    if !out.status.success() {
        bail!("tc filter add bpf on {dev}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
