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
//! ([`guest_elf`]), its constants, a parser for its report
//! ([`report::Report`]), and — compiled from the guest's own source files —
//! its cmdline-word parsers ([`words`]), the checksummed block pattern
//! `blk=write` puts on a virtio-blk disk ([`blk_pattern`]), so a test can
//! check an image file from the host, and the Ethernet frames of the
//! `net=` words ([`net_frame`]: build, parse, receiver accounting), so a
//! test can inject a frame through a TAP device and check what a guest
//! sent. The `net=send` / `net=recv` pair is seed 001's partitions talking
//! through the I/O partition's virtual Ethernet switch, flow-controlled so
//! that a switch that drops frames for a full ring never has to. The host
//! end of the `vsock=` words over a hybrid socket is [`vsock_host`].
//!
//! It must never share compiler flags, profiles or wrappers with the host
//! build, and the guest must never run anything but its tiny, checked `.cpl0`
//! section at CPL 0.

use std::path::Path;

#[path = "../testguest/src/blk_pattern.rs"]
pub mod blk_pattern;
pub mod cpl0_check;
#[path = "../testguest/src/net_frame.rs"]
pub mod net_frame;
pub mod report;
pub mod vsock_host;
#[path = "../testguest/src/words.rs"]
pub mod words;

pub use blk_pattern::fnv1a64;

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

/// Exit code: a `blk=` word found no modern virtio-blk device.
pub const EXIT_BLK_NO_DEVICE: u32 = 10;
/// Exit code: the virtio-blk device could not be initialised.
pub const EXIT_BLK_INIT: u32 = 11;
/// Exit code: a block request failed (status not OK) or did not fit the disk.
pub const EXIT_BLK_IO: u32 = 12;
/// Exit code: `blk=verify` found a block that is not what was written.
pub const EXIT_BLK_VERIFY: u32 = 13;
/// Exit code: a block request did not complete in time (`blk: timeout`).
pub const EXIT_BLK_TIMEOUT: u32 = 14;
/// Exit code: `blk=expect-ro` saw its write not refused with IOERR.
pub const EXIT_BLK_NOT_REFUSED: u32 = 15;
/// Exit code: the device set DEVICE_NEEDS_RESET during normal I/O.
pub const EXIT_BLK_NEEDS_RESET: u32 = 16;

/// Exit code: a `net=` word found no modern virtio-net device.
pub const EXIT_NET_NO_DEVICE: u32 = 20;
/// Exit code: the virtio-net device could not be initialised.
pub const EXIT_NET_INIT: u32 = 21;
/// Exit code: `net=recv` saw lost, damaged or duplicated frames.
pub const EXIT_NET_VERIFY: u32 = 22;
/// Exit code: a `net=` wait ran out (peer silent, no progress).
pub const EXIT_NET_TIMEOUT: u32 = 23;
/// Exit code: the virtio-net device needs a reset or returned a buffer
/// that was never posted.
pub const EXIT_NET_DEVICE: u32 = 24;

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
    fn blk_pattern_is_stable_and_self_checking() {
        use blk_pattern::{block_ok, fill_block, BLOCK_SIZE, MAGIC};
        let mut b = [0u8; BLOCK_SIZE];
        fill_block(7, 3, &mut b);
        assert_eq!(&b[..8], &MAGIC);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 3);
        let sum = u64::from_le_bytes(b[BLOCK_SIZE - 8..].try_into().unwrap());
        assert_eq!(sum, fnv1a64(&b[..BLOCK_SIZE - 8]));
        // Pinned: images written by older guests must still verify.
        assert_eq!(fnv1a64(&b), 0xba7e_bb41_4db1_5ff9); // from an independent Python model
        assert!(block_ok(7, 3, &b));
        assert!(!block_ok(7, 4, &b), "another block number");
        assert!(!block_ok(8, 3, &b), "another seed");
        let mut other = [0u8; BLOCK_SIZE];
        fill_block(7, 4, &mut other);
        assert_ne!(b[24..64], other[24..64], "blocks differ in content");
        b[100] ^= 1;
        assert!(!block_ok(7, 3, &b), "a flipped bit");
    }

    #[test]
    fn virtio_mmio_words_parse_like_linux() {
        use words::{parse_virtio_mmio, VirtioMmioDecl};
        let d = |size, base, gsi| Some(VirtioMmioDecl { size, base, gsi });
        assert_eq!(
            parse_virtio_mmio("4K@0xd0000000:16"),
            d(4096, 0xd000_0000, 16)
        );
        assert_eq!(
            parse_virtio_mmio("0x1000@0xd0001000:17"),
            d(4096, 0xd000_1000, 17)
        );
        assert_eq!(
            parse_virtio_mmio("512@0xfeb00e00:12"),
            d(512, 0xfeb0_0e00, 12)
        );
        assert_eq!(
            parse_virtio_mmio("1k@4096:5:3"),
            d(1024, 4096, 5),
            "platform id"
        );
        for bad in [
            "4K@0xd0000000",
            "@0xd0000000:5",
            "4K@:5",
            "4K@0xd0000000:x",
            "16@0x0:5",
            "4Q@0:5",
        ] {
            assert_eq!(parse_virtio_mmio(bad), None, "{bad}");
        }
    }

    #[test]
    fn blk_words_parse_and_reject_garbage() {
        use words::{parse_blk, BadKind, BenchKind, BlkWord};
        assert_eq!(
            parse_blk("write:7:64"),
            Some(BlkWord::Write {
                seed: 7,
                blocks: 64
            })
        );
        assert_eq!(
            parse_blk("verify:0x10:1"),
            Some(BlkWord::Verify {
                seed: 16,
                blocks: 1
            })
        );
        assert_eq!(parse_blk("id"), Some(BlkWord::Id));
        assert_eq!(parse_blk("expect-ro"), Some(BlkWord::ExpectRo));
        for kind in BadKind::ALL {
            assert_eq!(
                parse_blk(&format!("bad:{}", kind.name())),
                Some(BlkWord::Bad(kind))
            );
        }
        assert_eq!(
            parse_blk("bench:seqread:100"),
            Some(BlkWord::Bench {
                kind: BenchKind::SeqRead,
                ops: 100,
                depth: words::MAX_DEPTH
            })
        );
        assert_eq!(
            parse_blk("bench:randwrite:7:1"),
            Some(BlkWord::Bench {
                kind: BenchKind::RandWrite,
                ops: 7,
                depth: 1
            })
        );
        assert_eq!(parse_blk("use:1"), Some(BlkWord::Use { index: 1 }));
        for bad in [
            "",
            "write:7",
            "write:7:64:1",
            "id:1",
            "bad:worse",
            "bench:seqwrite:1",
            "verify:x:1",
            "bench:randread:1:0",
            "bench:randread:1:17",
            "bench:randread:1:2:3",
            "use",
            "use:x",
        ] {
            assert_eq!(parse_blk(bad), None, "{bad}");
        }
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
