//! zstd dictionaries: `pack` trains one per group of similar chunks (files of one extension,
//! each large ELF section), the image shrinks, every reader (the image reader, `relayout`,
//! the lazy mount) decodes with the right one and fetches it once, a damaged dictionary
//! gives errors and never other bytes, and images of format 2 (none) still read.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use incfs_fs::fetch::FetchConfig;
use incfs_fs::format::{Image, PackOptions, RelayoutOptions, pack_dir, relayout};
use incfs_fs::fs::{FsConfig, FsError, IncFs};
use incfs_fs::source::{MockSource, Source};

const CHUNK: u32 = 4096;

/// A 64-bit little-endian ELF file of `len` bytes whose one section, `[4096, 4096 +
/// section)`, holds text and whose other bytes are zeros.
fn fake_elf(len: usize, section: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    let shoff = (len - 128) as u64;
    b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    b[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
    // Section 1: PROGBITS, allocated and executable, at 4096.
    let sh = len - 64;
    b[sh + 4..sh + 8].copy_from_slice(&1u32.to_le_bytes());
    b[sh + 8..sh + 16].copy_from_slice(&6u64.to_le_bytes());
    b[sh + 0x18..sh + 0x20].copy_from_slice(&4096u64.to_le_bytes());
    b[sh + 0x20..sh + 0x28].copy_from_slice(&(section as u64).to_le_bytes());
    b[4096..4096 + section].copy_from_slice(&common::source_text(seed, section));
    b
}

/// 700 `.py` files of two chunks, a fake library with a 3 MiB section, and a few files of
/// noise that belong to no group.
fn similar_tree(root: &Path) {
    fs::create_dir_all(root.join("pkg")).unwrap();
    for i in 0..700u64 {
        fs::write(
            root.join("pkg").join(format!("m{i}.py")),
            common::source_text(i + 1, 2 * CHUNK as usize - 100),
        )
        .unwrap();
    }
    fs::write(root.join("libfake.so"), fake_elf(4 << 20, 3 << 20, 9)).unwrap();
    for i in 0..3u64 {
        fs::write(root.join(format!("noise{i}.bin")), common::noise(20_000, i)).unwrap();
    }
}

struct Packed {
    _tmp: tempfile::TempDir,
    tree: std::path::PathBuf,
    image: std::path::PathBuf,
    plain: std::path::PathBuf,
}

fn packed() -> Packed {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    similar_tree(&tree);
    let image = tmp.path().join("dict.img");
    let plain = tmp.path().join("plain.img");
    let opts = PackOptions::default();
    pack_dir(&tree, &image, &opts, &()).unwrap();
    let opts = PackOptions {
        dictionaries: false,
        ..PackOptions::default()
    };
    pack_dir(&tree, &plain, &opts, &()).unwrap();
    Packed {
        _tmp: tmp,
        tree,
        image,
        plain,
    }
}

/// The dictionary number of the entries of every chunk of the file at `path`.
fn file_dictionaries(img: &Image<fs::File>, path: &str) -> Vec<u8> {
    common::file_entries(img, path)
        .iter()
        .map(|e| e.dictionary)
        .collect()
}

#[test]
fn similar_chunks_share_a_dictionary_and_the_image_shrinks() {
    let p = packed();
    let img = Image::open_path(&p.image, None).unwrap();
    let plain = Image::open_path(&p.plain, None).unwrap();
    assert!(plain.manifest().dictionaries.is_empty());
    let dicts = &img.manifest().dictionaries;
    assert!(
        dicts.len() >= 2,
        "one for the .py files, one for the library's section: {dicts:?}"
    );
    // The .py chunks share one dictionary; the library's section has another; noise none.
    let py: Vec<u8> = (0..700)
        .flat_map(|i| file_dictionaries(&img, &format!("pkg/m{i}.py")))
        .collect();
    let py_dict = py[0];
    assert_ne!(py_dict, 0);
    let named = py.iter().filter(|&&d| d == py_dict).count();
    assert!(
        named * 10 >= py.len() * 9,
        "{named} of {} .py chunks",
        py.len()
    );
    let lib = file_dictionaries(&img, "libfake.so");
    let in_section = &lib[1..1 + 768];
    assert!(in_section.iter().all(|&d| d == in_section[0] && d != 0));
    assert_ne!(in_section[0], py_dict, "the section is a group of its own");
    assert!(
        file_dictionaries(&img, "noise0.bin")
            .iter()
            .all(|&d| d == 0)
    );
    let (with, without) = (
        fs::metadata(&p.image).unwrap().len(),
        fs::metadata(&p.plain).unwrap().len(),
    );
    assert!(
        with * 10 < without * 9,
        "with dictionaries {with} bytes, without {without}"
    );
    assert!(common::assert_image_matches(&img, &p.tree) >= 704);
    let report = img.verify(&|_| {});
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

#[test]
fn a_damaged_dictionary_is_refused_and_never_gives_other_bytes() {
    let p = packed();
    let img = Image::open_path(&p.image, None).unwrap();
    let d = img.manifest().dictionaries[0];
    let mut bytes = fs::read(&p.image).unwrap();
    let at = (img.header().data_offset + d.offset + u64::from(d.len) / 2) as usize;
    bytes[at] ^= 0x40;
    let damaged = Image::open(bytes.clone(), None).unwrap();
    let report = damaged.verify(&|_| {});
    assert!(!report.failures.is_empty());
    assert!(
        report.failures.iter().all(|f| f
            .reason
            .contains("dictionary 1 is corrupt: digest mismatch")),
        "{:?}",
        &report.failures[..3.min(report.failures.len())]
    );
    // Through a lazy mount: the files that need it fail, the others read.
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = FsConfig::new(cache.path().to_path_buf());
    cfg.fetch = FetchConfig {
        max_attempts: 2,
        initial_backoff: std::time::Duration::from_millis(1),
        ..FetchConfig::default()
    };
    let fs = Arc::new(IncFs::new(Arc::new(MockSource::new(bytes)), &cfg).unwrap());
    let mut failed = 0;
    for f in img.files() {
        let want = fs::read(p.tree.join(f.display_path())).unwrap();
        let uses_it = (f.first_chunk..f.first_chunk + f.chunks)
            .any(|s| img.table().get(s).unwrap().dictionary == 1);
        match common::read_file(&fs, &f.display_path()) {
            Ok(got) => {
                assert!(
                    !uses_it,
                    "{} read although its dictionary is damaged",
                    f.display_path()
                );
                assert_eq!(got, want, "{}", f.display_path());
            }
            Err(e) => {
                assert!(uses_it, "{}: {e}", f.display_path());
                assert!(matches!(e, FsError::Fetch { .. }), "{e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0);
    fs.shutdown().unwrap();
}

#[test]
fn a_lazy_mount_fetches_each_dictionary_once_and_reads_every_file_right() {
    let p = packed();
    let img = Image::open_path(&p.image, None).unwrap();
    let bytes = fs::read(&p.image).unwrap();
    let src = Arc::new(MockSource::new(bytes));
    let cache = tempfile::tempdir().unwrap();
    let cfg = FsConfig::new(cache.path().to_path_buf());
    let dyn_src: Arc<dyn Source> = src.clone();
    let fs = Arc::new(IncFs::new(dyn_src, &cfg).unwrap());
    for f in img.files() {
        let want = fs::read(p.tree.join(f.display_path())).unwrap();
        assert_eq!(common::read_file(&fs, &f.display_path()).unwrap(), want);
    }
    let data = img.header().data_offset;
    for d in &img.manifest().dictionaries {
        let asked = src
            .requests()
            .iter()
            .filter(|r| r.offset == data + d.offset && r.len == u64::from(d.len))
            .count();
        assert_eq!(asked, 1, "dictionary at {} fetched {asked} times", d.offset);
    }
    fs.shutdown().unwrap();
}

#[test]
fn relayout_keeps_the_dictionaries_of_the_chunks_it_copies() {
    let p = packed();
    let img = Image::open_path(&p.image, None).unwrap();
    // Hot: the first chunk of every tenth .py file.
    let hot: Vec<u64> = img
        .files()
        .iter()
        .filter(|f| f.path.ends_with(b"0.py"))
        .map(|f| f.first_chunk)
        .collect();
    let out = p.image.with_file_name("hot.img");
    relayout(&img, &hot, &out, &RelayoutOptions::default()).unwrap();
    let hot_img = Image::open_path(&out, None).unwrap();
    assert_eq!(
        hot_img.manifest().dictionaries.len(),
        img.manifest().dictionaries.len()
    );
    let cold_named = hot_img
        .table()
        .entries()
        .iter()
        .filter(|e| e.dictionary != 0)
        .count();
    assert!(cold_named > 1000, "{cold_named} entries name a dictionary");
    for &s in &hot {
        assert_eq!(
            hot_img.table().get(s).unwrap().dictionary,
            0,
            "hot frames need none"
        );
    }
    assert!(common::assert_image_matches(&hot_img, &p.tree) >= 704);
    assert!(hot_img.verify(&|_| {}).failures.is_empty());
}

#[test]
fn an_image_of_format_2_still_reads() {
    let p = packed();
    let mut bytes = fs::read(&p.plain).unwrap();
    assert_eq!(
        &bytes[8..12],
        &3u32.to_le_bytes(),
        "this build writes version 3"
    );
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let sum = blake3::hash(&bytes[..120]);
    bytes[120..128].copy_from_slice(&sum.as_bytes()[..8]);
    let img = Image::open(bytes.clone(), None).unwrap();
    assert!(img.manifest().dictionaries.is_empty());
    assert!(common::assert_image_matches(&img, &p.tree) >= 704);
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let sum = blake3::hash(&bytes[..120]);
    bytes[120..128].copy_from_slice(&sum.as_bytes()[..8]);
    let e = Image::open(bytes, None)
        .err()
        .expect("version 1 is refused");
    assert!(e.to_string().contains("version 1"), "{e}");
}

#[test]
fn the_fill_fetches_each_dictionary_once_and_none_when_everything_is_local() {
    let p = packed();
    let img = Image::open_path(&p.image, None).unwrap();
    let bytes = fs::read(&p.image).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let data = img.header().data_offset;
    let dictionary_requests = |src: &MockSource| {
        src.requests()
            .iter()
            .filter(|r| {
                img.manifest()
                    .dictionaries
                    .iter()
                    .any(|d| r.offset == data + d.offset && r.len == u64::from(d.len))
            })
            .count()
    };
    for round in 0..2 {
        let src = Arc::new(MockSource::new(bytes.clone()));
        let dyn_src: Arc<dyn Source> = src.clone();
        let fs = Arc::new(IncFs::new(dyn_src, &FsConfig::new(cache.path().to_path_buf())).unwrap());
        fs.start_fill(incfs_fs::fetch::fill::FillConfig::default())
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !fs.fill_stats().is_some_and(|s| s.done) {
            assert!(
                std::time::Instant::now() < deadline,
                "the fill did not finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let want = if round == 0 {
            img.manifest().dictionaries.len()
        } else {
            0
        };
        assert_eq!(dictionary_requests(&src), want, "round {round}");
        for f in img.files().iter().step_by(50) {
            let want = fs::read(p.tree.join(f.display_path())).unwrap();
            assert_eq!(common::read_file(&fs, &f.display_path()).unwrap(), want);
        }
        fs.shutdown().unwrap();
    }
}
