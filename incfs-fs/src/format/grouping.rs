//! Which chunks of a tree share a zstd dictionary, and the dictionaries `pack` trains for
//! them ([`super::dictionary`]).
//!
//! Chunks are grouped by what they are, because a dictionary trained on mixed bytes helps
//! little: each section of at least [`MIN_SECTION_BYTES`] of an ELF file is a group of its
//! own (machine code, read-only data, symbol tables and unwind tables differ), and every
//! other chunk joins the group of its file name's extension across the tree (`.pyc`, `.py`,
//! `.h`, none). A group of at least [`MIN_GROUP_CHUNKS`] chunks gets a dictionary of up to
//! [`MAX_DICTIONARY_BYTES`], trained on up to [`MAX_SAMPLES`] of its chunks (and
//! [`MAX_SAMPLE_BYTES`]) spread evenly over it, and keeps it only when other chunks show it
//! saves at least twice its own size over the group: a reader fetches a dictionary once
//! before the first chunk that needs it.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use super::MAX_DICTIONARIES;
use super::chunk::encode_frame_with;
use super::dictionary::{Encoder, train};
use super::layout::FileSpan;
use super::pack::PackError;
use crate::elf;

/// Smallest ELF section that is a group of its own.
pub const MIN_SECTION_BYTES: u64 = 2 << 20;
/// Fewest chunks a group needs for a dictionary.
pub const MIN_GROUP_CHUNKS: u64 = 512;
/// Largest dictionary trained (measured on libLLVM's `.text`: 64 KiB saves 18 %, 256 KiB 23 %
/// at level 19; the dictionary is one more fetch before a group's first chunk).
pub const MAX_DICTIONARY_BYTES: usize = 128 * 1024;
/// Most chunks a dictionary is trained on.
pub const MAX_SAMPLES: u64 = 2000;
/// Most bytes a dictionary is trained on (what bounds training at large chunk sizes).
pub const MAX_SAMPLE_BYTES: u64 = 16 << 20;
/// Chunks compressed with and without a fresh dictionary to judge it.
const JUDGE_SAMPLES: u64 = 200;

/// The trained dictionaries and which chunks use them.
#[derive(Default)]
pub struct Trained {
    /// Per chunk slot, the number of its dictionary (0: none).
    pub slot_dictionary: Vec<u8>,
    /// The dictionaries' bytes: number `k` is `dictionaries[k - 1]`.
    pub dictionaries: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Section { file: usize, index: usize },
    Extension(Vec<u8>),
}

/// Groups the chunks of `files` (slots `0..slots`), trains a dictionary for each large
/// enough group and judges it at `level`.
pub fn train_dictionaries(
    files: &[FileSpan<'_>],
    chunk_size: u32,
    slots: u64,
    level: i32,
) -> Result<Trained, PackError> {
    let cs = u64::from(chunk_size);
    // Per group: its chunks as (file, chunk index in the file), in slot order.
    let mut groups: HashMap<Key, Vec<(usize, u64)>> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        let chunks = f.size.div_ceil(cs);
        let sections = if f.size >= MIN_SECTION_BYTES {
            large_sections(f)?
        } else {
            Vec::new()
        };
        let ext = extension(f.path);
        for c in 0..chunks {
            let at = c * cs;
            let key = match sections.iter().position(|r| r.contains(&at)) {
                Some(index) => Key::Section { file: i, index },
                None => Key::Extension(ext.clone()),
            };
            groups.entry(key).or_default().push((i, c));
        }
    }
    let mut kept: Vec<Vec<(usize, u64)>> = groups
        .into_values()
        .filter(|g| g.len() as u64 >= MIN_GROUP_CHUNKS)
        .collect();
    kept.sort_by_key(|g| std::cmp::Reverse(g.len()));
    kept.truncate(MAX_DICTIONARIES);
    let trained: Vec<Option<Vec<u8>>> = kept
        .par_iter()
        .map(|g| train_group(files, g, chunk_size, level))
        .collect::<Result<_, _>>()?;
    let mut out = Trained {
        slot_dictionary: vec![0; slots as usize],
        dictionaries: Vec::new(),
    };
    for (g, dict) in kept.iter().zip(trained) {
        let Some(dict) = dict else { continue };
        out.dictionaries.push(dict);
        let number = out.dictionaries.len() as u8;
        for &(file, c) in g {
            out.slot_dictionary[(files[file].first_slot + c) as usize] = number;
        }
    }
    Ok(out)
}

/// The sections of `f` of at least [`MIN_SECTION_BYTES`] when it is an ELF file.
fn large_sections(f: &FileSpan<'_>) -> Result<Vec<Range<u64>>, PackError> {
    let Some(t) = f.elf_tables()? else {
        return Ok(Vec::new());
    };
    let mut sections: Vec<Range<u64>> = elf::section_ranges(&t.sections, f.size)
        .into_iter()
        .filter(|r| r.end - r.start >= MIN_SECTION_BYTES)
        .collect();
    sections.sort_by_key(|r| r.start);
    Ok(sections)
}

/// The file name's extension (after the last dot, not counting a leading one).
fn extension(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.extension()
        .map(|e| e.as_bytes().to_vec())
        .unwrap_or_default()
}

/// Trains and judges the dictionary of one group; `None` when it does not pay.
fn train_group(
    files: &[FileSpan<'_>],
    group: &[(usize, u64)],
    chunk_size: u32,
    level: i32,
) -> Result<Option<Vec<u8>>, PackError> {
    let n = group.len() as u64;
    let max_samples = (MAX_SAMPLE_BYTES / u64::from(chunk_size)).clamp(1, MAX_SAMPLES);
    let step = n.div_ceil(max_samples).max(1);
    // A group's chunks are in slot order, so one file's come together: keep the last open.
    let mut open: Option<(usize, File)> = None;
    let mut read = |&(file, c): &(usize, u64)| -> Result<Vec<u8>, PackError> {
        let f = &files[file];
        let rerr = |source| PackError::Read {
            path: f.path.to_path_buf(),
            source,
        };
        if open.as_ref().is_none_or(|(i, _)| *i != file) {
            open = Some((file, f.open()?));
        }
        let handle = open
            .as_ref()
            .map(|(_, h)| h)
            .ok_or_else(|| rerr(std::io::Error::other("not open")))?;
        let at = c * u64::from(chunk_size);
        let mut buf = vec![0u8; (f.size - at).min(u64::from(chunk_size)) as usize];
        handle.read_exact_at(&mut buf, at).map_err(rerr)?;
        Ok(buf)
    };
    let samples: Vec<Vec<u8>> = group
        .iter()
        .step_by(step as usize)
        .map(&mut read)
        .collect::<Result<_, _>>()?;
    let raw_bytes = n * u64::from(chunk_size);
    let max_len = ((raw_bytes / 64) as usize).clamp(16 * 1024, MAX_DICTIONARY_BYTES);
    let Some(dict) = train(&samples, max_len) else {
        return Ok(None);
    };
    // Judge it on chunks it was not trained on: those halfway between the samples.
    let judge_step = n.div_ceil(JUDGE_SAMPLES.min(max_samples)).max(1);
    let offset = (judge_step / 2).max(1) as usize;
    let judged: Vec<Vec<u8>> = group
        .iter()
        .skip(offset)
        .step_by(judge_step as usize)
        .map(&mut read)
        .collect::<Result<_, _>>()?;
    if judged.is_empty() {
        return Ok(None);
    }
    let enc = Encoder::new(&dict, level);
    let (mut without, mut with) = (0u64, 0u64);
    for raw in &judged {
        without += encode_frame_with(raw, level, None)?.len() as u64;
        with += encode_frame_with(raw, level, Some(&enc))?.len() as u64;
    }
    let saved = without.saturating_sub(with) * n / judged.len() as u64;
    Ok((saved >= 2 * dict.len() as u64).then_some(dict))
}
