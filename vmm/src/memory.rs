//! Guest memory: one memfd, size-sealed, mapped shared through vm-memory and
//! registered with KVM, so I/O-partition backends can map the same pages.

use std::fs::File;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::error::{Error, Result};
use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Name of the guest-memory memfd as it appears in `/proc/PID/fd` links
/// (`/memfd:partvisor-guest-mem (deleted)`).
pub const MEMFD_NAME: &str = "partvisor-guest-mem";

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub size: u64,
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO hole, then
/// from 4 GiB up. Each entry is (guest address, length, memfd offset).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, MMIO_HOLE_START, 0),
            (MMIO_HOLE_END, size - MMIO_HOLE_START, MMIO_HOLE_START),
        ]
    }
}

/// Creates a memfd of `size` bytes sealed against growing, shrinking and
/// further seals (through `channels`, the one home of sealed memfds).
pub fn create_memfd(size: u64) -> Result<File> {
    let fail = |source| Error::GuestMemfd { size, source };
    let m = channels::SealedMemfd::create(MEMFD_NAME, size).map_err(fail)?;
    m.seal_seals().map_err(fail)?;
    Ok(File::from(m.into_fd()))
}

/// Returns the seals of a file (F_GET_SEALS).
pub fn seals(file: &File) -> std::result::Result<i32, channels::ChannelError> {
    channels::memfd::seals_of(std::os::fd::AsFd::as_fd(file))
}

impl GuestRam {
    /// Creates `mib` MiB of guest RAM backed by a sealed memfd.
    pub fn new(mib: u64) -> Result<GuestRam> {
        let size = mib
            .checked_mul(1 << 20)
            .ok_or(Error::MemoryTooLarge { mib })?;
        let memfd = create_memfd(size)?;
        let mut ranges = Vec::new();
        for (gpa, len, off) in ram_ranges(size) {
            let f = memfd.try_clone().map_err(Error::io("dup guest memfd"))?;
            let len = usize::try_from(len).map_err(|_| Error::MemoryTooLarge { mib })?;
            ranges.push((GuestAddress(gpa), len, Some(FileOffset::new(f, off))));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(Error::MemoryMap)?;
        Ok(GuestRam {
            memory,
            memfd,
            size,
        })
    }

    /// Registers every region with KVM as a memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(Error::RegionUnmapped)?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which
            // outlives the VM (both are dropped only when part-vmm exits), and
            // the slots do not overlap (ram_ranges yields disjoint ranges).
            unsafe { vm.set_user_memory_region(mem_region) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// True when `gpa` is backed by RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.memory.address_in_range(GuestAddress(gpa))
    }

    /// End of the highest RAM range (exclusive).
    pub fn end(&self) -> u64 {
        self.memory.last_addr().raw_value() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_hole_only_when_it_must() {
        assert_eq!(ram_ranges(24 << 20), vec![(0, 24 << 20, 0)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, 3 << 30, 0), (4 << 30, 1 << 30, 3 << 30)]
        );
    }

    #[test]
    fn memfd_carries_grow_and_shrink_seals() {
        let f = create_memfd(1 << 20).unwrap();
        let s = seals(&f).unwrap();
        assert_eq!(s & libc::F_SEAL_GROW, libc::F_SEAL_GROW);
        assert_eq!(s & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
        assert!(f.set_len(2 << 20).is_err(), "a sealed memfd must not grow");
    }

    #[test]
    fn guest_ram_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let ram = GuestRam::new(2).unwrap();
        ram.memory
            .write_obj(0xabcd_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
        assert_eq!(ram.end(), 2 << 20);
        assert!(ram.is_ram(0x1000) && !ram.is_ram(2 << 20));
    }
}
