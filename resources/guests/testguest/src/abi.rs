//! The CPL 3 -> CPL 0 calls: CPL 3 executes a *tagged* `ud2`
//! (`0f 0b 50 56`, i.e. `ud2` followed by "PV") with the number in RAX and
//! one argument in RDI. The #UD exception enters CPL 0 through IDT vector 6
//! (an interrupt gate: IF off, stack from TSS.RSP0); `pvh_call_entry` in
//! `cpl0.rs` checks the tag, skips it, does the call and returns with
//! `iretq`, result in RAX. A #UD without the tag triple-faults on purpose.
//!
//! Why not `syscall` or `int $0x80` (measured on the project's nested-KVM
//! "PVM" machines, QEMU microvm): `syscall` jumps to LSTAR with RCX/R11 and
//! FMASK applied but leaves CS/SS at CPL 3, so the handler's first
//! privileged instruction faults; `int $0x80` through a DPL 3 gate ends in a
//! triple fault. Hardware interrupts and exceptions raised at CPL 3 are
//! delivered through the guest IDT correctly, so an exception is the gate.

/// The four bytes at the call site: `ud2` (0f 0b) then "PV", little-endian.
pub const CALL_TAG: u32 = 0x5650_0B0F;

/// Sleep (`sti; hlt` at CPL 0) until the global interrupt count differs from
/// the argument. The comparison happens with interrupts off, so a wakeup that
/// arrives between the caller's check and the call is never lost.
pub const SYS_WAIT: u64 = 1;
/// crash=triple helper: load an empty IDT, then make the CPU raise #GP;
/// #GP -> #GP -> #DF -> triple fault. Never returns.
pub const SYS_TRIPLE_FAULT: u64 = 3;

#[inline(always)]
fn call1(nr: u64, arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: the CPL 0 entry only reads RAX and RDI, writes RAX, and runs
    // on its own stack; memory may change (interrupt counters).
    unsafe {
        core::arch::asm!(
            "ud2",
            ".byte 0x50, 0x56",
            inlateout("rax") nr => ret,
            in("rdi") arg,
        );
    }
    ret
}

/// Sleep until an interrupt arrives that was not yet counted in `seen`
/// (see [`crate::arch::irq_total`]).
pub fn wait(seen: u64) {
    call1(SYS_WAIT, seen);
}

/// Force a triple fault. Never returns.
pub fn triple_fault() -> ! {
    call1(SYS_TRIPLE_FAULT, 0);
    // Unreachable: if the VMM somehow resumes us, stay harmless.
    loop {
        wait(crate::arch::irq_total());
    }
}
