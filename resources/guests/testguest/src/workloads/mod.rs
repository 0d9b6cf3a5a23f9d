//! Everything the guest does after bring-up, at CPL 3: the boot report and
//! the actions named by cmdline words. Later issues add workloads here
//! (virtio block/net/vsock exercisers, benchmarks), one module each.

pub mod actions;
pub mod report;

use crate::drivers::platform;
use crate::say;

/// What bring-up learned, for the actions.
pub struct Boot {
    /// End of the highest type-1 (RAM) memmap entry.
    pub ram_end: u64,
    /// IOAPIC base from the MADT, if any.
    pub ioapic: Option<u64>,
    /// FADT sleep control port, if any.
    pub sleep_port: Option<u16>,
    /// The BSP's APIC id (interrupt destination).
    pub bsp_apic_id: u32,
}

/// Print `exit: <code>` and end the VM with `code` through the debug-exit
/// port. If the VMM ignores the port, idle.
pub fn exit(code: u32) -> ! {
    say!("exit: {code}");
    platform::debug_exit(code);
    crate::smp::idle_forever()
}

/// Interpret the cmdline words in order, then exit.
pub fn run(cmdline: &str, boot: &Boot) -> ! {
    let mut code = 0;
    for word in cmdline.split_ascii_whitespace() {
        match word.split_once('=') {
            Some(("exit", n)) => match n.parse::<u8>() {
                Ok(n) => code = u32::from(n),
                Err(_) => say!("warn: unknown word {word}"),
            },
            Some(("probe", "unassigned")) => actions::probe_unassigned(boot),
            Some(("echo", n)) => match n.parse::<u32>() {
                Ok(n) => actions::echo(boot, n),
                Err(_) => say!("warn: unknown word {word}"),
            },
            Some(("crash", "triple")) => actions::crash_triple(),
            Some(("crash", "int3")) => actions::crash_int3(),
            None if word == "stay" => actions::stay(boot),
            None if word == "reset" => actions::reset(),
            _ => say!("warn: unknown word {word}"),
        }
    }
    exit(code)
}
