//! An image in an S3 bucket or an S3-compatible store (MinIO, Ceph RGW, Garage, moto…),
//! named `s3://BUCKET/KEY`, read with one ranged `GET` per read.
//!
//! Requests are signed and sent by [`object_store`]'s S3 client (SigV4, on the same reqwest
//! and rustls build as [`super::HttpSource`]). Its own retries are off: every request is
//! made once, and the mount's [`crate::retry::RetryPolicy`] decides what is tried again, as
//! for any source. Missing objects and buckets and refused credentials are permanent errors
//! naming the URL; network errors, time-outs and the rest are retryable.
//!
//! **Configuration, as the AWS tools take it.** The environment first: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
//! `AWS_ENDPOINT_URL` (a self-hosted store; `http://` allowed), and the other `AWS_*`
//! variables `object_store` knows (web identity, container credentials). What the
//! environment leaves unset comes from the profile `AWS_PROFILE` (default `default`) of the
//! shared files: keys and session token from `~/.aws/credentials`
//! (`AWS_SHARED_CREDENTIALS_FILE`), region and `endpoint_url` from `~/.aws/config`
//! (`AWS_CONFIG_FILE`, sections `[default]` / `[profile NAME]`). Without keys anywhere, the
//! instance's metadata service is asked, as on EC2. Requests are path-style
//! (`ENDPOINT/BUCKET/KEY`), which every self-hosted store and AWS itself accept.
//!
//! Like [`super::HttpSource`], it owns a current-thread tokio runtime and runs each request
//! on the calling thread with `block_on`; it must not be called from inside a runtime.

use std::collections::HashMap;
use std::io;
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};

use super::{HttpConfig, RequestKind, Source, SourceError};

/// The URL scheme of S3 sources.
pub const SCHEME: &str = "s3://";

/// An image in an S3(-compatible) bucket. Cheap to share between threads.
#[derive(Debug)]
pub struct S3Source {
    /// `s3://BUCKET/KEY`, for messages.
    url: String,
    store: AmazonS3,
    key: object_store::path::Path,
    /// Always `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
    len: u64,
}

impl S3Source {
    /// Opens `url` (`s3://BUCKET/KEY`) with the AWS configuration of this process (see the
    /// module docs) and `http`'s timeouts, and learns the image's length (a `HEAD`).
    pub fn open(url: &str, http: &HttpConfig) -> Result<Self, SourceError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let profile = Profile::load(&env, home.as_deref());
        Self::open_with(url, http, &env, &profile)
    }

    fn open_with(
        url: &str,
        http: &HttpConfig,
        env: &dyn Fn(&str) -> Option<String>,
        profile: &Profile,
    ) -> Result<Self, SourceError> {
        let (bucket, key) = parse_url(url)?;
        let unusable = |what: &str, e: &dyn std::fmt::Display| {
            SourceError::Unusable(format!("{url}: {what}: {e}"))
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // The profile fills what the environment left unset.
        let from_profile = [
            (
                "AWS_ACCESS_KEY_ID",
                "aws_access_key_id",
                AmazonS3ConfigKey::AccessKeyId,
            ),
            (
                "AWS_SECRET_ACCESS_KEY",
                "aws_secret_access_key",
                AmazonS3ConfigKey::SecretAccessKey,
            ),
            (
                "AWS_SESSION_TOKEN",
                "aws_session_token",
                AmazonS3ConfigKey::Token,
            ),
            (
                "AWS_ENDPOINT_URL",
                "endpoint_url",
                AmazonS3ConfigKey::Endpoint,
            ),
        ];
        if env("AWS_ACCESS_KEY_ID").is_none() {
            for (var, name, key) in &from_profile[..3] {
                if env(var).is_none()
                    && let Some(v) = profile.get(name)
                {
                    builder = builder.with_config(*key, v);
                }
            }
        }
        let endpoint = env("AWS_ENDPOINT_URL")
            .or_else(|| env("AWS_ENDPOINT"))
            .or_else(|| profile.get("endpoint_url").map(str::to_string));
        if let Some(e) = &endpoint {
            builder = builder.with_config(from_profile[3].2, e);
        }
        if env("AWS_REGION").is_none()
            && env("AWS_DEFAULT_REGION").is_none()
            && let Some(r) = profile.get("region")
        {
            builder = builder.with_region(r);
        }
        let mut client = ClientOptions::new()
            .with_connect_timeout(http.connect_timeout)
            .with_allow_http(
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            )
            .with_user_agent(reqwest::header::HeaderValue::from_static(concat!(
                "incfs/",
                env!("CARGO_PKG_VERSION")
            )));
        client = match http.request_timeout {
            Some(t) => client.with_timeout(t),
            None => client.with_timeout_disabled(),
        };
        if http.http1_only {
            client = client.with_http1_only();
        }
        let store = builder
            .with_virtual_hosted_style_request(false)
            .with_client_options(client)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| unusable("bad S3 configuration", &e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unusable("cannot start the S3 client's runtime", &e))?;
        let mut source = S3Source {
            url: url.to_string(),
            store,
            key: object_store::path::Path::from(key),
            runtime: Some(runtime),
            len: 0,
        };
        let meta = source.block_on(source.store.head(&source.key), http.request_timeout)?;
        source.len = meta.size;
        tracing::debug!(url, len = source.len, "opened S3 source");
        Ok(source)
    }

    /// Runs `fut` on this source's runtime, within `timeout` when given.
    fn block_on<T>(
        &self,
        fut: impl Future<Output = object_store::Result<T>>,
        timeout: Option<Duration>,
    ) -> Result<T, SourceError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(SourceError::Unusable(format!(
                "{}: an S3 source cannot be read from inside an async runtime",
                self.url
            )));
        }
        let Some(rt) = self.runtime.as_ref() else {
            return Err(SourceError::Unusable(format!("{}: closed", self.url)));
        };
        let result = match timeout {
            Some(t) => rt
                .block_on(async { tokio::time::timeout(t, fut).await })
                .map_err(|_| self.timed_out(t))?,
            None => rt.block_on(fut),
        };
        result.map_err(|e| self.error(e))
    }

    fn timed_out(&self, t: Duration) -> SourceError {
        SourceError::Io {
            source_name: self.url.clone(),
            error: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:.1} s", t.as_secs_f64()),
            ),
        }
    }

    /// A store error as a source error: what retrying cannot fix is permanent, with advice.
    fn error(&self, e: object_store::Error) -> SourceError {
        use object_store::Error as E;
        let advice = match &e {
            E::NotFound { .. } => {
                "no such bucket or object (check the URL, and AWS_ENDPOINT_URL for a self-hosted store)"
            }
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                "access refused (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile AWS_PROFILE in ~/.aws/credentials)"
            }
            E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => {
                "not usable"
            }
            _ => {
                return SourceError::Io {
                    source_name: self.url.clone(),
                    error: io::Error::other(e),
                };
            }
        };
        let message = format!("{}: {advice}: {e}", self.url);
        if matches!(e, E::NotFound { .. }) {
            SourceError::NotFound(message)
        } else {
            SourceError::Unusable(message)
        }
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
        tracing::trace!(offset, len, %kind, "S3 range");
        super::check_range(&self.url, offset, len, self.len)?;
        self.get(offset..offset + len, timeout, on_piece)
    }

    /// One ranged GET of `range` (within the object: [`S3Source::ranged`] checks), its body
    /// handed to `on_piece` as it arrives.
    fn get(
        &self,
        range: Range<u64>,
        timeout: Option<Duration>,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        if range.is_empty() {
            return Ok(());
        }
        let want = range.end - range.start;
        let mut got = 0u64;
        let fetch = async {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range.clone())),
                ..GetOptions::default()
            };
            let answer = self.store.get_opts(&self.key, opts).await?;
            if answer.range != range {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: format!("asked for bytes {range:?}, got {:?}", answer.range).into(),
                });
            }
            let mut body = answer.into_stream();
            while let Some(piece) = body.next().await {
                let piece = piece?;
                got += piece.len() as u64;
                if got > want || on_piece(&piece).is_break() {
                    break;
                }
            }
            Ok(())
        };
        self.block_on(fetch, timeout)?;
        if got < want {
            return Err(SourceError::Short {
                source_name: self.url.clone(),
                got,
                want,
            });
        }
        Ok(())
    }
}

impl Source for S3Source {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        super::collect_range(self, offset, len, kind, None)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }

    fn describe(&self) -> String {
        self.url.clone()
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
}

impl Drop for S3Source {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// `s3://BUCKET/KEY` → (bucket, key).
fn parse_url(url: &str) -> Result<(&str, &str), SourceError> {
    url.strip_prefix(SCHEME)
        .and_then(|rest| rest.split_once('/'))
        .filter(|(b, k)| !b.is_empty() && !k.is_empty() && !k.ends_with('/'))
        .ok_or_else(|| {
            SourceError::Unusable(format!(
                "{url}: not an S3 object URL (expected s3://BUCKET/KEY)"
            ))
        })
}

/// The settings of one profile of the shared AWS files (see the module docs).
#[derive(Debug, Default)]
struct Profile(HashMap<String, String>);

impl Profile {
    /// The profile `AWS_PROFILE` (default `default`): `~/.aws/config`'s settings, overridden
    /// by `~/.aws/credentials`' (the AWS CLI's order). Missing files are empty.
    fn load(env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Self {
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
        let file = |var: &str, rel: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(rel)))
        };
        let mut settings = HashMap::new();
        let config_section = if name == "default" {
            name.clone()
        } else {
            format!("profile {name}")
        };
        if let Some(text) =
            file("AWS_CONFIG_FILE", ".aws/config").and_then(|p| std::fs::read_to_string(p).ok())
        {
            settings.extend(ini_section(&text, &config_section));
        }
        if let Some(text) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            settings.extend(ini_section(&text, &name));
        }
        Profile(settings)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The `key = value` lines of `[section]` in an INI text (`#` and `;` start comments).
fn ini_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_key() {
        assert_eq!(
            parse_url("s3://b/dir/app.img").unwrap(),
            ("b", "dir/app.img")
        );
        for bad in ["s3://b", "s3://b/", "s3:///k", "s3://b/dir/", "http://b/k"] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("s3://BUCKET/KEY"), "{e}");
        }
    }

    #[test]
    fn the_profile_comes_from_the_shared_files() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = D\naws_secret_access_key=DS\n\n[ci]\n# a comment\naws_access_key_id = C\naws_secret_access_key = CS\naws_session_token = T\n",
        )
        .unwrap();
        std::fs::write(
            home.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile ci]\nregion = us-east-2\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .unwrap();
        let none = |_: &str| None;
        let p = Profile::load(&none, Some(home.path()));
        assert_eq!(p.get("aws_access_key_id"), Some("D"));
        assert_eq!(p.get("aws_secret_access_key"), Some("DS"));
        assert_eq!(p.get("region"), Some("eu-west-1"));
        assert_eq!(p.get("endpoint_url"), None);
        let ci = |k: &str| (k == "AWS_PROFILE").then(|| "ci".to_string());
        let p = Profile::load(&ci, Some(home.path()));
        assert_eq!(p.get("aws_access_key_id"), Some("C"));
        assert_eq!(p.get("aws_session_token"), Some("T"));
        assert_eq!(p.get("region"), Some("us-east-2"));
        assert_eq!(p.get("endpoint_url"), Some("http://127.0.0.1:9000"));
        assert!(Profile::load(&none, None).0.is_empty());
    }
}
