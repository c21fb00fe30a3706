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
