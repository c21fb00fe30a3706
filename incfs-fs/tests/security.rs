//! The security guarantees of docs/reliability.md ("Security"): pack never stores what a
//! symlink points at, nor an absolute or `..` path; an image whose manifest names an entry
//! that could escape the mount (`/`, `..`, `.`, NUL, empty) is refused when opened and
//! mounted; a mount is read-only and, unless asked, closed to other users.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use incfs_datasets::require::{Need, require};
use incfs_fs::format::{
    Digest, DirEntry, FormatError, HEADER_LEN, Header, Image, InodeKind, Manifest, PackOptions,
    pack_dir,
};
use incfs_fs::fs::fuse::{MountOptions, spawn_mount};
use incfs_fs::fs::{FsConfig, FsError, IncFs};
use incfs_fs::source::FileSource;

fn pack(tree: &Path, out: &Path) {
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    pack_dir(tree, out, &opts, &()).unwrap();
}

/// True when `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn pack_stores_links_out_of_the_tree_never_what_they_point_at() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("secret-dir")).unwrap();
    // Incompressible, so that it would appear verbatim in the image if it were packed.
    let secret = common::noise(64 * 1024, 99);
    fs::write(outside.join("secret"), &secret).unwrap();
    fs::write(outside.join("secret-dir/inner"), &secret).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/own"), b"inside").unwrap();
    symlink(outside.join("secret"), tree.join("abs-file-link")).unwrap();
    symlink("../../outside/secret", tree.join("sub/rel-file-link")).unwrap();
    symlink(outside.join("secret-dir"), tree.join("dir-link")).unwrap();
    symlink("/", tree.join("root-link")).unwrap();

    // The root given with `..` and `.` in it: paths are stored relative to it all the same.
    let root = tree.join("../tree/./sub/..");
    let out = dir.path().join("img");
    pack(&root, &out);
    let img = Image::open_path(&out, None).unwrap();
    let mut paths: Vec<Vec<u8>> = img.walk().into_iter().map(|(p, _)| p).collect();
    paths.sort();
    let want: Vec<&[u8]> = vec![
        b"abs-file-link",
        b"dir-link",
        b"root-link",
        b"sub",
        b"sub/own",
        b"sub/rel-file-link",
    ];
    assert_eq!(paths, want, "the links' targets were walked into");
    for (path, ino) in img.walk() {
        assert!(!path.starts_with(b"/"), "{path:?} is absolute");
        assert!(
            path.split(|&b| b == b'/')
                .all(|c| c != b".." && c != b"." && !c.is_empty()),
            "{path:?} has a . or .. component"
        );
        let kind = &img.inode(ino).unwrap().kind;
        if path.ends_with(b"link") {
            let InodeKind::Symlink { target } = kind else {
                panic!("{path:?} was not stored as a symlink: {kind:?}");
            };
            let on_disk =
                fs::read_link(tree.join(String::from_utf8(path.clone()).unwrap())).unwrap();
            assert_eq!(target.as_slice(), on_disk.as_os_str().as_encoded_bytes());
        }
    }
    assert_eq!(img.files().len(), 1, "only sub/own holds data");
    let bytes = fs::read(&out).unwrap();
    assert!(
        !contains(&bytes, &secret[..64]),
        "bytes from outside the tree are in the image"
    );
}

/// `img` with its manifest changed by `edit`, re-encoded and sealed (root digest and header
/// checksum recomputed) as a hostile server could.
fn with_manifest(img: &Path, edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let image = Image::open_path(img, None).unwrap();
    let bytes = fs::read(img).unwrap();
    let h = image.header();
    let mut m = image.manifest().clone();
    edit(&mut m);
    let stored = m.encode(3).unwrap();
    let table_offset = HEADER_LEN as u64 + stored.len() as u64;
    let header = Header {
        chunk_size: h.chunk_size,
        manifest_offset: HEADER_LEN as u64,
        manifest_len: stored.len() as u64,
        chunk_table_offset: table_offset,
        chunk_table_len: h.chunk_table_len,
        data_offset: table_offset + h.chunk_table_len,
        data_len: h.data_len,
        root_digest: Digest::of(&stored),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&stored);
    out.extend_from_slice(&bytes[h.chunk_table_offset as usize..]);
    out
}

/// A change a hostile server makes to a manifest.
type Edit = Box<dyn FnOnce(&mut Manifest)>;

#[test]
fn images_whose_names_could_escape_are_refused_at_open_and_mount() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("d")).unwrap();
    fs::write(tree.join("d/zz"), b"payload").unwrap();
    symlink("zz", tree.join("d/ln")).unwrap();
    let good = dir.path().join("good");
    pack(&tree, &good);

    // A re-sealed but unchanged manifest is accepted: the refusals below are the names'.
    let same = dir.path().join("same");
    fs::write(&same, with_manifest(&good, |_| {})).unwrap();
    Image::open_path(&same, None).unwrap();

    let renamed = |name: &[u8]| {
        let name = name.to_vec();
        move |m: &mut Manifest| {
            for inode in &mut m.inodes {
                if let InodeKind::Dir { entries } = &mut inode.kind {
                    for e in entries.iter_mut().filter(|e| e.name == b"zz") {
                        e.name = name.clone();
                    }
                    entries.sort_by(|a, b| a.name.cmp(&b.name));
                }
            }
        }
    };
    let cases: Vec<(&str, Edit)> = vec![
        ("dot-dot", Box::new(renamed(b".."))),
        ("dot", Box::new(renamed(b"."))),
        ("slash", Box::new(renamed(b"../../etc/passwd"))),
        ("absolute", Box::new(renamed(b"/etc"))),
        ("nul", Box::new(renamed(b"a\0b"))),
        ("empty", Box::new(renamed(b""))),
        (
            "symlink-nul",
            Box::new(|m: &mut Manifest| {
                for inode in &mut m.inodes {
                    if let InodeKind::Symlink { target } = &mut inode.kind {
                        *target = b"zz\0/etc/passwd".to_vec();
                    }
                }
            }),
        ),
        (
            "second-name-for-a-dir",
            Box::new(|m: &mut Manifest| {
                if let InodeKind::Dir { entries } = &mut m.inodes[0].kind {
                    let d = entries[0].inode;
                    entries.push(DirEntry {
                        name: b"e".to_vec(),
                        inode: d,
                    });
                }
            }),
        ),
    ];
    for (what, edit) in cases {
        let path = dir.path().join(what);
        fs::write(&path, with_manifest(&good, edit)).unwrap();
        match Image::open_path(&path, None) {
            Err(FormatError::ManifestInvalid(msg)) => {
                eprintln!("{what}: refused: {msg}");
            }
            Err(e) => panic!("{what}: refused for another reason: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
        let source = Arc::new(FileSource::open(&path).unwrap());
        let cfg = FsConfig::new(dir.path().join("cache"));
        match IncFs::new(source, &cfg) {
            Err(e @ FsError::Meta { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("manifest is invalid"), "{what}: {msg}");
            }
            Err(e) => panic!("{what}: mount refused for another reason: {e}"),
            Ok(_) => panic!("{what}: mounted"),
        }
    }
}

#[test]
fn mounts_are_read_only_and_closed_to_other_users() {
    if !require(
        "mounts_are_read_only_and_closed_to_other_users",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("d")).unwrap();
    fs::write(tree.join("d/f"), b"content").unwrap();
    let img = dir.path().join("img");
    pack(&tree, &img);
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    // Other users may traverse the directories leading to the mount point.
    for p in [dir.path(), mnt.as_path()] {
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let fs_ = Arc::new(
        IncFs::new(
            Arc::new(FileSource::open(&img).unwrap()),
            &FsConfig::new(dir.path().join("cache")),
        )
        .unwrap(),
    );
    let session = spawn_mount(fs_, &mnt, &MountOptions::default()).unwrap();

    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap()))
        .expect("the mount is listed");
    let opts: Vec<&str> = line.split(' ').nth(3).unwrap().split(',').collect();
    assert!(opts.contains(&"ro"), "{line}");
    assert!(!opts.contains(&"allow_other"), "{line}");

    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let f = mnt.join("d/f");
    erofs(
        fs::OpenOptions::new().write(true).open(&f).map(drop),
        "open for writing",
    );
    erofs(fs::write(mnt.join("d/new"), b"x"), "create");
    erofs(fs::create_dir(mnt.join("d/newdir")), "mkdir");
    erofs(fs::remove_file(&f), "unlink");
    erofs(fs::rename(&f, mnt.join("d/g")), "rename");
    erofs(symlink("f", mnt.join("d/ln")), "symlink");
    erofs(
        fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o777)),
        "chmod",
    );
    erofs(xattr::set(&f, "user.x", b"1"), "setxattr");
    assert_eq!(fs::read(&f).unwrap(), b"content");

    // Another user cannot even look: without allow_other the kernel refuses everyone but
    // the user who mounted.
    let out = Command::new("cat")
        .arg(&f)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "another user read the mount");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    drop(session);
}
