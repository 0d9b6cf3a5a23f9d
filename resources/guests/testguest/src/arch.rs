//! x86 tables and per-CPU state shared by the CPL 0 assembly (`cpl0.rs`) and
//! CPL 3 code, plus port and MMIO access helpers.
//!
//! The tables themselves live in `cpl0.rs`. All memory is identity-mapped
//! and user-accessible.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// Most CPUs the guest brings up (extra MADT entries are reported, not started).
pub const MAX_CPUS: usize = 16;
/// log2 of the CPL 0 stack size per CPU (4 KiB: interrupt frames + calls).
pub const KSTACK_SHIFT: u32 = 12;
/// CPL 0 stack size per CPU.
pub const KSTACK_SIZE: usize = 1 << KSTACK_SHIFT;
/// log2 of the CPL 3 stack size per CPU (32 KiB).
pub const USTACK_SHIFT: u32 = 15;
/// CPL 3 stack size per CPU.
pub const USTACK_SIZE: usize = 1 << USTACK_SHIFT;

/// GDT selectors (see `pvh_gdt` in `cpl0.rs`).
pub const SEL_KCODE64: u64 = 0x08;
/// Kernel data selector.
pub const SEL_KDATA: u64 = 0x10;
/// User data selector (RPL added by the users).
pub const SEL_UDATA: u64 = 0x20;
/// User 64-bit code selector.
pub const SEL_UCODE64: u64 = 0x28;
/// 32-bit kernel code, used by the AP trampoline.
pub const SEL_KCODE32: u64 = 0x30;
/// log2 of the space per TSS (104 bytes + I/O bitmap + terminator).
pub const TSS_SHIFT: u32 = 10;
/// Ports covered (all allowed) by each TSS's I/O bitmap. Port access at CPL 3
/// goes through this bitmap: the nested KVM here does not keep IOPL 3 for
/// CPL 3 code.
pub const IO_PORTS: usize = 0x1000;
const _: () = assert!(104 + IO_PORTS / 8 < 1 << TSS_SHIFT);
/// First TSS descriptor; CPU slot `n` uses `GDT_TSS0 + 16 * n`.
pub const GDT_TSS0: u64 = 0x40;

/// Interrupt vectors (the CPL 3 call gate is `abi::VEC_CALL`). Everything else (including all exceptions) is left
/// not-present, so any exception cascades to a triple fault.
pub const VEC_TIMER: u8 = 0x20;
/// Fixed IPI an AP sends to the BSP when it is online.
pub const VEC_AP_ONLINE: u8 = 0x21;
/// UART, IOAPIC pin 4.
pub const VEC_UART: u8 = 0x24;
/// GED (ACPI power button), IOAPIC pin 5.
pub const VEC_GED: u8 = 0x25;
/// virtio-mmio devices (their IOAPIC pins, edge, active high); the driver
/// reads each device's InterruptStatus to learn what happened.
pub const VEC_VIRTIO: u8 = 0x30;
/// LAPIC spurious vector (no EOI).
pub const VEC_SPURIOUS: u8 = 0xFF;

/// Index into [`IRQ_COUNTS`] (index 0 is the total), same order as the stubs.
/// The asm stubs count every kind; CPL 3 reads the ones it waits for.
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub enum Irq {
    /// LAPIC timer.
    Timer = 1,
    /// AP-online IPI.
    ApOnline = 2,
    /// Serial port.
    Uart = 3,
    /// Power button.
    Ged = 4,
    /// virtio-mmio device (any).
    Virtio = 6,
}

/// `[total, timer, ap_online, uart, ged, spurious, virtio]`, incremented by
/// the CPL 0 interrupt stubs with `lock inc`.
pub static IRQ_COUNTS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

/// Interrupts taken so far, on all CPUs.
pub fn irq_total() -> u64 {
    IRQ_COUNTS[0].load(Ordering::SeqCst)
}

/// Interrupts of one kind taken so far.
pub fn irq_count(irq: Irq) -> u64 {
    IRQ_COUNTS[irq as usize].load(Ordering::SeqCst)
}

/// Page-aligned stacks, one per CPU slot.
#[repr(C, align(4096))]
pub struct Stacks<const N: usize>(UnsafeCell<[[u8; N]; MAX_CPUS]>);
// SAFETY: each CPU only ever uses its own slot's stack.
unsafe impl<const N: usize> Sync for Stacks<N> {}

/// CPL 0 stacks (TSS.RSP0: interrupts and calls from CPL 3).
pub static KSTACKS: Stacks<KSTACK_SIZE> = Stacks(UnsafeCell::new([[0; KSTACK_SIZE]; MAX_CPUS]));
/// CPL 3 stacks.
pub static USTACKS: Stacks<USTACK_SIZE> = Stacks(UnsafeCell::new([[0; USTACK_SIZE]; MAX_CPUS]));

extern "C" {
    static pvh_start_info_paddr: u64;
    static mut pvh_ap_slot: u64;
}

/// Physical address of the PVH `hvm_start_info` (EBX at entry).
pub fn start_info_paddr() -> u64 {
    // SAFETY: written once by the CPL 0 entry before CPL 3 runs.
    unsafe { core::ptr::read_volatile(&raw const pvh_start_info_paddr) }
}

/// Tell the next AP to start which slot it is.
pub fn set_ap_slot(slot: usize) {
    // SAFETY: read by the AP's 32-bit entry; APs are started one at a time.
    unsafe { core::ptr::write_volatile(&raw mut pvh_ap_slot, slot as u64) }
}

/// `out` a byte.
#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O at CPL 3 is allowed by the TSS I/O bitmap (and IOPL 3
    // where the hypervisor keeps it); the guest owns its ports.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack)) }
}

/// `out` a 32-bit value.
#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as for outb.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack))
    }
}

/// `in` a byte.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as for outb.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack)) }
    val
}

/// Read a 32-bit MMIO/physical location (identity mapped, user-accessible).
pub fn read32(addr: u64) -> u32 {
    // SAFETY: the low 4 GiB are identity mapped; callers pass device
    // registers, firmware tables or addresses they mean to probe.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Write a 32-bit MMIO/physical location.
pub fn write32(addr: u64, val: u32) {
    // SAFETY: as for read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// Read `N` bytes of physical memory.
pub fn read_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: as for read32.
        *b = unsafe { core::ptr::read_volatile((addr + i as u64) as *const u8) };
    }
    out
}

/// A physical memory range as a byte slice (firmware tables, the initrd).
///
/// # Safety
/// `[addr, addr + len)` must be RAM below 4 GiB that nobody writes meanwhile.
pub unsafe fn phys_slice<'a>(addr: u64, len: usize) -> &'a [u8] {
    // SAFETY: per the caller's contract.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}
