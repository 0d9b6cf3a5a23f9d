//! The interconnect's own allocator: every registrable buffer is a memfd of
//! its own, mapped read-write by its owner and then sealed
//! `F_SHRINK | F_GROW | F_FUTURE_WRITE | F_SEAL`. The shared-memory transport
//! can hand that fd to a peer, which can only ever map it read-only and can
//! never make it shrink under the owner.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use channels::{Mapping, SealedMemfd};

use crate::{IcError, Result};

static NEXT_BUFFER_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub(crate) struct BufInner {
    pub id: u64,
    pub memfd: SealedMemfd,
    pub map: Mapping,
}

/// A registrable buffer from the interconnect allocator. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Buffer {
    pub(crate) inner: Arc<BufInner>,
}

fn page_round(len: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    len.checked_add(PAGE - 1).map(|v| v & !(PAGE - 1))
}

impl Buffer {
    pub(crate) fn allocate(len: u64) -> Result<Buffer> {
        if len == 0 || len > (1 << 40) {
            return Err(IcError::InvalidArgument(format!(
                "buffer length {len} must be in 1..=1TiB"
            )));
        }
        let size =
            page_round(len).ok_or_else(|| IcError::InvalidArgument("buffer too large".into()))?;
        let id = NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed);
        let memfd = SealedMemfd::create(&format!("ic-buf-{id}"), size)?;
        let map = memfd.map(true)?;
        memfd.seal_future_write()?;
        Ok(Buffer {
            inner: Arc::new(BufInner { id, memfd, map }),
        })
    }

    /// Usable length in bytes (rounded up to the page size).
    pub fn len(&self) -> u64 {
        self.inner.map.len() as u64
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` into the buffer at `off`.
    pub fn write_at(&self, off: u64, src: &[u8]) -> Result<()> {
        Ok(self.inner.map.write_at(off, src)?)
    }

    /// Copies out of the buffer at `off`.
    pub fn read_at(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        Ok(self.inner.map.read_at(off, dst)?)
    }

    /// Base address, for callers that manage their own synchronisation.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.map.as_ptr()
    }

    /// The buffer as a byte slice.
    ///
    /// # Safety
    /// No remote write, receive or read may land in the buffer while the
    /// slice is alive (i.e. poll the completion first).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for len bytes for the Buffer's lifetime;
        // the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.inner.map.len()) }
    }

    /// The buffer as a mutable byte slice.
    ///
    /// # Safety
    /// As for [`Buffer::as_slice`], and no other slice of it may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.inner.map.len()) }
    }

    pub(crate) fn map(&self) -> &Mapping {
        &self.inner.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn buffer_is_page_rounded_and_sealed_against_peer_writes() {
        let b = Buffer::allocate(100).unwrap();
        assert_eq!(b.len(), 4096);
        let seals = b.inner.memfd.seals().unwrap();
        for s in [
            libc::F_SEAL_SHRINK,
            libc::F_SEAL_GROW,
            libc::F_SEAL_FUTURE_WRITE,
            libc::F_SEAL_SEAL,
        ] {
            assert_eq!(seals & s, s);
        }
        b.write_at(10, b"owner writes").unwrap();
        // A writable shared mapping of the fd (what a peer would try) fails.
        // SAFETY: mmap of a valid fd; failure is expected and checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                b.inner.memfd.fd().as_raw_fd(),
                0,
            )
        };
        assert_eq!(p, libc::MAP_FAILED);
    }
}
