#![no_main]

#[path = "../trace_harness.rs"]
mod trace_harness;

libfuzzer_sys::fuzz_target!(
    // libfuzzer-sys's panic hook aborts on any panic, even one caught; the trace loader
    // catches the Parquet reader's panics on purpose (`planner::trace::guard_panics`), so the
    // hook is replaced by a silent one. A panic that escapes the loader still aborts the run
    // (libfuzzer-sys checks every input's result); replay its input with
    // `cargo test -p incfs-planner --test fuzz_corpus` to see the message.
    init: {
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| trace_harness::trace(data)
);
