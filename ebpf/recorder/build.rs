//! Builds the probe (`ebpf/probe`) for BPF with aya-build; `src/probe.rs` embeds the object.
//!
//! This needs the nightly toolchain with `rust-src` and `bpf-linker` on PATH (both installed
//! by `scripts/setup.sh`; cargo installs bpf-linker to `~/.cargo/bin`).

use std::path::{Path, PathBuf};

fn main() {
    if let Err(err) = build() {
        // A build script reports failure by exiting non-zero; the message goes to cargo's output.
        eprintln!("incfs-recorder build.rs: {err:#}");
        std::process::exit(1);
    }
}

fn build() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| aya_build_error("the recorder's manifest dir has no parent"))?;
    let probe_dir = ebpf_dir.join("probe");
    let common_dir = ebpf_dir.join("common");
    // aya-build reruns on changes under the probe; the shared types live beside it.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        match find_on_path("bpf-linker") {
            Some(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
            None => {
                return Err(aya_build_error(
                    "bpf-linker is not on PATH: run scripts/setup.sh (it installs bpf-linker \
                     to ~/.cargo/bin), then make sure ~/.cargo/bin is on PATH",
                ));
            }
        }
    }
    let probe_dir = probe_dir
        .to_str()
        .ok_or_else(|| aya_build_error("the probe's path is not UTF-8"))?;
    let package = aya_build::Package {
        name: "incfs-probe",
        root_dir: probe_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// The error type of `aya_build::Result`.
type BuildError = <aya_build::Result<()> as IntoErr>::Err;

trait IntoErr {
    type Err;
}

impl<E> IntoErr for Result<(), E> {
    type Err = E;
}

fn aya_build_error(msg: &str) -> BuildError {
    std::io::Error::other(msg.to_owned()).into()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| Path::new(p).is_file())
}
