#![no_main]

#[path = "../trace_harness.rs"]
mod trace_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| trace_harness::trace(data));
