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
