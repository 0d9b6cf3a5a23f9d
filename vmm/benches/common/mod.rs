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

/// Waits for a guest process; its serial output.
pub fn finish(c: std::process::Child) -> String {
    let out = c.wait_with_output().expect("guest output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Median of `v` (upper median for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// QEMU microvm booting the test guest `guest` with `cmdline`: KVM, the
/// serial port on stdio, the debug-exit port at 0xf4 (QEMU exits with
/// `(code << 1) | 1`), `mem_mib` of memory, and `extra` arguments. The
/// machine string carries per-benchmark options (e.g. `acpi=off`).
pub fn qemu_microvm(
    machine: &str,
    mem_mib: u64,
    extra: &[String],
    guest: &Path,
    cmdline: &str,
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", machine, "-enable-kvm"])
        // Plain `-cpu host` aborts QEMU 7.2 on these machines.
        .args(["-cpu", "host,-arch-capabilities"])
        .args(["-m", &format!("{mem_mib}M")])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(extra)
        .arg("-kernel")
        .arg(guest)
        .arg("-append")
        .arg(cmdline);
    c
}
