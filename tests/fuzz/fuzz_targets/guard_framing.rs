//! The vhost-user guard in front of the backend, fed a hostile frontend's
//! bytes: it relays well-framed, allowed messages, refuses the rest, and
//! returns when the frontend hangs up, whatever the bytes. (File
//! descriptors cannot come from bytes; their checks have unit tests.)
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((frontend, guard_front)) = UnixStream::pair() else {
        return;
    };
    let Ok((guard_back, mut backend)) = UnixStream::pair() else {
        return;
    };
    std::thread::scope(|t| {
        // The backend side reads whatever the guard passes on, and says
        // nothing.
        t.spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(backend.read(&mut sink), Ok(n) if n > 0) {}
        });
        let mut f = frontend;
        t.spawn(move || {
            let _ = f.write_all(data);
            // Hanging up ends the relay.
            drop(f);
        });
        let _ = part_io::guard::relay(guard_front, guard_back, Some(64 << 20));
    });
});
