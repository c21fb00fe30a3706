//! The kernel fact behind `docs/local-reads.md`: what fanotify pre-content events
//! (`FAN_PRE_ACCESS`, Linux 6.14+) see of a file served by FUSE passthrough.
//!
//! A tiny FUSE file system (fuser, `ReplyOpen::opened_passthrough`) serves one file whose
//! backing file, on the test's own disk, carries an inode mark for `FAN_PRE_ACCESS` from a
//! `FAN_CLASS_PRE_CONTENT` group. The watcher answers every event after [`DELAY`], so a
//! caller that waits for it shows it. What the test pins:
//! - a `read()` through the passthrough open raises `FAN_PRE_ACCESS` on the backing file,
//!   with the read's range, and blocks until the watcher answers (also when the page is
//!   cached);
//! - an `mmap()` of the same open and a page fault through it raise nothing: a fault reads
//!   whatever the backing file holds, so a hole would be served as zeros;
//! - for comparison, an `mmap()` of the backing file itself raises one event for the whole
//!   mapped range at `mmap()` time (and its faults raise none).
//!
//! So pre-content events cannot guard partial files served by passthrough for programs that
//! map them (loaders, Python extension modules). If a kernel changes this, this test fails and
//! the conclusion of `docs/local-reads.md` must be revisited.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyEntry, ReplyOpen, Request, Session,
};
use incfs_datasets::require::{Need, REQUIRE_ENV, require};

/// `FAN_PRE_ACCESS` (include/uapi/linux/fanotify.h, 6.14+; not in the libc crate yet).
const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_EVENT_INFO_TYPE_RANGE`: the info record of a pre-content event giving the range.
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
/// `FAN_ALLOW`.
const FAN_ALLOW: u32 = 1;
/// Size of the served file: 1,024 pages.
const SIZE: u64 = 4 << 20;
/// How long the watcher holds every event before allowing it: long enough that a caller
/// waiting for the answer is told apart from one that does not wait.
const DELAY: Duration = Duration::from_millis(200);
/// Attribute and entry lifetime.
const TTL: Duration = Duration::from_secs(60);

/// One regular file, ino 2, named `data`, served by passthrough to `backing`; counts the
/// reads that reach it (none, when passthrough works).
struct OneFile {
    backing: PathBuf,
    reads: Arc<AtomicU64>,
    ids: Mutex<Vec<Arc<BackingId>>>,
}

fn attr(ino: u64) -> FileAttr {
    let dir = ino == 1;
    FileAttr {
        ino: INodeNo(ino),
        size: if dir { 0 } else { SIZE },
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: 0o755,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for OneFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
            || config.set_max_stack_depth(1).is_err()
        {
            return Err(std::io::Error::other(
                "the kernel offers no FUSE passthrough",
            ));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name.as_bytes() == b"data" {
            reply.entry(&TTL, &attr(2), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let id = File::open(&self.backing).and_then(|f| reply.open_backing(&f));
        match id {
            Ok(id) => {
                let id = Arc::new(id);
                self.ids.lock().unwrap().push(Arc::clone(&id));
                reply.opened_passthrough(FileHandle(1), FopenFlags::empty(), &id);
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Passthrough opens never get here; count it and fail so the test sees it.
        self.reads.fetch_add(1, Ordering::Relaxed);
        reply.error(Errno::EIO);
    }
}

/// One pre-content event as the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    mask: u64,
    /// Offset and length from the range info record.
    range: Option<(u64, u64)>,
}

/// Reads `fan` until `stop`, recording every event and allowing it after [`DELAY`].
fn watch(fan: i32, stop: &AtomicBool, events: &Mutex<Vec<Event>>) {
    let mut buf = vec![0u8; 8192];
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |b: &[u8], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: fan,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fan, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else { continue };
        // struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
        // metadata_len u16, mask u64, fd i32, pid i32 (24 bytes); info records follow.
        let mut off = 0;
        while off + 24 <= n {
            let event_len = u32_at(&buf, off) as usize;
            let meta_len = usize::from(u16_at(&buf, off + 6));
            let mask = u64_at(&buf, off + 8);
            let fd = u32_at(&buf, off + 16) as i32;
            let mut range = None;
            let mut i = off + meta_len;
            // struct fanotify_event_info_range: info_type u8, pad u8, len u16, pad u32,
            // offset u64, count u64.
            while i + 4 <= off + event_len {
                let len = usize::from(u16_at(&buf, i + 2));
                if buf[i] == FAN_EVENT_INFO_TYPE_RANGE && len >= 24 {
                    range = Some((u64_at(&buf, i + 8), u64_at(&buf, i + 16)));
                }
                if len == 0 {
                    break;
                }
                i += len;
            }
            events.lock().unwrap().push(Event { mask, range });
            std::thread::sleep(DELAY);
            let resp = [fd as u32, FAN_ALLOW];
            // SAFETY: resp is a struct fanotify_response (fd i32, response u32), 8 bytes.
            unsafe { libc::write(fan, resp.as_ptr().cast(), 8) };
            if fd >= 0 {
                // SAFETY: the event's fd is ours to close.
                unsafe { libc::close(fd) };
            }
            off += event_len.max(24);
        }
    }
}

/// Drops the backing file's cached pages, so that a fault has to read it.
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: a valid fd; DONTNEED only drops clean cached pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Maps all of `f` and reads the byte at `off` through the mapping (one page fault).
fn fault_at(f: &File, off: u64) -> u8 {
    // SAFETY: a fresh private read-only mapping of SIZE bytes of a file that long; the read
    // is inside it, and the mapping is unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let v = std::ptr::read_volatile(p.cast::<u8>().add(off as usize));
        libc::munmap(p, SIZE as usize);
        v
    }
}

/// The byte at `off` of the backing file's content.
fn byte_at(off: u64) -> u8 {
    (off / 4096 % 251) as u8
}

/// Runs `f`, then returns how long it took and the events it raised.
fn observe(events: &Mutex<Vec<Event>>, f: impl FnOnce()) -> (Duration, Vec<Event>) {
    let before = events.lock().unwrap().len();
    let t = Instant::now();
    f();
    let took = t.elapsed();
    // An event raised but not yet recorded would show here.
    std::thread::sleep(Duration::from_millis(50));
    (took, events.lock().unwrap()[before..].to_vec())
}

#[test]
fn pre_content_events_see_passthrough_reads_but_not_mmap() {
    let name = "pre_content_events_see_passthrough_reads_but_not_mmap";
    if !require(name, &[Need::Root, Need::Fuse]) {
        return;
    }
    // On the project's disk (ext4 here): tmpfs has no pre-content events.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let backing = dir.path().join("backing");
    let content: Vec<u8> = (0..SIZE).map(byte_at).collect();
    std::fs::write(&backing, &content).unwrap();
    File::open(&backing).unwrap().sync_all().unwrap();

    // SAFETY: plain syscall; the fd is owned below.
    let fan = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC,
            (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
        )
    };
    assert!(
        fan >= 0,
        "fanotify_init: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fan is a fresh fd that nothing else owns.
    let fan_fd = unsafe { OwnedFd::from_raw_fd(fan) };
    let cpath = CString::new(backing.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid group fd and NUL-terminated path.
    let r = unsafe {
        libc::fanotify_mark(
            fan,
            libc::FAN_MARK_ADD,
            FAN_PRE_ACCESS,
            libc::AT_FDCWD,
            cpath.as_ptr(),
        )
    };
    if r != 0 {
        let why = format!(
            "no fanotify pre-content events here (kernel < 6.14 or a file system without them): {}",
            std::io::Error::last_os_error()
        );
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{name}: {why}");
        }
        eprintln!("skipped {name}: {why}");
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, events) = (Arc::clone(&stop), Arc::clone(&events));
        std::thread::spawn(move || watch(fan, &stop, &events))
    };

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let reads = Arc::new(AtomicU64::new(0));
    let fs = OneFile {
        backing: backing.clone(),
        reads: Arc::clone(&reads),
        ids: Mutex::new(Vec::new()),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![MountOption::RO, MountOption::FSName("precontent".into())];
    let session = Session::new(fs, &mnt, &cfg).unwrap().spawn().unwrap();

    let mut page = [0u8; 4096];
    let fuse_file = File::open(mnt.join("data")).unwrap();

    // read() through passthrough: one event on the backing file, and the read waits for it.
    let (took, got) = observe(&events, || {
        fuse_file.read_at(&mut page, 131072).unwrap();
    });
    assert_eq!(page.as_slice(), &content[131072..135168]);
    assert_eq!(
        got,
        vec![Event {
            mask: FAN_PRE_ACCESS,
            range: Some((131072, 4096))
        }]
    );
    assert!(took >= DELAY * 3 / 4, "the read did not wait: {took:?}");
    // Again, now that the page is cached: the event comes all the same.
    let (_, got) = observe(&events, || {
        fuse_file.read_at(&mut page, 131072).unwrap();
    });
    assert_eq!(got.len(), 1, "a cached read: {got:?}");

    // mmap() and a fault through passthrough: no event at all, from a cold backing file.
    evict(&backing);
    let off = 2 << 20;
    let (_, got) = observe(&events, || {
        assert_eq!(fault_at(&fuse_file, off), byte_at(off));
    });
    assert_eq!(got, vec![], "mmap through passthrough raised events");
    assert_eq!(
        reads.load(Ordering::Relaxed),
        0,
        "a read reached the daemon"
    );

    // The backing file mapped directly: one event for the mapped range, at mmap() time.
    evict(&backing);
    let direct = File::open(&backing).unwrap();
    let (_, got) = observe(&events, || {
        assert_eq!(fault_at(&direct, off), byte_at(off));
    });
    assert_eq!(
        got,
        vec![Event {
            mask: FAN_PRE_ACCESS,
            range: Some((0, SIZE))
        }]
    );

    drop((fuse_file, direct));
    session.umount_and_join().unwrap();
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    drop(fan_fd);
}
