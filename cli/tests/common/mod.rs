//! What the CLI tests share: the `incfs` binary under test, and a check that a run of it
//! succeeded that shows its output when it did not.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The `incfs` binary this test run built.
pub fn incfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
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
