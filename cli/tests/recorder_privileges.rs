//! The recorder refuses to run without the privileges eBPF tracing needs, before it starts
//! the command, with a message that says what is missing.

use std::os::unix::process::CommandExt;
use std::process::Command;

use incfs_datasets::require::{Need, require};

#[test]
fn record_trace_refuses_an_unprivileged_user_before_running_anything() {
    // Root is needed to become another user.
    if !require(
        "record_trace_refuses_an_unprivileged_user_before_running_anything",
        &[Need::Root],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let marker = dir.path().join("ran");
    let trace = dir.path().join("t.parquet");
    let out = Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(["record-trace", "-o"])
        .arg(&trace)
        .args(["--", "touch"])
        .arg(&marker)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "recorded as nobody: {stderr}");
    assert!(stderr.contains("recording needs root"), "{stderr}");
    assert!(!marker.exists(), "the command ran");
    assert!(!trace.exists(), "a trace was written");
}
