//! The parts of partd that stand on their own, as a library: what a
//! partition definition may say (`definition`: validation against the
//! host, the demand it makes, kernel-command-line placeholders).
//!
//! It is a library so that the fuzz targets (`tests/fuzz/`) reach the same
//! code the daemon runs; the daemon is `src/main.rs`. It must never do I/O
//! or hold state: everything here is a function of its arguments.

pub mod definition;
