#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| incfs_fuzz::chunk(data));
