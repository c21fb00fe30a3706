//! Helpers the commands share: sizes in and out, and the root digest a mount insists on.
//! (A module of their own, so that no command module imports another for them.)

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use incfs_fs::format::Digest;

/// Parses `65536`, `64K`, `64KiB`, `1M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1u64 << 10),
        ("k", 1 << 10),
        ("mib", 1 << 20),
        ("m", 1 << 20),
        ("gib", 1 << 30),
        ("g", 1 << 30),
    ]
    .iter()
    .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.to_string(), *m)))
    .unwrap_or((lower.clone(), 1));
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?} (examples: 4096, 64K, 1M)"))
}

/// The root digest a mount must insist on: `--expect-digest`, the digest signed in
/// `SOURCE.sig` by the `--trust` key, the digest an oci:// image's manifest pins (`pinned`:
/// the digest and the pinned reference), or several (which must then agree).
pub fn required_digest(
    source: &str,
    expect: Option<&str>,
    trust: Option<&str>,
    pinned: Option<(Digest, String)>,
) -> anyhow::Result<Option<Digest>> {
    let mut expected = expect
        .map(Digest::from_hex)
        .transpose()
        .context("--expect-digest")?;
    let mut from = "--expect-digest".to_string();
    if let Some((p, reference)) = pinned {
        if let Some(e) = expected
            && e != p
        {
            anyhow::bail!(
                "--expect-digest {e} differs from the root digest {p} the manifest of \
                 {reference} pins"
            );
        }
        expected = Some(p);
        from = format!("the root digest the manifest of {reference} pins");
    }
    let Some(trust) = trust else {
        return Ok(expected);
    };
    let key = incfs_fs::trust::load_public_key(trust)?;
    let signed = incfs_fs::trust::trusted_digest(source, &key)
        .with_context(|| format!("checking the signature of {source}"))?;
    if let Some(e) = expected
        && e != signed
    {
        anyhow::bail!("{from} ({e}) differs from the signed root digest {signed}");
    }
    Ok(Some(signed))
}

/// Bytes as B, KiB, MiB, GiB or TiB.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Set in the child that checks a trace, which must not check it again.
const TRACE_CHECK_ENV: &str = "INCFS_TRACE_CHECK_CHILD";

/// Reads the Parquet trace at `path` once in a child process (`incfs trace show`) before this
/// process reads it: polars-parquet aborts the whole process on some malformed files (a data
/// page header with a negative value count makes it reserve ~2^61 bytes; see
/// `fuzz/known-aborts/`), which no error handling can catch. A child killed that way, or one
/// that fails, becomes an error naming the file, and this process does not read it. Inputs
/// that are not Parquet (read-logs) are left alone.
pub fn check_trace_in_child(path: &Path) -> anyhow::Result<()> {
    // The child is the check: it reads the file itself.
    if std::env::var_os(TRACE_CHECK_ENV).is_some() {
        return Ok(());
    }
    let mut magic = [0u8; 4];
    let is_parquet = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PAR1";
    if !is_parquet {
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding the incfs executable")?;
    let out = Command::new(exe)
        .args(["trace", "show", "--json", "--top", "1"])
        .arg(path)
        .env("RUST_LOG", "off")
        .env(TRACE_CHECK_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("checking the trace {} in a child process", path.display()))?;
    if let Some(sig) = out.status.signal() {
        anyhow::bail!(
            "{}: not a usable trace: the Parquet reader crashed on it (signal {sig}; a malformed \
             page, as in fuzz/known-aborts/); record it again",
            path.display()
        );
    }
    if !out.status.success() {
        // The reader's error, as the child reported it. (Not read again here: on some
        // malformed files the reader sometimes errs and sometimes aborts.)
        let text = String::from_utf8_lossy(&out.stderr);
        let why = text
            .lines()
            .find_map(|l| l.strip_prefix("incfs: error: "))
            .unwrap_or("the trace reader failed on it");
        anyhow::bail!("{why}");
    }
    Ok(())
}
