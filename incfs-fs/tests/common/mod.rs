//! Trees with every shape `pack` must handle, and comparison of an image with its tree.

#![allow(dead_code)]

pub mod daemon;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use incfs_fs::format::{ChunkEntry, Image, InodeKind, RangeRead};

pub use incfs_datasets::synth::noise;

/// Builds a tree with odd shapes: empty files, sizes around chunk boundaries, duplicate
/// content, symlinks (relative, absolute, dangling), hard links, non-UTF-8 and odd names,
/// deep directories, an empty directory, a fifo (which `pack` must skip) and xattrs.
pub fn odd_tree(root: &Path, chunk: usize) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("one-byte"), b"x").unwrap();
    fs::write(root.join("chunk-minus-1"), noise(chunk - 1, 1)).unwrap();
    fs::write(root.join("chunk-exact"), noise(chunk, 2)).unwrap();
    fs::write(root.join("chunk-plus-1"), noise(chunk + 1, 3)).unwrap();
    let big = noise(chunk * 3 + chunk / 2, 4);
    fs::write(root.join("three-and-a-half"), &big).unwrap();
    fs::write(root.join("duplicate-of-three-and-a-half"), &big).unwrap();
    fs::write(root.join("text"), b"all work and no play ".repeat(5000)).unwrap();
    fs::write(root.join("zeros"), vec![0u8; chunk * 4]).unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("sub/hardlink-a"), b"linked content").unwrap();
    fs::hard_link(root.join("sub/hardlink-a"), root.join("hardlink-b")).unwrap();
    symlink("sub/hardlink-a", root.join("rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link-out-of-tree")).unwrap();
    symlink("../../nowhere", root.join("sub/dangling")).unwrap();
    fs::write(
        root.join(OsStr::from_bytes(b"non-utf8-\xff\xfe")),
        b"bytes name",
    )
    .unwrap();
    fs::write(root.join("name with spaces\nand newline"), b"odd").unwrap();
    fs::write(root.join("ünïcødé"), b"unicode").unwrap();
    let mut deep = root.join("deep");
    for i in 0..20 {
        deep = deep.join(format!("d{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf"), b"at the bottom").unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    let fifo = root.join("a-fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    xattr::set(root.join("text"), "user.incfs.test", b"value-1").unwrap();
    fs::set_permissions(
        root.join("one-byte"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
}

/// Every path under `root` (not following symlinks), relative, as bytes.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Asserts that the image holds exactly the tree at `root`: same entries (special files
/// excepted), same bytes, link targets, permissions, mtimes, xattrs, and hard links shared.
/// Returns the number of regular files compared.
pub fn assert_image_matches<R: RangeRead>(img: &Image<R>, root: &Path) -> usize {
    let entries: HashMap<Vec<u8>, u32> = img.walk().into_iter().collect();
    let mut by_source_inode: HashMap<u64, u32> = HashMap::new();
    let mut files = 0;
    for rel in list(root) {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let key = rel.as_os_str().as_bytes().to_vec();
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
            assert!(
                !entries.contains_key(&key),
                "special file {rel:?} was packed"
            );
            continue;
        }
        let ino = *entries
            .get(&key)
            .unwrap_or_else(|| panic!("{rel:?} missing from image"));
        let inode = img.inode(ino).unwrap();
        assert_eq!(inode.perm, meta.mode() & 0o7777, "{rel:?} perm");
        assert_eq!(inode.mtime_sec, meta.mtime(), "{rel:?} mtime");
        match &inode.kind {
            InodeKind::File { size, .. } => {
                assert!(ft.is_file(), "{rel:?} kind");
                assert_eq!(*size, meta.len());
                assert_eq!(
                    img.read_file(ino).unwrap(),
                    fs::read(&path).unwrap(),
                    "{rel:?} bytes"
                );
                if let Some(prev) = by_source_inode.insert(meta.ino(), ino) {
                    assert_eq!(prev, ino, "{rel:?}: hard links must share one inode");
                }
                let want: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&path)
                    .unwrap()
                    .map(|n| {
                        (
                            n.as_bytes().to_vec(),
                            xattr::get(&path, &n).unwrap().unwrap(),
                        )
                    })
                    .collect();
                let got: Vec<(Vec<u8>, Vec<u8>)> = inode
                    .xattrs
                    .iter()
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect();
                assert_eq!(got.len(), want.len(), "{rel:?} xattrs");
                for w in want {
                    assert!(got.contains(&w), "{rel:?} lacks xattr {w:?}");
                }
                files += 1;
            }
            InodeKind::Symlink { target } => {
                assert!(ft.is_symlink(), "{rel:?} kind");
                assert_eq!(
                    target.as_slice(),
                    fs::read_link(&path).unwrap().as_os_str().as_bytes()
                );
            }
            InodeKind::Dir { entries } => {
                assert!(ft.is_dir(), "{rel:?} kind");
                let on_disk = fs::read_dir(&path)
                    .unwrap()
                    .filter(|e| {
                        let t = e.as_ref().unwrap().file_type().unwrap();
                        t.is_file() || t.is_dir() || t.is_symlink()
                    })
                    .count();
                assert_eq!(entries.len(), on_disk, "{rel:?} entry count");
            }
        }
    }
    files
}

/// The chunk-table entries of the file at `path` of `img`, in file order.
pub fn file_entries<R: RangeRead>(img: &Image<R>, path: &str) -> Vec<ChunkEntry> {
    let f = img
        .files()
        .into_iter()
        .find(|f| f.path == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} not in the image"));
    (f.first_chunk..f.first_chunk + f.chunks)
        .map(|s| *img.table().get(s).unwrap())
        .collect()
}

/// The number in environment variable `name`, or `default` when it is unset (long runs raise
/// the tests' sizes this way).
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
        .unwrap_or(default)
}

/// Deterministic text with a shared vocabulary, the way a tree of source files is: each
/// chunk compresses a little alone and much better with a dictionary of the others.
pub fn source_text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "def",
        "return",
        "self",
        "import",
        "from",
        "class",
        "lambda",
        "yield",
        "value",
        "result",
        "index",
        "buffer",
        "offset",
        "length",
        "config",
        "options",
        "handler",
        "request",
        "response",
        "error",
        "raise",
        "except",
        "finally",
        "with",
        "async",
        "await",
        "for",
        "while",
        "in",
        "not",
        "and",
        "or",
        "None",
        "True",
        "False",
        "print",
        "len(",
        "range(",
        "dict(",
        "list(",
        "isinstance(",
        "__init__",
        "__name__",
        "kwargs",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        if x.is_multiple_of(29) {
            out.extend_from_slice(format!("{}", x % 1000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Reads the file at `path` (from the root) of a mounted-in-process `fs` whole.
pub fn read_file(
    fs: &std::sync::Arc<incfs_fs::fs::IncFs>,
    path: &str,
) -> Result<Vec<u8>, incfs_fs::fs::FsError> {
    let mut ino = 1;
    for comp in path.split('/') {
        ino = fs.lookup(ino, comp.as_bytes())?.ino;
    }
    let (fh, _) = fs.open(ino)?;
    let size = fs.getattr(ino)?.size;
    let mut out = Vec::new();
    let r = (|| {
        while (out.len() as u64) < size {
            let b = fs.read(ino, fh, out.len() as u64, 1 << 20)?;
            assert!(!b.is_empty());
            out.extend_from_slice(&b);
        }
        Ok(())
    })();
    fs.release(fh);
    r.map(|()| out)
}
