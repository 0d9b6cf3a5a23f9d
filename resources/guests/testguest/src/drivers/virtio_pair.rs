//! The part virtio-net and virtio-vsock share: a device with a receive
//! queue (0) and a transmit queue (1), each buffer one descriptor of a fixed
//! size per queue (`RXB`, `TXB` bytes), descriptor `d` of a queue always
//! using buffer `d` of that queue, so a used element names its buffer
//! directly. It owns the device's DMA
//! memory while it lives, and resetting the device (on drop) gives it back.
//!
//! The caller sleeps in HLT (`abi::wait`) and calls [`Pair::service`] after
//! every wakeup: it acknowledges the interrupt before the rings are looked
//! at (a completion after the ACK raises a new edge), reaps transmit
//! completions and notices DEVICE_NEEDS_RESET.

use crate::arch::{irq_count, Irq};
use crate::drivers::virtio_mmio::{
    Desc, NegotiateError, SplitQueue, Transport, DESC_F_WRITE, F_RING_EVENT_IDX, RING_BYTES,
    STATUS_DRIVER_OK, STATUS_FAILED,
};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Receive queue index.
pub const RX: u32 = 0;
/// Transmit queue index.
pub const TX: u32 = 1;

/// Memory the device reads and writes: rings, `N` receive buffers of
/// `RXB` bytes and `N` transmit buffers of `TXB` bytes. Identity mapped.
#[repr(C, align(4096))]
struct Dma<const RXB: usize, const TXB: usize, const N: usize> {
    rx_rings: [u8; RING_BYTES],
    tx_rings: [u8; RING_BYTES],
    rx: [[u8; RXB]; N],
    tx: [[u8; TXB]; N],
}

/// One driver's DMA memory and the flag of the one [`Pair`] using it.
pub struct DmaCell<const RXB: usize, const TXB: usize, const N: usize> {
    dma: UnsafeCell<Dma<RXB, TXB, N>>,
    taken: AtomicBool,
}

// SAFETY: only the BSP runs workloads, and only one `Pair` (which holds
// `taken`) touches the memory at a time.
unsafe impl<const RXB: usize, const TXB: usize, const N: usize> Sync for DmaCell<RXB, TXB, N> {}

impl<const RXB: usize, const TXB: usize, const N: usize> DmaCell<RXB, TXB, N> {
    /// Zeroed memory, free.
    pub const fn new() -> Self {
        DmaCell {
            dma: UnsafeCell::new(Dma {
                rx_rings: [0; RING_BYTES],
                tx_rings: [0; RING_BYTES],
                rx: [[0; RXB]; N],
                tx: [[0; TXB]; N],
            }),
            taken: AtomicBool::new(false),
        }
    }

    fn get(&self) -> *mut Dma<RXB, TXB, N> {
        self.dma.get()
    }
}

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// Not a modern (version 2) virtio-mmio device of the wanted type.
    NotModern,
    /// Reset or feature negotiation failed.
    Negotiate(NegotiateError),
    /// A queue is missing (QueueNumMax 0) or already live.
    QueueUnavailable(u32),
    /// Another driver instance owns the DMA memory.
    Busy,
}

impl InitError {
    /// What went wrong, for the report; `what` names the device kind
    /// ("network", "socket").
    pub fn describe(self, what: &'static str) -> DescribeInit {
        DescribeInit { e: self, what }
    }
}

/// [`InitError`] with the device kind, printable.
pub struct DescribeInit {
    e: InitError,
    what: &'static str,
}

impl core::fmt::Display for DescribeInit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.e {
            InitError::NotModern => write!(f, "not a modern virtio-mmio {} device", self.what),
            InitError::Negotiate(e) => f.write_str(e.describe()),
            InitError::QueueUnavailable(0) => {
                f.write_str("receive queue 0 missing or already ready")
            }
            InitError::QueueUnavailable(_) => {
                f.write_str("transmit queue 1 missing or already ready")
            }
            InitError::Busy => {
                f.write_str("an earlier device never finished its reset, its buffers stay reserved")
            }
        }
    }
}

/// Something the queues cannot be trusted with any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// A used element named a buffer the driver had not posted (queue), or
    /// a used length outside the buffer.
    UnknownBuffer(u32),
}

/// One receive buffer the device gave back: buffer `desc`, `len` bytes used.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    pub desc: u16,
    pub len: usize,
}

/// A live receive/transmit device. Dropping it resets the device.
pub struct Pair<const RXB: usize, const TXB: usize, const N: usize> {
    pub t: Transport,
    rxq: SplitQueue,
    txq: SplitQueue,
    /// Negotiated features.
    pub features: u64,
    dma: &'static DmaCell<RXB, TXB, N>,
    name: &'static str,
    rx_posted: [bool; N],
    tx_busy: [bool; N],
    tx_in_flight: usize,
    kick_rx: bool,
    kick_tx: bool,
    irq_seen: u64,
    error: Option<DeviceError>,
}

impl<const RXB: usize, const TXB: usize, const N: usize> Pair<RXB, TXB, N> {
    /// Reset, negotiate `wanted` and start the device `device_id` behind
    /// `t` (its interrupt must already be routed to `VEC_VIRTIO`), with
    /// queues of at most `N` entries in `dma`; `name` is the driver's in
    /// reset warnings. Every receive buffer is posted before it returns.
    pub fn init(
        t: Transport,
        device_id: u32,
        wanted: u64,
        dma: &'static DmaCell<RXB, TXB, N>,
        name: &'static str,
    ) -> Result<Self, InitError> {
        if !t.is_modern(device_id) {
            return Err(InitError::NotModern);
        }
        if dma.taken.swap(true, Ordering::Acquire) {
            return Err(InitError::Busy);
        }
        let fail = |e: InitError| {
            t.add_status(STATUS_FAILED);
            dma.taken.store(false, Ordering::Release);
            Err(e)
        };
        let features = match t.negotiate(wanted) {
            Ok(f) => f,
            Err(e) => return fail(InitError::Negotiate(e)),
        };
        let event_idx = features & F_RING_EVENT_IDX != 0;
        let d = dma.get();
        let mut queues = [None, None];
        for (index, q) in [RX, TX].into_iter().zip(queues.iter_mut()) {
            let Some(size) = t.queue_size(index) else {
                return fail(InitError::QueueUnavailable(index));
            };
            let size = size.min(N as u16);
            // SAFETY: both ring areas are page-aligned RING_BYTES inside
            // DMA, which this instance owns (`taken`) until it is dropped,
            // and the drop resets the device before giving it up.
            let sq = unsafe {
                let mem = if index == RX {
                    (&raw mut (*d).rx_rings).cast::<u8>()
                } else {
                    (&raw mut (*d).tx_rings).cast::<u8>()
                };
                SplitQueue::new(mem, size, event_idx)
            };
            t.activate_queue(size, sq.rings());
            *q = Some(sq);
        }
        let [Some(rxq), Some(txq)] = queues else {
            return fail(InitError::QueueUnavailable(RX));
        };
        let mut p = Pair {
            t,
            rxq,
            txq,
            features,
            dma,
            name,
            rx_posted: [false; N],
            tx_busy: [false; N],
            tx_in_flight: 0,
            kick_rx: false,
            kick_tx: false,
            irq_seen: irq_count(Irq::Virtio),
            error: None,
        };
        t.add_status(STATUS_DRIVER_OK);
        let mut one = [0u16; 1];
        while p.rxq.alloc(&mut one) {
            p.recycle(one[0]);
        }
        p.flush();
        Ok(p)
    }

    /// Receive queue size (= receive buffers posted when idle).
    pub fn rx_size(&self) -> u16 {
        self.rxq.size()
    }

    /// Transmit queue size.
    pub fn tx_size(&self) -> u16 {
        self.txq.size()
    }

    /// Buffers handed to the device and not yet completed.
    pub fn tx_in_flight(&self) -> usize {
        self.tx_in_flight
    }

    /// The first device error seen, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.error
    }

    /// After a wakeup: acknowledge the interrupt (if there was one since the
    /// last call) and reap transmit completions.
    pub fn service(&mut self) {
        if self.t.take_interrupt(&mut self.irq_seen) {
            self.error.get_or_insert(DeviceError::NeedsReset);
        }
        while let Some(u) = self.txq.pop_used() {
            let d = u.id as usize;
            if d < N && self.tx_busy[d] {
                self.tx_busy[d] = false;
                self.tx_in_flight -= 1;
                self.txq.release(&[d as u16]);
            } else {
                self.error.get_or_insert(DeviceError::UnknownBuffer(TX));
            }
        }
    }

    /// The next receive buffer the device gave back, if any. A used length
    /// `len_ok` refuses is a device error.
    pub fn recv(&mut self, len_ok: impl Fn(usize) -> bool) -> Option<Used> {
        let u = self.rxq.pop_used()?;
        let d = u.id as usize;
        let len = u.len as usize;
        if d >= N || !self.rx_posted[d] || !len_ok(len) {
            self.error.get_or_insert(DeviceError::UnknownBuffer(RX));
            return None;
        }
        self.rx_posted[d] = false;
        Some(Used {
            desc: d as u16,
            len,
        })
    }

    /// Bytes `from..to` of receive buffer `desc` (until it is recycled).
    pub fn rx_bytes(&self, desc: u16, from: usize, to: usize) -> &[u8] {
        let d = usize::from(desc);
        assert!(!self.rx_posted[d], "buffer is posted");
        assert!(from <= to && to <= RXB, "range inside the buffer");
        // SAFETY: the device gave the buffer back (not posted), so it does
        // not write it; the range is inside it; DMA is ours.
        unsafe {
            let buf = &raw const (*self.dma.get()).rx[d];
            core::slice::from_raw_parts(buf.cast::<u8>().add(from), to - from)
        }
    }

    /// Give receive buffer `desc` (back) to the device. The notification
    /// waits for [`Pair::flush`].
    pub fn recycle(&mut self, desc: u16) {
        let d = usize::from(desc);
        assert!(d < N && !self.rx_posted[d], "buffer already posted");
        // SAFETY: in DMA, which is ours.
        let addr = unsafe { &raw const (*self.dma.get()).rx[d] as u64 };
        self.rxq.set_desc(
            desc,
            Desc {
                addr,
                len: RXB as u32,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.rx_posted[d] = true;
        self.kick_rx |= self.rxq.publish(desc);
    }

    /// Fill a free transmit buffer with `fill(buffer) -> len` and queue
    /// its first `len` bytes (notification at [`Pair::flush`]). False if
    /// no buffer is free or `fill` returned 0 or more than `TXB`.
    pub fn send(&mut self, fill: impl FnOnce(&mut [u8; TXB]) -> usize) -> bool {
        let mut one = [0u16; 1];
        if !self.txq.alloc(&mut one) {
            return false;
        }
        let d = usize::from(one[0]);
        // SAFETY: the descriptor was free, so the device does not read its
        // buffer; DMA is ours.
        let buf = unsafe { &mut (*self.dma.get()).tx[d] };
        let len = fill(buf);
        if len == 0 || len > TXB {
            self.txq.release(&one);
            return false;
        }
        let addr = buf.as_ptr() as u64;
        self.txq.set_desc(
            one[0],
            Desc {
                addr,
                len: len as u32,
                flags: 0,
                next: 0,
            },
        );
        self.tx_busy[d] = true;
        self.tx_in_flight += 1;
        self.kick_tx |= self.txq.publish(one[0]);
        true
    }

    /// Notify the device of what [`Pair::recycle`] and [`Pair::send`]
    /// queued.
    pub fn flush(&mut self) {
        if core::mem::take(&mut self.kick_rx) {
            self.t.notify(RX);
        }
        if core::mem::take(&mut self.kick_tx) {
            self.t.notify(TX);
        }
    }

    /// Ask for an interrupt at the next transmit completion. Returns
    /// whether one arrived meanwhile (do not sleep).
    pub fn arm_tx(&mut self) -> bool {
        self.txq.arm_interrupt()
    }

    /// Ask for an interrupt at the next received buffer only (transmit
    /// completions are reaped at the next wakeup). Returns whether one
    /// arrived meanwhile (do not sleep).
    pub fn arm_rx(&mut self) -> bool {
        self.rxq.arm_interrupt()
    }

    /// Ask for an interrupt at the next used element of either queue.
    /// Returns whether something arrived meanwhile (do not sleep).
    pub fn arm(&mut self) -> bool {
        let rx = self.rxq.arm_interrupt();
        let tx = self.txq.arm_interrupt();
        rx || tx
    }
}

impl<const RXB: usize, const TXB: usize, const N: usize> Drop for Pair<RXB, TXB, N> {
    fn drop(&mut self) {
        // The device must stop touching DMA before anyone reuses it.
        self.t.reset_and_release(&self.dma.taken, self.name);
    }
}
