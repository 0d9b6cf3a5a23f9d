//! Files handed to a process as inherited descriptors and named
//! `/proc/self/fd/N` (partd opens kernels, initrds and disk images with
//! its caller's rights and passes the descriptors on).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::FromRawFd;
use std::path::Path;

/// The descriptor number `path` names, if it is `/proc/self/fd/N`.
pub fn descriptor_of(path: &Path) -> Option<i32> {
    path.to_str()?
        .strip_prefix("/proc/self/fd/")?
        .parse::<i32>()
        .ok()
        .filter(|fd| *fd >= 0)
}

/// Opens `path` for reading (and writing if `write`). A `/proc/self/fd/N`
/// path is the inherited descriptor N itself, duplicated and rewound, not
/// reopened: reopening through `/proc` checks the file's permissions
/// against this process's uid (a jailed uid of its own), while the rights
/// that count are those of whoever opened it. A descriptor opened without
/// the access asked for is refused.
pub fn open(path: &Path, write: bool) -> io::Result<File> {
    let Some(fd) = descriptor_of(path) else {
        return std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path);
    };
    // SAFETY: F_GETFL takes no pointer; a closed descriptor answers -1.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let mode = flags & libc::O_ACCMODE;
    let ok = if write {
        mode == libc::O_RDWR
    } else {
        mode == libc::O_RDONLY || mode == libc::O_RDWR
    };
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "descriptor {fd} was not opened for {}",
                if write {
                    "reading and writing"
                } else {
                    "reading"
                }
            ),
        ));
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1) that this
    // function owns.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor owned by nothing else.
    let mut file = unsafe { File::from_raw_fd(dup) };
    // The duplicate shares the file offset: start from the beginning.
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn an_inherited_descriptor_is_used_as_opened_and_rewound_and_its_mode_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "contents").unwrap();
        let ro = std::fs::File::open(&p).unwrap();
        let named = std::path::PathBuf::from(format!("/proc/self/fd/{}", ro.as_raw_fd()));
        assert_eq!(descriptor_of(&named), Some(ro.as_raw_fd()));
        for _ in 0..2 {
            let mut s = String::new();
            open(&named, false).unwrap().read_to_string(&mut s).unwrap();
            assert_eq!(s, "contents");
        }
        let e = open(&named, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let named = std::path::PathBuf::from(format!("/proc/self/fd/{}", rw.as_raw_fd()));
        open(&named, true).unwrap().write_all(b"C").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "Contents");
        assert_eq!(descriptor_of(Path::new("/proc/self/fd/x")), None);
        assert_eq!(descriptor_of(&p), None);
    }
}
