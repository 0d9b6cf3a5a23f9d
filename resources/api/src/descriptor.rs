//! The partition descriptor: what partd writes (JSON in a sealed memfd) and
//! part-vmm boots from, and the limits both check. Schema, version 1:
//!
//! ```json
//! {
//!   "vcpus": 2,                     // 1 ..= min(KVM_CAP_MAX_VCPUS, 254); default 1
//!   "memory_mib": 64,               // 1 ..= host MemAvailable; default 128
//!   "kernel": "/path/vmlinux",      // required: ELF with a PVH note, or a bzImage
//!   "initrd": "/path/initrd.img",   // optional; PVH module 0 / Linux initrd
//!   "cmdline": "console=ttyS0",     // optional; at most 64 KiB - 1
//!   "serial": "stdout",             // "stdout" | "file:PATH" | "socket:PATH" | "none"
//!   "stop_timeout_ms": 10000,       // polite stop -> forced stop after this long
//!   "cpu_affinity": [2, 3],         // optional: host CPUs the vCPU threads may run on
//!   "devices": [                    // virtio-mmio devices, at most 8, in order
//!     {"type": "vhost-user-blk", "socket": "/run/part-io/p1-disk0.sock"},
//!     {"type": "vhost-user-net", "socket": "/run/part-io/sw0-p1.sock"}
//!   ]
//! }
//! ```
//!
//! Unknown keys are rejected, so a typo never silently changes a partition.
//! Checks that need the host (KVM's vCPU limit, free memory) are part-vmm's
//! (`part_vmm::config`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ParseError;

/// Where the 16550's output goes and its input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// Output to stdout, input from stdin.
    #[default]
    Stdout,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// part-vmm listens on a Unix socket; a connected client gets the output
    /// (with a backlog of what it missed) and its bytes are the input.
    Socket(PathBuf),
    /// Output discarded; no input.
    None,
}

impl FromStr for SerialConfig {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Serial { text: s.to_owned() };
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
                Some(("socket", p)) if !p.is_empty() => Ok(SerialConfig::Socket(p.into())),
                _ => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        s.to_string()
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdout => write!(f, "stdout"),
            SerialConfig::None => write!(f, "none"),
            SerialConfig::File(p) => write!(f, "file:{}", p.display()),
            SerialConfig::Socket(p) => write!(f, "socket:{}", p.display()),
        }
    }
}

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// The MADT carries 8-bit xAPIC ids; 255 is the broadcast id.
pub const MAX_XAPIC_VCPUS: u32 = 254;
/// virtio-mmio devices per partition (the memory map has eight slots).
pub const MAX_DEVICES: usize = 8;
/// Size of the kernel command line buffer, the terminating NUL included.
pub const CMDLINE_MAX: usize = 0x1_0000;

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_stop_timeout_ms() -> u64 {
    DEFAULT_STOP_TIMEOUT_MS
}

/// A partition descriptor (see the module documentation for the schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Host CPUs the vCPU threads are confined to (the partition's dedicated
    /// CPUs); absent = no confinement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_affinity: Option<Vec<usize>>,
    /// virtio devices, each served by a backend in an I/O partition.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

/// One virtio device of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceConfig {
    /// virtio-blk whose device model is the vhost-user backend listening on
    /// `socket` (part-io blk, qemu-storage-daemon, ...).
    VhostUserBlk { socket: PathBuf },
    /// virtio-net whose device model is the vhost-user backend on `socket`
    /// (a port of a part-io net switch).
    VhostUserNet { socket: PathBuf },
    /// virtio-vsock whose device model is the vhost-user backend on `socket`
    /// (part-io vsock, vhost-device-vsock); `guest_cid` is the CID granted to
    /// the partition, which the backend's config space must repeat.
    VhostUserVsock { socket: PathBuf, guest_cid: u32 },
}

/// The lowest CID a guest can have: 0 is the hypervisor, 1 local loopback,
/// 2 the host.
pub const MIN_GUEST_CID: u32 = 3;

/// `VMADDR_CID_ANY`, never a guest's address.
pub const CID_ANY: u32 = u32::MAX;

impl VmConfig {
    /// Parses a JSON descriptor; serde's error names the unknown key, wrong
    /// type or missing `kernel` with its position.
    pub fn from_json(text: &str) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig::from_json(r#"{"kernel": "/k"}"#).unwrap()
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let c = base();
        assert_eq!(c.vcpus, DEFAULT_VCPUS);
        assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(c.serial, SerialConfig::Stdout);
        assert_eq!(c.stop_timeout_ms, DEFAULT_STOP_TIMEOUT_MS);
        assert!(c.devices.is_empty());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = VmConfig::from_json(r#"{"kernel": "/k", "memory_mb": 3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `memory_mb`"), "{e}");
    }

    #[test]
    fn serial_forms_round_trip() {
        for s in ["stdout", "none", "file:/tmp/x", "socket:/run/p.sock"] {
            let parsed: SerialConfig = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert_eq!(
            "tcp:1".parse::<SerialConfig>(),
            Err(ParseError::Serial {
                text: "tcp:1".into()
            })
        );
        assert!("file:".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn device_entries_are_typed_and_unknown_types_are_named() {
        let c = VmConfig::from_json(
            r#"{"kernel": "/k", "devices": [{"type": "vhost-user-blk", "socket": "/s"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.devices,
            vec![DeviceConfig::VhostUserBlk {
                socket: "/s".into()
            }]
        );
        let e = VmConfig::from_json(r#"{"kernel": "/k", "devices": [{"type": "floppy"}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown variant `floppy`"), "{e}");
    }
}
