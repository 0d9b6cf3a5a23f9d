//! `part-io`: partvisor's I/O partition process. See the library docs.

use std::collections::HashSet;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::info;

use part_io::export::{Export, ExportSpec};
use part_io::server;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Blk { exports } => match run_blk(exports) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("part-io: {msg}");
                ExitCode::FAILURE
            }
        },
    }
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
