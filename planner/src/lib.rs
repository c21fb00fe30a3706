//! Traces in, prefetch manifest out.
#![deny(missing_docs)]
