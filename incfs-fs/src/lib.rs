//! incfs: a lazily fetched, verified, read-only filesystem for big program trees.
//!
//! The crate is layered, each layer importing only those below it:
//! [`format`] (image header, manifest, chunk table, digests, `pack`) at the ground floor, and
//! [`plan`] (the prefetch manifest that the planner writes and the mount reads) beside it,
//! then [`source`] (local file, HTTP, S3, test doubles), [`table`] (a mounted image's chunk table,
//! loaded a verified segment at a time) and [`cache`] (verified chunks on disk),
//! [`fetch`] (the scheduler that fills the cache from a source), [`prefetch`] (walks a plan
//! ahead of the program through the scheduler) and [`fs`] (the file system
//! core and its FUSE adapter, `fs::fuse`).
//!
//! Two features add what only tests and benchmarks use: `serve` (`incfs serve`'s HTTP server,
//! `serve`, and the link emulator, `link`) and `testing` (the test sources of [`source`]:
//! `MockSource`, `FailingSource`, `ThrottledSource`, and `link`).

pub mod cache;
pub mod elf;
pub mod fetch;
pub mod format;
pub mod fs;
#[cfg(any(feature = "serve", feature = "testing"))]
pub mod link;
pub mod plan;
pub mod prefetch;
pub mod rate;
pub mod retry;
pub mod run;
#[cfg(feature = "serve")]
pub mod serve;
pub mod source;
pub mod table;
pub mod trust;
