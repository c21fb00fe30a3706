//! Helpers the commands share: sizes in and out, and the root digest a mount insists on.
//! (A module of their own, so that no command module imports another for them.)

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
/// `SOURCE.sig` by the `--trust` key, or both (which must then agree).
pub fn required_digest(
    source: &str,
    expect: Option<&str>,
    trust: Option<&str>,
) -> anyhow::Result<Option<Digest>> {
    let expected = expect
        .map(Digest::from_hex)
        .transpose()
        .context("--expect-digest")?;
    let Some(trust) = trust else {
        return Ok(expected);
    };
    let key = incfs_fs::trust::load_public_key(trust)?;
    let signed = incfs_fs::trust::trusted_digest(source, &key)
        .with_context(|| format!("checking the signature of {source}"))?;
    if let Some(e) = expected
        && e != signed
    {
        anyhow::bail!("--expect-digest {e} differs from the signed root digest {signed}");
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
