//! Images in OCI registries: `oci://HOST[:PORT]/REPO:TAG` or `…/REPO@sha256:HEX`.
//!
//! An incfs artifact is an OCI image manifest with `artifactType`
//! [`manifest::ARTIFACT_TYPE`] whose layers are the image blob, and optionally its prefetch
//! plan and signature (docs/format.md, "OCI artifacts"). Resolving a reference fetches the
//! manifest once ([`OciArtifact::resolve`]); the image is then read with one `Range` GET per
//! request on `/v2/REPO/blobs/DIGEST` ([`OciSource`]), checked as strictly as
//! [`crate::source::HttpSource`] checks its answers.
//!
//! **Pinning.** The manifest is verified against the reference's digest (`@sha256:…`), or for
//! a tag against the registry's `Docker-Content-Digest` when it sends one. Its
//! [`ROOT_DIGEST_ANNOTATION`] then pins the image: [`OciArtifact::root_digest`] is the root
//! digest every read of the image's header through [`OciSource`] must show (else the read
//! fails naming the reference), and the root digest `run`, `mount` and `pull` insist on. A
//! manifest without the annotation pins only the image blob's name: a mount's range reads
//! are not checked against the blob's sha256 (only a whole `pull` is), so the mount then
//! trusts the root digest in the header it reads, unless `--expect-digest` or `--trust`
//! gives one.
//!
//! Auth (anonymous, basic, bearer tokens with refresh on expiry or refusal), redirects to
//! blob storage and TLS are in the `client` module; where credentials come from is in [`auth`].
//!
//! A process resolves each reference once: [`OciArtifact::resolve`] remembers the artifacts
//! it returned while they are in use, so the command that read an artifact's plan and
//! signature and then opens its source (by the same spec, through [`crate::source::open`])
//! reuses the manifest and the token instead of asking again. Registry options that are not
//! per request (plain HTTP, extra CA certificates) are set once for the process with
//! [`configure`].

pub mod auth;
mod client;
pub mod manifest;
mod push;
mod reference;

use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest as _;
use tracing::{debug, trace};

pub use auth::Credentials;
use client::{Registry, Req, check_status};
pub use manifest::{Descriptor, Layers};
use manifest::{MAX_MANIFEST, Manifest, ROOT_DIGEST_ANNOTATION};
pub use push::{PushFiles, PushReport, push};
pub use reference::{Reference, SCHEME, Target};

use super::MAX_PREALLOC;
use super::byteranges::{MultiRange, check_ranges, range_header, read_answer, status_error};
use super::http::parse_content_range;
use super::{HttpConfig, REQUEST_KIND_HEADER, RequestKind, Source, SourceError};

/// Largest plan blob read (plans of big images are a few MiB).
pub const MAX_PLAN: u64 = 64 << 20;
/// Largest signature blob read (the file is ~250 bytes).
pub const MAX_SIGNATURE: u64 = 64 << 10;

/// What can go wrong talking to a registry; each names the reference or URL.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("{spec}: {reason}")]
    Reference {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A network error (retryable).
    #[error("{what}: {error}")]
    Net {
        /// The URL.
        what: String,
        /// Why.
        error: io::Error,
    },
    /// An unexpected HTTP status (retryable when 5xx, 429, 408).
    #[error("{what}: HTTP status {status}: {detail}")]
    Status {
        /// The URL.
        what: String,
        /// The status (0: no usable answer).
        status: u16,
        /// The registry's message.
        detail: String,
    },
    /// Credentials are missing or refused.
    #[error("{what}: {reason}")]
    Auth {
        /// The reference or token service.
        what: String,
        /// What to do about it.
        reason: String,
    },
    /// No such repository, tag or blob.
    #[error("{what}: not found ({detail})")]
    NotFound {
        /// The URL.
        what: String,
        /// The registry's message.
        detail: String,
    },
    /// The manifest is not an incfs artifact.
    #[error("{what}: {reason}")]
    Manifest {
        /// The reference.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes from the registry do not match their digest or size.
    #[error("{what}: {reason}")]
    Digest {
        /// The blob or manifest.
        what: String,
        /// What differs.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The local image, plan or signature to push is not usable.
    #[error("{0}")]
    Input(String),
    /// The client cannot run.
    #[error("{0}")]
    Unusable(String),
}

impl OciError {
    /// True when trying again may succeed (network errors, 5xx, 429, 408).
    pub fn is_retryable(&self) -> bool {
        match self {
            OciError::Net { .. } => true,
            OciError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

impl From<OciError> for SourceError {
    fn from(e: OciError) -> SourceError {
        match e {
            OciError::Net { what, error } => SourceError::Io {
                source_name: what,
                error,
            },
            // The message names the reference or URL (`what`), so the source name is it too.
            OciError::Status { ref what, .. } if e.is_retryable() => SourceError::Io {
                source_name: what.clone(),
                error: io::Error::other(e.to_string()),
            },
            e => SourceError::Unusable(e.to_string()),
        }
    }
}

/// Registry options of this process.
#[derive(Debug, Clone, Default)]
pub struct OciOptions {
    /// Speak plain HTTP to registries, not HTTPS (a test or loopback registry).
    pub plain_http: bool,
    /// Extra trusted CA certificates (PEM bundles) besides the system's roots.
    pub extra_root_certs_pem: Vec<Vec<u8>>,
    /// Credentials to use instead of looking them up ([`auth`]).
    pub credentials: Option<Credentials>,
}

impl OciOptions {
    /// Adds the CA certificates in the PEM file `path`.
    pub fn add_ca_file(&mut self, path: &Path) -> Result<(), OciError> {
        let pem = std::fs::read(path).map_err(|error| OciError::File {
            path: path.to_path_buf(),
            error,
        })?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(OciError::Input(format!(
                "{}: no PEM certificate in it (want -----BEGIN CERTIFICATE-----)",
                path.display()
            )));
        }
        self.extra_root_certs_pem.push(pem);
        Ok(())
    }
}

static OPTIONS: Mutex<Option<OciOptions>> = Mutex::new(None);
static RESOLVED: Mutex<Vec<(String, Weak<OciArtifact>)>> = Mutex::new(Vec::new());

/// Sets the registry options every later open of an `oci://` source in this process uses.
pub fn configure(options: OciOptions) {
    *OPTIONS.lock().unwrap_or_else(|e| e.into_inner()) = Some(options);
}

fn options() -> OciOptions {
    OPTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// True when `spec` names a registry artifact.
pub fn is_oci(spec: &str) -> bool {
    spec.starts_with(SCHEME)
}

/// A resolved incfs artifact: its manifest's blobs, and the client that reads them.
pub struct OciArtifact {
    registry: Arc<Registry>,
    spec: String,
    pinned: Reference,
    layers: Layers,
    root_digest: Option<crate::format::Digest>,
}

impl std::fmt::Debug for OciArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciArtifact")
            .field("spec", &self.spec)
            .field("pinned", &self.pinned.to_string())
            .field("layers", &self.layers)
            .finish()
    }
}

impl OciArtifact {
    /// Resolves `spec` (fetching its manifest), or returns the artifact this process
    /// resolved for the same spec and still holds.
    pub fn resolve(spec: &str, http: &HttpConfig) -> Result<Arc<OciArtifact>, OciError> {
        let mut memo = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
        memo.retain(|(_, w)| w.strong_count() > 0);
        if let Some(a) = memo
            .iter()
            .find(|(s, _)| s == spec)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(a);
        }
        drop(memo);
        let reference = Reference::parse(spec)?;
        let registry = Arc::new(Registry::new(&reference, http, &options(), "pull")?);
        let artifact = Arc::new(Self::fetch(spec, registry)?);
        RESOLVED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((spec.to_string(), Arc::downgrade(&artifact)));
        Ok(artifact)
    }

    /// Resolves `spec` to the manifest the reference `pinned` (the same repository, by
    /// digest) names, as [`OciArtifact::pinned`] gave it to another process: the artifact
    /// is named `spec`, and later resolves of `spec` in this process return it. A daemon
    /// thus mounts the very artifact its parent checked, even if the tag has moved since.
    pub fn resolve_as(
        spec: &str,
        pinned: &str,
        http: &HttpConfig,
    ) -> Result<Arc<OciArtifact>, OciError> {
        let named = Reference::parse(spec)?;
        let reference = Reference::parse(pinned)?;
        if !matches!(reference.target, Target::Digest(_))
            || reference.registry != named.registry
            || reference.repository != named.repository
        {
            return Err(OciError::Reference {
                spec: pinned.to_string(),
                reason: format!("not {spec} pinned to a digest"),
            });
        }
        let mut memo = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
        memo.retain(|(_, w)| w.strong_count() > 0);
        if let Some(a) = memo
            .iter()
            .filter(|(s, _)| s == spec)
            .find_map(|(_, w)| w.upgrade())
            .filter(|a| a.pinned == reference)
        {
            return Ok(a);
        }
        drop(memo);
        let registry = Arc::new(Registry::new(&reference, http, &options(), "pull")?);
        let artifact = Arc::new(Self::fetch(spec, registry)?);
        RESOLVED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(0, (spec.to_string(), Arc::downgrade(&artifact)));
        Ok(artifact)
    }

    fn fetch(spec: &str, registry: Arc<Registry>) -> Result<OciArtifact, OciError> {
        let reference = registry.reference.clone();
        let url = registry.url(&format!("manifests/{}", reference.target.as_str()));
        let req = Req::new(Method::GET, url, None).header(ACCEPT, manifest::MANIFEST_MEDIA_TYPE);
        let (bytes, header_digest) = registry.block_on(async {
            let resp = registry.send(&req).await?;
            let resp = check_status(resp, spec).await?;
            let header_digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_bounded(&registry, resp, spec, MAX_MANIFEST).await?;
            Ok((bytes, header_digest))
        })?;
        let digest = manifest::sha256_digest(&bytes);
        let want = match &reference.target {
            Target::Digest(d) => Some(d.clone()),
            Target::Tag(_) => header_digest,
        };
        if let Some(w) = want
            && w != digest
        {
            return Err(OciError::Digest {
                what: spec.to_string(),
                reason: format!("the manifest's digest is {digest}, not {w}"),
            });
        }
        let (m, layers) = Manifest::parse(spec, &bytes)?;
        let pinned = reference.with_digest(&digest);
        let root_digest = pinned_root(&pinned.to_string(), &m, &layers)?;
        debug!(spec, %digest, image = %layers.image.digest, size = layers.image.size,
            plan = layers.plan.is_some(), signature = layers.signature.is_some(), "resolved");
        Ok(OciArtifact {
            spec: spec.to_string(),
            pinned,
            root_digest,
            layers,
            registry,
        })
    }

    /// The reference pinned to the manifest's digest.
    pub fn pinned(&self) -> String {
        self.pinned.to_string()
    }

    /// The artifact's blobs.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    /// The root digest the digest-verified manifest pins the image to (its
    /// [`ROOT_DIGEST_ANNOTATION`]), if it has one. Reads of the image's header through
    /// [`OciSource`] fail unless they show it; a mount should also insist on it.
    pub fn root_digest(&self) -> Option<crate::format::Digest> {
        self.root_digest
    }

    /// The prefetch plan pushed with the image, if any.
    pub fn plan(&self) -> Result<Option<Vec<u8>>, OciError> {
        self.layers
            .plan
            .as_ref()
            .map(|d| self.small_blob(d, MAX_PLAN))
            .transpose()
    }

    /// The signature pushed with the image, if any.
    pub fn signature(&self) -> Result<Option<Vec<u8>>, OciError> {
        self.layers
            .signature
            .as_ref()
            .map(|d| self.small_blob(d, MAX_SIGNATURE))
            .transpose()
    }

    /// Where the signature comes from, for messages.
    pub fn signature_name(&self) -> String {
        format!("{} (signature layer)", self.pinned)
    }

    fn small_blob(&self, d: &Descriptor, max: u64) -> Result<Vec<u8>, OciError> {
        let what = format!("{} blob {}", self.pinned, d.digest);
        if d.size > max {
            return Err(OciError::Manifest {
                what,
                reason: format!("{} bytes is too large for a {}", d.size, d.media_type),
            });
        }
        let mut buf = Vec::new();
        self.download(d, &mut |piece| {
            buf.extend_from_slice(piece);
            Ok(())
        })?;
        Ok(buf)
    }

    /// Reads blob `d` whole, handing each piece to `out`, checking its size and sha256
    /// digest (`out` has had every byte when this returns `Ok`).
    fn download(
        &self,
        d: &Descriptor,
        out: &mut dyn FnMut(&[u8]) -> Result<(), OciError>,
    ) -> Result<(), OciError> {
        let what = format!("{} blob {}", self.pinned, d.digest);
        let reg = &self.registry;
        let req = Req::new(Method::GET, reg.url(&format!("blobs/{}", d.digest)), None);
        let mut resp = reg.block_on(async { check_status(reg.send(&req).await?, &what).await })?;
        let mut hash = sha2::Sha256::new();
        let mut got = 0u64;
        while let Some(piece) =
            reg.block_on(async { resp.chunk().await.map_err(|e| reg.net_error(&what, e)) })?
        {
            got += piece.len() as u64;
            if got > d.size {
                return Err(OciError::Digest {
                    what,
                    reason: format!("longer than the {} bytes of its descriptor", d.size),
                });
            }
            hash.update(&piece);
            out(&piece)?;
        }
        let digest = format!("sha256:{}", hex::encode(hash.finalize()));
        if got != d.size || digest != d.digest {
            return Err(OciError::Digest {
                what,
                reason: format!(
                    "got {got} bytes with digest {digest}, want {} bytes with {}",
                    d.size, d.digest
                ),
            });
        }
        Ok(())
    }

    /// A whole copy: the image to `out` (and its plan to `OUT.plan.json`, its signature
    /// to `OUT.sig`, its bulk sidecar to `OUT.bulk` when pushed with it; a stale one is
    /// removed when not), each checked against its digest, the image also against the root
    /// digest the manifest pins. All are fetched before any is written, and each is written
    /// to a temporary file renamed into place. `progress` gets the bytes of the image and
    /// then the sidecar so far. Returns the files written.
    pub fn pull(
        &self,
        out: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<PathBuf>, OciError> {
        let file_err = |path: &Path| {
            let path = path.to_path_buf();
            move |error| OciError::File { path, error }
        };
        let beside = |suffix: &str| {
            let mut p = out.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        let mut got = 0u64;
        let mut fetch_to = |d: &Descriptor, path: &Path| {
            let mut tmp = temp_beside(path)?;
            {
                let mut w = io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
                self.download(d, &mut |piece| {
                    w.write_all(piece).map_err(file_err(path))?;
                    got += piece.len() as u64;
                    progress(got);
                    Ok(())
                })?;
                w.flush().map_err(file_err(path))?;
            }
            tmp.as_file().sync_all().map_err(file_err(path))?;
            Ok::<_, OciError>(tmp)
        };
        let tmp = fetch_to(&self.layers.image, out)?;
        crate::format::Image::open_path(tmp.path(), self.root_digest.as_ref()).map_err(|e| {
            OciError::Digest {
                what: self.pinned(),
                reason: format!("the pulled image is not usable: {e}"),
            }
        })?;
        // Checked chunk by chunk where the fill uses it (and by `incfs verify`).
        let bulk_path = beside(crate::format::bulk::BULK_SUFFIX);
        let bulk = self
            .layers
            .bulk
            .as_ref()
            .map(|d| fetch_to(d, &bulk_path))
            .transpose()?;
        let extras = [
            (self.plan()?, beside(".plan.json")),
            (self.signature()?, beside(".sig")),
        ];
        let persist = |tmp: tempfile::NamedTempFile, path: &Path| {
            tmp.persist(path).map_err(|e| OciError::File {
                path: path.to_path_buf(),
                error: e.error,
            })
        };
        persist(tmp, out)?;
        let mut written = vec![out.to_path_buf()];
        match bulk {
            Some(t) => {
                persist(t, &bulk_path)?;
                written.push(bulk_path);
            }
            None => match std::fs::remove_file(&bulk_path) {
                Ok(()) => debug!(path = %bulk_path.display(), "removed a stale sidecar"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(file_err(&bulk_path)(e)),
            },
        }
        for (bytes, path) in extras {
            match bytes {
                Some(b) => {
                    let mut t = temp_beside(&path)?;
                    t.write_all(&b).map_err(file_err(&path))?;
                    t.as_file().sync_all().map_err(file_err(&path))?;
                    persist(t, &path)?;
                    written.push(path);
                }
                // A plan or signature of an earlier pull is not this image's.
                None => match std::fs::remove_file(&path) {
                    Ok(()) => debug!(path = %path.display(), "removed a stale file"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(file_err(&path)(e)),
                },
            }
        }
        Ok(written)
    }

    /// The image as a [`Source`].
    pub fn source(self: &Arc<Self>) -> OciSource {
        self.blob_source(&self.layers.image, self.spec.clone(), true)
    }

    /// The bulk sidecar pushed with the image, as a [`Source`], if there is one. Its name is
    /// the spec with [`crate::format::bulk::BULK_SUFFIX`], as a sidecar beside a URL's.
    pub fn bulk_source(self: &Arc<Self>) -> Option<OciSource> {
        let name = format!("{}{}", self.spec, crate::format::bulk::BULK_SUFFIX);
        self.layers
            .bulk
            .as_ref()
            .map(|d| self.blob_source(d, name, false))
    }

    fn blob_source(self: &Arc<Self>, d: &Descriptor, name: String, image: bool) -> OciSource {
        OciSource {
            blob_url: self.registry.url(&format!("blobs/{}", d.digest)),
            len: d.size,
            name,
            artifact: Arc::clone(self),
            image,
            multi_range: MultiRange::new(),
        }
    }
}

/// Opens the image of the artifact `spec` names (resolving it unless this process holds it).
pub fn open(spec: &str, http: &HttpConfig) -> Result<OciSource, SourceError> {
    Ok(OciArtifact::resolve(spec, http)?.source())
}

/// A temporary file in the directory of `path`, to be renamed to it.
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile, OciError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".incfs-pull-")
        .tempfile_in(dir)
        .map_err(|error| OciError::File {
            path: path.to_path_buf(),
            error,
        })
}

/// The root digest the manifest of `pinned` annotates (on the manifest, or on its image
/// layer; both must then agree).
fn pinned_root(
    pinned: &str,
    m: &Manifest,
    layers: &Layers,
) -> Result<Option<crate::format::Digest>, OciError> {
    let bad = |reason: String| OciError::Manifest {
        what: pinned.to_string(),
        reason,
    };
    let parse = |hex: &String| {
        crate::format::Digest::from_hex(hex)
            .map_err(|e| bad(format!("bad {ROOT_DIGEST_ANNOTATION} annotation: {e}")))
    };
    let on_manifest = m
        .annotations
        .get(ROOT_DIGEST_ANNOTATION)
        .map(parse)
        .transpose()?;
    let on_layer = layers
        .image
        .annotations
        .get(ROOT_DIGEST_ANNOTATION)
        .map(parse)
        .transpose()?;
    match (on_manifest, on_layer) {
        (Some(a), Some(b)) if a != b => Err(bad(format!(
            "the manifest's {ROOT_DIGEST_ANNOTATION} {a} differs from its image layer's {b}"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

async fn read_bounded(
    reg: &Registry,
    mut resp: reqwest::Response,
    what: &str,
    max: u64,
) -> Result<Vec<u8>, OciError> {
    let mut buf = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| reg.net_error(what, e))? {
        if (buf.len() + piece.len()) as u64 > max {
            return Err(OciError::Manifest {
                what: what.to_string(),
                reason: format!("more than {max} bytes"),
            });
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf)
}

/// A blob of an artifact (the image, or its bulk sidecar), read with one `Range` request
/// per read.
pub struct OciSource {
    artifact: Arc<OciArtifact>,
    blob_url: Url,
    name: String,
    len: u64,
    /// Whether it is the image, whose header reads are checked against the pinned root.
    image: bool,
    /// Whether ranges still go several to a request (until the registry, or the storage it
    /// redirects to, answers such a request with the whole blob).
    multi_range: MultiRange,
}

impl OciSource {
    /// The artifact this image belongs to.
    pub fn artifact(&self) -> &Arc<OciArtifact> {
        &self.artifact
    }

    /// A range read, within `timeout` when one is given.
    fn ranged(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        super::check_range(&self.name, offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        self.fetch_checked(offset, len, kind, timeout, on_piece)
    }

    async fn start(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, SourceError> {
        let last = offset + len - 1;
        trace!(offset, len, %kind, "registry range request");
        let req = Req::new(Method::GET, self.blob_url.clone(), timeout)
            .header(RANGE, &format!("bytes={offset}-{last}"))
            .header(
                reqwest::header::HeaderName::from_static(REQUEST_KIND_HEADER),
                &kind.to_string(),
            );
        let reg = &self.artifact.registry;
        let resp = reg.send(&req).await?;
        let bad = |what: String| SourceError::Io {
            source_name: self.name.clone(),
            error: io::Error::new(io::ErrorKind::InvalidData, what),
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                match parse_content_range(cr) {
                    Some((a, b, total))
                        if a == offset && b == last && total.is_none_or(|t| t == self.len) => {}
                    _ => {
                        return Err(bad(format!(
                            "asked for bytes {offset}-{last} of {}, got Content-Range {cr:?}",
                            self.len
                        )));
                    }
                }
            }
            StatusCode::OK if offset == 0 && len == self.len => {}
            StatusCode::OK => {
                return Err(SourceError::Unusable(format!(
                    "{}: the registry ignored the Range header (it answered bytes \
                     {offset}-{last} with 200 and the whole blob)",
                    self.name
                )));
            }
            s if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
                return Err(check_status(resp, &self.name)
                    .await
                    .err()
                    .map_or_else(|| SourceError::Unusable(self.name.clone()), Into::into));
            }
            s => {
                return Err(SourceError::Status {
                    source_name: self.name.clone(),
                    status: s.as_u16(),
                    offset,
                    end: offset + len,
                });
            }
        }
        if let Some(cl) = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            && cl != len
        {
            return Err(SourceError::Short {
                source_name: self.name.clone(),
                got: cl,
                want: len,
            });
        }
        Ok(resp)
    }

    fn fetch(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let mut resp = self.block_on(self.start(offset, len, kind, timeout))?;
        super::stream_exact(
            &self.name,
            len,
            &mut || self.next_piece(&mut resp),
            on_piece,
        )
    }

    /// The next piece of a response's body.
    fn next_piece(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Option<bytes::Bytes>, SourceError> {
        let reg = &self.artifact.registry;
        self.block_on(async {
            resp.chunk()
                .await
                .map_err(|e| SourceError::from(reg.net_error(&self.name, e)))
        })
    }

    fn block_on<T>(
        &self,
        fut: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        self.artifact.registry.block_on(fut)
    }

    /// Reads a range, checking the image header in it against the pinned root digest: a
    /// range that touches the header is read whole, checked, then handed on.
    fn fetch_checked(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let header_len = crate::format::HEADER_LEN as u64;
        let Some(want) = (self.artifact.root_digest).filter(|_| self.image && offset < header_len)
        else {
            return self.fetch(offset, len, kind, timeout, on_piece);
        };
        if offset != 0 || len < header_len {
            return Err(SourceError::Unusable(format!(
                "{}: bytes {offset}..{} cut the image header ({header_len} bytes), whose root \
                 digest the manifest of {} pins: read it whole",
                self.name,
                offset + len,
                self.artifact.pinned
            )));
        }
        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(MAX_PREALLOC));
        self.fetch(offset, len, kind, timeout, &mut |piece| {
            buf.extend_from_slice(piece);
            ControlFlow::Continue(())
        })?;
        let found = crate::format::Header::decode(&buf).map(|h| h.root_digest);
        if found.as_ref().ok() != Some(&want) {
            let found = found.map_or_else(|e| format!("no usable header ({e})"), |d| d.to_string());
            return Err(SourceError::Unusable(format!(
                "{}: the manifest of {} pins root digest {want} ({ROOT_DIGEST_ANNOTATION}), but \
                 the image blob has {found}",
                self.name, self.artifact.pinned
            )));
        }
        let _ = on_piece(&buf);
        Ok(())
    }
}

impl Source for OciSource {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        super::collect_range(self, offset, len, kind, None)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn read_range_streaming(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        self.ranged(offset, len, kind, None, on_piece)
    }

    fn read_range_within(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        self.ranged(offset, len, kind, Some(timeout), on_piece)
    }

    fn ranges_per_request(&self) -> usize {
        self.multi_range.per_request()
    }

    /// Several ranges in one request (`multipart/byteranges`). Ranges that touch
    /// the image header are read one by one, so the header is checked ([`Self::fetch_checked`]).
    fn read_ranges_within(
        &self,
        ranges: &[(u64, u64)],
        kind: RequestKind,
        timeout: Duration,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        check_ranges(&self.name, ranges, self.len)?;
        let header_len = crate::format::HEADER_LEN as u64;
        if !self.multi_range.wanted(ranges) || ranges[0].0 < header_len {
            return super::read_ranges_one_by_one(self, ranges, kind, timeout, on_piece);
        }
        let started = Instant::now();
        trace!(ranges = ranges.len(), first = ranges[0].0, %kind, "registry multi-range request");
        let req = Req::new(Method::GET, self.blob_url.clone(), Some(timeout))
            .header(RANGE, &range_header(ranges))
            .header(
                reqwest::header::HeaderName::from_static(REQUEST_KIND_HEADER),
                &kind.to_string(),
            );
        let reg = &self.artifact.registry;
        let mut resp = self.block_on(async { Ok(reg.send(&req).await?) })?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                drop(resp);
                return self
                    .multi_range
                    .refused(self, ranges, kind, timeout, started, on_piece);
            }
            s if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => {
                let name = &self.name;
                return self.block_on(async move {
                    Err(check_status(resp, name)
                        .await
                        .err()
                        .map_or_else(|| SourceError::Unusable(name.clone()), Into::into))
                });
            }
            s => return Err(status_error(&self.name, ranges, s.as_u16())),
        }
        let headers = resp.headers().clone();
        read_answer(
            &self.name,
            self.len,
            ranges,
            &headers,
            &mut || self.next_piece(&mut resp),
            on_piece,
        )
    }
}
