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

mod enter;

pub use enter::Prepared;

use std::ffi::CString;
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
pub(crate) enum Step {
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
