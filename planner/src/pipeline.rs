//! From runs to a prefetch manifest: map each run's touched ranges onto image chunks, then
//! aggregate across runs with polars, filter, order, [`merge`] and
//! [`budget`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use incfs_fs::plan::{PLAN_VERSION, PlanEntry, PrefetchPlan};
use polars::prelude::*;
use serde::Serialize;

use crate::error::{PlannerError, polars_err};
use crate::image_index::ImageIndex;
use crate::input::{InputKind, RawRun};
use crate::merge::{Pick, budget, merge};
use crate::touch::TouchKinds;

/// How many runs must have touched a chunk for it to be planned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinRuns {
    /// At least this many runs (capped at the number of runs).
    Count(u32),
    /// At least this share of the runs, rounded up, and at least one run: `Fraction(0.5)` of
    /// 3 runs is 2.
    Fraction(f64),
}

impl Default for MinRuns {
    /// Half the runs: a chunk one noisy run of two touched is kept, one of three is not.
    fn default() -> Self {
        MinRuns::Fraction(0.5)
    }
}

impl MinRuns {
    /// Parses `2` (a count), `0.5` or `50%` (a share of the runs, in (0, 1]).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let frac = |v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(MinRuns::Fraction(v))
            } else {
                Err(format!(
                    "--min-runs {s}: a share must be in (0, 1] (or 1%..100%)"
                ))
            }
        };
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("--min-runs {s}: not a percentage"))?;
            return frac(v / 100.0);
        }
        if t.contains('.') {
            let v: f64 = t
                .parse()
                .map_err(|_| format!("--min-runs {s}: not a number"))?;
            return frac(v);
        }
        match t.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(MinRuns::Count(n)),
            _ => Err(format!(
                "--min-runs {s}: give a count of runs (1, 2, ...) or a share (0.5, 50%)"
            )),
        }
    }

    /// The number of runs needed out of `runs`.
    pub fn needed(self, runs: usize) -> u32 {
        let runs = u32::try_from(runs).unwrap_or(u32::MAX).max(1);
        match self {
            MinRuns::Count(n) => n.clamp(1, runs),
            MinRuns::Fraction(f) => ((f * f64::from(runs)).ceil() as u32).clamp(1, runs),
        }
    }
}

/// Planner settings.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Runs a chunk needs (default: half of them).
    pub min_runs: MinRuns,
    /// Stored-byte budget; `None` for no limit.
    pub max_bytes: Option<u64>,
    /// Prefixes to strip from trace paths to get image paths. When empty, the roots the
    /// recorder wrote into each trace are used; a path under none of them is looked up with
    /// its leading `/` removed.
    pub strip_prefixes: Vec<String>,
    /// Which trace events count as touches.
    pub touch: TouchKinds,
    /// Adjacent chunks whose median first touches lie within this of a range's start join
    /// it (default 100 ms: at 100 Mbit/s that is about 1.2 MB, more than any range).
    pub merge_window_ns: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            min_runs: MinRuns::default(),
            max_bytes: None,
            strip_prefixes: Vec::new(),
            touch: TouchKinds::default(),
            merge_window_ns: 100_000_000,
        }
    }
}

/// One run mapped onto the image.
#[derive(Debug, Clone)]
pub struct MappedRun {
    /// The input file.
    pub source: PathBuf,
    /// Its kind.
    pub kind: InputKind,
    /// Events (or read-log records) in the input.
    pub events: u64,
    /// Events the recorder lost.
    pub lost_events: u64,
    /// Touch events whose inode the recorder did not resolve to a path.
    pub unresolved: u64,
    /// Columns `file` (u32), `chunk` (u64), `first_ns` (u64): each touched chunk once, with
    /// its first-touch time in this run.
    pub chunks: DataFrame,
    /// Touched ranges whose path is not in the image, by (remapped) path.
    pub unknown: BTreeMap<String, u64>,
    /// Touched ranges past the end of their file in the image (the file differs).
    pub past_eof: u64,
}

/// Maps a trace path to an image path: strips the first matching prefix.
fn remap<'a>(path: &'a str, prefixes: &[String]) -> &'a str {
    for p in prefixes {
        let p = p.trim_end_matches('/');
        if let Some(rest) = path.strip_prefix(p)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return rest.trim_start_matches('/');
        }
    }
    path.trim_start_matches('/')
}

/// Maps one run's ranges onto the image's files and chunks.
pub fn map_run(
    raw: &RawRun,
    index: &ImageIndex,
    opts: &PlanOptions,
) -> Result<MappedRun, PlannerError> {
    let what = || format!("{}: mapping onto the image", raw.source.display());
    let prefixes = if opts.strip_prefixes.is_empty() {
        &raw.roots
    } else {
        &opts.strip_prefixes
    };
    let df = &raw.ranges;
    let path = df
        .column("path")
        .and_then(|c| c.str())
        .map_err(polars_err(what()))?;
    let first = df
        .column("first_chunk")
        .and_then(|c| c.u64())
        .map_err(polars_err(what()))?;
    let last = df
        .column("last_chunk")
        .and_then(|c| c.u64())
        .map_err(polars_err(what()))?;
    let ts = df
        .column("first_ns")
        .and_then(|c| c.u64())
        .map_err(polars_err(what()))?;
    let mut cache: HashMap<&str, Option<u32>> = HashMap::new();
    let mut unknown: BTreeMap<String, u64> = BTreeMap::new();
    let mut past_eof = 0;
    let (mut files, mut chunks, mut times) = (vec![], vec![], vec![]);
    for (((p, f), l), t) in path.into_iter().zip(first).zip(last).zip(ts) {
        let (Some(p), Some(f), Some(l), Some(t)) = (p, f, l, t) else {
            continue;
        };
        let file = *cache
            .entry(p)
            .or_insert_with(|| index.lookup(remap(p, prefixes)));
        let Some(file) = file else {
            *unknown.entry(remap(p, prefixes).to_string()).or_default() += 1;
            continue;
        };
        let n = index.files[file as usize].chunks;
        if f >= n {
            past_eof += 1;
            continue;
        }
        for c in f..=l.min(n - 1) {
            files.push(file);
            chunks.push(c);
            times.push(t);
        }
    }
    let frame = DataFrame::new(
        files.len(),
        vec![
            Column::new("file".into(), files),
            Column::new("chunk".into(), chunks),
            Column::new("first_ns".into(), times),
        ],
    )
    .map_err(polars_err(what()))?;
    let chunks = frame
        .lazy()
        .group_by([col("file"), col("chunk")])
        .agg([col("first_ns").min()])
        .collect()
        .map_err(polars_err(what()))?;
    Ok(MappedRun {
        source: raw.source.clone(),
        kind: raw.kind,
        events: raw.events,
        lost_events: raw.lost_events,
        unresolved: raw.unresolved,
        chunks,
        unknown,
        past_eof,
    })
}

/// Per chunk across runs: how many runs touched it and its median first touch, ordered by
/// median (then file, chunk), keeping chunks touched by at least `needed` runs. Columns
/// `file`, `chunk`, `runs` (u32), `median_ns` (f64).
pub fn aggregate(runs: &[&MappedRun], needed: u32) -> Result<DataFrame, PlannerError> {
    let what = "aggregating the runs";
    let lfs: Vec<LazyFrame> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.chunks
                .clone()
                .lazy()
                .with_column(lit(i as u32).alias("run"))
        })
        .collect();
    if lfs.is_empty() {
        return Err(PlannerError::Options("no runs to plan from".into()));
    }
    concat(lfs, UnionArgs::default())
        .map_err(polars_err(what))?
        .group_by([col("file"), col("chunk")])
        .agg([
            col("run").n_unique().cast(DataType::UInt32).alias("runs"),
            col("first_ns")
                .cast(DataType::Float64)
                .median()
                .alias("median_ns"),
        ])
        .filter(col("runs").gt_eq(lit(needed)))
        .sort_by_exprs(
            [col("median_ns"), col("file"), col("chunk")],
            SortMultipleOptions::default(),
        )
        .collect()
        .map_err(polars_err(what))
}

/// What planning found besides the plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PlanStats {
    /// Runs planned from.
    pub runs: usize,
    /// Runs a chunk needed.
    pub needed_runs: u32,
    /// Distinct chunks any run touched.
    pub touched_chunks: u64,
    /// Chunks that passed the min-runs filter.
    pub kept_chunks: u64,
    /// Chunks in the plan after the budget.
    pub planned_chunks: u64,
    /// Whether the budget cut the plan.
    pub cut_by_budget: bool,
    /// Touched ranges whose paths are not in the image, over all runs.
    pub unknown_ranges: u64,
    /// Distinct such paths.
    pub unknown_paths: u64,
    /// A few of them, most touched first.
    pub unknown_examples: Vec<String>,
    /// Touched ranges past the end of their file.
    pub past_eof: u64,
    /// Touch events without a path.
    pub unresolved: u64,
}

/// How many unknown paths [`PlanStats::unknown_examples`] shows.
const UNKNOWN_EXAMPLES: usize = 5;

/// Plans from mapped runs.
pub fn plan_runs(
    runs: &[&MappedRun],
    index: &ImageIndex,
    opts: &PlanOptions,
) -> Result<(PrefetchPlan, PlanStats), PlannerError> {
    let needed = opts.min_runs.needed(runs.len());
    let all = aggregate(runs, 1)?;
    let what = "reading the aggregate";
    let runs_col = all
        .column("runs")
        .and_then(|c| c.u32())
        .map_err(polars_err(what))?;
    let file = all
        .column("file")
        .and_then(|c| c.u32())
        .map_err(polars_err(what))?;
    let chunk = all
        .column("chunk")
        .and_then(|c| c.u64())
        .map_err(polars_err(what))?;
    let median = all
        .column("median_ns")
        .and_then(|c| c.f64())
        .map_err(polars_err(what))?;
    let picks: Vec<Pick> = file
        .into_no_null_iter()
        .zip(chunk.into_no_null_iter())
        .zip(median)
        .zip(runs_col.into_no_null_iter())
        .filter(|(_, r)| *r >= needed)
        .map(|(((file, chunk), median), runs)| Pick {
            file,
            chunk,
            median_ns: median.unwrap_or(0.0).round() as u64,
            runs,
        })
        .collect();
    let ranges = merge(&picks, opts.merge_window_ns);
    let b = budget(&ranges, opts.max_bytes, |f, c| index.stored(f, c));
    let n = runs.len().max(1) as f64;
    let entries = b
        .ranges
        .iter()
        .map(|r| PlanEntry {
            file: index.files[r.file as usize].path.clone(),
            first_chunk: r.first_chunk,
            chunk_count: r.count,
            offset_ms: r.offset_ns as f64 / 1e6,
            confidence: f64::from(r.min_runs) / n,
        })
        .collect();
    let mut unknown: BTreeMap<&str, u64> = BTreeMap::new();
    for r in runs {
        for (p, c) in &r.unknown {
            *unknown.entry(p).or_default() += c;
        }
    }
    let mut examples: Vec<(&str, u64)> = unknown.iter().map(|(p, c)| (*p, *c)).collect();
    examples.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let stats = PlanStats {
        runs: runs.len(),
        needed_runs: needed,
        touched_chunks: all.height() as u64,
        kept_chunks: picks.len() as u64,
        planned_chunks: b.ranges.iter().map(|r| r.count).sum(),
        cut_by_budget: b.cut,
        unknown_ranges: unknown.values().sum(),
        unknown_paths: unknown.len() as u64,
        unknown_examples: examples
            .iter()
            .take(UNKNOWN_EXAMPLES)
            .map(|(p, _)| p.to_string())
            .collect(),
        past_eof: runs.iter().map(|r| r.past_eof).sum(),
        unresolved: runs.iter().map(|r| r.unresolved).sum(),
    };
    let plan = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: index.digest.to_hex(),
        chunk_size: index.chunk_size,
        total_bytes: b.total_bytes,
        entries,
    };
    Ok((plan, stats))
}
