//! What a mount keeps of an image's metadata, so that it can start again without its source.
//!
//! Beside the chunk data, an image's cache holds `head` (the image's first bytes: header and
//! manifest) and `table` (a sparse copy of the chunk table, each segment written when it was
//! loaded), and the cache directory holds `sources/<BLAKE3 of the source's name>`, the root
//! digest last mounted from that source. None of it is trusted: a mount that cannot reach its
//! source reads `head` back and verifies it against the root digest (the one `--expect-digest`
//! names, or the index's), and each table segment against the manifest's digest of it, as if
//! they had come from the source. Every write is a temporary file renamed into place or a
//! `pwrite` of bytes whose digest a later read checks, so a crash leaves nothing a reader
//! would take for good.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{Digest, FormatError, Header, ImageHead, RangeRead, read_head};

/// Name of the image's first bytes (header and manifest) in its cache.
pub const HEAD_FILE: &str = "head";
/// Name of the sparse copy of the chunk table in an image's cache.
pub const TABLE_FILE: &str = "table";
/// Directory of the source → root digest index in a cache directory.
pub const SOURCES_DIR: &str = "sources";

fn source_key(source_name: &str) -> String {
    blake3::hash(source_name.as_bytes()).to_hex().to_string()
}

/// Writes `bytes` to `path` whole or not at all: a temporary file of its own, renamed over
/// it (two writers leave one or the other's bytes); synced first when `durable`.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    if durable {
        tmp.as_file().sync_data()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Keeps `prefix` (the image's first bytes, at least through the manifest) in the cache of
/// the image with `root` under `cache_dir`, and notes that `source_name` served that image.
pub fn save_head(
    cache_dir: &Path,
    source_name: &str,
    root: &Digest,
    prefix: &[u8],
) -> io::Result<()> {
    let dir = super::image_dir(cache_dir, root);
    let head = dir.join(HEAD_FILE);
    if fs::read(&head).ok().as_deref() != Some(prefix) {
        write_atomic(&head, prefix, true)?;
    }
    let index = cache_dir.join(SOURCES_DIR).join(source_key(source_name));
    if fs::read_to_string(&index).ok().as_deref() != Some(root.to_hex().as_str()) {
        write_atomic(&index, root.to_hex().as_bytes(), true)?;
    }
    Ok(())
}

/// The image's first bytes kept in a cache, as a [`RangeRead`] whose length is the image's.
struct Prefix {
    bytes: Vec<u8>,
    total: u64,
}

impl RangeRead for Prefix {
    /// The kept bytes, and zeros past them: whatever is read is verified (the manifest
    /// against the root digest, table segments against the manifest), so zeros in place of
    /// bytes never kept are refused like any damaged bytes, never used.
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.total)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the image"))?;
        let n = usize::try_from(len).map_err(io::Error::other)?;
        let mut out = vec![0u8; n];
        let have = self.bytes.len() as u64;
        if offset < have {
            let upto = end.min(have);
            out[..(upto - offset) as usize]
                .copy_from_slice(&self.bytes[offset as usize..upto as usize]);
        }
        Ok(out)
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.total)
    }
}

/// True when the cache under `cache_dir` keeps a head for the image with root `expect`, or
/// else for the one `source_name` last served (not verified: [`load_head`] does that).
pub fn holds_head(cache_dir: &Path, source_name: &str, expect: Option<&Digest>) -> bool {
    kept_head_path(cache_dir, source_name, expect)
        .is_ok_and(|p| p.is_some_and(|(_, p)| p.is_file()))
}

/// The root digest `expect` names, or else the one the index says `source_name` last
/// served, and the path of that image's kept head; `None` when the index has no entry.
fn kept_head_path(
    cache_dir: &Path,
    source_name: &str,
    expect: Option<&Digest>,
) -> Result<Option<(Digest, PathBuf)>, FormatError> {
    let root = match expect {
        Some(d) => *d,
        None => {
            let index = cache_dir.join(SOURCES_DIR).join(source_key(source_name));
            let Ok(hex) = fs::read_to_string(index) else {
                return Ok(None);
            };
            Digest::from_hex(hex.trim())?
        }
    };
    Ok(Some((
        root,
        super::image_dir(cache_dir, &root).join(HEAD_FILE),
    )))
}

/// The verified head of the image `source_name` last served (or of the image with root
/// `expect`), from the cache under `cache_dir`; `None` when the cache holds none.
pub fn load_head(
    cache_dir: &Path,
    source_name: &str,
    expect: Option<&Digest>,
) -> Result<Option<ImageHead>, FormatError> {
    let Some((root, path)) = kept_head_path(cache_dir, source_name, expect)? else {
        return Ok(None);
    };
    let Ok(bytes) = fs::read(path) else {
        return Ok(None);
    };
    let total = Header::decode(&bytes)?.image_len();
    read_head(&Prefix { bytes, total }, Some(&root)).map(Some)
}

/// The sparse copy of an image's chunk table in its cache.
#[derive(Debug)]
pub struct TableStore {
    path: PathBuf,
    file: File,
}

impl TableStore {
    /// Opens (creating) the table copy of the image with `root` under `cache_dir`.
    pub fn open(cache_dir: &Path, root: &Digest, table_len: u64) -> io::Result<Self> {
        let dir = super::image_dir(cache_dir, root);
        fs::create_dir_all(&dir)?;
        let path = dir.join(TABLE_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if file.metadata()?.len() != table_len {
            file.set_len(table_len)?;
        }
        Ok(TableStore { path, file })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the bytes of a verified segment at `offset` (from the table's start).
    pub fn save(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// The `len` bytes at `offset` (zeros where nothing was saved; the caller verifies).
    pub fn load(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}
