//! A recording of a program from its tree on local disk holds its demand set (issue 15).
//!
//! Each workload is recorded as the README says (`--root TREE`, the tree on this machine's
//! disk, whatever its readahead), and compared with the read-log of `incfs run` of the same
//! command on an image of the same tree, whose FUSE readahead is 0: the pages the trace
//! counts as touched (`fault`, `get_pages`) must hold at least 95 % of the read-log's pages
//! and at most 1.3 times as many. A last test checks that a recording leaves nothing
//! behind on the machine, also when the recorder is killed with SIGKILL.
//!
//! Root, FUSE and eBPF are needed (skipped without them, failing under
//! `INCFS_REQUIRE_PRIVILEGED=1`). The trees are built once under cargo's target tmpdir.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_datasets::trees::{self, Workload};
use incfs_planner::trace::EventKind;
use incfs_recorder::{RecordOptions, record};

const PAGE: u64 = 4096;

/// At least this share of the read-log's pages must be in the trace.
const MIN_COVERAGE: f64 = 0.95;
/// The trace may hold at most this many times the read-log's pages.
const MAX_EXCESS: f64 = 1.3;

type Pages = HashMap<String, BTreeSet<u64>>;

fn incfs() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_incfs"));
    // The per-user cache of `run` without `--cache`, kept out of the machine's.
    cmd.env(
        "INCFS_CACHE",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("incfs-cache"),
    );
    cmd
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory under cargo's target tmpdir (a disk file system, unlike a tmpfs `/tmp`),
/// removed when the test ends: its images and logs are the test's own.
fn work_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("record-demand-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("work dir")
}

/// The workload's tree, shared by every test of the workspace.
fn shared_tree(workload: Workload) -> PathBuf {
    trees::shared(workload, Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `argv` with `{root}` replaced.
fn argv(template: &[&str], root: &str) -> Vec<String> {
    template.iter().map(|a| a.replace("{root}", root)).collect()
}

/// Pages of each file (path relative to the mount) in an `incfs run` read-log.
fn read_log_pages(log: &Path) -> Pages {
    let text = std::fs::read_to_string(log).expect("read-log");
    let mut pages = Pages::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("read-log line");
        let (Some(path), Some(offset), Some(len)) =
            (v["path"].as_str(), v["offset"].as_u64(), v["len"].as_u64())
        else {
            panic!("read-log line without path/offset/len: {line}");
        };
        if len == 0 {
            continue;
        }
        pages
            .entry(path.to_owned())
            .or_default()
            .extend(offset / PAGE..=(offset + len - 1) / PAGE);
    }
    pages
}

/// Records `command` from `root` as `incfs record-trace --root ROOT` does, and returns the
/// touched pages of each file under `root` (relative path), clipped to the file's size.
fn trace_pages(root: &Path, command: &[String]) -> Pages {
    let mut opts = RecordOptions::new(command.iter().map(OsString::from).collect());
    opts.roots = vec![root.to_path_buf()];
    opts.view = true;
    let rec = record(&opts).expect("record");
    assert!(
        rec.status.success(),
        "the recorded command failed: {:?}",
        rec.status
    );
    assert_eq!(rec.stats.lost_events, 0, "events were lost");
    let mut pages = Pages::new();
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for e in &rec.events {
        if !matches!(e.kind, EventKind::Fault | EventKind::GetPages) {
            continue;
        }
        let Some(rel) = e
            .path
            .as_deref()
            .and_then(|p| Path::new(p).strip_prefix(root).ok())
            .and_then(Path::to_str)
        else {
            continue;
        };
        let size = *sizes.entry(rel.to_owned()).or_insert_with(|| {
            std::fs::metadata(root.join(rel)).map_or(0, |m| m.len().div_ceil(PAGE))
        });
        let end = (e.first_page + u64::from(e.page_count)).min(size);
        pages
            .entry(rel.to_owned())
            .or_default()
            .extend(e.first_page..end);
    }
    pages
}

fn total(p: &Pages) -> usize {
    p.values().map(BTreeSet::len).sum()
}

/// Packs `tree`, runs `command` (`{root}` = the mount) with `incfs run` and returns its
/// read-log's pages.
fn reference_pages(dir: &Path, tree: &Path, template: &[&str]) -> Pages {
    let img = dir.join("tree.img");
    if !img.exists() {
        ok(
            incfs()
                .arg("pack")
                .arg(tree)
                .arg("-o")
                .arg(&img)
                .output()
                .expect("pack"),
            "pack",
        );
    }
    let log = dir.join("reference.read-log");
    let _ = std::fs::remove_file(&log);
    // A cold cache: a warm one pushes its chunks into the page cache at open, and reads
    // served from there never reach the read-log.
    let cache = tempfile::tempdir().expect("a cache directory");
    ok(
        incfs()
            .arg("run")
            .arg("--cache")
            .arg(cache.path())
            .arg("--image")
            .arg(&img)
            .arg("--read-log-out")
            .arg(&log)
            .arg("--")
            .args(argv(template, "{mnt}"))
            .stdout(Stdio::null())
            .output()
            .expect("incfs run"),
        "incfs run",
    );
    read_log_pages(&log)
}

/// Checks the bounds and prints the figures.
fn compare(what: &str, trace: &Pages, reference: &Pages) {
    let mut common = 0usize;
    let mut missing: Vec<(String, usize)> = Vec::new();
    for (path, pages) in reference {
        let have = trace.get(path);
        let n = have.map_or(0, |t| t.intersection(pages).count());
        common += n;
        if n < pages.len() {
            missing.push((path.clone(), pages.len() - n));
        }
    }
    missing.sort_by_key(|m| std::cmp::Reverse(m.1));
    missing.truncate(8);
    let (t, r) = (total(trace), total(reference));
    let coverage = common as f64 / r.max(1) as f64;
    let excess = t as f64 / r.max(1) as f64;
    eprintln!(
        "{what}: read-log {r} pages in {} files, trace {t} pages in {} files; \
         coverage {:.1} %, {excess:.3}x as many; most missing: {missing:?}",
        reference.len(),
        trace.len(),
        coverage * 100.0
    );
    assert!(r > 0, "{what}: the reference run read nothing");
    assert!(
        coverage >= MIN_COVERAGE,
        "{what}: the trace holds {:.1} % of the read-log's pages (< {} %); most missing: {missing:?}",
        coverage * 100.0,
        MIN_COVERAGE * 100.0
    );
    assert!(
        excess <= MAX_EXCESS,
        "{what}: the trace holds {excess:.2}x the read-log's pages (> {MAX_EXCESS})"
    );
}

fn demand_test(name: &str, dir: &Path, tree: &Path, template: &[&str]) {
    let reference = reference_pages(dir, tree, template);
    let trace = trace_pages(tree, &argv(template, tree.to_str().expect("UTF-8 tree")));
    compare(name, &trace, &reference);
}

#[test]
fn clang_from_its_local_tree_gives_the_demand_set() {
    if !require(
        "clang_from_its_local_tree_gives_the_demand_set",
        &[Need::Root, Need::Fuse, Need::Bpf, Need::Clang],
    ) {
        return;
    }
    let work = work_dir("clang");
    let dir = work.path().canonicalize().expect("canonical work dir");
    let tree = shared_tree(Workload::Clang);
    let obj = dir.join("hello.o");
    let obj = obj.to_str().expect("UTF-8");
    demand_test(
        "clang",
        &dir,
        &tree,
        &["{root}/bin/clang", "-c", "{root}/hello.c", "-o", obj],
    );
}

#[test]
fn python_from_its_local_tree_gives_the_demand_set() {
    if !require(
        "python_from_its_local_tree_gives_the_demand_set",
        &[Need::Root, Need::Fuse, Need::Bpf],
    ) {
        return;
    }
    let work = work_dir("python");
    let dir = work.path().canonicalize().expect("canonical work dir");
    let tree = shared_tree(Workload::Python);
    demand_test(
        "python",
        &dir,
        &tree,
        &[
            "env",
            "PYTHONPATH={root}",
            "PYTHONDONTWRITEBYTECODE=1",
            "python3",
            "-c",
            "import sympy, networkx",
        ],
    );
}

/// `incfs-synth`, built next to the `incfs` binary by a workspace build.
fn synth_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_incfs")).with_file_name("incfs-synth");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p incfs-datasets --bin incfs-synth; \
         a workspace `cargo test` does)",
        bin.display()
    );
    bin
}

#[test]
fn synthetic_mmap_and_fork_gives_the_demand_set() {
    if !require(
        "synthetic_mmap_and_fork_gives_the_demand_set",
        &[Need::Root, Need::Fuse, Need::Bpf],
    ) {
        return;
    }
    let synth = synth_bin();
    let work = work_dir("synth");
    let dir = work.path().canonicalize().expect("canonical work dir");
    let tree = dir.join("tree");
    ok(
        Command::new(&synth)
            .arg("gen")
            .arg(&tree)
            .args(["--files", "60", "--size", "1M"])
            .output()
            .expect("incfs-synth gen"),
        "incfs-synth gen",
    );
    let synth = synth.to_str().expect("UTF-8").to_owned();
    // One process maps every file and touches a tenth of its pages; another forks four
    // children that pread scattered pages of their shares.
    let script = format!(
        "{synth} access {{root}} --pattern mmap --fraction 0.1 & \
         {synth} access {{root}} --pattern multiproc --fraction 0.05 --seed 7; wait"
    );
    demand_test("synth", &dir, &tree, &["sh", "-c", &script]);
}

fn view_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(" - fuse.incfs-view "))
        .count()
}

/// Every block device's readahead, to check that a recording changes none (FUSE and other
/// anonymous-device file systems, `0:N`, come and go with other mounts and are left out).
fn readaheads() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir("/sys/class/bdi")
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with("0:"))
                .filter_map(|e| {
                    let v = std::fs::read_to_string(e.path().join("read_ahead_kb")).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), v))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_recording_leaves_nothing_behind_even_when_killed() {
    if !require(
        "a_recording_leaves_nothing_behind_even_when_killed",
        &[Need::Root, Need::Fuse, Need::Bpf],
    ) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("incfs-record-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("data"), vec![7u8; 64 << 10]).expect("data");
    let before = (view_mounts(), readaheads());

    // A normal recording.
    let trace = dir.path().join("t.parquet");
    let out = ok(
        incfs()
            .args(["record-trace", "-o"])
            .arg(&trace)
            .arg("--root")
            .arg(&tree)
            .args(["--", "cat"])
            .arg(tree.join("data"))
            .stdout(Stdio::null())
            .output()
            .expect("record-trace"),
        "record-trace",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing on the machine was changed"),
        "the recorder does not say what it changed: {stderr}"
    );
    assert_eq!(
        (view_mounts(), readaheads()),
        before,
        "a recording left a change behind"
    );
    let show = ok(
        incfs()
            .args(["trace", "show"])
            .arg(&trace)
            .output()
            .expect("trace show"),
        "trace show",
    );
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("complete:   complete: recorded through a readahead-0 view"),
        "trace show does not call a view recording complete:\n{show}"
    );

    // A recording whose recorder is killed while the command runs in the view.
    let pid_file = dir.path().join("pid");
    let script = format!(
        "cat {data} > /dev/null; echo $$ > {pid}; exec sleep 60",
        data = tree.join("data").display(),
        pid = pid_file.display()
    );
    let mut recorder = incfs()
        .args(["record-trace", "-o"])
        .arg(dir.path().join("killed.parquet"))
        .arg("--root")
        .arg(&tree)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("record-trace");
    let t = Instant::now();
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the command never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    recorder.kill().expect("SIGKILL the recorder");
    recorder.wait().expect("reap the recorder");
    // The command dies with its recorder (and its namespace, and the view, with it).
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the command {pid} outlived its killed recorder"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (view_mounts(), readaheads()),
        before,
        "a killed recording left a change behind"
    );
    assert_eq!(
        std::fs::read(tree.join("data")).expect("data").len(),
        64 << 10,
        "the tree changed"
    );
}
