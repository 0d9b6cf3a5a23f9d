//! A frame in flight through the switch (the copies that put it into a
//! receiver's buffers are [`crate::copy`]'s).

use vm_memory::GuestMemoryMmap;

use super::{MacAddr, ETH_HDR};
use crate::chain::Segment;

/// A frame being forwarded.
///
/// Its Ethernet header was copied out of the sender once and checked (the
/// source MAC); that copy is what every receiver gets, so a guest rewriting
/// its transmit buffer while the frame is in flight can change only its own
/// payload, never the addresses the switch decided on. The body is copied
/// once per receiver, straight from the sender's memory into the receiver's.
pub(super) struct Frame<'a> {
    /// The Ethernet header (destination, source, type).
    pub(super) eth: [u8; ETH_HDR],
    /// Everything after it.
    pub(super) body: Body<'a>,
}

/// Where a frame's bytes after the Ethernet header are.
pub(super) enum Body<'a> {
    /// Already in part-io's memory (read from the uplink).
    Bytes(&'a [u8]),
    /// Still in the sender's guest memory, in these (checked) segments.
    Guest {
        mem: &'a GuestMemoryMmap<()>,
        segs: &'a [Segment],
        len: usize,
    },
}

impl Frame<'_> {
    /// Length of the Ethernet frame.
    pub(super) fn len(&self) -> usize {
        ETH_HDR
            + match &self.body {
                Body::Bytes(b) => b.len(),
                Body::Guest { len, .. } => *len,
            }
    }

    /// Destination address.
    pub(super) fn dst(&self) -> MacAddr {
        mac_at(&self.eth[0..6])
    }
}

/// The address in the first six bytes of `b`, which the caller has checked
/// is at least that long (a header slice).
pub(super) fn mac_at(b: &[u8]) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[..6]);
    MacAddr(m)
}

/// Where a frame entered the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Port(usize),
    Uplink,
}
