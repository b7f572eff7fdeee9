//! Toolchain bootstrap for a fresh machine.
//!
//! bpf-linker has no prebuilt we can download, so it is built from crates.io
//! against the nightly toolchain's own LLVM (`libLLVM.so.<ver>-rust-<nightly>`
//! in the nightly sysroot), and cached in
//! `$XDG_CACHE_HOME/kproxy/bpf-linker/<llvm-key>/` so later builds and fresh
//! clones reuse it. proxy-agent's build.rs looks in the same place.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .with_context(|| format!("running {cmd} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    output("rustc", &["+nightly", "--print", "sysroot"]).map(PathBuf::from).context(
        "no nightly toolchain: install it with `rustup toolchain install nightly --component rust-src`",
    )
}

/// `libLLVM.so.<key>` in the nightly sysroot, e.g. key `22.1-rust-1.97.0-nightly`.
fn llvm_lib(sysroot: &Path) -> anyhow::Result<(String, PathBuf)> {
    for entry in std::fs::read_dir(sysroot.join("lib"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_prefix("libLLVM.so.") {
            return Ok((key.to_owned(), entry.path()));
        }
    }
    Err(anyhow!(
        "no libLLVM.so.* in {}/lib; reinstall the nightly toolchain (`rustup toolchain install nightly`)",
        sysroot.display()
    ))
}

pub fn cache_root() -> anyhow::Result<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("kproxy"))
        .ok_or_else(|| anyhow!("set HOME or XDG_CACHE_HOME for the toolchain cache"))
}

/// Directory that holds (or will hold) bpf-linker for the current nightly.
pub fn linker_dir() -> anyhow::Result<PathBuf> {
    let (key, _) = llvm_lib(&nightly_sysroot()?)?;
    Ok(cache_root()?.join("bpf-linker").join(key))
}

/// PATH with the cached bpf-linker in front.
pub fn path_with_linker() -> anyhow::Result<OsString> {
    let mut dirs = vec![linker_dir()?.join("bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    Ok(std::env::join_paths(dirs)?)
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"])
        .context("rustup is required (https://rustup.rs)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("bootstrap: adding rust-src to the nightly toolchain");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let (key, lib) = llvm_lib(&sysroot)?;
    let dir = cache_root()?.join("bpf-linker").join(&key);
    let bin = dir.join("bin/bpf-linker");
    if bin.is_file() {
        return Ok(());
    }
    let major = key.split('.').next().unwrap_or_default();
    if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
        bail!("cannot tell the LLVM major version from libLLVM.so.{key}");
    }
    eprintln!("bootstrap: building bpf-linker {BPF_LINKER_VERSION} against LLVM {key} into {}", dir.display());
    // LLVM_PREFIX/lib must hold libLLVM.so and the versioned name, both the
    // nightly's own library.
    let prefix = dir.join("llvm");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    let lib_name = lib.file_name().unwrap().to_owned();
    for name in [OsString::from("libLLVM.so"), lib_name] {
        let link = libdir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    let build_root = dir.join("build");
    status(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&dir)
            .env("LLVM_PREFIX", &prefix)
            .env("CARGO_TARGET_DIR", &build_root)
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("building bpf-linker failed")?;
    let _ = std::fs::remove_dir_all(&build_root);
    if !bin.is_file() {
        bail!("bpf-linker build finished but {} is missing", bin.display());
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

/// Runtime tools the tests and demo use.
fn ensure_tools() -> anyhow::Result<()> {
    ensure_packages(&[("ip", "iproute2"), ("nsenter", "util-linux"), ("bpftool", "bpftool")])
}

/// What the benchmark compares against: kube-proxy's rule loaders.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    ensure_packages(&[("iptables-restore", "iptables"), ("nft", "nftables")])
}

/// What `cargo xtask image` uses to split the debug info off.
pub fn ensure_image_tools() -> anyhow::Result<()> {
    ensure_packages(&[("objcopy", "binutils"), ("ldd", "libc-bin")])
}

fn ensure_packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for &(cmd, pkg) in tools {
        if !have(cmd) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && have("apt-get") {
        eprintln!("bootstrap: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        return Ok(());
    }
    bail!("missing tools; install the packages: {}", missing.join(" "))
}

pub fn run() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_tools()
}
