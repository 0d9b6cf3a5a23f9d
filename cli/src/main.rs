//! `partctl`: create / start / stop / destroy / list / show / log / console
//! against partd. Tables for people, `--json` for scripts; exit status 1 on
//! any failure with a message that says what to do.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use partctl::{Client, CtlError, FreeCapacity, Holdings, LogEntry, PartitionView};

/// partvisor operations console (talks to partd).
#[derive(Parser, Debug)]
#[command(name = "partctl", version)]
struct Cli {
    /// partd's API socket (else $PARTD_SOCKET, else /var/lib/partvisor/partd.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Use (and start if needed) a personal partd with its state under
    /// $HOME/.local/state/partvisor: no setup beyond access to /dev/kvm.
    #[arg(long, global = true)]
    dev: bool,
    /// Print partd's JSON replies instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Define a partition from a TOML file (see resources/examples/).
    Create {
        file: PathBuf,
        /// Use this kernel instead of the file's (resolved against the current folder).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
    },
    /// Grant a partition its resources and boot it.
    Start {
        name: String,
        /// Attach to its console once it runs.
        #[arg(long)]
        console: bool,
    },
    /// Stop a partition (polite, forced after the timeout) and release its resources.
    Stop {
        name: String,
        /// Stop at once, without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest before forcing.
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Remove a stopped partition's definition.
    Destroy { name: String },
    /// All partitions.
    List,
    /// One partition, with what it holds.
    Show { name: String },
    /// Audit log of the resource database (of one partition if named).
    Log {
        name: Option<String>,
        /// Most recent entries shown.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// Attach to a running partition's serial console (Ctrl-] detaches).
    Console { name: String },
    /// Total and free resources.
    Resources,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("partctl: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let json = cli.json;
    let result = rt.block_on(run(cli));
    // Do not wait for a console's stdin reader blocked in read(2).
    rt.shutdown_background();
    if let Err(e) = result {
        eprintln!("partctl: {e}");
        if json {
            // Scripts get the refusal on stdout too, with partd's status.
            let status = match &e {
                CtlError::Api { status, .. } => Some(*status),
                _ => None,
            };
            println!(
                "{}",
                serde_json::json!({ "error": e.to_string(), "status": status })
            );
        }
        std::process::exit(1);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CtlError> {
    let s = serde_json::to_string_pretty(v).map_err(|source| CtlError::Encode {
        what: "the reply",
        source,
    })?;
    println!("{s}");
    Ok(())
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    let socket = if cli.dev {
        ensure_dev_partd().await?
    } else {
        partctl::resolve_socket(cli.socket.as_deref())
    };
    let client = Client::new(socket);
    match cli.cmd {
        Cmd::Create { file, kernel } => {
            let mut def = partctl::load_definition(&file)?;
            if let Some(k) = kernel {
                let k = std::path::absolute(&k)
                    .map_err(|source| CtlError::Resolve { path: k, source })?;
                def["kernel"] = serde_json::Value::String(k.display().to_string());
            }
            // A definition partd found invalid is reported against its
            // file; any other refusal (403: a file the caller may not open)
            // keeps its status.
            let v = client.create(&def).await.map_err(|e| match e {
                CtlError::Api {
                    status: 400,
                    message,
                } => CtlError::Definition {
                    path: file.clone(),
                    message,
                },
                e => e,
            })?;
            if cli.json {
                print_json(&v)
            } else {
                println!("created {} (state {})", v.name, state(&v));
                Ok(())
            }
        }
        Cmd::Start { name, console } => {
            let v = client.start(&name).await?;
            if cli.json {
                print_json(&v)?;
            } else {
                let pid = v.vmm.as_ref().map(|m| m.pid).unwrap_or(0);
                println!("{} is {} (monitor pid {pid})", v.name, state(&v));
                print_holdings(&v.holdings);
            }
            if console {
                attach_console(&client, &name).await?;
            }
            Ok(())
        }
        Cmd::Stop {
            name,
            force,
            timeout,
        } => {
            let v = client.stop(&name, force, timeout).await?;
            if cli.json {
                print_json(&v)
            } else {
                let why = v
                    .last_exit
                    .as_ref()
                    .map(|e| format!(" ({})", e.detail))
                    .unwrap_or_default();
                println!("{} is {}{why}", v.name, state(&v));
                Ok(())
            }
        }
        Cmd::Destroy { name } => {
            client.destroy(&name).await?;
            if cli.json {
                print_json(&serde_json::json!({ "destroyed": name }))
            } else {
                println!("destroyed {name}");
                Ok(())
            }
        }
        Cmd::List => {
            let parts = client.list().await?;
            if cli.json {
                return print_json(&parts);
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(vec!["NAME", "STATE", "VCPUS", "MEMORY", "CPUS", "PID"]);
            for p in &parts {
                t.add_row(vec![
                    p.name.clone(),
                    state(p),
                    p.definition.vcpus.to_string(),
                    format!("{} MiB", p.definition.memory_mib),
                    cpus_text(&p.holdings),
                    p.vmm
                        .as_ref()
                        .map(|m| m.pid.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        Cmd::Show { name } => {
            let v = client.show(&name).await?;
            if cli.json {
                return print_json(&v);
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.add_row(vec!["name".to_string(), v.name.clone()]);
            t.add_row(vec!["state".to_string(), state(&v)]);
            let definition =
                serde_json::to_value(&v.definition).map_err(|source| CtlError::Encode {
                    what: "the definition",
                    source,
                })?;
            if let Some(obj) = definition.as_object() {
                for (k, val) in obj {
                    if k != "name" {
                        t.add_row(vec![k.clone(), plain(val)]);
                    }
                }
            }
            if let Some(m) = &v.vmm {
                t.add_row(vec!["monitor pid".to_string(), m.pid.to_string()]);
                t.add_row(vec![
                    "console".to_string(),
                    m.console_socket.display().to_string(),
                ]);
            }
            if let Some(e) = &v.last_exit {
                t.add_row(vec!["last exit".to_string(), e.detail.clone()]);
            }
            for io in &v.io {
                let what = match &io.switch {
                    Some(sw) => format!("part-io net (switch {sw})"),
                    None => format!("part-io {}", io.kind),
                };
                let status = if io.alive {
                    "running"
                } else {
                    "GONE: its devices need reset"
                };
                t.add_row(vec![what, format!("pid {} {status}", io.pid)]);
            }
            println!("{t}");
            print_holdings(&v.holdings);
            Ok(())
        }
        Cmd::Log { name, limit } => {
            let entries = client.log(name.as_deref(), limit).await?;
            if cli.json {
                return print_json(&entries);
            }
            print_log(&entries);
            Ok(())
        }
        Cmd::Console { name } => attach_console(&client, &name).await,
        Cmd::Resources => {
            let f = client.resources().await?;
            if cli.json {
                return print_json(&f);
            }
            print_free(&f);
            Ok(())
        }
    }
}

fn state(v: &PartitionView) -> String {
    serde_json::to_value(v.state)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", v.state))
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cpus_text(h: &Holdings) -> String {
    if !h.cpus.is_empty() {
        let ids: Vec<String> = h.cpus.iter().map(u32::to_string).collect();
        format!("dedicated {}", ids.join(","))
    } else if h.cpu_share_milli > 0 {
        format!("shared {:.3}", f64::from(h.cpu_share_milli) / 1000.0)
    } else {
        "-".into()
    }
}

fn print_holdings(h: &Holdings) {
    if h.is_empty() {
        println!("holds nothing");
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["RESOURCE", "HELD"]);
    t.add_row(vec!["cpus".to_string(), cpus_text(h)]);
    let extents: Vec<String> = h.memory.iter().map(|e| e.to_string()).collect();
    t.add_row(vec![
        "memory".to_string(),
        format!("{} MiB {}", h.memory_mib(), extents.join(" ")),
    ]);
    if !h.vsock_cids.is_empty() {
        t.add_row(vec![
            "vsock cids".to_string(),
            format!("{:?}", h.vsock_cids),
        ]);
    }
    if !h.macs.is_empty() {
        let macs: Vec<String> = h.macs.iter().map(ToString::to_string).collect();
        t.add_row(vec!["macs".to_string(), macs.join(", ")]);
    }
    if !h.devices.is_empty() {
        t.add_row(vec!["devices".to_string(), h.devices.join(", ")]);
    }
    println!("{t}");
}

fn print_free(f: &FreeCapacity) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["RESOURCE", "TOTAL", "FREE"]);
    for (name, c) in [
        ("cpus (dedicable)", f.cpus),
        ("shared pool (milli-CPUs)", f.shared_pool_milli),
        ("memory (MiB)", f.memory_mib),
        ("vsock cids", f.vsock_cids),
        ("macs", f.macs),
        ("devices", f.devices),
        ("channels", f.channels),
        ("endpoints", f.endpoints),
    ] {
        t.add_row(vec![
            name.to_string(),
            c.total.to_string(),
            c.free.to_string(),
        ]);
    }
    println!("{t}");
}

fn print_log(entries: &[LogEntry]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["TX", "TIME (UTC)", "ACTOR", "CHANGES"]);
    for e in entries {
        let what = match &e.record {
            partctl::LogRecord::Genesis { .. } => "genesis (host configuration)".to_string(),
            partctl::LogRecord::Transaction { changes } => changes
                .iter()
                .map(change_text)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        t.add_row(vec![
            e.txid.0.to_string(),
            std::time::UNIX_EPOCH
                .checked_add(Duration::from_nanos(
                    u64::try_from(e.time_unix_ns).unwrap_or(0),
                ))
                .map(|t| humantime::format_rfc3339_millis(t).to_string())
                .unwrap_or_else(|| e.time_unix_ns.to_string()),
            e.actor.clone(),
            what,
        ]);
    }
    println!("{t}");
}

fn change_text(c: &partctl::Change) -> String {
    use partctl::Change;
    let name = |s: partctl::PartitionState| {
        serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    match c {
        Change::Transfer {
            resource,
            before,
            after,
        } => format!("{resource}: {before} -> {after}"),
        Change::Share {
            partition,
            before_milli,
            after_milli,
        } => format!("{partition} share: {before_milli} -> {after_milli} milli-CPUs"),
        Change::Create { record } => format!("create {}", record.id),
        Change::SetState {
            partition,
            before,
            after,
        } => format!("{partition}: {} -> {}", name(*before), name(*after)),
        Change::Destroy { record } => format!("destroy {}", record.id),
    }
}

/// Connects the terminal to the partition's console (through partd) until
/// the guest ends or Ctrl-] is typed; after stdin ends the output is still
/// shown until the guest ends.
async fn attach_console(client: &Client, name: &str) -> Result<(), CtlError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = client.console(name).await?;
    eprintln!("partctl: console of {name} (Ctrl-] detaches)");
    let (mut from_guest, mut to_guest) = tokio::io::split(io);
    // true: detach requested; false: no more input.
    let mut input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    if let Some(pos) = buf[..n].iter().position(|b| *b == 0x1d) {
                        let _ = to_guest.write_all(&buf[..pos]).await;
                        return true;
                    }
                    if to_guest.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    {
        let output = tokio::io::copy(&mut from_guest, &mut stdout);
        tokio::pin!(output);
        let mut input_open = true;
        loop {
            tokio::select! {
                _ = &mut output => break,
                detach = &mut input, if input_open => {
                    input_open = false;
                    if matches!(detach, Ok(true)) {
                        break;
                    }
                }
            }
        }
    }
    let _ = stdout.flush().await;
    Ok(())
}

/// How long `--dev` waits for the partd it started to open its socket.
const DEV_START_TIMEOUT: Duration = Duration::from_secs(10);

/// `--dev`: the personal partd's socket, starting that partd if none answers.
async fn ensure_dev_partd() -> Result<PathBuf, CtlError> {
    let dir = partctl::dev_state_dir()?;
    let socket = dir.join("partd.sock");
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Ok(socket);
    }
    std::fs::create_dir_all(&dir).map_err(|source| CtlError::DevFile {
        what: "create",
        path: dir.clone(),
        source,
    })?;
    let partd = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("partd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("partd"));
    let log_path = dir.join("partd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| CtlError::DevFile {
            what: "open",
            path: log_path.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| CtlError::DevFile {
        what: "duplicate the descriptor of",
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = std::process::Command::new(&partd);
    cmd.arg("--state-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // A daemon of its own: not in partctl's session, not killed by its Ctrl-C.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|source| CtlError::DevSpawn {
        partd: partd.clone(),
        source,
    })?;
    let t0 = Instant::now();
    while t0.elapsed() < DEV_START_TIMEOUT {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            eprintln!(
                "partctl: started partd (pid {}) with state in {}; log {}",
                child.id(),
                dir.display(),
                log_path.display()
            );
            return Ok(socket);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(CtlError::DevExited {
                status: st,
                log: log_path,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(CtlError::DevTimeout {
        socket,
        secs: DEV_START_TIMEOUT.as_secs(),
        log: log_path,
    })
}
