//! Validation of split-virtqueue descriptor chains.
//!
//! `virtio-queue`'s own `DescriptorChain` iterator ends a chain silently when
//! it meets a loop, an over-long chain or a bad indirect table, so a device
//! cannot tell a malformed chain from a short one. The walker here reads every
//! descriptor once, copies it out of guest memory (the guest cannot change an
//! address after it was checked), checks it against the guest memory table and
//! names what was wrong.

use std::ops::Range;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use virtio_queue::desc::split::Descriptor;

/// Size of one split-ring descriptor in guest memory.
const DESC_SIZE: u64 = 16;

/// Why a descriptor chain was rejected. Each kind has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The head index on the available ring is not below the queue size.
    BadHead,
    /// A `next` index points outside the descriptor table.
    BadIndex,
    /// The chain visits a descriptor twice.
    Loop,
    /// The chain has more descriptors than the queue size.
    TooLong,
    /// An indirect descriptor is nested, chained, empty, not a multiple of
    /// 16 bytes, or its table is outside guest memory.
    BadIndirect,
    /// A descriptor (or the descriptor table) is outside guest memory.
    BadAddress,
    /// The chain does not end in a device-writable descriptor for the status byte.
    NoStatus,
    /// The available ring's index is more than a queue size ahead of the
    /// device: the queue is unusable until the driver resets it.
    BadAvailIndex,
}

impl Malformed {
    /// All kinds, in counter order.
    pub const ALL: [Malformed; 8] = [
        Malformed::BadHead,
        Malformed::BadIndex,
        Malformed::Loop,
        Malformed::TooLong,
        Malformed::BadIndirect,
        Malformed::BadAddress,
        Malformed::NoStatus,
        Malformed::BadAvailIndex,
    ];

    /// Index of this kind in [`Malformed::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Short name used in logs and counter dumps.
    pub fn name(self) -> &'static str {
        match self {
            Malformed::BadHead => "bad_head",
            Malformed::BadIndex => "bad_index",
            Malformed::Loop => "loop",
            Malformed::TooLong => "too_long",
            Malformed::BadIndirect => "bad_indirect",
            Malformed::BadAddress => "bad_address",
            Malformed::NoStatus => "no_status",
            Malformed::BadAvailIndex => "bad_avail_index",
        }
    }
}

/// One validated buffer of a chain, copied out of the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address, checked to lie in guest memory for `len`
    /// bytes (not checked when `len` is 0: such a segment names no memory).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

/// Reusable chain walker: its buffers are allocated once per connection, so
/// walking a chain allocates nothing.
#[derive(Debug)]
pub struct ChainWalker {
    segments: Vec<Segment>,
    visited: Vec<u64>,
}

impl ChainWalker {
    /// A walker for queues of at most `max_queue_size` entries.
    pub fn new(max_queue_size: u16) -> Self {
        let n = usize::from(max_queue_size);
        ChainWalker {
            segments: Vec::with_capacity(n),
            visited: vec![0; n.div_ceil(64)],
        }
    }

    /// The segments of the last chain walked successfully.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn reset_visited(&mut self, entries: u32) {
        let words = (entries as usize).div_ceil(64).min(self.visited.len());
        self.visited[..words].fill(0);
    }

    /// Marks `idx` visited; returns false if it already was.
    fn visit(&mut self, idx: u16) -> bool {
        let word = usize::from(idx / 64);
        let bit = 1u64 << (idx % 64);
        match self.visited.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            Some(_) => false,
            // Only reachable if a table is larger than the walker was sized
            // for, which `walk` refuses before getting here.
            None => false,
        }
    }

    /// Walks the chain starting at `head` of the descriptor table at
    /// `desc_table` of a queue of `queue_size` entries (at most the
    /// `max_queue_size` given to [`ChainWalker::new`]).
    ///
    /// On success [`ChainWalker::segments`] holds the chain's buffers in order,
    /// every one inside guest memory.
    pub fn walk<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<(), Malformed> {
        self.walk_segments(mem, desc_table, queue_size, head)?;
        match self.segments.last() {
            Some(last) if last.write && last.len > 0 => Ok(()),
            _ => Err(Malformed::NoStatus),
        }
    }

    /// Like [`ChainWalker::walk`], without requiring a final status byte:
    /// for devices (net) whose chains are all-readable or all-writable and
    /// whose caller checks the directions itself.
    pub fn walk_segments<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<(), Malformed> {
        self.segments.clear();
        if head >= queue_size || usize::from(queue_size) > self.visited.len() * 64 {
            return Err(Malformed::BadHead);
        }
        let mut table = desc_table;
        let mut table_len = u32::from(queue_size);
        let mut idx = head;
        let mut indirect = false;
        let mut total: u32 = 0;
        self.reset_visited(table_len);
        loop {
            if u32::from(idx) >= table_len {
                return Err(if indirect {
                    Malformed::BadIndirect
                } else {
                    Malformed::BadIndex
                });
            }
            if !self.visit(idx) {
                return Err(Malformed::Loop);
            }
            total += 1;
            if total > u32::from(queue_size) {
                return Err(Malformed::TooLong);
            }
            let addr = table
                .checked_add(u64::from(idx) * DESC_SIZE)
                .ok_or(Malformed::BadAddress)?;
            let desc: Descriptor = mem.read_obj(addr).map_err(|_| {
                if indirect {
                    Malformed::BadIndirect
                } else {
                    Malformed::BadAddress
                }
            })?;

            if desc.refers_to_indirect_table() {
                // Virtio 1.2, 2.7.5.3.1: no nested tables, and INDIRECT and
                // NEXT are never set together.
                if indirect
                    || desc.has_next()
                    || desc.len() == 0
                    || u64::from(desc.len()) % DESC_SIZE != 0
                {
                    return Err(Malformed::BadIndirect);
                }
                let entries = desc.len() / DESC_SIZE as u32;
                if entries > u32::from(queue_size) {
                    return Err(Malformed::TooLong);
                }
                if !mem.check_range(desc.addr(), desc.len() as usize) {
                    return Err(Malformed::BadIndirect);
                }
                table = desc.addr();
                table_len = entries;
                idx = 0;
                indirect = true;
                self.reset_visited(table_len);
                continue;
            }

            if desc.len() > 0 && !mem.check_range(desc.addr(), desc.len() as usize) {
                return Err(Malformed::BadAddress);
            }
            self.segments.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
                write: desc.is_write_only(),
            });
            if !desc.has_next() {
                break;
            }
            idx = desc.next();
        }
        Ok(())
    }
}

/// Why a copy through a chain's segments stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CopyFault {
    /// The segments hold fewer bytes than the copy asked for.
    #[error("the chain's buffers are shorter than the copy")]
    Short,
    /// Guest memory refused an access (a region went away, or an address
    /// overflowed).
    #[error("guest memory refused the copy")]
    Memory,
}

/// Visits `len` bytes of `segs` in order, starting `skip` bytes in: calls
/// `f(range, addr)` for each piece, `range` being where the piece sits in
/// those `len` bytes and `addr` where it is in guest memory. Fails if the
/// segments end first or `f` fails.
fn for_each_piece(
    segs: &[Segment],
    mut skip: usize,
    len: usize,
    mut f: impl FnMut(Range<usize>, GuestAddress) -> Result<(), CopyFault>,
) -> Result<(), CopyFault> {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        let seg_len = s.len as usize;
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len - done);
        let addr = s.addr.checked_add(skip as u64).ok_or(CopyFault::Memory)?;
        f(done..done + n, addr)?;
        skip = 0;
        done += n;
    }
    if done == len {
        Ok(())
    } else {
        Err(CopyFault::Short)
    }
}

/// Copies `out.len()` bytes of `segs`, starting `skip` bytes in, into `out`.
pub fn gather<M: Bytes<GuestAddress>>(
    mem: &M,
    segs: &[Segment],
    skip: usize,
    out: &mut [u8],
) -> Result<(), CopyFault> {
    for_each_piece(segs, skip, out.len(), |r, addr| {
        mem.read_slice(&mut out[r], addr)
            .map_err(|_| CopyFault::Memory)
    })
}

/// Copies `buf` into the start of `segs`.
pub fn scatter<M: Bytes<GuestAddress>>(
    mem: &M,
    segs: &[Segment],
    buf: &[u8],
) -> Result<(), CopyFault> {
    for_each_piece(segs, 0, buf.len(), |r, addr| {
        mem.write_slice(&buf[r], addr)
            .map_err(|_| CopyFault::Memory)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const TABLE: GuestAddress = GuestAddress(0x1000);
    const QSIZE: u16 = 8;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap<()>, table: GuestAddress, idx: u16, d: Descriptor) {
        mem.write_obj(d, table.unchecked_add(u64::from(idx) * 16))
            .unwrap();
    }

    #[test]
    fn well_formed_chain_yields_its_segments_in_order() {
        let m = mem();
        put(&m, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 3));
        put(&m, TABLE, 3, Descriptor::new(0x5000, 512, NEXT | WRITE, 5));
        put(&m, TABLE, 5, Descriptor::new(0x6000, 1, WRITE, 0));
        let mut w = ChainWalker::new(QSIZE);
        w.walk(&m, TABLE, QSIZE, 0).unwrap();
        let lens: Vec<u32> = w.segments().iter().map(|s| s.len).collect();
        assert_eq!(lens, vec![16, 512, 1]);
        assert!(!w.segments()[0].write && w.segments()[2].write);
    }

    #[test]
    fn each_malformation_is_named() {
        let m = mem();
        let mut w = ChainWalker::new(QSIZE);
        // Head out of range.
        assert_eq!(w.walk(&m, TABLE, QSIZE, QSIZE), Err(Malformed::BadHead));
        // Loop 0 -> 1 -> 0.
        put(&m, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&m, TABLE, 1, Descriptor::new(0x5000, 16, NEXT, 0));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::Loop));
        // Next index outside the table.
        put(&m, TABLE, 1, Descriptor::new(0x5000, 16, NEXT, 9));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::BadIndex));
        // Buffer outside guest memory.
        put(&m, TABLE, 1, Descriptor::new(0xfff0, 0x100, WRITE, 0));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::BadAddress));
        // Last descriptor read-only: nowhere to put the status.
        put(&m, TABLE, 1, Descriptor::new(0x5000, 16, 0, 0));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::NoStatus));
        // Indirect table whose length is not a multiple of 16.
        put(&m, TABLE, 1, Descriptor::new(0x8000, 24, INDIRECT, 0));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::BadIndirect));
        // Indirect table with more entries than the queue size.
        put(&m, TABLE, 1, Descriptor::new(0x8000, 16 * 9, INDIRECT, 0));
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::TooLong));
        // Nested indirect.
        put(&m, TABLE, 1, Descriptor::new(0x8000, 32, INDIRECT, 0));
        put(
            &m,
            GuestAddress(0x8000),
            0,
            Descriptor::new(0x9000, 16, INDIRECT, 0),
        );
        assert_eq!(w.walk(&m, TABLE, QSIZE, 0), Err(Malformed::BadIndirect));
        // A valid indirect table is followed.
        put(
            &m,
            GuestAddress(0x8000),
            0,
            Descriptor::new(0x9000, 512, WRITE | NEXT, 1),
        );
        put(
            &m,
            GuestAddress(0x8000),
            1,
            Descriptor::new(0xa000, 1, WRITE, 0),
        );
        w.walk(&m, TABLE, QSIZE, 0).unwrap();
        assert_eq!(w.segments().len(), 3);
    }
}
