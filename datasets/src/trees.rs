//! The workload trees that tests share: each built once per directory by its recipe
//! (`datasets/<name>/build-tree.sh`) and reused by every test after it.
//!
//! A clang tree is ~210 MB and the python one ~105 MB; a copy per test filled CI's disk. The
//! tests pass their `CARGO_TARGET_TMPDIR`, so one copy serves the whole workspace's tests.
//! Tests only read these trees (they pack them, run programs from them, evict their pages);
//! a test that changes files makes its own small tree.
//!
//! Building is safe when several test processes ask at once: each builds into a directory of
//! its own and renames it into place; the first rename wins and the others delete theirs
//! (threads of one process take turns).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Tests of one binary run on threads: one of them builds, the others wait for it.
static BUILDING: Mutex<()> = Mutex::new(());

/// A workload whose tree a recipe builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// clang-22 with its libraries and resource headers (`datasets/clang/build-tree.sh`).
    Clang,
    /// sympy and networkx in a pip prefix (`datasets/python/build-tree.sh`; needs PyPI).
    Python,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Clang => "clang",
            Workload::Python => "python",
        }
    }

    /// The recipe that builds this workload's tree.
    pub fn recipe(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(self.name())
            .join("build-tree.sh")
    }
}

/// Why a shared tree could not be had.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct TreeError {
    what: String,
}

fn io_err(path: &Path, e: io::Error) -> TreeError {
    TreeError {
        what: format!("{}: {e}", path.display()),
    }
}

/// The tree of `workload` under `base` (`base/trees/<name>`), built by its recipe the first
/// time. The path is canonical (the recorder compares real paths).
pub fn shared(workload: Workload, base: &Path) -> Result<PathBuf, TreeError> {
    let dir = base.join("trees");
    let done = dir.join(workload.name());
    let _one_builder = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !done.join(".complete").exists() {
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        // Only complete builds are renamed into place, so an incomplete one is from a tree
        // layout of before (or a hand-made copy): replace it.
        if done.exists() {
            fs::remove_dir_all(&done).map_err(|e| io_err(&done, e))?;
        }
        let partial = dir.join(format!(
            ".{}.partial-{}",
            workload.name(),
            std::process::id()
        ));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| io_err(&partial, e))?;
        }
        let recipe = workload.recipe();
        let out = Command::new("bash")
            .arg(&recipe)
            .arg(&partial)
            .output()
            .map_err(|e| io_err(&recipe, e))?;
        if !out.status.success() {
            // Best effort: a failed build leaves nothing behind.
            let _ = fs::remove_dir_all(&partial);
            return Err(TreeError {
                what: format!(
                    "{} failed ({}): {}",
                    recipe.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        if let Err(e) = fs::rename(&partial, &done) {
            // Another process renamed its build into place first: use that one.
            let _ = fs::remove_dir_all(&partial);
            if !done.join(".complete").exists() {
                return Err(io_err(&done, e));
            }
        }
    }
    done.canonicalize().map_err(|e| io_err(&done, e))
}
