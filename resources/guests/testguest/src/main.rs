//! partvisor's test guest: a `no_std` PVH kernel that reports what the
//! partition monitor gave it (memory map, CPUs, cmdline, initrd) over the
//! serial port and then does what its cmdline words ask (README.md beside
//! this crate lists them). Built by `resources/guests/build.rs`.
//!
//! Layout rule: CPL 0 is only `cpl0.rs` (assembly, its own `.cpl0` section,
//! disassembled and checked at build time). Everything else runs at CPL 3.

#![no_std]
#![no_main]

mod abi;
mod acpi;
mod arch;
mod blk_pattern;
mod cpl0;
mod drivers;
mod mem;
mod net_frame;
mod pvh;
mod smp;
mod words;
mod workloads;

/// CPL 3 entry of every CPU; `slot` 0 is the BSP. Reached by `iretq` from
/// `cpl0.rs` with its TSS, the IDT and the 8259 masks in place.
#[no_mangle]
extern "C" fn guest_user_entry(slot: u64) -> ! {
    // SAFETY: CPL 3 owns the FPU/SSE state; give it the architectural default.
    unsafe { core::arch::asm!("fninit", options(nomem, nostack)) };
    if slot == 0 {
        workloads::report::bsp_main()
    } else {
        smp::ap_main(slot as usize)
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write as _;
    let mut w = drivers::serial::force_lock();
    let _ = writeln!(w, "panic: {info}");
    let _ = writeln!(w, "exit: 101");
    drivers::platform::debug_exit(101);
    smp::idle_forever()
}

/// Referenced by the prebuilt `core` even with `panic = "abort"`.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
