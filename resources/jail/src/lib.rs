//! # partvisor-jail: the confinement of every process partd starts
//!
//! Seed 001's monitor "confines the guest to exactly what it was granted";
//! this crate confines the host processes that serve a guest (part-vmm,
//! part-io) to exactly what partd grants them. A [`Jail`] describes one
//! child: the paths it may see (each at the same path inside as outside,
//! read-only unless said otherwise), its uid and gid, and its limits.
//! [`Jail::prepare`] turns it into [`Prepared`] steps, and
//! [`Prepared::enter`], run in the child between fork and exec, applies
//! them:
//!
//! 1. new mount, IPC, network and UTS namespaces (the pid namespace is the
//!    parent's doing: [`in_new_pid_namespace`] forks the child as the init
//!    of a new one, so that `/proc/PID/ns/pid` differs too);
//! 2. a fresh tmpfs as the new root holding only the granted paths (bind
//!    mounts, `nosuid`, `nodev`, read-only unless writable) and a `/proc`
//!    that shows only the child's own pid namespace (`subset=pid`,
//!    `hidepid=invisible`); `pivot_root` into it, the old root detached,
//!    the new root remounted read-only;
//! 3. rlimits: open files, file size (`SIGXFSZ` ignored, so a write past
//!    the limit fails instead of killing the process), no core dumps;
//! 4. the capability bounding set emptied, no supplementary groups, the
//!    given gid and uid (real, effective and saved: every capability is
//!    gone), a check that uid 0 cannot be regained, and `NO_NEW_PRIVS`.
//!
//! Seccomp filters are not installed here: they are per thread role and
//! the process installs them itself (`partvisor-seccomp`), once it has
//! opened what it needs and before it runs guest-reachable code.
//!
//! Written on `libc` rather than a sandboxing crate because the steps run
//! between fork and exec, where only async-signal-safe calls are allowed:
//! every string is a C string built before the fork and nothing allocates,
//! which rules out wrappers that build paths or errors on the way
//! (Firecracker's jailer makes the same calls for the same reason).
//!
//! Must never: allocate, lock or log through anything but `write(2)` in
//! [`Prepared::enter`]; leave the child a capability, a namespace of the
//! parent's (but the user namespace: the uid is what confines it), a
//! writable path it was not given, or a way back to uid 0.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Errors preparing a jail (in the parent; the child's own failures are
/// the errno of the step that failed, described on its stderr).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail path {path} must be absolute and plain (no `.`, `..` or NUL)")]
    Path { path: PathBuf },
    #[error("cannot read {path} for the jail: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("jail root {path} must be an existing directory: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("cannot create a pid namespace: {0} (partd needs CAP_SYS_ADMIN to jail its children; run it as root or with --jail off)")]
    PidNamespace(#[source] io::Error),
    #[error("the thread that starts the jailed process panicked")]
    SpawnerPanicked,
    #[error("uid and gid of a jailed process must not be 0")]
    Root0,
}

/// A path the child may see, at the same place as on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// Resource limits of the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most open descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Largest file it may write (`RLIMIT_FSIZE`, bytes): its logs, and
    /// memfds it sizes (guest memory), so at least the guest's memory.
    pub file_size: u64,
}

/// What one child may see and be.
#[derive(Clone, Debug)]
pub struct Jail {
    /// An empty directory on the host on which the child's root (a tmpfs
    /// in the child's own mount namespace) is mounted; the host keeps
    /// seeing it empty, so every jail can share one.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub binds: Vec<Bind>,
    pub limits: Limits,
    /// A private, empty, writable `/tmp` (a small tmpfs of its own).
    pub tmp: bool,
}

impl Jail {
    /// A jail with nothing in it yet.
    pub fn new(root: impl Into<PathBuf>, uid: u32, gid: u32, limits: Limits) -> Jail {
        Jail {
            root: root.into(),
            uid,
            gid,
            binds: Vec::new(),
            limits,
            tmp: false,
        }
    }

    /// Gives the child a private `/tmp` (1 MiB), for the sockets it makes
    /// for itself.
    pub fn private_tmp(mut self) -> Jail {
        self.tmp = true;
        self
    }

    /// Lets the child read `path` (a file or a directory tree).
    pub fn read_only(mut self, path: impl Into<PathBuf>) -> Jail {
        self.binds.push(Bind {
            path: path.into(),
            writable: false,
        });
        self
    }

    /// Lets the child write under `path`, as far as its uid may.
    pub fn writable(mut self, path: impl Into<PathBuf>) -> Jail {
        self.binds.push(Bind {
            path: path.into(),
            writable: true,
        });
        self
    }

    /// Lets the child run a dynamically linked program: `/usr` and the
    /// top-level library and program directories (as symbolic links where
    /// the host has links, merged `/usr`), read-only.
    pub fn system_libraries(mut self) -> Jail {
        self.binds.push(Bind {
            path: "/usr".into(),
            writable: false,
        });
        for top in ["/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"] {
            if Path::new(top).symlink_metadata().is_ok() {
                self.binds.push(Bind {
                    path: top.into(),
                    writable: false,
                });
            }
        }
        self
    }

    /// Builds every string and step the child needs, so that
    /// [`Prepared::enter`] allocates nothing.
    pub fn prepare(&self) -> Result<Prepared, JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Root0);
        }
        let root_meta = std::fs::metadata(&self.root).map_err(|source| JailError::Root {
            path: self.root.clone(),
            source,
        })?;
        if !root_meta.is_dir() {
            return Err(JailError::Root {
                path: self.root.clone(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        let root = plain(&self.root)?;
        let inside = |p: &Path| -> Result<CString, JailError> {
            let rel = p.strip_prefix("/").unwrap_or(p);
            cstr(&root.join(rel))
        };
        let mut steps = Vec::new();
        // The private /tmp first: binds of paths under /tmp then sit on it.
        if self.tmp {
            let tmp = inside(Path::new("/tmp"))?;
            steps.push(Step::Dir(tmp.clone()));
            steps.push(Step::Tmpfs(tmp));
        }
        let mut made: Vec<PathBuf> = Vec::new();
        let mut bound: Vec<&Bind> = Vec::new();
        for b in &self.binds {
            let path = plain(&b.path)?;
            // Already visible with at least these rights through an
            // earlier bind: nothing to add.
            if bound
                .iter()
                .any(|e| path.starts_with(&e.path) && (e.writable || !b.writable))
            {
                continue;
            }
            let under_bind = bound.iter().any(|e| path.starts_with(&e.path));
            let meta = path
                .symlink_metadata()
                .map_err(|source| JailError::Inspect {
                    path: path.clone(),
                    source,
                })?;
            if !under_bind {
                // Parents inside the new root, outermost first.
                let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
                parents.reverse();
                for d in parents {
                    if d != Path::new("/") && !made.iter().any(|m| m == d) {
                        made.push(d.to_owned());
                        steps.push(Step::Dir(inside(d)?));
                    }
                }
            }
            let at = inside(&path)?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(|source| JailError::Inspect {
                    path: path.clone(),
                    source,
                })?;
                steps.push(Step::Link {
                    target: cstr(&target)?,
                    at,
                    what: describe("symlink", &path),
                });
                continue;
            }
            if !under_bind {
                steps.push(if meta.is_dir() {
                    made.push(path.clone());
                    Step::Dir(at.clone())
                } else {
                    Step::File(at.clone())
                });
            }
            steps.push(Step::Bind {
                src: cstr(&path)?,
                dst: at,
                writable: b.writable,
                what: describe(if b.writable { "bind rw" } else { "bind ro" }, &path),
            });
            bound.push(b);
        }
        let proc_dir = inside(Path::new("/proc"))?;
        steps.push(Step::Dir(proc_dir.clone()));
        Ok(Prepared {
            root: cstr(&root)?,
            proc_dir,
            steps,
            uid: self.uid,
            gid: self.gid,
            limits: self.limits,
        })
    }
}

fn plain(p: &Path) -> Result<PathBuf, JailError> {
    let ok = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.as_os_str().as_bytes().contains(&0);
    if ok {
        Ok(p.components().collect())
    } else {
        Err(JailError::Path { path: p.to_owned() })
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Path { path: p.to_owned() })
}

fn describe(what: &str, p: &Path) -> CString {
    // A path with a NUL never gets here (`plain` refused it).
    CString::new(format!("{what} {}", p.display())).unwrap_or_default()
}

/// One thing the child does to build its root.
#[derive(Debug)]
enum Step {
    /// A directory (a mount point or a parent of one) in the new root.
    Dir(CString),
    /// An empty file: the mount point of a file bind.
    File(CString),
    /// A private writable tmpfs.
    Tmpfs(CString),
    /// A symbolic link as the host has it.
    Link {
        target: CString,
        at: CString,
        what: CString,
    },
    /// A bind mount of the same path.
    Bind {
        src: CString,
        dst: CString,
        writable: bool,
        what: CString,
    },
}

/// A jail ready to be entered by a child.
#[derive(Debug)]
pub struct Prepared {
    root: CString,
    proc_dir: CString,
    steps: Vec<Step>,
    uid: u32,
    gid: u32,
    limits: Limits,
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

/// Runs `spawn` on a fresh thread that first moves its future children into
/// a new pid namespace: the process `spawn` forks is that namespace's init
/// (pid 1), so that it sees no other process and none of its own children
/// outlive it. The caller's threads are untouched.
///
/// The child is init of its namespace: signals from outside reach it only
/// if it handles them (or blocks them, for a signalfd), except SIGKILL.
pub fn in_new_pid_namespace<T: Send>(spawn: impl FnOnce() -> T + Send) -> Result<T, JailError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare takes a flag; CLONE_NEWPID changes only the
            // namespace of this thread's future children.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                return Err(JailError::PidNamespace(io::Error::last_os_error()));
            }
            Ok(spawn())
        })
        .join()
        .map_err(|_| JailError::SpawnerPanicked)?
    })
}

#[cfg(test)]
mod tests;
