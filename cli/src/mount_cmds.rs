//! `mount`, `umount`, `stats` and `cache stat|clear`.
//!
//! `incfs mount` without `--foreground` starts itself again in the background (a new
//! process group, stderr to a log file) and waits until that daemon reports the mount ready
//! or failed on its stdout, so a source that cannot be reached is a non-zero exit with the
//! reason, not a silent dead daemon.

use crate::cache_args::{CacheDir, CacheDirArgs};
use crate::fetch_args::FetchArgs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::oci_cmds::{OciStart, pinned_root};
use crate::util::{human, required_digest};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use incfs_fs::fs::fuse::MountOptions;
use incfs_fs::fs::{CONTROL_DIR, FsConfig, IncFs, STATS_FILE};
use incfs_fs::plan::PrefetchPlan;
use incfs_fs::prefetch::PrefetchConfig;

/// The line a background daemon prints on stdout once it is mounted.
const READY_LINE: &str = "incfs-ready";

/// Arguments of `incfs mount`.
#[derive(Args)]
pub struct MountArgs {
    /// The image: a path, file://PATH, an http(s):// URL, s3://BUCKET/KEY, or
    /// oci://HOST/REPO:TAG (whose pushed plan is prefetched unless --prefetch or --no-plan).
    source: String,
    /// Where to mount it (an existing directory).
    mountpoint: PathBuf,
    #[command(flatten)]
    cache: CacheDirArgs,
    /// Stay in the foreground (logs to stderr; Ctrl-C unmounts).
    #[arg(long)]
    foreground: bool,
    /// Refuse the image unless its root digest is this (64 hex digits).
    #[arg(long)]
    expect_digest: Option<String>,
    /// Refuse the image unless SOURCE.sig holds a signature of its root digest by this
    /// ed25519 public key (a file from `incfs keygen`, or 64 hex digits).
    #[arg(long, value_name = "PUBKEY")]
    trust: Option<String>,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[command(flatten)]
    fetch: FetchArgs,
    #[command(flatten)]
    oci: crate::oci_cmds::OciArgs,
    /// Seconds a read may spend fetching, all retries included, before it fails with EIO
    /// (also bounds each request: a stalled or trickling server cannot hold a read longer).
    #[arg(long, default_value_t = 10)]
    retry_timeout: u64,
    /// Never use FUSE passthrough.
    #[arg(long)]
    no_passthrough: bool,
    /// Let other users access the mount.
    #[arg(long)]
    allow_other: bool,
    /// Prefetch plan for the image (from `incfs plan` or `incfs relayout`): walked from
    /// mount time on, ahead of the program. Without it, the plan published with the image is
    /// used: SOURCE.plan.json beside it, when there is one for this image (or an oci://
    /// artifact's pushed plan); --no-plan turns that off.
    #[arg(long)]
    prefetch: Option<PathBuf>,
    /// Kernel readahead for files not yet local, in bytes (readahead of a lazy file fetches
    /// chunks nobody asked for).
    #[arg(long, default_value_t = 0)]
    max_readahead: u32,
    /// Do not push the cached part of partly local files into the page cache at their first
    /// open (they are then read through incfs page by page; docs/local-reads.md).
    #[arg(long)]
    no_push_local: bool,
    /// Do not pin incfs's request threads to the CPU of the process they answer (by default
    /// they follow it, so a request costs a hand-off on one CPU instead of two cross-CPU
    /// wake-ups)
    #[arg(long)]
    no_follow_cpu: bool,
    /// Daemon log file (default: CACHE/daemon.log).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Internal: print a ready line on stdout once mounted (used by the background start).
    #[arg(long, hide = true)]
    notify_ready: bool,
}

/// Arguments of `incfs umount`.
#[derive(Args)]
pub struct UmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
}

/// Arguments of `incfs stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// The mount point.
    mountpoint: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `incfs cache`.
#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Show the image caches under DIR (default: the per-user cache).
    Stat {
        /// Cache directory.
        dir: Option<PathBuf>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the image caches under DIR (default: the per-user cache) that no mount is
    /// using.
    Clear {
        /// Cache directory.
        dir: Option<PathBuf>,
    },
    /// Evict the least recently used image caches under DIR (default: the per-user cache),
    /// never one in use, until it holds at most SIZE.
    Gc {
        /// The size to keep the cache directory under (K, M, G).
        #[arg(long, value_name = "SIZE", value_parser = crate::util::parse_size)]
        max_size: u64,
        /// Cache directory.
        dir: Option<PathBuf>,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `DIR`, or the per-user cache root.
fn cache_dir_or_default(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => Ok(incfs_fs::cache::root::default_root()?),
    }
}

/// `incfs mount`.
pub fn mount(a: MountArgs) -> anyhow::Result<ExitCode> {
    // The signature of an oci:// image is checked here, before the daemon starts: resolve
    // it (held while mounting, so the check reuses the manifest). A foreground mount and the
    // daemon resolve it in `serve`.
    let oci = if a.trust.is_some() && !a.foreground {
        a.oci
            .prepare(&a.source, true, &retry_policy(a.retry_timeout))?
    } else {
        None
    };
    let cache = a.cache.resolve()?;
    if !a.mountpoint.is_dir() {
        bail!(
            "{}: not a directory (create the mount point first)",
            a.mountpoint.display()
        );
    }
    if a.foreground {
        let notify = a.notify_ready;
        return match serve(&a, &cache) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) if notify => {
                println!("error: {e:#}");
                Err(e)
            }
            Err(e) => Err(e),
        };
    }
    daemonize(&a, &cache, oci.as_ref())
}

/// Starts `incfs mount --foreground --notify-ready …` in the background and waits for it.
/// `oci`: the oci:// image as this process resolved it (for `--trust`), whose pinned
/// reference the daemon is handed.
fn daemonize(a: &MountArgs, cache: &CacheDir, oci: Option<&OciStart>) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the incfs executable")?;
    let log = a
        .log
        .clone()
        .unwrap_or_else(|| cache.dir.join("daemon.log"));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the daemon log {}", log.display()))?;
    let mountpoint = a
        .mountpoint
        .canonicalize()
        .with_context(|| format!("resolving {}", a.mountpoint.display()))?;
    // The daemon runs in /, so a relative image path is made absolute first.
    let source = if a.source.contains("://") {
        a.source.clone()
    } else {
        Path::new(&a.source)
            .canonicalize()
            .with_context(|| format!("opening the source {} (check the path)", a.source))?
            .to_string_lossy()
            .into_owned()
    };
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&source)
        .arg(&mountpoint)
        .arg("--foreground")
        .arg("--notify-ready")
        .arg("--threads")
        .arg(a.threads.to_string())
        .arg("--retry-timeout")
        .arg(a.retry_timeout.to_string());
    a.fetch.forward(&mut cmd);
    a.oci.forward(&mut cmd, oci)?;
    cache.forward(&mut cmd);
    // The signature is checked here; the daemon is handed the signed digest to insist on.
    if let Some(d) = required_digest(
        &source,
        a.expect_digest.as_deref(),
        a.trust.as_deref(),
        pinned_root(oci),
    )? {
        cmd.arg("--expect-digest").arg(d.to_hex());
    }
    if a.no_passthrough {
        cmd.arg("--no-passthrough");
    }
    if let Some(p) = &a.prefetch {
        let p = p
            .canonicalize()
            .with_context(|| format!("opening the prefetch plan {}", p.display()))?;
        cmd.arg("--prefetch").arg(p);
    }
    cmd.arg("--max-readahead").arg(a.max_readahead.to_string());
    if a.no_push_local {
        cmd.arg("--no-push-local");
    }
    if a.no_follow_cpu {
        cmd.arg("--no-follow-cpu");
    }
    if a.allow_other {
        cmd.arg("--allow-other");
    }
    let mut child = cmd
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .process_group(0)
        .spawn()
        .context("starting the mount daemon")?;
    let stdout = child.stdout.take().context("no pipe to the mount daemon")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line == READY_LINE => {
            eprintln!(
                "incfs: mounted {} at {} (daemon pid {}, log {})",
                a.source,
                mountpoint.display(),
                child.id(),
                log.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Ok(line)) => {
            let _ = child.wait();
            bail!("{}", line.strip_prefix("error: ").unwrap_or(&line))
        }
        _ => {
            let status = child.wait().context("waiting for the mount daemon")?;
            bail!(
                "the mount daemon exited ({status}) before mounting; see {}",
                log.display()
            )
        }
    }
}

/// The retry policy of `--retry-timeout SECS`.
fn retry_policy(secs: u64) -> incfs_fs::retry::RetryPolicy {
    incfs_fs::retry::RetryPolicy {
        deadline: Duration::from_secs(secs),
        ..incfs_fs::retry::RetryPolicy::default()
    }
}

/// Mounts in this process and serves until unmounted or signalled.
fn serve(a: &MountArgs, cache: &CacheDir) -> anyhow::Result<()> {
    let served = serve_in(a, &cache.dir);
    cache.trim();
    served
}

fn serve_in(a: &MountArgs, cache: &Path) -> anyhow::Result<()> {
    let oci = a.oci.prepare(
        &a.source,
        a.prefetch.is_some(),
        &retry_policy(a.retry_timeout),
    )?;
    let expect_digest = required_digest(
        &a.source,
        a.expect_digest.as_deref(),
        a.trust.as_deref(),
        pinned_root(oci.as_ref()),
    )?;
    if let Err(error) = incfs_fs::cache::fds::raise_nofile_limit() {
        tracing::warn!(%error, "cannot raise the descriptor limit; the cache keeps fewer files open");
    }
    let mut config = FsConfig::new(cache.to_path_buf());
    config.expect_digest = expect_digest;
    config.passthrough = !a.no_passthrough;
    let fill = a.fetch.apply(&mut config);
    config.fetch.retry_timeout = Duration::from_secs(a.retry_timeout);
    // A plan published beside the image is fetched while the mount reads its metadata.
    let published = (a.prefetch.is_none() && oci.is_none() && !a.oci.no_plan())
        .then(|| incfs_fs::plan::spawn_published(&a.source, &config.fetch.retry()))
        .flatten();
    // So are deltas against an older image the cache holds.
    let deltas =
        incfs_fs::fetch::delta::spawn_fetch(&a.source, &config.cache_dir, &config.fetch.retry());
    let source = incfs_fs::source::open_or_offline(
        &a.source,
        &config.fetch.retry(),
        &config.cache_dir,
        config.expect_digest.as_ref(),
    )
    .with_context(|| format!("opening the source {} (check the path or URL)", a.source))?;
    let fs = Arc::new(
        IncFs::new(source, &config)
            .with_context(|| format!("cannot mount {}: the image is not usable", a.source))?,
    );
    if let Some(d) = deltas {
        fs.use_deltas(d);
    }
    // The fill fetches the bulk sidecar beside the image when it has chunks to fetch.
    fs.use_bulk(&a.source, &config.fetch.retry());
    let pushed_plan = oci.as_ref().and_then(|o| o.plan.as_ref());
    if let Some(path) = &a.prefetch {
        let plan = PrefetchPlan::load(path)?;
        fs.start_prefetch(&plan, path, PrefetchConfig::default())
            .with_context(|| format!("cannot prefetch {} with {}", a.source, path.display()))?;
    } else if let Some((path, bytes)) = pushed_plan {
        let plan = PrefetchPlan::parse(path, bytes)?;
        fs.start_prefetch(&plan, path, PrefetchConfig::default())
            .with_context(|| format!("cannot prefetch {} with its pushed plan", a.source))?;
    } else if let Some(fetched) = published {
        fs.start_published_prefetch(fetched, PrefetchConfig::default());
    }
    if let Some(fill) = fill {
        fs.start_fill(fill)
            .context("starting the background fill")?;
    }
    let opts = MountOptions {
        threads: a.threads.max(1),
        allow_other: a.allow_other,
        max_readahead: a.max_readahead,
        push: incfs_fs::fs::push::PushConfig {
            enabled: !a.no_push_local,
            ..incfs_fs::fs::push::PushConfig::default()
        },
        follow_requester_cpu: !a.no_follow_cpu,
    };
    let notify = a.notify_ready;
    incfs_fs::run::serve_mount(fs, &a.mountpoint, &opts, || {
        tracing::info!(source = %a.source, mountpoint = %a.mountpoint.display(), "mounted");
        if notify {
            let mut out = std::io::stdout();
            writeln!(out, "{READY_LINE}")?;
            out.flush()?;
        }
        Ok(())
    })
    .with_context(|| format!("serving {} at {}", a.source, a.mountpoint.display()))
}

fn read_stats(mountpoint: &Path) -> anyhow::Result<serde_json::Value> {
    let path = mountpoint.join(CONTROL_DIR).join(STATS_FILE);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (is an incfs image mounted there?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// `incfs umount`.
pub fn umount(a: UmountArgs) -> anyhow::Result<ExitCode> {
    let pid = read_stats(&a.mountpoint)
        .ok()
        .and_then(|v| v.get("pid").and_then(serde_json::Value::as_u64));
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&a.mountpoint)
        .status()
        .context("running fusermount3 (apt-get install fuse3)")?;
    if !status.success() {
        let again = Command::new("umount").arg(&a.mountpoint).status();
        if !again.is_ok_and(|s| s.success()) {
            bail!(
                "could not unmount {} (is it busy? close the programs using it, or run fusermount3 -u -z)",
                a.mountpoint.display()
            );
        }
    }
    // Wait for the daemon to record its cache and exit, so a remount finds it clean.
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(30);
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// True while process `pid` runs. A daemon that has exited but not yet been reaped (its
/// parent, `incfs mount`, is gone; init reaps it when it gets to it) is a zombie: done.
fn running(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// `incfs stats`.
pub fn stats(a: StatsArgs) -> anyhow::Result<ExitCode> {
    let v = read_stats(&a.mountpoint)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(map) = v.as_object() else {
        bail!("stats of {} are not a JSON object", a.mountpoint.display());
    };
    if map.get("offline").and_then(serde_json::Value::as_bool) == Some(true) {
        writeln!(
            out,
            "OFFLINE: the source was unreachable at mount; only chunks in the cache are served (others fail with EIO)"
        )?;
    }
    let width = map.keys().map(String::len).max().unwrap_or(0);
    // How much of the image is here, first: what a user asks before going offline.
    let count = |k: &str| map.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let (local, total) = (count("chunks_local"), count("chunks_total"));
    let fill = match map.get("fill") {
        Some(f) if f.get("done").and_then(serde_json::Value::as_bool) == Some(true) => {
            "background fill done"
        }
        Some(_) => "background fill running",
        None => "no background fill",
    };
    writeln!(
        out,
        "{:<width$}  {local} of {total} chunks ({:.1} %), {fill}",
        "local",
        if total == 0 {
            100.0
        } else {
            local as f64 * 100.0 / total as f64
        }
    )?;
    for (k, val) in map {
        let shown = match (k.as_str(), val.as_u64()) {
            (
                "bytes_fetched" | "bytes_used" | "bytes_cached" | "table_bytes" | "bulk_bytes",
                Some(n),
            ) => {
                format!("{n} ({})", human(n))
            }
            (_, _) => match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        };
        writeln!(out, "{k:<width$}  {shown}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `incfs cache`.
pub fn cache(a: CacheArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        CacheCommand::Stat { dir, json } => {
            let dir = cache_dir_or_default(dir)?;
            let infos = incfs_fs::cache::stat_dir(&dir)?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&infos)?)?;
            } else if infos.is_empty() {
                writeln!(out, "no image caches under {}", dir.display())?;
            } else {
                for i in infos {
                    writeln!(
                        out,
                        "{}  {}/{} chunks  {} on disk  {}{}",
                        i.root,
                        i.chunks_recorded,
                        i.chunks_total,
                        human(i.bytes_on_disk),
                        if i.clean { "clean" } else { "unclean" },
                        if i.in_use { "  in use" } else { "" }
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Clear { dir } => {
            let dir = cache_dir_or_default(dir)?;
            let removed = incfs_fs::cache::clear_dir(&dir)?;
            eprintln!(
                "incfs: removed {} image cache(s) under {}",
                removed.len(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Gc {
            max_size,
            dir,
            json,
        } => {
            let dir = cache_dir_or_default(dir)?;
            let r = incfs_fs::cache::gc::gc(&dir, max_size)?;
            if json {
                writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&r)?)?;
            }
            eprintln!(
                "incfs: removed {} image cache(s) under {} ({} freed), {} left{}",
                r.removed.len(),
                dir.display(),
                human(r.freed_bytes),
                human(r.kept_bytes),
                if r.busy > 0 {
                    format!(" ({} in use kept)", r.busy)
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
