//! The spec strings partd writes for part-io (blk exports, switch ports,
//! vsock ports with their accept lists): any text is parsed or refused with
//! an error, and what parses is consistent with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<part_io::export::ExportSpec>();
    let _ = text.parse::<part_io::net::PortSpec>();
    if let Ok(port) = text.parse::<part_io::vsock::PortSpec>() {
        // The relay's table is built from parsed ports; a bad combination
        // is an error, never a panic.
        let _ = part_io::vsock::Entries::from_ports(&[port]);
    }
});
