//! Workloads for incfs tests and benchmarks.
