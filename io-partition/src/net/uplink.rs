//! The switch's side of the TAP uplink: frames out with one `writev` each,
//! frames in read on the uplink's own thread and forwarded like a port's.
//! Addresses seen as sources on the uplink are learned; a frame from the
//! uplink claiming a port's MAC or a group source is dropped.

use std::io;
use std::os::fd::AsRawFd;

use tracing::warn;
use vm_memory::GuestMemoryBackend;

use super::frame::mac_at;
use super::frame::{Body, Frame, Source};
use super::stats::{bump, UplinkStats};
use super::{Switch, ETH_HDR, MAX_FRAME, MIN_FRAME, TX_BATCH};
use crate::tap::Tap;

/// The uplink: a TAP device and its counters.
pub(super) struct Uplink {
    pub(super) tap: Tap,
    pub(super) stats: UplinkStats,
}

impl Switch {
    /// Writes `frame` to the tap with one `writev`, or counts why not.
    pub(super) fn send_uplink(&self, frame: &Frame<'_>) {
        let Some(up) = &self.uplink else { return };
        let mut iovecs = Vec::with_capacity(4);
        iovecs.push(libc::iovec {
            iov_base: frame.eth.as_ptr() as *mut libc::c_void,
            iov_len: ETH_HDR,
        });
        match &frame.body {
            Body::Bytes(b) => iovecs.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            }),
            Body::Guest { mem, segs, .. } => {
                for s in segs.iter().filter(|s| s.len > 0) {
                    for slice in mem.get_slices(s.addr, s.len as usize) {
                        let Ok(slice) = slice else {
                            // Checked by the walker; the memory table cannot
                            // change under the snapshot we hold.
                            bump(&up.stats.errors);
                            return;
                        };
                        iovecs.push(libc::iovec {
                            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                            iov_len: slice.len(),
                        });
                    }
                }
            }
        }
        let iovcnt = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the iovecs point into `frame.eth` and into guest memory
        // whose mapping the caller's snapshot keeps alive for this call; the
        // kernel only reads them.
        let n = unsafe { libc::writev(up.tap.file().as_raw_fd(), iovecs.as_ptr(), iovcnt) };
        if n >= 0 {
            bump(&up.stats.tx_frames);
            return;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                bump(&up.stats.dropped_full);
            }
            // The interface is down: the host is not listening.
            Some(libc::EIO) => {
                bump(&up.stats.dropped_full);
            }
            _ => {
                let n = bump(&up.stats.errors);
                if n <= 8 || n.is_power_of_two() {
                    warn!(tap = %up.tap.name(), "write to the tap failed: {e} ({n} so far)");
                }
            }
        }
    }

    /// Reads frames from the uplink and forwards them, forever. Runs on its
    /// own thread; returns only if the tap fails.
    pub fn run_uplink(&self) -> io::Result<()> {
        let Some(up) = &self.uplink else {
            return Ok(());
        };
        let fd = up.tap.file().as_raw_fd();
        let mut buf = vec![0u8; 65536];
        let mut touched = self.touched();
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for _ in 0..TX_BATCH {
                // SAFETY: read(2) into a live buffer of buf.len() bytes.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            // A tap whose interface went away reads EBADFD/EIO.
                            self.notify(&mut touched);
                            return Err(e);
                        }
                    }
                }
                let frame = &buf[..n as usize];
                if frame.len() < MIN_FRAME || frame.len() > MAX_FRAME {
                    bump(&up.stats.dropped_bad_frame);
                    continue;
                }
                let src = mac_at(&frame[6..12]);
                if src.is_multicast() || self.by_mac.contains_key(&src) {
                    bump(&up.stats.dropped_spoof);
                    continue;
                }
                bump(&up.stats.rx_frames);
                self.learn(src);
                let mut eth = [0u8; ETH_HDR];
                eth.copy_from_slice(&frame[..ETH_HDR]);
                let frame = Frame {
                    eth,
                    body: Body::Bytes(&frame[ETH_HDR..]),
                };
                self.forward(Source::Uplink, &frame, &mut touched);
            }
            self.notify(&mut touched);
        }
    }
}
