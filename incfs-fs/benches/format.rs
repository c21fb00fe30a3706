//! Pack and verify throughput on the clang-22 libraries (~210 MB).
//!
//! `cargo bench -p incfs-fs --bench format` — prints one line per configuration: pack MB/s,
//! verify MB/s (of raw data), compression ratio, image size. Needs clang-22 installed.

use std::path::Path;
use std::time::Instant;

use incfs_fs::format::{Image, PackOptions, pack_dir};

const LIBS: [&str; 2] = [
    "/usr/lib/llvm-22/lib/libLLVM.so.22.1",
    "/usr/lib/llvm-22/lib/libclang-cpp.so.22.1",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if LIBS.iter().any(|l| !Path::new(l).exists()) {
        eprintln!("format bench: clang-22 libraries missing (apt-get install clang-22)");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree)?;
    for l in LIBS {
        let p = Path::new(l);
        std::fs::copy(p, tree.join(p.file_name().ok_or("no name")?))?;
    }
    println!(
        "{:>7} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "chunk", "level", "raw MB", "image MB", "ratio", "pack MB/s", "vrfy MB/s"
    );
    for (chunk, level) in [(65536u32, 3), (16384, 3), (4096, 3), (65536, 1), (65536, 9)] {
        let out = tmp.path().join("bench.img");
        let opts = PackOptions {
            chunk_size: chunk,
            level,
            ..PackOptions::default()
        };
        let t = Instant::now();
        let s = pack_dir(&tree, &out, &opts, &())?;
        let pack_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let img = Image::open_path(&out, Some(&s.root_digest))?;
        let report = img.verify(&|_| {});
        let verify_s = t.elapsed().as_secs_f64();
        assert!(report.failures.is_empty());
        let mb = s.raw_bytes as f64 / 1e6;
        println!(
            "{:>7} {:>5} {:>10.1} {:>10.1} {:>10.2} {:>9.0} {:>9.0}",
            chunk,
            level,
            mb,
            s.image_bytes as f64 / 1e6,
            s.raw_bytes as f64 / s.stored_bytes as f64,
            mb / pack_s,
            mb / verify_s
        );
    }
    Ok(())
}
