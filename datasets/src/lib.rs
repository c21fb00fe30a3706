//! Workloads for incfs tests and benchmarks: recipes that build trees, and the checks that
//! privileged tests run before they start.

pub mod nginx;
pub mod require;
pub mod synth;
pub mod trees;
