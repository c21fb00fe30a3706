//! The registry protocol against small loopback servers that stand in for a registry, its
//! token service and its blob storage: a redirect to storage on another origin (as
//! distribution answers with an S3 or GCS backend) keeps the range and drops the registry's
//! `Authorization` (and storage that answers several ranges with the whole blob is read one
//! range at a time); a bearer token is renewed before the lifetime its issuer gave ends.
//! (`cli/tests/oci_registry.rs` runs the real registry.)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use incfs_fs::source::oci::{self, Credentials, OciOptions};
use incfs_fs::source::{self, RequestKind};

type Headers = BTreeMap<String, String>;
type Log = Arc<Mutex<Vec<(String, Headers)>>>;

/// Serves `handler`'s answers (status line, headers, body) on a loopback port, one request
/// per connection; logs each request's target and headers.
fn serve(
    handler: impl Fn(&str, &Headers) -> (String, Vec<(String, String)>, Vec<u8>) + Send + 'static,
) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut headers = Headers::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push((target.clone(), headers.clone()));
            let (status, extra, body) = handler(&target, &headers);
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    (addr, log)
}

/// Both tests set the same process-wide options (they may run at once).
fn configure() {
    oci::configure(OciOptions {
        plain_http: true,
        credentials: Some(Credentials {
            user: "u".into(),
            password: "p".into(),
        }),
        ..OciOptions::default()
    });
}

/// The manifest of an artifact whose image is `blob`, without a root digest annotation (these
/// blobs are not images: nothing to pin).
fn manifest_for(blob: &[u8]) -> Vec<u8> {
    let mut m = pinned_manifest(blob, &"00".repeat(32));
    m.annotations.clear();
    m.to_json()
}

/// The manifest of an artifact whose image is `blob`, annotated with root digest `root`.
fn pinned_manifest(blob: &[u8], root: &str) -> oci::manifest::Manifest {
    oci::manifest::Manifest::new(
        &oci::Layers {
            image: oci::Descriptor {
                media_type: oci::manifest::IMAGE_MEDIA_TYPE.into(),
                digest: oci::manifest::sha256_digest(blob),
                size: blob.len() as u64,
                annotations: BTreeMap::new(),
            },
            plan: None,
            signature: None,
            bulk: None,
        },
        root,
    )
}

/// The bytes `bytes=A-B` of `blob`, as a 206 answer; several ranges get the whole blob with
/// 200, as S3 answers them.
fn range_answer(blob: &[u8], h: &Headers) -> (String, Vec<(String, String)>, Vec<u8>) {
    let range = h.get("range").cloned().unwrap_or_default();
    if range.contains(',') {
        return ("200 OK".into(), Vec::new(), blob.to_vec());
    }
    let (a, b) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or((0, blob.len() - 1));
    (
        "206 Partial Content".into(),
        vec![(
            "Content-Range".into(),
            format!("bytes {a}-{b}/{}", blob.len()),
        )],
        blob[a..=b].to_vec(),
    )
}

#[test]
fn a_bearer_token_is_renewed_before_its_lifetime_ends() {
    let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 199) as u8).collect();
    let (tokens, token_log) = serve(|target, h| {
        assert_eq!(
            h.get("authorization").map(String::as_str),
            Some("Basic dTpw")
        );
        assert!(
            target.contains("service=reg")
                && target.contains("scope=repository%3Ateam%2Fapp%3Apull"),
            "{target}"
        );
        (
            "200 OK".into(),
            vec![("Content-Type".into(), "application/json".into())],
            br#"{"token":"tok","expires_in":1}"#.to_vec(),
        )
    });
    let manifest = manifest_for(&blob);
    let realm = format!("http://{tokens}/token");
    let (registry, registry_log) = serve(move |target, h| {
        if h.get("authorization").map(String::as_str) != Some("Bearer tok") {
            return (
                "401 Unauthorized".into(),
                vec![(
                    "WWW-Authenticate".into(),
                    format!(
                        "Bearer realm=\"{realm}\",service=\"reg\",scope=\"repository:team/app:pull\""
                    ),
                )],
                Vec::new(),
            );
        }
        if target.contains("/manifests/") {
            return ("200 OK".into(), Vec::new(), manifest.clone());
        }
        range_answer(&blob, h)
    });
    configure();
    let src = source::open(&format!("oci://{registry}/team/app:v1")).unwrap();
    assert_eq!(
        src.read_range(0, 10, RequestKind::Demand).unwrap().len(),
        10
    );
    assert_eq!(token_log.lock().unwrap().len(), 1);
    // The token was given for 1 s: renewed at 3/4 of it, before the next request.
    std::thread::sleep(std::time::Duration::from_millis(900));
    assert_eq!(
        src.read_range(100, 10, RequestKind::Demand).unwrap().len(),
        10
    );
    assert_eq!(token_log.lock().unwrap().len(), 2, "the token was renewed");
    let refused = registry_log
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, h)| t.contains("/blobs/") && h.get("authorization").is_none())
        .count();
    assert_eq!(refused, 0, "no blob read went out without the token");
}

#[test]
fn a_redirect_to_storage_keeps_the_range_and_drops_the_authorization() {
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();

    let stored = blob.clone();
    let (storage, storage_log) = serve(move |_, h| range_answer(&stored, h));
    let manifest = manifest_for(&blob);
    let want_auth = "Basic dTpw"; // base64("u:p")
    let storage_url = format!("http://{storage}/bucket/blob?X-Amz-Signature=abc");
    let (registry, registry_log) = serve(move |target, h| {
        if h.get("authorization").map(String::as_str) != Some(want_auth) {
            return (
                "401 Unauthorized".into(),
                vec![("WWW-Authenticate".into(), "Basic realm=\"test\"".into())],
                Vec::new(),
            );
        }
        if target.contains("/manifests/") {
            return (
                "200 OK".into(),
                vec![(
                    "Content-Type".into(),
                    oci::manifest::MANIFEST_MEDIA_TYPE.into(),
                )],
                manifest.clone(),
            );
        }
        (
            "307 Temporary Redirect".into(),
            vec![("Location".into(), storage_url.clone())],
            Vec::new(),
        )
    });

    configure();
    let spec = format!("oci://{registry}/team/app:v1");
    let src = source::open(&spec).unwrap();
    assert_eq!(src.total_len().unwrap(), blob.len() as u64);
    assert_eq!(src.describe(), spec);
    let got = src.read_range(1000, 5000, RequestKind::Demand).unwrap();
    assert!(got == blob[1000..6000], "wrong bytes through the redirect");

    let storage_seen = storage_log.lock().unwrap().clone();
    assert_eq!(storage_seen.len(), 1);
    let (target, headers) = &storage_seen[0];
    assert_eq!(target, "/bucket/blob?X-Amz-Signature=abc");
    assert_eq!(
        headers.get("range").map(String::as_str),
        Some("bytes=1000-5999")
    );
    assert!(
        !headers.contains_key("authorization"),
        "the registry's credentials went to storage: {headers:?}"
    );
    let registry_seen = registry_log.lock().unwrap().clone();
    let blob_reads: Vec<_> = registry_seen
        .iter()
        .filter(|(t, _)| t.contains("/blobs/"))
        .collect();
    assert_eq!(blob_reads.len(), 1, "{registry_seen:?}");
    assert_eq!(
        blob_reads[0].1.get("authorization").map(String::as_str),
        Some(want_auth)
    );

    // Several ranges in one request: storage answers with the whole blob (as S3 does), so
    // they are read one by one, and asked one at a time from then on.
    assert!(src.ranges_per_request() > 1);
    let ranges = [(10_000u64, 100u64), (50_000, 200)];
    let mut got = vec![Vec::new(); ranges.len()];
    src.read_ranges_within(
        &ranges,
        RequestKind::Prefetch,
        std::time::Duration::from_secs(10),
        &mut |i, piece| {
            got[i].extend_from_slice(piece);
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert!(got[0] == blob[10_000..10_100] && got[1] == blob[50_000..50_200]);
    assert_eq!(src.ranges_per_request(), 1);
    let seen: Vec<String> = storage_log.lock().unwrap()[1..]
        .iter()
        .filter_map(|(_, h)| h.get("range").cloned())
        .collect();
    assert_eq!(
        seen,
        [
            "bytes=10000-10099,50000-50199",
            "bytes=10000-10099",
            "bytes=50000-50199"
        ]
    );

    // A bad reference is refused, naming what is wrong.
    let e = source::open(&format!("oci://{registry}/Team/app:v1"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("repository component"), "{e}");
}

#[test]
fn a_token_the_registry_keeps_refusing_fails_the_read_at_once() {
    let blob = vec![7u8; 1000];
    let (tokens, token_log) = serve(|_, _| {
        (
            "200 OK".into(),
            Vec::new(),
            br#"{"token":"tok","expires_in":300}"#.to_vec(),
        )
    });
    let manifest = manifest_for(&blob);
    let realm = format!("http://{tokens}/token");
    let (registry, registry_log) = serve(move |target, h| {
        let challenge = (
            "401 Unauthorized".into(),
            vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"{realm}\",service=\"reg\""),
            )],
            Vec::new(),
        );
        match (target.contains("/manifests/"), h.get("authorization")) {
            (true, Some(_)) => ("200 OK".into(), Vec::new(), manifest.clone()),
            // Blob reads: the token is never good enough (revoked, wrong scope).
            _ => challenge,
        }
    });
    configure();
    let src = source::open(&format!("oci://{registry}/team/app:v1")).unwrap();
    let started = std::time::Instant::now();
    let e = src.read_range(0, 10, RequestKind::Demand).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("401"), "{e}");
    let blob_reads = registry_log
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.contains("/blobs/"))
        .count();
    // The first try and two renewals, then the error.
    assert_eq!(blob_reads, 3);
    assert_eq!(
        token_log.lock().unwrap().len(),
        3,
        "one token at resolve, two renewals"
    );
}

#[test]
fn readers_on_many_threads_share_one_renewal_when_the_token_lapses() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    let blob: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 241) as u8).collect();
    // The token service numbers its tokens; the registry takes only the newest, for its
    // first USES requests (and the service claims 300 s, so only a 401 tells the client):
    // tokens lapse by count, not by time, so a loaded machine sees the same lapses.
    const USES: u64 = 25;
    let issued: Arc<Mutex<(u64, u64)>> = Arc::new(Mutex::new((0, 0)));
    let service = Arc::clone(&issued);
    let (tokens, token_log) = serve(move |_, _| {
        let mut s = service.lock().unwrap();
        *s = (s.0 + 1, 0);
        (
            "200 OK".into(),
            Vec::new(),
            format!("{{\"token\":\"tok{}\",\"expires_in\":300}}", s.0).into_bytes(),
        )
    });
    let manifest = manifest_for(&blob);
    let realm = format!("http://{tokens}/token");
    // Every token the registry refused (and "" for none), and how many requests it refused.
    let refused_tokens: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let refusals = Arc::new(AtomicU64::new(0));
    let (refused, refused_set) = (Arc::clone(&refusals), Arc::clone(&refused_tokens));
    let served = blob.clone();
    let (registry, _) = serve(move |target, h| {
        let good = {
            let mut st = issued.lock().unwrap();
            let (n, uses) = *st;
            let good = h.get("authorization").map(String::as_str)
                == Some(&format!("Bearer tok{n}"))
                && uses < USES;
            if good {
                st.1 += 1;
            }
            good
        };
        if !good {
            refused.fetch_add(1, Ordering::SeqCst);
            refused_set
                .lock()
                .unwrap()
                .insert(h.get("authorization").cloned().unwrap_or_default());
            return (
                "401 Unauthorized".into(),
                vec![(
                    "WWW-Authenticate".into(),
                    format!("Bearer realm=\"{realm}\",service=\"reg\""),
                )],
                Vec::new(),
            );
        }
        if target.contains("/manifests/") {
            return ("200 OK".into(), Vec::new(), manifest.clone());
        }
        range_answer(&served, h)
    });
    configure();
    let src = source::open(&format!("oci://{registry}/team/app:v2")).unwrap();
    let threads = 8;
    let reads = 15;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (src, blob) = (&src, &blob);
            s.spawn(move || {
                for k in 0..reads {
                    let off = ((t * 977 + k * 2_311) % 49_000) as u64;
                    let got = src.read_range(off, 1000, RequestKind::Demand).unwrap();
                    assert!(got[..] == blob[off as usize..off as usize + 1000]);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    let tokens = token_log.lock().unwrap().len();
    let lapsed = refused_tokens.lock().unwrap().len();
    let refusals = refusals.load(Ordering::SeqCst);
    eprintln!("{tokens} tokens fetched; {lapsed} tokens refused, in {refusals} requests");
    // The resolve's first request (no token), then a lapse every USES requests.
    assert!(lapsed >= 4, "the token lapsed too rarely: {lapsed}");
    // One renewal per refused token, however many readers it refused (without sharing,
    // every refused request would fetch a token of its own).
    assert_eq!(tokens, lapsed, "{refusals} refused requests");
}

/// A registry serving an image whose digest-verified manifest pins another root digest: the
/// image's header cannot be read, and the error names the reference and both digests.
#[test]
fn a_manifest_pinning_another_root_digest_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tree")).unwrap();
    std::fs::write(dir.path().join("tree/a.txt"), b"hello").unwrap();
    let img = dir.path().join("app.img");
    let opts = incfs_fs::format::PackOptions::default();
    incfs_fs::format::pack_dir(&dir.path().join("tree"), &img, &opts, &()).unwrap();
    let blob = std::fs::read(&img).unwrap();
    let real = incfs_fs::format::Image::open_path(&img, None)
        .unwrap()
        .root_digest();

    let other = "ab".repeat(32);
    let wrong = pinned_manifest(&blob, &other).to_json();
    let right = pinned_manifest(&blob, &real.to_hex()).to_json();
    let wrong_digest = oci::manifest::sha256_digest(&wrong);
    let stored = blob.clone();
    let (registry, _) = serve(move |target, h| {
        if target.contains("/manifests/") {
            let m = if target.contains("right") {
                &right
            } else {
                &wrong
            };
            return ("200 OK".into(), Vec::new(), m.clone());
        }
        range_answer(&stored, h)
    });

    configure();
    let spec = format!("oci://{registry}/team/app@{wrong_digest}");
    let src = source::open(&spec).unwrap();
    let e = incfs_fs::format::Image::open(source::MetaReader(&*src), None)
        .err()
        .expect("an image whose manifest pins another root digest opened")
        .to_string();
    assert!(
        e.contains(&spec) && e.contains(&other) && e.contains(&real.to_hex()),
        "{e}"
    );
    // Nor can any read cut the header short to dodge the check.
    let e = src
        .read_range(8, 100, RequestKind::Demand)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image header"), "{e}");

    // The same image under a manifest pinning its own root digest opens.
    let src = source::open(&format!("oci://{registry}/team/app:right")).unwrap();
    let opened = incfs_fs::format::Image::open(source::MetaReader(&*src), None).unwrap();
    assert_eq!(opened.root_digest(), real);

    // A daemon handed the pinned reference mounts that manifest under the tag it was given,
    // although the tag now names another one.
    let tag = format!("oci://{registry}/team/app:right-now");
    let held = oci::OciArtifact::resolve_as(&tag, &spec, &source::HttpConfig::default()).unwrap();
    assert_eq!(held.root_digest().map(|d| d.to_hex()), Some(other.clone()));
    let src = source::open(&tag).unwrap();
    assert_eq!(src.describe(), tag);
    let e = src
        .read_range(0, 200, RequestKind::Demand)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&other), "{e}");
    let elsewhere = format!("oci://{registry}/team/other@{wrong_digest}");
    let e = oci::OciArtifact::resolve_as(&tag, &elsewhere, &source::HttpConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("pinned to a digest"), "{e}");
}

/// A redirect to storage that cannot be reached: the error names the storage URL without its
/// query (a pre-signed URL's signature is a credential).
#[test]
fn a_pre_signed_storage_url_stays_out_of_errors() {
    let blob = vec![7u8; 1000];
    let manifest = manifest_for(&blob);
    // A port nothing listens on: bind one, then close it.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let storage_url = format!("http://{dead}/bucket/blob?X-Amz-Signature=secret");
    let (registry, _) = serve(move |target, _| {
        if target.contains("/manifests/") {
            return ("200 OK".into(), Vec::new(), manifest.clone());
        }
        (
            "307 Temporary Redirect".into(),
            vec![("Location".into(), storage_url.clone())],
            Vec::new(),
        )
    });
    configure();
    let src = source::open(&format!("oci://{registry}/team/app:presigned")).unwrap();
    let e = src
        .read_range(200, 100, RequestKind::Demand)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("http://{dead}/bucket/blob?%E2%80%A6")) && !e.contains("secret"),
        "{e}"
    );
}

/// A token service whose answer never ends (here: 1 MiB) fails the open with a clear error
/// instead of being read whole.
#[test]
fn an_oversized_token_answer_is_refused() {
    let (tokens, _) = serve(|_, _| ("200 OK".into(), Vec::new(), vec![b' '; 1 << 20]));
    let realm = format!("http://{tokens}/token");
    let (registry, _) = serve(move |_, _| {
        (
            "401 Unauthorized".into(),
            vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"{realm}\",service=\"reg\""),
            )],
            Vec::new(),
        )
    });
    configure();
    let e = source::open(&format!("oci://{registry}/team/app:big-token"))
        .err()
        .expect("an endless token answer was taken")
        .to_string();
    assert!(
        e.contains("token service") && e.contains("65536 bytes"),
        "{e}"
    );
}
