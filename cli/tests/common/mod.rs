//! What the CLI tests share: the `incfs` binary under test, and a check that a run of it
//! succeeded that shows its output when it did not.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The `incfs` binary this test run built. Each command gets a per-user cache of its own
/// (what `run` and `mount` use without `--cache`), fresh and under the target directory, so
/// every start is cold unless the test passes a `--cache` to share.
pub fn incfs() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_incfs"));
    cmd.env("INCFS_CACHE", fresh_cache_root());
    cmd
}

/// `CARGO_TARGET_TMPDIR/incfs-cache-PID-N`, new for each call; the ones left by test
/// processes that are gone are removed at the first call.
fn fresh_cache_root() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let pid = std::process::id();
    if NEXT.fetch_add(1, Ordering::Relaxed) == 0 {
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix("incfs-cache-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if owner
                .is_some_and(|p| p != pid && !std::path::Path::new(&format!("/proc/{p}")).exists())
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tmp.join(format!(
        "incfs-cache-{pid}-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// `out`, after asserting that its command exited 0 (printing its status and output if not).
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `files` source-like text files of ~300 KB in `dir` (`f00.rs`, …): text that compresses
/// better in large frames than 4 KiB at a time, as the bulk sidecar's frames do.
pub fn text_tree(dir: &std::path::Path, files: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..files {
        let mut text = String::new();
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while text.len() < 300_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(
                ["fn ", "let ", "match ", "self.", "return ", "Ok(()) "][(x % 6) as usize],
            );
            text.push_str(&format!("v{} ", x % 500));
        }
        std::fs::write(dir.join(format!("f{i:02}.rs")), text).unwrap();
    }
}

/// A `sh -c` script for `incfs run`: reads one file, waits (up to 20 s) for the background
/// fill to finish, then prints the checksum of every `f*.rs` file of the mount.
pub const FILL_THEN_CKSUM: &str = "cat {mnt}/f00.rs > /dev/null; \
    for i in $(seq 400); do grep -Eq '\"done\": ?true' {mnt}/.incfs/stats && break; sleep 0.05; done; \
    cat {mnt}/f*.rs | cksum";

/// Checks a run of [`FILL_THEN_CKSUM`] over an image of `tree` (a [`text_tree`]) whose
/// `--stats-json` went to `stats_json`: every byte came right, the fill finished, took most
/// chunks from the bulk sidecar, and moved fewer bytes than the image's `image_bytes`.
pub fn assert_filled_from_bulk(
    out: &Output,
    tree: &std::path::Path,
    stats_json: &std::path::Path,
    image_bytes: u64,
) {
    let want = Command::new("sh")
        .arg("-c")
        .arg(format!("cat {}/f*.rs | cksum", tree.display()))
        .output()
        .unwrap();
    assert_eq!(out.stdout, want.stdout, "every byte read through the mount");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(stats_json).unwrap()).unwrap();
    let s = &j["stats"];
    assert_eq!(s["fill"]["done"], serde_json::json!(true), "{s}");
    let (from_bulk, total) = (
        s["chunks_from_bulk"].as_u64().unwrap(),
        s["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        from_bulk * 2 > total,
        "{from_bulk} of {total} chunks from the sidecar: {s}"
    );
    assert!(
        s["bytes_fetched"].as_u64().unwrap() < image_bytes,
        "the fill moved fewer bytes than the image holds ({image_bytes}): {s}"
    );
}
