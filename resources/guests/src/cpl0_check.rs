//! The build-time check of the guest's CPL 0 code.
//!
//! On the project's machines CPL 0 guest code is run by KVM's instruction
//! emulator, which cannot execute x87/SSE/AVX instructions or `int n`/`int3`
//! (the VM dies with an emulation failure). The guest keeps all CPL 0 code in
//! the `.cpl0` linker section; `build.rs` disassembles that section with
//! `objdump -d` and passes the listing here. This module is also compiled into
//! the library so that its rules are unit-tested.

use std::ops::Range;

/// One reason the CPL 0 code is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cpl0Violation {
    /// An instruction KVM's emulator cannot run.
    #[error("{addr:#x}: `{text}`: {what} at CPL 0 (KVM's instruction emulator cannot run it); move this code to CPL 3")]
    Forbidden {
        /// Instruction address.
        addr: u64,
        /// Disassembly text.
        text: String,
        /// What class of instruction it is.
        what: &'static str,
    },
    /// A direct call/jump to code outside `.cpl0` (i.e. to CPL 3 code).
    #[error("{addr:#x}: `{text}` branches to {target:#x}, outside .cpl0 [{start:#x}, {end:#x}); put the callee in .cpl0 (#[link_section]) or do the work at CPL 3")]
    OutOfSection {
        /// Instruction address.
        addr: u64,
        /// Disassembly text.
        text: String,
        /// Branch target.
        target: u64,
        /// Section start.
        start: u64,
        /// Section end (exclusive).
        end: u64,
    },
    /// An indirect call/jump, whose target cannot be checked.
    #[error("{addr:#x}: `{text}`: indirect branch at CPL 0, its target cannot be checked; use a direct branch")]
    Indirect {
        /// Instruction address.
        addr: u64,
        /// Disassembly text.
        text: String,
    },
    /// Bytes objdump could not decode.
    #[error("{addr:#x}: objdump could not decode the bytes here (`{text}`); keep data out of the checked code ranges")]
    Undecodable {
        /// Address.
        addr: u64,
        /// Disassembly text.
        text: String,
    },
}

/// Prefix tokens objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "fs", "gs", "ss", "notrack", "bnd", "xacquire", "xrelease",
];

/// x87 mnemonics start with `f`; these `f*` ones are allowed (they work).
const X87_ALLOWED: &[&str] = &["fxsave", "fxsave64", "fxrstor", "fxrstor64"];

/// Software interrupts.
const SOFT_INT: &[&str] = &["int", "int1", "int3", "icebp", "into"];

/// SSE/AVX/extended-state instructions that need not name a vector register.
const SSE_MNEMONIC_PREFIXES: &[&str] = &[
    "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr", "xsave", "xrstor", "emms", "femms", "vzero",
    "movaps", "movups", "movapd", "movupd", "movdq", "movnt", "pxor", "xorp", "andp", "andnp",
    "orp", "cvt", "wait", "fwait",
];

/// Register names of the x87, MMX, SSE, AVX and AVX-512 units.
const VECTOR_REGS: &[&str] = &["%xmm", "%ymm", "%zmm", "%mm", "%st", "%k"];

fn parse_hex(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(s, 16).ok()
}

/// Split an instruction text into (mnemonic, operands) without prefixes.
fn mnemonic(text: &str) -> (&str, &str) {
    let mut rest = text.trim();
    loop {
        let (word, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if PREFIXES.contains(&word) || word.starts_with("rex") {
            rest = tail.trim_start();
            if rest.is_empty() {
                return (word, "");
            }
        } else {
            return (word, tail.trim());
        }
    }
}

fn is_branch(m: &str) -> bool {
    m.starts_with('j')
        || m.starts_with("call")
        || m.starts_with("loop")
        || m.starts_with("ljmp")
        || m.starts_with("lcall")
}

/// Check one instruction; `section` is the whole `.cpl0` range.
pub fn check_instruction(addr: u64, text: &str, section: &Range<u64>) -> Option<Cpl0Violation> {
    let (m, ops) = mnemonic(text);
    let forbidden = |what| {
        Some(Cpl0Violation::Forbidden {
            addr,
            text: text.trim().to_string(),
            what,
        })
    };
    if m == "(bad)" || text.contains("(bad)") {
        return Some(Cpl0Violation::Undecodable {
            addr,
            text: text.trim().to_string(),
        });
    }
    if SOFT_INT.contains(&m) {
        return forbidden("software interrupt");
    }
    if m.starts_with('f') && !X87_ALLOWED.contains(&m) {
        return forbidden("x87 instruction");
    }
    if SSE_MNEMONIC_PREFIXES.iter().any(|p| m.starts_with(p)) {
        return forbidden("SSE/AVX/x87 state instruction");
    }
    if VECTOR_REGS.iter().any(|r| ops.contains(r)) {
        return forbidden("x87/MMX/SSE/AVX register");
    }
    if is_branch(m) {
        if ops.starts_with('*') {
            return Some(Cpl0Violation::Indirect {
                addr,
                text: text.trim().to_string(),
            });
        }
        let target = if m.starts_with("ljmp") || m.starts_with("lcall") {
            // `ljmp $0x8,$0x10007f`
            ops.split(',').nth(1).map(|t| t.trim_start_matches('$'))
        } else {
            // `jmp 100049 <sym+0x10>`
            ops.split_whitespace().next()
        };
        return match target.and_then(parse_hex) {
            Some(t) if section.contains(&t) => None,
            Some(t) => Some(Cpl0Violation::OutOfSection {
                addr,
                text: text.trim().to_string(),
                target: t,
                start: section.start,
                end: section.end,
            }),
            None => Some(Cpl0Violation::Indirect {
                addr,
                text: text.trim().to_string(),
            }),
        };
    }
    None
}

/// Check an `objdump -d` listing of (part of) `.cpl0`. Returns every
/// violation; an empty result means the code is acceptable.
pub fn check_listing(listing: &str, section: &Range<u64>) -> Vec<Cpl0Violation> {
    listing
        .lines()
        .filter_map(|line| {
            // "  100026:\tfa                   \tcli"
            let mut fields = line.split('\t');
            let addr = fields.next()?.trim().strip_suffix(':')?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            let _bytes = fields.next()?;
            let text = fields.next()?;
            check_instruction(addr, text, section)
        })
        .collect()
}

/// How many instructions a listing holds (to prove the check saw code).
pub fn instruction_count(listing: &str) -> usize {
    listing
        .lines()
        .filter(|l| {
            l.split('\t').count() >= 3
                && l.trim_start()
                    .split(':')
                    .next()
                    .is_some_and(|a| u64::from_str_radix(a, 16).is_ok())
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTION: Range<u64> = 0x100000..0x100400;

    /// Real objdump output of the guest's .cpl0 (abridged), all allowed.
    const CLEAN: &str = "\
/x/partvisor-testguest:     file format elf64-x86-64


Disassembly of section .cpl0:

0000000000100026 <pvh_entry32>:
  100026:\tfa                   \tcli
  100028:\t89 1d 64 a1 10 00    \tmov    %ebx,0x10a164
  100037:\teb 10                \tjmp    100049 <ap_entry32+0x10>
  100061:\t0f 32                \trdmsr
  100075:\t0f 22 c0             \tmov    %eax,%cr0
  100078:\tea 7f 00 10 00 08 00 \tljmp   $0x8,$0x10007f
  10020a:\tf0 48 ff 04 25 18 c4 \tlock incq 0x10c418
  100211:\t10 00 
  100220:\t0f ae 00             \tfxsave (%rax)
  100223:\tfb                   \tsti
  100224:\tf4                   \thlt
  100225:\t75 f0                \tjne    100217 <pvh_call_entry+0x16>
  100227:\t48 cf                \tiretq
";

    fn only_violation(listing_line: &str) -> Cpl0Violation {
        let listing = format!("{CLEAN}{listing_line}\n");
        let v = check_listing(&listing, &SECTION);
        assert_eq!(v.len(), 1, "{v:?}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn clean_listing_is_accepted() {
        assert_eq!(check_listing(CLEAN, &SECTION), vec![]);
        assert_eq!(instruction_count(CLEAN), 12);
    }

    #[test]
    fn sse_register_use_is_rejected() {
        let v = only_violation("  100300:\t0f 57 c0             \txorps  %xmm0,%xmm0");
        assert!(
            matches!(v, Cpl0Violation::Forbidden { addr: 0x100300, .. }),
            "{v}"
        );
        let v = only_violation("  100300:\t66 0f ef c0          \tpxor   %xmm0,%xmm0");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        let v = only_violation("  100300:\t0f 29 04 24          \tmovaps %xmm0,(%rsp)");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        let v = only_violation("  100300:\t66 48 0f 6e c0       \tmovq   %rax,%xmm0");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
    }

    #[test]
    fn sse_state_instructions_without_registers_are_rejected() {
        let v = only_violation("  100300:\t0f ae 10             \tldmxcsr (%rax)");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        let v = only_violation("  100300:\t0f ae 28             \txrstor (%rax)");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
    }

    #[test]
    fn x87_instructions_are_rejected_but_fxsave_is_not() {
        let v = only_violation("  100300:\td9 e8                \tfld1");
        assert!(
            matches!(
                v,
                Cpl0Violation::Forbidden {
                    what: "x87 instruction",
                    ..
                }
            ),
            "{v}"
        );
        let v = only_violation("  100300:\tdb e3                \tfninit");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        let v = only_violation("  100300:\t9b                   \tfwait");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        assert_eq!(
            check_instruction(0x100300, "fxrstor (%rax)", &SECTION),
            None
        );
    }

    #[test]
    fn software_interrupts_are_rejected() {
        for text in ["int3", "int    $0x80", "int1", "icebp", "into"] {
            let v = only_violation(&format!("  100300:\tcc                   \t{text}"));
            assert!(
                matches!(
                    v,
                    Cpl0Violation::Forbidden {
                        what: "software interrupt",
                        ..
                    }
                ),
                "{v}"
            );
        }
    }

    #[test]
    fn branch_out_of_the_section_is_rejected() {
        let v = only_violation(
            "  100300:\te8 00 10 00 00       \tcall   101305 <_ZN4core3fmt5write17h>",
        );
        assert_eq!(
            v,
            Cpl0Violation::OutOfSection {
                addr: 0x100300,
                text: "call   101305 <_ZN4core3fmt5write17h>".into(),
                target: 0x101305,
                start: 0x100000,
                end: 0x100400
            }
        );
        let v =
            only_violation("  100300:\te9 00 10 00 00       \tjmp    101305 <guest_user_entry>");
        assert!(matches!(v, Cpl0Violation::OutOfSection { .. }), "{v}");
        let v = only_violation("  100300:\t0f 84 00 10 00 00    \tje     101305 <x>");
        assert!(matches!(v, Cpl0Violation::OutOfSection { .. }), "{v}");
        let v = only_violation("  100300:\tea 00 00 20 00 08 00 \tljmp   $0x8,$0x200000");
        assert!(
            matches!(
                v,
                Cpl0Violation::OutOfSection {
                    target: 0x200000,
                    ..
                }
            ),
            "{v}"
        );
    }

    #[test]
    fn indirect_branches_are_rejected() {
        let v = only_violation("  100300:\tff d0                \tcall   *%rax");
        assert!(matches!(v, Cpl0Violation::Indirect { .. }), "{v}");
        let v = only_violation("  100300:\tff 25 00 00 00 00    \tjmp    *0x0(%rip)");
        assert!(matches!(v, Cpl0Violation::Indirect { .. }), "{v}");
    }

    #[test]
    fn undecodable_bytes_are_rejected() {
        let v = only_violation("  100300:\tff ff                \t(bad)");
        assert!(matches!(v, Cpl0Violation::Undecodable { .. }), "{v}");
    }

    #[test]
    fn prefixes_do_not_hide_the_mnemonic() {
        let v = only_violation("  100300:\tf3 0f 6f 00          \trep movdqu (%rax),%xmm0");
        assert!(matches!(v, Cpl0Violation::Forbidden { .. }), "{v}");
        assert_eq!(
            check_instruction(0x100300, "rep stos %al,%es:(%rdi)", &SECTION),
            None
        );
    }

    #[test]
    fn sample_listing_with_mixed_violations_reports_each() {
        let listing = format!(
            "{CLEAN}  100300:\t0f 57 c0             \txorps  %xmm0,%xmm0\n\
             100303:\tcc                   \tint3\n\
             100304:\td9 e8                \tfld1\n\
             100306:\te8 00 10 00 00       \tcall   200000 <core::fmt::write>\n"
        );
        let v = check_listing(&listing, &SECTION);
        let addrs: Vec<u64> = v
            .iter()
            .map(|v| match v {
                Cpl0Violation::Forbidden { addr, .. }
                | Cpl0Violation::OutOfSection { addr, .. }
                | Cpl0Violation::Indirect { addr, .. }
                | Cpl0Violation::Undecodable { addr, .. } => *addr,
            })
            .collect();
        assert_eq!(addrs, vec![0x100300, 0x100303, 0x100304, 0x100306]);
        // Messages name the address and say what to do.
        assert!(v[3].to_string().contains("outside .cpl0"), "{}", v[3]);
    }
}
