//! The planner's errors; each names the file it is about.

use std::path::PathBuf;

use polars::prelude::PolarsError;

use crate::trace::TraceError;

/// Errors planning or scoring.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// A trace could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// An input is neither a trace nor a read-log.
    #[error("{path}: {reason}")]
    NotAnInput {
        /// The input file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A line of a read-log is malformed.
    #[error("{path}:{line}: not a read-log record: {reason}")]
    ReadLog {
        /// The read-log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The image could not be opened.
    #[error("{path}: {error}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why.
        error: incfs_fs::format::FormatError,
    },
    /// A prefetch manifest could not be read, written or does not fit the image.
    #[error(transparent)]
    Plan(#[from] incfs_fs::plan::PlanError),
    /// polars failed while processing an input.
    #[error("{what}: {error}")]
    Polars {
        /// What was being done, naming the file when there is one.
        what: String,
        /// The polars error.
        error: PolarsError,
    },
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The SVG could not be drawn.
    #[error("{path}: drawing the timeline: {reason}")]
    Draw {
        /// The SVG file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Wraps a polars error with what was being done.
pub(crate) fn polars_err(what: impl Into<String>) -> impl FnOnce(PolarsError) -> PlannerError {
    let what = what.into();
    move |error| PlannerError::Polars { what, error }
}
