//! Entering a prepared jail: what the child runs between fork and exec
//! ([`Prepared::enter`]), every step a raw system call on strings built
//! before the fork (see the crate documentation for why).

use std::ffi::{CStr, CString};
use std::io;

use crate::{Limits, Step};

/// A jail ready to be entered by a child.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) root: CString,
    pub(crate) proc_dir: CString,
    pub(crate) steps: Vec<Step>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) limits: Limits,
}

/// Writes `jail: <what>: errno N` to stderr (the child's log) and returns
/// the error. Async-signal-safe: `write(2)` of prepared bytes and a number
/// formatted on the stack.
fn fail(what: &CStr) -> io::Error {
    let err = io::Error::last_os_error();
    let code = err.raw_os_error().unwrap_or(0);
    let mut num = [0u8; 12];
    let mut n = code.unsigned_abs();
    let mut i = num.len();
    loop {
        i -= 1;
        num[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    for part in [
        b"partvisor-jail: ".as_slice(),
        what.to_bytes(),
        b": errno ".as_slice(),
        &num[i..],
        b"\n".as_slice(),
    ] {
        // SAFETY: write(2) of a valid buffer of the given length.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    err
}

/// Calls `f`; a negative result is a failure of step `what`.
fn check(what: &CStr, r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(fail(what))
    } else {
        Ok(())
    }
}

/// `mount(2)` as step `what`; `None` for an absent source, type or data.
fn mount(
    what: &CStr,
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: mount reads NUL-terminated strings that outlive the call (or
    // null where absent) and retains none of them.
    let r = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    check(what, libc::c_long::from(r))
}

impl Prepared {
    /// Confines the calling process (see the crate's documentation).
    ///
    /// # Safety
    /// Only for a child between fork and exec (a `pre_exec` closure): it
    /// changes the namespaces, root and credentials of the whole process,
    /// which must have one thread, and calls only async-signal-safe
    /// functions.
    pub unsafe fn enter(&self) -> io::Result<()> {
        // SAFETY: every libc call below takes integers or pointers to
        // NUL-terminated strings and structures that live in `self` or on
        // this stack for the whole call; none retains them.
        unsafe {
            check(
                c"unshare mount, ipc, net, uts namespaces",
                libc::c_long::from(libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWUTS,
                )),
            )?;
            mount(
                c"make / private",
                None,
                c"/",
                None,
                libc::MS_REC | libc::MS_PRIVATE,
                None,
            )?;
            mount(
                c"mount the jail's tmpfs root",
                Some(c"partvisor-jail"),
                &self.root,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"mode=0755,size=1m,nr_inodes=4096"),
            )?;
            // The root's directories must be searchable by the jailed uid
            // whatever umask partd runs under (systemd's UMask=0027 would
            // make them 0750, root's): the inherited umask comes back once
            // the root is built.
            let inherited_umask = libc::umask(0o022);
            for step in &self.steps {
                self.build(step)?;
            }
            libc::umask(inherited_umask);
            mount(
                c"mount /proc",
                Some(c"proc"),
                &self.proc_dir,
                Some(c"proc"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"subset=pid,hidepid=invisible"),
            )?;
            check(
                c"chdir to the jail's root",
                libc::c_long::from(libc::chdir(self.root.as_ptr())),
            )?;
            // pivot_root(".", "."): the old root ends up stacked on the new
            // one, and is detached next.
            check(
                c"pivot_root",
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            )?;
            check(
                c"detach the old root",
                libc::c_long::from(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)),
            )?;
            check(c"chdir /", libc::c_long::from(libc::chdir(c"/".as_ptr())))?;
            mount(
                c"remount / read-only",
                None,
                c"/",
                None,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                None,
            )?;
            self.limit()?;
            self.drop_privileges()
        }
    }

    /// One step of building the root.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn build(&self, step: &Step) -> io::Result<()> {
        // SAFETY: as in `enter`.
        unsafe {
            match step {
                Step::Dir(at) => {
                    if libc::mkdir(at.as_ptr(), 0o755) < 0
                        && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                    {
                        return Err(fail(at));
                    }
                    Ok(())
                }
                Step::File(at) => {
                    let fd = libc::open(
                        at.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o444,
                    );
                    check(at, libc::c_long::from(fd))?;
                    libc::close(fd);
                    Ok(())
                }
                Step::Tmpfs(at) => mount(
                    at,
                    Some(c"partvisor-tmp"),
                    at,
                    Some(c"tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    Some(c"mode=1777,size=1m,nr_inodes=1024"),
                ),
                Step::Link { target, at, what } => check(
                    what,
                    libc::c_long::from(libc::symlink(target.as_ptr(), at.as_ptr())),
                ),
                Step::Bind {
                    src,
                    dst,
                    writable,
                    what,
                } => {
                    mount(
                        what,
                        Some(src),
                        dst,
                        None,
                        libc::MS_BIND | libc::MS_REC,
                        None,
                    )?;
                    let mut flags =
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
                    if !writable {
                        flags |= libc::MS_RDONLY;
                    }
                    mount(what, None, dst, None, flags, None)
                }
            }
        }
    }

    /// rlimits, and `SIGXFSZ` ignored.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn limit(&self) -> io::Result<()> {
        let set = |what: &CStr, res, n: u64| {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit reads the structure on this stack.
            check(
                what,
                libc::c_long::from(unsafe { libc::setrlimit(res, &lim) }),
            )
        };
        set(
            c"limit open files",
            libc::RLIMIT_NOFILE,
            self.limits.open_files,
        )?;
        set(
            c"limit file size",
            libc::RLIMIT_FSIZE,
            self.limits.file_size,
        )?;
        set(c"forbid core dumps", libc::RLIMIT_CORE, 0)?;
        // SAFETY: a zeroed sigaction with SIG_IGN is a valid disposition.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_IGN;
            check(
                c"ignore SIGXFSZ",
                libc::c_long::from(libc::sigaction(libc::SIGXFSZ, &act, std::ptr::null_mut())),
            )
        }
    }

    /// Bounding set, groups, gid, uid, `NO_NEW_PRIVS`.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn drop_privileges(&self) -> io::Result<()> {
        // SAFETY: as in `enter`.
        unsafe {
            // Every capability out of the bounding set, up to the first the
            // kernel does not know.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                    if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(fail(c"drop the capability bounding set"));
                }
            }
            check(
                c"clear the ambient capabilities",
                libc::c_long::from(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )),
            )?;
            // Raw system calls: the child has one thread, so glibc's
            // all-threads credential broadcast is not needed.
            check(
                c"drop supplementary groups",
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            )?;
            let (u, g) = (self.uid, self.gid);
            check(c"setresgid", libc::syscall(libc::SYS_setresgid, g, g, g))?;
            check(c"setresuid", libc::syscall(libc::SYS_setresuid, u, u, u))?;
            if libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0 {
                *libc::__errno_location() = libc::EPERM;
                return Err(fail(c"uid 0 could be regained"));
            }
            check(
                c"set NO_NEW_PRIVS",
                libc::c_long::from(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
            )
        }
    }
}
