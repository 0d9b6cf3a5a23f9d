//! The TCP transport's receive side: any byte stream, delivered in reads of
//! any sizes, yields whole messages with their payloads, a close, or a lost
//! link, never a short payload or a panic.
//!
//! Input: 8 bytes of read sizes (in units of 64 bytes), then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (cuts, stream) = data.split_at(8);
    interconnect::fuzzing::tcp_stream(stream, cuts);
});
