//! Device drivers. All of them run at CPL 3: port I/O through the TSS I/O bitmap, MMIO
//! registers through the user-accessible identity map. Later issues add
//! virtio-mmio drivers here (one module per device type), found from cmdline
//! words like `virtio_mmio.device=4K@0xd0000000:5`.

pub mod lapic;
pub mod platform;
pub mod serial;
