//! Host configuration: the universe of resources the database manages.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{MacAddr, ResourceId};

/// A host device that can be granted to one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A file or block device that backs a virtual disk.
    BackingFile(PathBuf),
    /// A TAP interface, by interface name.
    Tap(String),
}

/// A named host device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Name used as the resource key (`ResourceId::Device(name)`).
    pub name: String,
    /// What it is.
    pub kind: DeviceKind,
}

/// What the database manages on this host. Build it with
/// [`HostConfig::discover`] and override fields as needed:
///
/// ```no_run
/// # fn main() -> Result<(), resource_db::Error> {
/// let host = resource_db::HostConfig {
///     memory_budget_mib: 8192,
///     ..resource_db::HostConfig::discover()?
/// };
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// Host CPU numbers managed by the database.
    pub cpus: Vec<u32>,
    /// CPUs that start in the shared pool (the rest start `available` for
    /// dedication). Must be a subset of `cpus`.
    pub shared_pool_cpus: Vec<u32>,
    /// Memory the database hands out, in MiB.
    pub memory_budget_mib: u64,
    /// First vsock CID handed out (0, 1 and 2 are reserved by vsock).
    pub first_vsock_cid: u32,
    /// Number of vsock CIDs.
    pub vsock_cid_count: u32,
    /// First MAC address handed out; must be locally administered unicast.
    pub first_mac: MacAddr,
    /// Number of MAC addresses (counting up in the low 24 bits).
    pub mac_count: u32,
    /// Host devices.
    pub devices: Vec<DeviceSpec>,
    /// Number of memory channel slots.
    pub channel_count: u32,
    /// Number of interconnect endpoints.
    pub endpoint_count: u32,
}

/// Default share of `MemTotal` given to the budget: 3/4.
const MEMORY_BUDGET_NUM: u64 = 3;
const MEMORY_BUDGET_DEN: u64 = 4;

impl HostConfig {
    /// Discovers CPUs (`/sys/devices/system/cpu/online`) and memory
    /// (`/proc/meminfo` `MemTotal`, of which 3/4 becomes the budget), and
    /// uses defaults for the rest: every CPU in the shared pool, 1024 vsock
    /// CIDs from 3, 1024 MACs from `02:70:76:00:00:00`, no devices, 1024
    /// channels and 1024 endpoints.
    pub fn discover() -> Result<HostConfig, Error> {
        let cpus = read_cpu_list(Path::new("/sys/devices/system/cpu/online"))?;
        let mem_total_kib = read_mem_total_kib(Path::new("/proc/meminfo"))?;
        Ok(HostConfig {
            shared_pool_cpus: cpus.clone(),
            cpus,
            memory_budget_mib: mem_total_kib / 1024 * MEMORY_BUDGET_NUM / MEMORY_BUDGET_DEN,
            ..HostConfig::empty()
        })
    }

    /// A configuration with the default counts and no CPUs or memory; a base
    /// for tests and explicit configurations.
    pub fn empty() -> HostConfig {
        HostConfig {
            cpus: Vec::new(),
            shared_pool_cpus: Vec::new(),
            memory_budget_mib: 0,
            first_vsock_cid: 3,
            vsock_cid_count: 1024,
            first_mac: MacAddr([0x02, 0x70, 0x76, 0, 0, 0]),
            mac_count: 1024,
            devices: Vec::new(),
            channel_count: 1024,
            endpoint_count: 1024,
        }
    }

    /// Checks the configuration is self-consistent.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        let cpus: BTreeSet<u32> = self.cpus.iter().copied().collect();
        if cpus.len() != self.cpus.len() {
            return bad("cpus lists a CPU twice".into());
        }
        let pool: BTreeSet<u32> = self.shared_pool_cpus.iter().copied().collect();
        if pool.len() != self.shared_pool_cpus.len() {
            return bad("shared_pool_cpus lists a CPU twice".into());
        }
        if let Some(c) = pool.difference(&cpus).next() {
            return bad(format!("shared pool CPU {c} is not in cpus"));
        }
        if i64::try_from(self.memory_budget_mib).is_err() {
            return bad("memory_budget_mib is too large".into());
        }
        if self.first_vsock_cid < 3 {
            return bad("first_vsock_cid must be at least 3 (0-2 are reserved)".into());
        }
        if u64::from(self.first_vsock_cid) + u64::from(self.vsock_cid_count) > u64::from(u32::MAX) {
            return bad("vsock CID range runs past 2^32-2".into());
        }
        if self.first_mac.0[0] & 0b11 != 0b10 {
            return bad(format!(
                "first_mac {} must be locally administered unicast (first byte x2, x6, xa or xe)",
                self.first_mac
            ));
        }
        if (self.first_mac.to_u64() & 0xff_ffff) + u64::from(self.mac_count) > 0x100_0000 {
            return bad("MAC range runs past the low 24 bits of first_mac".into());
        }
        let mut names = BTreeSet::new();
        for d in &self.devices {
            if d.name.is_empty() || d.name.len() > 128 || d.name.chars().any(char::is_control) {
                return bad(format!(
                    "device name {:?} must be 1-128 printable characters",
                    d.name
                ));
            }
            if !names.insert(d.name.as_str()) {
                return bad(format!("device {} is listed twice", d.name));
            }
        }
        Ok(())
    }

    /// Every unit resource (everything but memory) this host has, in order.
    pub fn unit_resources(&self) -> impl Iterator<Item = ResourceId> + '_ {
        let cids =
            (0..self.vsock_cid_count).map(|i| ResourceId::VsockCid(self.first_vsock_cid + i));
        let base = self.first_mac.to_u64();
        let macs = (0..self.mac_count)
            .map(move |i| ResourceId::Mac(MacAddr::from_u64(base + u64::from(i))));
        self.cpus
            .iter()
            .map(|c| ResourceId::Cpu(*c))
            .chain(cids)
            .chain(macs)
            .chain(
                self.devices
                    .iter()
                    .map(|d| ResourceId::Device(d.name.clone())),
            )
            .chain((0..self.channel_count).map(ResourceId::Channel))
            .chain((0..self.endpoint_count).map(ResourceId::Endpoint))
    }

    /// Whether `resource` is a unit resource of this host (memory: whether the
    /// extent is inside the budget).
    pub fn contains(&self, resource: &ResourceId) -> bool {
        match resource {
            ResourceId::Cpu(c) => self.cpus.contains(c),
            ResourceId::Memory(e) => e
                .start_mib
                .checked_add(e.len_mib)
                .is_some_and(|end| end <= self.memory_budget_mib),
            ResourceId::VsockCid(c) => {
                *c >= self.first_vsock_cid
                    && u64::from(*c)
                        < u64::from(self.first_vsock_cid) + u64::from(self.vsock_cid_count)
            }
            ResourceId::Mac(m) => {
                let (v, base) = (m.to_u64(), self.first_mac.to_u64());
                v >= base && v < base + u64::from(self.mac_count)
            }
            ResourceId::Device(name) => self.devices.iter().any(|d| &d.name == name),
            ResourceId::Channel(c) => *c < self.channel_count,
            ResourceId::Endpoint(e) => *e < self.endpoint_count,
        }
    }

    /// Names of the fields in which `self` and `other` differ.
    pub fn differing_fields(&self, other: &HostConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut cmp = |name, same: bool| {
            if !same {
                out.push(name)
            }
        };
        cmp("cpus", self.cpus == other.cpus);
        cmp(
            "shared_pool_cpus",
            self.shared_pool_cpus == other.shared_pool_cpus,
        );
        cmp(
            "memory_budget_mib",
            self.memory_budget_mib == other.memory_budget_mib,
        );
        cmp(
            "first_vsock_cid",
            self.first_vsock_cid == other.first_vsock_cid,
        );
        cmp(
            "vsock_cid_count",
            self.vsock_cid_count == other.vsock_cid_count,
        );
        cmp("first_mac", self.first_mac == other.first_mac);
        cmp("mac_count", self.mac_count == other.mac_count);
        cmp("devices", self.devices == other.devices);
        cmp("channel_count", self.channel_count == other.channel_count);
        cmp(
            "endpoint_count",
            self.endpoint_count == other.endpoint_count,
        );
        out
    }
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

    #[test]
    fn contains_checks_ranges() {
        let host = HostConfig {
            cpus: vec![0, 2],
            memory_budget_mib: 100,
            vsock_cid_count: 2,
            mac_count: 2,
            channel_count: 1,
            endpoint_count: 1,
            ..HostConfig::empty()
        };
        assert!(host.contains(&ResourceId::Cpu(2)));
        assert!(!host.contains(&ResourceId::Cpu(1)));
        assert!(host.contains(&ResourceId::Memory(crate::Extent::new(50, 50))));
        assert!(!host.contains(&ResourceId::Memory(crate::Extent::new(50, 51))));
        assert!(!host.contains(&ResourceId::Memory(crate::Extent::new(u64::MAX, 2))));
        assert!(host.contains(&ResourceId::VsockCid(4)));
        assert!(!host.contains(&ResourceId::VsockCid(5)));
        assert!(host.contains(&ResourceId::Mac(MacAddr([2, 0x70, 0x76, 0, 0, 1]))));
        assert!(!host.contains(&ResourceId::Mac(MacAddr([2, 0x70, 0x76, 0, 0, 2]))));
        assert!(!host.contains(&ResourceId::Channel(1)));
        assert!(!host.contains(&ResourceId::Device("x".into())));
        assert_eq!(host.unit_resources().count(), 2 + 2 + 2 + 1 + 1);
    }
}
