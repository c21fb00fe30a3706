//! `oci://HOST[:PORT]/REPO:TAG` and `oci://HOST[:PORT]/REPO@sha256:HEX`, checked against the
//! grammar of the distribution spec (repository path components, tags, digests).

use std::fmt;

use super::OciError;

/// Where an artifact lives in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`, as typed (it is also the key of stored credentials).
    pub registry: String,
    /// The repository, e.g. `team/app`.
    pub repository: String,
    /// A tag or a digest.
    pub target: Target,
}

/// What a reference points at in its repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A tag, which may move.
    Tag(String),
    /// A manifest digest, `sha256:` and 64 lowercase hex digits.
    Digest(String),
}

impl Target {
    /// The tag or digest as it goes into a `/manifests/` URL.
    pub fn as_str(&self) -> &str {
        match self {
            Target::Tag(t) | Target::Digest(t) => t,
        }
    }
}

/// The URL scheme of registry references.
pub const SCHEME: &str = "oci://";

impl Reference {
    /// Parses `oci://HOST[:PORT]/REPO:TAG` or `oci://HOST[:PORT]/REPO@sha256:HEX`.
    pub fn parse(spec: &str) -> Result<Reference, OciError> {
        let bad = |reason: String| OciError::Reference {
            spec: spec.to_string(),
            reason,
        };
        let rest = spec.strip_prefix(SCHEME).ok_or_else(|| {
            bad("a registry reference starts with oci:// (oci://HOST[:PORT]/REPO:TAG)".into())
        })?;
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry host".into()))?;
        check_registry(registry).map_err(bad)?;
        let (repository, target) = if let Some((repo, digest)) = path.split_once('@') {
            check_digest(digest).map_err(bad)?;
            (repo, Target::Digest(digest.to_string()))
        } else {
            // A tag follows the last ':' after the last '/'.
            let last = path.rfind('/').map_or(0, |i| i + 1);
            match path[last..].rfind(':') {
                Some(i) => {
                    let tag = &path[last + i + 1..];
                    check_tag(tag).map_err(bad)?;
                    (&path[..last + i], Target::Tag(tag.to_string()))
                }
                None => {
                    return Err(bad(
                        "no tag or digest: add :TAG or @sha256:DIGEST after the repository".into(),
                    ));
                }
            }
        };
        check_repository(repository).map_err(bad)?;
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            target,
        })
    }

    /// The same repository, at `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            target: Target::Digest(digest.to_string()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.target {
            Target::Tag(_) => ':',
            Target::Digest(_) => '@',
        };
        write!(
            f,
            "{SCHEME}{}/{}{sep}{}",
            self.registry,
            self.repository,
            self.target.as_str()
        )
    }
}

fn check_registry(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no registry host".into());
    }
    let (name, port) = match host.rsplit_once(':') {
        // An IPv6 literal without a port: [::1]
        Some((n, p)) if !p.contains(']') => (n, Some(p)),
        _ => (host, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(format!("registry port {p:?} is not a number up to 65535"));
    }
    let ok = if let Some(v6) = name.strip_prefix('[') {
        v6.strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !name.is_empty()
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{host:?} is not a registry host[:port]"))
    }
}

/// Path components: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, joined by `/`.
fn check_repository(repo: &str) -> Result<(), String> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__" or "-+", followed by an alphanumeric.
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &c[start..i];
            if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
                return false;
            }
        }
        true
    };
    if repo.is_empty() {
        return Err("empty repository name".into());
    }
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters".into());
    }
    match repo.split('/').find(|c| !component_ok(c)) {
        Some(c) => Err(format!(
            "repository component {c:?} is not valid (lowercase letters, digits, and . _ __ - \
             between them)"
        )),
        None => Ok(()),
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} is not valid (up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)"
        ))
    }
}

/// `sha256:` and 64 lowercase hex digits (the only algorithm incfs reads).
pub(super) fn check_digest(digest: &str) -> Result<(), String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err(format!(
            "digest {digest:?} is not sha256:HEX (the only algorithm incfs reads)"
        ));
    };
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "digest {digest:?} does not have 64 lowercase hex digits"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn good_references_parse_and_print_back() {
        let r = Reference::parse("oci://127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.target, Target::Tag("v1.2".into()));
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/team/app:v1.2");

        let spec = format!("oci://registry.example.com/a.b/c__d-e@{D}");
        let r = Reference::parse(&spec).unwrap();
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "a.b/c__d-e");
        assert_eq!(r.target, Target::Digest(D.into()));
        assert_eq!(r.to_string(), spec);
        assert!(Reference::parse("oci://[::1]:5000/app:latest").is_ok());
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (spec, why) in [
            ("http://h/app:1", "starts with oci://"),
            ("oci://h", "no repository"),
            ("oci://h/app", "no tag or digest"),
            ("oci://h:99999/app:1", "port"),
            ("oci://h/App:1", "repository component \"App\""),
            ("oci://h/a//b:1", "repository component \"\""),
            ("oci://h/a-:1", "repository component"),
            ("oci://h/app:.x", "tag \".x\""),
            ("oci://h/app@sha256:12", "64 lowercase hex"),
            ("oci://h/app@md5:12", "sha256:HEX"),
            ("oci://ho st/app:1", "not a registry host"),
        ] {
            let e = Reference::parse(spec).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(spec), "{spec}: {e}");
        }
    }
}
