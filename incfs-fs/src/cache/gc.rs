//! Keeping a cache directory under a size: whole image caches are removed, least recently
//! used first (by when a mount last opened or closed each), and never one a mount is using
//! (its lock tells; [`super::lock`]).

use std::fs;
use std::path::{Path, PathBuf};

use super::offline::SOURCES_DIR;
use super::{CacheError, lock, stat_dir};

/// What a [`gc`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// The image caches removed, least recently used first.
    pub removed: Vec<PathBuf>,
    /// Bytes they held on disk.
    pub freed_bytes: u64,
    /// Bytes the image caches left hold on disk.
    pub kept_bytes: u64,
    /// Image caches that would have gone but are in use.
    pub busy: usize,
}

/// Removes the least recently used image caches under `cache_dir` until the rest hold at
/// most `max_bytes` on disk; caches in use stay (and count).
pub fn gc(cache_dir: &Path, max_bytes: u64) -> Result<GcReport, CacheError> {
    let mut infos = stat_dir(cache_dir)?;
    infos.sort_by_key(|i| i.last_used_ms);
    let mut report = GcReport {
        kept_bytes: infos.iter().map(|i| i.bytes_on_disk).sum(),
        ..GcReport::default()
    };
    for info in infos {
        if report.kept_bytes <= max_bytes {
            break;
        }
        if remove_unused(cache_dir, &info.dir)? {
            tracing::info!(dir = %info.dir.display(), bytes = info.bytes_on_disk, "evicted an image cache");
            report.kept_bytes -= info.bytes_on_disk;
            report.freed_bytes += info.bytes_on_disk;
            report.removed.push(info.dir);
        } else {
            report.busy += 1;
        }
    }
    Ok(report)
}

/// Removes the image cache `dir` (under `cache_dir`) unless a mount uses it or is opening
/// it; true when it was removed. Its entries in the source index go with it.
pub fn remove_unused(cache_dir: &Path, dir: &Path) -> Result<bool, CacheError> {
    let io_err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |error| CacheError::Io { path, what, error }
    };
    let open_path = dir.join(lock::OPEN_LOCK);
    let opening = lock::open(&open_path).map_err(io_err(&open_path, "opening the cache lock"))?;
    if !lock::flock(&opening, lock::Mode::TryExclusive)
        .map_err(io_err(&open_path, "locking the cache"))?
    {
        return Ok(false);
    }
    let users_path = dir.join(lock::USERS_LOCK);
    let users = lock::open(&users_path).map_err(io_err(&users_path, "opening the cache lock"))?;
    if !lock::flock(&users, lock::Mode::TryExclusive)
        .map_err(io_err(&users_path, "locking the cache"))?
    {
        return Ok(false);
    }
    // Held until removed: an opener waiting for `lock.open` finds its file gone and starts
    // the directory afresh.
    fs::remove_dir_all(dir).map_err(io_err(dir, "removing the image cache"))?;
    if let Some(root) = dir.file_name().and_then(|n| n.to_str()) {
        forget_sources_of(cache_dir, root);
    }
    Ok(true)
}

/// Drops the source-index entries that name the image `root` (best effort: a stale entry
/// only makes an offline start look for a cache that is not there).
fn forget_sources_of(cache_dir: &Path, root: &str) {
    let Ok(rd) = fs::read_dir(cache_dir.join(SOURCES_DIR)) else {
        return;
    };
    for e in rd.flatten() {
        if fs::read_to_string(e.path()).is_ok_and(|s| s.trim() == root) {
            let _ = fs::remove_file(e.path());
        }
    }
}
