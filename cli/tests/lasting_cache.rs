//! The per-user cache that lasts: `incfs run` and `incfs mount` without `--cache` keep an
//! image's chunks in `$XDG_CACHE_HOME/incfs/<root digest>/`, so the second run of an image
//! fetches no chunk (counted at the server); two mounts of one image at once share it;
//! `incfs cache gc` evicts least recently used images, never one in use.

mod common;

use common::{incfs, ok};

use std::fs;
use std::path::Path;
use std::process::Command;

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;
use incfs_fs::format::Header;
use incfs_fs::serve::{ServeConfig, Server};

/// `incfs` with the default cache resolved from `$XDG_CACHE_HOME` = `xdg`.
fn incfs_xdg(xdg: &Path) -> Command {
    let mut cmd = incfs();
    cmd.env_remove("INCFS_CACHE").env("XDG_CACHE_HOME", xdg);
    cmd
}

/// Packs `files` files of 1 MiB each (seeded by `seed`) into `dir/NAME.img`.
fn image(dir: &Path, name: &str, files: u64, seed: u64) -> std::path::PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    fs::create_dir_all(&tree).unwrap();
    for i in 0..files {
        fs::write(tree.join(format!("f{i}")), noise(1 << 20, seed * 100 + i)).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    ok(incfs()
        .args(["pack", "--chunk-size", "64K", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    img
}

fn cache_infos(xdg: &Path) -> Vec<serde_json::Value> {
    let out = ok(incfs_xdg(xdg)
        .args(["cache", "stat", "--json"])
        .output()
        .unwrap());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_second_run_of_an_image_without_cache_fetches_no_chunk() {
    if !require(
        "the_second_run_of_an_image_without_cache_fetches_no_chunk",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let xdg = tmp.path().join("xdg");
    let img = image(tmp.path(), "app", 4, 1);
    let header = Header::decode(&fs::read(&img).unwrap()).unwrap();
    let server = Server::start(ServeConfig::new(tmp.path())).unwrap();
    let url = server.url("app.img");
    let read_all = "cat {mnt}/f0 {mnt}/f1 {mnt}/f2 {mnt}/f3 | md5sum";
    let want = Command::new("sh")
        .arg("-c")
        .arg(read_all.replace("{mnt}", &tmp.path().join("app-tree").to_string_lossy()))
        .output()
        .unwrap()
        .stdout;

    let stats_json = tmp.path().join("run-stats.json");
    let run = || {
        ok(incfs_xdg(&xdg)
            .args(["run", "--no-fill", "--image", &url, "--stats-json"])
            .arg(&stats_json)
            .args(["--", "sh", "-c", read_all])
            .output()
            .unwrap())
        .stdout
    };
    assert_eq!(run(), want, "run 1 read wrong bytes");
    let first = server.stats();
    assert!(first.bytes_sent >= 4 << 20, "{first:?}");
    let infos = cache_infos(&xdg);
    assert_eq!(infos.len(), 1, "{infos:?}");
    assert_eq!(
        infos[0]["root"].as_str().unwrap(),
        header.root_digest.to_hex()
    );
    assert!(
        Path::new(infos[0]["dir"].as_str().unwrap()).starts_with(xdg.join("incfs")),
        "{infos:?}"
    );
    assert_eq!(infos[0]["clean"], true);

    server.reset_stats();
    assert_eq!(run(), want, "run 2 read wrong bytes");
    let second = server.stats();
    // Only the image's first bytes (header and manifest), read at mount to learn that the
    // URL still serves the same image: no chunk-table segment and no chunk was asked for.
    let j: serde_json::Value = serde_json::from_slice(&fs::read(&stats_json).unwrap()).unwrap();
    assert_eq!(j["requests"], 0, "{j}");
    assert_eq!(j["bytes_fetched"], 0, "{j}");
    assert!(second.range_requests <= 2, "{second:?}");
    for r in &second.ranges {
        assert!(
            r.start < header.chunk_table_offset,
            "run 2 asked for more than the image's head: {r:?}"
        );
    }
    eprintln!(
        "lasting cache: run 1 {} requests / {} bytes, run 2 {} requests / {} bytes",
        first.requests, first.bytes_sent, second.requests, second.bytes_sent
    );

    // The cap: a run of another image with a 1-byte cap leaves no image cache behind (each
    // is evicted once no mount uses it), and the default cap keeps both.
    let other = image(tmp.path(), "other", 1, 2);
    let other_url = server.url("other.img");
    ok(incfs_xdg(&xdg)
        .args(["run", "--image", &other_url, "--", "true"])
        .output()
        .unwrap());
    assert_eq!(cache_infos(&xdg).len(), 2);
    ok(incfs_xdg(&xdg)
        .args(["run", "--cache-max-size", "1", "--image", &other_url])
        .args(["--", "true"])
        .output()
        .unwrap());
    assert!(cache_infos(&xdg).is_empty());
    drop(other);
}

#[test]
fn two_mounts_of_one_image_at_once_share_its_cache() {
    if !require(
        "two_mounts_of_one_image_at_once_share_its_cache",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let xdg = tmp.path().join("xdg");
    let img = image(tmp.path(), "app", 3, 3);
    let server = Server::start(ServeConfig::new(tmp.path())).unwrap();
    let url = server.url("app.img");
    let mnts = [tmp.path().join("m1"), tmp.path().join("m2")];
    for m in &mnts {
        fs::create_dir_all(m).unwrap();
        ok(incfs_xdg(&xdg)
            .args(["mount", "--no-fill", &url])
            .arg(m)
            .output()
            .unwrap());
    }
    let umount_all = || {
        for m in &mnts {
            let _ = incfs().arg("umount").arg(m).output();
        }
    };
    let checked = std::panic::catch_unwind(|| {
        let infos = cache_infos(&xdg);
        assert_eq!(infos.len(), 1, "{infos:?}");
        assert_eq!(infos[0]["in_use"], true);
        // Both read every file right, interleaved: each stores what the other lacks.
        for i in 0..3 {
            let want = fs::read(tmp.path().join(format!("app-tree/f{i}"))).unwrap();
            for m in if i % 2 == 0 {
                [&mnts[0], &mnts[1]]
            } else {
                [&mnts[1], &mnts[0]]
            } {
                assert!(fs::read(m.join(format!("f{i}"))).unwrap() == want, "f{i}");
            }
        }
        // While both are up, gc keeps the image.
        ok(incfs_xdg(&xdg)
            .args(["cache", "gc", "--max-size", "0"])
            .output()
            .unwrap());
        assert_eq!(cache_infos(&xdg).len(), 1);
    });
    umount_all();
    checked.unwrap();
    let infos = cache_infos(&xdg);
    assert_eq!(infos[0]["in_use"], false, "{infos:?}");
    assert_eq!(infos[0]["clean"], true, "{infos:?}");
    assert_eq!(infos[0]["chunks_recorded"], infos[0]["chunks_total"]);
    let out = ok(incfs_xdg(&xdg)
        .args(["cache", "gc", "--max-size", "0", "--json"])
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["removed"].as_array().unwrap().len(), 1, "{r}");
    assert!(cache_infos(&xdg).is_empty());
    drop(img);
}
