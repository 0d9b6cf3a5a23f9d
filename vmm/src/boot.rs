//! Direct kernel boot: an ELF with a PVH note (PVH boot protocol) or a
//! bzImage (Linux 64-bit boot protocol), through linux-loader.
//!
//! Both protocols get the same memory map ([`memory_map`]), the command line
//! at `layout::CMDLINE`, the initrd at the top of low RAM, and the RSDP.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_MEMMAP_TYPE_RAM,
    XEN_HVM_MEMMAP_TYPE_RESERVED, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout;

/// E820 / PVH memory types (the PVH and E820 numbering agree).
pub const MEM_TYPE_RAM: u32 = XEN_HVM_MEMMAP_TYPE_RAM;
pub const MEM_TYPE_RESERVED: u32 = XEN_HVM_MEMMAP_TYPE_RESERVED;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped,
    /// `rsi` = boot_params.
    Linux64 { entry: u64, zero_page: u64 },
}

/// What was placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    pub entry: EntryPoint,
    pub kernel_end: u64,
    /// (address, size) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct StartInfo(hvm_start_info);
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ModlistEntry(hvm_modlist_entry);
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct MemmapEntry(hvm_memmap_table_entry);

// SAFETY: these are plain-old-data `repr(C)` structs of integers with no
// padding-sensitive invariants; any byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}

/// The guest's memory map for `ram_size` bytes of RAM laid out by
/// [`crate::memory::ram_ranges`]: (start, size, type).
pub fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::LOW_RAM_END, MEM_TYPE_RAM),
        (
            layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START,
            MEM_TYPE_RESERVED,
        ),
    ];
    for (gpa, len, _) in crate::memory::ram_ranges(ram_size) {
        let start = gpa.max(layout::HIMEM_START);
        let end = gpa + len;
        if end > start {
            map.push((start, end - start, MEM_TYPE_RAM));
        }
    }
    map
}

/// Kernel image formats part-vmm can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Identifies a kernel image from its magic numbers.
pub fn detect_format(path: &Path) -> Result<KernelFormat> {
    let unreadable = |source| Error::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let f = partvisor_runtime::inherited::open(path, false).map_err(unreadable)?;
    if f.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    let mut head = Vec::with_capacity(0x206);
    f.take(0x206).read_to_end(&mut head).map_err(unreadable)?;
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::KernelFormat(path.to_path_buf()))
}

/// Highest address (exclusive) an initrd may end at: the top of RAM below
/// the MMIO hole.
fn low_ram_top(mem: &GuestMemoryMmap) -> u64 {
    let end = mem.last_addr().raw_value() + 1;
    end.min(layout::MMIO_HOLE_START)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_end: u64,
) -> Result<(u64, u64)> {
    let unreadable = |source| Error::InitrdUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut f = partvisor_runtime::inherited::open(path, false).map_err(unreadable)?;
    let size = f.seek(SeekFrom::End(0)).map_err(unreadable)?;
    f.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let too_large = || Error::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let top = low_ram_top(mem).min(max_end);
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(layout::HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| Error::InitrdUnreadable {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(crate::config::ConfigError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        }
        .into());
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE))
        .map_err(Error::write("the command line"))
}

/// Loads the kernel (and initrd) and writes the boot protocol's structures.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootLayout> {
    let format = detect_format(kernel)?;
    let mut f = partvisor_runtime::inherited::open(kernel, false).map_err(|source| {
        Error::KernelUnreadable {
            path: kernel.to_path_buf(),
            source,
        }
    })?;
    let load_err = |source: linux_loader::loader::Error| Error::KernelLoad {
        path: kernel.to_path_buf(),
        source,
    };
    write_cmdline(mem, cmdline)?;
    match format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
                .map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
                return Err(Error::KernelNoPvh(kernel.to_path_buf()));
            };
            let initrd = match initrd {
                Some(p) => Some(load_initrd(mem, p, res.kernel_end, u64::MAX)?),
                None => None,
            };
            write_pvh(mem, ram_size, initrd, rsdp)?;
            Ok(BootLayout {
                entry: EntryPoint::Pvh {
                    entry: entry.raw_value(),
                    start_info: layout::PVH_START_INFO,
                },
                kernel_end: res.kernel_end,
                initrd,
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
                .map_err(load_err)?;
            let hdr = res.setup_header.ok_or_else(|| {
                load_err(linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                ))
            })?;
            if hdr.xloadflags & 1 == 0 {
                return Err(Error::KernelNot64Bit(kernel.to_path_buf()));
            }
            let initrd = match initrd {
                Some(p) => Some(load_initrd(
                    mem,
                    p,
                    res.kernel_end,
                    u64::from(hdr.initrd_addr_max) + 1,
                )?),
                None => None,
            };
            write_zero_page(mem, ram_size, &res, cmdline, initrd, rsdp)?;
            write_identity_page_tables(mem)?;
            Ok(BootLayout {
                entry: EntryPoint::Linux64 {
                    entry: res.kernel_load.raw_value() + 0x200,
                    zero_page: layout::ZERO_PAGE,
                },
                kernel_end: res.kernel_end,
                initrd,
            })
        }
    }
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let memmap: Vec<MemmapEntry> = memory_map(ram_size)
        .into_iter()
        .map(|(addr, size, type_)| {
            MemmapEntry(hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params;
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST;
        params = BootParams::new(&StartInfo(info), GuestAddress(layout::PVH_START_INFO));
        params.set_modules(
            &[ModlistEntry(hvm_modlist_entry {
                paddr,
                size,
                cmdline_paddr: 0,
                reserved: 0,
            })],
            GuestAddress(layout::PVH_MODLIST),
        );
    } else {
        params = BootParams::new(&StartInfo(info), GuestAddress(layout::PVH_START_INFO));
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::configure("PVH start_info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    res: &KernelLoaderResult,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let mut bp = boot_params::default();
    if let Some(hdr) = res.setup_header {
        bp.hdr = hdr;
    }
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = 0x5372_6448;
    bp.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    bp.hdr.cmdline_size = cmdline.len() as u32 + 1;
    bp.hdr.loadflags |= 0x80; // CAN_USE_HEAP
    bp.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = rsdp;
    let map = memory_map(ram_size);
    if map.len() > bp.e820_table.len() {
        return Err(Error::MemoryMapTooLong {
            entries: map.len(),
            max: bp.e820_table.len(),
        });
    }
    for (slot, (addr, size, kind)) in bp.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *kind;
    }
    bp.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&bp, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(Error::configure("boot_params"))
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the 64-bit entry.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(Error::write("boot page tables"))
    };
    w(layout::BOOT_PDPT | 0x3, layout::BOOT_PML4)?;
    w(layout::BOOT_PD | 0x3, layout::BOOT_PDPT)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, layout::BOOT_PD + i * 8)?;
    }
    Ok(())
}

/// Reads back the boot_params a bzImage boot wrote (for tests and logs).
pub fn read_zero_page(mem: &GuestMemoryMmap) -> Result<boot_params> {
    mem.read_obj(GuestAddress(layout::ZERO_PAGE))
        .map_err(|source| Error::GuestRead {
            what: "boot_params",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_has_low_ram_acpi_hole_and_high_ram() {
        assert_eq!(
            memory_map(24 << 20),
            vec![
                (0, 0xa_0000, 1),
                (0xe_0000, 0x2_0000, 2),
                (0x10_0000, (24 << 20) - 0x10_0000, 1)
            ]
        );
        let big = memory_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[3], (4 << 30, 2 << 30, 1));
    }

    #[test]
    fn detect_format_rejects_text_and_names_the_file() {
        let p = std::env::temp_dir().join(format!("pv-notkernel-{}", std::process::id()));
        std::fs::write(&p, b"hello, this is not a kernel").unwrap();
        let e = detect_format(&p).unwrap_err();
        assert!(matches!(e, Error::KernelFormat(_)));
        assert!(e.to_string().contains("neither an ELF"));
        std::fs::remove_file(&p).unwrap();
    }
}
