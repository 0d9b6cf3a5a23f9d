//! `part-io net`: an L2 learning switch whose ports are vhost-user-net
//! devices, with an optional TAP uplink.
//!
//! One process is one switch. Each `--port socket=PATH,mac=MAC` is a
//! vhost-user socket served to one frontend (a `part-vmm`) at a time, with two
//! queues (0 = receiveq, 1 = transmitq), `VIRTIO_NET_F_MAC` (config bytes 0..6
//! are the port's MAC), `VIRTIO_NET_F_STATUS` (link always up),
//! `VIRTIO_RING_F_EVENT_IDX`, no offloads and no `MRG_RXBUF`. Every buffer
//! starts with the 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame
//! without FCS, 14..=1514 bytes.
//!
//! # Forwarding
//!
//! - A port may only send from its MAC (the one the resource map assigned to
//!   its partition): any other source is dropped and counted
//!   (`dropped_spoof`). Port MACs are therefore static entries of the
//!   forwarding table; addresses behind the uplink are learned from the
//!   frames the uplink delivers (aged out after [`LEARN_AGE`]).
//! - Broadcast, multicast and unknown unicast destinations flood to every
//!   other connected port and to the uplink; a known destination goes to its
//!   one port (or the uplink). A frame never goes back where it came from.
//! - Delivery never waits: the sender's worker thread puts the frame straight
//!   into the receiver's receive ring. If the receiver has no buffer posted,
//!   the frame is dropped and counted at the receiver (`dropped_full`); a
//!   unicast frame for a port with no frontend is counted as `dropped_down`.
//!   A slow guest costs its senders nothing but that drop.
//! - Separate processes are separate switches: nothing is shared between them.
//!
//! # Copies and locking
//!
//! The sender's worker takes a batch of chains off its transmit ring (holding
//! that vring's lock only for this), validates them and copies out each
//! frame's 14-byte Ethernet header, which is what the switch checks and what
//! receivers get. It then forwards each frame: for every receiver it takes
//! that port's `rx` lock (then its vring lock), and copies the frame body
//! once, from the sender's guest memory straight into the receiver's receive
//! buffer. Only after the whole batch is forwarded does it take its own
//! transmit lock again to return the chains to the guest. A thread holds at
//! most one port's `rx` lock and never a transmit lock at the same time, so
//! there is no lock order to break. The uplink writes a frame to the tap
//! with one `writev` from the same places.
//!
//! # Files
//!
//! - [`spec`]: the `--port` argument (MACs are the API crate's [`MacAddr`]).
//! - [`switch`]: ports and forwarding (learning, flooding, the source-MAC
//!   lock, dropping when a receiver is full).
//! - [`frame`]: a frame in flight and the copies into receive buffers.
//! - [`uplink`]: the TAP uplink's side of the switch.
//! - [`backend`]: the vhost-user-net device of one port's connection.
//! - [`stats`]: per-port and uplink counters and the stats socket.

use std::time::Duration;

pub mod backend;
pub mod frame;
pub mod spec;
pub mod stats;
pub mod switch;
pub mod uplink;

pub use backend::{NetBackend, NetDevice, PortEndpoint};
/// The one MAC address type of the project (see the API crate).
pub use partvisor_api::MacAddr;
pub use spec::{NetError, PortSpec};
pub use stats::{bind_stats, serve_stats, PortCounters, PortStats, UplinkCounters};
pub use switch::{Port, Switch};

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Number of queues (one rx/tx pair; no control queue).
pub const NUM_QUEUES: usize = 2;
/// Size of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Length of an Ethernet header (destination, source, type).
pub const ETH_HDR: usize = 14;
/// Shortest frame accepted: an Ethernet header.
pub const MIN_FRAME: usize = ETH_HDR;
/// Longest frame accepted: 1500-byte payload plus the Ethernet header, no FCS.
pub const MAX_FRAME: usize = 1514;
/// How long an address learned on the uplink stays known without traffic.
pub const LEARN_AGE: Duration = Duration::from_secs(300);
/// Most addresses learned on the uplink; beyond that unknown ones flood.
pub const MAX_LEARNED: usize = 4096;
/// Chains taken off a transmit ring before they are forwarded.
const TX_BATCH: usize = 64;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_LEN: usize = 12;
