//! vhost-user message framing on a Unix socket: 12-byte header, body of
//! the size the header gives, file descriptors attached to the header.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

#[cfg(test)]
use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::GuardError;

/// vhost-user message header: request, flags, size (all u32 LE).
pub(super) const HEADER_LEN: usize = 12;
/// Largest body a vhost-user message may have (`vhost`'s `MAX_MSG_SIZE`).
pub(super) const MAX_BODY: usize = 0x1000;
/// Most file descriptors one message may carry (`vhost`'s limit).
const MAX_FDS: usize = 32;
/// Header flags value of protocol version 1.
pub(super) const VERSION_1: u32 = 0x1;

/// One framed message with its file descriptors.
pub(super) struct Message {
    pub(super) header: [u8; HEADER_LEN],
    pub(super) body: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

impl Message {
    pub(super) fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    pub(super) fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    /// A message without file descriptors.
    pub(super) fn new(req: u32, flags: u32, body: Vec<u8>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&req.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body,
            fds: Vec::new(),
        }
    }
}

#[cfg(test)]
impl Message {
    /// A version-1 message of `req` with `body` and `fds` (tests).
    pub(super) fn test(req: FrontendReq, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message {
            fds,
            ..Message::new(req as u32, VERSION_1, body)
        }
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream.
pub(super) fn recv(sock: &UnixStream, body: Vec<u8>) -> Result<Option<Message>, GuardError> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec points at `header`, valid for HEADER_LEN bytes for
        // the duration of the call; received fds are written into `raw_fds`.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: the kernel installed these descriptors in our table for us
        // (SCM_RIGHTS); nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    if n < HEADER_LEN {
        reader.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_BODY {
        return Err(GuardError::TooLarge(size));
    }
    let mut body = body;
    body.clear();
    body.resize(size, 0);
    reader.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

/// Writes one message, its fds attached to the first byte.
pub(super) fn send(sock: &UnixStream, msg: &Message) -> Result<(), GuardError> {
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let bufs: [&[u8]; 2] = [&msg.header, &msg.body];
    let total = HEADER_LEN + msg.body.len();
    let n = loop {
        match sock.send_with_fds(&bufs, &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    if n < total {
        // The fds went with the first byte; the rest is plain data.
        let mut w = sock;
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&msg.header);
        all.extend_from_slice(&msg.body);
        w.write_all(&all[n..])?;
    }
    Ok(())
}
