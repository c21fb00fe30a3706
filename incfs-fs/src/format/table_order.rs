//! The order of the chunk table's entries.
//!
//! Files name their chunks by slot (`first_chunk + i`), and `pack` writes the table in slot
//! order. A hot-first image writes it in another order — the planned slots first, in plan
//! order, then the rest — so that the entries a start needs fill the first few table
//! segments instead of being spread over most of them (for clang-22 at 4 KiB chunks: the
//! plan's 10,111 entries in 10 segments instead of 43 of 55). The manifest records the order
//! as runs of consecutive slots ([`SlotRun`]); entry `i` of the table describes the `i`-th
//! slot of the runs laid end to end.

use serde::{Deserialize, Serialize};

use super::FormatError;

/// Consecutive slots `first..first + count`, in a table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRun {
    /// First slot.
    pub first: u64,
    /// Number of slots.
    pub count: u64,
}

/// A checked table order: maps slots to table positions and back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableOrder {
    /// Runs in table order, each with the table position of its first slot.
    by_position: Vec<(u64, SlotRun)>,
    /// Indexes into `by_position`, sorted by first slot.
    by_slot: Vec<usize>,
}

impl TableOrder {
    /// The order of `runs` over a table of `count` slots: empty runs mean slot order.
    /// Refuses runs that are not a permutation of `0..count`.
    pub fn new(runs: &[SlotRun], count: u64) -> Result<Self, FormatError> {
        if runs.is_empty() {
            return Ok(TableOrder::default());
        }
        let mut by_position = Vec::with_capacity(runs.len());
        let mut at = 0u64;
        for r in runs {
            if r.count == 0 {
                return Err(invalid("an empty run"));
            }
            by_position.push((at, *r));
            at = at
                .checked_add(r.count)
                .ok_or_else(|| invalid("runs overflow"))?;
        }
        if at != count {
            return Err(invalid(&format!("runs cover {at} slots of {count}")));
        }
        let mut by_slot: Vec<usize> = (0..by_position.len()).collect();
        by_slot.sort_unstable_by_key(|&i| by_position[i].1.first);
        // Sorted by first slot, the runs must tile 0..count exactly.
        let mut next = 0u64;
        for &i in &by_slot {
            let r = by_position[i].1;
            if r.first != next {
                return Err(invalid(&format!("slot {next} is missing or listed twice")));
            }
            next = r.first + r.count;
        }
        Ok(TableOrder {
            by_position,
            by_slot,
        })
    }

    /// Runs for the order that lists `first` (distinct slots below `count`) first, in that
    /// order, then every other slot in slot order.
    pub fn runs_for(first: &[u64], count: u64) -> Vec<SlotRun> {
        let mut runs: Vec<SlotRun> = Vec::new();
        let mut push = |s: u64| match runs.last_mut() {
            Some(r) if r.first + r.count == s => r.count += 1,
            _ => runs.push(SlotRun { first: s, count: 1 }),
        };
        let mut listed = vec![false; usize::try_from(count).unwrap_or(0)];
        for &s in first {
            if let Some(l) = listed.get_mut(s as usize)
                && !std::mem::replace(l, true)
            {
                push(s);
            }
        }
        for (s, l) in listed.iter().enumerate() {
            if !l {
                push(s as u64);
            }
        }
        runs
    }

    /// True for slot order.
    pub fn is_identity(&self) -> bool {
        self.by_position.is_empty()
    }

    /// Table position of `slot` (which must be below the table's count).
    pub fn position_of(&self, slot: u64) -> u64 {
        if self.is_identity() {
            return slot;
        }
        let k = self
            .by_slot
            .partition_point(|&i| self.by_position[i].1.first <= slot);
        match k.checked_sub(1).map(|k| self.by_position[self.by_slot[k]]) {
            Some((pos, r)) if slot < r.first + r.count => pos + (slot - r.first),
            _ => slot,
        }
    }

    /// Slot at table position `pos` (which must be below the table's count).
    pub fn slot_at(&self, pos: u64) -> u64 {
        if self.is_identity() {
            return pos;
        }
        let k = self.by_position.partition_point(|(p, _)| *p <= pos);
        match k.checked_sub(1).map(|k| self.by_position[k]) {
            Some((p, r)) => r.first + (pos - p),
            None => pos,
        }
    }
}

fn invalid(why: &str) -> FormatError {
    FormatError::ManifestInvalid(format!("chunk table order: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_first_runs_map_both_ways() {
        let runs = TableOrder::runs_for(&[7, 8, 9, 2, 7, 3], 12);
        assert_eq!(
            runs,
            vec![
                SlotRun { first: 7, count: 3 },
                SlotRun { first: 2, count: 2 },
                SlotRun { first: 0, count: 2 },
                SlotRun { first: 4, count: 3 },
                SlotRun {
                    first: 10,
                    count: 2
                },
            ]
        );
        let o = TableOrder::new(&runs, 12).unwrap();
        let table: Vec<u64> = (0..12).map(|p| o.slot_at(p)).collect();
        assert_eq!(table, vec![7, 8, 9, 2, 3, 0, 1, 4, 5, 6, 10, 11]);
        for (pos, slot) in table.iter().enumerate() {
            assert_eq!(o.position_of(*slot), pos as u64);
        }
    }

    #[test]
    fn runs_that_are_not_a_permutation_are_refused() {
        let r = |first, count| SlotRun { first, count };
        assert!(TableOrder::new(&[r(0, 3)], 4).is_err());
        assert!(TableOrder::new(&[r(0, 2), r(1, 2)], 4).is_err());
        assert!(TableOrder::new(&[r(0, 2), r(2, 0), r(2, 2)], 4).is_err());
        assert!(TableOrder::new(&[r(1, 3), r(5, 1)], 4).is_err());
        assert!(TableOrder::new(&[r(u64::MAX, 2)], 4).is_err());
        assert!(TableOrder::new(&[r(2, 2), r(0, 2)], 4).is_ok());
        assert!(TableOrder::new(&[], 4).unwrap().is_identity());
    }
}
