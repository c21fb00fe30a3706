//! Event-loop threads that run on the CPU of the process they answer.
//!
//! A FUSE request is a round trip between the requesting thread, which sleeps until the
//! answer comes, and an event-loop thread, which sleeps in `read(/dev/fuse)` until a request
//! comes. When the two sit on different CPUs, each leg of the trip wakes a thread on another
//! CPU (an inter-processor interrupt; on a VM, an exit to the host), and the kernel's plain
//! wake-ups on the FUSE queues do not pull the woken thread over. Measured on the 2-core VMs
//! here (python's warm start, `fuse:fuse_request_send`→`fuse_request_end`), a LOOKUP took a
//! median 37 µs across CPUs and 13 µs with both threads on one CPU, an IOCTL 29 and 7 µs.
//! FUSE over io_uring gets the same effect with a queue per CPU; on `/dev/fuse` an event-loop
//! thread can get it by following its requester: every few milliseconds (and when the
//! requester changes), it reads the CPU the requester last ran on (`/proc/PID/stat`, field
//! 39) and pins itself there. The requester is about to sleep on that CPU, so the hand-off
//! is a switch on one CPU, and its answer wakes it where it is.
//!
//! Only the event loops follow: fetching, decompressing and verifying run on the fetch
//! workers, wherever the scheduler puts them. A CPU outside the daemon's allowed set (a
//! cpuset, `taskset`) is never taken.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How long a pin stands before the requester's CPU is read again.
const RECHECK: Duration = Duration::from_millis(2);

/// How soon after a check a new requester is looked up (so a stream of requests from many
/// processes costs at most two `/proc` reads a millisecond per thread).
const RECHECK_NEW_PID: Duration = Duration::from_micros(500);

#[derive(Clone, Copy)]
struct Pin {
    checked: Instant,
    pid: u32,
    /// The CPU the thread is pinned to, if any.
    cpu: Option<usize>,
}

thread_local! {
    static PIN: Cell<Option<Pin>> = const { Cell::new(None) };
    static ALLOWED: Cell<Option<libc::cpu_set_t>> = const { Cell::new(None) };
    static STAT: RefCell<Option<(u32, File)>> = const { RefCell::new(None) };
}

/// Pins the calling event-loop thread to the CPU `pid` (the requester's thread id, as
/// FUSE gives it) last ran on, unless it was pinned for it a moment ago.
pub(super) fn follow(pid: u32) {
    if pid == 0 {
        return;
    }
    let now = Instant::now();
    let last = PIN.get();
    if let Some(p) = last {
        let age = now.saturating_duration_since(p.checked);
        if age < RECHECK && (p.pid == pid || age < RECHECK_NEW_PID) {
            return;
        }
    }
    // Whatever the outcome, the look is rate-limited: a requester that is gone, or a CPU the
    // thread may not take, is not tried again at every request.
    let pinned = last.and_then(|p| p.cpu);
    let cpu = match requester_cpu(pid) {
        Some(cpu) if pinned == Some(cpu) || pin_to(cpu) => Some(cpu),
        _ => pinned,
    };
    PIN.set(Some(Pin {
        checked: now,
        pid,
        cpu,
    }));
}

/// The file stays open while the requester stays the same: a `pread` of it costs a few
/// microseconds, an open and close several times that.
fn requester_cpu(pid: u32) -> Option<usize> {
    STAT.with_borrow_mut(|open| {
        if open.as_ref().is_none_or(|(p, _)| *p != pid) {
            *open = Some((pid, File::open(format!("/proc/{pid}/stat")).ok()?));
        }
        let (_, file) = open.as_ref()?;
        let mut buf = [0u8; 1024];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_processor(&buf[..n])
    })
}

/// Field 39 (`processor`) of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted from the
/// last `)`: the state (field 3) is the first after it.
fn parse_processor(stat: &[u8]) -> Option<usize> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(39 - 3)?.parse().ok()
}

/// Pins the calling thread to `cpu` if the thread's original affinity allows it.
fn pin_to(cpu: usize) -> bool {
    let Some(allowed) = allowed_cpus() else {
        return false;
    };
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `allowed` is an initialised cpu_set_t and `cpu` is below CPU_SETSIZE.
    if !unsafe { libc::CPU_ISSET(cpu, &allowed) } {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET takes an index below CPU_SETSIZE;
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPUs this thread was allowed before it first pinned itself.
fn allowed_cpus() -> Option<libc::cpu_set_t> {
    if let Some(set) = ALLOWED.get() {
        return Some(set);
    }
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    ALLOWED.set(Some(set));
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_processor_field_is_counted_from_the_last_parenthesis() {
        let mut line = b"4242 (py (x) 3) S".to_vec();
        for f in 4..=38 {
            line.extend_from_slice(format!(" {f}").as_bytes());
        }
        line.extend_from_slice(b" 1 0 0 0\n");
        assert_eq!(parse_processor(&line), Some(1));
        assert_eq!(parse_processor(b"4242 (py) S 1 2"), None);
        assert_eq!(parse_processor(b"garbage"), None);
    }

    #[test]
    fn a_thread_follows_the_cpu_its_requester_runs_on() {
        // The requester is the test's thread, asleep in `join` while the follower checks
        // (it may still be on its way to sleep, and be moved, at the first look: the
        // follower looks again after RECHECK until the two agree).
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() } as u32;
        std::thread::spawn(move || {
            let allowed = allowed_cpus().expect("own affinity");
            let mut last = None;
            for _ in 0..100 {
                follow(me);
                let on = requester_cpu(me).expect("the requester's /proc stat");
                // SAFETY: `now` is filled by sched_getaffinity; `on` is a CPU number the
                // kernel reported, below CPU_SETSIZE.
                let (count, pinned_on) = unsafe {
                    let mut now: libc::cpu_set_t = std::mem::zeroed();
                    assert_eq!(
                        libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut now),
                        0
                    );
                    (libc::CPU_COUNT(&now), libc::CPU_ISSET(on, &now))
                };
                // SAFETY: as above.
                let is_allowed = unsafe { libc::CPU_ISSET(on, &allowed) };
                assert!(is_allowed, "CPU {on} not allowed");
                if count == 1 && pinned_on {
                    return;
                }
                last = Some((on, count));
                std::thread::sleep(RECHECK + Duration::from_millis(1));
            }
            panic!("never pinned to the requester's CPU: {last:?}");
        })
        .join()
        .expect("follower thread");
    }
}
