//! The end-to-end bench: how long a program takes to start from an image served over an
//! emulated link, by method, side by side.
//!
//! Workload: clang-22 compiling hello.c from its tree (datasets/clang/build-tree.sh).
//! Methods, interleaved in every round, page cache dropped before each:
//! - `local cold`: the tree on local disk, page cache dropped (the limit);
//! - `full download`: fetch the whole image over the link, then a local cold start;
//! - `incfs lazy`: `incfs run` of the image, no plan;
//! - `incfs + plan`: `incfs run` with a plan made from other runs (never the measured one);
//! - `incfs + plan, hot-first`: the same plan on the image relaid hot-first.
//!
//! The link is `incfs serve`'s emulation (per-request latency + one shared token bucket),
//! in this process. The ideal is max(local cold, latency + stored demand set / bandwidth), where
//! the demand set is the chunks that the reads of a measured run touched (what FUSE asked
//! for, as the mount's read-log records it whether the chunk was local or not; kernel
//! readahead is off by default), counted at their stored (compressed) size.

use std::collections::HashSet;
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

#[derive(Parser)]
#[command(about = "Start-time bench of incfs against local and full-download starts")]
struct Args {
    /// Working directory (tree, images, plans, results).
    #[arg(long, default_value = "out/bench")]
    out: PathBuf,
    /// Emulated one-way request latency, ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Emulated bandwidth, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth_mbit: f64,
    /// Measured rounds (each runs every method once); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs recorded to make the plan (not measured).
    #[arg(long, default_value_t = 2)]
    plan_runs: usize,
    /// Chunk size of the image.
    #[arg(long, default_value = "16K")]
    chunk_size: String,
    /// Where the plan's input comes from: eBPF traces, the mount's read-log, or eBPF when
    /// it works and the read-log otherwise.
    #[arg(long, value_enum, default_value_t = PlanSource::Auto)]
    plan_source: PlanSource,
    /// The incfs binary (default: next to this one).
    #[arg(long)]
    incfs: Option<PathBuf>,
    /// Leave out the `incfs lazy` method (no plan), the slowest by far.
    #[arg(long)]
    skip_lazy: bool,
    /// Write every run and the medians as JSON here (default: OUT/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlanSource {
    Auto,
    Trace,
    ReadLog,
}

#[derive(Serialize, Clone)]
struct Sample {
    method: &'static str,
    round: usize,
    seconds: f64,
    bytes_moved: u64,
    requests: u64,
    blocked_reads: Option<u64>,
}

#[derive(Serialize)]
struct Summary {
    method: &'static str,
    median_s: f64,
    min_s: f64,
    max_s: f64,
    bytes_moved: u64,
    requests: u64,
    ratio_to_ideal: f64,
}

#[derive(Serialize)]
struct Results {
    workload: &'static str,
    latency_ms: u64,
    bandwidth_mbit: f64,
    chunk_size: String,
    plan_source: String,
    image_bytes: u64,
    demand_set_stored_bytes: u64,
    ideal_s: f64,
    samples: Vec<Sample>,
    summary: Vec<Summary>,
}

const METHODS: [&str; 5] = [
    "local cold",
    "full download",
    "incfs lazy",
    "incfs + plan",
    "incfs + plan, hot-first",
];

fn main() -> Result<()> {
    let a = Args::parse();
    let incfs = match &a.incfs {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this executable")?
            .join("incfs"),
    };
    if !incfs.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p incfs-cli) or pass --incfs",
            incfs.display()
        );
    }
    std::fs::create_dir_all(&a.out)?;
    let out = a.out.canonicalize()?;
    let serve_dir = out.join("serve");
    std::fs::create_dir_all(&serve_dir)?;

    eprintln!("[bench] building the clang-22 tree");
    let tree = out.join("clang-tree");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("clang/build-tree.sh");
    check(Command::new(&recipe).arg(&tree), "building the clang tree")?;
    let obj = out.join("hello.o");
    let clang_args = |root: &str| -> Vec<String> {
        vec![
            format!("{root}/bin/clang"),
            "-c".into(),
            format!("{root}/hello.c"),
            "-o".into(),
            obj.to_string_lossy().into_owned(),
        ]
    };

    eprintln!("[bench] packing (chunk size {})", a.chunk_size);
    let img = serve_dir.join("clang.img");
    check(
        Command::new(&incfs)
            .args(["pack", "--chunk-size", &a.chunk_size, "-o"])
            .arg(&img)
            .arg(&tree),
        "packing",
    )?;
    let image_bytes = std::fs::metadata(&img)?.len();

    let mut serve = ServeConfig::new(&serve_dir);
    serve.link = LinkConfig {
        latency_ms: a.latency_ms,
        bandwidth_mbit: Some(a.bandwidth_mbit),
        ..LinkConfig::default()
    };
    let server = Server::start(serve).context("starting incfs serve")?;
    let url = server.url("clang.img");
    let hot_url = server.url("clang-hot.img");
    eprintln!(
        "[bench] serving {} over an emulated {} ms / {} Mbit/s link",
        serve_dir.display(),
        a.latency_ms,
        a.bandwidth_mbit
    );

    // The plan, from runs that are not measured.
    let mut source_used = a.plan_source;
    let mut inputs = Vec::new();
    for i in 0..a.plan_runs {
        drop_caches();
        let mut done = false;
        if matches!(source_used, PlanSource::Auto | PlanSource::Trace) {
            let trace = out.join(format!("plan-run-{i}.parquet"));
            let mut cmd = Command::new(&incfs);
            cmd.args(["run", "--image", &url, "--"])
                .arg(&incfs)
                .args(["record-trace", "-o"])
                .arg(&trace)
                .args(["--root", "{mnt}", "--"])
                .args(clang_args("{mnt}"));
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
            let log = out.join(format!("plan-run-{i}.read-log"));
            check(
                Command::new(&incfs)
                    .args(["run", "--image", &url, "--read-log-out"])
                    .arg(&log)
                    .arg("--")
                    .args(clang_args("{mnt}")),
                "a plan run",
            )?;
            source_used = PlanSource::ReadLog;
            inputs.push(log);
        }
    }
    let plan = out.join("clang.plan.json");
    eprintln!("[bench] planning from {} runs", inputs.len());
    check(
        Command::new(&incfs)
            .arg("plan")
            .args(&inputs)
            .arg("--image")
            .arg(&img)
            .arg("-o")
            .arg(&plan),
        "planning",
    )?;
    let hot_img = serve_dir.join("clang-hot.img");
    let hot_plan = out.join("clang-hot.plan.json");
    check(
        Command::new(&incfs)
            .arg("relayout")
            .arg(&img)
            .arg("--plan")
            .arg(&plan)
            .arg("-o")
            .arg(&hot_img)
            .arg("--plan-out")
            .arg(&hot_plan),
        "relaying out hot-first",
    )?;

    let mut samples = Vec::new();
    let mut demand_set = None;
    for round in 0..a.runs {
        for method in METHODS {
            if a.skip_lazy && method == "incfs lazy" {
                continue;
            }
            drop_caches();
            server.reset_stats();
            let stats_file = out.join("run-stats.json");
            let _ = std::fs::remove_file(&stats_file);
            let t = Instant::now();
            let seconds = match method {
                "local cold" => {
                    check(
                        Command::new(&clang_args(&tree.to_string_lossy())[0])
                            .args(&clang_args(&tree.to_string_lossy())[1..]),
                        "local run",
                    )?;
                    t.elapsed().as_secs_f64()
                }
                "full download" => {
                    let src =
                        HttpSource::open(&url, &HttpConfig::default()).context("connecting")?;
                    let len = src.total_len()?;
                    let bytes = src.read_range(0, len, RequestKind::Background)?;
                    std::fs::write(out.join("downloaded.img"), &bytes)?;
                    let after_download = t.elapsed().as_secs_f64();
                    drop_caches();
                    let t2 = Instant::now();
                    check(
                        Command::new(&clang_args(&tree.to_string_lossy())[0])
                            .args(&clang_args(&tree.to_string_lossy())[1..]),
                        "local run",
                    )?;
                    after_download + t2.elapsed().as_secs_f64()
                }
                _ => {
                    let mut cmd = Command::new(&incfs);
                    cmd.arg("run").arg("--stats-json").arg(&stats_file);
                    match method {
                        "incfs lazy" => {
                            cmd.args(["--image", &url]);
                        }
                        "incfs + plan" => {
                            cmd.args(["--image", &url, "--prefetch"]).arg(&plan);
                            if demand_set.is_none() {
                                cmd.arg("--read-log-out").arg(out.join("measured.read-log"));
                            }
                        }
                        _ => {
                            cmd.args(["--image", &hot_url, "--prefetch"]).arg(&hot_plan);
                        }
                    }
                    cmd.arg("--").args(clang_args("{mnt}"));
                    check(&mut cmd, method)?;
                    let j: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&stats_file)?)?;
                    (j["mount_ms"].as_f64().unwrap_or(0.0) + j["wall_ms"].as_f64().unwrap_or(0.0))
                        / 1e3
                }
            };
            let blocked = std::fs::read(&stats_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|j| j["blocked_reads"].as_u64());
            let st = server.stats();
            eprintln!(
                "[bench] round {round} {method:<24} {seconds:>7.2} s  {:>7.1} MiB  {:>5} requests",
                st.bytes_sent as f64 / 1048576.0,
                st.requests
            );
            samples.push(Sample {
                method,
                round,
                seconds,
                bytes_moved: st.bytes_sent,
                requests: st.requests,
                blocked_reads: blocked,
            });
            if method == "incfs + plan" && demand_set.is_none() {
                demand_set = Some(stored_demand_set(&img, &out.join("measured.read-log"))?);
            }
        }
    }

    let demand = demand_set.unwrap_or(0);
    let median = |m: &str| -> (f64, f64, f64, u64, u64) {
        let mut v: Vec<&Sample> = samples.iter().filter(|s| s.method == m).collect();
        v.sort_by(|x, y| x.seconds.total_cmp(&y.seconds));
        let mid = v[v.len() / 2];
        (
            mid.seconds,
            v[0].seconds,
            v[v.len() - 1].seconds,
            mid.bytes_moved,
            mid.requests,
        )
    };
    let local = median("local cold").0;
    let ideal =
        local.max(a.latency_ms as f64 / 1e3 + demand as f64 * 8.0 / (a.bandwidth_mbit * 1e6));
    let summary: Vec<Summary> = METHODS
        .iter()
        .filter(|&&m| samples.iter().any(|s| s.method == m))
        .map(|&m| {
            let (med, min, max, bytes, reqs) = median(m);
            Summary {
                method: m,
                median_s: med,
                min_s: min,
                max_s: max,
                bytes_moved: bytes,
                requests: reqs,
                ratio_to_ideal: med / ideal,
            }
        })
        .collect();
    let best = summary.last().map_or(1.0, |s| s.median_s);
    println!();
    println!(
        "clang-22 -c hello.c, {} ms / {} Mbit/s, {} rounds (medians), image {:.1} MiB, demand set {:.1} MiB stored, ideal {:.2} s",
        a.latency_ms,
        a.bandwidth_mbit,
        a.runs,
        image_bytes as f64 / 1048576.0,
        demand as f64 / 1048576.0,
        ideal
    );
    println!();
    println!(
        "| method | median s | min–max s | MiB moved | requests | × ideal | hot-first incfs is faster by |"
    );
    println!("|---|---|---|---|---|---|---|");
    for s in &summary {
        println!(
            "| {} | {:.2} | {:.2}–{:.2} | {:.1} | {} | {:.2} | {:.1}× |",
            s.method,
            s.median_s,
            s.min_s,
            s.max_s,
            s.bytes_moved as f64 / 1048576.0,
            s.requests,
            s.ratio_to_ideal,
            s.median_s / best
        );
    }
    let results = Results {
        workload: "clang-22 -c hello.c",
        latency_ms: a.latency_ms,
        bandwidth_mbit: a.bandwidth_mbit,
        chunk_size: a.chunk_size.clone(),
        plan_source: match source_used {
            PlanSource::Trace => "ebpf trace",
            _ => "read-log",
        }
        .into(),
        image_bytes,
        demand_set_stored_bytes: demand,
        ideal_s: ideal,
        samples,
        summary,
    };
    let json = a.json.clone().unwrap_or_else(|| out.join("results.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(&results)?)?;
    eprintln!("[bench] raw runs in {}", json.display());
    Ok(())
}

fn check(cmd: &mut Command, what: &str) -> Result<()> {
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

/// Stored bytes of the distinct chunks that a read-log's reads touched.
fn stored_demand_set(img: &Path, read_log: &Path) -> Result<u64> {
    let image = Image::open_path(img, None)?;
    let chunk = u64::from(image.manifest().chunk_size);
    let files: std::collections::HashMap<String, (u64, u64)> = image
        .files()
        .into_iter()
        .map(|f| (f.display_path(), (f.first_chunk, f.chunks)))
        .collect();
    let mut chunks = HashSet::new();
    for line in std::fs::read_to_string(read_log)
        .with_context(|| format!("reading {}", read_log.display()))?
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(path), Some(off), Some(len)) =
            (v["path"].as_str(), v["offset"].as_u64(), v["len"].as_u64())
        else {
            continue;
        };
        let Some(&(first, n)) = files.get(path) else {
            continue;
        };
        if len == 0 {
            continue;
        }
        for c in off / chunk..=((off + len - 1) / chunk).min(n.saturating_sub(1)) {
            if let Some(e) = image.table().get(first + c) {
                chunks.insert((e.stored_offset, u64::from(e.stored_len)));
            }
        }
    }
    Ok(chunks.iter().map(|(_, l)| l).sum())
}
