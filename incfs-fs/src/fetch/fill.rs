//! The background fill: the rest of the image, at the lowest priority, so an app becomes
//! wholly local and keeps working offline (Android's incremental install, stargz and SOCI
//! do the same).
//!
//! One thread per mount. It waits until the prefetch plan, if any, has been fetched (the
//! plan's requests should have the link to themselves), loads the rest of the chunk table,
//! then asks for every chunk that is not local in stored order, one
//! [`FetchConfig::background_request_bytes`](super::FetchConfig::background_request_bytes)
//! batch at a time with the next one queued behind it, at [`Priority::Background`]: the
//! scheduler runs at most
//! [`FetchConfig::background_requests`](super::FetchConfig::background_requests) of them at
//! once and always takes demand and prefetch first, so a reader never queues behind the fill.
//!
//! **Following the program.** Before each batch the fill looks at where the latest demand
//! miss was and continues from there, in stored order: a program that faults a page of a
//! library will fault its neighbours next, and they are then on their way before it asks.
//! Once it reaches the end it wraps around to what it skipped.
//!
//! **Its own frames.** When the image is published with a bulk sidecar (`IMG.bulk`, which
//! `incfs pack` writes), the scheduler asks for the fill's batches as the sidecar's large
//! frames, which compress far better than the image's one-chunk frames
//! ([`crate::format::bulk`]); demand and prefetch keep the image's.
//!
//! An optional bandwidth cap paces it with a token bucket. A batch that fails (the source
//! is down) is retried with a growing pause, for as long as the mount lives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{Fetcher, Priority};
use crate::format::SEGMENT_ENTRIES;
use crate::rate::TokenBucket;

/// Tunables of the fill.
#[derive(Debug, Clone, Default)]
pub struct FillConfig {
    /// Largest rate of the fill, bytes per second (default: none, the link's idle time).
    pub bytes_per_sec: Option<f64>,
}

/// Counters of the fill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FillStats {
    /// Stored bytes the fill asked for so far.
    pub bytes_asked: u64,
    /// True once every chunk of the image is local.
    pub done: bool,
}

struct Shared {
    stop: AtomicBool,
    done: AtomicBool,
    bytes_asked: AtomicU64,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

impl Shared {
    /// Sleeps up to `d`, or less when stopped. True when it should stop.
    fn pause(&self, d: Duration) -> bool {
        let mut g = self.wake_lock.lock();
        if !self.stop.load(Ordering::Acquire) {
            self.wake.wait_for(&mut g, d);
        }
        self.stop.load(Ordering::Acquire)
    }
}

/// A running fill. Dropping it stops its thread.
pub struct Filler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How often the fill checks whether the plan is done before it starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Longest pause after failed batches.
const MAX_PAUSE: Duration = Duration::from_secs(30);

impl Filler {
    /// Starts filling the image of `fetcher` once `ready` returns true (it is polled; pass
    /// `|| true` to start at once).
    pub fn start(
        fetcher: Arc<Fetcher>,
        config: FillConfig,
        ready: Box<dyn Fn() -> bool + Send>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            bytes_asked: AtomicU64::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("incfs-fill".into())
            .spawn(move || {
                while !ready() {
                    if s.pause(READY_POLL) {
                        return;
                    }
                }
                run(&s, &fetcher, &config);
            })?;
        Ok(Filler {
            shared,
            thread: Some(thread),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> FillStats {
        FillStats {
            bytes_asked: self.shared.bytes_asked.load(Ordering::Relaxed),
            done: self.shared.done.load(Ordering::Relaxed),
        }
    }
}

impl Filler {
    /// Asks the fill to stop (at unmount); returns at once.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _g = self.shared.wake_lock.lock();
        self.shared.wake.notify_all();
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            super::join_within(t, super::THREAD_JOIN_WAIT);
        }
    }
}

fn run(s: &Shared, fetcher: &Fetcher, config: &FillConfig) {
    let table = Arc::clone(fetcher.table());
    let cache = fetcher.cache();
    let stopped = || s.stop.load(Ordering::Acquire) || fetcher.is_shut_down();
    // The table first, a few segments per request, so the fill knows the stored order.
    let step = (SEGMENT_ENTRIES * 16) as u64;
    let mut from = 0u64;
    let mut pause = Duration::from_millis(100);
    while from < table.len() {
        if stopped() {
            return;
        }
        let slots: Vec<u64> = (from..(from + step).min(table.len())).collect();
        match table.load(&slots, Priority::Background.kind()) {
            Ok(()) => {
                from += step;
                pause = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, "background fill: loading the chunk table failed; will retry");
                if s.pause(pause) {
                    return;
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
    // Every slot not local, in stored order.
    let mut order: Vec<(u64, u64)> = (0..table.len())
        .filter(|&slot| !cache.is_local(slot))
        .filter_map(|slot| table.get(slot).map(|e| (e.stored_offset, slot)))
        .collect();
    order.sort_unstable();
    // The sidecar's large frames, when one is published beside the image and there is
    // something to fetch ([`super::bulk`]).
    if !order.is_empty() {
        fetcher.take_up_bulk(&stopped);
    }
    // The dictionaries of what is left, before the first batch (none when all is local).
    let left: Vec<u64> = order.iter().map(|&(_, slot)| slot).collect();
    if let Err(e) = fetcher.load_dictionaries(&left) {
        tracing::warn!(error = %e, "background fill: loading the dictionaries failed; each batch will try again");
    }
    let bucket = config
        .bytes_per_sec
        .filter(|r| *r > 0.0)
        .map(|r| TokenBucket::new(r, fetcher.config().background_request_bytes));
    let batch_bytes = fetcher.config().background_request_bytes.max(1);
    let mut cursor = 0usize;
    let mut followed: Option<u64> = None;
    let mut pending: Option<Vec<u64>> = None;
    let mut pause = Duration::from_millis(100);
    loop {
        if stopped() {
            return;
        }
        // Follow the program: continue from its latest demand miss.
        let hint = fetcher.last_demand_offset();
        if hint.is_some() && hint != followed {
            followed = hint;
            if let Some(h) = hint {
                cursor = order.partition_point(|(o, _)| *o < h);
            }
        }
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        let mut scanned = 0usize;
        while bytes < batch_bytes && scanned < order.len() {
            let (_, slot) = order[cursor % order.len()];
            cursor = (cursor + 1) % order.len();
            scanned += 1;
            if cache.is_local(slot) {
                continue;
            }
            bytes += table.get(slot).map_or(0, |e| e.stored_share());
            batch.push(slot);
        }
        if batch.is_empty() {
            // Wait for what was queued last, then see whether anything is left.
            if let Some(p) = pending.take() {
                let _ = fetcher.fetch(&p, Priority::Background);
            }
            order.retain(|(_, slot)| !cache.is_local(*slot));
            if order.is_empty() {
                s.done.store(true, Ordering::Relaxed);
                tracing::info!("background fill: every chunk of the image is local");
                return;
            }
            continue;
        }
        if let Some(b) = &bucket {
            let wait = b.reserve(bytes);
            if !wait.is_zero() && s.pause(wait) {
                return;
            }
        }
        s.bytes_asked.fetch_add(bytes, Ordering::Relaxed);
        // Queue this batch behind the one in flight, then wait for that one.
        fetcher.submit(&batch, Priority::Background);
        if let Some(p) = pending.replace(batch) {
            match fetcher.fetch(&p, Priority::Background) {
                Ok(()) => pause = Duration::from_millis(100),
                Err(_) if stopped() => return,
                Err(e) => {
                    tracing::warn!(error = %e, "background fill: a batch failed; will retry");
                    if s.pause(pause) {
                        return;
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }
}
