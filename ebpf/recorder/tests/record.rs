//! The recorder against the real kernel (root and BPF; skipped without them, failing under
//! `INCFS_REQUIRE_PRIVILEGED=1`).
//!
//! Files live under cargo's target tmpdir (a disk filesystem: tmpfs pages never pass through
//! the filemap tracepoints).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use incfs_datasets::require::{Need, require};
use incfs_planner::trace::{EventKind, TraceEvent};
use incfs_recorder::{RecordError, RecordOptions, Recording, StopReason, record};

const PAGE: u64 = 4096;

/// The argument that turns the `mmap_helper` test into the helper program.
const HELPER_ARG: &str = "incfs-mmap-helper=";

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("incfs-recorder-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir under CARGO_TARGET_TMPDIR")
}

/// A file of `pages` pages, each page filled with its index.
fn make_file(path: &Path, pages: u64) {
    let mut data = Vec::with_capacity((pages * PAGE) as usize);
    for i in 0..pages {
        data.extend(std::iter::repeat_n(i as u8, PAGE as usize));
    }
    std::fs::write(path, data).expect("write test file");
    // Written back, so eviction can drop the pages (dirty pages stay cached).
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("sync test file");
}

fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open to evict");
    // SAFETY: valid fd for the duration of the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "fadvise");
}

fn file_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("stat");
    (m.dev(), m.ino())
}

fn args(cmd: &[&str]) -> Vec<OsString> {
    cmd.iter().map(OsString::from).collect()
}

fn events_of<'a>(rec: &'a Recording, path: &Path) -> Vec<&'a TraceEvent> {
    let (dev, ino) = file_id(path);
    rec.events
        .iter()
        .filter(|e| e.dev == dev && e.ino == ino)
        .collect()
}

/// Pages covered by `kinds` events of `path`.
fn pages_of(rec: &Recording, path: &Path, kinds: &[EventKind]) -> BTreeSet<u64> {
    events_of(rec, path)
        .into_iter()
        .filter(|e| kinds.contains(&e.kind))
        .flat_map(|e| e.first_page..e.first_page + u64::from(e.page_count))
        .collect()
}

/// Kills and reaps a background process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dd_of_one_mib_yields_exactly_those_pages() {
    if !require("dd_of_one_mib_yields_exactly_those_pages", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let file = dir.path().join("data");
    make_file(&file, 1024);
    let input = format!("if={}", file.display());
    let rec = record(&RecordOptions::new(args(&[
        "dd",
        &input,
        "of=/dev/null",
        "bs=1M",
        "skip=2",
        "count=1",
        "status=none",
    ])))
    .expect("record dd");
    assert_eq!(rec.exit_code(), 0);
    assert_eq!(rec.stats.lost_events, 0);
    let pages = pages_of(&rec, &file, &[EventKind::GetPages]);
    let expected: BTreeSet<u64> = (512..768).collect();
    assert_eq!(pages, expected, "get_pages of dd bs=1M skip=2 count=1");
    let events = events_of(&rec, &file);
    assert!(events.iter().all(|e| e.comm == "dd"), "all by dd");
    let path = file.canonicalize().unwrap();
    assert!(
        events.iter().all(|e| e.path.as_deref() == path.to_str()),
        "resolved to {}",
        path.display()
    );
}

/// Not a test by itself: with a `incfs-mmap-helper=FILE:P1,P2,...` argument it is the
/// helper program the mmap test records (maps FILE, advises random access, reads one byte
/// of each page Pn). Without it, it returns at once.
#[test]
fn mmap_helper() {
    let Some(spec) = std::env::args().find_map(|a| a.strip_prefix(HELPER_ARG).map(str::to_owned))
    else {
        return;
    };
    let (path, pages) = spec.rsplit_once(':').expect("FILE:PAGES");
    let pages: Vec<u64> = pages.split(',').map(|p| p.parse().unwrap()).collect();
    let (_file, addr, len) = map_file(Path::new(path));
    // SAFETY: the range is the mapping just made.
    assert_eq!(unsafe { libc::madvise(addr, len, libc::MADV_RANDOM) }, 0);
    let mut sum = 0u64;
    for p in pages {
        // SAFETY: p * PAGE < len (the test picks pages inside the file).
        sum += u64::from(unsafe {
            std::ptr::read_volatile(addr.cast::<u8>().add((p * PAGE) as usize))
        });
    }
    std::hint::black_box(sum);
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(addr, len) };
}

#[test]
fn mmap_touches_fault_at_chosen_pages() {
    if !require("mmap_touches_fault_at_chosen_pages", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let file = dir.path().join("mapped");
    make_file(&file, 512);
    evict(&file);
    // Far apart (more than fault-around's 16-page window) and out of order.
    let chosen = [300u64, 7, 100, 451, 40];
    let spec = format!(
        "{HELPER_ARG}{}:{}",
        file.display(),
        chosen.map(|p| p.to_string()).join(",")
    );
    let exe = std::env::current_exe().unwrap();
    // Through sh, to keep the helper's test-harness output out of this test's.
    let helper = format!(
        "'{}' mmap_helper --exact --test-threads=1 '{spec}' > /dev/null",
        exe.display()
    );
    let rec =
        record(&RecordOptions::new(args(&["sh", "-c", &helper]))).expect("record mmap helper");
    assert_eq!(rec.exit_code(), 0);
    let faults: Vec<u64> = events_of(&rec, &file)
        .into_iter()
        .filter(|e| e.kind == EventKind::Fault)
        .map(|e| e.first_page)
        .collect();
    assert_eq!(faults, chosen.to_vec(), "faults in touch order");
}

#[test]
fn forked_children_are_followed() {
    if !require("forked_children_are_followed", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let files: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("f{i}"))).collect();
    for f in &files {
        make_file(f, 8);
    }
    let script = format!(
        "cat {a} > /dev/null; (cat {b} > /dev/null) & wait; sh -c 'cat {c} > /dev/null'",
        a = files[0].display(),
        b = files[1].display(),
        c = files[2].display()
    );
    let rec = record(&RecordOptions::new(args(&["sh", "-c", &script]))).expect("record sh");
    assert_eq!(rec.exit_code(), 0);
    let mut pids = BTreeSet::new();
    for f in &files {
        let events = events_of(&rec, f);
        assert!(
            events.iter().any(|e| e.kind == EventKind::GetPages),
            "no read of {} recorded",
            f.display()
        );
        pids.extend(events.iter().map(|e| e.pid));
    }
    assert_eq!(pids.len(), 3, "three cat processes, got pids {pids:?}");
    // The exec events name the programs run.
    let execs = rec
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Exec)
        .count();
    assert!(
        execs >= 4,
        "sh, cat, cat, sh, cat exec'd; got {execs} exec events"
    );
}

#[test]
fn unrelated_processes_are_not_recorded() {
    if !require("unrelated_processes_are_not_recorded", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let shared = dir.path().join("shared");
    let marker = dir.path().join("started");
    make_file(&shared, 64);
    // Reads the shared file in a loop, before and during the recording.
    let looping = format!(
        "touch {m}; while :; do cat {f} > /dev/null; done",
        m = marker.display(),
        f = shared.display()
    );
    let bg = KillOnDrop(
        Command::new("sh")
            .args(["-c", &looping])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn background reader"),
    );
    while !marker.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let traced = format!("cat {} > /dev/null; sleep 0.3", shared.display());
    let rec = record(&RecordOptions::new(args(&["sh", "-c", &traced]))).expect("record");
    drop(bg);
    let events = events_of(&rec, &shared);
    let pids: BTreeSet<u32> = events.iter().map(|e| e.pid).collect();
    assert_eq!(
        pids.len(),
        1,
        "only the traced cat reads the shared file; pids {pids:?}"
    );
    let reads = events
        .iter()
        .filter(|e| e.kind == EventKind::GetPages)
        .count();
    assert!(reads >= 1, "the traced cat's read is recorded");
    let traced_pids: BTreeSet<u32> = rec
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Exec)
        .map(|e| e.pid)
        .collect();
    let strays: BTreeSet<u32> = rec
        .events
        .iter()
        .map(|e| e.pid)
        .filter(|p| !traced_pids.contains(p))
        .collect();
    assert!(
        strays.is_empty(),
        "events of processes outside the tree: {strays:?}"
    );
}

#[test]
fn cold_run_covers_every_resident_page() {
    if !require("cold_run_covers_every_resident_page", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let a = root.join("a");
    let b = root.join("b");
    let c = root.join("untouched");
    make_file(&a, 1024);
    make_file(&b, 2048);
    make_file(&c, 256);
    let script = format!(
        "cat {a} > /dev/null; dd if={b} of=/dev/null bs=64k skip=5 count=3 status=none; \
         dd if={b} of=/dev/null bs=4k skip=1500 count=1 status=none",
        a = a.display(),
        b = b.display()
    );
    let mut opts = RecordOptions::new(args(&["sh", "-c", &script]));
    opts.roots = vec![root.clone()];
    opts.cold = true;
    let rec = record(&opts).expect("record cold");
    assert_eq!(rec.exit_code(), 0);
    let evicted = rec.stats.evicted.expect("cold evicts");
    assert_eq!(evicted.files, 3);
    let all = [
        EventKind::Fault,
        EventKind::MapPages,
        EventKind::GetPages,
        EventKind::AddToCache,
    ];
    for f in [&a, &b, &c] {
        let resident = resident_pages(f);
        let traced = pages_of(&rec, f, &all);
        let missing: Vec<u64> = resident.difference(&traced).copied().collect();
        assert!(
            missing.is_empty(),
            "{}: resident pages not in the trace: {missing:?}",
            f.display()
        );
    }
    assert!(
        resident_pages(&c).is_empty(),
        "eviction worked on the untouched file"
    );
    assert!(!resident_pages(&b).is_empty());
}

/// A read-only shared mapping of the whole of `path` (mapping faults no page in); the file
/// is returned so it outlives the mapping's use.
fn map_file(path: &Path) -> (std::fs::File, *mut libc::c_void, usize) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open");
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only shared mapping of an open file; checked for MAP_FAILED.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    (file, addr, len)
}

/// Pages of `path` that are in the page cache now (mincore).
fn resident_pages(path: &Path) -> BTreeSet<u64> {
    let (_file, addr, len) = map_file(path);
    let mut vec = vec![0u8; len.div_ceil(PAGE as usize)];
    // SAFETY: `vec` has one byte per page of the mapping.
    assert_eq!(unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) }, 0);
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(addr, len) };
    vec.iter()
        .enumerate()
        .filter(|(_, v)| **v & 1 != 0)
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn exit_status_duration_and_missing_command() {
    if !require("exit_status_duration_and_missing_command", &[Need::Bpf]) {
        return;
    }
    let rec = record(&RecordOptions::new(args(&["sh", "-c", "exit 3"]))).expect("record");
    assert_eq!(rec.exit_code(), 3);
    assert_eq!(rec.stop, StopReason::Exited);

    let mut opts = RecordOptions::new(args(&["sleep", "30"]));
    opts.duration = Some(Duration::from_millis(300));
    let rec = record(&opts).expect("record with duration");
    assert_eq!(rec.stop, StopReason::Duration);
    assert_eq!(rec.exit_code(), 128 + libc::SIGTERM as u8);

    let err = record(&RecordOptions::new(args(&["incfs-no-such-command-xyz"]))).unwrap_err();
    assert!(
        matches!(err, RecordError::CommandNotFound { .. }),
        "{err:?}"
    );
}

#[test]
fn trace_round_trips_through_parquet() {
    if !require("trace_round_trips_through_parquet", &[Need::Bpf]) {
        return;
    }
    let dir = tmpdir();
    let file = dir.path().join("data");
    make_file(&file, 16);
    let rec =
        record(&RecordOptions::new(args(&["cat", file.to_str().unwrap()]))).expect("record cat");
    let out = dir.path().join("t.parquet");
    rec.write(&out).expect("write trace");
    let (meta, df) = incfs_planner::trace::read_trace(&out).expect("read trace");
    assert_eq!(meta, rec.meta);
    assert_eq!(df.height(), rec.events.len());
    assert_eq!(
        meta.command,
        vec!["cat".to_owned(), file.to_str().unwrap().to_owned()]
    );
    assert_eq!(meta.roots, vec!["/".to_owned()]);
    assert_eq!(meta.page_size, 4096);
}

/// Through the readahead-0 view: a 4 KiB read of a file under the root is one page, not the
/// disk's readahead window; a symlink under the root leading outside it is read through the
/// view too, named by the symlink, with the target's dev and ino; nothing stays mounted.
#[test]
fn the_view_serves_the_roots_without_readahead() {
    if !require(
        "the_view_serves_the_roots_without_readahead",
        &[Need::Bpf, Need::Fuse],
    ) {
        return;
    }
    let dir = tmpdir();
    let base = dir.path().canonicalize().unwrap();
    let root = base.join("root");
    std::fs::create_dir_all(root.join("lib")).unwrap();
    std::fs::create_dir_all(base.join("elsewhere")).unwrap();
    let inside = root.join("data");
    let outside = base.join("elsewhere/libx.so");
    make_file(&inside, 256);
    make_file(&outside, 256);
    std::os::unix::fs::symlink("../../elsewhere/libx.so", root.join("lib/libx.so")).unwrap();
    let script = format!(
        "dd if={} of=/dev/null bs=4096 skip=10 count=1 status=none && \
         dd if={} of=/dev/null bs=4096 skip=20 count=1 status=none",
        inside.display(),
        root.join("lib/libx.so").display()
    );
    let mut opts = RecordOptions::new(args(&["sh", "-c", &script]));
    opts.roots = vec![root.clone()];
    opts.view = true;
    let rec = record(&opts).expect("record through the view");
    assert_eq!(rec.exit_code(), 0);
    let touched = [EventKind::Fault, EventKind::GetPages];
    assert_eq!(
        pages_of(&rec, &inside, &touched),
        BTreeSet::from([10]),
        "one page of the file under the root"
    );
    assert_eq!(
        pages_of(&rec, &inside, &[EventKind::AddToCache]),
        BTreeSet::from([10]),
        "no readahead around it"
    );
    assert_eq!(
        pages_of(&rec, &outside, &touched),
        BTreeSet::from([20]),
        "the symlink's target, read through the view"
    );
    let link = root.join("lib/libx.so");
    assert!(
        events_of(&rec, &outside)
            .iter()
            .all(|e| e.path.as_deref() == link.to_str()),
        "named by the symlink under the root"
    );
    let view = rec.stats.view.as_ref().expect("view stats");
    assert_eq!((view.served_pages, view.touched_pages), (2, 2), "{view:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("fuse.incfs-view"),
        "a view is left mounted:\n{mounts}"
    );
}

#[test]
fn the_view_needs_a_root() {
    let mut opts = RecordOptions::new(args(&["true"]));
    opts.view = true;
    let err = record(&opts).expect_err("a view without roots");
    assert!(matches!(err, RecordError::ViewWithoutRoots), "{err}");
    assert!(err.to_string().contains("--root"), "{err}");
}
