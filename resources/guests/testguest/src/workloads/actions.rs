//! The cmdline actions: probe, echo, stay, crash, reset.

use crate::arch::{self, irq_count, irq_total, Irq, VEC_GED, VEC_UART};
use crate::drivers::{lapic, platform, serial};
use crate::say;
use crate::smp::{idle_forever, wait_until};
use crate::workloads::{exit, Boot};

const MIB: u64 = 1 << 20;
/// The identity map covers the low 4 GiB.
const MAPPED_END: u64 = 1 << 32;
/// Second probe address (a typical PCI hole start).
const PROBE_HIGH: u64 = 0xC000_0000;

fn probe_one(addr: u64) {
    if addr + 4 > MAPPED_END {
        say!("warn: probe 0x{addr:016x} is above the identity map");
        return;
    }
    say!("probe: read 0x{:016x} = 0x{:08x}", addr, arch::read32(addr));
    arch::write32(addr, 0x1234_5678);
    say!("probe: write 0x{addr:016x}");
    say!("probe: read 0x{:016x} = 0x{:08x}", addr, arch::read32(addr));
}

/// probe=unassigned: touch guest-physical addresses that are not RAM.
pub fn probe_unassigned(boot: &Boot) {
    let first = boot.ram_end.div_ceil(MIB) * MIB + MIB;
    probe_one(first);
    if PROBE_HIGH >= boot.ram_end && PROBE_HIGH != first {
        probe_one(PROBE_HIGH);
    }
}

/// echo=N: echo N received serial bytes (IRQ 4, HLT in between).
pub fn echo(boot: &Boot, n: u32) {
    let Some(ioapic) = boot.ioapic else {
        say!("echo: no IOAPIC");
        return;
    };
    lapic::ioapic_route(ioapic, platform::UART_GSI, VEC_UART, boot.bsp_apic_id);
    serial::enable_rx_interrupt();
    say!("echo: ready");
    let mut got = 0;
    while got < n {
        let seen = irq_total();
        while got < n {
            match serial::try_read() {
                Some(b) => {
                    say!("echo: 0x{b:02x}");
                    got += 1;
                }
                None => break,
            }
        }
        if got < n {
            crate::abi::wait(seen);
        }
    }
}

/// stay: idle in HLT until the ACPI power button, then power off.
pub fn stay(boot: &Boot) -> ! {
    if let Some(ioapic) = boot.ioapic {
        lapic::ioapic_route(ioapic, platform::GED_GSI, VEC_GED, boot.bsp_apic_id);
    }
    say!("stay: idle");
    let mut handled = irq_count(Irq::Ged);
    loop {
        let seen = irq_total();
        let ged = irq_count(Irq::Ged);
        if ged != handled {
            handled = ged;
            if platform::ged_events() & platform::GED_POWER_BUTTON != 0 {
                break;
            }
        }
        crate::abi::wait(seen);
    }
    say!("stop: power button");
    say!("exit: 0");
    if let Some(port) = boot.sleep_port {
        platform::acpi_poweroff(port);
    }
    platform::debug_exit(0);
    idle_forever()
}

/// flood=SECONDS: for SECONDS, write a sleep type the monitor ignores
/// (not S5) to the ACPI sleep control port as fast as it goes: each write
/// is one line the monitor could log. A deliberate busy loop (the one
/// workload that does not HLT): it tests that a guest cannot grow its
/// monitor's log at will.
pub fn flood(boot: &Boot, seconds: u32) {
    let Some(port) = boot.sleep_port else {
        say!("flood: no sleep control port");
        return;
    };
    let mut clock = crate::workloads::clock::Clock::start();
    let end = clock.now() + u64::from(seconds) * 1_000_000_000;
    let mut writes = 0u64;
    while clock.now() < end {
        for _ in 0..64 {
            // SLP_EN with sleep type 0 (S0): ignored by the monitor.
            arch::outb(port, 1 << 5);
        }
        writes += 64;
    }
    say!("flood: {writes} writes in {seconds} s");
}

/// crash=triple: empty IDT + a CPU-raised #GP at CPL 0 (call `SYS_TRIPLE_FAULT`).
pub fn crash_triple() -> ! {
    say!("crash: triple fault");
    crate::abi::triple_fault()
}

/// crash=int3: `int3` at CPL 3 with IDT vector 3 not present.
pub fn crash_int3() -> ! {
    say!("crash: int3");
    // SAFETY: deliberately fatal; vector 3 is not present, so this either
    // cascades to a triple fault or (under KVM's emulator) fails emulation.
    unsafe { core::arch::asm!("int3") };
    exit(1)
}

/// reset: ask the i8042 for a CPU reset; exit 4 if nothing happens in 1 s.
pub fn reset() -> ! {
    say!("reset: i8042");
    platform::i8042_reset();
    wait_until(1_000_000_000, || false);
    say!("reset: no effect");
    exit(4)
}
