//! What the engine needs from a transport.
use std::os::fd::RawFd;
use std::sync::Arc;

use channels::Mapping;

use crate::alloc::Buffer;
use crate::types::Transport;
use crate::wire::Msg;

/// Payload accompanying an outgoing message.
pub(crate) enum OutData<'a> {
    None,
    /// SEND/WRITE source in a local registrable buffer.
    Source {
        buf: &'a Buffer,
        off: u64,
        len: u64,
    },
    /// READ response data, read by the target from its own MR.
    ReadData {
        map: &'a Mapping,
        off: u64,
        len: u64,
    },
}

/// Payload that came with an incoming message.
pub(crate) enum InData {
    None,
    /// Bytes in peer memory mapped read-only (shm).
    Mapped {
        map: Arc<Mapping>,
        off: u64,
        len: u64,
    },
    /// Bytes that came over a stream (tcp).
    Bytes(Vec<u8>),
}

impl InData {
    /// Copies exactly `len` bytes into `dst` at `dst_off`. Returns false if the
    /// source does not hold `len` bytes (a lying peer) or `dst` is too small.
    pub fn copy_into(&self, dst: &Mapping, dst_off: u64, len: u64) -> bool {
        match self {
            InData::None => len == 0,
            InData::Mapped {
                map,
                off,
                len: have,
            } => *have == len && dst.copy_from(dst_off, map, *off, len).is_ok(),
            InData::Bytes(v) => v.len() as u64 == len && dst.write_at(dst_off, v).is_ok(),
        }
    }

    /// Whether the source range is present and exactly `len` long.
    pub fn valid_for(&self, len: u64) -> bool {
        match self {
            InData::None => len == 0,
            InData::Mapped {
                map,
                off,
                len: have,
            } => *have == len && map.check_range(*off, len),
            InData::Bytes(v) => v.len() as u64 == len,
        }
    }
}

pub(crate) enum LinkEvent {
    Msg(Msg, InData),
    /// The peer said goodbye.
    Closed,
    /// The connection broke or the peer violated the protocol.
    Lost(String),
}

pub(crate) trait Link: Send {
    fn transport(&self) -> Transport;
    /// Sends one message; an error means the link is unusable.
    fn send(&mut self, msg: Msg, data: OutData<'_>) -> Result<(), String>;
    /// Next event, without blocking.
    fn try_recv(&mut self) -> Option<LinkEvent>;
    /// Whether a READ response may be produced now (shm has one window).
    fn read_window_free(&self) -> bool;
    /// The initiator finished copying the READ data it was handed.
    fn read_done(&mut self) -> Result<(), String>;
    /// Raise/lower the "ring my doorbell" flag before blocking.
    fn arm(&self, sleeping: bool);
    /// Fds whose readability means "call try_recv"; the first is drained.
    fn wait_fds(&self) -> Vec<RawFd>;
    /// Polite close: tell the peer, then shut down.
    fn close(&mut self);
}
