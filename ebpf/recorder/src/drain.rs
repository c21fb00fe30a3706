//! The drain thread: empties the ring buffer into memory while the command runs.
//!
//! It sleeps in `poll(2)` on the ring buffer's fd (and aya-log's) and, when woken, copies
//! every available record; consuming a record is a store to the shared consumer position,
//! not a syscall, so the cost per event is one copy.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use aya::maps::{MapData, RingBuf};
use incfs_common::{Event, Kind, NamedEvent};

/// How long one `poll` sleeps. The probe submits without waking the recorder until an
/// eighth of the ring buffer is used, so this is also how often it reads a slow trickle of
/// events; 10 ms keeps 100 wake-ups a second against a 64 MiB ring that holds a million.
const POLL_TIMEOUT_MS: i32 = 10;

/// The records drained from the ring buffer.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    /// Page-range events, in ring buffer order.
    pub pages: Vec<Event>,
    /// Open and exec events, in ring buffer order.
    pub named: Vec<NamedEvent>,
    /// Working directory of processes that opened a relative name, read when first seen.
    pub cwds: HashMap<u32, PathBuf>,
    /// Records of an unexpected size (none unless probe and recorder disagree).
    pub malformed: u64,
    /// Records read from the ring buffer (the recorder's own included).
    pub records: u64,
    /// Time spent reading records (not sleeping): `records / busy` is the rate the drain
    /// thread sustains.
    pub busy: std::time::Duration,
}

/// The running drain thread. Dropping it without [`Drainer::finish`] (on an error path)
/// still stops the thread.
pub(crate) struct Drainer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Drained>>,
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Drainer {
    /// Starts draining `ring` (and flushing `logger`) on a new thread. Events of `ignore_pid`
    /// (the recorder itself) are dropped.
    pub(crate) fn start(
        ring: RingBuf<MapData>,
        logger: Option<Logger>,
        ignore_pid: u32,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("incfs-drain".into())
            .spawn(move || drain(ring, logger, ignore_pid, &flag))?;
        Ok(Drainer {
            stop,
            handle: Some(handle),
        })
    }

    /// Drains what is left, stops the thread and returns everything it read.
    pub(crate) fn finish(mut self) -> Drained {
        self.stop.store(true, Ordering::Release);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(drained)) => drained,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Drained::default(),
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn drain(
    mut ring: RingBuf<MapData>,
    mut logger: Option<Logger>,
    ignore_pid: u32,
    stop: &AtomicBool,
) -> Drained {
    let mut out = Drained {
        pages: Vec::with_capacity(1 << 16),
        ..Drained::default()
    };
    let mut fds = vec![libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(logger) = &logger {
        fds.push(libc::pollfd {
            fd: logger.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    loop {
        // Read the flag before draining: everything submitted before `finish` is drained.
        let stopping = stop.load(Ordering::Acquire);
        let t0 = std::time::Instant::now();
        let before = out.records;
        while let Some(item) = ring.next() {
            out.records += 1;
            take(&item, ignore_pid, &mut out);
        }
        if out.records != before {
            out.busy += t0.elapsed();
        }
        if let Some(logger) = &mut logger {
            logger.flush();
        }
        if stopping {
            return out;
        }
        poll(&mut fds);
    }
}

fn poll(fds: &mut [libc::pollfd]) {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_TIMEOUT_MS) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            tracing::warn!(%err, "poll on the ring buffer failed; falling back to a timed wait");
            std::thread::sleep(std::time::Duration::from_millis(POLL_TIMEOUT_MS as u64));
        }
    }
}

fn take(bytes: &[u8], ignore_pid: u32, out: &mut Drained) {
    if bytes.len() == size_of::<Event>() {
        // SAFETY: the length is checked; Event is Pod (any bytes are a valid value) and
        // read_unaligned has no alignment requirement.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if e.pid != ignore_pid {
            out.pages.push(e);
        }
    } else if bytes.len() == size_of::<NamedEvent>() {
        // SAFETY: as above, for NamedEvent.
        let e: NamedEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if e.event.pid == ignore_pid {
            return;
        }
        let relative_to_cwd = e.event.kind == Kind::Exec as u32
            || (e.event.kind == Kind::Open as u32 && e.event.dfd == libc::AT_FDCWD);
        if relative_to_cwd && e.name[0] != b'/' && !out.cwds.contains_key(&e.event.pid) {
            // Once per process, not per event: where its relative names start from.
            let link = format!("/proc/{}/cwd", e.event.pid);
            if let Ok(cwd) = std::fs::read_link(&link) {
                out.cwds.insert(e.event.pid, cwd);
            }
        }
        out.named.push(e);
    } else {
        out.malformed += 1;
    }
}
