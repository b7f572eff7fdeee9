//! `cargo xtask image`: an OCI image archive of the agent without Docker.
//!
//! The archive is a tar holding an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/...`: a manifest, a config, one gzip'd layer)
//! plus a docker-save `manifest.json`, so `docker load`, `podman load`,
//! `kind load image-archive` and `ctr images import` all accept it. The layer
//! is built from files on this machine: the stripped release agent at
//! /usr/local/bin/proxy-agent, `/usr/sbin/bpftool` when present, and the
//! shared libraries both need (from `ldd`) at their paths. The debug info
//! is split off into target/release/proxy-agent.debug and kept.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{cargo, target_dir};

/// The stripped agent must stay under this size.
const MAX_AGENT_BYTES: u64 = 20 * 1024 * 1024;
const AGENT_PATH: &str = "usr/local/bin/proxy-agent";
const BPFTOOL: &str = "/usr/sbin/bpftool";

const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Absolute paths of the shared objects in `ldd` output (the loader
/// included; the vDSO and "not found" lines are not files).
///
/// # Errors
/// When a library is not found.
fn parse_ldd(out: &str) -> anyhow::Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("ldd: a library is missing: {line}; install it before building the image");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_owned());
        }
    }
    Ok(libs)
}

/// The shared libraries `bin` needs, or none for a static binary.
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd (install libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    parse_ldd(&text)
}

/// Splits the debug info off the release agent: the debug file beside it
/// (target/release/proxy-agent.debug, symbols included), the stripped
/// (`--strip-all`) copy under target/image/ with a debuglink to it.
/// Returns the stripped copy.
fn strip_agent(release: &Path) -> anyhow::Result<PathBuf> {
    let debug = release.with_extension("debug");
    let dir = target_dir().join("image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stripped = dir.join("proxy-agent");
    let (r, d, s) = (release.to_str().unwrap(), debug.to_str().unwrap(), stripped.to_str().unwrap());
    run("objcopy", &["--only-keep-debug", r, d]).context("install binutils for objcopy")?;
    run("objcopy", &["--strip-all", &format!("--add-gnu-debuglink={d}"), r, s])?;
    let size = std::fs::metadata(&stripped)?.len();
    eprintln!(
        "stripped agent: {size} bytes ({:.1} MB; release build {:.1} MB; debug info kept in {})",
        size as f64 / 1048576.0,
        std::fs::metadata(release)?.len() as f64 / 1048576.0,
        debug.display()
    );
    ensure!(size < MAX_AGENT_BYTES, "the stripped agent is {size} bytes, over the {MAX_AGENT_BYTES}-byte budget");
    Ok(stripped)
}

/// The layer's files: image path (no leading `/`) -> host file.
fn layer_files(agent: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    files.insert(AGENT_PATH.to_owned(), agent.to_owned());
    let mut bins = vec![agent.to_owned()];
    if Path::new(BPFTOOL).is_file() {
        files.insert(BPFTOOL.trim_start_matches('/').to_owned(), PathBuf::from(BPFTOOL));
        bins.push(PathBuf::from(BPFTOOL));
    } else {
        eprintln!("note: {BPFTOOL} is not on this machine; the image has no bpftool");
    }
    for b in &bins {
        for lib in shared_libs(b)? {
            // The content of the real file, at the path the loader asks for.
            let real = std::fs::canonicalize(&lib).with_context(|| format!("resolving {lib}"))?;
            files.insert(lib.trim_start_matches('/').to_owned(), real);
        }
    }
    Ok(files)
}

/// A tar of `files` with their parent directories, reproducible (mtime 0,
/// root-owned).
fn layer_tar(files: &BTreeMap<String, PathBuf>) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_owned());
            p = d.parent();
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, format!("{}/", d.display()), std::io::empty())?;
    }
    for (path, host) in files {
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data.as_slice())?;
    }
    Ok(b.into_inner()?)
}

fn add_file(b: &mut tar::Builder<std::fs::File>, path: &str, data: &[u8]) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    b.append_data(&mut h, path, data)?;
    Ok(())
}

/// Writes the archive for an image `name:tag` whose layer is `layer` (an
/// uncompressed tar).
fn write_archive(out: &Path, tag: &str, layer: &[u8]) -> anyhow::Result<()> {
    let diff_id = sha256_hex(layer);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(layer)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha256_hex(&layer_gz);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [format!("/{AGENT_PATH}")],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" }],
    }))?;
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": { "mediaType": MT_CONFIG, "digest": format!("sha256:{config_digest}"), "size": config.len() },
        "layers": [{ "mediaType": MT_LAYER, "digest": format!("sha256:{layer_digest}"), "size": layer_gz.len() }],
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    // `host:5000/kproxy` has no tag: a `:` before the last `/` is a port.
    let (repo, version) = tag.rsplit_once(':').filter(|(_, t)| !t.contains('/')).unwrap_or((tag, "latest"));
    let tag = &format!("{repo}:{version}");
    // containerd wants a full reference; docker.io/library/ is what `kproxy` means.
    let full = if repo.contains('/') { tag.to_owned() } else { format!("docker.io/library/{repo}:{version}") };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "io.containerd.image.name": full, "org.opencontainers.image.ref.name": version },
        }],
    }))?;
    let docker = serde_json::to_vec(&json!([{
        "Config": format!("blobs/sha256/{config_digest}"),
        "RepoTags": [tag],
        "Layers": [format!("blobs/sha256/{layer_digest}")],
    }]))?;
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut b = tar::Builder::new(file);
    add_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add_file(&mut b, "index.json", &index)?;
    add_file(&mut b, "manifest.json", &docker)?;
    add_file(&mut b, &format!("blobs/sha256/{config_digest}"), &config)?;
    add_file(&mut b, &format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    add_file(&mut b, &format!("blobs/sha256/{layer_digest}"), &layer_gz)?;
    b.into_inner()?.flush()?;
    Ok(())
}

/// Builds the release agent and writes the image archive to `out`, then
/// checks it with [`verify`].
pub fn build(out: Option<PathBuf>, tag: &str) -> anyhow::Result<PathBuf> {
    crate::bootstrap::ensure_image_tools()?;
    cargo(&["build", "--release", "-p", "proxy-agent"])?;
    let agent = strip_agent(&target_dir().join("release/proxy-agent"))?;
    let files = layer_files(&agent)?;
    let layer = layer_tar(&files)?;
    let out = out.unwrap_or_else(|| target_dir().join("image/kproxy-image.tar"));
    write_archive(&out, tag, &layer)?;
    eprintln!("wrote {} ({tag}; {} files in the layer: {})", out.display(), files.len(), files.keys().cloned().collect::<Vec<_>>().join(", "));
    verify(&out)?;
    eprintln!("load it with: kind load image-archive {0} | podman load -i {0} | docker load -i {0} | ctr images import {0}", out.display());
    Ok(out)
}

/// The blob a descriptor names, checked against its digest and size.
fn blob<'a>(entries: &'a BTreeMap<String, Vec<u8>>, desc: &Value) -> anyhow::Result<&'a [u8]> {
    let digest = desc["digest"].as_str().context("descriptor without a digest")?;
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("{digest}: not sha256"))?;
    let data = entries.get(&format!("blobs/sha256/{hex}")).with_context(|| format!("blob {digest} missing"))?;
    ensure!(sha256_hex(data) == hex, "blob {digest}: content digest is sha256:{}", sha256_hex(data));
    ensure!(desc["size"].as_u64() == Some(data.len() as u64), "blob {digest}: size {} != descriptor {}", data.len(), desc["size"]);
    Ok(data)
}

/// Checks an archive: the layout, index.json -> manifest -> config and
/// layer (digests, sizes, the layer's diff_id), the docker manifest.json;
/// then extracts the layer and runs the agent (and bpftool) from it: in a
/// chroot of the layer alone when root, else through the layer's loader
/// with only the layer's libraries.
pub fn verify(archive: &Path) -> anyhow::Result<()> {
    let mut entries = BTreeMap::new();
    let mut t = tar::Archive::new(std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?);
    for e in t.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        entries.insert(path, data);
    }
    let get = |p: &str| entries.get(p).with_context(|| format!("{p} missing from the archive"));
    let layout: Value = serde_json::from_slice(get("oci-layout")?)?;
    ensure!(layout["imageLayoutVersion"] == "1.0.0", "oci-layout: {layout}");
    let index: Value = serde_json::from_slice(get("index.json")?)?;
    let mdesc = &index["manifests"][0];
    ensure!(mdesc["mediaType"] == MT_MANIFEST, "index.json: {index}");
    let manifest: Value = serde_json::from_slice(blob(&entries, mdesc)?)?;
    let config: Value = serde_json::from_slice(blob(&entries, &manifest["config"])?)?;
    let layers = manifest["layers"].as_array().context("manifest without layers")?;
    ensure!(layers.len() == 1, "want one layer, got {}", layers.len());
    let layer_gz = blob(&entries, &layers[0])?;
    let mut layer = Vec::new();
    GzDecoder::new(layer_gz).read_to_end(&mut layer).context("the layer is not gzip")?;
    ensure!(
        config["rootfs"]["diff_ids"][0].as_str() == Some(&format!("sha256:{}", sha256_hex(&layer))),
        "config diff_id does not match the uncompressed layer"
    );
    ensure!(config["config"]["Entrypoint"][0] == format!("/{AGENT_PATH}"), "entrypoint: {}", config["config"]);
    let docker: Value = serde_json::from_slice(get("manifest.json")?)?;
    let cfg_hex = manifest["config"]["digest"].as_str().unwrap().trim_start_matches("sha256:");
    let layer_hex = layers[0]["digest"].as_str().unwrap().trim_start_matches("sha256:");
    ensure!(docker[0]["Config"] == format!("blobs/sha256/{cfg_hex}"), "manifest.json Config: {docker}");
    ensure!(docker[0]["Layers"][0] == format!("blobs/sha256/{layer_hex}"), "manifest.json Layers: {docker}");

    let dir = std::env::temp_dir().join(format!("kproxy-image-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_from_layer(&layer, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    eprintln!("{}: valid OCI layout; the agent runs from the layer", archive.display());
    Ok(())
}

fn run_from_layer(layer: &[u8], dir: &Path) -> anyhow::Result<()> {
    tar::Archive::new(layer).unpack(dir).context("extracting the layer")?;
    let want = format!("proxy-agent {}", env!("CARGO_PKG_VERSION"));
    let has_bpftool = dir.join(BPFTOOL.trim_start_matches('/')).is_file();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (agent_out, bpftool_out) = if root {
        // Only the layer's files exist in the chroot: every library is in it.
        let d = dir.to_str().unwrap();
        let a = run("chroot", &[d, &format!("/{AGENT_PATH}"), "--version"])?;
        let b = if has_bpftool { Some(run("chroot", &[d, BPFTOOL, "version"])?) } else { None };
        (a, b)
    } else {
        let loader = dir.join("lib64/ld-linux-x86-64.so.2");
        let libdirs = format!("{0}/lib/x86_64-linux-gnu:{0}/usr/lib/x86_64-linux-gnu", dir.display());
        let agent = dir.join(AGENT_PATH);
        let a = if loader.is_file() {
            run(loader.to_str().unwrap(), &["--inhibit-cache", "--library-path", &libdirs, agent.to_str().unwrap(), "--version"])?
        } else {
            run(agent.to_str().unwrap(), &["--version"])?
        };
        (a, None)
    };
    ensure!(agent_out.trim() == want, "the agent in the layer printed {agent_out:?}, want {want:?}");
    if let Some(b) = bpftool_out {
        ensure!(b.contains("bpftool"), "bpftool in the layer printed {b:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    /// A tiny image from a host binary: the archive verifies, and a
    /// tampered blob does not.
    #[test]
    fn archive_round_trip_and_tamper() {
        let dir = std::env::temp_dir().join(format!("kproxy-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hello"), b"hello").unwrap();
        let mut files = BTreeMap::new();
        files.insert("etc/hello".to_owned(), dir.join("hello"));
        let layer = layer_tar(&files).unwrap();
        let out = dir.join("img.tar");
        write_archive(&out, "kproxy:test", &layer).unwrap();
        // Layout checks pass up to running the agent, which this layer lacks.
        let err = verify(&out).unwrap_err().to_string();
        assert!(err.contains("proxy-agent") || err.contains("running"), "{err}");
        // Flip a byte of the config blob: the digest check names it.
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        let mut a = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            entries.push((p, d));
        }
        let index: Value = serde_json::from_slice(&entries.iter().find(|(p, _)| p == "index.json").unwrap().1).unwrap();
        let mhex = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
        let bad = dir.join("bad.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&bad).unwrap());
        for (p, mut d) in entries {
            if p == format!("blobs/sha256/{mhex}") {
                d[0] ^= 1;
            }
            add_file(&mut b, &p, &d).unwrap();
        }
        b.into_inner().unwrap();
        let err = verify(&bad).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("content digest"), "{err}");
    }
}
