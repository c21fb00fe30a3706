//! Local data pushed into the kernel's page cache, so that a partly local file costs what a
//! local file costs.
//!
//! A file that is whole and verified is opened with passthrough. A file that is only partly
//! local is served through incfs, with kernel readahead off (readahead of a lazy file would
//! fetch chunks nobody asked for), so every page the program faults is one FUSE round trip,
//! also when its chunk is local: a warm start of clang from a cache that holds its demand set
//! makes ~10,000 round trips of 4 KiB. fanotify pre-content events cannot take the local part
//! over through passthrough, because mmap() of a passthrough file raises none
//! (`docs/local-reads.md`).
//!
//! So at the first cached open of a file on a mount, before the open is answered, workers
//! read the chunks of that file which were already local when the mount started (verified,
//! and not fetched by this mount) from the backing file and hand them to the kernel with
//! `FUSE_NOTIFY_STORE`, which fills the inode's page cache. The program's faults on those
//! pages are then page-cache hits; pages not local are read through incfs as before. What
//! is pushed:
//! - only verified local chunks, clipped to the file's size (a store past the end would grow
//!   the kernel's idea of the file);
//! - only chunks this mount did not fetch: those the mount fetches reach the page cache
//!   through the read that asked for them, and a cold mount's read-log stays complete (a
//!   pushed page never shows as a read);
//! - at most [`PushConfig::max_file_bytes`] per file, from the start of the file, in pieces of
//!   [`PIECE`].
//!
//! **Why before the open is answered.** A store locks each page it fills, and waits for that
//! lock uninterruptibly (`fuse_notify_store` → `filemap_grab_folio`); the kernel locks a
//! read's pages before it asks incfs for them. A store behind a read's page would be answered
//! once the read is, but were the daemon killed meanwhile, the storing thread could never
//! exit, the daemon's `/dev/fuse` would stay open, and the read (and the killed daemon) would
//! wait for ever — a hung reader instead of `ENOTCONN` (seen: `mount_kill9_…` hung in CI).
//! Before the first open of a file is answered, no read of it can be pending, so the push
//! meets no page lock; other opens of the file meanwhile wait for the same push. An open waits
//! at most [`OPEN_WAIT`]; a push that outlasts it keeps away from the pages of reads waiting
//! for the network ([`WaitingReads`]).
//!
//! A file's ranges are cut into spans of [`SPAN`] that [`PushConfig::threads`] workers take in
//! order, so one big library is read from its backing file by all of them side by side. A
//! local part of one range of at most [`INLINE_BYTES`] (a Python module, a small resource) is
//! pushed by the opening thread itself: handing it to a worker and waiting for it would cost
//! two wake-ups, often across CPUs, for one read and one store.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::IncFs;
use crate::format::InodeKind;

/// Bytes handed to the kernel in one store: large enough that a store's overhead vanishes,
/// small enough that the pusher's buffer stays small.
pub const PIECE: usize = 1 << 20;
/// Bytes of one job of a worker: a few pieces, so that a big file is spread over the workers.
pub const SPAN: u64 = 4 << 20;

/// Tunables of the pusher.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Push local data of partly local files into the page cache. Default on.
    pub enabled: bool,
    /// Most bytes pushed per file and mount. Default 256 MiB: more than the local part of
    /// any file the workloads here start with (libLLVM's demand set is ~20 MiB), and a cap on
    /// the memory a start from a nearly complete cache of huge files can take.
    pub max_file_bytes: u64,
    /// Worker threads. Default 4: the pushes wait on the disk (the backing files are cold
    /// too), so a few more than the two cores keep both busy.
    pub threads: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            max_file_bytes: 256 << 20,
            threads: 4,
        }
    }
}

/// Where pushed bytes go: the kernel, through `FUSE_NOTIFY_STORE` (the FUSE adapter's
/// notifier, [`super::fuse`]), or a recorder in tests.
pub trait Store: Send + 'static {
    /// Stores `data` at `offset` of FUSE inode `ino` in the kernel's page cache.
    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

/// Waiting reads of one inode: token and byte range.
type Waiting = Vec<(u64, Range<u64>)>;

/// The byte ranges of reads that wait for chunks to be fetched, per FUSE inode.
#[derive(Default)]
pub(super) struct WaitingReads {
    next: AtomicU64,
    by_ino: Mutex<HashMap<u64, Waiting>>,
}

impl WaitingReads {
    /// A read of `range` of `ino` waits; returns the token for [`WaitingReads::end`].
    pub(super) fn begin(&self, ino: u64, range: Range<u64>) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_ino
            .lock()
            .entry(ino)
            .or_default()
            .push((token, range));
        token
    }

    /// The read `token` of `ino` was answered.
    pub(super) fn end(&self, ino: u64, token: u64) {
        let mut m = self.by_ino.lock();
        if let Some(v) = m.get_mut(&ino) {
            v.retain(|(t, _)| *t != token);
            if v.is_empty() {
                m.remove(&ino);
            }
        }
    }

    /// The part of `want` (starting on a chunk of `chunk` bytes) that may be stored now: up
    /// to the first waiting read of `ino` in it, rounded down to a chunk. `Err(next)` when
    /// that leaves nothing: `next` is where to go on, past the waiting reads over its start,
    /// rounded up to a chunk.
    pub(super) fn clear_part(
        &self,
        ino: u64,
        want: Range<u64>,
        chunk: u64,
    ) -> Result<Range<u64>, u64> {
        let m = self.by_ino.lock();
        let Some(v) = m.get(&ino) else {
            return Ok(want);
        };
        let overlapping = || {
            v.iter()
                .map(|(_, r)| r)
                .filter(|r| r.start < want.end && r.end > want.start)
        };
        let end = overlapping()
            .map(|r| r.start / chunk * chunk)
            .fold(want.end, u64::min);
        if end > want.start {
            return Ok(want.start..end);
        }
        let past = overlapping()
            .filter(|r| r.start / chunk * chunk <= want.start)
            .map(|r| r.end)
            .max()
            .unwrap_or(want.end);
        Err(past.div_ceil(chunk) * chunk)
    }
}

/// Longest an open waits for its file's push ([`Pusher::opened`]); a push that takes longer
/// (a huge local part on a slow disk) goes on behind the open.
pub const OPEN_WAIT: Duration = Duration::from_secs(5);
/// Largest local part of a file the opening thread pushes itself: one read of the backing
/// file and one store, which a hand-off to a worker and back (two wake-ups, often on another
/// CPU) would cost as much as. Python's modules are nearly all below it.
pub const INLINE_BYTES: u64 = 256 << 10;

/// The jobs of one file's push not yet done, and their waiters.
#[derive(Default)]
struct Pending {
    left: Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut left = self.left.lock();
        while *left > 0 {
            if self.done.wait_until(&mut left, deadline).timed_out() {
                tracing::debug!(left = *left, "an open stopped waiting for its file's push");
                return;
            }
        }
    }
}

/// One job: a span of a file's preloaded ranges. Dropped, done or not, it counts down its
/// file's [`Pending`] (so a queue dropped at shutdown releases every waiter).
struct Job {
    ino: u64,
    range: Range<u64>,
    pending: Arc<Pending>,
}

impl Drop for Job {
    fn drop(&mut self) {
        let mut left = self.pending.left.lock();
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.pending.done.notify_all();
        }
    }
}

/// The pushing workers and the files they have taken on.
pub struct Pusher {
    fs: Arc<IncFs>,
    budget: u64,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// FUSE inodes pushed (or being pushed) on this mount.
    seen: Mutex<HashMap<u64, Arc<Pending>>>,
    /// The workers' store, for the small pushes the opening thread makes itself.
    store: Arc<dyn Store + Sync>,
    /// Set by [`Pusher::stop`]: the workers drop what is still queued.
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Pusher {
    /// Starts the workers for `fs`, storing through `store`.
    pub fn start(
        fs: Arc<IncFs>,
        store: impl Store + Sync,
        config: PushConfig,
    ) -> std::io::Result<Pusher> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let store: Arc<dyn Store + Sync> = Arc::new(store);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..config.threads.max(1) {
            let (fs, rx, store) = (Arc::clone(&fs), Arc::clone(&rx), Arc::clone(&store));
            let stopping = Arc::clone(&stopping);
            let t = std::thread::Builder::new()
                .name(format!("incfs-push-{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; PIECE];
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        if stopping.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Err(e) = fs.push_range(job.ino, job.range.clone(), &*store, &mut buf)
                        {
                            // The mount going away ends every store with an error: stop.
                            tracing::debug!(ino = job.ino, error = %e, "pushing local data failed");
                            if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EBADF)) {
                                return;
                            }
                        }
                    }
                })?;
            threads.push(t);
        }
        Ok(Pusher {
            fs,
            budget: config.max_file_bytes,
            tx: Mutex::new(Some(tx)),
            seen: Mutex::new(HashMap::new()),
            store,
            stopping,
            threads: Mutex::new(threads),
        })
    }

    /// FUSE inode `ino` is being opened cached: pushes its local data the first time, and
    /// returns when it is in the page cache (at most [`OPEN_WAIT`]; an open of the file
    /// that comes meanwhile waits too). Called before the open is answered: no read of the
    /// file can then hold a page lock that a store would wait for (see the module docs).
    pub fn opened(&self, ino: u64) {
        let (pending, inline) = {
            let mut seen = self.seen.lock();
            if let Some(p) = seen.get(&ino) {
                (Arc::clone(p), None)
            } else {
                let spans = self.spans(ino);
                let small = matches!(spans.as_slice(), [r] if r.end - r.start <= INLINE_BYTES);
                let p = Arc::new(Pending {
                    left: Mutex::new(spans.len()),
                    done: Condvar::new(),
                });
                seen.insert(ino, Arc::clone(&p));
                let mut jobs: Vec<Job> = spans
                    .into_iter()
                    .map(|range| Job {
                        ino,
                        range,
                        pending: Arc::clone(&p),
                    })
                    .collect();
                if small {
                    (p, jobs.pop())
                } else {
                    let tx = self.tx.lock();
                    for job in jobs {
                        // Not sent (stopped): dropped here, counted down.
                        if let Some(tx) = &*tx {
                            let _ = tx.send(job);
                        }
                    }
                    (p, None)
                }
            }
        };
        if let Some(job) = inline {
            if !self.stopping.load(Ordering::Relaxed) {
                let mut buf = vec![0u8; (job.range.end - job.range.start) as usize];
                if let Err(e) =
                    self.fs
                        .push_range(job.ino, job.range.clone(), &*self.store, &mut buf)
                {
                    tracing::debug!(ino = job.ino, error = %e, "pushing local data failed");
                }
            }
            // Dropping the job counts it down: opens of the file that came meanwhile go on.
            drop(job);
        }
        pending.wait(OPEN_WAIT);
    }

    /// The preloaded ranges of `ino` cut into spans of [`SPAN`].
    fn spans(&self, ino: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for r in self.fs.preloaded_ranges(ino, self.budget) {
            let mut start = r.start;
            while start < r.end {
                let end = (start + SPAN).min(r.end);
                out.push(start..end);
                start = end;
            }
        }
        out
    }

    /// Stops taking files, drops what is still queued (the mount is going away) and waits
    /// for the workers to finish the span they are on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.tx.lock().take();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl IncFs {
    /// Byte ranges of file `ino` (a FUSE inode) whose chunks were local when the mount
    /// started: verified and not fetched by this mount. Adjacent chunks merge; the last
    /// range ends at the file's size; whole chunks, at most `budget` bytes in all, from the
    /// start.
    pub fn preloaded_ranges(&self, ino: u64, budget: u64) -> Vec<Range<u64>> {
        let Ok((_, inode)) = self.inode(ino) else {
            return Vec::new();
        };
        let InodeKind::File { size, first_chunk } = inode.kind else {
            return Vec::new();
        };
        let cs = u64::from(self.manifest.chunk_size);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut left = budget;
        for c in 0..self.manifest.chunks_for(size) {
            let slot = first_chunk + c;
            if left == 0 {
                break;
            }
            if !self.cache.is_local(slot) || self.fetcher.fetched(slot) {
                continue;
            }
            let start = c * cs;
            let end = (start + cs).min(size);
            // Whole chunks only: a store that ends inside a page leaves that page not up to
            // date (`fuse_notify_store` marks a page only when it gets all of it or the end
            // of the file).
            if end - start > left {
                break;
            }
            left -= end - start;
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(start..end),
            }
        }
        out
    }

    /// Pushes `range` of `ino` (a part of its preloaded ranges) through `store`, in pieces
    /// of `buf.len()` bytes read from the backing file.
    fn push_range(
        &self,
        ino: u64,
        range: Range<u64>,
        store: &dyn Store,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        let Ok((idx, _)) = self.inode(ino) else {
            return Ok(());
        };
        let cs = u64::from(self.manifest.chunk_size);
        let mut off = range.start;
        while off < range.end {
            let want = off..range.end.min(off + buf.len() as u64);
            let part = match self.waiting_reads.clear_part(ino, want, cs) {
                Ok(part) => part,
                Err(next) => {
                    // Those pages reach the program through its own read.
                    off = next.max(off + cs);
                    continue;
                }
            };
            let n = (part.end - off) as usize;
            let piece = &mut buf[..n];
            self.cache
                .read(idx, off, piece)
                .map_err(std::io::Error::other)?;
            store.store(ino, off, piece)?;
            self.counters
                .pushed_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            off += n as u64;
        }
        tracing::trace!(path = %self.paths[idx as usize], start = range.start, end = range.end, "local data pushed to the page cache");
        Ok(())
    }
}
