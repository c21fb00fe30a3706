//! Starting a real nginx for tests that must work against "any static server".

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The nginx binary: `/usr/sbin/nginx` (Debian's, not on root's PATH everywhere), else
/// `nginx` from PATH.
pub fn binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nginx")
    }
}

/// Starts nginx in the foreground with `dir` as its prefix and `dir/nginx.conf` as its
/// configuration (which the caller wrote), output discarded. The caller kills the child.
pub fn start(dir: &Path) -> io::Result<Child> {
    Command::new(binary())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
