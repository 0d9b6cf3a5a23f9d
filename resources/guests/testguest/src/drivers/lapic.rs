//! Local APIC (xAPIC MMIO) and IOAPIC, programmed at CPL 3.

use crate::arch::{read32, write32};

/// Default LAPIC base; the interrupt stubs' EOI write uses this address.
pub const LAPIC_DEFAULT: u64 = 0xFEE0_0000;

/// Where the first IOAPIC is when no MADT says otherwise.
pub const IOAPIC_DEFAULT: u64 = 0xFEC0_0000;

const ID: u64 = 0x20;
const SVR: u64 = 0xF0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const TIMER_INIT: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIV: u64 = 0x3E0;
const ICR_PENDING: u32 = 1 << 12;

/// KVM's LAPIC timer counts at 1 GHz with divide-by-1.
pub const TIMER_HZ: u64 = 1_000_000_000;

/// This CPU's APIC id.
pub fn id() -> u32 {
    read32(LAPIC_DEFAULT + ID) >> 24
}

/// Software-enable this CPU's LAPIC with the spurious vector.
pub fn enable() {
    write32(
        LAPIC_DEFAULT + SVR,
        0x100 | u32::from(crate::arch::VEC_SPURIOUS),
    );
}

fn icr(dest: u32, low: u32) {
    write32(LAPIC_DEFAULT + ICR_HIGH, dest << 24);
    write32(LAPIC_DEFAULT + ICR_LOW, low);
    while read32(LAPIC_DEFAULT + ICR_LOW) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// INIT (assert) to `dest`.
pub fn send_init(dest: u32) {
    icr(dest, 0x4500);
}

/// STARTUP IPI to `dest`; the AP starts in real mode at `page << 12`.
pub fn send_sipi(dest: u32, page: u8) {
    icr(dest, 0x4600 | u32::from(page));
}

/// Fixed IPI with `vector` to `dest`.
pub fn send_fixed(dest: u32, vector: u8) {
    icr(dest, 0x4000 | u32::from(vector));
}

/// Arm the one-shot timer to fire [`crate::arch::VEC_TIMER`] after `ns`
/// nanoseconds (0 stops it).
pub fn timer_oneshot_ns(ns: u64) {
    let count = (ns.saturating_mul(TIMER_HZ) / 1_000_000_000).min(u64::from(u32::MAX)) as u32;
    write32(LAPIC_DEFAULT + TIMER_DIV, 0b1011); // divide by 1
    write32(LAPIC_DEFAULT + LVT_TIMER, u32::from(crate::arch::VEC_TIMER));
    write32(LAPIC_DEFAULT + TIMER_INIT, count);
}

/// Whether the one-shot timer armed last has run down (a timer interrupt
/// from an earlier, cancelled arming does not make this true).
pub fn timer_expired() -> bool {
    read32(LAPIC_DEFAULT + TIMER_CURRENT) == 0
}

/// Nanoseconds (timer ticks) left on the one-shot timer armed last.
pub fn timer_remaining() -> u32 {
    read32(LAPIC_DEFAULT + TIMER_CURRENT)
}

/// How many redirection entries (pins) the IOAPIC at `base` has.
pub fn ioapic_pins(base: u64) -> u32 {
    write32(base, 1); // IOAPICVER
    ((read32(base + 0x10) >> 16) & 0xFF) + 1
}

/// IOAPIC at `base`: route `pin` (edge, active high) to `vector` on `dest`.
pub fn ioapic_route(base: u64, pin: u8, vector: u8, dest: u32) {
    let reg = 0x10 + 2 * u32::from(pin);
    write32(base, reg + 1);
    write32(base + 0x10, dest << 24);
    write32(base, reg);
    write32(base + 0x10, u32::from(vector));
}
