//! A source wrapper that behaves like a slow link, with the same [`LinkConfig`] as
//! `incfs serve`: a fixed delay per request and one bandwidth limit ([`TokenBucket`]) shared
//! by all concurrent requests, like one network link.

use std::time::Instant;

use crate::link::{LinkConfig, TokenBucket};

use super::{RequestKind, Source, SourceError};

/// Wraps a source with a link's latency and bandwidth (its faults are not applied here; use
/// [`super::FailingSource`] for those).
pub struct ThrottledSource<S> {
    inner: S,
    link: LinkConfig,
    bucket: Option<TokenBucket>,
}

impl<S: Source> ThrottledSource<S> {
    /// Wraps `inner` behind `link`.
    pub fn new(inner: S, link: LinkConfig) -> Self {
        let bucket = link.token_bucket();
        ThrottledSource {
            inner,
            link,
            bucket,
        }
    }
}

impl<S: Source> Source for ThrottledSource<S> {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        let first_byte = Instant::now() + self.link.latency();
        let data = self.inner.read_range(offset, len, kind)?;
        let now = Instant::now();
        if first_byte > now {
            std::thread::sleep(first_byte - now);
        }
        if let Some(b) = &self.bucket {
            b.take_blocking(data.len() as u64);
        }
        Ok(data)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        self.inner.total_len()
    }

    fn describe(&self) -> String {
        format!("throttled({})", self.inner.describe())
    }
}
