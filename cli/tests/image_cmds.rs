//! `incfs pack`, `inspect` and `verify` as a user runs them.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn incfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(args)
        .output()
        .unwrap()
}

fn tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.txt"), b"hello world\n".repeat(1000)).unwrap();
    fs::write(
        dir.join("sub/b.bin"),
        (0..20000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
}

#[test]
fn pack_inspect_verify_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let img = tmp.path().join("x.img");
    let out = incfs(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--chunk-size",
        "4K",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = pack["root_digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert_eq!(pack["files"], 2);
    assert_eq!(pack["symlinks"], 1);

    let out = incfs(&["inspect", img.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["root_digest"], digest.as_str());
    assert_eq!(j["chunk_size"], 4096);
    assert_eq!(j["raw_bytes"], 12000 + 20000);
    let paths: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.txt", "link", "sub", "sub/b.bin"]);
    // A file's chunks are the slots from its first_chunk on: a.txt's 3, then sub/b.bin's 5.
    let image = incfs_fs::format::Image::open_path(&img, None).unwrap();
    for f in image.files() {
        let e = j["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"].as_str().unwrap().as_bytes() == f.path.as_slice())
            .unwrap();
        assert_eq!(e["first_chunk"], f.first_chunk, "{e}");
        assert_eq!(e["chunks"], f.chunks, "{e}");
    }
    assert!(
        j["entries"][2].get("first_chunk").is_none(),
        "a dir has none"
    );

    let out = incfs(&["verify", img.to_str().unwrap(), "--expect-digest", &digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok "));

    let wrong = "00".repeat(32);
    let out = incfs(&["verify", img.to_str().unwrap(), "--expect-digest", &wrong]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root digest mismatch"));
}

#[test]
fn verify_names_the_file_and_chunk_of_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let img = tmp.path().join("x.img");
    assert!(
        incfs(&[
            "pack",
            src.to_str().unwrap(),
            "-o",
            img.to_str().unwrap(),
            "--chunk-size",
            "4K"
        ])
        .status
        .success()
    );
    let mut bytes = fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40; // the last chunk stored: sub/b.bin's last chunk
    fs::write(&img, &bytes).unwrap();
    let out = incfs(&["verify", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sub/b.bin chunk 4"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED"));
}

#[test]
fn bad_images_give_a_clear_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.img");
    fs::write(&junk, b"this is not an image at all, not even close......................................................................................").unwrap();
    for cmd in ["inspect", "verify"] {
        let out = incfs(&[cmd, junk.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("junk.img") && err.contains("not an incfs image"),
            "{err}"
        );
    }
    let out = incfs(&["inspect", tmp.path().join("missing.img").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.img"));
    let out = incfs(&[
        "pack",
        tmp.path().to_str().unwrap(),
        "-o",
        "/tmp/x.img",
        "--chunk-size",
        "3K",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

/// `incfs pack SRC -o OUT --chunk-size CHUNK --order ORDER EXTRA...`.
fn pack_ordered(src: &Path, out: &Path, chunk: &str, order: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "pack",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--chunk-size",
        chunk,
        "--order",
        order.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    incfs(&args)
}

/// `pack --order` from a read-log stores the planned chunks first in plan order and writes
/// the plan for the new image; the same plan given back reproduces the image exactly.
#[test]
fn pack_order_stores_planned_chunks_first_and_writes_their_plan() {
    use incfs_fs::format::Image;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    // The program read chunk 3 of sub/b.bin, then chunk 0 of a.txt.
    let log = tmp.path().join("run.read-log");
    fs::write(
        &log,
        concat!(
            r#"{"ns":1000,"path":"sub/b.bin","offset":12288,"len":4096,"result":"miss"}"#,
            "\n",
            r#"{"ns":2000,"path":"a.txt","offset":0,"len":100,"result":"miss"}"#,
            "\n"
        ),
    )
    .unwrap();
    let img = tmp.path().join("hot.img");
    let out = pack_ordered(&src, &img, "4K", &log, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["hot_chunks"], 2);
    let plan_path = tmp.path().join("hot.img.plan.json");
    assert_eq!(j["plan"], plan_path.to_str().unwrap());
    let plan: serde_json::Value = serde_json::from_slice(&fs::read(&plan_path).unwrap()).unwrap();
    assert_eq!(plan["image_digest"], j["root_digest"]);

    let image = Image::open_path(&img, None).unwrap();
    let slot_of = |path: &str, chunk: u64| {
        let f = image
            .files()
            .into_iter()
            .find(|f| f.path == path.as_bytes())
            .unwrap();
        f.first_chunk + chunk
    };
    // Both planned chunks share the first frame, in plan order.
    let table = image.table();
    let b3 = table.get(slot_of("sub/b.bin", 3)).unwrap();
    let a0 = table.get(slot_of("a.txt", 0)).unwrap();
    assert_eq!((b3.stored_offset, b3.frame_offset), (0, 0));
    assert_eq!((a0.stored_offset, a0.frame_offset), (0, 4096));
    assert_eq!(j["hot_bytes"], u64::from(a0.stored_len));
    assert!(incfs(&["verify", img.to_str().unwrap()]).status.success());
    // No temporary image is left beside the output.
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".incfs-pack-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The plan given back as --order reproduces the same image.
    let again = tmp.path().join("again.img");
    let again_plan = tmp.path().join("again.plan.json");
    let out = pack_ordered(
        &src,
        &again,
        "4K",
        &plan_path,
        &["--plan-out", again_plan.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&again).unwrap(), fs::read(&img).unwrap());

    // A plan for another chunk size is refused, naming the plan.
    let out = pack_ordered(&src, &tmp.path().join("bad.img"), "16K", &plan_path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hot.img.plan.json") && err.contains("4096"),
        "{err}"
    );
    assert!(!tmp.path().join("bad.img").exists());
}

/// 600 text files of one extension, each a chunk of words from one vocabulary.
/// `incfs pack SRC -o IMG [EXTRA]`, which must succeed.
fn pack_with(src: &Path, img: &Path, extra: Option<&str>) {
    let mut args = vec!["pack", src.to_str().unwrap(), "-o", img.to_str().unwrap()];
    args.extend(extra);
    let out = incfs(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn similar_files(dir: &Path) {
    const WORDS: &[&str] = &[
        "import", "return", "value", "buffer", "offset", "handler", "request", "config", "error",
        "result", "yield", "lambda", "class", "self", "None", "True", "index",
    ];
    fs::create_dir_all(dir).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..600 {
        let mut text = String::new();
        while text.len() < 4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
            text.push(if x.is_multiple_of(9) { '\n' } else { ' ' });
        }
        fs::write(dir.join(format!("m{i}.py")), text).unwrap();
    }
}

#[test]
fn pack_trains_dictionaries_unless_told_not_to_and_inspect_shows_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    similar_files(&src);
    let mut sizes = Vec::new();
    for (name, extra) in [("dict.img", None), ("plain.img", Some("--no-dictionaries"))] {
        let img = tmp.path().join(name);
        pack_with(&src, &img, extra);
        let out = incfs(&["inspect", img.to_str().unwrap(), "--json"]);
        assert!(out.status.success());
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (dicts, named) = (j["dictionaries"].as_u64(), j["dictionary_chunks"].as_u64());
        if extra.is_none() {
            assert_eq!(dicts, Some(1), "one group: the .py files");
            assert!(named.unwrap() >= 540, "{named:?} of 600 chunks name it");
        } else {
            assert_eq!((dicts, named), (Some(0), Some(0)));
        }
        let out = incfs(&["inspect", img.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("  dictionaries "), "{text}");
        let out = incfs(&["verify", img.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        sizes.push(fs::metadata(&img).unwrap().len());
    }
    assert!(
        sizes[0] < sizes[1],
        "with a dictionary {} bytes, without {}",
        sizes[0],
        sizes[1]
    );
}

#[test]
fn pack_writes_the_bulk_sidecar_and_no_bulk_removes_an_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    similar_files(&src);
    let img = tmp.path().join("app.img");
    let bulk = tmp.path().join("app.img.bulk");
    pack_with(&src, &img, None);
    let (root, _) = incfs_fs::format::bulk::parse_header(&fs::read(&bulk).unwrap()).unwrap();
    let image = incfs_fs::format::Image::open_path(&img, None).unwrap();
    assert_eq!(root, image.root_digest(), "the sidecar names its image");
    assert!(fs::metadata(&bulk).unwrap().len() < fs::metadata(&img).unwrap().len());
    pack_with(&src, &img, Some("--no-bulk"));
    assert!(
        !bulk.exists(),
        "--no-bulk leaves no sidecar of an older image behind"
    );
    let out = incfs(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--bulk-frame-size",
        "8M",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bulk-frame-size"), "{err}");

    // A lower level packs faster into a sidecar no smaller, which still verifies.
    pack_with(&src, &img, None);
    let at_19 = fs::metadata(&bulk).unwrap().len();
    pack_with(&src, &img, Some("--bulk-level=1"));
    let at_1 = fs::metadata(&bulk).unwrap().len();
    assert!(at_1 >= at_19, "level 1: {at_1} bytes, level 19: {at_19}");
    let out = incfs(&["verify", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = incfs(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--bulk-level",
        "23",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bulk-level"), "{err}");
}

#[test]
fn verify_checks_the_bulk_sidecar_and_names_a_damaged_frame_or_a_foreign_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    similar_files(&src);
    let img = tmp.path().join("app.img");
    let bulk = tmp.path().join("app.img.bulk");
    pack_with(&src, &img, None);
    let verify = |json: bool| {
        let mut args = vec!["verify", img.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        incfs(&args)
    };
    let out = verify(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("ok {}", bulk.display())) && text.contains(" 0 bad"),
        "{text}"
    );
    let out = verify(true);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = incfs_fs::format::Image::open_path(&img, None).unwrap();
    assert_eq!(j["bulk"]["ok"], true);
    assert_eq!(
        j["bulk"]["chunks"],
        image.table().len(),
        "every chunk checked"
    );
    assert_eq!(j["bulk"]["missing_slots"], 0);

    // One byte of the last frame flipped: verify fails and names the sidecar and the frame.
    let mut bytes = fs::read(&bulk).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x5a;
    fs::write(&bulk, &bytes).unwrap();
    let out = verify(false);
    assert!(!out.status.success(), "a damaged sidecar fails verify");
    let err = String::from_utf8_lossy(&out.stderr);
    let frames = j["bulk"]["frames"].as_u64().unwrap();
    assert!(
        err.contains(&format!("{}: frame {}", bulk.display(), frames - 1)),
        "{err}"
    );
    let out = verify(true);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ok"], false);
    assert_eq!(j["bulk"]["failures"].as_array().unwrap().len(), 1);

    // The sidecar of another image beside this one: refused by name.
    let other = tmp.path().join("other");
    tree(&other);
    let other_img = tmp.path().join("other.img");
    pack_with(&other, &other_img, None);
    fs::copy(tmp.path().join("other.img.bulk"), &bulk).unwrap();
    let out = verify(false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bulk.display().to_string()) && err.contains("not of this one"),
        "{err}"
    );
}

#[test]
fn pack_frames_a_small_file_whole_unless_given_chunk_frames() {
    use incfs_fs::format::Image;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    // sub/b.bin: 20,000 bytes in 5 chunks of 4 KiB, the first four the same bytes (stored
    // once): one frame for the whole file, or two frames of one chunk each.
    let frames_of = |img: &Path| {
        let image = Image::open_path(img, None).unwrap();
        let f = image
            .files()
            .into_iter()
            .find(|f| f.path == b"sub/b.bin")
            .unwrap();
        let offsets: std::collections::BTreeSet<u64> = (f.first_chunk..f.first_chunk + f.chunks)
            .map(|s| image.table().get(s).unwrap().stored_offset)
            .collect();
        (f.chunks, offsets.len())
    };
    for (extra, frames) in [(None, 1), (Some("--chunk-frames"), 2)] {
        let img = tmp.path().join(format!("{}.img", frames));
        pack_with(&src, &img, extra);
        assert_eq!(frames_of(&img), (5, frames), "{extra:?}");
        let out = incfs(&["verify", img.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
