//! Boots the built test guest in QEMU microvm (KVM) and checks its report.
//!
//! Runner and its environment variables: `common/mod.rs`.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{boot, debug_exit_status, Boot, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SHUTDOWN};
use partvisor_test_guest::report::{Initrd, Probe};
use partvisor_test_guest::{fnv1a64, probe_low_address, PROBE_WRITE_VALUE};

#[test]
fn no_words_reports_and_exits_zero() {
    let out = boot(Boot::default());
    let r = out.report();
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
    assert!(r.header, "{out:#?}");
    assert_eq!(r.cmdline.as_deref(), Some(""));
    assert_eq!(r.exit, Some(0));
    assert_eq!(r.initrd, Some(Initrd::None));
    assert!(r.unknown_words.is_empty());
}

#[test]
fn cmdline_is_echoed_and_unknown_words_are_warned() {
    let out = boot(Boot {
        cmdline: "hello  virtio_mmio.device=4K@0xd0000000 blk=frobnicate exit=300",
        ..Boot::default()
    });
    let r = out.report();
    assert_eq!(
        r.cmdline.as_deref(),
        Some("hello  virtio_mmio.device=4K@0xd0000000 blk=frobnicate exit=300")
    );
    // The malformed declaration is warned about in the declaration pass,
    // before the other words.
    assert_eq!(
        r.unknown_words,
        vec![
            "virtio_mmio.device=4K@0xd0000000",
            "hello",
            "blk=frobnicate",
            "exit=300"
        ]
    );
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn exit_word_becomes_the_exit_status() {
    let out = boot(Boot {
        cmdline: "exit=7",
        ..Boot::default()
    });
    assert_eq!(out.report().exit, Some(7));
    assert_eq!(out.status, debug_exit_status(7), "{out:#?}");
    let out = boot(Boot {
        cmdline: "exit=100",
        ..Boot::default()
    });
    assert_eq!(out.report().exit, Some(100));
    assert_eq!(out.status, Some(201), "{out:#?}");
}

#[test]
fn one_vcpu_is_one_cpu_in_the_madt() {
    let out = boot(Boot::default());
    let r = out.report();
    assert_eq!(r.cpus, Some(1), "{out:#?}");
    assert_eq!(r.online, vec![0]);
}

#[test]
fn two_vcpus_are_found_in_the_madt_and_both_come_online() {
    let out = boot(Boot {
        vcpus: 2,
        ..Boot::default()
    });
    let r = out.report();
    assert_eq!(r.cpus, Some(2), "{out:#?}");
    assert_eq!(r.online, vec![0, 1], "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn memory_map_matches_the_memory_size() {
    for mib in [24u64, 32] {
        let out = boot(Boot {
            memory_mib: mib as u32,
            ..Boot::default()
        });
        let r = out.report();
        assert_eq!(r.ram_end(), Some(mib << 20), "{out:#?}");
        let ram = r.ram_bytes_from_memmap();
        assert_eq!(r.ram_kib, Some(ram / 1024));
        // All of it but what QEMU reserves below 1 MiB (EBDA, BIOS).
        assert!(
            ram <= mib << 20 && ram >= (mib << 20) - (1 << 20),
            "{ram:#x}"
        );
        // RAM entries never overlap.
        let mut ram_entries: Vec<_> = r.memmap.iter().filter(|e| e.kind == 1).collect();
        ram_entries.sort_by_key(|e| e.start);
        assert!(ram_entries.windows(2).all(|w| w[0].end <= w[1].start));
    }
}

#[test]
fn initrd_reaches_the_guest_intact() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = std::env::temp_dir().join(format!("partvisor-guest-initrd-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let out = boot(Boot {
        initrd: Some(path.clone()),
        ..Boot::default()
    });
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        out.report().initrd,
        Some(Initrd::Present {
            size: data.len() as u64,
            fnv1a64: fnv1a64(&data)
        }),
        "{out:#?}"
    );
}

#[test]
fn crash_triple_is_a_kvm_shutdown() {
    let out = boot(Boot {
        cmdline: "crash=triple",
        vcpus: 2,
        ..Boot::default()
    });
    assert!(
        out.report()
            .lines
            .iter()
            .any(|l| l == "crash: triple fault"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, None);
    assert_eq!(out.special_exits, vec![KVM_EXIT_SHUTDOWN], "{out:#?}");
    // -no-reboot turns the guest reset into a normal QEMU exit.
    assert_eq!(out.status, Some(0), "{out:#?}");
}

#[test]
fn crash_int3_is_a_shutdown_or_an_emulation_failure() {
    let out = boot(Boot {
        cmdline: "crash=int3",
        ..Boot::default()
    });
    assert!(
        out.report().lines.iter().any(|l| l == "crash: int3"),
        "{out:#?}"
    );
    assert_eq!(out.report().exit, None);
    let shutdown = out.special_exits == [KVM_EXIT_SHUTDOWN] && out.status == Some(0);
    let emulation_failure = out.special_exits.contains(&KVM_EXIT_INTERNAL_ERROR)
        || out.stderr.contains("KVM internal error");
    assert!(shutdown || emulation_failure, "{out:#?}");
}

#[test]
fn probe_unassigned_reads_qemu_unassigned_value_and_writes_are_dropped() {
    let out = boot(Boot {
        cmdline: "probe=unassigned",
        memory_mib: 24,
        ..Boot::default()
    });
    let low = probe_low_address(24 << 20);
    let high = partvisor_test_guest::PROBE_HIGH_ADDRESS;
    let mut expected = Vec::new();
    for addr in [low, high] {
        // QEMU 7.2 reads unassigned guest-physical memory as 0 (part-vmm:
        // all ones); either way the write must not stick.
        expected.push(Probe::Read { addr, value: 0 });
        expected.push(Probe::Write { addr });
        expected.push(Probe::Read { addr, value: 0 });
    }
    assert_eq!(out.report().probes, expected, "{out:#?}");
    assert!(!out.serial.contains(&format!("{PROBE_WRITE_VALUE:08x}")));
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn serial_input_is_echoed_through_the_uart_interrupt() {
    let out = boot(Boot {
        cmdline: "echo=3",
        stdin: Some(b"aZ\n"),
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "echo: ready"), "{out:#?}");
    assert_eq!(r.echoed, b"aZ\n".to_vec(), "{out:#?}");
    assert_eq!(out.status, debug_exit_status(0), "{out:#?}");
}

#[test]
fn reset_word_resets_through_the_i8042() {
    let out = boot(Boot {
        cmdline: "reset",
        extra_args: &["-device", "i8042"],
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "reset: i8042"), "{out:#?}");
    assert!(!r.lines.iter().any(|l| l == "reset: no effect"), "{out:#?}");
    // A reset request, not a triple fault; -no-reboot makes it QEMU's exit.
    assert_eq!(out.special_exits, Vec::<u32>::new(), "{out:#?}");
    assert_eq!(out.status, Some(0), "{out:#?}");
}

#[test]
fn reset_word_without_an_i8042_exits_4_after_a_second() {
    let out = boot(Boot {
        cmdline: "reset",
        ..Boot::default()
    });
    let r = out.report();
    assert!(r.lines.iter().any(|l| l == "reset: no effect"), "{out:#?}");
    assert_eq!(r.exit, Some(partvisor_test_guest::EXIT_RESET_IGNORED));
    assert_eq!(out.status, debug_exit_status(4), "{out:#?}");
}
