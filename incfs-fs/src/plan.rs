//! The prefetch manifest: an ordered list of chunk ranges to fetch before a program asks for
//! them, bound to one image by its root digest (see `docs/prefetch-manifest.md`).

pub mod carry;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use crate::format::{Digest, Manifest};

/// The version of the prefetch manifest this build writes and reads.
pub const PLAN_VERSION: u32 = 1;
/// The first four bytes of a zstd frame: a plan file that starts with them is compressed.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest plan accepted (decompressed): 256 MiB, enough for millions of entries.
const MAX_PLAN_BYTES: u64 = 256 << 20;

fn too_large(path: &Path) -> PlanError {
    PlanError::Invalid {
        path: path.to_path_buf(),
        reason: format!(
            "larger than the {} MiB a plan may be (decompressed)",
            MAX_PLAN_BYTES >> 20
        ),
    }
}

/// Largest plan taken from beside an image ([`published`]): more than the plan of any start
/// measured here (clang-22's is 0.4 MB), and a bound on what a server can make a start read.
pub const MAX_PUBLISHED_PLAN_BYTES: u64 = 64 << 20;
/// What a plan published beside an image is called: the image's path or URL with this added
/// (`incfs pack --order` and `incfs relayout` write `IMG.plan.json`).
pub const PUBLISHED_SUFFIX: &str = ".plan.json";

/// A plan fetched from beside its image: its path or URL, for messages, and its bytes.
pub type Published = (PathBuf, Vec<u8>);

/// Longest a start waits for a published plan, retries included (at most the mount's own
/// deadline): the plan is worth a few round trips, not a stalled start.
pub const PUBLISHED_PLAN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// Fetches the plan published beside the image at `source_spec` (a path, `file://`,
/// `http(s)://` or `s3://`; the same with [`PUBLISHED_SUFFIX`]) within `retry`'s deadline,
/// at most [`PUBLISHED_PLAN_DEADLINE`]. `Ok(None)` when there is none there, and for
/// `oci://` images, whose plan is a layer of the artifact. Only fetched:
/// [`PrefetchPlan::parse`] and the mount's checks decide whether it is used.
pub fn published(
    source_spec: &str,
    retry: &crate::retry::RetryPolicy,
) -> Result<Option<Published>, crate::source::SourceError> {
    use crate::source::{self, RequestKind, SourceError};
    let beside = source::open_beside(
        source_spec,
        PUBLISHED_SUFFIX,
        retry,
        PUBLISHED_PLAN_DEADLINE,
        true,
    )?;
    let Some(source::Beside {
        spec, source: src, ..
    }) = beside
    else {
        return Ok(None);
    };
    let absent = source::is_absent;
    let len = match src.total_len() {
        Ok(l) => l,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_PUBLISHED_PLAN_BYTES {
        return Err(SourceError::Unusable(format!(
            "{spec}: {len} bytes is larger than the {} MiB a published plan may be",
            MAX_PUBLISHED_PLAN_BYTES >> 20
        )));
    }
    let bytes = if len == 0 {
        Vec::new()
    } else {
        src.read_range(0, len, RequestKind::Prefetch)?
    };
    Ok(Some((PathBuf::from(spec), bytes)))
}

/// [`published`] in a thread of its own, so the fetch overlaps the mount's metadata reads;
/// hand the handle to [`crate::fs::IncFs::start_published_prefetch`]. `None` when the thread
/// cannot start (the mount then goes on without a plan).
pub fn spawn_published(
    source_spec: &str,
    retry: &crate::retry::RetryPolicy,
) -> Option<PublishedFetch> {
    let (spec, retry) = (source_spec.to_string(), *retry);
    std::thread::Builder::new()
        .name("incfs-plan".into())
        .spawn(move || published(&spec, &retry))
        .ok()
}

/// A fetch of a published plan under way ([`spawn_published`]).
pub type PublishedFetch =
    std::thread::JoinHandle<Result<Option<Published>, crate::source::SourceError>>;

/// A prefetch manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefetchPlan {
    /// Format version, [`PLAN_VERSION`].
    pub version: u32,
    /// Root digest (hex) of the image this plan is for.
    pub image_digest: String,
    /// The image's chunk size.
    pub chunk_size: u32,
    /// Stored (compressed) bytes the entries fetch, counting each stored chunk once.
    pub total_bytes: u64,
    /// Ranges to fetch, in order.
    pub entries: Vec<PlanEntry>,
}

/// One range of chunks of one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// Path of the file in the image (`/`-separated, no leading `/`).
    pub file: String,
    /// First chunk index within the file.
    pub first_chunk: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// When the program is expected to first touch the range, in ms after start.
    pub offset_ms: f64,
    /// Share of the traced runs that touched the range, 0..=1.
    pub confidence: f64,
}

/// Errors reading or writing a prefetch manifest; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The plan file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid prefetch manifest.
    #[error("{path}: not a valid prefetch manifest: {reason}")]
    Invalid {
        /// The plan file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The plan is for another image.
    #[error("{path}: the plan is for image {plan}, but the image's root digest is {image}")]
    WrongImage {
        /// The plan file.
        path: PathBuf,
        /// Digest in the plan.
        plan: String,
        /// Digest of the image.
        image: String,
    },
}

impl PrefetchPlan {
    /// Reads a plan (JSON, or zstd-compressed JSON).
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let io = |source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut raw = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_PLAN_BYTES + 1)
            .read_to_end(&mut raw)
            .map_err(io)?;
        if raw.len() as u64 > MAX_PLAN_BYTES {
            return Err(too_large(path));
        }
        PrefetchPlan::parse(path, &raw)
    }

    /// Parses the bytes of a plan file (JSON, or zstd-compressed JSON); `path` names the
    /// file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, PlanError> {
        let invalid = |reason: String| PlanError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut out = Vec::new();
        let raw = if bytes.starts_with(&ZSTD_MAGIC) {
            zstd::Decoder::new(bytes)
                .map_err(|source| PlanError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .take(MAX_PLAN_BYTES + 1)
                .read_to_end(&mut out)
                .map_err(|e| invalid(format!("zstd: {e}")))?;
            if out.len() as u64 > MAX_PLAN_BYTES {
                return Err(too_large(path));
            }
            &out[..]
        } else {
            bytes
        };
        let plan: PrefetchPlan = serde_json::from_slice(raw).map_err(|e| invalid(e.to_string()))?;
        if plan.version != PLAN_VERSION {
            return Err(invalid(format!(
                "version {} (this incfs reads version {PLAN_VERSION})",
                plan.version
            )));
        }
        Digest::from_hex(&plan.image_digest).map_err(|e| invalid(e.to_string()))?;
        Ok(plan)
    }

    /// Writes the plan as JSON, compressed with zstd when the path ends in `.zst`; through a
    /// temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), PlanError> {
        let io = |source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| PlanError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let bytes = if path.extension().is_some_and(|e| e == "zst") {
            zstd::bulk::compress(&json, 9).map_err(io)?
        } else {
            json
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// The chunk slots the plan fetches, in plan order, each once (at its first place),
    /// found through the image's file paths. Fails, naming the plan file, when an entry names a file the image lacks or
    /// chunks past its end, or when the chunk sizes differ.
    pub fn slots(&self, path: &Path, manifest: &Manifest) -> Result<Vec<u64>, PlanError> {
        let invalid = |reason: String| PlanError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if self.chunk_size != manifest.chunk_size {
            return Err(invalid(format!(
                "chunk size {} but the image's is {}",
                self.chunk_size, manifest.chunk_size
            )));
        }
        let files: HashMap<Vec<u8>, (u64, u64)> = manifest
            .files()
            .into_iter()
            .map(|f| (f.path, (f.first_chunk, f.chunks)))
            .collect();
        // Each slot once, at its first place: a plan repeating entries (as a hostile or
        // careless one may, whole files many times over) costs no more than the image has.
        let mut seen = vec![0u64; usize::try_from(manifest.chunk_count.div_ceil(64)).unwrap_or(0)];
        let mut out = Vec::new();
        for e in &self.entries {
            let &(first, n) = files
                .get(e.file.as_bytes())
                .ok_or_else(|| invalid(format!("{}: no such file in the image", e.file)))?;
            match e.first_chunk.checked_add(e.chunk_count) {
                Some(end) if end <= n => {
                    for slot in first + e.first_chunk..first + end {
                        let Some(w) = seen.get_mut((slot / 64) as usize) else {
                            return Err(invalid(format!(
                                "{}: chunk slot {slot} is past the image's {} chunks",
                                e.file, manifest.chunk_count
                            )));
                        };
                        if *w & (1 << (slot % 64)) == 0 {
                            *w |= 1 << (slot % 64);
                            out.push(slot);
                        }
                    }
                }
                _ => {
                    return Err(invalid(format!(
                        "{}: chunks {}+{} past its {n} chunks",
                        e.file, e.first_chunk, e.chunk_count
                    )));
                }
            }
        }
        Ok(out)
    }

    /// The same plan for another image of the same tree and chunk size (e.g. the image
    /// `relayout` wrote).
    pub fn rebind(&self, image: &Digest) -> Self {
        PrefetchPlan {
            image_digest: image.to_hex(),
            ..self.clone()
        }
    }

    /// Refuses a plan made for another image.
    pub fn check_image(&self, path: &Path, image: &Digest) -> Result<(), PlanError> {
        if self.image_digest.eq_ignore_ascii_case(&image.to_hex()) {
            Ok(())
        } else {
            Err(PlanError::WrongImage {
                path: path.to_path_buf(),
                plan: self.image_digest.clone(),
                image: image.to_hex(),
            })
        }
    }
}
