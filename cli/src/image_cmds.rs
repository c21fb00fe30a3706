//! `pack`, `inspect` and `verify`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use incfs_fs::format::bulk::{self, BulkOptions, BulkSummary};
use incfs_fs::format::delta::{ChunkDeltas, DELTA_SUFFIX, DeltaSummary};
use incfs_fs::format::{
    Digest, Image, InodeKind, MAX_FRAME_LEN, PackOptions, RelayoutOptions, RelayoutSummary,
    pack_dir, relayout_for_update,
};
use incfs_fs::plan::PrefetchPlan;
use serde::Serialize;

use crate::progress::{PackBar, bytes_bar, spinner};
use crate::util::{human, parse_size};

/// Arguments of `incfs pack`.
#[derive(Args)]
pub struct PackArgs {
    /// Directory tree to pack.
    dir: PathBuf,
    /// Image file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Chunk size: a power of two from 4K to 1M (suffixes K, M).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    chunk_size: u64,
    /// zstd level for chunks, 1..=22. The default, 15, packs clang-22's 218 MB in ~17 s on
    /// two cores (level 3: 2 s, 13 % larger; 19: 31 s, 0.3 % smaller).
    #[arg(long, default_value_t = 15)]
    level: i32,
    /// Compress consecutive chunks together in frames of this many raw bytes (at most 4M;
    /// the chunk size or less: one chunk per frame). A read of a chunk fetches its frame.
    /// Chunks that are read whole anyway share frames of up to 256 KiB whatever this says
    /// (see --chunk-frames). With --order, the chunks the plan leaves out are stored one per
    /// frame again.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    cold_frame_size: u64,
    /// Compress every chunk alone, without the zstd dictionaries `pack` trains for groups of
    /// similar chunks (each large ELF section; the files of one extension).
    #[arg(long)]
    no_dictionaries: bool,
    /// Store every chunk in file order. By default the sections of ELF files that a start
    /// does not read (unwind and exception tables, symbols, debug information) are stored
    /// after everything else, so a start without a plan does not wait for them.
    #[arg(long)]
    file_order: bool,
    /// Keep every chunk in a frame of its own (unless --cold-frame-size says otherwise). By
    /// default the chunks that are read whole anyway (every chunk of a file under 256 KiB, an
    /// ELF file's loader and late sections) share frames of up to 256 KiB, which compress
    /// better; one chunk a frame lets an update of a small file fetch only its changed chunks.
    #[arg(long)]
    chunk_frames: bool,
    /// Store hot chunks first: a prefetch plan (`.json`, made for an image of this tree at
    /// this chunk size), or traces / read-logs of the program to plan from (as `incfs plan`
    /// does with its defaults). The planned chunks lead the data section in plan order,
    /// and the plan for the new image is written to --plan-out.
    #[arg(long, num_args = 1..)]
    order: Vec<PathBuf>,
    /// Where to write the plan for the hot-first image (default: OUTPUT.plan.json).
    #[arg(long, requires = "order")]
    plan_out: Option<PathBuf>,
    #[command(flatten)]
    hot: HotArgs,
    #[command(flatten)]
    bulk: BulkArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The fill's sidecar, `IMAGE.bulk`, of `incfs pack` and `incfs relayout`.
#[derive(Args)]
pub struct BulkArgs {
    /// Do not write IMAGE.bulk, the image's chunks again in large frames that the background
    /// fill fetches instead of the small ones (clang-22: 53 MB beside a 68 MB image; a start
    /// without a plan ends when the fill has moved the image). Without it the fill fetches
    /// the image's own frames.
    #[arg(long)]
    no_bulk: bool,
    /// Raw bytes per frame of IMAGE.bulk (4K..4M).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    bulk_frame_size: u64,
    /// zstd level of IMAGE.bulk's frames (1..22): lower packs faster, the sidecar is larger
    /// (BENCHMARKS.md gives the sizes and times).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22), default_value_t = bulk::DEFAULT_LEVEL)]
    bulk_level: i32,
}

impl BulkArgs {
    /// Writes (or, with --no-bulk, removes) the sidecar beside `image`.
    fn apply(&self, image: &std::path::Path) -> anyhow::Result<Option<(PathBuf, BulkSummary)>> {
        if self.no_bulk {
            bulk::remove_beside(image).with_context(|| {
                format!("removing the old {}", bulk::path_beside(image).display())
            })?;
            return Ok(None);
        }
        if !(4096..=u64::from(bulk::MAX_FRAME_BYTES)).contains(&self.bulk_frame_size) {
            anyhow::bail!(
                "--bulk-frame-size must be 4K..4M, not {}",
                self.bulk_frame_size
            );
        }
        let opts = BulkOptions {
            frame_bytes: self.bulk_frame_size as u32,
            level: self.bulk_level,
        };
        let sp = spinner(&format!("writing {}", bulk::path_beside(image).display()));
        let r = bulk::write_beside(image, &opts)
            .with_context(|| format!("writing the bulk sidecar of {}", image.display()))?;
        sp.finish_and_clear();
        Ok(Some(r))
    }
}

/// Arguments of `incfs inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// Image file.
    image: PathBuf,
    /// List every entry of the tree.
    #[arg(long)]
    tree: bool,
    /// Print as JSON (always with every entry).
    #[arg(long)]
    json: bool,
}

/// Arguments of `incfs verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// Image file.
    image: PathBuf,
    /// Fail unless the image's root digest is this (64 hex digits).
    #[arg(long)]
    expect_digest: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `incfs relayout`.
#[derive(Args)]
pub struct RelayoutArgs {
    /// Image to rewrite.
    image: PathBuf,
    /// Prefetch plan whose chunks go first, in plan order.
    #[arg(long)]
    plan: PathBuf,
    /// Image file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Where to write the plan bound to the new image (default: OUTPUT.plan.json).
    #[arg(long)]
    plan_out: Option<PathBuf>,
    #[command(flatten)]
    hot: HotArgs,
    #[command(flatten)]
    bulk: BulkArgs,
}

/// How the hot chunks of a hot-first image are stored.
#[derive(Args)]
pub struct HotArgs {
    /// Raw bytes of planned chunks compressed together in one frame (4K..4M; the chunk size
    /// or less keeps one chunk per frame).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    frame_size: u64,
    /// zstd level of the frames of planned chunks, 1..=22.
    #[arg(long, default_value_t = 19)]
    hot_level: i32,
    /// Lay the image out as an update of this older image: a frame of planned chunks holds
    /// only chunks the old image has or only chunks it lacks, so a reader with the old image
    /// cached fetches no frame for the chunks it has (`incfs diff` counts them); and write
    /// IMAGE.delta beside it, the chunks the old image lacks as deltas against it, which a
    /// reader with the old image cached fetches instead of those chunks.
    #[arg(long, value_name = "OLD_IMAGE")]
    base: Option<PathBuf>,
}

/// What `--base` asks of a relayout: the base's chunk digests and the deltas against it.
#[derive(Default)]
struct Update {
    base: HashSet<Digest>,
    deltas: Option<ChunkDeltas>,
}

impl Update {
    /// The digests of the chunks that have a delta (none without `--base`).
    fn delta_digests(&self) -> HashSet<Digest> {
        self.deltas
            .as_ref()
            .map(ChunkDeltas::digests)
            .unwrap_or_default()
    }

    /// Writes `IMAGE.delta` beside `image` (the relaid-out image); returns where and what.
    fn write_deltas(
        self,
        image: &std::path::Path,
    ) -> anyhow::Result<Option<(PathBuf, DeltaSummary)>> {
        let Some(deltas) = self.deltas else {
            return Ok(None);
        };
        let img = Image::open_path(image, None)
            .with_context(|| format!("opening {}", image.display()))?;
        let mut out = image.to_path_buf().into_os_string();
        out.push(DELTA_SUFFIX);
        let out = PathBuf::from(out);
        let d = deltas
            .write(&img, &out)
            .with_context(|| format!("writing the deltas of {}", image.display()))?;
        Ok(Some((out, d)))
    }
}

/// One line on what [`BulkArgs::apply`] wrote.
fn print_bulk(path: &std::path::Path, b: &BulkSummary) {
    println!(
        "  for the background fill: {} ({} in {} frames)",
        path.display(),
        human(b.bytes),
        b.frames
    );
}

/// One line on what [`Update::write_deltas`] wrote.
fn print_deltas(path: &std::path::Path, d: &DeltaSummary) {
    println!(
        "deltas against --base: {} ({} of {} changed chunks, {} as deltas instead of {})",
        path.display(),
        d.deltas,
        d.candidates,
        human(d.delta_bytes),
        human(d.stored_bytes)
    );
}

impl HotArgs {
    /// With `--base`: the base image's chunk digests, and the deltas of the chunks of `new`
    /// (opened from `image`) the base lacks, computed once for the layout and the sidecar.
    fn update(
        &self,
        new: &Image<std::fs::File>,
        image: &std::path::Path,
    ) -> anyhow::Result<Update> {
        let Some(base) = &self.base else {
            return Ok(Update::default());
        };
        let old = Image::open_path(base, None)
            .with_context(|| format!("opening the --base image {}", base.display()))?;
        let deltas = ChunkDeltas::compute(&old, new).with_context(|| {
            format!(
                "finding the deltas of {} against {}",
                image.display(),
                base.display()
            )
        })?;
        Ok(Update {
            base: old.table().entries().iter().map(|e| e.digest).collect(),
            deltas: Some(deltas),
        })
    }

    fn options(&self) -> anyhow::Result<RelayoutOptions> {
        if !(1..=22).contains(&self.hot_level) {
            anyhow::bail!("--hot-level {}: must be 1..=22", self.hot_level);
        }
        let frame_bytes = u32::try_from(self.frame_size)
            .ok()
            .filter(|&f| f <= MAX_FRAME_LEN)
            .with_context(|| {
                format!("--frame-size {}: at most {MAX_FRAME_LEN}", self.frame_size)
            })?;
        Ok(RelayoutOptions {
            frame_bytes,
            level: self.hot_level,
        })
    }
}

/// Arguments of `incfs keygen`.
#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (the public key goes to KEY.pub).
    key: PathBuf,
}

/// Arguments of `incfs sign`.
#[derive(Args)]
pub struct SignArgs {
    /// Image to sign.
    image: PathBuf,
    /// Secret key (from `incfs keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Signature file to write (default: IMAGE.sig, where `--trust` looks for it).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Serialize)]
struct PackJson {
    image: PathBuf,
    root_digest: String,
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    skipped: Vec<String>,
    raw_bytes: u64,
    stored_bytes: u64,
    image_bytes: u64,
    chunks: u64,
    unique_chunks: u64,
    dedupe_saved: u64,
    /// Chunks of ELF sections a start does not read, stored last, and their stored bytes.
    late_chunks: u64,
    late_bytes: u64,
    seconds: f64,
    /// With --order: planned chunks placed first, their stored bytes, the plan written.
    #[serde(skip_serializing_if = "Option::is_none")]
    hot_chunks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hot_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<PathBuf>,
    /// With --base: the deltas written beside the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    deltas: Option<DeltaSummary>,
    /// The fill's sidecar written beside the image (none with --no-bulk).
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk: Option<BulkSummary>,
}

pub fn pack(a: PackArgs) -> anyhow::Result<ExitCode> {
    let opts = PackOptions {
        chunk_size: u32::try_from(a.chunk_size).unwrap_or(u32::MAX),
        level: a.level,
        frame_bytes: u32::try_from(a.cold_frame_size).unwrap_or(u32::MAX),
        dictionaries: !a.no_dictionaries,
        late_sections_last: !a.file_order,
        whole_frames: !a.chunk_frames,
    };
    if a.hot.base.is_some() && a.order.is_empty() {
        anyhow::bail!(
            "--base lays out the planned chunks of a hot-first image: give --order too (without \
             it, fixed chunks already line up with any image packed at the same chunk size)"
        );
    }
    let bar = PackBar(bytes_bar("packing"));
    // With --order, pack into a temporary image beside the output, then relay it out.
    let unordered = if a.order.is_empty() {
        None
    } else {
        let dir = a
            .output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        Some(
            tempfile::Builder::new()
                .prefix(".incfs-pack-")
                .tempfile_in(dir)
                .with_context(|| format!("creating a temporary image in {}", dir.display()))?
                .into_temp_path(),
        )
    };
    let packed = unordered.as_deref().unwrap_or(&a.output);
    let mut s = pack_dir(&a.dir, packed, &opts, &bar)
        .with_context(|| format!("packing {} into {}", a.dir.display(), a.output.display()))?;
    bar.0.finish_and_clear();
    let mut hot = None;
    let mut deltas = None;
    if let Some(tmp) = &unordered {
        let (r, plan_out, update) =
            order_image(tmp, &a.order, &a.output, a.plan_out.clone(), &a.hot)?;
        s.root_digest = r.root_digest;
        s.image_bytes = r.image_bytes;
        hot = Some((r, plan_out));
        deltas = update.write_deltas(&a.output)?;
    }
    let bulk = a.bulk.apply(&a.output)?;
    let secs = s.elapsed.as_secs_f64();
    if a.json {
        let j = PackJson {
            image: a.output,
            root_digest: s.root_digest.to_hex(),
            files: s.files,
            dirs: s.dirs,
            symlinks: s.symlinks,
            hardlinks: s.hardlinks,
            skipped: s
                .skipped
                .iter()
                .map(|(p, w)| format!("{}: {w}", p.display()))
                .collect(),
            raw_bytes: s.raw_bytes,
            stored_bytes: s.stored_bytes,
            image_bytes: s.image_bytes,
            chunks: s.chunks,
            unique_chunks: s.unique_chunks,
            dedupe_saved: s.dedupe_saved,
            late_chunks: s.late_chunks,
            late_bytes: s.late_bytes,
            seconds: secs,
            hot_chunks: hot.as_ref().map(|(r, _)| r.hot_chunks),
            hot_bytes: hot.as_ref().map(|(r, _)| r.hot_bytes),
            plan: hot.as_ref().map(|(_, p)| p.clone()),
            deltas: deltas.as_ref().map(|(_, d)| *d),
            bulk: bulk.as_ref().map(|(_, b)| *b),
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("packed {} into {}", a.dir.display(), a.output.display());
    println!(
        "  {} files, {} dirs, {} symlinks, {} hard links, {} skipped",
        s.files,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        s.skipped.len()
    );
    println!(
        "  {} of data -> {} stored (ratio {:.2}), image {}",
        human(s.raw_bytes),
        human(s.stored_bytes),
        ratio(s.raw_bytes, s.stored_bytes),
        human(s.image_bytes)
    );
    println!(
        "  {} chunks of {}, {} distinct, dedupe saved {}",
        s.chunks,
        human(a.chunk_size),
        s.unique_chunks,
        human(s.dedupe_saved)
    );
    if s.late_chunks > 0 {
        println!(
            "  {} chunks ({} stored) of unwind tables, symbols and debug information stored last",
            s.late_chunks,
            human(s.late_bytes)
        );
    }
    println!(
        "  {:.2} s, {:.0} MB/s",
        secs,
        s.raw_bytes as f64 / 1e6 / secs.max(1e-9)
    );
    if let Some((r, plan_out)) = &hot {
        println!(
            "  hot first: {} planned chunks ({} in {} frames) lead the data section; plan for it: {}",
            r.hot_chunks,
            human(r.hot_bytes),
            r.hot_frames,
            plan_out.display()
        );
    }
    if let Some((path, d)) = &deltas {
        print_deltas(path, d);
    }
    if let Some((path, b)) = &bulk {
        print_bulk(path, b);
    }
    println!("root digest {}", s.root_digest);
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InspectJson {
    image: PathBuf,
    root_digest: String,
    chunk_size: u32,
    image_bytes: u64,
    manifest_bytes: u64,
    chunk_table_bytes: u64,
    files: u64,
    dirs: u64,
    symlinks: u64,
    raw_bytes: u64,
    stored_bytes: u64,
    chunks: u64,
    unique_chunks: u64,
    compressed_chunks: u64,
    /// zstd dictionaries, their bytes, and the chunk slots whose frames name one.
    dictionaries: u64,
    dictionary_bytes: u64,
    dictionary_chunks: u64,
    entries: Vec<EntryJson>,
}

#[derive(Serialize)]
struct EntryJson {
    path: String,
    kind: &'static str,
    mode: String,
    size: u64,
    chunks: u64,
    /// A file's first chunk slot (its chunks are the slots that follow).
    #[serde(skip_serializing_if = "Option::is_none")]
    first_chunk: Option<u64>,
    stored_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let img = Image::open_path(&a.image, None)
        .with_context(|| format!("opening image {}", a.image.display()))?;
    let m = img.manifest();
    let h = img.header();
    let table = img.table();
    let mut entries = Vec::new();
    let (mut files, mut dirs, mut symlinks, mut raw) = (0u64, 1u64, 0u64, 0u64);
    let mut seen = HashSet::new();
    for (path, ino) in img.walk() {
        let Some(inode) = img.inode(ino) else {
            continue;
        };
        let first = seen.insert(ino);
        let first_chunk = match &inode.kind {
            InodeKind::File { first_chunk, .. } => Some(*first_chunk),
            _ => None,
        };
        let (kind, size, chunks, stored, target) = match &inode.kind {
            InodeKind::Dir { .. } => {
                dirs += 1;
                ("dir", 0, 0, 0, None)
            }
            InodeKind::File { size, first_chunk } => {
                let n = m.chunks_for(*size);
                let stored: u64 = (*first_chunk..first_chunk + n)
                    .filter_map(|s| table.get(s))
                    .map(|e| e.stored_share())
                    .sum();
                if first {
                    files += 1;
                    raw += size;
                }
                ("file", *size, n, stored, None)
            }
            InodeKind::Symlink { target } => {
                symlinks += 1;
                (
                    "symlink",
                    0,
                    0,
                    0,
                    Some(String::from_utf8_lossy(target).into_owned()),
                )
            }
        };
        entries.push(EntryJson {
            path: String::from_utf8_lossy(&path).into_owned(),
            kind,
            mode: format!("{:04o}", inode.perm),
            size,
            chunks,
            first_chunk,
            stored_bytes: stored,
            target,
        });
    }
    let unique: HashSet<u64> = table.entries().iter().map(|e| e.stored_offset).collect();
    let j = InspectJson {
        image: a.image.clone(),
        root_digest: img.root_digest().to_hex(),
        chunk_size: h.chunk_size,
        image_bytes: h.image_len(),
        manifest_bytes: h.manifest_len,
        chunk_table_bytes: h.chunk_table_len,
        files,
        dirs,
        symlinks,
        raw_bytes: raw,
        stored_bytes: h.data_len,
        chunks: table.len(),
        unique_chunks: unique.len() as u64,
        compressed_chunks: table.entries().iter().filter(|e| e.is_compressed()).count() as u64,
        dictionaries: m.dictionaries.len() as u64,
        dictionary_bytes: m.dictionaries.iter().map(|d| u64::from(d.len)).sum(),
        dictionary_chunks: table.entries().iter().filter(|e| e.dictionary != 0).count() as u64,
        entries,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("image {}", a.image.display());
    println!("  root digest  {}", j.root_digest);
    println!(
        "  size         {} (manifest {}, chunk table {}, data {})",
        human(j.image_bytes),
        human(j.manifest_bytes),
        human(j.chunk_table_bytes),
        human(j.stored_bytes)
    );
    println!(
        "  tree         {} files, {} dirs, {} symlinks",
        j.files, j.dirs, j.symlinks
    );
    println!(
        "  data         {} -> {} stored (ratio {:.2})",
        human(j.raw_bytes),
        human(j.stored_bytes),
        ratio(j.raw_bytes, j.stored_bytes)
    );
    println!(
        "  chunks       {} of {}, {} distinct, {} compressed",
        j.chunks,
        human(u64::from(j.chunk_size)),
        j.unique_chunks,
        j.compressed_chunks
    );
    println!(
        "  dictionaries {} ({}), named by {} chunks",
        j.dictionaries,
        human(j.dictionary_bytes),
        j.dictionary_chunks
    );
    let mut biggest: Vec<&EntryJson> = j.entries.iter().filter(|e| e.kind == "file").collect();
    biggest.sort_by_key(|e| std::cmp::Reverse(e.size));
    println!("  largest files:");
    for e in biggest.iter().take(if a.tree { 0 } else { 10 }) {
        println!(
            "    {:>10}  {:>10} stored  {}",
            human(e.size),
            human(e.stored_bytes),
            e.path
        );
    }
    if a.tree {
        for e in &j.entries {
            match &e.target {
                Some(t) => println!("    {} {:>10}  {} -> {}", e.mode, "", e.path, t),
                None if e.kind == "dir" => println!("    {} {:>10}  {}/", e.mode, "", e.path),
                None => println!("    {} {:>10}  {}", e.mode, human(e.size), e.path),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct VerifyJson {
    image: PathBuf,
    root_digest: String,
    ok: bool,
    chunks: u64,
    raw_bytes: u64,
    stored_bytes: u64,
    seconds: f64,
    failures: Vec<FailureJson>,
    /// The bulk sidecar beside the image, when there is one.
    bulk: Option<BulkJson>,
}

#[derive(Serialize)]
struct BulkJson {
    path: PathBuf,
    ok: bool,
    #[serde(flatten)]
    report: bulk::BulkReport,
}

#[derive(Serialize)]
struct FailureJson {
    path: Option<String>,
    chunk_index: u64,
    slot: u64,
    reason: String,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let expected = a
        .expect_digest
        .as_deref()
        .map(Digest::from_hex)
        .transpose()
        .context("--expect-digest")?;
    let started = std::time::Instant::now();
    let img = Image::open_path(&a.image, expected.as_ref())
        .with_context(|| format!("verifying image {}", a.image.display()))?;
    let bar = bytes_bar("verifying");
    let raw_total: u64 = img
        .table()
        .entries()
        .iter()
        .map(|e| u64::from(e.raw_len))
        .sum();
    bar.set_length(raw_total);
    let report = img.verify(&|n| bar.inc(n));
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    // The sidecar the fill would use, checked as the fill checks it.
    let bulk_path = bulk::path_beside(&a.image);
    let bulk = if bulk_path.exists() {
        let bar = bytes_bar("verifying the bulk sidecar");
        bar.set_length(raw_total);
        let r = bulk::verify_bulk(&img, &bulk_path, &|n| bar.inc(n))
            .with_context(|| format!("verifying the bulk sidecar {}", bulk_path.display()))?;
        bar.finish_and_clear();
        Some(r)
    } else {
        None
    };
    let bulk_ok = bulk.as_ref().is_none_or(|r| r.failures.is_empty());
    let ok = report.failures.is_empty() && bulk_ok;
    if a.json {
        let j = VerifyJson {
            image: a.image.clone(),
            root_digest: img.root_digest().to_hex(),
            ok,
            chunks: report.chunks,
            raw_bytes: report.raw_bytes,
            stored_bytes: report.stored_bytes,
            seconds: secs,
            failures: report
                .failures
                .iter()
                .map(|f| FailureJson {
                    path: f.path.clone(),
                    chunk_index: f.chunk_index,
                    slot: f.slot,
                    reason: f.reason.clone(),
                })
                .collect(),
            bulk: bulk.map(|report| BulkJson {
                path: bulk_path.clone(),
                ok: bulk_ok,
                report,
            }),
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        for f in &report.failures {
            eprintln!(
                "incfs: {}: {} chunk {} (slot {}): {}",
                a.image.display(),
                f.path.as_deref().unwrap_or("(no file)"),
                f.chunk_index,
                f.slot,
                f.reason
            );
        }
        println!(
            "{} {}: {} chunks, {} checked in {:.2} s ({:.0} MB/s), {} bad",
            if ok { "ok" } else { "FAILED" },
            a.image.display(),
            report.chunks,
            human(report.raw_bytes),
            secs,
            report.raw_bytes as f64 / 1e6 / secs.max(1e-9),
            report.failures.len()
        );
        println!("root digest {}", img.root_digest());
        if let Some(r) = &bulk {
            for f in &r.failures {
                eprintln!(
                    "incfs: {}: frame {} (at byte {}): {}",
                    bulk_path.display(),
                    f.frame,
                    f.file_offset,
                    f.reason
                );
            }
            println!(
                "{} {}: {} frames, {} chunks checked, {} slots left to the image, {} bad",
                if bulk_ok { "ok" } else { "FAILED" },
                bulk_path.display(),
                r.frames,
                r.chunks,
                r.missing_slots,
                r.failures.len()
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Relays the freshly packed image `packed` out hot-first into `output`, in the order of
/// `order` (a plan for an image of the same tree and chunk size, or planner inputs), and
/// writes the plan for the new image; returns what relayout did, where the plan went, and
/// what `--base` asked of it (the deltas, for the sidecar).
fn order_image(
    packed: &std::path::Path,
    order: &[PathBuf],
    output: &std::path::Path,
    plan_out: Option<PathBuf>,
    hot_args: &HotArgs,
) -> anyhow::Result<(RelayoutSummary, PathBuf, Update)> {
    let img = Image::open_path(packed, None)
        .with_context(|| format!("opening the packed image {}", packed.display()))?;
    let is_plan = |p: &PathBuf| p.extension().is_some_and(|e| e == "json");
    let (plan, named) = match order {
        [one] if is_plan(one) => {
            let plan = PrefetchPlan::load(one)?;
            if plan.chunk_size != img.manifest().chunk_size {
                anyhow::bail!(
                    "{}: the plan is for {}-byte chunks, the image has {}-byte chunks (pack with \
                     --chunk-size {} or plan again)",
                    one.display(),
                    plan.chunk_size,
                    img.manifest().chunk_size,
                    plan.chunk_size
                );
            }
            (plan.rebind(&img.root_digest()), one.clone())
        }
        _ => {
            if let Some(p) = order.iter().find(|p| is_plan(p)) {
                anyhow::bail!(
                    "{}: give either one prefetch plan or traces / read-logs to --order, not both",
                    p.display()
                );
            }
            let plan = crate::plan_cmds::plan_from_inputs(order, packed)?;
            (plan, order[0].clone())
        }
    };
    let hot = plan.slots(&named, img.manifest())?;
    let update = hot_args.update(&img, packed)?;
    let r = relayout_for_update(
        &img,
        &hot,
        &update.base,
        &update.delta_digests(),
        output,
        &hot_args.options()?,
    )
    .with_context(|| format!("writing {} hot-first", output.display()))?;
    let plan_out = plan_out.unwrap_or_else(|| {
        let mut p = output.to_path_buf().into_os_string();
        p.push(".plan.json");
        PathBuf::from(p)
    });
    plan.rebind(&r.root_digest).save(&plan_out)?;
    Ok((r, plan_out, update))
}

pub fn relayout(a: RelayoutArgs) -> anyhow::Result<ExitCode> {
    let img = Image::open_path(&a.image, None)
        .with_context(|| format!("opening image {}", a.image.display()))?;
    let plan = PrefetchPlan::load(&a.plan)?;
    plan.check_image(&a.plan, &img.root_digest())?;
    let hot = plan.slots(&a.plan, img.manifest())?;
    let update = a.hot.update(&img, &a.image)?;
    let s = relayout_for_update(
        &img,
        &hot,
        &update.base,
        &update.delta_digests(),
        &a.output,
        &a.hot.options()?,
    )
    .with_context(|| {
        format!(
            "relaying out {} into {}",
            a.image.display(),
            a.output.display()
        )
    })?;
    let plan_out = a.plan_out.unwrap_or_else(|| {
        let mut p = a.output.clone().into_os_string();
        p.push(".plan.json");
        PathBuf::from(p)
    });
    plan.rebind(&s.root_digest).save(&plan_out)?;
    let deltas = update.write_deltas(&a.output)?;
    let bulk = a.bulk.apply(&a.output)?;
    println!(
        "wrote {}: {} hot chunks first ({} in {} frames), {} distinct chunks, image {}",
        a.output.display(),
        s.hot_chunks,
        human(s.hot_bytes),
        s.hot_frames,
        s.unique_chunks,
        human(s.image_bytes)
    );
    println!("plan for it: {}", plan_out.display());
    if let Some((path, d)) = deltas {
        print_deltas(&path, &d);
    }
    if let Some((path, b)) = &bulk {
        print_bulk(path, b);
    }
    println!("root digest {}", s.root_digest);
    Ok(ExitCode::SUCCESS)
}

pub fn keygen(a: KeygenArgs) -> anyhow::Result<ExitCode> {
    let public = incfs_fs::trust::keygen(&a.key)?;
    println!("secret key {} (keep it private)", a.key.display());
    println!(
        "public key {} (give it to readers: --trust)",
        public.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn sign(a: SignArgs) -> anyhow::Result<ExitCode> {
    let img = Image::open_path(&a.image, None)
        .with_context(|| format!("opening image {}", a.image.display()))?;
    let sig = incfs_fs::trust::sign(&img.root_digest(), &a.key)?;
    let out = a.output.unwrap_or_else(|| {
        PathBuf::from(incfs_fs::trust::signature_spec(&a.image.to_string_lossy()))
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&sig)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed root digest {} -> {}",
        sig.root_digest,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn ratio(raw: u64, stored: u64) -> f64 {
    if stored == 0 {
        1.0
    } else {
        raw as f64 / stored as f64
    }
}
