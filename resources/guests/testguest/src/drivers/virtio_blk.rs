//! virtio-blk over virtio-mmio (virtio 1.x), at CPL 3: one request queue,
//! up to [`QUEUE_DEPTH`] requests in flight, completions by interrupt (the
//! caller sleeps in HLT through `abi::wait`), every wait bounded by a
//! [`Watchdog`]. It can also post deliberately malformed chains
//! ([`Blk::post_bad`]) to see how a device copes.

use crate::arch::{irq_count, irq_total, Irq};
use crate::drivers::virtio_mmio::{
    Desc, NegotiateError, SplitQueue, Transport, Used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
    DEVICE_BLOCK, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, QUEUE_MAX, RING_BYTES, STATUS_DRIVER_OK,
    STATUS_FAILED,
};
use crate::smp::Watchdog;
use crate::words::BadKind;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Requests in flight at most.
pub const QUEUE_DEPTH: usize = crate::words::MAX_DEPTH as usize;
/// Largest request (bytes of data).
pub const MAX_REQUEST: usize = 65536;
/// Data buffers are handed out in 4 KiB blocks.
pub const BUF_BLOCK: usize = 4096;
/// Descriptors per request at most (header + 16 data segments + status).
const MAX_DESCS: usize = 2 + MAX_REQUEST / BUF_BLOCK;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the volatile write cache.
pub const T_FLUSH: u32 = 4;
/// Read the 20-byte device id.
pub const T_GET_ID: u32 = 8;
/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error.
pub const S_IOERR: u8 = 1;
/// Request status: unsupported.
pub const S_UNSUPP: u8 = 2;
/// What the status byte holds until the device writes it.
pub const S_UNWRITTEN: u8 = 0xff;

/// Maximum size of any single segment (config offset 8).
pub const F_SIZE_MAX: u64 = 1 << 1;
/// Maximum number of segments (config offset 12).
pub const F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
pub const F_RO: u64 = 1 << 5;
/// Block size in config (offset 20).
pub const F_BLK_SIZE: u64 = 1 << 6;
/// The device has a volatile write cache and takes flushes.
pub const F_FLUSH: u64 = 1 << 9;
/// Everything the driver accepts when offered (VERSION_1 is required).
const WANTED: u64 =
    F_RING_EVENT_IDX | F_RING_INDIRECT_DESC | F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH;

/// `head_slot` marker: no request.
const NO_SLOT: u8 = 0xff;
/// `head_slot` marker: the malformed request.
const BAD_SLOT: u8 = 0xfe;

/// `struct virtio_blk_req` header.
#[repr(C)]
#[derive(Clone, Copy)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// A request's data buffer.
pub type Buffer = [[u8; BUF_BLOCK]; MAX_REQUEST / BUF_BLOCK];

/// Memory the device reads and writes: rings, headers, status bytes, data,
/// and an indirect table. Identity mapped, so addresses are pointers.
#[repr(C, align(4096))]
struct Dma {
    rings: [u8; RING_BYTES],
    data: [Buffer; QUEUE_DEPTH],
    indirect: [Desc; 2 * QUEUE_MAX as usize],
    headers: [ReqHeader; QUEUE_DEPTH],
    status: [u8; QUEUE_DEPTH],
}

struct DmaCell(UnsafeCell<Dma>);
// SAFETY: only the BSP runs workloads, and only one `Blk` (which holds
// `DMA_TAKEN`) touches it at a time.
unsafe impl Sync for DmaCell {}

const ZERO_DESC: Desc = Desc {
    addr: 0,
    len: 0,
    flags: 0,
    next: 0,
};
static DMA: DmaCell = DmaCell(UnsafeCell::new(Dma {
    rings: [0; RING_BYTES],
    data: [[[0; BUF_BLOCK]; MAX_REQUEST / BUF_BLOCK]; QUEUE_DEPTH],
    indirect: [ZERO_DESC; 2 * QUEUE_MAX as usize],
    headers: [ReqHeader {
        kind: 0,
        reserved: 0,
        sector: 0,
    }; QUEUE_DEPTH],
    status: [0; QUEUE_DEPTH],
}));
/// Held by the one live [`Blk`].
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

fn dma() -> *mut Dma {
    DMA.0.get()
}

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug)]
pub enum InitError {
    /// Not a modern (version 2) virtio-mmio block device.
    NotModernBlock,
    /// Reset or feature negotiation failed.
    Negotiate(NegotiateError),
    /// Queue 0 missing (QueueNumMax 0) or already live.
    QueueUnavailable,
    /// Another driver instance owns the DMA memory.
    Busy,
}

impl InitError {
    /// What went wrong, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            InitError::NotModernBlock => "not a modern virtio-mmio block device",
            InitError::Negotiate(e) => e.describe(),
            InitError::QueueUnavailable => "queue 0 missing or already ready",
            InitError::Busy => {
                "an earlier device never finished its reset, its buffers stay reserved"
            }
        }
    }
}

/// Why a request could not be posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Not enough free descriptors now (wait for completions).
    NoDescriptors,
    /// The request needs more segments than the device or driver allow.
    TooManySegments,
    /// A malformed request needs an idle queue.
    NotIdle,
}

/// Why a wait ended without a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The watchdog ran out.
    Timeout,
    /// The device set DEVICE_NEEDS_RESET (or returned a chain it was never
    /// given); it must be reset.
    NeedsReset,
}

/// Which request a used element completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// A normal request in this slot.
    Slot(usize),
    /// The malformed request.
    Bad,
    /// A head the driver never posted.
    Unknown(u32),
}

/// One completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// Which request.
    pub done: Done,
    /// Used length the device reported.
    pub used_len: u32,
    /// Status byte ([`S_UNWRITTEN`] if the device did not write it).
    pub status: u8,
}

const NO_COMPLETION: Completion = Completion {
    done: Done::Unknown(0),
    used_len: 0,
    status: S_UNWRITTEN,
};

/// Completion buffer for [`Blk::wait`].
pub type Completions = [Completion; QUEUE_DEPTH];

/// An empty completion buffer.
pub fn completions() -> Completions {
    [NO_COMPLETION; QUEUE_DEPTH]
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    descs: [u16; MAX_DESCS],
    n: usize,
}

/// A live virtio-blk device. Dropping it resets the device.
pub struct Blk {
    t: Transport,
    q: SplitQueue,
    /// Negotiated features.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    seg_bytes: usize,
    seg_max: usize,
    slots: [Slot; QUEUE_DEPTH],
    head_slot: [u8; QUEUE_MAX as usize],
    bad_descs: [u16; QUEUE_MAX as usize],
    bad_n: usize,
    irq_seen: u64,
    needs_reset: bool,
}

impl Blk {
    /// Reset, negotiate and start the device behind `t` (its interrupt must
    /// already be routed to `VEC_VIRTIO`).
    pub fn init(t: Transport) -> Result<Blk, InitError> {
        if !t.is_modern(DEVICE_BLOCK) {
            return Err(InitError::NotModernBlock);
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
        let Some(size) = t.queue_size(0) else {
            return fail(InitError::QueueUnavailable);
        };
        // SAFETY: `rings` is page-aligned RING_BYTES inside DMA, which this
        // instance owns (DMA_TAKEN) until it is dropped, and the drop
        // resets the device before giving it up.
        let q = unsafe {
            SplitQueue::new(
                (&raw mut (*dma()).rings).cast::<u8>(),
                size,
                features & F_RING_EVENT_IDX != 0,
            )
        };
        t.activate_queue(size, q.rings());
        let capacity = t.config_u64(0);
        // qemu-storage-daemon's vhost-user-blk offers SIZE_MAX with a
        // size_max of 0; like Linux, read 0 as "no limit".
        let size_max = match t.config_u32(8) as usize {
            0 => MAX_REQUEST,
            v if features & F_SIZE_MAX != 0 => v,
            _ => MAX_REQUEST,
        };
        let seg_max = if features & F_SEG_MAX != 0 {
            t.config_u32(12) as usize
        } else {
            MAX_DESCS
        };
        let blk = Blk {
            t,
            q,
            features,
            capacity,
            // Segments are whole 4 KiB buffer blocks unless the device
            // wants smaller ones (then whole sectors).
            seg_bytes: if size_max >= BUF_BLOCK {
                size_max.min(MAX_REQUEST) / BUF_BLOCK * BUF_BLOCK
            } else {
                (size_max / 512 * 512).max(512)
            },
            seg_max: seg_max.clamp(1, MAX_DESCS - 2),
            slots: [Slot {
                busy: false,
                descs: [0; MAX_DESCS],
                n: 0,
            }; QUEUE_DEPTH],
            head_slot: [NO_SLOT; QUEUE_MAX as usize],
            bad_descs: [0; QUEUE_MAX as usize],
            bad_n: 0,
            irq_seen: irq_count(Irq::Virtio),
            needs_reset: false,
        };
        t.add_status(STATUS_DRIVER_OK);
        Ok(blk)
    }

    /// Queue size in use.
    pub fn queue_size(&self) -> u16 {
        self.q.size()
    }

    /// Whether a feature bit was negotiated.
    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// A slot with no request in flight.
    pub fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| !s.busy)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count() + usize::from(self.bad_n != 0)
    }

    /// The data buffer of `slot` (only touch it while the slot is free).
    pub fn buffer(&mut self, slot: usize) -> &mut Buffer {
        assert!(slot < QUEUE_DEPTH && !self.slots[slot].busy, "slot in use");
        // SAFETY: DMA is owned by this instance; the device only accesses a
        // slot's buffer while the slot is busy, and `&mut self` keeps the
        // returned borrow from outliving the next submit.
        unsafe { &mut (*dma()).data[slot] }
    }

    /// Post request `kind` for `sector` with `len` bytes of `slot`'s buffer.
    pub fn submit(
        &mut self,
        slot: usize,
        kind: u32,
        sector: u64,
        len: usize,
    ) -> Result<(), SubmitError> {
        assert!(slot < QUEUE_DEPTH && !self.slots[slot].busy, "slot in use");
        let len = len.min(MAX_REQUEST);
        let segs = len.div_ceil(self.seg_bytes);
        if segs > self.seg_max {
            return Err(SubmitError::TooManySegments);
        }
        let n = segs + 2;
        let mut descs = [0u16; MAX_DESCS];
        if !self.q.alloc(&mut descs[..n]) {
            return Err(SubmitError::NoDescriptors);
        }
        let d = dma();
        // SAFETY: slot is free, so the device does not use its header,
        // status byte or buffer; DMA is ours.
        let (hdr, status, data) = unsafe {
            (*d).headers[slot] = ReqHeader {
                kind,
                reserved: 0,
                sector,
            };
            (*d).status[slot] = S_UNWRITTEN;
            (
                &raw const (*d).headers[slot] as u64,
                &raw const (*d).status[slot] as u64,
                &raw const (*d).data[slot] as u64,
            )
        };
        let data_flags = if kind == T_IN || kind == T_GET_ID {
            DESC_F_NEXT | DESC_F_WRITE
        } else {
            DESC_F_NEXT
        };
        self.q.set_desc(
            descs[0],
            Desc {
                addr: hdr,
                len: 16,
                flags: DESC_F_NEXT,
                next: descs[1],
            },
        );
        for i in 0..segs {
            let off = i * self.seg_bytes;
            self.q.set_desc(
                descs[1 + i],
                Desc {
                    addr: data + off as u64,
                    len: (len - off).min(self.seg_bytes) as u32,
                    flags: data_flags,
                    next: descs[2 + i],
                },
            );
        }
        self.q.set_desc(
            descs[n - 1],
            Desc {
                addr: status,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.slots[slot] = Slot {
            busy: true,
            descs,
            n,
        };
        self.head_slot[usize::from(descs[0])] = slot as u8;
        if self.q.publish(descs[0]) {
            self.t.notify(0);
        }
        Ok(())
    }

    /// Post a malformed request of `kind` (a read of sector 0 whose chain is
    /// broken in that way). The queue must be idle.
    pub fn post_bad(&mut self, kind: BadKind) -> Result<(), SubmitError> {
        if self.in_flight() != 0 {
            return Err(SubmitError::NotIdle);
        }
        let size = usize::from(self.q.size());
        let indirect_ok = self.has(F_RING_INDIRECT_DESC);
        let n = match kind {
            BadKind::Loop | BadKind::NoStatus => 2,
            BadKind::Oob => 3,
            BadKind::Indirect => 1,
            BadKind::Long if indirect_ok => 1,
            BadKind::Long => size,
        };
        let mut descs = [0u16; QUEUE_MAX as usize];
        if !self.q.alloc(&mut descs[..n]) {
            return Err(SubmitError::NoDescriptors);
        }
        let d = dma();
        // SAFETY: the queue is idle: the device holds none of slot 0's
        // memory nor the indirect table; DMA is ours.
        let (hdr, status, data, table) = unsafe {
            (*d).headers[0] = ReqHeader {
                kind: T_IN,
                reserved: 0,
                sector: 0,
            };
            (*d).status[0] = S_UNWRITTEN;
            (
                &raw const (*d).headers[0] as u64,
                &raw const (*d).status[0] as u64,
                &raw const (*d).data[0] as u64,
                &raw mut (*d).indirect as *mut Desc,
            )
        };
        let desc = |addr, len, flags, next| Desc {
            addr,
            len,
            flags,
            next,
        };
        let w = DESC_F_WRITE;
        let nx = DESC_F_NEXT;
        match kind {
            BadKind::Loop => {
                self.q.set_desc(descs[0], desc(hdr, 16, nx, descs[1]));
                self.q.set_desc(descs[1], desc(data, 512, w | nx, descs[0]));
            }
            BadKind::NoStatus => {
                self.q.set_desc(descs[0], desc(hdr, 16, nx, descs[1]));
                self.q.set_desc(descs[1], desc(data, 512, 0, 0));
            }
            BadKind::Oob => {
                self.q.set_desc(descs[0], desc(hdr, 16, nx, descs[1]));
                self.q
                    .set_desc(descs[1], desc(1 << 40, 512, w | nx, descs[2]));
                self.q.set_desc(descs[2], desc(status, 1, w, 0));
            }
            BadKind::Indirect => {
                let entries = [
                    desc(hdr, 16, nx | DESC_F_INDIRECT, 1),
                    desc(data, 512, w | nx, 2),
                    desc(status, 1, w, 0),
                ];
                for (i, e) in entries.into_iter().enumerate() {
                    // SAFETY: inside the indirect table (3 < its length).
                    unsafe { table.add(i).write_volatile(e) };
                }
                // 40 bytes: 2.5 entries, not a multiple of 16.
                self.q
                    .set_desc(descs[0], desc(table as u64, 40, DESC_F_INDIRECT, 0));
            }
            BadKind::Long if indirect_ok => {
                let entries = 2 * size;
                for i in 0..entries {
                    let e = match i {
                        0 => desc(hdr, 16, nx, 1),
                        _ if i == entries - 1 => desc(status, 1, w, 0),
                        _ => desc(data, 512, w | nx, i as u16 + 1),
                    };
                    // SAFETY: i < 2 * size <= the table's length.
                    unsafe { table.add(i).write_volatile(e) };
                }
                self.q.set_desc(
                    descs[0],
                    desc(table as u64, 16 * entries as u32, DESC_F_INDIRECT, 0),
                );
            }
            BadKind::Long => {
                for i in 0..size {
                    let next = descs[(i + 1) % size];
                    let e = match i {
                        0 => desc(hdr, 16, nx, next),
                        _ if i == size - 1 => desc(status, 1, w | nx, next),
                        _ => desc(data, 512, w | nx, next),
                    };
                    self.q.set_desc(descs[i], e);
                }
            }
        }
        self.bad_descs[..n].copy_from_slice(&descs[..n]);
        self.bad_n = n;
        self.head_slot[usize::from(descs[0])] = BAD_SLOT;
        if self.q.publish(descs[0]) {
            self.t.notify(0);
        }
        Ok(())
    }

    fn complete(&mut self, u: Used) -> Completion {
        let head = u.id as usize;
        let marker = self.head_slot.get(head).copied().unwrap_or(NO_SLOT);
        let done = match marker {
            BAD_SLOT => {
                self.q.release(&self.bad_descs[..self.bad_n]);
                self.bad_n = 0;
                Done::Bad
            }
            s if usize::from(s) < QUEUE_DEPTH && self.slots[usize::from(s)].busy => {
                let slot = self.slots[usize::from(s)];
                self.q.release(&slot.descs[..slot.n]);
                self.slots[usize::from(s)].busy = false;
                Done::Slot(usize::from(s))
            }
            _ => {
                // A chain we never posted (or already got back): the
                // queue can no longer be trusted.
                self.needs_reset = true;
                return Completion {
                    done: Done::Unknown(u.id),
                    used_len: u.len,
                    status: S_UNWRITTEN,
                };
            }
        };
        self.head_slot[head] = NO_SLOT;
        let status_slot = match done {
            Done::Slot(s) => s,
            _ => 0,
        };
        // SAFETY: the device gave the request back, so its status byte is
        // ours to read.
        let status = unsafe { (&raw const (*dma()).status[status_slot]).read_volatile() };
        Completion {
            done,
            used_len: u.len,
            status,
        }
    }

    /// Collect completions without sleeping; acknowledges the interrupt
    /// first (so one arriving later raises a new edge).
    pub fn reap(&mut self, out: &mut Completions) -> usize {
        if self.t.take_interrupt(&mut self.irq_seen) {
            self.needs_reset = true;
        }
        let mut n = 0;
        while n < out.len() {
            match self.q.pop_used() {
                Some(u) => {
                    out[n] = self.complete(u);
                    n += 1;
                }
                None if self.q.arm_interrupt() => {}
                None => break,
            }
        }
        n
    }

    /// Sleep (HLT) until at least one completion, the device needing a
    /// reset, or the watchdog running out.
    pub fn wait(&mut self, wd: &mut Watchdog, out: &mut Completions) -> Result<usize, WaitError> {
        loop {
            let seen = irq_total();
            let n = self.reap(out);
            if n > 0 {
                wd.progress();
                return Ok(n);
            }
            if self.needs_reset {
                return Err(WaitError::NeedsReset);
            }
            if wd.expired() {
                return Err(WaitError::Timeout);
            }
            crate::abi::wait(seen);
        }
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // The device must stop touching DMA before anyone reuses it. If the
        // reset does not complete, keep the memory (a later init fails Busy).
        self.t.reset_and_release(&DMA_TAKEN, "blk");
    }
}
