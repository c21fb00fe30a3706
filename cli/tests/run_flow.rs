//! `incfs run` end to end, over `incfs serve` with an emulated link: a synthetic program
//! reads a known scattered sequence; a plan made from its own read-log cuts its blocked
//! reads, given with --prefetch or published beside the image; exit status is propagated; a
//! plan for another image is refused (given) or ignored (published); Ctrl-C leaves no mount
//! behind.

mod common;

use common::{incfs, ok};

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;
use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{ServeConfig, Server};

/// 16 files of 2 MiB, and a script that, after 0.4 s of "initialisation", reads 160
/// scattered 4 KiB blocks of them and prints their checksum.
fn workload(dir: &Path) -> String {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..16u64 {
        fs::write(tree.join(format!("f{i:02}")), noise(2 << 20, i + 1)).unwrap();
    }
    let mut script = String::from("sleep 0.4\n");
    for k in 0..160u64 {
        let file = (k * 7) % 16;
        let block = (k * 97) % 512;
        script.push_str(&format!(
            "dd if=\"$1/f{file:02}\" bs=4096 skip={block} count=1 status=none\n"
        ));
    }
    let path = dir.join("program.sh");
    fs::write(&path, script).unwrap();
    path.to_string_lossy().into_owned()
}

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn mounts_with(prefix: &str) -> usize {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(prefix))
        .count()
}

/// Packs a tree of one file `x` into `dir/NAME`; returns the image's path.
fn one_file_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("x"), b"x").unwrap();
    let img = dir.join(name);
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    img
}

/// What a terminal's Ctrl-C does: SIGINT to the child's whole process group.
fn ctrl_c(child: &std::process::Child) {
    let pgid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(-pgid, libc::SIGINT) }, 0);
}

#[test]
fn a_plan_from_the_programs_own_read_log_removes_its_blocked_reads() {
    if !require(
        "a_plan_from_the_programs_own_read_log_removes_its_blocked_reads",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let program = workload(tmp.path());
    let img = tmp.path().join("app.img");
    ok(incfs()
        .args(["pack", "--chunk-size", "64K", "-o"])
        .arg(&img)
        .arg(tmp.path().join("tree"))
        .output()
        .unwrap());
    let mut cfg = ServeConfig::new(&img);
    cfg.link = LinkConfig {
        latency_ms: 20,
        ..LinkConfig::default()
    };
    let server = Server::start(cfg).unwrap();
    let url = server.url("app.img");

    // The expected output, from the tree itself.
    let want = Command::new("sh")
        .arg(&program)
        .arg(tmp.path().join("tree"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(want.len(), 160 * 4096);

    // Run 1: no plan, and none of the read policy's guessing (no fill, no widened misses),
    // so every read the plan should cover blocks. Its read-log becomes the planner's input.
    let log = tmp.path().join("read-log.ndjson");
    let s1 = tmp.path().join("s1.json");
    let out = ok(incfs()
        .args(["run", "--no-fill", "--miss-amplify", "0", "--image", &url])
        .arg("--cache")
        .arg(tmp.path().join("cache-1"))
        .arg("--stats-json")
        .arg(&s1)
        .arg("--")
        .args(["sh", "-c"])
        .arg(format!(
            "sh {program} {{mnt}} && cp {{mnt}}/.incfs/read-log {}",
            log.display()
        ))
        .output()
        .unwrap());
    assert!(out.stdout == want, "run 1 read wrong bytes");
    let blocked_1 = stats(&s1)["blocked_reads"].as_u64().unwrap();
    assert!(blocked_1 >= 40, "run 1 blocked only {blocked_1} times");

    let plan = tmp.path().join("plan.json");
    ok(incfs()
        .arg("plan")
        .arg(&log)
        .arg("--image")
        .arg(&img)
        .arg("-o")
        .arg(&plan)
        .output()
        .unwrap());

    // Later runs: a fresh cache each, the same program.
    let planned_runs = |name: &str, extra: &[&str]| {
        let s = tmp.path().join(format!("{name}.json"));
        let out = ok(incfs()
            .args(["run", "--no-fill", "--miss-amplify", "0", "--image", &url])
            .args(extra)
            .arg("--cache")
            .arg(tmp.path().join(format!("cache-{name}")))
            .arg("--stats-json")
            .arg(&s)
            .args(["--", "sh", &program, "{mnt}"])
            .output()
            .unwrap());
        assert!(out.stdout == want, "{name} read wrong bytes");
        stats(&s)
    };

    // Run 2: with the plan, prefetched from mount time on.
    let j2 = planned_runs("given", &["--prefetch", plan.to_str().unwrap()]);
    let blocked_2 = j2["blocked_reads"].as_u64().unwrap();
    assert!(
        blocked_2 * 20 <= blocked_1,
        "with the plan {blocked_2} reads blocked, without it {blocked_1} (want ≤ 5%)"
    );
    assert!(j2["prefetch_hits"].as_u64().unwrap() > 0);

    // Run 3: the plan published beside the image (`incfs serve` serves APP.img.plan.json
    // next to it), no --prefetch given: used as if it had been.
    fs::copy(&plan, tmp.path().join("app.img.plan.json")).unwrap();
    let j3 = planned_runs("published", &[]);
    let blocked_3 = j3["blocked_reads"].as_u64().unwrap();
    assert!(
        blocked_3 * 20 <= blocked_1 && j3["prefetch_hits"].as_u64().unwrap() > 0,
        "with the published plan {blocked_3} reads blocked, without a plan {blocked_1}"
    );
    // Run 4: --no-plan leaves it alone.
    let j4 = planned_runs("no-plan", &["--no-plan"]);
    assert!(j4["blocked_reads"].as_u64().unwrap() >= 40, "{j4}");
    assert_eq!(j4["prefetch_hits"].as_u64().unwrap(), 0, "{j4}");
}

#[test]
fn a_lazy_run_over_http_fills_from_the_bulk_frames_pack_wrote_beside_the_image() {
    if !require(
        "a_lazy_run_over_http_fills_from_the_bulk_frames_pack_wrote_beside_the_image",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    common::text_tree(&tree, 24);
    let www = tmp.path().join("www");
    fs::create_dir_all(&www).unwrap();
    let img = www.join("app.img");
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    let image_bytes = fs::metadata(&img).unwrap().len();
    assert!(
        www.join("app.img.bulk").is_file(),
        "pack writes app.img.bulk"
    );
    let server = Server::start(ServeConfig::new(&www)).unwrap();
    let stats_json = tmp.path().join("stats.json");
    let out = ok(incfs()
        .args(["run", "--image", &server.url("app.img")])
        .arg("--cache")
        .arg(tmp.path().join("cache"))
        .arg("--stats-json")
        .arg(&stats_json)
        .args(["--", "sh", "-c", common::FILL_THEN_CKSUM])
        .output()
        .unwrap());
    common::assert_filled_from_bulk(&out, &tree, &stats_json, image_bytes);
}

#[test]
fn exit_status_is_propagated_and_other_images_plans_are_refused() {
    if !require(
        "exit_status_is_propagated_and_other_images_plans_are_refused",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let tree = tmp.path().join(name);
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("file"), format!("content of {name}")).unwrap();
        ok(incfs()
            .args(["pack", "-o"])
            .arg(tmp.path().join(format!("{name}.img")))
            .arg(&tree)
            .output()
            .unwrap());
    }
    let a = tmp.path().join("a.img");
    let out = incfs()
        .args(["run", "--image"])
        .arg(&a)
        .args(["--", "sh", "-c", "cat {mnt}/file; exit 42"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(out.stdout, b"content of a");

    // A plan for image b, used with image a.
    let log = tmp.path().join("log.ndjson");
    fs::write(
        &log,
        "{\"ns\":1,\"path\":\"file\",\"offset\":0,\"len\":4,\"result\":\"miss\"}\n",
    )
    .unwrap();
    let plan_b = tmp.path().join("b.plan.json");
    ok(incfs()
        .arg("plan")
        .arg(&log)
        .arg("--image")
        .arg(tmp.path().join("b.img"))
        .arg("-o")
        .arg(&plan_b)
        .output()
        .unwrap());
    let out = incfs()
        .args(["run", "--image"])
        .arg(&a)
        .arg("--prefetch")
        .arg(&plan_b)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("b.plan.json") && err.contains("the plan is for image"),
        "{err}"
    );

    // The same plan published beside image a: not for it, so ignored with a warning.
    fs::copy(&plan_b, tmp.path().join("a.img.plan.json")).unwrap();
    let out = incfs()
        .args(["run", "--image"])
        .arg(&a)
        .args(["--", "cat", "{mnt}/file"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(out.stdout, b"content of a");
    assert!(
        err.contains("ignoring the plan published beside the image")
            && err.contains("a.img.plan.json"),
        "{err}"
    );

    let out = incfs()
        .args(["run", "--image"])
        .arg(&a)
        .args(["--", "no-such-command-anywhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn ctrl_c_leaves_no_mount_behind() {
    if !require("ctrl_c_leaves_no_mount_behind", &[Need::Root, Need::Fuse]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = one_file_image(tmp.path(), "t.img");
    // The mount names its source (`incfs:/…/t.img`), so other tests' mounts do not count.
    let mine = img.to_string_lossy().into_owned();
    assert_eq!(mounts_with(&mine), 0);
    let mut child = incfs()
        .args(["run", "--image"])
        .arg(&img)
        .args(["--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while mounts_with(&mine) == 0 {
        assert!(Instant::now() < deadline, "the mount never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    ctrl_c(&child);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(mounts_with(&mine), 0, "a mount was left behind");
}

#[test]
fn ctrl_c_while_mounting_runs_nothing_and_leaves_no_mount() {
    if !require(
        "ctrl_c_while_mounting_runs_nothing_and_leaves_no_mount",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = one_file_image(tmp.path(), "slow.img");
    // Every request takes 1.5 s, so the mount is still reading metadata when Ctrl-C comes.
    let mut cfg = ServeConfig::new(&img);
    cfg.link = LinkConfig {
        latency_ms: 1500,
        ..LinkConfig::default()
    };
    let server = Server::start(cfg).unwrap();
    let url = server.url("slow.img");
    let marker = tmp.path().join("ran");
    let mut child = incfs()
        .args(["run", "--image", &url, "--", "touch"])
        .arg(&marker)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ctrl_c(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!marker.exists(), "the command ran after Ctrl-C");
    assert_eq!(mounts_with(&url), 0, "a mount was left behind");
}
