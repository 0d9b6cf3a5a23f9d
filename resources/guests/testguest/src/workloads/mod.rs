//! Everything the guest does after bring-up, at CPL 3: the boot report and
//! the actions named by cmdline words. Later issues add workloads here
//! (virtio block/net/vsock exercisers, benchmarks), one module each.

pub mod actions;
pub mod blk;
pub mod clock;
pub mod net;
pub mod report;
pub mod vsock;

use crate::drivers::{lapic, platform};
use crate::say;
use crate::words::{
    parse_blk, parse_net, parse_virtio_mmio, parse_vsock, BLK_KEY, NET_KEY, VIRTIO_MMIO_KEY,
    VSOCK_KEY,
};

/// What bring-up learned, for the actions.
pub struct Boot {
    /// End of the highest type-1 (RAM) memmap entry.
    pub ram_end: u64,
    /// IOAPIC base from the MADT, if any.
    pub ioapic: Option<u64>,
    /// IOAPICs as (base, first GSI): the MADT's, else the default one.
    pub ioapics: [(u64, u32); crate::acpi::MAX_IOAPICS],
    /// Valid entries of `ioapics`.
    pub nr_ioapics: usize,
    /// FADT sleep control port, if any.
    pub sleep_port: Option<u16>,
    /// The BSP's APIC id (interrupt destination).
    pub bsp_apic_id: u32,
}

impl Boot {
    /// Route `gsi` (edge, active high) to `vector` on the BSP; false if no
    /// IOAPIC has that input.
    pub fn route_gsi(&self, gsi: u32, vector: u8) -> bool {
        for &(base, first) in &self.ioapics[..self.nr_ioapics] {
            if gsi >= first && gsi - first < lapic::ioapic_pins(base) {
                lapic::ioapic_route(base, (gsi - first) as u8, vector, self.bsp_apic_id);
                return true;
            }
        }
        false
    }
}

/// Print `exit: <code>` and end the VM with `code` through the debug-exit
/// port. If the VMM ignores the port, idle.
pub fn exit(code: u32) -> ! {
    say!("exit: {code}");
    platform::debug_exit(code);
    crate::smp::idle_forever()
}

/// Interpret the cmdline words, then exit: first every
/// `virtio_mmio.device=` declaration (wherever it is: QEMU appends them),
/// then the other words in order. The exit code is the first failure's
/// (see `blk` and `net`), else the last `exit=N`, else 0.
pub fn run(cmdline: &str, boot: &Boot) -> ! {
    let mut code = 0;
    let mut failure = None;
    let mut devices = blk::Devices::new();
    let mut net = net::NetState::new();
    let mut vsock = vsock::VsockState::new();
    for word in cmdline.split_ascii_whitespace() {
        if let Some((VIRTIO_MMIO_KEY, value)) = word.split_once('=') {
            match parse_virtio_mmio(value) {
                Some(decl) => devices.declare(decl),
                None => say!("warn: unknown word {word}"),
            }
        }
    }
    for word in cmdline.split_ascii_whitespace() {
        match word.split_once('=') {
            Some((VIRTIO_MMIO_KEY, _)) => {}
            Some((BLK_KEY, value)) => match parse_blk(value) {
                Some(w) => {
                    if let Err(c) = devices.run(boot, w) {
                        failure.get_or_insert(c);
                    }
                }
                None => say!("warn: unknown word {word}"),
            },
            Some((NET_KEY, value)) => match parse_net(value) {
                Some(w) => {
                    if let Err(c) = net.run(boot, &devices, w) {
                        failure.get_or_insert(c);
                    }
                }
                None => say!("warn: unknown word {word}"),
            },
            Some((VSOCK_KEY, value)) => match parse_vsock(value) {
                Some(w) => {
                    if let Err(c) = vsock.run(boot, &devices, w) {
                        failure.get_or_insert(c);
                    }
                }
                None => say!("warn: unknown word {word}"),
            },
            Some(("exit", n)) => match n.parse::<u8>() {
                Ok(n) => code = u32::from(n),
                Err(_) => say!("warn: unknown word {word}"),
            },
            Some(("probe", "unassigned")) => actions::probe_unassigned(boot),
            Some(("echo", n)) => match n.parse::<u32>() {
                Ok(n) => actions::echo(boot, n),
                Err(_) => say!("warn: unknown word {word}"),
            },
            Some(("flood", n)) => match n.parse::<u32>() {
                Ok(n) => actions::flood(boot, n),
                Err(_) => say!("warn: unknown word {word}"),
            },
            Some(("crash", "triple")) => actions::crash_triple(),
            Some(("crash", "int3")) => actions::crash_int3(),
            None if word == "stay" => actions::stay(boot),
            None if word == "reset" => actions::reset(),
            _ => say!("warn: unknown word {word}"),
        }
    }
    drop(vsock);
    drop(net);
    drop(devices);
    exit(failure.unwrap_or(code))
}
