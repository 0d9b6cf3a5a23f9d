//! Memory channels: the one home of partvisor's shared-memory rings.
//!
//! Seed 001 describes I/O partitions serving guests "over memory channels":
//! queues that live in client-owned memory with a doorbell per direction.
//! Seed 002 asks that messages between partitions on one machine move at
//! memory speed. This crate is the plumbing both rest on:
//!
//! * [`SealedMemfd`]: a memfd whose size is sealed (`F_SEAL_SHRINK |
//!   F_SEAL_GROW | F_SEAL_SEAL`). Every memfd received from another process is
//!   checked with [`SealedMemfd::from_received`] before it is mapped, so a peer
//!   can never truncate a mapping under us and turn our loads into `SIGBUS`.
//! * [`Mapping`]: an `mmap` of such a memfd, unmapped on drop.
//! * [`RingProducer`] / [`RingConsumer`]: a single-producer single-consumer
//!   ring of fixed-size slots inside a mapping. Each side keeps its own index
//!   privately and only *publishes* it to shared memory; every value read from
//!   shared memory (the peer's index, a slot length) is validated, so a hostile
//!   peer scribbling on the ring can at worst produce garbage messages, which
//!   the consumer's protocol layer rejects, or [`ChannelError::Corrupt`].
//! * [`Doorbell`]: an eventfd, and [`Waiter`], the adaptive spin-then-block
//!   loop: spin while work keeps arriving, otherwise raise the ring's
//!   `consumer_sleeping` flag and block on the eventfd. Producers ring the
//!   doorbell only when that flag is raised, so a busy channel makes no system
//!   calls at all.
//! * [`scm`]: passing memfds and eventfds over a Unix stream with
//!   `SCM_RIGHTS`.
//!
//! What this crate must never do: map a received fd without checking its
//! seals and size, trust an index or length read from shared memory, or block
//! without a way to be woken (every blocking wait takes a timeout or an extra
//! fd that signals peer death).

mod doorbell;
mod error;
pub mod memfd;
mod ring;
pub mod scm;

pub use doorbell::{wait_ring, Doorbell, WaitOutcome, Waiter};
pub use error::ChannelError;
pub use memfd::{Mapping, SealedMemfd};
pub use ring::{RingConsumer, RingGeometry, RingProducer, RING_HEADER_SIZE};
