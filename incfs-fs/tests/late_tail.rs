//! The late tail: `pack` stores the sections of ELF files that a start does not read (unwind
//! tables, symbols) after every other chunk, byte for byte the same files, and keeps file
//! order for small files and with `late_sections_last` off. And frames of chunks read
//! whole: a small file's chunks and a late section's share frames of up to 256 KiB, while
//! every other chunk of a large file keeps a frame of its own.

mod common;

use std::fs;
use std::path::Path;

use incfs_fs::format::{Image, PackOptions, pack_dir};

/// A 64-bit little-endian ELF file of `len` bytes with sections `.text` at `[4096, 4096 +
/// text)`, `.eh_frame` right after it (`eh` bytes), a non-allocated `.symtab` (`sym` bytes)
/// after that, and `.shstrtab` with the section headers at the end; every section noise.
/// `.text` has `text_flags` (6, executable; 3, writable: data the loader relocates).
fn elf(len: u64, text: u64, eh: u64, sym: u64, seed: u64, text_flags: u64) -> Vec<u8> {
    let names = b"\0.text\0.eh_frame\0.symtab\0.shstrtab\0";
    let mut b = common::noise(len as usize, seed);
    b[..64].fill(0);
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    let shnum = 5u64;
    let shoff = len - shnum * 64;
    let strtab = shoff - names.len() as u64;
    b[strtab as usize..shoff as usize].copy_from_slice(names);
    b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    b[0x3c..0x3e].copy_from_slice(&(shnum as u16).to_le_bytes());
    b[0x3e..0x40].copy_from_slice(&4u16.to_le_bytes());
    let mut sh = |i: u64, name: u32, kind: u32, flags: u64, offset: u64, size: u64| {
        let at = (shoff + i * 64) as usize;
        let s = &mut b[at..at + 64];
        s.fill(0);
        s[..4].copy_from_slice(&name.to_le_bytes());
        s[4..8].copy_from_slice(&kind.to_le_bytes());
        s[8..16].copy_from_slice(&flags.to_le_bytes());
        s[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
        s[0x20..0x28].copy_from_slice(&size.to_le_bytes());
    };
    sh(0, 0, 0, 0, 0, 0);
    sh(1, 1, 1, text_flags, 4096, text);
    sh(2, 7, 1, 2, 4096 + text, eh);
    sh(3, 17, 2, 0, 4096 + text + eh, sym);
    sh(4, 25, 3, 0, strtab, names.len() as u64);
    b
}

fn tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    // 2 MiB: .text 1 MiB, .eh_frame 256 KiB + 100 bytes, .symtab 64 KiB.
    fs::write(
        root.join("a.so"),
        elf(2 << 20, 1 << 20, (256 << 10) + 100, 64 << 10, 1, 6),
    )
    .unwrap();
    // Small: stays in file order.
    fs::write(
        root.join("b.so"),
        elf(128 << 10, 32 << 10, 32 << 10, 8 << 10, 2, 6),
    )
    .unwrap();
    fs::write(root.join("c.bin"), common::noise(300_000, 3)).unwrap();
    // Its 512 KiB "text" is writable data, which the loader reads whole at start.
    fs::write(root.join("d.so"), elf(1 << 20, 512 << 10, 0, 0, 4, 3)).unwrap();
}

/// Per slot of the file at `path`, its stored offset.
fn offsets(img: &Image<fs::File>, path: &str) -> Vec<u64> {
    common::file_entries(img, path)
        .iter()
        .map(|e| e.stored_offset)
        .collect()
}

#[test]
fn the_sections_a_start_does_not_read_are_stored_after_everything_else() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    tree(&root);
    let image = tmp.path().join("late.img");
    let opts = PackOptions {
        whole_frames: true,
        ..PackOptions::default()
    };
    let s = pack_dir(&root, &image, &opts, &()).unwrap();
    // .eh_frame starts at chunk 257 (4096 + 1 MiB) and ends 100 bytes into chunk 321; .symtab
    // follows at once and ends at 4096 + 1 MiB + 320 KiB + 100 in chunk 337: the chunks wholly
    // inside the two (merged) sections are 257..337.
    let late: Vec<u64> = (257..337).collect();
    assert_eq!(s.late_chunks, late.len() as u64);
    assert!(s.late_bytes > 0);
    let img = Image::open_path(&image, None).unwrap();
    let a = offsets(&img, "a.so");
    let rest_end = ["b.so", "c.bin", "d.so"]
        .iter()
        .flat_map(|p| offsets(&img, p))
        .chain(
            a.iter()
                .enumerate()
                .filter(|(i, _)| !late.contains(&(*i as u64)))
                .map(|(_, o)| *o),
        )
        .max()
        .unwrap();
    let tail_start = late.iter().map(|&c| a[c as usize]).min().unwrap();
    assert!(
        tail_start > rest_end,
        "late chunks from {tail_start}, the rest up to {rest_end}"
    );
    // Within the tail, file order, in frames of up to 256 KiB (80 chunks: two at least, more
    // where a dictionary's group ends); the
    // chunks of a.so around it are still in order, each in a frame of its own.
    assert!(
        late.windows(2)
            .all(|w| a[w[0] as usize] <= a[w[1] as usize])
    );
    let entries = common::file_entries(&img, "a.so");
    let tail_frames: std::collections::BTreeSet<u64> =
        late.iter().map(|&c| a[c as usize]).collect();
    assert!(
        tail_frames.len() >= 2 && tail_frames.len() < late.len() / 4,
        "{tail_frames:?}"
    );
    assert!(
        late.iter()
            .all(|&c| entries[c as usize].frame_len <= 256 << 10)
    );
    assert!(a[..257].windows(2).all(|w| w[0] < w[1]), "{a:?}");
    assert!(a[256] < a[337] && a[337] < tail_start);
    // The small ELF file keeps its order (its late chunks would be an extra request), all of
    // it in one frame: the read-ahead fetches such a file whole.
    let b = offsets(&img, "b.so");
    assert!(b.iter().all(|&o| o == b[0]), "{b:?}");
    // A large file that is not ELF: a frame per chunk.
    let c = offsets(&img, "c.bin");
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    // A loader section: its 128 chunks in two frames of 256 KiB.
    let d = offsets(&img, "d.so");
    assert!(d[..1].iter().all(|&o| o < d[1]));
    assert_eq!(d[1], d[64], "{d:?}");
    assert!(d[64] < d[65] && d[65] == d[128], "{d:?}");
    assert_eq!(common::assert_image_matches(&img, &root), 4);
    let report = img.verify(&|_| {});
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        s.stored_bytes,
        img.header().data_len,
        "the tail is inside the data section"
    );

    // Off: every chunk in file order, and the same files.
    let plain = tmp.path().join("plain.img");
    let opts = PackOptions {
        late_sections_last: false,
        ..opts
    };
    let s = pack_dir(&root, &plain, &opts, &()).unwrap();
    assert_eq!((s.late_chunks, s.late_bytes), (0, 0));
    let img = Image::open_path(&plain, None).unwrap();
    let a = offsets(&img, "a.so");
    assert!(a.windows(2).all(|w| w[0] <= w[1]));
    assert!(a[..257].windows(2).all(|w| w[0] < w[1]));
    assert_eq!(common::assert_image_matches(&img, &root), 4);
}
