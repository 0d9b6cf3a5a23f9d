//! A vsock packet header as a guest puts it on its TX queue: parsed into a
//! header that speaks only for the guest's own CID, or refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

const CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    use part_io::vsock::packet::{Header, Op, MAX_PAYLOAD};
    if let Ok(h) = Header::from_guest(data, CID) {
        assert_eq!(h.src.cid, CID, "a header that speaks for another CID");
        assert!(h.op == Op::Rw || h.len == 0, "{h:?}");
        assert!(h.len as usize <= MAX_PAYLOAD as usize, "{h:?}");
    }
});
