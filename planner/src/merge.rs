//! Pure functions from ordered chunks to budgeted ranges: [`merge`] then [`budget`].

use std::collections::HashSet;

/// A chunk chosen for the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// File index in the image.
    pub file: u32,
    /// Chunk index within the file.
    pub chunk: u64,
    /// Median first-touch time over the runs that touched it, ns.
    pub median_ns: u64,
    /// Runs that touched it.
    pub runs: u32,
}

/// Consecutive chunks of one file, fetched as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// File index in the image.
    pub file: u32,
    /// First chunk index within the file.
    pub first_chunk: u64,
    /// Number of chunks (at least 1).
    pub count: u64,
    /// Earliest median first-touch of its chunks, ns: when the range is first needed.
    pub offset_ns: u64,
    /// Fewest runs that touched any of its chunks.
    pub min_runs: u32,
}

impl Range {
    /// The chunk indexes it covers.
    pub fn chunks(&self) -> std::ops::Range<u64> {
        self.first_chunk..self.first_chunk + self.count
    }
}

/// Merges picks into ranges: chunk `c+1` of a file joins the range ending at chunk `c` when
/// the median first touches of all the range's chunks stay within `window_ns` of each other,
/// so a range never pulls a chunk more than `window_ns` earlier than it is needed. Ranges come out ordered by
/// `offset_ns`, then file, then first chunk. Each pick lands in exactly one range; duplicate
/// picks of one chunk keep the earliest.
pub fn merge(picks: &[Pick], window_ns: u64) -> Vec<Range> {
    let mut sorted: Vec<Pick> = picks.to_vec();
    sorted.sort_by_key(|p| (p.file, p.chunk, p.median_ns));
    sorted.dedup_by_key(|p| (p.file, p.chunk));
    let mut out: Vec<Range> = Vec::new();
    // The latest median in the range being built: with `offset_ns` (the earliest) it bounds
    // the spread, which must stay within the window when a chunk joins.
    let mut latest = 0u64;
    for p in sorted {
        if let Some(r) = out.last_mut()
            && r.file == p.file
            && r.first_chunk + r.count == p.chunk
            && latest.max(p.median_ns) - r.offset_ns.min(p.median_ns) <= window_ns
        {
            r.count += 1;
            r.offset_ns = r.offset_ns.min(p.median_ns);
            r.min_runs = r.min_runs.min(p.runs);
            latest = latest.max(p.median_ns);
            continue;
        }
        latest = p.median_ns;
        out.push(Range {
            file: p.file,
            first_chunk: p.chunk,
            count: 1,
            offset_ns: p.median_ns,
            min_runs: p.runs,
        });
    }
    out.sort_by_key(|r| (r.offset_ns, r.file, r.first_chunk));
    out
}

/// Ranges cut to a byte budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgeted {
    /// The ranges that fit, in order; the last may be a prefix of an input range.
    pub ranges: Vec<Range>,
    /// Stored bytes they fetch, each stored chunk counted once.
    pub total_bytes: u64,
    /// Whether the budget cut anything.
    pub cut: bool,
}

/// Takes ranges in order while their stored bytes fit in `max_bytes` (no limit when `None`);
/// the first range that does not fit is cut to the chunks that do, and nothing after it is
/// taken. `stored(file, chunk)` gives a chunk's (stored offset, stored length); chunks that
/// share a stored offset (deduplicated content) are paid for once.
pub fn budget(
    ranges: &[Range],
    max_bytes: Option<u64>,
    stored: impl Fn(u32, u64) -> Option<(u64, u32)>,
) -> Budgeted {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        for (taken, c) in (0u64..).zip(r.chunks()) {
            let cost = match stored(r.file, c) {
                Some((off, len)) if !seen.contains(&off) => Some((off, u64::from(len))),
                _ => None,
            };
            let add = cost.map_or(0, |(_, len)| len);
            if max_bytes.is_some_and(|max| total + add > max) {
                if taken > 0 {
                    out.push(Range { count: taken, ..*r });
                }
                return Budgeted {
                    ranges: out,
                    total_bytes: total,
                    cut: true,
                };
            }
            if let Some((off, _)) = cost {
                seen.insert(off);
            }
            total += add;
        }
        out.push(*r);
    }
    Budgeted {
        ranges: out,
        total_bytes: total,
        cut: false,
    }
}
