//! The FUSE adapter: a thin [`fuser::Filesystem`] over [`IncFs`].
//!
//! Each handler is one span, one call into [`IncFs`], one reply; errors become errnos in one
//! place ([`ToErrno`]). A read is answered when its data is there: the reply object moves to
//! the fetch worker that stores the read's last missing chunk ([`IncFs::read_then`]), so a
//! miss holds none of the session's event-loop threads (fuser's `n_threads`, each with its
//! own cloned `/dev/fuse` fd) and the kernel may have 128 reads outstanding.
//! Regular files are opened with `FOPEN_KEEP_CACHE` (content never changes) and
//! `FOPEN_NOFLUSH` (nothing to flush on a read-only mount: no FLUSH round trip per close),
//! or with passthrough when [`IncFs::open`] says so; the backing id of a passthrough inode is
//! shared by all its live opens, as the kernel requires. Each handler first lets its
//! event-loop thread follow the requester's CPU ([`super::cpu_follow`]); directories are
//! opened by the kernel itself (OPENDIR is refused once).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use parking_lot::Mutex;
use tracing::instrument;

use super::cpu_follow;
use super::push::{PushConfig, Pusher, Store};
use super::{Attr, FsError, IncFs, NodeKind, OpenMode};
use crate::cache::fds::FdPermit;

/// Background (page-cache read) requests the kernel may have outstanding with us: enough
/// that 32 readers' misses all wait at once, as the tests check, with room to spare.
const MAX_BACKGROUND: u16 = 128;

/// How long the kernel may cache attributes and entries: the tree never changes.
const TTL: Duration = Duration::from_secs(3600);

/// The flags of a cached open: keep the page cache across opens (content never changes), and
/// no FLUSH request at close (nothing to flush on a read-only mount; it is a synchronous
/// round trip per `close()`, hundreds in a Python start).
const CACHED_OPEN: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Maps an error of the core to the errno a reader sees.
pub trait ToErrno {
    /// The errno.
    fn to_errno(&self) -> Errno;
}

impl ToErrno for FsError {
    fn to_errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::NotDir => Errno::ENOTDIR,
            FsError::IsDir => Errno::EISDIR,
            FsError::NotSymlink => Errno::EINVAL,
            FsError::NoXattr => Errno::NO_XATTR,
            FsError::BadHandle(_) => Errno::EBADF,
            FsError::ModeConflict => Errno::EIO,
            FsError::Fetch { .. } => Errno::EIO,
            FsError::Cache(_) => Errno::EIO,
            FsError::Meta { .. } => Errno::EIO,
            FsError::Thread(_) => Errno::EIO,
            FsError::Plan(_) => Errno::EINVAL,
            FsError::ShuttingDown => Errno::EIO,
        }
    }
}

/// Options of a FUSE mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Event-loop threads. Default 4: enough that a few blocked misses leave threads free
    /// for cached reads on a two-core machine.
    pub threads: usize,
    /// Let other users access the mount (`allow_other`). Default off.
    pub allow_other: bool,
    /// Kernel readahead for files served through incfs, in bytes. Default 0: on a lazy
    /// mount every byte the kernel reads ahead is a byte fetched over the link before anyone
    /// asked for it (measured on clang-22 at 20 ms / 100 Mbit: 1 MiB of readahead made a cold
    /// start fetch 42 MiB instead of 22); sequential read-ahead of chunks is the
    /// prefetcher's job, and fully local files are opened with passthrough, where the
    /// backing file's own readahead applies.
    pub max_readahead: u32,
    /// Pushing the local data of partly local files into the page cache at their first
    /// open ([`super::push`]).
    pub push: PushConfig,
    /// Event-loop threads pin themselves to the CPU of the process whose request they
    /// answer, so a request is a hand-off on one CPU rather than two cross-CPU wake-ups
    /// ([`super::cpu_follow`]). Default on.
    pub follow_requester_cpu: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            allow_other: false,
            max_readahead: 0,
            push: PushConfig::default(),
            follow_requester_cpu: true,
        }
    }
}

/// Pushed local data reaches the kernel's page cache as `FUSE_NOTIFY_STORE`.
impl Store for fuser::Notifier {
    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        fuser::Notifier::store(self, INodeNo(ino), offset, data)
    }
}

/// A passthrough backing id and its share of the descriptor budget, released together.
struct Backing {
    id: BackingId,
    _permit: Option<FdPermit>,
}

#[derive(Default)]
struct Backings {
    by_inode: HashMap<u64, Weak<Backing>>,
    by_handle: HashMap<u64, Arc<Backing>>,
}

/// The [`fuser::Filesystem`] over an [`IncFs`].
pub struct FuseFs {
    fs: Arc<IncFs>,
    max_readahead: u32,
    backings: Mutex<Backings>,
    /// Set once the session exists (it needs the session's notifier).
    pusher: Arc<OnceLock<Pusher>>,
    /// Event-loop threads run on their requester's CPU ([`super::cpu_follow`]).
    follow_cpu: bool,
}

impl FuseFs {
    /// Wraps `fs`.
    pub fn new(fs: Arc<IncFs>) -> Self {
        FuseFs {
            fs,
            max_readahead: MountOptions::default().max_readahead,
            backings: Mutex::new(Backings::default()),
            pusher: Arc::new(OnceLock::new()),
            follow_cpu: MountOptions::default().follow_requester_cpu,
        }
    }

    fn follow(&self, req: &Request) {
        if self.follow_cpu {
            cpu_follow::follow(req.pid());
        }
    }
}

/// The fuser session configuration incfs mounts with: read-only, named after the source,
/// several event loops with cloned fds.
pub fn session_config(source: &str, opts: &MountOptions) -> Config {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("incfs:{source}").replace(',', "_")),
        MountOption::Subtype("incfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        cfg.acl = SessionACL::All;
    }
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;
    cfg
}

/// Mounts `fs` at `mountpoint`; the caller runs the returned session
/// ([`fuser::Session::run`] in the foreground, or `spawn`).
pub fn new_session(
    fs: Arc<IncFs>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<fuser::Session<FuseFs>> {
    let cfg = session_config(&fs.source_name, opts);
    let mut ffs = FuseFs::new(Arc::clone(&fs));
    ffs.max_readahead = opts.max_readahead;
    ffs.follow_cpu = opts.follow_requester_cpu;
    let pusher = Arc::clone(&ffs.pusher);
    let session = fuser::Session::new(ffs, mountpoint, &cfg).map_err(|e| {
        // Without root, the device must be open to the user (Debian's udev rule makes it
        // 0666) and fusermount3 setuid root: say so rather than a bare EACCES.
        let hint = if e.kind() == io::ErrorKind::PermissionDenied {
            " (without root, /dev/fuse must be readable and writable by you, as Debian's \
             default mode 0666 allows, and fusermount3 setuid root: apt-get install fuse3)"
        } else {
            ""
        };
        io::Error::new(
            e.kind(),
            format!("mounting FUSE at {}: {e}{hint}", mountpoint.display()),
        )
    })?;
    if opts.push.enabled {
        match Pusher::start(fs, session.notifier(), opts.push.clone()) {
            Ok(p) => {
                let _ = pusher.set(p);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "starting the push workers failed; partly local files are read page by page"
            ),
        }
    }
    Ok(session)
}

/// Serves `session` on its threads until the mount goes away. At unmount the kernel normally
/// ends each reader's `read(/dev/fuse)` with ENODEV, but a reader that has just taken a
/// request off the input queue when unmount disconnects the processing queues gets
/// ECONNABORTED instead: `fs/fuse/dev.c` `fuse_dev_do_read`, "Must not put request on
/// fpq->io queue after having been shut down by fuse_abort_conn()", which answers
/// `-ECONNABORTED` whatever `fc->aborted` says. (The other ECONNABORTED there needs
/// `fc->aborted`, which only a write to the fusectl `abort` file sets, and only for a server
/// that asked for `FUSE_ABORT_ERROR`; incfs does not.) It is a race of the unmount with a
/// request still queued, likelier the more reader threads (each cloned fd has its own queue)
/// and requests there are; either way the mount is over and fuser has shut the file system
/// down (cache closed), so both end the session cleanly.
pub fn run_session(session: fuser::Session<FuseFs>) -> io::Result<()> {
    match session.run() {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!(
                "a FUSE request raced with the unmount (ECONNABORTED); the mount is over"
            );
            Ok(())
        }
        r => r,
    }
}

/// Mounts `fs` at `mountpoint` and serves it on background threads until the returned
/// session is dropped or unmounted.
pub fn spawn_mount(
    fs: Arc<IncFs>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<fuser::BackgroundSession> {
    new_session(fs, mountpoint, opts)?.spawn()
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0, nothing else read by the kernel.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
            || config.set_max_stack_depth(1).is_err()
        {
            tracing::warn!(
                "the kernel offers no FUSE passthrough; local files are served through incfs"
            );
            self.fs.disable_passthrough();
        }
        // Listings carry their entries' attributes (READDIRPLUS), so a name a program has
        // listed needs no LOOKUP of its own (Python's imports list every directory on their
        // path: 1,906 → 1,148 lookups in a start of the python workload).
        let _ = config.add_capabilities(
            InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_DO_READDIRPLUS,
        );
        if let Err(max) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(max);
        }
        // Page-cache reads reach us as background requests, of which the kernel keeps at
        // most `max_background` outstanding (fuser's default: 16). Misses no longer hold a
        // thread here, so let many more programs' reads wait at once (the kernel caps it
        // for unprivileged mounts at fuse.max_user_bgreq).
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        Ok(())
    }

    /// No ioctls: ENOTTY, what a program probing a regular file (`isatty`, terminal
    /// queries) expects — quietly, where fuser's default logs a warning per call.
    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.follow(req);
        reply.error(Errno::ENOTTY);
    }

    fn destroy(&mut self) {
        if let Some(p) = self.pusher.get() {
            p.stop();
        }
        if let Err(e) = self.fs.shutdown() {
            tracing::error!(error = %e, "closing the cache on unmount failed");
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = parent.0))]
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.follow(req);
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            // The image never changes: a name that is absent stays absent. Node id 0 makes
            // the kernel cache the miss (a negative dentry) for TTL, so a program probing
            // many paths (Python's imports, the dynamic loader's search path) asks once.
            Err(FsError::NotFound) => reply.entry(&TTL, &negative_attr(), Generation(0)),
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.follow(req);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.follow(req);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.follow(req);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let (fh, mode) = match self.fs.open(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(e.to_errno()),
        };
        match mode {
            OpenMode::Cached => {
                // Pushed before the open is answered ([`push`]).
                if let Some(p) = self.pusher.get() {
                    p.opened(ino.0);
                }
                reply.opened(FileHandle(fh), CACHED_OPEN);
            }
            OpenMode::Direct => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            OpenMode::Passthrough { file, permit } => {
                let mut b = self.backings.lock();
                let backing = match b.by_inode.get(&ino.0).and_then(Weak::upgrade) {
                    Some(backing) => Ok(backing),
                    None => reply.open_backing(&file).map(|id| {
                        Arc::new(Backing {
                            id,
                            _permit: permit,
                        })
                    }),
                };
                match backing {
                    Ok(backing) => {
                        b.by_inode.insert(ino.0, Arc::downgrade(&backing));
                        b.by_handle.insert(fh, Arc::clone(&backing));
                        reply.opened_passthrough(
                            FileHandle(fh),
                            FopenFlags::FOPEN_NOFLUSH,
                            &backing.id,
                        );
                    }
                    Err(err) => {
                        if err.raw_os_error() == Some(libc::EPERM) {
                            // Registering a backing file needs CAP_SYS_ADMIN: an ordinary
                            // user's mount never gets it, so stop asking (one log line).
                            if self.fs.disable_passthrough() {
                                tracing::warn!(error = %err, "the kernel refuses FUSE passthrough to this user; serving every file through incfs");
                            }
                        } else {
                            tracing::warn!(error = %err, "registering a passthrough backing file failed; serving it cached");
                        }
                        match self.fs.passthrough_failed(fh) {
                            Ok(()) => reply.opened(FileHandle(fh), CACHED_OPEN),
                            Err(e) => {
                                self.fs.release(fh);
                                reply.error(e.to_errno());
                            }
                        }
                    }
                }
            }
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0, offset, size))]
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.follow(req);
        // Answered when the data is there, from whichever thread has it: a miss holds no
        // event-loop thread while it waits for the source.
        self.fs
            .read_then(ino.0, fh.0, offset, size, move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e.to_errno()),
            });
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.follow(req);
        self.fs.release(fh.0);
        let mut b = self.backings.lock();
        if b.by_handle.remove(&fh.0).is_some()
            && b.by_inode
                .get(&ino.0)
                .is_some_and(|w| w.strong_count() == 0)
        {
            b.by_inode.remove(&ino.0);
        }
        reply.ok();
    }

    /// ENOSYS, once: the kernel then opens directories itself (`no_opendir`, with
    /// `FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR`, what an answer here would say: the tree never
    /// changes, listings stay cached) and sends neither OPENDIR nor RELEASEDIR again, two
    /// round trips fewer per listed directory.
    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.follow(req);
        self.fs.count_dir_open();
        reply.error(Errno::ENOSYS);
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0, offset))]
    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.follow(req);
        match self.fs.readdir(ino.0, offset) {
            Ok(items) => {
                for it in items {
                    if reply.add(
                        INodeNo(it.ino),
                        it.next_offset,
                        file_type(it.kind),
                        OsStr::from_bytes(&it.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0, offset))]
    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.follow(req);
        match self.fs.readdir(ino.0, offset) {
            Ok(items) => {
                for it in items {
                    let attr = match self.fs.getattr(it.ino) {
                        Ok(a) => file_attr(&a),
                        Err(e) => return reply.error(e.to_errno()),
                    };
                    if reply.add(
                        INodeNo(it.ino),
                        it.next_offset,
                        OsStr::from_bytes(&it.name),
                        &TTL,
                        &attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.follow(req);
        let (blocks, files) = self.fs.statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.follow(req);
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => reply_xattr(v, size, reply),
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.follow(req);
        match self.fs.listxattr(ino.0) {
            Ok(v) => reply_xattr(&v, size, reply),
            Err(e) => reply.error(e.to_errno()),
        }
    }

    #[instrument(skip_all, fields(req = req.unique().0, ino = ino.0))]
    fn access(&self, req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.follow(req);
        match self.fs.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e.to_errno()),
        }
    }
}
