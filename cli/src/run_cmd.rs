//! `incfs run`: mount, prefetch, run a command on the mount, unmount, summarize.

use crate::cache_args::CacheDirArgs;
use crate::fetch_args::FetchArgs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use incfs_fs::fs::FsConfig;
use incfs_fs::fs::fuse::MountOptions;
use incfs_fs::prefetch::PrefetchConfig;
use incfs_fs::run::{RunConfig, RunError, run as run_image};
use serde::Serialize;

use crate::util::{human, required_digest};

/// Arguments of `incfs run`.
#[derive(Args)]
pub struct RunArgs {
    /// The image: a path, file://, http(s):// or s3://BUCKET/KEY URL, or oci://HOST/REPO:TAG
    /// (whose pushed plan is prefetched unless --prefetch or --no-plan).
    #[arg(long)]
    image: String,
    /// Prefetch plan for the image (from `incfs plan` or `incfs relayout`). Without it, the
    /// plan published with the image is used: IMAGE.plan.json beside it, when there is one
    /// for this image (or an oci:// artifact's pushed plan); --no-plan turns that off.
    #[arg(long)]
    prefetch: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheDirArgs,
    /// Refuse the image unless its root digest is this.
    #[arg(long)]
    expect_digest: Option<String>,
    /// Refuse the image unless IMAGE.sig holds a signature of its root digest by this
    /// ed25519 public key (a file from `incfs keygen`, or 64 hex digits).
    #[arg(long, value_name = "PUBKEY")]
    trust: Option<String>,
    /// Set an environment variable for the command (`{mnt}` is replaced by the mount point).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Write the run's figures as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Save the mount's read-log (NDJSON, an input for `incfs plan`) to this file. Such a
    /// run opens no file with passthrough (its reads would not be logged).
    #[arg(long)]
    read_log_out: Option<PathBuf>,
    /// Never open files with FUSE passthrough.
    #[arg(long)]
    no_passthrough: bool,
    /// Do not push the cached part of partly local files into the page cache at their first
    /// open (they are then read through incfs page by page; docs/local-reads.md).
    #[arg(long)]
    no_push_local: bool,
    /// Do not pin incfs's request threads to the CPU of the process they answer (by default
    /// they follow it, so a request costs a hand-off on one CPU instead of two cross-CPU
    /// wake-ups)
    #[arg(long)]
    no_follow_cpu: bool,
    /// Kernel readahead for files not yet local, in bytes (readahead of a lazy file fetches
    /// chunks nobody asked for).
    #[arg(long, default_value_t = 0)]
    max_readahead: u32,
    #[command(flatten)]
    fetch: FetchArgs,
    #[command(flatten)]
    oci: crate::oci_cmds::OciArgs,
    /// Seconds a read may spend fetching, all retries included, before it fails with EIO
    /// (also bounds each request: a stalled or trickling server cannot hold a read longer).
    #[arg(long, default_value_t = 10)]
    retry_timeout: u64,
    /// The command and its arguments; `{mnt}` is replaced by the mount point.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("not K=V: {s:?}"))
}

#[derive(Serialize)]
struct RunJson {
    exit_code: Option<i32>,
    wall_ms: f64,
    mount_ms: f64,
    unmount_ms: f64,
    bytes_fetched: u64,
    requests: u64,
    bytes_used: u64,
    demand_misses: u64,
    blocked_reads: u64,
    blocked_ms: u64,
    prefetch_hits: u64,
    prefetch_misses: u64,
    stats: incfs_fs::fs::Stats,
}

/// `incfs run`.
pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let cache = a.cache.resolve()?;
    let mut fs = FsConfig::new(cache.dir.clone());
    fs.fetch.retry_timeout = std::time::Duration::from_secs(a.retry_timeout);
    let oci = a
        .oci
        .prepare(&a.image, a.prefetch.is_some(), &fs.fetch.retry())?;
    let oci_plan = crate::oci_cmds::plan_file(oci.as_ref())?;
    fs.expect_digest = required_digest(
        &a.image,
        a.expect_digest.as_deref(),
        a.trust.as_deref(),
        crate::oci_cmds::pinned_root(oci.as_ref()),
    )?;
    // A read served by passthrough never reaches incfs, so it would be missing from the
    // read-log: a run that saves one serves every read itself.
    fs.passthrough = !a.no_passthrough && a.read_log_out.is_none();
    let fill = a.fetch.apply(&mut fs);
    let cfg = RunConfig {
        source: a.image.clone(),
        plan: a
            .prefetch
            .clone()
            .or_else(|| oci_plan.as_ref().map(|f| f.path().to_path_buf())),
        published_plan: !a.oci.no_plan(),
        prefetch: PrefetchConfig::default(),
        fill,
        fs,
        mount: MountOptions {
            max_readahead: a.max_readahead,
            push: incfs_fs::fs::push::PushConfig {
                enabled: !a.no_push_local,
                ..incfs_fs::fs::push::PushConfig::default()
            },
            follow_requester_cpu: !a.no_follow_cpu,
            ..MountOptions::default()
        },
        command: a.command.clone(),
        env: a.env.clone(),
        read_log_out: a.read_log_out.clone(),
    };
    let bar = crate::progress::bytes_bar("prefetch");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ticker = None;
    let mut on_mounted = |fs: &std::sync::Arc<incfs_fs::fs::IncFs>| {
        if bar.is_hidden() || fs.prefetch_stats().is_none() {
            return;
        }
        let (fs, bar, stop) = (
            std::sync::Arc::clone(fs),
            bar.clone(),
            std::sync::Arc::clone(&stop),
        );
        ticker = Some(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(p) = fs.prefetch_stats() {
                    bar.set_length(p.planned_chunks);
                    bar.set_position(p.planned_local);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }));
    };
    let result = run_image(&cfg, &mut on_mounted);
    cache.trim();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = ticker.take() {
        let _ = t.join();
    }
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(RunError::Spawn { command, error }) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("incfs: {command}: command not found");
            return Ok(ExitCode::from(127));
        }
        Err(RunError::Interrupted) => {
            eprintln!("incfs: interrupted before the command started; unmounted");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e).with_context(|| format!("incfs run of {}", a.image)),
    };
    let s = &report.stats;
    let (hits, misses) = s
        .prefetch
        .map_or((0, 0), |p| (p.prefetch_hits, p.prefetch_misses));
    eprintln!(
        "incfs run: {:.2} s wall ({:.0} ms to mount, {:.0} ms to unmount), {} fetched in {} requests ({} of it read by the program), {} demand misses, {} blocked reads ({} ms){}",
        report.wall_ms / 1e3,
        report.mount_ms,
        report.unmount_ms,
        human(s.bytes_fetched),
        s.requests,
        human(s.bytes_used),
        s.demand_misses,
        s.blocked_reads,
        s.blocked_ms,
        if hits + misses > 0 {
            format!(
                ", prefetch hit rate {:.0}% ({hits}/{})",
                100.0 * hits as f64 / (hits + misses) as f64,
                hits + misses
            )
        } else {
            String::new()
        }
    );
    if let Some(path) = &a.stats_json {
        let j = RunJson {
            exit_code: report.status.code(),
            wall_ms: report.wall_ms,
            mount_ms: report.mount_ms,
            unmount_ms: report.unmount_ms,
            bytes_fetched: s.bytes_fetched,
            requests: s.requests,
            bytes_used: s.bytes_used,
            demand_misses: s.demand_misses,
            blocked_reads: s.blocked_reads,
            blocked_ms: s.blocked_ms,
            prefetch_hits: hits,
            prefetch_misses: misses,
            stats: s.clone(),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(exit_code(report.status))
}

/// The command's status as ours: its code, or 128 + the signal that ended it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        _ => ExitCode::from(1),
    }
}
