//! One interconnect message as a peer sends it: decoded or refused, and
//! what decodes encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| interconnect::fuzzing::wire(data));
