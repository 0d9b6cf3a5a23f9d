//! A shared-memory ring whose header and slots a hostile peer wrote: the
//! consumer either pops messages that fit the buffer or reports the ring
//! corrupt, and never reads outside the mapping.
//!
//! Input: the ring's bytes (header, then slots), laid over a fresh ring.
#![no_main]

use std::sync::Arc;

use channels::{RingConsumer, RingGeometry};
use libfuzzer_sys::fuzz_target;

const GEO: RingGeometry = RingGeometry {
    slots: 8,
    slot_size: 72,
};

fuzz_target!(|data: &[u8]| {
    let Ok(fd) = GEO.create("fuzz-ring") else {
        return;
    };
    let Ok(map) = fd.map(true) else {
        return;
    };
    let n = data.len().min(GEO.bytes() as usize);
    if map.write_at(0, &data[..n]).is_err() {
        return;
    }
    let Ok(mut rx) = RingConsumer::new(Arc::new(map), GEO) else {
        return;
    };
    let mut buf = [0u8; 64];
    for _ in 0..(2 * GEO.slots) {
        match rx.try_pop(&mut buf) {
            Ok(Some(len)) => assert!(len <= buf.len(), "popped {len} into {}", buf.len()),
            Ok(None) | Err(_) => break,
        }
    }
});
