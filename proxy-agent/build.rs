//! Builds the eBPF object (proxy-ebpf) with the nightly toolchain and
//! bpf-linker, and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! bpf-linker is looked up on PATH, then in the cache `cargo xtask bootstrap`
//! fills (`$XDG_CACHE_HOME/kproxy/bpf-linker/<llvm>/bin`), so a plain
//! `cargo build -p proxy-agent` works once the bootstrap has run.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=KPROXY_BPF_LINKER_DIR");
    let linker_dir = find_bpf_linker()?;
    if let Some(dir) = linker_dir {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir];
        dirs.extend(env::split_paths(&path));
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    }
    let ebpf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package { name: "proxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        Toolchain::Nightly,
    )
    .context("building the eBPF object failed; run `cargo xtask bootstrap` to install the toolchain it needs")
}

/// Directory holding bpf-linker when it is not already on PATH.
fn find_bpf_linker() -> anyhow::Result<Option<PathBuf>> {
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if on_path {
        return Ok(None);
    }
    if let Some(dir) = env::var_os("KPROXY_BPF_LINKER_DIR") {
        return Ok(Some(PathBuf::from(dir)));
    }
    let key = llvm_key()?;
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set"))?;
    let dir = cache.join("kproxy/bpf-linker").join(&key).join("bin");
    if dir.join("bpf-linker").is_file() {
        println!("cargo:rerun-if-changed={}", dir.join("bpf-linker").display());
        Ok(Some(dir))
    } else {
        Err(anyhow!(
            "bpf-linker not found on PATH nor in {}; run `cargo xtask bootstrap` first",
            dir.display()
        ))
    }
}

/// The nightly's LLVM library suffix, e.g. `22.1-rust-1.97.0-nightly`.
fn llvm_key() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .context("running `rustc +nightly --print sysroot`; install the nightly toolchain with `rustup toolchain install nightly`")?;
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    for entry in std::fs::read_dir(sysroot.join("lib")).context("reading nightly sysroot lib/")? {
        let name = entry?.file_name();
        if let Some(key) = name.to_str().and_then(|n| n.strip_prefix("libLLVM.so.")) {
            return Ok(key.to_owned());
        }
    }
    Err(anyhow!("no libLLVM.so.* in the nightly sysroot {}", sysroot.display()))
}
