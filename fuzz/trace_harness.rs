//! What the `trace` fuzz target does with its input (beside `harness.rs`, in its own file
//! because only it needs the planner and polars); also included by the corpus replay test.

use std::io::Write;

/// A trace file (Parquet), read from a temporary file by the planner's loader.
pub fn trace(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    let _ = incfs_planner::trace::read_trace(file.path());
}
