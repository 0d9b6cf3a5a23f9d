//! Device drivers. All of them run at CPL 3: port I/O through the TSS I/O bitmap, MMIO
//! registers through the user-accessible identity map. virtio devices are
//! found from cmdline words like `virtio_mmio.device=4K@0xd0000000:16`:
//! `virtio_mmio` is the transport and split virtqueue, one module per
//! device type on top of it.

pub mod lapic;
pub mod platform;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_net;
pub mod virtio_pair;
pub mod virtio_vsock;
