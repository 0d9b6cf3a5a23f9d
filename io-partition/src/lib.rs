//! `part-io`: the I/O partition of partvisor.
//!
//! Seed 001 (the seeds are listed in the project's architecture document,
//! `ARCHITECTURE.md`): guest partitions have no I/O of their own; "all
//! I/O is performed by I/O hardware mapped to I/O partitions ... that use
//! memory channels to communicate with their client partitions", and an I/O
//! partition runs a "virtual storage switch (provides channel server
//! endpoints for storage channels)"; request "completion/failure status is
//! queued by the server partition and de-queued by the client partition".
//! Seed 004 moves data "from one kernel memory space of one partition
//! directly to the kernel memory space of \[a\] second partition" through one
//! adapter and its driver: a shared I/O driver in one partition serving the
//! others.
//!
//! In partvisor an I/O partition is this process, serving vhost-user
//! sockets: a partition monitor (`part-vmm`) hands it the guest's memory as
//! a sealed memfd plus virtqueue addresses and eventfds, and from then on
//! guest I/O goes guest → virtqueue → part-io → image → used ring →
//! interrupt, without passing through the monitor.
//!
//! This crate implements two backends, both built on `vhost-user-backend`
//! (protocol handling, vrings, epoll loop) and `virtio-queue`, and served by
//! the same listener ([`server`]) behind the same memory guard ([`guard`]),
//! with the vhost-user plumbing they share in one place ([`device`]) and one
//! parser for their command-line specs ([`spec`]):
//!
//! - `part-io blk` ([`blk`]), the virtual storage switch: one process, any
//!   number of exports (raw image file + vhost-user socket each), each served
//!   to one frontend at a time, with read, write, flush and get-id, read-only
//!   exports, `VIRTIO_RING_F_EVENT_IDX` and indirect descriptors.
//! - `part-io net` ([`net`]), seed 001's "Virtual Ethernet switch (provides
//!   channel server endpoints for network channels)", which "needs access to
//!   the packet header to determine the target partition" and then "copies
//!   the packet" to it: one process
//!   is one L2 learning switch whose ports are vhost-user-net devices (one
//!   socket each, the MAC the resource map assigned to the partition), with
//!   an optional TAP uplink ([`tap`]) so that the I/O partition, not the
//!   guests, owns the path to the outside.
//! - `part-io vsock` ([`vsock`]), under construction: guest sockets between
//!   partitions relayed with one copy and credit enforced per connection;
//!   so far its packet checks and credit books, not yet a command.
//!
//! # What it must never do
//!
//! - **Trust a guest address.** Every descriptor is copied out of guest memory
//!   once and checked against the guest memory table ([`chain`]); every
//!   block request is checked against the disk size (`sector * 512 + len <=
//!   size`), every frame against its buffer and the 1514-byte limit.
//!   A bad request completes with `VIRTIO_BLK_S_IOERR` (`UNSUPP` for an unknown
//!   type); a malformed chain (loop, over-long, bad indirect table, address
//!   outside guest memory, no status byte) goes back on the used ring with
//!   length 0 and is counted per export ([`export::ExportStats`]) and logged.
//! - **Map an unsealed memfd.** `vhost-user-backend` maps memory regions in its
//!   crate-private request handler, and its only backend hook
//!   (`VhostUserBackend::update_memory`) runs after mapping. The cleanest
//!   hook that runs *before* mapping is therefore the socket: [`guard`] sits
//!   between the frontend and `VhostUserDaemon` and checks every
//!   `SET_MEM_TABLE` / `ADD_MEM_REG` descriptor for `F_SEAL_SHRINK` and
//!   `F_SEAL_GROW` (and that the region lies inside the file) before
//!   forwarding it. A failing region ends that connection with a logged
//!   error; the export keeps listening.
//! - **Let one guest stop another's service.** Each export or port has its
//!   own listener thread and each connection its own daemon, worker thread
//!   and counters; guest misbehaviour is answered on that guest's ring and
//!   never ends the process or another connection. In the switch, a sender
//!   never waits for a receiver: a frame for a full receive ring is dropped
//!   and counted.
//! - **Let a guest speak for another.** A switch port only forwards frames
//!   whose source MAC is the one it was given; frames from other switches
//!   (other processes) are never seen.

pub mod blk;
pub mod chain;
pub mod copy;
pub mod device;
pub mod export;
pub mod guard;
pub mod net;
pub mod server;
pub mod spec;
pub mod tap;
pub mod vsock;
