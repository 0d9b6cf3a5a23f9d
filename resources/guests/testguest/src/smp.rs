//! Application processors: the BSP starts them one at a time with INIT /
//! SIPI / SIPI (LAPIC ICR writes at CPL 3); each AP comes up through the
//! trampoline in `cpl0.rs`, reports itself, sends the BSP a fixed IPI and
//! idles in HLT.

use crate::arch::{self, irq_count, irq_total, Irq, MAX_CPUS, VEC_AP_ONLINE};
use crate::drivers::lapic;
use crate::pvh::StartInfo;
use crate::say;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// APs that have reported online.
static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// Where the APs send their online IPI.
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);

/// How long the BSP waits for each AP.
pub const AP_TIMEOUT_NS: u64 = 1_000_000_000;

/// Wait (HLT, interrupt-driven) until `done()` or `ns` nanoseconds passed,
/// bounded by the LAPIC one-shot timer. Returns whether `done()` held.
pub fn wait_until(ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let fired = irq_count(Irq::Timer);
    lapic::timer_oneshot_ns(ns);
    loop {
        let seen = irq_total();
        if done() {
            lapic::timer_oneshot_ns(0);
            return true;
        }
        if irq_count(Irq::Timer) != fired && lapic::timer_expired() {
            return false;
        }
        crate::abi::wait(seen);
    }
}

/// Idle forever at zero CPU cost.
pub fn idle_forever() -> ! {
    loop {
        crate::abi::wait(irq_total());
    }
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// A free RAM page below 640 KiB for the real-mode trampoline: 0x8000
/// unless something the boot loader handed over lives there.
fn trampoline_page(si: &StartInfo, si_paddr: u64) -> Option<u64> {
    let cmdline_len = si.cmdline().len() as u64 + 1;
    let busy = [
        (si_paddr, 0x38),
        (si.memmap_paddr, 24 * u64::from(si.memmap_entries)),
        (si.modlist_paddr, 32 * u64::from(si.nr_modules)),
        (si.cmdline_paddr, cmdline_len),
        (
            si.first_module().map_or(0, |m| m.paddr),
            si.first_module().map_or(0, |m| m.size),
        ),
    ];
    core::iter::once(crate::cpl0::AP_TRAMPOLINE)
        .chain((0x1000u64..0x9F000).step_by(0x1000))
        .find(|&page| {
            let in_ram = si
                .memmap()
                .any(|e| e.kind == 1 && e.addr <= page && page + 0x1000 <= e.addr + e.size);
            in_ram
                && !busy
                    .iter()
                    .any(|&(b, l)| l != 0 && overlaps(page, 0x1000, b, l))
        })
}

/// Start every enabled MADT CPU other than the BSP. On timeout returns
/// `Err(online)`, the number of CPUs online (BSP included).
pub fn start_aps(si: &StartInfo, apic_ids: &[u32]) -> Result<(), usize> {
    let me = lapic::id();
    BSP_APIC_ID.store(me, Ordering::SeqCst);
    if apic_ids.iter().all(|&id| id == me) {
        return Ok(());
    }
    let Some(page) = trampoline_page(si, arch::start_info_paddr()) else {
        say!("cpu: no free page below 640 KiB for the AP trampoline");
        return Err(1);
    };
    // SAFETY: the trampoline is position-independent 16-bit code in .cpl0;
    // `page` is free RAM (checked above) and identity mapped.
    unsafe {
        let start = &raw const crate::cpl0::ap_tramp_start;
        let end = &raw const crate::cpl0::ap_tramp_end;
        let len = end as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
    }
    let aps = apic_ids.iter().filter(|&&id| id != me).take(MAX_CPUS - 1);
    for (slot, &id) in (1..).zip(aps) {
        arch::set_ap_slot(slot);
        let before = ONLINE.load(Ordering::SeqCst);
        lapic::send_init(id);
        lapic::send_sipi(id, (page >> 12) as u8);
        lapic::send_sipi(id, (page >> 12) as u8);
        if !wait_until(AP_TIMEOUT_NS, || ONLINE.load(Ordering::SeqCst) > before) {
            return Err(1 + ONLINE.load(Ordering::SeqCst));
        }
    }
    Ok(())
}

/// CPL 3 entry of an AP (slot >= 1).
pub fn ap_main(slot: usize) -> ! {
    let _ = slot;
    lapic::enable();
    say!("cpu {}: online", lapic::id());
    ONLINE.fetch_add(1, Ordering::SeqCst);
    lapic::send_fixed(BSP_APIC_ID.load(Ordering::SeqCst), VEC_AP_ONLINE);
    idle_forever()
}

/// A bound on waiting that tolerates slow progress: the LAPIC one-shot timer
/// is armed once for `period_ns`; when it runs down, the wait has timed out
/// unless [`Watchdog::progress`] was called since it was armed, in which case
/// it is re-armed. So every wait ends within two periods of the last
/// progress, and the timer doubles as a clock ([`Watchdog::elapsed_ns`]).
pub struct Watchdog {
    fired: u64,
    period: u32,
    epochs: u64,
    progressed: bool,
}

impl Watchdog {
    /// Arm the timer (at most `u32::MAX` ns, about 4.29 s, per period).
    pub fn start(period_ns: u64) -> Watchdog {
        let period = period_ns.clamp(1, u64::from(u32::MAX)) as u32;
        let fired = irq_count(Irq::Timer);
        lapic::timer_oneshot_ns(u64::from(period));
        Watchdog {
            fired,
            period,
            epochs: 0,
            progressed: false,
        }
    }

    /// Something the waiter waits for happened.
    pub fn progress(&mut self) {
        self.progressed = true;
    }

    /// Whether the bound is exceeded: a whole period without progress.
    pub fn expired(&mut self) -> bool {
        if irq_count(Irq::Timer) == self.fired || !lapic::timer_expired() {
            return false;
        }
        if !self.progressed {
            return true;
        }
        self.progressed = false;
        self.epochs += 1;
        self.fired = irq_count(Irq::Timer);
        lapic::timer_oneshot_ns(u64::from(self.period));
        false
    }

    /// Nanoseconds since [`Watchdog::start`] (LAPIC timer ticks; the time
    /// between a period's end and its re-arming is not counted).
    pub fn elapsed_ns(&self) -> u64 {
        let left = u64::from(lapic::timer_remaining()).min(u64::from(self.period));
        self.epochs * u64::from(self.period) + u64::from(self.period) - left
    }

    /// Stop the timer; returns [`Watchdog::elapsed_ns`].
    pub fn stop(self) -> u64 {
        let ns = self.elapsed_ns();
        lapic::timer_oneshot_ns(0);
        ns
    }
}
