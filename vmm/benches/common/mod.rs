//! Shared by the benchmarks that start I/O partitions.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release `part-io` beside this bench's part-vmm, always rebuilt first
/// (a no-op when up to date) so a stale binary is never measured.
pub fn part_io_bin() -> PathBuf {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "part-io",
            "--bin",
            "part-io",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build -p part-io");
    assert!(st.success(), "cargo build --release -p part-io failed");
    Path::new(env!("CARGO_BIN_EXE_part-vmm")).with_file_name("part-io")
}

/// Median of `v` (upper median for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
