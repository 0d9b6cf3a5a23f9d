//! The legacy devices a partition sees and the bus that routes port and MMIO
//! exits to them.
//!
//! - COM1: `vm_superio::Serial`, IRQ 4 through an irqfd;
//! - i8042: `vm_superio::I8042Device` (CPU reset only);
//! - debug-exit port 0xf4, ACPI sleep control/status registers;
//! - GED: the ACPI Generic Event Device that carries the power button.
//!
//! Anything else is unassigned: reads return all ones, writes are dropped,
//! and every access is counted (the first [`UNASSIGNED_LOG_LIMIT`] are also
//! logged one line each).

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use partvisor_runtime::sync::MutexExt;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vm_superio::serial::SerialEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::ExitReason;
use crate::layout;
use crate::virtio::VirtioMmio;

/// How many unassigned accesses are logged individually before part-vmm only
/// counts them.
pub const UNASSIGNED_LOG_LIMIT: u64 = 32;
/// Serial output kept for a console client that connects late.
pub const SERIAL_BACKLOG: usize = 64 * 1024;

/// An eventfd as a `vm_superio` interrupt/reset trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event loop when the guest has drained the receive FIFO, so
/// buffered console input can be pushed.
pub struct SerialRoom(pub EventFd);

impl SerialEvents for SerialRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A lost wake-up only delays input until the next console byte.
        let _ = self.0.write(1);
    }
}

/// A console client on the serial socket, with what it missed.
#[derive(Default)]
pub struct SocketConsole {
    state: Mutex<SocketState>,
}

#[derive(Default)]
struct SocketState {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

impl SocketConsole {
    fn state(&self) -> MutexGuard<'_, SocketState> {
        self.state.locked()
    }

    /// Makes `client` the console, first sending it the backlog.
    pub fn attach(&self, mut client: UnixStream) -> io::Result<()> {
        let mut st = self.state();
        let (a, b) = st.backlog.as_slices();
        client.write_all(a)?;
        client.write_all(b)?;
        st.client = Some(client);
        Ok(())
    }

    pub fn detach(&self) {
        self.state().client = None;
    }

    fn write_out(&self, buf: &[u8]) {
        let mut st = self.state();
        st.backlog.extend(buf);
        let excess = st.backlog.len().saturating_sub(SERIAL_BACKLOG);
        st.backlog.drain(..excess);
        if let Some(c) = st.client.as_mut() {
            if c.write_all(buf).is_err() {
                st.client = None;
            }
        }
    }
}

/// Where serial output goes.
pub enum SerialOut {
    Stdout(io::Stdout),
    File(File),
    Socket(Arc<SocketConsole>),
    Null,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Stdout(s) => s.write(buf),
            SerialOut::File(f) => f.write(buf),
            SerialOut::Socket(c) => {
                c.write_out(buf);
                Ok(buf.len())
            }
            SerialOut::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOut::Stdout(s) => s.flush(),
            SerialOut::File(f) => f.flush(),
            SerialOut::Socket(_) | SerialOut::Null => Ok(()),
        }
    }
}

pub type SerialDevice = Serial<EventFdTrigger, SerialRoom, SerialOut>;

/// Counters of unassigned accesses.
#[derive(Debug, Default)]
pub struct UnassignedCounters {
    pub mmio_reads: AtomicU64,
    pub mmio_writes: AtomicU64,
    pub pio_reads: AtomicU64,
    pub pio_writes: AtomicU64,
}

impl UnassignedCounters {
    fn total(&self) -> u64 {
        self.mmio_reads.load(Ordering::Relaxed)
            + self.mmio_writes.load(Ordering::Relaxed)
            + self.pio_reads.load(Ordering::Relaxed)
            + self.pio_writes.load(Ordering::Relaxed)
    }

    /// One-line summary for the exit log.
    pub fn summary(&self) -> String {
        format!(
            "unassigned accesses: mmio_reads={} mmio_writes={} pio_reads={} pio_writes={}",
            self.mmio_reads.load(Ordering::Relaxed),
            self.mmio_writes.load(Ordering::Relaxed),
            self.pio_reads.load(Ordering::Relaxed),
            self.pio_writes.load(Ordering::Relaxed)
        )
    }
}

/// The address space of a guest access.
#[derive(Debug, Clone, Copy)]
enum Space {
    Mmio,
    Pio,
}

/// A request a device access makes of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum BusAction {
    None,
    Exit(ExitReason),
}

/// All platform devices, shared by the vCPU threads and the event loop.
pub struct Devices {
    pub serial: Mutex<SerialDevice>,
    pub i8042: Mutex<I8042Device<EventFdTrigger>>,
    /// GED pending events (cleared on guest read) and its interrupt.
    ged_pending: AtomicU32,
    ged_irq: EventFd,
    /// virtio-mmio transports, in slot order.
    pub virtio: Vec<Mutex<VirtioMmio>>,
    /// Serial output bytes that could not be written out.
    pub serial_lost: AtomicU64,
    pub unassigned: UnassignedCounters,
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl Devices {
    pub fn new(
        serial_irq: EventFd,
        serial_room: EventFd,
        out: SerialOut,
        reset_evt: EventFd,
        ged_irq: EventFd,
    ) -> Devices {
        Devices {
            serial: Mutex::new(Serial::with_events(
                EventFdTrigger(serial_irq),
                SerialRoom(serial_room),
                out,
            )),
            i8042: Mutex::new(I8042Device::new(EventFdTrigger(reset_evt))),
            ged_pending: AtomicU32::new(0),
            ged_irq,
            virtio: Vec::new(),
            serial_lost: AtomicU64::new(0),
            unassigned: UnassignedCounters::default(),
        }
    }

    /// Adds the virtio transports (before any vCPU runs).
    pub fn with_virtio(mut self, devices: Vec<VirtioMmio>) -> Devices {
        self.virtio = devices.into_iter().map(Mutex::new).collect();
        self
    }

    fn virtio_at(&self, addr: u64) -> Option<MutexGuard<'_, VirtioMmio>> {
        let index = addr.checked_sub(layout::VIRTIO_MMIO_BASE)? / layout::VIRTIO_MMIO_SIZE;
        let dev = self.virtio.get(usize::try_from(index).ok()?)?;
        Some(dev.locked())
    }

    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.locked()
    }

    fn i8042(&self) -> MutexGuard<'_, I8042Device<EventFdTrigger>> {
        self.i8042.locked()
    }

    /// Raises a GED event (e.g. the power button) and its interrupt.
    pub fn ged_raise(&self, event: u32) -> io::Result<()> {
        self.ged_pending.fetch_or(event, Ordering::SeqCst);
        self.ged_irq.write(1)
    }

    /// GED events raised and not yet read by the guest.
    pub fn ged_pending(&self) -> u32 {
        self.ged_pending.load(Ordering::SeqCst)
    }

    /// Pulses the GED interrupt again for events the guest has not read: an
    /// edge that arrived while the guest had the pin masked is lost.
    pub fn ged_repulse(&self) -> io::Result<bool> {
        if self.ged_pending() == 0 {
            return Ok(false);
        }
        self.ged_irq.write(1)?;
        Ok(true)
    }

    fn note_unassigned(&self, space: Space, addr: u64, len: usize, write: bool, value: u32) {
        let c = &self.unassigned;
        let (counter, kind, what) = match (space, write) {
            (Space::Mmio, false) => (&c.mmio_reads, "mmio", "read"),
            (Space::Mmio, true) => (&c.mmio_writes, "mmio", "write"),
            (Space::Pio, false) => (&c.pio_reads, "pio", "read"),
            (Space::Pio, true) => (&c.pio_writes, "pio", "write"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let n = self.unassigned.total();
        if n <= UNASSIGNED_LOG_LIMIT {
            if write {
                tracing::warn!("unassigned {kind} {what} at {addr:#x} ({len} bytes, value {value:#x}): dropped");
            } else {
                tracing::warn!("unassigned {kind} {what} at {addr:#x} ({len} bytes): all ones");
            }
            if n == UNASSIGNED_LOG_LIMIT {
                tracing::warn!("further unassigned accesses are counted, not logged");
            }
        }
    }

    /// A guest `in` from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + layout::SERIAL_PORT_LEN)
                .contains(&p) =>
            {
                let mut s = self.serial();
                for b in data.iter_mut() {
                    *b = s.read((p - layout::SERIAL_PORT) as u8);
                }
            }
            layout::I8042_DATA_PORT | layout::I8042_COMMAND_PORT => {
                let v = self.i8042().read((port - layout::I8042_DATA_PORT) as u8);
                data.fill(v);
            }
            layout::SLEEP_CONTROL_PORT | layout::SLEEP_STATUS_PORT => data.fill(0),
            p if (layout::DEBUG_EXIT_PORT
                ..layout::DEBUG_EXIT_PORT + layout::DEBUG_EXIT_PORT_LEN)
                .contains(&p) =>
            {
                data.fill(0)
            }
            _ => {
                data.fill(0xff);
                self.note_unassigned(Space::Pio, u64::from(port), data.len(), false, 0);
            }
        }
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + layout::SERIAL_PORT_LEN)
                .contains(&p) =>
            {
                let mut s = self.serial();
                for b in data {
                    if let Err(e) = s.write((p - layout::SERIAL_PORT) as u8, *b) {
                        // Once per run: a closed stdout would otherwise log
                        // a line for every byte the guest prints.
                        if self.serial_lost.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(
                                "serial output lost a byte ({e}); further losses are counted"
                            );
                        }
                    }
                }
                BusAction::None
            }
            layout::I8042_DATA_PORT | layout::I8042_COMMAND_PORT => {
                let off = (port - layout::I8042_DATA_PORT) as u8;
                for b in data {
                    if let Err(e) = self.i8042().write(off, *b) {
                        return BusAction::Exit(ExitReason::VmmError {
                            detail: format!("cannot signal the i8042 reset: {e}"),
                        });
                    }
                }
                BusAction::None
            }
            layout::DEBUG_EXIT_PORT => BusAction::Exit(ExitReason::GuestExit {
                code: le_value(data),
            }),
            layout::SLEEP_CONTROL_PORT => {
                let v = data.first().copied().unwrap_or(0);
                let slp_en = v & (1 << 5) != 0;
                let slp_typ = (v >> 2) & 0x7;
                if slp_en && slp_typ == layout::S5_SLEEP_TYPE {
                    BusAction::Exit(ExitReason::PowerOff)
                } else {
                    // A guest can write this port in a loop: rate-limited.
                    static LIMIT: Limiter = Limiter::new(8, Duration::from_secs(1));
                    if let Some(n) = LIMIT.allow() {
                        tracing::info!(
                            "guest wrote sleep control {v:#x}: only S5 (soft off) is supported, ignored{}",
                            suppressed_note(n)
                        );
                    }
                    BusAction::None
                }
            }
            layout::SLEEP_STATUS_PORT => BusAction::None,
            p if (layout::DEBUG_EXIT_PORT
                ..layout::DEBUG_EXIT_PORT + layout::DEBUG_EXIT_PORT_LEN)
                .contains(&p) =>
            {
                BusAction::None
            }
            _ => {
                self.note_unassigned(
                    Space::Pio,
                    u64::from(port),
                    data.len(),
                    true,
                    le_value(data),
                );
                BusAction::None
            }
        }
    }

    /// A guest read of unmapped guest-physical memory.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (layout::GED_MMIO..layout::GED_MMIO + layout::GED_MMIO_SIZE).contains(&addr) {
            let v = self.ged_pending.swap(0, Ordering::SeqCst).to_le_bytes();
            let off = (addr - layout::GED_MMIO) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(off + i).copied().unwrap_or(0);
            }
            return;
        }
        if let Some(mut dev) = self.virtio_at(addr) {
            dev.read(addr, data);
            return;
        }
        data.fill(0xff);
        self.note_unassigned(Space::Mmio, addr, data.len(), false, 0);
    }

    /// A guest write to unmapped guest-physical memory.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if (layout::GED_MMIO..layout::GED_MMIO + layout::GED_MMIO_SIZE).contains(&addr) {
            return;
        }
        if let Some(mut dev) = self.virtio_at(addr) {
            dev.write(addr, data);
            return;
        }
        self.note_unassigned(Space::Mmio, addr, data.len(), true, le_value(data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (Devices, EventFd, EventFd) {
        let ged = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = Devices::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            SerialOut::Null,
            reset.try_clone().unwrap(),
            ged.try_clone().unwrap(),
        );
        (d, ged, reset)
    }

    #[test]
    fn unassigned_mmio_reads_all_ones_and_counts() {
        let (d, _, _) = devices();
        let mut buf = [0u8; 4];
        d.mmio_read(0x4000_0000, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        d.mmio_write(0x4000_0000, &[1, 2, 3, 4]);
        assert_eq!(d.unassigned.mmio_reads.load(Ordering::Relaxed), 1);
        assert_eq!(d.unassigned.mmio_writes.load(Ordering::Relaxed), 1);
        assert!(d
            .unassigned
            .summary()
            .contains("mmio_reads=1 mmio_writes=1"));
    }

    #[test]
    fn debug_exit_port_carries_the_guest_code() {
        let (d, _, _) = devices();
        assert_eq!(
            d.pio_write(layout::DEBUG_EXIT_PORT, &7u32.to_le_bytes()),
            BusAction::Exit(ExitReason::GuestExit { code: 7 })
        );
    }

    #[test]
    fn sleep_control_s5_powers_off_and_other_states_are_ignored() {
        let (d, _, _) = devices();
        assert_eq!(
            d.pio_write(layout::SLEEP_CONTROL_PORT, &[0x34]),
            BusAction::Exit(ExitReason::PowerOff)
        );
        assert_eq!(
            d.pio_write(layout::SLEEP_CONTROL_PORT, &[0x14]),
            BusAction::None
        );
    }

    #[test]
    fn ged_power_button_is_pending_until_read_once() {
        let (d, ged, _) = devices();
        d.ged_raise(layout::GED_EVENT_POWER_BUTTON).unwrap();
        assert_eq!(ged.read().unwrap(), 1);
        let mut buf = [0u8; 4];
        d.mmio_read(layout::GED_MMIO, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), layout::GED_EVENT_POWER_BUTTON);
        d.mmio_read(layout::GED_MMIO, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 0);
    }

    #[test]
    fn ged_interrupt_is_resent_only_while_the_event_is_unread() {
        let (d, ged, _) = devices();
        assert!(!d.ged_repulse().unwrap(), "nothing pending, nothing sent");
        d.ged_raise(layout::GED_EVENT_POWER_BUTTON).unwrap();
        assert!(d.ged_repulse().unwrap());
        assert_eq!(ged.read().unwrap(), 2, "raise + one re-pulse");
        let mut buf = [0u8; 4];
        d.mmio_read(layout::GED_MMIO, &mut buf);
        assert!(
            !d.ged_repulse().unwrap(),
            "read by the guest: no more pulses"
        );
    }

    #[test]
    fn i8042_reset_command_signals_the_reset_event() {
        let (d, _, reset) = devices();
        assert_eq!(
            d.pio_write(layout::I8042_COMMAND_PORT, &[0xfe]),
            BusAction::None
        );
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn socket_console_replays_backlog_to_a_late_client() {
        use std::io::Read;
        let c = SocketConsole::default();
        c.write_out(b"early ");
        let (a, mut b) = UnixStream::pair().unwrap();
        c.attach(a).unwrap();
        c.write_out(b"late");
        c.detach();
        let mut s = String::new();
        b.read_to_string(&mut s).unwrap();
        assert_eq!(s, "early late");
    }
}
