//! Registry credentials, as users keep them, and the pieces of the auth flows: the
//! `WWW-Authenticate` challenge and the token service's answer.
//!
//! Credentials are looked up for the registry's `host[:port]`, first match wins:
//! 1. the environment: [`USER_ENV`] and [`PASSWORD_ENV`] (both set);
//! 2. `$REGISTRY_AUTH_FILE` (Podman, Skopeo, Buildah);
//! 3. `$XDG_RUNTIME_DIR/containers/auth.json` (Podman's `podman login`);
//! 4. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` (`docker login`).
//!
//! In an auth file, `auths.<key>.auth` holds base64 `user:password` (or `username` and
//! `password` fields); the key is the registry as typed, possibly with `https://` or
//! `http://` and a path (`https://host/v1/`). Credential helpers (`credsStore`,
//! `credHelpers`) are not run: a file that names one but holds no entry for the registry
//! gets a warning (once per process), and the next file is tried.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tracing::{debug, warn};

/// Environment variable holding the registry user name.
pub const USER_ENV: &str = "INCFS_REGISTRY_USER";
/// Environment variable holding the registry password (or token).
pub const PASSWORD_ENV: &str = "INCFS_REGISTRY_PASSWORD";

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password or personal access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"…")
            .finish()
    }
}

/// Where credentials for `registry` are found (see the module docs), if anywhere; the
/// second value says where, for messages.
pub fn find_credentials(registry: &str) -> Option<(Credentials, String)> {
    if let (Ok(user), Ok(password)) = (std::env::var(USER_ENV), std::env::var(PASSWORD_ENV)) {
        return Some((
            Credentials { user, password },
            format!("${USER_ENV}/${PASSWORD_ENV}"),
        ));
    }
    for file in auth_files() {
        match std::fs::read(&file) {
            Ok(bytes) => match credentials_in(&bytes, registry) {
                Ok(Some(c)) => {
                    debug!(file = %file.display(), registry, "registry credentials found");
                    return Some((c, file.display().to_string()));
                }
                Ok(None) => {}
                Err(why) => warn!(file = %file.display(), "ignoring the auth file: {why}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %file.display(), error = %e, "cannot read the auth file"),
        }
    }
    None
}

fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(Path::new(&d).join("containers/auth.json"));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(Path::new(&d).join("config.json"));
    } else if let Some(h) = std::env::var_os("HOME") {
        files.push(Path::new(&h).join(".docker/config.json"));
    }
    files
}

/// The credentials for `registry` in an auth file's JSON.
fn credentials_in(json: &[u8], registry: &str) -> Result<Option<Credentials>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let Some(entry) = auths
        .iter()
        .find(|(k, _)| key_host(k) == registry)
        .map(|(_, e)| e)
    else {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if v.get("credsStore").is_some() || v.get("credHelpers").is_some() {
            WARNED.call_once(|| {
                warn!(
                    registry,
                    "an auth file names a credential helper, which incfs does not run: set \
                     {USER_ENV} and {PASSWORD_ENV} for this registry"
                );
            });
        }
        return Ok(None);
    };
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str())
        && !auth.is_empty()
    {
        let raw = STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("auths.{registry}.auth is not base64: {e}"))?;
        let text = String::from_utf8(raw)
            .map_err(|_| format!("auths.{registry}.auth is not UTF-8 user:password"))?;
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| format!("auths.{registry}.auth is not user:password"))?;
        return Ok(Some(Credentials {
            user: user.to_string(),
            password: password.to_string(),
        }));
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            user: u.to_string(),
            password: p.to_string(),
        })),
        _ => Ok(None),
    }
}

/// `https://host:port/v1/` → `host:port`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// A `WWW-Authenticate` challenge of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`: send the credentials with every request.
    Basic,
    /// `Bearer realm=…,service=…,scope=…`: get a token from `realm`.
    Bearer {
        /// The token service's URL.
        realm: String,
        /// The `service` parameter to pass on, if given.
        service: Option<String>,
        /// The `scope` the registry asked for, if given.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value (one challenge; parameters may be quoted and hold
/// commas). `None` for schemes incfs does not speak.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// Longest token lifetime believed (a day): longer `expires_in` values are cut to it.
pub const MAX_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A token service's answer (`token`, or OAuth2's `access_token`).
#[derive(Debug, serde::Deserialize)]
pub struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    /// Seconds the token is good for (the spec's default is 60).
    expires_in: Option<u64>,
}

/// What the token service says: the token, and how long it is good for.
pub fn parse_token(json: &[u8]) -> Result<(String, std::time::Duration), String> {
    let a: TokenAnswer =
        serde_json::from_slice(json).map_err(|e| format!("the token answer is not JSON: {e}"))?;
    let token = a
        .token
        .or(a.access_token)
        .filter(|t| !t.is_empty())
        .ok_or("the token answer holds no token")?;
    // The spec's default lifetime when none is given; clamped to 1 s..=MAX_TOKEN_LIFETIME, so
    // a zero is not a token that lapses at once and a huge value cannot overflow a deadline
    // (a token that lapses earlier than it said is renewed on its first 401).
    let secs = a
        .expires_in
        .unwrap_or(60)
        .clamp(1, MAX_TOKEN_LIFETIME.as_secs());
    Ok((token, std::time::Duration::from_secs(secs)))
}

/// `Basic base64(user:password)`.
pub fn basic_header(c: &Credentials) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", c.user, c.password))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("bearer realm=http://x/t"),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn auth_files_match_the_registry_in_any_spelling() {
        let json = br#"{"auths": {
            "https://other:5000/v1/": {"auth": "b3RoZXI6cA=="},
            "http://127.0.0.1:5000": {"auth": "dXNlcjpwYXNzOndvcmQ="},
            "plain.example": {"username": "u", "password": "p"}
        }, "credsStore": "desktop"}"#;
        let c = credentials_in(json, "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str()),
            ("user", "pass:word")
        );
        let c = credentials_in(json, "plain.example").unwrap().unwrap();
        assert_eq!(c.user, "u");
        assert_eq!(credentials_in(json, "127.0.0.1:5001").unwrap(), None);
        assert!(credentials_in(br#"{"auths":{"h":{"auth":"!!"}}}"#, "h").is_err());
        assert!(format!("{c:?}").contains('…') && !format!("{c:?}").contains("\"p\""));
    }

    #[test]
    fn token_answers() {
        let (t, d) = parse_token(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), d.as_secs()), ("abc", 300));
        let (t, d) = parse_token(br#"{"access_token":"x"}"#).unwrap();
        assert_eq!((t.as_str(), d.as_secs()), ("x", 60));
        assert!(parse_token(br#"{"token":""}"#).is_err());
        let huge = format!(r#"{{"token":"x","expires_in":{}}}"#, u64::MAX);
        let (_, d) = parse_token(huge.as_bytes()).unwrap();
        assert_eq!(d, MAX_TOKEN_LIFETIME);
        let (_, d) = parse_token(br#"{"token":"x","expires_in":0}"#).unwrap();
        assert_eq!(d.as_secs(), 1);
    }
}
