//! The memory-table check: every region a frontend sends (`SET_MEM_TABLE`,
//! `ADD_MEM_REG`) must be a memfd sealed against shrinking and growing
//! (`channels::memfd::REQUIRED_SEALS`) and lie inside its file; dirty-page
//! logging requests are refused.

use std::fs::File;
use std::mem::size_of;
use std::os::fd::{AsFd, OwnedFd};

use channels::memfd;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
};
use vm_memory::ByteValued;

use super::message::Message;
use super::GuardError;

/// Checks one region/fd pair: sealed against shrink and grow, and inside the file.
pub fn check_region(
    index: usize,
    region: &VhostUserMemoryRegion,
    fd: &OwnedFd,
) -> Result<(), GuardError> {
    let (gpa, size) = (region.guest_phys_addr, region.memory_size);
    let seals = memfd::seals_of(fd.as_fd()).map_err(|source| GuardError::Seals {
        index,
        gpa,
        size,
        source,
    })?;
    let missing = match memfd::REQUIRED_SEALS & !seals {
        0 => None,
        libc::F_SEAL_SHRINK => Some("shrinking (F_SEAL_SHRINK)"),
        libc::F_SEAL_GROW => Some("growing (F_SEAL_GROW)"),
        _ => Some("shrinking or growing (F_SEAL_SHRINK|F_SEAL_GROW)"),
    };
    if let Some(missing) = missing {
        return Err(GuardError::Unsealed {
            index,
            gpa,
            size,
            seals,
            missing,
        });
    }
    // SAFETY: fstatfs writes into the zeroed struct it is given; the fd is
    // open (owned by the message).
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(fd), &mut fs) } != 0 {
        return Err(GuardError::Io(std::io::Error::last_os_error()));
    }
    if fs.f_type == libc::HUGETLBFS_MAGIC {
        return Err(GuardError::Hugetlb { index, gpa, size });
    }
    let file = File::from(fd.try_clone()?);
    let file_size = file.metadata()?.len();
    let offset = region.mmap_offset;
    if size == 0 || offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(GuardError::OutsideFile {
            index,
            gpa,
            offset,
            size,
            file_size,
        });
    }
    Ok(())
}

/// Copies a plain-data message struct out of `bytes` (exactly its size; the
/// body buffer need not be aligned for it).
fn read_pod<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(bytes);
    v
}

/// What a frontend's memory table maps, held to the partition's grant:
/// `SET_MEM_TABLE` replaces the table, `ADD_MEM_REG` adds a region,
/// `REM_MEM_REG` takes one out (by guest address); a table larger in total
/// than `limit` bytes is refused before it is forwarded.
#[derive(Debug, Default)]
pub(super) struct MemoryBudget {
    limit: Option<u64>,
    /// (guest address, size) of every region in the table.
    regions: Vec<(u64, u64)>,
}

impl MemoryBudget {
    pub(super) fn new(limit: Option<u64>) -> MemoryBudget {
        MemoryBudget {
            limit,
            regions: Vec::new(),
        }
    }

    fn allow(&self, regions: &[(u64, u64)]) -> Result<(), GuardError> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let total = regions
            .iter()
            .try_fold(0u64, |t, &(_, size)| t.checked_add(size));
        match total {
            Some(t) if t <= limit => Ok(()),
            _ => Err(GuardError::TooMuchMemory {
                total: total.unwrap_or(u64::MAX),
                limit,
            }),
        }
    }

    /// Accounts `msg` (already checked by [`check`]).
    pub(super) fn apply(&mut self, msg: &Message) -> Result<(), GuardError> {
        let req = msg.request();
        let hdr_len = size_of::<VhostUserMemory>();
        let reg_len = size_of::<VhostUserMemoryRegion>();
        if req == FrontendReq::SET_MEM_TABLE as u32 {
            let table: Vec<(u64, u64)> = msg.body[hdr_len.min(msg.body.len())..]
                .chunks_exact(reg_len)
                .map(|b| {
                    let r: VhostUserMemoryRegion = read_pod(b);
                    (r.guest_phys_addr, r.memory_size)
                })
                .collect();
            self.allow(&table)?;
            self.regions = table;
        } else if req == FrontendReq::ADD_MEM_REG as u32
            && msg.body.len() == size_of::<VhostUserSingleMemoryRegion>()
        {
            let r: VhostUserSingleMemoryRegion = read_pod(&msg.body);
            let mut table = self.regions.clone();
            table.push((r.guest_phys_addr, r.memory_size));
            self.allow(&table)?;
            self.regions = table;
        } else if req == FrontendReq::REM_MEM_REG as u32
            && msg.body.len() == size_of::<VhostUserSingleMemoryRegion>()
        {
            let r: VhostUserSingleMemoryRegion = read_pod(&msg.body);
            // As the backend removes it: address and size both match.
            let key = (r.guest_phys_addr, r.memory_size);
            if let Some(i) = self.regions.iter().position(|&reg| reg == key) {
                self.regions.swap_remove(i);
            }
        }
        Ok(())
    }
}

/// Checks a frontend-to-backend message; `Ok` means it may be forwarded.
pub(super) fn check(msg: &Message) -> Result<(), GuardError> {
    let req = msg.request();
    if req == FrontendReq::SET_MEM_TABLE as u32 {
        let hdr_len = size_of::<VhostUserMemory>();
        let reg_len = size_of::<VhostUserMemoryRegion>();
        let bad = || GuardError::BadBody("SET_MEM_TABLE", msg.body.len());
        let hdr: VhostUserMemory = read_pod(msg.body.get(..hdr_len).ok_or_else(bad)?);
        let n = hdr.num_regions as usize;
        if msg.body.len() != hdr_len + n * reg_len {
            return Err(bad());
        }
        if n != msg.fds.len() {
            return Err(GuardError::FdCount(n, msg.fds.len(), "SET_MEM_TABLE"));
        }
        for (i, fd) in msg.fds.iter().enumerate() {
            let start = hdr_len + i * reg_len;
            let region: VhostUserMemoryRegion = read_pod(&msg.body[start..start + reg_len]);
            check_region(i, &region, fd)?;
        }
    } else if req == FrontendReq::ADD_MEM_REG as u32 {
        let bad = || GuardError::BadBody("ADD_MEM_REG", msg.body.len());
        if msg.body.len() != size_of::<VhostUserSingleMemoryRegion>() {
            return Err(bad());
        }
        let single: VhostUserSingleMemoryRegion = read_pod(&msg.body);
        if msg.fds.len() != 1 {
            return Err(GuardError::FdCount(1, msg.fds.len(), "ADD_MEM_REG"));
        }
        check_region(0, &single, &msg.fds[0])?;
    } else if req == FrontendReq::SET_LOG_BASE as u32 {
        return Err(GuardError::Refused("SET_LOG_BASE"));
    } else if req == FrontendReq::SET_LOG_FD as u32 {
        return Err(GuardError::Refused("SET_LOG_FD"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use channels::SealedMemfd;
    use std::os::fd::AsFd;

    /// A memfd of `size` bytes sealed against shrinking and growing.
    fn sealed(size: u64) -> OwnedFd {
        SealedMemfd::create("guard-test", size).unwrap().into_fd()
    }

    /// A memfd of `size` bytes with exactly `seals` (fewer than required).
    fn memfd(size: u64, seals: i32) -> OwnedFd {
        let fd = channels::memfd::unsealed("guard-test", size).unwrap();
        channels::memfd::add_seals(fd.as_fd(), seals).unwrap();
        fd
    }

    fn region(size: u64, offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(0x10_0000, size, 0x7f00_0000_0000, offset)
    }

    #[test]
    fn a_hugetlb_memfd_is_refused_even_when_sealed() {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; a new fd or -1.
        let raw = unsafe {
            libc::memfd_create(
                c"guard-test-huge".as_ptr(),
                libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
            )
        };
        assert!(
            raw >= 0,
            "memfd_create(MFD_HUGETLB): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor (no pages are allocated).
        assert_eq!(unsafe { libc::ftruncate(raw, 0x20_0000) }, 0);
        channels::memfd::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW).unwrap();
        let e = check_region(0, &region(0x20_0000, 0), &fd).unwrap_err();
        assert!(matches!(e, GuardError::Hugetlb { .. }), "{e}");
        assert!(e.is_region_refusal());
    }

    #[test]
    fn sealed_region_inside_the_file_passes() {
        let fd = sealed(0x20_0000);
        check_region(0, &region(0x10_0000, 0x10_0000), &fd).unwrap();
        check_region(0, &region(0x20_0000, 0), &fd).unwrap();
    }

    #[test]
    fn missing_seals_are_refused_by_name() {
        for (seals, missing) in [
            (0, "shrinking or growing"),
            (libc::F_SEAL_GROW, "shrinking (F_SEAL_SHRINK)"),
            (libc::F_SEAL_SHRINK, "growing (F_SEAL_GROW)"),
        ] {
            let fd = memfd(0x1000, seals);
            let e = check_region(3, &region(0x1000, 0), &fd).unwrap_err();
            assert!(e.is_region_refusal());
            let msg = e.to_string();
            assert!(msg.contains("region 3") && msg.contains(missing), "{msg}");
        }
    }

    #[test]
    fn region_reaching_past_the_end_of_the_file_is_refused() {
        let fd = sealed(0x2000);
        for (size, offset) in [(0x3000, 0), (0x1000, 0x1001), (0x1000, u64::MAX), (0, 0)] {
            let e = check_region(0, &region(size, offset), &fd).unwrap_err();
            assert!(matches!(e, GuardError::OutsideFile { .. }), "{e}");
        }
    }

    fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
        let mut body = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for r in regions {
            body.extend_from_slice(r.as_slice());
        }
        body
    }

    #[test]
    fn a_memory_table_larger_than_the_grant_is_refused_and_added_regions_count() {
        const MIB: u64 = 1 << 20;
        let table = |sizes: &[u64]| {
            let regions: Vec<VhostUserMemoryRegion> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| VhostUserMemoryRegion::new((i as u64) << 32, *s, 0, 0))
                .collect();
            Message::test(FrontendReq::SET_MEM_TABLE, mem_table(&regions), vec![])
        };
        let single = |req, gpa, size| {
            let r = VhostUserSingleMemoryRegion::new(gpa, size, 0, 0);
            Message::test(req, r.as_slice().to_vec(), vec![])
        };
        let mut b = MemoryBudget::new(Some(64 * MIB));
        b.apply(&table(&[32 * MIB, 32 * MIB])).unwrap();
        let e = b.apply(&table(&[32 * MIB, 33 * MIB])).unwrap_err();
        assert!(matches!(e, GuardError::TooMuchMemory { .. }), "{e}");
        assert!(e.is_region_refusal());
        // The table is full: one more region is refused; removing one
        // makes room for it.
        assert!(b
            .apply(&single(FrontendReq::ADD_MEM_REG, 1 << 40, MIB))
            .is_err());
        b.apply(&single(FrontendReq::REM_MEM_REG, 0, 32 * MIB))
            .unwrap();
        b.apply(&single(FrontendReq::ADD_MEM_REG, 1 << 40, 32 * MIB))
            .unwrap();
        // Sizes that overflow when added are refused too.
        let e = MemoryBudget::new(Some(64 * MIB))
            .apply(&table(&[u64::MAX, 2]))
            .unwrap_err();
        assert!(matches!(e, GuardError::TooMuchMemory { .. }), "{e}");
        // Without a grant given, nothing is held back.
        MemoryBudget::new(None)
            .apply(&table(&[u64::MAX / 2, u64::MAX / 2]))
            .unwrap();
    }

    #[test]
    fn mem_table_messages_are_checked_region_by_region() {
        let good = sealed(0x2000);
        let bad = memfd(0x2000, 0);
        let r = region(0x2000, 0);
        let dup = |f: &OwnedFd| f.try_clone().unwrap();
        let ok = Message::test(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good), dup(&good)],
        );
        check(&ok).unwrap();
        // The second region's fd is unsealed.
        let m = Message::test(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good), dup(&bad)],
        );
        assert!(matches!(
            check(&m),
            Err(GuardError::Unsealed { index: 1, .. })
        ));
        // Fewer fds than regions.
        let m = Message::test(
            FrontendReq::SET_MEM_TABLE,
            mem_table(&[r, r]),
            vec![dup(&good)],
        );
        assert!(matches!(check(&m), Err(GuardError::FdCount(2, 1, _))));
        // Body length disagreeing with num_regions.
        let mut body = mem_table(&[r]);
        body.truncate(20);
        let m = Message::test(FrontendReq::SET_MEM_TABLE, body, vec![dup(&good)]);
        assert!(matches!(check(&m), Err(GuardError::BadBody(..))));
        // ADD_MEM_REG goes through the same check.
        let single = VhostUserSingleMemoryRegion::new(0x10_0000, 0x2000, 0x7f00_0000_0000, 0);
        let m = Message::test(
            FrontendReq::ADD_MEM_REG,
            single.as_slice().to_vec(),
            vec![dup(&bad)],
        );
        assert!(matches!(
            check(&m),
            Err(GuardError::Unsealed { index: 0, .. })
        ));
        let m = Message::test(
            FrontendReq::ADD_MEM_REG,
            single.as_slice().to_vec(),
            vec![dup(&good)],
        );
        check(&m).unwrap();
        // Dirty logging is never offered, so its fds are never taken.
        let m = Message::test(FrontendReq::SET_LOG_BASE, vec![0; 16], vec![dup(&good)]);
        assert!(matches!(
            check(&m),
            Err(GuardError::Refused("SET_LOG_BASE"))
        ));
        // Other requests pass untouched.
        check(&Message::test(FrontendReq::GET_FEATURES, vec![], vec![])).unwrap();
    }

    #[test]
    fn a_plain_file_without_seal_support_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(0x1000).unwrap();
        let e = check_region(0, &region(0x1000, 0), &OwnedFd::from(f)).unwrap_err();
        assert!(e.is_region_refusal(), "{e}");
    }
}
