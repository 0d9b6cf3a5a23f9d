//! The partvisor interconnect: a verbs-style API between partitions.
//!
//! Seed 000 (the seeds are listed in `ARCHITECTURE.md`) describes an
//! interconnect API modelled on OFED verbs through which partitions exchange
//! data "using the same calls whether the peer is on this host or another":
//! initialization verbs (open/query the access layer, query local and
//! allowed remote ports, register memory, create queue pairs), data-flow
//! verbs (post send, post receive, poll completion queue), tear-down verbs
//! (deregister, destroy CQ and QP, deallocate PD, close access layer, port
//! reset), work-request statuses (success, local error, remote access error,
//! remote operation error, bad response) and per-queue-pair performance
//! counters. Seeds 002 and 003 ask that partitions on one machine move a
//! message with one copy and no network stack, after one location lookup.
//!
//! This crate is that API:
//! * [`Context`] (access layer) → [`Pd`] → [`Buffer`] (from the
//!   interconnect's own allocator) → [`Mr`] (lkey/rkey, access flags);
//!   [`Cq`] with an eventfd notification armed like `ibv_req_notify_cq`
//!   (a callback fires once per arming); [`Qp`] with `post_send`
//!   (SEND, SEND_WITH_IMM, RDMA_WRITE, RDMA_WRITE_WITH_IMM, RDMA_READ),
//!   `post_recv`, completions via [`Cq::poll`], counters via [`Qp::stats`].
//! * Named endpoints: [`Context::listen`] registers a name with its
//!   allowlist in a [`Directory`] ([`DirectoryServer`] serves one on a Unix
//!   socket); [`Context::connect`] resolves the name and picks the transport
//!   by location: `shm` when the peer has the same host id, `tcp` otherwise.
//!   Names belong to uids ([`directory`]), and a peer proves at connect that
//!   it holds the name it claims ([`proof`]).
//!   Closing (QP destroy, [`Context::close`], [`Context::port_reset`]) tells
//!   the peer, which sees [`AsyncEvent::PeerClosed`] and flushed work
//!   requests; a peer that dies is seen as [`AsyncEvent::PeerLost`].
//! * Teardown rules: a PD with live MRs or QPs, or a CQ used by a QP, is
//!   busy ([`IcError::Busy`]); destroying a QP flushes its work requests.
//!
//! Semantics worth knowing: one scatter entry per work request; remote
//! addresses are offsets into the peer's MR (`RemoteAddr { rkey, offset }`);
//! a SEND waits at the target until a receive is posted (infinite RNR retry);
//! completions of one send queue arrive in posting order.
//!
//! The verbs live in `src/verbs/`, one object per file (`context.rs`,
//! `pd.rs`, `cq.rs`, `qp.rs`) plus the progress engine (`engine.rs`).
//! Measured latency and bandwidth, with the date and command that produced
//! them: `interconnect/README.md`.
//!
//! # Threat model
//!
//! A peer may be hostile: it may run any code, not this library, and issue
//! raw system calls on every fd it was given. It must never reach memory
//! that was not registered to it with the access it uses, deregistration
//! revokes access at once, and it must not be able to crash or hang us.
//!
//! Mechanism chosen: **the target applies every remote operation itself**.
//! A process never gives a peer any fd that maps its MRs writable, nor any
//! mapping of memory registered for remote access. Every SEND, RDMA WRITE
//! and RDMA READ arrives as a request on the QP; the target's progress
//! engine looks the rkey up in *its own* table (the PD of that QP), checks
//! the access flag and the bounds, holds the MR's registration lock for the
//! duration of the copy, and performs the copy. Forged or stale rkeys,
//! out-of-bounds offsets and missing rights therefore fail with
//! [`WcStatus::RemoteAccess`] whatever the peer's library does, and
//! [`Mr::deregister`] (which takes that lock for writing) revokes access the
//! moment it returns. We chose this over a trusted per-host copier because
//! it needs no extra daemon or privilege, and over peer-side enforcement
//! because a memfd handed to a peer can be mapped read-write regardless of
//! what the peer's library intends.
//!
//! The single copy of the shm transport: the initiator's *source* buffer of
//! a SEND/WRITE is exposed to that peer read-only — every buffer from
//! [`Pd::alloc_buffer`] is its own memfd sealed `F_SEAL_FUTURE_WRITE` after
//! the owner mapped it, so the peer cannot obtain a writable mapping — and
//! the target copies straight from it into the destination MR. RDMA READ
//! responses go through the target's read window (also sealed
//! `F_SEAL_FUTURE_WRITE`, read-only to the initiator): the target copies the
//! validated range in, the initiator copies it out — two copies, the price of
//! never exposing remote-readable MRs directly, which would make revocation
//! impossible. Known exposure: a buffer once used as a send source stays
//! readable by that peer while the buffer exists (it was sending that
//! buffer's content to it anyway); when the buffer is dropped the peer is
//! told to unmap it, which an honest peer does and a hostile one may ignore
//! (keeping a read-only view of pages the owner no longer uses). Keep
//! per-peer send buffers if that matters.
//!
//! Every memfd received is checked for `F_SEAL_SHRINK | F_SEAL_GROW` and its
//! size before it is mapped ([`channels::SealedMemfd::from_received`]), so a
//! peer cannot truncate it and `SIGBUS` us; doorbells must be eventfds; ring
//! indices and lengths read from shared memory are validated; payload
//! descriptors are bounds-checked against the sealed size; a peer exceeding
//! its queue depth or breaking the protocol moves the QP to the error state
//! (flushing it) rather than affecting anything else.
//!
//! What this crate must never do: write into memory the caller did not
//! register with the matching access, trust any value from a peer without
//! validating it, or block without a timeout on a peer.

mod alloc;
mod connect;
mod deframe;
pub mod directory;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod link;
pub mod proof;
mod shm;
mod tcp;
mod types;
mod verbs;
mod wire;

pub use alloc::Buffer;
pub use connect::Listener;
pub use directory::{
    Directory, DirectoryClient, DirectoryServer, Endpoint, MemDirectory, Resolved,
};
pub use error::{IcError, Result};
pub use proof::{ListenerKey, PairSecret};
pub use types::*;
pub use verbs::{
    Context, ContextAttr, ContextOptions, Cq, Mr, Pd, PortAttr, Qp, QpCaps, QpState, RemotePort,
    MAX_RECV_WR, MAX_SEND_WR,
};
