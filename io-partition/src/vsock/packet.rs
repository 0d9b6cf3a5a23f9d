//! The virtio-vsock packet header (virtio 1.2 section 5.10.6): its layout,
//! its operations, and the checks a header from a guest must pass before
//! part-io acts on it.
//!
//! Every buffer on the rx and tx queues starts with this 44-byte,
//! little-endian header; a `RW` packet's payload follows it, in the same
//! descriptor or in the next ones.

use std::fmt;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;

/// The host's CID (`VMADDR_CID_HOST`): hybrid-socket peers of a partition.
pub const HOST_CID: u64 = 2;

/// Largest payload one packet carries. Linux's driver posts receive buffers
/// of this size and never sends more in one packet
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); anything larger is malformed.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type` of a stream socket.
pub const TYPE_STREAM: u16 = 1;

/// `flags` of a SHUTDOWN: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a SHUTDOWN: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// The operation of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connect to `dst_port`.
    Request,
    /// The listener accepted.
    Response,
    /// The connection is gone (or never existed).
    Rst,
    /// One or both directions are closed (`flags`).
    Shutdown,
    /// Data.
    Rw,
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest,
}

impl Op {
    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    fn from_code(code: u16) -> Option<Op> {
        Some(match code {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// One side of a connection: a CID and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub cid: u64,
    pub port: u32,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub src: Addr,
    pub dst: Addr,
    /// Payload length (0 except for `Rw`).
    pub len: u32,
    /// Socket type; only [`TYPE_STREAM`] is served.
    pub kind: u16,
    pub op: Op,
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

/// Why a header from a guest was refused. Each kind is counted per
/// partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadHeader {
    #[error("buffer of {0} bytes is shorter than the {HDR_LEN}-byte header")]
    Short(usize),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("socket type {0} is not served (only stream, 1)")]
    Type(u16),
    #[error("source CID {got} is not the partition's CID {cid}")]
    Spoofed { got: u64, cid: u64 },
    #[error("{op:?} carries {len} payload bytes")]
    UnexpectedPayload { op: Op, len: u32 },
    #[error("payload of {0} bytes is more than {MAX_PAYLOAD}")]
    TooLong(u32),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Decodes the header a guest with CID `cid` put on its tx queue, and
    /// checks what part-io relies on: a known op, a stream socket, the
    /// partition's own source CID (a guest cannot speak for another), a
    /// payload only on `Rw`, and no more than [`MAX_PAYLOAD`].
    pub fn from_guest(b: &[u8], cid: u64) -> Result<Header, BadHeader> {
        if b.len() < HDR_LEN {
            return Err(BadHeader::Short(b.len()));
        }
        let code = le16(b, 30);
        let op = Op::from_code(code).ok_or(BadHeader::UnknownOp(code))?;
        let h = Header {
            src: Addr {
                cid: le64(b, 0),
                port: le32(b, 16),
            },
            dst: Addr {
                cid: le64(b, 8),
                port: le32(b, 20),
            },
            len: le32(b, 24),
            kind: le16(b, 28),
            op,
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        };
        if h.kind != TYPE_STREAM {
            return Err(BadHeader::Type(h.kind));
        }
        if h.src.cid != cid {
            return Err(BadHeader::Spoofed {
                got: h.src.cid,
                cid,
            });
        }
        if h.op != Op::Rw && h.len != 0 {
            return Err(BadHeader::UnexpectedPayload {
                op: h.op,
                len: h.len,
            });
        }
        if h.len > MAX_PAYLOAD {
            return Err(BadHeader::TooLong(h.len));
        }
        Ok(h)
    }

    /// A packet without payload from `src` to `dst`.
    pub fn control(op: Op, src: Addr, dst: Addr) -> Header {
        Header {
            src,
            dst,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// The RST that answers this packet (source and destination swapped).
    pub fn reset_reply(&self) -> Header {
        Header::control(Op::Rst, self.dst, self.src)
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src.cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst.cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src.port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst.port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.code().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(len: u32) -> Header {
        Header {
            src: Addr { cid: 3, port: 1025 },
            dst: Addr { cid: 4, port: 80 },
            len,
            kind: TYPE_STREAM,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 17,
        }
    }

    #[test]
    fn header_layout_matches_the_virtio_spec_offsets() {
        let b = rw(5).encode();
        assert_eq!(b.len(), 44);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1025);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 80);
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 5);
        assert_eq!(u16::from_le_bytes(b[28..30].try_into().unwrap()), 1);
        assert_eq!(u16::from_le_bytes(b[30..32].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 262_144);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 17);
        assert_eq!(Header::from_guest(&b, 3).unwrap(), rw(5));
    }

    #[test]
    fn a_guest_cannot_send_from_another_cid_or_with_bad_fields() {
        let b = rw(5).encode();
        assert_eq!(
            Header::from_guest(&b, 9),
            Err(BadHeader::Spoofed { got: 3, cid: 9 })
        );
        assert_eq!(Header::from_guest(&b[..43], 3), Err(BadHeader::Short(43)));
        let mut bad = b;
        bad[30] = 9;
        assert_eq!(Header::from_guest(&bad, 3), Err(BadHeader::UnknownOp(9)));
        let mut seq = b;
        seq[28] = 2;
        assert_eq!(Header::from_guest(&seq, 3), Err(BadHeader::Type(2)));
        let mut req = rw(5);
        req.op = Op::Request;
        assert_eq!(
            Header::from_guest(&req.encode(), 3),
            Err(BadHeader::UnexpectedPayload {
                op: Op::Request,
                len: 5
            })
        );
        assert_eq!(
            Header::from_guest(&rw(MAX_PAYLOAD + 1).encode(), 3),
            Err(BadHeader::TooLong(MAX_PAYLOAD + 1))
        );
        assert!(Header::from_guest(&rw(MAX_PAYLOAD).encode(), 3).is_ok());
    }

    #[test]
    fn every_op_round_trips_and_a_reset_reply_swaps_the_ends() {
        for code in 1..=7 {
            let op = Op::from_code(code).unwrap();
            assert_eq!(op.code(), code);
            let h = Header::control(op, Addr { cid: 3, port: 1 }, Addr { cid: 4, port: 2 });
            assert_eq!(Header::from_guest(&h.encode(), 3).unwrap(), h);
        }
        assert_eq!(Op::from_code(0), None);
        let r = rw(0).reset_reply();
        assert_eq!((r.op, r.src, r.dst), (Op::Rst, rw(0).dst, rw(0).src));
    }
}
