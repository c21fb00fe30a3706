//! incfs: a lazily fetched, verified, read-only filesystem for big program trees.
//!
//! The crate is layered, each layer importing only those below it:
//! [`format`] (image header, manifest, chunk table, digests, `pack`) at the ground floor, and
//! [`plan`] (the prefetch manifest that the planner writes and the mount reads) beside it,
//! then [`source`] (local file, HTTP, test doubles).

pub mod format;
pub mod link;
pub mod plan;
pub mod serve;
pub mod source;
