//! `incfs serve` on the wire: range semantics, keep-alive, directories, stats and link
//! emulation, checked with raw HTTP/1.1 over loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{STATS_PATH, ServeConfig, Server, Stats};

use incfs_datasets::synth::noise as content;

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Sends one request on `conn` and reads one answer (framed by Content-Length).
fn exchange(conn: &mut BufReader<TcpStream>, method: &str, path: &str, extra: &str) -> Answer {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
    conn.get_mut()
        .write_all(req.as_bytes())
        .expect("send request");
    let mut line = String::new();
    conn.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).expect("header line");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("header has a colon");
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = if method == "HEAD" {
        0
    } else {
        headers
            .get("content-length")
            .map(|v| v.parse().expect("numeric content-length"))
            .unwrap_or(0)
    };
    let mut body = vec![0; len];
    conn.read_exact(&mut body).expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    BufReader::new(s)
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> Answer {
    exchange(&mut connect(addr), "GET", path, extra)
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write test file");
    p
}

#[test]
fn ranges_get_206_multipart_416_head_and_whole_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(1_000_003, 1);
    let len = data.len();
    let img = write_file(dir.path(), "image.incfs", &data);
    let server = Server::start(ServeConfig::new(&img)).expect("start server");
    let addr = server.addr();
    assert!(addr.ip().is_loopback());

    // No Range: the whole file, at `/` and at `/<name>`.
    for path in ["/", "/image.incfs"] {
        let a = get(addr, path, "");
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("content-length"), Some(len.to_string().as_str()));
        assert_eq!(a.header("accept-ranges"), Some("bytes"));
        assert!(a.body == data, "{path}: whole body differs");
    }

    let cases: [(&str, usize, usize); 5] = [
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=999990-2000000", 999_990, len - 1),
        ("bytes=500000-", 500_000, len - 1),
        ("bytes=-100", len - 100, len - 1),
    ];
    for (range, a, b) in cases {
        let ans = get(addr, "/image.incfs", &format!("Range: {range}\r\n"));
        assert_eq!(ans.status, 206, "{range}");
        assert_eq!(
            ans.header("content-range"),
            Some(format!("bytes {a}-{b}/{len}").as_str()),
            "{range}"
        );
        assert_eq!(
            ans.header("content-length"),
            Some((b - a + 1).to_string().as_str())
        );
        assert!(ans.body == data[a..=b], "{range}: body differs");
    }

    for range in ["bytes=1000003-", "bytes=2000000-2000010", "bytes=-0"] {
        let ans = get(addr, "/", &format!("Range: {range}\r\n"));
        assert_eq!(ans.status, 416, "{range}");
        assert_eq!(
            ans.header("content-range"),
            Some(format!("bytes */{len}").as_str())
        );
        assert!(ans.body.is_empty());
    }

    // Several ranges: one multipart/byteranges body, each part with its Content-Range.
    let ans = get(addr, "/", "Range: bytes=0-1,5-6,-3\r\n");
    assert_eq!(ans.status, 206);
    let ct = ans.header("content-type").unwrap_or_default().to_string();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("content type {ct}"));
    let mut want = Vec::new();
    for (a, b) in [(0, 1), (5, 6), (len - 3, len - 1)] {
        want.extend(
            format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{len}\r\n\r\n")
                .bytes(),
        );
        want.extend_from_slice(&data[a..=b]);
    }
    want.extend(format!("\r\n--{boundary}--\r\n").bytes());
    assert!(ans.body == want, "multipart body differs");
    // Ranges out of order or overlapping, or nonsense, are ignored: the whole file.
    let ans = get(addr, "/", "Range: bytes=5-6,0-1\r\n");
    assert_eq!((ans.status, ans.body.len()), (200, len));
    let ans = get(addr, "/", "Range: bytes=9-3\r\n");
    assert_eq!((ans.status, ans.body.len()), (200, len));

    let mut conn = connect(addr);
    let head = exchange(&mut conn, "HEAD", "/image.incfs", "");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(len.to_string().as_str())
    );
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    let head = exchange(&mut conn, "HEAD", "/", "Range: bytes=5-9\r\n");
    assert_eq!(head.status, 206);
    assert_eq!(head.header("content-length"), Some("5"));
    // The HEAD answers carried no body: the next answer on the connection parses cleanly.
    let next = exchange(&mut conn, "GET", "/", "Range: bytes=5-9\r\n");
    assert!(next.body == data[5..10]);

    assert_eq!(get(addr, "/other", "").status, 404);
    assert_eq!(
        exchange(&mut connect(addr), "POST", "/", "Content-Length: 0\r\n").status,
        405
    );
}

#[test]
fn keep_alive_answers_many_requests_on_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(300_000, 2);
    let img = write_file(dir.path(), "img", &data);
    let server = Server::start(ServeConfig::new(&img)).expect("start server");
    let mut conn = connect(server.addr());
    for i in 0..50usize {
        let a = i * 5_000;
        let b = a + 4_095;
        let ans = exchange(
            &mut conn,
            "GET",
            "/img",
            &format!("Range: bytes={a}-{b}\r\n"),
        );
        assert_eq!(ans.status, 206);
        assert!(
            ans.body == data[a..=b],
            "request {i} on the kept connection"
        );
    }
    let stats = server.stats();
    assert_eq!(stats.requests, 50);
    assert_eq!(stats.range_requests, 50);
}

#[test]
fn directories_are_listed_and_never_escaped() {
    let outside = tempfile::tempdir().expect("tempdir");
    write_file(outside.path(), "secret", b"do not serve");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sub dir")).expect("mkdir");
    let a = content(70_000, 3);
    let b = content(10, 4);
    write_file(dir.path(), "a.incfs", &a);
    write_file(&dir.path().join("sub dir"), "b.incfs", &b);
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("escape"))
        .expect("symlink");
    std::os::unix::fs::symlink("a.incfs", dir.path().join("alias")).expect("symlink");

    let server = Server::start(ServeConfig::new(dir.path())).expect("start server");
    let addr = server.addr();
    let index = get(addr, "/", "");
    assert_eq!(index.status, 200);
    let html = String::from_utf8(index.body).expect("utf-8 listing");
    assert!(html.contains("href=\"a.incfs\""), "{html}");
    assert!(html.contains("href=\"sub%20dir/\""), "{html}");
    let sub = get(addr, "/sub%20dir/", "");
    assert!(String::from_utf8_lossy(&sub.body).contains("b.incfs"));

    let ans = get(addr, "/a.incfs", "Range: bytes=65536-69999\r\n");
    assert_eq!(ans.status, 206);
    assert!(ans.body == a[65_536..70_000]);
    assert!(get(addr, "/sub%20dir/b.incfs", "").body == b);
    assert!(
        get(addr, "/alias", "").body == a,
        "symlinks inside the tree are followed"
    );

    for path in [
        "/escape",
        "/../secret",
        "/sub%20dir/../../secret",
        "/%2e%2e/secret",
    ] {
        assert_eq!(get(addr, path, "").status, 404, "{path}");
    }
}

#[test]
fn stats_count_requests_bytes_kinds_and_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(100_000, 5);
    let img = write_file(dir.path(), "img", &data);
    let server = Server::start(ServeConfig::new(&img)).expect("start server");
    let addr = server.addr();
    get(
        addr,
        "/img",
        "Range: bytes=0-999\r\nX-Incfs-Request: demand\r\n",
    );
    get(
        addr,
        "/img",
        "Range: bytes=1000-2999\r\nX-Incfs-Request: prefetch\r\n",
    );
    get(addr, "/img", "Range: bytes=-500\r\n");
    exchange(&mut connect(addr), "HEAD", "/img", "");

    let ans = get(addr, STATS_PATH, "");
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("content-type"), Some("application/json"));
    let stats: Stats = serde_json::from_slice(&ans.body).expect("stats JSON");
    assert_eq!(stats, server.stats());
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.head_requests, 1);
    assert_eq!(stats.range_requests, 3);
    assert_eq!(stats.bytes_sent, 3_500);
    assert_eq!(stats.by_kind["demand"].bytes, 1_000);
    assert_eq!(stats.by_kind["prefetch"].bytes, 2_000);
    assert_eq!(stats.by_kind["unknown"].requests, 2);
    let ranges: Vec<(u64, u64, &str)> = stats
        .ranges
        .iter()
        .map(|r| (r.start, r.len, r.kind.as_str()))
        .collect();
    assert_eq!(
        ranges,
        [
            (0, 1000, "demand"),
            (1000, 2000, "prefetch"),
            (99_500, 500, "unknown")
        ]
    );

    get(addr, &format!("{STATS_PATH}?reset"), "");
    assert_eq!(server.stats(), Stats::default());
}

#[test]
fn latency_delays_every_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = write_file(dir.path(), "img", &content(10_000, 6));
    let mut config = ServeConfig::new(&img);
    config.link = LinkConfig {
        latency_ms: 200,
        ..LinkConfig::default()
    };
    let server = Server::start(config).expect("start server");
    let mut conn = connect(server.addr());
    for _ in 0..3 {
        let t = Instant::now();
        let ans = exchange(&mut conn, "GET", "/", "Range: bytes=0-99\r\n");
        assert_eq!(ans.status, 206);
        // A lower bound only: the delay is added, never taken away.
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
}

#[test]
fn bandwidth_is_one_bucket_shared_by_all_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = content(1_500_000, 7);
    let img = write_file(dir.path(), "img", &data);
    let mut config = ServeConfig::new(&img);
    // 8 Mbit/s = 1,000,000 bytes/s.
    config.link = LinkConfig {
        bandwidth_mbit: Some(8.0),
        ..LinkConfig::default()
    };
    let server = Server::start(config).expect("start server");
    let addr = server.addr();
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..3usize {
            let data = &data;
            s.spawn(move || {
                let a = i * 500_000;
                let b = a + 499_999;
                let ans = get(addr, "/", &format!("Range: bytes={a}-{b}\r\n"));
                assert!(ans.body == data[a..=b]);
            });
        }
    });
    let elapsed = t.elapsed();
    assert_eq!(server.stats().bytes_sent, 1_500_000);
    // 1.5 MB at 1 MB/s, less the 64 KiB burst the bucket starts with: at least 1.43 s, even
    // though three connections pulled at once. A lower bound only.
    assert!(elapsed >= Duration::from_millis(1_400), "{elapsed:?}");
}
