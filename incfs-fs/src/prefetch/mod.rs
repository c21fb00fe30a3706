//! The prefetcher: walks a prefetch plan ahead of the program.
//!
//! A plan is a list of chunk slots in the order the program is expected to want them
//! ([`crate::plan::PrefetchPlan::slots`]). The prefetcher keeps a **window** of the plan
//! queued at [`Priority::Prefetch`] in the fetch scheduler: it starts at mount time, before
//! the program, and slides forward as chunks become local. The scheduler does the rest:
//! demand misses always go first (a worker serves only them, and every worker takes demand
//! before prefetch), adjacent queued chunks travel as one range request, so with a hot-first
//! image the whole window goes out as a few long requests.
//!
//! **Skip forward** keeps it useful when the program does not follow the plan exactly: when
//! the program touches a planned chunk beyond the window's start, the window jumps to it, so
//! the prefetcher stays ahead of the program instead of filling in chunks this run went past.
//!
//! Everything outside the plan is the scheduler's: its read-ahead policy for the program's
//! own reads ([`crate::fetch::readahead`]) and the background fill of the rest of the image
//! ([`crate::fetch::fill`]), which starts once the plan is done.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::fetch::{Fetcher, Priority};
use crate::table::LazyTable;

/// Tunables of the prefetcher.
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    /// Stored bytes of the plan kept queued ahead of the window start. Default 32 MiB: at
    /// 100 Mbit/s that is ~2.7 s of transfer, enough to keep every fetch worker busy with
    /// 4 MiB requests, and small enough that skipping forward abandons little.
    pub window_bytes: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            window_bytes: 32 << 20,
        }
    }
}

/// Counters of the prefetcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchStats {
    /// Distinct chunk slots in the plan.
    pub planned_chunks: u64,
    /// Planned chunks local now.
    pub planned_local: u64,
    /// Reads of planned chunks that found them local.
    pub prefetch_hits: u64,
    /// Reads of planned chunks that had to wait.
    pub prefetch_misses: u64,
    /// Times the window jumped forward to follow the program.
    pub skips: u64,
    /// True once every planned chunk has been queued.
    pub plan_queued: bool,
}

struct Shared {
    fetcher: Arc<Fetcher>,
    table: Arc<LazyTable>,
    config: PrefetchConfig,
    /// Planned slots, in plan order, each once.
    plan: Vec<u64>,
    /// Plan index of each planned slot.
    index: HashMap<u64, usize>,
    /// Plan index the window starts at.
    start: AtomicUsize,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    stop: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    skips: AtomicU64,
    queued_all: AtomicBool,
}

/// A running prefetcher. Dropping it stops its thread.
pub struct Prefetcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts walking `plan` (chunk slots in order; repeats are ignored).
    pub fn start(
        fetcher: Arc<Fetcher>,
        table: Arc<LazyTable>,
        plan: &[u64],
        config: PrefetchConfig,
    ) -> std::io::Result<Self> {
        let mut index = HashMap::with_capacity(plan.len());
        let mut order = Vec::with_capacity(plan.len());
        for &slot in plan {
            if slot < table.len() && !index.contains_key(&slot) {
                index.insert(slot, order.len());
                order.push(slot);
            }
        }
        let shared = Arc::new(Shared {
            fetcher,
            table,
            config,
            plan: order,
            index,
            start: AtomicUsize::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            stop: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            skips: AtomicU64::new(0),
            queued_all: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("incfs-prefetch".into())
            .spawn(move || s.run())?;
        Ok(Prefetcher {
            shared,
            thread: Some(thread),
        })
    }

    /// Tells the prefetcher that the program read chunks `first..=last` of the file whose
    /// chunks start at slot `file_first_slot`; `were_local` says whether they were all local
    /// when the read arrived. Call it before waiting for a miss, so the window can jump
    /// ahead of the program.
    pub fn on_read(&self, file_first_slot: u64, first: u64, last: u64, were_local: bool) {
        let s = &self.shared;
        let mut furthest: Option<usize> = None;
        let mut planned = false;
        for chunk in first..=last {
            if let Some(&i) = s.index.get(&(file_first_slot + chunk)) {
                planned = true;
                furthest = Some(furthest.map_or(i, |f| f.max(i)));
            }
        }
        if planned {
            if were_local {
                s.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                s.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(i) = furthest {
            let start = s.start.load(Ordering::Acquire);
            if i > start && s.start.fetch_max(i, Ordering::AcqRel) < i {
                s.skips.fetch_add(1, Ordering::Relaxed);
                s.poke();
            }
        }
    }

    /// True when the plan names `slot`.
    pub fn is_planned(&self, slot: u64) -> bool {
        self.shared.index.contains_key(&slot)
    }

    /// A probe that turns true once every planned chunk has been handed to the scheduler
    /// (it holds no reference to the prefetcher's owner).
    pub fn plan_queued_probe(&self) -> impl Fn() -> bool + Send + 'static {
        let s = Arc::clone(&self.shared);
        move || s.queued_all.load(Ordering::Relaxed)
    }

    /// The counters so far.
    pub fn stats(&self) -> PrefetchStats {
        let s = &self.shared;
        let cache = s.fetcher.cache();
        PrefetchStats {
            planned_chunks: s.plan.len() as u64,
            planned_local: s.plan.iter().filter(|&&slot| cache.is_local(slot)).count() as u64,
            prefetch_hits: s.hits.load(Ordering::Relaxed),
            prefetch_misses: s.misses.load(Ordering::Relaxed),
            skips: s.skips.load(Ordering::Relaxed),
            plan_queued: s.queued_all.load(Ordering::Relaxed),
        }
    }
}

impl Prefetcher {
    /// Stops walking the plan (at unmount); returns at once.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.poke();
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            crate::fetch::join_within(t, crate::fetch::THREAD_JOIN_WAIT);
        }
    }
}

/// How often the prefetch thread re-checks the window when nothing pokes it.
const TICK: Duration = Duration::from_millis(5);

impl Shared {
    fn poke(&self) {
        let mut woken = self.wake_lock.lock();
        *woken = true;
        self.wake.notify_all();
    }

    fn sleep(&self) {
        let mut woken = self.wake_lock.lock();
        if !*woken {
            self.wake.wait_for(&mut woken, TICK);
        }
        *woken = false;
    }

    /// The prefetch thread: keep `window_bytes` of the plan past the first non-local planned
    /// chunk queued; slide as chunks arrive; jump when the program skips ahead.
    fn run(&self) {
        let cache = self.fetcher.cache();
        // Next plan index not yet handed to the scheduler.
        let mut queued_to = 0usize;
        // Where the window started last time round.
        let mut last_start = 0usize;
        loop {
            if self.stop.load(Ordering::Acquire) || self.fetcher.is_shut_down() {
                return;
            }
            // The program jumped ahead: what the window had queued behind the jump is of no
            // use now; take it off the scheduler's queue rather than fetch it.
            let jumped = self.start.load(Ordering::Acquire);
            if jumped > last_start {
                let behind: Vec<u64> = self.plan[last_start..jumped.min(queued_to).max(last_start)]
                    .iter()
                    .copied()
                    .filter(|&slot| !cache.is_local(slot))
                    .collect();
                self.fetcher.unqueue(&behind, Priority::Prefetch);
            }
            // Advance the window start past chunks already local.
            let mut start = self.start.load(Ordering::Acquire);
            while start < self.plan.len() && cache.is_local(self.plan[start]) {
                start += 1;
            }
            self.start.fetch_max(start, Ordering::AcqRel);
            let start = self.start.load(Ordering::Acquire);
            last_start = start;
            if start >= self.plan.len() {
                break;
            }
            if queued_to >= self.plan.len() {
                // Everything is queued; the scheduler finishes the rest, and this thread
                // stays to follow the program's jumps until the plan is local.
                self.queued_all.store(true, Ordering::Relaxed);
                self.sleep();
                continue;
            }
            // Queue from max(start, queued_to) until the window holds window_bytes.
            let mut bytes_ahead: u64 = self.plan[start..queued_to.max(start)]
                .iter()
                .filter(|&&slot| !cache.is_local(slot))
                .map(|&slot| self.stored_len(slot))
                .sum();
            let mut batch = Vec::new();
            let mut i = queued_to.max(start);
            while i < self.plan.len() && bytes_ahead < self.config.window_bytes {
                let slot = self.plan[i];
                if !cache.is_local(slot) {
                    bytes_ahead += self.stored_len(slot);
                    batch.push(slot);
                }
                i += 1;
            }
            queued_to = i;
            if !batch.is_empty() {
                self.fetcher.submit(&batch, Priority::Prefetch);
            }
            self.sleep();
        }
        self.queued_all.store(true, Ordering::Relaxed);
    }

    fn stored_len(&self, slot: u64) -> u64 {
        self.table.get(slot).map_or(0, |e| e.stored_share())
    }
}
