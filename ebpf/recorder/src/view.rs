//! The readahead-0 view: a transient, read-only FUSE loopback of a root, seen only by the
//! recorded command.
//!
//! Readahead and fault-around hide the demand set on an ordinary file system: a cold start
//! of clang from ext4 with `read_ahead_kb` 8192 faults 1,113 pages of the 9,688 it needs,
//! because readahead brought the rest in without a fault. So the recorder runs the command
//! in a private mount namespace where each root is covered by a FUSE view of itself whose
//! `max_readahead` is 0 (and without passthrough): the program sees its usual paths, every
//! page it faults or reads reaches the view's page cache one request at a time (a 4 KiB
//! fault or the read's own range), and the probe's `fault` and `get_pages` events on the
//! view's inodes are the demand set. The view's page cache starts empty whatever the disk
//! caches, so no eviction is needed, and tmpfs, NFS and overlay trees work alike.
//!
//! Nothing on the machine changes: the mount exists only in the command's namespace (made
//! private before the view is mounted, so nothing propagates back) and goes away with the
//! last process in it; if the recorder dies, its `/dev/fuse` descriptor closes, the
//! connection is aborted and the namespace dies with the command.
//!
//! Setup, in order:
//! 1. [`View::new`] opens `/dev/fuse` and prepares the mount arguments (before `fork`,
//!    since the child may only make async-signal-safe calls).
//! 2. [`View::serve`] starts a thread that waits on a pipe for the child.
//! 3. In the child, [`enter`] unshares the mount namespace, makes every mount private,
//!    mounts each view over its root, re-enters the working directory (so relative paths
//!    go through the views), and writes its pid to each pipe.
//! 4. Each serving thread holds the child's mount namespace (`/proc/PID/ns/mnt`), reads the
//!    view's device number from its `/proc/PID/mountinfo`, answers the kernel's `INIT`
//!    (readahead 0) and serves until the namespace dies: when the command has exited and
//!    [`View::finish`] lets the namespace go.
//!
//! A symlink under a root whose target lies outside every root (the Debian install's
//! `libLLVM.so.22.1`, for one) is shown as the regular file it leads to, so its pages pass
//! through the view too, and are named by the symlink's path.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use crate::files::FileId;

/// The file system type the views mount as (`fuse.` + subtype, as `/proc/mounts` shows it).
const FS_TYPE: &str = "fuse.incfs-view";

/// How long the kernel may cache the view's attributes and entries: the traced tree is not
/// expected to change during a recording, and every cached lookup is one request less.
const TTL: Duration = Duration::from_secs(3600);

/// Event-loop threads per view: two, so one slow read of the underlying file system does
/// not stall the program's other threads on a two-core machine.
const THREADS: usize = 2;

/// How long [`View::finish`] waits for a view whose command has exited to end its session.
/// A process of the command that outlives it (a daemon) keeps the namespace alive; the
/// serving threads are then left to end with it.
const FINISH_WAIT: Duration = Duration::from_secs(2);

/// What can go wrong setting a view up.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// `/dev/fuse` cannot be opened.
    #[error(
        "cannot open /dev/fuse for the readahead-0 view (load the fuse module, or in a \
         container pass --device /dev/fuse); without it, --no-view records on the file \
         system directly, where readahead hides most of the demand set"
    )]
    DevFuse(#[source] std::io::Error),
    /// A root's path cannot be passed to mount(2).
    #[error("root {0}: the path contains a NUL byte")]
    Path(PathBuf),
    /// The serving thread could not be started.
    #[error("cannot start the view's thread")]
    Thread(#[source] std::io::Error),
}

/// One node of a view: the path it serves from, and how.
#[derive(Debug, Clone)]
struct Node {
    /// The real path (also the path the program sees).
    path: PathBuf,
    /// A symlink leading outside every root, served as the regular file it leads to.
    follow: bool,
    /// The (dev, ino) of the file it served, once opened.
    served: Option<FileId>,
}

/// The view's state, shared by its serving threads and the recorder.
#[derive(Debug, Default)]
struct State {
    /// Node `i` has node id `i + 1` (1 is the root).
    nodes: Vec<Node>,
    by_path: HashMap<PathBuf, u64>,
    handles: HashMap<u64, Arc<File>>,
    next_fh: u64,
    /// Distinct 4 KiB pages read through the view, per node id.
    pages: HashMap<u64, Vec<(u64, u64)>>,
    /// Read requests answered.
    reads: u64,
    /// Read requests that failed on the underlying file.
    failed_reads: u64,
    /// The view's `st_dev`, once the serving thread has read it.
    dev: Option<u64>,
    /// Page size, for `pages`.
    page_size: u64,
    /// The command's mount namespace (`/proc/PID/ns/mnt`), held so the views outlive the
    /// command until [`View::finish`]: the `RELEASE`s its exit sends are then answered
    /// before the namespace (and the mount) goes, instead of racing its teardown.
    ns: Option<OwnedFd>,
}

/// The [`fuser::Filesystem`] of a view.
struct ViewFs {
    roots: Arc<Vec<PathBuf>>,
    state: Arc<Mutex<State>>,
}

/// A view of one root, prepared before the command is spawned.
pub(crate) struct View {
    root: PathBuf,
    c_root: CString,
    c_options: CString,
    dev_fuse: Option<OwnedFd>,
    /// Read end of the pipe the child writes its pid to (taken by [`View::serve`]).
    pipe_read: Option<OwnedFd>,
    /// Write end, used by the child only; closed in the parent after the spawn.
    pipe_write: Option<OwnedFd>,
    state: Arc<Mutex<State>>,
    roots: Arc<Vec<PathBuf>>,
    thread: Option<JoinHandle<Served>>,
}

/// What a serving thread reports when it ends.
#[derive(Debug, Default)]
struct Served {
    /// The view's device number (userspace `st_dev`), when it was read.
    dev: Option<u64>,
    /// Why serving ended early, if it did.
    error: Option<String>,
}

/// What a view saw, for [`crate::record`].
#[derive(Debug, Default)]
pub(crate) struct ViewReport {
    /// The view's `st_dev` (the device the probe's events on its files carry).
    pub dev: Option<u64>,
    /// Node id → (real file, path under the root as the program used it).
    pub files: HashMap<u64, (FileId, String)>,
    /// Distinct pages the view served.
    pub pages: u64,
    /// Read requests the view answered.
    pub reads: u64,
    /// Reads that failed on the underlying file (the program saw EIO).
    pub failed_reads: u64,
    /// Why the view stopped serving early, if it did.
    pub error: Option<String>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl View {
    /// Prepares a view of `root` (canonical); `roots` are all the recording's roots.
    pub(crate) fn new(root: &Path, roots: Arc<Vec<PathBuf>>) -> Result<View, ViewError> {
        let dev_fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(ViewError::DevFuse)?;
        let dev_fuse = OwnedFd::from(dev_fuse);
        let (pipe_read, pipe_write) = pipe().map_err(ViewError::Thread)?;
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let options = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions",
            dev_fuse.as_raw_fd()
        );
        let c_root = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| ViewError::Path(root.to_path_buf()))?;
        let c_options = CString::new(options).map_err(|_| ViewError::Path(root.to_path_buf()))?;
        let state = State {
            nodes: vec![Node {
                path: root.to_path_buf(),
                follow: false,
                served: None,
            }],
            by_path: [(root.to_path_buf(), 1)].into_iter().collect(),
            next_fh: 1,
            page_size: u64::from(crate::page_size()),
            ..State::default()
        };
        Ok(View {
            root: root.to_path_buf(),
            c_root,
            c_options,
            dev_fuse: Some(dev_fuse),
            pipe_read: Some(pipe_read),
            pipe_write: Some(pipe_write),
            state: Arc::new(Mutex::new(state)),
            roots,
            thread: None,
        })
    }

    /// Starts the thread that serves the view once the child has mounted it.
    pub(crate) fn serve(&mut self) -> Result<(), ViewError> {
        let (Some(fd), Some(pipe)) = (self.dev_fuse.take(), self.pipe_read.take()) else {
            return Ok(());
        };
        let fs = ViewFs {
            roots: Arc::clone(&self.roots),
            state: Arc::clone(&self.state),
        };
        let root = self.root.clone();
        let thread = std::thread::Builder::new()
            .name("incfs-view".into())
            .spawn(move || serve(fs, fd, pipe, &root))
            .map_err(ViewError::Thread)?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Closes the parent's copy of the pipe's write end (after the spawn), so the serving
    /// thread sees EOF if the child died before mounting.
    pub(crate) fn spawned(&mut self) {
        self.pipe_write = None;
    }

    /// Waits (briefly) for the view to end and reports what it saw.
    pub(crate) fn finish(mut self) -> ViewReport {
        self.pipe_write = None;
        // Let the namespace go: when no process of the command is left in it, the view is
        // unmounted and the serving threads end.
        drop(lock(&self.state).ns.take());
        let mut served = Served::default();
        if let Some(thread) = self.thread.take() {
            let until = Instant::now() + FINISH_WAIT;
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                served = thread.join().unwrap_or_else(|_| Served {
                    dev: None,
                    error: Some("the view's thread panicked".into()),
                });
            } else {
                tracing::warn!(
                    root = %self.root.display(),
                    "a process of the command still runs in its namespace; the view keeps \
                     serving it until it exits"
                );
            }
        }
        let st = lock(&self.state);
        if served.dev.or(st.dev).is_none() && st.reads > 0 {
            tracing::warn!(
                root = %self.root.display(),
                "the view's device number is unknown: its files' events stay without a path"
            );
        }
        let files = st
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let id = n.served?;
                let path = n.path.to_str()?.to_owned();
                Some((i as u64 + 1, (id, path)))
            })
            .collect();
        let pages = st
            .pages
            .values()
            .map(|r| crate::union_len(&mut r.clone()))
            .sum();
        ViewReport {
            dev: served.dev.or(st.dev),
            files,
            pages,
            reads: st.reads,
            failed_reads: st.failed_reads,
            error: served.error,
        }
    }
}

/// What the child needs to enter the views: plain data, prepared before `fork`.
pub(crate) struct EnterPlan {
    mounts: Vec<(CString, CString, RawFd)>,
    cwd: Option<CString>,
    /// The recorder's pid, to tell whether it died before the child armed its death signal.
    parent: libc::pid_t,
}

impl EnterPlan {
    /// The plan for `views`; `cwd` is re-entered after mounting when it lies under a root.
    pub(crate) fn new(views: &[View]) -> EnterPlan {
        let cwd = std::env::current_dir()
            .ok()
            .and_then(|d| std::fs::canonicalize(d).ok())
            .filter(|d| views.iter().any(|v| d.starts_with(&v.root)))
            .and_then(|d| CString::new(d.as_os_str().as_bytes()).ok());
        EnterPlan {
            mounts: views
                .iter()
                .map(|v| {
                    (
                        v.c_root.clone(),
                        v.c_options.clone(),
                        v.pipe_write.as_ref().map_or(-1, |p| p.as_raw_fd()),
                    )
                })
                .collect(),
            cwd,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        }
    }
}

/// In the forked child, before `exec`: enter a private mount namespace and mount the views.
///
/// Only async-signal-safe calls (no allocation): this runs between `fork` and `exec`.
pub(crate) fn enter(plan: &EnterPlan) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    // The command cannot outlive its recorder: without the recorder its views are gone,
    // and a program blocked on one would wait for nothing.
    // SAFETY: prctl with these arguments has no memory preconditions.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return fail();
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != plan.parent {
        // The recorder died before the signal was armed.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: unshare has no memory preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return fail();
    }
    // SAFETY: the strings are NUL-terminated literals; a null source and type are allowed
    // for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return fail();
    }
    let fs_type = c"fuse.incfs-view";
    debug_assert_eq!(fs_type.to_bytes(), FS_TYPE.as_bytes());
    for (root, options, _) in &plan.mounts {
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"incfs-view".as_ptr(),
                root.as_ptr(),
                fs_type.as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return fail();
        }
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() }.to_ne_bytes();
    for (_, _, pipe) in &plan.mounts {
        // SAFETY: `pid` is valid for reads of its length; a pipe write of 4 bytes is atomic.
        if unsafe { libc::write(*pipe, pid.as_ptr().cast(), pid.len()) } != pid.len() as isize {
            return fail();
        }
    }
    if let Some(cwd) = &plan.cwd {
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
            return fail();
        }
    }
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The serving thread: waits for the child's pid, finds the view's device, serves.
fn serve(fs: ViewFs, fd: OwnedFd, pipe: OwnedFd, root: &Path) -> Served {
    let mut pid = [0u8; 4];
    if File::from(pipe).read_exact(&mut pid).is_err() {
        // The child died (or failed) before mounting: nothing to serve.
        return Served::default();
    }
    let pid = i32::from_ne_bytes(pid);
    match File::open(format!("/proc/{pid}/ns/mnt")) {
        Ok(ns) => lock(&fs.state).ns = Some(OwnedFd::from(ns)),
        Err(e) => tracing::debug!(pid, error = %e, "cannot hold the command's mount namespace"),
    }
    let dev = mount_dev(pid, root);
    match dev {
        Some(_) => lock(&fs.state).dev = dev,
        // The command may already be gone (a failed exec): [`View::finish`] warns if the
        // view served reads whose events then cannot be mapped back.
        None => tracing::debug!(
            pid,
            root = %root.display(),
            "cannot find the view in the command's mountinfo"
        ),
    }
    let mut config = Config::default();
    config.n_threads = Some(THREADS);
    config.clone_fd = true;
    let result = fuser::Session::from_fd(fs, fd, SessionACL::All, config.clone())
        .and_then(fuser::Session::run);
    let error = match result {
        Ok(()) => None,
        // The namespace died: the connection ends as gone or aborted.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ECONNABORTED)) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotConnected => None,
        Err(e) => Some(e.to_string()),
    };
    Served { dev, error }
}

/// The `st_dev` of the view mounted at `root` in the mount namespace of `pid`.
fn mount_dev(pid: i32, root: &Path) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    parse_mountinfo_dev(&info, root)
}

/// Finds the last `FS_TYPE` mount at `root` in a mountinfo text and returns its device.
fn parse_mountinfo_dev(info: &str, root: &Path) -> Option<u64> {
    let root = root.to_str()?;
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        let fs_type = right.split(' ').next()?;
        let mount_point = unescape_mountinfo(fields.get(4)?);
        if fs_type != FS_TYPE || mount_point != root {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|oct| std::str::from_utf8(oct).ok())
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ViewFs {
    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        let st = lock(&self.state);
        usize::try_from(ino.0)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| st.nodes.get(i))
            .cloned()
            .ok_or(Errno::ESTALE)
    }

    /// The node id of `path`, allocated on first sight.
    fn node_id(&self, path: PathBuf, follow: bool) -> u64 {
        let mut st = lock(&self.state);
        if let Some(&id) = st.by_path.get(&path) {
            if follow && let Some(n) = st.nodes.get_mut(id as usize - 1) {
                n.follow = true;
            }
            return id;
        }
        st.nodes.push(Node {
            path: path.clone(),
            follow,
            served: None,
        });
        let id = st.nodes.len() as u64;
        st.by_path.insert(path, id);
        id
    }

    /// Whether a symlink at `path` leads to a regular file outside every root.
    fn leads_outside(&self, path: &Path) -> bool {
        match (std::fs::canonicalize(path), std::fs::metadata(path)) {
            (Ok(real), Ok(meta)) => {
                meta.is_file() && !self.roots.iter().any(|r| real.starts_with(r))
            }
            _ => false,
        }
    }

    /// Looks `path` up on the real file system and gives its node id and attributes.
    fn stat(&self, path: PathBuf) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(&path).map_err(io_errno)?;
        let follow = meta.file_type().is_symlink() && self.leads_outside(&path);
        let meta = if follow {
            std::fs::metadata(&path).map_err(io_errno)?
        } else {
            meta
        };
        let id = self.node_id(path, follow);
        Ok(attr(id, &meta))
    }

    fn attr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        let meta = if node.follow {
            std::fs::metadata(&node.path)
        } else {
            std::fs::symlink_metadata(&node.path)
        }
        .map_err(io_errno)?;
        Ok(attr(ino.0, &meta))
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |secs: i64, nsecs: i64| {
        let secs = u64::try_from(secs).unwrap_or(0);
        UNIX_EPOCH + Duration::new(secs, u32::try_from(nsecs).unwrap_or(0))
    };
    let kind = dirent_type(m.file_type());
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: t(m.mtime(), m.mtime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        uid: m.uid(),
        gid: m.gid(),
        rdev: u32::try_from(m.rdev()).unwrap_or(0),
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

fn dirent_type(ft: std::fs::FileType) -> FileType {
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_file() {
        FileType::RegularFile
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else {
        FileType::Socket
    }
}

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // fuser refuses 0; 1 byte is 0 pages, which turns the kernel's readahead off
        // (ra_pages = max_readahead / PAGE_SIZE).
        if let Err(nearest) = config.set_max_readahead(1) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = match self.node(parent) {
            Ok(n) => n.path,
            Err(e) => return reply.error(e),
        };
        match self.stat(dir.join(name)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            // Node id 0: the kernel caches the miss (a negative dentry), so a program that
            // probes many paths (Python's imports, the loader's search path) asks once. The
            // view is read-only, so nothing appears under it during the recording.
            Err(e) if e == Errno::ENOENT => reply.entry(&TTL, &negative_attr(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .node(ino)
            .and_then(|n| std::fs::read_link(n.path).map_err(io_errno))
        {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let file = match File::open(&node.path) {
            Ok(f) => f,
            Err(e) => return reply.error(io_errno(e)),
        };
        let id = match file.metadata() {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => return reply.error(io_errno(e)),
        };
        let mut st = lock(&self.state);
        if let Some(n) = (ino.0 as usize)
            .checked_sub(1)
            .and_then(|i| st.nodes.get_mut(i))
        {
            n.served = Some(id);
        }
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, Arc::new(file));
        // KEEP_CACHE: the tree does not change while it is recorded, and pages cached by one
        // open serve the next without a second (uncounted) request.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = lock(&self.state).handles.get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        let result = loop {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    done += n;
                    if done == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let mut st = lock(&self.state);
        match result {
            Ok(()) => {
                st.reads += 1;
                if done > 0 {
                    let first = offset / st.page_size;
                    let end = (offset + done as u64).div_ceil(st.page_size);
                    st.pages.entry(ino.0).or_default().push((first, end));
                }
                drop(st);
                reply.data(&buf[..done]);
            }
            Err(e) => {
                st.failed_reads += 1;
                drop(st);
                tracing::warn!(ino = ino.0, offset, size, error = %e, "view: read failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attr_of(ino) {
            Ok(a) if a.kind == FileType::Directory => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.node(ino) {
            Ok(n) => n.path,
            Err(e) => return reply.error(e),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => return reply.error(io_errno(e)),
        };
        // Offsets: 1 after ".", 2 after "..", 3 + i after the i-th entry. The listing is
        // re-read on every call, so a directory that changes meanwhile may skip or repeat
        // entries, as on any file system.
        let mut items: Vec<(u64, FileType, std::ffi::OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let id = self.node_id(e.path(), false);
            items.push((id, dirent_type(ft), e.file_name()));
        }
        for (i, (id, kind, name)) in items.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*id), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let path = match self.node(ino) {
            Ok(n) => n.path,
            Err(e) => return reply.error(e),
        };
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return reply.error(Errno::EINVAL);
        };
        // SAFETY: a zeroed statvfs is a valid buffer to fill.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated, `s` is valid for writes.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(io_errno(std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            u32::try_from(s.f_bsize).unwrap_or(4096),
            u32::try_from(s.f_namemax).unwrap_or(255),
            u32::try_from(s.f_frsize).unwrap_or(4096),
        );
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// No ioctls: ENOTTY, what a program probing a regular file expects.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_view_in_mountinfo() {
        let info = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
90 22 0:61 / /work/tree rw,nosuid,nodev,relatime - fuse.incfs-view incfs-view rw,user_id=0
91 22 0:62 / /work/my\\040tree rw,nosuid,nodev,relatime - fuse.incfs-view incfs-view rw
92 22 0:63 / /work/other rw - fuse.other x rw
";
        assert_eq!(
            parse_mountinfo_dev(info, Path::new("/work/tree")),
            Some(libc::makedev(0, 61))
        );
        assert_eq!(
            parse_mountinfo_dev(info, Path::new("/work/my tree")),
            Some(libc::makedev(0, 62))
        );
        assert_eq!(parse_mountinfo_dev(info, Path::new("/work/other")), None);
        assert_eq!(parse_mountinfo_dev(info, Path::new("/")), None);
    }
}
