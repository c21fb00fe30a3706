//! Types shared between the incfs probe (kernel side) and the recorder (userspace).
//!
//! The probe writes [`Event`]s (and [`NamedEvent`]s for opens and execs) into the ring buffer
//! map [`EVENTS_MAP`]; the recorder reads them back byte for byte. Every type is `#[repr(C)]`
//! with explicit padding fields, so both sides agree on the layout without implicit padding.
//!
//! Tracepoint record layouts differ between kernels, so the probe takes the field offsets
//! from [`Config`], which the recorder fills in at load time from
//! `/sys/kernel/tracing/events/*/*/format` (the global [`CONFIG_GLOBAL`]).
#![no_std]

/// Name of the ring buffer map carrying events to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the hash map of tracked thread group ids (key `u32` tgid, value `u32` unused).
pub const TRACKED_MAP: &str = "TRACKED";
/// Name of the per-CPU array (one `u64` slot per [`Counter`]) of the probe's counters.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Name of the per-CPU array (one [`Event`]) holding each CPU's `AddToCache` event still
/// being extended: contiguous folios added by one thread are merged into one event, which
/// is submitted when the next one does not continue it. The recorder reads what is left
/// here when it stops.
pub const PENDING_MAP: &str = "PENDING";
/// Name of the global variable holding the [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// Bytes of a thread's command name, as the kernel's `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// Bytes of the file name carried by a [`NamedEvent`], terminating NUL included; longer
/// names are cut (the recorder then cannot resolve them and drops the event).
pub const NAME_LEN: usize = 256;

/// The probe's counters, indices into [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Events lost because the ring buffer was full (`bpf_ringbuf_reserve` failed).
    Lost = 0,
    /// Processes that could not be tracked because [`TRACKED_MAP`] was full.
    TrackFailed = 1,
}

/// Number of slots in [`COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = 2;

/// What an [`Event`] records (its `kind` field).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `filemap:mm_filemap_fault`: one page faulted through a mapping.
    Fault = 1,
    /// `filemap:mm_filemap_map_pages`: the range fault-around tried to map.
    MapPages = 2,
    /// `filemap:mm_filemap_get_pages`: the range the read path asked for.
    GetPages = 3,
    /// `filemap:mm_filemap_add_to_page_cache`: folios added to the page cache (from storage);
    /// contiguous folios added by one thread in a row are merged into one event.
    AddToCache = 4,
    /// `syscalls:sys_enter_openat`: a file name was opened (a [`NamedEvent`]).
    Open = 5,
    /// `sched:sched_process_exec`: a program was executed (a [`NamedEvent`]).
    Exec = 6,
}

impl Kind {
    /// The kind stored as `raw`, if any.
    pub fn from_u32(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Kind::Fault,
            2 => Kind::MapPages,
            3 => Kind::GetPages,
            4 => Kind::AddToCache,
            5 => Kind::Open,
            6 => Kind::Exec,
            _ => return None,
        })
    }
}

/// One page-range event (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event happened.
    pub ts_ns: u64,
    /// Inode number of the file (0 for named events).
    pub ino: u64,
    /// First page index.
    pub index: u64,
    /// Thread group id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Device of the file in the kernel's encoding (`major << 20 | minor`), 0 for named events.
    pub kernel_dev: u32,
    /// A [`Kind`] as `u32`.
    pub kind: u32,
    /// Number of pages from `index` (0 for named events).
    pub nr_pages: u32,
    /// For opens: the `dfd` argument (`AT_FDCWD` is -100); 0 otherwise.
    pub dfd: i32,
    /// The thread's command name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// An [`Event`] followed by a file name (opens and execs; 320 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedEvent {
    /// The common part; `kind` is [`Kind::Open`] or [`Kind::Exec`].
    pub event: Event,
    /// The file name as the program gave it, NUL-terminated.
    pub name: [u8; NAME_LEN],
}

/// Offset (in bytes from the start of the tracepoint record) of every field the probe reads.
///
/// Filled in by the recorder from the tracepoint format files; a field the running kernel
/// does not have is [`Config::ABSENT`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// `mm_filemap_fault.i_ino` (u64).
    pub fault_ino: u32,
    /// `mm_filemap_fault.s_dev` (u32).
    pub fault_dev: u32,
    /// `mm_filemap_fault.index` (u64).
    pub fault_index: u32,
    /// `mm_filemap_map_pages.i_ino`.
    pub map_pages_ino: u32,
    /// `mm_filemap_map_pages.s_dev`.
    pub map_pages_dev: u32,
    /// `mm_filemap_map_pages.index`.
    pub map_pages_index: u32,
    /// `mm_filemap_map_pages.last_index` (u64).
    pub map_pages_last: u32,
    /// `mm_filemap_get_pages.i_ino`.
    pub get_pages_ino: u32,
    /// `mm_filemap_get_pages.s_dev`.
    pub get_pages_dev: u32,
    /// `mm_filemap_get_pages.index`.
    pub get_pages_index: u32,
    /// `mm_filemap_get_pages.last_index`.
    pub get_pages_last: u32,
    /// `mm_filemap_add_to_page_cache.i_ino`.
    pub add_ino: u32,
    /// `mm_filemap_add_to_page_cache.s_dev`.
    pub add_dev: u32,
    /// `mm_filemap_add_to_page_cache.index`.
    pub add_index: u32,
    /// `mm_filemap_add_to_page_cache.order` (u8); [`Config::ABSENT`] on kernels without
    /// large folios in page cache events (then one page).
    pub add_order: u32,
    /// `sched_process_fork.child_pid` (i32).
    pub fork_child_pid: u32,
    /// `sched_process_exec.filename` (`__data_loc char[]`: u32, offset in the low 16 bits,
    /// length in the high 16).
    pub exec_filename: u32,
    /// `sched_process_exit.pid` (i32, the exiting thread's id).
    pub exit_pid: u32,
    /// `sched_process_exit.group_dead` (bool) or [`Config::ABSENT`].
    pub exit_group_dead: u32,
    /// `sys_enter_openat.dfd` (8 bytes, int in the low 4).
    pub openat_dfd: u32,
    /// `sys_enter_openat.filename` (user pointer, 8 bytes).
    pub openat_filename: u32,
    /// Nonzero: emit [`Kind::Open`] events.
    pub trace_opens: u32,
    /// Wake the recorder only when at least this many bytes wait in the ring buffer; below
    /// that, events are submitted without a wake-up and the recorder finds them on its next
    /// timed poll. (A wake-up per event costs the traced program a context switch.)
    pub wakeup_bytes: u32,
}

impl Config {
    /// Marks a field the running kernel's tracepoint does not have.
    pub const ABSENT: u32 = u32::MAX;

    /// The layouts of kernel 6.18 (see DESIGN.md); only a default for the probe's global,
    /// which the recorder always overrides with what the format files say.
    pub const fn linux_6_18() -> Self {
        Config {
            fault_ino: 8,
            fault_dev: 16,
            fault_index: 24,
            map_pages_ino: 8,
            map_pages_dev: 16,
            map_pages_index: 24,
            map_pages_last: 32,
            get_pages_ino: 8,
            get_pages_dev: 16,
            get_pages_index: 24,
            get_pages_last: 32,
            add_ino: 16,
            add_dev: 32,
            add_index: 24,
            add_order: 36,
            fork_child_pid: 20,
            exec_filename: 8,
            exit_pid: 24,
            exit_group_dead: 32,
            openat_dfd: 16,
            openat_filename: 24,
            trace_opens: 1,
            wakeup_bytes: 1 << 20,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, only integer fields and byte arrays, no padding (64 bytes).
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: `#[repr(C)]`, an `Event` and a byte array, no padding.
    unsafe impl aya::Pod for super::NamedEvent {}
    // SAFETY: `#[repr(C)]`, only `u32` fields, no padding.
    unsafe impl aya::Pod for super::Config {}
}

// No implicit padding: the sizes are the sums of the fields.
const _: () = assert!(size_of::<Event>() == 64);
const _: () = assert!(size_of::<NamedEvent>() == 64 + NAME_LEN);
const _: () = assert!(size_of::<Config>() == 23 * 4);
