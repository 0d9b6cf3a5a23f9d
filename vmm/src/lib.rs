//! `part-vmm`: the partition monitor of partvisor — one process per
//! partition, one KVM VM per process.
//!
//! Seed concept: the per-partition *monitor* of seeds 000/001. It confines
//! its guest to exactly what it was granted (the memory and vCPUs of its
//! descriptor, the devices listed in [`layout`]), and its failure takes down
//! nothing but its own partition.
//!
//! It must never: touch resources it was not granted, sit on the I/O data
//! path of virtio devices (that is the I/O partition's job), silently ignore a
//! guest access (unassigned accesses are answered, counted and logged), or
//! panic on input an operator or a guest can produce.
//!
//! Layout of the crate: [`config`] (descriptor), [`memory`] (memfd guest
//! RAM), [`acpi`] and [`boot`] (what the guest finds at entry), [`vcpu`],
//! [`devices`], [`vmm`] (assembly and event loop), [`exit`] (why it ended).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod error;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod virtio;
pub mod vmm;

pub use config::VmConfig;
pub use error::{Error, Result};
pub use exit::ExitReason;
