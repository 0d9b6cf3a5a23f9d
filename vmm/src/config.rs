//! The partition descriptor as part-vmm reads it. The schema and its types
//! are the API's (`partvisor_api::descriptor`, which partd writes); this
//! module adds what only the monitor can do with one: read it from a file,
//! apply the command-line overrides, and check it against this host and
//! KVM.

use std::path::{Path, PathBuf};

pub use partvisor_api::descriptor::{
    DeviceConfig, SerialConfig, VmConfig, CID_ANY, CMDLINE_MAX, DEFAULT_MEMORY_MIB,
    DEFAULT_STOP_TIMEOUT_MS, DEFAULT_VCPUS, MAX_DEVICES, MAX_XAPIC_VCPUS, MIN_GUEST_CID,
};

use crate::error::{Error, Result};

/// A descriptor part-vmm refuses; each message names the key and the limit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no kernel: give --kernel PATH or --config FILE")]
    NoKernel,
    #[error("vcpus {vcpus}: must be between 1 and {max} (KVM_CAP_MAX_VCPUS {kvm_max} on this host, xAPIC limit {MAX_XAPIC_VCPUS})")]
    Vcpus { vcpus: u32, max: u32, kvm_max: u32 },
    #[error("memory_mib 0: a partition needs at least 1 MiB")]
    NoMemory,
    #[error("memory_mib {mib}: more than the host's MemAvailable ({available_mib} MiB)")]
    MemoryOverHost { mib: u64, available_mib: u64 },
    #[error("command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("cpu_affinity is empty: list at least one host CPU")]
    AffinityEmpty,
    #[error("cpu_affinity: host CPU {cpu} does not exist (this host has {host_cpus} CPUs)")]
    AffinityUnknownCpu { cpu: usize, host_cpus: usize },
    #[error("{count} devices: a partition has at most {MAX_DEVICES} virtio devices")]
    TooManyDevices { count: usize },
    #[error("{count} vsock devices: a guest has one vsock address, so at most one vsock device")]
    TooManyVsock { count: usize },
    #[error("vsock guest_cid {cid}: must be at least {MIN_GUEST_CID} (0-2 are reserved) and not {CID_ANY}")]
    GuestCid { cid: u32 },
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

/// Reads a JSON descriptor.
pub fn from_file(path: &Path) -> Result<VmConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    Ok(
        VmConfig::from_json(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?,
    )
}

/// Builds a descriptor from an optional file and the flag overrides.
pub fn assemble(file: Option<&Path>, o: Overrides) -> Result<VmConfig> {
    let mut cfg = match file {
        Some(p) => from_file(p)?,
        None => VmConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: o.kernel.clone().ok_or(ConfigError::NoKernel)?,
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
pub fn validate(cfg: &VmConfig, host: &HostLimits) -> std::result::Result<(), ConfigError> {
    let max = host.max_vcpus.min(MAX_XAPIC_VCPUS);
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(ConfigError::Vcpus {
            vcpus: cfg.vcpus,
            max,
            kvm_max: host.max_vcpus,
        });
    }
    if cfg.memory_mib == 0 {
        return Err(ConfigError::NoMemory);
    }
    if cfg.memory_mib > host.mem_available_mib {
        return Err(ConfigError::MemoryOverHost {
            mib: cfg.memory_mib,
            available_mib: host.mem_available_mib,
        });
    }
    if cfg.cmdline.len() >= CMDLINE_MAX {
        return Err(ConfigError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    if cfg.cmdline.contains('\0') {
        return Err(ConfigError::CmdlineNul);
    }
    if let Some(cpus) = &cfg.cpu_affinity {
        if cpus.is_empty() {
            return Err(ConfigError::AffinityEmpty);
        }
        if let Some(&cpu) = cpus.iter().find(|c| **c >= host.host_cpus) {
            return Err(ConfigError::AffinityUnknownCpu {
                cpu,
                host_cpus: host.host_cpus,
            });
        }
    }
    if cfg.devices.len() > MAX_DEVICES {
        return Err(ConfigError::TooManyDevices {
            count: cfg.devices.len(),
        });
    }
    let cids: Vec<u32> = cfg
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceConfig::VhostUserVsock { guest_cid, .. } => Some(*guest_cid),
            _ => None,
        })
        .collect();
    if cids.len() > 1 {
        return Err(ConfigError::TooManyVsock { count: cids.len() });
    }
    if let Some(&cid) = cids.iter().find(|&&c| c < MIN_GUEST_CID || c == CID_ANY) {
        return Err(ConfigError::GuestCid { cid });
    }
    Ok(())
}

impl HostLimits {
    /// Reads `KVM_CAP_MAX_VCPUS` and, if `free_memory`, `MemAvailable`
    /// (else it is left at its largest value: nothing to check against).
    pub fn probe(kvm: &kvm_ioctls::Kvm, free_memory: bool) -> Result<HostLimits> {
        let kib = if !free_memory {
            u64::MAX
        } else {
            Self::mem_available_kib()?
        };
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        Ok(HostLimits {
            max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
            mem_available_mib: kib / 1024,
            host_cpus: usize::try_from(cpus).unwrap_or(1).max(1),
        })
    }

    fn mem_available_kib() -> Result<u64> {
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").map_err(Error::io("/proc/meminfo"))?;
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or(Error::NoMemAvailable)
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
    fn flags_override_file_values() {
        let dir = std::env::temp_dir().join(format!("pv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(&f, r#"{"kernel": "/a", "vcpus": 2, "memory_mib": 32}"#).unwrap();
        let c = assemble(
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
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("vcpus 0"));
        c.vcpus = 9;
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("vcpus 9"));
        c.vcpus = 1;
        c.memory_mib = 0;
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("memory_mib 0"));
        c.memory_mib = 2048;
        assert!(validate(&c, &HOST)
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
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("at most 8"));
        let vsock = |guest_cid| DeviceConfig::VhostUserVsock {
            socket: "/v".into(),
            guest_cid,
        };
        c.devices = vec![vsock(3), vsock(4)];
        assert_eq!(
            validate(&c, &HOST).unwrap_err().to_string(),
            "2 vsock devices: a guest has one vsock address, so at most one vsock device"
        );
        for cid in [0, 1, 2, u32::MAX] {
            c.devices = vec![vsock(cid)];
            assert!(validate(&c, &HOST)
                .unwrap_err()
                .to_string()
                .starts_with(&format!("vsock guest_cid {cid}: must be at least 3")));
        }
        c.devices = vec![vsock(3)];
        validate(&c, &HOST).unwrap();
        c.devices.clear();
        c.cpu_affinity = Some(vec![1, 2]);
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("host CPU 2 does not exist"));
        c.cpu_affinity = Some(vec![]);
        assert!(validate(&c, &HOST)
            .unwrap_err()
            .to_string()
            .contains("cpu_affinity is empty"));
        c.cpu_affinity = Some(vec![1]);
        assert!(validate(&c, &HOST).is_ok());
    }
}
