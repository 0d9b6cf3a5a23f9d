//! What partitions hold, what is free, and the audit log's entries: the
//! resource map's read side as partd's API returns it.

use serde::{Deserialize, Serialize};

use crate::host::HostConfig;
use crate::resources::{Change, Extent, MacAddr, ResourceId, ResourceKind, TxId};

/// What one partition holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// Dedicated CPUs.
    pub cpus: Vec<u32>,
    /// Share of the shared CPU pool, in milli-CPUs.
    pub cpu_share_milli: u32,
    /// Memory extents, in address order.
    pub memory: Vec<Extent>,
    /// vsock CIDs.
    pub vsock_cids: Vec<u32>,
    /// MAC addresses.
    pub macs: Vec<MacAddr>,
    /// Device names.
    pub devices: Vec<String>,
    /// Channel slots.
    pub channels: Vec<u32>,
    /// Interconnect endpoints.
    pub endpoints: Vec<u32>,
    /// uids its jailed processes run as: the monitor's, then the disk
    /// backend's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
}

impl Holdings {
    /// Whether the partition holds nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Holdings::default()
    }

    /// Whether the partition holds only what it keeps from create to
    /// destroy (its MACs and uids): what a partition that is not running
    /// holds.
    pub fn is_at_rest(&self) -> bool {
        Holdings {
            macs: Vec::new(),
            uids: Vec::new(),
            ..self.clone()
        }
        .is_empty()
    }

    /// Total memory held, in MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory.iter().map(|e| e.len_mib).sum()
    }

    /// Every resource held (the share excluded), as resource ids.
    pub fn resources(&self) -> Vec<ResourceId> {
        let mut out: Vec<ResourceId> = self.cpus.iter().map(|c| ResourceId::Cpu(*c)).collect();
        out.extend(self.memory.iter().map(|e| ResourceId::Memory(*e)));
        out.extend(self.vsock_cids.iter().map(|c| ResourceId::VsockCid(*c)));
        out.extend(self.macs.iter().map(|m| ResourceId::Mac(*m)));
        out.extend(self.devices.iter().map(|d| ResourceId::Device(d.clone())));
        out.extend(self.channels.iter().map(|c| ResourceId::Channel(*c)));
        out.extend(self.endpoints.iter().map(|e| ResourceId::Endpoint(*e)));
        out.extend(self.uids.iter().map(|u| ResourceId::Uid(*u)));
        out
    }

    /// Records one more resource (unsorted until [`Holdings::sort`]).
    pub fn add(&mut self, resource: ResourceId) {
        match resource {
            ResourceId::Cpu(c) => self.cpus.push(c),
            ResourceId::Memory(e) => self.memory.push(e),
            ResourceId::VsockCid(c) => self.vsock_cids.push(c),
            ResourceId::Mac(m) => self.macs.push(m),
            ResourceId::Device(d) => self.devices.push(d),
            ResourceId::Channel(c) => self.channels.push(c),
            ResourceId::Endpoint(e) => self.endpoints.push(e),
            ResourceId::Uid(u) => self.uids.push(u),
        }
    }

    /// Puts every list in order.
    pub fn sort(&mut self) {
        self.cpus.sort_unstable();
        self.memory.sort_unstable();
        self.vsock_cids.sort_unstable();
        self.macs.sort_unstable();
        self.devices.sort_unstable();
        self.channels.sort_unstable();
        self.endpoints.sort_unstable();
        self.uids.sort_unstable();
    }
}

/// Total and free amount of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Everything the host configuration has of this kind.
    pub total: u64,
    /// What is unassigned.
    pub free: u64,
}

/// Free capacity per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeCapacity {
    /// Whole CPUs: free = owned by `available` (can be dedicated or lent to the pool).
    pub cpus: Capacity,
    /// Shared pool in milli-CPUs: total = 1000 × CPUs in the pool, free = total − shares.
    pub shared_pool_milli: Capacity,
    /// Memory in MiB.
    pub memory_mib: Capacity,
    /// vsock CIDs.
    pub vsock_cids: Capacity,
    /// MAC addresses.
    pub macs: Capacity,
    /// Devices.
    pub devices: Capacity,
    /// Channel slots.
    pub channels: Capacity,
    /// Interconnect endpoints.
    pub endpoints: Capacity,
    /// uids for jailed processes.
    #[serde(default)]
    pub uids: Capacity,
}

impl FreeCapacity {
    /// The capacity entry of one kind.
    pub fn kind_mut(&mut self, kind: ResourceKind) -> &mut Capacity {
        match kind {
            ResourceKind::Cpu => &mut self.cpus,
            ResourceKind::Memory => &mut self.memory_mib,
            ResourceKind::VsockCid => &mut self.vsock_cids,
            ResourceKind::Mac => &mut self.macs,
            ResourceKind::Device => &mut self.devices,
            ResourceKind::Channel => &mut self.channels,
            ResourceKind::Endpoint => &mut self.endpoints,
            ResourceKind::Uid => &mut self.uids,
        }
    }
}

/// What one audit log entry records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogRecord {
    /// The first entry: the host configuration, i.e. the initial state.
    Genesis {
        /// The configuration the store was created with.
        host: HostConfig,
    },
    /// A committed transaction; each change carries its before and after image.
    Transaction {
        /// The changes, in the order they were applied.
        changes: Vec<Change>,
    },
}

/// One audit log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Transaction id (position in the log, from 1).
    pub txid: TxId,
    /// Commit time, nanoseconds since the Unix epoch.
    pub time_unix_ns: i64,
    /// Who asked for it.
    pub actor: String,
    /// What it did.
    pub record: LogRecord,
}
