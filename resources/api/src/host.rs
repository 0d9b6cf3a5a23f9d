//! The host configuration: the universe of resources one host's resource
//! database manages.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::resources::{MacAddr, ResourceId};

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

/// What the resource database manages on one host: the universe of
/// resources (the audit log's genesis entry records it). `resource-db`
/// discovers and validates it (`HostConfigExt`); this crate holds the
/// data and the pure questions about it.
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
    /// First uid (with the gid of the same number) granted to partitions:
    /// each partition's monitor and disk backend run as uids of their own.
    #[serde(default = "default_first_uid")]
    pub first_uid: u32,
    /// Number of uids.
    #[serde(default = "default_uid_count")]
    pub uid_count: u32,
    /// The uid (and gid) of the host's shared I/O partitions (net switches,
    /// the vsock relay), which serve many partitions; never granted.
    #[serde(default = "default_io_uid")]
    pub io_uid: u32,
}

/// Default first partition uid: above the ranges distributions give to
/// people and system accounts (below 65536), systemd's dynamic users
/// (61184..65519) and the first subordinate ranges of container tools
/// (100000 + 65536 per user, for the first 44 users).
pub const DEFAULT_FIRST_UID: u32 = 3_000_000;

fn default_first_uid() -> u32 {
    DEFAULT_FIRST_UID
}

fn default_uid_count() -> u32 {
    4096
}

fn default_io_uid() -> u32 {
    DEFAULT_FIRST_UID - 1
}

impl HostConfig {
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
            first_uid: default_first_uid(),
            uid_count: default_uid_count(),
            io_uid: default_io_uid(),
        }
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
            .chain((0..self.uid_count).map(|i| ResourceId::Uid(self.first_uid + i)))
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
            ResourceId::Uid(u) => {
                *u >= self.first_uid
                    && u64::from(*u) < u64::from(self.first_uid) + u64::from(self.uid_count)
            }
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
        cmp("first_uid", self.first_uid == other.first_uid);
        cmp("uid_count", self.uid_count == other.uid_count);
        cmp("io_uid", self.io_uid == other.io_uid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Extent;

    #[test]
    fn contains_checks_ranges() {
        let host = HostConfig {
            cpus: vec![0, 2],
            memory_budget_mib: 100,
            vsock_cid_count: 2,
            mac_count: 2,
            channel_count: 1,
            endpoint_count: 1,
            uid_count: 1,
            ..HostConfig::empty()
        };
        assert!(host.contains(&ResourceId::Cpu(2)));
        assert!(!host.contains(&ResourceId::Cpu(1)));
        assert!(host.contains(&ResourceId::Memory(Extent::new(50, 50))));
        assert!(!host.contains(&ResourceId::Memory(Extent::new(50, 51))));
        assert!(!host.contains(&ResourceId::Memory(Extent::new(u64::MAX, 2))));
        assert!(host.contains(&ResourceId::VsockCid(4)));
        assert!(!host.contains(&ResourceId::VsockCid(5)));
        assert!(host.contains(&ResourceId::Mac(MacAddr([2, 0x70, 0x76, 0, 0, 1]))));
        assert!(!host.contains(&ResourceId::Mac(MacAddr([2, 0x70, 0x76, 0, 0, 2]))));
        assert!(!host.contains(&ResourceId::Channel(1)));
        assert!(!host.contains(&ResourceId::Device("x".into())));
        assert!(host.contains(&ResourceId::Uid(DEFAULT_FIRST_UID)));
        assert!(!host.contains(&ResourceId::Uid(DEFAULT_FIRST_UID + 1)));
        assert!(!host.contains(&ResourceId::Uid(host.io_uid)));
        assert_eq!(host.unit_resources().count(), 2 + 2 + 2 + 1 + 1 + 1);
    }

    #[test]
    fn differing_fields_names_each_changed_field() {
        let a = HostConfig::empty();
        let b = HostConfig {
            cpus: vec![1],
            mac_count: 3,
            ..HostConfig::empty()
        };
        assert_eq!(a.differing_fields(&a), Vec::<&str>::new());
        assert_eq!(a.differing_fields(&b), vec!["cpus", "mac_count"]);
    }
}
