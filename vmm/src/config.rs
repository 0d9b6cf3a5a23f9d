//! The partition descriptor part-vmm runs from.
//!
//! `partd` writes it as JSON and passes `--config FILE`; operators can use the
//! shorthand flags instead (flags override the file). Schema, version 1:
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout;

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
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("serial \"{s}\": expected stdout, none, file:PATH or socket:PATH");
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
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
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
}

/// Values given on the command line; each overrides the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    pub serial: Option<SerialConfig>,
    pub stop_timeout_ms: Option<u64>,
    /// Appended to the file's devices.
    pub devices: Vec<DeviceConfig>,
}

/// What this host allows, read once at start.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub max_vcpus: u32,
    pub mem_available_mib: u64,
    /// Configured host CPUs (ids 0..host_cpus).
    pub host_cpus: usize,
}

impl VmConfig {
    /// Reads a JSON descriptor.
    pub fn from_file(path: &Path) -> Result<VmConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("config {}: cannot read: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| Error::Config(format!("config {}: {e}", path.display())))
    }

    /// Parses a JSON descriptor; the error is serde's one-line message
    /// (unknown key, wrong type, missing `kernel`) with its position.
    pub fn from_json(text: &str) -> std::result::Result<VmConfig, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// Builds a descriptor from an optional file and the flag overrides.
    pub fn assemble(file: Option<&Path>, o: Overrides) -> Result<VmConfig> {
        let mut cfg = match file {
            Some(p) => Self::from_file(p)?,
            None => VmConfig {
                vcpus: DEFAULT_VCPUS,
                memory_mib: DEFAULT_MEMORY_MIB,
                kernel: o.kernel.clone().ok_or_else(|| {
                    Error::Config("no kernel: give --kernel PATH or --config FILE".into())
                })?,
                initrd: None,
                cmdline: String::new(),
                serial: SerialConfig::Stdout,
                stop_timeout_ms: DEFAULT_STOP_TIMEOUT_MS,
                cpu_affinity: None,
                devices: Vec::new(),
            },
        };
        if let Some(k) = o.kernel {
            cfg.kernel = k;
        }
        if let Some(i) = o.initrd {
            cfg.initrd = Some(i);
        }
        if let Some(c) = o.cmdline {
            cfg.cmdline = c;
        }
        if let Some(m) = o.memory_mib {
            cfg.memory_mib = m;
        }
        if let Some(v) = o.vcpus {
            cfg.vcpus = v;
        }
        if let Some(s) = o.serial {
            cfg.serial = s;
        }
        if let Some(t) = o.stop_timeout_ms {
            cfg.stop_timeout_ms = t;
        }
        cfg.devices.extend(o.devices);
        Ok(cfg)
    }

    /// Checks everything that can be checked without touching KVM state.
    pub fn validate(&self, host: &HostLimits) -> Result<()> {
        let max_vcpus = host.max_vcpus.min(MAX_XAPIC_VCPUS);
        if self.vcpus == 0 || self.vcpus > max_vcpus {
            return Err(Error::Config(format!(
                "vcpus {}: must be between 1 and {max_vcpus} (KVM_CAP_MAX_VCPUS {} on this host, xAPIC limit {MAX_XAPIC_VCPUS})",
                self.vcpus, host.max_vcpus
            )));
        }
        if self.memory_mib == 0 {
            return Err(Error::Config(
                "memory_mib 0: a partition needs at least 1 MiB".into(),
            ));
        }
        if self.memory_mib > host.mem_available_mib {
            return Err(Error::Config(format!(
                "memory_mib {}: more than the host's MemAvailable ({} MiB)",
                self.memory_mib, host.mem_available_mib
            )));
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX {
            return Err(Error::CmdlineTooLong {
                len: self.cmdline.len(),
                max: layout::CMDLINE_MAX - 1,
            });
        }
        if self.cmdline.contains('\0') {
            return Err(Error::Config("cmdline contains a NUL byte".into()));
        }
        if let Some(cpus) = &self.cpu_affinity {
            if cpus.is_empty() {
                return Err(Error::Config(
                    "cpu_affinity is empty: list at least one host CPU".into(),
                ));
            }
            if let Some(bad) = cpus.iter().find(|c| **c >= host.host_cpus) {
                return Err(Error::Config(format!(
                    "cpu_affinity: host CPU {bad} does not exist (this host has {} CPUs)",
                    host.host_cpus
                )));
            }
        }
        if self.devices.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(Error::Config(format!(
                "{} devices: a partition has at most {} virtio devices",
                self.devices.len(),
                layout::MAX_VIRTIO_DEVICES
            )));
        }
        Ok(())
    }
}

impl HostLimits {
    /// Reads `KVM_CAP_MAX_VCPUS` and `MemAvailable`.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Result<HostLimits> {
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").map_err(Error::io("/proc/meminfo"))?;
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or_else(|| Error::Memory("/proc/meminfo has no MemAvailable line".into()))?;
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        Ok(HostLimits {
            max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
            mem_available_mib: kib / 1024,
            host_cpus: usize::try_from(cpus).unwrap_or(1).max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        max_vcpus: 8,
        mem_available_mib: 1024,
        host_cpus: 2,
    };

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
        assert!(e.contains("unknown field `memory_mb`"), "{e}");
    }

    #[test]
    fn serial_forms_round_trip() {
        for s in ["stdout", "none", "file:/tmp/x", "socket:/run/p.sock"] {
            let parsed: SerialConfig = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert!("tcp:1".parse::<SerialConfig>().is_err());
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
        assert!(e.contains("unknown variant `floppy`"), "{e}");
    }

    #[test]
    fn flags_override_file_values() {
        let dir = std::env::temp_dir().join(format!("pv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(&f, r#"{"kernel": "/a", "vcpus": 2, "memory_mib": 32}"#).unwrap();
        let c = VmConfig::assemble(
            Some(&f),
            Overrides {
                memory_mib: Some(48),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (c.vcpus, c.memory_mib, c.kernel.as_path()),
            (2, 48, Path::new("/a"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn validation_names_each_bad_value() {
        let mut c = base();
        c.vcpus = 0;
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("vcpus 0"));
        c.vcpus = 9;
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("vcpus 9"));
        c.vcpus = 1;
        c.memory_mib = 0;
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("memory_mib 0"));
        c.memory_mib = 2048;
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("MemAvailable"));
        c.memory_mib = 64;
        c.devices = vec![
            DeviceConfig::VhostUserBlk {
                socket: "/s".into()
            };
            9
        ];
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("at most 8"));
        c.devices.clear();
        c.cpu_affinity = Some(vec![1, 2]);
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("host CPU 2 does not exist"));
        c.cpu_affinity = Some(vec![]);
        assert!(c
            .validate(&HOST)
            .unwrap_err()
            .to_string()
            .contains("cpu_affinity is empty"));
        c.cpu_affinity = Some(vec![1]);
        assert!(c.validate(&HOST).is_ok());
    }
}
