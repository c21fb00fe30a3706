//! Inputs: recorded traces (Parquet) and mount read-logs (NDJSON), reduced to the chunk
//! ranges each run touched and when it first touched them.
//!
//! The kind of an input is told by its content: a Parquet file starts with `PAR1`; a
//! read-log's first non-blank byte is `{`. A read-log (written by the mount at
//! `MOUNTPOINT/.incfs/read-log`) has one JSON object per line:
//! `{"ns":u64,"path":"rel/path","offset":u64,"len":u64,"result":"hit"|"miss"}`; every read
//! counts as a touch, hit or miss. Its clock starts when the mount does, so times are taken
//! relative to its first read (the program's start, as in a trace).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::Deserialize;

use crate::error::{PlannerError, polars_err};
use crate::touch::TouchKinds;
use crate::trace::read_trace_columns;

/// What kind of file an input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A Parquet trace from the recorder.
    Trace,
    /// A mount's read-log (NDJSON).
    ReadLog,
}

/// One run, reduced: each distinct (path, chunk range) it touched with its first-touch time.
#[derive(Debug, Clone)]
pub struct RawRun {
    /// The input file.
    pub source: PathBuf,
    /// What kind of file it is.
    pub kind: InputKind,
    /// Roots the recorder resolved paths under (empty for read-logs).
    pub roots: Vec<String>,
    /// Events (trace) or records (read-log) in the input.
    pub events: u64,
    /// Events the recorder lost.
    pub lost_events: u64,
    /// Touch events without a path (the recorder could not resolve the inode).
    pub unresolved: u64,
    /// Columns `path` (str), `first_chunk`, `last_chunk` (u64, inclusive), `first_ns` (u64).
    pub ranges: DataFrame,
}

/// Tells a trace from a read-log by the first bytes of `path`.
pub fn detect(path: &Path) -> Result<InputKind, PlannerError> {
    let io = |error| PlannerError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(path)
        .map_err(io)?
        .take(64)
        .read_to_end(&mut head)
        .map_err(io)?;
    if head.is_empty() {
        return Err(PlannerError::NotAnInput {
            path: path.to_path_buf(),
            reason: "the file is empty, neither a trace nor a read-log".into(),
        });
    }
    if head.starts_with(b"PAR1") {
        return Ok(InputKind::Trace);
    }
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(InputKind::ReadLog),
        _ => Err(PlannerError::NotAnInput {
            path: path.to_path_buf(),
            reason: "neither a Parquet trace (no PAR1 magic) nor a read-log (no JSON object)"
                .into(),
        }),
    }
}

/// Reads one input and reduces it to chunk ranges for an image of `chunk_size`.
pub fn load_input(path: &Path, chunk_size: u32, touch: TouchKinds) -> Result<RawRun, PlannerError> {
    match detect(path)? {
        InputKind::Trace => load_trace(path, chunk_size, touch),
        InputKind::ReadLog => load_read_log(path, chunk_size),
    }
}

/// Keeps, per (path, first_chunk, last_chunk), the earliest time.
fn reduce(lf: LazyFrame) -> LazyFrame {
    lf.group_by([col("path"), col("first_chunk"), col("last_chunk")])
        .agg([col("first_ns").min()])
}

fn load_trace(path: &Path, chunk_size: u32, touch: TouchKinds) -> Result<RawRun, PlannerError> {
    let (meta, df) = read_trace_columns(
        path,
        Some(&["ts_ns", "kind", "path", "first_page", "page_count"]),
    )?;
    let events = df.height() as u64;
    let ps = u64::from(meta.page_size);
    let cs = u64::from(chunk_size);
    let is_touch = touch
        .names()
        .into_iter()
        .fold(lit(false), |acc, k| acc.or(col("kind").eq(lit(k))));
    let what = || format!("{}: reducing the trace", path.display());
    let touches = df
        .lazy()
        .filter(is_touch.and(col("page_count").gt(lit(0u32))))
        .select([
            col("path"),
            col("ts_ns").alias("first_ns"),
            ((col("first_page") * lit(ps)) / lit(cs)).alias("first_chunk"),
            (((col("first_page") + col("page_count").cast(DataType::UInt64)) * lit(ps)
                - lit(1u64))
                / lit(cs))
            .alias("last_chunk"),
        ])
        .collect()
        .map_err(polars_err(what()))?;
    let unresolved = touches
        .column("path")
        .map_err(polars_err(what()))?
        .null_count() as u64;
    let ranges = reduce(touches.lazy().filter(col("path").is_not_null()))
        .collect()
        .map_err(polars_err(what()))?;
    Ok(RawRun {
        source: path.to_path_buf(),
        kind: InputKind::Trace,
        roots: meta.roots,
        events,
        lost_events: meta.lost_events,
        unresolved,
        ranges,
    })
}

/// One line of a read-log.
#[derive(Deserialize)]
struct ReadLogRecord {
    ns: u64,
    path: String,
    offset: u64,
    len: u64,
    #[serde(default)]
    #[expect(dead_code, reason = "hits and misses both count as touches")]
    result: Option<String>,
}

fn load_read_log(path: &Path, chunk_size: u32) -> Result<RawRun, PlannerError> {
    let io = |error| PlannerError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let cs = u64::from(chunk_size);
    let (mut paths, mut firsts, mut lasts, mut times) = (vec![], vec![], vec![], vec![]);
    let mut events = 0u64;
    let mut lines = BufReader::new(file).split(b'\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line = line.map_err(io)?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let rec: ReadLogRecord = match serde_json::from_slice(&line) {
            Ok(r) => r,
            // The mount may still be writing: a cut last line is skipped, not fatal.
            Err(e) if lines.peek().is_none() && e.is_eof() => {
                tracing::warn!(path = %path.display(), line = i + 1, "skipping a cut last line");
                continue;
            }
            Err(e) => {
                return Err(PlannerError::ReadLog {
                    path: path.to_path_buf(),
                    line: i as u64 + 1,
                    reason: e.to_string(),
                });
            }
        };
        events += 1;
        if rec.len == 0 {
            continue;
        }
        paths.push(rec.path);
        firsts.push(rec.offset / cs);
        lasts.push(rec.offset.saturating_add(rec.len - 1) / cs);
        times.push(rec.ns);
    }
    // The mount's clock starts at mount time; the run starts at its first read.
    let start = times.iter().copied().min().unwrap_or(0);
    for t in &mut times {
        *t -= start;
    }
    let what = || format!("{}: reducing the read-log", path.display());
    let n = paths.len();
    let df = DataFrame::new(
        n,
        vec![
            Column::new("path".into(), paths),
            Column::new("first_chunk".into(), firsts),
            Column::new("last_chunk".into(), lasts),
            Column::new("first_ns".into(), times),
        ],
    )
    .map_err(polars_err(what()))?;
    let ranges = reduce(df.lazy()).collect().map_err(polars_err(what()))?;
    Ok(RawRun {
        source: path.to_path_buf(),
        kind: InputKind::ReadLog,
        roots: vec![],
        events,
        lost_events: 0,
        unresolved: 0,
        ranges,
    })
}
