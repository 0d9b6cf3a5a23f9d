//! vCPU configuration (CPUID, MSRs, FPU, LAPIC, boot registers) and the run
//! loop that routes exits to the device bus.

use partvisor_runtime::sync::MutexExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::devices::{BusAction, Devices};
use crate::error::{Error, Result};
use crate::exit::ExitReason;
use crate::layout;

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Boot GDT slots.
const GDT_CODE64: usize = 1;
const GDT_DATA: usize = 2;
const GDT_TSS: usize = 3;
const GDT_CODE32: usize = 4;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT part-vmm writes at `layout::BOOT_GDT`.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
    ]
}

fn segment(gdt: &[u64], index: usize) -> kvm_segment {
    let e = gdt[index];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in boot_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT + 8 * i as u64))
            .map_err(Error::write("the boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(Error::write("the boot IDT"))
}

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Applies the per-vCPU CPUID fix-ups: APIC id, logical count, hypervisor
/// bit, and a topology of `nvcpus` single-thread cores in one package.
pub fn fixup_cpuid(cpuid: &mut CpuId, apic_id: u32, nvcpus: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (nvcpus.min(255) << 16);
                e.ecx |= 1 << 31; // running on a hypervisor
                if nvcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: logical
                // processors sharing this cache - 1 (the last level is shared).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { nvcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((nvcpus - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index; // SMT level
                    }
                    1 => {
                        e.eax = ceil_log2(nvcpus);
                        e.ebx = nvcpus;
                        e.ecx = (2 << 8) | e.index; // core level
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

fn boot_msrs() -> Result<Msrs> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ])
    .map_err(Error::MsrList)
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub id: u32,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates and configures vCPU `id` of `nvcpus`. Only vCPU 0 gets boot
    /// registers; the others wait in KVM for INIT/SIPI from the guest.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: u32,
        nvcpus: u32,
        entry: Option<EntryPoint>,
    ) -> Result<Vcpu> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        fixup_cpuid(&mut cpuid, id, nvcpus);
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        let msrs = boot_msrs()?;
        let set = fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            let index = msrs.as_slice().get(set).map_or(0, |m| m.index);
            return Err(Error::MsrRefused { index });
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
        Self::set_lint(&fd)?;
        if let Some(entry) = entry {
            Self::set_boot_registers(&fd, entry)?;
        }
        Ok(Vcpu { id, fd })
    }

    /// LINT0 = ExtINT (the 8259), LINT1 = NMI, as firmware leaves them.
    fn set_lint(fd: &VcpuFd) -> Result<()> {
        const LVT_LINT0: usize = 0x350;
        const LVT_LINT1: usize = 0x360;
        let mut lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        for (off, mode) in [(LVT_LINT0, 0x7u32), (LVT_LINT1, 0x4u32)] {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[off + i] = *x as _;
            }
        }
        fd.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
    }

    fn set_boot_registers(fd: &VcpuFd, entry: EntryPoint) -> Result<()> {
        let gdt = boot_gdt();
        let mut sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        sregs.gdt.base = layout::BOOT_GDT;
        sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
        sregs.idt.base = layout::BOOT_IDT;
        sregs.idt.limit = 7;
        let data = segment(&gdt, GDT_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment(&gdt, GDT_TSS);
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match entry {
            EntryPoint::Pvh { entry, start_info } => {
                sregs.cs = segment(&gdt, GDT_CODE32);
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = start_info;
            }
            EntryPoint::Linux64 { entry, zero_page } => {
                sregs.cs = segment(&gdt, GDT_CODE64);
                sregs.cr3 = layout::BOOT_PML4;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
                sregs.efer |= EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rsi = zero_page;
                regs.rsp = layout::BOOT_PML4 - 0x10;
                regs.rbp = regs.rsp;
            }
        }
        fd.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
    }

    /// One line with the registers that explain a failure.
    fn describe_state(&mut self) -> String {
        let regs = self.fd.get_regs().map(|r| {
            format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx
            )
        });
        let sregs = self.fd.get_sregs().map(|s| {
            format!(
                "cs={:#x} cpl={} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cs.dpl, s.cr0, s.cr3, s.cr4, s.efer
            )
        });
        format!(
            "{} {}",
            regs.unwrap_or_else(|e| format!("regs unavailable: {e}")),
            sregs.unwrap_or_else(|e| format!("sregs unavailable: {e}"))
        )
    }

    fn internal_error(&mut self) -> ExitReason {
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
        // so the `internal` member of the exit union is the valid one.
        let (suberror, ndata, data) = unsafe {
            let i = self.fd.get_kvm_run().__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let n = (ndata as usize).min(data.len());
        let words: Vec<String> = data[..n].iter().map(|d| format!("{d:#x}")).collect();
        let what = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            "emulation failure"
        } else {
            "internal error"
        };
        ExitReason::InternalError {
            vcpu: self.id,
            detail: format!(
                "{what} (suberror {suberror}, data [{}]) {}",
                words.join(" "),
                self.describe_state()
            ),
        }
    }

    /// Runs the vCPU until the guest or KVM ends the partition, or `stop` is
    /// set and the vCPU is kicked.
    pub fn run(&mut self, devices: &Devices, stop: &AtomicBool) -> ExitReason {
        loop {
            if stop.load(Ordering::Acquire) {
                return ExitReason::VmmError {
                    detail: "stopped".into(),
                };
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN => {
                    // An AP that has not had its SIPI yet (nested KVM returns
                    // EAGAIN instead of blocking). Back off; never spin.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => {
                    return ExitReason::VmmError {
                        detail: format!("vcpu {}: KVM_RUN failed: {e}", self.id),
                    }
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
                VcpuExit::IoOut(port, data) => {
                    if let BusAction::Exit(r) = devices.pio_write(port, data) {
                        return r;
                    }
                }
                VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
                VcpuExit::Shutdown => return ExitReason::TripleFault { vcpu: self.id },
                VcpuExit::InternalError => return self.internal_error(),
                VcpuExit::FailEntry(reason, cpu) => {
                    return ExitReason::InternalError {
                        vcpu: self.id,
                        detail: format!(
                            "entry failed (hardware reason {reason:#x} on host cpu {cpu}) {}",
                            self.describe_state()
                        ),
                    }
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset { source: "kvm" },
                        other => ExitReason::VmmError {
                            detail: format!("vcpu {}: unhandled KVM system event {other}", self.id),
                        },
                    }
                }
                VcpuExit::Intr => {}
                VcpuExit::Hlt => {
                    return ExitReason::VmmError {
                        detail: format!(
                            "vcpu {}: HLT exit although the irqchip is in the kernel",
                            self.id
                        ),
                    }
                }
                other => {
                    let detail = format!("vcpu {}: unexpected exit {other:?}", self.id);
                    return ExitReason::VmmError { detail };
                }
            }
        }
    }
}

/// Confines the calling thread to the host CPUs in `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it
    // (ids are bounds-checked by CPU_SET against CPU_SETSIZE).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!(
                "CPU {c} is beyond CPU_SETSIZE"
            )));
        }
        // SAFETY: `c` < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 = the calling thread; `set` is initialised.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Shared by the vCPU threads: the first exit wins and wakes the event loop.
pub struct ExitSlot {
    reason: std::sync::Mutex<Option<ExitReason>>,
    pub evt: vmm_sys_util::eventfd::EventFd,
    pub stop: AtomicBool,
}

impl ExitSlot {
    pub fn new() -> Result<Arc<ExitSlot>> {
        Ok(Arc::new(ExitSlot {
            reason: std::sync::Mutex::new(None),
            evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(Error::io("exit eventfd"))?,
            stop: AtomicBool::new(false),
        }))
    }

    /// Records `r` unless a reason is already recorded, and wakes the loop.
    pub fn post(&self, r: ExitReason) {
        let mut slot = self.reason.locked();
        if slot.is_none() {
            *slot = Some(r);
        }
        // If the eventfd write fails the loop still sees the reason on its
        // next wake-up (signal or timer); nothing else can be done here.
        let _ = self.evt.write(1);
    }

    pub fn take(&self) -> Option<ExitReason> {
        self.reason.locked().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_to_flat_code_and_data() {
        let gdt = boot_gdt();
        let cs64 = segment(&gdt, GDT_CODE64);
        assert_eq!(
            (cs64.l, cs64.db, cs64.limit, cs64.selector),
            (1, 0, 0xffff_ffff, 0x08)
        );
        let cs32 = segment(&gdt, GDT_CODE32);
        assert_eq!(
            (cs32.l, cs32.db, cs32.type_, cs32.selector),
            (0, 1, 0xb, 0x20)
        );
        let ds = segment(&gdt, GDT_DATA);
        assert_eq!((ds.type_, ds.present, ds.base), (3, 1, 0));
    }

    #[test]
    fn cpuid_fixups_set_apic_id_count_and_hypervisor_bit() {
        let kvm = Kvm::new().unwrap();
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fixup_cpuid(&mut cpuid, 3, 4);
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        for e in cpuid.as_slice().iter().filter(|e| e.function == 0xb) {
            assert_eq!(e.edx, 3);
            if e.index == 1 {
                assert_eq!((e.eax, e.ebx), (2, 4));
            }
        }
    }

    #[test]
    fn ceil_log2_matches_topology_shift() {
        assert_eq!([1, 2, 3, 4, 5].map(ceil_log2), [0, 1, 2, 2, 3]);
    }
}
