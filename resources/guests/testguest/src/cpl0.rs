//! Everything that runs at CPL 0, in the linker output section `.cpl0`.
//!
//! On the project's machines CPL 0 is executed by KVM's instruction emulator
//! (~0.85 µs per instruction, no x87/SSE/`int`), so this is deliberately
//! small, written in assembly only (no compiler-generated code can sneak in),
//! and checked by the host crate's build script, which disassembles `.cpl0`
//! and fails on any x87/SSE/AVX/`int` instruction and on any branch out of it.
//!
//! Contents:
//! - `.cpl0.text16`: the AP real-mode trampoline (copied to [`AP_TRAMPOLINE`]
//!   by CPL 3 code before the SIPI);
//! - `.cpl0.text32`: the PVH entry (32-bit protected mode, paging off) and the
//!   AP's 32-bit stage, which enable long mode with the static page tables;
//! - `.cpl0.text64`: per-CPU setup (segments, IDT gates on the BSP, this
//!   CPU's TSS and `ltr`), the `iretq` into CPL 3, the `ud2` call
//!   entry and the interrupt stubs.
//!
//! The GDT and page tables are static data built by the assembler; the IDT
//! gates and TSS descriptors hold split addresses the assembler cannot
//! compute, so the entry code writes them (a few dozen instructions).

use crate::abi::{CALL_TAG, SYS_TRIPLE_FAULT, SYS_WAIT};
use crate::arch::{
    GDT_TSS0, IO_PORTS, IRQ_COUNTS, KSTACKS, KSTACK_SHIFT, MAX_CPUS, SEL_KCODE32, SEL_KCODE64,
    SEL_KDATA, SEL_UCODE64, SEL_UDATA, TSS_SHIFT, USTACKS, USTACK_SHIFT, VEC_AP_ONLINE, VEC_GED,
    VEC_SPURIOUS, VEC_TIMER, VEC_UART, VEC_VIRTIO,
};

/// Physical page the AP trampoline is copied to (SIPI vector 0x08).
pub const AP_TRAMPOLINE: u64 = 0x8000;

extern "C" {
    /// Start of the 16-bit AP trampoline (in `.cpl0`, copied before use).
    pub static ap_tramp_start: u8;
    /// End of the 16-bit AP trampoline.
    pub static ap_tramp_end: u8;
}

core::arch::global_asm!(
    r#"
    /* ---------------- PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18) ------ */
    .pushsection .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long 18                /* type   */
    .asciz "Xen"
    .quad pvh_entry32       /* 64-bit field, as Linux and QEMU expect */
    .popsection

    /* IDT gate: vector, handler, DPL (64-bit interrupt gate). Runs once on
     * the BSP at CPL 0; the assembler cannot split a relocatable address. */
    .macro SET_GATE vector, handler, dpl
    movq $\handler, %rax
    movq %rax, %rdx
    andq $0xFFFF, %rdx
    orq ${sel_kcode64} << 16, %rdx
    movq %rax, %rcx
    shrq $16, %rcx
    shlq $48, %rcx
    orq %rcx, %rdx
    movabsq $(0x8E00 | (\dpl << 13)) << 32, %rcx
    orq %rcx, %rdx
    movq %rdx, pvh_idt + 16 * \vector
    movq $0, pvh_idt + 16 * \vector + 8
    .endm

    /* ---------------- static tables ------------------------------------ */
    .pushsection .data.pagetables, "aw"
    .p2align 12
    .globl pvh_pml4
pvh_pml4:
    .quad pvh_pdpt + 0x7                    /* P | RW | US */
    .fill 511, 8, 0
    .p2align 12
pvh_pdpt:
    .quad pvh_pd + 0x0000 + 0x7
    .quad pvh_pd + 0x1000 + 0x7
    .quad pvh_pd + 0x2000 + 0x7
    .quad pvh_pd + 0x3000 + 0x7
    .fill 508, 8, 0
    .p2align 12
pvh_pd:                                     /* low 4 GiB, 2 MiB pages */
    .set pd_index, 0
    .rept 2048
    .quad (pd_index << 21) | 0x87           /* P | RW | US | PS */
    .set pd_index, pd_index + 1
    .endr

    .p2align 4
    .globl pvh_gdt
pvh_gdt:
    .quad 0                                 /* 0x00 null */
    .quad 0x00AF9A000000FFFF                /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF                /* 0x10 kernel data */
    .quad 0x00CFFA000000FFFF                /* 0x18 user code 32 (unused) */
    .quad 0x00CFF2000000FFFF                /* 0x20 user data */
    .quad 0x00AFFA000000FFFF                /* 0x28 user code, 64-bit */
    .quad 0x00CF9A000000FFFF                /* 0x30 kernel code, 32-bit (AP) */
    .quad 0                                 /* 0x38 unused */
    .fill {max_cpus} * 2, 8, 0              /* 0x40 + 16*slot: TSS descriptors */
pvh_gdt_end:
    .p2align 3
pvh_gdtr:
    .word pvh_gdt_end - pvh_gdt - 1
    .quad pvh_gdt
    .p2align 3
    .globl pvh_idtr
pvh_idtr:
    .word 4095
    .quad pvh_idt
pvh_null_idtr:
    .word 0
    .quad 0
    .globl pvh_start_info_paddr
pvh_start_info_paddr:
    .quad 0
    .globl pvh_ap_slot
pvh_ap_slot:
    .quad 0
    .popsection

    .pushsection .bss.idt, "aw", @nobits
    .p2align 12
    .globl pvh_idt
pvh_idt:
    .zero 4096
    .p2align 12
pvh_tss:
    .zero {max_cpus} << {tss_shift}
    .popsection

    /* ---------------- AP real-mode trampoline (runs at 0x8000) ---------- */
    .pushsection .cpl0.text16, "ax"
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${sel_kcode32}, $ap_entry32
    .p2align 2
    .globl ap_tramp_data
ap_tramp_data:
ap_tramp_gdtr:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt
    .globl ap_tramp_end
ap_tramp_end:
    .popsection

    /* ---------------- 32-bit entries ------------------------------------ */
    .pushsection .cpl0.text32, "ax"
    .code32
    .globl pvh_entry32
pvh_entry32:                    /* PVH: EBX = hvm_start_info, paging off */
    cli
    cld
    movl %ebx, pvh_start_info_paddr
    xorl %esi, %esi             /* slot 0 = BSP */
    lgdtl pvh_gdtr
    jmp 1f
ap_entry32:
    movw ${sel_kdata}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl pvh_ap_slot, %esi
1:
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT (SSE at CPL 3) */
    movl %eax, %cr4
    movl $pvh_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFF3, %eax      /* clear CD, NW, EM, TS */
    orl $0x80000023, %eax       /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmpl ${sel_kcode64}, $pvh_entry64
    .popsection

    /* ---------------- 64-bit: per-CPU setup, enter CPL 3 ---------------- */
    .pushsection .cpl0.text64, "ax"
    .code64
pvh_entry64:                    /* ESI = slot */
    movw ${sel_kdata}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %edi
    /* kernel stack: KSTACKS + (slot + 1) * KSTACK_SIZE */
    leaq 1(%rdi), %rax
    shlq ${kstack_shift}, %rax
    addq ${kstacks}, %rax
    movq %rax, %rsp
    testl %edi, %edi
    jnz 2f
    /* BSP only: mask the 8259s, fill the IDT gates */
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    SET_GATE {vec_timer}, irq_stub_timer, 0
    SET_GATE {vec_ap_online}, irq_stub_ap_online, 0
    SET_GATE {vec_uart}, irq_stub_uart, 0
    SET_GATE {vec_ged}, irq_stub_ged, 0
    SET_GATE {vec_spurious}, irq_stub_spurious, 0
    SET_GATE {vec_virtio}, irq_stub_virtio, 0
    SET_GATE 6, pvh_call_entry, 0
2:
    lidt pvh_idtr
    /* TSS of this slot: RSP0, I/O bitmap (all allowed, ports < {io_ports}) */
    movq %rdi, %rbx
    shlq ${tss_shift}, %rbx
    addq $pvh_tss, %rbx
    movq %rsp, 4(%rbx)
    movw $104, 102(%rbx)
    movb $0xff, 104 + {io_ports} / 8(%rbx)
    /* its 16-byte GDT descriptor at GDT_TSS0 + 16 * slot, then ltr */
    movq %rbx, %rdx
    shlq $16, %rdx
    movabsq $0x000000FFFFFF0000, %rcx
    andq %rcx, %rdx
    movq %rbx, %rcx
    shrq $24, %rcx
    andq $0xFF, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movabsq $0x0000890000000000 + 104 + {io_ports} / 8, %rcx
    orq %rcx, %rdx
    movq %rdi, %rcx
    shlq $4, %rcx
    movq %rdx, pvh_gdt + {gdt_tss0}(%rcx)
    movq %rbx, %rdx
    shrq $32, %rdx
    movq %rdx, pvh_gdt + {gdt_tss0} + 8(%rcx)
    leaq {gdt_tss0}(%rcx), %rax
    ltr %ax
    /* user stack: USTACKS + (slot + 1) * USTACK_SIZE - 8 (ABI alignment) */
    leaq 1(%rdi), %rax
    shlq ${ustack_shift}, %rax
    addq ${ustacks}, %rax
    subq $8, %rax
    pushq ${sel_udata}
    pushq %rax
    pushq $0x3202               /* IOPL 3, IF (nested KVM here forces IOPL 0, IF 1) */
    pushq ${sel_ucode64}
    pushq $guest_user_entry
    iretq                       /* RDI = slot */

    /* ---------------- CPL 3 -> CPL 0 calls: tagged ud2 -------------------
     * CPL 3 executes `ud2; .byte 'P', 'V'` with RAX = number, RDI = argument;
     * the #UD gate (interrupt gate: IF off, stack = TSS.RSP0) lands here.
     * A #UD without the tag is a real bug: triple fault on purpose.
     * Returns RAX, resuming after the tag.                                */
    .globl pvh_call_entry
pvh_call_entry:
    pushq %rbx
    movq 8(%rsp), %rbx          /* faulting RIP */
    cmpl ${call_tag}, (%rbx)
    jne 30f
    addq $4, 8(%rsp)
    popq %rbx
    cmpq ${sys_wait}, %rax
    je 10f
    cmpq ${sys_triple}, %rax
    je 30f
    movq $-1, %rax
    iretq
10: /* SYS_WAIT(seen): sleep until the interrupt total != seen (under cli) */
    movq {irq_counts}, %rax
    cmpq %rdi, %rax
    jne 11f
    sti
    hlt
    cli
    jmp 10b
11:
    iretq
30: /* SYS_TRIPLE_FAULT: empty IDT, then a #GP raised by the CPU itself */
    lidt pvh_null_idtr
    movabsq $0x8000000000000000, %rax
    movq (%rax), %rax
    jmp 30b

    /* ---------------- interrupt stubs -------------------------------------
     * Count the interrupt (per vector and in total), EOI, return. All the
     * work happens at CPL 3 after SYS_WAIT returns.                        */
    .macro IRQ_STUB name, index, eoi
    .globl \name
\name:
    lock incq {irq_counts} + 8 + 8 * \index
    lock incq {irq_counts}
    .if \eoi
    pushq %rax
    movabsq $0xFEE000B0, %rax
    movl $0, (%rax)
    popq %rax
    .endif
    iretq
    .endm

    IRQ_STUB irq_stub_timer, 0, 1
    IRQ_STUB irq_stub_ap_online, 1, 1
    IRQ_STUB irq_stub_uart, 2, 1
    IRQ_STUB irq_stub_ged, 3, 1
    IRQ_STUB irq_stub_spurious, 4, 0
    IRQ_STUB irq_stub_virtio, 5, 1
    .popsection
    "#,
    max_cpus = const MAX_CPUS,
    tss_shift = const TSS_SHIFT,
    io_ports = const IO_PORTS,
    sel_kcode32 = const SEL_KCODE32,
    sel_kcode64 = const SEL_KCODE64,
    sel_kdata = const SEL_KDATA,
    sel_udata = const SEL_UDATA | 3,
    sel_ucode64 = const SEL_UCODE64 | 3,
    kstack_shift = const KSTACK_SHIFT,
    ustack_shift = const USTACK_SHIFT,
    kstacks = sym KSTACKS,
    ustacks = sym USTACKS,
    irq_counts = sym IRQ_COUNTS,
    gdt_tss0 = const GDT_TSS0,
    sys_wait = const SYS_WAIT,
    sys_triple = const SYS_TRIPLE_FAULT,
    vec_timer = const VEC_TIMER,
    vec_ap_online = const VEC_AP_ONLINE,
    vec_uart = const VEC_UART,
    vec_ged = const VEC_GED,
    vec_spurious = const VEC_SPURIOUS,
    vec_virtio = const VEC_VIRTIO,
    call_tag = const CALL_TAG,
    options(att_syntax)
);
