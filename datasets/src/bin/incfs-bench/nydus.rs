//! Nydus as a peer: a RAFS image (zstd chunks, nydus-image's default 1 MiB chunk size) of the
//! tree, mounted by nydusd in FUSE mode, which reads its blob from the bench's server with
//! HTTP Range requests (the `http-proxy` backend, a version-2 config), with a blob cache that
//! starts empty every run. Two images: one without a prefetch list (lazy), one built with
//! `--prefetch-policy fs` and the list of files the workload reads (nydus-image puts their
//! data first in the blob, and nydusd prefetches them at mount when `rafs.prefetch` is on).
//!
//! Binaries: `nydus-image` and `nydusd` from `cargo install nydus-rs --locked`
//! (datasets/peers/setup.sh), found in `--peers-bin` or on PATH.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::mount::Daemon;

/// A built RAFS image: its directory under the served root (bootstrap + blobs/).
pub struct NydusImage {
    /// Directory name under the served root.
    pub name: String,
    /// The bootstrap's path relative to the served root (fetched over the link at mount).
    pub bootstrap_rel: String,
    /// Stored bytes of the blob.
    pub blob_bytes: u64,
}

/// Builds `serve_root/name/{bootstrap,blobs/}` from `tree`; with `prefetch`, the files (paths
/// relative to the tree root) go in the image's prefetch list.
pub fn build(
    bin: &Path,
    tree: &Path,
    serve_root: &Path,
    name: &str,
    prefetch: Option<&[String]>,
) -> Result<NydusImage> {
    let dir = serve_root.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let mut cmd = Command::new(bin.join("nydus-image"));
    cmd.arg("create")
        .arg("--bootstrap")
        .arg(dir.join("bootstrap"))
        .arg("--blob-dir")
        .arg(&blobs)
        .args([
            "--compressor",
            "zstd",
            "--fs-version",
            "6",
            "--log-level",
            "warn",
        ])
        .args([
            "--prefetch-policy",
            if prefetch.is_some() { "fs" } else { "none" },
        ])
        .arg(tree)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {cmd:?} (run datasets/peers/setup.sh)"))?;
    {
        let mut stdin = child.stdin.take().context("nydus-image stdin")?;
        for f in prefetch.unwrap_or(&[]) {
            writeln!(stdin, "/{}", f.trim_start_matches('/'))?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nydus-image create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut blob_bytes = 0;
    for e in std::fs::read_dir(&blobs)? {
        blob_bytes += e?.metadata()?.len();
    }
    if blob_bytes == 0 {
        bail!("nydus-image create wrote no blob in {}", blobs.display());
    }
    Ok(NydusImage {
        name: name.to_string(),
        bootstrap_rel: format!("{name}/bootstrap"),
        blob_bytes,
    })
}

/// Mounts `img` on `mnt`: `bootstrap` is its (already fetched) bootstrap, blobs come from
/// `server_base` (`http://HOST:PORT`), the blob cache lives in `work/cache`.
pub fn mount(
    bin: &Path,
    img: &NydusImage,
    server_base: &str,
    bootstrap: &Path,
    mnt: &Path,
    work: &Path,
    prefetch: bool,
) -> Result<Daemon> {
    let cache = work.join("nydus-cache");
    std::fs::create_dir_all(&cache)?;
    let config = format!(
        r#"version = 2
id = "incfs-bench"

[backend]
type = "http-proxy"

[backend.http-proxy]
addr = "{server_base}"
path = "/{name}/blobs"
timeout = 60
connect_timeout = 10
retry_limit = 0

[cache]
type = "blobcache"

[cache.filecache]
work_dir = "{cache}"

# Prefetch needs both switches in a version-2 config: rafs.prefetch makes the file system
# walk its prefetch list, cache.prefetch starts the workers that fetch (nydusd copies the
# first into the second only when it converts a version-1 config).
[cache.prefetch]
enable = {prefetch}
threads = 4

[rafs]
mode = "direct"

[rafs.prefetch]
enable = {prefetch}
threads = 4
"#,
        name = img.name,
        cache = cache.display(),
    );
    let cfg: PathBuf = work.join("nydusd.toml");
    std::fs::write(&cfg, config)?;
    let mut cmd = Command::new(bin.join("nydusd"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--mountpoint")
        .arg(mnt)
        .arg("--bootstrap")
        .arg(bootstrap)
        .args(["--log-level", "warn", "--rlimit-nofile", "0"]);
    Daemon::start(cmd, mnt, &work.join("nydusd.log"), "nydusd")
}
