//! How quickly `incfs run` and `incfs umount` end (root, /dev/fuse): with the fetch workers
//! in the middle of long requests over a slow link, `incfs run` returns within a second of
//! its command's exit, and `incfs umount` returns within a second once the daemon is gone.
//! A mount daemon prefetches the plan published beside its image (over HTTP and from a
//! path), and none with `--no-plan`.

mod common;

use common::{incfs, ok};

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;
use incfs_fs::format::Image;
use incfs_fs::link::LinkConfig;
use incfs_fs::plan::{PLAN_VERSION, PlanEntry, PrefetchPlan};
use incfs_fs::serve::{ServeConfig, Server};

/// A tree of 8 files of 2 MiB of noise packed into `dir/app.img`, and a plan naming all of
/// them (`dir/plan.json`).
fn image_and_plan(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..8u64 {
        fs::write(tree.join(format!("f{i}")), noise(2 << 20, i + 1)).unwrap();
    }
    let img = dir.join("app.img");
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    let image = Image::open_path(&img, None).unwrap();
    let plan = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: image.root_digest().to_hex(),
        chunk_size: image.manifest().chunk_size,
        total_bytes: 0,
        entries: image
            .files()
            .iter()
            .filter(|f| f.chunks > 0)
            .map(|f| PlanEntry {
                file: f.display_path(),
                first_chunk: 0,
                chunk_count: f.chunks,
                offset_ms: 0.0,
                confidence: 1.0,
            })
            .collect(),
    };
    let plan_path = dir.join("plan.json");
    plan.save(&plan_path).unwrap();
    (img, plan_path)
}

#[test]
fn run_returns_within_a_second_of_its_commands_exit_while_prefetch_is_mid_request() {
    if !require(
        "run_returns_within_a_second_of_its_commands_exit_while_prefetch_is_mid_request",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (img, plan) = image_and_plan(tmp.path());
    // 16 MiB at 2 Mbit/s: the plan's prefetch is far from done when the command exits, every
    // worker in a 4 MiB request that would take 16 s.
    let mut cfg = ServeConfig::new(&img);
    cfg.link = LinkConfig {
        bandwidth_mbit: Some(2.0),
        ..LinkConfig::default()
    };
    let server = Server::start(cfg).unwrap();
    let stats = tmp.path().join("stats.json");
    let t = Instant::now();
    ok(incfs()
        .args(["run", "--image", &server.url("app.img"), "--prefetch"])
        .arg(&plan)
        .arg("--cache")
        .arg(tmp.path().join("run-cache"))
        .arg("--stats-json")
        .arg(&stats)
        .args(["--", "sleep", "1"])
        .output()
        .unwrap());
    let total = t.elapsed();
    let s: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    let mount = Duration::from_secs_f64(s["mount_ms"].as_f64().unwrap() / 1e3);
    let wall = Duration::from_secs_f64(s["wall_ms"].as_f64().unwrap() / 1e3);
    let linger = total.saturating_sub(mount + wall);
    let unmount = Duration::from_secs_f64(s["unmount_ms"].as_f64().unwrap() / 1e3);
    assert!(
        unmount <= linger + Duration::from_millis(1),
        "the unmount ({unmount:?}) is part of what follows the command ({linger:?})"
    );
    eprintln!(
        "lifecycle: incfs run returned {:.2} s after its command exited (mount {:.2} s, command {:.2} s; prefetch {} of {} bytes)",
        linger.as_secs_f64(),
        mount.as_secs_f64(),
        wall.as_secs_f64(),
        s["bytes_fetched"],
        fs::metadata(&img).unwrap().len()
    );
    assert!(
        s["bytes_fetched"].as_u64().unwrap() < fs::metadata(&img).unwrap().len() / 2,
        "the prefetch should still be running: {s}"
    );
    assert!(
        linger < Duration::from_secs(1),
        "incfs run lingered {linger:?}"
    );
    server.shutdown();
}

fn fuse_mounted(mnt: &Path) -> bool {
    let m = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.contains("fuse") && l.contains(&m))
}

#[test]
fn a_mount_daemon_unmounts_on_sigterm_and_records_its_cache() {
    if !require(
        "a_mount_daemon_unmounts_on_sigterm_and_records_its_cache",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (img, _) = image_and_plan(tmp.path());
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let cache = tmp.path().join("cache");
    ok(incfs()
        .arg("mount")
        .arg(&img)
        .arg(&mnt)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap());
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(mnt.join(".incfs/stats")).unwrap()).unwrap();
    let pid = i32::try_from(stats["pid"].as_i64().unwrap()).unwrap();
    assert_eq!(fs::read(mnt.join("f0")).unwrap().len(), 2 << 20);
    let t = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    while fuse_mounted(&mnt) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    if fuse_mounted(&mnt) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&mnt)
            .status();
        panic!("the daemon did not unmount on SIGTERM");
    }
    eprintln!(
        "lifecycle: SIGTERM to unmounted in {:.2} s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(1),
        "unmount on SIGTERM took {took:?}"
    );
    // The daemon recorded its cache and marked it clean before it exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ok(incfs()
            .args(["cache", "stat", "--json"])
            .arg(&cache)
            .output()
            .unwrap());
        let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if infos[0]["clean"] == true && infos[0]["in_use"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "cache not clean: {infos}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_mount_daemon_prefetches_the_plan_published_beside_its_image() {
    if !require(
        "a_mount_daemon_prefetches_the_plan_published_beside_its_image",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (img, plan) = image_and_plan(tmp.path());
    fs::copy(&plan, tmp.path().join("app.img.plan.json")).unwrap();
    let server = Server::start(ServeConfig::new(&img)).unwrap();
    let url = server.url("app.img");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // Over HTTP (incfs serve serves APP.img.plan.json beside the image), then a path.
    for (n, (source, extra)) in [
        (url.as_str(), None),
        (img.to_str().unwrap(), None),
        (img.to_str().unwrap(), Some("--no-plan")),
    ]
    .into_iter()
    .enumerate()
    {
        ok(incfs()
            .arg("mount")
            .arg(source)
            .arg(&mnt)
            .arg("--no-fill")
            .args(extra)
            .arg("--cache")
            .arg(tmp.path().join(format!("cache-{n}")))
            .output()
            .unwrap());
        let stats: serde_json::Value =
            serde_json::from_slice(&fs::read(mnt.join(".incfs/stats")).unwrap()).unwrap();
        ok(incfs().arg("umount").arg(&mnt).output().unwrap());
        let planned = stats["prefetch"]["planned_chunks"].as_u64();
        if extra.is_some() {
            assert_eq!(planned, None, "{source} --no-plan: {stats}");
        } else {
            assert!(planned.is_some_and(|p| p >= 8 * 512), "{source}: {stats}");
        }
    }
}
