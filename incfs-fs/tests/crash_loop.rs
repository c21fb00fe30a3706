//! Crash safety: a mount prefetching from `incfs serve` is killed with SIGKILL at a random
//! moment, again and again, each time remounted with the same cache. After every kill the
//! cache's durable record claims only chunks whose bytes on disk are right; no remount
//! fetches a chunk the record already held, none is dropped by recovery; and at the end the
//! whole tree reads back identical.
//!
//! `INCFS_CRASH_ROUNDS` (default 20) sets the number of kills and `INCFS_CRASH_SEED`
//! (default 1) the random moments; `scripts/soak.sh` runs long loops with varying seeds.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use incfs_datasets::require::{Need, require};
use incfs_fs::cache::image_dir;
use incfs_fs::cache::record::{RECORD_HEADER_LEN, RecordHeader};
use incfs_fs::format::{FileRef, Image, PackOptions, pack_dir};
use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{ServeConfig, Server};

use common::daemon::{Daemon, ENV_PLAN, save_whole_files_plan};
use common::env_u64;

#[test]
#[ignore = "helper: run by the crash loop as its FUSE daemon"]
fn daemon_child() {
    common::daemon::child();
}

/// xorshift64*: the random moments of the kills, repeatable from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The image's regular files and where their chunks' stored bytes lie.
struct Layout {
    files: Vec<FileRef>,
    chunk_size: u64,
    /// (absolute offset of the stored bytes, stored length, slot), sorted by offset.
    stored: Vec<(u64, u64, u64)>,
    data_offset: u64,
    chunks: u64,
}

impl Layout {
    fn of(img: &Path) -> Layout {
        let img = Image::open_path(img, None).unwrap();
        let data_offset = img.header().data_offset;
        let mut stored: Vec<(u64, u64, u64)> = img
            .table()
            .entries()
            .iter()
            .enumerate()
            .map(|(slot, e)| {
                (
                    data_offset + e.stored_offset,
                    u64::from(e.stored_len),
                    slot as u64,
                )
            })
            .collect();
        stored.sort();
        Layout {
            files: img.files(),
            chunk_size: u64::from(img.manifest().chunk_size),
            stored,
            data_offset,
            chunks: img.table().len(),
        }
    }

    /// The file and byte offset of `slot`.
    fn locate(&self, slot: u64) -> (&FileRef, u64) {
        let f = self
            .files
            .iter()
            .find(|f| (f.first_chunk..f.first_chunk + f.chunks).contains(&slot))
            .unwrap_or_else(|| panic!("slot {slot} belongs to no file"));
        (f, (slot - f.first_chunk) * self.chunk_size)
    }

    /// The slots whose stored bytes lie wholly within one of the ranges the server answered.
    fn fetched(&self, server: &Server) -> BTreeSet<u64> {
        let stats = server.stats();
        assert_eq!(stats.ranges_dropped, 0, "the server's range log overflowed");
        let mut out = BTreeSet::new();
        for r in stats.ranges.iter().filter(|r| r.start >= self.data_offset) {
            let end = r.start + r.len;
            let from = self.stored.partition_point(|&(o, _, _)| o < r.start);
            for &(o, len, slot) in &self.stored[from..] {
                if o + len > end {
                    break;
                }
                out.insert(slot);
            }
        }
        out
    }
}

/// The slots the cache's durable record claims, each checked against the tree: the bytes
/// of its backing file at the chunk's place must be the original file's.
fn claimed_and_checked(
    cache: &Path,
    root: &incfs_fs::format::Digest,
    layout: &Layout,
    tree: &Path,
) -> BTreeSet<u64> {
    let dir = image_dir(cache, root);
    let bytes = fs::read(dir.join("record")).unwrap();
    let header = RecordHeader::decode(&bytes).expect("the record's header checks out");
    assert_eq!(header.chunk_count, layout.chunks);
    assert!(!header.clean, "a killed mount left a clean record");
    let mut claimed = BTreeSet::new();
    for (w, word) in bytes[RECORD_HEADER_LEN as usize..]
        .chunks_exact(8)
        .enumerate()
    {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        for bit in 0..64 {
            if word & (1 << bit) != 0 {
                claimed.insert(w as u64 * 64 + bit);
            }
        }
    }
    for &slot in &claimed {
        let (f, offset) = layout.locate(slot);
        let len = layout.chunk_size.min(f.size - offset) as usize;
        let mut got = vec![0u8; len];
        let mut want = vec![0u8; len];
        fs::File::open(dir.join("data").join(f.inode.to_string()))
            .unwrap()
            .read_exact_at(&mut got, offset)
            .unwrap_or_else(|e| panic!("slot {slot}: the record claims it, its file: {e}"));
        fs::File::open(tree.join(f.display_path()))
            .unwrap()
            .read_exact_at(&mut want, offset)
            .unwrap();
        assert!(
            got == want,
            "slot {slot} ({} @ {offset}): the record claims wrong bytes",
            f.display_path()
        );
    }
    claimed
}

#[test]
fn kill9_at_random_moments_while_prefetching_then_remount() {
    if !require(
        "kill9_at_random_moments_while_prefetching_then_remount",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let rounds = env_u64("INCFS_CRASH_ROUNDS", 20);
    let seed = env_u64("INCFS_CRASH_SEED", 1);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| -> PathBuf { dir.path().join(n) };
    let tree = path("tree");
    fs::create_dir_all(tree.join("lib")).unwrap();
    // 48 MiB of incompressible data (no two chunks alike, so every chunk has its own stored
    // bytes) in files of several sizes.
    for (i, mib) in [16usize, 12, 8, 6, 4, 2].iter().enumerate() {
        let name = if i % 2 == 0 {
            format!("lib/f{i}")
        } else {
            format!("f{i}")
        };
        fs::write(
            tree.join(name),
            common::noise((mib << 20) + i * 777, 40 + i as u64),
        )
        .unwrap();
    }
    let img = path("img");
    pack_dir(&tree, &img, &PackOptions::default(), &()).unwrap();
    let layout = Layout::of(&img);
    let root = Image::open_path(&img, None).unwrap().root_digest();
    // The plan: every file (the prefetcher then fetches the rest anyway).
    save_whole_files_plan(&img, &path("plan.json"));
    // A link on which the whole image takes about 0.4 s per round (50 Mbit/s for 20 rounds),
    // so that most rounds are killed in the middle of fetching however many there are.
    let stored = fs::metadata(&img).unwrap().len() as f64;
    let mut cfg = ServeConfig::new(&img);
    cfg.link = LinkConfig {
        bandwidth_mbit: Some(stored * 8.0 / 1e6 / (rounds as f64 * 0.4)),
        ..LinkConfig::default()
    };
    let server = Server::start(cfg).unwrap();
    let (mnt, cache) = (path("mnt"), path("cache"));
    fs::create_dir_all(&mnt).unwrap();
    let env = [(ENV_PLAN, path("plan.json").to_string_lossy().into_owned())];

    let mut claimed = BTreeSet::new();
    for round in 0..rounds {
        server.reset_stats();
        let d = Daemon::start_with(&server.url("img"), &mnt, &cache, None, &env);
        let s = d.stats();
        if round > 0 {
            assert!(s.recovered_unclean, "round {round}: {s:?}");
        }
        assert_eq!(
            s.recovered_dropped, 0,
            "round {round}: recovery dropped chunks: {s:?}"
        );
        let wait = rng.below(1000);
        std::thread::sleep(Duration::from_millis(wait));
        let before = d.stats();
        d.kill9();
        let fetched = layout.fetched(&server);
        let again: Vec<&u64> = fetched.intersection(&claimed).collect();
        assert!(
            again.is_empty(),
            "round {round}: verified chunks fetched again: {again:?}"
        );
        let now = claimed_and_checked(&cache, &root, &layout, &tree);
        assert!(
            now.is_superset(&claimed),
            "round {round}: the record lost chunks"
        );
        eprintln!(
            "round {round}: killed after {wait} ms; {} chunks fetched, {} local at the last \
             look, {} durable (of {})",
            fetched.len(),
            before.chunks_local,
            now.len(),
            layout.chunks
        );
        claimed = now;
    }

    // The last remount: recovery keeps every claimed chunk, the rest arrives, all is right,
    // and nothing that was claimed is fetched again.
    server.reset_stats();
    let d = Daemon::start(&server.url("img"), &mnt, &cache, None);
    let s = d.stats();
    assert_eq!(s.recovered_dropped, 0, "{s:?}");
    assert!(s.chunks_local >= claimed.len() as u64, "{s:?}");
    for f in &layout.files {
        let want = fs::read(tree.join(f.display_path())).unwrap();
        let got = fs::read(mnt.join(f.display_path())).unwrap();
        assert!(got == want, "{}: wrong bytes", f.display_path());
    }
    let again: Vec<u64> = layout
        .fetched(&server)
        .intersection(&claimed)
        .copied()
        .collect();
    assert!(again.is_empty(), "verified chunks fetched again: {again:?}");
    let s = d.stats();
    assert_eq!(s.chunks_local, s.chunks_total, "{s:?}");
    d.unmount();
    server.shutdown();
}
