//! Fixed platform devices: 8259 PIC, debug-exit port, i8042 reset, ACPI GED
//! power button and the FADT sleep register.

use crate::arch::{outb, outl, read32};

/// `out` a 32-bit code here to end the VM with that code.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// GED event register (read = pending bits, cleared by the read).
pub const GED_MMIO: u64 = 0xFEB0_0000;
/// GED interrupt (IOAPIC pin 5).
pub const GED_GSI: u8 = 5;
/// GED bit for the power button.
pub const GED_POWER_BUTTON: u32 = 1 << 1;
/// UART interrupt (IOAPIC pin 4).
pub const UART_GSI: u8 = 4;
/// SLP_TYP 5 | SLP_EN, written to the hardware-reduced sleep control reg.
pub const SLEEP_S5: u8 = (5 << 2) | (1 << 5);

/// Mask both 8259s: all interrupts come through the IOAPIC.
pub fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// End the VM with `code` through the debug-exit port.
pub fn debug_exit(code: u32) {
    outl(DEBUG_EXIT_PORT, code);
}

/// Ask the i8042 to reset the CPU.
pub fn i8042_reset() {
    outb(0x64, 0xFE);
}

/// Power off through the FADT sleep control register (I/O port).
pub fn acpi_poweroff(port: u16) {
    outb(port, SLEEP_S5);
}

/// Read and clear the GED's pending events.
pub fn ged_events() -> u32 {
    read32(GED_MMIO)
}
