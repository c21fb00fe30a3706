//! Bounded resources under a real mount (root, /dev/fuse): a tree of thousands of files read
//! by several processes through a daemon started with a small descriptor limit.
//!
//! Each mount is served by a child process (`common::daemon`); every mount is unmounted by a
//! drop guard, also on failure.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_fs::format::{PackOptions, pack_dir};
use incfs_fs::serve::{ServeConfig, Server};

use common::daemon::{Daemon, ENV_LOG, ENV_NOFILE};

/// The daemon: does nothing unless started by [`Daemon::start`].
#[test]
#[ignore = "helper: run by the mount tests as their FUSE daemon"]
fn daemon_child() {
    common::daemon::child();
}

/// Descriptors open in process `pid` now.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `sha256sum` lines of every file in `list` (NUL-separated paths relative to `dir`), as a
/// process of its own reading through the mount.
fn hash_files(dir: &Path, list: &Path) -> std::process::Child {
    Command::new("xargs")
        .arg("-0")
        .arg("-a")
        .arg(list)
        .arg("sha256sum")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn five_thousand_files_read_by_eight_processes_under_ulimit_256() {
    if !require(
        "five_thousand_files_read_by_eight_processes_under_ulimit_256",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    const FILES: usize = 5000;
    const READERS: usize = 8;
    const LIMIT: usize = 256;
    let w = tempfile::tempdir().unwrap();
    let tree = w.path().join("tree");
    // 5,000 files of 1 B to 24 KiB (up to six 4 KiB chunks), in 50 directories.
    let mut names = Vec::with_capacity(FILES);
    for i in 0..FILES {
        let dir = tree.join(format!("d{:02}", i % 50));
        fs::create_dir_all(&dir).unwrap();
        let name = format!("d{:02}/f{i:04}", i % 50);
        let len = 1 + (i * 7919) % (24 * 1024);
        fs::write(tree.join(&name), common::noise(len, i as u64)).unwrap();
        names.push(name);
    }
    let img = w.path().join("img");
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img, &opts, &()).unwrap();
    let server = Server::start(ServeConfig::new(&img)).unwrap();
    let mnt = w.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let log = w.path().join("daemon.log");
    let d = Daemon::start_with(
        &server.url("img"),
        &mnt,
        &w.path().join("cache"),
        None,
        &[
            (ENV_NOFILE, LIMIT.to_string()),
            (ENV_LOG, log.display().to_string()),
        ],
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(&format!(" {LIMIT} "))),
        "the daemon should run under a limit of {LIMIT}:\n{limits}"
    );

    // The digests of the tree itself, the same way.
    let all = w.path().join("list");
    let mut bytes = Vec::new();
    for name in &names {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
    }
    fs::write(&all, bytes).unwrap();
    let out = hash_files(&tree, &all).wait_with_output().unwrap();
    assert!(out.status.success());
    let want: std::collections::HashMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| (l.split_once("  ").unwrap().1.to_string(), l.to_string()))
        .collect();
    assert_eq!(want.len(), FILES);
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (Arc::clone(&peak), Arc::clone(&stop), d.pid());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(open_fds(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Each reader goes through all files, starting at its own place in the list.
    let t = Instant::now();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let list = w.path().join(format!("list{r}"));
            let start = r * FILES / READERS;
            let mut bytes = Vec::new();
            for name in names[start..].iter().chain(&names[..start]) {
                bytes.extend_from_slice(name.as_bytes());
                bytes.push(0);
            }
            fs::write(&list, bytes).unwrap();
            hash_files(&mnt, &list)
        })
        .collect();
    for (r, child) in readers.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "reader {r} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut seen = 0;
        for line in text.lines() {
            let name = line.split_once("  ").unwrap().1;
            assert_eq!(
                want[name], line,
                "reader {r}: {name} read wrong through the mount"
            );
            seen += 1;
        }
        assert_eq!(seen, FILES, "reader {r} hashed {seen} files");
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let s = d.stats();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "descriptors: {FILES} files read by {READERS} processes in {secs:.1} s under ulimit -n {LIMIT}: \
         daemon peak {peak} open descriptors, {} passthrough opens, {} cached opens, {} requests",
        s.passthrough_opens, s.cached_opens, s.requests
    );
    assert_eq!(s.read_errors, 0);
    assert_eq!(s.fetch_errors, 0);
    assert!(peak < LIMIT, "the daemon held {peak} descriptors");
    d.unmount();
    server.shutdown();
    let logged = fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("ERROR") && !logged.contains("WARN"),
        "the daemon logged:\n{logged}"
    );
}

/// What the [`FlakyServer`] does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers ranges of the image.
    Serve,
    /// Reads the request and never answers.
    Stall,
    /// Sends the head of a right answer, then one byte a second.
    Trickle,
}

/// An HTTP/1.1 server of one image, on loopback, that can be told to stall, to trickle, or
/// to go away entirely (connections refused) and come back on the same port.
struct FlakyServer {
    image: Arc<Vec<u8>>,
    port: u16,
    mode: Arc<std::sync::Mutex<Mode>>,
    /// Bumped when the server goes away: connections of an older generation end.
    generation: Arc<AtomicUsize>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Every connection accepted, to shut down when the server goes away.
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    /// Requests for ranges starting below this offset (and HEADs) are always served.
    spare_below: Arc<AtomicUsize>,
}

impl FlakyServer {
    fn start(image: Vec<u8>) -> FlakyServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = FlakyServer {
            image: Arc::new(image),
            port,
            mode: Arc::new(std::sync::Mutex::new(Mode::Serve)),
            generation: Arc::new(AtomicUsize::new(0)),
            acceptor: None,
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::default(),
            spare_below: Arc::default(),
        };
        s.listen(listener);
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/img", self.port)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn listen(&mut self, listener: std::net::TcpListener) {
        self.stop.store(false, Ordering::SeqCst);
        let (image, mode, generation, stop, conns, spare) = (
            Arc::clone(&self.image),
            Arc::clone(&self.mode),
            Arc::clone(&self.generation),
            Arc::clone(&self.stop),
            Arc::clone(&self.conns),
            Arc::clone(&self.spare_below),
        );
        self.acceptor = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                conns.lock().unwrap().push(conn.try_clone().unwrap());
                let (image, mode, generation, spare) = (
                    Arc::clone(&image),
                    Arc::clone(&mode),
                    Arc::clone(&generation),
                    Arc::clone(&spare),
                );
                std::thread::spawn(move || serve_conn(conn, &image, &mode, &generation, &spare));
            }
        }));
    }

    /// Closes the listening socket (new connections are refused) and ends every connection.
    fn go_away(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Listens on the same port again, serving.
    fn come_back(&mut self) {
        self.set(Mode::Serve);
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.listen(listener);
    }
}

impl Drop for FlakyServer {
    fn drop(&mut self) {
        self.go_away();
    }
}

fn serve_conn(
    mut conn: std::net::TcpStream,
    image: &[u8],
    mode: &std::sync::Mutex<Mode>,
    generation: &AtomicUsize,
    spare_below: &AtomicUsize,
) {
    use std::io::{BufRead, BufReader, Write};
    let born = generation.load(Ordering::SeqCst);
    let alive = || generation.load(Ordering::SeqCst) == born;
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push(line);
        }
        let Some(first) = head.first() else { return };
        let is_head = first.starts_with("HEAD ");
        let range = head.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim().strip_prefix("bytes=")?;
            let (a, b) = v.split_once('-')?;
            k.eq_ignore_ascii_case("range")
                .then(|| (a.parse::<usize>().ok(), b.parse::<usize>().ok()))
        });
        let spared = is_head
            || matches!(range, Some((Some(a), _)) if a < spare_below.load(Ordering::SeqCst));
        let m = if spared {
            Mode::Serve
        } else {
            *mode.lock().unwrap()
        };
        if m == Mode::Stall {
            while alive() {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        let (status, body, extra) = match range {
            Some((Some(a), Some(b))) if a <= b && b < image.len() => (
                "206 Partial Content",
                &image[a..=b],
                format!("Content-Range: bytes {a}-{b}/{}\r\n", image.len()),
            ),
            _ => ("200 OK", image, String::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{extra}\r\n",
            body.len()
        );
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        if is_head {
            continue;
        }
        if m == Mode::Trickle {
            for b in body {
                if !alive() || conn.write_all(std::slice::from_ref(b)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            continue;
        }
        if conn.write_all(body).is_err() {
            return;
        }
    }
}

/// Reads all of `path`: its bytes, or the errno that ended the read, and how long it took.
fn timed_read(path: &Path) -> (Result<Vec<u8>, Option<i32>>, Duration) {
    let t = Instant::now();
    let r = fs::read(path).map_err(|e| e.raw_os_error());
    (r, t.elapsed())
}

#[test]
fn stalled_trickling_and_dead_servers_give_eio_within_the_deadline_then_recover() {
    if !require(
        "stalled_trickling_and_dead_servers_give_eio_within_the_deadline_then_recover",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    // 3 s keeps the test short; INCFS_RETRY_DEADLINE_MS=10000 checks the default.
    let deadline = Duration::from_millis(common::env_u64("INCFS_RETRY_DEADLINE_MS", 3000));
    let w = tempfile::tempdir().unwrap();
    let tree = w.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    // One file per phase, each read for the first time in its phase: every read misses.
    // A padding file after each keeps a miss widened over what follows it (the read policy)
    // from bringing the next phase's file along.
    let phases = ["stall", "trickle", "dead"];
    for (i, name) in phases.iter().enumerate() {
        fs::write(tree.join(name), common::noise(200_000, i as u64)).unwrap();
        fs::write(
            tree.join(format!("{name}-pad")),
            common::noise(2 << 20, 20 + i as u64),
        )
        .unwrap();
        fs::write(
            tree.join(format!("{name}-after")),
            common::noise(50_000, 9 + i as u64),
        )
        .unwrap();
    }
    let img = w.path().join("img");
    pack_dir(&tree, &img, &PackOptions::default(), &()).unwrap();
    let mut server = FlakyServer::start(fs::read(&img).unwrap());
    let mnt = w.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let d = Daemon::start_with(
        &server.url(),
        &mnt,
        &w.path().join("cache"),
        None,
        &[(
            common::daemon::ENV_RETRY_MS,
            deadline.as_millis().to_string(),
        )],
    );
    let mut report = Vec::new();
    for name in phases {
        match name {
            "stall" => server.set(Mode::Stall),
            "trickle" => server.set(Mode::Trickle),
            _ => server.go_away(),
        }
        let (r, took) = timed_read(&mnt.join(name));
        assert_eq!(
            r.as_ref().err(),
            Some(&Some(libc::EIO)),
            "{name}: the read should fail with EIO"
        );
        assert!(
            took <= deadline + Duration::from_secs(1),
            "{name}: EIO after {took:?}, deadline {deadline:?}"
        );
        // Back to normal: the next reads, of this file and of another, succeed on the same
        // mount (a moment later, as a program trying again would: a failed chunk stays
        // failed for FAILURE_MEMO).
        if name == "dead" {
            server.come_back();
        } else {
            server.set(Mode::Serve);
        }
        std::thread::sleep(incfs_fs::fetch::FAILURE_MEMO);
        let (again, _) = timed_read(&mnt.join(name));
        assert_eq!(
            again.ok(),
            Some(fs::read(tree.join(name)).unwrap()),
            "{name}: after"
        );
        let (other, _) = timed_read(&mnt.join(format!("{name}-after")));
        assert_eq!(
            other.ok(),
            Some(fs::read(tree.join(format!("{name}-after"))).unwrap()),
            "{name}: another file after"
        );
        report.push(format!("{name} {:.2} s", took.as_secs_f64()));
    }
    eprintln!(
        "deadline {:.0} s: time to EIO: {}; every next read right without remount",
        deadline.as_secs_f64(),
        report.join(", ")
    );
    let s = d.stats();
    assert!(s.read_errors >= 3, "{s:?}");
    d.unmount();
}

#[test]
fn unmount_stops_prefetch_and_fetch_within_a_second_even_mid_request() {
    if !require(
        "unmount_stops_prefetch_and_fetch_within_a_second_even_mid_request",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let tree = w.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..8u64 {
        fs::write(tree.join(format!("f{i}")), common::noise(2 << 20, i)).unwrap();
    }
    let img = w.path().join("img");
    pack_dir(&tree, &img, &PackOptions::default(), &()).unwrap();
    let plan = w.path().join("plan.json");
    common::daemon::save_whole_files_plan(&img, &plan);
    let data_offset = incfs_fs::format::Image::open_path(&img, None)
        .unwrap()
        .header()
        .data_offset as usize;
    let mut report = Vec::new();
    for mode in [Mode::Stall, Mode::Trickle] {
        let server = FlakyServer::start(fs::read(&img).unwrap());
        let mnt = w.path().join(format!("mnt-{mode:?}"));
        fs::create_dir(&mnt).unwrap();
        let log = w.path().join(format!("daemon-{mode:?}.log"));
        // Every request for chunks hangs: the prefetcher has the workers waiting on the
        // server when the unmount comes.
        server.spare_below.store(data_offset, Ordering::SeqCst);
        server.set(mode);
        let d = Daemon::start_with(
            &server.url(),
            &mnt,
            &w.path().join(format!("cache-{mode:?}")),
            None,
            &[
                (common::daemon::ENV_PLAN, plan.display().to_string()),
                (ENV_LOG, log.display().to_string()),
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        d.unmount();
        let took = t.elapsed();
        report.push(format!("{mode:?} {:.2} s", took.as_secs_f64()));
        assert!(
            took < Duration::from_secs(1),
            "{mode:?}: unmount took {took:?}"
        );
    }
    eprintln!(
        "shutdown: fusermount3 -u to daemon exit with every fetch worker in a request: {}",
        report.join(", ")
    );
}

#[test]
fn plans_that_repeat_entries_or_are_too_large_cost_nothing() {
    let w = tempfile::tempdir().unwrap();
    let tree = w.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("f"), common::noise(100_000, 1)).unwrap();
    let img_path = w.path().join("img");
    pack_dir(&tree, &img_path, &PackOptions::default(), &()).unwrap();
    let img = incfs_fs::format::Image::open_path(&img_path, None).unwrap();
    let chunks = img.manifest().chunk_count;
    // One whole-file entry a hundred thousand times: as many slots as the file has chunks.
    let entry = incfs_fs::plan::PlanEntry {
        file: "f".into(),
        first_chunk: 0,
        chunk_count: chunks,
        offset_ms: 0.0,
        confidence: 1.0,
    };
    let plan = incfs_fs::plan::PrefetchPlan {
        version: incfs_fs::plan::PLAN_VERSION,
        image_digest: img.root_digest().to_hex(),
        chunk_size: img.manifest().chunk_size,
        total_bytes: 0,
        entries: vec![entry; 100_000],
    };
    let path = w.path().join("plan.json");
    let slots = plan.slots(&path, img.manifest()).unwrap();
    assert_eq!(slots, (0..chunks).collect::<Vec<_>>());
    // A plan file past the cap is refused as too large, naming the file (not cut and then
    // failed as a JSON syntax error).
    let big = w.path().join("big-plan.json");
    fs::File::create(&big)
        .unwrap()
        .set_len((256 << 20) + 1)
        .unwrap();
    let err = incfs_fs::plan::PrefetchPlan::load(&big)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("big-plan.json") && err.contains("larger than the 256 MiB"),
        "{err}"
    );
}

#[test]
fn a_mount_whose_server_is_gone_starts_from_its_cache_and_fails_misses_fast() {
    if !require(
        "a_mount_whose_server_is_gone_starts_from_its_cache_and_fails_misses_fast",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let tree = w.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("read-before"), common::noise(300_000, 1)).unwrap();
    fs::write(tree.join("sub/never-read"), common::noise(300_000, 2)).unwrap();
    let img = w.path().join("img");
    pack_dir(&tree, &img, &PackOptions::default(), &()).unwrap();
    let mut server = FlakyServer::start(fs::read(&img).unwrap());
    let mnt = w.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let cache = w.path().join("cache");

    let d = Daemon::start(&server.url(), &mnt, &cache, None);
    assert_eq!(
        fs::read(mnt.join("read-before")).unwrap(),
        fs::read(tree.join("read-before")).unwrap()
    );
    assert!(!d.stats().offline);
    d.unmount();

    // The server goes away; the same mount, with the same cache, starts anyway.
    server.go_away();
    let log = w.path().join("offline.log");
    let t = Instant::now();
    let d = Daemon::start_with(
        &server.url(),
        &mnt,
        &cache,
        None,
        &[(ENV_LOG, log.display().to_string())],
    );
    let mount_took = t.elapsed();
    let s = d.stats();
    assert!(s.offline, "{s:?}");
    // The tree is all there (metadata from the cache) and local data reads right.
    assert_eq!(
        fs::metadata(mnt.join("sub/never-read")).unwrap().len(),
        300_000
    );
    assert_eq!(
        fs::read(mnt.join("read-before")).unwrap(),
        fs::read(tree.join("read-before")).unwrap()
    );
    // A miss fails fast with EIO.
    let (r, took) = timed_read(&mnt.join("sub/never-read"));
    assert_eq!(r.err(), Some(Some(libc::EIO)));
    assert!(took < Duration::from_secs(1), "the miss took {took:?}");
    d.unmount();
    let logged = fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("mounting offline") && logged.contains(&server.url()),
        "the log should name the source and say it is offline:\n{logged}"
    );
    eprintln!(
        "offline: mounted in {:.2} s with the server gone; local reads right; a miss EIO in {:.3} s",
        mount_took.as_secs_f64(),
        took.as_secs_f64()
    );
}
