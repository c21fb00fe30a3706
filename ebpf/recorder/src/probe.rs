//! Loading the probe, attaching its programs and handing out its maps.

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use incfs_common::{
    CONFIG_GLOBAL, COUNTERS_MAP, Config, Counter, EVENTS_MAP, Event, Kind, PENDING_MAP, TRACKED_MAP,
};

use crate::RecordError;

/// The probe object, built by `build.rs` (aya-build) for bpfel-unknown-none.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/incfs-probe"));

/// The programs of the probe: (program name, tracepoint category, tracepoint name).
const PROGRAMS: &[(&str, &str, &str)] = &[
    // Fork and exit first, so the tree is followed before any page event can be missed.
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("mm_filemap_fault", "filemap", "mm_filemap_fault"),
    ("mm_filemap_map_pages", "filemap", "mm_filemap_map_pages"),
    ("mm_filemap_get_pages", "filemap", "mm_filemap_get_pages"),
    (
        "mm_filemap_add_to_page_cache",
        "filemap",
        "mm_filemap_add_to_page_cache",
    ),
    ("sys_enter_openat", "syscalls", "sys_enter_openat"),
];

/// The loaded, attached probe. Dropping it detaches every program.
pub(crate) struct Probe {
    // Holds the attached programs; detached on drop.
    ebpf: Ebpf,
    /// Tracked thread group ids.
    pub tracked: HashMap<MapData, u32, u32>,
    /// The probe's per-CPU counters.
    pub counters: PerCpuArray<MapData, u64>,
    /// Each CPU's add-to-cache event still being merged.
    pub pending: PerCpuArray<MapData, Event>,
    /// The event ring buffer (taken by the drain thread).
    pub events: Option<RingBuf<MapData>>,
    /// aya-log's reader for the probe's diagnostics, when the probe logs.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Probe {
    /// Loads the probe with `config` and a ring buffer of `ring_bytes`, and attaches it.
    pub(crate) fn load(config: &Config, ring_bytes: u32) -> Result<Self, RecordError> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, config, true)
            .map_max_entries(EVENTS_MAP, ring_bytes)
            .load(PROBE_OBJECT)
            .map_err(|source| RecordError::Load {
                source: Box::new(source),
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                tracing::debug!(%err, "probe diagnostics (aya-log) unavailable");
                None
            }
        };
        for &(program, category, name) in PROGRAMS {
            let attach = |ebpf: &mut Ebpf| -> Result<(), aya::programs::ProgramError> {
                let prog: &mut TracePoint = ebpf
                    .program_mut(program)
                    .ok_or(aya::programs::ProgramError::NotLoaded)?
                    .try_into()?;
                prog.load()?;
                prog.attach(category, name)?;
                Ok(())
            };
            attach(&mut ebpf).map_err(|source| RecordError::Attach {
                tracepoint: format!("{category}:{name}"),
                source: Box::new(source),
            })?;
        }
        let tracked = take_map(&mut ebpf, TRACKED_MAP, HashMap::try_from)?;
        let counters = take_map(&mut ebpf, COUNTERS_MAP, PerCpuArray::try_from)?;
        let events = take_map(&mut ebpf, EVENTS_MAP, RingBuf::try_from)?;
        let pending = take_map(&mut ebpf, PENDING_MAP, PerCpuArray::try_from)?;
        Ok(Probe {
            ebpf,
            tracked,
            counters,
            pending,
            events: Some(events),
            logger,
        })
    }

    /// The sum over CPUs of `counter`.
    pub(crate) fn counter(&self, counter: Counter) -> Result<u64, RecordError> {
        let values =
            self.counters
                .get(&(counter as u32), 0)
                .map_err(|source| RecordError::Map {
                    map: COUNTERS_MAP,
                    source: Box::new(source),
                })?;
        Ok(values.iter().sum())
    }

    /// The merged add-to-cache events the probe had not submitted yet (one per CPU at most).
    pub(crate) fn pending_events(&self) -> Result<Vec<Event>, RecordError> {
        let values = self.pending.get(&0, 0).map_err(|source| RecordError::Map {
            map: PENDING_MAP,
            source: Box::new(source),
        })?;
        Ok(values
            .iter()
            .filter(|e| e.kind == Kind::AddToCache as u32)
            .copied()
            .collect())
    }

    /// Logs (info) each program's run count and mean run time, when the kernel keeps
    /// them (`sysctl kernel.bpf_stats_enabled=1`): the probe's cost per event, which runs
    /// in the traced processes.
    pub(crate) fn log_run_stats(&self) {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .is_ok_and(|v| v.trim() == "1");
        if !enabled {
            return;
        }
        for &(name, _, _) in PROGRAMS {
            let Some(Ok(info)) = self.ebpf.program(name).map(|p| p.info()) else {
                continue;
            };
            let runs = info.run_count();
            let ns = info.run_time().as_nanos() as f64;
            tracing::info!(
                program = name,
                runs,
                mean_ns = if runs > 0 { ns / runs as f64 } else { 0.0 },
                "probe program cost"
            );
        }
    }

    /// Starts following `tgid` and everything it forks from now on.
    pub(crate) fn track(&mut self, tgid: u32) -> Result<(), RecordError> {
        self.tracked
            .insert(tgid, 1, 0)
            .map_err(|source| RecordError::Map {
                map: TRACKED_MAP,
                source: Box::new(source),
            })
    }

    /// Stops following `tgid` (its descendants stay tracked).
    pub(crate) fn untrack(&mut self, tgid: u32) {
        if let Err(err) = self.tracked.remove(&tgid) {
            tracing::debug!(tgid, %err, "untrack");
        }
    }
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, RecordError> {
    let map = ebpf.take_map(name).ok_or_else(|| RecordError::Map {
        map: name,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        }),
    })?;
    convert(map).map_err(|source| RecordError::Map {
        map: name,
        source: Box::new(source),
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `rlim` is a valid rlimit for the duration of the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}
