//! The switch's optional uplink: a Linux TAP device (`/dev/net/tun`,
//! `IFF_TAP | IFF_NO_PI`), created if it does not exist, attached otherwise.
//!
//! part-io holds the TAP file descriptor; the host side of the uplink is the
//! kernel network interface of the same name. A frame part-io writes to the
//! descriptor is received by the host on that interface, and a frame the host
//! sends out of the interface is read by part-io.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Errors opening the uplink.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap interface name `{0}` is empty, longer than 15 bytes or contains '/', ':' or whitespace")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded and the device present?)")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {name}: {source} (EBUSY: another process holds it; EINVAL: it is not a tap without packet info; EPERM: CAP_NET_ADMIN is needed to create it)")]
    SetIff { name: String, source: io::Error },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and pointers); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

impl Tap {
    /// Opens tap `name` (non-blocking, close-on-exec), creating it if no
    /// interface of that name exists. A created tap disappears when part-io
    /// exits; it is brought up here (best effort). An existing one is left in
    /// whatever state its owner configured.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and updates the name of) the ifreq we pass,
        // which lives for the duration of the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            created: !existed,
        };
        if tap.created {
            if let Err(e) = tap.set_up() {
                tracing::warn!(tap = %tap.name, "cannot bring the created tap up: {e}");
            }
        }
        Ok(tap)
    }

    /// Sets `IFF_UP` on the interface.
    fn set_up(&self) -> io::Result<()> {
        // SAFETY: plain socket(2); the fd is owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: s was just created and is owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = ifreq_for(&self.name);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether part-io created the interface (rather than attaching to one).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The device file (non-blocking).
    pub fn file(&self) -> &File {
        &self.file
    }
}
