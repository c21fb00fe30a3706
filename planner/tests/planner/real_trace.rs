//! A real trace: two cold starts of `clang -c hello.c` recorded with the eBPF recorder,
//! planned against an image of the clang tree (needs root, BPF and clang-22).

use std::ffi::OsString;
use std::path::Path;

use incfs_datasets::require::{Need, require};
use incfs_datasets::trees::{self, Workload};
use incfs_fs::format::{PackOptions, pack_dir};
use incfs_planner::image_index::ImageIndex;
use incfs_planner::input::load_input;
use incfs_planner::pipeline::{MappedRun, PlanOptions, map_run, plan_runs};
use incfs_planner::report::report;
use incfs_planner::summary::summarize;
use incfs_planner::timeline::draw_timeline;
use incfs_planner::trace::read_trace;
use incfs_recorder::{RecordOptions, record};

#[test]
fn clang_cold_traces_plan_a_small_share_of_the_image() {
    if !require(
        "clang_cold_traces_plan_a_small_share_of_the_image",
        &[Need::Root, Need::Bpf, Need::Clang],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = trees::shared(Workload::Clang, Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let image = tmp.path().join("clang.img");
    pack_dir(&tree, &image, &PackOptions::default(), &()).unwrap();

    let mut traces = Vec::new();
    for i in 0..2 {
        let mut opts = RecordOptions::new(vec![
            tree.join("bin/clang").into(),
            OsString::from("-c"),
            tree.join("hello.c").into(),
            OsString::from("-o"),
            tmp.path().join("hello.o").into(),
        ]);
        opts.roots = vec![tree.clone()];
        opts.cold = true;
        let rec = record(&opts).unwrap();
        assert_eq!(rec.exit_code(), 0, "clang failed under the recorder");
        let p = tmp.path().join(format!("run{i}.parquet"));
        rec.write(&p).unwrap();
        traces.push(p);
    }

    // trace show's summary: clang and its two big libraries are there, touched.
    let (meta, df) = read_trace(&traces[0]).unwrap();
    let s = summarize(&meta, &df).unwrap();
    let llvm = s
        .files
        .iter()
        .find(|f| f.path.ends_with("lib/libLLVM.so.22.1"))
        .expect("libLLVM in the trace");
    assert!(llvm.pages > 10, "libLLVM: {} pages", llvm.pages);

    let index = ImageIndex::open(&image, None).unwrap();
    let opts = PlanOptions::default();
    let runs: Vec<MappedRun> = traces
        .iter()
        .map(|p| {
            map_run(
                &load_input(p, index.chunk_size, opts.touch).unwrap(),
                &index,
                &opts,
            )
            .unwrap()
        })
        .collect();
    let refs: Vec<&MappedRun> = runs.iter().collect();
    let (plan, stats) = plan_runs(&refs, &index, &opts).unwrap();
    assert_eq!(
        stats.unknown_paths, 0,
        "paths under the root map onto the image: {stats:?}"
    );
    assert!(plan.entries.iter().any(|e| e.file == "lib/libLLVM.so.22.1"));
    assert!(plan.entries.iter().any(|e| e.file == "bin/clang"));
    assert!(plan.total_bytes > 0);
    assert!(
        plan.total_bytes < index.stored_bytes / 4,
        "plan {} of image {} bytes",
        plan.total_bytes,
        index.stored_bytes
    );
    for w in plan.entries.windows(2) {
        assert!(w[0].offset_ms <= w[1].offset_ms);
    }
    let plan_path = tmp.path().join("plan.json");
    plan.save(&plan_path).unwrap();

    let r = report(&plan, &index, &runs, &opts, 12.5e6).unwrap();
    assert_eq!(r.leave_one_out.len(), 2);
    for s in &r.self_scores {
        assert_eq!(s.coverage, 1.0, "a plan from both runs covers each of them");
    }
    for s in &r.leave_one_out {
        assert!(s.coverage > 0.5, "leave-one-out coverage {}", s.coverage);
    }
    let svg = tmp.path().join("timeline.svg");
    draw_timeline(&svg, &index, &runs, &plan, 12.5e6).unwrap();
    assert!(std::fs::metadata(&svg).unwrap().len() > 1000);
}
