//! Where `pack` stores a tree's chunks: in file order, except the sections of ELF files that
//! a start does not read ([`elf::late_ranges`]: unwind and exception tables, symbols, debug
//! information), which go after everything else, in the image's late tail.
//!
//! A start without a plan gets what it needs from miss amplification and the background
//! fill, and both move the image in stored order: in file order, the late sections sit in
//! the middle of each library (clang-22: 11 MiB of `.eh_frame*` between `.rodata` and `.text`
//! of libLLVM and libclang-cpp, 3.3 MiB stored, none of it read by a start), and the fill
//! carries them before the `.text` behind them. Stored last, the fill reaches them after
//! everything a start may read, and the app still becomes wholly local. Measured (BENCHMARKS.md,
//! "The late tail"): within the noise at 20 ms / 100 Mbit/s, 2 % at 50 ms / 20 Mbit/s, where
//! a lazy clang start is bound by the image's bytes.
//!
//! It also says which chunks a reader always takes together ([`Placement::whole`]), so `pack`
//! can compress them in shared frames (BENCHMARKS.md, "Frames of chunks read whole": the
//! python image 0.87×, its lazy start 0.91×).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pack::{PackError, PackOptions, open_in_tree};
use crate::elf;

/// Files smaller than this keep every chunk in place: the read-ahead fetches a file of up
/// to 256 KiB whole on its first read, so splitting it would only add a request.
pub const MIN_FILE_BYTES: u64 = 256 * 1024;

/// A file of the data pass, with where its chunks go.
pub struct FileSpan<'a> {
    /// The file in the tree.
    pub path: &'a Path,
    /// Its (dev, ino), as the walk found it.
    pub key: (u64, u64),
    /// Its length.
    pub size: u64,
    /// Its first chunk slot.
    pub first_slot: u64,
}

/// An ELF file's section header table and section name table (empty when it has none).
pub struct ElfTables {
    /// The section header table's bytes.
    pub sections: Vec<u8>,
    /// The section name table's bytes.
    pub names: Vec<u8>,
}

impl FileSpan<'_> {
    fn error(&self, source: std::io::Error) -> PackError {
        PackError::Read {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// The file, opened as the walk found it.
    pub fn open(&self) -> Result<File, PackError> {
        open_in_tree(self.path, self.key).map_err(|e| self.error(e))
    }

    /// The section tables when the file is a 64-bit little-endian ELF file whose tables
    /// lie within it; `None` for anything else.
    pub fn elf_tables(&self) -> Result<Option<ElfTables>, PackError> {
        let file = self.open()?;
        let mut head = [0u8; elf::HEADER_LEN];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(None);
        }
        let Some(table) = elf::section_table(&head, self.size) else {
            return Ok(None);
        };
        let read = |r: Range<u64>| -> Result<Vec<u8>, PackError> {
            let mut bytes = vec![0u8; (r.end - r.start) as usize];
            file.read_exact_at(&mut bytes, r.start)
                .map_err(|e| self.error(e))?;
            Ok(bytes)
        };
        let sections = read(table)?;
        let names = match elf::names_range(&head, &sections, self.size) {
            Some(r) => read(r)?,
            None => Vec::new(),
        };
        Ok(Some(ElfTables { sections, names }))
    }
}

/// Raw bytes at most of a frame of chunks that are read whole ([`Placement::whole`]).
/// 256 KiB: the size of the largest file the read-ahead fetches whole, and the miss
/// amplification's span.
pub const WHOLE_FRAME_BYTES: u32 = 256 * 1024;

/// Where each chunk slot of a tree goes.
pub struct Placement {
    /// Per slot, whether it is stored in the late tail: a chunk of a file of at least
    /// [`MIN_FILE_BYTES`] that lies wholly within the file's late sections (empty: none).
    pub late: Vec<bool>,
    /// Per slot, the group of chunks a reader takes all of, numbered by file from 1 (0:
    /// none; empty: none has one): every chunk of a file smaller than [`MIN_FILE_BYTES`] (the read-ahead fetches
    /// it whole), and the chunks wholly inside a larger ELF file's loader sections (read
    /// whole at start, [`elf::loader_ranges`]) or late sections (read whole only by the
    /// fill). Consecutive chunks of one group share frames of up to [`WHOLE_FRAME_BYTES`],
    /// which compress better than a chunk alone and cost no reader a byte it would not
    /// fetch anyway; every other chunk keeps its own frame, so a random page fault or a plan
    /// on this layout fetches only the chunks it names.
    pub whole: Vec<u32>,
}

/// The chunk indices wholly inside `r` of a file of `size` bytes: from the first boundary
/// at or after its start to the last one at or before its end (the file's end counts as one).
fn chunks_inside(r: &Range<u64>, cs: u64, size: u64) -> Range<u64> {
    let first = r.start.div_ceil(cs);
    let end = if r.end == size {
        r.end.div_ceil(cs)
    } else {
        r.end / cs
    };
    first..end.max(first)
}

/// Sets `v` to `value` at the slots of `chunks` of a file starting at `first_slot` (none
/// when `v` is empty).
fn mark<T: Copy>(v: &mut [T], first_slot: u64, chunks: Range<u64>, value: T) {
    for c in chunks {
        if let Some(s) = v.get_mut((first_slot + c) as usize) {
            *s = value;
        }
    }
}

/// Places the chunk slots of `files` (slots `0..slots`) as `opts` asks: the late tail with
/// `late_sections_last`, the groups read whole with `whole_frames` (each empty when off; no
/// file is read when both are).
pub fn place(
    files: &[FileSpan<'_>],
    slots: u64,
    opts: &PackOptions,
) -> Result<Placement, PackError> {
    let cs = u64::from(opts.chunk_size);
    let len = |on: bool| if on { slots as usize } else { 0 };
    let mut late = vec![false; len(opts.late_sections_last)];
    let mut whole = vec![0u32; len(opts.whole_frames)];
    if late.is_empty() && whole.is_empty() {
        return Ok(Placement { late, whole });
    }
    for (i, f) in files.iter().enumerate() {
        let group = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if f.size < MIN_FILE_BYTES {
            mark(&mut whole, f.first_slot, 0..f.size.div_ceil(cs), group);
            continue;
        }
        let Some(t) = f.elf_tables()? else { continue };
        for r in elf::loader_ranges(&t.sections, f.size) {
            mark(
                &mut whole,
                f.first_slot,
                chunks_inside(&r, cs, f.size),
                group,
            );
        }
        for r in elf::late_ranges(&t.sections, &t.names, f.size) {
            let chunks = chunks_inside(&r, cs, f.size);
            mark(&mut whole, f.first_slot, chunks.clone(), group);
            mark(&mut late, f.first_slot, chunks, true);
        }
    }
    Ok(Placement { late, whole })
}
