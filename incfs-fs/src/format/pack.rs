//! Packing a directory tree into an image.
//!
//! Two passes: the walk builds the manifest's inodes (never following a symlink, skipping
//! what cannot be stored with a warning), then the data pass reads every regular file once,
//! in [`Manifest::walk`] order, cuts it into chunks, compresses batches of chunks on all
//! cores, stores each distinct chunk once, and writes header, manifest, chunk table and data
//! to a temporary file that is renamed over the output at the end.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::dictionary::Encoder;
use super::grouping::{Trained, train_dictionaries};
use super::layout::{FileSpan, WHOLE_FRAME_BYTES, place};
use super::{
    ChunkEntry, ChunkTable, DEFAULT_CHUNK_SIZE, Dictionary, Digest, DirEntry, FormatError,
    HEADER_LEN, Header, Inode, InodeKind, MAX_CHUNK_SIZE, MAX_FRAME_LEN, MIN_CHUNK_SIZE, Manifest,
    Xattr, encode_frame_with,
};

/// Bytes of file data compressed per parallel batch: large enough to keep every core busy,
/// small enough to bound memory (two batches in flight at most: raw plus compressed).
const BATCH_BYTES: usize = 32 * 1024 * 1024;
/// zstd level for the manifest, which is small and read on every mount.
const MANIFEST_LEVEL: i32 = 19;

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Logical chunk size: a power of two from 4 KiB to 1 MiB. Default
    /// [`DEFAULT_CHUNK_SIZE`](super::DEFAULT_CHUNK_SIZE).
    pub chunk_size: u32,
    /// zstd level for chunks (1..=22). Default 15: with dictionaries, clang-22's tree packs to
    /// 69.0 MB at 15 (~6 MB/s a core), 78.5 MB at 3 (over 100 MB/s a core), 68.8 MB at 19
    /// (~3.5 MB/s a core); a start moves fewer bytes for every level gained, and an image is
    /// packed once.
    pub level: i32,
    /// Raw bytes of consecutive distinct chunks compressed together into one frame (at most
    /// [`MAX_FRAME_LEN`]); `0` or anything up to the chunk size keeps one chunk per frame
    /// (the default). A read of any chunk of a frame fetches the whole frame. With
    /// `whole_frames`, chunks that are read whole anyway share frames of up to 256 KiB
    /// whatever this says.
    pub frame_bytes: u32,
    /// Train zstd dictionaries for groups of similar chunks ([`super::grouping`]) and
    /// compress each chunk of a group with its dictionary. Default on.
    pub dictionaries: bool,
    /// Store the sections of ELF files that a start does not read (unwind tables, symbols,
    /// debug information) after every other chunk ([`super::layout`]). Default on; off
    /// keeps every chunk in file order.
    pub late_sections_last: bool,
    /// Compress chunks that are read whole anyway (a small file, an ELF file's loader and
    /// late sections) in shared frames of up to 256 KiB ([`super::layout::Placement::whole`]).
    /// Off by default here, so a chunk is its own frame unless `frame_bytes` says otherwise
    /// (what fetch accounting and updates count chunk by chunk); `incfs pack` turns it on
    /// unless given `--chunk-frames`. Off, an update of a small file fetches only its
    /// changed chunks, not its frame.
    pub whole_frames: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: 15,
            frame_bytes: 0,
            dictionaries: true,
            late_sections_last: true,
            whole_frames: false,
        }
    }
}

/// Receives progress from `pack_dir`; called from worker threads.
pub trait PackProgress: Sync {
    /// The walk is done: this many bytes of file data will be read.
    fn start(&self, _total_bytes: u64) {}
    /// This many more bytes were packed.
    fn advance(&self, _bytes: u64) {}
    /// Something under the tree was skipped.
    fn skipped(&self, _path: &Path, _why: &str) {}
}

impl PackProgress for () {}

/// What `pack_dir` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// Regular files stored (hard links count once).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Extra names of hard-linked files.
    pub hardlinks: u64,
    /// Entries skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Bytes of file data.
    pub raw_bytes: u64,
    /// Bytes of the data section (compressed, deduplicated).
    pub stored_bytes: u64,
    /// Chunk slots.
    pub chunks: u64,
    /// Distinct chunks stored.
    pub unique_chunks: u64,
    /// Raw bytes not stored again because an identical chunk was.
    pub dedupe_saved: u64,
    /// Chunk slots of late sections, stored after everything else.
    pub late_chunks: u64,
    /// Stored bytes of the late tail.
    pub late_bytes: u64,
    /// Size of the whole image.
    pub image_bytes: u64,
    /// The root digest.
    pub root_digest: Digest,
    /// Wall time.
    pub elapsed: Duration,
}

/// Errors from packing.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Option(String),
    /// The tree root is not a readable directory.
    #[error("{path}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be read during the data pass.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The output could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The output.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Encoding failed.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Packs the tree at `dir` into an image at `out`.
pub fn pack_dir(
    dir: &Path,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn PackProgress,
) -> Result<PackSummary, PackError> {
    let started = Instant::now();
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size)
        || !opts.chunk_size.is_power_of_two()
    {
        return Err(PackError::Option(format!(
            "chunk size {} is not a power of two from 4 KiB to 1 MiB",
            opts.chunk_size
        )));
    }
    if opts.frame_bytes > MAX_FRAME_LEN {
        return Err(PackError::Option(format!(
            "frame size {} is larger than {MAX_FRAME_LEN}",
            opts.frame_bytes
        )));
    }
    if !(1..=22).contains(&opts.level) {
        return Err(PackError::Option(format!(
            "zstd level {} is not in 1..=22",
            opts.level
        )));
    }
    let root_meta = fs::metadata(dir).map_err(|source| PackError::Root {
        path: dir.to_path_buf(),
        source,
    })?;
    if !root_meta.is_dir() {
        return Err(PackError::Root {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }

    let mut walk = Walk {
        inodes: Vec::new(),
        sources: Vec::new(),
        hardlinks: HashMap::new(),
        skipped: Vec::new(),
        progress,
        counts: Counts::default(),
    };
    walk.add_dir(dir, &root_meta)
        .map_err(|source| PackError::Root {
            path: dir.to_path_buf(),
            source,
        })?;

    let mut manifest = Manifest {
        chunk_size: opts.chunk_size,
        chunk_count: 0,
        data_len: 0,
        segment_digests: Vec::new(),
        table_order: Vec::new(),
        inodes: walk.inodes,
        dictionaries: Vec::new(),
    };
    let order = file_order(&manifest);
    let total: u64 = order
        .iter()
        .map(|&i| file_size(&manifest.inodes[i as usize]))
        .sum();
    progress.start(total);

    let werr = |source: io::Error| PackError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut spans = Vec::with_capacity(order.len());
    let mut slots = 0u64;
    for &inode in &order {
        let size = file_size(&manifest.inodes[inode as usize]);
        if let Some((path, key)) = &walk.sources[inode as usize] {
            spans.push(FileSpan {
                path,
                key: *key,
                size,
                first_slot: slots,
            });
        }
        slots += manifest.chunks_for(size);
    }
    let trained = if opts.dictionaries {
        train_dictionaries(&spans, opts.chunk_size, slots, opts.level)?
    } else {
        Trained::default()
    };
    let placement = place(&spans, slots, opts)?;
    drop(spans);
    let mut data = tempfile::tempfile_in(parent_dir(out)).map_err(werr)?;
    // The dictionaries lead the data section: a reader needs one before the first chunk of
    // its group.
    let mut dict_len = 0u64;
    for d in &trained.dictionaries {
        data.write_all(d).map_err(werr)?;
        manifest.dictionaries.push(Dictionary {
            offset: dict_len,
            len: d.len() as u32,
            digest: Digest::of(d),
        });
        dict_len += d.len() as u64;
    }
    let encoders: Vec<Encoder> = trained
        .dictionaries
        .iter()
        .map(|d| Encoder::new(d, opts.level))
        .collect();
    let mut tail = tempfile::tempfile_in(parent_dir(out)).map_err(werr)?;
    let mut writer = ChunkWriter {
        out: &mut data,
        tail: &mut tail,
        slot_dictionary: &trained.slot_dictionary,
        late: &placement.late,
        whole: &placement.whole,
        encoders: &encoders,
        entries: Vec::new(),
        seen: HashMap::new(),
        data_len: dict_len,
        tail_len: 0,
        unique: 0,
        dedupe_saved: 0,
    };
    let mut batch = Batch::new();
    for &inode in &order {
        let size = file_size(&manifest.inodes[inode as usize]);
        let first_chunk = batch.next_slot;
        if let InodeKind::File { first_chunk: f, .. } = &mut manifest.inodes[inode as usize].kind {
            *f = first_chunk;
        }
        let (path, key) = walk.sources[inode as usize].clone().unwrap_or_default();
        let rerr = |source: io::Error| PackError::Read {
            path: path.clone(),
            source,
        };
        let mut file = open_in_tree(&path, key).map_err(rerr)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(u64::from(opts.chunk_size)) as usize;
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf).map_err(|e| {
                rerr(io::Error::new(
                    e.kind(),
                    format!("file changed while packing: {e}"),
                ))
            })?;
            left -= n as u64;
            if batch.push(buf) {
                writer.write_batch(batch.take(), opts, progress, &werr)?;
            }
        }
    }
    writer.write_batch(batch.take(), opts, progress, &werr)?;
    let late_bytes = writer.tail_len;
    let (entries, data_len) = writer.append_tail(&werr)?;
    let late_chunks = placement.late.iter().filter(|&&l| l).count() as u64;
    let (unique, dedupe_saved) = (writer.unique, writer.dedupe_saved);

    let table = ChunkTable::new(entries);
    let header = write_image(out, manifest, &table, &mut data, data_len)?;

    Ok(PackSummary {
        files: walk.counts.files,
        dirs: walk.counts.dirs,
        symlinks: walk.counts.symlinks,
        hardlinks: walk.counts.hardlinks,
        skipped: walk.skipped,
        raw_bytes: total,
        stored_bytes: data_len,
        chunks: table.len(),
        unique_chunks: unique,
        dedupe_saved,
        late_chunks,
        late_bytes,
        image_bytes: header.image_len(),
        root_digest: header.root_digest,
        elapsed: started.elapsed(),
    })
}

fn file_size(inode: &Inode) -> u64 {
    match inode.kind {
        InodeKind::File { size, .. } => size,
        _ => 0,
    }
}

/// Writes an image at `out` from its parts: fills in the manifest's chunk count, data length
/// and segment digests from `table`, then writes header, manifest, chunk table and the
/// `data_len` bytes of `data` (read from its start) to a temporary file that is synced and
/// renamed over `out`. Returns the header, which holds the root digest.
pub(crate) fn write_image(
    out: &Path,
    mut manifest: Manifest,
    table: &ChunkTable,
    data: &mut File,
    data_len: u64,
) -> Result<Header, PackError> {
    let werr = |source: io::Error| PackError::Write {
        path: out.to_path_buf(),
        source,
    };
    manifest.chunk_count = table.len();
    let (table_bytes, segment_digests) = table.encode(&manifest.order()?);
    manifest.data_len = data_len;
    manifest.segment_digests = segment_digests;
    manifest.validate()?;
    let stored_manifest = manifest.encode(MANIFEST_LEVEL)?;
    let manifest_len = stored_manifest.len() as u64;
    let header = Header {
        chunk_size: manifest.chunk_size,
        manifest_offset: HEADER_LEN as u64,
        manifest_len,
        chunk_table_offset: HEADER_LEN as u64 + manifest_len,
        chunk_table_len: table_bytes.len() as u64,
        data_offset: HEADER_LEN as u64 + manifest_len + table_bytes.len() as u64,
        data_len,
        root_digest: Digest::of(&stored_manifest),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(parent_dir(out)).map_err(werr)?;
    let f = tmp.as_file_mut();
    f.write_all(&header.encode()).map_err(werr)?;
    f.write_all(&stored_manifest).map_err(werr)?;
    f.write_all(&table_bytes).map_err(werr)?;
    data.seek(SeekFrom::Start(0)).map_err(werr)?;
    let copied = io::copy(&mut data.take(data_len), f).map_err(werr)?;
    if copied != data_len {
        return Err(werr(io::Error::other("data section shorter than written")));
    }
    f.sync_all().map_err(werr)?;
    tmp.persist(out).map_err(|e| werr(e.error))?;
    Ok(header)
}

/// The directory `out` is written in (for its temporary files).
pub(crate) fn parent_dir(out: &Path) -> &Path {
    out.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Regular-file inodes in walk order, each once.
fn file_order(m: &Manifest) -> Vec<u32> {
    let mut seen = vec![false; m.inodes.len()];
    m.walk()
        .into_iter()
        .filter(|&(_, i)| matches!(m.inodes[i as usize].kind, InodeKind::File { .. }))
        .filter(|&(_, i)| !std::mem::replace(&mut seen[i as usize], true))
        .map(|(_, i)| i)
        .collect()
}

/// Opens the regular file the walk found at `path` with `(dev, ino)` = `key`, without
/// following a symlink: if the file was replaced since (by a symlink, or by anything through
/// a directory swapped for a symlink), packing fails instead of storing bytes from outside
/// the tree.
pub(super) fn open_in_tree(path: &Path, key: (u64, u64)) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != key {
        return Err(io::Error::other(
            "the file was replaced while packing (not the file the walk found)",
        ));
    }
    Ok(file)
}

#[derive(Default)]
struct Counts {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
}

struct Walk<'a> {
    inodes: Vec<Inode>,
    /// Source path and (dev, ino) of each file inode, for the data pass.
    sources: Vec<Option<(PathBuf, (u64, u64))>>,
    /// (dev, ino) of multiply-linked files already stored.
    hardlinks: HashMap<(u64, u64), u32>,
    skipped: Vec<(PathBuf, String)>,
    progress: &'a dyn PackProgress,
    counts: Counts,
}

impl Walk<'_> {
    fn push(&mut self, kind: InodeKind, meta: &fs::Metadata, path: &Path) -> u32 {
        let xattrs = read_xattrs(path);
        self.inodes.push(Inode {
            kind,
            perm: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_sec: meta.mtime(),
            mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
            nlink: 1,
            xattrs,
        });
        self.sources.push(None);
        (self.inodes.len() - 1) as u32
    }

    fn skip(&mut self, path: &Path, why: String) {
        tracing::warn!(path = %path.display(), why, "skipped");
        self.progress.skipped(path, &why);
        self.skipped.push((path.to_path_buf(), why));
    }

    fn add_dir(&mut self, path: &Path, meta: &fs::Metadata) -> io::Result<u32> {
        let me = self.push(
            InodeKind::Dir {
                entries: Vec::new(),
            },
            meta,
            path,
        );
        self.counts.dirs += 1;
        let mut names: Vec<OsString> = fs::read_dir(path)?
            .filter_map(|e| match e {
                Ok(e) => Some(e.file_name()),
                Err(err) => {
                    self.skip(path, format!("cannot list an entry: {err}"));
                    None
                }
            })
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Vec::with_capacity(names.len());
        let mut subdirs = 0u32;
        for name in names {
            let child = path.join(&name);
            let cmeta = match fs::symlink_metadata(&child) {
                Ok(m) => m,
                Err(e) => {
                    self.skip(&child, format!("cannot stat: {e}"));
                    continue;
                }
            };
            let ft = cmeta.file_type();
            let inode = if ft.is_dir() {
                match self.add_dir(&child, &cmeta) {
                    Ok(i) => {
                        subdirs += 1;
                        i
                    }
                    Err(e) => {
                        // add_dir pushed the inode before failing to list it: keep it as an
                        // empty directory rather than leave an unnamed inode behind.
                        self.skip(&child, format!("cannot list directory (stored empty): {e}"));
                        subdirs += 1;
                        (self.inodes.len() - 1) as u32
                    }
                }
            } else if ft.is_file() {
                let key = (cmeta.dev(), cmeta.ino());
                if cmeta.nlink() > 1
                    && let Some(&existing) = self.hardlinks.get(&key)
                {
                    self.inodes[existing as usize].nlink += 1;
                    self.counts.hardlinks += 1;
                    existing
                } else {
                    if let Err(e) = open_in_tree(&child, key) {
                        self.skip(&child, format!("cannot read: {e}"));
                        continue;
                    }
                    let i = self.push(
                        InodeKind::File {
                            size: cmeta.len(),
                            first_chunk: 0,
                        },
                        &cmeta,
                        &child,
                    );
                    self.sources[i as usize] = Some((child.clone(), key));
                    self.counts.files += 1;
                    if cmeta.nlink() > 1 {
                        self.hardlinks.insert(key, i);
                    }
                    i
                }
            } else if ft.is_symlink() {
                match fs::read_link(&child) {
                    Ok(target) if !target.as_os_str().is_empty() => {
                        self.counts.symlinks += 1;
                        self.push(
                            InodeKind::Symlink {
                                target: target.as_os_str().as_bytes().to_vec(),
                            },
                            &cmeta,
                            &child,
                        )
                    }
                    Ok(_) => {
                        self.skip(&child, "empty symlink target".into());
                        continue;
                    }
                    Err(e) => {
                        self.skip(&child, format!("cannot read link: {e}"));
                        continue;
                    }
                }
            } else {
                self.skip(&child, "special file (device, socket or fifo)".into());
                continue;
            };
            entries.push(DirEntry {
                name: name.as_bytes().to_vec(),
                inode,
            });
        }
        let node = &mut self.inodes[me as usize];
        node.nlink = 2 + subdirs;
        node.kind = InodeKind::Dir { entries };
        Ok(me)
    }
}

/// The extended attributes of `path` itself (symlinks are not followed). Attributes that
/// cannot be read are left out: packing is not the place to fail on them.
fn read_xattrs(path: &Path) -> Vec<Xattr> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    let mut out: Vec<Xattr> = names
        .filter_map(|name| {
            let value = xattr::get(path, &name).ok().flatten()?;
            Some(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Raw chunks waiting to be compressed together.
struct Batch {
    chunks: Vec<Vec<u8>>,
    bytes: usize,
    next_slot: u64,
}

impl Batch {
    fn new() -> Self {
        Batch {
            chunks: Vec::new(),
            bytes: 0,
            next_slot: 0,
        }
    }

    /// Adds a chunk; true when the batch is full.
    fn push(&mut self, raw: Vec<u8>) -> bool {
        self.bytes += raw.len();
        self.chunks.push(raw);
        self.next_slot += 1;
        self.bytes >= BATCH_BYTES
    }

    /// The chunks so far, in slot order; the batch starts again empty.
    fn take(&mut self) -> Vec<Vec<u8>> {
        self.bytes = 0;
        std::mem::take(&mut self.chunks)
    }
}

/// A frame of a batch being filled: its raw bytes, its dictionary's number (0: none),
/// whether it goes in the late tail, and the group of chunks read whole it holds (0: none).
struct RawFrame {
    raw: Vec<u8>,
    dictionary: u8,
    late: bool,
    whole: u32,
}

/// Stored offsets of the late tail while packing: the tail is written to a file of its own
/// and appended after the rest, so its entries are moved by the rest's length at the end.
const TAIL_BASE: u64 = 1 << 62;

/// Where a chunk of a batch is stored: an entry of an earlier batch, or a frame of this one.
enum Place {
    Known(ChunkEntry),
    Framed {
        frame: usize,
        offset: u32,
        first: bool,
    },
}

/// Appends distinct chunks to the data section (or its late tail) and builds the chunk
/// table.
struct ChunkWriter<'a> {
    out: &'a mut File,
    tail: &'a mut File,
    /// Per slot, the number of its dictionary (empty: none for any).
    slot_dictionary: &'a [u8],
    /// Per slot, whether it goes in the late tail (empty: none does).
    late: &'a [bool],
    /// Per slot, its group of chunks read whole (0: none; empty: none has one).
    whole: &'a [u32],
    encoders: &'a [Encoder],
    entries: Vec<ChunkEntry>,
    /// Chunks stored so far, by digest and whether in the tail (a chunk a start reads is
    /// never stored in the tail because a late section holds the same bytes).
    seen: HashMap<(Digest, bool), ChunkEntry>,
    data_len: u64,
    tail_len: u64,
    unique: u64,
    dedupe_saved: u64,
}

impl ChunkWriter<'_> {
    /// Appends the late tail to the data section; returns the entries, their offsets final,
    /// and the data section's length.
    fn append_tail(
        &mut self,
        werr: &dyn Fn(io::Error) -> PackError,
    ) -> Result<(Vec<ChunkEntry>, u64), PackError> {
        self.tail.seek(SeekFrom::Start(0)).map_err(werr)?;
        let copied =
            io::copy(&mut (&mut *self.tail).take(self.tail_len), self.out).map_err(werr)?;
        if copied != self.tail_len {
            return Err(werr(io::Error::other("late tail shorter than written")));
        }
        let base = self.data_len;
        let mut entries = std::mem::take(&mut self.entries);
        for e in &mut entries {
            if e.stored_offset >= TAIL_BASE {
                e.stored_offset = e.stored_offset - TAIL_BASE + base;
            }
        }
        Ok((entries, base + self.tail_len))
    }

    /// Stores `chunks` (the next slots, in order): each distinct chunk once, consecutive new
    /// ones together in frames of up to `opts.frame_bytes` raw bytes, compressed on all
    /// cores.
    fn write_batch(
        &mut self,
        chunks: Vec<Vec<u8>>,
        opts: &PackOptions,
        progress: &dyn PackProgress,
        werr: &dyn Fn(io::Error) -> PackError,
    ) -> Result<(), PackError> {
        let digests: Vec<Digest> = chunks.par_iter().map(|c| Digest::of(c)).collect();
        let frame_bytes = opts.frame_bytes as usize;
        let first_slot = self.entries.len();
        let mut frames: Vec<RawFrame> = Vec::new();
        let mut in_batch: HashMap<(Digest, bool), (usize, u32)> = HashMap::new();
        let mut places = Vec::with_capacity(chunks.len());
        for (i, (raw, digest)) in chunks.iter().zip(&digests).enumerate() {
            let dictionary = self
                .slot_dictionary
                .get(first_slot + i)
                .copied()
                .unwrap_or(0);
            let late = self.late.get(first_slot + i).copied().unwrap_or(false);
            let whole = self.whole.get(first_slot + i).copied().unwrap_or(0);
            let limit = if whole == 0 {
                frame_bytes
            } else {
                frame_bytes.max(WHOLE_FRAME_BYTES as usize)
            };
            if let Some(e) = self.seen.get(&(*digest, late)) {
                places.push(Place::Known(*e));
            } else if let Some(&(frame, offset)) = in_batch.get(&(*digest, late)) {
                places.push(Place::Framed {
                    frame,
                    offset,
                    first: false,
                });
            } else {
                match frames.last() {
                    Some(f)
                        if f.raw.len() + raw.len() <= limit
                            && f.dictionary == dictionary
                            && f.late == late
                            && f.whole == whole => {}
                    _ => frames.push(RawFrame {
                        raw: Vec::with_capacity(limit.max(raw.len())),
                        dictionary,
                        late,
                        whole,
                    }),
                }
                let frame = frames.len() - 1;
                let f = &mut frames[frame].raw;
                let offset = f.len() as u32;
                f.extend_from_slice(raw);
                in_batch.insert((*digest, late), (frame, offset));
                places.push(Place::Framed {
                    frame,
                    offset,
                    first: true,
                });
            }
        }
        let lens: Vec<u32> = chunks.iter().map(|c| c.len() as u32).collect();
        drop(chunks);
        let level = opts.level;
        let encoders = self.encoders;
        let stored: Vec<Vec<u8>> = frames
            .par_iter()
            .map(|f| {
                let dict = usize::from(f.dictionary)
                    .checked_sub(1)
                    .and_then(|k| encoders.get(k));
                encode_frame_with(&f.raw, level, dict)
            })
            .collect::<Result<_, _>>()?;
        let mut at = Vec::with_capacity(stored.len());
        for (f, raw) in stored.iter().zip(&frames) {
            if raw.late {
                at.push(TAIL_BASE + self.tail_len);
                self.tail_len += f.len() as u64;
                self.tail.write_all(f).map_err(werr)?;
            } else {
                at.push(self.data_len);
                self.data_len += f.len() as u64;
                self.out.write_all(f).map_err(werr)?;
            }
        }
        for ((place, digest), raw_len) in places.into_iter().zip(digests).zip(lens) {
            let entry = match place {
                Place::Known(e) => {
                    self.dedupe_saved += u64::from(raw_len);
                    e
                }
                Place::Framed {
                    frame,
                    offset,
                    first,
                } => {
                    let frame_len = frames[frame].raw.len() as u32;
                    let stored_len = stored[frame].len() as u32;
                    let e = ChunkEntry {
                        stored_offset: at[frame],
                        stored_len,
                        raw_len,
                        frame_offset: offset,
                        frame_len,
                        // A frame stored raw was not compressed with anything.
                        dictionary: if stored_len < frame_len {
                            frames[frame].dictionary
                        } else {
                            0
                        },
                        digest,
                    };
                    if first {
                        self.unique += 1;
                        self.seen.insert((digest, frames[frame].late), e);
                    } else {
                        self.dedupe_saved += u64::from(raw_len);
                    }
                    e
                }
            };
            self.entries.push(entry);
            progress.advance(u64::from(raw_len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_in_tree_refuses_a_file_replaced_since_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let (f, outside) = (dir.path().join("f"), dir.path().join("outside"));
        fs::write(&f, b"in the tree").unwrap();
        fs::write(&outside, b"secret").unwrap();
        let m = fs::metadata(&f).unwrap();
        let key = (m.dev(), m.ino());
        assert!(open_in_tree(&f, key).is_ok());
        // Swapped for a symlink to a file outside the tree: not followed.
        fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink(&outside, &f).unwrap();
        let e = open_in_tree(&f, key).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        // Swapped for another file: not the one the walk found.
        fs::remove_file(&f).unwrap();
        fs::hard_link(&outside, &f).unwrap();
        let e = open_in_tree(&f, key).unwrap_err();
        assert!(e.to_string().contains("replaced while packing"), "{e}");
    }
}
