//! The locks that let several mounts share one image cache, and keep `incfs cache gc` from
//! removing a cache that is in use (`flock`, so a process that dies lets go of them).
//!
//! Two lock files live in an image's cache directory:
//!
//! - `lock`: every mount holds it **shared** for as long as it uses the cache. Taking it
//!   exclusively without waiting succeeds only when no mount uses the cache: that is how
//!   `incfs cache stat` tells "in use", how an opening mount tells that it is the only user
//!   (and so may re-check chunks after an unclean stop), and how a closing mount tells that
//!   it is the last (and so may mark the record clean).
//! - `lock.open`: held **exclusively** while a mount opens or closes the cache and while gc
//!   removes it, so those steps never interleave (an opener never sees a half-removed
//!   directory; gc never removes a cache whose first user is still recovering it).
//!
//! The record file itself is locked exclusively around each read-merge-write of its bitmap
//! ([`super::record`]), so mounts sharing it never lose each other's bits.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Name of the lock every user of an image cache holds shared.
pub const USERS_LOCK: &str = "lock";
/// Name of the lock held while a cache is opened, closed or removed.
pub const OPEN_LOCK: &str = "lock.open";

/// How to take a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Shared, waiting for it.
    Shared,
    /// Exclusive, waiting for it.
    Exclusive,
    /// Exclusive, failing at once when anyone else holds it.
    TryExclusive,
}

/// Takes `mode` on `file`; `Ok(false)` when [`Mode::TryExclusive`] found it held.
///
/// Converting a lock this description holds already (shared to exclusive or back) is not
/// atomic (flock(2)): a failed [`Mode::TryExclusive`] conversion leaves it unlocked.
pub fn flock(file: &File, mode: Mode) -> io::Result<bool> {
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
        Mode::TryExclusive => libc::LOCK_EX | libc::LOCK_NB,
    };
    loop {
        // SAFETY: `file` is an open descriptor for the duration of the call; flock has no
        // other preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if mode == Mode::TryExclusive => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Releases whatever lock this description holds on `file`.
pub fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: as in `flock`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens (creating) the lock file `path` for locking.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// True while `file` is still the file at `path` (not removed or replaced since it was
/// opened): a lock taken on a removed cache's file protects nothing.
pub fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// True when some mount uses the image cache in `dir` (holds its users' lock, or is opening
/// or closing it). A cache without lock files is not in use.
pub fn in_use(dir: &Path) -> bool {
    let try_lock = |name: &str| {
        OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .map(|f| flock(&f, Mode::TryExclusive).unwrap_or(false).then_some(f))
    };
    // `lock.open` first, held while probing `lock`, so the probe never makes an opening
    // mount think it has company (see the module docs).
    let opening = try_lock(OPEN_LOCK);
    if matches!(opening, Ok(None)) {
        return true;
    }
    let in_use = matches!(try_lock(USERS_LOCK), Ok(None));
    drop(opening);
    in_use
}
