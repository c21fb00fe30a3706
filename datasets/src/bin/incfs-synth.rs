//! The synthetic app: a generator of N files of a chosen size, and an access program that
//! reads them in a chosen pattern, for controlled experiments (`incfs-bench --workload
//! synth` runs it, the files being the tree and this binary staying local).
//!
//! ```sh
//! incfs-synth gen OUT --files 200 --size 1M            # OUT/d000/f00000.bin ...
//! incfs-synth access OUT --pattern scattered --fraction 0.1
//! ```
//!
//! Patterns (each deterministic for a seed, so every run touches the same pages):
//! - `seq`: reads the first `fraction` of the files (by count), whole, 64 KiB at a time;
//! - `scattered`: reads `fraction` of every file's 4 KiB pages, at random offsets (`pread`);
//! - `mmap`: maps every file and touches `fraction` of its pages at random;
//! - `multiproc`: `procs` child processes, each doing `scattered` on its share of the files.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

const PAGE: u64 = 4096;

#[derive(Parser)]
#[command(about = "Synthetic app for incfs experiments: generate files, read them in a pattern")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write N files of SIZE bytes under OUT (100 files a directory).
    Gen {
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        files: usize,
        /// Bytes per file (suffixes K, M: 1024-based).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        size: u64,
        /// Share of each 4 KiB page that is random bytes; the rest is zeros, so the image
        /// compresses to about this fraction.
        #[arg(long, default_value_t = 0.4)]
        noise: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Read the files under ROOT in a pattern and print a checksum of what was read.
    Access {
        root: PathBuf,
        #[arg(long, value_enum, default_value_t = Pattern::Scattered)]
        pattern: Pattern,
        /// Share of the files (`seq`) or of each file's pages (the others) read.
        #[arg(long, default_value_t = 0.1)]
        fraction: f64,
        /// Child processes for `multiproc`.
        #[arg(long, default_value_t = 4)]
        procs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Internal: this process's share, `K/N` (set by `multiproc` for its children).
        #[arg(long, hide = true)]
        shard: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Seq,
    Scattered,
    Mmap,
    Multiproc,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1024),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("size {s:?}: {e}"))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Gen {
            out,
            files,
            size,
            noise,
            seed,
        } => generate(&out, files, size, noise, seed),
        Cmd::Access {
            root,
            pattern,
            fraction,
            procs,
            seed,
            shard,
        } => {
            if !(0.0..=1.0).contains(&fraction) {
                bail!("--fraction {fraction}: give a number in 0..=1");
            }
            let files = list_files(&root)?;
            let (k, n) = match shard.as_deref() {
                Some(s) => {
                    let (k, n) = s.split_once('/').context("--shard wants K/N")?;
                    (k.parse::<usize>()?, n.parse::<usize>()?.max(1))
                }
                None => (0, 1),
            };
            let mine: Vec<&PathBuf> = files.iter().skip(k).step_by(n).collect();
            let sum = match pattern {
                Pattern::Seq => {
                    let take = ((mine.len() as f64) * fraction).ceil() as usize;
                    read_whole(&mine[..take.min(mine.len())])?
                }
                Pattern::Scattered => scattered(&mine, fraction, seed)?,
                Pattern::Mmap => mapped(&mine, fraction, seed)?,
                Pattern::Multiproc => multiproc(&root, fraction, procs, seed)?,
            };
            println!("{sum:016x}");
            Ok(())
        }
    }
}

fn generate(out: &Path, files: usize, size: u64, noise: f64, seed: u64) -> Result<()> {
    if !(0.0..=1.0).contains(&noise) {
        bail!("--noise {noise}: give a number in 0..=1");
    }
    let noisy = ((PAGE as f64) * noise) as usize;
    for i in 0..files {
        let dir = out.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut data = Vec::with_capacity(size as usize);
        let mut page = 0u64;
        while (data.len() as u64) < size {
            let n = PAGE.min(size - data.len() as u64) as usize;
            let mut p = incfs_datasets::synth::noise(noisy.min(n), seed ^ (i as u64) << 32 ^ page);
            p.resize(n, 0);
            data.extend_from_slice(&p);
            page += 1;
        }
        let path = dir.join(format!("f{i:05}.bin"));
        std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Regular files under `root`, sorted, leaving out names that start with a dot.
fn list_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// xorshift64: the pages a pattern picks, the same for a seed on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `fraction` of the pages of a file of `len` bytes, picked at random (distinct), sorted
/// by the order they were drawn in (not by offset: a scattered reader does not go in order).
fn pick_pages(len: u64, fraction: f64, rng: &mut Rng) -> Vec<u64> {
    let pages = len.div_ceil(PAGE);
    let want = ((pages as f64) * fraction).ceil() as u64;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while (out.len() as u64) < want.min(pages) {
        let p = rng.next() % pages;
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

fn fold(sum: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(sum, |s, &b| s.rotate_left(5) ^ u64::from(b))
}

fn read_whole(files: &[&PathBuf]) -> Result<u64> {
    let mut sum = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for f in files {
        let mut file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sum = fold(sum, &buf[..n]);
        }
    }
    Ok(sum)
}

fn scattered(files: &[&PathBuf], fraction: f64, seed: u64) -> Result<u64> {
    let mut rng = Rng::new(seed);
    let mut sum = 0;
    let mut buf = vec![0u8; PAGE as usize];
    for f in files {
        let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let len = file.metadata()?.len();
        for p in pick_pages(len, fraction, &mut rng) {
            let n = PAGE.min(len - p * PAGE) as usize;
            file.read_exact_at(&mut buf[..n], p * PAGE)
                .with_context(|| format!("reading {} at page {p}", f.display()))?;
            sum = fold(sum, &buf[..n]);
        }
    }
    Ok(sum)
}

fn mapped(files: &[&PathBuf], fraction: f64, seed: u64) -> Result<u64> {
    let mut rng = Rng::new(seed);
    let mut sum = 0u64;
    for f in files {
        let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            continue;
        }
        // SAFETY: a private read-only mapping of a file opened here; the pointer is used
        // only within `len` bytes and unmapped before the file is closed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mapping {}: {}",
                f.display(),
                std::io::Error::last_os_error()
            );
        }
        for p in pick_pages(len, fraction, &mut rng) {
            // SAFETY: p * PAGE < len, inside the mapping.
            let b = unsafe { std::ptr::read_volatile((ptr as *const u8).add((p * PAGE) as usize)) };
            sum = sum.rotate_left(5) ^ u64::from(b);
        }
        // SAFETY: the mapping made above, of that length.
        unsafe { libc::munmap(ptr, len as usize) };
    }
    Ok(sum)
}

fn multiproc(root: &Path, fraction: f64, procs: usize, seed: u64) -> Result<u64> {
    let me = std::env::current_exe()?;
    let mut running = Vec::new();
    for k in 0..procs.max(1) {
        running.push(
            Command::new(&me)
                .arg("access")
                .arg(root)
                .args(["--pattern", "scattered", "--fraction"])
                .arg(fraction.to_string())
                .args(["--seed", &(seed + k as u64).to_string()])
                .args(["--shard", &format!("{k}/{}", procs.max(1))])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting a child")?,
        );
    }
    let mut sum = 0u64;
    for c in running {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("a child failed: {}", out.status);
        }
        let s = String::from_utf8_lossy(&out.stdout);
        sum ^= u64::from_str_radix(s.trim(), 16)
            .with_context(|| format!("a child printed {:?}, not a checksum", s.trim()))?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_pages_are_distinct_in_range_and_repeatable() {
        let pick = |seed| pick_pages(100 * PAGE + 1, 0.25, &mut Rng::new(seed));
        let a = pick(7);
        assert_eq!(a.len(), 26, "a quarter of 101 pages, rounded up");
        assert!(a.iter().all(|&p| p < 101));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), a.len());
        assert_eq!(a, pick(7));
        assert_ne!(a, pick(8));
        assert_eq!(pick_pages(3 * PAGE, 1.0, &mut Rng::new(1)).len(), 3);
    }

    #[test]
    fn sizes_parse_with_suffixes_and_reject_junk() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("x1").is_err());
    }
}
