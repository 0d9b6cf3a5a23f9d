//! # partvisor-api: the types every partvisor process puts on a wire
//!
//! partd, part-vmm, part-io and partctl talk to each other in JSON; this crate holds
//! each message's type once, so the three cannot drift apart:
//!
//! - [`descriptor`]: the partition descriptor partd writes (a sealed memfd)
//!   and part-vmm boots from, with the limits both sides check
//!   ([`descriptor::MAX_XAPIC_VCPUS`], [`descriptor::MAX_DEVICES`], ...).
//! - [`control`]: the partd <-> monitor control protocol (ping, stop) and
//!   the exit record a monitor leaves behind.
//! - [`resources`], [`host`], [`holdings`]: the resource map's vocabulary
//!   (partition names, owners, resources, changes, the audit log's entries,
//!   capacities), which partd's API returns as is.
//! - [`definition`]: a partition definition as an operator writes it.
//! - [`vsock`]: the vsock directory partd pushes to `part-io vsock` (who
//!   holds which CID, where, and whom it accepts).
//! - [`views`]: partd's HTTP request and response bodies. The OpenAPI
//!   document beside this crate (`resources/api/partd.openapi.yaml`)
//!   describes them; a test here deserialises every example it gives into
//!   these types, and partd's tests compare its routes with the document's.
//!
//! It lives in `resources/api/`, beside that document, because it is the
//! contract between the card's components rather than one of them: the
//! coordinator (`resource-db/partd`), the monitor (`vmm/`) and the console
//! (`cli/`) all depend on it and on nothing of each other.
//!
//! ## What it must never do
//! - Depend on anything but serde, serde_json and thiserror: no KVM, no
//!   SQLite, no sockets, no files. Behaviour that needs them (probing the
//!   host, validating against KVM, storing) stays in the crate that owns it.
//! - Change a type's JSON form without changing every reader in the same
//!   commit: partd's state files and audit log hold these forms on disk.

pub mod control;
pub mod definition;
pub mod descriptor;
mod error;
pub mod holdings;
pub mod host;
pub mod resources;
pub mod views;
pub mod vsock;

pub use definition::{Definition, Disk, Nic, Vsock, VsockAccept};
pub use error::ParseError;
pub use holdings::{Capacity, FreeCapacity, Holdings, LogEntry, LogRecord};
pub use host::{DeviceKind, DeviceSpec, HostConfig};
pub use resources::{
    Change, Extent, MacAddr, Owner, PartitionId, PartitionRecord, PartitionState, ResourceId,
    ResourceKind, TxId,
};
