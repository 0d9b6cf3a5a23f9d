//! One part-vmm process: spawning it with its sealed descriptor, finding it
//! again after a partd restart (pid + start time), talking to its control
//! socket and waiting for its end.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use channels::SealedMemfd;
use partvisor_api::control::{Reply, Request};
use partvisor_api::descriptor::VmConfig;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The descriptor's fd number in part-vmm.
const DESCRIPTOR_FD: i32 = 3;
/// Where part-vmm finds its kernel (opened by partd).
const KERNEL_FD: i32 = 4;
/// Where part-vmm finds its initrd, if it has one.
const INITRD_FD: i32 = 5;
/// Where part-vmm finds /dev/kvm (opened by partd).
const KVM_FD: i32 = 6;

/// Errors of this layer.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot build the descriptor memfd: {0}")]
    Memfd(#[source] channels::ChannelError),
    #[error("cannot encode the partition descriptor: {0}")]
    DescriptorJson(#[source] serde_json::Error),
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {vmm}: {source} (give the monitor's path with partd --vmm PATH)")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
    #[error("cannot confine the monitor: {0}")]
    Jail(#[source] partvisor_jail::JailError),
}

/// Files of one partition in the state dir.
#[derive(Clone, Debug)]
pub struct PartitionFiles {
    pub dir: PathBuf,
}

impl PartitionFiles {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        PartitionFiles {
            dir: state_dir.join("partitions").join(name),
        }
    }
    /// What the monitor writes: its sockets and its exit record (owned
    /// by its uid; the only place it may write).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// Where the disk backend listens (owned by its uid).
    pub fn disks_dir(&self) -> PathBuf {
        self.dir.join("disks")
    }
    pub fn disk_socket(&self, index: usize) -> PathBuf {
        self.disks_dir().join(format!("disk{index}.sock"))
    }
    pub fn control(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.run_dir().join("console.sock")
    }
    pub fn exit_file(&self) -> PathBuf {
        self.run_dir().join("exit.json")
    }
    pub fn vmm_record(&self) -> PathBuf {
        self.dir.join("vmm.json")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// Removes what a previous run left (sockets, records), keeping the log.
    pub fn clear_run_files(&self) -> Result<(), ProcessError> {
        std::fs::create_dir_all(self.run_dir()).map_err(|source| ProcessError::Io {
            path: self.run_dir(),
            source,
        })?;
        for p in [
            self.control(),
            self.console(),
            self.exit_file(),
            self.vmm_record(),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ProcessError::Io { path: p, source }),
            }
        }
        Ok(())
    }
}

/// What partd records about a VMM it started, so that a restarted partd can
/// tell the same process from a later one with a reused pid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot).
    pub start_time: u64,
}

/// Writes `value` as JSON to `path` atomically (temporary file + rename),
/// so a reader sees all of it or nothing. Not fsynced: these files matter
/// only across a partd crash, which keeps the page cache; after a host
/// crash every monitor they describe is gone anyway.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, value)?;
        f.write_all(b"\n")?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a JSON file, `None` if absent or unparsable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Start time of a live (not zombie) process, from `/proc/<pid>/stat`.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its last ')' start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 22 is the 20th after the state (field 3).
    fields.nth(18)?.parse().ok()
}

/// A running part-vmm and how its end is observed.
pub enum VmmProcess {
    /// Started by this partd: its exit status is known.
    Child(tokio::process::Child),
    /// Started by an earlier partd: watched through a pidfd.
    Adopted(AsyncFd<OwnedFd>),
    /// Started by an earlier partd on a kernel without pidfds: watched by
    /// polling its pid and start time.
    Polled(VmmRecord),
}

/// How a VMM process ended, as far as partd saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Exit status of a child.
    Exited(i32),
    /// A child killed by a signal.
    Signaled(i32),
    /// An adopted process ended (its status went to its new parent).
    Unknown,
}

impl VmmProcess {
    /// Waits until the process has ended.
    pub async fn wait(&mut self) -> Ended {
        match self {
            VmmProcess::Child(c) => match c.wait().await {
                Ok(st) => match (st.code(), st.signal()) {
                    (Some(code), _) => Ended::Exited(code),
                    (None, Some(sig)) => Ended::Signaled(sig),
                    _ => Ended::Unknown,
                },
                Err(_) => Ended::Unknown,
            },
            VmmProcess::Polled(record) => {
                while start_time(record.pid) == Some(record.start_time) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ended::Unknown
            }
            VmmProcess::Adopted(fd) => {
                // A pidfd becomes readable when its process ends.
                loop {
                    match fd.readable().await {
                        Ok(mut guard) => {
                            guard.retain_ready();
                            return Ended::Unknown;
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
    }
}

/// Opens a pidfd for `pid` and checks it is still the process that started
/// at `start_time`.
pub fn adopt(record: &VmmRecord) -> Option<VmmProcess> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, record.pid as libc::pid_t, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return None;
    };
    if fd < 0 {
        // No pidfd (gone, Linux < 5.3, out of descriptors): a process that is
        // still alive is adopted all the same, watched by polling.
        return (start_time(record.pid) == Some(record.start_time))
            .then(|| VmmProcess::Polled(record.clone()));
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Checked after opening: the pidfd now pins this very process.
    if start_time(record.pid) != Some(record.start_time) {
        return None;
    }
    // SAFETY: `owned` is an open pidfd moved into the AsyncFd, which owns it
    // (and so keeps it open and unchanged) until the AsyncFd is dropped.
    match unsafe { AsyncFd::register(owned) } {
        Ok(fd) => Some(VmmProcess::Adopted(fd)),
        // Alive but not watchable through the reactor: poll it instead;
        // never treat a live monitor as gone.
        Err(_) => Some(VmmProcess::Polled(record.clone())),
    }
}

/// Writes `cfg` into a memfd sealed against writes, growing and shrinking.
fn sealed_descriptor(name: &str, cfg: &VmConfig) -> Result<SealedMemfd, ProcessError> {
    let json = serde_json::to_vec(cfg).map_err(ProcessError::DescriptorJson)?;
    SealedMemfd::with_contents(&format!("partvisor-descriptor-{name}"), &json)
        .map_err(ProcessError::Memfd)
}

/// Starts part-vmm for partition `name` in its own session (so it outlives
/// partd), with the descriptor on fd 3, the kernel on fd 4 and the initrd
/// on fd 5 (the files partd opened, with the caller's rights: `cfg` is
/// made to name them as `/proc/self/fd/N`), /dev/kvm on fd 6, its control
/// socket, console socket and exit file in `files.run_dir()`, and stderr
/// appended to `vmm.log`; confined as `confinement` says (jailed, as the
/// init of a pid namespace of its own, and `--seccomp`).
pub fn spawn(
    vmm: &Path,
    name: &str,
    cfg: &mut VmConfig,
    files: &PartitionFiles,
    boot: &crate::coordinator::BootFiles,
    confinement: crate::jail::Confinement,
) -> Result<(VmmProcess, VmmRecord), ProcessError> {
    cfg.kernel = format!("/proc/self/fd/{KERNEL_FD}").into();
    if boot.initrd.is_some() {
        cfg.initrd = Some(format!("/proc/self/fd/{INITRD_FD}").into());
    }
    let mfd = sealed_descriptor(name, cfg)?;
    let log_path = files.vmm_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| ProcessError::Io {
            path: log_path,
            source,
        })?;
    // Every descriptor the child gets, with the number it gets it on.
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|source| ProcessError::Io {
            path: "/dev/kvm".into(),
            source,
        })?;
    let mut inherit = vec![
        (mfd.fd().as_raw_fd(), DESCRIPTOR_FD),
        (boot.kernel.as_raw_fd(), KERNEL_FD),
        (kvm.as_raw_fd(), KVM_FD),
    ];
    if let Some(i) = &boot.initrd {
        inherit.push((i.as_raw_fd(), INITRD_FD));
    }
    let mut cmd = tokio::process::Command::new(vmm);
    cmd.arg("--config")
        .arg(format!("/proc/self/fd/{DESCRIPTOR_FD}"))
        .arg("--control-socket")
        .arg(files.control())
        .arg("--exit-file")
        .arg(files.exit_file())
        .arg("--kvm-fd")
        .arg(KVM_FD.to_string())
        .arg("--memory-reserved")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    inherit_fds(&mut cmd, inherit).map_err(|source| ProcessError::Spawn {
        vmm: vmm.to_owned(),
        source,
    })?;
    let child = crate::jail::spawn(&mut cmd, confinement)
        .map_err(ProcessError::Jail)?
        .map_err(|source| ProcessError::Spawn {
            vmm: vmm.to_owned(),
            source,
        })?;
    drop((mfd, kvm));
    let pid = child.id().unwrap_or(0);
    let record = VmmRecord {
        pid,
        start_time: start_time(pid).unwrap_or(0),
    };
    Ok((VmmProcess::Child(child), record))
}

/// Most descriptors a child inherits (a descriptor, a kernel, an initrd,
/// or the disks of one partition).
pub const MAX_INHERITED: usize = 16;

/// Keeps descriptors 3 up to `3 + MAX_INHERITED` taken (by `/dev/null`,
/// close-on-exec) for partd's life, so that no descriptor partd opens later
/// gets one of the numbers children inherit on. Otherwise the pipe through
/// which the standard library reports a failed exec could sit on a target
/// that `inherit_fds` overwrites: the failure would go unseen, and the
/// child's error report would be written into the file on that target (a
/// disk image). Call it first, before any thread or descriptor exists.
pub fn reserve_low_fds() -> std::io::Result<()> {
    let limit = 3 + MAX_INHERITED as i32;
    loop {
        // SAFETY: open with a NUL-terminated path; a new descriptor or -1.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if fd >= limit {
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
            return Ok(());
        }
        // Below the limit: kept open on purpose, never closed.
    }
}

/// Makes the child of `cmd` get each `(source, target)` descriptor on
/// `target` (without FD_CLOEXEC); at most [`MAX_INHERITED`] (a partition has
/// at most `MAX_DEVICES` devices), more is an error.
///
/// Every source is first copied to a fresh descriptor above the targets
/// (F_DUPFD takes the lowest free one from 64 up, so nothing is
/// clobbered), then onto its target: a source that happens to sit on
/// another's target number is safe. The sources must stay open until the
/// spawn.
pub fn inherit_fds(
    cmd: &mut tokio::process::Command,
    fds: Vec<(RawFd, RawFd)>,
) -> std::io::Result<()> {
    if fds.len() > MAX_INHERITED
        || fds
            .iter()
            .any(|&(_, t)| t < 3 || t >= 3 + MAX_INHERITED as i32)
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("at most {MAX_INHERITED} inherited descriptors, on 3.., may be passed"),
        ));
    }
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (fcntl, dup2, close) on descriptors
    // that exist in the child; it allocates nothing (`fds` was built before
    // the fork and is only read; `parked` is an array).
    unsafe {
        cmd.pre_exec(move || {
            let mut parked = [-1i32; MAX_INHERITED];
            for (slot, (src, _)) in parked.iter_mut().zip(fds.iter()) {
                *slot = libc::fcntl(*src, libc::F_DUPFD, 64);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (fd, (_, target)) in parked.iter().zip(fds.iter()) {
                if libc::dup2(*fd, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*fd);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Sends one control request and reads its reply, within `timeout`.
pub async fn control(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ProcessError> {
    let fail = |reason: String| ProcessError::Control {
        path: path.to_owned(),
        reason,
    };
    let exchange = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_string(req).map_err(|e| fail(e.to_string()))?;
        line.push('\n');
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| fail(format!("cannot send: {e}")))?;
        let mut reply = String::new();
        BufReader::new(r)
            .read_line(&mut reply)
            .await
            .map_err(|e| fail(format!("cannot read the reply: {e}")))?;
        serde_json::from_str::<Reply>(&reply).map_err(|e| fail(format!("bad reply: {e}")))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!("no reply within {} ms", timeout.as_millis()))),
    }
}

/// Sends `signal` to `record`'s process if it is still that process.
pub fn signal(record: &VmmRecord, signal: nix::sys::signal::Signal) -> bool {
    if start_time(record.pid) != Some(record.start_time) {
        return false;
    }
    let Ok(pid) = i32::try_from(record.pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process_is_stable_and_dead_pids_have_none() {
        let me = std::process::id();
        let a = start_time(me).unwrap();
        assert!(a > 0);
        assert_eq!(start_time(me), Some(a));
        // pid_max is at most 2^22; this pid never exists.
        assert_eq!(start_time(u32::MAX - 1), None);
    }

    #[tokio::test]
    async fn adopted_process_end_is_seen_by_pidfd_and_by_polling() {
        for polled in [false, true] {
            let mut child = std::process::Command::new("sleep")
                .arg("0.2")
                .spawn()
                .unwrap();
            let pid = child.id();
            let record = VmmRecord {
                pid,
                start_time: start_time(pid).unwrap(),
            };
            let mut p = if polled {
                VmmProcess::Polled(record.clone())
            } else {
                adopt(&record).unwrap()
            };
            // Reap it elsewhere, as init would for an adopted monitor.
            let reaper = std::thread::spawn(move || child.wait().unwrap());
            let t0 = std::time::Instant::now();
            assert_eq!(p.wait().await, Ended::Unknown);
            assert!(t0.elapsed() >= Duration::from_millis(150), "ended early");
            reaper.join().unwrap();
            // A record whose start time does not match is never adopted.
            let stale = VmmRecord {
                pid: std::process::id(),
                start_time: 1,
            };
            assert!(adopt(&stale).is_none());
        }
    }

    #[test]
    fn sealed_descriptor_refuses_writes_and_reads_back() {
        let cfg = VmConfig::from_json(r#"{"kernel": "/k", "memory_mib": 8}"#).unwrap();
        let mfd = sealed_descriptor("t", &cfg).unwrap();
        let seals = mfd.seals().unwrap();
        assert_ne!(seals & libc::F_SEAL_WRITE, 0);
        assert_ne!(seals & libc::F_SEAL_SEAL, 0);
        let path = format!("/proc/self/fd/{}", mfd.fd().as_raw_fd());
        let back = VmConfig::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"x"))
            .is_err());
    }
}
