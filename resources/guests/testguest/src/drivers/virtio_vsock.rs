//! virtio-vsock over virtio-mmio (virtio 1.x, modern only), at CPL 3:
//! queue 0 receives, queue 1 transmits; the event queue (2) is left
//! disabled (it only carries transport resets, which this guest does not
//! survive anyway). Stream sockets only: no vsock feature bit is asked
//! for. Every buffer is one descriptor of [`BUF_SIZE`] bytes: the 44-byte
//! `virtio_vsock_hdr` and up to [`MAX_PAYLOAD`] payload bytes. Descriptor
//! `d` of a queue always uses buffer `d` of that queue.
//!
//! The caller sleeps in HLT (`abi::wait`) and calls [`Vsock::service`]
//! after every wakeup, as for virtio-net.

use crate::arch::{irq_count, Irq};
use crate::drivers::virtio_mmio::{
    Desc, NegotiateError, SplitQueue, Transport, DESC_F_WRITE, F_RING_EVENT_IDX, RING_BYTES,
    STATUS_DRIVER_OK, STATUS_FAILED,
};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Device id of a socket device.
pub const DEVICE_VSOCK: u32 = 19;
/// Everything the driver accepts when offered (VERSION_1 is required).
const WANTED: u64 = F_RING_EVENT_IDX;
/// `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Bytes per buffer.
pub const BUF_SIZE: usize = 4096;
/// Payload bytes a buffer holds.
pub const MAX_PAYLOAD: usize = BUF_SIZE - HDR_LEN;
/// Receive queue index.
pub const RX: u32 = 0;
/// Transmit queue index.
pub const TX: u32 = 1;
/// Buffers per queue (the queue size, if the device allows that many).
const NQ: usize = 64;

/// Memory the device reads and writes. Identity mapped.
#[repr(C, align(4096))]
struct Dma {
    rx_rings: [u8; RING_BYTES],
    tx_rings: [u8; RING_BYTES],
    rx: [[u8; BUF_SIZE]; NQ],
    tx: [[u8; BUF_SIZE]; NQ],
}

struct DmaCell(UnsafeCell<Dma>);
// SAFETY: only the BSP runs workloads, and only one `Vsock` (which holds
// `DMA_TAKEN`) touches it at a time.
unsafe impl Sync for DmaCell {}

static DMA: DmaCell = DmaCell(UnsafeCell::new(Dma {
    rx_rings: [0; RING_BYTES],
    tx_rings: [0; RING_BYTES],
    rx: [[0; BUF_SIZE]; NQ],
    tx: [[0; BUF_SIZE]; NQ],
}));
/// Held by the one live [`Vsock`].
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

fn dma() -> *mut Dma {
    DMA.0.get()
}

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// Not a modern (version 2) virtio-mmio socket device.
    NotModernVsock,
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
            InitError::NotModernVsock => "not a modern virtio-mmio socket device",
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
    /// A used element named a buffer the driver had not posted (queue), or
    /// a receive length outside the buffer.
    UnknownBuffer(u32),
}

/// One received packet: buffer `desc` holds `len` bytes (header included).
#[derive(Clone, Copy, Debug)]
pub struct Rx {
    /// Receive buffer (give it back with [`Vsock::recycle`]).
    pub desc: u16,
    /// Used length.
    pub len: usize,
}

/// A live virtio-vsock device. Dropping it resets the device.
pub struct Vsock {
    t: Transport,
    rxq: SplitQueue,
    txq: SplitQueue,
    /// Negotiated features.
    pub features: u64,
    /// The guest's CID (config space).
    pub cid: u64,
    rx_posted: [bool; NQ],
    tx_busy: [bool; NQ],
    tx_in_flight: usize,
    kick_rx: bool,
    kick_tx: bool,
    irq_seen: u64,
    error: Option<DeviceError>,
}

impl Vsock {
    /// Reset, negotiate and start the device behind `t` (its interrupt must
    /// already be routed to `VEC_VIRTIO`), then post every receive buffer.
    pub fn init(t: Transport) -> Result<Vsock, InitError> {
        if !t.is_modern(DEVICE_VSOCK) {
            return Err(InitError::NotModernVsock);
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
            let size = size.min(NQ as u16);
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
        let cid = t.config_u64(0);
        let mut v = Vsock {
            t,
            rxq,
            txq,
            features,
            cid,
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
        while v.rxq.alloc(&mut one) {
            v.recycle(one[0]);
        }
        v.flush();
        Ok(v)
    }

    /// Receive queue size.
    pub fn rx_size(&self) -> u16 {
        self.rxq.size()
    }

    /// Packets handed to the device and not yet completed.
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

    /// The next received packet, if any.
    pub fn recv(&mut self) -> Option<Rx> {
        let u = self.rxq.pop_used()?;
        let d = u.id as usize;
        if d >= NQ || !self.rx_posted[d] || (u.len as usize) < HDR_LEN || u.len as usize > BUF_SIZE
        {
            self.error.get_or_insert(DeviceError::UnknownBuffer(RX));
            return None;
        }
        self.rx_posted[d] = false;
        Some(Rx {
            desc: d as u16,
            len: u.len as usize,
        })
    }

    /// The bytes of a received buffer (until it is recycled).
    pub fn packet(&self, rx: Rx) -> &[u8] {
        assert!(!self.rx_posted[usize::from(rx.desc)], "buffer is posted");
        // SAFETY: the device gave the buffer back (not posted), so it does
        // not write it; `rx.len <= BUF_SIZE`; DMA is ours.
        unsafe {
            let buf = &raw const (*dma()).rx[usize::from(rx.desc)];
            core::slice::from_raw_parts(buf.cast::<u8>(), rx.len)
        }
    }

    /// Give receive buffer `desc` (back) to the device. The notification
    /// waits for [`Vsock::flush`].
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

    /// Queue `hdr` followed by `fill(payload) -> len` payload bytes in one
    /// buffer (notification at [`Vsock::flush`]). False if no buffer is
    /// free or `fill` returned more than [`MAX_PAYLOAD`].
    pub fn send(&mut self, hdr: &[u8; HDR_LEN], fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let mut one = [0u16; 1];
        if !self.txq.alloc(&mut one) {
            return false;
        }
        let d = usize::from(one[0]);
        // SAFETY: the descriptor was free, so the device does not read its
        // buffer; DMA is ours.
        let buf = unsafe { &mut (*dma()).tx[d] };
        buf[..HDR_LEN].copy_from_slice(hdr);
        let len = fill(&mut buf[HDR_LEN..]);
        if len > MAX_PAYLOAD {
            self.txq.release(&one);
            return false;
        }
        let addr = buf.as_ptr() as u64;
        self.txq.set_desc(
            one[0],
            Desc {
                addr,
                len: (HDR_LEN + len) as u32,
                flags: 0,
                next: 0,
            },
        );
        self.tx_busy[d] = true;
        self.tx_in_flight += 1;
        self.kick_tx |= self.txq.publish(one[0]);
        true
    }

    /// Notify the device of what [`Vsock::recycle`] and [`Vsock::send`]
    /// queued.
    pub fn flush(&mut self) {
        if core::mem::take(&mut self.kick_rx) {
            self.t.notify(RX);
        }
        if core::mem::take(&mut self.kick_tx) {
            self.t.notify(TX);
        }
    }

    /// Ask for an interrupt at the next used element of either queue.
    /// Returns whether something arrived meanwhile (do not sleep).
    pub fn arm(&mut self) -> bool {
        let rx = self.rxq.arm_interrupt();
        let tx = self.txq.arm_interrupt();
        rx || tx
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The device must stop touching DMA before anyone reuses it.
        self.t.reset_and_release(&DMA_TAKEN, "vsock");
    }
}
