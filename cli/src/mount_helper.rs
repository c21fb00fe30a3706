//! `mount -t fuse.incfs SOURCE DIR -o OPTIONS`, and `/etc/fstab` lines of type `fuse.incfs`:
//! `incfs` as a mount helper.
//!
//! Two ways lead here, and both call the helper with the fuse3 convention,
//! `PROGRAM SOURCE MOUNTPOINT [-o OPTIONS]`:
//!
//! - `mount(8)` runs `/sbin/mount.fuse.incfs` when it exists (a symlink to `incfs`: the
//!   helper is known by that name, `argv[0]`); it may add `-n`, `-v`, `-s`, `-f`, `-r`,
//!   `-w` or `-t TYPE`, which are taken or ignored as `mount` means them.
//! - Without it, `mount(8)` runs fuse3's `mount.fuse`, which starts the program named by the
//!   subtype, `incfs`, from `PATH` (seen here as a first argument that is no subcommand and a
//!   second that is a directory).
//!
//! The options become `incfs mount` flags (`cache=DIR` → `--cache DIR`, `no_fill` →
//! `--no-fill`, `-` or `_` alike); the generic mount and fstab options that mean nothing to
//! a read-only FUSE mount (`ro`, `rw`, `defaults`, `noauto`, `nofail`, `_netdev`, `x-*`, …)
//! are ignored; anything else is refused with the list of what is understood. The mount
//! then starts as `incfs mount` does: a daemon, returning once the mount is up.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use anyhow::bail;

/// The name `mount(8)` runs the helper by.
pub const HELPER_NAME: &str = "mount.fuse.incfs";

/// `incfs mount` options that take a value, as mount options name them.
const VALUED: &[&str] = &[
    "cache",
    "cache_max_size",
    "prefetch",
    "expect_digest",
    "trust",
    "fill_bandwidth_mbit",
    "retry_timeout",
    "max_readahead",
    "threads",
    "fetch_workers",
    "miss_amplify",
    "bridge_gap",
    "ranges_per_request",
    "multi_range_bytes",
    "log",
];
/// `incfs mount` flags, as mount options name them.
const FLAGS: &[&str] = &[
    "no_fill",
    "allow_other",
    "no_passthrough",
    "no_push_local",
    "no_follow_cpu",
];
/// Generic mount(8) and fstab options with no meaning for incfs (a read-only FUSE mount).
const IGNORED: &[&str] = &[
    "ro",
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "sync",
    "async",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
];

/// When `argv` is a mount helper call, the `incfs mount …` arguments it stands for (or why
/// it cannot be one); `None` for an ordinary command line.
pub fn translate(
    argv: &[OsString],
    is_subcommand: impl Fn(&str) -> bool,
) -> Option<anyhow::Result<Vec<OsString>>> {
    let called_as_helper = argv
        .first()
        .and_then(|a0| Path::new(a0).file_name())
        .is_some_and(|n| n == OsStr::new(HELPER_NAME));
    let from_mount_fuse = argv.len() >= 3
        && argv[1]
            .to_str()
            .is_some_and(|a| !a.starts_with('-') && !is_subcommand(a))
        && Path::new(&argv[2]).is_dir();
    (called_as_helper || from_mount_fuse).then(|| mount_args(&argv[1..]))
}

/// `SOURCE MOUNTPOINT [-o OPTS] [-nvsfrw] [-t TYPE]` → `incfs mount SOURCE MOUNTPOINT FLAGS…`.
fn mount_args(args: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => match it.next() {
                Some(o) => options.push(o.to_string_lossy().into_owned()),
                None => bail!("{HELPER_NAME}: -o needs the options"),
            },
            Some("-t") => {
                it.next();
            }
            Some("-f") => bail!("{HELPER_NAME}: -f (fake mount) is not supported"),
            Some(s)
                if s.starts_with('-')
                    && s.len() > 1
                    && s[1..].chars().all(|c| "nvsrw".contains(c)) => {}
            Some(s) if s.starts_with("-o") => options.push(s[2..].to_string()),
            Some(s) if s.starts_with('-') => bail!("{HELPER_NAME}: unknown argument {s}"),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        bail!(
            "usage: {HELPER_NAME} SOURCE MOUNTPOINT [-o OPTIONS] (as mount -t fuse.incfs calls it)"
        );
    };
    let mut out: Vec<OsString> = vec![
        "incfs".into(),
        "mount".into(),
        source.clone(),
        mountpoint.clone(),
    ];
    for opt in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        let key = name.replace('-', "_");
        if IGNORED.contains(&key.as_str()) || key.starts_with("x_") || key == "comment" {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match (
            VALUED.contains(&key.as_str()),
            FLAGS.contains(&key.as_str()),
            value,
        ) {
            (true, _, Some(v)) if !v.is_empty() => {
                out.push(flag.into());
                out.push(v.into());
            }
            (true, _, _) => bail!("{HELPER_NAME}: option {name} needs a value ({name}=…)"),
            (_, true, None) => out.push(flag.into()),
            (_, true, Some(_)) => bail!("{HELPER_NAME}: option {name} takes no value"),
            _ => bail!(
                "{HELPER_NAME}: unknown option {name:?} (incfs understands {}, {}; and ignores the generic mount options such as ro, defaults, noauto, nofail, _netdev, x-*)",
                VALUED
                    .iter()
                    .map(|v| format!("{v}=…"))
                    .collect::<Vec<_>>()
                    .join(", "),
                FLAGS.join(", ")
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn helper_calls_become_incfs_mount() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().to_str().unwrap();
        let sub = |s: &str| s == "mount" || s == "pack";
        let args = translate(
            &os(&[
                "/sbin/mount.fuse.incfs",
                "http://h/app.img",
                mnt,
                "-n",
                "-o",
                "rw,noauto,x-systemd.automount,cache=/var/c,no-fill,retry_timeout=30",
                "-t",
                "fuse.incfs",
            ]),
            sub,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            strs(&args),
            [
                "incfs",
                "mount",
                "http://h/app.img",
                mnt,
                "--cache",
                "/var/c",
                "--no-fill",
                "--retry-timeout",
                "30"
            ]
        );
        // fuse3's mount.fuse runs the subtype, `incfs`, with the same arguments.
        let args = translate(&os(&["incfs", "app.img", mnt, "-o", "allow_other"]), sub)
            .unwrap()
            .unwrap();
        assert_eq!(
            strs(&args),
            ["incfs", "mount", "app.img", mnt, "--allow-other"]
        );
        // Ordinary command lines are left alone.
        assert!(translate(&os(&["incfs", "mount", "app.img", mnt]), sub).is_none());
        assert!(translate(&os(&["incfs", "app.img", "/no/such/dir"]), sub).is_none());
        assert!(translate(&os(&["incfs", "--help"]), sub).is_none());
    }

    #[test]
    fn bad_options_are_refused_with_what_is_understood() {
        let call = |o: &str| {
            translate(&os(&["mount.fuse.incfs", "a.img", "/mnt", "-o", o]), |_| {
                false
            })
            .unwrap()
            .unwrap_err()
            .to_string()
        };
        let e = call("ro,bogus=1");
        assert!(
            e.contains("unknown option \"bogus\"") && e.contains("cache=…"),
            "{e}"
        );
        assert!(call("cache").contains("needs a value"));
        assert!(call("no_fill=1").contains("takes no value"));
        let e = translate(&os(&["mount.fuse.incfs", "a.img"]), |_| false)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("usage"), "{e}");
    }
}
