//! The workloads: how each tree is built and what command runs on it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::check;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// clang-22 compiling hello.c, from its tree (datasets/clang/build-tree.sh).
    Clang,
    /// python3 importing sympy and networkx from a pip prefix (datasets/python/build-tree.sh);
    /// the interpreter stays local.
    Python,
    /// The synthetic app (incfs-synth): generated files read in a pattern; the reader binary
    /// stays local.
    Synth,
}

/// A workload: its title and its command, `{root}` standing for the tree's root.
pub struct Workload {
    pub title: String,
    argv: Vec<String>,
}

impl Workload {
    /// Builds the tree into `tree` (a recipe that does nothing when the tree is complete)
    /// and says how to run the workload on it. `obj` is where clang writes its object file.
    pub fn build(kind: Kind, tree: &Path, obj: &Path, synth: &SynthOptions) -> Result<Workload> {
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR"));
        match kind {
            Kind::Clang => {
                check(
                    Command::new(recipes.join("clang/build-tree.sh")).arg(tree),
                    "building the clang tree",
                )?;
                Ok(Workload {
                    title: "clang-22 -c hello.c".into(),
                    argv: vec![
                        "{root}/bin/clang".into(),
                        "-c".into(),
                        "{root}/hello.c".into(),
                        "-o".into(),
                        obj.to_string_lossy().into_owned(),
                    ],
                })
            }
            Kind::Python => {
                check(
                    Command::new(recipes.join("python/build-tree.sh")).arg(tree),
                    "building the python tree",
                )?;
                let out = Command::new("python3")
                    .args(["-c", "import sys; print(sys.executable)"])
                    .output()
                    .context("running python3")?;
                let python = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() || python.is_empty() {
                    bail!("python3 -c 'import sys; print(sys.executable)' failed");
                }
                Ok(Workload {
                    title: "python3 -c 'import sympy, networkx'".into(),
                    argv: vec![
                        "env".into(),
                        "PYTHONPATH={root}".into(),
                        "PYTHONDONTWRITEBYTECODE=1".into(),
                        python,
                        "-c".into(),
                        "import sympy, networkx".into(),
                    ],
                })
            }
            Kind::Synth => {
                let bin = sibling("incfs-synth")?;
                if !tree.join(".complete").exists() {
                    check(
                        Command::new(&bin)
                            .arg("gen")
                            .arg(tree)
                            .args(["--files", &synth.files.to_string()])
                            .args(["--size", &synth.size]),
                        "generating the synthetic tree",
                    )?;
                    std::fs::write(tree.join(".complete"), b"")?;
                }
                Ok(Workload {
                    title: format!(
                        "incfs-synth access --pattern {} --fraction {} ({} files of {})",
                        synth.pattern, synth.fraction, synth.files, synth.size
                    ),
                    argv: vec![
                        bin.to_string_lossy().into_owned(),
                        "access".into(),
                        "{root}".into(),
                        "--pattern".into(),
                        synth.pattern.clone(),
                        "--fraction".into(),
                        synth.fraction.to_string(),
                    ],
                })
            }
        }
    }

    /// The command with `{root}` replaced by `root`.
    pub fn argv(&self, root: &str) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| a.replace("{root}", root))
            .collect()
    }

    /// A command ready to run on the tree at `root`.
    pub fn command(&self, root: &Path) -> Command {
        let argv = self.argv(&root.to_string_lossy());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }
}

/// The synthetic workload's knobs.
pub struct SynthOptions {
    pub files: usize,
    pub size: String,
    pub pattern: String,
    pub fraction: f64,
}

/// A binary next to this one.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("no directory for this executable")?
        .join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p incfs-cli -p incfs-datasets)",
            p.display()
        );
    }
    Ok(p)
}
