//! What a privileged test needs, checked when it starts.
//!
//! A test calls [`require`] with what it needs. When everything is there it gets `true` and
//! runs. When something is missing it prints why and gets `false` (the test returns early,
//! skipped) — unless `INCFS_REQUIRE_PRIVILEGED=1` is set, as in CI, where it panics so the
//! test fails instead of passing without having run.

use std::path::Path;

/// The environment variable that turns skips into failures.
pub const REQUIRE_ENV: &str = "INCFS_REQUIRE_PRIVILEGED";

/// Something a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running as root.
    Root,
    /// `/dev/fuse` and `fusermount3`.
    Fuse,
    /// Root and a kernel with BPF and BTF (`/sys/kernel/btf/vmlinux`).
    Bpf,
    /// An `nginx` binary.
    Nginx,
    /// The clang-22 package (the default workload).
    Clang,
    /// Debian's `docker-registry` (distribution 2.8), `htpasswd` and `openssl`: a real OCI
    /// registry with basic auth, token auth and TLS.
    DockerRegistry,
    /// moto's S3-compatible server, `moto_server` (`pip install 'moto[server]'`).
    MotoServer,
}

impl Need {
    fn missing(self) -> Option<&'static str> {
        match self {
            Need::Root => (!is_root()).then_some("not running as root"),
            Need::Fuse => {
                if !Path::new("/dev/fuse").exists() {
                    Some("/dev/fuse is missing")
                } else if which("fusermount3").is_none() {
                    Some("fusermount3 is missing (apt-get install fuse3)")
                } else {
                    None
                }
            }
            Need::Bpf => {
                if !is_root() {
                    Some("eBPF needs root")
                } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
                    Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)")
                } else {
                    None
                }
            }
            Need::Nginx => which("nginx")
                .is_none()
                .then_some("nginx is missing (apt-get install nginx-light)"),
            Need::Clang => (!Path::new("/usr/lib/llvm-22/bin/clang").exists())
                .then_some("clang-22 is missing (apt-get install clang-22)"),
            Need::DockerRegistry => {
                if which("docker-registry").is_none() {
                    Some("docker-registry is missing (apt-get install docker-registry)")
                } else if which("htpasswd").is_none() {
                    Some("htpasswd is missing (apt-get install apache2-utils)")
                } else if which("openssl").is_none() {
                    Some("openssl is missing (apt-get install openssl)")
                } else {
                    None
                }
            }
            Need::MotoServer => which("moto_server")
                .is_none()
                .then_some("moto_server is missing (pip install 'moto[server]')"),
        }
    }
}

/// True when everything in `needs` is available. Otherwise prints the reason and returns
/// false, or panics under `INCFS_REQUIRE_PRIVILEGED=1`.
pub fn require(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<&str> = needs.iter().filter_map(|n| n.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: {why} ({REQUIRE_ENV}=1, so this fails instead of skipping)");
    }
    eprintln!("skipped {test}: {why}");
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}
