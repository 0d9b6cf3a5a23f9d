//! `part-io vsock`: guest sockets (AF_VSOCK) between partitions, relayed by
//! the I/O partition with one copy, and to host services.
//!
//! Seeds 002 and 004: partitions pass messages at memory speed, one copy
//! from the sender's memory into the receiver's, without sharing memory.
//! Seed 003: a socket to a partition on the same machine bypasses the
//! network stacks after one lookup of where the peer lives, and the answer
//! holds for the life of the connection. AF_VSOCK is the socket family every
//! stock Linux guest already drives (`vmw_vsock_virtio_transport`), so
//! applications need no change.
//!
//! # Shape (being built; issue 11)
//!
//! One process per host serves every vsock partition, one vhost-user socket
//! each, behind the same memory guard as blk and net. It is a relay, not an
//! end of any connection:
//!
//! - A guest's header is checked before anything is done with it
//!   ([`packet`]): its source CID must be the partition's own, the op known,
//!   the socket a stream, a payload only on RW and at most 64 KiB.
//! - A REQUEST from CID A to B:port asks partd's directory once whether B's
//!   definition accepts A on that port (default deny) and where B lives;
//!   the answer is kept for the connection and dropped when either side
//!   stops, at which point the other side gets a RST.
//! - RW payloads move once, from A's tx descriptors into B's rx
//!   descriptors, while part-io keeps each direction's credit books
//!   ([`credit`]): a sender past the receiver's advertised space, or a
//!   receiver claiming to have consumed more than it was given, breaks the
//!   connection (RST to both) and is counted against its partition. What
//!   part-io can ever hold for a connection is bounded by the capped
//!   `buf_alloc`, so a receiver that stops reading stalls its own
//!   connections only.
//!
//! # What it must never do
//!
//! Deliver a packet whose source is not the sending partition's CID; open a
//! connection the listener's definition does not accept; hold more for a
//! connection than its receiver advertised.

pub mod backend;
pub mod bound;
pub mod control;
pub mod credit;
pub mod directory;
pub mod hybrid;
pub mod packet;
pub mod relay;
pub mod spec;
pub mod stats;
pub mod table;

pub use backend::{VsockBackend, VsockDevice, VsockEndpoint};
pub use directory::Entries;
pub use relay::{Relay, VsockPort};
pub use spec::{PortSpec, VsockError};

/// Queues served (the event queue stays with the VMM).
pub const NUM_QUEUES: usize = 2;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Chains taken off a transmit ring at a time.
pub const TX_BATCH: usize = 64;
/// Connections one partition may have initiated and not yet closed.
pub const TABLE_LIMIT: usize = 64;
