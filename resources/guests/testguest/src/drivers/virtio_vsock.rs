//! virtio-vsock over virtio-mmio (virtio 1.x, modern only), at CPL 3:
//! queue 0 receives, queue 1 transmits; the event queue (2) is left
//! disabled (it only carries transport resets, which this guest does not
//! survive anyway). Stream sockets only: no vsock feature bit is asked
//! for. Every buffer is one descriptor: a receive buffer of [`RX_BUF`]
//! bytes (the 44-byte `virtio_vsock_hdr` and up to [`RX_PAYLOAD`] bytes, as
//! Linux posts them), a transmit buffer of [`TX_BUF`] (the header and up to
//! [`MAX_PAYLOAD`], 64 KiB, as Linux sends a 64 KiB write). Descriptor `d`
//! of a queue always uses buffer `d` of that queue.
//!
//! The queues, buffers and interrupt handling are [`virtio_pair`]'s, as
//! for virtio-net; the caller calls [`Vsock::service`] after every wakeup.

use crate::drivers::virtio_mmio::{Transport, F_RING_EVENT_IDX};
use crate::drivers::virtio_pair::{DmaCell, InitError, Pair};

pub use crate::drivers::virtio_pair::DeviceError;

/// Device id of a socket device.
pub const DEVICE_VSOCK: u32 = 19;
/// Everything the driver accepts when offered (VERSION_1 is required).
const WANTED: u64 = F_RING_EVENT_IDX;
/// `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Bytes per receive buffer.
pub const RX_BUF: usize = 4096;
/// Payload bytes a receive buffer holds.
pub const RX_PAYLOAD: usize = RX_BUF - HDR_LEN;
/// Largest payload of one transmitted packet (the device's limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bytes per transmit buffer.
pub const TX_BUF: usize = HDR_LEN + MAX_PAYLOAD;
/// Buffers per queue (the queue size, if the device allows that many).
const NQ: usize = 64;

static DMA: DmaCell<RX_BUF, TX_BUF, NQ> = DmaCell::new();

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
    q: Pair<RX_BUF, TX_BUF, NQ>,
    /// Negotiated features.
    pub features: u64,
    /// The guest's CID (config space).
    pub cid: u64,
}

impl Vsock {
    /// Reset, negotiate and start the device behind `t` (its interrupt must
    /// already be routed to `VEC_VIRTIO`), then post every receive buffer.
    pub fn init(t: Transport) -> Result<Vsock, InitError> {
        let q = Pair::init(t, DEVICE_VSOCK, WANTED, &DMA, "vsock")?;
        Ok(Vsock {
            features: q.features,
            cid: t.config_u64(0),
            q,
        })
    }

    /// Receive queue size.
    pub fn rx_size(&self) -> u16 {
        self.q.rx_size()
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

    /// The next received packet, if any (a used length shorter than a
    /// header is a device error).
    pub fn recv(&mut self) -> Option<Rx> {
        let u = self.q.recv(|len| (HDR_LEN..=RX_BUF).contains(&len))?;
        Some(Rx {
            desc: u.desc,
            len: u.len,
        })
    }

    /// The bytes of a received buffer (until it is recycled).
    pub fn packet(&self, rx: Rx) -> &[u8] {
        self.q.rx_bytes(rx.desc, 0, rx.len)
    }

    /// Give receive buffer `desc` (back) to the device. The notification
    /// waits for [`Vsock::flush`].
    pub fn recycle(&mut self, desc: u16) {
        self.q.recycle(desc);
    }

    /// Queue `hdr` followed by `fill(payload) -> len` payload bytes in one
    /// buffer (notification at [`Vsock::flush`]). False if no buffer is
    /// free or `fill` returned more than [`MAX_PAYLOAD`].
    pub fn send(&mut self, hdr: &[u8; HDR_LEN], fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        self.q.send(|buf| {
            buf[..HDR_LEN].copy_from_slice(hdr);
            match fill(&mut buf[HDR_LEN..]) {
                len if len > MAX_PAYLOAD => 0,
                len => HDR_LEN + len,
            }
        })
    }

    /// Notify the device of what [`Vsock::recycle`] and [`Vsock::send`]
    /// queued.
    pub fn flush(&mut self) {
        self.q.flush();
    }

    /// Ask for an interrupt at the next used element of either queue.
    /// Returns whether something arrived meanwhile (do not sleep).
    pub fn arm(&mut self) -> bool {
        self.q.arm()
    }

    /// Ask for an interrupt at the next received packet only: a guest
    /// waiting for its peer has no use for transmit completions, and on
    /// nested KVM every interrupt it takes costs an emulated entry.
    pub fn arm_rx(&mut self) -> bool {
        self.q.arm_rx()
    }
}
