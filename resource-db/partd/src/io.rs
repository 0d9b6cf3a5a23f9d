//! I/O partitions: the `part-io` processes partd starts before a guest
//! (seed 001's boot order) and waits for after it (a guest's memory is
//! released only once no backend maps it).
//!
//! - Disks: one `part-io blk` per partition, one export per `[[disk]]`,
//!   sockets `partitions/<name>/disk<i>.sock`, pid in `blk.json`, log in
//!   `blk.log`. Unmapped = that process has exited: partd stops it (SIGTERM)
//!   once the monitor is gone and waits for its end.
//! - NICs: one `part-io net` per switch, `switches/<switch>/`, with a port
//!   for every NIC of every defined partition on that switch (their MACs are
//!   granted at create), pid and ports in `net.json`, log in `net.log`,
//!   counters on `stats.sock`. Unmapped = the stats socket shows the port
//!   `connected: false` (part-io unmaps a guest's memory before it marks
//!   the port disconnected).
//!
//! - Guest sockets: one `part-io vsock` per host, `vsock/`, pid in
//!   `vsock.json`, log in `vsock.log`, control socket `control.sock`. partd
//!   adds a partition (its directory entry and vhost-user socket
//!   `vsock/<name>.sock`) before its monitor starts and removes it after;
//!   the hybrid host socket is `partitions/<name>/vsock.sock`. Unmapped =
//!   a `remove` answers `connected: false` (or the relay is gone).
//!
//! Ready = the process logged one `serving` line per socket (part-io logs it
//! after the socket listens).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::process::{self, VmmRecord};
pub use partvisor_api::views::{IoKind, IoView};

/// Longest path a Unix socket can be bound at (`sun_path` holds 108 bytes
/// with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// How long a part-io process gets to listen on its sockets.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long partd waits for a backend to let go of a guest's memory.
pub const UNMAP_DEADLINE: Duration = Duration::from_secs(15);

/// Errors of this layer.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot start {bin}: {source} (give part-io's path with partd --part-io PATH)")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("part-io {what} ended before it was ready: {last} (see {log})")]
    Died {
        what: String,
        last: String,
        log: PathBuf,
    },
    #[error("cannot confine part-io: {0}")]
    Jail(#[source] partvisor_jail::JailError),
    #[error("part-io {what} did not listen on its sockets within {secs} s (see {log})")]
    NotReady {
        what: String,
        secs: u64,
        log: PathBuf,
    },
}

/// One switch port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub partition: String,
    pub socket: PathBuf,
    pub mac: String,
    /// The partition's memory in MiB: the most its frontend may map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The uid of the partition's monitor: the only frontend accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_uid: Option<u32>,
}

/// What partd records about a part-io process it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoRecord {
    pub pid: u32,
    pub start_time: u64,
    /// Switch ports (net only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
}

impl IoRecord {
    fn vmm_record(&self) -> VmmRecord {
        VmmRecord {
            pid: self.pid,
            start_time: self.start_time,
        }
    }

    /// Whether the recorded process is still that process and not a zombie.
    pub fn alive(&self) -> bool {
        self.pid != 0 && process::start_time(self.pid) == Some(self.start_time)
    }

    /// SIGTERM, then wait up to `deadline` for the end (SIGKILL after it).
    /// Returns whether the process is gone.
    pub async fn stop(&self, deadline: Duration) -> bool {
        if !self.alive() {
            return true;
        }
        process::signal(&self.vmm_record(), nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while self.alive() {
            if t0.elapsed() >= deadline {
                process::signal(&self.vmm_record(), nix::sys::signal::Signal::SIGKILL);
                tokio::time::sleep(Duration::from_millis(200)).await;
                return !self.alive();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Files of one switch.
pub struct SwitchFiles {
    pub dir: PathBuf,
}

impl SwitchFiles {
    pub fn new(state_dir: &Path, switch: &str) -> Self {
        SwitchFiles {
            dir: state_dir.join("switches").join(switch),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("net.json")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("net.log")
    }
    /// Where the switch listens (owned by its uid; records and logs stay
    /// in `dir`, which it cannot write).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn stats(&self) -> PathBuf {
        self.run_dir().join("stats.sock")
    }
    pub fn port_socket(&self, partition: &str, index: usize) -> PathBuf {
        self.run_dir().join(format!("{partition}-{index}.sock"))
    }
}

/// Files of the host's guest-socket relay.
pub struct VsockFiles {
    pub dir: PathBuf,
}

impl VsockFiles {
    pub fn new(state_dir: &Path) -> Self {
        VsockFiles {
            dir: state_dir.join("vsock"),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("vsock.json")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("vsock.log")
    }
    /// Where the relay listens (owned by its uid).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// The partitions' hybrid host socket directories: `hosts/<name>/`,
    /// owned by the partition's owner, group the relay's, mode 02770.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    /// Partition `name`'s hybrid host socket.
    pub fn host_socket(&self, name: &str) -> PathBuf {
        self.hosts_dir().join(name).join("vsock.sock")
    }
    pub fn control(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    pub fn port_socket(&self, partition: &str) -> PathBuf {
        self.run_dir().join(format!("{partition}.sock"))
    }
}

/// `part-io vsock` arguments: no ports, partd adds them.
pub fn vsock_args(files: &VsockFiles) -> Vec<String> {
    vec![
        "vsock".into(),
        "--control".into(),
        files.control().display().to_string(),
    ]
}

/// Why a request to the vsock relay failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockControlError {
    #[error("cannot reach the vsock relay at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock relay at {path}: {source}")]
    Exchange {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock relay at {path} gave no reply within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
    #[error("vsock relay at {path} gave a reply partd cannot read: {source}")]
    BadReply {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("vsock relay refused: {0}")]
    Refused(String),
}

/// Sends one request to the relay's control socket and returns its
/// (successful) reply.
pub async fn vsock_request(
    control: &Path,
    req: &partvisor_api::vsock::Request,
) -> Result<partvisor_api::vsock::Reply, VsockControlError> {
    use tokio::io::AsyncWriteExt;
    let io = |source| VsockControlError::Exchange {
        path: control.to_owned(),
        source,
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(control)
            .await
            .map_err(|source| VsockControlError::Connect {
                path: control.to_owned(),
                source,
            })?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_string(req).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        w.write_all(line.as_bytes()).await.map_err(io)?;
        let mut reply = String::new();
        tokio::io::BufReader::new(r)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        serde_json::from_str::<partvisor_api::vsock::Reply>(&reply).map_err(|source| {
            VsockControlError::BadReply {
                path: control.to_owned(),
                source,
            }
        })
    };
    let reply = tokio::time::timeout(VSOCK_CONTROL_DEADLINE, exchange)
        .await
        .map_err(|_| VsockControlError::Timeout {
            path: control.to_owned(),
            secs: VSOCK_CONTROL_DEADLINE.as_secs(),
        })??;
    if reply.ok {
        Ok(reply)
    } else {
        Err(VsockControlError::Refused(reply.error.unwrap_or_default()))
    }
}

/// How long partd waits for the vsock relay to answer one request.
const VSOCK_CONTROL_DEADLINE: Duration = Duration::from_secs(5);

/// Starts part-io with `args`, stderr into `log` (truncated), in its own
/// session so it outlives partd, confined as `confinement` says, and waits until it logged
/// `ready_lines` `serving` lines.
pub async fn spawn_ready(
    bin: &Path,
    what: &str,
    args: &[String],
    log: &Path,
    ready_lines: usize,
    inherit: Vec<(std::os::fd::RawFd, std::os::fd::RawFd)>,
    confinement: crate::jail::Confinement,
) -> Result<IoRecord, IoError> {
    let file = |source| IoError::File {
        path: log.to_owned(),
        source,
    };
    let out = std::fs::File::create(log).map_err(file)?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(out))
        .env("PARTVISOR_LOG", "info")
        .kill_on_drop(false)
        .process_group(0);
    process::inherit_fds(&mut cmd, inherit).map_err(|source| IoError::Spawn {
        bin: bin.to_owned(),
        source,
    })?;
    let mut child = crate::jail::spawn(&mut cmd, confinement)
        .map_err(IoError::Jail)?
        .map_err(|source| IoError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let record = IoRecord {
        pid,
        start_time: process::start_time(pid).unwrap_or(0),
        ports: Vec::new(),
    };
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().filter(|l| l.contains("serving")).count() >= ready_lines {
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(IoError::Died {
                what: what.into(),
                last: text.lines().last().unwrap_or("no output").to_string(),
                log: log.to_owned(),
            });
        }
        if t0.elapsed() >= READY_DEADLINE {
            let _ = child.start_kill();
            return Err(IoError::NotReady {
                what: what.into(),
                secs: READY_DEADLINE.as_secs(),
                log: log.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Reaped by tokio's orphan reaper once it ends; partd watches it by pid
    // and start time, like a monitor started by an earlier partd.
    drop(child);
    Ok(record)
}

/// Where `part-io blk` finds its first disk image (the next ones follow).
pub const FIRST_DISK_FD: i32 = 3;

/// `part-io blk` arguments for `disks` (image, read-only) on `sockets`.
/// `memory_mib` is the partition's grant: its frontend may map no more;
/// `frontend_uid` its monitor's uid, the only one accepted.
pub fn blk_args(
    disks: &[(PathBuf, bool)],
    sockets: &[PathBuf],
    serial: &str,
    memory_mib: u64,
    frontend_uid: u32,
) -> Vec<String> {
    let mut args = vec!["blk".to_string()];
    for (i, ((image, ro), socket)) in disks.iter().zip(sockets).enumerate() {
        let mut spec = format!(
            "socket={},image={},id={serial}-{i},memory={memory_mib},frontend-uid={frontend_uid}",
            socket.display(),
            image.display()
        );
        if *ro {
            spec.push_str(",readonly");
        }
        args.push("--export".into());
        args.push(spec);
    }
    args
}

/// `part-io net` arguments for `ports` with a stats socket.
pub fn net_args(ports: &[Port], stats: &Path) -> Vec<String> {
    let mut args = vec!["net".to_string()];
    for p in ports {
        args.push("--port".into());
        let mut spec = format!("socket={},mac={}", p.socket.display(), p.mac);
        if let Some(m) = p.memory_mib {
            spec.push_str(&format!(",memory={m}"));
        }
        if let Some(u) = p.frontend_uid {
            spec.push_str(&format!(",frontend-uid={u}"));
        }
        args.push(spec);
    }
    args.push("--stats-socket".into());
    args.push(stats.display().to_string());
    args
}

/// The `connected` flag of each port of a switch, by socket path; `None`
/// when the stats socket does not answer (switch gone).
pub async fn port_connections(stats: &Path) -> Option<Vec<(PathBuf, bool)>> {
    let read = async {
        let s = tokio::net::UnixStream::connect(stats).await.ok()?;
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        let ports = v.get("ports")?.as_array()?;
        Some(
            ports
                .iter()
                .filter_map(|p| {
                    Some((
                        PathBuf::from(p.get("socket")?.as_str()?),
                        p.get("connected")?.as_bool()?,
                    ))
                })
                .collect(),
        )
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_and_net_arguments_name_every_socket() {
        let a = blk_args(
            &[("/i/a.img".into(), false), ("/i/b.img".into(), true)],
            &["/s/d0.sock".into(), "/s/d1.sock".into()],
            "web",
            64,
            3_000_000,
        );
        assert_eq!(
            a,
            [
                "blk",
                "--export",
                "socket=/s/d0.sock,image=/i/a.img,id=web-0,memory=64,frontend-uid=3000000",
                "--export",
                "socket=/s/d1.sock,image=/i/b.img,id=web-1,memory=64,frontend-uid=3000000,readonly"
            ]
        );
        let n = net_args(
            &[Port {
                partition: "a".into(),
                socket: "/w/a-0.sock".into(),
                mac: "02:70:76:00:00:00".into(),
                memory_mib: Some(32),
                frontend_uid: Some(7),
            }],
            Path::new("/w/stats.sock"),
        );
        assert_eq!(
            n,
            [
                "net",
                "--port",
                "socket=/w/a-0.sock,mac=02:70:76:00:00:00,memory=32,frontend-uid=7",
                "--stats-socket",
                "/w/stats.sock"
            ]
        );
    }

    #[tokio::test]
    async fn a_process_that_dies_before_ready_is_reported_with_its_last_line() {
        let dir = std::env::temp_dir().join(format!("partd-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        let e = spawn_ready(
            Path::new("/bin/sh"),
            "blk",
            &["-c".into(), "echo boom >&2; exit 3".into()],
            &log,
            1,
            Vec::new(),
            Default::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("ended before it was ready: boom"), "{e}");
        let ok = spawn_ready(
            Path::new("/bin/sh"),
            "blk",
            &["-c".into(), "echo serving on x >&2; sleep 5".into()],
            &log,
            1,
            Vec::new(),
            Default::default(),
        )
        .await
        .unwrap();
        assert!(ok.alive());
        assert!(ok.stop(Duration::from_secs(2)).await);
        assert!(!ok.alive());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_backend_reads_the_files_partd_opened_on_the_descriptors_it_was_promised() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "first").unwrap();
        std::fs::write(&b, "second").unwrap();
        let (fa, fb) = (
            std::fs::File::open(&a).unwrap(),
            std::fs::File::open(&b).unwrap(),
        );
        // The files are renamed away: what the child reads is what was opened.
        std::fs::rename(&a, dir.path().join("gone")).unwrap();
        let log = dir.path().join("x.log");
        let rec = spawn_ready(
            Path::new("/bin/sh"),
            "blk",
            &[
                "-c".into(),
                "echo serving $(cat /proc/self/fd/3) $(cat /proc/self/fd/4) >&2; sleep 5".into(),
            ],
            &log,
            1,
            // Swapped on purpose: each target gets its own source.
            vec![(fb.as_raw_fd(), 4), (fa.as_raw_fd(), 3)],
            Default::default(),
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("serving first second"), "{text}");
        assert!(rec.stop(Duration::from_secs(2)).await);
    }
}
