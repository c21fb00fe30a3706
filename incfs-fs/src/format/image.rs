//! Reading an image from anything that serves byte ranges.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use super::{
    CHUNK_ENTRY_LEN, ChunkEntry, ChunkTable, Dictionaries, Digest, FormatError, HEADER_LEN, Header,
    Inode, InodeKind, Manifest, Prepared, chunk_of_frame, decode_frame,
};

/// The first read of a remote image: the header and, for most trees, the whole manifest.
pub const INITIAL_READ: u64 = 256 * 1024;

/// Random access to an image's bytes: a local file, an HTTP server, a test double.
pub trait RangeRead {
    /// Reads exactly `len` bytes at `offset`.
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Total length of the image.
    fn total_len(&self) -> io::Result<u64>;
}

impl RangeRead for File {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("range too long"))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl RangeRead for Vec<u8> {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = usize::try_from(offset.saturating_add(len))
            .map_err(|_| io::ErrorKind::UnexpectedEof)?;
        self.get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }

    fn total_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: RangeRead + ?Sized> RangeRead for &T {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        (**self).read_range(offset, len)
    }
    fn total_len(&self) -> io::Result<u64> {
        (**self).total_len()
    }
}

/// What the first read of an image gives: its header, its verified manifest, and the bytes
/// of that read (from offset 0), which often hold part or all of the chunk table too.
#[derive(Debug, Clone)]
pub struct ImageHead {
    /// The header.
    pub header: Header,
    /// The manifest, verified against the header's root digest.
    pub manifest: Manifest,
    /// The image's first bytes, as read.
    pub first: Vec<u8>,
}

/// Reads and verifies an image's header and manifest (against the header's root digest, and
/// `expected` when given), in one read for most trees and two otherwise. The chunk table is
/// left to the caller: whole ([`read_meta`]) or a segment at a time (a mount).
pub fn read_head<R: RangeRead + ?Sized>(
    src: &R,
    expected: Option<&Digest>,
) -> Result<ImageHead, FormatError> {
    let total = src.total_len()?;
    let first = src.read_range(0, INITIAL_READ.min(total))?;
    let header = Header::decode(&first)?;
    if let Some(want) = expected
        && *want != header.root_digest
    {
        return Err(FormatError::RootDigest {
            expected: *want,
            found: header.root_digest,
        });
    }
    if total < header.image_len() {
        return Err(FormatError::Truncated {
            what: "data section",
            needed: header.image_len(),
            have: total,
        });
    }
    let stored = section(src, &first, header.manifest_offset, header.manifest_len)?;
    let manifest = Manifest::decode(&stored, &header.root_digest)?;
    if manifest.chunk_size != header.chunk_size || manifest.data_len != header.data_len {
        return Err(FormatError::ManifestInvalid(
            "manifest and header disagree on chunk size or data length".into(),
        ));
    }
    if manifest.chunk_count.checked_mul(CHUNK_ENTRY_LEN as u64) != Some(header.chunk_table_len) {
        return Err(FormatError::ManifestInvalid(
            "chunk table length does not match the chunk count".into(),
        ));
    }
    Ok(ImageHead {
        header,
        manifest,
        first,
    })
}

/// Like [`read_head`], for an image whose verified head a cache holds (`known`, taken when
/// used): reads only the header, and when it is `known`'s, answers with `known` — a start
/// from a warm cache asks the source for 128 bytes instead of the manifest again. An image
/// that changed (another header) is read as [`read_head`] reads it, and `known` is dropped.
pub fn read_head_or_known<R: RangeRead + ?Sized>(
    src: &R,
    expected: Option<&Digest>,
    known: &mut Option<ImageHead>,
) -> Result<ImageHead, FormatError> {
    if let Some(k) = known.as_ref() {
        let total = src.total_len()?;
        let first = src.read_range(0, (HEADER_LEN as u64).min(total))?;
        let header = Header::decode(&first)?;
        let same = header == k.header
            && total >= header.image_len()
            && expected.is_none_or(|d| *d == header.root_digest);
        if same && let Some(k) = known.take() {
            return Ok(k);
        }
        *known = None;
    }
    read_head(src, expected)
}

/// The bytes `offset..offset + len` of the image: from `first` (its first bytes) when they
/// hold them, else read.
fn section<R: RangeRead + ?Sized>(
    src: &R,
    first: &[u8],
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, FormatError> {
    match offset.checked_add(len) {
        Some(end) if end <= first.len() as u64 => Ok(first[offset as usize..end as usize].to_vec()),
        _ => Ok(src.read_range(offset, len)?),
    }
}

/// Reads and verifies an image's metadata: header, manifest (against the header's root
/// digest, and `expected` when given) and the whole chunk table, in at most three reads.
pub fn read_meta<R: RangeRead + ?Sized>(
    src: &R,
    expected: Option<&Digest>,
) -> Result<(Header, Manifest, ChunkTable), FormatError> {
    let ImageHead {
        header,
        manifest,
        first,
    } = read_head(src, expected)?;
    let table_bytes = section(
        src,
        &first,
        header.chunk_table_offset,
        header.chunk_table_len,
    )?;
    let table = ChunkTable::decode(
        &table_bytes,
        &manifest.segment_digests,
        manifest.chunk_size,
        manifest.data_len,
        &manifest.order()?,
    )?;
    Ok((header, manifest, table))
}

/// A regular file of the image, as `files()` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// Path relative to the image root, components joined by `/`.
    pub path: Vec<u8>,
    /// Index of the inode in the manifest.
    pub inode: u32,
    /// Length in bytes.
    pub size: u64,
    /// First chunk slot.
    pub first_chunk: u64,
    /// Number of chunks.
    pub chunks: u64,
}

impl FileRef {
    /// The path for display (lossy for non-UTF-8 names).
    pub fn display_path(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// One chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// A file that uses the chunk (lossy UTF-8), or `None` if no file does.
    pub path: Option<String>,
    /// The chunk's index within that file.
    pub chunk_index: u64,
    /// The chunk slot.
    pub slot: u64,
    /// What is wrong.
    pub reason: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunk slots checked.
    pub chunks: u64,
    /// Uncompressed bytes checked.
    pub raw_bytes: u64,
    /// Stored bytes read.
    pub stored_bytes: u64,
    /// Chunks that did not decode or match their digest.
    pub failures: Vec<VerifyFailure>,
}

/// An open image: verified metadata plus the source of its chunks.
pub struct Image<R> {
    src: R,
    header: Header,
    manifest: Manifest,
    table: ChunkTable,
    dictionaries: Dictionaries,
}

impl Image<File> {
    /// Opens an image file.
    pub fn open_path(path: &Path, expected: Option<&Digest>) -> Result<Self, FormatError> {
        Image::open(File::open(path)?, expected)
    }
}

impl<R: RangeRead> Image<R> {
    /// Opens an image, reading and verifying its metadata.
    pub fn open(src: R, expected: Option<&Digest>) -> Result<Self, FormatError> {
        let (header, manifest, table) = read_meta(&src, expected)?;
        let dictionaries = Dictionaries::new(&manifest.dictionaries);
        Ok(Image {
            src,
            header,
            manifest,
            table,
            dictionaries,
        })
    }

    /// Where the image's bytes come from.
    pub fn source(&self) -> &R {
        &self.src
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk table.
    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    /// The root digest (BLAKE3 of the stored manifest).
    pub fn root_digest(&self) -> Digest {
        self.header.root_digest
    }

    /// The inode at `index`.
    pub fn inode(&self, index: u32) -> Option<&Inode> {
        self.manifest.inodes.get(index as usize)
    }

    /// Reads, decodes and verifies the chunk in `slot`.
    pub fn read_chunk(&self, slot: u64) -> Result<Vec<u8>, FormatError> {
        chunk_of_frame(slot, self.entry(slot)?, &self.read_frame(slot)?)
    }

    fn entry(&self, slot: u64) -> Result<&ChunkEntry, FormatError> {
        self.table
            .get(slot)
            .ok_or_else(|| FormatError::EntryInvalid {
                slot,
                reason: "no such slot".into(),
            })
    }

    /// Reads and decodes the frame holding `slot` (not yet checked against any digest).
    pub(super) fn read_frame(&self, slot: u64) -> Result<Vec<u8>, FormatError> {
        let entry = self.entry(slot)?;
        let stored = self.src.read_range(
            self.header.data_offset + entry.stored_offset,
            u64::from(entry.stored_len),
        )?;
        decode_frame(slot, entry, &stored, self.dictionary(entry.dictionary)?)
    }

    /// The dictionary an entry names as `number` (`None` for 0), read and checked once.
    pub fn dictionary(&self, number: u8) -> Result<Option<&Prepared>, FormatError> {
        self.dictionaries.get(number, |d| {
            Ok(self
                .src
                .read_range(self.header.data_offset + d.offset, u64::from(d.len))?)
        })
    }

    /// Reads a whole regular file, verifying every chunk.
    pub fn read_file(&self, inode: u32) -> Result<Vec<u8>, FormatError> {
        let Some(Inode {
            kind: InodeKind::File { size, first_chunk },
            ..
        }) = self.inode(inode)
        else {
            return Err(FormatError::ManifestInvalid(format!(
                "inode {inode} is not a file"
            )));
        };
        let mut out = Vec::with_capacity(usize::try_from(*size).unwrap_or(0));
        let chunk = u64::from(self.manifest.chunk_size);
        for i in 0..self.manifest.chunks_for(*size) {
            let data = self.read_chunk(first_chunk + i)?;
            let want = (*size - i * chunk).min(chunk);
            if data.len() as u64 != want {
                return Err(FormatError::ChunkCorrupt {
                    slot: first_chunk + i,
                    reason: format!("holds {} bytes, file needs {want}", data.len()),
                });
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// Every entry of the tree with its path and inode index ([`Manifest::walk`]).
    pub fn walk(&self) -> Vec<(Vec<u8>, u32)> {
        self.manifest.walk()
    }

    /// Every regular file, each inode once ([`Manifest::files`]).
    pub fn files(&self) -> Vec<FileRef> {
        self.manifest.files()
    }
}

impl<R: RangeRead + Sync> Image<R> {
    /// Checks every chunk against its digest, in parallel, calling `progress` with the raw
    /// bytes of each chunk checked. Failures name a file that uses the chunk.
    pub fn verify(&self, progress: &(dyn Fn(u64) + Sync)) -> VerifyReport {
        // Slots by the frame that holds them: each frame is read and decoded once.
        let mut frames: HashMap<(u64, u32, u32), Vec<u64>> = HashMap::new();
        for (slot, e) in self.table.entries().iter().enumerate() {
            frames
                .entry((e.stored_offset, e.stored_len, e.frame_len))
                .or_default()
                .push(slot as u64);
        }
        let stored_bytes = frames.keys().map(|(_, len, _)| u64::from(*len)).sum();
        let mut frames: Vec<((u64, u32, u32), Vec<u64>)> = frames.into_iter().collect();
        frames.sort_unstable_by_key(|(k, _)| *k);
        let results: Vec<(u64, Result<u64, String>)> = frames
            .par_iter()
            .flat_map_iter(|(_, slots)| {
                let frame = self.read_frame(slots[0]).map_err(|e| e.to_string());
                slots.iter().map(move |&slot| {
                    let r = match (&frame, self.table.get(slot)) {
                        (Ok(f), Some(e)) => chunk_of_frame(slot, e, f)
                            .map(|d| d.len() as u64)
                            .map_err(|e| e.to_string()),
                        (Err(e), _) => Err(e.clone()),
                        (_, None) => Err(format!("chunk slot {slot}: no such slot")),
                    };
                    if let Ok(n) = r {
                        progress(n);
                    }
                    (slot, r)
                })
            })
            .collect();
        let mut report = VerifyReport {
            chunks: self.table.len(),
            stored_bytes,
            ..VerifyReport::default()
        };
        let files = self.files();
        for (slot, r) in results {
            match r {
                Ok(n) => report.raw_bytes += n,
                Err(reason) => {
                    let owner = files
                        .iter()
                        .find(|f| (f.first_chunk..f.first_chunk + f.chunks).contains(&slot));
                    report.failures.push(VerifyFailure {
                        path: owner.map(FileRef::display_path),
                        chunk_index: owner.map_or(0, |f| slot - f.first_chunk),
                        slot,
                        reason,
                    });
                }
            }
        }
        report
    }
}
