//! `incfs diff` and `incfs plan carry` as a user runs them, and an update over HTTP: `incfs
//! run` of v2 with v1 cached under the same `--cache` fetches only v2's new chunks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn incfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The trees of two versions and the directory served, made under `root`.
fn version_dirs(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dirs = (root.join("t1"), root.join("t2"), root.join("served"));
    for d in [&dirs.0, &dirs.1, &dirs.2] {
        fs::create_dir_all(d).unwrap();
    }
    dirs
}

/// `incfs run --no-fill` of `url` with `cache` running `cmd` (which names `{mnt}`): checks
/// that it prints `want`; returns its `--stats-json`.
fn run_printing(
    url: &str,
    cache: &Path,
    stats: &Path,
    cmd: &[&str],
    want: &[u8],
) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(["run", "--no-fill", "--image", url, "--cache"])
        .arg(cache)
        .arg("--stats-json")
        .arg(stats)
        .arg("--")
        .args(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout == want,
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&fs::read(stats).unwrap()).unwrap()
}

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn pack(dir: &Path, img: &Path) {
    ok(incfs(&[
        "pack",
        dir.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
    ]));
}

#[test]
fn diff_then_carry_a_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    let lib = bytes(10 * 4096, 1);
    let mut lib2 = lib.clone();
    lib2[4096..8192].copy_from_slice(&bytes(4096, 2));
    fs::create_dir_all(&t1).unwrap();
    fs::create_dir_all(&t2).unwrap();
    fs::write(t1.join("lib.so"), &lib).unwrap();
    fs::write(t2.join("lib.so"), &lib2).unwrap();
    fs::write(t2.join("new.so"), bytes(3 * 4096, 3)).unwrap();
    let (v1, v2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    pack(&t1, &v1);
    pack(&t2, &v2);

    let text = ok(incfs(&["diff", v1.to_str().unwrap(), v2.to_str().unwrap()]));
    assert!(text.contains("1 changed, 1 added, 0 removed"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(incfs(&[
        "diff",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["total"]["chunks"], 13);
    assert_eq!(json["total"]["shared_chunks"], 9);
    assert_eq!(json["files"].as_array().unwrap().len(), 2);

    let plan = tmp.path().join("v1.plan.json");
    let digest = json["old_digest"].as_str().unwrap();
    fs::write(
        &plan,
        serde_json::json!({
            "version": 1, "image_digest": digest, "chunk_size": 4096, "total_bytes": 0,
            "entries": [{"file": "lib.so", "first_chunk": 0, "chunk_count": 4,
                         "offset_ms": 0.0, "confidence": 1.0}]
        })
        .to_string(),
    )
    .unwrap();
    let out = tmp.path().join("v2.plan.json");
    let text = ok(incfs(&[
        "plan",
        "carry",
        plan.to_str().unwrap(),
        "--from",
        v1.to_str().unwrap(),
        "--image",
        v2.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(
        text.contains("4 in, 3 kept, 0 moved, 1 changed, 0 dropped"),
        "{text}"
    );
    let carried: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(carried["image_digest"], json["new_digest"]);
    // The wrong old image: refused, naming what to check.
    let bad = incfs(&[
        "plan",
        "carry",
        plan.to_str().unwrap(),
        "--from",
        v2.to_str().unwrap(),
        "--image",
        v2.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("the image the plan was made for"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn a_run_of_v2_with_v1_cached_fetches_only_the_new_chunks() {
    use incfs_datasets::require::{Need, require};
    use incfs_fs::serve::{ServeConfig, Server};
    if !require(
        "a_run_of_v2_with_v1_cached_fetches_only_the_new_chunks",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2, served) = version_dirs(tmp.path());
    let lib = bytes(64 * 4096, 11);
    let mut lib2 = lib.clone();
    lib2[10 * 4096..12 * 4096].copy_from_slice(&bytes(2 * 4096, 12));
    fs::write(t1.join("lib.so"), &lib).unwrap();
    fs::write(t2.join("lib.so"), &lib2).unwrap();
    fs::write(t1.join("data"), bytes(32 * 4096, 13)).unwrap();
    fs::write(t2.join("data"), bytes(32 * 4096, 13)).unwrap();
    fs::write(t2.join("new.so"), bytes(5 * 4096, 14)).unwrap();
    let (v1, v2) = (served.join("v1.img"), served.join("v2.img"));
    pack(&t1, &v1);
    pack(&t2, &v2);
    let d: serde_json::Value = serde_json::from_str(&ok(incfs(&[
        "diff",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let server = Server::start(ServeConfig::new(&served)).unwrap();
    let cache = tmp.path().join("cache");
    let run = |img: &str, tree: &Path, stats: &Path| {
        let mut want = Vec::new();
        let mut names: Vec<_> = fs::read_dir(tree)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            want.extend(fs::read(n).unwrap());
        }
        run_printing(
            &server.url(img),
            &cache,
            stats,
            &["sh", "-c", "cat {mnt}/*"],
            &want,
        )
    };
    run("v1.img", &t1, &tmp.path().join("s1.json"));
    server.reset_stats();
    let s2 = run("v2.img", &t2, &tmp.path().join("s2.json"));
    assert_eq!(
        s2["stats"]["chunks_seeded"], d["total"]["shared_chunks"],
        "{s2}"
    );
    assert_eq!(s2["stats"]["chunks_fetched"], 2 + 5, "{s2}");
    // The server saw, past v2's metadata, exactly the stored bytes of its new chunks.
    let data_offset = {
        let img = incfs_fs::format::Image::open_path(&v2, None).unwrap();
        img.header().data_offset
    };
    let data: u64 = server
        .stats()
        .ranges
        .iter()
        .filter(|r| r.path.ends_with("v2.img") && r.start >= data_offset)
        .map(|r| r.len)
        .sum();
    let total = &d["total"];
    assert_eq!(
        data,
        total["stored_bytes"].as_u64().unwrap() - total["shared_stored_bytes"].as_u64().unwrap()
    );
}

#[test]
fn a_relayout_on_its_base_publishes_deltas_that_a_run_with_the_base_cached_uses() {
    use incfs_datasets::require::{Need, require};
    use incfs_fs::serve::{ServeConfig, Server};
    if !require(
        "a_relayout_on_its_base_publishes_deltas_that_a_run_with_the_base_cached_uses",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2, served) = version_dirs(tmp.path());
    // A rebuilt library: 100 bytes inserted near the start shift every later chunk.
    let lib = bytes(64 * 4096, 21);
    let mut lib2 = lib.clone();
    lib2.splice(5_000..5_000, bytes(100, 22));
    fs::write(t1.join("lib.so"), &lib).unwrap();
    fs::write(t2.join("lib.so"), &lib2).unwrap();
    let (v1, v2) = (served.join("v1.img"), tmp.path().join("v2.img"));
    pack(&t1, &v1);
    pack(&t2, &v2);
    let root = incfs_fs::format::Image::open_path(&v2, None)
        .unwrap()
        .root_digest();
    let plan = incfs_fs::plan::PrefetchPlan {
        version: incfs_fs::plan::PLAN_VERSION,
        image_digest: root.to_hex(),
        chunk_size: 4096,
        total_bytes: 0,
        entries: vec![incfs_fs::plan::PlanEntry {
            file: "lib.so".into(),
            first_chunk: 0,
            chunk_count: 8,
            offset_ms: 0.0,
            confidence: 1.0,
        }],
    };
    let plan_path = tmp.path().join("v2.plan.json");
    plan.save(&plan_path).unwrap();
    let hot = served.join("v2-base.img");
    let out = ok(incfs(&[
        "relayout",
        v2.to_str().unwrap(),
        "--plan",
        plan_path.to_str().unwrap(),
        "-o",
        hot.to_str().unwrap(),
        "--base",
        v1.to_str().unwrap(),
    ]));
    assert!(out.contains("deltas against --base"), "{out}");
    assert!(served.join("v2-base.img.delta").is_file());

    let server = Server::start(ServeConfig::new(&served)).unwrap();
    let cache = tmp.path().join("cache");
    let run = |img: &str, want: &[u8], stats: &Path| {
        run_printing(
            &server.url(img),
            &cache,
            stats,
            &["cat", "{mnt}/lib.so"],
            want,
        )
    };
    run("v1.img", &lib, &tmp.path().join("s1.json"));
    let s2 = run("v2-base.img", &lib2, &tmp.path().join("s2.json"));
    let s = &s2["stats"];
    assert!(s["chunks_from_deltas"].as_u64().unwrap() >= 60, "{s2}");
    // The deltas of ~64 shifted chunks of noise instead of their 256 KiB.
    assert!(s["bytes_fetched"].as_u64().unwrap() < 64 * 1024, "{s2}");
}
