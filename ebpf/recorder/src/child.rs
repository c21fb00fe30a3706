//! Running the command: waiting for it while watching `--duration` and Ctrl-C.
//!
//! SIGINT, SIGTERM and SIGHUP are caught while the command runs (a self-pipe wakes the
//! waiting `poll`), forwarded to the command, and the recording then ends normally so the
//! trace is still written.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long the command gets to exit after it was asked to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The signals that stop a recording.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Write end of the self-pipe, for the signal handler (-1 when none is installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` outlives the call. A full pipe
        // (EAGAIN) just means a wake-up is already pending.
        unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
    }
}

/// Catches the stop signals until dropped (then restores the previous handlers).
pub(crate) struct SignalGuard {
    read: OwnedFd,
    _write: OwnedFd,
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    /// Installs the handlers.
    pub(crate) fn install() -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        WAKE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
        let mut previous = Vec::new();
        for sig in STOP_SIGNALS {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the handler has the
            // signature sa_handler expects and is async-signal-safe.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut old) == 0 {
                    previous.push((sig, old));
                }
            }
        }
        Ok(SignalGuard {
            read,
            _write: write,
            previous,
        })
    }

    /// The first pending caught signal, if any.
    fn pending(&self) -> Option<libc::c_int> {
        let mut buf = [0u8; 16];
        // SAFETY: `buf` is valid for writes of its length; the fd is non-blocking.
        let n = unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        (n > 0).then(|| libc::c_int::from(buf[0]))
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restores a sigaction obtained from the kernel.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        WAKE_FD.store(-1, Ordering::Relaxed);
    }
}

/// Why the recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The command exited by itself.
    Exited,
    /// `--duration` ran out (the command was then stopped).
    Duration,
    /// The recorder got this signal (e.g. Ctrl-C), forwarded it and waited for the command.
    Signal(i32),
}

/// Waits for `child`, stopping it at `deadline` or on a caught signal.
pub(crate) fn wait(
    child: &mut Child,
    signals: &SignalGuard,
    deadline: Option<Instant>,
) -> std::io::Result<(ExitStatus, StopReason)> {
    let pid = child.id() as libc::pid_t;
    let pidfd = pidfd_open(pid)?;
    let mut reason = StopReason::Exited;
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, reason));
        }
        let now = Instant::now();
        if let Some(at) = kill_at
            && now >= at
        {
            tracing::warn!(pid, "the command did not stop in time; killing it");
            child.kill()?;
            kill_at = None;
        }
        if reason == StopReason::Exited
            && let Some(d) = deadline
            && now >= d
        {
            reason = StopReason::Duration;
            send(pid, libc::SIGTERM);
            kill_at = Some(now + STOP_GRACE);
        }
        let wake = [
            kill_at,
            (reason == StopReason::Exited).then_some(deadline).flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = wake.map_or(-1, |w| {
            i32::try_from(w.saturating_duration_since(now).as_millis().max(1)).unwrap_or(i32::MAX)
        });
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        if let Some(sig) = signals.pending() {
            tracing::info!(
                sig,
                "stopping: signal received, forwarding it to the command"
            );
            send(pid, sig);
            if kill_at.is_none() {
                kill_at = Some(Instant::now() + STOP_GRACE);
            }
            reason = StopReason::Signal(sig);
        }
    }
}

fn send(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory preconditions; the child is not reaped yet, so `pid`
    // still names it.
    unsafe { libc::kill(pid, sig) };
}

fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
