//! The mount's side of the loader hints ([`crate::elf`]): a file's first read hands
//! its ELF header to one thread per mount, which reads the file's section header table
//! through the scheduler and queues the sections the dynamic loader reads at prefetch
//! priority. The read is answered first; the hint never delays it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak, mpsc};

use crate::elf;
use crate::fetch::Priority;

use super::IncFs;

/// A file whose first read showed an ELF header.
pub(super) struct LoaderHint {
    idx: u32,
    first_chunk: u64,
    size: u64,
    head: [u8; elf::HEADER_LEN],
}

impl IncFs {
    /// Called with the bytes of a read at offset 0 of file `idx` that no plan covers:
    /// queues its loader sections when it is an ELF file seen for the first time.
    pub(super) fn hint_loader(
        self: &Arc<Self>,
        idx: u32,
        first_chunk: u64,
        size: u64,
        head: &[u8],
    ) {
        if !self.fetcher.config().loader_hints
            || size <= self.fetcher.config().readahead.small_file
            || !elf::is_elf64(head)
            || !self.loader_hinted.lock().insert(idx)
        {
            return;
        }
        let mut h = LoaderHint {
            idx,
            first_chunk,
            size,
            head: [0; elf::HEADER_LEN],
        };
        h.head.copy_from_slice(&head[..elf::HEADER_LEN]);
        let tx = self.loader_hints.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let fs = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("incfs-loader-hints".into())
                .spawn(move || hint_thread(fs, rx));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no loader-hint thread: ELF files get no read-ahead");
            }
            tx
        });
        // Fails only when the thread is gone (not started, or the mount is stopping).
        let _ = tx.send(h);
    }

    /// Reads the section header table of the hinted file and queues its loader sections.
    fn queue_loader_sections(&self, h: &LoaderHint) {
        let Some(table) = elf::section_table(&h.head, h.size) else {
            return;
        };
        let cs = u64::from(self.manifest.chunk_size);
        let slots_of = |r: &std::ops::Range<u64>| {
            h.first_chunk + r.start / cs..h.first_chunk + (r.end - 1) / cs + 1
        };
        let table_slots: Vec<u64> = slots_of(&table).collect();
        if let Err(e) = self.fetcher.fetch(&table_slots, Priority::Prefetch) {
            tracing::debug!(path = %self.paths[h.idx as usize], error = %e, "no loader hints: the section headers did not arrive");
            return;
        }
        let mut buf = vec![0u8; (table.end - table.start) as usize];
        if let Err(e) = self.cache.read(h.idx, table.start, &mut buf) {
            tracing::debug!(path = %self.paths[h.idx as usize], error = %e, "no loader hints: the section headers could not be read back");
            return;
        }
        let ranges = elf::loader_ranges(&buf, h.size);
        let mut slots: Vec<u64> = ranges.iter().flat_map(slots_of).collect();
        slots.dedup();
        let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        tracing::debug!(path = %self.paths[h.idx as usize], sections = ranges.len(), bytes, "queueing what the loader reads");
        self.counters
            .loader_hint_files
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .loader_hint_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.fetcher.submit(&slots, Priority::Prefetch);
    }
}

/// Serves hints until the mount is dropped (its sender goes with it).
fn hint_thread(fs: Weak<IncFs>, rx: mpsc::Receiver<LoaderHint>) {
    while let Ok(h) = rx.recv() {
        let Some(fs) = fs.upgrade() else { return };
        if fs.fetcher.is_shut_down() {
            return;
        }
        fs.queue_loader_sections(&h);
    }
}
