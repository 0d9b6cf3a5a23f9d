//! `part-io`: partvisor's I/O partition process. See the library docs.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::info;

use part_io::export::{Export, ExportError, ExportSpec};
use part_io::net::{self, NetError, PortEndpoint, PortSpec, Switch};
use part_io::server::{self, Endpoint, ListenError, ServeError};
use part_io::tap::{Tap, TapError};
use part_io::vsock::{self, Entries, Relay, VsockError};

/// Why `part-io` could not start; printed as one line.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    VsockBind(#[from] vsock::bound::BindError),
    #[error("socket {0} is used by two exports")]
    DuplicateSocket(PathBuf),
    #[error("cannot start {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] partvisor_seccomp::SeccompError),
}

/// Starts a named thread; `what` names it in the error.
fn spawn(
    name: &str,
    what: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| RunError::Thread { what, source })
}

#[derive(Parser)]
#[command(
    name = "part-io",
    version,
    about = "partvisor I/O partition: vhost-user backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// System calls outside the I/O partition's allowlist kill it (`on`),
    /// are logged by the kernel and allowed (`log`, for debugging), or are
    /// not filtered (`off`). Installed once the sockets are bound, before
    /// anything a frontend sends is read.
    #[arg(long, global = true, value_name = "MODE", default_value = "on")]
    seccomp: partvisor_seccomp::Mode,
}

#[derive(Subcommand)]
enum Command {
    /// Serve raw disk images as vhost-user-blk devices, one socket per export.
    Blk {
        /// `socket=PATH,image=PATH[,readonly][,id=SERIAL]`; repeat for more
        /// exports. Paths may not contain commas.
        #[arg(long = "export", value_name = "SPEC", required = true)]
        exports: Vec<ExportSpec>,
    },
    /// One L2 learning switch whose ports are vhost-user-net devices, one
    /// socket per port, with an optional TAP uplink.
    Net {
        /// `socket=PATH,mac=XX:XX:XX:XX:XX:XX`; repeat for more ports. A
        /// port only accepts frames whose source is its MAC.
        #[arg(long = "port", value_name = "SPEC", required = true)]
        ports: Vec<PortSpec>,
        /// Uplink TAP interface: attached if it exists, created (and brought
        /// up) otherwise.
        #[arg(long = "tap", value_name = "IFNAME")]
        tap: Option<String>,
        /// Unix socket answering every connection with one JSON line of
        /// per-port and uplink counters.
        #[arg(long = "stats-socket", value_name = "PATH")]
        stats_socket: Option<PathBuf>,
    },
    /// Guest sockets (AF_VSOCK) between partitions: one relay whose ports
    /// are vhost-user-vsock devices, one socket per partition.
    Vsock {
        /// `socket=PATH,cid=N[,uds=PATH][,accept=CID:PORT+...]`; repeat
        /// for more partitions. A partition only sends from its CID, and
        /// only the CIDs and ports in its `accept` list may connect to it.
        #[arg(
            long = "port",
            value_name = "SPEC",
            required_unless_present = "control"
        )]
        ports: Vec<vsock::PortSpec>,
        /// Unix socket (mode 0600) on which partd adds and removes
        /// partitions and reads counters (newline-delimited JSON).
        #[arg(long = "control", value_name = "PATH")]
        control: Option<PathBuf>,
        /// Unix socket answering every connection with one JSON line of
        /// per-partition counters.
        #[arg(long = "stats-socket", value_name = "PATH")]
        stats_socket: Option<PathBuf>,
    },
}

/// Ends the process at once, as the default action of SIGTERM would.
extern "C" fn terminate(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and takes a status.
    unsafe { libc::_exit(128 + sig) }
}

/// SIGTERM and SIGINT end part-io with status 128 + signal. Handled rather
/// than left to the default action because partd starts part-io as the
/// init of a pid namespace of its own, and init ignores every signal it
/// has no handler for (but SIGKILL from outside).
fn handle_termination() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `terminate` only calls _exit; a zeroed sigaction with
        // a handler and no flags is valid.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = terminate as *const () as usize;
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

fn main() -> ExitCode {
    handle_termination();
    let cli = Cli::parse();
    partvisor_runtime::init_logging();
    partvisor_seccomp::set_process_mode(cli.seccomp);
    let result = match cli.command {
        Command::Blk { exports } => run_blk(exports, cli.seccomp),
        Command::Net {
            ports,
            tap,
            stats_socket,
        } => run_net(ports, tap, stats_socket, cli.seccomp),
        Command::Vsock {
            ports,
            control,
            stats_socket,
        } => run_vsock(ports, control, stats_socket, cli.seccomp),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("part-io: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run_net(
    ports: Vec<PortSpec>,
    tap: Option<String>,
    stats_socket: Option<PathBuf>,
    seccomp: partvisor_seccomp::Mode,
) -> Result<(), RunError> {
    let tap = tap.map(|name| Tap::open(&name)).transpose()?;
    let switch = Switch::new(ports, tap)?;
    // Bind everything first: a bad argument fails the whole start.
    let mut bound = Vec::new();
    for i in 0..switch.ports().len() {
        let port = Arc::new(PortEndpoint::new(switch.clone(), i));
        bound.push(server::bind_shared(port)?);
    }
    let stats = stats_socket
        .map(|path| net::bind_stats(&path).map(|l| (l, path)))
        .transpose()?;
    // Everything is open and bound: from here on, the allowlist.
    partvisor_seccomp::install(partvisor_seccomp::Role::Io, seccomp)?;
    let mut threads = Vec::new();
    if let Some(name) = switch.uplink_name() {
        let how = if switch.uplink_created() {
            " (created by part-io; removed when it exits)"
        } else {
            ""
        };
        info!("uplink tap {name} attached{how}");
        let sw = switch.clone();
        threads.push(spawn("part-io-uplink", "the uplink", move || {
            if let Err(e) = sw.run_uplink() {
                tracing::error!("uplink stopped: {e}; ports keep switching without it");
            }
        })?);
    }
    if let Some((listener, path)) = stats {
        info!("stats on {}", path.display());
        let sw = switch.clone();
        threads.push(spawn("part-io-stats", "the stats", move || {
            net::serve_stats(&sw, listener)
        })?);
    }
    for b in bound {
        let p = b.export().port();
        info!(port = %b.export().name(), "port {} serving on {}", p.spec.mac, p.spec.socket.display());
        threads.push(spawn("part-io-listen", "listener", move || b.serve())?);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn run_vsock(
    ports: Vec<vsock::PortSpec>,
    control: Option<PathBuf>,
    stats_socket: Option<PathBuf>,
    seccomp: partvisor_seccomp::Mode,
) -> Result<(), RunError> {
    let relay = Relay::new(Entries::from_ports(&ports)?);
    // Bind everything first: a bad argument fails the whole start.
    let mut bound = Vec::new();
    for p in &ports {
        bound.push(vsock::bound::bind(
            &relay,
            p.cid,
            p.socket.clone(),
            p.host_socket.clone(),
            p.memory_limit,
            p.frontend_uid,
        )?);
    }
    let stats = stats_socket
        .map(|path| server::listen("stats socket", &path).map(|l| (l, path)))
        .transpose()?;
    let control = control
        .map(|path| vsock::control::listen(&path).map(|l| (l, path)))
        .transpose()?;
    // Everything is open and bound: from here on, the allowlist.
    partvisor_seccomp::install(partvisor_seccomp::Role::Io, seccomp)?;
    let mut threads = Vec::new();
    if let Some((listener, path)) = stats {
        info!("stats on {}", path.display());
        let r = relay.clone();
        threads.push(spawn("part-io-stats", "the stats", move || {
            server::serve_lines(listener, || r.stats_json())
        })?);
    }
    for b in bound {
        let p = b.port().clone();
        match &p.host {
            Some(h) => info!(
                "vsock CID {} serving on {}, host services on {}",
                p.cid,
                p.socket.display(),
                h.path.display()
            ),
            None => info!("vsock CID {} serving on {}", p.cid, p.socket.display()),
        }
        threads.extend(b.spawn()?);
    }
    if let Some((listener, path)) = control {
        info!("control serving on {}", path.display());
        let r = relay.clone();
        threads.push(spawn("part-io-control", "the control socket", move || {
            vsock::control::serve(&r, listener)
        })?);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn run_blk(specs: Vec<ExportSpec>, seccomp: partvisor_seccomp::Mode) -> Result<(), RunError> {
    let mut sockets = HashSet::new();
    for s in &specs {
        if !sockets.insert(s.socket.clone()) {
            return Err(RunError::DuplicateSocket(s.socket.clone()));
        }
    }
    // Open and bind everything first: a bad argument fails the whole start.
    let mut bound = Vec::new();
    for spec in specs {
        bound.push(server::bind(Export::open(spec)?)?);
    }
    // Everything is open and bound: from here on, the allowlist.
    partvisor_seccomp::install(partvisor_seccomp::Role::Io, seccomp)?;
    let mut threads = Vec::new();
    for b in bound {
        let e = b.export();
        info!(
            export = %e.name(),
            "serving {} ({} bytes{}) on {}",
            e.spec.image.display(),
            e.size,
            if e.spec.readonly { ", read-only" } else { "" },
            e.spec.socket.display()
        );
        threads.push(spawn("part-io-listen", "listener", move || b.serve())?);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
