//! Invariants of merging and budgeting, by proptest, plus pinned cases.

use std::collections::{BTreeSet, HashSet};

use incfs_planner::merge::{Pick, Range, budget, merge};
use proptest::prelude::*;

fn picks() -> impl Strategy<Value = Vec<Pick>> {
    prop::collection::vec(
        (0u32..4, 0u64..40, 0u64..1_000, 1u32..4).prop_map(|(file, chunk, median_ns, runs)| Pick {
            file,
            chunk,
            median_ns,
            runs,
        }),
        0..80,
    )
}

/// Stored location of a chunk: 10 stored chunks per file, some shared between files 0 and 1
/// (dedup), lengths 1..=100.
fn stored(file: u32, chunk: u64) -> Option<(u64, u32)> {
    let f = if file == 1 && chunk.is_multiple_of(3) {
        0
    } else {
        u64::from(file)
    };
    let off = f * 1_000_000 + chunk * 1000;
    Some((off, 1 + (off % 97) as u32 + (chunk % 5) as u32))
}

fn covered(ranges: &[Range]) -> Vec<(u32, u64)> {
    ranges
        .iter()
        .flat_map(|r| r.chunks().map(move |c| (r.file, c)))
        .collect()
}

proptest! {
    #[test]
    fn merge_covers_each_pick_once_in_order(picks in picks(), window in 0u64..300) {
        let ranges = merge(&picks, window);
        let want: BTreeSet<(u32, u64)> = picks.iter().map(|p| (p.file, p.chunk)).collect();
        let got = covered(&ranges);
        let got_set: BTreeSet<(u32, u64)> = got.iter().copied().collect();
        prop_assert_eq!(got.len(), got_set.len(), "a chunk is in two ranges");
        prop_assert_eq!(&got_set, &want);
        for w in ranges.windows(2) {
            prop_assert!(
                (w[0].offset_ns, w[0].file, w[0].first_chunk)
                    <= (w[1].offset_ns, w[1].file, w[1].first_chunk)
            );
        }
        for r in &ranges {
            prop_assert!(r.count >= 1);
            // Offset is the earliest median of its chunks; min_runs the fewest runs.
            let members: Vec<&Pick> = picks
                .iter()
                .filter(|p| p.file == r.file && r.chunks().contains(&p.chunk))
                .collect();
            let earliest_per_chunk = |c: u64| {
                members.iter().filter(|p| p.chunk == c).map(|p| p.median_ns).min()
            };
            let min_median = r.chunks().filter_map(earliest_per_chunk).min();
            prop_assert_eq!(Some(r.offset_ns), min_median);
            // No chunk is pulled earlier than the window allows.
            for c in r.chunks() {
                let m = earliest_per_chunk(c).unwrap_or(r.offset_ns);
                prop_assert!(m - r.offset_ns <= window, "chunk {c} needed at {m}, range at {}", r.offset_ns);
            }
        }
    }

    #[test]
    fn merge_with_no_window_limit_gives_maximal_runs(picks in picks()) {
        let ranges = merge(&picks, u64::MAX);
        // No two ranges of one file touch.
        let mut by_file: Vec<(u32, u64, u64)> =
            ranges.iter().map(|r| (r.file, r.first_chunk, r.first_chunk + r.count)).collect();
        by_file.sort();
        for w in by_file.windows(2) {
            prop_assert!(w[0].0 != w[1].0 || w[0].2 < w[1].1, "{:?} and {:?} should be one", w[0], w[1]);
        }
    }

    #[test]
    fn budget_is_an_in_order_prefix_within_the_limit(
        picks in picks(),
        window in 0u64..300,
        max in prop::option::of(0u64..3_000),
    ) {
        let ranges = merge(&picks, window);
        let b = budget(&ranges, max, stored);
        if let Some(max) = max {
            prop_assert!(b.total_bytes <= max);
        }
        // A prefix: all ranges but the last are equal to the input's, the last a prefix.
        prop_assert!(b.ranges.len() <= ranges.len());
        for (i, r) in b.ranges.iter().enumerate() {
            let orig = ranges[i];
            if i + 1 < b.ranges.len() {
                prop_assert_eq!(*r, orig);
            } else {
                prop_assert_eq!((r.file, r.first_chunk, r.offset_ns), (orig.file, orig.first_chunk, orig.offset_ns));
                prop_assert!(r.count >= 1 && r.count <= orig.count);
            }
        }
        // total_bytes counts each stored chunk once.
        let mut seen = HashSet::new();
        let total: u64 = covered(&b.ranges)
            .into_iter()
            .filter_map(|(f, c)| stored(f, c))
            .filter(|(off, _)| seen.insert(*off))
            .map(|(_, len)| u64::from(len))
            .sum();
        prop_assert_eq!(total, b.total_bytes);
        // Without a limit nothing is cut; a cut plan could not take its next chunk.
        if max.is_none() {
            prop_assert!(!b.cut);
            prop_assert_eq!(&b.ranges, &ranges);
        }
        if !b.cut {
            prop_assert_eq!(covered(&b.ranges).len(), covered(&ranges).len());
        }
    }
}

/// Pinned: a chunk picked twice (the same chunk from two aggregates) lands once, at its
/// earliest median.
#[test]
fn duplicate_pick_keeps_the_earliest() {
    let p = |chunk, median_ns| Pick {
        file: 0,
        chunk,
        median_ns,
        runs: 1,
    };
    let r = merge(&[p(1, 50), p(1, 10), p(2, 12)], 5);
    assert_eq!(
        r,
        [Range {
            file: 0,
            first_chunk: 1,
            count: 2,
            offset_ns: 10,
            min_runs: 1
        }]
    );
}

/// Pinned (found by proptest): a chunk that lowers a range's start must not leave an earlier
/// member further than the window from it. Medians 527, 270, 13 with window 257: 527 and 270
/// merge, 13 may not join them.
#[test]
fn window_bounds_the_whole_range() {
    let p = |chunk, median_ns| Pick {
        file: 3,
        chunk,
        median_ns,
        runs: 1,
    };
    let r = merge(&[p(33, 527), p(34, 270), p(35, 13)], 257);
    let got: Vec<(u64, u64, u64)> = r
        .iter()
        .map(|r| (r.first_chunk, r.count, r.offset_ns))
        .collect();
    assert_eq!(got, [(35, 1, 13), (33, 2, 270)]);
}

/// Pinned: a budget smaller than the first chunk gives an empty plan, marked as cut.
#[test]
fn budget_below_first_chunk_is_empty() {
    let r = merge(
        &[Pick {
            file: 2,
            chunk: 0,
            median_ns: 0,
            runs: 1,
        }],
        0,
    );
    let b = budget(&r, Some(0), stored);
    assert!(b.ranges.is_empty() && b.cut && b.total_bytes == 0);
}

/// Pinned: chunks shared with an earlier range cost nothing, so they fit even at the limit.
#[test]
fn shared_chunks_are_free() {
    let pick = |file, chunk, median_ns| Pick {
        file,
        chunk,
        median_ns,
        runs: 1,
    };
    // File 1 chunk 0 shares file 0 chunk 0's stored bytes.
    let r = merge(&[pick(0, 0, 0), pick(1, 0, 10)], 0);
    let first = u64::from(stored(0, 0).unwrap().1);
    let b = budget(&r, Some(first), stored);
    assert_eq!(b.ranges.len(), 2);
    assert_eq!(b.total_bytes, first);
    assert!(!b.cut);
}
