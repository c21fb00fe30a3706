//! One retry policy, with one deadline, for every request a mount makes to its source: the
//! manifest at mount, chunk-table segments, chunks.
//!
//! A [`RetryPolicy`] gives each piece of work (a read's chunks, a table segment, the image
//! metadata) a total time, [`RetryPolicy::deadline`] (`--retry-timeout`). Within it, requests
//! are retried after a jittered exponential backoff; each request is given the time that is
//! left, but never more than [`RetryPolicy::attempt_timeout`] (a third of the deadline), so
//! that one stalled connection leaves time for a fresh one; and no request starts that could
//! not get [`MIN_ATTEMPT`] before the deadline. So a stalled, trickling or dead server turns
//! into an error at the deadline, not at reqwest's 30 s per silence nor never (a server that
//! sends a byte every 29 s defeats any silence timeout; the per-request timeout counts the
//! whole request, body included).
//!
//! **The default deadline, 10 s.** Long enough to ride out what a network does to a running
//! program without it failing: a dropped connection and its reconnect, a Wi-Fi roam, a load
//! balancer's failover, a server restart — each a few seconds. Short enough that a program
//! whose data cannot come fails with EIO while a person is still watching, rather than
//! hanging: interactive tools and health checks give up after 10–30 s. Android's incremental
//! file system makes the same trade with per-read timeouts its data loader sets
//! (`INCFS_IOC_SET_READ_TIMEOUTS`), failing a read that waits past them rather than blocking it.
//! A mount over a slow link with large requests wants more (`--retry-timeout 30`).
//!
//! **Progress restarts the clock.** A long request that is cut by its timeout after storing
//! part of its range has made progress: [`Retry::restart`] gives the rest a new deadline, so
//! a slow link that moves bytes never fails, while one that moves none fails in time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default total time for a piece of work (see the module docs for why 10 s).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Shortest time a request is given: below it, a request to a healthy server on a
/// continental link (a connect, a TLS handshake and a first byte: three round trips of up to
/// 100 ms) could not succeed, so it is not started.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(300);

/// How requests to the source are retried, within one deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total time for a piece of work, all attempts and pauses included. Default
    /// [`DEFAULT_DEADLINE`].
    pub deadline: Duration,
    /// Attempts before giving up even with time left. Default 20: bounds the requests sent
    /// to a server that refuses connections at once (with backoff doubling from 50 ms to
    /// 1 s, 20 attempts take about the default deadline).
    pub max_attempts: u32,
    /// Pause before the first retry; doubles each time, with jitter. Default 50 ms.
    pub initial_backoff: Duration,
    /// Longest pause between attempts. Default 1 s.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: DEFAULT_DEADLINE,
            max_attempts: 20,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The longest a single request may take: a third of the deadline (at least
    /// [`MIN_ATTEMPT`]), so a request stuck on a dead connection leaves time for two more.
    pub fn attempt_timeout(&self) -> Duration {
        (self.deadline / 3).max(MIN_ATTEMPT)
    }

    /// The longest wait for a connection (TCP and TLS): the attempt timeout, at most 5 s.
    pub fn connect_timeout(&self) -> Duration {
        self.attempt_timeout().min(Duration::from_secs(5))
    }

    /// Starts the clock for one piece of work.
    pub fn begin(&self) -> Retry {
        Retry {
            policy: *self,
            started: Instant::now(),
            attempt: 1,
            backoff: self.initial_backoff,
            seed: jitter_seed(),
        }
    }
}

/// The retry state of one piece of work: which attempt this is, and how much time is left.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: RetryPolicy,
    started: Instant,
    attempt: u32,
    backoff: Duration,
    seed: u64,
}

impl Retry {
    /// The attempt being made, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Time since the clock (re)started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.policy.deadline.saturating_sub(self.started.elapsed())
    }

    /// The time the request of this attempt may take: what is left of the deadline, at most
    /// [`RetryPolicy::attempt_timeout`], at least [`MIN_ATTEMPT`].
    pub fn timeout(&self) -> Duration {
        self.remaining()
            .min(self.policy.attempt_timeout())
            .max(MIN_ATTEMPT)
    }

    /// The work made progress: the rest of it gets a full deadline (and backoff) again.
    pub fn restart(&mut self) {
        self.started = Instant::now();
        self.backoff = self.policy.initial_backoff;
    }

    /// After a failed attempt: the pause before the next one, or `None` when the work is to
    /// fail now (attempts used up, or no time left for a pause and a request of
    /// [`MIN_ATTEMPT`]). Counts the attempt.
    pub fn next_pause(&mut self) -> Option<Duration> {
        if self.attempt >= self.policy.max_attempts {
            return None;
        }
        // "Equal jitter": half the backoff, plus a random part of the other half, so that
        // many readers failing together do not retry together.
        let half = self.backoff / 2;
        let pause = half + half.mul_f64(self.random());
        let left = self.remaining().checked_sub(MIN_ATTEMPT)?;
        if pause >= left {
            return None;
        }
        self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
        self.attempt += 1;
        Some(pause)
    }

    /// A number in [0, 1) (xorshift64*; jitter needs no better).
    fn random(&mut self) -> f64 {
        let mut x = self.seed;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn jitter_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Distinct per thread too: two workers starting in the same nanosecond still differ.
    let id = std::thread::current().id();
    let h = format!("{id:?}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    (t ^ h) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_millis(deadline_ms),
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        }
    }

    #[test]
    fn timeouts_follow_the_deadline() {
        let p = RetryPolicy::default();
        assert_eq!(p.attempt_timeout().as_millis(), 3333);
        assert_eq!(p.connect_timeout(), p.attempt_timeout());
        let long = RetryPolicy {
            deadline: Duration::from_secs(60),
            ..p
        };
        assert_eq!(long.attempt_timeout(), Duration::from_secs(20));
        assert_eq!(long.connect_timeout(), Duration::from_secs(5));
        let short = policy(100);
        assert_eq!(short.attempt_timeout(), MIN_ATTEMPT);
        assert_eq!(short.begin().timeout(), MIN_ATTEMPT);
    }

    #[test]
    fn pauses_are_jittered_doubling_and_capped() {
        let mut r = policy(60_000).begin();
        let mut last_cap = Duration::ZERO;
        for k in 0..8u32 {
            let cap = Duration::from_millis((10u64 << k).min(40));
            let pause = r.next_pause().unwrap();
            assert!(pause >= cap / 2 && pause <= cap, "pause {k}: {pause:?}");
            last_cap = cap;
        }
        assert_eq!(last_cap, Duration::from_millis(40));
        assert_eq!(r.attempt(), 9);
    }

    #[test]
    fn gives_up_before_the_deadline_and_after_max_attempts() {
        let mut r = policy(400).begin();
        // 400 ms - MIN_ATTEMPT leaves 100 ms for pauses.
        let mut total = Duration::ZERO;
        while let Some(p) = r.next_pause() {
            total += p;
            std::thread::sleep(p);
        }
        assert!(total < Duration::from_millis(100), "paused {total:?}");
        let mut r = RetryPolicy {
            max_attempts: 3,
            ..policy(60_000)
        }
        .begin();
        assert!(r.next_pause().is_some());
        assert!(r.next_pause().is_some());
        assert!(r.next_pause().is_none());
        assert_eq!(r.attempt(), 3);
    }

    #[test]
    fn restart_gives_a_new_deadline() {
        let mut r = policy(350).begin();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            r.next_pause().is_none(),
            "350 - 100 ms leaves no pause + 300 ms"
        );
        r.restart();
        assert!(r.remaining() > Duration::from_millis(340));
        assert!(r.next_pause().is_some());
    }
}
