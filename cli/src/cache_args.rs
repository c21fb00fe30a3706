//! The cache options `incfs run` and `incfs mount` share: which cache directory, and the
//! size it is kept under once the mount ends.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use clap::Args;
use incfs_fs::cache::{gc, root};

use crate::util::{human, parse_size};

/// Where a mount keeps its cache.
#[derive(Args, Debug, Clone)]
pub struct CacheDirArgs {
    /// Cache directory, shared by every run and mount that uses it (one cache per image,
    /// by root digest). Default: the per-user cache, $INCFS_CACHE, else
    /// $XDG_CACHE_HOME/incfs, else /var/cache/incfs for root, else ~/.cache/incfs.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Once the mount ends, evict the least recently used image caches (never one in use)
    /// until the cache directory holds at most this much (K, M, G; 0: no cap). Default:
    /// 10G for the per-user cache, no cap for a --cache DIR.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_max_size: Option<u64>,
}

/// A chosen cache directory and its cap.
#[derive(Debug, Clone)]
pub struct CacheDir {
    /// The directory (created, absolute).
    pub dir: PathBuf,
    /// The cap to keep it under after the mount, if any.
    pub max_bytes: Option<u64>,
}

impl CacheDirArgs {
    /// The directory to use (created) and its cap.
    pub fn resolve(&self) -> anyhow::Result<CacheDir> {
        let (dir, default_cap) = match &self.cache {
            Some(d) => (d.clone(), None),
            None => (root::default_root()?, Some(root::DEFAULT_MAX_BYTES)),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cache directory {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let max_bytes = self.cache_max_size.or(default_cap).filter(|m| *m > 0);
        Ok(CacheDir { dir, max_bytes })
    }
}

impl CacheDir {
    /// Passes the directory and cap on to a daemon started as `cmd`.
    pub fn forward(&self, cmd: &mut Command) {
        cmd.arg("--cache")
            .arg(&self.dir)
            .arg("--cache-max-size")
            .arg(self.max_bytes.unwrap_or(0).to_string());
    }

    /// Evicts image caches beyond the cap (after a mount; a failure is only reported).
    pub fn trim(&self) {
        let Some(max) = self.max_bytes else { return };
        match gc::gc(&self.dir, max) {
            Ok(r) if !r.removed.is_empty() => tracing::info!(
                dir = %self.dir.display(),
                removed = r.removed.len(),
                freed = %human(r.freed_bytes),
                "evicted least recently used image caches over the cap"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, dir = %self.dir.display(), "keeping the cache under its cap failed")
            }
        }
    }
}
