//! A source wrapper that fails on purpose: errors, corrupted bytes, short bodies.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{RequestKind, Source, SourceError};

/// What a failure looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An I/O error (retryable), like a reset connection.
    Error,
    /// The right length, but with bytes flipped (as from a server whose content changed).
    Corrupt,
    /// Fewer bytes than asked for.
    Short,
    /// HTTP 503 (retryable).
    Unavailable,
}

/// When requests fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePlan {
    /// Let `pass` requests through, then fail the next `fail` ones, then pass all.
    Countdown {
        /// Requests that succeed first.
        pass: u64,
        /// Requests that fail after them.
        fail: u64,
    },
    /// Fail every request whose range covers byte offsets in `start..end` (image offsets).
    Range {
        /// First bad byte.
        start: u64,
        /// End of the bad bytes.
        end: u64,
    },
    /// Fail each request with probability `per_mille / 1000` (deterministic from `seed`).
    Random {
        /// Failure probability in thousandths.
        per_mille: u32,
        /// Seed of the xorshift generator.
        seed: u64,
    },
    /// Fail every request.
    Always,
}

/// Wraps a source and makes chosen requests fail in a chosen way. Metadata reads
/// ([`RequestKind::Background`]) are failed only with [`FailurePlan::Always`], and are not
/// counted by [`FailurePlan::Countdown`].
pub struct FailingSource<S> {
    inner: S,
    plan: Mutex<FailurePlan>,
    kind: FailureKind,
    seen: AtomicU64,
    failed: AtomicU64,
    rng: Mutex<u64>,
}

impl<S: Source> FailingSource<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, plan: FailurePlan, kind: FailureKind) -> Self {
        let seed = match plan {
            FailurePlan::Random { seed, .. } => seed | 1,
            _ => 1,
        };
        FailingSource {
            inner,
            plan: Mutex::new(plan),
            kind,
            seen: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            rng: Mutex::new(seed),
        }
    }

    /// Changes the plan from now on.
    pub fn set_plan(&self, plan: FailurePlan) {
        *self.plan.lock() = plan;
    }

    /// Requests failed so far.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn should_fail(&self, offset: u64, len: u64, kind: RequestKind) -> bool {
        let plan = *self.plan.lock();
        if kind == RequestKind::Background && plan != FailurePlan::Always {
            return false;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        match plan {
            FailurePlan::Countdown { pass, fail } => n >= pass && n < pass + fail,
            FailurePlan::Range { start, end } => offset < end && offset + len > start,
            FailurePlan::Random { per_mille, .. } => {
                let mut x = self.rng.lock();
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                (*x % 1000) < u64::from(per_mille)
            }
            FailurePlan::Always => true,
        }
    }
}

impl<S: Source> Source for FailingSource<S> {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        if !self.should_fail(offset, len, kind) {
            return self.inner.read_range(offset, len, kind);
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        match self.kind {
            FailureKind::Error => Err(SourceError::Io {
                source_name: self.describe(),
                error: io::Error::new(io::ErrorKind::ConnectionReset, "injected failure"),
            }),
            FailureKind::Unavailable => Err(SourceError::Status {
                source_name: self.describe(),
                status: 503,
                offset,
                end: offset + len,
            }),
            FailureKind::Corrupt => {
                let mut b = self.inner.read_range(offset, len, kind)?;
                for (i, x) in b.iter_mut().enumerate() {
                    if i % 97 == 0 {
                        *x ^= 0x5a;
                    }
                }
                Ok(b)
            }
            FailureKind::Short => {
                let mut b = self.inner.read_range(offset, len, kind)?;
                b.truncate(b.len() / 2);
                Ok(b)
            }
        }
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        if *self.plan.lock() == FailurePlan::Always {
            return Err(SourceError::Io {
                source_name: self.describe(),
                error: io::Error::new(io::ErrorKind::ConnectionRefused, "injected failure"),
            });
        }
        self.inner.total_len()
    }

    fn describe(&self) -> String {
        format!("failing({})", self.inner.describe())
    }
}
