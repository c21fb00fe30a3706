//! One registry connection: the HTTP client, the auth state shared by every thread, and the
//! requests of the distribution API with auth and redirects handled.
//!
//! **Auth.** A request goes out with what the registry last asked for: nothing, `Basic`, or
//! a bearer token. A `401` answer carries a challenge; the client acts on it (sends the
//! credentials, or fetches a token from the challenge's realm) and sends the request again,
//! at most twice, so a refused token is a clear error, never a loop. A token is also
//! refreshed shortly before the lifetime the token service gave it ends. Each refresh bumps a
//! generation number: threads that got a `401` with the same token wait for one refresh and
//! use its token, instead of each fetching one.
//!
//! **Redirects** (a registry with an S3 or GCS backend answers a blob GET with a redirect to
//! storage) are followed here, not by reqwest, at most [`MAX_REDIRECTS`] times: the `Range`
//! header goes along, the registry's `Authorization` only to the registry's own origin.
//!
//! Like [`crate::source::HttpSource`], the client is async under a current-thread runtime
//! driven by whichever calling thread holds it.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use tracing::{debug, trace};

use super::auth::{Challenge, Credentials, basic_header, find_credentials, parse_challenge};
use super::reference::Reference;
use super::{OciError, OciOptions};
use crate::source::HttpConfig;
use crate::source::http::{error_chain, redacted};

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;
/// Largest error body read for a message.
const MAX_ERROR_BODY: usize = 4096;
/// Largest token service answer read (tokens are a few KiB).
const MAX_TOKEN_ANSWER: u64 = 64 << 10;
/// A token is refreshed this long before its lifetime ends (or at three quarters of a
/// shorter lifetime), so a request never starts with a token about to lapse.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);

#[derive(Clone)]
enum Authz {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        token: String,
        refresh_at: Instant,
    },
}

struct AuthState {
    authz: Authz,
    generation: u64,
}

/// A request, rebuilt for each attempt.
pub struct Req {
    /// GET, HEAD, POST, PATCH, PUT.
    pub method: Method,
    /// The registry URL.
    pub url: Url,
    /// Headers besides `Authorization`.
    pub headers: HeaderMap,
    /// The body, if any.
    pub body: Option<Bytes>,
    /// Longest time for the whole request, auth and redirects included.
    pub timeout: Option<Duration>,
}

impl Req {
    /// A request without body or extra headers.
    pub fn new(method: Method, url: Url, timeout: Option<Duration>) -> Req {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            timeout,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: reqwest::header::HeaderName, value: &str) -> Req {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }
}

/// A registry and repository, with the auth state of this process.
pub struct Registry {
    /// The reference this client was made for (its registry and repository).
    pub reference: Reference,
    base: Url,
    client: reqwest::Client,
    runtime: Option<tokio::runtime::Runtime>,
    credentials: Option<(Credentials, String)>,
    /// `pull` or `pull,push`.
    actions: &'static str,
    auth: tokio::sync::Mutex<AuthState>,
    /// The timeout requests get when their caller gives none.
    pub default_timeout: Option<Duration>,
}

impl Registry {
    /// A client for `reference`'s repository, asking for `actions` (`pull`, `pull,push`).
    pub fn new(
        reference: &Reference,
        http: &HttpConfig,
        options: &OciOptions,
        actions: &'static str,
    ) -> Result<Registry, OciError> {
        let scheme = if options.plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", reference.registry)).map_err(|e| {
            OciError::Reference {
                spec: reference.to_string(),
                reason: format!("not a usable registry address: {e}"),
            }
        })?;
        let unusable = |what: &str, e: &dyn std::error::Error| {
            OciError::Unusable(format!("{}: {what}: {}", reference, error_chain(e)))
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(http.connect_timeout)
            .read_timeout(http.read_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .user_agent(concat!("incfs/", env!("CARGO_PKG_VERSION")));
        if http.http1_only {
            builder = builder.http1_only();
        }
        for pem in http
            .extra_root_certs_pem
            .iter()
            .chain(&options.extra_root_certs_pem)
        {
            // A bundle may hold several certificates.
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| unusable("bad CA certificate", &e))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .build()
            .map_err(|e| unusable("cannot build an HTTP client", &e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OciError::Unusable(format!("cannot start the HTTP runtime: {e}")))?;
        Ok(Registry {
            reference: reference.clone(),
            base,
            client,
            runtime: Some(runtime),
            credentials: options
                .credentials
                .clone()
                .map(|c| (c, "the caller".to_string()))
                .or_else(|| find_credentials(&reference.registry)),
            actions,
            auth: tokio::sync::Mutex::new(AuthState {
                authz: Authz::Anonymous,
                generation: 0,
            }),
            default_timeout: http.request_timeout,
        })
    }

    /// `/v2/<repo>/<tail>` on the registry.
    pub fn url(&self, tail: &str) -> Url {
        // The repository and tail are checked names and digests: the join cannot fail.
        self.base
            .join(&format!("v2/{}/{tail}", self.reference.repository))
            .unwrap_or_else(|_| self.base.clone())
    }

    /// A URL the registry gave (an upload `Location`), relative to it.
    pub fn join(&self, location: &str) -> Result<Url, OciError> {
        self.base.join(location).map_err(|e| OciError::Status {
            what: self.reference.to_string(),
            status: 0,
            detail: format!("the registry gave an unusable Location {location:?}: {e}"),
        })
    }

    /// Runs `fut` to completion on this client's runtime.
    pub fn block_on<T, E: From<OciError>>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(OciError::Unusable(format!(
                "{}: the registry client was called from inside an async runtime",
                self.reference
            ))
            .into());
        }
        match &self.runtime {
            Some(rt) => rt.block_on(fut),
            None => Err(OciError::Unusable("the HTTP runtime is shut down".into()).into()),
        }
    }

    /// A network error of a request for `what` (which names the URL: the error's own copy,
    /// which may be a pre-signed storage URL, is dropped).
    pub fn net_error(&self, what: &str, e: reqwest::Error) -> OciError {
        let e = e.without_url();
        let kind = if e.is_timeout() {
            io::ErrorKind::TimedOut
        } else {
            io::ErrorKind::Other
        };
        OciError::Net {
            what: what.to_string(),
            error: io::Error::new(kind, error_chain(&e)),
        }
    }

    /// Sends `req` with auth, answering `401` challenges and following redirects.
    pub async fn send(&self, req: &Req) -> Result<reqwest::Response, OciError> {
        let what = req.url.to_string();
        let deadline = req
            .timeout
            .or(self.default_timeout)
            .map(|t| Instant::now() + t);
        let mut challenges = 0;
        loop {
            let (generation, authorization) = self.authorization(deadline).await?;
            let (resp, own) = self
                .send_following(req, authorization.as_deref(), deadline)
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED || !own || challenges == 2 {
                return Ok(resp);
            }
            challenges += 1;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            debug!(url = %what, ?challenge, "the registry asks for auth");
            let Some(challenge) = challenge else {
                return Err(OciError::Auth {
                    what,
                    reason: "401 without a Basic or Bearer challenge".into(),
                });
            };
            self.refresh(generation, Some(challenge), deadline).await?;
        }
    }

    /// The `Authorization` to send now, refreshing a token near its end.
    async fn authorization(
        &self,
        deadline: Option<Instant>,
    ) -> Result<(u64, Option<String>), OciError> {
        for _ in 0..2 {
            let (generation, authz) = {
                let st = self.auth.lock().await;
                (st.generation, st.authz.clone())
            };
            match authz {
                Authz::Anonymous => return Ok((generation, None)),
                Authz::Basic => {
                    return Ok((
                        generation,
                        self.credentials.as_ref().map(|(c, _)| basic_header(c)),
                    ));
                }
                Authz::Bearer {
                    token, refresh_at, ..
                } if Instant::now() < refresh_at => {
                    return Ok((generation, Some(format!("Bearer {token}"))));
                }
                Authz::Bearer { .. } => {
                    debug!(registry = %self.reference.registry, "the token is about to lapse; refreshing it");
                    self.refresh(generation, None, deadline).await?;
                }
            }
        }
        Err(OciError::Auth {
            what: self.reference.to_string(),
            reason: "the token service gives tokens that lapse at once".into(),
        })
    }

    /// Acts on a challenge (or renews the current token when `challenge` is `None`), unless
    /// another thread has done so since `seen` was the generation.
    async fn refresh(
        &self,
        seen: u64,
        challenge: Option<Challenge>,
        deadline: Option<Instant>,
    ) -> Result<(), OciError> {
        let mut st = self.auth.lock().await;
        if st.generation != seen {
            return Ok(());
        }
        let challenge = match (challenge, &st.authz) {
            (Some(c), _) => c,
            (None, Authz::Bearer { realm, service, .. }) => Challenge::Bearer {
                realm: realm.clone(),
                service: service.clone(),
                scope: None,
            },
            (None, _) => return Ok(()),
        };
        match challenge {
            Challenge::Basic => {
                if matches!(st.authz, Authz::Basic) {
                    return Err(self.refused("user name and password"));
                }
                if self.credentials.is_none() {
                    return Err(self.no_credentials());
                }
                st.authz = Authz::Basic;
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let (token, ttl) = self
                    .fetch_token(&realm, service.as_deref(), scope.as_deref(), deadline)
                    .await?;
                let now = Instant::now();
                st.authz = Authz::Bearer {
                    realm,
                    service,
                    token,
                    refresh_at: refresh_at(now, ttl),
                };
            }
        }
        st.generation += 1;
        Ok(())
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        challenge_scope: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<(String, Duration), OciError> {
        let mut url = Url::parse(realm).map_err(|e| OciError::Auth {
            what: self.reference.to_string(),
            reason: format!("the registry's token realm {realm:?} is not a URL: {e}"),
        })?;
        if let Some((_, from)) = &self.credentials
            && url.scheme() != "https"
            && self.base.scheme() == "https"
        {
            return Err(OciError::Auth {
                what: self.reference.to_string(),
                reason: format!(
                    "the registry's token realm {} is not https: the credentials (from \
                     {from}) are not sent in the clear (--plain-http allows it for a test \
                     registry)",
                    redacted(&url)
                ),
            });
        }
        let scope = format!("repository:{}:{}", self.reference.repository, self.actions);
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &scope);
            // The registry may want a scope of its own (another repository, a catalog).
            if let Some(cs) = challenge_scope
                && cs != scope
            {
                q.append_pair("scope", cs);
            }
        }
        trace!(%url, "fetching a registry token");
        let mut b = self.client.get(url.clone());
        if let Some((c, _)) = &self.credentials {
            b = b.basic_auth(&c.user, Some(&c.password));
        }
        let what = format!("the token service {realm}");
        if let Some(t) = remaining(deadline, &what)? {
            b = b.timeout(t);
        }
        let resp = b.send().await.map_err(|e| self.net_error(&what, e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.refused_by(&what, status));
        }
        let resp = check_status(resp, &what).await?;
        let body = super::read_bounded(self, resp, &what, MAX_TOKEN_ANSWER).await?;
        super::auth::parse_token(&body).map_err(|reason| OciError::Auth { what, reason })
    }

    fn no_credentials_hint(&self) -> String {
        format!(
            "none were found for {}: set {} and {}, or log in with `docker login {0}` \
             (~/.docker/config.json) or `podman login` ($REGISTRY_AUTH_FILE)",
            self.reference.registry,
            super::auth::USER_ENV,
            super::auth::PASSWORD_ENV
        )
    }

    fn no_credentials(&self) -> OciError {
        OciError::Auth {
            what: self.reference.to_string(),
            reason: format!(
                "the registry asks for credentials and {}",
                self.no_credentials_hint()
            ),
        }
    }

    fn refused(&self, what: &str) -> OciError {
        let from = self
            .credentials
            .as_ref()
            .map_or("no credentials", |(_, w)| w.as_str());
        OciError::Auth {
            what: self.reference.to_string(),
            reason: format!("the registry refused the {what} (from {from})"),
        }
    }

    fn refused_by(&self, what: &str, status: StatusCode) -> OciError {
        match &self.credentials {
            None => OciError::Auth {
                what: what.to_string(),
                reason: format!(
                    "{status} for anonymous access; credentials: {}",
                    self.no_credentials_hint()
                ),
            },
            Some((c, from)) => OciError::Auth {
                what: what.to_string(),
                reason: format!(
                    "{status}: the credentials of user {:?} (from {from}) were refused for {} \
                     access to {}",
                    c.user, self.actions, self.reference.repository
                ),
            },
        }
    }

    /// Sends once, following redirects; says whether the final answer came from the
    /// registry's own origin.
    async fn send_following(
        &self,
        req: &Req,
        authorization: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<(reqwest::Response, bool), OciError> {
        let mut url = req.url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let own = url.origin() == self.base.origin();
            // A URL elsewhere (blob storage) may be pre-signed: its query stays out of
            // messages and logs.
            let name = if own { url.to_string() } else { redacted(&url) };
            let mut b = self
                .client
                .request(req.method.clone(), url.clone())
                .headers(req.headers.clone());
            if own && let Some(a) = authorization {
                b = b.header(AUTHORIZATION, a);
            }
            if let Some(body) = &req.body {
                b = b.body(body.clone());
            }
            if let Some(t) = remaining(deadline, &name)? {
                b = b.timeout(t);
            }
            let resp = b.send().await.map_err(|e| self.net_error(&name, e))?;
            let follow = resp.status().is_redirection()
                && resp.status() != StatusCode::NOT_MODIFIED
                && matches!(req.method, Method::GET | Method::HEAD);
            if !follow {
                return Ok((resp, own));
            }
            let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
                return Ok((resp, own));
            };
            let next = url.join(loc).map_err(|e| OciError::Status {
                what: name.clone(),
                status: resp.status().as_u16(),
                detail: format!(
                    "redirect to an unusable Location {:?}: {e}",
                    loc.split_once('?').map_or(loc, |(a, _)| a)
                ),
            })?;
            debug!(from = %name, to = %next.origin().ascii_serialization(), "following a redirect");
            url = next;
        }
        Err(OciError::Status {
            what: req.url.to_string(),
            status: 0,
            detail: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// When a token issued at `now` for `ttl` is renewed: [`TOKEN_MARGIN`] before its end, or at
/// three quarters of a shorter lifetime; a lifetime too long for the clock is renewed after
/// [`super::auth::MAX_TOKEN_LIFETIME`].
fn refresh_at(now: Instant, ttl: Duration) -> Instant {
    let ttl = ttl.min(super::auth::MAX_TOKEN_LIFETIME);
    let good_for = ttl.saturating_sub(TOKEN_MARGIN.min(ttl / 4));
    now.checked_add(good_for).unwrap_or(now)
}

/// Time left before `deadline` for a request to `what`; an error once it has passed.
fn remaining(deadline: Option<Instant>, what: &str) -> Result<Option<Duration>, OciError> {
    let Some(d) = deadline else {
        return Ok(None);
    };
    match d.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(Some(left)),
        _ => Err(OciError::Net {
            what: what.to_string(),
            error: io::Error::new(io::ErrorKind::TimedOut, "request timed out"),
        }),
    }
}

/// `resp` if its status is a success, else the error it means (with the registry's error
/// message from the body).
pub async fn check_status(
    resp: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response, OciError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // The first bytes only: a message is short, and a body may be endless.
    let mut resp = resp;
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
    let detail = registry_message(&text).unwrap_or_else(|| text.trim().to_string());
    Err(match status.as_u16() {
        401 | 403 => OciError::Auth {
            what: what.to_string(),
            reason: format!("{status}: {detail}"),
        },
        404 => OciError::NotFound {
            what: what.to_string(),
            detail,
        },
        s => OciError::Status {
            what: what.to_string(),
            status: s,
            detail,
        },
    })
}

/// The messages of a distribution error body: `{"errors":[{"code","message"}]}`.
fn registry_message(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let errors = v.get("errors")?.as_array()?;
    let msgs: Vec<String> = errors
        .iter()
        .map(|e| {
            format!(
                "{} ({})",
                e.get("message").and_then(|m| m.as_str()).unwrap_or(""),
                e.get("code").and_then(|c| c.as_str()).unwrap_or("")
            )
        })
        .collect();
    (!msgs.is_empty()).then(|| msgs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::{Duration, Instant, TOKEN_MARGIN, refresh_at, registry_message};

    #[test]
    fn credentials_never_go_to_a_plain_http_realm_of_an_https_registry() {
        let reference = super::Reference::parse("oci://127.0.0.1:9/team/app:v1").unwrap();
        let options = |plain_http| super::OciOptions {
            plain_http,
            credentials: Some(super::Credentials {
                user: "u".into(),
                password: "p".into(),
            }),
            ..super::OciOptions::default()
        };
        let token = |plain_http| {
            let reg = super::Registry::new(
                &reference,
                &super::HttpConfig::default(),
                &options(plain_http),
                "pull",
            )
            .unwrap();
            reg.block_on(reg.fetch_token("http://127.0.0.1:1/token", None, None, None))
                .unwrap_err()
        };
        let e = token(false);
        assert!(
            matches!(e, super::OciError::Auth { .. }) && e.to_string().contains("not https"),
            "{e}"
        );
        // With --plain-http the realm is asked (nothing listens there: a network error).
        assert!(matches!(token(true), super::OciError::Net { .. }));
    }

    #[test]
    fn token_renewal_times_never_overflow() {
        let now = Instant::now();
        let day = super::super::auth::MAX_TOKEN_LIFETIME;
        assert_eq!(
            refresh_at(now, Duration::from_secs(u64::MAX)),
            now + day - TOKEN_MARGIN
        );
        assert_eq!(refresh_at(now, Duration::MAX), now + day - TOKEN_MARGIN);
        assert_eq!(
            refresh_at(now, Duration::from_secs(60)),
            now + Duration::from_secs(55)
        );
        assert_eq!(
            refresh_at(now, Duration::from_secs(4)),
            now + Duration::from_secs(3)
        );
    }

    #[test]
    fn registry_error_bodies() {
        assert_eq!(
            registry_message(
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            )
            .as_deref(),
            Some("manifest unknown (MANIFEST_UNKNOWN)")
        );
        assert_eq!(registry_message("<html>"), None);
    }
}
