//! The boot report (format documented in resources/guests/README.md).

use crate::acpi;
use crate::arch;
use crate::drivers::{lapic, platform, serial};
use crate::pvh::StartInfo;
use crate::say;
use crate::workloads::{exit, run, Boot};

use crate::blk_pattern::fnv1a64;

/// BSP main line: tables, report, APs, then the cmdline words.
pub fn bsp_main() -> ! {
    serial::init();
    platform::mask_pic();
    say!("partvisor-testguest 1");
    let Some(si) = StartInfo::read(arch::start_info_paddr()) else {
        say!(
            "error: no PVH start_info (bad magic at 0x{:x})",
            arch::start_info_paddr()
        );
        exit(2);
    };
    let cmdline = core::str::from_utf8(si.cmdline()).unwrap_or("");
    say!("cmdline: {cmdline}");
    let (mut ram, mut ram_end) = (0u64, 0u64);
    for e in si.memmap() {
        let end = e.addr.saturating_add(e.size);
        say!("memmap: {} 0x{:016x} 0x{:016x}", e.kind, e.addr, end);
        if e.kind == 1 {
            ram += e.size;
            ram_end = ram_end.max(end);
        }
    }
    say!("ram: {} KiB", ram / 1024);

    let platform = acpi::find_rsdp(si.rsdp_paddr).map(acpi::parse);
    let cpus = platform.as_ref().map_or(0, |p| p.cpus);
    if cpus > 0 {
        say!("cpus: {cpus} (madt)");
    } else {
        say!("cpus: 1 (no madt)");
    }
    if let Some(p) = &platform {
        if p.lapic != lapic::LAPIC_DEFAULT {
            say!(
                "warn: LAPIC at 0x{:x}, expected 0x{:x}",
                p.lapic,
                lapic::LAPIC_DEFAULT
            );
        }
    }
    lapic::enable();
    let bsp_apic_id = lapic::id();
    say!("cpu {bsp_apic_id}: online");
    if let Some(p) = &platform {
        let known = &p.apic_ids[..p.cpus.min(p.apic_ids.len())];
        if let Err(online) = crate::smp::start_aps(&si, known) {
            say!(
                "cpu: timeout waiting for APs ({online} of {} online)",
                known.len()
            );
            exit(3);
        }
    }
    match si.first_module() {
        Some(m) => {
            // SAFETY: the VMM loaded the module into RAM at paddr..+size.
            let data = unsafe { arch::phys_slice(m.paddr, m.size as usize) };
            say!("initrd: {} bytes fnv1a64={:016x}", m.size, fnv1a64(data));
        }
        None => say!("initrd: none"),
    }
    let mut ioapics = [(0, 0); crate::acpi::MAX_IOAPICS];
    let nr_ioapics = match &platform {
        Some(p) if p.nr_ioapics > 0 => {
            ioapics = p.ioapics;
            p.nr_ioapics
        }
        // No MADT (QEMU microvm with acpi=off): the architectural default.
        _ => {
            ioapics[0] = (lapic::IOAPIC_DEFAULT, 0);
            1
        }
    };
    let boot = Boot {
        ram_end,
        ioapics,
        nr_ioapics,
        ioapic: platform.as_ref().and_then(|p| p.ioapic),
        sleep_port: platform.as_ref().and_then(|p| p.sleep_port),
        bsp_apic_id,
    };
    run(cmdline, &boot)
}
