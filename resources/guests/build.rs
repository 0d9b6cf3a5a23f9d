//! Builds the no_std test guest (testguest/) with its own cargo invocation and
//! target directory, so that no host flag, profile or wrapper reaches it, then
//! disassembles its `.cpl0` section and fails the build if CPL 0 code holds an
//! instruction KVM's emulator cannot run or branches out of the section.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

#[path = "src/cpl0_check.rs"]
mod cpl0_check;

/// The guest's own flags: static non-PIE code for the host target.
const GUEST_RUSTFLAGS: &[&str] = &["-Crelocation-model=static", "-Ctarget-cpu=x86-64"];
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_BIN: &str = "partvisor-testguest";

fn fail(msg: &str) -> ! {
    eprintln!("error: partvisor-test-guest build: {msg}");
    exit(1);
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(&format!("cargo did not set {name}")))
}

/// Variables that must not leak from the host build into the guest build.
fn scrubbed(name: &str) -> bool {
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS"];
    (name.starts_with("CARGO_") && !KEEP.contains(&name))
        || name.starts_with("__CARGO")
        || matches!(
            name,
            "RUSTFLAGS" | "RUSTDOCFLAGS" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTC_WRAPPER"
        )
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {what}: {e} (is binutils installed?)")));
    if !out.status.success() {
        fail(&format!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build_guest(guest_dir: &Path, target_dir: &Path) -> PathBuf {
    let cargo = env("CARGO");
    let mut cmd = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        if scrubbed(&name.to_string_lossy()) {
            cmd.env_remove(&name);
        }
    }
    let flags: OsString = GUEST_RUSTFLAGS.join("\x1f").into();
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags)
        .current_dir(guest_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--target",
            GUEST_TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir);
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo for the guest: {e}")));
    if !status.success() {
        fail(&format!(
            "building the guest in {} failed ({status})",
            guest_dir.display()
        ));
    }
    target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN)
}

fn symbols(elf: &Path) -> Vec<(String, u64)> {
    run(Command::new("nm").arg(elf), "nm")
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let _kind = f.next()?;
            Some((f.next()?.to_string(), addr))
        })
        .collect()
}

fn check_cpl0(elf: &Path) {
    let syms = symbols(elf);
    let sym = |name: &str| {
        syms.iter()
            .find(|(n, _)| n == name)
            .map(|&(_, a)| a)
            .unwrap_or_else(|| {
                fail(&format!(
                    "guest ELF has no symbol {name} (link.ld changed?)"
                ))
            })
    };
    let section = sym("__cpl0_start")..sym("__cpl0_end");
    // (range, objdump machine) — the 16-bit trampoline's trailing GDTR data
    // [ap_tramp_data, __cpl0_code16_end) is data, not code.
    let ranges = [
        (sym("__cpl0_code16_start")..sym("ap_tramp_data"), "i8086"),
        (sym("__cpl0_code32_start")..sym("__cpl0_code32_end"), "i386"),
        (
            sym("__cpl0_code64_start")..sym("__cpl0_code64_end"),
            "x86-64",
        ),
    ];
    let entry = sym("pvh_entry32");
    if !section.contains(&entry) {
        fail("the PVH entry is not in .cpl0");
    }
    let mut violations = Vec::new();
    let mut instructions = 0;
    for (range, machine) in &ranges {
        let listing = run(
            Command::new("objdump")
                .args(["-d", "-j", ".cpl0", "-M", machine])
                .arg(format!("--start-address={:#x}", range.start))
                .arg(format!("--stop-address={:#x}", range.end))
                .arg(elf),
            "objdump",
        );
        instructions += cpl0_check::instruction_count(&listing);
        violations.extend(cpl0_check::check_listing(&listing, &section));
    }
    if instructions < 50 {
        fail(&format!(
            "only {instructions} CPL 0 instructions disassembled; the check is not seeing .cpl0"
        ));
    }
    if !violations.is_empty() {
        let list: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        fail(&format!(
            "the guest's CPL 0 code (.cpl0) is not runnable by KVM's emulator:\n{}",
            list.join("\n")
        ));
    }
}

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let guest_dir = manifest_dir.join("testguest");
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }
    println!("cargo:rerun-if-changed=src/cpl0_check.rs");

    let elf = build_guest(&guest_dir, &out_dir.join("testguest-target"));
    check_cpl0(&elf);
    let dest = out_dir.join("partvisor-testguest.elf");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| {
        fail(&format!(
            "cannot copy {} to {}: {e}",
            elf.display(),
            dest.display()
        ))
    });
    println!(
        "cargo:rustc-env=PARTVISOR_TEST_GUEST_ELF={}",
        dest.display()
    );
}
