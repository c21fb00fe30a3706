//! What one trace holds, for `incfs trace show`: per-file pages touched and first-touch time,
//! event counts by kind, and a coarse timeline.

use std::collections::{BTreeMap, HashMap};

use polars::prelude::*;
use serde::Serialize;

use crate::touch::TouchKinds;
use crate::trace::{EventKind, RecordedVia, TraceMeta};

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
    /// How much of the start's demand set the trace is likely to hold.
    pub completeness: Completeness,
}

/// How much of the demand set (the pages the start reads with nothing read ahead) a trace
/// is likely to hold, from how it was recorded and what its events say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completeness {
    /// How the trace was recorded.
    pub recorded_via: RecordedVia,
    /// The verdict.
    pub verdict: Verdict,
    /// Distinct pages the trace counts as touched (`fault`, `get_pages`) in the files under
    /// the roots (those with a path; the counts below are over the same files).
    pub touched_pages: u64,
    /// Distinct pages the readahead-0 view served (0 when not recorded through one).
    pub view_pages: u64,
    /// Distinct pages that `add_to_cache` events brought in (readahead included).
    pub cached_pages: u64,
    /// Of those, the pages no touch event covers (read ahead, never asked for by an event).
    pub cached_untouched_pages: u64,
    /// Distinct pages of `map_pages` (fault-around) ranges that no touch event covers (the
    /// ranges fault-around tried, cached or not: an upper bound).
    pub mapped_only_pages: u64,
    /// One sentence for a user: what the verdict rests on and what to do.
    pub hint: String,
}

/// The verdict of [`Completeness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Recorded through a readahead-0 view, and the touched pages cover what it served.
    Complete,
    /// Readahead or fault-around brought in many pages without a touch event, or events
    /// were missed: a plan from it will miss most of the start.
    LikelyThin,
    /// Nothing in the trace says either way (recorded directly, without readahead traces).
    Unknown,
}

/// A trace counts as likely thin when the pages `add_to_cache` brought in without a touch
/// event exceed this share of the touched pages. Readahead-0 recordings of clang (through
/// the view or an incfs mount) have none: every page cached was faulted or read; a cold
/// direct one from ext4 with 8 MiB readahead has 43,910 against 1,161 touched.
const THIN_RATIO: f64 = 0.5;

/// A trace whose files were mostly cached before the start (fewer pages brought in than
/// touched) counts as likely thin when fault-around ranges cover more than this many times
/// the touched pages without a touch. `map_pages` reports the range fault-around tried,
/// cached or not, so even a readahead-0 recording of clang shows 1.1x (11,525 against
/// 10,111); a warm direct one shows 19x (20,320 against 1,083).
const WARM_AROUND_RATIO: f64 = 2.0;

/// A view recording is complete when its touched pages cover this share of the pages the
/// view served (they match exactly when no event was lost).
const VIEW_COVERAGE: f64 = 0.95;

fn completeness(
    meta: &TraceMeta,
    touched: u64,
    cached_untouched: u64,
    cached: u64,
    mapped_only: u64,
) -> Completeness {
    let t = touched.max(1) as f64;
    let (verdict, hint) = match meta.recorded_via {
        RecordedVia::View
            if meta.lost_events == 0
                && touched as f64 >= VIEW_COVERAGE * meta.view_pages as f64 =>
        {
            (
                Verdict::Complete,
                format!(
                    "recorded through a readahead-0 view: the {touched} touched pages cover \
                     the {} pages the view served, the start's demand set",
                    meta.view_pages
                ),
            )
        }
        RecordedVia::View => (
            Verdict::LikelyThin,
            format!(
                "recorded through a readahead-0 view, but the trace touches {touched} of the \
                 {} pages the view served ({} events lost): record again, with a larger \
                 --ring-buffer-mib if events were lost",
                meta.view_pages, meta.lost_events
            ),
        ),
        _ if cached_untouched as f64 > THIN_RATIO * t => (
            Verdict::LikelyThin,
            format!(
                "readahead brought in {cached} pages, {cached_untouched} of them without a \
                 touch event, against {touched} touched: the trace likely holds only a part \
                 of the demand set; record it again with `incfs record-trace --root TREE`, \
                 which reads the tree through a readahead-0 view"
            ),
        ),
        _ if (cached as f64) < 0.5 * t && mapped_only as f64 > WARM_AROUND_RATIO * t => (
            Verdict::LikelyThin,
            format!(
                "nothing much was read from storage and fault-around ranges covered \
                 {mapped_only} pages without a touch event, against {touched} touched (the \
                 files were cached before the start): \
                 the trace likely holds only a part of the demand set; record it again with \
                 `incfs record-trace --root TREE`, which reads the tree through a \
                 readahead-0 view"
            ),
        ),
        RecordedVia::Direct => (
            Verdict::Unknown,
            "recorded on the file systems directly: readahead may have hidden pages of the \
             demand set; `incfs record-trace --root TREE` records through a readahead-0 view"
                .to_owned(),
        ),
        RecordedVia::Unknown => (
            Verdict::Unknown,
            "the trace does not say how it was recorded (an older recorder); its events show \
             no sign of readahead hiding pages"
                .to_owned(),
        ),
    };
    Completeness {
        recorded_via: meta.recorded_via,
        verdict,
        touched_pages: touched,
        view_pages: meta.view_pages,
        cached_pages: cached,
        cached_untouched_pages: cached_untouched,
        mapped_only_pages: mapped_only,
        hint,
    }
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
    cached: Vec<(u64, u64)>,
    around: Vec<(u64, u64)>,
    /// The recorder resolved the file to a path (it lies under the roots).
    resolved: bool,
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
            resolved: path.is_some(),
            ..FileAcc::default()
        });
        acc.first_ns = acc.first_ns.min(ts);
        acc.events += 1;
        let (first, count) = (first.unwrap_or(0), u64::from(count.unwrap_or(0)));
        if count > 0 {
            let range = (first, first.saturating_add(count));
            acc.mapped.push(range);
            match EventKind::from_name(kind_name) {
                Some(k) if touch.counts(k) => acc.touched.push(range),
                Some(EventKind::AddToCache) => acc.cached.push(range),
                Some(EventKind::MapPages) => acc.around.push(range),
                _ => {}
            }
        }
    }

    let page = u64::from(meta.page_size);
    // Completeness is judged on the files under the roots: those outside them (system
    // libraries) are read directly, with readahead, however the roots were recorded.
    let (mut touched, mut cached, mut cached_untouched, mut mapped_only) = (0, 0, 0, 0);
    let mut files: Vec<FileSummary> = files
        .into_iter()
        .map(|(path, mut acc)| {
            let pages = union_len(&mut acc.touched);
            let with = |mut other: Vec<(u64, u64)>| {
                let alone = union_len(&mut other.clone());
                other.extend_from_slice(&acc.touched);
                (alone, union_len(&mut other) - pages)
            };
            let (c, c_only) = with(std::mem::take(&mut acc.cached));
            let around_only = with(std::mem::take(&mut acc.around)).1;
            if acc.resolved {
                touched += pages;
                cached += c;
                cached_untouched += c_only;
                mapped_only += around_only;
            }
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
        completeness: completeness(meta, touched, cached_untouched, cached, mapped_only),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(via: RecordedVia, view_pages: u64) -> TraceMeta {
        TraceMeta {
            page_size: 4096,
            recorded_via: via,
            view_pages,
            ..TraceMeta::default()
        }
    }

    #[test]
    fn a_view_recording_covering_the_view_is_complete() {
        let c = completeness(&meta(RecordedVia::View, 10_111), 10_111, 0, 10_111, 9_000);
        assert_eq!(c.verdict, Verdict::Complete);
        let c = completeness(&meta(RecordedVia::View, 10_111), 5_000, 0, 5_000, 0);
        assert_eq!(c.verdict, Verdict::LikelyThin);
    }

    #[test]
    fn readahead_without_touches_is_thin() {
        // The numbers of a cold direct recording of clang from ext4 (read_ahead_kb 8192).
        let c = completeness(&meta(RecordedVia::Direct, 0), 1_161, 43_910, 45_071, 20_242);
        assert_eq!(c.verdict, Verdict::LikelyThin);
        assert!(c.hint.contains("--root TREE"), "{}", c.hint);
        // A warm one: no readahead, fault-around maps the cached pages.
        let c = completeness(&meta(RecordedVia::Unknown, 0), 1_083, 0, 0, 20_320);
        assert_eq!(c.verdict, Verdict::LikelyThin);
        // Through an incfs mount (readahead 0): every page brought in was touched.
        let c = completeness(&meta(RecordedVia::Unknown, 0), 10_111, 0, 10_111, 11_525);
        assert_eq!(c.verdict, Verdict::Unknown);
        let c = completeness(&meta(RecordedVia::Direct, 0), 1_000, 10, 1_010, 100);
        assert_eq!(c.verdict, Verdict::Unknown);
    }
}
