//! What one trace holds, for `incfs trace show`: per-file pages touched and first-touch time,
//! event counts by kind, and a coarse timeline.

use std::collections::{BTreeMap, HashMap};

use polars::prelude::*;
use serde::Serialize;

use crate::touch::TouchKinds;
use crate::trace::{EventKind, TraceMeta};

/// Number of equal time slices in [`TraceSummary::timeline`].
pub const TIMELINE_BUCKETS: usize = 10;

/// A summary of one trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    /// Events in the trace.
    pub events: u64,
    /// Events the kernel side could not deliver.
    pub lost_events: u64,
    /// The recorded command.
    pub command: Vec<String>,
    /// Page size of the recording machine.
    pub page_size: u32,
    /// Time of the last event, ns after the start.
    pub duration_ns: u64,
    /// Events by kind name.
    pub kinds: BTreeMap<String, u64>,
    /// Files, in order of first event.
    pub files: Vec<FileSummary>,
    /// Events and newly seen files in [`TIMELINE_BUCKETS`] equal slices of the run.
    pub timeline: Vec<TimelineBucket>,
}

/// What a trace says about one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileSummary {
    /// The file's path, or `<dev D ino I>` when the recorder did not resolve it.
    pub path: String,
    /// Distinct pages touched by the kinds that count as touches (fault, get_pages).
    pub pages: u64,
    /// `pages` in MiB.
    pub mib: f64,
    /// Distinct pages of any page event, including fault-around (`map_pages`) and
    /// `add_to_cache`.
    pub mapped_pages: u64,
    /// First event of any kind for the file, ns after the start.
    pub first_ns: u64,
    /// Events for the file.
    pub events: u64,
}

/// One slice of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineBucket {
    /// Start of the slice, ns.
    pub start_ns: u64,
    /// End of the slice (exclusive, except for the last), ns.
    pub end_ns: u64,
    /// Events in the slice.
    pub events: u64,
    /// Files whose first event falls in the slice.
    pub new_files: u64,
}

#[derive(Default)]
struct FileAcc {
    first_ns: u64,
    events: u64,
    touched: Vec<(u64, u64)>,
    mapped: Vec<(u64, u64)>,
}

/// Number of distinct integers covered by half-open ranges.
pub(crate) fn union_len(ranges: &mut [(u64, u64)]) -> u64 {
    ranges.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u64, u64)> = None;
    for &(s, e) in ranges.iter() {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    total + cur.map_or(0, |(s, e)| e - s)
}

/// Summarizes a trace read by [`crate::trace::read_trace`].
pub fn summarize(meta: &TraceMeta, df: &DataFrame) -> PolarsResult<TraceSummary> {
    let ts = df.column("ts_ns")?.u64()?;
    let kind = df.column("kind")?.str()?;
    let dev = df.column("dev")?.u64()?;
    let ino = df.column("ino")?.u64()?;
    let path = df.column("path")?.str()?;
    let first = df.column("first_page")?.u64()?;
    let count = df.column("page_count")?.u32()?;
    let touch = TouchKinds::default();

    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut files: HashMap<String, FileAcc> = HashMap::new();
    let mut max_ts = 0u64;
    let rows = ts
        .into_iter()
        .zip(kind)
        .zip(dev)
        .zip(ino)
        .zip(path)
        .zip(first)
        .zip(count);
    for ((((((ts, kind), dev), ino), path), first), count) in rows {
        let ts = ts.unwrap_or(0);
        let kind_name = kind.unwrap_or("");
        max_ts = max_ts.max(ts);
        *kinds.entry(kind_name.to_string()).or_default() += 1;
        let key = match path {
            Some(p) => p.to_string(),
            None => format!("<dev {} ino {}>", dev.unwrap_or(0), ino.unwrap_or(0)),
        };
        let acc = files.entry(key).or_insert_with(|| FileAcc {
            first_ns: u64::MAX,
            ..FileAcc::default()
        });
        acc.first_ns = acc.first_ns.min(ts);
        acc.events += 1;
        let (first, count) = (first.unwrap_or(0), u64::from(count.unwrap_or(0)));
        if count > 0 {
            let range = (first, first.saturating_add(count));
            acc.mapped.push(range);
            if EventKind::from_name(kind_name).is_some_and(|k| touch.counts(k)) {
                acc.touched.push(range);
            }
        }
    }

    let page = u64::from(meta.page_size);
    let mut files: Vec<FileSummary> = files
        .into_iter()
        .map(|(path, mut acc)| {
            let pages = union_len(&mut acc.touched);
            FileSummary {
                path,
                pages,
                mib: (pages * page) as f64 / f64::from(1 << 20),
                mapped_pages: union_len(&mut acc.mapped),
                first_ns: acc.first_ns,
                events: acc.events,
            }
        })
        .collect();
    files.sort_by(|a, b| {
        a.first_ns
            .cmp(&b.first_ns)
            .then_with(|| a.path.cmp(&b.path))
    });

    let width = max_ts / TIMELINE_BUCKETS as u64 + 1;
    let mut timeline: Vec<TimelineBucket> = (0..TIMELINE_BUCKETS as u64)
        .map(|i| TimelineBucket {
            start_ns: i * width,
            end_ns: (i + 1) * width,
            events: 0,
            new_files: 0,
        })
        .collect();
    let bucket = |t: u64| ((t / width) as usize).min(TIMELINE_BUCKETS - 1);
    for t in ts.into_iter().flatten() {
        timeline[bucket(t)].events += 1;
    }
    for f in &files {
        timeline[bucket(f.first_ns)].new_files += 1;
    }

    Ok(TraceSummary {
        events: df.height() as u64,
        lost_events: meta.lost_events,
        command: meta.command.clone(),
        page_size: meta.page_size,
        duration_ns: max_ts,
        kinds,
        files,
        timeline,
    })
}
