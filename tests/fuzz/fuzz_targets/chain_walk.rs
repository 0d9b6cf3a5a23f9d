//! The descriptor-chain walker, then gather and scatter over what it
//! accepted: whatever a guest writes into its descriptor table, the walker
//! either names a malformation or returns segments that lie inside guest
//! memory, and copying through them never leaves it.
//!
//! Input: queue size (2 bytes), head (2 bytes), skip (2 bytes), then the
//! bytes of guest memory from the descriptor table on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use part_io::chain::{gather, scatter, ChainWalker};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x10000;
const TABLE: GuestAddress = GuestAddress(0x1000);

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    // Queue sizes as the frontend may set them: up to 1024 (some not powers
    // of two, which the walker must take or refuse cleanly).
    let qsize = word(0) % 1025;
    let head = word(2);
    let skip = usize::from(word(4));
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let image = &data[6..];
    let n = image.len().min((MEM - TABLE.0) as usize);
    if mem.write_slice(&image[..n], TABLE).is_err() {
        return;
    }
    let mut w = ChainWalker::new(1024);
    for status_byte in [true, false] {
        let walked = if status_byte {
            w.walk(&mem, TABLE, qsize, head)
        } else {
            w.walk_segments(&mem, TABLE, qsize, head)
        };
        if walked.is_err() {
            continue;
        }
        let segs = w.segments().to_vec();
        // A zero-length segment names no memory, so its address is not
        // checked (and copying through it touches nothing).
        for s in segs.iter().filter(|s| s.len > 0) {
            let end = s.addr.0.checked_add(u64::from(s.len));
            assert!(
                end.is_some_and(|e| e <= MEM),
                "segment {s:?} outside guest memory"
            );
        }
        let total: usize = segs.iter().map(|s| s.len as usize).sum();
        let mut out = vec![0u8; total.saturating_sub(skip).min(1 << 16)];
        let _ = gather(&mem, &segs, skip, &mut out);
        let _ = scatter(&mem, &segs, &out);
    }
});
