//! `incfs push`, `run --image oci://…` and `pull` against a real registry: Debian's
//! `docker-registry` (distribution 2.8, filesystem storage in a tempdir, a free loopback
//! port), started by each test with the auth it tests: htpasswd basic auth, token auth with
//! a token issuer this test runs (short-lived tokens, so they lapse mid-start), and TLS with
//! a CA the test makes.
//!
//! Requests are counted from the registry's access log (one line per request) and, for the
//! plain HTTP baseline, by `incfs serve`.

mod common;

use common::{incfs, ok};

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;
use incfs_fs::serve::{ServeConfig, Server};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

/// A running `docker-registry serve`; killed (and reaped) on drop.
struct Registry {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Registry {
    /// Starts a registry on a free loopback port with the config lines `extra` (auth, tls)
    /// added under the top level and `http_extra` under `http:`.
    fn start(dir: &Path, extra: &str, http_extra: &str) -> Registry {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n{http_extra}{extra}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = fs::File::create(&log).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            // A registry that exited (a bad config, the port taken) fails the test at once.
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited ({status}) before listening on {addr}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "docker-registry did not listen on {addr}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, addr, log }
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("oci://{}/{repo_tag}", self.addr)
    }

    /// The access log's request lines (`"GET /v2/… HTTP/1.1" STATUS`).
    fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let start = l.find("\"")?;
                let rest = &l[start + 1..];
                let (req, after) = rest.split_once("\" ")?;
                req.contains(" /v2/")
                    .then(|| format!("{req} {}", after.split_whitespace().next().unwrap_or("")))
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 12 files of 512 KiB packed with 64 KiB chunks; a program that, after `pause`, reads a
/// 4 KiB block of each (with `gap` seconds between reads) and prints them; and a plan for
/// exactly those reads (IMG.plan.json). Returns (image, program, expected output).
fn workload(dir: &Path, pause: &str, gap: &str) -> (PathBuf, String, Vec<u8>) {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..12u64 {
        fs::write(tree.join(format!("f{i:02}")), noise(512 << 10, i + 1)).unwrap();
    }
    let mut script = format!("sleep {pause}\n");
    let mut log = String::new();
    for i in 0..12u64 {
        let block = (i * 37) % 128;
        script.push_str(&format!(
            "dd if=\"$1/f{i:02}\" bs=4096 skip={block} count=1 status=none\nsleep {gap}\n"
        ));
        log.push_str(&format!(
            "{{\"ns\":{},\"path\":\"f{i:02}\",\"offset\":{},\"len\":4096,\"result\":\"miss\"}}\n",
            i + 1,
            block * 4096
        ));
    }
    let program = dir.join("program.sh");
    fs::write(&program, script).unwrap();
    let img = dir.join("app.img");
    ok(incfs()
        .args(["pack", "--chunk-size", "64K", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    let read_log = dir.join("read-log.ndjson");
    fs::write(&read_log, log).unwrap();
    ok(incfs()
        .arg("plan")
        .arg(&read_log)
        .arg("--image")
        .arg(&img)
        .arg("-o")
        .arg(dir.join("app.img.plan.json"))
        .output()
        .unwrap());
    let want = Command::new("sh")
        .arg(&program)
        .arg(&tree)
        .output()
        .unwrap()
        .stdout;
    assert_eq!(want.len(), 12 * 4096);
    (img, program.to_string_lossy().into_owned(), want)
}

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A Docker config with `auths.<addr>.auth` = base64(user:password).
fn docker_config(dir: &Path, addr: &str, user: &str, password: &str) -> PathBuf {
    let path = dir.join("auth.json");
    fs::write(
        &path,
        format!(
            "{{\"auths\":{{\"http://{addr}\":{{\"auth\":\"{}\"}}}}}}",
            STANDARD.encode(format!("{user}:{password}"))
        ),
    )
    .unwrap();
    path
}

#[test]
fn basic_auth_push_run_and_pull_move_the_same_bytes_as_plain_http() {
    if !require(
        "basic_auth_push_run_and_pull_move_the_same_bytes_as_plain_http",
        &[Need::Root, Need::Fuse, Need::DockerRegistry],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args([USER, PASSWORD])
        .output()
        .unwrap();
    assert!(out.status.success(), "htpasswd: {}", stderr_of(&out));
    let reg = Registry::start(
        tmp.path(),
        &format!(
            "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            htpasswd.display()
        ),
        "",
    );
    let (img, program, want) = workload(tmp.path(), "2", "0");
    let reference = reg.reference("team/app:v1");

    // A push to a digest the manifest does not have is refused before any upload.
    let out = incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(reg.reference(&format!("team/app@sha256:{}", "0".repeat(64))))
        .env("INCFS_REGISTRY_USER", USER)
        .env("INCFS_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("push it to a tag"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        !reg.requests().iter().any(|r| r.contains("/blobs/")),
        "{:?}",
        reg.requests()
    );

    // No credentials: refused, saying where credentials come from.
    let out = incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(&reference)
        .env_remove("INCFS_REGISTRY_USER")
        .env_remove("INCFS_REGISTRY_PASSWORD")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DOCKER_CONFIG")
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("INCFS_REGISTRY_USER"),
        "{}",
        stderr_of(&out)
    );
    // Wrong password: refused.
    let out = incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(&reference)
        .env("INCFS_REGISTRY_USER", USER)
        .env("INCFS_REGISTRY_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("refused"), "{}", stderr_of(&out));

    // Push with credentials from the environment, in 200 KiB chunks (the image is ~6 MiB).
    let out = ok(incfs()
        .args(["push", "--plain-http", "--chunk-size", "200K"])
        .arg(&img)
        .arg(&reference)
        .env("INCFS_REGISTRY_USER", USER)
        .env("INCFS_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap());
    let pinned = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(pinned.contains("@sha256:"), "{pinned}");
    assert!(
        reg.requests().iter().any(|r| r.starts_with("PATCH ")),
        "a chunked upload"
    );

    // The baseline: the same planned start over plain HTTP.
    let server = Server::start(ServeConfig::new(&img)).unwrap();
    let s_http = tmp.path().join("http.json");
    let out = ok(incfs()
        .args(["run", "--no-fill", "--miss-amplify", "0", "--image"])
        .arg(server.url("app.img"))
        .arg("--prefetch")
        .arg(tmp.path().join("app.img.plan.json"))
        .arg("--stats-json")
        .arg(&s_http)
        .args(["--", "sh", &program, "{mnt}"])
        .output()
        .unwrap());
    assert!(out.stdout == want, "the HTTP run read wrong bytes");
    let http_requests = server.stats().requests;

    // Through the registry, credentials from a Docker-style auth file; the plan comes from
    // the artifact.
    let auth = docker_config(tmp.path(), &reg.addr, USER, PASSWORD);
    let before = reg.requests().len();
    let s_oci = tmp.path().join("oci.json");
    let out = ok(incfs()
        .args(["run", "--plain-http", "--no-fill", "--miss-amplify", "0"])
        .arg("--image")
        .arg(&reference)
        .arg("--stats-json")
        .arg(&s_oci)
        .args(["--", "sh", &program, "{mnt}"])
        .env_remove("INCFS_REGISTRY_USER")
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap());
    assert!(out.stdout == want, "the registry run read wrong bytes");
    let oci_requests = (reg.requests().len() - before) as u64;
    let (h, o) = (stats(&s_http), stats(&s_oci));
    eprintln!(
        "planned start: {oci_requests} registry requests, {http_requests} over HTTP; bytes \
         fetched {} vs {}; registry requests {:?}",
        o["bytes_fetched"],
        h["bytes_fetched"],
        &reg.requests()[before..]
    );
    assert!(
        o["prefetch_hits"].as_u64().unwrap() > 0,
        "the pushed plan was used"
    );
    assert_eq!(
        o["bytes_fetched"], h["bytes_fetched"],
        "the same chunk bytes"
    );
    assert_eq!(o["requests"], h["requests"], "the same range requests");
    assert!(
        oci_requests <= http_requests + 4,
        "{oci_requests} registry requests vs {http_requests} over HTTP: {:?}",
        &reg.requests()[before..]
    );

    // --no-plan: nothing prefetched.
    let s_np = tmp.path().join("noplan.json");
    let out = ok(incfs()
        .args(["run", "--plain-http", "--no-plan", "--no-fill", "--image"])
        .arg(&pinned)
        .arg("--stats-json")
        .arg(&s_np)
        .args(["--", "sh", &program, "{mnt}"])
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap());
    assert!(out.stdout == want);
    assert_eq!(stats(&s_np)["prefetch_hits"].as_u64().unwrap(), 0);

    // A whole copy, with its plan beside it; a signature of an earlier pull is removed (this
    // artifact has none).
    let copy = tmp.path().join("copy.img");
    fs::write(tmp.path().join("copy.img.sig"), b"stale").unwrap();
    ok(incfs()
        .args(["pull", "--plain-http", "-o"])
        .arg(&copy)
        .arg(&pinned)
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap());
    assert!(fs::read(&copy).unwrap() == fs::read(&img).unwrap());
    assert_eq!(
        fs::read(tmp.path().join("copy.img.plan.json")).unwrap(),
        fs::read(tmp.path().join("app.img.plan.json")).unwrap()
    );
    assert!(!tmp.path().join("copy.img.sig").exists());

    // An output in a missing directory is a file error naming it.
    let out = incfs()
        .args(["pull", "--plain-http", "-o"])
        .arg(tmp.path().join("no/such/dir/x.img"))
        .arg(&pinned)
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("no/such/dir/x.img"),
        "{}",
        stderr_of(&out)
    );

    // An unknown tag is a clear error.
    let out = incfs()
        .args(["pull", "--plain-http", "-o"])
        .arg(tmp.path().join("none.img"))
        .arg(reg.reference("team/app:nope"))
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("not found"), "{}", stderr_of(&out));
}

/// A token issuer for distribution's `auth: token`: checks basic credentials, answers
/// `{"token", "expires_in"}` with an ES256 JWT whose `x5c` is the test's certificate.
/// Tokens are good for `lifetime` (distribution allows 60 s of clock skew past `exp`, so
/// `exp` is set that much earlier) but claim 300 s, so the client learns of their end only
/// from the registry's 401.
struct Issuer {
    addr: String,
    issued: Arc<AtomicU64>,
}

impl Issuer {
    fn start(dir: &Path, lifetime: u64) -> Issuer {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "issuer.key",
            ],
        );
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "issuer.key",
                "-outform",
                "DER",
                "-out",
                "issuer.p8",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "issuer.key",
                "-subj",
                "/CN=incfs-test-issuer",
                "-days",
                "2",
                "-out",
                "issuer.pem",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "issuer.pem",
                "-outform",
                "DER",
                "-out",
                "issuer.der",
            ],
        );
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &fs::read(dir.join("issuer.p8")).unwrap(),
            &rng,
        )
        .unwrap();
        let x5c = STANDARD.encode(fs::read(dir.join("issuer.der")).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let issued = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&issued);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut authorized = false;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    let want = format!("Basic {}", STANDARD.encode(format!("{USER}:{PASSWORD}")));
                    if h.to_ascii_lowercase().starts_with("authorization:")
                        && h.trim_end().ends_with(&want)
                    {
                        authorized = true;
                    }
                }
                let target = line.split_whitespace().nth(1).unwrap_or("");
                let scopes: Vec<String> = target
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .map(|s| {
                        s.replace("%3A", ":")
                            .replace("%2F", "/")
                            .replace("%2C", ",")
                    })
                    .collect();
                let reply = if !authorized {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                } else {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let access: Vec<String> = scopes
                        .iter()
                        .filter_map(|s| {
                            let mut p = s.splitn(3, ':');
                            let (t, n, a) = (p.next()?, p.next()?, p.next()?);
                            let actions: Vec<String> =
                                a.split(',').map(|x| format!("\"{x}\"")).collect();
                            Some(format!(
                                "{{\"type\":\"{t}\",\"name\":\"{n}\",\"actions\":[{}]}}",
                                actions.join(",")
                            ))
                        })
                        .collect();
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let header =
                        format!("{{\"typ\":\"JWT\",\"alg\":\"ES256\",\"x5c\":[\"{x5c}\"]}}");
                    let claims = format!(
                        "{{\"iss\":\"incfs-test-issuer\",\"sub\":\"{USER}\",\"aud\":\"incfs-test\",\
                         \"exp\":{},\"nbf\":{},\"iat\":{now},\"jti\":\"t{n}\",\"access\":[{}]}}",
                        now + lifetime - 60,
                        now - 1,
                        access.join(",")
                    );
                    let input = format!(
                        "{}.{}",
                        URL_SAFE_NO_PAD.encode(header),
                        URL_SAFE_NO_PAD.encode(claims)
                    );
                    let sig = key.sign(&rng, input.as_bytes()).unwrap();
                    let body = format!(
                        "{{\"token\":\"{input}.{}\",\"expires_in\":300}}",
                        URL_SAFE_NO_PAD.encode(sig.as_ref())
                    );
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = conn.write_all(reply.as_bytes());
                let mut rest = [0u8; 1];
                let _ = conn.shutdown(std::net::Shutdown::Write);
                let _ = conn.read(&mut rest);
            }
        });
        Issuer { addr, issued }
    }
}

#[test]
fn an_expiring_token_is_refreshed_mid_start_and_loses_no_read() {
    if !require(
        "an_expiring_token_is_refreshed_mid_start_and_loses_no_read",
        &[Need::Root, Need::Fuse, Need::DockerRegistry],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let issuer = Issuer::start(tmp.path(), 2);
    let reg = Registry::start(
        tmp.path(),
        &format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: incfs-test\n    \
             issuer: incfs-test-issuer\n    rootcertbundle: {}\n",
            issuer.addr,
            tmp.path().join("issuer.pem").display()
        ),
        "",
    );
    // Reads 0.8 s apart: a 2 s token lapses several times during the start.
    let (img, program, want) = workload(tmp.path(), "0", "0.8");
    let reference = reg.reference("team/app:v1");
    ok(incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(&reference)
        .env("INCFS_REGISTRY_USER", USER)
        .env("INCFS_REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap());
    let tokens_before = issuer.issued.load(Ordering::SeqCst);
    let before = reg.requests().len();
    let auth = docker_config(tmp.path(), &reg.addr, USER, PASSWORD);
    let s = tmp.path().join("s.json");
    let out = ok(incfs()
        .args([
            "run",
            "--plain-http",
            "--no-plan",
            "--no-fill",
            "--miss-amplify",
            "0",
        ])
        .arg("--image")
        .arg(&reference)
        .arg("--stats-json")
        .arg(&s)
        .args(["--", "sh", &program, "{mnt}"])
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap());
    assert!(out.stdout == want, "wrong bytes after a token refresh");
    let refused: Vec<String> = reg.requests()[before..]
        .iter()
        .filter(|r| r.contains("/blobs/") && r.ends_with(" 401"))
        .cloned()
        .collect();
    let tokens = issuer.issued.load(Ordering::SeqCst) - tokens_before;
    eprintln!(
        "{tokens} tokens issued during the start, {} blob reads refused: {refused:?}",
        refused.len()
    );
    assert!(
        !refused.is_empty(),
        "no blob read was refused: the token did not lapse mid-start"
    );
    assert!(
        tokens >= 2,
        "{tokens} tokens for a start with lapsed tokens"
    );
    let j = stats(&s);
    assert_eq!(j["fetch_errors"].as_u64().unwrap_or(0), 0, "{j}");
}

#[test]
fn tls_with_the_tests_ca_signed_run_mount_pull_and_offline() {
    if !require(
        "tls_with_the_tests_ca_signed_run_mount_pull_and_offline",
        &[Need::Root, Need::Fuse, Need::DockerRegistry],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=incfs-test-ca",
            "-days",
            "2",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let reg = Registry::start(
        d,
        "",
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            d.join("server.pem").display(),
            d.join("server.key").display()
        ),
    );
    let (img, program, want) = workload(d, "0", "0");
    let reference = reg.reference("app:tls");
    let ca = d.join("ca.pem");
    // Signed: the signature travels as a layer and `--trust` checks it.
    let key = d.join("release.key");
    ok(incfs().arg("keygen").arg(&key).output().unwrap());
    ok(incfs()
        .arg("sign")
        .arg(&img)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap());
    let other = d.join("other.key");
    ok(incfs().arg("keygen").arg(&other).output().unwrap());

    // Without the CA: a certificate error, at once.
    let started = Instant::now();
    let out = incfs()
        .arg("push")
        .arg(&img)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).to_lowercase().contains("certificate"),
        "{}",
        stderr_of(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    ok(incfs()
        .arg("push")
        .arg(&img)
        .arg(&reference)
        .arg("--ca-file")
        .arg(&ca)
        .output()
        .unwrap());
    let out = ok(incfs()
        .args(["run", "--image"])
        .arg(&reference)
        .arg("--ca-file")
        .arg(&ca)
        .arg("--trust")
        .arg(d.join("release.key.pub"))
        .args(["--", "sh", &program, "{mnt}"])
        .output()
        .unwrap());
    assert!(out.stdout == want, "wrong bytes over TLS");
    let out = incfs()
        .args(["run", "--image"])
        .arg(&reference)
        .arg("--ca-file")
        .arg(&ca)
        .arg("--trust")
        .arg(d.join("other.key.pub"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "another key's trust must refuse it");
    assert!(
        stderr_of(&out).contains("does not verify"),
        "{}",
        stderr_of(&out)
    );

    // `incfs mount` in the background: the daemon gets the registry options too.
    let mnt = d.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(incfs()
        .arg("mount")
        .arg(&reference)
        .arg(&mnt)
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--ca-file")
        .arg(&ca)
        .arg("--trust")
        .arg(d.join("release.key.pub"))
        .output()
        .unwrap());
    let read = Command::new("sh").arg(&program).arg(&mnt).output().unwrap();
    let stats_out = incfs()
        .arg("stats")
        .arg("--json")
        .arg(&mnt)
        .output()
        .unwrap();
    ok(incfs().arg("umount").arg(&mnt).output().unwrap());
    assert!(read.stdout == want, "wrong bytes through the mount");
    let j: serde_json::Value = serde_json::from_slice(&stats_out.stdout).unwrap();
    assert!(
        j["prefetch"].is_object(),
        "the daemon prefetched the pushed plan: {j}"
    );
    let copy = d.join("copy.img");
    ok(incfs()
        .args(["pull", "-o"])
        .arg(&copy)
        .arg(&reference)
        .arg("--ca-file")
        .arg(&ca)
        .output()
        .unwrap());
    assert!(fs::read(&copy).unwrap() == fs::read(&img).unwrap());

    // The registry goes away: a start on the mount's cache still works, offline.
    drop(reg);
    let out = ok(incfs()
        .args(["run", "--image"])
        .arg(&reference)
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--ca-file")
        .arg(&ca)
        .args(["--", "sh", &program, "{mnt}"])
        .output()
        .unwrap());
    assert!(out.stdout == want, "wrong bytes offline");
}

#[test]
fn push_carries_the_bulk_sidecar_the_fill_uses_and_pull_writes_it_beside_the_image() {
    if !require(
        "push_carries_the_bulk_sidecar_the_fill_uses_and_pull_writes_it_beside_the_image",
        &[Need::Root, Need::Fuse, Need::DockerRegistry],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(tmp.path(), "", "");
    let tree = tmp.path().join("tree");
    common::text_tree(&tree, 24);
    let img = tmp.path().join("app.img");
    let bulk = tmp.path().join("app.img.bulk");
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    let image_bytes = fs::metadata(&img).unwrap().len();
    let reference = reg.reference("team/app:v1");
    let out = ok(incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(&reference)
        .output()
        .unwrap());
    assert!(
        stderr_of(&out).contains("bulk sidecar"),
        "{}",
        stderr_of(&out)
    );

    // A lazy run from the registry: the fill takes most chunks from the pushed sidecar and
    // moves fewer bytes than the image holds.
    let stats_json = tmp.path().join("stats.json");
    let out = ok(incfs()
        .args(["run", "--plain-http", "--image", &reference])
        .arg("--stats-json")
        .arg(&stats_json)
        .args(["--", "sh", "-c", common::FILL_THEN_CKSUM])
        .output()
        .unwrap());
    common::assert_filled_from_bulk(&out, &tree, &stats_json, image_bytes);

    // A pull writes the sidecar beside the copy, and verify checks it clean.
    let copy = tmp.path().join("copy.img");
    ok(incfs()
        .args(["pull", "--plain-http", "-o"])
        .arg(&copy)
        .arg(&reference)
        .output()
        .unwrap());
    let copy_bulk = tmp.path().join("copy.img.bulk");
    assert!(fs::read(&copy_bulk).unwrap() == fs::read(&bulk).unwrap());
    let out = ok(incfs().arg("verify").arg(&copy).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("ok {}", copy_bulk.display())),
        "{text}"
    );

    // Pushed without it: a pull removes the older pull's sidecar, and a run fills from the
    // image's frames.
    let v2 = reg.reference("team/app:v2");
    let out = ok(incfs()
        .args(["push", "--plain-http", "--no-bulk"])
        .arg(&img)
        .arg(&v2)
        .output()
        .unwrap());
    assert!(!stderr_of(&out).contains("bulk"), "{}", stderr_of(&out));
    ok(incfs()
        .args(["pull", "--plain-http", "-o"])
        .arg(&copy)
        .arg(&v2)
        .output()
        .unwrap());
    assert!(!copy_bulk.exists(), "a stale sidecar is removed");

    // A sidecar of another image is refused before any upload, by name.
    let other = tmp.path().join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("x"), b"another image").unwrap();
    let other_img = tmp.path().join("other.img");
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&other_img)
        .arg(&other)
        .output()
        .unwrap());
    fs::copy(tmp.path().join("other.img.bulk"), &bulk).unwrap();
    let before = reg.requests().len();
    let out = incfs()
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(reg.reference("team/app:v3"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&bulk.display().to_string()) && err.contains("--no-bulk"),
        "{err}"
    );
    assert!(
        !reg.requests()[before..]
            .iter()
            .any(|r| r.contains("/blobs/")),
        "{:?}",
        &reg.requests()[before..]
    );
}
