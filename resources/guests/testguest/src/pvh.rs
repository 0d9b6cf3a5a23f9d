//! The PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).

use crate::arch::read_bytes;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;

fn u32_at(addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes::<4>(addr))
}

fn u64_at(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(addr))
}

/// What the guest uses of the start info.
pub struct StartInfo {
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

/// One `hvm_memmap_table_entry`.
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// One `hvm_modlist_entry`.
pub struct Module {
    pub paddr: u64,
    pub size: u64,
}

impl StartInfo {
    /// Read the start info at `paddr`; `None` if the magic is wrong.
    pub fn read(paddr: u64) -> Option<StartInfo> {
        if paddr == 0 || u32_at(paddr) != MAGIC {
            return None;
        }
        let version = u32_at(paddr + 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (u64_at(paddr + 0x28), u32_at(paddr + 0x30))
        } else {
            (0, 0)
        };
        Some(StartInfo {
            nr_modules: u32_at(paddr + 0x0c),
            modlist_paddr: u64_at(paddr + 0x10),
            cmdline_paddr: u64_at(paddr + 0x18),
            rsdp_paddr: u64_at(paddr + 0x20),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// The memory map, in start-info order.
    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        (0..u64::from(self.memmap_entries)).map(move |i| {
            let e = self.memmap_paddr + 24 * i;
            MemmapEntry {
                addr: u64_at(e),
                size: u64_at(e + 8),
                kind: u32_at(e + 16),
            }
        })
    }

    /// The first module (the initrd), if any.
    pub fn first_module(&self) -> Option<Module> {
        if self.nr_modules == 0 || self.modlist_paddr == 0 {
            return None;
        }
        Some(Module {
            paddr: u64_at(self.modlist_paddr),
            size: u64_at(self.modlist_paddr + 8),
        })
    }

    /// The command line (NUL-terminated, at most 4 KiB), as bytes.
    pub fn cmdline(&self) -> &'static [u8] {
        if self.cmdline_paddr == 0 {
            return &[];
        }
        let mut len = 0usize;
        while len < 4096 && read_bytes::<1>(self.cmdline_paddr + len as u64)[0] != 0 {
            len += 1;
        }
        // SAFETY: the VMM placed `len` bytes of cmdline in RAM; nobody writes it.
        unsafe { crate::arch::phys_slice(self.cmdline_paddr, len) }
    }
}
