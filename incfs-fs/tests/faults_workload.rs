//! Fault injection under a real workload: a real program (a copy of `sha256sum`, started by
//! a shell script, both on the mount) hashes a tree read through a mount served by
//! `incfs serve` with 15 % of its responses faulted (resets, stalls, 5xx, short bodies,
//! flipped bits, in a seeded mix). Its output is exactly right or it fails with EIO; the
//! daemon survives; and once the data is local, the workload runs right with the server
//! gone.
//!
//! `INCFS_FAULT_SEED` (default 7) picks the faults' random sequence.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use incfs_datasets::require::{Need, require};
use incfs_fs::format::{PackOptions, pack_dir};
use incfs_fs::link::{FaultConfig, FaultKind};
use incfs_fs::serve::{ServeConfig, Server};

use common::daemon::{Daemon, drop_caches};

#[test]
#[ignore = "helper: run by the fault workload as its FUSE daemon"]
fn daemon_child() {
    common::daemon::child();
}

/// The workload: the script on `root` runs the `sha256sum` on `root` over every data file.
fn workload(root: &Path) -> Output {
    Command::new("/bin/sh")
        .arg(root.join("run.sh"))
        .arg(root)
        .output()
        .unwrap()
}

/// What one run of the workload on the mount came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Right,
    Eio,
}

fn judge(out: &Output, want: &[u8]) -> Outcome {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(
            out.stdout == want,
            "the program printed other hashes:\n{}\nwant:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(want)
        );
        assert!(stderr.is_empty(), "{stderr}");
        Outcome::Right
    } else if stderr.contains("Input/output error") || out.status.signal() == Some(libc::SIGBUS) {
        // Whatever it printed before failing must be right: lines of the wanted output.
        let want = String::from_utf8_lossy(want);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            assert!(want.lines().any(|w| w == line), "wrong line: {line}");
        }
        Outcome::Eio
    } else {
        panic!("the workload failed otherwise: {}: {stderr}", out.status);
    }
}

#[test]
fn a_real_program_over_a_faulty_server_is_right_or_gets_eio() {
    if !require(
        "a_real_program_over_a_faulty_server_is_right_or_gets_eio",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let seed = std::env::var("INCFS_FAULT_SEED")
        .ok()
        .map_or(7, |s| s.parse().expect("INCFS_FAULT_SEED"));
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::create_dir_all(tree.join("data")).unwrap();
    let sha = fs::read("/usr/bin/sha256sum").expect("coreutils sha256sum");
    fs::write(tree.join("bin/sha256sum"), sha).unwrap();
    fs::set_permissions(
        tree.join("bin/sha256sum"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::write(
        tree.join("run.sh"),
        "set -e\ncd \"$1/data\"\n\"$1/bin/sha256sum\" *\n",
    )
    .unwrap();
    for i in 0..12u64 {
        let len = (1 << 20) + (i as usize) * 100_003;
        let data = if i % 3 == 0 {
            format!("line {i} of a compressible file\n")
                .repeat(len / 30)
                .into_bytes()
        } else {
            common::noise(len, 100 + i)
        };
        fs::write(tree.join(format!("data/file-{i:02}")), data).unwrap();
    }
    let want = workload(&tree);
    assert!(want.status.success(), "{want:?}");
    let want = want.stdout;

    let img = dir.path().join("img");
    let opts = PackOptions {
        chunk_size: 16 * 1024,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img, &opts, &()).unwrap();
    let mut cfg = ServeConfig::new(&img);
    cfg.link.faults = FaultConfig {
        rate: 0.15,
        seed,
        kinds: FaultKind::ALL.to_vec(),
        stall_ms: 300,
    };
    let server = Server::start(cfg).unwrap();

    // Four mounts with fresh caches; on each, the workload runs until it has once come out
    // right (each run leaves more chunks local). Each daemon must survive and exit cleanly.
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mut outcomes = Vec::new();
    let mut fetch_errors = 0;
    let mut d = None;
    for round in 0..4 {
        if let Some(prev) = d.take() {
            Daemon::unmount(prev);
        }
        let cache = dir.path().join(format!("cache{round}"));
        let mut daemon = Daemon::start(&server.url("img"), &mnt, &cache, None);
        for _ in 0..10 {
            let o = judge(&workload(&mnt), &want);
            assert!(daemon.is_running(), "the daemon died");
            outcomes.push(o);
            if outcomes.last() == Some(&Outcome::Right) {
                break;
            }
        }
        assert_eq!(outcomes.last(), Some(&Outcome::Right), "{outcomes:?}");
        fetch_errors += daemon.stats().fetch_errors;
        d = Some(daemon);
    }
    let mut d = d.expect("a daemon");
    let faults = server.stats().faults;
    eprintln!("outcomes: {outcomes:?}; faults injected: {faults:?}; fetch errors: {fetch_errors}");
    assert!(
        faults.values().sum::<u64>() > 0 && fetch_errors > 0,
        "no fault reached the mounts"
    );

    // Everything the workload reads is local now: with the server gone and the page cache
    // dropped, it runs right again, and nothing is fetched.
    server.shutdown();
    drop_caches();
    let before = d.stats();
    assert_eq!(judge(&workload(&mnt), &want), Outcome::Right);
    let after = d.stats();
    assert_eq!(
        after.requests, before.requests,
        "local reads went to the source"
    );
    assert_eq!(after.read_errors, before.read_errors);
    assert!(d.is_running());
    d.unmount();
}
