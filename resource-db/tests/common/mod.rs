//! Helpers shared by the integration tests.
#![allow(dead_code)]

use resource_db::{
    Change, Db, DeviceKind, DeviceSpec, HostConfig, Owner, PartitionId, PartitionRecord,
    PartitionState, ResourceId,
};

/// A small host: CPUs 0-3 (2 and 3 in the shared pool), 1024 MiB, 8 CIDs,
/// 8 MACs, 2 devices, 4 channels, 4 endpoints.
pub fn small_host() -> HostConfig {
    HostConfig {
        cpus: vec![0, 1, 2, 3],
        shared_pool_cpus: vec![2, 3],
        memory_budget_mib: 1024,
        vsock_cid_count: 8,
        mac_count: 8,
        devices: vec![
            DeviceSpec {
                name: "disk0".into(),
                kind: DeviceKind::BackingFile("/var/lib/partvisor/disk0.img".into()),
            },
            DeviceSpec {
                name: "tap0".into(),
                kind: DeviceKind::Tap("pvtap0".into()),
            },
        ],
        channel_count: 4,
        endpoint_count: 4,
        ..HostConfig::empty()
    }
}

/// A fresh store on [`small_host`] in a temp dir (kept while the dir lives).
pub fn open() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("r.db"), small_host()).unwrap();
    (dir, db)
}

pub fn pid(name: &str) -> PartitionId {
    PartitionId::new(name).unwrap()
}

pub fn owner(name: &str) -> Owner {
    Owner::Partition(pid(name))
}

pub fn record(name: &str) -> PartitionRecord {
    PartitionRecord {
        id: pid(name),
        definition: format!("{{\"name\":\"{name}\"}}"),
        state: PartitionState::Defined,
    }
}

pub fn create(name: &str) -> Change {
    Change::Create {
        record: record(name),
    }
}

pub fn grant(resource: ResourceId, to: &str) -> Change {
    Change::Transfer {
        resource,
        before: Owner::Available,
        after: owner(to),
    }
}

pub fn release(resource: ResourceId, from: &str) -> Change {
    Change::Transfer {
        resource,
        before: owner(from),
        after: Owner::Available,
    }
}

pub fn share(name: &str, before_milli: u32, after_milli: u32) -> Change {
    Change::Share {
        partition: pid(name),
        before_milli,
        after_milli,
    }
}
