//! rclone as a peer: `rclone mount` of the served tree through its HTTP backend (it lists
//! directories from the server's HTML index and reads files with Range requests), and
//! `rclone copy` of the whole tree for the full-download method.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::check;
use crate::mount::Daemon;

/// The VFS cache mode of a mount.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// `--vfs-cache-mode full`: reads land in a sparse on-disk cache, with read-ahead.
    Full,
    /// `--vfs-cache-mode off`: reads go to the backend, through a memory buffer.
    Off,
}

/// Mounts `url` (a directory listing) read-only on `mnt`, with its VFS cache (if any) in
/// `cache`. Read-ahead as rclone's docs advise for `full`: a small memory buffer
/// (`--buffer-size 4M`) and a large on-disk read-ahead (`--vfs-read-ahead 64M`); kernel
/// read-ahead 1 MiB. Directory and attribute caches last the whole run (the tree does not
/// change), modification times and checksums are not asked for.
pub fn mount(url: &str, mnt: &Path, cache: &Path, mode: CacheMode, log: &Path) -> Result<Daemon> {
    let mut cmd = Command::new("rclone");
    cmd.arg("mount")
        .arg(":http:")
        .arg(mnt)
        .args(["--http-url", url])
        .arg("--read-only")
        .arg("--cache-dir")
        .arg(cache)
        .args(["--file-perms", "0755", "--dir-cache-time", "1h"])
        .args(["--attr-timeout", "1h", "--no-modtime", "--no-checksum"])
        .args(["--max-read-ahead", "1M", "--buffer-size", "4M"]);
    match mode {
        CacheMode::Full => {
            cmd.args(["--vfs-cache-mode", "full", "--vfs-read-ahead", "64M"]);
        }
        CacheMode::Off => {
            cmd.args(["--vfs-cache-mode", "off"]);
        }
    }
    Daemon::start(cmd, mnt, log, "rclone mount")
}

/// Copies the whole tree at `url` into `dest` (8 transfers at once), then marks every file
/// executable (rclone's HTTP backend carries no file modes).
pub fn copy(url: &str, dest: &Path) -> Result<()> {
    check(
        Command::new("rclone")
            .args(["copy", ":http:"])
            .arg(dest)
            .args(["--http-url", url])
            .args(["--transfers", "8", "--checkers", "8", "--no-check-dest"]),
        "rclone copy",
    )?;
    check(
        Command::new("chmod").args(["-R", "a+x"]).arg(dest),
        "chmod of the copied tree",
    )
}
