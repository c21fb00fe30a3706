//! The end-to-end bench: how long a program takes to start from a tree served over an
//! emulated link, by method, incfs and its strongest peers side by side.
//!
//! Workloads (`--workload`, see workload.rs): clang-22 compiling hello.c, python3 importing
//! sympy and networkx, the synthetic app. Methods (`--methods`; by default those that need
//! no peers installed), interleaved in every round, the page cache dropped and every cache
//! emptied before each run:
//! - `local cold`: the tree on local disk (the limit);
//! - `full download (tar.zst)`: one GET of the tree as a zstd tarball, unpack, run;
//! - `full download (tree)`: `rclone copy` of the tree's files, then run;
//! - `rclone full` / `rclone off`: `rclone mount` of the tree over HTTP, VFS cache full
//!   (with read-ahead) or off;
//! - `nydus lazy` / `nydus + prefetch list`: nydusd (FUSE) on a zstd RAFS image whose blob
//!   it reads with Range requests, without and with the list of files the workload reads;
//! - `incfs lazy`: `incfs run` of the image, no plan;
//! - `incfs + plan`: `incfs run` of the hot-first image with its plan, made from other runs
//!   (never the measured one); `incfs + plan, pack layout` (not run by default): the same plan
//!   on the image as `pack` laid it out; `incfs + plan, mount-recorded` (with `--record-from
//!   both`): the hot-first image and plan made from traces recorded through an incfs mount;
//! - `incfs warm, …` (not run by default; warm.rs): a start from a cache that a planned start
//!   (partial) or a read of every file (complete) filled, page cache dropped.
//!
//! The plan runs are recorded the README's way by default (`--record-from local`): `incfs
//! record-trace --root TREE` of the command on the tree on local disk, which the recorder
//! reads through its readahead-0 view. `--record-from mount` records inside `incfs run` of
//! the image instead (the readahead-0 mount), `--record-from both` does both and measures
//! the two plans side by side.
//!
//! One server, the bench's own `incfs serve` (directory listings, single Range requests,
//! per-request latency + one shared token bucket), serves every method over the same link
//! and counts the bytes. Time = from the first request (or the mount command) to the
//! workload's exit: downloads, unpacking, mounts and metadata fetches are included.
//!
//! The ideal is max(local cold, latency + stored demand set / bandwidth). The demand set is
//! measured by the bench itself in an unmeasured run without plan (kernel readahead off): the
//! chunks of the incfs image that the pages the program asked for fall in, at their stored
//! (compressed) size.

mod mount;
mod nydus;
mod rclone;
mod report;
mod warm;
mod workload;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use incfs_fs::format::Image;
use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{ServeConfig, Server};
use incfs_fs::source::{HttpConfig, HttpSource, RequestKind, Source};
use serde::Serialize;

use workload::{Kind, SynthOptions, Workload};

#[derive(Parser)]
#[command(about = "Start-time bench of incfs against local, full download, rclone and Nydus")]
struct Args {
    /// Working directory (tree, images, plans, results).
    #[arg(long, default_value = "out/bench")]
    out: PathBuf,
    /// The workload.
    #[arg(long, value_enum, default_value_t = Kind::Clang)]
    workload: Kind,
    /// Emulated per-request latency, ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Emulated bandwidth, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth_mbit: f64,
    /// Measured rounds (each runs every method once); medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Methods to run, comma-separated (default: the ones that need no peers installed:
    /// local-cold, download-tar-zst, incfs-lazy, incfs-plan-pack-layout, incfs-plan;
    /// datasets/peers/bench.sh names all of them).
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Vec<Method>,
    /// Leave out `incfs-lazy` (no plan), the slowest method by far.
    #[arg(long)]
    skip_lazy: bool,
    /// Runs recorded to make the plan (not measured).
    #[arg(long, default_value_t = 2)]
    plan_runs: usize,
    /// Chunk size of the incfs image (default: incfs pack's).
    #[arg(long)]
    chunk_size: Option<String>,
    /// Where the plan's input comes from: eBPF traces, the mount's read-log, or eBPF when
    /// it works and the read-log otherwise.
    #[arg(long, value_enum, default_value_t = PlanSource::Auto)]
    plan_source: PlanSource,
    /// Where the plan runs are recorded: from the tree on local disk as the README says
    /// (`local`), inside `incfs run` of the image (`mount`), or both, measured side by side
    /// (`both` adds the method `incfs + plan, mount-recorded`).
    #[arg(long, value_enum, default_value_t = RecordFrom::Local)]
    record_from: RecordFrom,
    /// The incfs binary (default: next to this one).
    #[arg(long)]
    incfs: Option<PathBuf>,
    /// Directory with nydusd and nydus-image (default: PATH).
    #[arg(long, env = "INCFS_PEERS_BIN")]
    peers_bin: Option<PathBuf>,
    /// Synthetic workload: files.
    #[arg(long, default_value_t = 200)]
    synth_files: usize,
    /// Synthetic workload: bytes per file (K, M suffixes).
    #[arg(long, default_value = "1M")]
    synth_size: String,
    /// Synthetic workload: access pattern (seq, scattered, mmap, multiproc).
    #[arg(long, default_value = "scattered")]
    synth_pattern: String,
    /// Synthetic workload: share of files (seq) or pages (others) read.
    #[arg(long, default_value_t = 0.1)]
    synth_fraction: f64,
    /// Write every run and the medians as JSON here (default: OUT/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Extra argument for every measured `incfs run` (repeat it; e.g. `--incfs-arg=--no-fill`
    /// or `--incfs-arg=--miss-amplify=64K`), to measure the fetch policy's tunables.
    #[arg(long, allow_hyphen_values = true)]
    incfs_arg: Vec<String>,
    /// Instead of the start bench: the update bench of a version pair (`numpy`: numpy 2.2.5
    /// → 2.2.6; `python`: the python workload's packages one minor version apart), v2's
    /// first planned start with v1 cached against an empty cache, over the emulated link
    /// (`datasets/updates/bench.sh`, which this runs with this bench's incfs, `--runs`,
    /// `--latency-ms` and `--bandwidth-mbit`; results in OUT).
    #[arg(long, value_enum, value_name = "PAIR")]
    update: Option<UpdatePair>,
}

/// A version pair of `datasets/updates/build-pair.sh`.
#[derive(Clone, Copy, ValueEnum)]
enum UpdatePair {
    Numpy,
    Python,
}

/// Where the plan runs are recorded.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RecordFrom {
    Local,
    Mount,
    Both,
}

/// One way of recording the plan runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// `incfs record-trace --root TREE` on the local tree.
    Local,
    /// `incfs record-trace` inside `incfs run` of the image.
    Mount,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlanSource {
    Auto,
    Trace,
    ReadLog,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Debug)]
pub enum Method {
    LocalCold,
    DownloadTarZst,
    DownloadTree,
    RcloneFull,
    RcloneOff,
    NydusLazy,
    NydusPrefetch,
    IncfsLazy,
    IncfsPlanPackLayout,
    IncfsPlanMountRecorded,
    IncfsPlan,
    IncfsWarm,
    IncfsWarmNoPush,
    IncfsWarmReadahead,
    IncfsWarmComplete,
    IncfsWarmCompleteNoFollow,
    IncfsWarmCompleteNoPassthrough,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::LocalCold => "local cold",
            Method::DownloadTarZst => "full download (tar.zst)",
            Method::DownloadTree => "full download (tree)",
            Method::RcloneFull => "rclone full",
            Method::RcloneOff => "rclone off",
            Method::NydusLazy => "nydus lazy",
            Method::NydusPrefetch => "nydus + prefetch list",
            Method::IncfsLazy => "incfs lazy",
            Method::IncfsPlanPackLayout => "incfs + plan, pack layout",
            Method::IncfsPlanMountRecorded => "incfs + plan, mount-recorded",
            Method::IncfsPlan => "incfs + plan",
            Method::IncfsWarm => "incfs warm, partial (push)",
            Method::IncfsWarmNoPush => "incfs warm, partial (no push)",
            Method::IncfsWarmReadahead => "incfs warm, partial (readahead 128K)",
            Method::IncfsWarmComplete => "incfs warm, complete",
            Method::IncfsWarmCompleteNoFollow => "incfs warm, complete (no CPU follow)",
            Method::IncfsWarmCompleteNoPassthrough => "incfs warm, complete (no passthrough)",
        }
    }
}

#[derive(Serialize, Clone)]
pub struct Sample {
    pub method: &'static str,
    pub round: usize,
    pub seconds: f64,
    pub bytes_moved: u64,
    pub requests: u64,
    /// The machine's 1-minute load average when the run started (the machine is shared).
    pub load_avg: f64,
    /// For a lazy or planned `incfs run`: the time from the command's exit until the mount
    /// was gone and the cache recorded (`unmount_ms`), which `seconds` leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmount_s: Option<f64>,
}

#[derive(Serialize)]
pub struct Summary {
    pub method: &'static str,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub bytes_moved: u64,
    pub requests: u64,
    pub ratio_to_ideal: f64,
}

#[derive(Serialize)]
pub struct Results {
    pub workload: String,
    pub latency_ms: u64,
    pub bandwidth_mbit: f64,
    pub rounds: usize,
    pub chunk_size: u32,
    pub plan_source: String,
    /// Where the plan runs were recorded: "local tree", "mount" or "local tree and mount".
    pub record_from: String,
    pub git_commit: String,
    pub started_utc: String,
    pub tree_bytes: u64,
    pub tree_files: u64,
    pub image_bytes: u64,
    pub tar_zst_bytes: u64,
    pub nydus_blob_bytes: u64,
    /// The demand set at its stored size in the image as packed.
    pub demand_set_stored_bytes: u64,
    /// The same pages at their stored size in the hot-first image (which may store planned
    /// chunks differently); the ideal uses the smaller of the two.
    pub demand_set_hot_stored_bytes: u64,
    pub ideal_s: f64,
    pub samples: Vec<Sample>,
    pub summary: Vec<Summary>,
    /// Runs that failed (left out of the medians), with the error.
    pub failures: Vec<String>,
}

/// `incfs run` as the unmeasured setup runs (demand set, plan runs) use it: every read
/// through incfs (passthrough would hide reads from the read-log and from a trace of the
/// mount) and no background fill (it would complete files, and they are not measured).
const SETUP_RUN: [&str; 3] = ["run", "--no-passthrough", "--no-fill"];

/// A fresh, empty cache directory for one `incfs run`, removed when dropped: without
/// `--cache`, a run would use the lasting per-user cache, and start warm.
struct FreshCache(PathBuf);

impl FreshCache {
    /// `out/incfs-cache-NAME`, emptied.
    fn new(out: &Path, name: &str) -> Result<Self> {
        let dir = out.join(format!("incfs-cache-{name}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        Ok(FreshCache(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for FreshCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the methods share: paths, servers, images.
struct Ctx {
    incfs: PathBuf,
    /// Extra arguments of every measured `incfs run`.
    incfs_args: Vec<String>,
    peers_bin: PathBuf,
    work: Workload,
    tree: PathBuf,
    scratch: PathBuf,
    server: Server,
    img_url: String,
    hot_url: String,
    plan: PathBuf,
    hot_plan: PathBuf,
    /// The hot-first image's URL and plan made from mount-recorded runs.
    mount_hot: Option<(String, PathBuf)>,
    nydus_lazy: Option<nydus::NydusImage>,
    nydus_prefetch: Option<nydus::NydusImage>,
    warm: Option<warm::WarmCaches>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut methods: Vec<Method> = if a.methods.is_empty() {
        vec![
            Method::LocalCold,
            Method::DownloadTarZst,
            Method::IncfsLazy,
            Method::IncfsPlanPackLayout,
            Method::IncfsPlan,
        ]
    } else {
        let set: BTreeSet<Method> = a.methods.iter().copied().collect();
        set.into_iter().collect()
    };
    if a.skip_lazy {
        methods.retain(|&m| m != Method::IncfsLazy);
    }
    if a.record_from == RecordFrom::Both
        && methods.contains(&Method::IncfsPlan)
        && !methods.contains(&Method::IncfsPlanMountRecorded)
    {
        methods.push(Method::IncfsPlanMountRecorded);
        methods.sort();
    }
    let incfs = match &a.incfs {
        Some(p) => p.clone(),
        None => workload::sibling("incfs")?,
    };
    if let Some(pair) = a.update {
        return update_bench(&a, pair, &incfs);
    }
    let peers_bin = a.peers_bin.clone().unwrap_or_default();
    let needs = |m: &[Method]| m.iter().any(|x| methods.contains(x));
    if needs(&[Method::NydusLazy, Method::NydusPrefetch])
        && Command::new(peers_bin.join("nydusd"))
            .arg("--version")
            .output()
            .is_err()
    {
        bail!("nydusd not found (in --peers-bin or PATH): run datasets/peers/setup.sh");
    }
    if needs(&[Method::RcloneFull, Method::RcloneOff, Method::DownloadTree])
        && Command::new("rclone").arg("version").output().is_err()
    {
        bail!("rclone not found: run datasets/peers/setup.sh (apt-get install rclone)");
    }
    std::fs::create_dir_all(&a.out)?;
    let out = a.out.canonicalize()?;
    let serve_dir = out.join("serve");
    let tree = serve_dir.join("tree");
    let scratch = out.join("scratch");
    std::fs::create_dir_all(&serve_dir)?;
    let started_utc = utc_now();
    let git_commit = git_commit();

    eprintln!("[bench] building the workload's tree");
    let synth = SynthOptions {
        files: a.synth_files,
        size: a.synth_size.clone(),
        pattern: a.synth_pattern.clone(),
        fraction: a.synth_fraction,
    };
    let work = Workload::build(a.workload, &tree, &out.join("hello.o"), &synth)?;
    let (tree_bytes, tree_files) = tree_size(&tree)?;

    eprintln!("[bench] packing");
    let img = serve_dir.join("image.img");
    let mut pack = Command::new(&incfs);
    pack.arg("pack");
    if let Some(c) = &a.chunk_size {
        pack.args(["--chunk-size", c]);
    }
    check(pack.arg("-o").arg(&img).arg(&tree), "packing")?;
    let image_bytes = std::fs::metadata(&img)?.len();
    let chunk_size = Image::open_path(&img, None)?.manifest().chunk_size;

    let tar = serve_dir.join("tree.tar.zst");
    if methods.contains(&Method::DownloadTarZst) {
        check(
            Command::new("tar")
                .args(["--zstd", "-cf"])
                .arg(&tar)
                .arg("-C")
                .arg(&tree)
                .arg("."),
            "making tree.tar.zst",
        )?;
    }
    let tar_zst_bytes = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);

    // Setup runs go to a second server on the same files without link emulation: what they
    // record does not depend on the link, and they are not measured.
    let fast = Server::start(ServeConfig::new(&serve_dir)).context("starting the setup server")?;
    let mut serve = ServeConfig::new(&serve_dir);
    serve.link = LinkConfig {
        latency_ms: a.latency_ms,
        bandwidth_mbit: Some(a.bandwidth_mbit),
        ..LinkConfig::default()
    };
    let server = Server::start(serve).context("starting incfs serve")?;

    eprintln!("[bench] measuring the demand set (one unmeasured run without plan)");
    let demand_log = out.join("demand.read-log");
    let cache = FreshCache::new(&out, "demand")?;
    check(
        Command::new(&incfs)
            .args(SETUP_RUN)
            .arg("--cache")
            .arg(cache.path())
            .args(["--image", &fast.url("image.img"), "--read-log-out"])
            .arg(&demand_log)
            .arg("--")
            .args(work.argv("{mnt}")),
        "the demand run",
    )?;
    let (demand, read_files) = stored_demand_set(&img, &demand_log)?;

    // The plan, from runs that are not measured.
    let primary = match a.record_from {
        RecordFrom::Mount => Recorded::Mount,
        RecordFrom::Local | RecordFrom::Both => Recorded::Local,
    };
    let setup = PlanSetup {
        incfs: &incfs,
        image_url: fast.url("image.img"),
        work: &work,
        tree: &tree,
        out: &out,
        runs: a.plan_runs,
    };
    let (inputs, source_used) = setup.record(primary, a.plan_source)?;
    let (plan, hot_img, hot_plan) = make_plan(&incfs, &inputs, &img, &serve_dir, &out, "")?;
    let mount_hot = if methods.contains(&Method::IncfsPlanMountRecorded) {
        let (inputs, _) = setup.record(Recorded::Mount, a.plan_source)?;
        let (_, img, plan) = make_plan(&incfs, &inputs, &img, &serve_dir, &out, "-mount")?;
        let name = img
            .file_name()
            .and_then(|n| n.to_str())
            .context("hot image name")?
            .to_owned();
        Some((name, plan))
    } else {
        None
    };
    drop(fast);

    let (demand_hot, _) = stored_demand_set(&hot_img, &demand_log)?;

    let (mut nydus_lazy, mut nydus_prefetch) = (None, None);
    if methods.contains(&Method::NydusLazy) {
        eprintln!("[bench] building the Nydus image");
        nydus_lazy = Some(nydus::build(
            &peers_bin,
            &tree,
            &serve_dir,
            "nydus-lazy",
            None,
        )?);
    }
    if methods.contains(&Method::NydusPrefetch) {
        // The files the workload read in the demand run (not a measured run).
        eprintln!(
            "[bench] building the Nydus image with a prefetch list of {} files",
            read_files.len()
        );
        nydus_prefetch = Some(nydus::build(
            &peers_bin,
            &tree,
            &serve_dir,
            "nydus-prefetch",
            Some(&read_files),
        )?);
    }
    let warm = if methods.iter().any(|&m| warm::is_warm(m)) {
        Some(warm::prepare(
            &incfs,
            &out,
            &serve_dir,
            "image-hot.img",
            &hot_plan,
            &work.argv("{mnt}"),
        )?)
    } else {
        None
    };
    let nydus_blob_bytes = nydus_lazy
        .as_ref()
        .or(nydus_prefetch.as_ref())
        .map_or(0, |n| n.blob_bytes);

    eprintln!(
        "[bench] {}: {} rounds over an emulated {} ms / {} Mbit/s link",
        work.title, a.runs, a.latency_ms, a.bandwidth_mbit
    );
    let mount_hot = mount_hot.map(|(name, plan)| (server.url(&name), plan));
    let ctx = Ctx {
        incfs_args: a.incfs_arg.clone(),
        incfs: incfs.clone(),
        peers_bin,
        img_url: server.url("image.img"),
        hot_url: server.url("image-hot.img"),
        work,
        tree,
        scratch,
        server,
        plan,
        hot_plan,
        mount_hot,
        nydus_lazy,
        nydus_prefetch,
        warm,
    };
    let json = a.json.clone().unwrap_or_else(|| out.join("results.json"));
    let mut results = Results {
        workload: ctx.work.title.clone(),
        latency_ms: a.latency_ms,
        bandwidth_mbit: a.bandwidth_mbit,
        rounds: 0,
        chunk_size,
        plan_source: match source_used {
            PlanSource::Trace => "ebpf trace",
            _ => "read-log",
        }
        .into(),
        record_from: match a.record_from {
            RecordFrom::Local => "local tree",
            RecordFrom::Mount => "mount",
            RecordFrom::Both => "local tree and mount",
        }
        .into(),
        git_commit,
        started_utc,
        tree_bytes,
        tree_files,
        image_bytes,
        tar_zst_bytes,
        nydus_blob_bytes,
        demand_set_stored_bytes: demand,
        demand_set_hot_stored_bytes: demand_hot,
        ideal_s: 0.0,
        samples: Vec::new(),
        summary: Vec::new(),
        failures: Vec::new(),
    };
    for round in 0..a.runs {
        for &m in &methods {
            match run_method(&ctx, m, round) {
                Ok(s) => {
                    eprintln!(
                        "[bench] round {round} {:<26} {:>7.2} s  {:>7.1} MiB  {:>5} requests{}",
                        m.label(),
                        s.seconds,
                        s.bytes_moved as f64 / 1048576.0,
                        s.requests,
                        s.unmount_s
                            .map(|u| format!("  (then {u:.2} s to unmount)"))
                            .unwrap_or_default()
                    );
                    results.samples.push(s);
                }
                Err(e) => {
                    eprintln!("[bench] round {round} {}: FAILED: {e:#}", m.label());
                    results
                        .failures
                        .push(format!("round {round}, {}: {e:#}", m.label()));
                }
            }
        }
        // The outputs after every round, so that a bench cut short still leaves its figures.
        results.rounds = round + 1;
        let local = report::median_of(&results.samples, Method::LocalCold.label());
        let link_ideal = a.latency_ms as f64 / 1e3
            + demand.min(demand_hot) as f64 * 8.0 / (a.bandwidth_mbit * 1e6);
        results.ideal_s = local.map_or(link_ideal, |l| l.max(link_ideal));
        results.summary = report::summarize(&results.samples, &methods, results.ideal_s);
        std::fs::write(out.join("table.md"), report::markdown(&results))?;
        std::fs::write(out.join("plot.svg"), report::svg(&results))?;
        std::fs::write(&json, serde_json::to_vec_pretty(&results)?)?;
        if let Some(w) = &ctx.warm {
            let (md, raw) = w.report(&results.samples, &methods);
            std::fs::write(out.join("warm.md"), md)?;
            std::fs::write(out.join("warm.json"), raw)?;
        }
    }
    println!("{}", report::markdown(&results));
    if let Some(w) = &ctx.warm {
        println!("{}", w.report(&results.samples, &methods).0);
    }
    eprintln!(
        "[bench] raw runs in {}, table in {}, plot in {}",
        json.display(),
        out.join("table.md").display(),
        out.join("plot.svg").display()
    );
    Ok(())
}

/// One timed run of one method, from a dropped page cache and empty caches.
fn run_method(ctx: &Ctx, m: Method, round: usize) -> Result<Sample> {
    let scratch = &ctx.scratch;
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)
            .with_context(|| format!("emptying {}", scratch.display()))?;
    }
    let mnt = scratch.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    drop_caches();
    ctx.server.reset_stats();
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let t = Instant::now();
    let mut unmount_s = None;
    let seconds = match m {
        Method::LocalCold => {
            run_workload(ctx.work.command(&ctx.tree), m)?;
            t.elapsed().as_secs_f64()
        }
        Method::DownloadTarZst => {
            let bytes = fetch_whole(&ctx.server.url("tree.tar.zst"))?;
            let tar = scratch.join("tree.tar.zst");
            std::fs::write(&tar, bytes)?;
            let dest = scratch.join("tree");
            std::fs::create_dir_all(&dest)?;
            check(
                Command::new("tar")
                    .args(["--zstd", "-xf"])
                    .arg(&tar)
                    .arg("-C")
                    .arg(&dest),
                "unpacking tree.tar.zst",
            )?;
            run_workload(ctx.work.command(&dest), m)?;
            t.elapsed().as_secs_f64()
        }
        Method::DownloadTree => {
            let dest = scratch.join("tree");
            rclone::copy(&ctx.server.url("tree/"), &dest)?;
            run_workload(ctx.work.command(&dest), m)?;
            t.elapsed().as_secs_f64()
        }
        Method::RcloneFull | Method::RcloneOff => {
            let mode = if m == Method::RcloneFull {
                rclone::CacheMode::Full
            } else {
                rclone::CacheMode::Off
            };
            let mut d = rclone::mount(
                &ctx.server.url("tree/"),
                &mnt,
                &scratch.join("rclone-cache"),
                mode,
                &scratch.join("rclone.log"),
            )?;
            let r = run_workload(ctx.work.command(&mnt), m);
            let secs = t.elapsed().as_secs_f64();
            if let Err(e) = r {
                bail!("{e:#}\nrclone's log:\n{}", d.log_tail());
            }
            d.stop();
            secs
        }
        Method::NydusLazy | Method::NydusPrefetch => {
            let img = if m == Method::NydusLazy {
                ctx.nydus_lazy.as_ref()
            } else {
                ctx.nydus_prefetch.as_ref()
            }
            .context("the Nydus image was not built")?;
            // The bootstrap (metadata) comes over the link too, as from a registry.
            let boot = scratch.join("bootstrap");
            std::fs::write(&boot, fetch_whole(&ctx.server.url(&img.bootstrap_rel))?)?;
            let base = ctx.server.url("");
            let mut d = nydus::mount(
                &ctx.peers_bin,
                img,
                base.trim_end_matches('/'),
                &boot,
                &mnt,
                scratch,
                m == Method::NydusPrefetch,
            )?;
            let r = run_workload(ctx.work.command(&mnt), m);
            let secs = t.elapsed().as_secs_f64();
            if let Err(e) = r {
                bail!("{e:#}\nnydusd's log:\n{}", d.log_tail());
            }
            d.stop();
            secs
        }
        Method::IncfsWarm
        | Method::IncfsWarmNoPush
        | Method::IncfsWarmReadahead
        | Method::IncfsWarmComplete
        | Method::IncfsWarmCompleteNoFollow
        | Method::IncfsWarmCompleteNoPassthrough => ctx
            .warm
            .as_ref()
            .context("the warm caches were not prepared")?
            .run(
                &ctx.incfs,
                &ctx.hot_url,
                &ctx.work.argv("{mnt}"),
                scratch,
                m,
                round,
            )?,
        Method::IncfsLazy
        | Method::IncfsPlan
        | Method::IncfsPlanPackLayout
        | Method::IncfsPlanMountRecorded => {
            let stats_file = scratch.join("run-stats.json");
            let mut cmd = Command::new(&ctx.incfs);
            // `scratch` is emptied before every run: a cold cache.
            cmd.arg("run").arg("--stats-json").arg(&stats_file);
            cmd.arg("--cache").arg(scratch.join("incfs-cache"));
            match m {
                Method::IncfsLazy => {
                    cmd.args(["--image", &ctx.img_url]);
                }
                Method::IncfsPlanPackLayout => {
                    cmd.args(["--image", &ctx.img_url, "--prefetch"])
                        .arg(&ctx.plan);
                }
                Method::IncfsPlanMountRecorded => {
                    let (url, plan) = ctx
                        .mount_hot
                        .as_ref()
                        .context("no mount-recorded plan was made")?;
                    cmd.args(["--image", url, "--prefetch"]).arg(plan);
                }
                _ => {
                    cmd.args(["--image", &ctx.hot_url, "--prefetch"])
                        .arg(&ctx.hot_plan);
                }
            }
            cmd.args(&ctx.incfs_args);
            cmd.arg("--").args(ctx.work.argv("{mnt}"));
            check(&mut cmd, m.label())?;
            // The mount (the image's metadata fetched over the link) and the command, as
            // `incfs run` timed them; the unmount apart (the peers' unmounts are not timed).
            let j: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&stats_file)
                    .with_context(|| format!("reading {}", stats_file.display()))?,
            )?;
            let (Some(mount_ms), Some(wall_ms)) = (j["mount_ms"].as_f64(), j["wall_ms"].as_f64())
            else {
                bail!("{}: no mount_ms or wall_ms", stats_file.display());
            };
            unmount_s = j["unmount_ms"].as_f64().map(|ms| ms / 1e3);
            (mount_ms + wall_ms) / 1e3
        }
    };
    let _ = std::fs::remove_dir_all(scratch);
    let st = ctx.server.stats();
    Ok(Sample {
        method: m.label(),
        round,
        seconds,
        bytes_moved: st.bytes_sent,
        requests: st.requests,
        load_avg,
        unmount_s,
    })
}

/// What recording the plan runs needs.
struct PlanSetup<'a> {
    incfs: &'a Path,
    /// The image on the setup server (no link emulation).
    image_url: String,
    work: &'a Workload,
    tree: &'a Path,
    out: &'a Path,
    runs: usize,
}

impl PlanSetup<'_> {
    /// Records the plan runs `how`, from `source`; returns the inputs and the source used.
    fn record(&self, how: Recorded, source: PlanSource) -> Result<(Vec<PathBuf>, PlanSource)> {
        let tag = match how {
            Recorded::Local => "local",
            Recorded::Mount => "mount",
        };
        let mut source_used = source;
        let mut inputs = Vec::new();
        for i in 0..self.runs {
            drop_caches();
            let mut done = false;
            if matches!(source_used, PlanSource::Auto | PlanSource::Trace) {
                let trace = self.out.join(format!("plan-run-{tag}-{i}.parquet"));
                let mut cmd = Command::new(self.incfs);
                let cache = FreshCache::new(self.out, &format!("plan-{tag}-{i}"))?;
                match how {
                    // The README's way: the tree on local disk, read through the
                    // recorder's readahead-0 view.
                    Recorded::Local => {
                        cmd.args(["record-trace", "-o"])
                            .arg(&trace)
                            .arg("--root")
                            .arg(self.tree)
                            .arg("--")
                            .args(self.work.argv(&self.tree.to_string_lossy()));
                    }
                    Recorded::Mount => {
                        cmd.args(SETUP_RUN)
                            .arg("--cache")
                            .arg(cache.path())
                            .args(["--image", &self.image_url, "--"])
                            .arg(self.incfs)
                            .args(["record-trace", "-o"])
                            .arg(&trace)
                            .args(["--root", "{mnt}", "--no-view", "--"])
                            .args(self.work.argv("{mnt}"));
                    }
                }
                match check(&mut cmd, "recording a trace") {
                    Ok(()) => {
                        source_used = PlanSource::Trace;
                        inputs.push(trace);
                        done = true;
                    }
                    Err(e) if source_used == PlanSource::Auto => {
                        eprintln!(
                            "[bench] eBPF recording unavailable ({e:#}); planning from the mount's read-log instead"
                        );
                        source_used = PlanSource::ReadLog;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !done {
                let log = self.out.join(format!("plan-run-{tag}-{i}.read-log"));
                let cache = FreshCache::new(self.out, &format!("plan-{tag}-{i}"))?;
                check(
                    Command::new(self.incfs)
                        .args(SETUP_RUN)
                        .arg("--cache")
                        .arg(cache.path())
                        .args(["--image", &self.image_url, "--read-log-out"])
                        .arg(&log)
                        .arg("--")
                        .args(self.work.argv("{mnt}")),
                    "a plan run",
                )?;
                source_used = PlanSource::ReadLog;
                inputs.push(log);
            }
        }
        Ok((inputs, source_used))
    }
}

/// Plans from `inputs` and relays the image out hot-first; returns the plan, the hot-first
/// image (in `serve_dir`) and its plan. `tag` tells the files of a second plan apart.
fn make_plan(
    incfs: &Path,
    inputs: &[PathBuf],
    img: &Path,
    serve_dir: &Path,
    out: &Path,
    tag: &str,
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let plan = out.join(format!("image{tag}.plan.json"));
    eprintln!("[bench] planning from {} runs", inputs.len());
    check(
        Command::new(incfs)
            .arg("plan")
            .args(inputs)
            .arg("--image")
            .arg(img)
            .arg("-o")
            .arg(&plan),
        "planning",
    )?;
    let hot_img = serve_dir.join(format!("image-hot{tag}.img"));
    let hot_plan = out.join(format!("image-hot{tag}.plan.json"));
    check(
        Command::new(incfs)
            .arg("relayout")
            .arg(img)
            .arg("--plan")
            .arg(&plan)
            .arg("-o")
            .arg(&hot_img)
            .arg("--plan-out")
            .arg(&hot_plan),
        "relaying out hot-first",
    )?;
    Ok((plan, hot_img, hot_plan))
}

fn run_workload(mut cmd: Command, m: Method) -> Result<()> {
    check(&mut cmd, m.label())
}

fn fetch_whole(url: &str) -> Result<Vec<u8>> {
    let src = HttpSource::open(url, &HttpConfig::default())
        .with_context(|| format!("connecting to {url}"))?;
    let len = src.total_len()?;
    Ok(src.read_range(0, len, RequestKind::Background)?)
}

pub fn check(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Drops the page cache (clean pages) so every start is cold. Needs root; without it the
/// figures are warm starts, which the bench says.
fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("[bench] warning: cannot drop the page cache (not root?): starts are not cold");
    }
}

/// Bytes and regular files under `dir`.
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                bytes += e.metadata()?.len();
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

/// Stored bytes of the distinct chunks that a read-log's reads touched, and the files read
/// (image paths, in order of first read).
fn stored_demand_set(img: &Path, read_log: &Path) -> Result<(u64, Vec<String>)> {
    let image = Image::open_path(img, None)?;
    let chunk = u64::from(image.manifest().chunk_size);
    let files: std::collections::HashMap<String, (u64, u64)> = image
        .files()
        .into_iter()
        .map(|f| (f.display_path(), (f.first_chunk, f.chunks)))
        .collect();
    let mut chunks = HashSet::new();
    let mut read_files = Vec::new();
    let mut seen = HashSet::new();
    for line in std::fs::read_to_string(read_log)
        .with_context(|| format!("reading {}", read_log.display()))?
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: a line is not JSON", read_log.display()))?;
        let (Some(path), Some(off), Some(len)) =
            (v["path"].as_str(), v["offset"].as_u64(), v["len"].as_u64())
        else {
            continue;
        };
        let Some(&(first, n)) = files.get(path) else {
            continue;
        };
        if seen.insert(path.to_string()) {
            read_files.push(path.to_string());
        }
        if len == 0 {
            continue;
        }
        for c in off / chunk..=((off + len - 1) / chunk).min(n.saturating_sub(1)) {
            if let Some(e) = image.table().get(first + c) {
                chunks.insert((e.stored_offset, u64::from(e.stored_len)));
            }
        }
    }
    Ok((chunks.iter().map(|(_, l)| l).sum(), read_files))
}

fn git_commit() -> String {
    Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `--update PAIR`: runs `datasets/updates/bench.sh` (the flow of the update bench as
/// a user's commands: pack, plan, relayout with `--base`, `plan carry`, `diff`, `run`).
fn update_bench(a: &Args, pair: UpdatePair, incfs: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("updates/bench.sh");
    let pair = match pair {
        UpdatePair::Numpy => "numpy",
        UpdatePair::Python => "python",
    };
    let mut cmd = Command::new(&script);
    cmd.arg(pair)
        .arg(&a.out)
        .env("INCFS", incfs)
        .env("RUNS", a.runs.to_string())
        .env("LATENCY_MS", a.latency_ms.to_string())
        .env("BANDWIDTH_MBIT", a.bandwidth_mbit.to_string());
    let st = cmd
        .status()
        .with_context(|| format!("starting {}", script.display()))?;
    if !st.success() {
        bail!("the update bench ({}) failed: {st}", script.display());
    }
    Ok(())
}
