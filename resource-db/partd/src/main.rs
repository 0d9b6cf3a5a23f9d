//! # partd: the partvisor coordinator daemon
//!
//! The command side of seed 001 (ARCHITECTURE.md lists the seeds): the control
//! partition that is the one writer of the resource database, the command
//! partition operators talk to, watchdogs over the partition monitors). It
//! serves an HTTP/JSON API on a Unix socket (`resources/api/`), applies
//! every ownership and state change as one resource-db transaction, spawns
//! one `part-vmm` per running partition with a sealed descriptor of exactly
//! what was granted, pings each monitor's control socket, and after its own
//! restart re-attaches to monitors that kept running (pid + start time +
//! control socket), so a partd crash never disturbs a guest.
//!
//! The API (`api.rs`): every connection's uid (SO_PEERCRED) must be root,
//! partd's own or allowlisted (`--allow-uid`), else 403; bodies are parsed
//! strictly (400 with a message), bounded in size (413) and time (408); the
//! serial console is an HTTP upgrade on the same socket. A partition belongs
//! to the uid that created it: only that uid, root and partd's own uid may
//! start, stop, destroy or attach to it (`coordinator/owner.rs`), and its
//! kernel, initrd and disk images are opened with the requesting uid's
//! rights and no symbolic links (`access.rs`); part-vmm gets the opened
//! kernel and initrd, and part-io blk the opened images, as inherited
//! descriptors, never a path. The life cycle
//! (`coordinator.rs`): a start is one transaction (plan_grant + `starting`),
//! then part-vmm runs from a sealed memfd descriptor (`process.rs`) with its
//! vCPU threads confined to the granted CPUs (dedicated ones, or the shared
//! pool's); a supervisor task per monitor pings its control socket
//! (`running` ⇄ `unresponsive`) and, once the process is gone, releases
//! everything and sets `stopped`/`failed` in one transaction.
//!
//! State dir (`--state-dir`, default `/var/lib/partvisor`): `resources.db`
//! (the resource database), `partd.sock` (the API), and per partition
//! `partitions/<name>/` with `control.sock`, `console.sock`, `exit.json`
//! (how the monitor ended), `vmm.json` (pid + start time) and `vmm.log`.
//!
//! I/O partitions (`io.rs`, seed 001's boot order): a partition's `[[disk]]`s
//! (device resources: `--disk-image PATH`, fixed when resources.db is
//! created) are served by its own `part-io blk` (`partitions/<name>/blk.json`,
//! `disk<i>.sock`, `blk.log`); its `[[nic]]`s are ports of one `part-io net`
//! per switch (`switches/<switch>/net.json`, `<partition>-<i>.sock`,
//! `stats.sock`, `net.log`) with a port for every partition defined on the
//! switch. MACs are granted at create (so a switch knows every member's) and
//! returned at destroy; disks, CPUs and memory at start, in one transaction
//! that also asserts the MACs. partd starts the backends and waits until they
//! listen before it starts part-vmm; after the monitor is gone it stops the
//! partition's `part-io blk` and waits for its end, and waits until the
//! switch reports each port `connected: false` (part-io unmaps first), and
//! only then commits the release. A dead part-io shows as `alive: false`.
//!
//! What it must never do:
//! - change an owner or a state outside a resource-db transaction, or grant
//!   a partition's resources in more than one transaction;
//! - release a partition's resources while its monitor may still run;
//! - kill or stop a guest because partd itself stops or restarts;
//! - serve a uid that is not root, partd's own or allowlisted;
//! - open a file of a definition with more rights than the uid that asked,
//!   or let a uid act on another uid's partition.

mod access;
mod api;
mod cgroup;
mod coordinator;
mod io;
mod jail;
mod process;

// The definition rules live in partd's library (see `lib.rs`).
use partd::definition;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use resource_db::{Db, HostConfig, HostConfigExt};

/// partvisor coordinator daemon: serves the partd API, starts and
/// supervises partition monitors.
#[derive(Parser, Debug)]
#[command(name = "partd", version)]
struct Args {
    /// State directory (resource database, API socket, per-partition files).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/partvisor")]
    state_dir: PathBuf,
    /// API socket (default: <state-dir>/partd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Group that owns the API socket (mode 0660).
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Also serve this uid (repeatable); root and partd's own uid always are.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// part-vmm binary (default: next to partd, else `part-vmm` on PATH).
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// part-io binary, the I/O partitions serving disks and NICs
    /// (default: next to partd, else `part-io` on PATH).
    #[arg(long = "part-io", value_name = "PATH")]
    part_io: Option<PathBuf>,
    /// A disk image partitions may be given (`[[disk]] image = PATH`),
    /// absolute; repeatable. A device resource of the resource database,
    /// so fixed when resources.db is created.
    #[arg(long = "disk-image", value_name = "PATH")]
    disk_image: Vec<PathBuf>,
    /// Interval between pings of each monitor's control socket.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    ping_interval_ms: u64,
    /// How long one ping may take.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    ping_timeout_ms: u64,
    /// A running partition whose monitor has not answered for this long
    /// becomes `unresponsive`.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    unresponsive_after_ms: u64,
    /// Weight each shared-pool partition's monitor by its share in a cpu
    /// cgroup under `partvisor/` (`auto`: where a writable cpu controller
    /// exists), or not at all (`off`).
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "off"])]
    cgroups: String,
    /// A client gets this long to send its request head, and again its body.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Memory budget in MiB, used when the resource database is created
    /// (default: 3/4 of MemTotal). Fixed afterwards.
    #[arg(long, value_name = "MIB")]
    memory_budget_mib: Option<u64>,
    /// Confine every monitor and I/O partition (`on`: own uid from the
    /// resource map, no capabilities, namespaces and a root of their own;
    /// needs root), or run them as partd's uid, unconfined (`off`: for
    /// running partd unprivileged or debugging).
    #[arg(long, value_name = "MODE", default_value = "on", value_parser = ["on", "off"])]
    jail: String,
    /// Monitors and I/O partitions kill themselves on a system call outside
    /// their threads' allowlists (`on`), have the kernel log it and go on
    /// (`log`, for debugging), or are not filtered (`off`).
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: partvisor_seccomp::Mode,
}

#[derive(Debug, thiserror::Error)]
enum PartdError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("resource database: {0}")]
    Db(#[from] resource_db::Error),
    #[error("API socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("group {0}: no such group")]
    Group(String),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    Jail(&'static str),
}

fn main() {
    if let Err(e) = process::reserve_low_fds() {
        eprintln!(
            "partd: cannot open /dev/null to reserve the descriptors children inherit on: {e}"
        );
        std::process::exit(1);
    }
    partvisor_runtime::init_logging();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("partd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("partd: {e}");
        std::process::exit(1);
    }
}

fn default_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn open_db(args: &Args) -> Result<Db, PartdError> {
    let path = args.state_dir.join("resources.db");
    let host = if path.exists() {
        let stored = Db::stored_host_config(&path)?;
        if let Some(m) = args.memory_budget_mib {
            if m != stored.memory_budget_mib {
                tracing::warn!(
                    "--memory-budget-mib {m} ignored: {} was created with {} MiB",
                    path.display(),
                    stored.memory_budget_mib
                );
            }
        }
        for d in &args.disk_image {
            let name = d.display().to_string();
            if !stored.devices.iter().any(|s| s.name == name) {
                tracing::warn!(
                    "--disk-image {name} ignored: {} was created without it (devices are fixed when the database is created)",
                    path.display()
                );
            }
        }
        stored
    } else {
        let mut host = HostConfig::discover()?;
        if let Some(m) = args.memory_budget_mib {
            host.memory_budget_mib = m;
        }
        for d in &args.disk_image {
            if !d.is_absolute() {
                return Err(PartdError::Runtime(format!(
                    "--disk-image {}: must be an absolute path",
                    d.display()
                )));
            }
            host.devices.push(resource_db::DeviceSpec {
                name: d.display().to_string(),
                kind: resource_db::DeviceKind::BackingFile(d.clone()),
            });
        }
        host
    };
    Ok(Db::open(&path, host)?)
}

fn bind(path: &Path, group: Option<&str>) -> Result<UnixListenerStd, PartdError> {
    let fail = |reason: String| PartdError::Socket {
        path: path.to_owned(),
        reason,
    };
    // Bound under a temporary name and renamed into place once its mode and
    // group are set, so no client ever sees it with the wrong ones. Only one
    // partd runs per state dir (the database lock guarantees it), so files
    // left here are a dead partd's.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".new");
    let tmp = PathBuf::from(tmp_name);
    for p in [path, tmp.as_path()] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("cannot remove the old {}: {e}", p.display()))),
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| fail(format!("chmod 0660: {e}")))?;
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .map_err(|e| fail(format!("looking up group {g}: {e}")))?
            .ok_or_else(|| PartdError::Group(g.to_owned()))?
            .gid;
        nix::unistd::chown(&tmp, None, Some(gid)).map_err(|e| fail(format!("chgrp {g}: {e}")))?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| fail(format!("renaming {} into place: {e}", tmp.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    Ok(listener)
}

type UnixListenerStd = std::os::unix::net::UnixListener;

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

async fn run(args: Args) -> Result<(), PartdError> {
    std::fs::create_dir_all(args.state_dir.join("partitions")).map_err(|source| {
        PartdError::StateDir {
            path: args.state_dir.clone(),
            source,
        }
    })?;
    let db = open_db(&args)?;
    let cgroups = if args.cgroups == "off" {
        cgroup::CpuCgroups::Off("--cgroups off".into())
    } else {
        cgroup::CpuCgroups::detect(
            Path::new("/sys/fs/cgroup"),
            &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        )
    };
    match &cgroups {
        cgroup::CpuCgroups::Off(why) => {
            tracing::warn!("shares of the shared CPU pool are not weighted: {why}")
        }
        cgroup::CpuCgroups::V1(d) | cgroup::CpuCgroups::V2(d) => {
            tracing::info!("shared-pool shares weighted in {}", d.display())
        }
    }
    let vmm = args.vmm.clone().unwrap_or_else(|| default_bin("part-vmm"));
    let part_io = args
        .part_io
        .clone()
        .unwrap_or_else(|| default_bin("part-io"));
    let jail = if args.jail == "on" {
        if !nix::unistd::geteuid().is_root() {
            return Err(PartdError::Jail(
                "confining monitors and I/O partitions needs root; run partd as root or with --jail off",
            ));
        }
        Some(
            jail::Jailing::new(&args.state_dir, db.view().host().io_uid).map_err(|source| {
                PartdError::StateDir {
                    path: args.state_dir.join("jail"),
                    source,
                }
            })?,
        )
    } else {
        tracing::warn!("--jail off: monitors and I/O partitions run as partd's uid, unconfined");
        None
    };
    // A jail binds the programs at their own paths: absolute, no links.
    let (vmm, part_io) = if jail.is_some() {
        // A program that is missing now makes each start fail (and say
        // so) until it is installed; partd itself still serves.
        let resolve = |p: PathBuf| match jail::resolve_bin(&p) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot find the program {}: {e}", p.display());
                p
            }
        };
        (resolve(vmm), resolve(part_io))
    } else {
        (vmm, part_io)
    };
    let settings = coordinator::Settings {
        state_dir: args.state_dir.clone(),
        vmm,
        part_io,
        jail,
        seccomp: args.seccomp,
        ping_interval: Duration::from_millis(args.ping_interval_ms.max(10)),
        ping_timeout: Duration::from_millis(args.ping_timeout_ms.max(10)),
        unresponsive_after: Duration::from_millis(args.unresponsive_after_ms.max(10)),
        cgroups,
        own_uid: nix::unistd::getuid().as_raw(),
    };
    let coord = coordinator::Coordinator::new(db, settings);
    let (adopted, finished) = coord
        .recover()
        .await
        .map_err(|e| PartdError::Runtime(format!("recovering partitions: {e}")))?;
    if adopted + finished > 0 {
        tracing::info!(
            "recovery: re-attached {adopted} monitor(s), {finished} ended while partd was down"
        );
    }

    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("partd.sock"));
    let listener = bind(&socket, args.group.as_deref())?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| PartdError::Runtime(format!("API socket: {e}")))?;
    let mut allowed: BTreeSet<u32> = args.allow_uid.iter().copied().collect();
    allowed.insert(0);
    allowed.insert(nix::unistd::getuid().as_raw());
    let app = api::router(api::Api {
        coord,
        allowed: Arc::new(allowed),
    });
    // Signal handlers exist before READY, so an early SIGTERM is a clean stop.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| PartdError::Runtime(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| PartdError::Runtime(format!("cannot watch SIGINT: {e}")))?;
    tracing::info!("partd serving {}", socket.display());
    notify(&[sd_notify::NotifyState::Ready]);

    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(
            "partd stopping; partitions keep running and are re-attached at the next start"
        );
        notify(&[sd_notify::NotifyState::Stopping]);
    };
    let limits = api::Limits {
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(10)),
        max_body: 1 << 20,
        max_connections: 256,
    };
    api::serve(listener, app, limits, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
