use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Memory-region access rights (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access(u32);

impl Access {
    /// The local side may write the region (receive buffer, RDMA READ target).
    pub const LOCAL_WRITE: Access = Access(1);
    /// A connected peer may RDMA WRITE into the region.
    pub const REMOTE_WRITE: Access = Access(2);
    /// A connected peer may RDMA READ from the region.
    pub const REMOTE_READ: Access = Access(4);
    /// No rights beyond local read (a send source).
    pub const NONE: Access = Access(0);

    /// True if every bit of `other` is set.
    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// Send-queue work request opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Opcode {
    /// Message into the peer's next posted receive.
    Send,
    /// Message plus 32-bit immediate data.
    SendWithImm,
    /// Write into a peer memory region named by rkey; consumes no receive.
    RdmaWrite,
    /// Write, then deliver the immediate in a receive completion at the peer.
    RdmaWriteWithImm,
    /// Read from a peer memory region into local memory.
    RdmaRead,
}

/// Completion opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A send completed.
    Send,
    /// An RDMA write completed.
    RdmaWrite,
    /// An RDMA read completed.
    RdmaRead,
    /// A receive consumed by a SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE WITH IMM.
    RecvRdmaWithImm,
}

/// Outcome of a work request. Each has a real trigger, listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// Completed.
    Success,
    /// The local buffer cannot hold the data: a receive buffer smaller than
    /// the incoming SEND (on the receive completion), or a send/read longer
    /// than [`MAX_MESSAGE`]/[`MAX_READ`].
    LocalLength,
    /// The local scatter entry is unusable: unknown or deregistered lkey,
    /// range outside the MR, or a read/receive into an MR without
    /// `LOCAL_WRITE`.
    LocalProtection,
    /// The target refused an RDMA access: unknown or revoked rkey, range
    /// outside the MR, or the MR lacks `REMOTE_WRITE` / `REMOTE_READ`.
    RemoteAccess,
    /// The target could not complete the request: its receive buffer was too
    /// small or unusable, or the request named a source it never exposed.
    RemoteOperation,
    /// The peer answered something that matches no outstanding request (wrong
    /// sequence, wrong read length, out-of-range read data).
    BadResponse,
    /// The request was still queued when the QP was destroyed, moved to the
    /// error state, or the peer closed or died.
    Flushed,
}

impl WcStatus {
    pub(crate) fn code(self) -> u8 {
        match self {
            WcStatus::Success => 0,
            WcStatus::LocalLength => 1,
            WcStatus::LocalProtection => 2,
            WcStatus::RemoteAccess => 3,
            WcStatus::RemoteOperation => 4,
            WcStatus::BadResponse => 5,
            WcStatus::Flushed => 6,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => WcStatus::Success,
            1 => WcStatus::LocalLength,
            2 => WcStatus::LocalProtection,
            3 => WcStatus::RemoteAccess,
            4 => WcStatus::RemoteOperation,
            5 => WcStatus::BadResponse,
            6 => WcStatus::Flushed,
            _ => return None,
        })
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WcStatus::Success => "success",
            WcStatus::LocalLength => "local length error: buffer too small or request too long",
            WcStatus::LocalProtection => "local protection error: lkey unknown, revoked, out of range or lacking LOCAL_WRITE",
            WcStatus::RemoteAccess => "remote access error: rkey unknown, revoked, out of range or lacking the access used",
            WcStatus::RemoteOperation => "remote operation error: the target could not place the message",
            WcStatus::BadResponse => "bad response: the peer answered out of protocol",
            WcStatus::Flushed => "flushed: queue pair destroyed, in error, or peer gone",
        })
    }
}

/// Largest single work request payload.
pub const MAX_MESSAGE: u64 = 16 << 20;
/// Largest single RDMA READ (the size of the read-response window).
pub const MAX_READ: u64 = 4 << 20;

/// One scatter/gather entry: `len` bytes at `offset` inside the MR `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Local key of the memory region.
    pub lkey: u32,
    /// Offset from the start of the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Remote side of an RDMA operation: `raddr` is an offset into the peer's MR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr {
    /// The peer MR's remote key.
    pub rkey: u32,
    /// Offset from the start of that region.
    pub offset: u64,
}

/// A send-queue work request.
#[derive(Debug, Clone, Copy)]
pub struct SendWr {
    /// Caller's identifier, returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub opcode: Opcode,
    /// Local data (source, or destination for READ).
    pub sge: Sge,
    /// Target for RDMA opcodes.
    pub remote: Option<RemoteAddr>,
    /// Immediate data for the `*WithImm` opcodes.
    pub imm: Option<u32>,
    /// Generate a completion on success (errors always complete).
    pub signaled: bool,
}

/// A receive-queue work request.
#[derive(Debug, Clone, Copy)]
pub struct RecvWr {
    /// Caller's identifier, returned in the completion.
    pub wr_id: u64,
    /// Where an incoming SEND lands.
    pub sge: Sge,
}

/// A work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// Identifier from the work request.
    pub wr_id: u64,
    /// Outcome.
    pub status: WcStatus,
    /// Kind of request completed.
    pub opcode: WcOpcode,
    /// Bytes placed (receives and reads) or sent.
    pub byte_len: u64,
    /// Immediate data carried by the message, if any.
    pub imm: Option<u32>,
    /// Queue pair number.
    pub qp_num: u32,
}

/// Transports, also the access layer's local ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// Shared-memory rings between processes on one host.
    Shm,
    /// TCP between hosts.
    Tcp,
}

/// Per-QP counters (the seed's "performance monitor counters").
#[derive(Debug, Default)]
pub struct QpCounters {
    pub(crate) sends_posted: AtomicU64,
    pub(crate) recvs_posted: AtomicU64,
    pub(crate) completions_ok: AtomicU64,
    pub(crate) completions_err: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) remote_ops_applied: AtomicU64,
    pub(crate) remote_ops_refused: AtomicU64,
    pub(crate) rnr_waits: AtomicU64,
}

/// A snapshot of [`QpCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpStats {
    /// Send-queue work requests accepted.
    pub sends_posted: u64,
    /// Receive work requests accepted.
    pub recvs_posted: u64,
    /// Completions with status success.
    pub completions_ok: u64,
    /// Completions with any error status.
    pub completions_err: u64,
    /// Payload bytes this side sent (SEND/WRITE) or served (READ as target).
    pub bytes_out: u64,
    /// Payload bytes placed in local memory (receives, writes as target, reads).
    pub bytes_in: u64,
    /// Requests from the peer applied as target.
    pub remote_ops_applied: u64,
    /// Requests from the peer refused (bad rkey, bounds, access).
    pub remote_ops_refused: u64,
    /// Times an incoming message waited for a receive to be posted.
    pub rnr_waits: u64,
}

impl QpCounters {
    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> QpStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QpStats {
            sends_posted: g(&self.sends_posted),
            recvs_posted: g(&self.recvs_posted),
            completions_ok: g(&self.completions_ok),
            completions_err: g(&self.completions_err),
            bytes_out: g(&self.bytes_out),
            bytes_in: g(&self.bytes_in),
            remote_ops_applied: g(&self.remote_ops_applied),
            remote_ops_refused: g(&self.remote_ops_refused),
            rnr_waits: g(&self.rnr_waits),
        }
    }
}

/// Asynchronous events delivered by the access layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsyncEvent {
    /// The peer closed the connection politely (destroyed its QP or closed
    /// its access layer).
    PeerClosed {
        /// Local QP number.
        qp_num: u32,
    },
    /// The connection broke without a close (peer died, protocol violation).
    PeerLost {
        /// Local QP number.
        qp_num: u32,
        /// What happened.
        reason: String,
    },
}
