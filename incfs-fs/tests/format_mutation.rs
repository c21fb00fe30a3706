//! A small image mutated at random (truncated, bit-flipped, spliced) never makes the reader
//! panic or return wrong bytes: every read either errors or returns the original content.

mod common;

use std::collections::HashMap;
use std::fs;
use std::sync::OnceLock;

use incfs_fs::format::{Image, InodeKind, PackOptions, pack_dir};
use proptest::prelude::*;

/// An image's bytes, and each of its files' content by path.
type Pristine = (Vec<u8>, HashMap<Vec<u8>, Vec<u8>>);

/// The pristine image and each file's content by path.
fn pristine() -> &'static Pristine {
    static IMG: OnceLock<Pristine> = OnceLock::new();
    IMG.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("noise"), common::noise(4096 * 2 + 100, 5)).unwrap();
        fs::write(tree.join("text"), b"lorem ipsum dolor ".repeat(700)).unwrap();
        fs::write(tree.join("copy"), b"lorem ipsum dolor ".repeat(700)).unwrap();
        fs::write(tree.join("empty"), b"").unwrap();
        fs::create_dir(tree.join("d")).unwrap();
        fs::write(tree.join("d/small"), b"small").unwrap();
        std::os::unix::fs::symlink("d/small", tree.join("link")).unwrap();
        let out = tmp.path().join("t.img");
        let opts = PackOptions {
            chunk_size: 4096,
            ..PackOptions::default()
        };
        pack_dir(&tree, &out, &opts, &()).unwrap();
        let bytes = fs::read(&out).unwrap();
        let img = Image::open(bytes.clone(), None).unwrap();
        let contents = img
            .files()
            .into_iter()
            .map(|f| (f.path.clone(), img.read_file(f.inode).unwrap()))
            .collect();
        (bytes, contents)
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Splice { from: usize, to: usize, len: usize },
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    if n == 0 {
        return;
    }
    match *m {
        Mutation::Truncate(at) => bytes.truncate(at % n),
        Mutation::Flip(at, bit) => bytes[at % n] ^= 1 << (bit % 8),
        Mutation::Splice { from, to, len } => {
            let from = from % n;
            let to = to % n;
            let len = len.min(n - from).min(n - to);
            let piece = bytes[from..from + len].to_vec();
            bytes[to..to + len].copy_from_slice(&piece);
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b)),
        (any::<usize>(), any::<usize>(), 1usize..512)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

/// Flips concentrated on the metadata (header, manifest, chunk table), where a random offset
/// in the whole image rarely lands.
fn meta_flip() -> impl Strategy<Value = Mutation> {
    (0usize..2048, any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b))
}

fn check(mutations: &[Mutation]) {
    let (bytes, contents) = pristine();
    let mut b = bytes.clone();
    for m in mutations {
        apply(&mut b, m);
    }
    let Ok(img) = Image::open(b, None) else {
        return;
    };
    for (path, ino) in img.walk() {
        if let Some(InodeKind::File { .. }) = img.inode(ino).map(|i| &i.kind)
            && let Ok(data) = img.read_file(ino)
        {
            // A mutation may rename (splice) but never change bytes: a file that reads
            // must match the original file of that path.
            let want = contents.get(&path);
            assert_eq!(
                Some(&data),
                want,
                "wrong bytes for {:?}",
                String::from_utf8_lossy(&path)
            );
        }
    }
    let _ = img.verify(&|_| {});
}

/// Found by the proptest: truncating to nothing, then mutating again.
#[test]
fn regression_truncate_to_empty_then_mutate() {
    check(&[
        Mutation::Truncate(0),
        Mutation::Flip(3, 1),
        Mutation::Truncate(5),
    ]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn mutated_images_never_yield_wrong_bytes(ms in proptest::collection::vec(mutation(), 1..4)) {
        check(&ms);
    }

    #[test]
    fn mutated_metadata_never_yields_wrong_bytes(ms in proptest::collection::vec(meta_flip(), 1..3)) {
        check(&ms);
    }
}
