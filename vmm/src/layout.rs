//! Guest-physical and port layout of a partvisor partition (x86_64).
//!
//! Everything a guest can touch is listed here; an address or port that is not
//! listed is *unassigned*: reads return all ones, writes are dropped, and both
//! are counted (see `devices::bus`).

/// Boot GDT written by part-vmm for the PVH 32-bit entry and the 64-bit
/// bzImage entry.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty) used while the guest installs its own.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry` array), right after start_info.
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for bzImage boot.
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the 64-bit bzImage entry: PML4, PDPT, PD.
pub const BOOT_PML4: u64 = 0x9000;
pub const BOOT_PDPT: u64 = 0xa000;
pub const BOOT_PD: u64 = 0xb000;
/// Kernel command line and its maximum size (including the NUL).
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// End of the low RAM block (640 KiB, as on a PC).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// ACPI tables live in a reserved block below 1 MiB; the RSDP comes first.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high RAM, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends here at most; the rest of RAM starts at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// GED (ACPI Generic Event Device): one 32-bit register of pending event
/// bits, cleared on read. Raised on `GED_GSI`.
pub const GED_MMIO: u64 = 0xfeb0_0000;
pub const GED_MMIO_SIZE: u64 = 4;
pub const GED_GSI: u32 = 5;
/// GED event bit: power button pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 1;
/// In-kernel IOAPIC and LAPIC (handled by KVM, never exit to part-vmm).
pub const IOAPIC_MMIO: u32 = 0xfec0_0000;
pub const LAPIC_MMIO: u32 = 0xfee0_0000;

/// 16550 UART (COM1) and its interrupt.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_GSI: u32 = 4;
/// i8042 controller ports (only the CPU-reset command is implemented).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Debug-exit port: a write of N ends part-vmm with the guest's code N
/// (QEMU's isa-debug-exit at the same port gives `(N << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const DEBUG_EXIT_PORT_LEN: u16 = 4;
/// ACPI hardware-reduced sleep control / status registers (FADT).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// Sleep type the DSDT's `_S5_` object announces for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// virtio-mmio transports: 4 KiB windows from `VIRTIO_MMIO_BASE`, interrupt
/// on GSI `VIRTIO_GSI_BASE + index` (edge, active high).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_GSI_BASE: u32 = 16;
/// IOAPIC pins 16..=23 carry virtio interrupts.
pub const MAX_VIRTIO_DEVICES: usize = 8;
