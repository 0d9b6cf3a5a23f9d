//! `part-io`: partvisor's I/O partition process. See the library docs.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::info;

use part_io::export::{Export, ExportSpec};
use part_io::net::{PortEndpoint, PortSpec, Switch};
use part_io::server::{self, Endpoint};
use part_io::tap::Tap;

#[derive(Parser)]
#[command(
    name = "part-io",
    version,
    about = "partvisor I/O partition: vhost-user backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    partvisor_runtime::init_logging();
    let result = match cli.command {
        Command::Blk { exports } => run_blk(exports),
        Command::Net {
            ports,
            tap,
            stats_socket,
        } => run_net(ports, tap, stats_socket),
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
) -> Result<(), String> {
    let tap = tap
        .map(|name| Tap::open(&name))
        .transpose()
        .map_err(|e| e.to_string())?;
    let switch = Switch::new(ports, tap).map_err(|e| e.to_string())?;
    // Bind everything first: a bad argument fails the whole start.
    let mut bound = Vec::new();
    for i in 0..switch.ports().len() {
        let port = Arc::new(PortEndpoint::new(switch.clone(), i));
        bound.push(server::bind_shared(port).map_err(|e| e.to_string())?);
    }
    let stats = stats_socket.map(|path| bind_stats(&path)).transpose()?;
    let mut threads = Vec::new();
    if let Some(name) = switch.uplink_name() {
        let how = if switch.uplink_created() {
            " (created by part-io; removed when it exits)"
        } else {
            ""
        };
        info!("uplink tap {name} attached{how}");
        let sw = switch.clone();
        threads.push(
            std::thread::Builder::new()
                .name("part-io-uplink".into())
                .spawn(move || {
                    if let Err(e) = sw.run_uplink() {
                        tracing::error!("uplink stopped: {e}; ports keep switching without it");
                    }
                })
                .map_err(|e| format!("cannot start the uplink thread: {e}"))?,
        );
    }
    if let Some((listener, path)) = stats {
        info!("stats on {}", path.display());
        let sw = switch.clone();
        threads.push(
            std::thread::Builder::new()
                .name("part-io-stats".into())
                .spawn(move || part_io::net::serve_stats(&sw, listener))
                .map_err(|e| format!("cannot start the stats thread: {e}"))?,
        );
    }
    for b in bound {
        let p = b.export().port();
        info!(port = %b.export().name(), "port {} serving on {}", p.spec.mac, p.spec.socket.display());
        threads.push(
            std::thread::Builder::new()
                .name("part-io-listen".into())
                .spawn(move || b.serve())
                .map_err(|e| format!("cannot start listener thread: {e}"))?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn bind_stats(
    path: &std::path::Path,
) -> Result<(std::os::unix::net::UnixListener, PathBuf), String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "stats socket path {} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot replace stats socket {}: {e}", path.display()))?;
    }
    std::os::unix::net::UnixListener::bind(path)
        .map(|l| (l, path.to_path_buf()))
        .map_err(|e| format!("cannot listen on stats socket {}: {e}", path.display()))
}

fn run_blk(specs: Vec<ExportSpec>) -> Result<(), String> {
    let mut sockets = HashSet::new();
    for s in &specs {
        if !sockets.insert(s.socket.clone()) {
            return Err(format!(
                "socket {} is used by two exports",
                s.socket.display()
            ));
        }
    }
    // Open and bind everything first: a bad argument fails the whole start.
    let mut bound = Vec::new();
    for spec in specs {
        let export = Export::open(spec).map_err(|e| e.to_string())?;
        bound.push(server::bind(export).map_err(|e| e.to_string())?);
    }
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
        let t = std::thread::Builder::new()
            .name("part-io-listen".into())
            .spawn(move || b.serve())
            .map_err(|e| format!("cannot start listener thread: {e}"))?;
        threads.push(t);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
