//! partvisor's test guest, as seen from the host.
//!
//! The guest itself (`testguest/`) is a `no_std` PVH kernel that reports the
//! partition it finds (memory map, CPUs from the MADT, cmdline, initrd) on
//! its serial port and then acts on its cmdline words; README.md beside this
//! crate is its contract with `part-vmm`. It is the one guest CI can boot on
//! the project's machines (nested KVM runs guest CPL 0 in an instruction
//! emulator, so a Linux kernel cannot run there): it plays the partition of
//! the seed documents (`001`: a partition monitor confines a guest to what it
//! was granted) and lets tests check what a monitor handed over.
//!
//! This crate builds the guest with its own cargo invocation (`build.rs`),
//! checks its CPL 0 code ([`cpl0_check`]) and exports its path
//! ([`guest_elf`]), its constants and a parser for its report
//! ([`report::Report`]).
//!
//! It must never share compiler flags, profiles or wrappers with the host
//! build, and the guest must never run anything but its tiny, checked `.cpl0`
//! section at CPL 0.

use std::path::Path;

pub mod cpl0_check;
pub mod report;

/// The built guest ELF (PVH entry, loaded at 1 MiB physical).
pub fn guest_elf() -> &'static Path {
    Path::new(env!("PARTVISOR_TEST_GUEST_ELF"))
}

/// First line of every report.
pub const REPORT_HEADER: &str = "partvisor-testguest 1";
/// `out` a 32-bit code N here: the VMM exits with N (QEMU: `(N << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Guest-physical load address.
pub const LOAD_ADDRESS: u64 = 0x10_0000;
/// Page the guest copies its AP real-mode trampoline to (if free).
pub const AP_TRAMPOLINE_PAGE: u64 = 0x8000;
/// Exit code when an AP does not come online within about a second.
pub const EXIT_AP_TIMEOUT: u32 = 3;
/// Exit code when the PVH start info is missing.
pub const EXIT_NO_START_INFO: u32 = 2;
/// Exit code when an i8042 reset request had no effect within a second.
pub const EXIT_RESET_IGNORED: u32 = 4;
/// Exit code after a panic in the guest.
pub const EXIT_PANIC: u32 = 101;
/// Value the guest writes during `probe=unassigned`.
pub const PROBE_WRITE_VALUE: u32 = 0x1234_5678;
/// Second `probe=unassigned` address (when above RAM).
pub const PROBE_HIGH_ADDRESS: u64 = 0xC000_0000;

/// FNV-1a 64, the initrd checksum the guest reports.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The first address `probe=unassigned` touches for a given end of RAM.
pub fn probe_low_address(ram_end: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    ram_end.div_ceil(MIB) * MIB + MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn probe_low_address_is_one_mib_past_rounded_ram_end() {
        assert_eq!(probe_low_address(32 << 20), 33 << 20);
        assert_eq!(probe_low_address((32 << 20) + 1), 34 << 20);
    }

    #[test]
    fn guest_elf_is_a_pvh_elf64() {
        let elf = std::fs::read(guest_elf()).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        // The PVH note: namesz 4, descsz 8, type 18, "Xen\0".
        let note = [4u32.to_le_bytes(), 8u32.to_le_bytes(), 18u32.to_le_bytes()].concat();
        let pos = elf.windows(12).position(|w| w == note.as_slice());
        let pos = pos.expect("PVH note present");
        assert_eq!(&elf[pos + 12..pos + 16], b"Xen\0");
    }
}
