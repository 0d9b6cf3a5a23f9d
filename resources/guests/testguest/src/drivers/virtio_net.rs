//! virtio-net over virtio-mmio (virtio 1.x, modern only), at CPL 3: queue
//! 0 receives, queue 1 transmits (no control queue, no multiqueue, no
//! offloads, no MRG_RXBUF). Every buffer is one descriptor of
//! [`BUF_SIZE`] bytes: the 12-byte `virtio_net_hdr_v1` followed by one
//! Ethernet frame (no FCS). Descriptor `d` of a queue always uses buffer
//! `d` of that queue, so a used element names its buffer directly.
//!
//! The queues, buffers and interrupt handling are [`virtio_pair`]'s; the
//! caller calls [`Net::service`] after every wakeup.

use crate::drivers::virtio_mmio::{Transport, F_RING_EVENT_IDX};
use crate::drivers::virtio_pair::{DmaCell, InitError, Pair};

pub use crate::drivers::virtio_pair::DeviceError;

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

const NQ: usize = crate::drivers::virtio_mmio::QUEUE_MAX as usize;

static DMA: DmaCell<BUF_SIZE, BUF_SIZE, NQ> = DmaCell::new();

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
    q: Pair<BUF_SIZE, BUF_SIZE, NQ>,
    /// Negotiated features.
    pub features: u64,
    /// The device's MAC (config space with VIRTIO_NET_F_MAC, else
    /// `02:70:76:00:00:<gsi>`).
    pub mac: [u8; 6],
}

impl Net {
    /// Reset, negotiate and start the device behind `t` (its interrupt must
    /// already be routed to `VEC_VIRTIO`), then post every receive buffer.
    pub fn init(t: Transport) -> Result<Net, InitError> {
        let q = Pair::init(t, DEVICE_NET, WANTED, &DMA, "net")?;
        let features = q.features;
        let mac = if features & F_MAC != 0 {
            let lo = t.config_u32(0).to_le_bytes();
            let hi = t.config_u32(4).to_le_bytes();
            [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]]
        } else {
            [0x02, 0x70, 0x76, 0, 0, t.gsi as u8]
        };
        Ok(Net { q, features, mac })
    }

    /// Receive queue size (= receive buffers posted when idle).
    pub fn rx_size(&self) -> u16 {
        self.q.rx_size()
    }

    /// Transmit queue size.
    pub fn tx_size(&self) -> u16 {
        self.q.tx_size()
    }

    /// Frames handed to the device and not yet completed.
    pub fn tx_in_flight(&self) -> usize {
        self.q.tx_in_flight()
    }

    /// The first device error seen, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.q.error()
    }

    /// After a wakeup: acknowledge the interrupt and reap transmit
    /// completions.
    pub fn service(&mut self) {
        self.q.service();
    }

    /// The next received frame, if any.
    pub fn recv(&mut self) -> Option<Rx> {
        // Any used length is taken: one outside the header and the buffer
        // counts as an empty or a full frame.
        let u = self.q.recv(|_| true)?;
        Some(Rx {
            desc: u.desc,
            len: u.len.clamp(HDR_LEN, BUF_SIZE) - HDR_LEN,
        })
    }

    /// The frame bytes of a received buffer (until it is recycled).
    pub fn frame(&self, rx: Rx) -> &[u8] {
        self.q.rx_bytes(rx.desc, HDR_LEN, HDR_LEN + rx.len)
    }

    /// Give receive buffer `desc` (back) to the device. The notification
    /// waits for [`Net::flush`].
    pub fn recycle(&mut self, desc: u16) {
        self.q.recycle(desc);
    }

    /// Fill a free transmit buffer with `build(frame) -> len` and queue it
    /// (notification at [`Net::flush`]). False if no buffer is free or
    /// `build` returned 0 or more than [`MAX_FRAME`].
    pub fn send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        self.q.send(|buf| {
            buf[..HDR_LEN].fill(0);
            match build(&mut buf[HDR_LEN..]) {
                0 => 0,
                len if len > MAX_FRAME => 0,
                len => HDR_LEN + len,
            }
        })
    }

    /// Queue a malformed transmit buffer: one descriptor of `bytes` zero
    /// bytes (fewer than [`HDR_LEN`] makes it shorter than its own
    /// header). False if no buffer is free.
    pub fn send_truncated(&mut self, bytes: u32) -> bool {
        self.q.send(|buf| {
            buf.fill(0);
            (bytes as usize).clamp(1, BUF_SIZE)
        })
    }

    /// Notify the device of what [`Net::recycle`] and [`Net::send`] queued.
    pub fn flush(&mut self) {
        self.q.flush();
    }

    /// Ask for an interrupt at the next transmit completion. Returns
    /// whether one arrived meanwhile (do not sleep).
    pub fn arm_tx(&mut self) -> bool {
        self.q.arm_tx()
    }

    /// Ask for an interrupt at the next used element of either queue.
    /// Returns whether something arrived meanwhile (do not sleep).
    pub fn arm(&mut self) -> bool {
        self.q.arm()
    }
}
