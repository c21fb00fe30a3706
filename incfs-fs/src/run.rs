//! The two lifecycles of a mount served by this process: [`run`] (`incfs run`: mount an image
//! on a temporary directory, start its prefetch plan, run a command on the mount, unmount,
//! and report what the start cost) and [`serve_mount`] (`incfs mount`'s daemon: serve until
//! unmounted or signalled).
//!
//! Either way the mount goes away with the process, also when the command fails or the user
//! presses Ctrl-C: SIGINT, SIGTERM and SIGHUP are caught (with `signal-hook`; a handler, not
//! an ignored disposition, so a command started meanwhile gets the defaults back at exec).
//! While `incfs run`'s command runs, it gets the terminal's SIGINT itself (same process
//! group) and a SIGTERM or SIGHUP is passed on to it; a daemon unmounts on any of them. The
//! file system is shut down (prefetch and fetch stopped, cache recorded) before either
//! returns.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::fetch::fill::FillConfig;
use crate::fs::fuse::{MountOptions, new_session, run_session, spawn_mount};
use crate::fs::{FsConfig, FsError, IncFs, Stats};
use crate::plan::{PlanError, PrefetchPlan};
use crate::prefetch::PrefetchConfig;
use crate::source::{self, SourceError};

/// The signals that end a mount: Ctrl-C, `kill`, a closed terminal.
const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

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
    /// Without `plan`: prefetch the plan published beside the image, when there is one
    /// ([`crate::plan::published`]).
    pub published_plan: bool,
    /// Prefetcher tunables.
    pub prefetch: PrefetchConfig,
    /// The background fill of the rest of the image (`None`: off).
    pub fill: Option<FillConfig>,
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
    /// Time from the command's exit until the mount was gone and the cache recorded what
    /// it holds (unmount, the last flush of the backing files, the record).
    pub unmount_ms: f64,
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
        error: io::Error,
    },
    /// The mount point could not be made or mounted.
    #[error("mounting at {path}: {error}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// A signal (Ctrl-C) arrived before the command started; nothing was run.
    #[error("interrupted before the command started")]
    Interrupted,
    /// No command was given.
    #[error("no command to run")]
    NoCommand,
    /// The signal handlers or the session thread could not be set up.
    #[error("setting up the mount's {what}: {error}")]
    Setup {
        /// What.
        what: &'static str,
        /// Why.
        error: io::Error,
    },
    /// The FUSE session ended with an error.
    #[error("the FUSE session at {path} failed: {error}")]
    Session {
        /// The mount point.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The command could not be started.
    #[error("{command}: {error}")]
    Spawn {
        /// The program.
        command: String,
        /// Why (`NotFound` when it does not exist).
        error: io::Error,
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
    let mut signals = Signals::new(STOP_SIGNALS).map_err(|error| RunError::Setup {
        what: "signal handlers",
        error,
    })?;
    if let Err(error) = crate::cache::fds::raise_nofile_limit() {
        tracing::warn!(%error, "cannot raise the descriptor limit; the cache keeps fewer files open");
    }
    let mount_start = Instant::now();
    // The published plan is fetched while the mount reads the image's metadata.
    let published = (cfg.plan.is_none() && cfg.published_plan)
        .then(|| crate::plan::spawn_published(&cfg.source, &cfg.fs.fetch.retry()))
        .flatten();
    // So are deltas against an older image the cache holds.
    let deltas =
        crate::fetch::delta::spawn_fetch(&cfg.source, &cfg.fs.cache_dir, &cfg.fs.fetch.retry());
    let src = source::open_or_offline(
        &cfg.source,
        &cfg.fs.fetch.retry(),
        &cfg.fs.cache_dir,
        cfg.fs.expect_digest.as_ref(),
    )
    .map_err(|error| RunError::Source {
        spec: cfg.source.clone(),
        error,
    })?;
    let fs = Arc::new(IncFs::new(src, &cfg.fs)?);
    if let Some(d) = deltas {
        fs.use_deltas(d);
    }
    // The fill fetches the bulk sidecar beside the image when it has chunks to fetch.
    fs.use_bulk(&cfg.source, &cfg.fs.fetch.retry());
    if let Some(path) = &cfg.plan {
        let plan = PrefetchPlan::load(path)?;
        fs.start_prefetch(&plan, path, cfg.prefetch.clone())?;
    } else if let Some(fetched) = published {
        fs.start_published_prefetch(fetched, cfg.prefetch.clone());
    }
    if let Some(fill) = &cfg.fill {
        fs.start_fill(fill.clone())?;
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
    let result = if signals.pending().next().is_some() {
        Err(RunError::Interrupted)
    } else {
        cmd.spawn().map_err(|error| RunError::Spawn {
            command: program.clone(),
            error,
        })
    };
    let status = result.and_then(|mut child| {
        wait_forwarding(&mut child, &mut signals).map_err(|error| RunError::Spawn {
            command: program.clone(),
            error,
        })
    });
    let exited = Instant::now();
    let wall_ms = (exited - started).as_secs_f64() * 1e3;
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
        lazy_unmount(&mnt);
    }
    if let Err(e) = fs.shutdown() {
        tracing::warn!(error = %e, "saving the cache record failed");
    }
    let unmount_ms = exited.elapsed().as_secs_f64() * 1e3;
    saved.transpose()?;
    Ok(RunReport {
        status: status?,
        mount_ms,
        wall_ms,
        unmount_ms,
        stats,
    })
}

/// Waits for the child; a SIGTERM or SIGHUP received meanwhile is passed on to it (the
/// terminal's SIGINT reaches it by itself).
fn wait_forwarding(
    child: &mut std::process::Child,
    signals: &mut Signals,
) -> io::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        for sig in signals.pending() {
            if sig != SIGINT {
                let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
                // SAFETY: kill has no memory preconditions; pid is our own child's.
                unsafe { libc::kill(pid, sig) };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Detaches a mount that would not unmount (`fusermount3 -u -z`): it goes away once nothing
/// uses it.
fn lazy_unmount(mountpoint: &Path) {
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .status();
}

/// Serves `fs` at `mountpoint` in this process until the mount goes away — unmounted from
/// outside (`incfs umount`, `fusermount3 -u`), or by this function on SIGINT, SIGTERM or
/// SIGHUP — then shuts the file system down. `on_mounted` runs once the mount is up (a
/// daemon reports that it is ready there); if it fails, the mount is taken down again.
pub fn serve_mount(
    fs: Arc<IncFs>,
    mountpoint: &Path,
    opts: &MountOptions,
    on_mounted: impl FnOnce() -> io::Result<()>,
) -> Result<(), RunError> {
    let setup = |what| move |error| RunError::Setup { what, error };
    let mut signals = Signals::new(STOP_SIGNALS).map_err(setup("signal handlers"))?;
    let mut session =
        new_session(Arc::clone(&fs), mountpoint, opts).map_err(|error| RunError::Mount {
            path: mountpoint.to_path_buf(),
            error,
        })?;
    let mut unmounter = session.unmount_callable();
    let ended = signals.handle();
    let runner = std::thread::Builder::new()
        .name("incfs-session".into())
        .spawn(move || {
            let r = run_session(session);
            // The mount is gone: stop waiting for signals.
            ended.close();
            r
        })
        .map_err(setup("session thread"))?;
    let ready = on_mounted();
    let stop = match &ready {
        Ok(()) => signals.forever().next(),
        Err(_) => Some(0),
    };
    if let Some(sig) = stop {
        tracing::info!(signal = sig, mountpoint = %mountpoint.display(), "unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed; detaching it");
            lazy_unmount(mountpoint);
        }
    }
    let served = match runner.join() {
        Ok(r) => r.map_err(|error| RunError::Session {
            path: mountpoint.to_path_buf(),
            error,
        }),
        Err(_) => Err(RunError::Session {
            path: mountpoint.to_path_buf(),
            error: io::Error::other("the FUSE session thread panicked"),
        }),
    };
    // The session's end shut the file system down already; this covers a session that
    // failed before it could.
    let shut = fs.shutdown();
    ready.map_err(setup("ready report"))?;
    served?;
    shut?;
    Ok(())
}
