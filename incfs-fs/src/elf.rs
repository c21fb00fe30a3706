//! ELF section headers: what the dynamic loader will read of a shared library or executable
//! (the read-ahead of a first start that has no plan), where a file's sections lie (what
//! `pack` groups chunks by for their dictionaries), and which of them a start does not read
//! at all (what `pack` stores after everything else: [`late_ranges`]).
//!
//! Before a program runs a line of its own code, `ld.so` looks up every symbol it binds in
//! each library's `.gnu.hash`, `.dynsym` and `.dynstr`, checks `.gnu.version*`, walks all of
//! `.rela.dyn` and `.rela.plt`, and writes the relocated pointers into `.data.rel.ro`, `.got`
//! and `.data`. Those pages are read almost whole, in an order no sequential window predicts
//! (a hash lookup per symbol), and each miss is a round trip. Measured on clang-22's start
//! (the read-log of a readahead-0 mount): of libLLVM's 5,860 demanded pages, 3,170 are in
//! these sections, which are 98–100 % demanded (`.dynstr` 81 %); libclang-cpp's 3,090 of
//! 4,219 — 61 % of the whole start's demand set, in 6 % of the image's bytes. The rest is
//! `.text` and `.rodata` (3–25 % of theirs demanded), left to the miss path.
//!
//! So when a file's first read shows the ELF magic and no plan covers the file, the mount
//! reads its section header table (usually at the file's end: one request) and queues those
//! sections at prefetch priority ([`loader_ranges`]); they arrive as a few long requests
//! while the loader is still mapping the file. Only 64-bit little-endian ELF is understood
//! (x86-64, AArch64); anything else, or a table that does not parse, gives no ranges.

use std::ops::Range;

/// Section types the loader reads.
const SHT_STRTAB: u32 = 3;
const SHT_RELA: u32 = 4;
const SHT_HASH: u32 = 5;
const SHT_DYNAMIC: u32 = 6;
const SHT_NOTE: u32 = 7;
const SHT_NOBITS: u32 = 8;
const SHT_REL: u32 = 9;
const SHT_DYNSYM: u32 = 11;
const SHT_INIT_ARRAY: u32 = 14;
const SHT_FINI_ARRAY: u32 = 15;
const SHT_PREINIT_ARRAY: u32 = 16;
const SHT_RELR: u32 = 19;
const SHT_GNU_HASH: u32 = 0x6fff_fff6;
const SHT_GNU_VERDEF: u32 = 0x6fff_fffd;
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
const SHT_GNU_VERSYM: u32 = 0x6fff_ffff;
const SHT_PROGBITS: u32 = 1;

const SHF_WRITE: u64 = 0x1;
const SHF_ALLOC: u64 = 0x2;

/// Bytes of an ELF64 header, and of one section header.
pub const HEADER_LEN: usize = 64;
const SHDR_LEN: usize = 64;

/// At most this many bytes of one file are queued: a file whose loader sections are larger
/// is unusual, and past this a plan is the better tool.
pub const MAX_HINT_BYTES: u64 = 64 << 20;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// True when `head` starts like a 64-bit little-endian ELF file.
pub fn is_elf64(head: &[u8]) -> bool {
    head.len() >= HEADER_LEN && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1
}

/// The byte range of the section header table that `head` (the file's first bytes) points
/// to, when it is an ELF64 LE header and the table lies within `file_size`.
pub fn section_table(head: &[u8], file_size: u64) -> Option<Range<u64>> {
    if !is_elf64(head) {
        return None;
    }
    let shoff = u64_at(head, 0x28)?;
    let shentsize = u16_at(head, 0x3a)?;
    let shnum = u16_at(head, 0x3c)?;
    if shoff == 0 || shnum == 0 || usize::from(shentsize) != SHDR_LEN {
        return None;
    }
    let end = shoff.checked_add(u64::from(shnum) * SHDR_LEN as u64)?;
    (end <= file_size).then_some(shoff..end)
}

/// Whether the loader reads a section of this type and these flags at start.
fn loader_reads(kind: u32, flags: u64) -> bool {
    if flags & SHF_ALLOC == 0 {
        return false;
    }
    match kind {
        SHT_DYNSYM | SHT_HASH | SHT_GNU_HASH | SHT_GNU_VERSYM | SHT_GNU_VERDEF
        | SHT_GNU_VERNEED | SHT_RELA | SHT_REL | SHT_RELR | SHT_DYNAMIC | SHT_INIT_ARRAY
        | SHT_FINI_ARRAY | SHT_PREINIT_ARRAY | SHT_NOTE => true,
        // An allocated string table is `.dynstr`.
        SHT_STRTAB => true,
        // Writable data is relocated or copied on write at start: `.data.rel.ro`, `.got`,
        // `.got.plt`, `.data`, `.tdata`.
        SHT_PROGBITS => flags & SHF_WRITE != 0,
        _ => false,
    }
}

/// A section that has bytes in the file.
struct Section {
    /// Offset of its name in the section name table.
    name: u32,
    kind: u32,
    flags: u64,
    /// Its file byte range, clipped to the file.
    range: Range<u64>,
}

/// Every section of the header table `table` that has bytes in the file (not `.bss`-like),
/// its range clipped to `file_size`. Entries that do not parse are skipped.
fn sections(table: &[u8], file_size: u64) -> impl Iterator<Item = Section> + '_ {
    table.chunks_exact(SHDR_LEN).filter_map(move |sh| {
        let name = u32_at(sh, 0)?;
        let kind = u32_at(sh, 4)?;
        let flags = u64_at(sh, 8)?;
        let offset = u64_at(sh, 0x18)?;
        let size = u64_at(sh, 0x20)?;
        if kind == SHT_NOBITS || size == 0 {
            return None;
        }
        let end = offset.checked_add(size)?.min(file_size);
        (offset < end).then_some(Section {
            name,
            kind,
            flags,
            range: offset..end,
        })
    })
}

/// The byte range of the section name table (`.shstrtab`) that the header `head` names in
/// the section header table `table`, when it lies within `file_size`.
pub fn names_range(head: &[u8], table: &[u8], file_size: u64) -> Option<Range<u64>> {
    let index = usize::from(u16_at(head, 0x3e)?);
    let sh = table.get(index * SHDR_LEN..(index + 1) * SHDR_LEN)?;
    let offset = u64_at(sh, 0x18)?;
    let end = offset.checked_add(u64_at(sh, 0x20)?)?;
    (u32_at(sh, 4)? == SHT_STRTAB && end <= file_size).then_some(offset..end)
}

/// The NUL-terminated name at `at` of the name table `names`.
fn name_at(names: &[u8], at: u32) -> Option<&[u8]> {
    let rest = names.get(at as usize..)?;
    Some(&rest[..rest.iter().position(|&b| b == 0)?])
}

/// Allocated sections a program reads only when something goes wrong: the unwind tables
/// (walked when a C++ exception is thrown or a backtrace taken) and the exception tables.
const LATE_SECTIONS: [&[u8]; 3] = [b".eh_frame", b".eh_frame_hdr", b".gcc_except_table"];

/// The file byte ranges of the sections a start does not read, sorted and merged: sections
/// not loaded into memory at all (symbols, debug information, comments, the name table) and
/// the allocated [`LATE_SECTIONS`], from the section header table `table` and the section
/// name table `names` (the bytes of [`names_range`]), clipped to `file_size`. A reader
/// needs them for a backtrace, an exception or a debugger, not to start. Measured on
/// clang-22's start: none of libLLVM's or libclang-cpp's 11 MiB of `.eh_frame*` was read.
pub fn late_ranges(table: &[u8], names: &[u8], file_size: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = sections(table, file_size)
        .filter(|s| {
            s.flags & SHF_ALLOC == 0
                || name_at(names, s.name).is_some_and(|n| LATE_SECTIONS.contains(&n))
        })
        .map(|s| s.range)
        .collect();
    merge(&mut ranges);
    ranges
}

/// Sorts `ranges` and merges those that touch or overlap.
fn merge(ranges: &mut Vec<Range<u64>>) {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

/// The file byte ranges of every section that has bytes in the file, in the table's order,
/// from the section header table `table`, clipped to `file_size`. `pack` groups a large
/// file's chunks by section for its dictionaries.
pub fn section_ranges(table: &[u8], file_size: u64) -> Vec<Range<u64>> {
    sections(table, file_size).map(|s| s.range).collect()
}

/// The file byte ranges of the sections the loader reads, from the section header table
/// `table` (the bytes of [`section_table`]'s range), sorted and merged, clipped to
/// `file_size` and to [`MAX_HINT_BYTES`] in all. Entries that do not parse are skipped.
pub fn loader_ranges(table: &[u8], file_size: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = sections(table, file_size)
        .filter(|s| loader_reads(s.kind, s.flags))
        .map(|s| s.range)
        .collect();
    merge(&mut ranges);
    let mut left = MAX_HINT_BYTES;
    ranges
        .into_iter()
        .map_while(|r| {
            let len = (r.end - r.start).min(left);
            left -= len;
            (len > 0).then_some(r.start..r.start + len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(shoff: u64, shnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        h[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        h
    }

    fn shdr(kind: u32, flags: u64, offset: u64, size: u64) -> Vec<u8> {
        let mut s = vec![0u8; SHDR_LEN];
        s[4..8].copy_from_slice(&kind.to_le_bytes());
        s[8..16].copy_from_slice(&flags.to_le_bytes());
        s[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
        s[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        s
    }

    #[test]
    fn the_table_range_comes_from_the_header_and_must_fit_the_file() {
        assert_eq!(section_table(&header(1000, 3), 2000), Some(1000..1192));
        assert_eq!(section_table(&header(1000, 3), 1100), None);
        assert_eq!(section_table(&header(u64::MAX - 10, 3), u64::MAX), None);
        assert_eq!(section_table(&header(0, 3), 2000), None);
        let mut be = header(1000, 3);
        be[5] = 2;
        assert_eq!(section_table(&be, 2000), None);
        assert_eq!(section_table(b"#!/bin/sh\n", 2000), None);
    }

    #[test]
    fn loader_sections_are_picked_merged_and_clipped() {
        let table = [
            shdr(0, 0, 0, 0),                                          // the null section
            shdr(SHT_DYNSYM, SHF_ALLOC, 0x1000, 0x800),                // .dynsym
            shdr(SHT_STRTAB, SHF_ALLOC, 0x1800, 0x800),                // .dynstr, adjacent: merged
            shdr(SHT_PROGBITS, SHF_ALLOC | 0x4, 0x4000, 0x9000),       // .text: not read
            shdr(SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, 0xd000, 0x1000), // .data.rel.ro
            shdr(SHT_NOBITS, SHF_ALLOC | SHF_WRITE, 0xe000, 0x5000),   // .bss: no bytes
            shdr(SHT_STRTAB, 0, 0xf000, 0x100),                        // .shstrtab: not allocated
            shdr(SHT_RELA, SHF_ALLOC, 0xf800, 0x10_0000), // runs past the file: clipped
        ]
        .concat();
        assert_eq!(
            loader_ranges(&table, 0x10000),
            vec![0x1000..0x2000, 0xd000..0xe000, 0xf800..0x10000]
        );
        // A truncated entry at the end is ignored.
        assert_eq!(
            loader_ranges(&table[..SHDR_LEN * 2 + 10], 0x10000),
            vec![0x1000..0x1800]
        );
    }

    #[test]
    fn late_sections_are_the_unloaded_and_the_unwind_tables() {
        let names = b"\0.text\0.eh_frame\0.eh_frame_hdr\0.symtab\0.shstrtab\0.eh_frames\0";
        let at = |n: &[u8]| {
            names
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n && w[n.len() + 1] == 0)
                .map(|p| p as u32 + 1)
                .unwrap_or(0)
        };
        let named = |n: &[u8], kind, flags, offset, size| {
            let mut s = shdr(kind, flags, offset, size);
            s[..4].copy_from_slice(&at(n).to_le_bytes());
            s
        };
        let table = [
            shdr(0, 0, 0, 0),
            named(b".text", SHT_PROGBITS, SHF_ALLOC | 0x4, 0x1000, 0x4000),
            named(b".eh_frame_hdr", SHT_PROGBITS, SHF_ALLOC, 0x5000, 0x100),
            named(b".eh_frame", SHT_PROGBITS, SHF_ALLOC, 0x5100, 0xf00), // adjacent: merged
            named(b".eh_frames", SHT_PROGBITS, SHF_ALLOC, 0x6000, 0x1000), // not the same name
            named(b".symtab", 2, 0, 0x8000, 0x2000),                     // not allocated
            named(b".shstrtab", SHT_STRTAB, 0, 0xa000, names.len() as u64),
        ]
        .concat();
        let mut head = header(0xb000, 7);
        head[0x3e..0x40].copy_from_slice(&6u16.to_le_bytes());
        let file_size = 0xb000 + table.len() as u64;
        assert_eq!(
            names_range(&head, &table, file_size),
            Some(0xa000..0xa000 + names.len() as u64)
        );
        assert_eq!(
            late_ranges(&table, names, file_size),
            vec![0x5000..0x6000, 0x8000..0xa000 + names.len() as u64]
        );
        // A name table index past the table, or one that is not a string table: none.
        head[0x3e..0x40].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(names_range(&head, &table, file_size), None);
        head[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(names_range(&head, &table, file_size), None);
        // Without names, only the unloaded sections are late.
        assert_eq!(
            late_ranges(&table, b"", file_size),
            vec![0x8000..0xa000 + names.len() as u64]
        );
    }

    #[test]
    fn at_most_max_hint_bytes_are_asked_for() {
        let table = [
            shdr(SHT_RELA, SHF_ALLOC, 0, MAX_HINT_BYTES - 10),
            shdr(SHT_DYNSYM, SHF_ALLOC, MAX_HINT_BYTES + 100, 1000),
            shdr(SHT_STRTAB, SHF_ALLOC, MAX_HINT_BYTES + 5000, 1000),
        ]
        .concat();
        assert_eq!(
            loader_ranges(&table, u64::MAX),
            vec![
                0..MAX_HINT_BYTES - 10,
                MAX_HINT_BYTES + 100..MAX_HINT_BYTES + 110
            ]
        );
    }
}
