//! Planning helpers for the coordinator: turn "what a partition needs" into
//! the changes of one transaction, against a [`State`] read with
//! [`crate::Db::snapshot`].
//!
//! This is allocation *policy* (first fit, lowest numbers first), kept apart
//! from the database's rules: the database does not call it, and a plan is
//! only a proposal. Its before images make it safe to compute outside the
//! writer: if anything changed since the snapshot, the transaction is
//! rejected with [`Rejection::StaleOwner`] and the caller plans again.

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::state::State;
use crate::{Change, Extent, Owner, PartitionId, ResourceId, ResourceKind};

/// What a partition needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// Memory in MiB (granted as one or more extents, first fit).
    pub memory_mib: u64,
    /// Specific host CPUs to dedicate (taken from `available` or the shared pool).
    pub dedicated_cpus: Vec<u32>,
    /// Share of the shared pool in milli-CPUs (0: none).
    pub cpu_share_milli: u32,
    /// Number of vsock CIDs.
    pub vsock_cids: u32,
    /// Number of MAC addresses.
    pub macs: u32,
    /// Specific devices, by name.
    pub devices: Vec<String>,
    /// Number of channel slots.
    pub channels: u32,
    /// Number of interconnect endpoints.
    pub endpoints: u32,
    /// Number of uids for jailed processes.
    #[serde(default)]
    pub uids: u32,
}

impl State {
    /// The changes that give `partition` everything in `demand`, or the first
    /// shortage found. `partition` must exist (or be created earlier in the
    /// same transaction) and should hold no share yet.
    pub fn plan_grant(
        &self,
        partition: &PartitionId,
        demand: &Demand,
    ) -> Result<Vec<Change>, Rejection> {
        let me = Owner::Partition(partition.clone());
        let mut changes = Vec::new();
        let give = |resource: ResourceId, before: Owner| Change::Transfer {
            resource,
            before,
            after: me.clone(),
        };

        let mut pool_cpus_taken = 0u64;
        for cpu in &demand.dedicated_cpus {
            let r = ResourceId::Cpu(*cpu);
            match self.owner(&r)? {
                Owner::Available => changes.push(give(r, Owner::Available)),
                Owner::SharedPool => {
                    pool_cpus_taken += 1;
                    changes.push(give(r, Owner::SharedPool));
                }
                owner => return Err(Rejection::Unavailable { resource: r, owner }),
            }
        }
        let current_share = self.share(partition);
        let used: u64 =
            self.shares.values().map(|m| u64::from(*m)).sum::<u64>() - u64::from(current_share);
        let capacity = self
            .pool_capacity_milli()
            .saturating_sub(pool_cpus_taken * 1000);
        if demand.cpu_share_milli > 0 || pool_cpus_taken > 0 {
            let requested = used + u64::from(demand.cpu_share_milli);
            if requested > capacity {
                let what = if pool_cpus_taken > 0 {
                    format!(
                        "shared pool milli-CPUs once {pool_cpus_taken} pool CPU(s) are dedicated"
                    )
                } else {
                    "shared pool milli-CPUs".into()
                };
                return Err(Rejection::Insufficient {
                    what,
                    requested: u64::from(demand.cpu_share_milli),
                    free: capacity.saturating_sub(used),
                });
            }
        }

        if demand.memory_mib > 0 {
            let free = self.free_memory();
            let total_free: u64 = free.iter().map(|e| e.len_mib).sum();
            if total_free < demand.memory_mib {
                return Err(Rejection::Insufficient {
                    what: "memory MiB".into(),
                    requested: demand.memory_mib,
                    free: total_free,
                });
            }
            let mut left = demand.memory_mib;
            for e in free {
                if left == 0 {
                    break;
                }
                let take = left.min(e.len_mib);
                changes.push(give(
                    ResourceId::Memory(Extent::new(e.start_mib, take)),
                    Owner::Available,
                ));
                left -= take;
            }
        }

        for (kind, count) in [
            (ResourceKind::VsockCid, demand.vsock_cids),
            (ResourceKind::Mac, demand.macs),
            (ResourceKind::Channel, demand.channels),
            (ResourceKind::Endpoint, demand.endpoints),
            (ResourceKind::Uid, demand.uids),
        ] {
            let free = self.free_units(kind);
            if (free.len() as u64) < u64::from(count) {
                return Err(Rejection::Insufficient {
                    what: kind.to_string(),
                    requested: u64::from(count),
                    free: free.len() as u64,
                });
            }
            changes.extend(
                free.into_iter()
                    .take(count as usize)
                    .map(|r| give(r, Owner::Available)),
            );
        }
        for name in &demand.devices {
            let r = ResourceId::Device(name.clone());
            match self.owner(&r)? {
                Owner::Available => changes.push(give(r, Owner::Available)),
                owner => return Err(Rejection::Unavailable { resource: r, owner }),
            }
        }
        if demand.cpu_share_milli > 0 {
            changes.push(Change::Share {
                partition: partition.clone(),
                before_milli: current_share,
                after_milli: demand.cpu_share_milli,
            });
        }
        Ok(changes)
    }

    /// The changes that return everything `partition` holds: its share is
    /// dropped first, then CPUs go back where the host configuration puts
    /// them (shared pool or `available`) and everything else to `available`.
    /// Commit it only once no backend maps the partition's memory any more.
    pub fn plan_release(&self, partition: &PartitionId) -> Vec<Change> {
        let me = Owner::Partition(partition.clone());
        let held = self.holdings(partition);
        let mut changes = Vec::new();
        if held.cpu_share_milli > 0 {
            changes.push(Change::Share {
                partition: partition.clone(),
                before_milli: held.cpu_share_milli,
                after_milli: 0,
            });
        }
        for r in held.resources() {
            let after = match r {
                ResourceId::Cpu(c) if self.host.shared_pool_cpus.contains(&c) => Owner::SharedPool,
                _ => Owner::Available,
            };
            changes.push(Change::Transfer {
                resource: r,
                before: me.clone(),
                after,
            });
        }
        changes
    }
}
