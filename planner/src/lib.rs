//! Traces in, prefetch manifest out.
//!
//! The pipeline, one module per step:
//!
//! 1. [`trace`]: the trace file (Parquet, written by the recorder with [`trace::write_trace`],
//!    read with [`trace::read_trace`]) and its events; [`summary`] summarizes one for
//!    `incfs trace show`.
//! 2. [`input`]: each input, a trace or a mount read-log (told apart by content), is reduced
//!    with polars to the chunk ranges the run touched and when it first touched each;
//!    [`touch`] says which events count as touches (fault and get_pages by default).
//! 3. [`image_index`]: the image's manifest gives path → file → chunk slots → stored bytes.
//! 4. [`pipeline::map_run`] maps a run's ranges onto image chunks (stripping path prefixes,
//!    counting paths the image lacks); [`pipeline::aggregate`] computes per chunk, across
//!    runs, the number of runs that touched it and its median first touch (polars lazy).
//! 5. [`merge`]: chunks kept by `--min-runs`, in order of median first touch, are merged into
//!    ranges of adjacent chunks ([`merge::merge`]) and cut at the byte budget
//!    ([`merge::budget`]); [`pipeline::plan_runs`] turns them into an
//!    [`incfs_fs::plan::PrefetchPlan`].
//! 6. [`report`]: scores a plan on a run (hit rate at a bandwidth, over-fetch), leave-one-out
//!    over the runs, and [`timeline`] draws the accesses and the plan as an SVG.
#![deny(missing_docs)]

pub mod error;
pub mod image_index;
pub mod input;
pub mod merge;
pub mod pipeline;
pub mod report;
pub mod summary;
pub mod timeline;
pub mod touch;
pub mod trace;

pub use error::PlannerError;
