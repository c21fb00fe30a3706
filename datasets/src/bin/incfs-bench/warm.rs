//! Warm-cache rows: a start from a cache that already holds what the program needs, with the
//! page cache dropped, beside `local cold` (issue 20, `docs/local-reads.md`).
//!
//! Two caches are prepared once, before the rounds, from an unthrottled server (not timed):
//! - partial: one planned start (the hot-first image and its plan) fetched the program's
//!   demand set, so the big files (libLLVM, …) stay partly local;
//! - complete: every file of the tree read whole through a mount, so every file is local and
//!   opens with passthrough.
//!
//! Each measured run is `incfs run` of the hot-first image over the emulated link with one of
//! those caches, no plan. The time is the command's (`wall_ms`): the mount's metadata fetch
//! over the link is not a local read. Methods:
//! - `incfs-warm`: partial cache, local data pushed into the page cache at first open (the
//!   default);
//! - `incfs-warm-no-push`: partial cache, `--no-push-local` (every local page a FUSE read);
//! - `incfs-warm-readahead`: partial cache (a fresh copy for every run: readahead fetches
//!   more), no push, `--max-readahead 131072`;
//! - `incfs-warm-complete`: complete cache (passthrough);
//! - `incfs-warm-complete-no-follow`: complete cache, `--no-follow-cpu` (event-loop threads
//!   wherever the scheduler puts them, `docs/local-reads.md`);
//! - `incfs-warm-complete-no-passthrough`: a copy of the complete cache whose last start had
//!   no passthrough either, `--no-passthrough`: what an ordinary user's mount does (the
//!   kernel registers backing files only for root), every file's local data pushed into the
//!   page cache at its first open.
//!
//! A cache's last start opened what the workload opens (the complete cache is made by
//! reading every file, then one start of the workload), so each run's mount reads those
//! files ahead from the backing files as a user's second start would.
//!
//! Besides the main table, `OUT/warm.md` lists each row's median against local cold with the
//! FUSE reads, pushed bytes, passthrough opens and bytes fetched of its median run.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use incfs_fs::serve::{ServeConfig, Server};

use crate::{Method, Sample, check, report};

/// Kernel readahead of the `incfs-warm-readahead` row: the kernel's default window.
const READAHEAD: u32 = 128 * 1024;

/// What one warm run reported besides its time.
#[derive(Clone, serde::Serialize)]
pub struct WarmStat {
    pub method: &'static str,
    pub round: usize,
    pub seconds: f64,
    pub reads: u64,
    pub pushed_bytes: u64,
    pub passthrough_opens: u64,
    pub cached_opens: u64,
    pub bytes_fetched: u64,
    /// Bytes of backing files the mount read ahead from the last start's opens.
    pub bytes_warmed: u64,
}

/// The prepared caches and what their runs reported.
pub struct WarmCaches {
    partial: PathBuf,
    complete: PathBuf,
    /// A copy of the complete cache whose last start had no passthrough, for the
    /// `--no-passthrough` row (what a mount reads ahead follows how its last start opened).
    complete_no_pt: PathBuf,
    stats: RefCell<Vec<WarmStat>>,
}

/// True for the methods this module runs.
pub fn is_warm(m: Method) -> bool {
    matches!(
        m,
        Method::IncfsWarm
            | Method::IncfsWarmNoPush
            | Method::IncfsWarmReadahead
            | Method::IncfsWarmComplete
            | Method::IncfsWarmCompleteNoFollow
            | Method::IncfsWarmCompleteNoPassthrough
    )
}

/// Prepares the caches under `out` for the hot-first image `hot_img` (served from
/// `serve_dir`) and its plan, running `argv` (the workload, `{mnt}` for the mount).
pub fn prepare(
    incfs: &Path,
    out: &Path,
    serve_dir: &Path,
    hot_img: &str,
    hot_plan: &Path,
    argv: &[String],
) -> Result<WarmCaches> {
    let fast = Server::start(ServeConfig::new(serve_dir)).context("starting the setup server")?;
    let url = fast.url(hot_img);
    let w = WarmCaches {
        partial: out.join("warm-cache-partial"),
        complete: out.join("warm-cache-complete"),
        complete_no_pt: out.join("warm-cache-complete-no-passthrough"),
        stats: RefCell::new(Vec::new()),
    };
    for d in [&w.partial, &w.complete, &w.complete_no_pt] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("emptying {}", d.display()))?;
        }
    }
    eprintln!("[bench] warm caches: one planned start");
    // Without the background fill, which would complete every file (the partial cache
    // would then be the complete one).
    check(
        Command::new(incfs)
            .args(["run", "--no-fill", "--image", &url, "--prefetch"])
            .arg(hot_plan)
            .arg("--cache")
            .arg(&w.partial)
            .arg("--")
            .args(argv),
        "the planned start filling the partial cache",
    )?;
    eprintln!("[bench] warm caches: every file read whole");
    check(
        Command::new(incfs)
            .args(["run", "--image", &url, "--cache"])
            .arg(&w.complete)
            .args([
                "--",
                "sh",
                "-c",
                "find {mnt} -type f -exec cat {} + > /dev/null",
            ]),
        "reading every file to fill the complete cache",
    )?;
    // The complete cache's last start is the workload's, as a user's would be.
    check(
        Command::new(incfs)
            .args(["run", "--image", &url, "--cache"])
            .arg(&w.complete)
            .arg("--")
            .args(argv),
        "one start of the workload from the complete cache",
    )?;
    check(
        Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(&w.complete)
            .arg(&w.complete_no_pt),
        "copying the complete cache",
    )?;
    check(
        Command::new(incfs)
            .args(["run", "--no-passthrough", "--image", &url, "--cache"])
            .arg(&w.complete_no_pt)
            .arg("--")
            .args(argv),
        "one start of the workload without passthrough",
    )?;
    Ok(w)
}

impl WarmCaches {
    /// One measured warm run of `m` from `img_url` (the hot-first image over the link);
    /// returns the command's seconds. The page cache was dropped by the caller.
    pub fn run(
        &self,
        incfs: &Path,
        img_url: &str,
        argv: &[String],
        scratch: &Path,
        m: Method,
        round: usize,
    ) -> Result<f64> {
        if m == Method::IncfsWarmReadahead {
            // A fresh copy of the partial cache, then the page cache dropped again.
            let copy = scratch.join("warm-cache");
            check(
                Command::new("cp")
                    .args(["-a", "--sparse=always"])
                    .arg(&self.partial)
                    .arg(&copy),
                "copying the partial cache",
            )?;
            crate::drop_caches();
        }
        let stats_file = scratch.join("warm-stats.json");
        let mut cmd = Command::new(incfs);
        cmd.args(["run", "--image", img_url, "--stats-json"])
            .arg(&stats_file)
            .arg("--cache");
        // The partial cache stays partial: no background fill in its runs.
        match m {
            Method::IncfsWarm => cmd.arg(&self.partial).arg("--no-fill"),
            Method::IncfsWarmNoPush => cmd
                .arg(&self.partial)
                .args(["--no-fill", "--no-push-local"]),
            Method::IncfsWarmReadahead => cmd
                .arg(scratch.join("warm-cache"))
                .args(["--no-fill", "--no-push-local"])
                .args(["--max-readahead", &READAHEAD.to_string()]),
            Method::IncfsWarmComplete => cmd.arg(&self.complete),
            Method::IncfsWarmCompleteNoFollow => cmd.arg(&self.complete).arg("--no-follow-cpu"),
            Method::IncfsWarmCompleteNoPassthrough => {
                cmd.arg(&self.complete_no_pt).arg("--no-passthrough")
            }
            _ => bail!("{} is not a warm method", m.label()),
        };
        check(cmd.arg("--").args(argv), m.label())?;
        let j: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&stats_file)
                .with_context(|| format!("reading {}", stats_file.display()))?,
        )?;
        let Some(wall_ms) = j["wall_ms"].as_f64() else {
            bail!("{}: no wall_ms", stats_file.display());
        };
        let st = &j["stats"];
        let n = |k: &str| st[k].as_u64().unwrap_or(0);
        let seconds = wall_ms / 1e3;
        self.stats.borrow_mut().push(WarmStat {
            method: m.label(),
            round,
            seconds,
            reads: n("reads"),
            pushed_bytes: n("pushed_bytes"),
            passthrough_opens: n("passthrough_opens"),
            cached_opens: n("cached_opens"),
            bytes_fetched: n("bytes_fetched"),
            bytes_warmed: n("bytes_warmed"),
        });
        Ok(seconds)
    }

    /// The warm rows against local cold, as Markdown; the raw runs as JSON.
    pub fn report(&self, samples: &[Sample], methods: &[Method]) -> (String, String) {
        let local = report::median_of(samples, Method::LocalCold.label());
        let stats = self.stats.borrow();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| method | median s (min–max) | ÷ local cold | FUSE reads | pushed MiB | passthrough opens | fetched MiB |\n|---|---|---|---|---|---|---|"
        );
        let mut rows: Vec<Method> = vec![Method::LocalCold];
        rows.extend(methods.iter().copied().filter(|&m| is_warm(m)));
        for m in rows {
            let mut v: Vec<f64> = samples
                .iter()
                .filter(|x| x.method == m.label())
                .map(|x| x.seconds)
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let med = v[v.len() / 2];
            let ratio = local.map_or("–".into(), |l| format!("{:.2}", med / l));
            let mut runs: Vec<&WarmStat> = stats.iter().filter(|x| x.method == m.label()).collect();
            runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            let counters = match runs.get(runs.len() / 2) {
                Some(w) => format!(
                    "{} | {:.1} | {} | {:.1}",
                    w.reads,
                    w.pushed_bytes as f64 / 1048576.0,
                    w.passthrough_opens,
                    w.bytes_fetched as f64 / 1048576.0
                ),
                None => "– | – | – | –".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {med:.3} ({:.3}–{:.3}) | {ratio} | {counters} |",
                m.label(),
                v[0],
                v[v.len() - 1]
            );
        }
        let json = serde_json::to_string_pretty(&*stats).unwrap_or_default();
        (s, json)
    }
}
