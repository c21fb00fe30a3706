//! `incfs run`: mount an image on a temporary directory, start its prefetch plan, run a
//! command on the mount, unmount, and report what the start cost.
//!
//! The mount is served by this process (no daemon), so the report sees every counter, and
//! the mount goes away with the process even when the command fails or the user presses
//! Ctrl-C: SIGINT and SIGTERM are caught while the command runs (the command, in the same
//! process group, gets the terminal's SIGINT itself; a SIGTERM is passed on to it), and the
//! file system is unmounted before `run` returns.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::fs::fuse::{MountOptions, spawn_mount};
use crate::fs::{FsConfig, FsError, IncFs, Stats};
use crate::plan::{PlanError, PrefetchPlan};
use crate::prefetch::PrefetchConfig;
use crate::source::{self, SourceError};

/// The placeholder replaced by the mount point in the command, its arguments and `--env`
/// values.
pub const MNT_PLACEHOLDER: &str = "{mnt}";

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The image: a path, `file://` or `http(s)://` URL.
    pub source: String,
    /// The prefetch plan, if any.
    pub plan: Option<PathBuf>,
    /// Prefetcher tunables.
    pub prefetch: PrefetchConfig,
    /// File system tunables (cache directory, expected digest, fetch scheduler).
    pub fs: FsConfig,
    /// FUSE session options.
    pub mount: MountOptions,
    /// The command and its arguments; `{mnt}` is replaced by the mount point.
    pub command: Vec<String>,
    /// Extra environment variables; `{mnt}` in values is replaced too.
    pub env: Vec<(String, String)>,
    /// Where to save the mount's read-log (NDJSON) after the command exits.
    pub read_log_out: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The command's exit status.
    pub status: ExitStatus,
    /// Time from mount start until the file system answered (metadata fetched).
    pub mount_ms: f64,
    /// The command's wall time.
    pub wall_ms: f64,
    /// The mount's counters when the command exited.
    pub stats: Stats,
}

/// Why a run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The source could not be opened.
    #[error("opening {spec}: {error}")]
    Source {
        /// What the user gave.
        spec: String,
        /// Why.
        error: SourceError,
    },
    /// The image or plan is not usable.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The plan file could not be read.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The read-log could not be saved.
    #[error("saving the read-log to {path}: {error}")]
    ReadLog {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The mount point could not be made or mounted.
    #[error("mounting at {path}: {error}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A signal (Ctrl-C) arrived before the command started; nothing was run.
    #[error("interrupted before the command started")]
    Interrupted,
    /// No command was given.
    #[error("no command to run")]
    NoCommand,
    /// The command could not be started.
    #[error("{command}: {error}")]
    Spawn {
        /// The program.
        command: String,
        /// Why (`NotFound` when it does not exist).
        error: std::io::Error,
    },
}

/// Replaces `{mnt}` in `s`.
pub fn substitute(s: &str, mnt: &Path) -> String {
    s.replace(MNT_PLACEHOLDER, &mnt.to_string_lossy())
}

/// Mounts, prefetches, runs the command, unmounts. `on_mounted` is called with the file
/// system once it is mounted and before the command starts (for progress display).
pub fn run(
    cfg: &RunConfig,
    on_mounted: &mut dyn FnMut(&Arc<IncFs>),
) -> Result<RunReport, RunError> {
    let (program, args) = cfg.command.split_first().ok_or(RunError::NoCommand)?;
    // Caught from the start, so a Ctrl-C while mounting still unmounts before we return.
    let signals = SignalGuard::install();
    if let Err(error) = crate::cache::fds::raise_nofile_limit() {
        tracing::warn!(%error, "cannot raise the descriptor limit; the cache keeps fewer files open");
    }
    let mount_start = Instant::now();
    let src = source::open_or_offline(&cfg.source, &cfg.fs.fetch.retry()).map_err(|error| {
        RunError::Source {
            spec: cfg.source.clone(),
            error,
        }
    })?;
    let fs = Arc::new(IncFs::new(src, &cfg.fs)?);
    if let Some(path) = &cfg.plan {
        let plan = PrefetchPlan::load(path)?;
        fs.start_prefetch(&plan, path, cfg.prefetch.clone())?;
    }
    let dir = tempfile::Builder::new()
        .prefix("incfs-run-")
        .tempdir()
        .map_err(|error| RunError::Mount {
            path: std::env::temp_dir(),
            error,
        })?;
    let mnt = dir.path().to_path_buf();
    let session =
        spawn_mount(Arc::clone(&fs), &mnt, &cfg.mount).map_err(|error| RunError::Mount {
            path: mnt.clone(),
            error,
        })?;
    let mount_ms = mount_start.elapsed().as_secs_f64() * 1e3;
    on_mounted(&fs);

    let mut cmd = Command::new(substitute(program, &mnt));
    cmd.args(args.iter().map(|a| substitute(a, &mnt)));
    for (k, v) in &cfg.env {
        cmd.env(k, substitute(v, &mnt));
    }
    let started = Instant::now();
    let result = if CAUGHT.load(Ordering::Acquire) != 0 {
        Err(RunError::Interrupted)
    } else {
        cmd.spawn().map_err(|error| RunError::Spawn {
            command: program.clone(),
            error,
        })
    };
    let status = result.and_then(|mut child| {
        wait_forwarding(&mut child).map_err(|error| RunError::Spawn {
            command: program.clone(),
            error,
        })
    });
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(signals);
    let stats = fs.stats();
    let saved = cfg.read_log_out.as_ref().map(|path| {
        std::fs::write(path, fs.read_log_ndjson()).map_err(|error| RunError::ReadLog {
            path: path.clone(),
            error,
        })
    });

    if let Err(e) = session.umount_and_join() {
        tracing::warn!(mountpoint = %mnt.display(), error = %e, "unmount failed; detaching it");
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&mnt)
            .status();
    }
    if let Err(e) = fs.shutdown() {
        tracing::warn!(error = %e, "saving the cache record failed");
    }
    saved.transpose()?;
    Ok(RunReport {
        status: status?,
        mount_ms,
        wall_ms,
        stats,
    })
}

/// Waits for the child; a SIGTERM or SIGHUP received meanwhile is passed on to it.
fn wait_forwarding(child: &mut std::process::Child) -> std::io::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let sig = CAUGHT.swap(0, Ordering::AcqRel);
        if sig != 0 && sig != libc::SIGINT {
            let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
            // SAFETY: kill has no memory preconditions; pid is our own child's.
            unsafe { libc::kill(pid, sig) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last signal caught while a command runs (0: none).
static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    CAUGHT.store(sig, Ordering::Release);
}

/// Catches SIGINT, SIGTERM and SIGHUP while alive (a handler, not SIG_IGN, so the child's
/// exec resets them to their defaults); restores the previous handlers on drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> Self {
        CAUGHT.store(0, Ordering::Release);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction structs are plain data, zeroed then filled; the handler is an
            // async-signal-safe extern "C" fn that only stores to an atomic.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = note_signal as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores a disposition previously returned by sigaction.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}
