//! The background fill's own frames, from the sidecar published beside the image
//! ([`crate::format::bulk`]).
//!
//! When the fill starts with chunks left to fetch, it reads the sidecar's header and index
//! (`IMG.bulk`) through [`super::Fetcher::take_up_bulk`] (in a thread of its own, which an
//! unmount does not wait for); a mount never waits for it, and a complete cache never asks. From then on the scheduler asks for a background batch's
//! chunks as the sidecar's frames that hold them; every chunk taken out of a decoded frame
//! is checked against its digest in the image's verified table before it is stored, and
//! chunks whose frame did not come or did not verify are fetched from the image as usual.

use std::sync::Arc;

use super::delta::SIDECAR_DEADLINE;
use crate::format::bulk::{BULK_HEADER_LEN, BULK_SUFFIX, BulkFrame, parse_header, parse_index};
use crate::format::{Digest, FormatError};
use crate::retry::RetryPolicy;
use crate::source::{self, RequestKind, Source, SourceError};

/// The sidecar's header and index as fetched, not yet checked against the image.
pub struct Fetched {
    spec: String,
    source: Arc<dyn Source>,
    root: Digest,
    index: Vec<u8>,
}

/// A sidecar checked against the image it serves.
pub struct Bulk {
    pub(super) spec: String,
    pub(super) source: Arc<dyn Source>,
    pub(super) frames: Vec<BulkFrame>,
    /// Per slot, the frame holding it (`u32::MAX`: none).
    frame_of: Vec<u32>,
    /// Where the frames start in the sidecar.
    pub(super) data_start: u64,
}

impl std::fmt::Debug for Bulk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bulk")
            .field("spec", &self.spec)
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl Bulk {
    /// Checks a fetched sidecar against the image whose root digest is `root` and whose
    /// table has `slots` slots.
    pub fn new(fetched: Fetched, root: &Digest, slots: u64) -> Result<Self, FormatError> {
        if fetched.root != *root {
            return Err(FormatError::BulkInvalid(format!(
                "{} is for image {}, not {root}",
                fetched.spec, fetched.root
            )));
        }
        let len = fetched.index.len() as u64;
        let frames = parse_index(&fetched.index, len, slots)
            .map_err(|e| FormatError::BulkInvalid(format!("{}: {e}", fetched.spec)))?;
        let mut frame_of = vec![u32::MAX; usize::try_from(slots).unwrap_or(0)];
        for (k, f) in frames.iter().enumerate() {
            for s in f.slots() {
                if let Some(x) = frame_of.get_mut(s as usize) {
                    *x = k as u32;
                }
            }
        }
        Ok(Bulk {
            spec: fetched.spec,
            source: fetched.source,
            frames,
            frame_of,
            data_start: BULK_HEADER_LEN + len,
        })
    }

    /// The frame holding `slot`.
    pub(super) fn frame_of(&self, slot: u64) -> Option<usize> {
        self.frame_of
            .get(slot as usize)
            .filter(|&&k| k != u32::MAX)
            .map(|&k| k as usize)
    }

    /// Frames in the sidecar.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when it has none.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The header and index of the sidecar published beside the image at `source_spec`
/// (`SPEC.bulk`; an `oci://` artifact's bulk layer). `Ok(None)` when there is none.
pub fn fetch(source_spec: &str, retry: &RetryPolicy) -> Result<Option<Fetched>, SourceError> {
    let Some(source::Beside {
        spec,
        source: src,
        retry,
    }) = source::open_beside(source_spec, BULK_SUFFIX, retry, SIDECAR_DEADLINE, false)?
    else {
        return Ok(None);
    };
    let unusable = |why: String| SourceError::Unusable(format!("{spec}: {why}"));
    let timeout = retry.attempt_timeout();
    let len = src.total_len()?;
    if len < BULK_HEADER_LEN {
        return Err(unusable(format!("{len} bytes is no bulk sidecar")));
    }
    let header = source::read_within(&*src, 0, BULK_HEADER_LEN, RequestKind::Background, timeout)?;
    let (root, index_len) = parse_header(&header).map_err(|e| unusable(e.to_string()))?;
    if BULK_HEADER_LEN + index_len > len {
        return Err(unusable("the index runs past the end".into()));
    }
    let index = source::read_within(
        &*src,
        BULK_HEADER_LEN,
        index_len,
        RequestKind::Background,
        timeout,
    )?;
    Ok(Some(Fetched {
        spec,
        source: src,
        root,
        index,
    }))
}

/// [`fetch`] in a thread of its own. `None` when the thread cannot start.
pub(super) fn spawn_fetch(source_spec: &str, retry: &RetryPolicy) -> Option<BulkFetch> {
    let (spec, retry) = (source_spec.to_string(), *retry);
    std::thread::Builder::new()
        .name("incfs-bulk".into())
        .spawn(move || fetch(&spec, &retry))
        .ok()
}

/// A fetch of a bulk sidecar under way ([`spawn_fetch`]).
pub(super) type BulkFetch = std::thread::JoinHandle<Result<Option<Fetched>, SourceError>>;
