//! The read-ahead policy: what a read asks the scheduler for besides its own chunks.
//!
//! One policy for every open file, kept per open handle ([`ReadAhead`]), in file bytes:
//! - **Small files whole**: the first read at offset 0 of a file no larger than
//!   [`ReadAheadConfig::small_file`] asks for the whole file, in the same request, so a
//!   script, a `.pyc` or a config file costs one round trip instead of two or three.
//! - **A window that grows while access stays sequential**, as the kernel's readahead and
//!   mountpoint-s3's prefetcher do: a miss that continues a sequential run opens a window
//!   of [`ReadAheadConfig::initial_window`] past it; each time the reader has consumed half
//!   of what was asked ahead, the window doubles (up to [`ReadAheadConfig::max_window`]) and
//!   the next stretch is asked for, before the reader gets there. A read elsewhere closes the
//!   window: random page faults never turn into megabytes. Like the kernel's, the window
//!   opens only on a miss: a run of hits (chunks a plan or the fill brought) asks for
//!   nothing, since whatever brought them is already ahead of the reader.
//! - **Miss amplification** is the scheduler's ([`super::FetchConfig::miss_amplify_bytes`]):
//!   it works in stored order, which only the chunk table knows.

use std::ops::Range;

/// Tunables of the read-ahead policy, in file bytes.
#[derive(Debug, Clone)]
pub struct ReadAheadConfig {
    /// Files up to this size are fetched whole on their first read at offset 0. Default
    /// 256 KiB: at 100 Mbit/s the whole of such a file takes ~20 ms to transfer, about one
    /// round trip, which is what a second read would have cost.
    pub small_file: u64,
    /// The first window of a sequential reader. Default 256 KiB (the kernel's readahead
    /// starts at 4× the request, 128 KiB reads here: 512 KiB; ours starts smaller because a
    /// window that turns out unused costs link time, not just memory).
    pub initial_window: u64,
    /// The largest window. Default 16 MiB: at 100 Mbit/s ~1.3 s of transfer, enough to hide
    /// the round trip at any link speed this tool targets; a sequential read of 64 MiB then
    /// takes about a dozen requests.
    pub max_window: u64,
}

impl Default for ReadAheadConfig {
    fn default() -> Self {
        ReadAheadConfig {
            small_file: 256 * 1024,
            initial_window: 256 * 1024,
            max_window: 16 * 1024 * 1024,
        }
    }
}

/// The read-ahead state of one open file.
#[derive(Debug, Clone, Default)]
pub struct ReadAhead {
    /// Where the next read starts if the reader stays sequential.
    next: u64,
    /// Bytes read in a row so far (0: no sequential run yet).
    run: u64,
    /// The current window (0: closed).
    window: u64,
    /// File bytes asked for ahead, up to here.
    asked_to: u64,
}

impl ReadAhead {
    /// A read of `range` of a file of `file_size` bytes arrived (`hit`: all its chunks were
    /// local): returns the file bytes to ask for besides the read itself (empty when none),
    /// and updates the state.
    pub fn on_read(
        &mut self,
        config: &ReadAheadConfig,
        range: Range<u64>,
        file_size: u64,
        hit: bool,
    ) -> Range<u64> {
        let end = range.end.min(file_size);
        let sequential = range.start == self.next && self.run > 0;
        let first = range.start == 0 && self.run == 0;
        self.next = end;
        if first && !hit && file_size <= config.small_file {
            self.run = end;
            self.asked_to = file_size;
            return end..file_size;
        }
        if !sequential {
            // A new run starts here; its second read opens the window.
            self.run = end - range.start.min(end);
            self.window = 0;
            self.asked_to = end;
            return end..end;
        }
        self.run += end - range.start.min(end);
        if self.window == 0 {
            if hit {
                // Whatever brought these chunks is ahead of the reader already.
                return end..end;
            }
            self.window = config.initial_window.min(config.max_window);
        } else if self.asked_to.saturating_sub(end) > self.window / 2 {
            // More than half the window is still ahead of the reader: nothing to ask yet.
            return end..end;
        } else {
            self.window = (self.window * 2).min(config.max_window);
        }
        let from = self.asked_to.max(end);
        let to = end.saturating_add(self.window).min(file_size);
        if to <= from {
            return end..end;
        }
        self.asked_to = to;
        from..to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    fn cfg() -> ReadAheadConfig {
        ReadAheadConfig::default()
    }

    #[test]
    fn small_file_is_asked_for_whole_on_its_first_read() {
        let mut ra = ReadAhead::default();
        assert_eq!(ra.on_read(&cfg(), 0..4 * K, 100 * K, false), 4 * K..100 * K);
        // Reading on asks for nothing more: it is all asked for.
        assert!(ra.on_read(&cfg(), 4 * K..8 * K, 100 * K, false).is_empty());
    }

    #[test]
    fn random_reads_ask_for_nothing_ahead() {
        let mut ra = ReadAhead::default();
        let size = 100 << 20;
        for off in [0, 40 << 20, 3 << 20, 77 << 20, 12 << 20] {
            assert!(ra.on_read(&cfg(), off..off + 4 * K, size, false).is_empty());
        }
    }

    #[test]
    fn window_grows_while_sequential_and_closes_on_a_seek() {
        let c = cfg();
        let mut ra = ReadAhead::default();
        let size = 1 << 30;
        let step = 128 * K;
        assert!(ra.on_read(&c, 0..step, size, false).is_empty());
        let mut off = step;
        let mut asked = Vec::new();
        while off < (64 << 20) {
            let r = ra.on_read(&c, off..off + step, size, false);
            if !r.is_empty() {
                assert!(r.start >= off + step, "asks only past the read");
                asked.push(r.end - r.start);
            }
            off += step;
        }
        assert_eq!(asked[0], c.initial_window);
        assert!(asked.iter().all(|&a| a <= c.max_window));
        assert!(asked.len() < 20, "{} asks for 64 MiB", asked.len());
        // A seek closes the window; the read after it opens a small one again.
        assert!(
            ra.on_read(&c, 900 << 20..(900 << 20) + step, size, false)
                .is_empty()
        );
        let r = ra.on_read(&c, (900 << 20) + step..(900 << 20) + 2 * step, size, false);
        assert_eq!(r.end - r.start, c.initial_window);
    }

    #[test]
    fn hits_open_no_window_but_an_open_window_keeps_asking_on_hits() {
        let c = cfg();
        let mut ra = ReadAhead::default();
        let size = 1 << 30;
        let step = 128 * K;
        // A sequential run of hits (a plan brought them): nothing asked.
        for i in 0..20 {
            assert!(
                ra.on_read(&c, i * step..(i + 1) * step, size, true)
                    .is_empty()
            );
        }
        // A miss in the run opens the window; the hits that follow keep it going.
        assert!(!ra.on_read(&c, 20 * step..21 * step, size, false).is_empty());
        let asked: u64 = (21..200)
            .map(|i| {
                let r = ra.on_read(&c, i * step..(i + 1) * step, size, true);
                r.end - r.start
            })
            .sum();
        assert!(asked > 0);
    }

    #[test]
    fn window_stops_at_the_end_of_the_file() {
        let mut ra = ReadAhead::default();
        let size = 1 << 20;
        let _ = ra.on_read(&cfg(), 0..128 * K, size, false);
        let mut off = 128 * K;
        while off < size {
            let r = ra.on_read(&cfg(), off..off + 128 * K, size, false);
            assert!(r.end <= size);
            off += 128 * K;
        }
    }
}
