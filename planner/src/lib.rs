//! Traces in, prefetch manifest out.
//!
//! The pipeline: [`trace`] defines the trace file (Parquet, written by the recorder, read
//! here) and its events; [`summary`] summarizes one trace for `incfs trace show`; [`touch`]
//! says which events count as the program touching a page.
#![deny(missing_docs)]

pub mod summary;
pub mod touch;
pub mod trace;
