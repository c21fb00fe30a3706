//! `incfs serve`: a small HTTP/1.1 server for images, with link emulation.
//!
//! For local use, demos, tests and benchmarks: it serves one image file (at `/` and at
//! `/<name>`) or every file under a directory (with an HTML index at each directory), with
//! correct single-range semantics: `206` with `Content-Range`, `416` with `bytes */LEN` for
//! unsatisfiable ranges, `200` with the whole file when there is no (usable) `Range`, `HEAD`,
//! `Content-Length`, `Accept-Ranges: bytes`, keep-alive. Requests with several ranges get a
//! `multipart/byteranges` answer when the ranges are ascending and apart (at most
//! [`MAX_RANGES`]), and the whole file otherwise or with [`ServeConfig::multi_range`] off, as
//! RFC 9110 allows. Files are read with `pread` piece by piece, never loaded whole.
//!
//! Link emulation ([`LinkConfig`]) makes loopback behave like a real link (this kernel has
//! no netem): every request waits `latency_ms` before its response head, one [`TokenBucket`]
//! shared by all connections paces body bytes, and a [`FaultInjector`] spoils a seeded
//! random fraction of file `GET`s (resets, stalls, 5xx, short bodies, flipped bits).
//! `HEAD`, listings and the stats endpoint are never faulted.
//!
//! Counters are served as JSON at [`STATS_PATH`] (`?reset` zeroes them after the answer) and
//! by [`Server::stats`]: requests, bytes, by request kind (the `x-incfs-request` header
//! that [`HttpSource`](crate::source::HttpSource) sends), faults by kind, and a log of the
//! ranges asked for.
//!
//! The server runs on its own small tokio runtime; [`Server::start`] binds (loopback by
//! default) and returns at once, so a test starts one in process on `127.0.0.1:0`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderValue, RANGE,
};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use crate::link::{Fault, FaultInjector, FaultKind, LinkConfig, TokenBucket};
use crate::source::REQUEST_KIND_HEADER;

/// Where the server answers with its counters as JSON.
pub const STATS_PATH: &str = "/.incfs-serve/stats";

/// Size of the pieces a body is read and sent in without a bandwidth limit: 256 KiB, large
/// enough that per-piece costs (a `pread`, a task hop, a channel send) vanish next to the
/// copy, small enough to keep little memory per connection.
const PIECE: u64 = 256 * 1024;

/// Piece size under a bandwidth limit: 16 KiB, so the token bucket paces a link smoothly
/// (at 10 Mbit/s one piece takes 13 ms).
const SHAPED_PIECE: u64 = 16 * 1024;

/// Longest range log kept in [`Stats::ranges`]; later ranges are only counted in
/// [`Stats::ranges_dropped`]. 100,000 entries is a few MB, and more than a clang start asks for.
const MAX_RANGE_LOG: usize = 100_000;

/// Most ranges answered as parts of one multi-range request; a request with more gets the
/// whole file.
pub const MAX_RANGES: usize = 256;

/// Worker threads of the server's runtime by default: the machines this runs on have 2 cores.
const DEFAULT_WORKERS: usize = 2;

/// What to serve, where, and over what kind of link.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// An image file (served at `/` and `/<file name>`) or a directory (every file under it).
    pub path: PathBuf,
    /// Address to listen on (default `127.0.0.1:0`, loopback on a free port).
    pub listen: SocketAddr,
    /// Link emulation (default: a perfect link).
    pub link: LinkConfig,
    /// Worker threads of the server's runtime (default 2).
    pub workers: usize,
    /// Answer several ranges of one request as a `multipart/byteranges` body (default true);
    /// off, such requests get the whole file, like servers without multi-range support
    /// (S3, some CDNs).
    pub multi_range: bool,
}

impl ServeConfig {
    /// Serves `path` on loopback, on a free port, without link emulation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ServeConfig {
            path: path.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            link: LinkConfig::default(),
            workers: DEFAULT_WORKERS,
            multi_range: true,
        }
    }
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The file or directory to serve cannot be used.
    #[error("{path}: {error}")]
    Path {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        error: io::Error,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: io::Error,
    },
    /// The link configuration is invalid.
    #[error("link emulation: {0}")]
    Link(String),
    /// The runtime could not start.
    #[error("cannot start the server runtime: {0}")]
    Runtime(io::Error),
}

/// Requests and bytes of one request kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Requests.
    pub requests: u64,
    /// Body bytes handed to the connection.
    pub bytes: u64,
}

/// One range asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRecord {
    /// The request path.
    pub path: String,
    /// First byte.
    pub start: u64,
    /// Bytes in the range (as answered, after clipping to the file).
    pub len: u64,
    /// The request kind (`demand`, `prefetch`, `background` or `unknown`).
    pub kind: String,
}

/// The server's counters, as served at [`STATS_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests for files and listings (not for the stats).
    pub requests: u64,
    /// `HEAD` requests among them.
    pub head_requests: u64,
    /// Answers `206` (one range, or several as one `multipart/byteranges` body).
    pub range_requests: u64,
    /// Of those, answers with several ranges.
    #[serde(default)]
    pub multi_range_requests: u64,
    /// Answers `200` with a whole file to a `GET`.
    pub full_requests: u64,
    /// Answers `416`.
    pub unsatisfiable: u64,
    /// Answers `404` or `405`.
    pub not_found: u64,
    /// Body bytes of files handed to connections.
    pub bytes_sent: u64,
    /// Requests and bytes by the `x-incfs-request` header (`unknown` without it).
    pub by_kind: BTreeMap<String, KindStats>,
    /// Faults injected, by [`FaultKind::name`].
    pub faults: BTreeMap<String, u64>,
    /// The ranges answered with `206` or `200`, in order of arrival (at most 100,000).
    pub ranges: Vec<RangeRecord>,
    /// Ranges not logged because the log was full.
    pub ranges_dropped: u64,
}

/// A running server. Dropping it (or [`Server::shutdown`]) stops it and closes every
/// connection.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
enum Root {
    /// One file, served at `/` and `/<name>`.
    File { path: PathBuf, name: String },
    /// A directory tree (canonical path).
    Dir(PathBuf),
}

#[derive(Debug)]
struct State {
    root: Root,
    link: LinkConfig,
    bucket: Option<TokenBucket>,
    faults: Option<FaultInjector>,
    multi_range: bool,
    stats: Mutex<Stats>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Server {
    /// Binds `config.listen` and starts serving `config.path` in the background.
    pub fn start(config: ServeConfig) -> Result<Server, ServeError> {
        config.link.validate().map_err(ServeError::Link)?;
        let path_err = |error| ServeError::Path {
            path: config.path.clone(),
            error,
        };
        let meta = std::fs::metadata(&config.path).map_err(path_err)?;
        let root = if meta.is_dir() {
            Root::Dir(std::fs::canonicalize(&config.path).map_err(path_err)?)
        } else if meta.is_file() {
            File::open(&config.path).map_err(path_err)?;
            let name = config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Root::File {
                path: config.path.clone(),
                name,
            }
        } else {
            return Err(path_err(io::Error::other(
                "neither a regular file nor a directory",
            )));
        };
        let listener =
            std::net::TcpListener::bind(config.listen).map_err(|error| ServeError::Bind {
                addr: config.listen,
                error,
            })?;
        let bind_err = |error| ServeError::Bind {
            addr: config.listen,
            error,
        };
        let addr = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("incfs-serve")
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_err)?
        };
        let state = Arc::new(State {
            root,
            bucket: config.link.token_bucket(),
            faults: FaultInjector::new(&config.link.faults),
            link: config.link,
            multi_range: config.multi_range,
            stats: Mutex::new(Stats::default()),
        });
        if !addr.ip().is_loopback() {
            warn!(%addr, "serving on a non-loopback address: anyone who can reach it can read the files");
        }
        info!(%addr, path = %config.path.display(), link = ?state.link, "serving");
        let accept_task = runtime.spawn(accept_loop(listener, state.clone()));
        Ok(Server {
            addr,
            state,
            runtime: Some(runtime),
            accept_task: Some(accept_task),
        })
    }

    /// The address the server listens on (with the real port when it was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/` followed by `path` (without a leading slash), e.g. `url("img")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.state.stats().clone()
    }

    /// Zeroes the counters and empties the range log.
    pub fn reset_stats(&self) {
        *self.state.stats() = Stats::default();
    }

    /// Blocks the calling thread until the server stops (it stops only on a fatal error;
    /// `incfs serve` waits here until it is killed).
    pub fn wait(&mut self) {
        if let (Some(rt), Some(task)) = (&self.runtime, self.accept_task.take()) {
            let _ = rt.block_on(task);
        }
    }

    /// Stops accepting, closes every connection and waits (briefly) for the workers.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let reset = Arc::new(AtomicBool::new(false));
        let stream = ResettableStream {
            inner: stream,
            reset: reset.clone(),
        };
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), reset.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A connection's socket that can be told to end with a TCP reset: dropped with its flag
/// set, it sets `SO_LINGER` to zero first, so closing it sends RST instead of FIN and the
/// client sees "connection reset by peer", as from a crashed server or a middlebox.
struct ResettableStream {
    inner: tokio::net::TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Returned by the service to make hyper drop the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct DropConnection;

/// A response body: fixed bytes, or pieces sent by a producer task.
enum Body {
    Full(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<io::Result<Bytes>>,
        len: u64,
    },
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream { rx, .. } => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream { len, .. } => SizeHint::with_exact(*len),
        }
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from(msg.into()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Full(None));
    *r.status_mut() = status;
    r
}

async fn handle(
    state: Arc<State>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    let path = req.uri().path().to_string();
    if path == STATS_PATH {
        let json = {
            let mut stats = state.stats();
            let json = serde_json::to_vec(&*stats).unwrap_or_default();
            if req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "reset"))
            {
                *stats = Stats::default();
            }
            json
        };
        let mut r = Response::new(Body::Full(Some(Bytes::from(json))));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(r);
    }
    let head = req.method() == Method::HEAD;
    let kind = req
        .headers()
        .get(REQUEST_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|k| matches!(*k, "demand" | "prefetch" | "background"))
        .unwrap_or("unknown")
        .to_string();
    {
        let mut stats = state.stats();
        stats.requests += 1;
        stats.head_requests += u64::from(head);
        stats.by_kind.entry(kind.clone()).or_default().requests += 1;
    }
    if !state.link.latency().is_zero() {
        tokio::time::sleep(state.link.latency()).await;
    }
    if !head && req.method() != Method::GET {
        state.stats().not_found += 1;
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let target = {
        let state = state.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || resolve(&state.root, &path))
            .await
            .unwrap_or(Target::NotFound)
    };
    let (file, file_len) = match target {
        Target::NotFound => {
            state.stats().not_found += 1;
            return Ok(text(StatusCode::NOT_FOUND, format!("{path}: not found\n")));
        }
        Target::Listing(html) => {
            let mut r = Response::new(Body::Full((!head).then(|| Bytes::from(html.clone()))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(html.len()));
            return Ok(r);
        }
        Target::File(file, len) => (Arc::new(file), len),
    };

    let range = parse_range(
        req.headers().get(RANGE).and_then(|v| v.to_str().ok()),
        file_len,
    );
    // The answer: its status, the file ranges it carries (first byte, length), and for
    // several ranges the multipart boundary.
    let (status, ranges, boundary) = match range {
        RangeAsk::Whole => (StatusCode::OK, vec![(0, file_len)], None),
        RangeAsk::Range(a, b) => (StatusCode::PARTIAL_CONTENT, vec![(a, b - a + 1)], None),
        RangeAsk::Ranges(rs) if state.multi_range => (
            StatusCode::PARTIAL_CONTENT,
            rs.iter().map(|&(a, b)| (a, b - a + 1)).collect(),
            Some(boundary()),
        ),
        RangeAsk::Ranges(_) => (StatusCode::OK, vec![(0, file_len)], None),
        RangeAsk::Unsatisfiable => {
            state.stats().unsatisfiable += 1;
            let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            r.headers_mut()
                .insert(CONTENT_RANGE, header_value(format!("bytes */{file_len}")));
            r.headers_mut()
                .insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
            return Ok(r);
        }
    };
    let len: u64 = ranges.iter().map(|r| r.1).sum();
    let start = ranges[0].0;

    let fault = if head {
        None
    } else {
        state.faults.as_ref().and_then(|f| f.draw(len))
    };
    if let Some(f) = fault {
        *state
            .stats()
            .faults
            .entry(f.kind.name().to_string())
            .or_default() += 1;
        debug!(path, start, len, fault = ?f, "injecting a fault");
        match (f.kind, f.at) {
            (FaultKind::Reset, None) => {
                reset.store(true, Ordering::Relaxed);
                return Err(DropConnection);
            }
            (FaultKind::Stall, None) => {
                tokio::time::sleep(std::time::Duration::from_millis(state.link.faults.stall_ms))
                    .await;
            }
            (FaultKind::ServerError, _) => {
                let status =
                    StatusCode::from_u16(f.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(text(status, "injected fault\n"));
            }
            _ => {}
        }
    }

    {
        let mut stats = state.stats();
        if status == StatusCode::PARTIAL_CONTENT {
            stats.range_requests += 1;
            stats.multi_range_requests += u64::from(boundary.is_some());
        } else if !head {
            stats.full_requests += 1;
        }
        if !head {
            for &(start, len) in &ranges {
                if stats.ranges.len() < MAX_RANGE_LOG {
                    stats.ranges.push(RangeRecord {
                        path: path.clone(),
                        start,
                        len,
                        kind: kind.clone(),
                    });
                } else {
                    stats.ranges_dropped += 1;
                }
            }
        }
    }
    trace!(path, start, len, ranges = ranges.len(), %status, head, "answer");

    // Each part's header text before its bytes, and the closing boundary after them.
    let (parts, tail) = match &boundary {
        Some(b) => (
            ranges
                .iter()
                .map(|&(a, n)| {
                    let head = format!(
                        "\r\n--{b}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{file_len}\r\n\r\n",
                        a + n - 1
                    );
                    (Bytes::from(head), a, n)
                })
                .collect::<Vec<_>>(),
            Bytes::from(format!("\r\n--{b}--\r\n")),
        ),
        None => (vec![(Bytes::new(), start, len)], Bytes::new()),
    };
    let body_len = len + parts.iter().map(|p| p.0.len() as u64).sum::<u64>() + tail.len() as u64;

    let body = if head {
        Body::Full(None)
    } else {
        let (tx, rx) = mpsc::channel(2);
        let body_fault = fault.filter(|f| f.at.is_some());
        let job = Produce {
            state: state.clone(),
            file,
            parts,
            tail,
            fault: body_fault,
            kind,
            reset,
        };
        tokio::spawn(job.run(tx));
        Body::Stream { rx, len: body_len }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    match &boundary {
        Some(b) => {
            h.insert(
                CONTENT_TYPE,
                header_value(format!("multipart/byteranges; boundary={b}")),
            );
        }
        None => {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if status == StatusCode::PARTIAL_CONTENT {
                h.insert(
                    CONTENT_RANGE,
                    header_value(format!("bytes {start}-{}/{file_len}", start + len - 1)),
                );
            }
        }
    }
    Ok(r)
}

/// A multipart boundary: unlikely to occur in the parts (readers go by their lengths anyway).
fn boundary() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "incfs-{}",
        hex::encode(&blake3::hash(&nanos.to_le_bytes()).as_bytes()[..16])
    )
}

/// What a producer task needs to send one body.
struct Produce {
    state: Arc<State>,
    file: Arc<File>,
    /// The body's parts: header text, then `len` bytes of the file from `start`.
    parts: Vec<(Bytes, u64, u64)>,
    /// Text after the last part.
    tail: Bytes,
    /// A fault striking inside the body.
    fault: Option<Fault>,
    kind: String,
    /// Set to end the connection with a TCP reset.
    reset: Arc<AtomicBool>,
}

impl Produce {
    /// Reads the parts' ranges piece by piece, paced by the link, and sends them, each after
    /// its header text, to the body; applies the body fault on the way (its offset counts
    /// file bytes only).
    async fn run(self, tx: mpsc::Sender<io::Result<Bytes>>) {
        let Produce {
            state,
            file,
            parts,
            tail,
            fault,
            kind,
            reset,
        } = self;
        let piece = if state.bucket.is_some() {
            SHAPED_PIECE
        } else {
            PIECE
        };
        let len: u64 = parts.iter().map(|p| p.2).sum();
        let mut fault = fault;
        // A short body stops at the fault point; the rest of the announced length never comes.
        let stop = match fault {
            Some(Fault {
                kind: FaultKind::ShortBody,
                at: Some(at),
                ..
            }) => at,
            _ => len,
        };
        // File bytes sent, over all parts.
        let mut sent = 0u64;
        for (head, start, part_len) in parts {
            if !head.is_empty() && tx.send(Ok(head)).await.is_err() {
                return;
            }
            let (part_start, part_end) = (sent, sent + part_len);
            while sent < stop.min(part_end) {
                let mut n = piece.min(stop.min(part_end) - sent);
                if let Some(f) = fault
                    && matches!(f.kind, FaultKind::Reset | FaultKind::Stall)
                    && let Some(at) = f.at
                    && at < sent + n
                {
                    if at > sent {
                        // Send up to the fault point first.
                        n = at - sent;
                    } else {
                        fault = None;
                        if f.kind == FaultKind::Reset {
                            reset.store(true, Ordering::Relaxed);
                            let _ = tx
                                .send(Err(io::Error::other("connection reset by fault injection")))
                                .await;
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(
                            state.link.faults.stall_ms,
                        ))
                        .await;
                        continue;
                    }
                }
                if let Some(bucket) = &state.bucket {
                    let wait = bucket.reserve(n);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                let offset = start + (sent - part_start);
                let read = {
                    let file = file.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        file.read_exact_at(&mut buf, offset).map(|()| buf)
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                };
                let mut data = match read {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, offset, "read failed while serving");
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(f) = fault
                    && f.kind == FaultKind::BitFlip
                    && let Some(at) = f.at
                    && (sent..sent + n).contains(&at)
                {
                    data[(at - sent) as usize] ^= 1 << (f.detail % 8);
                }
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return; // the client went away
                }
                sent += n;
                let mut stats = state.stats();
                stats.bytes_sent += n;
                stats.by_kind.entry(kind.clone()).or_default().bytes += n;
            }
            if sent >= stop && stop < len {
                return; // a short body: the rest never comes
            }
        }
        if !tail.is_empty() {
            let _ = tx.send(Ok(tail)).await;
        }
    }
}

enum Target {
    NotFound,
    Listing(String),
    File(File, u64),
}

/// Maps a request path to a file or a directory listing (blocking: runs off the runtime).
fn resolve(root: &Root, raw_path: &str) -> Target {
    let Some(path) = percent_decode(raw_path) else {
        return Target::NotFound;
    };
    match root {
        Root::File { path: file, name } => {
            let rel = path.trim_start_matches('/');
            if rel.is_empty() || rel == name {
                return open_file(file);
            }
            // The image's plan, signature, deltas and bulk frames, when they lie beside it
            // (`NAME.plan.json`, `NAME.sig`, `NAME.delta`, `NAME.bulk`): a mount looks for
            // them there.
            match rel.strip_prefix(name.as_str()) {
                Some(suffix @ (".plan.json" | ".sig" | ".delta" | ".bulk")) => {
                    let mut beside = file.as_os_str().to_owned();
                    beside.push(suffix);
                    open_file(Path::new(&beside))
                }
                _ => Target::NotFound,
            }
        }
        Root::Dir(dir) => {
            let mut full = dir.clone();
            for seg in path.split('/').filter(|s| !s.is_empty()) {
                if seg == "." || seg == ".." || seg.contains('\0') {
                    return Target::NotFound;
                }
                full.push(seg);
            }
            // Symlinks may point anywhere inside the tree, never out of it.
            let Ok(canon) = std::fs::canonicalize(&full) else {
                return Target::NotFound;
            };
            if !canon.starts_with(dir) {
                return Target::NotFound;
            }
            match std::fs::metadata(&canon) {
                Ok(m) if m.is_dir() => listing(&canon, &path),
                Ok(m) if m.is_file() => open_file(&canon),
                _ => Target::NotFound,
            }
        }
    }
}

fn open_file(path: &Path) -> Target {
    match File::open(path).and_then(|f| {
        let len = f.metadata()?.len();
        Ok((f, len))
    }) {
        Ok((f, len)) => Target::File(f, len),
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot open");
            Target::NotFound
        }
    }
}

fn listing(dir: &Path, url_path: &str) -> Target {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Target::NotFound;
    };
    let mut names: Vec<(String, bool)> = rd
        .filter_map(Result::ok)
        .map(|e| {
            let is_dir = e.path().is_dir();
            (e.file_name().to_string_lossy().into_owned(), is_dir)
        })
        .collect();
    names.sort();
    let title = html_escape(url_path);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><ul>\n"
    );
    for (name, is_dir) in names {
        let slash = if is_dir { "/" } else { "" };
        html.push_str(&format!(
            "<li><a href=\"{}{slash}\">{}{slash}</a></li>\n",
            percent_encode(&name),
            html_escape(&name)
        ));
    }
    html.push_str("</ul></body></html>\n");
    Target::Listing(html)
}

/// What a `Range` header asks of a file of a given length.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    /// No range, or one we ignore (another unit, several ranges, bad syntax): send it all.
    Whole,
    /// First and last byte, inclusive, clipped to the file.
    Range(u64, u64),
    /// Several ranges, each clipped to the file, ascending and apart (first and last byte).
    Ranges(Vec<(u64, u64)>),
    /// A valid range that misses the file: `416`.
    Unsatisfiable,
}

fn parse_range(header: Option<&str>, len: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if !spec.contains(',') {
        return parse_one_range(spec, len);
    }
    // Several: the satisfiable ones are answered; any bad one, ranges that overlap, touch
    // or come out of order, or too many of them get the whole file.
    let mut ranges = Vec::new();
    for one in spec.split(',') {
        match parse_one_range(one, len) {
            RangeAsk::Range(a, b) => ranges.push((a, b)),
            RangeAsk::Unsatisfiable => {}
            _ => return RangeAsk::Whole,
        }
    }
    if ranges.len() > MAX_RANGES || ranges.windows(2).any(|w| w[0].1 + 1 >= w[1].0) {
        return RangeAsk::Whole;
    }
    match ranges.as_slice() {
        [] => RangeAsk::Unsatisfiable,
        [(a, b)] => RangeAsk::Range(*a, *b),
        _ => RangeAsk::Ranges(ranges),
    }
}

/// One `first-last`, `first-` or `-suffix` range.
fn parse_one_range(spec: &str, len: u64) -> RangeAsk {
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeAsk::Whole,
        (true, false) => match num(b) {
            None => RangeAsk::Whole,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if len == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Range(len - n.min(len), len - 1),
        },
        (false, true) => match num(a) {
            None => RangeAsk::Whole,
            Some(a) if a >= len => RangeAsk::Unsatisfiable,
            Some(a) => RangeAsk::Range(a, len - 1),
        },
        (false, false) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b => {
                if a >= len {
                    RangeAsk::Unsatisfiable
                } else {
                    RangeAsk::Range(a, b.min(len - 1))
                }
            }
            _ => RangeAsk::Whole,
        },
    }
}

fn header_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_header_semantics() {
        use RangeAsk::*;
        assert_eq!(parse_range(None, 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Range(0, 9));
        assert_eq!(parse_range(Some("bytes=90-200"), 100), Range(90, 99));
        assert_eq!(parse_range(Some("bytes=95-"), 100), Range(95, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Range(90, 99));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Range(0, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=9-0"), 100), Whole);
        assert_eq!(
            parse_range(Some("bytes=0-1, 5-6"), 100),
            Ranges(vec![(0, 1), (5, 6)])
        );
        assert_eq!(parse_range(Some("bytes=0-1,200-300"), 100), Range(0, 1));
        assert_eq!(parse_range(Some("bytes=200-,300-400"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-6,0-1"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-5,5-6"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-4,5-6"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-1,x"), 100), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=+1-2"), 100), Whole);
    }

    #[test]
    fn percent_coding_round_trips() {
        let name = "a b%c/é";
        assert_eq!(percent_decode(&percent_encode(name)).as_deref(), Some(name));
        assert_eq!(percent_decode("%zz"), None);
    }
}
