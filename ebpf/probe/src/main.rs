//! The incfs eBPF probe: page-level file accesses of one process tree.
//!
//! Seven tracepoint programs share three maps:
//! - `sched:sched_process_fork` adds the child to [`TRACKED`] when the parent's thread group
//!   is tracked; `sched:sched_process_exit` removes exiting threads and, when the whole group
//!   is dead, the group. The recorder puts its own tgid there while it spawns the command, so
//!   the command is tracked from its first instruction, and removes it right after.
//! - the `filemap:*` programs emit one [`Event`] per page range touched by a tracked process;
//!   `sched:sched_process_exec` and `syscalls:sys_enter_openat` emit [`NamedEvent`]s.
//!
//! Events go through the ring buffer `EVENTS` (reserve, write, submit); a failed reserve
//! bumps [`Counter::Lost`] so the recorder can report what it missed. Field offsets come
//! from the [`Config`] global, which the recorder fills from the tracepoint format files.
//!
//! On the host (a `cargo build --workspace`) this is an empty program: the probe only means
//! something when aya-build compiles it for `bpfel-unknown-none`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        Global,
        bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
            bpf_probe_read_user_str_bytes, generated,
        },
        macros::{map, tracepoint},
        maps::{HashMap, PerCpuArray, RingBuf},
        programs::TracePointContext,
    };
    use aya_log_ebpf::warn;
    use incfs_common::{COMM_LEN, COUNTER_SLOTS, Config, Counter, Event, Kind, NamedEvent};

    /// Default ring buffer size; the recorder sets the real one at load time.
    const DEFAULT_RING_BYTES: u32 = 64 << 20;
    /// Processes and threads tracked at once (threads of tracked groups get an entry too,
    /// until they exit).
    const MAX_TRACKED: u32 = 65536;

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

    #[map]
    static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TRACKED, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

    /// Each CPU's add-to-cache event still being extended (see `PENDING_MAP`). Classic
    /// tracepoint programs run with preemption disabled and never nest on one CPU
    /// (`bpf_prog_active`), so a CPU's slot is only touched by one program at a time.
    #[map]
    static PENDING: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

    /// Pages one merged add-to-cache event may hold (keeps `nr_pages` far from overflow).
    const MAX_MERGED_PAGES: u32 = 1 << 20;

    #[unsafe(no_mangle)]
    static CONFIG: Global<Config> = Global::new(Config::linux_6_18());

    /// The current (tgid, tid) when its thread group is tracked.
    #[inline(always)]
    fn tracked() -> Option<(u32, u32)> {
        let id = bpf_get_current_pid_tgid();
        let tgid = (id >> 32) as u32;
        TRACKED.get_ptr(tgid)?;
        Some((tgid, id as u32))
    }

    #[inline(always)]
    fn bump(counter: Counter) {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: a per-CPU slot is only written by programs on this CPU, which do not
            // preempt each other inside one tracepoint program.
            unsafe { *slot += 1 };
        }
    }

    /// Submit flags: wake the recorder only once enough data waits (see
    /// [`Config::wakeup_bytes`]).
    #[inline(always)]
    fn submit_flags() -> u64 {
        let threshold = u64::from(CONFIG.load().wakeup_bytes);
        if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }

    /// Fills the common part of an event in place.
    ///
    /// # Safety
    /// `e` points to a reserved ring buffer entry of at least `size_of::<Event>()` bytes.
    #[inline(always)]
    unsafe fn fill(e: *mut Event, kind: Kind, pid: u32, tid: u32) {
        // SAFETY: the caller guarantees `e` is valid for writes of an `Event`.
        unsafe {
            (*e).ts_ns = bpf_ktime_get_ns();
            (*e).pid = pid;
            (*e).tid = tid;
            (*e).kind = kind as u32;
            (*e).ino = 0;
            (*e).index = 0;
            (*e).kernel_dev = 0;
            (*e).nr_pages = 0;
            (*e).dfd = 0;
            let comm = (*e).comm.as_mut_ptr();
            if generated::bpf_get_current_comm(comm.cast(), COMM_LEN as u32) != 0 {
                (*e).comm = [0; COMM_LEN];
            }
        }
    }

    /// Emits a page-range event.
    #[inline(always)]
    fn emit_pages(kind: Kind, (pid, tid): (u32, u32), dev: u32, ino: u64, index: u64, nr: u32) {
        let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
            bump(Counter::Lost);
            return;
        };
        let e = entry.as_mut_ptr();
        // SAFETY: `e` is the reserved entry, sized for an `Event`.
        unsafe {
            fill(e, kind, pid, tid);
            (*e).kernel_dev = dev;
            (*e).ino = ino;
            (*e).index = index;
            (*e).nr_pages = nr;
        }
        entry.submit(submit_flags());
    }

    /// Reads a field of the tracepoint record at `offset` (from the format file).
    #[inline(always)]
    fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i32> {
        // SAFETY: bpf_probe_read_kernel checks the address; an offset from the format file
        // lies inside the record.
        unsafe { ctx.read_at::<T>(offset as usize) }
    }

    /// A `[index, last_index]` range as a page count, saturated.
    #[inline(always)]
    fn range_len(index: u64, last: u64) -> u32 {
        if last < index {
            return 1;
        }
        let n = last - index + 1;
        if n > u32::MAX as u64 {
            u32::MAX
        } else {
            n as u32
        }
    }

    /// `filemap:mm_filemap_fault` (events/filemap/mm_filemap_fault/format):
    /// i_ino, s_dev, index.
    #[tracepoint]
    pub fn mm_filemap_fault(ctx: TracePointContext) -> u32 {
        let _ = try_fault(&ctx);
        0
    }

    fn try_fault(ctx: &TracePointContext) -> Result<(), i32> {
        let Some(ids) = tracked() else { return Ok(()) };
        let cfg = CONFIG.load();
        let ino: u64 = field(ctx, cfg.fault_ino)?;
        let dev: u32 = field(ctx, cfg.fault_dev)?;
        let index: u64 = field(ctx, cfg.fault_index)?;
        emit_pages(Kind::Fault, ids, dev, ino, index, 1);
        Ok(())
    }

    /// `filemap:mm_filemap_map_pages` (events/filemap/mm_filemap_map_pages/format):
    /// i_ino, s_dev, index, last_index.
    #[tracepoint]
    pub fn mm_filemap_map_pages(ctx: TracePointContext) -> u32 {
        let _ = try_map_pages(&ctx);
        0
    }

    fn try_map_pages(ctx: &TracePointContext) -> Result<(), i32> {
        let Some(ids) = tracked() else { return Ok(()) };
        let cfg = CONFIG.load();
        let ino: u64 = field(ctx, cfg.map_pages_ino)?;
        let dev: u32 = field(ctx, cfg.map_pages_dev)?;
        let index: u64 = field(ctx, cfg.map_pages_index)?;
        let last: u64 = field(ctx, cfg.map_pages_last)?;
        emit_pages(Kind::MapPages, ids, dev, ino, index, range_len(index, last));
        Ok(())
    }

    /// `filemap:mm_filemap_get_pages` (events/filemap/mm_filemap_get_pages/format):
    /// i_ino, s_dev, index, last_index.
    #[tracepoint]
    pub fn mm_filemap_get_pages(ctx: TracePointContext) -> u32 {
        let _ = try_get_pages(&ctx);
        0
    }

    fn try_get_pages(ctx: &TracePointContext) -> Result<(), i32> {
        let Some(ids) = tracked() else { return Ok(()) };
        let cfg = CONFIG.load();
        let ino: u64 = field(ctx, cfg.get_pages_ino)?;
        let dev: u32 = field(ctx, cfg.get_pages_dev)?;
        let index: u64 = field(ctx, cfg.get_pages_index)?;
        let last: u64 = field(ctx, cfg.get_pages_last)?;
        emit_pages(Kind::GetPages, ids, dev, ino, index, range_len(index, last));
        Ok(())
    }

    /// `filemap:mm_filemap_add_to_page_cache`
    /// (events/filemap/mm_filemap_add_to_page_cache/format): i_ino, index, s_dev, order.
    /// A folio of order `o` holds `1 << o` pages.
    #[tracepoint]
    pub fn mm_filemap_add_to_page_cache(ctx: TracePointContext) -> u32 {
        let _ = try_add_to_page_cache(&ctx);
        0
    }

    fn try_add_to_page_cache(ctx: &TracePointContext) -> Result<(), i32> {
        let Some(ids) = tracked() else { return Ok(()) };
        let cfg = CONFIG.load();
        let ino: u64 = field(ctx, cfg.add_ino)?;
        let dev: u32 = field(ctx, cfg.add_dev)?;
        let index: u64 = field(ctx, cfg.add_index)?;
        let order: u8 = if cfg.add_order == Config::ABSENT {
            0
        } else {
            field(ctx, cfg.add_order)?
        };
        // Orders above 31 do not exist; clamp so the shift is defined.
        let nr = 1u32 << (order & 31);
        let Some(p) = PENDING.get_ptr_mut(0) else {
            emit_pages(Kind::AddToCache, ids, dev, ino, index, nr);
            return Ok(());
        };
        // SAFETY: `p` points to this CPU's slot, which no other program touches meanwhile
        // (see PENDING).
        unsafe {
            if (*p).kind == Kind::AddToCache as u32
                && (*p).tid == ids.1
                && (*p).ino == ino
                && (*p).kernel_dev == dev
                && (*p).index.wrapping_add(u64::from((*p).nr_pages)) == index
                && (*p).nr_pages <= MAX_MERGED_PAGES
            {
                (*p).nr_pages += nr;
                return Ok(());
            }
            if (*p).kind != 0 {
                flush(&*p);
            }
            fill(p, Kind::AddToCache, ids.0, ids.1);
            (*p).kernel_dev = dev;
            (*p).ino = ino;
            (*p).index = index;
            (*p).nr_pages = nr;
        }
        Ok(())
    }

    /// Submits a copy of `event`.
    #[inline(always)]
    fn flush(event: &Event) {
        let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
            bump(Counter::Lost);
            return;
        };
        entry.write(*event);
        entry.submit(submit_flags());
    }

    /// `sched:sched_process_fork` (events/sched/sched_process_fork/format): child_pid.
    /// Runs in the parent's context.
    #[tracepoint]
    pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
        let _ = try_fork(&ctx);
        0
    }

    fn try_fork(ctx: &TracePointContext) -> Result<(), i32> {
        if tracked().is_none() {
            return Ok(());
        }
        let cfg = CONFIG.load();
        let child: i32 = field(ctx, cfg.fork_child_pid)?;
        // A new thread gets an entry too (its tid is not a tgid, so it is never looked up);
        // it is removed when the thread exits.
        if TRACKED.insert(child as u32, 1, 0).is_err() {
            bump(Counter::TrackFailed);
            warn!(
                ctx,
                "incfs: tracked-process map full, pid {} not followed", child
            );
        }
        Ok(())
    }

    /// `sched:sched_process_exit` (events/sched/sched_process_exit/format): pid, group_dead.
    #[tracepoint]
    pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
        let _ = try_exit(&ctx);
        0
    }

    fn try_exit(ctx: &TracePointContext) -> Result<(), i32> {
        let id = bpf_get_current_pid_tgid();
        let tgid = (id >> 32) as u32;
        if TRACKED.get_ptr(tgid).is_none() {
            return Ok(());
        }
        let cfg = CONFIG.load();
        let tid: i32 = field(ctx, cfg.exit_pid)?;
        let group_dead = if cfg.exit_group_dead == Config::ABSENT {
            // Without the field: the group dies with its leader (good enough for old kernels).
            tid as u32 == tgid
        } else {
            field::<u8>(ctx, cfg.exit_group_dead)? != 0
        };
        if tid as u32 != tgid {
            let _ = TRACKED.remove(tid as u32);
        }
        if group_dead {
            let _ = TRACKED.remove(tgid);
        }
        Ok(())
    }

    /// `sched:sched_process_exec` (events/sched/sched_process_exec/format): filename
    /// (`__data_loc char[]`).
    #[tracepoint]
    pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
        let _ = try_exec(&ctx);
        0
    }

    fn try_exec(ctx: &TracePointContext) -> Result<(), i32> {
        let Some((pid, tid)) = tracked() else {
            return Ok(());
        };
        let cfg = CONFIG.load();
        let loc: u32 = field(ctx, cfg.exec_filename)?;
        let offset = (loc & 0xffff) as usize;
        let Some(mut entry) = EVENTS.reserve::<NamedEvent>(0) else {
            bump(Counter::Lost);
            return Ok(());
        };
        let e = entry.as_mut_ptr();
        // SAFETY: `e` is the reserved entry, sized for a `NamedEvent`; the name is read with
        // bpf_probe_read_kernel_str from inside the tracepoint record.
        unsafe {
            fill(&raw mut (*e).event, Kind::Exec, pid, tid);
            let src = (ctx.as_ptr() as *const u8).add(offset);
            if bpf_probe_read_kernel_str_bytes(src, &mut (*e).name).is_err() {
                (*e).name[0] = 0;
            }
        }
        entry.submit(submit_flags());
        Ok(())
    }

    /// `syscalls:sys_enter_openat` (events/syscalls/sys_enter_openat/format): dfd, filename.
    #[tracepoint]
    pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
        let _ = try_openat(&ctx);
        0
    }

    fn try_openat(ctx: &TracePointContext) -> Result<(), i32> {
        let Some((pid, tid)) = tracked() else {
            return Ok(());
        };
        let cfg = CONFIG.load();
        if cfg.trace_opens == 0 {
            return Ok(());
        }
        let dfd: i64 = field(ctx, cfg.openat_dfd)?;
        let filename: u64 = field(ctx, cfg.openat_filename)?;
        let Some(mut entry) = EVENTS.reserve::<NamedEvent>(0) else {
            bump(Counter::Lost);
            return Ok(());
        };
        let e = entry.as_mut_ptr();
        // SAFETY: `e` is the reserved entry, sized for a `NamedEvent`; the name is read with
        // bpf_probe_read_user_str, which checks the user address.
        unsafe {
            fill(&raw mut (*e).event, Kind::Open, pid, tid);
            (*e).event.dfd = dfd as i32;
            if bpf_probe_read_user_str_bytes(filename as *const u8, &mut (*e).name).is_err() {
                (*e).name[0] = 0;
            }
        }
        entry.submit(submit_flags());
        Ok(())
    }

    use aya_ebpf::EbpfContext as _;

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    // GPL-compatible, as the tracing helpers (bpf_probe_read_*) require.
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}
