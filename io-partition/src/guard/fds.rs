//! The ring file descriptors a frontend sends (`SET_VRING_CALL`,
//! `SET_VRING_KICK`, `SET_VRING_ERR`) must be eventfds: a pipe or a socket
//! as a call fd would block the worker that signals it once full (and with
//! it every port that worker serves). Each one that passes is made
//! non-blocking before the backend sees it.

use std::os::fd::{AsRawFd, OwnedFd};

use vhost::vhost_user::message::FrontendReq;

use super::message::Message;
use super::GuardError;

/// `VHOST_USER_VRING_NOFD_MASK`: the ring message carries no descriptor.
const NOFD: u64 = 1 << 8;

/// What the kernel calls an eventfd's file (`/proc/self/fd/N`).
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// Checks the descriptor of a ring message, if it has one.
pub(super) fn check(msg: &Message) -> Result<(), GuardError> {
    let req = msg.request();
    let what = if req == FrontendReq::SET_VRING_CALL as u32 {
        "SET_VRING_CALL"
    } else if req == FrontendReq::SET_VRING_KICK as u32 {
        "SET_VRING_KICK"
    } else if req == FrontendReq::SET_VRING_ERR as u32 {
        "SET_VRING_ERR"
    } else {
        return Ok(());
    };
    let index = <[u8; 8]>::try_from(msg.body.as_slice())
        .map(u64::from_le_bytes)
        .map_err(|_| GuardError::BadBody(what, msg.body.len()))?;
    let want = usize::from(index & NOFD == 0);
    if msg.fds.len() != want {
        return Err(GuardError::FdCount(want, msg.fds.len(), what));
    }
    for fd in &msg.fds {
        check_eventfd(what, fd)?;
    }
    Ok(())
}

/// `fd` is an eventfd; made non-blocking.
fn check_eventfd(what: &'static str, fd: &OwnedFd) -> Result<(), GuardError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    if link != EVENTFD_LINK {
        return Err(GuardError::NotEventfd { what, kind: link });
    }
    // SAFETY: fcntl on a descriptor this message owns, with integer
    // arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(GuardError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let set = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if set < 0 {
        return Err(GuardError::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn ring_msg(req: FrontendReq, index: u64, fd: Option<OwnedFd>) -> Message {
        let mut m = Message::new(req as u32, 1, index.to_le_bytes().to_vec());
        m.fds.extend(fd);
        m
    }

    #[test]
    fn eventfds_pass_and_become_non_blocking_and_pipes_are_refused() {
        let efd = EventFd::new(0).unwrap();
        // SAFETY: dup returns a new descriptor nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(libc::dup(efd.as_raw_fd())) };
        check(&ring_msg(FrontendReq::SET_VRING_CALL, 0, Some(owned))).unwrap();
        // SAFETY: fcntl on our own open eventfd.
        let flags = unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "made non-blocking");

        let mut p = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: both are new descriptors we own.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let e = check(&ring_msg(FrontendReq::SET_VRING_CALL, 1, Some(r))).unwrap_err();
        assert!(
            e.to_string().contains("SET_VRING_CALL") && e.to_string().contains("pipe:"),
            "{e}"
        );

        // No fd, as the mask says: fine; an fd it says is not there: refused.
        check(&ring_msg(FrontendReq::SET_VRING_KICK, NOFD, None)).unwrap();
        let e = check(&ring_msg(FrontendReq::SET_VRING_ERR, 0, None)).unwrap_err();
        assert!(
            matches!(e, GuardError::FdCount(1, 0, "SET_VRING_ERR")),
            "{e}"
        );
    }
}
