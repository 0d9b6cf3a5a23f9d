//! I/O partition backends (seed 001/004 I/O partitions). Work in progress.
