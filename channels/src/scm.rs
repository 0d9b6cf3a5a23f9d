//! Passing file descriptors (memfds, eventfds) over a Unix stream socket with
//! `SCM_RIGHTS`.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::ChannelError;

/// Most fds accepted in one message; extra ones are closed by the kernel path.
pub const MAX_FDS: usize = 8;

/// Sends `data` with `fds` attached in one `sendmsg`.
pub fn send(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
    if fds.len() > MAX_FDS {
        return Err(ChannelError::Protocol("too many fds in one message"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = sock
        .send_with_fds(&[data], &raw)
        .map_err(|e| ChannelError::Os {
            op: "sendmsg(SCM_RIGHTS)",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    if n != data.len() {
        return Err(ChannelError::Protocol("short sendmsg"));
    }
    Ok(())
}

/// Receives one message into `buf`; returns the byte count (0 = peer closed)
/// and the fds that came with it, each already owned (closed on drop).
pub fn recv(sock: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), ChannelError> {
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which we exclusively borrow for the call.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| ChannelError::Os {
            op: "recvmsg(SCM_RIGHTS)",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let fds = raw[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg installed these fds in our table; we take ownership once.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SealedMemfd;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_crosses_socket_and_keeps_content_and_seals() {
        let (a, b) = UnixStream::pair().unwrap();
        let mfd = SealedMemfd::create("scm", 4096).unwrap();
        mfd.map(true).unwrap().write_at(100, b"payload").unwrap();
        send(&a, b"MFD1", &[mfd.fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, mut fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"MFD1");
        assert_eq!(fds.len(), 1);
        let got = SealedMemfd::from_received(fds.remove(0), 4096).unwrap();
        let mut out = [0u8; 7];
        got.map(false).unwrap().read_at(100, &mut out).unwrap();
        assert_eq!(&out, b"payload");
        let _ = mfd.fd().as_fd();
    }
}
