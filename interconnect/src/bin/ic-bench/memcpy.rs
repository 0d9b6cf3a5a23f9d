//! The bandwidth ceiling: single-core memcpy.
use std::sync::Arc;
use std::time::Instant;

use interconnect::{Context, ContextOptions, MemDirectory};

use crate::qp::{recv_slots, SEND_SLOTS};
use crate::{Res, BW_TOTAL, SIZES_BW};
/// Single-core memcpy over the same working set as the QP bandwidth runs
/// (`SEND_SLOTS` source slots, `recv_slots` destination slots): once between ordinary
/// heap buffers (which may get transparent huge pages), once between two
/// buffers from the interconnect allocator (memfds, 4 KiB pages here).
pub fn bandwidth() -> Res<(Vec<f64>, Vec<f64>)> {
    let run = |src: *const u8, dst: *mut u8, sz: usize| {
        let n = BW_TOTAL as usize / sz;
        let ds = recv_slots(sz) as usize;
        let t0 = Instant::now();
        for i in 0..n {
            let (a, b) = ((i % SEND_SLOTS) * sz, (i % ds) * sz);
            // SAFETY: both ranges lie inside buffers of at least
            // SEND_SLOTS*sz and recv_slots*sz bytes, which do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.add(a), dst.add(b), sz) };
        }
        std::hint::black_box(dst);
        BW_TOTAL as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    let src = vec![1u8; 16 << 20];
    let mut dst = vec![0u8; 16 << 20];
    let heap = SIZES_BW
        .iter()
        .map(|&sz| run(src.as_ptr(), dst.as_mut_ptr(), sz))
        .collect();
    let ctx = Context::open(
        "bench-memcpy",
        Arc::new(MemDirectory::default()),
        ContextOptions::default(),
    )?;
    let pd = ctx.alloc_pd()?;
    let (a, b) = (pd.alloc_buffer(16 << 20)?, pd.alloc_buffer(16 << 20)?);
    a.write_at(0, &src)?;
    let memfd = SIZES_BW
        .iter()
        .map(|&sz| run(a.as_ptr(), b.as_ptr(), sz))
        .collect();
    Ok((heap, memfd))
}
