//! An shm link whose peer writes anything into its ring and sends anything
//! (with memfds of any size, sealed or not) on the control socket: the link
//! delivers validated messages, or is lost, and never maps what it should
//! not.
//!
//! Input: 2 bytes (how many of the rest are ring messages), then the ring
//! bytes, then the control bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let k = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (ring, ctrl) = rest.split_at(k.min(rest.len()));
    interconnect::fuzzing::shm_peer(ring, ctrl);
});
