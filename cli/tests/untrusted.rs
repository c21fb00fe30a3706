//! Inputs that crash a library are errors naming the file: the Parquet traces that make
//! polars-parquet abort the process (`fuzz/known-aborts/trace/`) are read first in a child
//! process, so `incfs plan` and `incfs trace show` report them instead of dying with SIGABRT.

mod common;

use common::incfs;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

#[test]
fn incfs_plan_names_a_trace_that_aborts_the_parquet_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("x"), b"x").unwrap();
    let img = tmp.path().join("img");
    let st = incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .status()
        .unwrap();
    assert!(st.success());
    let aborts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/known-aborts/trace");
    for name in [
        "crash-c266019dcab141fb11df09bcd70165b025e452a8",
        "crash-64727047cf985d60018bc76891d5c7e482932ee4",
    ] {
        let trace = aborts.join(name);
        let plan = incfs()
            .arg("plan")
            .arg(&trace)
            .arg("--image")
            .arg(&img)
            .arg("-o")
            .arg(tmp.path().join("plan.json"))
            .output()
            .unwrap();
        assert_refused("incfs plan", name, &plan);
        let show = incfs()
            .args(["trace", "show"])
            .arg(&trace)
            .output()
            .unwrap();
        assert_refused("incfs trace show", name, &show);
    }
}

/// `out` is an error (exit 2) naming the trace `name`, not a crash. The reader aborts on
/// these files, or (depending on state it keeps) reports them malformed: either way the
/// error names the file.
fn assert_refused(what: &str, name: &str, out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "{what} {name} died: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{what} {name}: {stderr}");
    assert!(stderr.contains(name), "{what} {name}: {stderr}");
}
