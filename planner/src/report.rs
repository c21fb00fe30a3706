//! How good is a plan: scored on a run, and leave-one-out over the runs.
//!
//! The model: at time 0 the prefetcher starts fetching the plan's chunks in order at a fixed
//! bandwidth, nothing else on the link; a chunk arrives when the stored bytes of it and
//! everything before it have crossed. A touched chunk is a *hit* when it arrives no later
//! than the run first touches it. *Over-fetch* is the share of the plan's stored bytes that
//! the run never touched.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use incfs_fs::plan::PrefetchPlan;
use serde::Serialize;

use crate::error::{PlannerError, polars_err};
use crate::image_index::ImageIndex;
use crate::pipeline::{MappedRun, PlanOptions, plan_runs};

/// When each planned chunk arrives, by (file, chunk), in ns after the start.
pub(crate) fn arrivals(
    plan: &PrefetchPlan,
    index: &ImageIndex,
    bandwidth_bytes_per_s: f64,
) -> Vec<((u32, u64), u64, u64)> {
    let mut by_offset: HashMap<u64, u64> = HashMap::new();
    let mut sent = 0u64;
    let mut out = Vec::new();
    for e in &plan.entries {
        let Some(file) = index.lookup(&e.file) else {
            continue;
        };
        for c in e.first_chunk..e.first_chunk.saturating_add(e.chunk_count) {
            let Some((off, len)) = index.stored(file, c) else {
                continue;
            };
            let (at, new_bytes) = match by_offset.get(&off) {
                Some(&at) => (at, 0),
                None => {
                    sent += u64::from(len);
                    let at = (sent as f64 / bandwidth_bytes_per_s * 1e9) as u64;
                    by_offset.insert(off, at);
                    (at, u64::from(len))
                }
            };
            out.push(((file, c), at, new_bytes));
        }
    }
    out
}

/// A plan scored on one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// The run's input file.
    pub source: PathBuf,
    /// Distinct chunks the run touched (in the image).
    pub touched_chunks: u64,
    /// Of those, chunks the plan fetches at all.
    pub planned: u64,
    /// Of those, chunks that arrive before the run first touches them.
    pub hits: u64,
    /// `hits / touched_chunks`.
    pub hit_rate: f64,
    /// `planned / touched_chunks`.
    pub coverage: f64,
    /// Stored bytes the plan fetches.
    pub plan_bytes: u64,
    /// Of those, bytes of chunks the run never touched.
    pub overfetch_bytes: u64,
    /// `overfetch_bytes / plan_bytes` (0 for an empty plan).
    pub overfetch: f64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Scores `plan` on `run` at `bandwidth_bytes_per_s`.
pub fn score(
    plan: &PrefetchPlan,
    index: &ImageIndex,
    run: &MappedRun,
    bandwidth_bytes_per_s: f64,
) -> Result<Score, PlannerError> {
    let what = || format!("{}: scoring", run.source.display());
    let df = &run.chunks;
    let file = df
        .column("file")
        .and_then(|c| c.u32())
        .map_err(polars_err(what()))?;
    let chunk = df
        .column("chunk")
        .and_then(|c| c.u64())
        .map_err(polars_err(what()))?;
    let first = df
        .column("first_ns")
        .and_then(|c| c.u64())
        .map_err(polars_err(what()))?;
    let touched: HashMap<(u32, u64), u64> = file
        .into_no_null_iter()
        .zip(chunk.into_no_null_iter())
        .zip(first.into_no_null_iter())
        .collect();
    let arr = arrivals(plan, index, bandwidth_bytes_per_s);
    let mut planned = 0;
    let mut hits = 0;
    let mut useful_offsets = HashSet::new();
    let mut plan_bytes = 0;
    let mut bytes_of: HashMap<u64, u64> = HashMap::new();
    let mut seen_chunk = HashSet::new();
    for ((f, c), at, new_bytes) in &arr {
        plan_bytes += new_bytes;
        let off = index.stored(*f, *c).map_or(0, |(o, _)| o);
        if *new_bytes > 0 {
            bytes_of.insert(off, *new_bytes);
        }
        if let Some(&t) = touched.get(&(*f, *c)) {
            useful_offsets.insert(off);
            if seen_chunk.insert((*f, *c)) {
                planned += 1;
                if *at <= t {
                    hits += 1;
                }
            }
        }
    }
    let useful: u64 = useful_offsets.iter().filter_map(|o| bytes_of.get(o)).sum();
    let n = touched.len() as u64;
    Ok(Score {
        source: run.source.clone(),
        touched_chunks: n,
        planned,
        hits,
        hit_rate: ratio(hits, n),
        coverage: ratio(planned, n),
        plan_bytes,
        overfetch_bytes: plan_bytes - useful,
        overfetch: ratio(plan_bytes - useful, plan_bytes),
    })
}

/// The quality report of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Stored bytes of the whole image.
    pub image_stored_bytes: u64,
    /// Uncompressed bytes of the image's files.
    pub image_raw_bytes: u64,
    /// Stored bytes the plan fetches.
    pub plan_bytes: u64,
    /// `plan_bytes / image_stored_bytes`.
    pub plan_share: f64,
    /// Ranges in the plan.
    pub entries: u64,
    /// Chunks in the plan.
    pub chunks: u64,
    /// Bandwidth the scores assume, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// The plan scored on each run it may have been made from.
    pub self_scores: Vec<Score>,
    /// For each run, a plan made from the other runs (same options) scored on it; empty with
    /// fewer than two runs.
    pub leave_one_out: Vec<Score>,
    /// Mean leave-one-out hit rate.
    pub loo_hit_rate: Option<f64>,
    /// Mean leave-one-out over-fetch.
    pub loo_overfetch: Option<f64>,
}

/// Scores `plan` on every run, and leave-one-out over `runs` with `opts`.
pub fn report(
    plan: &PrefetchPlan,
    index: &ImageIndex,
    runs: &[MappedRun],
    opts: &PlanOptions,
    bandwidth_bytes_per_s: f64,
) -> Result<Report, PlannerError> {
    if bandwidth_bytes_per_s.is_nan() || bandwidth_bytes_per_s <= 0.0 {
        return Err(PlannerError::Options(
            "the bandwidth must be positive".into(),
        ));
    }
    let self_scores = runs
        .iter()
        .map(|r| score(plan, index, r, bandwidth_bytes_per_s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut loo = Vec::new();
    if runs.len() >= 2 {
        for i in 0..runs.len() {
            let others: Vec<&MappedRun> = runs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r)
                .collect();
            let (p, _) = plan_runs(&others, index, opts)?;
            loo.push(score(&p, index, &runs[i], bandwidth_bytes_per_s)?);
        }
    }
    let mean = |f: fn(&Score) -> f64| {
        (!loo.is_empty()).then(|| loo.iter().map(f).sum::<f64>() / loo.len() as f64)
    };
    Ok(Report {
        image_stored_bytes: index.stored_bytes,
        image_raw_bytes: index.raw_bytes,
        plan_bytes: plan.total_bytes,
        plan_share: ratio(plan.total_bytes, index.stored_bytes),
        entries: plan.entries.len() as u64,
        chunks: plan.entries.iter().map(|e| e.chunk_count).sum(),
        bandwidth_bytes_per_s,
        loo_hit_rate: mean(|s| s.hit_rate),
        loo_overfetch: mean(|s| s.overfetch),
        self_scores,
        leave_one_out: loo,
    })
}
