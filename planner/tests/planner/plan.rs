//! The planner on synthetic traces with known answers.

use std::path::PathBuf;

use crate::common::*;
use incfs_fs::format::Digest;
use incfs_fs::plan::PrefetchPlan;
use incfs_planner::PlannerError;
use incfs_planner::image_index::ImageIndex;
use incfs_planner::input::load_input;
use incfs_planner::pipeline::{MappedRun, MinRuns, PlanOptions, PlanStats, map_run, plan_runs};
use incfs_planner::report::report;
use incfs_planner::timeline::draw_timeline;
use incfs_planner::trace::EventKind;

const A: &str = "/rec/root/lib/liba.so";
const B: &str = "/rec/root/lib/libb.so";
const APP: &str = "/rec/root/bin/app";

fn load(fx: &Fixture, inputs: &[PathBuf], opts: &PlanOptions) -> (ImageIndex, Vec<MappedRun>) {
    let index = ImageIndex::open(&fx.image, None).unwrap();
    let runs = inputs
        .iter()
        .map(|p| {
            let raw = load_input(p, index.chunk_size, opts.touch).unwrap();
            map_run(&raw, &index, opts).unwrap()
        })
        .collect();
    (index, runs)
}

fn plan(fx: &Fixture, inputs: &[PathBuf], opts: &PlanOptions) -> (PrefetchPlan, PlanStats) {
    let (index, runs) = load(fx, inputs, opts);
    let refs: Vec<&MappedRun> = runs.iter().collect();
    plan_runs(&refs, &index, opts).unwrap()
}

/// (file, first_chunk, chunk_count) of each entry.
fn ranges(p: &PrefetchPlan) -> Vec<(&str, u64, u64)> {
    p.entries
        .iter()
        .map(|e| (e.file.as_str(), e.first_chunk, e.chunk_count))
        .collect()
}

fn no_merge() -> PlanOptions {
    PlanOptions {
        merge_window_ns: 0,
        ..PlanOptions::default()
    }
}

#[test]
fn orders_by_median_first_touch() {
    let fx = fixture();
    let d = fx.dir.path();
    // liba chunk 0: 10, 20, 1000 ms (median 20). libb chunk 5: 15, 16, 17 (median 16).
    // app chunk 2: 1, 500, 600 (median 500).
    let runs = [
        (10.0, 15.0, 1.0),
        (20.0, 16.0, 500.0),
        (1000.0, 17.0, 600.0),
    ];
    let inputs: Vec<PathBuf> = runs
        .iter()
        .enumerate()
        .map(|(i, &(a, b, app))| {
            write(
                d,
                &format!("t{i}.parquet"),
                &meta(),
                &[
                    fault(a, A, 0),
                    fault(b, B, 5 * PPC + 3),
                    fault(app, APP, 2 * PPC),
                ],
            )
        })
        .collect();
    let (p, stats) = plan(&fx, &inputs, &no_merge());
    assert_eq!(
        ranges(&p),
        [
            ("lib/libb.so", 5, 1),
            ("lib/liba.so", 0, 1),
            ("bin/app", 2, 1)
        ]
    );
    let offsets: Vec<f64> = p.entries.iter().map(|e| e.offset_ms).collect();
    assert_eq!(offsets, [16.0, 20.0, 500.0]);
    assert!(p.entries.iter().all(|e| e.confidence == 1.0));
    assert_eq!(
        (stats.runs, stats.touched_chunks, stats.planned_chunks),
        (3, 3, 3)
    );
    let index = ImageIndex::open(&fx.image, None).unwrap();
    assert_eq!(p.image_digest, index.digest.to_hex());
    assert_eq!(p.chunk_size, CS as u32);
}

#[test]
fn min_runs_filters_rare_chunks() {
    let fx = fixture();
    let d = fx.dir.path();
    // liba chunk 1 in all three runs, chunk 3 in two, chunk 5 in one.
    let t = |name: &str, pages: &[u64]| {
        let ev: Vec<_> = pages.iter().map(|&c| fault(c as f64, A, c * PPC)).collect();
        write(d, name, &meta(), &ev)
    };
    let inputs = vec![
        t("a.parquet", &[1, 3, 5]),
        t("b.parquet", &[1, 3]),
        t("c.parquet", &[1]),
    ];
    let chunks = |min_runs| {
        let opts = PlanOptions {
            min_runs,
            ..no_merge()
        };
        let (p, _) = plan(&fx, &inputs, &opts);
        p.entries.iter().map(|e| e.first_chunk).collect::<Vec<_>>()
    };
    assert_eq!(
        chunks(MinRuns::default()),
        [1, 3],
        "default: half the runs, rounded up = 2"
    );
    assert_eq!(chunks(MinRuns::Count(1)), [1, 3, 5]);
    assert_eq!(chunks(MinRuns::Count(3)), [1]);
    assert_eq!(
        chunks(MinRuns::Count(9)),
        [1],
        "a count above the runs means all runs"
    );
    assert_eq!(chunks(MinRuns::Fraction(1.0)), [1]);
    assert_eq!(chunks(MinRuns::Fraction(0.33)), [1, 3, 5]);
    assert_eq!(
        chunks(MinRuns::Fraction(0.34)),
        [1, 3],
        "0.34 of 3 rounds up to 2"
    );
    let (p, _) = plan(
        &fx,
        &inputs,
        &PlanOptions {
            min_runs: MinRuns::Count(1),
            ..no_merge()
        },
    );
    let conf: Vec<f64> = p
        .entries
        .iter()
        .map(|e| (e.confidence * 3.0).round())
        .collect();
    assert_eq!(conf, [3.0, 2.0, 1.0]);
}

#[test]
fn min_runs_parses_counts_and_shares() {
    assert_eq!(MinRuns::parse("2"), Ok(MinRuns::Count(2)));
    assert_eq!(MinRuns::parse("0.5"), Ok(MinRuns::Fraction(0.5)));
    assert_eq!(MinRuns::parse("75%"), Ok(MinRuns::Fraction(0.75)));
    assert_eq!(MinRuns::parse("1.0"), Ok(MinRuns::Fraction(1.0)));
    for bad in ["0", "0.0", "1.5", "150%", "x", "-1"] {
        assert!(MinRuns::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(MinRuns::Fraction(0.5).needed(3), 2);
    assert_eq!(MinRuns::Fraction(0.5).needed(1), 1);
    assert_eq!(MinRuns::Fraction(0.01).needed(4), 1);
}

#[test]
fn merges_adjacent_chunks_close_in_time() {
    let fx = fixture();
    let d = fx.dir.path();
    let ev = [
        fault(1.0, A, 0),
        fault(2.0, A, PPC),          // chunk 1
        fault(3.0, A, 2 * PPC + 15), // chunk 2
        fault(900.0, A, 3 * PPC),    // chunk 3: 900 ms later, a range of its own
        fault(2.5, A, 5 * PPC),      // chunk 5: not adjacent
        fault(2.2, B, 3 * PPC),      // libb chunk 3..=4 by one fault range spanning two chunks
        touch(2.3, EventKind::GetPages, B, 4 * PPC - 1, 2),
    ];
    let inputs = vec![write(d, "t.parquet", &meta(), &ev)];
    let (p, _) = plan(&fx, &inputs, &PlanOptions::default());
    assert_eq!(
        ranges(&p),
        [
            ("lib/liba.so", 0, 3),
            ("lib/libb.so", 3, 2),
            ("lib/liba.so", 5, 1),
            ("lib/liba.so", 3, 1),
        ]
    );
    assert_eq!(p.entries[0].offset_ms, 1.0);
    assert_eq!(p.entries[1].offset_ms, 2.2);
    // Without merging every chunk is its own entry.
    let (p, _) = plan(&fx, &inputs, &no_merge());
    assert_eq!(p.entries.len(), 7);
}

#[test]
fn budget_cuts_in_order_and_counts_shared_chunks_once() {
    let fx = fixture();
    let d = fx.dir.path();
    let index = ImageIndex::open(&fx.image, None).unwrap();
    let a = index.lookup("lib/liba.so").unwrap();
    let one = u64::from(index.stored(a, 0).unwrap().1);
    // liba chunks 0..4 then dup.so chunks 0..4 (same stored chunks), then libb 0..4.
    let mut ev = vec![];
    for c in 0..4 {
        ev.push(fault(c as f64, A, c * PPC));
        ev.push(fault(10.0 + c as f64, "/rec/root/lib/dup.so", c * PPC));
        ev.push(fault(20.0 + c as f64, B, c * PPC));
    }
    let inputs = vec![write(d, "t.parquet", &meta(), &ev)];
    let opts = PlanOptions {
        merge_window_ns: 5_000_000,
        ..PlanOptions::default()
    };
    let (full, _) = plan(&fx, &inputs, &opts);
    assert_eq!(
        ranges(&full),
        [
            ("lib/liba.so", 0, 4),
            ("lib/dup.so", 0, 4),
            ("lib/libb.so", 0, 4)
        ]
    );
    let b0 = index.lookup("lib/libb.so").unwrap();
    let b_bytes: u64 = (0..4)
        .map(|c| u64::from(index.stored(b0, c).unwrap().1))
        .sum();
    let a_bytes: u64 = (0..4)
        .map(|c| u64::from(index.stored(a, c).unwrap().1))
        .sum();
    assert_eq!(full.total_bytes, a_bytes + b_bytes, "dup.so costs nothing");

    let max = a_bytes + one + one / 2;
    let (cut, stats) = plan(
        &fx,
        &inputs,
        &PlanOptions {
            max_bytes: Some(max),
            ..opts.clone()
        },
    );
    assert!(stats.cut_by_budget);
    assert!(cut.total_bytes <= max);
    assert_eq!(
        ranges(&cut),
        [
            ("lib/liba.so", 0, 4),
            ("lib/dup.so", 0, 4),
            ("lib/libb.so", 0, 1)
        ]
    );
    let (none, _) = plan(
        &fx,
        &inputs,
        &PlanOptions {
            max_bytes: Some(one - 1),
            ..opts
        },
    );
    assert!(none.entries.is_empty());
    assert_eq!(none.total_bytes, 0);
}

#[test]
fn strips_prefixes_and_counts_unknown_paths() {
    let fx = fixture();
    let d = fx.dir.path();
    let mut m = meta();
    m.roots = vec![];
    let ev = [
        fault(1.0, "/elsewhere/tree/lib/liba.so", 0),
        fault(2.0, "/elsewhere/tree/lib/link.so", 0), // a hard link's other name
        fault(3.0, "/elsewhere/tree/lib/missing.so", 0),
        fault(4.0, "/elsewhere/tree/lib/missing.so", PPC),
        fault(5.0, "/usr/lib/libc.so.6", 0),
        fault(6.0, "/elsewhere/tree/bin/app", 1000 * PPC), // past the end of the file
    ];
    let inputs = vec![write(d, "t.parquet", &m, &ev)];
    let opts = PlanOptions {
        strip_prefixes: vec!["/elsewhere/tree/".into()],
        ..no_merge()
    };
    let (p, stats) = plan(&fx, &inputs, &opts);
    assert_eq!(ranges(&p), [("lib/liba.so", 0, 1), ("lib/libb.so", 0, 1)]);
    assert_eq!(stats.unknown_paths, 2);
    assert_eq!(stats.unknown_ranges, 3);
    assert_eq!(
        stats.unknown_examples,
        ["lib/missing.so", "usr/lib/libc.so.6"]
    );
    assert_eq!(stats.past_eof, 1);
    // Without the prefix nothing matches.
    let (p, stats) = plan(&fx, &inputs, &no_merge());
    assert!(p.entries.is_empty());
    assert_eq!(stats.unknown_paths, 5);
}

#[test]
fn uses_the_recorded_roots_by_default() {
    let fx = fixture();
    let inputs = vec![write(
        fx.dir.path(),
        "t.parquet",
        &meta(),
        &[fault(1.0, A, 0)],
    )];
    let (p, stats) = plan(&fx, &inputs, &no_merge());
    assert_eq!(ranges(&p), [("lib/liba.so", 0, 1)]);
    assert_eq!(stats.unknown_paths, 0);
}

#[test]
fn map_pages_count_only_when_asked() {
    let fx = fixture();
    let ev = [
        fault(1.0, A, 0),
        touch(1.1, EventKind::MapPages, A, 1, 2 * PPC as u32),
        touch(1.2, EventKind::Open, A, 0, 0),
        touch(1.3, EventKind::AddToCache, B, 0, 1),
    ];
    let inputs = vec![write(fx.dir.path(), "t.parquet", &meta(), &ev)];
    let (p, _) = plan(&fx, &inputs, &no_merge());
    assert_eq!(ranges(&p), [("lib/liba.so", 0, 1)]);
    let mut opts = no_merge();
    opts.touch.map_pages = true;
    let (p, _) = plan(&fx, &inputs, &opts);
    // Chunks 1 and 2 come from one event, so they share a first touch and merge.
    assert_eq!(ranges(&p), [("lib/liba.so", 0, 1), ("lib/liba.so", 1, 2)]);
}

#[test]
fn read_log_is_an_input() {
    let fx = fixture();
    let d = fx.dir.path();
    let log = d.join("read-log");
    let cs = CS;
    std::fs::write(
        &log,
        format!(
            "{{\"ns\":5000000,\"path\":\"lib/libb.so\",\"offset\":{},\"len\":{},\"result\":\"miss\"}}\n\
             \n\
             {{\"ns\":1000000,\"path\":\"bin/app\",\"offset\":0,\"len\":4096,\"result\":\"hit\"}}\n\
             {{\"ns\":9000000,\"path\":\"bin/app\",\"offset\":10,\"len\":0,\"result\":\"hit\"}}\n\
             {{\"ns\":2000000,\"path\":\"bin/app\",\"offset\":100,\"len\":3",
            2 * cs - 1,
            2
        ),
    )
    .unwrap();
    let trace = write(
        d,
        "t.parquet",
        &meta(),
        &[fault(3.0, APP, 0), fault(4.0, B, 2 * PPC)],
    );
    let (p, stats) = plan(
        &fx,
        &[log.clone(), trace],
        &PlanOptions {
            min_runs: MinRuns::Count(2),
            ..no_merge()
        },
    );
    // The cut last line is skipped; the zero-length read touches nothing.
    assert_eq!(ranges(&p), [("bin/app", 0, 1), ("lib/libb.so", 2, 1)]);
    assert_eq!(
        p.entries[0].offset_ms, 1.5,
        "median of 0 ms (the read-log's first read, at 1 ms on the mount's clock) and 3 ms"
    );
    assert_eq!(stats.touched_chunks, 3);

    // A bad line in the middle is an error naming the file and line.
    std::fs::write(
        &log,
        "{\"ns\":1,\"path\":\"bin/app\",\"offset\":0,\"len\":1}\n{\"ns\":\"x\"}\n{}\n",
    )
    .unwrap();
    let e = load_input(&log, CS as u32, Default::default()).unwrap_err();
    assert!(matches!(e, PlannerError::ReadLog { line: 2, .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("{}:2", log.display())),
        "{e}"
    );
}

#[test]
fn inputs_that_are_neither_are_named() {
    let fx = fixture();
    let d = fx.dir.path();
    for (name, body) in [
        ("empty", &b""[..]),
        ("text", b"hello\n"),
        ("half.parquet", b"PAR1\x00\x01"),
    ] {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        let e = load_input(&p, CS as u32, Default::default()).unwrap_err();
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }
}

#[test]
fn wrong_image_digest_is_refused() {
    let fx = fixture();
    let wrong = Digest([7; 32]);
    let e = ImageIndex::open(&fx.image, Some(&wrong)).unwrap_err();
    assert!(
        e.to_string().contains(&fx.image.display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("digest"), "{e}");
    // A saved plan refuses another image.
    let inputs = vec![write(
        fx.dir.path(),
        "t.parquet",
        &meta(),
        &[fault(1.0, A, 0)],
    )];
    let (p, _) = plan(&fx, &inputs, &no_merge());
    let plan_path = fx.dir.path().join("plan.json.zst");
    p.save(&plan_path).unwrap();
    let back = PrefetchPlan::load(&plan_path).unwrap();
    assert_eq!(back, p);
    let e = back.check_image(&plan_path, &wrong).unwrap_err();
    assert!(e.to_string().contains("plan.json.zst"), "{e}");
}

#[test]
fn report_scores_leave_one_out_and_draws() {
    let fx = fixture();
    let d = fx.dir.path();
    // Three runs touching the same 4 chunks late enough that a fast link wins every race;
    // run c also touches a chunk nobody else does.
    let base = |extra: bool| {
        let mut ev: Vec<_> = (0..4)
            .map(|c| fault(100.0 + c as f64 * 100.0, A, c * PPC))
            .collect();
        if extra {
            ev.push(fault(50.0, B, 0));
        }
        ev
    };
    let inputs = vec![
        write(d, "a.parquet", &meta(), &base(false)),
        write(d, "b.parquet", &meta(), &base(false)),
        write(d, "c.parquet", &meta(), &base(true)),
    ];
    let opts = PlanOptions {
        min_runs: MinRuns::Count(2),
        ..no_merge()
    };
    let (index, runs) = load(&fx, &inputs, &opts);
    let refs: Vec<&MappedRun> = runs.iter().collect();
    let (p, _) = plan_runs(&refs, &index, &opts).unwrap();
    assert_eq!(p.entries.len(), 4, "libb chunk 0 is in 1 of 3 runs");

    let fast = report(&p, &index, &runs, &opts, 1e9).unwrap();
    assert_eq!(fast.leave_one_out.len(), 3);
    assert_eq!(fast.leave_one_out[0].hit_rate, 1.0);
    assert_eq!(fast.leave_one_out[0].overfetch, 0.0);
    let c = &fast.leave_one_out[2];
    assert_eq!(
        (c.touched_chunks, c.hits),
        (5, 4),
        "the extra chunk is a miss"
    );
    assert_eq!(fast.self_scores[0].plan_bytes, p.total_bytes);
    assert!(
        fast.plan_share > 0.0 && fast.plan_share < 0.2,
        "{}",
        fast.plan_share
    );
    assert!(fast.loo_hit_rate.unwrap() > 0.9);

    // At 100 kB/s the first 64 KiB chunk arrives after ~655 ms, later than any touch.
    let slow = report(&p, &index, &runs, &opts, 1e5).unwrap();
    assert_eq!(slow.leave_one_out[0].hits, 0);
    assert_eq!(slow.leave_one_out[0].overfetch, 0.0);

    let svg = d.join("timeline.svg");
    draw_timeline(&svg, &index, &runs, &p, 1e7).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("liba.so"),
        "{}",
        &text[..200.min(text.len())]
    );
}

#[test]
fn one_run_has_no_leave_one_out() {
    let fx = fixture();
    let inputs = vec![write(
        fx.dir.path(),
        "t.parquet",
        &meta(),
        &[fault(1.0, A, 0)],
    )];
    let opts = no_merge();
    let (index, runs) = load(&fx, &inputs, &opts);
    let (p, _) = plan_runs(&[&runs[0]], &index, &opts).unwrap();
    let r = report(&p, &index, &runs, &opts, 1e9).unwrap();
    assert!(r.leave_one_out.is_empty());
    assert_eq!(r.loo_hit_rate, None);
    assert_eq!(r.self_scores[0].coverage, 1.0);
}
