//! Build, test, demo and bench orchestration. `cargo xtask --help`.
mod bootstrap;
mod chart;
mod demo;
mod image;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "kproxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs: nightly rust-src, bpf-linker (built
    /// against the nightly's own LLVM, cached outside the clone), bpftool.
    Bootstrap,
    /// Build the agent (with the embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test, privileged ones included (needs root).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Demo: namespaces, three backends, the agent in standalone mode on
    /// examples/demo, requests to the ClusterIP, a map dump, teardown.
    Demo,
    /// Regenerate deploy/install.yaml from the chart (helm template).
    Manifests,
    /// Write an OCI image archive of the agent (stripped release build,
    /// bpftool, their shared libraries) from files on this machine, for
    /// `kind load image-archive`, `podman load`, `docker load`, `ctr images import`.
    Image {
        /// Where to write it (default: $CARGO_TARGET_DIR/image/kproxy-image.tar).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Image name and tag.
        #[arg(long, default_value = "kproxy:dev")]
        tag: String,
    },
    /// Benchmark ebpf against direct, iptables and nftables (needs root).
    Bench {
        /// Up to 10,000 Services, shorter runs (under 5 minutes).
        #[arg(long)]
        quick: bool,
        /// One small Service count, a few seconds (CI).
        #[arg(long)]
        smoke: bool,
    },
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Runs `cargo` with the bootstrap's PATH, in the workspace root.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .env("PATH", bootstrap::path_with_linker()?)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, BPF); run it as root, e.g. `sudo -E cargo xtask {what}`");
    }
    Ok(())
}

fn bench(quick: bool, smoke: bool) -> anyhow::Result<()> {
    bootstrap::ensure_bench_tools()?;
    cargo(&["build", "--release", "-p", "proxy-agent", "-p", "proxy-bench"])?;
    let mut cmd = Command::new(target_dir().join("release/proxy-bench"));
    cmd.arg("--root").arg(root());
    if quick {
        cmd.arg("--quick");
    }
    if smoke {
        cmd.arg("--smoke");
    }
    let st = cmd.status().context("running proxy-bench")?;
    if !st.success() {
        bail!("benchmark failed ({st})");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Bootstrap => bootstrap::run(),
        Cmd::Build { release } => {
            bootstrap::run()?;
            let mut args = vec!["build", "-p", "proxy-agent"];
            if release {
                args.push("--release");
            }
            cargo(&args)
        }
        Cmd::Test { args } => {
            require_root("test")?;
            bootstrap::run()?;
            // The real-node tests load netfilter rules (ct-invalid drop, masquerade).
            bootstrap::ensure_bench_tools()?;
            let mut a: Vec<&str> = vec!["test", "--workspace", "--exclude", "proxy-ebpf"];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)?;
            if args.is_empty() {
                eprintln!("== chart checks");
                chart::check()?;
                // The benchmark must not rot: one small run, a few seconds.
                eprintln!("== benchmark smoke run");
                bench(false, true)?;
                // Reuses the smoke run's release build; verifies what it writes.
                eprintln!("== image archive");
                image::build(None, "kproxy:dev")?;
            }
            Ok(())
        }
        Cmd::Bench { quick, smoke } => {
            require_root("bench")?;
            bootstrap::run()?;
            bench(quick, smoke)
        }
        Cmd::Manifests => chart::write_manifests(),
        Cmd::Image { output, tag } => {
            bootstrap::run()?;
            image::build(output, &tag).map(drop)
        }
        Cmd::Demo => {
            require_root("demo")?;
            bootstrap::run()?;
            cargo(&["build", "--release", "-p", "proxy-agent"])?;
            demo::run()
        }
    }
}
