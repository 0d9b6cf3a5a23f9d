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
