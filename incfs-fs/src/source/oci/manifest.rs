//! The OCI image manifest an incfs artifact is (docs/format.md, "OCI artifacts").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::OciError;
use super::reference::check_digest;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The manifest's `artifactType`: an incfs image with its plan and signature.
pub const ARTIFACT_TYPE: &str = "application/vnd.incfs.artifact.v1";
/// Media type of the image blob (an incfs image file, docs/format.md).
pub const IMAGE_MEDIA_TYPE: &str = "application/vnd.incfs.image.v1";
/// Media type of the prefetch plan blob (the JSON `incfs plan` writes).
pub const PLAN_MEDIA_TYPE: &str = "application/vnd.incfs.plan.v1+json";
/// Media type of the signature blob (the JSON `incfs sign` writes).
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.incfs.signature.v1+json";
/// Media type of the bulk sidecar blob (`IMG.bulk`, docs/format.md): the background fill's
/// frames.
pub const BULK_MEDIA_TYPE: &str = "application/vnd.incfs.bulk.v1";
/// The empty config blob of artifacts without a config (`{}`).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The bytes of the empty config blob.
pub const EMPTY_BLOB: &[u8] = b"{}";
/// Annotation on the manifest and image layer: the image's root digest (hex).
pub const ROOT_DIGEST_ANNOTATION: &str = "dev.incfs.root-digest";
/// Annotation naming a layer's file (`org.opencontainers.image.title`).
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// Largest manifest read: an incfs manifest has five descriptors (a few KiB).
pub const MAX_MANIFEST: u64 = 1 << 20;

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// What the blob is.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:HEX` of the blob.
    pub digest: String,
    /// Its length.
    pub size: u64,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest, the fields incfs writes and reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// [`ARTIFACT_TYPE`] for incfs artifacts.
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    /// The empty config.
    pub config: Descriptor,
    /// The image, then the plan, the signature and the bulk sidecar if there are.
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The blobs of an incfs artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// The image.
    pub image: Descriptor,
    /// The prefetch plan, if pushed.
    pub plan: Option<Descriptor>,
    /// The signature, if pushed.
    pub signature: Option<Descriptor>,
    /// The bulk sidecar, if pushed.
    pub bulk: Option<Descriptor>,
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

impl Manifest {
    /// The manifest of an artifact with these blobs.
    pub fn new(layers: &Layers, root_digest_hex: &str) -> Manifest {
        let mut all = vec![layers.image.clone()];
        all.extend(layers.plan.clone());
        all.extend(layers.signature.clone());
        all.extend(layers.bulk.clone());
        Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: Descriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: sha256_digest(EMPTY_BLOB),
                size: EMPTY_BLOB.len() as u64,
                annotations: BTreeMap::new(),
            },
            layers: all,
            annotations: BTreeMap::from([(
                ROOT_DIGEST_ANNOTATION.to_string(),
                root_digest_hex.to_string(),
            )]),
        }
    }

    /// Parses a manifest fetched from `what` and finds its blobs: exactly one image layer, at
    /// most one plan, one signature and one bulk sidecar; other layers are ignored (a later
    /// writer may add more).
    pub fn parse(what: &str, bytes: &[u8]) -> Result<(Manifest, Layers), OciError> {
        let bad = |reason: String| OciError::Manifest {
            what: what.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not an OCI image manifest: {e}")))?;
        if m.schema_version != 2 {
            return Err(bad(format!("schemaVersion {} (want 2)", m.schema_version)));
        }
        if let Some(mt) = &m.media_type
            && mt != MANIFEST_MEDIA_TYPE
        {
            return Err(bad(format!(
                "mediaType {mt} (an incfs artifact is an OCI image manifest)"
            )));
        }
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(bad(format!(
                "artifactType {:?} is not {ARTIFACT_TYPE}: not an incfs artifact (push one with \
                 `incfs push IMG REF`)",
                m.artifact_type.as_deref().unwrap_or("(none)")
            )));
        }
        let pick = |mt: &str| -> Result<Option<Descriptor>, OciError> {
            let mut found = m.layers.iter().filter(|l| l.media_type == mt);
            let first = found.next().cloned();
            if found.next().is_some() {
                return Err(bad(format!("more than one layer of type {mt}")));
            }
            if let Some(d) = &first {
                check_digest(&d.digest).map_err(|r| bad(format!("layer {mt}: {r}")))?;
            }
            Ok(first)
        };
        let image = pick(IMAGE_MEDIA_TYPE)?
            .ok_or_else(|| bad(format!("no layer of type {IMAGE_MEDIA_TYPE} (the image)")))?;
        let layers = Layers {
            image,
            plan: pick(PLAN_MEDIA_TYPE)?,
            signature: pick(SIGNATURE_MEDIA_TYPE)?,
            bulk: pick(BULK_MEDIA_TYPE)?,
        };
        Ok((m, layers))
    }

    /// The manifest's bytes, as pushed.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(mt: &str, b: &[u8]) -> Descriptor {
        Descriptor {
            media_type: mt.into(),
            digest: sha256_digest(b),
            size: b.len() as u64,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_foreign_ones_are_refused() {
        let layers = Layers {
            image: desc(IMAGE_MEDIA_TYPE, b"img"),
            plan: None,
            signature: Some(desc(SIGNATURE_MEDIA_TYPE, b"sig")),
            bulk: Some(desc(BULK_MEDIA_TYPE, b"bulk")),
        };
        let m = Manifest::new(&layers, "ab");
        let (_, back) = Manifest::parse("t", &m.to_json()).unwrap();
        assert_eq!(back, layers);
        assert_eq!(
            sha256_digest(EMPTY_BLOB),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );

        let mut other = m.clone();
        other.artifact_type = None;
        let e = Manifest::parse("t", &other.to_json()).unwrap_err();
        assert!(e.to_string().contains("not an incfs artifact"), "{e}");
        let mut two = m.clone();
        two.layers.push(desc(IMAGE_MEDIA_TYPE, b"img2"));
        assert!(Manifest::parse("t", &two.to_json()).is_err());
        let mut none = m;
        none.layers.remove(0);
        assert!(Manifest::parse("t", &none.to_json()).is_err());
        assert!(Manifest::parse("t", b"{").is_err());
    }
}
