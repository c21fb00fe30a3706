//! The descriptor budget of a mount: how many backing files it may hold open at once.
//!
//! A mount of a tree with thousands of files must not open one descriptor per file: under
//! the soft `RLIMIT_NOFILE` of most shells and services (1,024) reads would start failing
//! with `EMFILE` after about the thousandth file. So a daemon first raises its soft limit to
//! the hard one ([`raise_nofile_limit`]), and the cache keeps at most [`FdBudget::total`]
//! backing files open, closing the least recently used beyond that. FUSE passthrough's
//! backing ids are charged to the same budget ([`FdPermit`]): each holds an open file in the
//! kernel, and a mount whose files are all passed through would otherwise hold one per file.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors a mount leaves for everything but backing files: the FUSE channel (one per
/// event-loop thread), the source's connections, the record, checkpoint, lock and log
/// files, the standard streams, the runtimes' epoll and event fds. Generous: a mount with
/// 16 FUSE threads and 16 fetch connections uses about 50.
pub const RESERVED_FDS: u64 = 64;
/// Fewest backing files kept open, whatever the limit: below this every read of a tree
/// would reopen its file.
pub const MIN_OPEN_FILES: usize = 8;
/// Most backing files kept open: beyond this the reopen cost saved is nil, and each open
/// file costs kernel memory.
pub const MAX_OPEN_FILES: usize = 8192;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (as a daemon should: the
/// soft limit of a shell is a default for programs that do not know better). Returns the
/// soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit for the duration of the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        tracing::debug!(
            from = lim.rlim_cur,
            to = lim.rlim_max,
            "raised the descriptor limit"
        );
        return Ok(lim.rlim_max);
    }
    Ok(lim.rlim_cur)
}

/// The soft `RLIMIT_NOFILE` now (1,024, the usual default, if it cannot be read).
pub fn nofile_soft_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// How many backing files (open in the cache, or held by the kernel for passthrough) a mount
/// may have at once.
#[derive(Debug)]
pub struct FdBudget {
    total: usize,
    passthrough: AtomicUsize,
}

impl FdBudget {
    /// A budget of `total` files (at least [`MIN_OPEN_FILES`]).
    pub fn new(total: usize) -> Self {
        FdBudget {
            total: total.max(MIN_OPEN_FILES),
            passthrough: AtomicUsize::new(0),
        }
    }

    /// The budget for a descriptor limit of `limit`: half of it, and at least
    /// [`RESERVED_FDS`] left over, within [`MIN_OPEN_FILES`]..=[`MAX_OPEN_FILES`]. Under
    /// `ulimit -n 256` that is 128 files.
    pub fn for_limit(limit: u64) -> Self {
        let n = (limit / 2).min(limit.saturating_sub(RESERVED_FDS));
        FdBudget::new(usize::try_from(n).unwrap_or(usize::MAX).min(MAX_OPEN_FILES))
    }

    /// Files in the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Passthrough backing ids holding a permit now.
    pub fn passthrough(&self) -> usize {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// How many backing files the cache may keep open now: what passthrough leaves.
    pub fn open_files(&self) -> usize {
        self.total
            .saturating_sub(self.passthrough())
            .max(MIN_OPEN_FILES)
    }

    /// A permit for one more passthrough backing id, unless they would leave the cache fewer
    /// than [`MIN_OPEN_FILES`].
    pub fn try_passthrough(self: &Arc<Self>) -> Option<FdPermit> {
        let max = self.total.saturating_sub(MIN_OPEN_FILES);
        self.passthrough
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| FdPermit(Arc::clone(self)))
    }
}

/// One passthrough backing id's share of the [`FdBudget`]; returned when dropped.
#[derive(Debug)]
pub struct FdPermit(Arc<FdBudget>);

impl Drop for FdPermit {
    fn drop(&mut self) {
        self.0.passthrough.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_the_limit() {
        assert_eq!(FdBudget::for_limit(256).total(), 128);
        assert_eq!(FdBudget::for_limit(1024).total(), 512);
        assert_eq!(FdBudget::for_limit(100).total(), 36);
        assert_eq!(FdBudget::for_limit(20).total(), MIN_OPEN_FILES);
        assert_eq!(FdBudget::for_limit(1 << 20).total(), MAX_OPEN_FILES);
    }

    #[test]
    fn passthrough_permits_leave_the_cache_its_minimum() {
        let b = Arc::new(FdBudget::new(10));
        let p1 = b.try_passthrough().unwrap();
        let p2 = b.try_passthrough().unwrap();
        assert!(b.try_passthrough().is_none());
        assert_eq!(b.open_files(), MIN_OPEN_FILES);
        drop(p1);
        assert_eq!(b.passthrough(), 1);
        assert_eq!(b.open_files(), 9);
        drop(p2);
        assert_eq!(b.open_files(), 10);
    }
}
