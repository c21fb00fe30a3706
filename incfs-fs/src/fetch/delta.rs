//! Chunks rebuilt from deltas against an older image the cache holds
//! ([`crate::format::delta`]).
//!
//! At mount, when the cache directory holds another image's cache, [`fetch`] reads the
//! header of the sidecar published beside the image (`IMG.delta`); when the sidecar's base
//! image is one of those caches, its index too. The scheduler then asks for a chunk that has
//! a delta, whose window the base's cache holds, as that delta instead ([`Deltas`], used by
//! the fetch workers): the delta is decoded against the window and checked against the
//! chunk's digest in this image's verified table before it is stored, like any fetched
//! chunk; a delta that fails is dropped and the chunk fetched as usual.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::format::Digest;
use crate::format::delta::{DELTA_HEADER_LEN, DELTA_SUFFIX, DeltaEntry, parse_header, parse_index};
use crate::retry::RetryPolicy;
use crate::source::{self, RequestKind, Source, SourceError};

/// Longest a mount spends on the sidecar, retries included: it is worth a few round trips.
pub const SIDECAR_DEADLINE: Duration = Duration::from_secs(3);

/// The deltas of an image against a base image the cache holds.
pub struct Deltas {
    pub(super) source: Arc<dyn Source>,
    pub(super) base_root: Digest,
    pub(super) by_slot: HashMap<u64, DeltaEntry>,
    pub(super) data_start: u64,
}

impl std::fmt::Debug for Deltas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deltas")
            .field("source", &self.source.describe())
            .field("base", &self.base_root.to_hex())
            .field("chunks", &self.by_slot.len())
            .finish()
    }
}

impl Deltas {
    /// Chunks that have a delta.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// True when no chunk has one.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

/// True when `cache_dir` holds any image's cache (a directory named by a root digest).
fn holds_any_image(cache_dir: &Path) -> bool {
    std::fs::read_dir(cache_dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| Digest::from_hex(&e.file_name().to_string_lossy()).is_ok())
    })
}

/// The deltas published beside the image at `source_spec` (`SPEC.delta`), when
/// `cache_dir` holds the cache of the base image they are made against; with the root
/// digest of the image they are for (the mount checks it is its own). `Ok(None)` when no
/// other image is cached there, there is no sidecar, or its base is not cached (`oci://`
/// images carry none).
pub fn fetch(
    source_spec: &str,
    cache_dir: &Path,
    retry: &RetryPolicy,
) -> Result<Option<(Deltas, Digest)>, SourceError> {
    if !holds_any_image(cache_dir) {
        return Ok(None);
    }
    let Some(source::Beside {
        spec,
        source: src,
        retry,
    }) = source::open_beside(source_spec, DELTA_SUFFIX, retry, SIDECAR_DEADLINE, false)?
    else {
        return Ok(None);
    };
    let unusable = |why: String| SourceError::Unusable(format!("{spec}: {why}"));
    let timeout = retry.attempt_timeout();
    let len = src.total_len()?;
    if len < DELTA_HEADER_LEN {
        return Err(unusable(format!("{len} bytes is no delta sidecar")));
    }
    let header = source::read_within(&*src, 0, DELTA_HEADER_LEN, RequestKind::Prefetch, timeout)?;
    let (base_root, for_image, index_len) =
        parse_header(&header).map_err(|e| unusable(e.to_string()))?;
    if !crate::cache::image_dir(cache_dir, &base_root)
        .join("record")
        .is_file()
    {
        tracing::debug!(sidecar = %spec, base = %base_root, "the deltas' base image is not cached here");
        return Ok(None);
    }
    if DELTA_HEADER_LEN + index_len > len {
        return Err(unusable("the index runs past the end".into()));
    }
    let index = source::read_within(
        &*src,
        DELTA_HEADER_LEN,
        index_len,
        RequestKind::Prefetch,
        timeout,
    )?;
    let entries = parse_index(&index, index_len).map_err(|e| unusable(e.to_string()))?;
    let by_slot = entries.iter().map(|e| (e.slot, *e)).collect();
    let deltas = Deltas {
        source: src,
        base_root,
        by_slot,
        data_start: DELTA_HEADER_LEN + index_len,
    };
    Ok(Some((deltas, for_image)))
}

/// [`fetch`] in a thread of its own, so it overlaps the mount's metadata reads; hand the
/// handle to [`crate::fs::IncFs::use_deltas`]. `None` when the thread cannot start.
pub fn spawn_fetch(source_spec: &str, cache_dir: &Path, retry: &RetryPolicy) -> Option<DeltaFetch> {
    let (spec, dir, retry) = (source_spec.to_string(), cache_dir.to_path_buf(), *retry);
    std::thread::Builder::new()
        .name("incfs-deltas".into())
        .spawn(move || fetch(&spec, &dir, &retry))
        .ok()
}

/// A fetch of a delta sidecar under way ([`spawn_fetch`]).
pub type DeltaFetch = std::thread::JoinHandle<Result<Option<(Deltas, Digest)>, SourceError>>;
