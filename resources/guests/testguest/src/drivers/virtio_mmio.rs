//! virtio-mmio transport (virtio 1.x, MMIO version 2, modern only) and the
//! split virtqueue, at CPL 3: registers through the user-accessible
//! identity map, rings in guest RAM (identity mapped, so a pointer is its
//! own guest-physical address).

use crate::arch::{irq_count, read32, write32, Irq};
use crate::smp::wait_until;
use core::sync::atomic::{fence, AtomicBool, Ordering};

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO layout.
pub const VERSION_MODERN: u32 = 2;
/// Device id of a block device.
pub const DEVICE_BLOCK: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver for the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// The driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// How long a device gets to finish a reset.
const RESET_TIMEOUT_NS: u64 = 1_000_000_000;

/// InterruptStatus: the configuration (or device status) changed (bit 0,
/// 1, is "used buffer returned").
pub const INT_CONFIG: u32 = 2;

/// virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Indirect descriptor tables.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// used_event / avail_event notification suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Why [`Transport::negotiate`] could not bring a device to FEATURES_OK.
#[derive(Clone, Copy, Debug)]
pub enum NegotiateError {
    /// The device did not finish its reset.
    ResetStuck,
    /// VIRTIO_F_VERSION_1 not offered.
    NoVersion1,
    /// FEATURES_OK did not stick.
    FeaturesRejected,
}

impl NegotiateError {
    /// What went wrong, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            NegotiateError::ResetStuck => "device status did not read 0 within 1 s of the reset",
            NegotiateError::NoVersion1 => "device does not offer VIRTIO_F_VERSION_1",
            NegotiateError::FeaturesRejected => "device cleared FEATURES_OK",
        }
    }
}

/// What a register window holds, as read at discovery.
#[derive(Clone, Copy)]
pub struct Probe {
    /// MagicValue (must be [`MAGIC`]).
    pub magic: u32,
    /// Version (2 = modern).
    pub version: u32,
    /// DeviceID (0 = no device behind this transport).
    pub device_id: u32,
    /// VendorID.
    pub vendor_id: u32,
}

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Transport {
    /// Guest-physical base of the registers (below 4 GiB).
    pub base: u64,
    /// Interrupt (GSI).
    pub gsi: u32,
}

impl Transport {
    fn read(&self, reg: u64) -> u32 {
        read32(self.base + reg)
    }

    fn write(&self, reg: u64, val: u32) {
        write32(self.base + reg, val)
    }

    /// Identification registers.
    pub fn probe(&self) -> Probe {
        Probe {
            magic: self.read(REG_MAGIC),
            version: self.read(REG_VERSION),
            device_id: self.read(REG_DEVICE_ID),
            vendor_id: self.read(REG_VENDOR_ID),
        }
    }

    /// Whether the window holds a modern (version 2) virtio-mmio device of
    /// type `device_id`.
    pub fn is_modern(&self, device_id: u32) -> bool {
        let p = self.probe();
        p.magic == MAGIC && p.version == VERSION_MODERN && p.device_id == device_id
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    /// Set device status bits (reads back the current value first).
    pub fn add_status(&self, bits: u32) {
        self.write(REG_STATUS, self.status() | bits);
    }

    /// Start a device reset (status 0); the reset is complete when
    /// [`Transport::status`] reads 0.
    pub fn start_reset(&self) {
        self.write(REG_STATUS, 0);
    }

    /// Reset the device and wait (at most 1 s) until its status reads 0.
    /// Returns whether the reset completed.
    pub fn reset(&self) -> bool {
        self.start_reset();
        self.status() == 0 || wait_until(RESET_TIMEOUT_NS, || self.status() == 0)
    }

    /// The end of a driver: reset the device so it stops touching the
    /// driver's DMA memory, then clear `dma_taken`. If the reset does not
    /// complete, the memory stays reserved (a later init fails Busy) and
    /// `driver` says so on the serial console.
    pub fn reset_and_release(&self, dma_taken: &AtomicBool, driver: &str) {
        if self.reset() {
            dma_taken.store(false, Ordering::Release);
        } else {
            crate::say!(
                "warn: {driver}: device status 0x{:02x} 1 s after a reset; its buffers stay reserved",
                self.status()
            );
        }
    }

    /// The driver side of initialisation up to FEATURES_OK: reset,
    /// ACKNOWLEDGE, DRIVER, then accept VERSION_1 (required) and whatever
    /// of `wanted` the device offers. Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, NegotiateError> {
        if !self.reset() {
            return Err(NegotiateError::ResetStuck);
        }
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(NegotiateError::NoVersion1);
        }
        let features = F_VERSION_1 | (offered & wanted);
        self.set_driver_features(features);
        self.add_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err(NegotiateError::FeaturesRejected);
        }
        Ok(features)
    }

    /// The 64 device feature bits.
    pub fn device_features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Tell the device which features the driver uses.
    pub fn set_driver_features(&self, features: u64) {
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Select queue `index`; returns (QueueNumMax, QueueReady).
    pub fn select_queue(&self, index: u32) -> (u32, u32) {
        self.write(REG_QUEUE_SEL, index);
        (self.read(REG_QUEUE_NUM_MAX), self.read(REG_QUEUE_READY))
    }

    /// Select queue `index` and return the size to give it: the largest
    /// power of two within both QueueNumMax and [`QUEUE_MAX`]. None if the
    /// queue is missing (QueueNumMax 0) or already live.
    pub fn queue_size(&self, index: u32) -> Option<u16> {
        let (max, ready) = self.select_queue(index);
        if max == 0 || ready != 0 {
            return None;
        }
        let limit = max.min(u32::from(QUEUE_MAX));
        Some(1u16 << (31 - limit.leading_zeros()))
    }

    /// Program the selected queue with `size` entries at the given rings
    /// and mark it ready.
    pub fn activate_queue(&self, size: u16, rings: Rings) {
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (REG_QUEUE_DESC, rings.desc),
            (REG_QUEUE_DRIVER, rings.avail),
            (REG_QUEUE_DEVICE, rings.used),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
    }

    /// Kick queue `index`.
    pub fn notify(&self, index: u32) {
        self.write(REG_QUEUE_NOTIFY, index);
    }

    /// Read InterruptStatus and acknowledge what it shows. Must happen
    /// before the rings are looked at: with a level-style device behind an
    /// edge-triggered pin, a completion after the ACK raises a new edge.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.read(REG_INTERRUPT_STATUS);
        if isr != 0 {
            self.write(REG_INTERRUPT_ACK, isr);
        }
        isr
    }

    /// After a wakeup: if the virtio interrupt fired since `irq_seen` (which
    /// is updated), acknowledge it. Must happen before the rings are looked
    /// at (see [`Transport::ack_interrupt`]). Returns whether the device
    /// reported DEVICE_NEEDS_RESET with it.
    pub fn take_interrupt(&self, irq_seen: &mut u64) -> bool {
        let irqs = irq_count(Irq::Virtio);
        if irqs == *irq_seen {
            return false;
        }
        *irq_seen = irqs;
        let isr = self.ack_interrupt();
        isr & INT_CONFIG != 0 && self.status() & STATUS_NEEDS_RESET != 0
    }

    /// A 64-bit configuration field, its two halves read under one
    /// ConfigGeneration (a few retries, then the last reading).
    pub fn config_u64(&self, offset: u64) -> u64 {
        let mut value = 0;
        for _ in 0..8 {
            let generation = self.read(REG_CONFIG_GENERATION);
            let low = self.read(REG_CONFIG + offset);
            let high = self.read(REG_CONFIG + offset + 4);
            value = u64::from(high) << 32 | u64::from(low);
            if self.read(REG_CONFIG_GENERATION) == generation {
                break;
            }
        }
        value
    }

    /// A 32-bit configuration field.
    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }
}

/// One split-virtqueue descriptor.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Desc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor when `DESC_F_NEXT`.
    pub next: u16,
}

/// Largest queue the driver sets up.
pub const QUEUE_MAX: u16 = 256;
/// Bytes of ring memory a [`SplitQueue`] needs: one page each for the
/// descriptor table (16 * 256), the available ring and the used ring.
pub const RING_BYTES: usize = 3 * 4096;

/// Guest-physical addresses of a queue's three parts.
#[derive(Clone, Copy)]
pub struct Rings {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// A split virtqueue over [`RING_BYTES`] of page-aligned guest memory.
pub struct SplitQueue {
    rings: Rings,
    size: u16,
    event_idx: bool,
    free: [u16; QUEUE_MAX as usize],
    nr_free: usize,
    next_avail: u16,
    notified_avail: u16,
    last_used: u16,
}

/// One used-ring element.
#[derive(Clone, Copy)]
pub struct Used {
    /// Head of the returned chain (as the device says).
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

impl SplitQueue {
    /// A queue of `size` (a power of two, at most [`QUEUE_MAX`]) entries in
    /// the ring memory at `mem`, zeroed here.
    ///
    /// # Safety
    /// `mem` is [`RING_BYTES`] of page-aligned RAM that nothing else uses
    /// while the queue (and the device it is given to) lives.
    pub unsafe fn new(mem: *mut u8, size: u16, event_idx: bool) -> SplitQueue {
        // SAFETY: per the caller's contract.
        unsafe { core::ptr::write_bytes(mem, 0, RING_BYTES) };
        let base = mem as u64;
        let mut free = [0u16; QUEUE_MAX as usize];
        for (i, f) in free.iter_mut().enumerate().take(usize::from(size)) {
            *f = size - 1 - i as u16;
        }
        SplitQueue {
            rings: Rings {
                desc: base,
                avail: base + 4096,
                used: base + 8192,
            },
            size,
            event_idx,
            free,
            nr_free: usize::from(size),
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
        }
    }

    /// Where the rings are (for the transport).
    pub fn rings(&self) -> Rings {
        self.rings
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Take `out.len()` free descriptors, or none if there are not enough.
    pub fn alloc(&mut self, out: &mut [u16]) -> bool {
        if out.len() > self.nr_free {
            return false;
        }
        for o in out.iter_mut() {
            self.nr_free -= 1;
            *o = self.free[self.nr_free];
        }
        true
    }

    /// Give back descriptors taken with [`SplitQueue::alloc`].
    pub fn release(&mut self, descs: &[u16]) {
        for &d in descs {
            self.free[self.nr_free] = d;
            self.nr_free += 1;
        }
    }

    /// Write descriptor `index`.
    pub fn set_desc(&mut self, index: u16, desc: Desc) {
        assert!(index < self.size, "descriptor index out of range");
        let p = (self.rings.desc + 16 * u64::from(index)) as *mut Desc;
        // SAFETY: inside this queue's descriptor table (index < size).
        unsafe { p.write_volatile(desc) };
    }

    fn avail_u16(&self, offset: u64) -> *mut u16 {
        (self.rings.avail + offset) as *mut u16
    }

    fn used_u16(&self, offset: u64) -> *mut u16 {
        (self.rings.used + offset) as *mut u16
    }

    /// Make the chain starting at `head` available to the device. Returns
    /// whether the device wants a notification (EVENT_IDX's avail_event or
    /// the used ring's NO_NOTIFY flag).
    pub fn publish(&mut self, head: u16) -> bool {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: avail ring entry `slot` < size, inside the ring page.
        unsafe { self.avail_u16(4 + 2 * slot).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        // The descriptors and the ring entry before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx.
        unsafe { self.avail_u16(2).write_volatile(self.next_avail) };
        // The index store before the device's suppression fields are read.
        fence(Ordering::SeqCst);
        let old = self.notified_avail;
        self.notified_avail = self.next_avail;
        if self.event_idx {
            // SAFETY: used ring's avail_event, after ring[size].
            let event = unsafe { self.used_u16(4 + 8 * u64::from(self.size)).read_volatile() };
            self.next_avail.wrapping_sub(event).wrapping_sub(1) < self.next_avail.wrapping_sub(old)
        } else {
            // SAFETY: used.flags.
            unsafe { self.used_u16(0).read_volatile() & 1 == 0 }
        }
    }

    /// The next used element, if the device returned one.
    pub fn pop_used(&mut self) -> Option<Used> {
        // SAFETY: used.idx.
        let idx = unsafe { self.used_u16(2).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // The index before the element it covers.
        fence(Ordering::Acquire);
        let e = self.rings.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: used ring element < size, inside the ring page.
        let (id, len) = unsafe {
            (
                (e as *const u32).read_volatile(),
                ((e + 4) as *const u32).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(Used { id, len })
    }

    /// Ask for an interrupt at the next used element (EVENT_IDX's
    /// used_event; without EVENT_IDX the avail flags stay 0, interrupts on).
    /// Returns whether used elements arrived meanwhile (look again).
    pub fn arm_interrupt(&mut self) -> bool {
        if self.event_idx {
            // SAFETY: avail ring's used_event, after ring[size].
            unsafe {
                self.avail_u16(4 + 2 * u64::from(self.size))
                    .write_volatile(self.last_used)
            };
            fence(Ordering::SeqCst);
        }
        // SAFETY: used.idx.
        unsafe { self.used_u16(2).read_volatile() != self.last_used }
    }
}
