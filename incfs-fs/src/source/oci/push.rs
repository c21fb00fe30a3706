//! `incfs push`: uploads an image, its plan, its signature and its bulk sidecar as one
//! artifact.
//!
//! Blobs the repository already holds (a `HEAD` answers 200) are not sent again. A blob up
//! to [`PushFiles::chunk_size`] goes up in one `PUT` (the spec's monolithic upload, after the
//! `POST` that opens the session); a larger one in `PATCH` chunks with `Content-Range`, then
//! a closing `PUT ?digest=`. The manifest goes last, so a tag never points at blobs that are
//! not there.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest as _;
use tracing::debug;

use super::client::{Registry, Req, check_status};
use super::manifest::{
    self, Descriptor, EMPTY_BLOB, Layers, Manifest, ROOT_DIGEST_ANNOTATION, TITLE_ANNOTATION,
};
use super::{OciError, OciOptions, Reference, Target, options};
use crate::source::HttpConfig;

/// What to push.
#[derive(Debug, Clone)]
pub struct PushFiles {
    /// The image file.
    pub image: PathBuf,
    /// Its prefetch plan, if any.
    pub plan: Option<PathBuf>,
    /// Its signature (`incfs sign`), if any.
    pub signature: Option<PathBuf>,
    /// Its bulk sidecar (`IMG.bulk`, the background fill's frames), if any.
    pub bulk: Option<PathBuf>,
    /// Largest blob sent in one request; larger ones go in chunks of this size.
    pub chunk_size: u64,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The reference, pinned to the manifest's digest.
    pub pinned: String,
    /// The blobs of the artifact.
    pub layers: Layers,
    /// Bytes uploaded (blobs already present are not counted).
    pub bytes_uploaded: u64,
    /// Blobs the registry already had.
    pub blobs_present: usize,
}

/// Pushes `files` to `spec` (a tag, or a digest that must be the manifest's). `progress`
/// gets the blob bytes uploaded so far.
pub fn push(
    spec: &str,
    files: &PushFiles,
    http: &HttpConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<PushReport, OciError> {
    push_with(spec, files, http, &options(), progress)
}

fn push_with(
    spec: &str,
    files: &PushFiles,
    http: &HttpConfig,
    opts: &OciOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<PushReport, OciError> {
    let reference = Reference::parse(spec)?;
    let root = check_inputs(files)?;
    let registry = Arc::new(Registry::new(&reference, http, opts, "pull,push")?);
    let title = |p: &Path| {
        BTreeMap::from([(
            TITLE_ANNOTATION.to_string(),
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        )])
    };
    let mut image = describe_file(&files.image, manifest::IMAGE_MEDIA_TYPE)?;
    image.annotations = title(&files.image);
    image
        .annotations
        .insert(ROOT_DIGEST_ANNOTATION.into(), root.clone());
    let small = |p: &Option<PathBuf>, mt: &str| -> Result<Option<Descriptor>, OciError> {
        p.as_deref()
            .map(|p| {
                let mut d = describe_file(p, mt)?;
                d.annotations = title(p);
                Ok(d)
            })
            .transpose()
    };
    let layers = Layers {
        plan: small(&files.plan, manifest::PLAN_MEDIA_TYPE)?,
        signature: small(&files.signature, manifest::SIGNATURE_MEDIA_TYPE)?,
        bulk: small(&files.bulk, manifest::BULK_MEDIA_TYPE)?,
        image,
    };
    let m = Manifest::new(&layers, &root);
    let body = m.to_json();
    let digest = manifest::sha256_digest(&body);
    // Before any upload: a push to the wrong digest must not leave blobs behind.
    if let Target::Digest(want) = &reference.target
        && *want != digest
    {
        return Err(OciError::Input(format!(
            "{spec}: the artifact's manifest has digest {digest}; push it to a tag, or to that \
             digest"
        )));
    }
    let mut uploaded = 0u64;
    let mut present = 0;
    let mut blobs: Vec<(Descriptor, Option<&Path>)> = vec![(m.config.clone(), None)];
    blobs.push((layers.image.clone(), Some(&files.image)));
    if let (Some(d), Some(p)) = (&layers.plan, &files.plan) {
        blobs.push((d.clone(), Some(p)));
    }
    if let (Some(d), Some(p)) = (&layers.signature, &files.signature) {
        blobs.push((d.clone(), Some(p)));
    }
    if let (Some(d), Some(p)) = (&layers.bulk, &files.bulk) {
        blobs.push((d.clone(), Some(p)));
    }
    for (d, path) in blobs {
        if blob_exists(&registry, &d)? {
            debug!(digest = %d.digest, "the registry has this blob");
            present += 1;
            continue;
        }
        let base = uploaded;
        upload(&registry, &d, path, files.chunk_size, &mut |n| {
            progress(base + n)
        })?;
        uploaded += d.size;
    }
    let mut req = Req::new(
        Method::PUT,
        registry.url(&format!("manifests/{}", reference.target.as_str())),
        None,
    )
    .header(CONTENT_TYPE, manifest::MANIFEST_MEDIA_TYPE);
    req.body = Some(Bytes::from(body));
    let what = format!("{spec} (manifest)");
    let answer = registry.block_on(async {
        let resp = check_status(registry.send(&req).await?, &what).await?;
        Ok::<_, OciError>(
            resp.headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        )
    })?;
    if let Some(d) = answer
        && d != digest
    {
        return Err(OciError::Digest {
            what,
            reason: format!("the registry stored the manifest as {d}, not {digest}"),
        });
    }
    Ok(PushReport {
        pinned: reference.with_digest(&digest).to_string(),
        layers,
        bytes_uploaded: uploaded,
        blobs_present: present,
    })
}

/// Checks that the image is one, and that the plan and signature are for it; returns its
/// root digest (hex).
fn check_inputs(files: &PushFiles) -> Result<String, OciError> {
    let img = crate::format::Image::open_path(&files.image, None).map_err(|e| {
        OciError::Input(format!(
            "{}: not an incfs image: {e}",
            files.image.display()
        ))
    })?;
    let root = img.root_digest();
    if let Some(p) = &files.plan {
        let plan =
            crate::plan::PrefetchPlan::load(p).map_err(|e| OciError::Input(e.to_string()))?;
        plan.check_image(p, &root)
            .map_err(|e| OciError::Input(e.to_string()))?;
    }
    if let Some(p) = &files.signature {
        let bytes = std::fs::read(p).map_err(|error| OciError::File {
            path: p.clone(),
            error,
        })?;
        let sig: crate::trust::SignatureFile = serde_json::from_slice(&bytes).map_err(|e| {
            OciError::Input(format!("{}: not an incfs signature: {e}", p.display()))
        })?;
        if sig.root_digest != root.to_hex() {
            return Err(OciError::Input(format!(
                "{}: signs root digest {}, but {} has {root}: sign the image again",
                p.display(),
                sig.root_digest,
                files.image.display()
            )));
        }
    }
    if let Some(p) = &files.bulk {
        check_bulk(p, &root)?;
    }
    Ok(root.to_hex())
}

/// Checks that the sidecar at `path` is one, for the image of root digest `root` (its
/// frames are checked chunk by chunk where they are used, and by `incfs verify`).
fn check_bulk(path: &Path, root: &crate::format::Digest) -> Result<(), OciError> {
    use crate::format::bulk::{BULK_HEADER_LEN, parse_header};
    let file_err = |error| OciError::File {
        path: path.to_path_buf(),
        error,
    };
    let mut header = Vec::new();
    std::fs::File::open(path)
        .map_err(file_err)?
        .take(BULK_HEADER_LEN)
        .read_to_end(&mut header)
        .map_err(file_err)?;
    let (for_root, _) =
        parse_header(&header).map_err(|e| OciError::Input(format!("{}: {e}", path.display())))?;
    if for_root != *root {
        return Err(OciError::Input(format!(
            "{}: the bulk sidecar of image {for_root}, not of this one ({root}): pack the image \
             again, or push it with --no-bulk",
            path.display()
        )));
    }
    Ok(())
}

fn describe_file(path: &Path, media_type: &str) -> Result<Descriptor, OciError> {
    let err = |error| OciError::File {
        path: path.to_path_buf(),
        error,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest: format!("sha256:{}", hex::encode(hash.finalize())),
        size,
        annotations: BTreeMap::new(),
    })
}

fn blob_exists(reg: &Registry, d: &Descriptor) -> Result<bool, OciError> {
    let req = Req::new(Method::HEAD, reg.url(&format!("blobs/{}", d.digest)), None);
    reg.block_on(async {
        let resp = reg.send(&req).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => check_status(resp, &format!("{} blob {}", reg.reference, d.digest))
                .await
                .map(|_| false),
        }
    })
}

/// The upload session URL in an answer's `Location`.
fn location(reg: &Registry, resp: &reqwest::Response, what: &str) -> Result<Url, OciError> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| OciError::Status {
            what: what.to_string(),
            status: resp.status().as_u16(),
            detail: "the upload answer has no Location".into(),
        })?;
    reg.join(loc)
}

fn upload(
    reg: &Registry,
    d: &Descriptor,
    path: Option<&Path>,
    chunk_size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), OciError> {
    let what = format!("{}: upload of {}", reg.reference, d.digest);
    let start = Req::new(Method::POST, reg.url("blobs/uploads/"), None);
    let mut url = reg.block_on(async {
        let resp = check_status(reg.send(&start).await?, &what).await?;
        location(reg, &resp, &what)
    })?;
    let mut file = match path {
        Some(p) => Some(std::fs::File::open(p).map_err(|error| OciError::File {
            path: p.to_path_buf(),
            error,
        })?),
        None => None,
    };
    let mut read_part = |want: u64| -> Result<Bytes, OciError> {
        let Some(f) = file.as_mut() else {
            return Ok(Bytes::from_static(EMPTY_BLOB));
        };
        let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
        f.by_ref()
            .take(want)
            .read_to_end(&mut buf)
            .map_err(|error| OciError::File {
                path: path.map(Path::to_path_buf).unwrap_or_default(),
                error,
            })?;
        if buf.len() as u64 != want {
            return Err(OciError::Input(format!(
                "{}: changed while it was pushed",
                path.map_or_else(String::new, |p| p.display().to_string())
            )));
        }
        Ok(Bytes::from(buf))
    };
    let chunk = chunk_size.max(1);
    let mut sent = 0u64;
    let mut last_body = Bytes::new();
    if d.size <= chunk {
        // Monolithic: the whole blob in the closing PUT.
        last_body = read_part(d.size)?;
    } else {
        while sent < d.size {
            let n = chunk.min(d.size - sent);
            let mut req = Req::new(Method::PATCH, url.clone(), None)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_RANGE, &format!("{sent}-{}", sent + n - 1))
                .header(CONTENT_LENGTH, &n.to_string());
            req.body = Some(read_part(n)?);
            url = reg.block_on(async {
                let resp = check_status(reg.send(&req).await?, &what).await?;
                location(reg, &resp, &what)
            })?;
            sent += n;
            progress(sent);
        }
    }
    url.query_pairs_mut().append_pair("digest", &d.digest);
    let mut req = Req::new(Method::PUT, url, None)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, &last_body.len().to_string());
    let n = last_body.len() as u64;
    req.body = Some(last_body);
    reg.block_on(async { check_status(reg.send(&req).await?, &what).await.map(|_| ()) })?;
    progress(sent + n);
    Ok(())
}
