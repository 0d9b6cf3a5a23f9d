//! Shared-memory rings (seed 001 memory channels). Work in progress.
