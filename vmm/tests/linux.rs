//! Linux guest checks with Debian's cloud kernel, fetched by
//! `resources/linux/fetch-kernel.sh` (which `.ci/run` runs first).
//!
//! On these nested-KVM machines Linux runs its CPL 0 code in KVM's emulator:
//! it prints its banner and parses our ACPI tables, then dies at its first
//! instruction the emulator cannot run. On an ordinary host it goes on until
//! it panics for lack of a root file system. The smoke test accepts either
//! ending and checks what can be checked here.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use common::*;

fn kernel_dir() -> PathBuf {
    std::env::var_os("PARTVISOR_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux"))
}

/// The fetched kernel directory, or `None` after printing `skipped:` when
/// the package could not be had. Panics when the fetch was never attempted.
fn fetched() -> Option<PathBuf> {
    let dir = kernel_dir();
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_else(|_| {
        panic!(
            "{}/status is missing: the kernel fetch was not attempted; run resources/linux/fetch-kernel.sh",
            dir.display()
        )
    });
    match status.trim() {
        "ok" => Some(dir),
        other => {
            partvisor_runtime::ci::environment_missing(format!(
                "the Debian kernel package: {}",
                other.trim_start_matches("missing: ")
            ));
            None
        }
    }
}

#[test]
fn debian_vmlinux_boots_via_pvh_and_reads_our_acpi_tables() {
    let Some(dir) = fetched() else { return };
    let _l = vm_lock();
    let vmlinux = dir.join("vmlinux");
    let mut child = command(&[
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--vcpus",
        "2",
        "--memory-mib",
        "256",
        "--cmdline",
        "earlyprintk=ttyS0 console=ttyS0 panic=-1",
    ])
    .spawn()
    .unwrap();
    let mut out = child.stdout.take().unwrap();
    let wanted = [
        "Linux version ",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ];
    let start = Instant::now();
    let mut acc = String::new();
    let mut buf = [0u8; 4096];
    while !wanted.iter().all(|w| acc.contains(w)) {
        if start.elapsed() > deadline() * 3 {
            let _ = child.kill();
            panic!(
                "missing {:?} after {:?} in:\n{acc}",
                wanted
                    .iter()
                    .filter(|w| !acc.contains(*w))
                    .collect::<Vec<_>>(),
                start.elapsed()
            );
        }
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => acc.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("read: {e}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let missing: Vec<_> = wanted.iter().filter(|w| !acc.contains(*w)).collect();
    assert!(
        missing.is_empty(),
        "kernel ended before printing {missing:?}:\n{acc}"
    );
    println!(
        "linux: all {} markers seen after {:?}",
        wanted.len(),
        start.elapsed()
    );
}

#[test]
fn bzimage_loader_places_boot_params_entry_cmdline_and_initrd() {
    use linux_loader::loader::bootparam::boot_params;
    use vm_memory::{Bytes, GuestAddress};
    let Some(dir) = fetched() else { return };
    let ram = part_vmm::memory::GuestRam::new(256).unwrap();
    let scratch = scratch("bzimage");
    let initrd: Vec<u8> = (0..65_537u32).map(|i| (i * 7) as u8).collect();
    let initrd_path = write_file(&scratch, "initrd", &initrd);
    let cmdline = "console=ttyS0 root=/dev/vda";
    let placed = part_vmm::boot::load(
        &ram.memory,
        ram.size,
        &dir.join("bzImage"),
        Some(&initrd_path),
        cmdline,
        0xe_0000,
    )
    .unwrap();
    assert_eq!(
        placed.entry,
        part_vmm::boot::EntryPoint::Linux64 {
            entry: 0x10_0000 + 0x200,
            zero_page: part_vmm::layout::ZERO_PAGE
        }
    );
    let bp: boot_params = part_vmm::boot::read_zero_page(&ram.memory).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.cmd_line_ptr } as u64, part_vmm::layout::CMDLINE);
    assert_eq!({ bp.acpi_rsdp_addr }, 0xe_0000);
    let (addr, size) = placed.initrd.unwrap();
    assert_eq!(
        ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64),
        (addr, size)
    );
    assert_eq!(size, initrd.len() as u64);
    assert!(addr >= placed.kernel_end && addr + size <= ram.size);
    let mut back = vec![0u8; initrd.len()];
    ram.memory
        .read_slice(&mut back, GuestAddress(addr))
        .unwrap();
    assert_eq!(back, initrd);
    let mut cl = vec![0u8; cmdline.len() + 1];
    ram.memory
        .read_slice(&mut cl, GuestAddress(part_vmm::layout::CMDLINE))
        .unwrap();
    assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cl[cmdline.len()], 0);
    let e820: Vec<(u64, u64, u32)> = bp.e820_table[..bp.e820_entries as usize]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(e820, part_vmm::boot::memory_map(ram.size));
    // The 64-bit entry needs identity page tables: PML4[0] -> PDPT.
    let pml4: u64 = ram
        .memory
        .read_obj(GuestAddress(part_vmm::layout::BOOT_PML4))
        .unwrap();
    assert_eq!(pml4 & !0xfff, part_vmm::layout::BOOT_PDPT);
    // The kernel's protected-mode code was copied to 1 MiB.
    let file = std::fs::read(dir.join("bzImage")).unwrap();
    let setup = (usize::from(file[0x1f1].max(4)) + 1) * 512;
    let mut head = [0u8; 64];
    ram.memory
        .read_slice(&mut head, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(&head[..], &file[setup..setup + 64]);
}
