//! Entry points for the fuzz targets (`tests/fuzz/`), behind the `fuzzing`
//! feature: the parsers a peer reaches, driven without a real peer. Not an
//! API; nothing else may use it.
//!
//! Each function panics only when the code under test breaks a promise
//! (an event that contradicts its message, a message that does not
//! round-trip); malformed input must end in an error or a lost link.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use channels::{scm, Doorbell, RingProducer, SealedMemfd};

use crate::link::{InData, Link, LinkEvent};
use crate::shm::{finish, LocalSide, CTRL_LEN, GEO};
use crate::types::MAX_READ;
use crate::wire::{Msg, MSG_LEN};

/// One wire message: what decodes encodes back to the same message.
pub fn wire(b: &[u8]) {
    if let Some(m) = Msg::decode(b) {
        assert_eq!(Msg::decode(&m.encode()), Some(m));
    }
}

/// The TCP transport's receive side fed `data` in reads sized by `cuts`.
pub fn tcp_stream(data: &[u8], cuts: &[u8]) -> usize {
    crate::deframe::drive(data, cuts)
}

/// An shm link whose peer is hostile: `ring` holds the 64-byte messages it
/// produces into its ring (any bytes), `ctrl` the 24-byte control messages
/// it sends on the socket, each with a memfd attached when its first byte is
/// odd (of the size its length field names, sealed when the second byte is
/// odd). The link is polled until it goes quiet, closes or is lost.
pub fn shm_peer(ring: &[u8], ctrl: &[u8]) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let Ok(peer_ring) = GEO.create("fuzz-peer-ring") else {
        return;
    };
    let Ok(peer_map) = peer_ring.map(true) else {
        return;
    };
    let Ok(mut tx) = RingProducer::new(Arc::new(peer_map), GEO) else {
        return;
    };
    for m in ring.chunks(MSG_LEN) {
        if !matches!(tx.try_push(m), Ok(true)) {
            break;
        }
    }
    let Ok(bell) = Doorbell::new() else {
        return;
    };
    let Ok(window) = SealedMemfd::create("fuzz-peer-window", MAX_READ) else {
        return;
    };
    for c in ctrl.chunks(CTRL_LEN) {
        let memfd = (c.first().is_some_and(|b| b & 1 == 1) && c.len() == CTRL_LEN)
            .then(|| {
                let len = u64::from_le_bytes(c[16..24].try_into().unwrap_or([0; 8])) % (1 << 20);
                let m = SealedMemfd::create("fuzz-exposed", len.max(1)).ok()?;
                if c[1] & 1 == 1 {
                    m.seal_future_write().ok()?;
                }
                Some(m)
            })
            .flatten();
        let fds: Vec<_> = memfd.iter().map(|m| m.fd()).collect();
        if scm::send(&theirs, c, &fds).is_err() {
            break;
        }
    }
    let fds = [peer_ring.fd(), bell.fd(), window.fd()]
        .into_iter()
        .filter_map(|f| f.try_clone_to_owned().ok())
        .collect();
    let Ok(local) = LocalSide::new() else {
        return;
    };
    let Ok(mut link) = finish(ours, local, fds) else {
        return;
    };
    drop(theirs);
    for _ in 0..(2 * GEO.slots) {
        match link.try_recv() {
            None => break,
            Some(LinkEvent::Closed | LinkEvent::Lost(_)) => return,
            Some(LinkEvent::Msg(m, data)) => {
                if let InData::Bytes(_) = data {
                    panic!("shm delivered inline bytes for {m:?}");
                }
            }
        }
    }
    let _ = link.drain_ctrl();
}
