//! Every kind of bad input ends part-vmm with status 64 and a one-line error
//! naming the problem, before any VM exists.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const BAD_INPUT: i32 = 64;

fn assert_rejected(args: &[&str], needle: &str) {
    let r = run(args);
    assert_eq!(r.code(), BAD_INPUT, "args {args:?}\nlog:\n{}", r.log);
    let lines: Vec<&str> = r.log.lines().collect();
    assert_eq!(lines.len(), 1, "want exactly one line, got:\n{}", r.log);
    assert!(lines[0].starts_with("part-vmm: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "`{needle}` not in: {}", lines[0]);
    assert!(!r.log.contains("panicked"));
}

#[test]
fn missing_kernel_is_named() {
    assert_rejected(
        &["--kernel", "/nonexistent/vmlinux"],
        "kernel /nonexistent/vmlinux: cannot read",
    );
}

#[test]
fn unreadable_kernel_is_named() {
    let dir = scratch("unreadable");
    assert_rejected(&["--kernel", dir.to_str().unwrap()], "cannot read");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage_is_rejected() {
    let dir = scratch("notakernel");
    let p = write_file(&dir, "k", &[0x42; 4096]);
    assert_rejected(&["--kernel", p.to_str().unwrap()], "neither an ELF");
}

#[test]
fn elf_without_pvh_note_is_rejected() {
    // The part-vmm binary itself is an ELF without a PVH note.
    assert_rejected(&["--kernel", part_vmm()], "no PVH entry note");
}

#[test]
fn zero_memory_is_rejected() {
    let g = guest();
    assert_rejected(
        &["--kernel", g.to_str().unwrap(), "--memory-mib", "0"],
        "memory_mib 0",
    );
}

#[test]
fn memory_beyond_mem_available_is_rejected() {
    let g = guest();
    assert_rejected(
        &["--kernel", g.to_str().unwrap(), "--memory-mib", "100000000"],
        "more than the host's MemAvailable",
    );
}

#[test]
fn zero_vcpus_are_rejected() {
    let g = guest();
    assert_rejected(
        &["--kernel", g.to_str().unwrap(), "--vcpus", "0"],
        "vcpus 0",
    );
}

#[test]
fn vcpus_above_kvm_max_are_rejected() {
    let g = guest();
    assert_rejected(
        &["--kernel", g.to_str().unwrap(), "--vcpus", "100000"],
        "vcpus 100000",
    );
}

#[test]
fn unknown_config_key_is_rejected() {
    let dir = scratch("unknownkey");
    let g = guest();
    let cfg = format!(r#"{{"kernel": "{}", "memory_mb": 64}}"#, g.display());
    let p = write_file(&dir, "c.json", cfg.as_bytes());
    assert_rejected(
        &["--config", p.to_str().unwrap()],
        "unknown field `memory_mb`",
    );
}

#[test]
fn unknown_flag_is_rejected_in_one_line() {
    assert_rejected(&["--kernal", "x"], "unexpected argument '--kernal'");
}

#[test]
fn missing_initrd_is_named() {
    let g = guest();
    assert_rejected(
        &[
            "--kernel",
            g.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "initrd /nonexistent/initrd: cannot read",
    );
}
