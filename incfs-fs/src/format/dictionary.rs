//! zstd dictionaries: what lets a 4 KiB chunk compress nearly as if its neighbours were
//! in the same frame, while it can still be fetched and decoded alone.
//!
//! A chunk compressed on its own starts from an empty window, so the patterns its file
//! repeats everywhere (instruction sequences, symbol-name prefixes, bytecode headers) are
//! paid for again in every chunk. A dictionary trained on a sample of a group of similar
//! chunks gives each of them that context. Measured on clang-22 (`zstd` 1.5, 4 KiB chunks):
//! libLLVM's `.text` takes 37.7 MB at level 3 alone, 35.5 MB at level 19 alone, and 28.8 MB
//! at level 19 with a 256 KiB dictionary trained on its own chunks (30.7 MB with 64 KiB);
//! the python tree's `.pyc` files 25.3 → 19.0 MB. A dictionary trained on a whole library's
//! mixed sections barely helps (BENCHMARKS.md), so `pack` groups chunks by what they are:
//! each large section of an ELF file, and the other chunks by file name extension.
//!
//! Stored raw in the data section; the manifest lists each one's place, length and BLAKE3
//! digest ([`Dictionary`]); a chunk entry names the dictionary its frame was compressed
//! with ([`ChunkEntry::dictionary`](super::ChunkEntry::dictionary)). A reader fetches a
//! dictionary once, checks its digest and prepares it ([`Prepared`]).

use std::cell::RefCell;
use std::sync::OnceLock;

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

use super::{Digest, FormatError};

/// Most dictionaries an image may have (an entry names one in a byte; 0 is none).
pub const MAX_DICTIONARIES: usize = 255;
/// Largest dictionary a reader accepts.
pub const MAX_DICTIONARY_LEN: u32 = 1 << 20;

/// Where a dictionary is stored, and what it must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dictionary {
    /// Offset of its bytes, relative to the data section.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// BLAKE3 of its bytes.
    pub digest: Digest,
}

/// A dictionary checked against its digest and prepared for decoding.
pub struct Prepared(DDict<'static>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared")
    }
}

impl Prepared {
    /// Checks `bytes` against dictionary `number` (1-based, as entries name it) of the
    /// manifest and prepares it.
    pub fn new(number: u8, d: &Dictionary, bytes: &[u8]) -> Result<Self, FormatError> {
        let bad = |reason: &str| FormatError::DictionaryCorrupt {
            number,
            reason: reason.to_string(),
        };
        if bytes.len() != d.len as usize {
            return Err(bad(&format!(
                "got {} bytes, expected {}",
                bytes.len(),
                d.len
            )));
        }
        if Digest::of(bytes) != d.digest {
            return Err(bad("digest mismatch"));
        }
        Ok(Prepared(DDict::create(bytes)))
    }
}

/// The dictionaries of one image, each fetched, checked and prepared once, at first use.
pub struct Dictionaries {
    refs: Vec<Dictionary>,
    /// Per dictionary: the prepared one, and a lock held while one thread loads it.
    cells: Vec<(OnceLock<Prepared>, Mutex<()>)>,
}

impl Dictionaries {
    /// The dictionaries a manifest lists, none loaded yet.
    pub fn new(refs: &[Dictionary]) -> Self {
        Dictionaries {
            refs: refs.to_vec(),
            cells: refs.iter().map(|_| Default::default()).collect(),
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    /// True when the image has none.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// The dictionary an entry names as `number` (`None` for 0), loading its bytes with
    /// `load` the first time; threads asking at once wait for one load.
    pub fn get(
        &self,
        number: u8,
        load: impl FnOnce(&Dictionary) -> Result<Vec<u8>, FormatError>,
    ) -> Result<Option<&Prepared>, FormatError> {
        let Some(k) = usize::from(number).checked_sub(1) else {
            return Ok(None);
        };
        let (Some(d), Some((cell, lock))) = (self.refs.get(k), self.cells.get(k)) else {
            return Err(FormatError::DictionaryCorrupt {
                number,
                reason: format!("a chunk names it; the image has {}", self.refs.len()),
            });
        };
        if let Some(p) = cell.get() {
            return Ok(Some(p));
        }
        let _one = lock.lock();
        if let Some(p) = cell.get() {
            return Ok(Some(p));
        }
        let prepared = Prepared::new(number, d, &load(d)?)?;
        Ok(Some(cell.get_or_init(|| prepared)))
    }
}

/// A trained dictionary prepared for compressing at one level.
pub struct Encoder(CDict<'static>);

impl Encoder {
    /// Prepares `dict` for compressing at `level`.
    pub fn new(dict: &[u8], level: i32) -> Self {
        Encoder(CDict::create(dict, level))
    }
}

/// Trains a dictionary of at most `max_len` bytes on `samples`; `None` when zstd finds
/// nothing worth keeping (too few or too uniform samples).
pub fn train(samples: &[Vec<u8>], max_len: usize) -> Option<Vec<u8>> {
    match zstd::dict::from_samples(samples, max_len) {
        Ok(d) if !d.is_empty() => Some(d),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, samples = samples.len(), "no dictionary trained");
            None
        }
    }
}

thread_local! {
    static CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

fn zstd_error(code: usize) -> std::io::Error {
    std::io::Error::other(zstd::zstd_safe::get_error_name(code))
}

/// Compresses `raw` with `dict` (at the level it was prepared for).
pub(crate) fn compress_with(raw: &[u8], dict: &Encoder) -> std::io::Result<Vec<u8>> {
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        let cctx = c.get_or_insert_with(CCtx::create);
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
        cctx.compress_using_cdict(&mut out, raw, &dict.0)
            .map_err(zstd_error)?;
        Ok(out)
    })
}

/// Decompresses a frame compressed with `dict` into at most `capacity` bytes.
pub(crate) fn decompress_with(
    stored: &[u8],
    capacity: usize,
    dict: &Prepared,
) -> std::io::Result<Vec<u8>> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        let dctx = d.get_or_insert_with(DCtx::create);
        let mut out = Vec::with_capacity(capacity);
        dctx.decompress_using_ddict(&mut out, stored, &dict.0)
            .map_err(zstd_error)?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Vec<u8>> {
        (0..600u32)
            .map(|i| {
                let mut c = Vec::with_capacity(4096);
                while c.len() < 4096 {
                    c.extend_from_slice(
                        format!(
                            "fn item_{}(x: u32) -> u32 {{ x * {} + {} }}\n",
                            i,
                            i % 7,
                            i % 13
                        )
                        .as_bytes(),
                    );
                }
                c.truncate(4096);
                c
            })
            .collect()
    }

    #[test]
    fn a_dictionary_round_trips_and_is_checked() {
        let s = samples();
        let dict = train(&s, 16 * 1024).expect("trained");
        let enc = Encoder::new(&dict, 19);
        let d = Dictionary {
            offset: 0,
            len: dict.len() as u32,
            digest: Digest::of(&dict),
        };
        let prepared = Prepared::new(1, &d, &dict).unwrap();
        let packed = compress_with(&s[5], &enc).unwrap();
        assert!(packed.len() < 4096);
        assert_eq!(decompress_with(&packed, 4096, &prepared).unwrap(), s[5]);
        // Decoded with no room for it: an error, not a larger buffer.
        assert!(decompress_with(&packed, 100, &prepared).is_err());
        // Other bytes under the same name are refused.
        let mut other = dict.clone();
        other[10] ^= 1;
        let e = Prepared::new(1, &d, &other).unwrap_err();
        assert!(
            e.to_string()
                .contains("dictionary 1 is corrupt: digest mismatch"),
            "{e}"
        );
        let e = Prepared::new(2, &d, &dict[1..]).unwrap_err();
        assert!(
            e.to_string().contains("dictionary 2 is corrupt: got"),
            "{e}"
        );
    }
}
