//! An image behind an HTTP(S) URL, read with Range requests.
//!
//! Works against any static server that honours single ranges (nginx, S3/GCS presigned or
//! public URLs, CDNs, `incfs serve`). One [`reqwest`] client with rustls keeps connections
//! alive and reuses them (HTTP/1.1 keep-alive, HTTP/2 when the server offers it by ALPN).
//!
//! Answers are checked strictly, because a confused proxy or a changed file must not turn
//! into bytes at the wrong offset: a range must come back as `206` with a `Content-Range`
//! naming exactly that range and the image length seen at open, and with exactly that many
//! bytes. A `200` is accepted only when the range is the whole image. Anything else is a
//! [`SourceError`]: `5xx`, `429`, `408`, network errors and short bodies are retryable,
//! other statuses are not.
//!
//! The client is async; [`HttpSource`] owns a current-thread tokio runtime and its blocking
//! methods run each request with [`tokio::runtime::Runtime::block_on`] on the calling thread.
//! Many threads may have requests in flight at once: whichever of them holds the runtime
//! drives every connection, the others poll their own request when woken. Nothing hops to a
//! worker thread, and a connection is back in the pool before the next request looks for one
//! (with a worker pool, about a third of back-to-back requests to nginx opened a new
//! connection, which over TLS costs a handshake). The methods must not be called from inside
//! an async runtime (they return an error instead of blocking it).

use std::error::Error as _;
use std::io;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, RANGE};
use tracing::{debug, trace};

use super::byteranges::{MultiRange, check_ranges, range_header, read_answer, status_error};
use super::{RequestKind, Source, SourceError};
use crate::retry::RetryPolicy;

/// Header telling the server why a range is read (`demand`, `prefetch`, `background`);
/// `incfs serve` counts requests and bytes by it, other servers ignore it.
pub const REQUEST_KIND_HEADER: &str = "x-incfs-request";

/// How an [`HttpSource`] talks to its server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Longest wait for a TCP (and TLS) connection (default 10 s).
    pub connect_timeout: Duration,
    /// Longest silence while waiting for a response head or for the next bytes of its body
    /// (default 30 s). A stalled server fails the request after this long.
    pub read_timeout: Duration,
    /// Extra trusted certificate authorities, PEM encoded, besides the system's roots
    /// (default none). For test servers with their own CA.
    pub extra_root_certs_pem: Vec<Vec<u8>>,
    /// Speak HTTP/1.1 only, even when the server offers HTTP/2 (default false).
    pub http1_only: bool,
    /// Longest time a whole request may take, body included, when the caller gives none
    /// ([`Source::read_range_within`] does): the one limit a server trickling a byte at a
    /// time cannot defeat (default none, for whole-image downloads).
    pub request_timeout: Option<Duration>,
    /// Bytes from the start of the file that opening asks for beside its `HEAD`, kept for
    /// the first read inside them (default [`INITIAL_READ`](crate::format::INITIAL_READ),
    /// the read an image's open begins with; also a whole plan, or a sidecar's header and
    /// index). 0: none.
    pub probe_bytes: u64,
    /// Ask for the probe instead of the `HEAD` (a `HEAD` only when its answer gave no
    /// length): for a file read whole when it fits, such as a published plan (default
    /// false: a failed probe then costs the open nothing).
    pub probe_instead_of_head: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            extra_root_certs_pem: Vec::new(),
            http1_only: false,
            request_timeout: None,
            probe_bytes: crate::format::INITIAL_READ,
            probe_instead_of_head: false,
        }
    }
}

impl HttpConfig {
    /// The configuration of a mount whose requests follow `retry`: connect, silence and
    /// whole-request timeouts from it, so no request outlives the attempt it belongs to.
    pub fn for_policy(retry: &RetryPolicy) -> Self {
        HttpConfig {
            connect_timeout: retry.connect_timeout(),
            read_timeout: retry.attempt_timeout(),
            request_timeout: Some(retry.attempt_timeout()),
            ..HttpConfig::default()
        }
    }
}

/// The first bytes of a file, fetched at open, and the ranges of them handed out so far.
#[derive(Debug)]
struct Prefix {
    bytes: Vec<u8>,
    served: Vec<(u64, u64)>,
}

/// An image served over HTTP(S), read with Range requests. Cheap to share between threads.
#[derive(Debug)]
pub struct HttpSource {
    url: reqwest::Url,
    /// The URL without its query (which may hold credentials), for messages.
    name: String,
    client: reqwest::Client,
    /// Always `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
    len: u64,
    /// The file's first bytes, fetched at open beside the `HEAD`: a read inside them is
    /// answered from here, once (a read again of bytes already handed out, as after a
    /// digest mismatch, drops them and goes to the server).
    prefix: Mutex<Option<Prefix>>,
    /// Whether ranges still go several to a request.
    multi_range: MultiRange,
}

impl HttpSource {
    /// Opens `url`: checks it, connects, and learns the image length from a `HEAD` (or, when
    /// that is refused or has no length, from a `bytes=0-0` range's `Content-Range`). Beside
    /// the `HEAD` it asks for the first [`HttpConfig::probe_bytes`] and keeps them for the
    /// first read inside them: an image's open then costs one round trip, not two.
    pub fn open(url: &str, config: &HttpConfig) -> Result<Self, SourceError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| SourceError::Unusable(format!("{url}: not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SourceError::Unusable(format!(
                "{url}: only http:// and https:// URLs are HTTP sources"
            )));
        }
        let name = redacted(&parsed);
        let unusable = |what: &str, e: &dyn std::error::Error| {
            SourceError::Unusable(format!("{name}: {what}: {}", error_chain(e)))
        };

        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .user_agent(concat!("incfs/", env!("CARGO_PKG_VERSION")));
        if config.http1_only {
            builder = builder.http1_only();
        }
        if let Some(t) = config.request_timeout {
            builder = builder.timeout(t);
        }
        for pem in &config.extra_root_certs_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| unusable("bad extra root certificate", &e))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .build()
            .map_err(|e| unusable("cannot build an HTTP client", &e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Io {
                source_name: name.clone(),
                error: io::Error::new(e.kind(), format!("cannot start the HTTP runtime: {e}")),
            })?;
        let mut source = HttpSource {
            url: parsed,
            name,
            client,
            runtime: Some(runtime),
            len: 0,
            prefix: Mutex::new(None),
            multi_range: MultiRange::new(),
        };
        // The length from a HEAD, and beside it (the same round trip) the file's first bytes,
        // which an image's open reads next.
        let want = config.probe_bytes;
        let (len, probed) = source.block_on(async {
            if want > 0 && config.probe_instead_of_head {
                // Its answer gives the length too; a HEAD only when it did not.
                if let Some((len, bytes)) = source.probe(want).await? {
                    return Ok((len, Some((len, bytes))));
                }
                return Ok((source.probe_len().await?, None));
            }
            let (len, probed) = tokio::join!(source.probe_len(), async {
                if want > 0 {
                    source.probe(want).await.ok().flatten()
                } else {
                    None
                }
            });
            let len = match (len, &probed) {
                // A server that answers only GET (its HEAD a 404): the probe's sound answer
                // gave the length.
                (
                    Err(SourceError::Status {
                        status: 404 | 410, ..
                    }),
                    Some((total, _)),
                ) => *total,
                (len, _) => len?,
            };
            Ok((len, probed))
        })?;
        source.len = len;
        if let Some((total, bytes)) = probed {
            if total == len {
                *source.prefix.lock() = Some(Prefix {
                    bytes,
                    served: Vec::new(),
                });
            } else {
                debug!(url = %source.name, len, total, "the opening probe saw another length; not using it");
            }
        }
        debug!(url = %source.name, len = source.len, "opened HTTP source");
        Ok(source)
    }

    /// The image length, learnt at open.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next piece of a response's body.
    fn next_piece(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Option<bytes::Bytes>, SourceError> {
        self.block_on(async { resp.chunk().await.map_err(|e| self.net_error(&e)) })
    }

    fn block_on<T>(
        &self,
        fut: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(SourceError::Unusable(format!(
                "{}: HttpSource called from inside an async runtime; call it from a plain \
                 thread (e.g. tokio::task::spawn_blocking)",
                self.name
            )));
        }
        match &self.runtime {
            Some(rt) => rt.block_on(fut),
            None => Err(SourceError::Unusable(format!(
                "{}: the HTTP runtime is shut down",
                self.name
            ))),
        }
    }

    fn net_error(&self, e: &reqwest::Error) -> SourceError {
        let kind = if e.is_timeout() {
            io::ErrorKind::TimedOut
        } else {
            io_kind(e).unwrap_or(io::ErrorKind::Other)
        };
        SourceError::Io {
            source_name: self.name.clone(),
            error: io::Error::new(kind, error_chain(e)),
        }
    }

    fn bad_answer(&self, what: String) -> SourceError {
        SourceError::Io {
            source_name: self.name.clone(),
            error: io::Error::new(io::ErrorKind::InvalidData, what),
        }
    }

    async fn probe_len(&self) -> Result<u64, SourceError> {
        let head = self
            .client
            .head(self.url.clone())
            .header(REQUEST_KIND_HEADER, RequestKind::Background.to_string())
            .send()
            .await
            .map_err(|e| self.net_error(&e))?;
        let status = head.status();
        // Not there: a GET would say the same, one round trip later (every mount asks for
        // its image's optional sidecars). A refused HEAD (403, 405) is probed below.
        if status.is_server_error() || matches!(status.as_u16(), 404 | 410 | 429) {
            return Err(SourceError::Status {
                source_name: self.name.clone(),
                status: status.as_u16(),
                offset: 0,
                end: 0,
            });
        }
        if status == StatusCode::OK
            && header_str(head.headers(), ACCEPT_RANGES).is_some_and(|v| v.trim() == "none")
        {
            return Err(SourceError::Unusable(format!(
                "{}: the server says Accept-Ranges: none, so it cannot serve an image lazily; \
                 use a server with range support (nginx, S3, incfs serve)",
                self.name
            )));
        }
        if status == StatusCode::OK
            && let Some(len) = header_u64(head.headers(), CONTENT_LENGTH)
        {
            return Ok(len);
        }
        // HEAD refused (a presigned GET URL answers 403 to HEAD) or without a length: ask
        // for the first byte and read the length from Content-Range.
        debug!(url = %self.name, %status, "HEAD gave no length; probing with bytes=0-0");
        let resp = self
            .client
            .get(self.url.clone())
            .header(RANGE, "bytes=0-0")
            .header(REQUEST_KIND_HEADER, RequestKind::Background.to_string())
            .send()
            .await
            .map_err(|e| self.net_error(&e))?;
        match resp.status().as_u16() {
            206 => {
                let cr = header_str(resp.headers(), CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&cr) {
                    Some((0, 0, Some(total))) => Ok(total),
                    _ => Err(self.bad_answer(format!(
                        "probe of bytes=0-0 answered with Content-Range {cr:?}; cannot tell the \
                         image length"
                    ))),
                }
            }
            // Empty files cannot satisfy bytes=0-0.
            416 if header_str(resp.headers(), CONTENT_RANGE).as_deref() == Some("bytes */0") => {
                Ok(0)
            }
            s => Err(SourceError::Status {
                source_name: self.name.clone(),
                status: s,
                offset: 0,
                end: 1,
            }),
        }
    }

    /// The file's length and first `want` bytes (all of it when it is shorter); `None` when
    /// the answer is not sound (the reads then go to the server as they would have), an
    /// error when the server says there is no such file (404, 410).
    async fn probe(&self, want: u64) -> Result<Option<(u64, Vec<u8>)>, SourceError> {
        Ok(match self.probe_answer(want).await {
            Err(status @ (404 | 410)) => {
                return Err(SourceError::Status {
                    source_name: self.name.clone(),
                    status,
                    offset: 0,
                    end: want,
                });
            }
            Err(_) => None,
            Ok(p) => p,
        })
    }

    /// [`Self::probe`]'s request; `Err(status)` for an answer of another status.
    async fn probe_answer(&self, want: u64) -> Result<Option<(u64, Vec<u8>)>, u16> {
        let last = want - 1;
        let resp = self
            .client
            .get(self.url.clone())
            .header(RANGE, format!("bytes=0-{last}"))
            .header(REQUEST_KIND_HEADER, RequestKind::Background.to_string())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                debug!(url = %self.name, error = %error_chain(&e), "the opening probe failed");
                return Ok(None);
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let (total, expect) = match status {
            206 => match header_str(&headers, CONTENT_RANGE)
                .as_deref()
                .and_then(parse_content_range)
            {
                Some((0, b, Some(total))) => (total, b + 1),
                _ => return Ok(None),
            },
            200 => match header_u64(&headers, CONTENT_LENGTH) {
                Some(n) => (n, n),
                None => return Ok(None),
            },
            s => return Err(s),
        };
        if expect > want || expect != total.min(want) {
            debug!(url = %self.name, status, "the opening probe's answer is not the file's start");
            return Ok(None);
        }
        let Ok(body) = resp.bytes().await else {
            return Ok(None);
        };
        Ok((body.len() as u64 == expect).then(|| (total, body.to_vec())))
    }

    /// Sends the range request and checks the answer's status and headers.
    async fn start(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, SourceError> {
        let last = offset + len - 1;
        trace!(offset, len, %kind, "http range request");
        let mut req = self
            .client
            .get(self.url.clone())
            .header(RANGE, format!("bytes={offset}-{last}"))
            .header(REQUEST_KIND_HEADER, kind.to_string());
        if let Some(t) = timeout {
            // From the start of the connect to the end of the body.
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| self.net_error(&e))?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                let cr = header_str(resp.headers(), CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&cr) {
                    Some((a, b, total))
                        if a == offset && b == last && total.is_none_or(|t| t == self.len) => {}
                    _ => {
                        return Err(self.bad_answer(format!(
                            "asked for bytes {offset}-{last} of {}, got Content-Range {cr:?}",
                            self.len
                        )));
                    }
                }
            }
            200 if offset == 0 && len == self.len => {}
            200 => {
                return Err(SourceError::Unusable(format!(
                    "{}: the server ignored the Range header (it answered bytes \
                     {offset}-{last} with 200 and the whole file), so it cannot serve an image \
                     lazily; use a server with range support (nginx, S3, incfs serve)",
                    self.name
                )));
            }
            _ => {
                return Err(SourceError::Status {
                    source_name: self.name.clone(),
                    status,
                    offset,
                    end: offset + len,
                });
            }
        }
        if let Some(cl) = header_u64(resp.headers(), CONTENT_LENGTH)
            && cl != len
        {
            return Err(SourceError::Short {
                source_name: self.name.clone(),
                got: cl,
                want: len,
            });
        }
        Ok(resp)
    }

    /// Reads the range and hands its pieces to `on_piece`.
    ///
    /// Each piece is awaited in a `block_on` of its own and handed over outside it: while
    /// `on_piece` runs (the fetcher decompresses, verifies and stores chunks there), this
    /// thread does not hold the runtime, so another thread's `block_on` drives every other
    /// connection meanwhile.
    fn fetch(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let mut resp = self.block_on(self.start(offset, len, kind, timeout))?;
        super::stream_exact(
            &self.name,
            len,
            &mut || self.next_piece(&mut resp),
            on_piece,
        )
    }

    /// A range read, within `timeout` when one is given.
    fn ranged(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        super::check_range(&self.name, offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(bytes) = self.take_prefix(offset, len) {
            let _ = on_piece(&bytes);
            return Ok(());
        }
        self.fetch(offset, len, kind, timeout, on_piece)
    }

    /// The range's bytes from the opening probe, if it holds them and has not handed any of
    /// them out before.
    fn take_prefix(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut guard = self.prefix.lock();
        let p = guard.as_mut()?;
        let end = offset.checked_add(len)?;
        if end > p.bytes.len() as u64 {
            return None;
        }
        if p.served.iter().any(|&(a, b)| offset < b && a < end) {
            // Asked again: whoever reads it did not take it the first time.
            *guard = None;
            return None;
        }
        p.served.push((offset, end));
        Some(p.bytes[offset as usize..end as usize].to_vec())
    }
}

impl Source for HttpSource {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        super::collect_range(self, offset, len, kind, None)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn read_range_streaming(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        self.ranged(offset, len, kind, None, on_piece)
    }

    fn read_range_within(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        self.ranged(offset, len, kind, Some(timeout), on_piece)
    }

    fn ranges_per_request(&self) -> usize {
        self.multi_range.per_request()
    }

    /// Several ranges in one request (`multipart/byteranges`), or one at a time where the
    /// server answered an earlier one with the whole file.
    fn read_ranges_within(
        &self,
        ranges: &[(u64, u64)],
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        check_ranges(&self.name, ranges, self.len)?;
        if !self.multi_range.wanted(ranges) {
            return super::read_ranges_one_by_one(self, ranges, kind, timeout, on_piece);
        }
        let started = Instant::now();
        trace!(ranges = ranges.len(), first = ranges[0].0, %kind, "http multi-range request");
        let req = self
            .client
            .get(self.url.clone())
            .header(RANGE, range_header(ranges))
            .header(REQUEST_KIND_HEADER, kind.to_string())
            .timeout(timeout);
        let mut resp = self.block_on(async { req.send().await.map_err(|e| self.net_error(&e)) })?;
        match resp.status().as_u16() {
            206 => {}
            200 => {
                drop(resp);
                return self
                    .multi_range
                    .refused(self, ranges, kind, timeout, started, on_piece);
            }
            status => return Err(status_error(&self.name, ranges, status)),
        }
        let headers = resp.headers().clone();
        read_answer(
            &self.name,
            self.len,
            ranges,
            &headers,
            &mut || self.next_piece(&mut resp),
            on_piece,
        )
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        // Never blocks, so dropping a source inside an async context is fine too.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Parses `bytes A-B/TOTAL` (TOTAL may be `*`) into `(A, B, Some(TOTAL))`.
pub(super) fn parse_content_range(s: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = s.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (a <= b && total.is_none_or(|t| b < t)).then_some((a, b, total))
}

fn header_str(h: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    h.get(name)?.to_str().ok().map(str::to_string)
}

fn header_u64(h: &HeaderMap, name: reqwest::header::HeaderName) -> Option<u64> {
    header_str(h, name)?.trim().parse().ok()
}

/// The name an [`HttpSource`] opened from `spec` has ([`Source::describe`]), when `spec` is
/// an HTTP(S) URL.
pub(crate) fn name_of(spec: &str) -> Option<String> {
    if !(spec.starts_with("http://") || spec.starts_with("https://")) {
        return None;
    }
    reqwest::Url::parse(spec).ok().map(|u| redacted(&u))
}

/// `url` for messages and logs, its query (which may hold credentials or a pre-signed
/// URL's signature) shown as `…`.
pub(crate) fn redacted(url: &reqwest::Url) -> String {
    // (`?%E2%80%A6` once encoded: this is also the source's name, under which its cache
    // is found offline, so it must not change.)
    let mut u = url.clone();
    if u.query().is_some() {
        u.set_query(Some("…"));
    }
    u.to_string()
}

/// "outer: inner: innermost", since reqwest's Display shows only the outer layer.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

fn io_kind(e: &reqwest::Error) -> Option<io::ErrorKind> {
    let mut cur = e.source();
    while let Some(inner) = cur {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = inner.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
