//! `HttpSource` against `incfs serve`, a real nginx (HTTP/1.1 and HTTPS with HTTP/2), a
//! scripted misbehaving server, and injected faults; single and multi-range requests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_fs::link::{FaultConfig, FaultKind, LinkConfig};
use incfs_fs::serve::{ServeConfig, Server};
use incfs_fs::source::{self, HttpConfig, HttpSource, RequestKind, Source, SourceError};

use incfs_datasets::synth::noise as content;

/// A small deterministic generator for offsets in tests.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

struct Served {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    server: Server,
}

fn serve(len: usize, link: LinkConfig) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(len, len as u64);
    let path = dir.path().join("image.incfs");
    std::fs::write(&path, &data).expect("write image");
    let mut config = ServeConfig::new(&path);
    config.link = link;
    let server = Server::start(config).expect("start incfs serve");
    Served {
        _dir: dir,
        data,
        server,
    }
}

/// Reads random ranges and checks each against the file.
fn check_random_ranges(src: &dyn Source, data: &[u8], count: usize, seed: u64) {
    let mut rng = Lcg(seed);
    let len = data.len() as u64;
    for i in 0..count {
        let n = 1 + rng.below(300_000.min(len));
        let off = rng.below(len - n + 1);
        let got = src
            .read_range(off, n, RequestKind::Demand)
            .unwrap_or_else(|e| panic!("read {i} ({off}+{n}): {e}"));
        assert!(
            got == data[off as usize..(off + n) as usize],
            "read {i} ({off}+{n}) differs from the file"
        );
    }
}

#[test]
fn reads_exact_ranges_from_incfs_serve() {
    let s = serve(3_000_001, LinkConfig::default());
    let src = HttpSource::open(&s.server.url("image.incfs"), &HttpConfig::default())
        .expect("open HTTP source");
    assert_eq!(src.total_len().expect("len"), s.data.len() as u64);
    check_random_ranges(&src, &s.data, 40, 1);

    // The whole image, the last byte, nothing.
    let len = s.data.len() as u64;
    assert!(
        src.read_range(0, len, RequestKind::Background)
            .expect("all")
            == s.data
    );
    assert_eq!(
        src.read_range(len - 1, 1, RequestKind::Demand)
            .expect("last"),
        [s.data[s.data.len() - 1]]
    );
    assert!(
        src.read_range(5, 0, RequestKind::Demand)
            .expect("empty")
            .is_empty()
    );
    // Past the end: refused before any request.
    let err = src
        .read_range(len - 10, 11, RequestKind::Demand)
        .unwrap_err();
    assert!(matches!(err, SourceError::OutOfRange { .. }), "{err}");
    assert!(!err.is_retryable());

    // Streaming hands over pieces that add up to the range, and stops when told.
    let mut streamed = Vec::new();
    let mut pieces = 0;
    src.read_range_streaming(1_000, 2_000_000, RequestKind::Prefetch, &mut |p| {
        streamed.extend_from_slice(p);
        pieces += 1;
        ControlFlow::Continue(())
    })
    .expect("streamed read");
    assert!(streamed == s.data[1_000..2_001_000]);
    assert!(pieces > 1, "a 2 MB range arrived in {pieces} piece(s)");
    let mut first = 0;
    src.read_range_streaming(0, 2_000_000, RequestKind::Prefetch, &mut |p| {
        first += p.len();
        ControlFlow::Break(())
    })
    .expect("stopped read");
    assert!(first > 0 && first < 2_000_000);
    // The source still works after a read was cut short.
    check_random_ranges(&src, &s.data, 3, 2);

    let stats = s.server.stats();
    assert!(stats.by_kind["demand"].requests >= 40);
    assert_eq!(stats.by_kind["prefetch"].requests, 2);
    assert_eq!(
        stats.by_kind["background"].requests, 3,
        "HEAD, the opening probe beside it, and the whole read"
    );
}

#[test]
fn opening_fetches_the_first_bytes_beside_the_head_and_answers_one_read_from_them() {
    let s = serve(1_000_000, LinkConfig::default());
    let src = HttpSource::open(&s.server.url("image.incfs"), &HttpConfig::default())
        .expect("open HTTP source");
    assert_eq!(src.len(), 1_000_000);
    let stats = s.server.stats();
    assert_eq!((stats.requests, stats.head_requests), (2, 1), "{stats:?}");
    let probe = incfs_fs::format::INITIAL_READ;
    assert_eq!(stats.bytes_sent, probe, "the image's first read");
    // Inside the probe, not handed out before: answered from it.
    for (off, n) in [(0, 4096), (100_000, 50_000), (200_000, probe - 200_000)] {
        let got = src.read_range(off, n, RequestKind::Demand).expect("read");
        assert!(got == s.data[off as usize..(off + n) as usize], "{off}+{n}");
    }
    assert_eq!(
        s.server.stats().requests,
        2,
        "no request for bytes already here"
    );
    // Past it or across its end: a request of its own.
    for (off, n) in [(probe - 10, 20), (500_000, 10)] {
        let got = src.read_range(off, n, RequestKind::Demand).expect("read");
        assert!(got == s.data[off as usize..(off + n) as usize], "{off}+{n}");
    }
    assert_eq!(s.server.stats().requests, 4);
    // Bytes handed out once are asked for again (a reader that found them bad re-reads):
    // from the server, and the rest of the probe is dropped too.
    for (off, n) in [(0, 100), (150_000, 10)] {
        let got = src.read_range(off, n, RequestKind::Demand).expect("read");
        assert!(got == s.data[off as usize..(off + n) as usize], "{off}+{n}");
    }
    assert_eq!(s.server.stats().requests, 6);

    // A file shorter than the probe comes whole in it.
    let small = serve(1_000, LinkConfig::default());
    let src = HttpSource::open(&small.server.url("image.incfs"), &HttpConfig::default())
        .expect("open HTTP source");
    assert_eq!(src.len(), 1_000);
    let got = src.read_range(0, 1_000, RequestKind::Demand).expect("read");
    assert!(got == small.data);
    assert_eq!(small.server.stats().requests, 2, "HEAD and the probe");

    // Off: the HEAD alone.
    let off = HttpConfig {
        probe_bytes: 0,
        ..HttpConfig::default()
    };
    let src = HttpSource::open(&small.server.url("image.incfs"), &off).expect("open");
    let got = src.read_range(0, 1_000, RequestKind::Demand).expect("read");
    assert!(got == small.data);
    assert_eq!(small.server.stats().requests, 4, "HEAD and the read");
}

#[test]
fn open_spec_accepts_http_urls_and_shares_across_threads() {
    let s = serve(500_000, LinkConfig::default());
    let src = source::open(&s.server.url("")).expect("open by spec");
    assert_eq!(src.total_len().expect("len"), 500_000);
    assert!(src.describe().starts_with("http://127.0.0.1:"));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (src, data) = (&src, &s.data);
            scope.spawn(move || check_random_ranges(&**src, data, 20, 10 + t));
        }
    });
}

#[test]
fn errors_5xx_short_bodies_and_resets_are_retryable() {
    for (kind, what) in [
        (FaultKind::ServerError, "5xx"),
        (FaultKind::ShortBody, "short body"),
        (FaultKind::Reset, "reset"),
    ] {
        let s = serve(
            400_000,
            LinkConfig {
                faults: FaultConfig {
                    rate: 1.0,
                    kinds: vec![kind],
                    ..FaultConfig::default()
                },
                ..LinkConfig::default()
            },
        );
        // HEAD is never faulted, so open works.
        let src =
            HttpSource::open(&s.server.url("image.incfs"), &HttpConfig::default()).expect("open");
        for i in 0..10 {
            let err = src
                .read_range(i * 1_000, 300_000, RequestKind::Demand)
                .expect_err(what);
            assert!(err.is_retryable(), "{what}: {err}");
            if kind == FaultKind::Reset {
                // A real TCP reset, before the head or part way through the body.
                assert!(
                    matches!(&err, SourceError::Io { error, .. }
                        if error.kind() == std::io::ErrorKind::ConnectionReset),
                    "{what}: {err:?}"
                );
            }
            if kind == FaultKind::ServerError {
                assert!(
                    matches!(
                        err,
                        SourceError::Status {
                            status: 500..=599,
                            ..
                        }
                    ),
                    "{what}: {err}"
                );
            }
            assert!(err.to_string().contains("http://127.0.0.1:"), "{err}");
        }
    }
}

#[test]
fn a_stall_longer_than_the_read_timeout_fails_the_read() {
    let s = serve(
        100_000,
        LinkConfig {
            faults: FaultConfig {
                rate: 1.0,
                kinds: vec![FaultKind::Stall],
                stall_ms: 3_000,
                ..FaultConfig::default()
            },
            ..LinkConfig::default()
        },
    );
    let config = HttpConfig {
        read_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let src = HttpSource::open(&s.server.url(""), &config).expect("open");
    let t = Instant::now();
    let err = src
        .read_range(0, 100_000, RequestKind::Demand)
        .expect_err("stalled read");
    assert!(err.is_retryable(), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn connection_refused_is_a_clear_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/image.incfs");
    let err = HttpSource::open(&url, &HttpConfig::default()).expect_err("nobody listens");
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(
        matches!(&err, SourceError::Io { error, .. } if error.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    match source::open("ftp://example.invalid/x") {
        Err(err) => assert!(!err.is_retryable(), "{err}"),
        Ok(_) => panic!("ftp:// accepted"),
    }
}

/// A server that answers every request from a script and closes the connection.
struct Scripted {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scripted {
    /// `answer(method, range header)` gives the raw response bytes.
    fn start(answer: impl Fn(&str, Option<&str>) -> Vec<u8> + Send + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let method = line.split_whitespace().next().unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("range")
                    {
                        range = Some(v.trim().to_string());
                    }
                }
                let _ = r.get_mut().write_all(&answer(&method, range.as_deref()));
            }
        });
        Scripted {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/img", self.addr)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn wrong_answers_to_ranges_are_errors() {
    let data = content(1_000, 9);
    // HEAD is refused (as a presigned GET URL does), so the length comes from a probe; then
    // every range is answered with the wrong bytes in some way.
    let d = data.clone();
    let server = Scripted::start(move |method, range| {
        if method == "HEAD" {
            return response("403 Forbidden", &[("Content-Length", "0".into())], b"");
        }
        match range {
            Some("bytes=0-0") => response(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 0-0/1000".into()),
                    ("Content-Length", "1".into()),
                ],
                &d[..1],
            ),
            // Wrong start.
            Some("bytes=100-109") => response(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 0-9/1000".into()),
                    ("Content-Length", "10".into()),
                ],
                &d[..10],
            ),
            // Right range, wrong total (the file changed).
            Some("bytes=200-209") => response(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 200-209/2000".into()),
                    ("Content-Length", "10".into()),
                ],
                &d[200..210],
            ),
            // Range ignored: the whole file with 200.
            Some("bytes=300-309") => response("200 OK", &[("Content-Length", "1000".into())], &d),
            // Announces 10 bytes, sends 5 and closes.
            Some("bytes=400-409") => response(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 400-409/1000".into()),
                    ("Content-Length", "10".into()),
                ],
                &d[400..405],
            ),
            // No Content-Length, body longer than the range, ended by close.
            Some("bytes=500-509") => response(
                "206 Partial Content",
                &[("Content-Range", "bytes 500-509/1000".into())],
                &d[500..520],
            ),
            // 404.
            Some("bytes=600-609") => {
                response("404 Not Found", &[("Content-Length", "0".into())], b"")
            }
            // A correct answer.
            Some("bytes=700-709") => response(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 700-709/1000".into()),
                    ("Content-Length", "10".into()),
                ],
                &d[700..710],
            ),
            _ => response(
                "500 Internal Server Error",
                &[("Content-Length", "0".into())],
                b"",
            ),
        }
    });
    let src = HttpSource::open(&server.url(), &HttpConfig::default()).expect("open via probe");
    assert_eq!(src.len(), 1_000);
    let read = |off| src.read_range(off, 10, RequestKind::Demand);
    assert_eq!(read(700).expect("the correct answer"), data[700..710]);
    for off in [100, 200, 400, 500] {
        let err = read(off).expect_err("wrong answer accepted");
        assert!(err.is_retryable(), "{off}: {err}");
    }
    let err = read(300).expect_err("an ignored Range accepted");
    assert!(
        matches!(&err, SourceError::Unusable(m) if m.contains("ignored the Range header")),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");
    let err = read(600).expect_err("404 accepted");
    assert!(
        matches!(err, SourceError::Status { status: 404, .. }),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");

    // A server that says it has no ranges is refused at open, before any read.
    let no_ranges = Scripted::start(|_, _| {
        response(
            "200 OK",
            &[
                ("Content-Length", "10".into()),
                ("Accept-Ranges", "none".into()),
            ],
            b"0123456789",
        )
    });
    let err = HttpSource::open(&no_ranges.url(), &HttpConfig::default())
        .expect_err("a server without ranges opened");
    assert!(err.to_string().contains("Accept-Ranges: none"), "{err}");
}

#[test]
fn injected_faults_give_only_errors_or_correct_bytes() {
    let kinds = vec![
        FaultKind::Reset,
        FaultKind::Stall,
        FaultKind::ServerError,
        FaultKind::ShortBody,
    ];
    let s = serve(
        2_000_000,
        LinkConfig {
            faults: FaultConfig {
                rate: 0.3,
                seed: 7,
                kinds,
                stall_ms: 200,
            },
            ..LinkConfig::default()
        },
    );
    let src = HttpSource::open(&s.server.url(""), &HttpConfig::default()).expect("open");
    let mut rng = Lcg(3);
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..150 {
        let n = 1 + rng.below(200_000);
        let off = rng.below(s.data.len() as u64 - n + 1);
        match src.read_range(off, n, RequestKind::Demand) {
            Ok(got) => {
                assert!(
                    got == s.data[off as usize..(off + n) as usize],
                    "a read at {off}+{n} returned wrong bytes"
                );
                ok += 1;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                failed += 1;
            }
        }
    }
    let stats = s.server.stats();
    let injected: u64 = stats.faults.values().sum();
    assert!(ok > 50 && failed > 10, "{ok} ok, {failed} failed");
    assert!(
        injected >= failed,
        "{injected} faults injected, {failed} reads failed"
    );
    // Stalls of 200 ms are shorter than the read timeout: they delay, they do not fail.
    assert!(stats.faults.get("stall").copied().unwrap_or(0) > 0);
}

#[test]
fn bit_flips_get_through_http_so_digests_must_catch_them() {
    let s = serve(
        300_000,
        LinkConfig {
            faults: FaultConfig {
                rate: 1.0,
                kinds: vec![FaultKind::BitFlip],
                ..FaultConfig::default()
            },
            ..LinkConfig::default()
        },
    );
    let src = HttpSource::open(&s.server.url(""), &HttpConfig::default()).expect("open");
    for i in 0..10u64 {
        let (off, n) = (i * 20_000, 50_000);
        let got = src
            .read_range(off, n, RequestKind::Demand)
            .expect("flipped read");
        let want = &s.data[off as usize..(off + n) as usize];
        let flipped: u32 = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(flipped, 1, "read {i}: exactly one bit flipped");
    }
}

// --- nginx -------------------------------------------------------------------------------

/// An nginx on loopback serving `www`, plain on one port and TLS + HTTP/2 on another;
/// killed on drop.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    tls_port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certs(dir: &Path) {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=incfs test CA",
            "-keyout",
        ])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("server.crt")));
}

fn start_nginx(www: &Path) -> Nginx {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_certs(d);
    let (port, tls_port) = (free_port(), free_port());
    let conf = format!(
        r#"
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    log_format t '$server_protocol $connection $connection_requests $status $http_range';
    access_log {d}/access.log t;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl http2;
        root {www};
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
    }}
}}
"#,
        d = d.display(),
        www = www.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
    let child = incfs_datasets::nginx::start(d).expect("start nginx");
    let mut nginx = Nginx {
        child,
        dir,
        port,
        tls_port,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = [port, tls_port]
            .iter()
            .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok());
        if up {
            return nginx;
        }
        let exited = nginx.child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let log =
                std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
            panic!("nginx did not start ({exited:?}): {log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The access log's lines, once at least `want` are written.
fn access_log(nginx: &Nginx, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(nginx.dir.path().join("access.log")).unwrap_or_default();
        let lines: Vec<String> = log.lines().map(str::to_string).collect();
        if lines.len() >= want || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reads_from_nginx_over_http1_and_https_with_http2() {
    if !require(
        "reads_from_nginx_over_http1_and_https_with_http2",
        &[Need::Nginx],
    ) {
        return;
    }
    let www = tempfile::tempdir().expect("tempdir");
    // nginx's workers may run as another user: let them in.
    std::fs::set_permissions(www.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = content(2_500_000, 11);
    std::fs::write(www.path().join("image.incfs"), &data).expect("write image");
    std::fs::write(www.path().join("empty"), b"").expect("write empty");
    let nginx = start_nginx(www.path());

    // Plain HTTP/1.1 with keep-alive.
    let url = format!("http://127.0.0.1:{}/image.incfs", nginx.port);
    let src = source::open(&url).expect("open nginx URL");
    assert_eq!(src.total_len().expect("len"), data.len() as u64);
    check_random_ranges(&*src, &data, 30, 5);
    assert!(
        src.read_range(0, data.len() as u64, RequestKind::Background)
            .expect("all")
            == data
    );
    // Several ranges in one request: nginx answers multipart/byteranges.
    let ranges = scattered_ranges(data.len() as u64, 20, 6);
    assert_ranges(
        &read_ranges(&*src, &ranges).expect("multi-range read from nginx"),
        &ranges,
        &data,
    );
    assert!(
        src.ranges_per_request() > 1,
        "nginx's multi-range answer was refused"
    );
    let missing = source::open(&format!("http://127.0.0.1:{}/nothing", nginx.port));
    match missing {
        Err(SourceError::Status { status: 404, .. }) => {}
        Err(e) => panic!("a missing file gave {e}"),
        Ok(_) => panic!("a missing file opened"),
    }
    let empty = source::open(&format!("http://127.0.0.1:{}/empty", nginx.port)).expect("empty");
    assert_eq!(empty.total_len().expect("len"), 0);
    drop((src, empty));

    // HTTPS (rustls, trusting the test CA) negotiates HTTP/2 by ALPN.
    let config = HttpConfig {
        extra_root_certs_pem: vec![
            std::fs::read(nginx.dir.path().join("ca.crt")).expect("read CA certificate"),
        ],
        ..HttpConfig::default()
    };
    let tls_url = format!("https://127.0.0.1:{}/image.incfs", nginx.tls_port);
    let tls = HttpSource::open(&tls_url, &config).expect("open HTTPS URL");
    assert_eq!(tls.len(), data.len() as u64);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (tls, data) = (&tls, &data);
            scope.spawn(move || check_random_ranges(tls, data, 10, 20 + t));
        }
    });
    assert_ranges(
        &read_ranges(&tls, &ranges).expect("multi-range read over HTTP/2"),
        &ranges,
        &data,
    );
    // Without the CA the server is not trusted.
    let err = HttpSource::open(&tls_url, &HttpConfig::default()).expect_err("untrusted");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    // 1 HEAD + 30 ranges + 1 whole + 1 multi-range + 1 HEAD 404 + 1 HEAD empty (+ probe) on HTTP/1.1; at
    // least 1 HEAD + 40 ranges over HTTP/2.
    let lines = access_log(&nginx, 75);
    let h1: Vec<&String> = lines.iter().filter(|l| l.starts_with("HTTP/1.1")).collect();
    let h2: Vec<&String> = lines.iter().filter(|l| l.starts_with("HTTP/2.0")).collect();
    assert!(
        h2.len() >= 41,
        "HTTPS requests did not use HTTP/2: {lines:#?}"
    );
    assert!(h1.len() >= 33, "{lines:#?}");
    // Keep-alive: each of the three sources above kept the two connections of its open (the
    // HEAD and the opening probe go side by side) for all its requests (allow a spare in case
    // the server closed one).
    let connections: std::collections::BTreeSet<&str> = h1
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    eprintln!(
        "{} HTTP/1.1 requests on {} connections",
        h1.len(),
        connections.len()
    );
    assert!(
        connections.len() <= 8,
        "{} HTTP/1.1 requests used {} connections: keep-alive is not reused: {h1:#?}",
        h1.len(),
        connections.len()
    );
}

#[test]
fn a_slow_consumer_does_not_stall_other_threads() {
    let s = serve(5_000_000, LinkConfig::default());
    let src = HttpSource::open(&s.server.url(""), &HttpConfig::default()).expect("open");
    let started = AtomicBool::new(false);
    let others_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            // A prefetch whose consumer takes 100 ms per piece (as if verifying slowly), for up
            // to 20 pieces: over a second in all.
            let mut pieces = 0;
            src.read_range_streaming(0, 4_000_000, RequestKind::Prefetch, &mut |_| {
                started.store(true, Ordering::SeqCst);
                pieces += 1;
                std::thread::sleep(Duration::from_millis(100));
                if pieces == 20 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .expect("slow read");
            // Checked when the slow read ends.
            others_done.load(Ordering::SeqCst)
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Demand reads on another thread go through meanwhile.
        check_random_ranges(&src, &s.data, 10, 77);
        others_done.store(true, Ordering::SeqCst);
        assert!(
            slow.join().expect("slow reader"),
            "the demand reads waited for the slow prefetch consumer"
        );
    });
}

/// Reads `ranges` of `src` with one `read_ranges_within`; returns each range's bytes.
fn read_ranges(src: &dyn Source, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>, SourceError> {
    let mut out = vec![Vec::new(); ranges.len()];
    src.read_ranges_within(
        ranges,
        RequestKind::Prefetch,
        Duration::from_secs(10),
        &mut |i, piece| {
            out[i].extend_from_slice(piece);
            ControlFlow::Continue(())
        },
    )?;
    Ok(out)
}

/// `count` ascending ranges, apart, of up to 20,000 bytes each, within `len`.
fn scattered_ranges(len: u64, count: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Lcg(seed);
    let step = len / count;
    (0..count)
        .map(|i| {
            (
                i * step + rng.below(step / 2),
                1 + rng.below(20_000.min(step / 2)),
            )
        })
        .collect()
}

fn assert_ranges(got: &[Vec<u8>], ranges: &[(u64, u64)], data: &[u8]) {
    for (i, (&(o, n), g)) in ranges.iter().zip(got).enumerate() {
        assert!(
            g[..] == data[o as usize..(o + n) as usize],
            "range {i} ({o}+{n}) differs from the file"
        );
    }
}

#[test]
fn several_ranges_come_in_one_request_or_one_at_a_time_when_the_server_cannot() {
    // incfs serve answers them as one multipart/byteranges body.
    let s = serve(3_000_000, LinkConfig::default());
    let src = HttpSource::open(&s.server.url("image.incfs"), &HttpConfig::default())
        .expect("open HTTP source");
    assert!(src.ranges_per_request() > 1);
    let ranges = scattered_ranges(s.data.len() as u64, 40, 3);
    s.server.reset_stats();
    let got = read_ranges(&src, &ranges).expect("multi-range read");
    assert_ranges(&got, &ranges, &s.data);
    let stats = s.server.stats();
    assert_eq!(
        (stats.requests, stats.multi_range_requests),
        (1, 1),
        "40 ranges took {} requests",
        stats.requests
    );
    assert_eq!(stats.ranges.len(), 40);

    // A server that answers several ranges with the whole file (as S3 does): the source
    // drops that answer, reads the ranges one by one, and asks one at a time from then on.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("image.incfs");
    std::fs::write(&path, &s.data).expect("write image");
    let mut config = ServeConfig::new(&path);
    config.multi_range = false;
    // Paced, so that bytes the client did not wait for are not counted as sent.
    config.link.bandwidth_mbit = Some(200.0);
    let single = Server::start(config).expect("start incfs serve");
    // No opening probe, so that every range below is a request of its own to count.
    let no_probe = HttpConfig {
        probe_bytes: 0,
        ..HttpConfig::default()
    };
    let src = HttpSource::open(&single.url("image.incfs"), &no_probe).expect("open HTTP source");
    let got = read_ranges(&src, &ranges).expect("read one by one");
    assert_ranges(&got, &ranges, &s.data);
    assert_eq!(src.ranges_per_request(), 1);
    let stats = single.stats();
    assert_eq!(stats.full_requests, 1, "the refused multi-range request");
    assert_eq!(stats.range_requests, 40);
    assert!(
        stats.bytes_sent < 3_000_000,
        "the whole file was read: {} bytes",
        stats.bytes_sent
    );
    let got = read_ranges(&src, &ranges[..5]).expect("read again");
    assert_ranges(&got, &ranges[..5], &s.data);
    assert_eq!(
        single.stats().full_requests,
        1,
        "asked for several ranges again"
    );
}

#[test]
fn multi_range_answers_coalesced_or_wrong_give_right_bytes_or_errors() {
    let data = content(10_000, 12);
    let d = data.clone();
    // Every multi-range request is answered by one 206 part from 1,000 to 4,999 (the
    // server coalesced the ranges with their gaps, as RFC 9110 allows), except the ones
    // the script spoils.
    let server = Scripted::start(move |method, range| {
        if method == "HEAD" {
            return response("200 OK", &[("Content-Length", "10000".into())], b"");
        }
        let one_part = |first: usize, last: usize, total: usize| {
            response(
                "206 Partial Content",
                &[
                    ("Content-Range", format!("bytes {first}-{last}/{total}")),
                    ("Content-Length", (last - first + 1).to_string()),
                ],
                &d[first..=last],
            )
        };
        let multipart = |parts: &[(usize, usize)]| {
            let mut body = Vec::new();
            for &(a, b) in parts {
                body.extend(
                    format!("\r\n--BND\r\nContent-Range: bytes {a}-{b}/10000\r\n\r\n").bytes(),
                );
                body.extend_from_slice(&d[a..=b]);
            }
            body.extend(b"\r\n--BND--\r\n");
            response(
                "206 Partial Content",
                &[
                    ("Content-Type", "multipart/byteranges; boundary=BND".into()),
                    ("Content-Length", body.len().to_string()),
                ],
                &body,
            )
        };
        match range {
            Some("bytes=1000-1999,4000-4999") => one_part(1000, 4999, 10000),
            // The parts in reverse order.
            Some("bytes=100-199,300-399") => multipart(&[(300, 399), (100, 199)]),
            // A part the request did not ask for.
            Some("bytes=5000-5099,6000-6099") => multipart(&[(5000, 5099), (7000, 7099)]),
            // A part of another file's length.
            Some("bytes=8000-8099,9000-9099") => one_part(8000, 9099, 20000),
            // The closing boundary never comes: the second part is short.
            Some("bytes=2000-2099,2500-2599") => {
                let mut r = multipart(&[(2000, 2099), (2500, 2599)]);
                r.truncate(r.len() - 60);
                r
            }
            _ => response(
                "500 Internal Server Error",
                &[("Content-Length", "0".into())],
                b"",
            ),
        }
    });
    let src = HttpSource::open(&server.url(), &HttpConfig::default()).expect("open");
    let ok = [(1000, 1000), (4000, 1000)];
    assert_ranges(&read_ranges(&src, &ok).expect("coalesced"), &ok, &data);
    let ok = [(100, 100), (300, 100)];
    assert_ranges(&read_ranges(&src, &ok).expect("reordered"), &ok, &data);
    for bad in [
        [(5000, 100), (6000, 100)],
        [(8000, 100), (9000, 100)],
        [(2000, 100), (2500, 100)],
    ] {
        let err = read_ranges(&src, &bad).expect_err("a wrong answer accepted");
        assert!(err.is_retryable(), "{bad:?}: {err}");
    }
    // Ranges that are not ascending and apart are the caller's error.
    let err = read_ranges(&src, &[(300, 100), (100, 100)]).expect_err("unsorted accepted");
    assert!(!err.is_retryable(), "{err}");
}

#[test]
fn a_published_plan_comes_in_the_request_that_opens_it_and_a_missing_one_costs_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = content(300_000, 7);
    std::fs::write(dir.path().join("app.img"), content(1_000, 8)).expect("write");
    std::fs::write(dir.path().join("app.img.plan.json"), &plan).expect("write");
    let server = Server::start(ServeConfig::new(dir.path())).expect("start incfs serve");
    let retry = incfs_fs::retry::RetryPolicy::default();
    let (_, got) = incfs_fs::plan::published(&server.url("app.img"), &retry)
        .expect("fetch")
        .expect("a plan is there");
    assert!(got == plan, "the plan's bytes");
    let stats = server.stats();
    assert_eq!((stats.requests, stats.head_requests), (1, 0), "{stats:?}");

    server.reset_stats();
    let none = incfs_fs::plan::published(&server.url("other.img"), &retry).expect("fetch");
    assert!(none.is_none());
    assert_eq!(
        server.stats().requests,
        1,
        "one request for a plan that is not there"
    );

    // A plan larger than the probe: its first bytes, then the whole of it.
    let big = content(source::WHOLE_PROBE_BYTES as usize + 5_000, 9);
    std::fs::write(dir.path().join("big.img.plan.json"), &big).expect("write");
    server.reset_stats();
    let (_, got) = incfs_fs::plan::published(&server.url("big.img"), &retry)
        .expect("fetch")
        .expect("a plan is there");
    assert!(got == big);
    assert_eq!(server.stats().requests, 2);
}

/// Packs a tree of `files` files of `len` bytes each (seeded by `seed`) into `img`.
fn pack_tree(dir: &Path, img: &Path, files: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
    let tree = dir.join(format!("tree-{seed}"));
    std::fs::create_dir_all(&tree).expect("mkdir");
    let mut contents = Vec::new();
    for i in 0..files {
        let bytes = content(len, seed * 1_000 + i as u64);
        std::fs::write(tree.join(format!("file-{i:04}")), &bytes).expect("write");
        contents.push(bytes);
    }
    incfs_fs::format::pack_dir(&tree, img, &Default::default(), &()).expect("pack");
    contents
}

/// Mounts `url` with `cache` (no FUSE: the file system core), reads `file-0001` whole.
fn open_and_read(url: &str, cache: &Path) -> (incfs_fs::format::Digest, Vec<u8>) {
    let config = incfs_fs::fs::FsConfig::new(cache.to_path_buf());
    let src = source::open_or_offline(url, &config.fetch.retry(), cache, None).expect("open");
    let fs = Arc::new(incfs_fs::fs::IncFs::new(src, &config).expect("mount"));
    let ino = fs.lookup(1, b"file-0001").expect("lookup").ino;
    let size = fs.getattr(ino).expect("getattr").size;
    let (fh, _) = fs.open(ino).expect("open file");
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = fs.read(ino, fh, out.len() as u64, 1 << 20).expect("read");
        assert!(!b.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&b);
    }
    fs.release(fh);
    let root = fs.root_digest();
    fs.shutdown().expect("shutdown");
    (root, out)
}

#[test]
fn a_start_from_a_warm_cache_asks_for_the_header_alone_and_an_update_is_still_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("app.img");
    // Enough files that the manifest is tens of KB, as for a real tree.
    let v1 = pack_tree(dir.path(), &img, 600, 3_000, 1);
    let server = Server::start(ServeConfig::new(dir.path())).expect("start incfs serve");
    let url = server.url("app.img");
    let cache = tempfile::tempdir().expect("cache");

    let (root1, got) = open_and_read(&url, cache.path());
    assert!(got == v1[1], "the first start reads the file");
    let first = server.stats();

    // The same image again: a HEAD and the 128-byte header, nothing more (the chunks and the
    // manifest are in the cache).
    server.reset_stats();
    let (root, got) = open_and_read(&url, cache.path());
    assert_eq!(root, root1);
    assert!(got == v1[1], "the second start reads the same bytes");
    let second = server.stats();
    assert_eq!(
        (second.requests, second.head_requests),
        (2, 1),
        "{second:?}"
    );
    assert!(
        second.bytes_sent <= incfs_fs::format::HEADER_LEN as u64,
        "only the header is sent: {second:?}"
    );
    assert!(
        first.bytes_sent > 20 * second.bytes_sent,
        "the first start moved the manifest: {first:?}"
    );

    // A new image at the same URL: its header differs, so its metadata is read whole and
    // the mount serves the new bytes.
    let v2 = pack_tree(dir.path(), &img, 600, 3_000, 2);
    server.reset_stats();
    let (root2, got) = open_and_read(&url, cache.path());
    assert_ne!(root2, root1);
    assert!(got == v2[1], "the update's bytes, not the cached image's");
    let third = server.stats();
    assert!(third.bytes_sent > first.bytes_sent / 2, "{third:?}");
}

#[test]
fn a_sidecar_that_is_not_there_costs_one_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("app.img"), content(1_000, 8)).expect("write");
    let server = Server::start(ServeConfig::new(dir.path())).expect("start incfs serve");
    let retry = incfs_fs::retry::RetryPolicy::default();
    for suffix in [".delta", ".bulk"] {
        server.reset_stats();
        let got = source::open_beside(
            &server.url("app.img"),
            suffix,
            &retry,
            Duration::from_secs(3),
            false,
        )
        .expect("a missing sidecar is no error");
        assert!(got.is_none(), "{suffix}");
        let stats = server.stats();
        assert_eq!(
            (stats.requests, stats.head_requests),
            (1, 1),
            "{suffix}: the 404 of the HEAD says it all: {stats:?}"
        );
    }
}

#[test]
fn a_server_whose_head_says_404_but_serves_get_still_opens() {
    // Servers that route only GET answer HEAD with 404: the probe sent beside the HEAD gives
    // the length.
    let data = content(5_000, 11);
    let d = data.clone();
    let server = Scripted::start(move |method, range| {
        if method == "HEAD" {
            return response("404 Not Found", &[("Content-Length", "0".into())], b"");
        }
        let Some((a, b)) = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        else {
            return response("400 Bad Request", &[("Content-Length", "0".into())], b"");
        };
        let b = b.min(d.len() - 1);
        response(
            "206 Partial Content",
            &[
                ("Content-Range", format!("bytes {a}-{b}/{}", d.len())),
                ("Content-Length", (b + 1 - a).to_string()),
            ],
            &d[a..=b],
        )
    });
    let src = HttpSource::open(&server.url(), &HttpConfig::default()).expect("opens");
    assert_eq!(src.len(), data.len() as u64);
    let got = src
        .read_range(1_000, 2_000, RequestKind::Demand)
        .expect("a range");
    assert!(got == data[1_000..3_000]);
}
