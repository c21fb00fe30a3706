//! `s3://BUCKET/KEY` against a real S3-compatible server: moto's (`moto_server`, installed
//! by scripts/setup.sh), with authentication on, so requests are SigV4-checked as by S3. A
//! planned start through `s3://` reads the same bytes as over plain HTTP with about as many
//! requests; a wrong secret key and a missing bucket are clear errors naming the URL.

mod common;

use common::{incfs, ok};

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;
use incfs_fs::serve::{ServeConfig, Server};

/// The requests moto serves before it checks credentials: the setup's five (an IAM user,
/// its key and policy, the bucket, the upload).
const SETUP_ACTIONS: u32 = 5;

/// Makes the test's user, key, bucket `images` and object `images/app.img`; prints the key.
const SETUP_PY: &str = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="incfs")
key = iam.create_access_key(UserName="incfs")["AccessKey"]
iam.put_user_policy(UserName="incfs", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket="images")
with open(sys.argv[2], "rb") as f:
    s3.put_object(Bucket="images", Key="app.img", Body=f.read())
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

/// moto's server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start(log: &Path) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_ACTIONS.to_string())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that runs `moto_server` (it has boto3): the one beside the real file.
fn moto_python() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| Some(p.parent()?.join("python3")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "python3".into())
}

/// `incfs run` of `image` with the AWS environment pointing at `endpoint` with this key.
fn s3_run(endpoint: &str, key: (&str, &str)) -> Command {
    let mut cmd = incfs();
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", key.0)
        .env("AWS_SECRET_ACCESS_KEY", key.1)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .arg("run");
    cmd
}

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_planned_start_through_s3_reads_what_http_does() {
    if !require(
        "a_planned_start_through_s3_reads_what_http_does",
        &[Need::Root, Need::Fuse, Need::MotoServer],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    for i in 0..8u64 {
        fs::write(tree.join(format!("f{i}")), noise(1 << 20, 40 + i)).unwrap();
    }
    // The program: 64 scattered 4 KiB blocks, then two files whole.
    let mut program = String::new();
    for k in 0..64u64 {
        program.push_str(&format!(
            "dd if=\"$1/f{}\" bs=4096 skip={} count=1 status=none\n",
            (k * 5) % 8,
            (k * 37) % 256
        ));
    }
    program.push_str("cat \"$1/f3\" \"$1/f6\"\n");
    let script = tmp.path().join("program.sh");
    fs::write(&script, program).unwrap();
    let want = Command::new("sh")
        .arg(&script)
        .arg(&tree)
        .output()
        .unwrap()
        .stdout;

    // A hot-first image and its plan, from a read-log of the program over plain HTTP.
    let cold = tmp.path().join("cold.img");
    ok(incfs()
        .args(["pack", "--chunk-size", "64K", "-o"])
        .arg(&cold)
        .arg(&tree)
        .output()
        .unwrap());
    let serve_dir = tmp.path().join("serve");
    fs::create_dir_all(&serve_dir).unwrap();
    fs::rename(&cold, serve_dir.join("cold.img")).unwrap();
    let server = Server::start(ServeConfig::new(&serve_dir)).unwrap();
    let log = tmp.path().join("read-log.ndjson");
    ok(incfs()
        .args(["run", "--no-fill", "--image", &server.url("cold.img")])
        .arg("--cache")
        .arg(tmp.path().join("cache-log"))
        .arg("--read-log-out")
        .arg(&log)
        .args(["--", "sh"])
        .arg(&script)
        .arg("{mnt}")
        .output()
        .unwrap());
    let img = serve_dir.join("app.img");
    ok(incfs()
        .arg("pack")
        .arg(&tree)
        .args(["--chunk-size", "64K", "--order"])
        .arg(&log)
        .arg("-o")
        .arg(&img)
        .output()
        .unwrap());
    let plan = serve_dir.join("app.img.plan.json");
    assert!(plan.is_file());

    let moto = Moto::start(&tmp.path().join("moto.log"));
    let setup = ok(Command::new(moto_python())
        .args(["-c", SETUP_PY, &moto.endpoint])
        .arg(&img)
        .output()
        .unwrap());
    let keys = String::from_utf8(setup.stdout).unwrap();
    let (ak, sk) = keys.trim().split_once(' ').unwrap();

    let planned = |cmd: &mut Command, image: &str, name: &str| {
        let s = tmp.path().join(format!("{name}.json"));
        let out = ok(cmd
            .args(["--no-fill", "--image", image, "--prefetch"])
            .arg(&plan)
            .arg("--cache")
            .arg(tmp.path().join(format!("cache-{name}")))
            .arg("--stats-json")
            .arg(&s)
            .args(["--", "sh"])
            .arg(&script)
            .arg("{mnt}")
            .output()
            .unwrap());
        (out.stdout, stats(&s))
    };
    let (http_out, http) = planned(incfs().arg("run"), &server.url("app.img"), "http");
    let (s3_out, s3) = planned(
        &mut s3_run(&moto.endpoint, (ak, sk)),
        "s3://images/app.img",
        "s3",
    );
    assert!(http_out == want, "over HTTP the program read wrong bytes");
    assert!(s3_out == want, "through s3:// the program read wrong bytes");
    eprintln!(
        "s3: http {} requests / {} bytes fetched, s3 {} requests / {} bytes fetched",
        http["requests"], http["bytes_fetched"], s3["requests"], s3["bytes_fetched"]
    );
    let n = |j: &serde_json::Value, k: &str| j[k].as_u64().unwrap();
    assert_eq!(n(&s3, "bytes_used"), n(&http, "bytes_used"));
    assert_eq!(n(&s3, "bytes_fetched"), n(&http, "bytes_fetched"));
    assert!(
        n(&s3, "requests") <= n(&http, "requests") + 4,
        "s3 {s3} vs http {http}"
    );
    assert!(
        n(&s3, "blocked_reads") <= n(&http, "blocked_reads") + 4,
        "s3 {s3} vs http {http}"
    );

    // No plan in the bucket beside the image: a run without --prefetch starts lazily, and
    // the missing plan is no warning.
    let out = ok(s3_run(&moto.endpoint, (ak, sk))
        .args(["--no-fill", "--image", "s3://images/app.img", "--cache"])
        .arg(tmp.path().join("cache-no-plan"))
        .args(["--", "sh"])
        .arg(&script)
        .arg("{mnt}")
        .output()
        .unwrap());
    assert!(
        out.stdout == want,
        "a lazy start through s3:// read wrong bytes"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("plan"), "{err}");

    // A wrong secret key, and a bucket that does not exist: refused at once, naming the URL.
    let refused = |cmd: &mut Command, url: &str, why: &str| {
        let t = Instant::now();
        let out = cmd
            .args(["--image", url, "--cache"])
            .arg(tmp.path().join("cache-refused"))
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} was not refused");
        assert!(err.contains(url) && err.contains(why), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "refused only after {:?}",
            t.elapsed()
        );
    };
    refused(
        &mut s3_run(&moto.endpoint, (ak, "wrong-secret")),
        "s3://images/app.img",
        "access refused",
    );
    refused(
        &mut s3_run(&moto.endpoint, (ak, sk)),
        "s3://no-such-bucket/app.img",
        "no such bucket or object",
    );
    refused(
        &mut s3_run(&moto.endpoint, (ak, sk)),
        "s3://images/missing.img",
        "no such bucket or object",
    );
}
