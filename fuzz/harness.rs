//! What each fuzz target does with its input, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the corpus replay test (`planner/tests/planner/fuzz_corpus.rs`),
//! which both include this file. Every function must return (an error is fine) for any
//! input, and it asserts the properties readers rely on: a parser that accepts its input
//! yields values within the limits it promises, and no chunk is ever returned with bytes
//! other than those its digest names.

use std::path::Path;

use incfs_fs::format::{
    ChunkEntry, Digest, DirEntry, HEADER_LEN, Header, Image, Inode, InodeKind, MAX_CHUNK_SIZE,
    MAX_FRAME_LEN, Manifest, decode_chunk,
};
use incfs_fs::plan::PrefetchPlan;

/// An image file. The first byte picks how the rest is read:
/// - `0`: as an image, exactly as given;
/// - `1`: as an image whose header checksum and root digest are first recomputed from its
///   bytes, so that mutations reach the manifest and chunk-table checks;
/// - `2`: as the raw (postcard) bytes of a manifest, which are compressed and framed first,
///   so that mutations reach the manifest decoder and its rules.
pub fn image(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => open_and_read(rest.to_vec()),
        1 => open_and_read(reseal(rest)),
        _ => manifest(rest),
    }
}

/// Opens `bytes` as an image and reads every chunk and every file.
fn open_and_read(bytes: Vec<u8>) {
    let Ok(img) = Image::open(bytes, None) else {
        return;
    };
    let slots = img.table().len();
    for slot in 0..slots {
        if let Ok(raw) = img.read_chunk(slot) {
            let entry = img.table().get(slot).expect("slot below len");
            assert_eq!(raw.len(), entry.raw_len as usize, "slot {slot}: length");
            assert!(Digest::of(&raw) == entry.digest, "slot {slot}: wrong bytes");
        }
    }
    check_tree(img.manifest(), slots);
    for f in img.files() {
        if let Ok(bytes) = img.read_file(f.inode) {
            assert_eq!(bytes.len() as u64, f.size, "{}: length", f.display_path());
        }
    }
}

/// The tree of an accepted manifest: every path is relative, has no empty, `.` or `..`
/// component and no NUL, and every file's chunks lie within the table.
fn check_tree(m: &Manifest, slots: u64) {
    for (path, _) in m.walk() {
        assert!(!path.is_empty() && !path.starts_with(b"/") && !path.contains(&0));
        for part in path.split(|&b| b == b'/') {
            assert!(
                !part.is_empty() && part != b"." && part != b"..",
                "{path:?}"
            );
        }
    }
    for f in m.files() {
        assert!(f.first_chunk + f.chunks <= slots, "{}", f.display_path());
    }
}

/// `bytes` with the header's checksum and root digest recomputed (when it has a header and
/// its manifest section lies within the bytes).
fn reseal(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() < HEADER_LEN {
        return out;
    }
    let u64_at = |o: usize| u64::from_le_bytes(out[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(out[o..o + 4].try_into().expect("4 bytes"));
    let (m_off, m_len) = (u64_at(24), u64_at(32));
    let Some(manifest) = m_off
        .checked_add(m_len)
        .and_then(|end| out.get(usize::try_from(m_off).ok()?..usize::try_from(end).ok()?))
    else {
        return out;
    };
    let header = Header {
        chunk_size: u32_at(20),
        manifest_offset: m_off,
        manifest_len: m_len,
        chunk_table_offset: u64_at(40),
        chunk_table_len: u64_at(48),
        data_offset: u64_at(56),
        data_len: u64_at(64),
        root_digest: Digest::of(manifest),
    };
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out
}

/// Raw manifest bytes (postcard), framed as an image stores them and decoded.
fn manifest(raw: &[u8]) {
    let Ok(packed) = zstd::bulk::compress(raw, 1) else {
        return;
    };
    let mut stored = (raw.len() as u64).to_le_bytes().to_vec();
    stored.extend_from_slice(&packed);
    if let Ok(m) = Manifest::decode(&stored, &Digest::of(&stored)) {
        check_tree(&m, m.chunk_count);
    }
}

/// One stored frame and a chunk in it: bytes 0..4 the frame's raw length (folded into
/// 1..=[`MAX_FRAME_LEN`]), 4..8 the chunk's raw length (folded into 1..=min(frame length,
/// [`MAX_CHUNK_SIZE`])), 8..12 the chunk's offset in the frame (folded so that it fits),
/// byte 12 flags, the rest the stored bytes. With flag bit 0 the entry's digest is that of
/// the chunk a reference zstd decoder finds in the stored bytes, so that valid chunks are
/// found; `decode_chunk` must then return exactly those bytes. Whatever it returns must
/// match the entry's length and digest.
pub fn chunk(data: &[u8]) {
    if data.len() < 14 {
        return;
    }
    let u32_at = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    let frame_len = u32_at(0) % MAX_FRAME_LEN + 1;
    let raw_len = u32_at(4) % frame_len.min(MAX_CHUNK_SIZE) + 1;
    let frame_offset = u32_at(8) % (frame_len - raw_len + 1);
    let stored = &data[13..data.len().min(13 + frame_len as usize)];
    let Ok(stored_len) = u32::try_from(stored.len()) else {
        return;
    };
    let reference = if stored_len == frame_len {
        Some(stored.to_vec())
    } else {
        zstd::bulk::decompress(stored, frame_len as usize).ok()
    };
    let reference = reference
        .filter(|f| f.len() == frame_len as usize)
        .map(|f| f[frame_offset as usize..(frame_offset + raw_len) as usize].to_vec());
    let digest = match (&reference, data[12] & 1) {
        (Some(r), 1) => Digest::of(r),
        _ => Digest::of(stored),
    };
    let entry = ChunkEntry {
        stored_offset: 0,
        stored_len,
        raw_len,
        frame_offset,
        frame_len,
        dictionary: 0,
        digest,
    };
    match decode_chunk(7, &entry, stored, None) {
        Ok(raw) => {
            assert_eq!(raw.len(), raw_len as usize);
            assert!(
                Digest::of(&raw) == digest,
                "decoded bytes do not match the digest"
            );
        }
        Err(e) => {
            if let Some(r) = reference {
                assert!(Digest::of(&r) != digest, "a valid chunk was refused: {e}");
            }
        }
    }
}

/// The image a fuzzed plan is resolved against: `a` (3 chunks), `dir/b` (1 chunk) and an
/// empty file `e`, 4 KiB chunks.
fn plan_manifest() -> Manifest {
    let inode = |kind| Inode {
        kind,
        perm: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        nlink: 1,
        xattrs: Vec::new(),
    };
    let entry = |name: &[u8], inode| DirEntry {
        name: name.to_vec(),
        inode,
    };
    Manifest {
        chunk_size: 4096,
        chunk_count: 4,
        data_len: 16384,
        segment_digests: vec![Digest([0; 32])],
        table_order: Vec::new(),
        dictionaries: Vec::new(),
        inodes: vec![
            inode(InodeKind::Dir {
                entries: vec![entry(b"a", 1), entry(b"dir", 2), entry(b"e", 4)],
            }),
            inode(InodeKind::File {
                size: 10000,
                first_chunk: 0,
            }),
            inode(InodeKind::Dir {
                entries: vec![entry(b"b", 3)],
            }),
            inode(InodeKind::File {
                size: 4096,
                first_chunk: 3,
            }),
            inode(InodeKind::File {
                size: 0,
                first_chunk: 4,
            }),
        ],
    }
}

/// A prefetch manifest file (JSON, or zstd-compressed JSON); an accepted plan is resolved
/// against a small image, and every slot it yields must lie within that image.
pub fn plan(data: &[u8]) {
    let path = Path::new("fuzz.plan.json");
    let Ok(plan) = PrefetchPlan::parse(path, data) else {
        return;
    };
    let m = plan_manifest();
    let _ = plan.check_image(path, &Digest([0; 32]));
    if let Ok(slots) = plan.slots(path, &m) {
        assert!(slots.iter().all(|&s| s < m.chunk_count), "{slots:?}");
    }
}
