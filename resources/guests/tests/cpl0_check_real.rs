//! The CPL 0 check applied to the real guest ELF: its `.cpl0` passes, and
//! the same check applied to its CPL 3 `.text` fails (so the check can fail
//! on real compiler output, not only on hand-written samples).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use partvisor_test_guest::cpl0_check::{check_listing, instruction_count, Cpl0Violation};
use partvisor_test_guest::guest_elf;
use std::process::Command;

fn symbol(name: &str) -> u64 {
    let out = Command::new("nm")
        .arg(guest_elf())
        .output()
        .expect("nm (binutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2] == name).then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .unwrap_or_else(|| panic!("no symbol {name}"))
}

fn disassemble(section: &str) -> String {
    let out = Command::new("objdump")
        .args(["-d", "-j", section])
        .arg(guest_elf())
        .output()
        .expect("objdump (binutils)");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn guest_cpl0_64bit_code_passes_the_check() {
    let section = symbol("__cpl0_start")..symbol("__cpl0_end");
    let listing = Command::new("objdump")
        .args(["-d", "-j", ".cpl0"])
        .arg(format!(
            "--start-address={:#x}",
            symbol("__cpl0_code64_start")
        ))
        .arg(format!("--stop-address={:#x}", symbol("__cpl0_code64_end")))
        .arg(guest_elf())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(instruction_count(&listing) > 50);
    assert_eq!(check_listing(&listing, &section), vec![]);
}

#[test]
fn guest_cpl3_text_would_fail_the_check() {
    let section = symbol("__cpl0_start")..symbol("__cpl0_end");
    let violations = check_listing(&disassemble(".text"), &section);
    // Rust code calls Rust code outside .cpl0 (e.g. core::fmt).
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Cpl0Violation::OutOfSection { .. })),
        "{violations:?}"
    );
}
