//! How partd confines what it starts: for each kind of child (a monitor,
//! a partition's disk backend, a net switch, the vsock relay) which uid it
//! runs as, which paths it sees and which limits it has (`partvisor-jail`
//! does the confining), and the ownership of the directories and sockets
//! those children share.
//!
//! uids: a partition is granted two uids of the resource map's range at
//! create (its monitor's and its disk backend's, in that order); the
//! host's shared I/O partitions (switches, the relay), which serve many
//! partitions, run as the map's `io_uid`. Each uid's gid is the same
//! number. A vhost-user socket a backend made is handed to the monitor
//! that may use it (owner its uid, mode 0600) and the backend accepts
//! only that uid (`frontend-uid=`).
//!
//! Without jailing (`partd --jail off`, for running partd unprivileged)
//! every child runs as partd's own uid, unconfined.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use partvisor_jail::{Jail, JailError, Limits, Prepared};

/// Room above a child's largest file for its log (bytes).
const LOG_ROOM: u64 = 256 << 20;

/// Jailing settings (`None` in `Settings` when jailing is off).
#[derive(Clone, Debug)]
pub struct Jailing {
    /// The empty directory every child's root is mounted on.
    pub root: PathBuf,
    /// The uid of the host's shared I/O partitions.
    pub io_uid: u32,
}

/// Which uid each process of one partition runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identities {
    pub monitor: u32,
    pub disks: u32,
}

impl Jailing {
    /// Makes the (empty, root-owned) jail root under `state_dir`.
    pub fn new(state_dir: &Path, io_uid: u32) -> io::Result<Jailing> {
        let root = state_dir.join("jail");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        Ok(Jailing { root, io_uid })
    }

    /// What every child gets: `uid` (and the gid of that number), the
    /// system libraries and its program `bin`, `open_files` descriptors,
    /// files up to `largest_file` bytes plus room for its log.
    fn base(&self, uid: u32, bin: &Path, open_files: u64, largest_file: u64) -> Jail {
        Jail::new(
            &self.root,
            uid,
            uid,
            Limits {
                open_files,
                file_size: largest_file.saturating_add(LOG_ROOM),
            },
        )
        .system_libraries()
        .read_only(bin)
    }

    /// A monitor: its program, its run directory (writable), the
    /// directories of the sockets it connects to (read-only); its memfds
    /// may be as large as its guest's memory.
    pub fn monitor(
        &self,
        uid: u32,
        bin: &Path,
        run_dir: &Path,
        sockets: &[PathBuf],
        memory_mib: u64,
    ) -> Result<Prepared, JailError> {
        let mut jail = self
            .base(uid, bin, 1024, memory_mib << 20)
            .writable(run_dir);
        for dir in sockets {
            jail = jail.read_only(dir);
        }
        jail.prepare()
    }

    /// A part-io process: its program and the directories it writes its
    /// sockets in; it may write files up to `largest_file` bytes (a disk
    /// image it serves).
    pub fn io(
        &self,
        uid: u32,
        bin: &Path,
        writable: &[PathBuf],
        open_files: u64,
        largest_file: u64,
    ) -> Result<Prepared, JailError> {
        let mut jail = self
            .base(uid, bin, open_files, largest_file)
            // The vhost-user daemon's private socket to part-io's guard.
            .private_tmp();
        for dir in writable {
            jail = jail.writable(dir);
        }
        jail.prepare()
    }
}

/// Creates `dir` if needed and gives it to `uid`:`gid` with `mode`.
pub fn own_dir(dir: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Hands a socket a backend made to `uid`:`gid` with `mode` (the monitor
/// that may connect, 0600). A symbolic link there is refused, never
/// followed.
pub fn give_socket(path: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// An absolute path of `bin` that a jail can bind: as given if it has a
/// slash, else the first match on PATH; symbolic links resolved.
pub fn resolve_bin(bin: &Path) -> io::Result<PathBuf> {
    let found = if bin.components().count() > 1 || bin.is_absolute() {
        bin.to_owned()
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is not on PATH", bin.display()),
                )
            })?
    };
    std::fs::canonicalize(found)
}

/// How one child is confined: its jail (`None`: jailing is off) and the
/// mode of its seccomp filters (`None`: the child is not one of ours and
/// takes no `--seccomp`, as in tests).
#[derive(Debug, Default)]
pub struct Confinement {
    pub jail: Option<Prepared>,
    pub seccomp: Option<partvisor_seccomp::Mode>,
}

/// Spawns `cmd` with `--seccomp MODE`, confined by the jail if any: the
/// child enters it between fork and exec and is the init of a new pid
/// namespace (see `partvisor_jail::in_new_pid_namespace`; the tokio
/// runtime is entered on the spawning thread, its process driver reaps
/// the child).
pub fn spawn(
    cmd: &mut tokio::process::Command,
    confinement: Confinement,
) -> Result<io::Result<tokio::process::Child>, JailError> {
    if let Some(mode) = confinement.seccomp {
        cmd.arg("--seccomp").arg(mode.as_str());
    }
    let Some(jail) = confinement.jail else {
        return Ok(cmd.spawn());
    };
    // SAFETY: `enter` is made for the child between fork and exec.
    unsafe { cmd.pre_exec(move || jail.enter()) };
    let handle = tokio::runtime::Handle::current();
    partvisor_jail::in_new_pid_namespace(move || {
        let _entered = handle.enter();
        cmd.spawn()
    })
}
