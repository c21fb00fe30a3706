//! `incfs run`, `mount`, `stats` and `umount` as an ordinary user (through fusermount3), with
//! a user the test creates (and removes): bytes right, passthrough turned off at the first
//! EPERM with one log line, nothing left mounted.

mod common;

use common::ok;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;

/// A system user made for one test, removed on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("incfs-t{}", std::process::id());
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .status()
            .unwrap();
        assert!(st.success(), "useradd {name} failed");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// `incfs ARGS` as this user, with HOME at `home`.
    fn incfs(&self, home: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_incfs"));
        c.uid(self.uid)
            .gid(self.gid)
            .env("HOME", home)
            .env_remove("INCFS_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .current_dir(home);
        c
    }

    /// Makes `path` and everything under it this user's.
    fn own(&self, path: &Path) {
        chown(path, Some(self.uid), Some(self.gid)).unwrap();
        if path.is_dir() {
            for e in fs::read_dir(path).unwrap() {
                self.own(&e.unwrap().path());
            }
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A mount made by the test: lazily unmounted, and its daemon killed, if the test fails
/// before unmounting it.
struct MountGuard<'a> {
    mnt: &'a Path,
    daemon: Option<i32>,
}

impl Drop for MountGuard<'_> {
    fn drop(&mut self) {
        if fuse_mounts_under(self.mnt) > 0 {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(self.mnt)
                .status();
        }
        if let Some(pid) = self.daemon {
            // SAFETY: kill has no memory preconditions; the pid is our daemon's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Opens `/dev/fuse` to every user for the test's duration when it is closed to them, as
/// udev's rule does on a stock Debian (on this kind of machine it is 0600: no user could
/// mount FUSE, with incfs or with libfuse, which like fuser opens the device itself before
/// it asks fusermount3); restores the mode on drop.
struct DevFuseOpen {
    restore: Option<u32>,
}

impl DevFuseOpen {
    fn ensure() -> DevFuseOpen {
        let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        if mode & 0o006 == 0o006 {
            return DevFuseOpen { restore: None };
        }
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode | 0o666)).unwrap();
        eprintln!("rootless: /dev/fuse was {mode:o}; 666 for this test");
        DevFuseOpen {
            restore: Some(mode),
        }
    }
}

impl Drop for DevFuseOpen {
    fn drop(&mut self) {
        if let Some(mode) = self.restore {
            let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode));
        }
    }
}

fn fuse_mounts_under(dir: &Path) -> usize {
    let dir = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("fuse") && l.contains(&dir))
        .count()
}

#[test]
fn run_mount_and_umount_as_an_ordinary_user() {
    if !require(
        "run_mount_and_umount_as_an_ordinary_user",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let user = TestUser::create();
    let _dev_fuse = DevFuseOpen::ensure();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let tree = home.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let data = noise(300_000, 7);
    fs::write(tree.join("f"), &data).unwrap();
    fs::create_dir(home.join("mnt")).unwrap();
    user.own(tmp.path());
    let want = {
        let out = Command::new("sha256sum")
            .arg(tree.join("f"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };

    ok(user
        .incfs(&home)
        .args(["pack", "tree", "-o", "app.img"])
        .output()
        .unwrap());

    // incfs run: the file is read three times; from the second open on it is local, where
    // a root mount would pass it through. The user's mount is refused that (EPERM) once,
    // says so once, and serves the rest through incfs.
    let out = ok(user
        .incfs(&home)
        .args(["run", "--image", "app.img", "--"])
        .args(["sh", "-c"])
        .arg("for i in 1 2 3; do sha256sum < {mnt}/f; done")
        .output()
        .unwrap());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stdout.lines().count(),
        3,
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for line in stdout.lines() {
        assert!(
            line.starts_with(&want),
            "wrong bytes: {line}\nstderr: {stderr}"
        );
    }
    let refusals = stderr.matches("refuses FUSE passthrough").count();
    assert_eq!(
        refusals, 1,
        "passthrough refusal logged {refusals} times:\n{stderr}"
    );
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("registering a passthrough"),
        "stderr: {stderr}"
    );

    // incfs mount (a daemon), stats, umount.
    let mnt = home.join("mnt");
    let mut guard = MountGuard {
        mnt: &mnt,
        daemon: None,
    };
    ok(user
        .incfs(&home)
        .args(["mount", "app.img", "mnt", "--cache", "cache"])
        .output()
        .unwrap());
    assert_eq!(fuse_mounts_under(&mnt), 1, "the user's mount is not listed");
    for _ in 0..2 {
        let out = ok(Command::new("sha256sum")
            .arg(mnt.join("f"))
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .unwrap());
        assert!(String::from_utf8(out.stdout).unwrap().starts_with(&want));
    }
    let out = ok(user
        .incfs(&home)
        .args(["stats", "mnt", "--json"])
        .output()
        .unwrap());
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    guard.daemon = stats["pid"].as_i64().and_then(|p| i32::try_from(p).ok());
    assert_eq!(stats["read_errors"], 0);
    assert_eq!(stats["passthrough_opens"], 0);
    let t = Instant::now();
    ok(user.incfs(&home).args(["umount", "mnt"]).output().unwrap());
    eprintln!("rootless: umount took {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(fuse_mounts_under(&mnt), 0, "the mount is still there");
    if let Some(pid) = guard.daemon.take() {
        // Exited: gone, or a zombie waiting for init to reap it.
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next())
            })
            .flatten();
        assert!(
            matches!(state, None | Some('Z' | 'X')),
            "the daemon outlived umount (state {state:?})"
        );
    }
    let log = fs::read_to_string(home.join("cache/daemon.log")).unwrap();
    assert!(
        log.matches("refuses FUSE passthrough").count() <= 1 && !log.contains("ERROR"),
        "daemon log:\n{log}"
    );
}
