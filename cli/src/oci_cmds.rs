//! `incfs push` and `incfs pull`, and the registry options of `run` and `mount`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use incfs_fs::retry::RetryPolicy;
use incfs_fs::source::HttpConfig;
use incfs_fs::source::oci::{self, OciArtifact, OciOptions, PushFiles};

use crate::util::{human, parse_size};

/// How to reach a registry.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Also trust the CA certificates in this PEM file for oci:// registries (besides the
    /// system's roots).
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Speak plain HTTP, not HTTPS, to the oci:// registry (a local test registry).
    #[arg(long)]
    plain_http: bool,
}

impl RegistryArgs {
    /// Sets these options for every registry this process talks to.
    fn configure(&self) -> anyhow::Result<()> {
        let mut o = OciOptions {
            plain_http: self.plain_http,
            ..OciOptions::default()
        };
        if let Some(ca) = &self.ca_file {
            o.add_ca_file(ca).context("--ca-file")?;
        }
        oci::configure(o);
        Ok(())
    }
}

/// The registry options of `incfs run` and `incfs mount`.
#[derive(Args, Debug, Clone, Default)]
pub struct OciArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Do not prefetch the plan published with the image (pushed with an oci:// artifact, or
    /// SOURCE.plan.json beside any other image).
    #[arg(long)]
    no_plan: bool,
    /// The image pinned to its manifest digest, as the parent of a mount daemon resolved
    /// it: the daemon mounts that manifest, under the reference as given.
    #[arg(long, hide = true, value_name = "REF")]
    oci_pinned: Option<String>,
}

/// An oci:// image resolved before its mount: the artifact (held, so the mount reuses its
/// manifest and token) and the plan pushed with it.
pub struct OciStart {
    /// The artifact (held, so that the mount's source reuses its manifest and token).
    pub artifact: Arc<OciArtifact>,
    /// The plan's name for messages, and its bytes, unless `--no-plan` or `--prefetch`.
    pub plan: Option<(PathBuf, Vec<u8>)>,
}

impl OciArgs {
    /// `--no-plan`.
    pub fn no_plan(&self) -> bool {
        self.no_plan
    }

    /// For an oci:// `image`: configures the registry options, resolves the artifact and
    /// fetches its plan (unless `plan_given` or `--no-plan`). `None` for other images, and
    /// when the registry cannot be reached now (the mount then tries its cache).
    pub fn prepare(
        &self,
        image: &str,
        plan_given: bool,
        retry: &RetryPolicy,
    ) -> anyhow::Result<Option<OciStart>> {
        if !oci::is_oci(image) {
            return Ok(None);
        }
        self.registry.configure()?;
        let http = HttpConfig::for_policy(retry);
        let resolved = match &self.oci_pinned {
            Some(pinned) => OciArtifact::resolve_as(image, pinned, &http),
            None => OciArtifact::resolve(image, &http),
        };
        let artifact = match resolved {
            Ok(a) => a,
            Err(e) if e.is_retryable() => {
                tracing::warn!(image, error = %e, "the registry is unreachable; no plan");
                return Ok(None);
            }
            Err(e) => return Err(e).context("resolving the image"),
        };
        let plan = if plan_given || self.no_plan {
            None
        } else {
            artifact
                .plan()
                .with_context(|| format!("fetching the plan of {image}"))?
                .map(|bytes| {
                    (
                        PathBuf::from(format!("{} (plan)", artifact.pinned())),
                        bytes,
                    )
                })
        };
        Ok(Some(OciStart { artifact, plan }))
    }

    /// Passes these options on to a mount daemon started as `cmd`, and the pinned reference
    /// of the image when this process resolved it (`start`).
    pub fn forward(&self, cmd: &mut Command, start: Option<&OciStart>) -> anyhow::Result<()> {
        if let Some(ca) = &self.registry.ca_file {
            let ca = ca
                .canonicalize()
                .with_context(|| format!("--ca-file {}", ca.display()))?;
            cmd.arg("--ca-file").arg(ca);
        }
        if self.registry.plain_http {
            cmd.arg("--plain-http");
        }
        if self.no_plan {
            cmd.arg("--no-plan");
        }
        if let Some(s) = start {
            cmd.arg("--oci-pinned").arg(s.artifact.pinned());
        }
        Ok(())
    }
}

/// The root digest the manifest of a resolved oci:// image pins, with the pinned reference
/// (for [`crate::util::required_digest`]).
pub fn pinned_root(start: Option<&OciStart>) -> Option<(incfs_fs::format::Digest, String)> {
    let a = &start?.artifact;
    Some((a.root_digest()?, a.pinned()))
}

/// The plan pushed with an oci:// image, in a temporary file (for `incfs run`, whose
/// library call takes a plan path); deleted when dropped.
pub fn plan_file(start: Option<&OciStart>) -> anyhow::Result<Option<tempfile::NamedTempFile>> {
    let Some((_, bytes)) = start.and_then(|s| s.plan.as_ref()) else {
        return Ok(None);
    };
    let mut f = tempfile::Builder::new()
        .prefix("incfs-oci-plan-")
        .suffix(".json")
        .tempfile()
        .context("creating a temporary file for the pushed plan")?;
    std::io::Write::write_all(&mut f, bytes).context("writing the pushed plan")?;
    Ok(Some(f))
}

/// Arguments of `incfs push`.
#[derive(Args)]
pub struct PushArgs {
    /// The image file.
    image: PathBuf,
    /// Where to push it: oci://HOST[:PORT]/REPO:TAG.
    reference: String,
    /// The prefetch plan to push with it (default: IMAGE.plan.json if it exists).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Push no plan, even if IMAGE.plan.json exists.
    #[arg(long, conflicts_with = "plan")]
    no_plan: bool,
    /// The signature to push with it (default: IMAGE.sig if it exists).
    #[arg(long)]
    signature: Option<PathBuf>,
    /// Push no bulk sidecar (the background fill's frames), even if IMAGE.bulk exists: the
    /// fill then moves the image's own frames.
    #[arg(long)]
    no_bulk: bool,
    /// Blobs larger than this go up in chunks of this size (K, M, G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    chunk_size: u64,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Arguments of `incfs pull`.
#[derive(Args)]
pub struct PullArgs {
    /// The artifact: oci://HOST[:PORT]/REPO:TAG or …@sha256:DIGEST.
    reference: String,
    /// Where to write the image (its plan, signature and bulk sidecar go beside it, as
    /// IMAGE.plan.json, IMAGE.sig and IMAGE.bulk).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn beside(image: &Path, suffix: &str) -> Option<PathBuf> {
    let mut p = image.as_os_str().to_owned();
    p.push(suffix);
    let p = PathBuf::from(p);
    p.exists().then_some(p)
}

/// `incfs push`.
pub fn push(a: PushArgs) -> anyhow::Result<ExitCode> {
    a.registry.configure()?;
    let files = PushFiles {
        plan: if a.no_plan {
            None
        } else {
            a.plan.clone().or_else(|| beside(&a.image, ".plan.json"))
        },
        signature: a.signature.clone().or_else(|| beside(&a.image, ".sig")),
        bulk: if a.no_bulk {
            None
        } else {
            beside(&a.image, incfs_fs::format::bulk::BULK_SUFFIX)
        },
        image: a.image.clone(),
        chunk_size: a.chunk_size,
    };
    let bar = crate::progress::bytes_bar("push");
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    bar.set_length(len(&a.image) + files.bulk.as_deref().map_or(0, len));
    let report = oci::push(&a.reference, &files, &HttpConfig::default(), &mut |n| {
        bar.set_position(n)
    })
    .with_context(|| format!("pushing {}", a.image.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "incfs: pushed {} ({}{}{}{}) as {}: {} uploaded, {} blob(s) already there",
        a.image.display(),
        human(report.layers.image.size),
        if report.layers.plan.is_some() {
            ", plan"
        } else {
            ""
        },
        if report.layers.signature.is_some() {
            ", signature"
        } else {
            ""
        },
        if report.layers.bulk.is_some() {
            ", bulk sidecar"
        } else {
            ""
        },
        report.pinned,
        human(report.bytes_uploaded),
        report.blobs_present
    );
    println!("{}", report.pinned);
    Ok(ExitCode::SUCCESS)
}

/// `incfs pull`.
pub fn pull(a: PullArgs) -> anyhow::Result<ExitCode> {
    a.registry.configure()?;
    let artifact = OciArtifact::resolve(&a.reference, &HttpConfig::default())
        .context("resolving the artifact")?;
    let bar = crate::progress::bytes_bar("pull");
    let layers = artifact.layers();
    bar.set_length(layers.image.size + layers.bulk.as_ref().map_or(0, |d| d.size));
    let written = artifact
        .pull(&a.output, &mut |n| bar.set_position(n))
        .with_context(|| format!("pulling to {}", a.output.display()))?;
    bar.finish_and_clear();
    for p in written {
        eprintln!("incfs: wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
