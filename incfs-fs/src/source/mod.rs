//! Where image bytes come from: a local file, an HTTP(S) server, an OCI registry
//! ([`oci`]), an S3(-compatible) bucket, or a test double.
//!
//! Every request is tagged with why it is made ([`RequestKind`]), so logs, stats and the
//! server can tell demand misses from prefetch.

mod byteranges;
#[cfg(feature = "testing")]
mod failing;
mod file;
mod http;
#[cfg(feature = "testing")]
mod mock;
pub mod oci;
mod s3;
#[cfg(feature = "testing")]
mod throttled;

use std::fmt;
use std::io;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "testing")]
pub use failing::{FailingSource, FailureKind, FailurePlan};
pub use file::FileSource;
pub use http::{HttpConfig, HttpSource, REQUEST_KIND_HEADER};
#[cfg(feature = "testing")]
pub use mock::{MockRequest, MockSource};
pub use s3::S3Source;
#[cfg(feature = "testing")]
pub use throttled::ThrottledSource;

use crate::format::{Digest, RangeRead};
use crate::retry::RetryPolicy;

/// Why a range is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    /// A program is blocked on these bytes.
    Demand,
    /// The prefetch plan asked for them.
    Prefetch,
    /// Everything else: metadata at mount, read-ahead, background fill.
    Background,
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestKind::Demand => "demand",
            RequestKind::Prefetch => "prefetch",
            RequestKind::Background => "background",
        })
    }
}

/// Errors from a source. [`SourceError::is_retryable`] tells a transient failure from a
/// permanent one.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A local or network I/O error.
    #[error("{source_name}: {error}")]
    Io {
        /// The source, as [`Source::describe`] gives it.
        source_name: String,
        /// What failed.
        error: io::Error,
    },
    /// The server answered with an unexpected status.
    #[error("{source_name}: HTTP status {status} for bytes {offset}..{end}")]
    Status {
        /// The source.
        source_name: String,
        /// The status code.
        status: u16,
        /// First byte asked for.
        offset: u64,
        /// End of the range asked for.
        end: u64,
    },
    /// The answer had the wrong length.
    #[error("{source_name}: got {got} bytes for a range of {want}")]
    Short {
        /// The source.
        source_name: String,
        /// Bytes received.
        got: u64,
        /// Bytes asked for.
        want: u64,
    },
    /// The range lies past the end of the image.
    #[error("{source_name}: range {offset}+{len} is past the end ({total} bytes)")]
    OutOfRange {
        /// The source.
        source_name: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Length of the image.
        total: u64,
    },
    /// The source cannot be used at all (bad URL, unsupported scheme).
    #[error("{0}")]
    Unusable(String),
    /// The store says the object does not exist (the message names it and what to check).
    #[error("{0}")]
    NotFound(String),
}

impl SourceError {
    /// True when trying again may succeed (network errors, 5xx, short bodies).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Io { .. } | SourceError::Short { .. } => true,
            SourceError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            SourceError::OutOfRange { .. }
            | SourceError::Unusable(_)
            | SourceError::NotFound(_) => false,
        }
    }
}

/// Random access to an image's bytes. Implementations are shared between threads.
pub trait Source: Send + Sync {
    /// Reads exactly `len` bytes at `offset`.
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError>;

    /// Total length of the image.
    fn total_len(&self) -> Result<u64, SourceError>;

    /// A short description for messages, e.g. the path or URL.
    fn describe(&self) -> String;

    /// Reads `len` bytes at `offset`, handing them to `on_piece` in order as they arrive, so
    /// a caller can verify and store the start of a long range before its end has come.
    ///
    /// The pieces, concatenated, are exactly the range; their sizes are up to the source.
    /// When `on_piece` returns [`ControlFlow::Break`] the read stops and returns `Ok`. On an
    /// error, the pieces already handed over were correct as far as the source can tell
    /// (digests still decide), but the rest of the range did not come.
    ///
    /// The default reads the whole range with [`Source::read_range`] and hands it over as
    /// one piece; network sources override it.
    fn read_range_streaming(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let data = self.read_range(offset, len, kind)?;
        let _ = on_piece(&data);
        Ok(())
    }

    /// Like [`Source::read_range_streaming`], but the request fails (retryably, as timed
    /// out) once it has taken `timeout`, however the server behaves: stalled, trickling a
    /// byte at a time, or never answering a connect. The retry loops pass the time their
    /// [`crate::retry::Retry`] leaves the attempt.
    ///
    /// The default ignores `timeout` (right for sources that cannot stall, such as a local
    /// file); network sources override it.
    fn read_range_within(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let _ = timeout;
        self.read_range_streaming(offset, len, kind, on_piece)
    }

    /// Most ranges [`Source::read_ranges_within`] asks for in one request: 1 (the default)
    /// when the source has no such request, so callers should not group ranges for it.
    fn ranges_per_request(&self) -> usize {
        1
    }

    /// Reads several ranges, ascending and apart, in as few requests as the source allows
    /// (an HTTP multi-range request), within `timeout` in all. `on_piece(i, bytes)` gets
    /// each range's bytes in order within the range; the ranges may come in any order. As
    /// with [`Source::read_range_streaming`], on an error the pieces already handed over
    /// were correct as far as the source can tell, and [`ControlFlow::Break`] stops it all.
    ///
    /// The default reads the ranges one after another with [`Source::read_range_within`].
    fn read_ranges_within(
        &self,
        ranges: &[(u64, u64)],
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        read_ranges_one_by_one(self, ranges, kind, timeout, on_piece)
    }
}

/// [`Source::read_ranges_within`] as one request per range.
pub(crate) fn read_ranges_one_by_one<S: Source + ?Sized>(
    source: &S,
    ranges: &[(u64, u64)],
    kind: RequestKind,
    timeout: Duration,
    on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
) -> Result<(), SourceError> {
    let started = std::time::Instant::now();
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let left = timeout.saturating_sub(started.elapsed());
        let mut stop = false;
        source.read_range_within(offset, len, kind, left, &mut |piece| {
            let flow = on_piece(i, piece);
            stop = flow.is_break();
            flow
        })?;
        if stop {
            break;
        }
    }
    Ok(())
}

impl<S: Source + ?Sized> Source for Arc<S> {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        (**self).read_range(offset, len, kind)
    }
    fn total_len(&self) -> Result<u64, SourceError> {
        (**self).total_len()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn read_range_streaming(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        (**self).read_range_streaming(offset, len, kind, on_piece)
    }
    fn read_range_within(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        (**self).read_range_within(offset, len, kind, timeout, on_piece)
    }
    fn ranges_per_request(&self) -> usize {
        (**self).ranges_per_request()
    }
    fn read_ranges_within(
        &self,
        ranges: &[(u64, u64)],
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        (**self).read_ranges_within(ranges, kind, timeout, on_piece)
    }
}

/// True when `e` says the object is not there (HTTP 403, 404 or 410, no such file, no such
/// S3 object): a sidecar beside an image that is simply absent.
pub fn is_absent(e: &SourceError) -> bool {
    match e {
        SourceError::Status { status, .. } => matches!(status, 403 | 404 | 410),
        SourceError::Io { error, .. } => error.kind() == io::ErrorKind::NotFound,
        SourceError::NotFound(_) => true,
        _ => false,
    }
}

/// Most bytes a network source reserves for a range before its body arrives (the length may
/// come from a header not yet verified).
pub(crate) const MAX_PREALLOC: usize = 16 << 20;

/// `OutOfRange` unless `offset..offset + len` lies within an image of `total` bytes.
pub(crate) fn check_range(
    name: &str,
    offset: u64,
    len: u64,
    total: u64,
) -> Result<(), SourceError> {
    if offset.checked_add(len).is_none_or(|end| end > total) {
        return Err(SourceError::OutOfRange {
            source_name: name.to_string(),
            offset,
            len,
            total,
        });
    }
    Ok(())
}

/// Hands the pieces of a body `next` yields to `on_piece` until it ends, checking that they
/// make exactly `len` bytes (`name` for errors): the body loop of a network source's range
/// read, stopped early when `on_piece` breaks.
pub(crate) fn stream_exact(
    name: &str,
    len: u64,
    next: &mut dyn FnMut() -> Result<Option<bytes::Bytes>, SourceError>,
    on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), SourceError> {
    let short = |got| SourceError::Short {
        source_name: name.to_string(),
        got,
        want: len,
    };
    let mut got = 0u64;
    while let Some(piece) = next()? {
        let n = piece.len() as u64;
        if n > len - got {
            return Err(short(got + n));
        }
        got += n;
        if on_piece(&piece).is_break() {
            return Ok(());
        }
    }
    if got != len {
        return Err(short(got));
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset` through the source's streaming read, within
/// `timeout` when one is given ([`Source::read_range_within`]), the buffer growing as bytes
/// arrive: what a network source's [`Source::read_range`] is.
pub(crate) fn collect_range<S: Source + ?Sized>(
    source: &S,
    offset: u64,
    len: u64,
    kind: RequestKind,
    timeout: Option<Duration>,
) -> Result<Vec<u8>, SourceError> {
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(usize::MAX).min(MAX_PREALLOC));
    let mut push = |piece: &[u8]| {
        buf.extend_from_slice(piece);
        ControlFlow::Continue(())
    };
    match timeout {
        Some(t) => source.read_range_within(offset, len, kind, t, &mut push)?,
        None => source.read_range_streaming(offset, len, kind, &mut push)?,
    }
    if buf.len() as u64 != len {
        return Err(SourceError::Short {
            source_name: source.describe(),
            got: buf.len() as u64,
            want: len,
        });
    }
    Ok(buf)
}

/// Reads exactly `len` bytes at `offset` within `timeout` (see [`Source::read_range_within`]).
pub fn read_within<S: Source + ?Sized>(
    source: &S,
    offset: u64,
    len: u64,
    kind: RequestKind,
    timeout: Duration,
) -> Result<Vec<u8>, SourceError> {
    collect_range(source, offset, len, kind, Some(timeout))
}

/// Lets the format layer read an image's metadata through any source (as background
/// requests).
pub struct MetaReader<'a, S: ?Sized>(pub &'a S);

/// Like [`MetaReader`], each request bounded by a timeout (the time a retry attempt has).
pub struct MetaReaderWithin<'a, S: ?Sized> {
    /// The source.
    pub source: &'a S,
    /// How long each request may take.
    pub timeout: Duration,
}

impl<S: Source + ?Sized> RangeRead for MetaReaderWithin<'_, S> {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        read_within(
            self.source,
            offset,
            len,
            RequestKind::Background,
            self.timeout,
        )
        .map_err(io::Error::other)
    }

    fn total_len(&self) -> io::Result<u64> {
        self.source.total_len().map_err(io::Error::other)
    }
}

impl<S: Source + ?Sized> RangeRead for MetaReader<'_, S> {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.0
            .read_range(offset, len, RequestKind::Background)
            .map_err(io::Error::other)
    }

    fn total_len(&self) -> io::Result<u64> {
        self.0.total_len().map_err(io::Error::other)
    }
}

/// A source that could not be reached when the mount started: every request fails at once
/// (not retryably), naming the source and why. A mount over it serves what its cache holds
/// ([`crate::cache::offline`]).
#[derive(Debug)]
pub struct OfflineSource {
    name: String,
    why: String,
}

impl OfflineSource {
    /// The stand-in for `spec`, which failed to open with `error`.
    pub fn new(spec: &str, error: &SourceError) -> Self {
        // Named as the HTTP source would name itself: without the query (which may hold
        // credentials), so that its cache is found under the same name.
        let name = match reqwest::Url::parse(spec) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => http::redacted(&url),
            _ => spec.to_string(),
        };
        OfflineSource {
            name,
            why: error.to_string(),
        }
    }

    fn error(&self) -> SourceError {
        SourceError::Unusable(format!(
            "{} is unreachable (at mount: {}); this mount serves only what its cache holds",
            self.name, self.why
        ))
    }
}

impl Source for OfflineSource {
    fn read_range(&self, _: u64, _: u64, _: RequestKind) -> Result<Vec<u8>, SourceError> {
        Err(self.error())
    }
    fn total_len(&self) -> Result<u64, SourceError> {
        Err(self.error())
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// Opens `spec` for a mount ([`open_for`]) whose cache is `cache_dir`; when it cannot be
/// reached (a network error, a server error), an [`OfflineSource`] stands in, so that a
/// mount whose cache holds the image can still start. An HTTP(S) image whose head the cache
/// holds (the one `expect` names, or the one this URL served last) is opened asking for its
/// header alone beside the `HEAD`, not its first 256 KiB: the mount then needs no more
/// ([`crate::format::read_head_or_known`]).
pub fn open_or_offline(
    spec: &str,
    retry: &RetryPolicy,
    cache_dir: &Path,
    expect: Option<&Digest>,
) -> Result<Arc<dyn Source>, SourceError> {
    let mut http = HttpConfig::for_policy(retry);
    if http::name_of(spec)
        .is_some_and(|name| crate::cache::offline::holds_head(cache_dir, &name, expect))
    {
        http.probe_bytes = crate::format::HEADER_LEN as u64;
    }
    match open_with(spec, &http) {
        Ok(s) => Ok(s),
        Err(e) if e.is_retryable() => {
            tracing::warn!(source = spec, error = %e, "the source is unreachable; trying the cache alone");
            Ok(Arc::new(OfflineSource::new(spec, &e)))
        }
        Err(e) => Err(e),
    }
}

/// Opens a source from what a user typed: a path, a `file://` URL, an `http(s)://` URL
/// (with [`HttpConfig::default`]), an `oci://` registry reference, or an `s3://BUCKET/KEY` URL.
pub fn open(spec: &str) -> Result<Arc<dyn Source>, SourceError> {
    open_with(spec, &HttpConfig::default())
}

/// Opens a source for a mount whose requests follow `retry`: an HTTP source gets its
/// connect and request timeouts from it ([`HttpConfig::for_policy`]).
pub fn open_for(spec: &str, retry: &RetryPolicy) -> Result<Arc<dyn Source>, SourceError> {
    open_with(spec, &HttpConfig::for_policy(retry))
}

/// Most bytes [`open_beside`] asks for at once of a file read whole (clang-22's plan is 445
/// KB): a larger one costs these bytes again, one request later.
pub const WHOLE_PROBE_BYTES: u64 = 1 << 20;

/// A file published beside an image ([`open_beside`]).
pub struct Beside {
    /// Its spec: the image's with the suffix.
    pub spec: String,
    /// The open source.
    pub source: Arc<dyn Source>,
    /// The policy it was opened with (the caller's, its deadline capped).
    pub retry: RetryPolicy,
}

/// Opens the file published beside the image at `image_spec`, named with `suffix` (a plan,
/// a delta sidecar, the bulk sidecar), within `retry` but at most `deadline`. `Ok(None)`
/// when there is none there. An `oci://` image's companions are layers of its artifact: its
/// bulk sidecar is the artifact's bulk layer, and it has no others. With `read_whole` (a
/// plan), an HTTP(S) file's open asks for up to [`WHOLE_PROBE_BYTES`] of it at once, so a
/// file that fits costs one request.
pub fn open_beside(
    image_spec: &str,
    suffix: &str,
    retry: &RetryPolicy,
    deadline: Duration,
    read_whole: bool,
) -> Result<Option<Beside>, SourceError> {
    let mut retry = *retry;
    retry.deadline = retry.deadline.min(deadline);
    if oci::is_oci(image_spec) {
        if suffix != crate::format::bulk::BULK_SUFFIX {
            return Ok(None);
        }
        let artifact = oci::OciArtifact::resolve(image_spec, &HttpConfig::for_policy(&retry))?;
        return Ok(artifact.bulk_source().map(|s| Beside {
            spec: format!("{image_spec}{suffix}"),
            source: Arc::new(s),
            retry,
        }));
    }
    let spec = format!("{image_spec}{suffix}");
    // A sidecar is read from its header on, a plan whole: only the plan is probed.
    let http = HttpConfig {
        probe_bytes: if read_whole { WHOLE_PROBE_BYTES } else { 0 },
        probe_instead_of_head: read_whole,
        ..HttpConfig::for_policy(&retry)
    };
    match open_with(&spec, &http) {
        Ok(source) => Ok(Some(Beside {
            spec,
            source,
            retry,
        })),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Like [`open`], with `http` for an HTTP(S) URL or a registry.
pub fn open_with(spec: &str, http: &HttpConfig) -> Result<Arc<dyn Source>, SourceError> {
    if let Some(path) = spec.strip_prefix("file://") {
        return Ok(Arc::new(FileSource::open(path.as_ref())?));
    }
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Ok(Arc::new(HttpSource::open(spec, http)?));
    }
    if oci::is_oci(spec) {
        return Ok(Arc::new(oci::open(spec, http)?));
    }
    if spec.starts_with(s3::SCHEME) {
        return Ok(Arc::new(S3Source::open(spec, http)?));
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return Err(SourceError::Unusable(format!(
            "{spec}: unsupported scheme {scheme:?} (use a path, file://, http://, https://, \
             oci:// or s3://)"
        )));
    }
    Ok(Arc::new(FileSource::open(spec.as_ref())?))
}
