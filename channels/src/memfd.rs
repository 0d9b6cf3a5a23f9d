//! Sealed memfds: the one place partvisor creates, seals and checks them
//! (guest RAM, partition descriptors, ring memory, received fds).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::ChannelError;

/// Seals every memfd crossing a process boundary must carry: with them the
/// file can never shrink (no `SIGBUS` on a mapped page) nor grow.
pub const REQUIRED_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A memfd whose size is fixed by seals.
#[derive(Debug)]
pub struct SealedMemfd {
    fd: OwnedFd,
    len: u64,
}

impl SealedMemfd {
    /// Creates a zero-filled memfd of `len` bytes sealed against shrinking and
    /// growing. More seals (see [`SealedMemfd::seal_future_write`]) may be
    /// added later by the owner.
    pub fn create(name: &str, len: u64) -> Result<Self, ChannelError> {
        let fd = unsealed(name, len)?;
        add_seals(fd.as_fd(), REQUIRED_SEALS)?;
        Ok(SealedMemfd { fd, len })
    }

    /// A memfd holding exactly `contents`, sealed against shrinking, growing
    /// and every write, with the seal set itself sealed: what a reader of
    /// the fd sees can never change (partd's partition descriptors).
    pub fn with_contents(name: &str, contents: &[u8]) -> Result<Self, ChannelError> {
        let len = u64::try_from(contents.len())
            .map_err(|_| ChannelError::Geometry("memfd length too large"))?;
        let this = Self::create(name, len)?;
        let mut done = 0;
        while done < contents.len() {
            let rest = &contents[done..];
            let off = libc::off_t::try_from(done)
                .map_err(|_| ChannelError::Geometry("memfd length too large"))?;
            // SAFETY: rest is a valid readable buffer of rest.len() bytes and
            // the fd is a memfd we own; pwrite does not retain the pointer.
            let n =
                unsafe { libc::pwrite(this.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off) };
            match usize::try_from(n) {
                Ok(0) => return Err(ChannelError::Protocol("pwrite(memfd) wrote nothing")),
                Ok(n) => done += n,
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(ChannelError::Os {
                            op: "pwrite(memfd)",
                            source: e,
                        });
                    }
                }
            }
        }
        this.add_seals(libc::F_SEAL_WRITE | libc::F_SEAL_SEAL)?;
        Ok(this)
    }

    /// Validates a memfd received from another process: it must carry
    /// `F_SEAL_SHRINK | F_SEAL_GROW` and be at least `min_len` bytes long.
    /// Anything else (a pipe, a plain file, an unsealed memfd) is refused.
    pub fn from_received(fd: OwnedFd, min_len: u64) -> Result<Self, ChannelError> {
        let seals = seals_of(fd.as_fd())?;
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(ChannelError::MissingSeals {
                have: seals,
                need: REQUIRED_SEALS,
            });
        }
        let len = size_of_fd(fd.as_fd())?;
        if len < min_len || len == 0 {
            return Err(ChannelError::TooSmall {
                have: len,
                need: min_len.max(1),
            });
        }
        Ok(SealedMemfd { fd, len })
    }

    /// Adds `F_SEAL_FUTURE_WRITE | F_SEAL_SEAL`: mappings that exist now keep
    /// their access, but nobody (including a process this fd is sent to) can
    /// create a new writable mapping or `write(2)` to it. The owner maps the
    /// memory read-write *before* calling this and hands out the fd after.
    pub fn seal_future_write(&self) -> Result<(), ChannelError> {
        self.add_seals(libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL)
    }

    /// Forbids adding or removing any further seal.
    pub fn seal_seals(&self) -> Result<(), ChannelError> {
        self.add_seals(libc::F_SEAL_SEAL)
    }

    /// Adds `seals` (`F_SEAL_*` bits) to the file.
    pub fn add_seals(&self, seals: i32) -> Result<(), ChannelError> {
        add_seals(self.fd.as_fd(), seals)
    }

    /// Current seal set.
    pub fn seals(&self) -> Result<i32, ChannelError> {
        seals_of(self.fd.as_fd())
    }

    /// Size in bytes (fixed by the seals).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a sealed memfd has a non-zero size.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Borrow the fd, e.g. to send it with `SCM_RIGHTS`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The fd, for a caller that keeps it (e.g. as a `File` for vm-memory).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Maps the whole file shared, read-write or read-only.
    pub fn map(&self, writable: bool) -> Result<Mapping, ChannelError> {
        Mapping::new(self.fd.as_fd(), self.len, writable)
    }
}

/// The seal set (`F_GET_SEALS`) of any fd; fails for an fd that is not a
/// memfd (a pipe, a plain file on most filesystems).
/// Creates a zero-filled memfd of `len` bytes that allows sealing but has no
/// seal yet. Only for what must be able to hold fewer seals than
/// [`SealedMemfd`] guarantees: tests of the checks that refuse such files,
/// and hostile peers; everything else uses [`SealedMemfd::create`].
pub fn unsealed(name: &str, len: u64) -> Result<OwnedFd, ChannelError> {
    if len == 0 {
        return Err(ChannelError::Geometry("memfd length must be non-zero"));
    }
    let cname = CString::new(name.replace('\0', "?"))
        .map_err(|_| ChannelError::Geometry("memfd name contains NUL"))?;
    // SAFETY: cname is a valid NUL-terminated string; flags are valid.
    let raw =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(ChannelError::os("memfd_create"));
    }
    // SAFETY: raw is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size =
        libc::off_t::try_from(len).map_err(|_| ChannelError::Geometry("memfd length too large"))?;
    // SAFETY: fd is a valid memfd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(ChannelError::os("ftruncate(memfd)"));
    }
    Ok(fd)
}

/// Adds `seals` (`F_SEAL_*` bits) to the memfd `fd`.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> Result<(), ChannelError> {
    // SAFETY: F_ADD_SEALS on a valid fd only changes the file's seal set.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(ChannelError::os("fcntl(F_ADD_SEALS)"));
    }
    Ok(())
}

pub fn seals_of(fd: BorrowedFd<'_>) -> Result<i32, ChannelError> {
    // SAFETY: F_GET_SEALS reads the seal set of a valid fd and has no other effect.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(ChannelError::os("fcntl(F_GET_SEALS) (is it a memfd?)"));
    }
    Ok(seals)
}

fn size_of_fd(fd: BorrowedFd<'_>) -> Result<u64, ChannelError> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat struct and fd is valid.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(ChannelError::os("fstat"));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(ChannelError::Protocol("received fd is not a regular memfd"));
    }
    u64::try_from(st.st_size).map_err(|_| ChannelError::Protocol("negative file size"))
}

/// A shared mapping of a sealed memfd. The memory may be written concurrently
/// by another process, so it is only ever accessed through raw copies, never
/// through Rust references that would promise exclusivity.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory; all accesses go through raw
// pointer copies and atomics, which are sound to issue from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method hands out references into the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: u64, writable: bool) -> Result<Self, ChannelError> {
        let len = usize::try_from(len).map_err(|_| ChannelError::Geometry("mapping too large"))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a valid fd at a kernel-chosen address; the result is
        // checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ChannelError::os("mmap"));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or(ChannelError::Geometry("mmap returned NULL"))?;
        Ok(Mapping { ptr, len, writable })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping (never constructed in practice).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping was created writable.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Base address. Dereferencing it is the caller's business.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Checks that `[off, off+len)` lies inside the mapping.
    pub fn check_range(&self, off: u64, len: u64) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// Copies `dst.len()` bytes starting at `off` out of the mapping.
    pub fn read_at(&self, off: u64, dst: &mut [u8]) -> Result<(), ChannelError> {
        if !self.check_range(off, dst.len() as u64) {
            return Err(ChannelError::Geometry("read outside mapping"));
        }
        // SAFETY: the range was bounds-checked above and the file's size is
        // sealed, so every byte is mapped; dst is a distinct local buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.as_ptr().add(off as usize),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Copies `src` into the mapping at `off`.
    pub fn write_at(&self, off: u64, src: &[u8]) -> Result<(), ChannelError> {
        if !self.writable {
            return Err(ChannelError::Geometry("write to read-only mapping"));
        }
        if !self.check_range(off, src.len() as u64) {
            return Err(ChannelError::Geometry("write outside mapping"));
        }
        // SAFETY: bounds-checked, writable mapping of a size-sealed file.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(off as usize), src.len())
        };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_off` into `self` at `dst_off`:
    /// the single data move of the shared-memory transport.
    pub fn copy_from(
        &self,
        dst_off: u64,
        src: &Mapping,
        src_off: u64,
        len: u64,
    ) -> Result<(), ChannelError> {
        if !self.writable {
            return Err(ChannelError::Geometry("copy into read-only mapping"));
        }
        if !self.check_range(dst_off, len) || !src.check_range(src_off, len) {
            return Err(ChannelError::Geometry("copy outside mapping"));
        }
        // SAFETY: both ranges are bounds-checked inside size-sealed mappings;
        // `copy` tolerates overlap when src and dst are the same mapping.
        unsafe {
            std::ptr::copy(
                src.as_ptr().add(src_off as usize),
                self.as_ptr().add(dst_off as usize),
                len as usize,
            )
        };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap in `new` that is
        // unmapped exactly once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsealed_memfd(len: i64) -> OwnedFd {
        // SAFETY: valid C string literal and flags.
        let raw = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh fd owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: valid fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
        fd
    }

    #[test]
    fn received_memfd_without_shrink_seal_is_refused() {
        let fd = unsealed_memfd(4096);
        assert!(matches!(
            SealedMemfd::from_received(fd, 4096),
            Err(ChannelError::MissingSeals { have: 0x1, .. })
                | Err(ChannelError::MissingSeals { have: 0, .. })
        ));
    }

    #[test]
    fn received_memfd_smaller_than_promised_is_refused() {
        let m = SealedMemfd::create("small", 4096).unwrap();
        let dup = m.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            SealedMemfd::from_received(dup, 8192),
            Err(ChannelError::TooSmall {
                have: 4096,
                need: 8192
            })
        ));
    }

    #[test]
    fn sealed_memfd_cannot_be_shrunk_by_anyone() {
        let m = SealedMemfd::create("s", 8192).unwrap();
        // SAFETY: valid fd; the call is expected to fail with EPERM.
        let rc = unsafe { libc::ftruncate(m.fd().as_raw_fd(), 0) };
        assert_eq!(rc, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
        assert_eq!(m.seals().unwrap() & REQUIRED_SEALS, REQUIRED_SEALS);
    }

    #[test]
    fn future_write_seal_keeps_owner_mapping_writable_but_refuses_new_writable_maps() {
        let m = SealedMemfd::create("fw", 4096).unwrap();
        let owner = m.map(true).unwrap();
        m.seal_future_write().unwrap();
        owner.write_at(0, b"still mine").unwrap();
        let peer = SealedMemfd::from_received(m.fd().try_clone_to_owned().unwrap(), 4096).unwrap();
        assert!(
            peer.map(true).is_err(),
            "peer must not get a writable mapping"
        );
        let ro = peer.map(false).unwrap();
        let mut b = [0u8; 10];
        ro.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"still mine");
        // SAFETY: mprotect on our own read-only mapping; expected to fail.
        let rc =
            unsafe { libc::mprotect(ro.as_ptr().cast(), 4096, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(
            rc, -1,
            "upgrading a read-only mapping of a future-write-sealed memfd must fail"
        );
        // SAFETY: valid fd and buffer; write(2) must be refused.
        let rc = unsafe { libc::pwrite(peer.fd().as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, -1);
    }

    #[test]
    fn with_contents_holds_the_bytes_and_refuses_every_change() {
        let m = SealedMemfd::with_contents("desc", b"{\"name\":\"web\"}").unwrap();
        assert_eq!(m.len(), 14);
        let seals = m.seals().unwrap();
        let all = REQUIRED_SEALS | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        assert_eq!(seals & all, all);
        let mut b = [0u8; 14];
        m.map(false).unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"{\"name\":\"web\"}");
        assert!(
            m.map(true).is_err(),
            "a write-sealed memfd maps read-only only"
        );
        // SAFETY: valid fd and buffer; write(2) must be refused.
        let rc = unsafe { libc::pwrite(m.fd().as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, -1);
        // SAFETY: F_ADD_SEALS on our fd; refused because F_SEAL_SEAL is set.
        let rc = unsafe { libc::fcntl(m.fd().as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_EXEC) };
        assert_eq!(rc, -1);
    }

    #[test]
    fn seals_of_a_pipe_is_an_error() {
        let mut fds = [0; 2];
        // SAFETY: valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds owned here.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert!(matches!(seals_of(r.as_fd()), Err(ChannelError::Os { .. })));
    }

    #[test]
    fn a_pipe_is_not_accepted_as_memfd() {
        let mut fds = [0; 2];
        // SAFETY: valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds owned here.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert!(SealedMemfd::from_received(r, 1).is_err());
    }

    #[test]
    fn out_of_range_copies_are_refused() {
        let m = SealedMemfd::create("r", 4096).unwrap().map(true).unwrap();
        assert!(m.write_at(4090, &[0; 7]).is_err());
        assert!(m.read_at(u64::MAX, &mut [0; 1]).is_err());
        assert!(m.copy_from(0, &m, 4000, 200).is_err());
        m.write_at(0, b"abc").unwrap();
        m.copy_from(100, &m, 0, 3).unwrap();
        let mut b = [0u8; 3];
        m.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"abc");
    }
}
