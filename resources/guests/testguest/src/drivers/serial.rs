//! 16550 UART at 0x3f8: polled output, interrupt-driven input (IRQ 4).

use crate::arch::{inb, outb};
use core::sync::atomic::{AtomicBool, Ordering};

const BASE: u16 = 0x3f8;
const RBR_THR: u16 = BASE;
const IER: u16 = BASE + 1;
const FCR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Serialises whole lines between CPUs.
static LOCK: AtomicBool = AtomicBool::new(false);

/// 8N1, FIFOs off, interrupts off; OUT2 set so the IRQ line is wired.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x03);
    outb(FCR, 0);
    outb(MCR, 0x0B);
}

/// Raise IRQ 4 when a byte arrives.
pub fn enable_rx_interrupt() {
    outb(IER, 0x01);
}

/// A byte from the receiver, if one is waiting.
pub fn try_read() -> Option<u8> {
    if inb(LSR) & LSR_DATA_READY != 0 {
        Some(inb(RBR_THR))
    } else {
        None
    }
}

fn put(b: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(RBR_THR, b);
}

/// Writer used by `say!` while it holds the line lock.
pub struct Writer;

impl core::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            put(b);
        }
        Ok(())
    }
}

/// Take the line lock (short spin: lines are a few dozen bytes).
pub fn lock() -> Writer {
    while LOCK
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    Writer
}

/// Release the line lock.
pub fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// Panic path: take the lock even if a panicking CPU held it.
pub fn force_lock() -> Writer {
    LOCK.store(true, Ordering::Release);
    Writer
}

/// Print one line (with '\n') to the serial port, whole.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut w = $crate::drivers::serial::lock();
        let _ = writeln!(w, $($arg)*);
        $crate::drivers::serial::unlock();
    }};
}
