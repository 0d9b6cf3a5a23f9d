//! virtio-net over virtio-mmio (virtio 1.x, modern only), at CPL 3: queue
//! 0 receives, queue 1 transmits (no control queue, no multiqueue, no
//! offloads, no MRG_RXBUF). Every buffer is one descriptor of
//! [`BUF_SIZE`] bytes: the 12-byte `virtio_net_hdr_v1` followed by one
//! Ethernet frame (no FCS). Descriptor `d` of a queue always uses buffer
//! `d` of that queue, so a used element names its buffer directly.
//!
//! The caller sleeps in HLT (`abi::wait`) and calls [`Net::service`] after
//! every wakeup: it acknowledges the interrupt before the rings are looked
//! at (a completion after the ACK raises a new edge), reaps transmit
//! completions and notices DEVICE_NEEDS_RESET.

use crate::arch::{irq_count, Irq};
use crate::drivers::virtio_mmio::{
    Desc, NegotiateError, SplitQueue, Transport, DESC_F_WRITE, F_RING_EVENT_IDX, QUEUE_MAX,
    RING_BYTES, STATUS_DRIVER_OK, STATUS_FAILED,
};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Device id of a network device.
pub const DEVICE_NET: u32 = 1;
/// The device's MAC is in config space bytes 0..6.
pub const F_MAC: u64 = 1 << 5;
/// Everything the driver accepts when offered (VERSION_1 is required).
const WANTED: u64 = F_MAC | F_RING_EVENT_IDX;
/// `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers).
pub const HDR_LEN: usize = 12;
/// Bytes per buffer: header + the longest frame, rounded up.
pub const BUF_SIZE: usize = 2048;
/// Longest frame a buffer takes.
pub const MAX_FRAME: usize = BUF_SIZE - HDR_LEN;
/// Receive queue index.
pub const RX: u32 = 0;
/// Transmit queue index.
pub const TX: u32 = 1;

const NQ: usize = QUEUE_MAX as usize;

/// Memory the device reads and writes. Identity mapped.
#[repr(C, align(4096))]
struct Dma {
    rx_rings: [u8; RING_BYTES],
    tx_rings: [u8; RING_BYTES],
    rx: [[u8; BUF_SIZE]; NQ],
    tx: [[u8; BUF_SIZE]; NQ],
}

struct DmaCell(UnsafeCell<Dma>);
// SAFETY: only the BSP runs workloads, and only one `Net` (which holds
// `DMA_TAKEN`) touches it at a time.
unsafe impl Sync for DmaCell {}

static DMA: DmaCell = DmaCell(UnsafeCell::new(Dma {
    rx_rings: [0; RING_BYTES],
    tx_rings: [0; RING_BYTES],
    rx: [[0; BUF_SIZE]; NQ],
    tx: [[0; BUF_SIZE]; NQ],
}));
/// Held by the one live [`Net`].
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

fn dma() -> *mut Dma {
    DMA.0.get()
}

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// Not a modern (version 2) virtio-mmio network device.
    NotModernNet,
    /// Reset or feature negotiation failed.
    Negotiate(NegotiateError),
    /// A queue is missing (QueueNumMax 0) or already live.
    QueueUnavailable(u32),
    /// Another driver instance owns the DMA memory.
    Busy,
}

impl InitError {
    /// What went wrong, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            InitError::NotModernNet => "not a modern virtio-mmio network device",
            InitError::Negotiate(e) => e.describe(),
            InitError::QueueUnavailable(0) => "receive queue 0 missing or already ready",
            InitError::QueueUnavailable(_) => "transmit queue 1 missing or already ready",
            InitError::Busy => {
                "an earlier device never finished its reset, its buffers stay reserved"
            }
        }
    }
}

/// Something the queues cannot be trusted with any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// A used element named a buffer the driver had not posted (queue).
    UnknownBuffer(u32),
}

/// One received frame: buffer `desc` holds `len` frame bytes after the header.
#[derive(Clone, Copy, Debug)]
pub struct Rx {
    /// Receive buffer (give it back with [`Net::recycle`]).
    pub desc: u16,
    /// Frame length (used length minus the header).
    pub len: usize,
}

/// A live virtio-net device. Dropping it resets the device.
pub struct Net {
    t: Transport,
    rxq: SplitQueue,
    txq: SplitQueue,
    /// Negotiated features.
    pub features: u64,
    /// The device's MAC (config space with VIRTIO_NET_F_MAC, else
    /// `02:70:76:00:00:<gsi>`).
    pub mac: [u8; 6],
    rx_posted: [bool; NQ],
    tx_busy: [bool; NQ],
    tx_in_flight: usize,
    kick_rx: bool,
    kick_tx: bool,
    irq_seen: u64,
    error: Option<DeviceError>,
}

impl Net {
    /// Reset, negotiate and start the device behind `t` (its interrupt must
    /// already be routed to `VEC_VIRTIO`), then post every receive buffer.
    pub fn init(t: Transport) -> Result<Net, InitError> {
        if !t.is_modern(DEVICE_NET) {
            return Err(InitError::NotModernNet);
        }
        if DMA_TAKEN.swap(true, Ordering::Acquire) {
            return Err(InitError::Busy);
        }
        let fail = |e: InitError| {
            t.add_status(STATUS_FAILED);
            DMA_TAKEN.store(false, Ordering::Release);
            Err(e)
        };
        let features = match t.negotiate(WANTED) {
            Ok(f) => f,
            Err(e) => return fail(InitError::Negotiate(e)),
        };
        let event_idx = features & F_RING_EVENT_IDX != 0;
        let d = dma();
        let mut queues = [None, None];
        for (index, q) in [RX, TX].into_iter().zip(queues.iter_mut()) {
            let Some(size) = t.queue_size(index) else {
                return fail(InitError::QueueUnavailable(index));
            };
            // SAFETY: both ring areas are page-aligned RING_BYTES inside
            // DMA, which this instance owns (DMA_TAKEN) until it is dropped,
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
        let mac = if features & F_MAC != 0 {
            let lo = t.config_u32(0).to_le_bytes();
            let hi = t.config_u32(4).to_le_bytes();
            [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]]
        } else {
            [0x02, 0x70, 0x76, 0, 0, t.gsi as u8]
        };
        let mut net = Net {
            t,
            rxq,
            txq,
            features,
            mac,
            rx_posted: [false; NQ],
            tx_busy: [false; NQ],
            tx_in_flight: 0,
            kick_rx: false,
            kick_tx: false,
            irq_seen: irq_count(Irq::Virtio),
            error: None,
        };
        t.add_status(STATUS_DRIVER_OK);
        let mut one = [0u16; 1];
        while net.rxq.alloc(&mut one) {
            net.recycle(one[0]);
        }
        net.flush();
        Ok(net)
    }

    /// Receive queue size (= receive buffers posted when idle).
    pub fn rx_size(&self) -> u16 {
        self.rxq.size()
    }

    /// Transmit queue size.
    pub fn tx_size(&self) -> u16 {
        self.txq.size()
    }

    /// Frames handed to the device and not yet completed.
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
            if d < NQ && self.tx_busy[d] {
                self.tx_busy[d] = false;
                self.tx_in_flight -= 1;
                self.txq.release(&[d as u16]);
            } else {
                self.error.get_or_insert(DeviceError::UnknownBuffer(TX));
            }
        }
    }

    /// The next received frame, if any.
    pub fn recv(&mut self) -> Option<Rx> {
        let u = self.rxq.pop_used()?;
        let d = u.id as usize;
        if d >= NQ || !self.rx_posted[d] {
            self.error.get_or_insert(DeviceError::UnknownBuffer(RX));
            return None;
        }
        self.rx_posted[d] = false;
        let len = (u.len as usize).clamp(HDR_LEN, BUF_SIZE) - HDR_LEN;
        Some(Rx {
            desc: d as u16,
            len,
        })
    }

    /// The frame bytes of a received buffer (until it is recycled).
    pub fn frame(&self, rx: Rx) -> &[u8] {
        assert!(!self.rx_posted[usize::from(rx.desc)], "buffer is posted");
        // SAFETY: the device gave the buffer back (not posted), so it does
        // not write it; `rx.len <= MAX_FRAME`; DMA is ours.
        unsafe {
            let buf = &raw const (*dma()).rx[usize::from(rx.desc)];
            core::slice::from_raw_parts(buf.cast::<u8>().add(HDR_LEN), rx.len)
        }
    }

    /// Give receive buffer `desc` (back) to the device. The notification
    /// waits for [`Net::flush`].
    pub fn recycle(&mut self, desc: u16) {
        let d = usize::from(desc);
        assert!(d < NQ && !self.rx_posted[d], "buffer already posted");
        // SAFETY: in DMA, which is ours.
        let addr = unsafe { &raw const (*dma()).rx[d] as u64 };
        self.rxq.set_desc(
            desc,
            Desc {
                addr,
                len: BUF_SIZE as u32,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.rx_posted[d] = true;
        self.kick_rx |= self.rxq.publish(desc);
    }

    /// Fill a free transmit buffer with `build(frame) -> len` and queue it
    /// (notification at [`Net::flush`]). False if no buffer is free or
    /// `build` returned 0 or more than [`MAX_FRAME`].
    pub fn send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let mut one = [0u16; 1];
        if !self.txq.alloc(&mut one) {
            return false;
        }
        let d = usize::from(one[0]);
        // SAFETY: the descriptor was free, so the device does not read its
        // buffer; DMA is ours.
        let buf = unsafe { &mut (*dma()).tx[d] };
        buf[..HDR_LEN].fill(0);
        let len = build(&mut buf[HDR_LEN..]);
        if len == 0 || len > MAX_FRAME {
            self.txq.release(&one);
            return false;
        }
        let addr = buf.as_ptr() as u64;
        self.post_tx(one[0], addr, (HDR_LEN + len) as u32);
        true
    }

    /// Queue a malformed transmit buffer: one descriptor of `bytes` zero
    /// bytes (fewer than [`HDR_LEN`] makes it shorter than its own
    /// header). False if no buffer is free.
    pub fn send_truncated(&mut self, bytes: u32) -> bool {
        let mut one = [0u16; 1];
        if !self.txq.alloc(&mut one) {
            return false;
        }
        let d = usize::from(one[0]);
        // SAFETY: the descriptor was free, so the device does not read its
        // buffer; DMA is ours.
        let buf = unsafe { &mut (*dma()).tx[d] };
        buf.fill(0);
        let addr = buf.as_ptr() as u64;
        self.post_tx(one[0], addr, bytes.min(BUF_SIZE as u32));
        true
    }

    /// Hand transmit descriptor `desc` (taken with `alloc`), one buffer of
    /// `len` bytes at `addr`, to the device (notification at [`Net::flush`]).
    fn post_tx(&mut self, desc: u16, addr: u64, len: u32) {
        self.txq.set_desc(
            desc,
            Desc {
                addr,
                len,
                flags: 0,
                next: 0,
            },
        );
        self.tx_busy[usize::from(desc)] = true;
        self.tx_in_flight += 1;
        self.kick_tx |= self.txq.publish(desc);
    }

    /// Notify the device of what [`Net::recycle`] and [`Net::send`] queued.
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

    /// Ask for an interrupt at the next used element of either queue.
    /// Returns whether something arrived meanwhile (do not sleep).
    pub fn arm(&mut self) -> bool {
        let rx = self.rxq.arm_interrupt();
        let tx = self.txq.arm_interrupt();
        rx || tx
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The device must stop touching DMA before anyone reuses it.
        self.t.reset_and_release(&DMA_TAKEN, "net");
    }
}
