//! The planner's integration tests, in one binary: each test file links polars, and one
//! binary instead of five keeps a test build's `target/` about a gigabyte smaller.

mod common;
#[path = "../../../fuzz/harness.rs"]
mod harness;
#[path = "../../../fuzz/trace_harness.rs"]
mod trace_harness;

mod fuzz_corpus;
mod merge_props;
mod plan;
mod real_trace;
mod trace_file;
