//! `part-vmm` command line. Exit statuses are documented in `part_vmm::exit`.

use std::path::PathBuf;

use clap::Parser;
use part_vmm::config::{DeviceConfig, Overrides, SerialConfig};
use part_vmm::exit::{STATUS_BAD_INPUT, STATUS_VMM_ERROR};

/// partvisor partition monitor: boots one guest in one KVM VM.
#[derive(Parser, Debug)]
#[command(name = "part-vmm", version)]
struct Cli {
    /// JSON partition descriptor (schema: part_vmm::config); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: ELF (vmlinux) with a PVH note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (PVH module 0 / Linux initrd).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Serial console: stdout, none, file:PATH or socket:PATH.
    #[arg(long, value_name = "WHERE")]
    serial: Option<SerialConfig>,
    /// Polite stop (SIGTERM) turns into a forced stop after this long.
    #[arg(long, value_name = "MS")]
    stop_timeout_ms: Option<u64>,
    /// Adds a virtio-blk device served by the vhost-user backend listening
    /// on SOCKET (repeatable; after the config file's devices).
    #[arg(long, value_name = "SOCKET")]
    vhost_user_blk: Vec<PathBuf>,
    /// Adds a virtio-net device served by the vhost-user backend (a port of
    /// a part-io net switch) listening on SOCKET (repeatable; after the blk
    /// devices).
    #[arg(long, value_name = "SOCKET")]
    vhost_user_net: Vec<PathBuf>,
    /// Adds a virtio-vsock device served by the vhost-user backend
    /// listening on SOCKET (part-io vsock, vhost-device-vsock); needs
    /// --vsock-cid.
    #[arg(long, value_name = "SOCKET", requires = "vsock_cid")]
    vhost_user_vsock: Option<PathBuf>,
    /// The guest's vsock CID (3 or more), which the backend must confirm.
    #[arg(long, value_name = "CID", requires = "vhost_user_vsock")]
    vsock_cid: Option<u32>,
    /// Serve the supervisor's control socket here (see part_vmm::control).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Write a JSON record of how the partition ended here.
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// Use this inherited descriptor as /dev/kvm (a jailed monitor has no
    /// /dev).
    #[arg(long, value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    kvm_fd: Option<i32>,
    /// The guest's memory was reserved by a resource manager (partd): do
    /// not check the host's free memory.
    #[arg(long)]
    memory_reserved: bool,
    /// System calls outside each thread's allowlist (the event loop's, a
    /// vCPU's) kill part-vmm (`on`), are logged by the kernel and allowed
    /// (`log`, for debugging), or are not filtered (`off`). Installed once
    /// the VM is built, before the first vCPU runs.
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: partvisor_seccomp::Mode,
}

fn main() {
    partvisor_runtime::init_logging();

    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            let msg = e.to_string();
            let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            // "the following required arguments were not provided:" names
            // them on the next line; one line keeps both.
            if first.ends_with(':') {
                if let Some(what) = lines.next() {
                    first = format!("{first} {what}");
                }
            }
            eprintln!("part-vmm: {first}");
            std::process::exit(STATUS_BAD_INPUT);
        }
    };
    let overrides = Overrides {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        memory_mib: cli.memory_mib,
        vcpus: cli.vcpus,
        serial: cli.serial,
        stop_timeout_ms: cli.stop_timeout_ms,
        devices: cli
            .vhost_user_blk
            .into_iter()
            .map(|socket| DeviceConfig::VhostUserBlk { socket })
            .chain(
                cli.vhost_user_net
                    .into_iter()
                    .map(|socket| DeviceConfig::VhostUserNet { socket }),
            )
            .chain(
                cli.vhost_user_vsock
                    .zip(cli.vsock_cid)
                    .map(|(socket, guest_cid)| DeviceConfig::VhostUserVsock { socket, guest_cid }),
            )
            .collect(),
    };
    let opts = part_vmm::vmm::RunOptions {
        control_socket: cli.control_socket,
        exit_file: cli.exit_file,
        kvm_fd: cli.kvm_fd,
        memory_reserved: cli.memory_reserved,
        seccomp: cli.seccomp,
    };
    let result = part_vmm::config::assemble(cli.config.as_deref(), overrides)
        .and_then(|cfg| part_vmm::vmm::run(&cfg, &opts));
    match result {
        Ok(reason) => {
            tracing::info!("exit: {reason}");
            std::process::exit(reason.status());
        }
        Err(e) => {
            let status = if e.is_bad_input() {
                STATUS_BAD_INPUT
            } else {
                STATUS_VMM_ERROR
            };
            eprintln!("part-vmm: {e}");
            std::process::exit(status);
        }
    }
}
