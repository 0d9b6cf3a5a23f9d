//! Builds a partition from a [`VmConfig`] and runs it to its end.
//!
//! The main thread owns the event loop (event-manager): stop signals, the
//! polite-stop timer, the i8042 reset event, serial input and the exit event
//! the vCPU threads post. The vCPU threads only run guest code and touch
//! devices; they never block the loop.

use partvisor_runtime::sync::MutexExt;
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{self, DeviceConfig, HostLimits, SerialConfig, VmConfig};
use crate::devices::{Devices, SerialOut, SocketConsole};
use crate::error::{Error, Result};
use crate::exit::ExitReason;
use crate::memory::GuestRam;
use crate::vcpu::{ExitSlot, Vcpu};
use crate::virtio::{DeviceKind, VirtioMmio};
use crate::{acpi, boot, control, layout};

/// How often an unread power-button event is signalled again.
const GED_REPULSE_MS: u64 = 500;

fn timerfd() -> Result<TimerFd> {
    TimerFd::new().map_err(|e| Error::io("timerfd")(e.into()))
}

/// Most console input part-vmm buffers while the guest is not reading.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Blocks the stop signals in the calling thread (and so in every thread it
/// spawns afterwards) and returns a signalfd that receives them.
fn stop_signalfd() -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Io {
            what: "pthread_sigmask".into(),
            source: std::io::Error::from_raw_os_error(r),
        });
    }
    // SAFETY: -1 asks for a new signalfd for the initialised `set`.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("signalfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The serial input side: stdin, or a console socket with one client.
enum InputSource {
    None,
    Stdin,
    Socket {
        listener: UnixListener,
        client: Option<UnixStream>,
        console: Arc<SocketConsole>,
    },
}

/// The event-loop subscriber that decides when and why the partition ends.
struct Controller {
    devices: Arc<Devices>,
    exits: Arc<ExitSlot>,
    signals: OwnedFd,
    reset_evt: EventFd,
    serial_room: EventFd,
    stop_timer: TimerFd,
    /// Re-pulses the power-button interrupt until the guest reads the GED.
    ged_timer: TimerFd,
    stop_timeout_ms: u64,
    stopping: bool,
    input: InputSource,
    pending_input: VecDeque<u8>,
    input_paused: bool,
    /// vhost-user backend sockets (fd, virtio slot), watched for hang-ups.
    backends: Vec<(RawFd, usize)>,
    /// The supervisor's control socket and its connected clients.
    control: Option<UnixListener>,
    control_clients: Vec<ControlClient>,
    started: std::time::Instant,
    outcome: Option<ExitReason>,
}

struct ControlClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// Longest control request line accepted.
const MAX_CONTROL_LINE: usize = 4096;

impl Controller {
    fn input_fd(&self) -> Option<RawFd> {
        match &self.input {
            InputSource::Stdin => Some(0),
            InputSource::Socket {
                client: Some(c), ..
            } => Some(c.as_raw_fd()),
            _ => None,
        }
    }

    fn finish(&mut self, r: ExitReason) {
        if self.outcome.is_none() {
            self.outcome = Some(r);
        }
    }

    fn request_stop(&mut self) {
        if self.stopping {
            tracing::warn!("second stop request: forcing the stop now");
            self.finish(ExitReason::ForcedStop { timeout_ms: 0 });
            return;
        }
        self.stopping = true;
        tracing::info!(
            "stop requested: pressing the ACPI power button; forced stop in {} ms",
            self.stop_timeout_ms
        );
        if let Err(e) = self.devices.ged_raise(layout::GED_EVENT_POWER_BUTTON) {
            tracing::error!("cannot raise the power-button interrupt: {e}");
        }
        let period = Duration::from_millis(GED_REPULSE_MS);
        if let Err(e) = self.ged_timer.reset(period, Some(period)) {
            tracing::warn!("cannot arm the GED re-pulse timer: {e}");
        }
        if let Err(e) = self
            .stop_timer
            .reset(Duration::from_millis(self.stop_timeout_ms.max(1)), None)
        {
            tracing::error!("cannot arm the stop timer ({e}): forcing the stop now");
            self.finish(ExitReason::ForcedStop { timeout_ms: 0 });
        }
    }

    fn drain_signals(&mut self) {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reads at most `size` bytes into `info`, which is that big.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    &mut info as *mut _ as *mut libc::c_void,
                    size,
                )
            };
            if n != size as isize {
                break;
            }
            tracing::info!("received signal {}", info.ssi_signo);
            self.request_stop();
        }
    }

    /// Pushes buffered input into the UART's FIFO as far as it has room.
    fn push_input(&mut self) {
        let mut serial = self.devices.serial();
        while !self.pending_input.is_empty() && serial.fifo_capacity() > 0 {
            let (a, _) = self.pending_input.as_slices();
            match serial.enqueue_raw_bytes(a) {
                Ok(n) => {
                    self.pending_input.drain(..n);
                }
                Err(e) => {
                    tracing::warn!("serial input: {e}");
                    break;
                }
            }
        }
    }

    fn read_input(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        // SAFETY: `fd` is stdin or our client socket, open for the lifetime of
        // the controller; `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                return;
            }
            // End of input: stop watching it (stdin at EOF, client gone).
            let _ = ops.remove(Events::empty_raw(fd));
            match &mut self.input {
                InputSource::Socket {
                    client, console, ..
                } => {
                    console.detach();
                    *client = None;
                }
                other => *other = InputSource::None,
            }
            return;
        }
        self.pending_input.extend(&buf[..n as usize]);
        self.push_input();
        if self.pending_input.len() >= MAX_PENDING_INPUT && !self.input_paused {
            // Leave further input in the kernel until the guest reads.
            let _ = ops.modify(Events::empty_raw(fd));
            self.input_paused = true;
        }
    }

    fn resume_input(&mut self, ops: &mut EventOps) {
        self.push_input();
        if self.input_paused && self.pending_input.len() < MAX_PENDING_INPUT {
            if let Some(fd) = self.input_fd() {
                let _ = ops.modify(Events::new_raw(fd, EventSet::IN));
            }
            self.input_paused = false;
        }
    }

    fn accept_control(&mut self, ops: &mut EventOps) {
        let Some(listener) = &self.control else {
            return;
        };
        while let Ok((stream, _)) = listener.accept() {
            if stream.set_nonblocking(true).is_err()
                || ops.add(Events::new(&stream, EventSet::IN)).is_err()
            {
                continue;
            }
            self.control_clients.push(ControlClient {
                stream,
                buf: Vec::new(),
            });
        }
    }

    fn control_reply(&self, ok: bool) -> control::Reply {
        control::Reply {
            ok,
            pid: Some(std::process::id()),
            state: Some(if self.stopping { "stopping" } else { "running" }.into()),
            uptime_ms: Some(self.started.elapsed().as_millis() as u64),
            error: None,
        }
    }

    fn serve_control(&mut self, i: usize, ops: &mut EventOps) {
        let mut chunk = [0u8; 1024];
        let n = match (&self.control_clients[i].stream).read(&mut chunk) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        if n == 0 {
            let c = self.control_clients.swap_remove(i);
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
            return;
        }
        self.control_clients[i].buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = self.control_clients[i].buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.control_clients[i].buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            let reply = match control::parse(text.trim()) {
                Ok(control::Request::Ping) => self.control_reply(true),
                Ok(control::Request::Stop { force }) => {
                    if force {
                        tracing::info!("control: forced stop requested");
                        self.finish(ExitReason::ForcedStop { timeout_ms: 0 });
                    } else if !self.stopping {
                        self.request_stop();
                    }
                    self.control_reply(true)
                }
                Err(reject) => reject,
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            if (&self.control_clients[i].stream).write_all(&out).is_err() {
                let c = self.control_clients.swap_remove(i);
                let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
                return;
            }
        }
        if self.control_clients[i].buf.len() > MAX_CONTROL_LINE {
            tracing::warn!("control: request line too long; closing the connection");
            let c = self.control_clients.swap_remove(i);
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
        }
    }

    fn accept_client(&mut self, ops: &mut EventOps) {
        let InputSource::Socket {
            listener,
            client,
            console,
        } = &mut self.input
        else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if let Some(old) = client.take() {
            tracing::info!("serial console: a new client replaces the previous one");
            let _ = ops.remove(Events::new(&old, EventSet::IN));
        }
        match stream.try_clone().and_then(|w| console.attach(w)) {
            Ok(()) => {
                let _ = stream.set_nonblocking(true);
                let _ = ops.add(Events::new(&stream, EventSet::IN));
                *client = Some(stream);
            }
            Err(e) => tracing::warn!("serial console client dropped: {e}"),
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            self.signals.as_raw_fd(),
            self.exits.evt.as_raw_fd(),
            self.reset_evt.as_raw_fd(),
            self.serial_room.as_raw_fd(),
            self.stop_timer.as_raw_fd(),
            self.ged_timer.as_raw_fd(),
        ];
        if let Some(l) = &self.control {
            fds.push(l.as_raw_fd());
        }
        match &self.input {
            InputSource::Stdin => {
                // Regular files and /dev/null cannot be polled (EPERM): such
                // a stdin simply has no input to give the guest.
                if ops.add(Events::new_raw(0, EventSet::IN)).is_err() {
                    tracing::info!("stdin cannot be polled; serial input disabled");
                    self.input = InputSource::None;
                }
            }
            InputSource::Socket { listener, .. } => fds.push(listener.as_raw_fd()),
            InputSource::None => {}
        }
        for (fd, _) in &self.backends {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::READ_HANG_UP)) {
                tracing::error!("event loop: cannot watch backend fd {fd}: {e}");
            }
        }
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("event loop: cannot watch fd {fd}: {e}");
                self.finish(ExitReason::VmmError {
                    detail: format!("event loop setup failed: {e}"),
                });
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exits.evt.as_raw_fd() {
            let _ = self.exits.evt.read();
            if let Some(r) = self.exits.take() {
                self.finish(r);
            }
        } else if fd == self.signals.as_raw_fd() {
            self.drain_signals();
        } else if fd == self.stop_timer.as_raw_fd() {
            let _ = self.stop_timer.wait();
            self.finish(ExitReason::ForcedStop {
                timeout_ms: self.stop_timeout_ms,
            });
        } else if fd == self.ged_timer.as_raw_fd() {
            let _ = self.ged_timer.wait();
            match self.devices.ged_repulse() {
                Ok(true) => tracing::debug!("power button not acknowledged yet; interrupt re-sent"),
                Ok(false) => {
                    let _ = self.ged_timer.clear();
                }
                Err(e) => tracing::warn!("cannot re-send the GED interrupt: {e}"),
            }
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.finish(ExitReason::Reset { source: "i8042" });
        } else if let Some(&(_, slot)) = self.backends.iter().find(|(b, _)| *b == fd) {
            let _ = ops.remove(Events::new_raw(fd, EventSet::READ_HANG_UP));
            self.backends.retain(|(b, _)| *b != fd);
            if let Some(dev) = self.devices.virtio.get(slot) {
                dev.locked().backend_gone();
            }
        } else if fd == self.serial_room.as_raw_fd() {
            let _ = self.serial_room.read();
            self.resume_input(ops);
        } else if matches!(&self.input, InputSource::Socket { listener, .. } if listener.as_raw_fd() == fd)
        {
            self.accept_client(ops);
        } else if Some(fd) == self.input_fd() {
            // Readable, or HUP/ERR: read_input treats a 0-byte read as EOF.
            self.read_input(fd, ops);
        } else if self.control.as_ref().is_some_and(|l| l.as_raw_fd() == fd) {
            self.accept_control(ops);
        } else if let Some(i) = self
            .control_clients
            .iter()
            .position(|c| c.stream.as_raw_fd() == fd)
        {
            self.serve_control(i, ops);
        }
    }
}

fn serial_endpoints(cfg: &SerialConfig) -> Result<(SerialOut, InputSource)> {
    Ok(match cfg {
        SerialConfig::Stdout => {
            // SAFETY: fcntl on stdin only changes its file status flags.
            unsafe {
                let fl = libc::fcntl(0, libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
            (SerialOut::Stdout(std::io::stdout()), InputSource::Stdin)
        }
        SerialConfig::None => (SerialOut::Null, InputSource::None),
        SerialConfig::File(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| Error::SerialOpen {
                    path: p.clone(),
                    source,
                })?;
            (SerialOut::File(f), InputSource::None)
        }
        SerialConfig::Socket(p) => {
            let listener = bind_socket(p, "serial")?;
            let console = Arc::new(SocketConsole::default());
            (
                SerialOut::Socket(console.clone()),
                InputSource::Socket {
                    listener,
                    client: None,
                    console,
                },
            )
        }
    })
}

/// Removes a socket file part-vmm created when the run ends, however it ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Listens on a new Unix socket at `p`; an existing file there is an error
/// (it may belong to another partition).
fn bind_socket(p: &Path, what: &'static str) -> Result<UnixListener> {
    if p.exists() {
        return Err(Error::SocketExists {
            what,
            path: p.to_owned(),
        });
    }
    let l = UnixListener::bind(p).map_err(|source| Error::SocketBind {
        what,
        path: p.to_owned(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(Error::io(format!("{what} socket {}", p.display())))?;
    Ok(l)
}

/// Checks the configuration against this host and KVM, before any guest
/// state exists. Errors here are bad input.
pub fn check(cfg: &VmConfig, opts: &RunOptions) -> Result<Kvm> {
    let kvm = match opts.kvm_fd {
        // SAFETY: the descriptor was handed to this process for KVM (by
        // partd, `--kvm-fd`) and nothing else in it uses that number; the
        // Kvm object owns it from here.
        Some(fd) => unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        None => Kvm::new().map_err(Error::kvm("cannot open /dev/kvm"))?,
    };
    if kvm.get_api_version() != 12 {
        return Err(Error::NotKvm);
    }
    config::validate(cfg, &HostLimits::probe(&kvm, !opts.memory_reserved)?)?;
    boot::detect_format(&cfg.kernel)?;
    if let Some(initrd) = &cfg.initrd {
        partvisor_runtime::inherited::open(initrd, false)
            .and_then(|mut f| f.read(&mut [0u8; 1]))
            .map_err(|source| Error::InitrdUnreadable {
                path: initrd.clone(),
                source,
            })?;
    }
    Ok(kvm)
}

/// Process-level options of one part-vmm run (not part of the partition's
/// descriptor): where the supervisor talks to it and where it records its end.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub control_socket: Option<std::path::PathBuf>,
    pub exit_file: Option<std::path::PathBuf>,
    /// An open /dev/kvm to use instead of opening it (a jailed monitor has
    /// no /dev).
    pub kvm_fd: Option<std::os::fd::RawFd>,
    /// The guest's memory was reserved by a resource manager (partd's
    /// map): the host's free memory is not checked (and `/proc/meminfo`
    /// not read, which a jailed monitor cannot see).
    pub memory_reserved: bool,
    /// What the threads' seccomp filters do (installed once the VM is
    /// built, before its vCPUs run).
    pub seccomp: partvisor_seccomp::Mode,
}

/// Runs the partition described by `cfg` until it ends, and records the end
/// in the exit file if one is configured.
pub fn run(cfg: &VmConfig, opts: &RunOptions) -> Result<ExitReason> {
    let result = run_partition(cfg, opts);
    if let Some(path) = &opts.exit_file {
        let reason = match &result {
            Ok(r) => r.clone(),
            Err(e) => ExitReason::VmmError {
                detail: e.to_string(),
            },
        };
        if let Err(e) = control::write_exit_file(path, &control::exit_record(&reason)) {
            tracing::error!("cannot write the exit file {}: {e}", path.display());
        }
    }
    result
}

fn run_partition(cfg: &VmConfig, opts: &RunOptions) -> Result<ExitReason> {
    let kvm = check(cfg, opts)?;
    let control = match &opts.control_socket {
        Some(p) => Some(bind_socket(p, "control")?),
        None => None,
    };
    let _control_file = opts.control_socket.clone().map(RemoveOnDrop);
    let signals = stop_signalfd()?;
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(Error::kvm("KVM_CREATE_PIT2"))?;

    let ram = GuestRam::new(cfg.memory_mib)?;
    ram.register(&vm)?;
    let virtio = cfg
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            DeviceConfig::VhostUserBlk { socket } => {
                VirtioMmio::connect(i, DeviceKind::Block, socket, &vm, &ram.memory)
            }
            DeviceConfig::VhostUserNet { socket } => {
                VirtioMmio::connect(i, DeviceKind::Net, socket, &vm, &ram.memory)
            }
            DeviceConfig::VhostUserVsock { socket, guest_cid } => VirtioMmio::connect(
                i,
                DeviceKind::Vsock { cid: *guest_cid },
                socket,
                &vm,
                &ram.memory,
            ),
        })
        .collect::<Result<Vec<_>>>()?;
    let slots: Vec<(u64, u32)> = virtio.iter().map(|d| (d.base, d.gsi)).collect();
    let acpi = acpi::write_tables(&ram.memory, cfg.vcpus, &slots)?;
    let mut cmdline = cfg.cmdline.clone();
    for i in 0..virtio.len() {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&crate::virtio::cmdline_word(i));
    }
    let boot = boot::load(
        &ram.memory,
        ram.size,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &cmdline,
        acpi.rsdp,
    )?;
    crate::vcpu::write_boot_tables(&ram.memory)?;
    tracing::info!(
        "partition: {} vcpus, {} MiB, kernel {} ({:?}), initrd {:?}",
        cfg.vcpus,
        cfg.memory_mib,
        cfg.kernel.display(),
        boot.entry,
        boot.initrd
    );

    let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd"));
    let serial_irq = evt()?;
    let ged_irq = evt()?;
    let reset_evt = evt()?;
    let serial_room = evt()?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_GSI)
        .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
    vm.register_irqfd(&ged_irq, layout::GED_GSI)
        .map_err(Error::kvm("KVM_IRQFD (GED)"))?;
    let (out, input) = serial_endpoints(&cfg.serial)?;
    let _serial_file = match &cfg.serial {
        SerialConfig::Socket(p) => Some(RemoveOnDrop(p.clone())),
        _ => None,
    };
    let backends: Vec<(RawFd, usize)> = virtio
        .iter()
        .enumerate()
        .map(|(i, d)| (d.socket_fd(), i))
        .collect();
    let devices = Arc::new(
        Devices::new(
            serial_irq,
            serial_room.try_clone().map_err(Error::io("eventfd"))?,
            out,
            reset_evt.try_clone().map_err(Error::io("eventfd"))?,
            ged_irq,
        )
        .with_virtio(virtio),
    );

    let exits = ExitSlot::new()?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        let entry = (id == 0).then_some(boot.entry);
        vcpus.push(Vcpu::new(&kvm, &vm, id, cfg.vcpus, entry)?);
    }
    // The VM is built: from here on this thread (the event loop) and the
    // vCPU threads it starts keep to their allowlists.
    partvisor_seccomp::install(partvisor_seccomp::Role::VmmEventLoop, opts.seccomp)
        .map_err(Error::Seccomp)?;
    for mut vcpu in vcpus {
        let devices = devices.clone();
        let exits = exits.clone();
        let affinity = cfg.cpu_affinity.clone();
        let seccomp = opts.seccomp;
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                if let Some(cpus) = affinity {
                    if let Err(e) = crate::vcpu::pin_current_thread(&cpus) {
                        exits.post(ExitReason::VmmError {
                            detail: format!("vcpu {}: cannot pin to CPUs {cpus:?}: {e}", vcpu.id),
                        });
                        return;
                    }
                }
                if let Err(e) =
                    partvisor_seccomp::install(partvisor_seccomp::Role::VmmVcpu, seccomp)
                {
                    exits.post(ExitReason::VmmError {
                        detail: format!("vcpu {}: {e}", vcpu.id),
                    });
                    return;
                }
                let r = vcpu.run(&devices, &exits.stop);
                exits.post(r);
            })
            .map_err(Error::io("cannot start a vCPU thread"))?;
    }

    let controller = Arc::new(Mutex::new(Controller {
        devices: devices.clone(),
        exits: exits.clone(),
        signals,
        reset_evt,
        serial_room,
        stop_timer: timerfd()?,
        ged_timer: timerfd()?,
        stop_timeout_ms: cfg.stop_timeout_ms,
        stopping: false,
        input,
        pending_input: VecDeque::new(),
        input_paused: false,
        backends,
        control,
        control_clients: Vec::new(),
        started: std::time::Instant::now(),
        outcome: None,
    }));
    let mut manager: EventManager<Arc<Mutex<Controller>>> =
        EventManager::new().map_err(Error::EventManager)?;
    manager.add_subscriber(controller.clone());
    let reason = loop {
        if let Err(e) = manager.run() {
            break ExitReason::VmmError {
                detail: format!("event loop: {e}"),
            };
        }
        let mut c = controller.locked();
        if let Some(r) = c.outcome.take() {
            break r;
        }
    };
    exits.stop.store(true, std::sync::atomic::Ordering::Release);
    {
        use std::io::Write;
        let _ = devices.serial().writer_mut().flush();
    }
    tracing::info!("{}", devices.unassigned.summary());
    let lost = devices
        .serial_lost
        .load(std::sync::atomic::Ordering::Relaxed);
    if lost > 0 {
        tracing::warn!("serial output: {lost} bytes could not be written");
    }
    Ok(reason)
}
