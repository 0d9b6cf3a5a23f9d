//! The virtio-blk device model behind one vhost-user connection.

use partvisor_runtime::ratelimit::{suppressed_note, Limiter};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap,
};

use crate::chain::{gather, scatter, ChainWalker, Malformed, Segment};
use crate::device::{Backend, DeviceModel, LogKey};
use crate::export::{Export, SECTOR_SIZE};
use crate::server::{Endpoint, Mem};

/// Largest queue a frontend may configure (`SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Data segments per request advertised in `seg_max`. A request is then at
/// most `SEG_MAX + 2` descriptors (header and status), which fits any queue
/// of 128 entries or more; Linux sizes indirect tables by `seg_max`, not by
/// the queue size, and a chain longer than the queue is refused as malformed.
pub const SEG_MAX: u32 = 126;
/// Number of request queues.
pub const NUM_QUEUES: usize = 1;
/// Size of the virtio-blk request header (`type`, `reserved`, `sector`).
const HEADER_SIZE: u32 = 16;
/// `IOV_MAX` on Linux: most iovecs one preadv/pwritev accepts.
const IOV_MAX: usize = 1024;

/// The virtio-blk device model of one connection to one [`Export`].
pub struct BlkDevice {
    export: Arc<Export>,
    mem: Option<Mem>,
    config: Vec<u8>,
    walker: ChainWalker,
    iovecs: IoVecs,
}

/// virtio-blk over vhost-user for one connection of one [`Export`].
pub type BlkBackend = Backend<BlkDevice>;

/// Scratch iovecs pointing into guest memory, reused for every request.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the raw pointers in the iovecs are only dereferenced (by the
// kernel, in preadv/pwritev) during the request that filled them, on the
// thread that owns the backend at that moment; the vector is cleared before
// each request, so no pointer outlives the guest-memory snapshot it came from.
unsafe impl Send for IoVecs {}
// SAFETY: see `Send`; `&IoVecs` gives no access to the pointers.
unsafe impl Sync for IoVecs {}

/// What to put on the used ring for one chain.
enum Completion {
    /// Status byte written; `len` bytes written into the chain in total.
    Status { len: u32 },
    /// Malformed chain: zero-length used entry, nothing written.
    Malformed(Malformed),
}

impl BlkDevice {
    /// A fresh device for one connection to `export`.
    pub fn new(export: Arc<Export>) -> Self {
        let mut config = vec![0u8; size_of::<virtio_blk_config>()];
        let put = |c: &mut [u8], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes)
        };
        let capacity = export.size / SECTOR_SIZE;
        put(
            &mut config,
            offset_of!(virtio_blk_config, capacity),
            &capacity.to_le_bytes(),
        );
        put(
            &mut config,
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            &mut config,
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        put(
            &mut config,
            offset_of!(virtio_blk_config, num_queues),
            &(NUM_QUEUES as u16).to_le_bytes(),
        );
        BlkDevice {
            export,
            mem: None,
            config,
            walker: ChainWalker::new(MAX_QUEUE_SIZE),
            iovecs: IoVecs(Vec::with_capacity(usize::from(MAX_QUEUE_SIZE) * 2)),
        }
    }

    /// Drains the available ring of `vring`; returns after signalling the
    /// guest if anything was completed and the guest asked to be told.
    fn process_requests(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if let Err(e) = queue.iter(&*mem) {
            // Nothing is read from a ring in this state; the driver must reset.
            let n = self.export.stats.count_malformed(Malformed::BadAvailIndex);
            if n.is_power_of_two() {
                warn!(export = %self.export.name(), "queue unusable until reset: {e} ({n} kicks so far)");
            }
            return Ok(());
        }
        let desc_table = GuestAddress(queue.desc_table());
        let queue_size = queue.size();
        let mut added = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = match self.handle_chain(&mem, desc_table, queue_size, head) {
                Completion::Status { len } => len,
                Completion::Malformed(Malformed::BadHead) => {
                    // No used entry can name a head outside the queue.
                    let n = self.export.stats.count_malformed(Malformed::BadHead);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(
                            export = %self.export.name(),
                            "malformed descriptor chain (head {head}): {}; dropped, no used entry possible ({n} so far)",
                            Malformed::BadHead.name()
                        );
                    }
                    continue;
                }
                Completion::Malformed(kind) => {
                    let n = self.export.stats.count_malformed(kind);
                    if n <= 8 || n.is_power_of_two() {
                        warn!(
                            export = %self.export.name(),
                            "malformed descriptor chain (head {head}): {}; returned with length 0 ({} so far)",
                            kind.name(), n
                        );
                    }
                    0
                }
            };
            match queue.add_used(&*mem, head, len) {
                Ok(()) => added = true,
                Err(e) => {
                    // A guest's used ring it broke: rate-limited.
                    static LIMIT: Limiter = Limiter::new(8, std::time::Duration::from_secs(1));
                    if let Some(n) = LIMIT.allow() {
                        warn!(export = %self.export.name(), "cannot add used entry: {e}{}", suppressed_note(n));
                    }
                }
            }
        }
        if added {
            match queue.needs_notification(&*mem) {
                Ok(true) => state.signal_used_queue()?,
                Ok(false) => {}
                Err(e) => warn!(export = %self.export.name(), "cannot read used_event: {e}"),
            }
        }
        Ok(())
    }

    /// Validates and executes one chain.
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Completion {
        if let Err(kind) = self.walker.walk(mem, desc_table, queue_size, head) {
            return Completion::Malformed(kind);
        }
        let segs = self.walker.segments();
        // `walk` guarantees a final writable descriptor of length >= 1.
        let Some(last) = segs.last().copied() else {
            return Completion::Malformed(Malformed::NoStatus);
        };
        let status_addr = last.addr.unchecked_add(u64::from(last.len) - 1);

        let (status, written) = self.execute(mem);
        let stats = &self.export.stats;
        match status {
            VIRTIO_BLK_S_OK => stats.ok.fetch_add(1, Ordering::Relaxed),
            VIRTIO_BLK_S_UNSUPP => stats.unsupp.fetch_add(1, Ordering::Relaxed),
            _ => stats.ioerr.fetch_add(1, Ordering::Relaxed),
        };
        if mem.write_obj(status as u8, status_addr).is_err() {
            // Checked by the walker; unreachable unless memory changed under us.
            return Completion::Malformed(Malformed::BadAddress);
        }
        Completion::Status { len: written + 1 }
    }

    /// Runs the request in the walker's segments; returns the status and the
    /// number of data bytes written into guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap<()>) -> (u32, u32) {
        let segs = self.walker.segments();
        // Device-readable descriptors must all come before device-writable ones.
        let n_read = segs.iter().take_while(|s| !s.write).count();
        if segs[n_read..].iter().any(|s| !s.write) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let (readable, writable) = segs.split_at(n_read);
        let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
        let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum();

        let mut header = [0u8; HEADER_SIZE as usize];
        if readable_len < u64::from(HEADER_SIZE) || gather(mem, readable, 0, &mut header).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        // Data: readable bytes after the header (OUT), or writable bytes
        // before the status byte (IN, GET_ID).
        let out_len = readable_len - u64::from(HEADER_SIZE);
        let in_len = writable_len - 1;

        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = req_type == VIRTIO_BLK_T_OUT;
                let (len, other) = if write {
                    (out_len, in_len)
                } else {
                    (in_len, out_len)
                };
                if other != 0 || len % SECTOR_SIZE != 0 || (write && self.export.spec.readonly) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let in_bounds = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|off| off.checked_add(len).map(|end| (off, end)))
                    .filter(|&(_, end)| end <= self.export.size);
                let Some((offset, _)) = in_bounds else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                self.iovecs.0.clear();
                let built = if write {
                    push_iovecs(
                        mem,
                        readable,
                        u64::from(HEADER_SIZE),
                        out_len,
                        &mut self.iovecs.0,
                    )
                } else {
                    push_iovecs(mem, writable, 0, in_len, &mut self.iovecs.0)
                };
                if built.is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let fd = self.export.image.as_raw_fd();
                let res = transfer(fd, &mut self.iovecs.0, offset, write);
                self.iovecs.0.clear();
                match res {
                    Ok(()) if write => (VIRTIO_BLK_S_OK, 0),
                    // The used length is 32-bit; a (legal but absurd) read
                    // of 4 GiB or more reports the largest value that still
                    // leaves room for the status byte.
                    Ok(()) => (VIRTIO_BLK_S_OK, u32::try_from(len).unwrap_or(u32::MAX - 1)),
                    Err(e) => {
                        warn!(export = %self.export.name(), "image I/O failed at offset {offset}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.export.spec.readonly {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                // SAFETY: fdatasync on a file descriptor the export owns.
                if unsafe { libc::fdatasync(self.export.image.as_raw_fd()) } == 0 {
                    (VIRTIO_BLK_S_OK, 0)
                } else {
                    warn!(export = %self.export.name(), "flush failed: {}", io::Error::last_os_error());
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let id = self.export.id;
                let n = (in_len as usize).min(id.len());
                if scatter(mem, writable, &id[..n]).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

/// Appends iovecs for `len` bytes of `segs`, starting `skip` bytes in; a
/// segment spanning two guest memory regions becomes two iovecs.
fn push_iovecs(
    mem: &GuestMemoryMmap<()>,
    segs: &[Segment],
    mut skip: u64,
    mut len: u64,
    iovecs: &mut Vec<libc::iovec>,
) -> Result<(), ()> {
    for s in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(len);
        let start = s.addr.checked_add(skip).ok_or(())?;
        skip = 0;
        len -= take;
        for slice in mem.get_slices(start, take as usize) {
            let slice = slice.map_err(|_| ())?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    if len == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// Reads (or writes) the image at `offset` straight into (from) the guest
/// buffers in `iovecs`, retrying short transfers. Leaves `iovecs` consumed.
fn transfer(fd: i32, iovecs: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
    let mut start = 0;
    while start < iovecs.len() {
        let batch = &iovecs[start..iovecs.len().min(start + IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: every iovec points into guest memory that is mapped for the
        // whole request (the caller holds the memory snapshot) and was
        // checked against the guest memory table; the kernel only reads
        // (pwritev) or writes (preadv) those ranges. `batch.len()` <= IOV_MAX.
        let n = unsafe {
            if write {
                libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, off)
            } else {
                libc::preadv(fd, batch.as_ptr(), batch.len() as libc::c_int, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image ended early (truncated under part-io?)",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && start < iovecs.len() {
            let iov = &mut iovecs[start];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same iovec's buffer (n < len).
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
        while start < iovecs.len() && iovecs[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}

impl DeviceModel for BlkDevice {
    const LOG_KEY: LogKey = LogKey::Export;
    const NUM_QUEUES: usize = NUM_QUEUES;
    const MAX_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
    const QUEUE_ROLE: Option<partvisor_seccomp::Role> = Some(partvisor_seccomp::Role::IoQueue);

    fn name(&self) -> std::path::Display<'_> {
        self.export.name()
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.export.spec.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config(&self) -> &[u8] {
        // Fields beyond the ones part-io fills read as zero.
        &self.config
    }

    fn update_memory(&mut self, mem: Mem) {
        self.mem = Some(mem);
    }

    fn process_queue(&mut self, _queue: usize, vring: &VringRwLock) -> io::Result<()> {
        self.process_requests(vring)
    }
}

impl Endpoint for Export {
    type Model = BlkDevice;

    fn socket(&self) -> &std::path::Path {
        &self.spec.socket
    }

    fn memory_limit(&self) -> Option<u64> {
        self.spec.memory_limit
    }
    fn frontend_uid(&self) -> Option<u32> {
        self.spec.frontend_uid
    }

    fn kind(&self) -> &'static str {
        "blk"
    }

    fn new_model(self: &Arc<Self>, _mem: &Mem) -> BlkDevice {
        BlkDevice::new(self.clone())
    }

    fn count_connection(&self) -> u64 {
        self.stats.connections.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn count_refused_region(&self) {
        self.stats.refused_regions.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        self.stats.summary()
    }
}
