//! The cache directory `incfs run` and `incfs mount` use when given no `--cache`: one per
//! user, lasting across runs, holding one cache per image (`<root>/<root digest>/`), so a
//! second start of an image fetches only what the first did not keep.
//!
//! Where: `$INCFS_CACHE` when set; else `$XDG_CACHE_HOME/incfs` (the XDG base directory
//! spec's per-user cache, when set to an absolute path); else, for root, `/var/cache/incfs`
//! (the FHS place for a system service's cache); else `$HOME/.cache/incfs`.
//!
//! How big: at most [`DEFAULT_MAX_BYTES`] unless told otherwise; the least recently used
//! image caches beyond it are evicted whole after a run or mount ends ([`super::gc`]).

use std::ffi::OsString;
use std::path::PathBuf;

/// The default size cap of the per-user cache root: 10 GiB. Big enough for several
/// large toolchains at once (the bundled clang-22 image is ~0.5 GiB packed, its tree 1.8 GiB
/// once wholly local), small next to the free space of a developer machine or CI runner.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

/// The environment variable that names the cache root outright.
pub const CACHE_ENV: &str = "INCFS_CACHE";

/// Why no cache root could be chosen.
#[derive(Debug, thiserror::Error)]
#[error("no cache directory: set $INCFS_CACHE, $XDG_CACHE_HOME or $HOME, or pass --cache DIR")]
pub struct NoCacheRoot;

/// The per-user cache root for this process (see the module docs).
pub fn default_root() -> Result<PathBuf, NoCacheRoot> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    root_from(|k| std::env::var_os(k), euid == 0)
}

/// The cache root given the environment (`env`) and whether the user is root.
pub fn root_from(
    env: impl Fn(&str) -> Option<OsString>,
    is_root: bool,
) -> Result<PathBuf, NoCacheRoot> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = set(CACHE_ENV) {
        return Ok(d);
    }
    // The XDG spec: a relative path in $XDG_CACHE_HOME is invalid and is ignored.
    if let Some(d) = set("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Ok(d.join("incfs"));
    }
    if is_root {
        return Ok(PathBuf::from("/var/cache/incfs"));
    }
    set("HOME")
        .map(|h| h.join(".cache/incfs"))
        .ok_or(NoCacheRoot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_root_follows_the_environment() {
        let all = [
            ("INCFS_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(root_from(with(&all), true).unwrap(), PathBuf::from("/c"));
        assert_eq!(
            root_from(with(&all[1..]), false).unwrap(),
            PathBuf::from("/x/incfs")
        );
        assert_eq!(
            root_from(with(&all[1..]), true).unwrap(),
            PathBuf::from("/x/incfs")
        );
        assert_eq!(
            root_from(with(&all[2..]), false).unwrap(),
            PathBuf::from("/h/.cache/incfs")
        );
        assert_eq!(
            root_from(with(&all[2..]), true).unwrap(),
            PathBuf::from("/var/cache/incfs")
        );
        let relative = [
            ("XDG_CACHE_HOME", "rel"),
            ("HOME", "/h"),
            ("INCFS_CACHE", ""),
        ];
        assert_eq!(
            root_from(with(&relative), false).unwrap(),
            PathBuf::from("/h/.cache/incfs")
        );
        assert!(root_from(with(&[]), false).is_err());
    }
}
