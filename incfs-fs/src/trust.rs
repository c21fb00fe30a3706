//! Signed images: an ed25519 signature over the root digest, so a server cannot substitute
//! another image.
//!
//! `incfs sign IMG --key KEY` writes `IMG.sig`. A reader given the signer's public key
//! (`--trust PUBKEY`) fetches `SOURCE.sig` from beside the image (a path or URL with `.sig`
//! appended), checks the signature, and then mounts only an image whose root digest is the
//! signed one. Since the root digest covers the manifest, the manifest covers the chunk
//! table and the table covers every chunk, one signature covers every byte served.
//!
//! The signed message is `incfs-image-v1:` followed by the 32 digest bytes, so a signature
//! made for anything else never verifies as an image signature.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::format::Digest;
use crate::source::{self, RequestKind, SourceError};

/// Domain separation prefix of the signed message.
const CONTEXT: &[u8] = b"incfs-image-v1:";
/// Largest signature file read from a source (it is ~250 bytes of JSON).
const MAX_SIG_FILE: u64 = 64 * 1024;

/// The contents of `IMG.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureFile {
    /// Format version, 1.
    pub version: u32,
    /// The signed root digest (hex).
    pub root_digest: String,
    /// The signer's public key (hex), for display; trust comes from the key the reader holds.
    pub public_key: String,
    /// The ed25519 signature (hex).
    pub signature: String,
}

/// What can go wrong with keys and signatures; each names the file or source.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key or signature file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A key or signature is malformed.
    #[error("{what}: {reason}")]
    Malformed {
        /// The file or source.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The signature file could not be fetched.
    #[error("fetching the signature {spec}: {error}")]
    Fetch {
        /// Where it was looked for.
        spec: String,
        /// Why.
        error: SourceError,
    },
    /// The signature does not verify with the trusted key.
    #[error("{what}: the signature does not verify with the trusted key {key}")]
    BadSignature {
        /// The signature's source.
        what: String,
        /// The trusted key (hex).
        key: String,
    },
}

/// Writes a new key pair: the secret key to `secret` (hex, mode 0600) and the public key to
/// `secret` + `.pub`. Returns the public key's path.
pub fn keygen(secret: &Path) -> Result<PathBuf, TrustError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| TrustError::Io { path, error }
    };
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(io(Path::new("/dev/urandom")))?,
        &mut seed,
    )
    .map_err(io(Path::new("/dev/urandom")))?;
    let key = SigningKey::from_bytes(&seed);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(secret)
            .map_err(io(secret))?;
        writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io(secret))?;
    }
    let public = pub_path(secret);
    std::fs::write(
        &public,
        format!("{}\n", hex::encode(key.verifying_key().to_bytes())),
    )
    .map_err(io(&public))?;
    Ok(public)
}

/// `KEY.pub` beside `KEY`.
fn pub_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn read_hex<const N: usize>(path: &Path) -> Result<[u8; N], TrustError> {
    let text = std::fs::read_to_string(path).map_err(|error| TrustError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_hex(text.trim(), &path.display().to_string())
}

fn parse_hex<const N: usize>(text: &str, what: &str) -> Result<[u8; N], TrustError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| TrustError::Malformed {
        what: what.to_string(),
        reason: format!("want {} hex digits", 2 * N),
    })?;
    Ok(out)
}

/// Signs `root` with the secret key in `key_file`.
pub fn sign(root: &Digest, key_file: &Path) -> Result<SignatureFile, TrustError> {
    let key = SigningKey::from_bytes(&read_hex::<32>(key_file)?);
    let sig = key.sign(&message(root));
    Ok(SignatureFile {
        version: 1,
        root_digest: root.to_hex(),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        signature: hex::encode(sig.to_bytes()),
    })
}

fn message(root: &Digest) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(&root.0);
    m
}

/// Reads a public key: a file holding 64 hex digits, or the 64 hex digits themselves.
pub fn load_public_key(spec: &str) -> Result<VerifyingKey, TrustError> {
    let bytes = if Path::new(spec).exists() {
        read_hex::<32>(Path::new(spec))?
    } else {
        parse_hex::<32>(spec, "--trust")?
    };
    VerifyingKey::from_bytes(&bytes).map_err(|e| TrustError::Malformed {
        what: spec.to_string(),
        reason: format!("not an ed25519 public key: {e}"),
    })
}

/// Checks `sig` (read from `what`) against `trusted`; returns the signed root digest.
pub fn verify(
    sig: &SignatureFile,
    what: &str,
    trusted: &VerifyingKey,
) -> Result<Digest, TrustError> {
    let malformed = |reason: String| TrustError::Malformed {
        what: what.to_string(),
        reason,
    };
    if sig.version != 1 {
        return Err(malformed(format!(
            "signature version {} (this incfs reads 1)",
            sig.version
        )));
    }
    let root = Digest::from_hex(&sig.root_digest).map_err(|e| malformed(e.to_string()))?;
    let signature = Signature::from_bytes(&parse_hex::<64>(&sig.signature, what)?);
    trusted
        .verify(&message(&root), &signature)
        .map_err(|_| TrustError::BadSignature {
            what: what.to_string(),
            key: hex::encode(trusted.to_bytes()),
        })?;
    Ok(root)
}

/// The signature's location for an image at `source_spec`: the same path or URL with `.sig`
/// appended.
pub fn signature_spec(source_spec: &str) -> String {
    format!("{source_spec}.sig")
}

/// Fetches `SOURCE.sig` and checks it against `trusted`; returns the root digest the mount
/// must then insist on.
///
/// For an `oci://` artifact the signature is its signature layer instead
/// ([`source::oci::OciArtifact::signature`]).
pub fn trusted_digest(source_spec: &str, trusted: &VerifyingKey) -> Result<Digest, TrustError> {
    if source::oci::is_oci(source_spec) {
        return oci_trusted_digest(source_spec, trusted);
    }
    let spec = signature_spec(source_spec);
    let fetch = |error| TrustError::Fetch {
        spec: spec.clone(),
        error,
    };
    let src = source::open(&spec).map_err(fetch)?;
    let len = src.total_len().map_err(fetch)?;
    if len > MAX_SIG_FILE {
        return Err(TrustError::Malformed {
            what: spec.clone(),
            reason: format!("{len} bytes is not a signature file"),
        });
    }
    let bytes = src
        .read_range(0, len, RequestKind::Background)
        .map_err(fetch)?;
    verify_bytes(&bytes, &spec, trusted)
}

fn verify_bytes(bytes: &[u8], what: &str, trusted: &VerifyingKey) -> Result<Digest, TrustError> {
    let sig: SignatureFile = serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    verify(&sig, what, trusted)
}

fn oci_trusted_digest(spec: &str, trusted: &VerifyingKey) -> Result<Digest, TrustError> {
    let fetch = |error: source::oci::OciError| TrustError::Fetch {
        spec: spec.to_string(),
        error: error.into(),
    };
    let artifact =
        source::oci::OciArtifact::resolve(spec, &source::HttpConfig::default()).map_err(fetch)?;
    let what = artifact.signature_name();
    let bytes = artifact
        .signature()
        .map_err(fetch)?
        .ok_or_else(|| TrustError::Malformed {
            what: spec.to_string(),
            reason: "the artifact has no signature layer (push it with `incfs push IMG REF` \
                     with IMG.sig beside IMG, or --signature)"
                .into(),
        })?;
    verify_bytes(&bytes, &what, trusted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_every_tamper_fails() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let public = keygen(&key).unwrap();
        let pk = load_public_key(public.to_str().unwrap()).unwrap();
        let root = Digest([9; 32]);
        let sig = sign(&root, &key).unwrap();
        assert_eq!(verify(&sig, "t", &pk).unwrap(), root);

        let mut other = sig.clone();
        other.root_digest = Digest([8; 32]).to_hex();
        assert!(matches!(
            verify(&other, "t", &pk),
            Err(TrustError::BadSignature { .. })
        ));

        let key2 = dir.path().join("k2");
        let pk2 = load_public_key(keygen(&key2).unwrap().to_str().unwrap()).unwrap();
        assert!(matches!(
            verify(&sig, "t", &pk2),
            Err(TrustError::BadSignature { .. })
        ));

        let mut garbled = sig.clone();
        garbled.signature = "zz".into();
        assert!(matches!(
            verify(&garbled, "t", &pk),
            Err(TrustError::Malformed { .. })
        ));
        assert!(keygen(&key).is_err(), "keygen never overwrites a key");
    }
}
