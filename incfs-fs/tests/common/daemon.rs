//! FUSE daemons in child processes, so that a test can kill -9 one like a real daemon.
//!
//! A test binary that uses [`Daemon`] defines the ignored test `daemon_child` calling
//! [`child`]: [`Daemon::start_with`] runs the binary again with that test selected and the
//! mount described by environment variables. Every mount is unmounted by a drop guard, also
//! on failure.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs_fs::fetch::FetchConfig;
use incfs_fs::fetch::fill::FillConfig;
use incfs_fs::fs::fuse::MountOptions;
use incfs_fs::fs::{FsConfig, IncFs, Stats};
use incfs_fs::link::LinkConfig;
use incfs_fs::plan::PrefetchPlan;
use incfs_fs::prefetch::PrefetchConfig;
use incfs_fs::source::{
    FailingSource, FailureKind, FailurePlan, FileSource, Source, ThrottledSource,
};

const ENV_SOURCE: &str = "INCFS_TEST_DAEMON_SOURCE";
const ENV_MNT: &str = "INCFS_TEST_DAEMON_MNT";
const ENV_CACHE: &str = "INCFS_TEST_DAEMON_CACHE";
const ENV_CORRUPT: &str = "INCFS_TEST_DAEMON_CORRUPT";
/// Delay every request to the source by this many milliseconds.
pub const ENV_LATENCY: &str = "INCFS_TEST_DAEMON_LATENCY_MS";
/// Prefetch this plan file (then every remaining chunk) from the start.
pub const ENV_PLAN: &str = "INCFS_TEST_DAEMON_PLAN";
/// Start the daemon with this `RLIMIT_NOFILE`, soft and hard (as `ulimit -n N` does), set
/// in the child before exec.
pub const ENV_NOFILE: &str = "INCFS_TEST_DAEMON_NOFILE";
/// Write the daemon's log (warnings and errors) to this file.
pub const ENV_LOG: &str = "INCFS_TEST_DAEMON_LOG";
/// The daemon's retry deadline, in milliseconds.
pub const ENV_RETRY_MS: &str = "INCFS_TEST_DAEMON_RETRY_MS";
/// Set: a miss fetches only what it touches (no widening over the chunks after it), for
/// tests that count which chunks become local.
pub const ENV_EXACT: &str = "INCFS_TEST_DAEMON_EXACT";

/// The body of the `daemon_child` test: does nothing unless started by [`Daemon::start`].
pub fn child() {
    let (Ok(spec), Ok(mnt), Ok(cache)) = (
        std::env::var(ENV_SOURCE),
        std::env::var(ENV_MNT),
        std::env::var(ENV_CACHE),
    ) else {
        return;
    };
    if let Ok(log) = std::env::var(ENV_LOG) {
        let file = fs::File::create(log).expect("create the daemon log");
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,fuser::session=error",
            ))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init();
    }
    incfs_fs::cache::fds::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    let mut cfg = FsConfig::new(cache.into());
    cfg.fetch = FetchConfig {
        initial_backoff: Duration::from_millis(5),
        max_attempts: 3,
        ..FetchConfig::default()
    };
    if std::env::var_os(ENV_EXACT).is_some() {
        cfg.fetch.miss_amplify_bytes = 0;
    }
    if let Ok(ms) = std::env::var(ENV_RETRY_MS) {
        cfg.fetch.retry_timeout = Duration::from_millis(ms.parse().unwrap());
        cfg.fetch.max_attempts = u32::MAX;
    }
    let base: Arc<dyn Source> = if spec.contains("://") {
        incfs_fs::source::open_or_offline(
            &spec,
            &cfg.fetch.retry(),
            &cfg.cache_dir,
            cfg.expect_digest.as_ref(),
        )
        .expect("open source")
    } else {
        Arc::new(FileSource::open(Path::new(&spec)).expect("open image"))
    };
    let source: Arc<dyn Source> = match std::env::var(ENV_CORRUPT) {
        Ok(range) => {
            let (s, e) = range.split_once(':').expect("START:END");
            Arc::new(FailingSource::new(
                base,
                FailurePlan::Range {
                    start: s.parse().unwrap(),
                    end: e.parse().unwrap(),
                },
                FailureKind::Corrupt,
            ))
        }
        Err(_) => base,
    };
    let source: Arc<dyn Source> = match std::env::var(ENV_LATENCY) {
        Ok(ms) => Arc::new(ThrottledSource::new(
            source,
            LinkConfig {
                latency_ms: ms.parse().unwrap(),
                ..LinkConfig::default()
            },
        )),
        Err(_) => source,
    };
    let fs = Arc::new(IncFs::new(source, &cfg).expect("open image"));
    if let Ok(plan_path) = std::env::var(ENV_PLAN) {
        let plan_path = Path::new(&plan_path);
        let plan = PrefetchPlan::load(plan_path).expect("load plan");
        fs.start_prefetch(&plan, plan_path, PrefetchConfig::default())
            .expect("start prefetch");
        fs.start_fill(FillConfig::default()).expect("start fill");
    }
    incfs_fs::run::serve_mount(fs, Path::new(&mnt), &MountOptions::default(), || Ok(()))
        .expect("serve");
}

/// A mount served by a child process; unmounted (lazily if need be) and reaped on drop.
pub struct Daemon {
    child: Child,
    mnt: PathBuf,
}

impl Daemon {
    /// A daemon mounting `source` (image path or URL) at `mnt` with cache `cache`; with
    /// `corrupt`, the source's bytes in `start..end` are corrupted.
    pub fn start(source: &str, mnt: &Path, cache: &Path, corrupt: Option<(u64, u64)>) -> Daemon {
        Daemon::start_with(source, mnt, cache, corrupt, &[])
    }

    /// As [`Daemon::start`], with extra environment ([`ENV_LATENCY`], [`ENV_PLAN`]).
    pub fn start_with(
        source: &str,
        mnt: &Path,
        cache: &Path,
        corrupt: Option<(u64, u64)>,
        env: &[(&str, String)],
    ) -> Daemon {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args([
            "daemon_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_SOURCE, source)
        .env(ENV_MNT, mnt)
        .env(ENV_CACHE, cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if let Some((s, e)) = corrupt {
            cmd.env(ENV_CORRUPT, format!("{s}:{e}"));
        }
        for (k, v) in env {
            cmd.env(k, v);
            if *k == ENV_NOFILE {
                let n: libc::rlim_t = v.parse().unwrap();
                // SAFETY: between fork and exec the closure only calls setrlimit, which is
                // async-signal-safe, on a limit struct on its own stack.
                unsafe {
                    cmd.pre_exec(move || {
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = cmd.spawn().unwrap();
        let mut d = Daemon {
            child,
            mnt: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while fs::metadata(mnt.join(".incfs/stats")).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("the daemon exited before mounting: {st}");
            }
            assert!(Instant::now() < deadline, "the mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the daemon process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The mount's `.incfs/stats`.
    pub fn stats(&self) -> Stats {
        serde_json::from_slice(&fs::read(self.mnt.join(".incfs/stats")).unwrap()).unwrap()
    }

    /// Unmounts and waits for the daemon to record its cache and exit.
    pub fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -u failed");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "daemon exited with {st}");
    }

    /// kill -9 of the daemon, then a lazy unmount of the dead mount. A daemon that does not
    /// exit (a thread of it stuck in the kernel, which keeps its `/dev/fuse` open and every
    /// reader of the mount waiting) fails the test, after its connection is aborted so the
    /// test's readers do not hang the run.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let aborted = abort_connection(&self.mnt);
                panic!(
                    "the daemon did not exit within 20 s of kill -9 (a thread stuck in the \
                     kernel holds its /dev/fuse); its FUSE connection aborted: {aborted:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .status();
    }
}

/// Aborts the FUSE connection of the mount at `mnt` through fusectl (mounted if need be),
/// found by the mount's device in /proc/self/mountinfo (a stat of the mount would wait on
/// the dead daemon).
fn abort_connection(mnt: &Path) -> Result<(), String> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mnt = mnt.to_string_lossy();
    let minor = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.get(4) != Some(&&*mnt) {
                return None;
            }
            Some(f.get(2)?.split_once(':')?.1.to_string())
        })
        .next_back()
        .ok_or("no such mount")?;
    let ctl = Path::new("/sys/fs/fuse/connections");
    let mounted_here = !ctl.join(&minor).exists()
        && Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .status()
            .is_ok_and(|s| s.success());
    let aborted = fs::write(ctl.join(&minor).join("abort"), "1").map_err(|e| e.to_string());
    if mounted_here {
        let _ = Command::new("umount").arg(ctl).status();
    }
    aborted
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
            std::thread::sleep(Duration::from_millis(100));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// Drops the kernel's page cache, so that reads reach the daemon again. Best effort: needs
/// root, which the mount tests have.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Writes to `out` a prefetch plan of every non-empty file of the image at `img`, whole, in
/// walk order (a daemon started with `ENV_PLAN` pointing at it prefetches them all).
pub fn save_whole_files_plan(img: &Path, out: &Path) {
    let image = incfs_fs::format::Image::open_path(img, None).unwrap();
    let plan = PrefetchPlan {
        version: incfs_fs::plan::PLAN_VERSION,
        image_digest: image.root_digest().to_hex(),
        chunk_size: image.manifest().chunk_size,
        total_bytes: 0,
        entries: image
            .files()
            .iter()
            .filter(|f| f.chunks > 0)
            .map(|f| incfs_fs::plan::PlanEntry {
                file: f.display_path(),
                first_chunk: 0,
                chunk_count: f.chunks,
                offset_ms: 0.0,
                confidence: 1.0,
            })
            .collect(),
    };
    plan.save(out).unwrap();
}
