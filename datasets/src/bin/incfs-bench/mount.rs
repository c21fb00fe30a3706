//! A FUSE daemon of a peer (rclone, nydusd) run in the foreground as a child: started, waited
//! for until its mount point shows in /proc/mounts, unmounted and reaped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a daemon may take to mount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Daemon {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` (which mounts on `mnt`), its output going to `log`, and returns once the
    /// mount is up.
    pub fn start(mut cmd: Command, mnt: &Path, log: &Path, what: &str) -> Result<Daemon> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        let mut d = Daemon {
            child,
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
        };
        let t = Instant::now();
        loop {
            if is_mounted(mnt)? {
                return Ok(d);
            }
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "{what} exited ({status}) before mounting; its log {}:\n{}",
                    log.display(),
                    tail(log)
                );
            }
            if t.elapsed() > MOUNT_TIMEOUT {
                d.stop();
                bail!(
                    "{what} did not mount within {MOUNT_TIMEOUT:?}:\n{}",
                    tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Unmounts and reaps the daemon (killing it if it does not exit on its own).
    pub fn stop(&mut self) {
        if is_mounted(&self.mnt).unwrap_or(true) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt).unwrap_or(false) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_mounted(mnt: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let m = mnt.to_string_lossy();
    Ok(mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*m)))
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
