//! Which trace events count as the program touching a page.
//!
//! - `fault` (`mm_filemap_fault`): the program faulted on a mapped page; it needs the page.
//! - `get_pages` (`mm_filemap_get_pages`): a `read()` asked for the pages; it needs them.
//! - `map_pages` (`mm_filemap_map_pages`): fault-around mapped neighbours of a faulting page
//!   that happened to be cached. The program may never use them, so counting them
//!   over-approximates the demand set (about 2x for clang, see DESIGN.md). Off by default.
//! - `add_to_cache`: pages that came from storage, including readahead. Off by default.
//! - `open`, `exec` carry no pages and are never touches.

use crate::trace::EventKind;

/// The set of event kinds that count as touches. The default is fault + get_pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TouchKinds {
    /// Count `map_pages` (fault-around) events.
    pub map_pages: bool,
    /// Count `add_to_cache` events.
    pub add_to_cache: bool,
}

impl TouchKinds {
    /// Whether an event of `kind` counts as a touch.
    pub fn counts(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Fault | EventKind::GetPages => true,
            EventKind::MapPages => self.map_pages,
            EventKind::AddToCache => self.add_to_cache,
            EventKind::Open | EventKind::Exec => false,
        }
    }

    /// The kind names that count, as stored in the trace's `kind` column.
    pub fn names(&self) -> Vec<&'static str> {
        [
            EventKind::Fault,
            EventKind::GetPages,
            EventKind::MapPages,
            EventKind::AddToCache,
        ]
        .into_iter()
        .filter(|k| self.counts(*k))
        .map(EventKind::name)
        .collect()
    }
}
