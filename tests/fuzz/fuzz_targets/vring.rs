//! A guest's queue laid out from fuzz bytes, for the targets that drive a
//! device model: one split virtqueue of [`QSIZE`] entries in a small guest
//! memory, its descriptor table, available ring and buffers all taken from
//! the input (in that order), the used ring the device's.

// Each target that includes this uses part of it.
#![allow(dead_code)]

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

pub const QSIZE: u16 = 16;
pub const MEM: u64 = 0x40000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFFERS: u64 = 0x3000;
const DESC_BYTES: usize = QSIZE as usize * 16;
const AVAIL_BYTES: usize = 4 + 2 * QSIZE as usize;

pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Guest memory holding `data` as described above (what is missing stays
/// zero).
pub fn guest(data: &[u8]) -> Option<Mem> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).ok()?;
    let (desc, rest) = data.split_at(data.len().min(DESC_BYTES));
    let (avail, buffers) = rest.split_at(rest.len().min(AVAIL_BYTES));
    let buffers = &buffers[..buffers.len().min((MEM - BUFFERS) as usize)];
    mem.write_slice(desc, GuestAddress(DESC)).ok()?;
    mem.write_slice(avail, GuestAddress(AVAIL)).ok()?;
    mem.write_slice(buffers, GuestAddress(BUFFERS)).ok()?;
    Some(GuestMemoryAtomic::new(mem))
}

/// A ready queue over `mem`'s layout.
pub fn queue(mem: &Mem) -> Option<VringRwLock> {
    let v = VringRwLock::new(mem.clone(), QSIZE).ok()?;
    v.set_queue_size(QSIZE);
    v.set_queue_info(DESC, AVAIL, USED).ok()?;
    v.set_queue_ready(true);
    v.set_enabled(true);
    Some(v)
}

/// A receiving guest: guest memory whose queue 0 offers all [`QSIZE`]
/// descriptors as 2 KiB device-writable buffers, and an empty queue 1.
pub fn receiver() -> Option<(Mem, Vec<VringRwLock>)> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).ok()?;
    const WRITE: u16 = 2;
    for i in 0..QSIZE {
        let addr = BUFFERS + u64::from(i) * 2048;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&2048u32.to_le_bytes());
        d[12..14].copy_from_slice(&WRITE.to_le_bytes());
        mem.write_slice(&d, GuestAddress(DESC + u64::from(i) * 16))
            .ok()?;
        mem.write_slice(&i.to_le_bytes(), GuestAddress(AVAIL + 4 + u64::from(i) * 2))
            .ok()?;
    }
    mem.write_slice(&QSIZE.to_le_bytes(), GuestAddress(AVAIL + 2))
        .ok()?;
    let mem = GuestMemoryAtomic::new(mem);
    let rx = queue(&mem)?;
    let tx = VringRwLock::new(mem.clone(), QSIZE).ok()?;
    Some((mem, vec![rx, tx]))
}
