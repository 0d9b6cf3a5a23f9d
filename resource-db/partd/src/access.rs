//! Files opened for an API caller, with the caller's rights.
//!
//! partd usually runs as root, and part-vmm opens nothing itself: whatever
//! file a partition boots from, partd opens. So a path in a definition
//! (kernel, initrd, disk image) is opened *as the user who asked*: in a
//! thread of its own whose uids, gids and supplementary groups are the
//! caller's (taken from the connection: SO_PEERCRED and SO_PEERGROUPS), and
//! which therefore has no capabilities left, with no symbolic link anywhere
//! in the path
//! (`openat2(RESOLVE_NO_SYMLINKS)`), and only if it is a regular file. The
//! open file is what part-vmm gets, on an inherited descriptor; a path
//! swapped for a link after the check is refused at the next open, never
//! followed.
//!
//! Linux keeps credentials per thread; the C library's wrappers for
//! `setgroups`, `setresgid` and `setresuid` change every thread of the
//! process (POSIX semantics), so this module makes the raw system calls, in
//! a thread that exits after the one open. Leaving uid 0 clears all of that
//! thread's capabilities, so the kernel checks exactly the caller's rights
//! (a filesystem-uid change alone would keep e.g. CAP_SYS_PTRACE, which
//! opens other processes' `/proc` files).
//!
//! What it must never do: open a file with more rights than the caller
//! has, follow a symbolic link, or change the credentials of any thread
//! but its own.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Who asked: the peer of an API connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Read,
    ReadWrite,
}

/// Why a file could not be opened for a caller; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{key} {}: uid {uid} cannot open it{}: {source}", path.display(), mode_text(*mode))]
    Denied {
        key: &'static str,
        path: PathBuf,
        uid: u32,
        mode: Mode,
        source: io::Error,
    },
    #[error("{key} {}: the path goes through a symbolic link; partd follows none (give the real path)", path.display())]
    Symlink { key: &'static str, path: PathBuf },
    #[error("{key} {}: not a regular file", path.display())]
    NotAFile { key: &'static str, path: PathBuf },
    #[error("{key} {}: partd runs as uid {partd} and cannot open files with uid {uid}'s rights; run partd as root to serve other users", path.display())]
    CannotSwitch {
        key: &'static str,
        path: PathBuf,
        partd: u32,
        uid: u32,
    },
    #[error("{key} {}: cannot take uid {uid}'s rights to open it: {source}", path.display())]
    Credentials {
        key: &'static str,
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("{key} {}: cannot start the thread that opens it: {source}", path.display())]
    Thread {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn mode_text(mode: Mode) -> &'static str {
    match mode {
        Mode::Read => " for reading",
        Mode::ReadWrite => " for reading and writing",
    }
}

/// What went wrong inside the opening thread.
enum Failure {
    Credentials(io::Error),
    Open(io::Error),
    NotAFile,
}

/// Opens `path` (absolute) for `caller` with `mode`; `key` names it in
/// errors (`kernel`, `initrd`, `disk image`).
pub fn open_as(
    caller: &Caller,
    key: &'static str,
    path: &Path,
    mode: Mode,
) -> Result<File, AccessError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && euid != caller.uid {
        return Err(AccessError::CannotSwitch {
            key,
            path: path.to_owned(),
            partd: euid,
            uid: caller.uid,
        });
    }
    let switch = euid == 0 && caller.uid != 0;
    let (who, target) = (caller.clone(), path.to_owned());
    let opened = std::thread::Builder::new()
        .name("partd-open-as".into())
        .spawn(move || {
            if switch {
                take_rights(&who).map_err(Failure::Credentials)?;
            }
            open_regular(&target, mode)
        })
        .map_err(|source| AccessError::Thread {
            key,
            path: path.to_owned(),
            source,
        })?
        .join()
        .map_err(|_| AccessError::Thread {
            key,
            path: path.to_owned(),
            source: io::Error::other("the thread panicked"),
        })?;
    opened.map_err(|f| match f {
        Failure::Credentials(source) => AccessError::Credentials {
            key,
            path: path.to_owned(),
            uid: caller.uid,
            source,
        },
        Failure::NotAFile => AccessError::NotAFile {
            key,
            path: path.to_owned(),
        },
        Failure::Open(e) if e.raw_os_error() == Some(libc::ELOOP) => AccessError::Symlink {
            key,
            path: path.to_owned(),
        },
        Failure::Open(source) => AccessError::Denied {
            key,
            path: path.to_owned(),
            uid: caller.uid,
            mode,
            source,
        },
    })
}

/// Makes the calling thread (only) `who`: its supplementary groups, then
/// its real, effective and saved gid and uid. Going from uid 0 to another
/// uid clears every capability of the thread (not only the ones that
/// bypass file permissions, as a filesystem-uid change would: a kept
/// CAP_SYS_PTRACE would still open another process's `/proc` files), so the
/// open that follows has exactly the caller's rights. The thread cannot
/// get root back; it ends after the open.
fn take_rights(who: &Caller) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = who.groups.clone();
    // SAFETY: the raw system calls change only the calling thread's
    // credentials (see the module doc); `groups` outlives the call and its
    // length is passed with it. The other calls take integers.
    let (g, r, u) = unsafe {
        let g = libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
        let r = libc::syscall(libc::SYS_setresgid, who.gid, who.gid, who.gid);
        let u = libc::syscall(libc::SYS_setresuid, who.uid, who.uid, who.uid);
        (g, r, u)
    };
    if g != 0 || r != 0 || u != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `openat2` with no symbolic links anywhere in `path`, non-blocking (a
/// FIFO does not hold the thread), with `mode`: the kernel checks the
/// thread's credentials. Anything but a regular file is refused after the
/// open (a device the caller may open opens as it would for them; nothing
/// is read from it).
fn open_regular(path: &Path, mode: Mode) -> Result<File, Failure> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Failure::Open(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let flags = match mode {
        Mode::Read => libc::O_RDONLY,
        Mode::ReadWrite => libc::O_RDWR,
    } | libc::O_CLOEXEC
        | libc::O_NOCTTY
        | libc::O_NONBLOCK;
    let fd =
        openat2(libc::AT_FDCWD, &c, flags, libc::RESOLVE_NO_SYMLINKS).map_err(Failure::Open)?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(Failure::Open)?;
    if !meta.file_type().is_file() {
        return Err(Failure::NotAFile);
    }
    // Regular files ignore O_NONBLOCK, but the descriptor is handed on.
    // SAFETY: fcntl on a descriptor `file` owns, with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(Failure::Open(io::Error::last_os_error()));
    }
    Ok(file)
}

fn openat2(
    dir: libc::c_int,
    path: &CString,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is a valid value for it.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    // SAFETY: `path` is NUL-terminated and lives across the call; `how` is
    // a valid open_how whose size is passed with it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn me() -> Caller {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Caller {
            uid,
            gid,
            groups: Vec::new(),
        }
    }

    #[test]
    fn a_regular_file_opens_and_links_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel");
        std::fs::write(&file, b"elf").unwrap();
        let mut s = String::new();
        open_as(&me(), "kernel", &file, Mode::Read)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "elf");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let e = open_as(&me(), "kernel", &link, Mode::Read).unwrap_err();
        assert!(matches!(e, AccessError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A link in a middle component is refused too.
        let via = dir.path().join("via");
        std::os::unix::fs::symlink(dir.path(), &via).unwrap();
        let e = open_as(&me(), "initrd", &via.join("kernel"), Mode::Read).unwrap_err();
        assert!(matches!(e, AccessError::Symlink { .. }), "{e}");
        let e = open_as(&me(), "initrd", dir.path(), Mode::Read).unwrap_err();
        assert!(matches!(e, AccessError::NotAFile { .. }), "{e}");
        let e = open_as(&me(), "initrd", &dir.path().join("none"), Mode::Read).unwrap_err();
        assert!(e.to_string().starts_with("initrd "), "{e}");
    }

    #[test]
    fn another_users_rights_are_the_ones_checked() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Without root partd cannot take another uid's rights: refused.
            let other = Caller {
                uid: 65534,
                gid: 65534,
                groups: vec![],
            };
            let e = open_as(&other, "kernel", Path::new("/etc/hostname"), Mode::Read).unwrap_err();
            assert!(matches!(e, AccessError::CannotSwitch { .. }), "{e}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let nobody = Caller {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let e = open_as(&nobody, "initrd", &secret, Mode::Read).unwrap_err();
        assert!(
            e.to_string()
                .contains("uid 65534 cannot open it for reading"),
            "{e}"
        );
        // No capability survives: another process's /proc files, which
        // ptrace rules guard, stay closed (CAP_SYS_PTRACE would open them).
        let e = open_as(&nobody, "initrd", Path::new("/proc/1/maps"), Mode::Read).unwrap_err();
        assert!(e.to_string().contains("cannot open it"), "{e}");
        // Root still can, and this thread kept its own rights.
        assert!(open_as(&me(), "initrd", &secret, Mode::Read).is_ok());
        assert!(std::fs::read(&secret).is_ok());
        // A file nobody may read but not write.
        let ro = dir.path().join("ro");
        std::fs::write(&ro, b"x").unwrap();
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(open_as(&nobody, "disk image", &ro, Mode::Read).is_ok());
        let e = open_as(&nobody, "disk image", &ro, Mode::ReadWrite).unwrap_err();
        assert!(e.to_string().contains("for reading and writing"), "{e}");
        // A group the caller is in counts.
        std::os::unix::fs::chown(&secret, Some(0), Some(4242)).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let member = Caller {
            groups: vec![4242],
            ..nobody.clone()
        };
        assert!(open_as(&member, "initrd", &secret, Mode::Read).is_ok());
        assert!(open_as(&nobody, "initrd", &secret, Mode::Read).is_err());
    }
}
