//! Host configuration: discovering this host's resources and checking a
//! configuration before a store is created with it. The type itself is
//! part of the API ([`partvisor_api::HostConfig`]), since the audit log's
//! genesis entry carries it.

use std::collections::BTreeSet;
use std::path::Path;

pub use partvisor_api::{DeviceKind, DeviceSpec, HostConfig};

use crate::error::{ConfigProblem, Error};

/// Default share of `MemTotal` given to the budget: 3/4.
const MEMORY_BUDGET_NUM: u64 = 3;
const MEMORY_BUDGET_DEN: u64 = 4;

/// What the database does with a [`HostConfig`] beyond holding it. Build
/// one with [`HostConfigExt::discover`] and override fields as needed:
///
/// ```no_run
/// # fn main() -> Result<(), resource_db::Error> {
/// use resource_db::{HostConfig, HostConfigExt};
/// let host = HostConfig {
///     memory_budget_mib: 8192,
///     ..HostConfig::discover()?
/// };
/// # Ok(()) }
/// ```
pub trait HostConfigExt: Sized {
    /// Discovers CPUs (`/sys/devices/system/cpu/online`) and memory
    /// (`/proc/meminfo` `MemTotal`, of which 3/4 becomes the budget), and
    /// uses defaults for the rest: every CPU in the shared pool, 1024 vsock
    /// CIDs from 3, 1024 MACs from `02:70:76:00:00:00`, no devices, 1024
    /// channels and 1024 endpoints.
    fn discover() -> Result<HostConfig, Error>;

    /// Checks the configuration is self-consistent.
    fn validate(&self) -> Result<(), Error>;
}

impl HostConfigExt for HostConfig {
    fn discover() -> Result<HostConfig, Error> {
        let cpus = read_cpu_list(Path::new("/sys/devices/system/cpu/online"))?;
        let mem_total_kib = read_mem_total_kib(Path::new("/proc/meminfo"))?;
        Ok(HostConfig {
            shared_pool_cpus: cpus.clone(),
            cpus,
            memory_budget_mib: mem_total_kib / 1024 * MEMORY_BUDGET_NUM / MEMORY_BUDGET_DEN,
            ..HostConfig::empty()
        })
    }

    fn validate(&self) -> Result<(), Error> {
        problem(self).map_or(Ok(()), |p| Err(Error::InvalidConfig(p)))
    }
}

/// The first thing wrong with `c`, if any.
fn problem(c: &HostConfig) -> Option<ConfigProblem> {
    let duplicate = |field: &'static str, list: &[u32]| {
        let mut seen = BTreeSet::new();
        list.iter()
            .find(|&&cpu| !seen.insert(cpu))
            .map(|&cpu| ConfigProblem::DuplicateCpu { field, cpu })
    };
    if let Some(p) = duplicate("cpus", &c.cpus) {
        return Some(p);
    }
    if let Some(p) = duplicate("shared_pool_cpus", &c.shared_pool_cpus) {
        return Some(p);
    }
    if let Some(&cpu) = c.shared_pool_cpus.iter().find(|p| !c.cpus.contains(p)) {
        return Some(ConfigProblem::PoolCpuNotInCpus { cpu });
    }
    if i64::try_from(c.memory_budget_mib).is_err() {
        return Some(ConfigProblem::MemoryBudgetTooLarge {
            mib: c.memory_budget_mib,
        });
    }
    if c.first_vsock_cid < 3 {
        return Some(ConfigProblem::VsockCidReserved {
            first: c.first_vsock_cid,
        });
    }
    if u64::from(c.first_vsock_cid) + u64::from(c.vsock_cid_count) > u64::from(u32::MAX) {
        return Some(ConfigProblem::VsockRangeOverflow {
            first: c.first_vsock_cid,
            count: c.vsock_cid_count,
        });
    }
    if c.first_mac.0[0] & 0b11 != 0b10 {
        return Some(ConfigProblem::MacNotLocalUnicast { mac: c.first_mac });
    }
    if (c.first_mac.to_u64() & 0xff_ffff) + u64::from(c.mac_count) > 0x100_0000 {
        return Some(ConfigProblem::MacRangeOverflow {
            first: c.first_mac,
            count: c.mac_count,
        });
    }
    let uid_end = u64::from(c.first_uid) + u64::from(c.uid_count);
    if c.first_uid == 0 || uid_end > u64::from(u32::MAX) {
        return Some(ConfigProblem::UidRange {
            first: c.first_uid,
            count: c.uid_count,
        });
    }
    if c.io_uid == 0 || (c.io_uid >= c.first_uid && u64::from(c.io_uid) < uid_end) {
        return Some(ConfigProblem::IoUid { uid: c.io_uid });
    }
    let mut names = BTreeSet::new();
    for d in &c.devices {
        if d.name.is_empty() || d.name.len() > 128 || d.name.chars().any(char::is_control) {
            return Some(ConfigProblem::DeviceName {
                name: d.name.clone(),
            });
        }
        if !names.insert(d.name.as_str()) {
            return Some(ConfigProblem::DuplicateDevice {
                name: d.name.clone(),
            });
        }
    }
    None
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Discovery {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read_cpu_list(path: &Path) -> Result<Vec<u32>, Error> {
    let text = read(path)?;
    parse_cpu_list(text.trim()).ok_or_else(|| Error::Discovery {
        path: path.to_owned(),
        reason: format!("cannot parse CPU list {:?}", text.trim()),
    })
}

/// Parses the kernel's CPU list format, e.g. `0-3,8,10-11`.
fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn read_mem_total_kib(path: &Path) -> Result<u64, Error> {
    let text = read(path)?;
    parse_mem_total_kib(&text).ok_or_else(|| Error::Discovery {
        path: path.to_owned(),
        reason: "no parsable 'MemTotal: N kB' line".into(),
    })
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceKind, DeviceSpec, MacAddr};

    #[test]
    fn cpu_list_parses_ranges_and_singles() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn mem_total_is_read_in_kib() {
        let meminfo = "MemFree: 5 kB\nMemTotal:       24600000 kB\n";
        assert_eq!(parse_mem_total_kib(meminfo), Some(24_600_000));
        assert_eq!(parse_mem_total_kib("MemTotal: 5 MB\n"), None);
        assert_eq!(parse_mem_total_kib(""), None);
    }

    #[test]
    fn discover_reads_this_host() {
        let host = HostConfig::discover().unwrap();
        assert!(!host.cpus.is_empty());
        assert_eq!(host.shared_pool_cpus, host.cpus);
        assert!(host.memory_budget_mib > 0);
        host.validate().unwrap();
    }

    #[test]
    fn validate_rejects_inconsistent_configs() {
        let ok = HostConfig {
            cpus: vec![0, 1],
            shared_pool_cpus: vec![1],
            memory_budget_mib: 64,
            ..HostConfig::empty()
        };
        ok.validate().unwrap();
        let cases = [
            HostConfig {
                cpus: vec![0, 0],
                ..ok.clone()
            },
            HostConfig {
                shared_pool_cpus: vec![2],
                ..ok.clone()
            },
            HostConfig {
                first_vsock_cid: 2,
                ..ok.clone()
            },
            HostConfig {
                first_mac: MacAddr([1, 0, 0, 0, 0, 0]),
                ..ok.clone()
            },
            HostConfig {
                mac_count: 0x100_0001,
                ..ok.clone()
            },
            HostConfig {
                devices: vec![
                    DeviceSpec {
                        name: "d".into(),
                        kind: DeviceKind::Tap("tap0".into()),
                    },
                    DeviceSpec {
                        name: "d".into(),
                        kind: DeviceKind::Tap("tap1".into()),
                    },
                ],
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(
                matches!(c.validate(), Err(Error::InvalidConfig(_))),
                "{c:?} accepted"
            );
        }
    }
}
