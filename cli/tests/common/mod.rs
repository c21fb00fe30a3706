//! What the CLI tests share: the `incfs` binary under test, and a check that a run of it
//! succeeded that shows its output when it did not.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The `incfs` binary this test run built. Its per-user cache (used by `run` and `mount`
/// without `--cache`) is under the target directory, not the machine's: tests that need a
/// cold start pass a fresh `--cache`.
pub fn incfs() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_incfs"));
    cmd.env(
        "INCFS_CACHE",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("incfs-cache"),
    );
    cmd
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
