//! Traces in, prefetch manifest out.
//!
//! The pipeline: [`trace`] defines the trace file (Parquet, written by the recorder, read
//! here) and its events.
#![deny(missing_docs)]

pub mod trace;
