//! `mount -t fuse.incfs IMG DIR -o OPTS` (what an `/etc/fstab` line of type `fuse.incfs`
//! does): through fuse3's `mount.fuse`, which runs `incfs` from PATH, and by the helper name
//! `mount.fuse.incfs` as mount(8) calls `/sbin/mount.fuse.incfs`; `umount` ends the mount
//! and its daemon records the cache.

mod common;

use common::{incfs, ok};

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_datasets::synth::noise;

fn mounted(mnt: &Path) -> bool {
    let mnt = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(mnt.as_str()))
}

/// Waits until the cache under `cache` is recorded clean by its (gone) daemon.
fn wait_clean(cache: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(incfs()
            .args(["cache", "stat", "--json"])
            .arg(cache)
            .output()
            .unwrap());
        let infos: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if infos.len() == 1 && infos[0]["clean"] == true && infos[0]["in_use"] == false {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not record its cache: {infos:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/sbin/mount.fuse.incfs` → the `incfs` under test, removed on drop. Refuses to replace
/// one that is there already (an installed incfs).
struct SbinHelper(std::path::PathBuf);

impl SbinHelper {
    fn install() -> SbinHelper {
        let path = Path::new("/sbin").join("mount.fuse.incfs");
        assert!(
            fs::symlink_metadata(&path).is_err(),
            "{} exists already: remove it to run this test",
            path.display()
        );
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_incfs"), &path).unwrap();
        SbinHelper(path)
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Mounts with `mount`, checks the file's bytes, unmounts with umount(8), and waits for the
/// daemon to record `cache` clean.
fn mount_read_umount(
    mnt: &Path,
    data: &[u8],
    cache: &Path,
    mount: impl FnOnce() -> std::process::Output,
) {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ok(mount());
        assert!(mounted(mnt), "the mount helper left nothing mounted");
        assert!(
            fs::read(mnt.join("bin/app")).unwrap() == data,
            "wrong bytes"
        );
    }));
    if mounted(mnt) {
        ok(Command::new("umount").arg(mnt).output().unwrap());
    }
    read.unwrap();
    assert!(!mounted(mnt), "umount left the mount");
    wait_clean(cache);
}

#[test]
fn mount_t_fuse_incfs_mounts_and_umount_unmounts() {
    if !require(
        "mount_t_fuse_incfs_mounts_and_umount_unmounts",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    let data = noise(3 << 20, 77);
    fs::write(tree.join("bin/app"), &data).unwrap();
    let img = tmp.path().join("app.img");
    ok(incfs()
        .args(["pack", "-o"])
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap());
    // `incfs` and `mount.fuse.incfs` on PATH, as an install puts them.
    let bin = tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    for name in ["incfs", "mount.fuse.incfs"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_incfs"), bin.join(name)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();

    // 1. mount(8) itself: it looks for helpers only in /sbin (and clears PATH for them), so
    // the helper is put there for the test's duration.
    {
        let _helper = SbinHelper::install();
        let cache = tmp.path().join("cache-1");
        let opts = format!(
            "ro,nodev,noauto,cache={},no_fill,retry_timeout=5",
            cache.display()
        );
        mount_read_umount(&mnt, &data, &cache, || {
            Command::new("mount")
                .args(["-t", "fuse.incfs"])
                .arg(&img)
                .arg(&mnt)
                .args(["-o", &opts])
                .output()
                .unwrap()
        });
    }

    // 2. fuse3's mount.fuse, which mount(8) falls back to without /sbin/mount.fuse.incfs: it
    // runs the subtype, `incfs`, from PATH (mount(8) gives it the default one).
    let cache = tmp.path().join("cache-2");
    mount_read_umount(&mnt, &data, &cache, || {
        Command::new("/sbin/mount.fuse3")
            .arg(&img)
            .arg(&mnt)
            .args(["-t", "fuse.incfs", "-o"])
            .arg(format!("rw,cache={},x-systemd.automount", cache.display()))
            .env("PATH", &path)
            .output()
            .unwrap()
    });

    // 3. An option incfs does not know: refused, nothing mounted.
    let out = Command::new(bin.join("mount.fuse.incfs"))
        .arg(&img)
        .arg(&mnt)
        .args(["-o", "cache_size=5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown option \"cache_size\""), "{err}");
    assert!(!mounted(&mnt));
}
