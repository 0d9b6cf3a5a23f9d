//! The whole resource map held in memory: what [`crate::Db::snapshot`] reads
//! from the live tables and what [`crate::Db::replay`] rebuilds from the
//! audit log. The two are built by different code (SQL updates of the live
//! tables versus after images applied here) and compared with `==`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::HostConfig;
use crate::error::Rejection;
use crate::{
    Capacity, Change, Extent, FreeCapacity, Holdings, Owner, PartitionId, PartitionRecord,
    ResourceId, ResourceKind,
};

/// The resource map at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub(crate) host: HostConfig,
    /// Owner of every resource but memory.
    pub(crate) units: BTreeMap<ResourceId, Owner>,
    /// Memory as maximal extents: start → (len, owner); adjacent extents
    /// never have the same owner.
    pub(crate) memory: BTreeMap<u64, (u64, Owner)>,
    /// Shared-pool shares in milli-CPUs (never 0).
    pub(crate) shares: BTreeMap<PartitionId, u32>,
    pub(crate) partitions: BTreeMap<PartitionId, PartitionRecord>,
}

impl State {
    /// The state right after genesis: every resource `available`, except the
    /// configured shared-pool CPUs.
    pub fn genesis(host: &HostConfig) -> State {
        let units = host
            .unit_resources()
            .map(|r| {
                let owner = match r {
                    ResourceId::Cpu(c) if host.shared_pool_cpus.contains(&c) => Owner::SharedPool,
                    _ => Owner::Available,
                };
                (r, owner)
            })
            .collect();
        let mut memory = BTreeMap::new();
        if host.memory_budget_mib > 0 {
            memory.insert(0, (host.memory_budget_mib, Owner::Available));
        }
        State {
            host: host.clone(),
            units,
            memory,
            shares: BTreeMap::new(),
            partitions: BTreeMap::new(),
        }
    }

    /// The host configuration this state is for.
    pub fn host(&self) -> &HostConfig {
        &self.host
    }

    /// All partitions.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionRecord> {
        self.partitions.values()
    }

    /// One partition.
    pub fn partition(&self, id: &PartitionId) -> Option<&PartitionRecord> {
        self.partitions.get(id)
    }

    /// Owner of a resource. Memory extents must lie within one owner's extent.
    pub fn owner(&self, resource: &ResourceId) -> Result<Owner, Rejection> {
        match resource {
            ResourceId::Memory(e) => {
                check_extent(&self.host, e)?;
                let (start, (len, owner)) = self
                    .memory
                    .range(..=e.start_mib)
                    .next_back()
                    .ok_or_else(|| unknown(resource))?;
                if start + len >= e.end_mib() {
                    Ok(owner.clone())
                } else {
                    Err(Rejection::MixedOwners {
                        resource: resource.clone(),
                    })
                }
            }
            _ => self
                .units
                .get(resource)
                .cloned()
                .ok_or_else(|| unknown(resource)),
        }
    }

    /// Share of the shared pool held by `partition`, in milli-CPUs.
    pub fn share(&self, partition: &PartitionId) -> u32 {
        self.shares.get(partition).copied().unwrap_or(0)
    }

    /// What `partition` holds (empty for an unknown partition).
    pub fn holdings(&self, partition: &PartitionId) -> Holdings {
        let me = Owner::Partition(partition.clone());
        let mut h = Holdings {
            cpu_share_milli: self.share(partition),
            ..Holdings::default()
        };
        for (r, o) in &self.units {
            if *o == me {
                h.add(r.clone());
            }
        }
        for (start, (len, o)) in &self.memory {
            if *o == me {
                h.memory.push(Extent::new(*start, *len));
            }
        }
        h.sort();
        h
    }

    /// Free memory extents in address order.
    pub fn free_memory(&self) -> Vec<Extent> {
        self.memory
            .iter()
            .filter(|(_, (_, o))| *o == Owner::Available)
            .map(|(s, (l, _))| Extent::new(*s, *l))
            .collect()
    }

    /// Unit resources of `kind` owned by `available`, in order.
    pub fn free_units(&self, kind: ResourceKind) -> Vec<ResourceId> {
        self.units
            .iter()
            .filter(|(r, o)| r.kind() == kind && **o == Owner::Available)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Capacity of the shared pool in milli-CPUs.
    pub fn pool_capacity_milli(&self) -> u64 {
        let cpus = self
            .units
            .iter()
            .filter(|(r, o)| r.kind() == ResourceKind::Cpu && **o == Owner::SharedPool)
            .count() as u64;
        cpus * 1000
    }

    /// Total and free capacity per kind.
    pub fn free(&self) -> FreeCapacity {
        let mut f = FreeCapacity::default();
        for (r, o) in &self.units {
            let c = f.kind_mut(r.kind());
            c.total += 1;
            if *o == Owner::Available {
                c.free += 1;
            }
        }
        for (len, o) in self.memory.values() {
            f.memory_mib.total += len;
            if *o == Owner::Available {
                f.memory_mib.free += len;
            }
        }
        let cap = self.pool_capacity_milli();
        let used: u64 = self.shares.values().map(|m| u64::from(*m)).sum();
        f.shared_pool_milli = Capacity {
            total: cap,
            free: cap.saturating_sub(used),
        };
        f
    }

    /// Checks the database's invariants and returns every violation found:
    /// every resource of the host has exactly one owner and nothing else has
    /// one; owners are `available`, the shared pool (CPUs only) or an existing
    /// partition; memory extents tile the budget exactly (totals conserved);
    /// shares belong to existing partitions and fit in the pool.
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut expected: BTreeMap<ResourceId, ()> =
            self.host.unit_resources().map(|r| (r, ())).collect();
        for (r, o) in &self.units {
            if expected.remove(r).is_none() {
                v.push(format!(
                    "{r} has an owner but is not in the host configuration"
                ));
            }
            self.check_owner(r, o, &mut v);
        }
        for r in expected.keys() {
            v.push(format!("{r} has no owner"));
        }
        let mut next = 0u64;
        let mut prev_owner: Option<&Owner> = None;
        for (start, (len, o)) in &self.memory {
            let r = ResourceId::Memory(Extent::new(*start, *len));
            if *start != next {
                v.push(format!(
                    "memory extents do not tile the budget at {start} MiB (expected {next})"
                ));
            }
            if *len == 0 {
                v.push(format!("{r} is empty"));
            }
            if prev_owner == Some(o) {
                v.push(format!("{r} is not coalesced with the extent before it"));
            }
            self.check_owner(&r, o, &mut v);
            next = start.saturating_add(*len);
            prev_owner = Some(o);
        }
        if next != self.host.memory_budget_mib {
            v.push(format!(
                "memory extents cover {next} MiB, the budget is {} MiB",
                self.host.memory_budget_mib
            ));
        }
        let mut used = 0u64;
        for (p, m) in &self.shares {
            if !self.partitions.contains_key(p) {
                v.push(format!(
                    "share of {m} milli-CPUs held by unknown partition {p}"
                ));
            }
            if *m == 0 {
                v.push(format!("zero share recorded for {p}"));
            }
            used += u64::from(*m);
        }
        let cap = self.pool_capacity_milli();
        if used > cap {
            v.push(format!(
                "shares total {used} milli-CPUs, the shared pool has {cap}"
            ));
        }
        for (id, rec) in &self.partitions {
            if *id != rec.id {
                v.push(format!(
                    "partition {id} stored under the name of {}",
                    rec.id
                ));
            }
        }
        v
    }

    /// Human-readable differences between `self` and `other` (at most
    /// `limit`), e.g. `cpu 3: p1 here, available there`. Empty iff equal.
    pub fn differences(&self, other: &State, limit: usize) -> Vec<String> {
        let mut d = Vec::new();
        if self.host != other.host {
            d.push(format!(
                "host configuration differs in {}",
                self.host.differing_fields(&other.host).join(", ")
            ));
        }
        fn show<T: std::fmt::Debug>(v: Option<&T>) -> String {
            v.map_or_else(|| "nothing".to_string(), |v| format!("{v:?}"))
        }
        fn cmp<K: Ord + std::fmt::Display, V: PartialEq + std::fmt::Debug>(
            a: &BTreeMap<K, V>,
            b: &BTreeMap<K, V>,
            what: &str,
            d: &mut Vec<String>,
        ) {
            let keys: std::collections::BTreeSet<&K> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let (x, y) = (a.get(k), b.get(k));
                if x != y {
                    d.push(format!("{what}{k}: {} here, {} there", show(x), show(y)));
                }
            }
        }
        cmp(&self.units, &other.units, "", &mut d);
        let ext = |m: &BTreeMap<u64, (u64, Owner)>| -> BTreeMap<Extent, Owner> {
            m.iter()
                .map(|(s, (l, o))| (Extent::new(*s, *l), o.clone()))
                .collect()
        };
        cmp(&ext(&self.memory), &ext(&other.memory), "memory ", &mut d);
        cmp(&self.shares, &other.shares, "share of ", &mut d);
        cmp(&self.partitions, &other.partitions, "partition ", &mut d);
        d.truncate(limit);
        d
    }

    fn check_owner(&self, r: &ResourceId, o: &Owner, v: &mut Vec<String>) {
        match o {
            Owner::Available => {}
            Owner::SharedPool if r.kind() == ResourceKind::Cpu => {}
            Owner::SharedPool => v.push(format!("{r} is owned by the shared pool")),
            Owner::Partition(p) if !self.partitions.contains_key(p) => {
                v.push(format!("{r} is owned by unknown partition {p}"))
            }
            Owner::Partition(_) => {}
        }
    }

    /// Applies one logged change: checks its before image against this state
    /// and installs its after image. Used by replay; the rules (capacity,
    /// owner kinds) are checked afterwards by [`State::invariant_violations`].
    pub(crate) fn apply_logged(&mut self, change: &Change) -> Result<(), Rejection> {
        match change {
            Change::Transfer {
                resource: ResourceId::Memory(e),
                before,
                after,
            } => {
                check_extent(&self.host, e)?;
                self.set_memory(*e, before, after)
            }
            Change::Transfer {
                resource,
                before,
                after,
            } => {
                let slot = self
                    .units
                    .get_mut(resource)
                    .ok_or_else(|| unknown(resource))?;
                if slot != before {
                    return Err(Rejection::StaleOwner {
                        resource: resource.clone(),
                        expected: before.clone(),
                        actual: slot.clone(),
                    });
                }
                *slot = after.clone();
                Ok(())
            }
            Change::Share {
                partition,
                before_milli,
                after_milli,
            } => {
                let actual = self.share(partition);
                if actual != *before_milli {
                    return Err(Rejection::StaleShare {
                        partition: partition.clone(),
                        expected_milli: *before_milli,
                        actual_milli: actual,
                    });
                }
                if *after_milli == 0 {
                    self.shares.remove(partition);
                } else {
                    self.shares.insert(partition.clone(), *after_milli);
                }
                Ok(())
            }
            Change::Create { record } => {
                if self.partitions.contains_key(&record.id) {
                    return Err(Rejection::PartitionExists {
                        partition: record.id.clone(),
                    });
                }
                self.partitions.insert(record.id.clone(), record.clone());
                Ok(())
            }
            Change::SetState {
                partition,
                before,
                after,
            } => {
                let rec = self.partitions.get_mut(partition).ok_or_else(|| {
                    Rejection::UnknownPartition {
                        partition: partition.clone(),
                    }
                })?;
                if rec.state != *before {
                    return Err(Rejection::StaleState {
                        partition: partition.clone(),
                        expected: *before,
                        actual: rec.state,
                    });
                }
                rec.state = *after;
                Ok(())
            }
            Change::Destroy { record } => match self.partitions.get(&record.id) {
                None => Err(Rejection::UnknownPartition {
                    partition: record.id.clone(),
                }),
                Some(stored) if stored != record => Err(Rejection::StaleRecord {
                    partition: record.id.clone(),
                }),
                Some(_) => {
                    self.partitions.remove(&record.id);
                    Ok(())
                }
            },
        }
    }

    /// Sets the owner of extent `e` from `before` to `after`, keeping the
    /// extent map coalesced.
    fn set_memory(&mut self, e: Extent, before: &Owner, after: &Owner) -> Result<(), Rejection> {
        let (s, end) = (e.start_mib, e.end_mib());
        // The extents overlapping [s, end), plus the neighbours on each side
        // (which may need to be coalesced with the result).
        let first = self
            .memory
            .range(..=s)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(0);
        let lo = self
            .memory
            .range(..first)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(first);
        let hi = self.memory.range(end..).next().map(|(k, _)| *k);
        let keys: Vec<u64> = match hi {
            Some(h) => self.memory.range(lo..=h).map(|(k, _)| *k).collect(),
            None => self.memory.range(lo..).map(|(k, _)| *k).collect(),
        };
        let mut window: Vec<(u64, u64, Owner)> = Vec::with_capacity(keys.len() + 2);
        for k in &keys {
            if let Some((len, o)) = self.memory.get(k) {
                let (ks, ke) = (*k, k + len);
                if ke > s && ks < end && o != before {
                    let (os, oe) = (ks.max(s), ke.min(end));
                    return Err(Rejection::StaleOwner {
                        resource: ResourceId::Memory(Extent::new(os, oe - os)),
                        expected: before.clone(),
                        actual: o.clone(),
                    });
                }
                // Split around [s, end).
                if ks < s && ke > s {
                    window.push((ks, s - ks, o.clone()));
                    window.push((s, ke.min(end) - s, after.clone()));
                    if ke > end {
                        window.push((end, ke - end, o.clone()));
                    }
                } else if ks < end && ke > end {
                    window.push((ks, end - ks, after.clone()));
                    window.push((end, ke - end, o.clone()));
                } else if ks >= s && ke <= end {
                    window.push((ks, *len, after.clone()));
                } else {
                    window.push((ks, *len, o.clone()));
                }
            }
        }
        for k in &keys {
            self.memory.remove(k);
        }
        for (start, len, owner) in coalesce(window) {
            self.memory.insert(start, (len, owner));
        }
        Ok(())
    }
}

/// Merges adjacent extents with the same owner; input in address order.
pub(crate) fn coalesce(extents: Vec<(u64, u64, Owner)>) -> Vec<(u64, u64, Owner)> {
    let mut out: Vec<(u64, u64, Owner)> = Vec::with_capacity(extents.len());
    for (s, l, o) in extents {
        match out.last_mut() {
            Some((ps, pl, po)) if *po == o && *ps + *pl == s => *pl += l,
            _ => out.push((s, l, o)),
        }
    }
    out
}

pub(crate) fn unknown(resource: &ResourceId) -> Rejection {
    Rejection::UnknownResource {
        resource: resource.clone(),
    }
}

/// Checks a memory extent is non-empty and inside the budget.
pub(crate) fn check_extent(host: &HostConfig, e: &Extent) -> Result<(), Rejection> {
    if e.len_mib == 0 {
        return Err(Rejection::EmptyExtent { extent: *e });
    }
    if !host.contains(&ResourceId::Memory(*e)) {
        return Err(unknown(&ResourceId::Memory(*e)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostConfig {
        HostConfig {
            cpus: vec![0, 1],
            shared_pool_cpus: vec![1],
            memory_budget_mib: 100,
            vsock_cid_count: 2,
            mac_count: 2,
            channel_count: 1,
            endpoint_count: 1,
            ..HostConfig::empty()
        }
    }

    fn p(n: &str) -> Owner {
        Owner::Partition(PartitionId::new(n).unwrap())
    }

    fn with_partitions(names: &[&str]) -> State {
        let mut s = State::genesis(&host());
        for n in names {
            let id = PartitionId::new(n).unwrap();
            s.partitions.insert(
                id.clone(),
                PartitionRecord {
                    id,
                    definition: "{}".into(),
                    state: crate::PartitionState::Defined,
                },
            );
        }
        s
    }

    fn mem(s: u64, l: u64) -> ResourceId {
        ResourceId::Memory(Extent::new(s, l))
    }

    #[test]
    fn genesis_satisfies_invariants() {
        let s = State::genesis(&host());
        assert_eq!(s.invariant_violations(), Vec::<String>::new());
        assert_eq!(s.owner(&ResourceId::Cpu(1)).unwrap(), Owner::SharedPool);
        assert_eq!(
            s.free().shared_pool_milli,
            Capacity {
                total: 1000,
                free: 1000
            }
        );
        assert_eq!(
            s.free().memory_mib,
            Capacity {
                total: 100,
                free: 100
            }
        );
    }

    /// The memory table as (start, length, owner) rows.
    fn extents(s: &State) -> Vec<(u64, u64, Owner)> {
        s.memory
            .iter()
            .map(|(k, (l, o))| (*k, *l, o.clone()))
            .collect()
    }

    #[test]
    fn memory_split_and_merge_keeps_extents_coalesced() {
        let mut s = with_partitions(&["a"]);
        s.set_memory(Extent::new(10, 20), &Owner::Available, &p("a"))
            .unwrap();
        s.set_memory(Extent::new(30, 10), &Owner::Available, &p("a"))
            .unwrap();
        let got = extents(&s);
        assert_eq!(
            got,
            vec![
                (0, 10, Owner::Available),
                (10, 30, p("a")),
                (40, 60, Owner::Available)
            ]
        );
        assert_eq!(s.owner(&mem(15, 25)).unwrap(), p("a"));
        assert_eq!(
            s.owner(&mem(5, 10)),
            Err(Rejection::MixedOwners {
                resource: mem(5, 10)
            })
        );
        s.set_memory(Extent::new(10, 30), &p("a"), &Owner::Available)
            .unwrap();
        let got = extents(&s);
        assert_eq!(got, vec![(0, 100, Owner::Available)]);
        assert!(s.invariant_violations().is_empty());
    }

    #[test]
    fn memory_transfer_names_the_part_with_the_wrong_owner() {
        let mut s = with_partitions(&["a"]);
        s.set_memory(Extent::new(50, 10), &Owner::Available, &p("a"))
            .unwrap();
        let err = s
            .set_memory(Extent::new(40, 30), &Owner::Available, &p("a"))
            .unwrap_err();
        assert_eq!(
            err,
            Rejection::StaleOwner {
                resource: mem(50, 10),
                expected: Owner::Available,
                actual: p("a")
            }
        );
    }

    #[test]
    fn invariants_report_each_kind_of_violation() {
        let mut s = with_partitions(&[]);
        s.units.insert(ResourceId::Cpu(0), p("ghost"));
        s.units.remove(&ResourceId::Channel(0));
        s.units.insert(ResourceId::Channel(5), Owner::Available);
        s.units.insert(ResourceId::VsockCid(3), Owner::SharedPool);
        s.memory.insert(0, (90, Owner::Available));
        s.shares.insert(PartitionId::new("ghost").unwrap(), 2000);
        let v = s.invariant_violations();
        let expect = [
            "cpu 0 is owned by unknown partition ghost",
            "channel 0 has no owner",
            "channel 5 has an owner but is not in the host configuration",
            "vsock-cid 3 is owned by the shared pool",
            "memory extents cover 90 MiB, the budget is 100 MiB",
            "share of 2000 milli-CPUs held by unknown partition ghost",
            "shares total 2000 milli-CPUs, the shared pool has 1000",
        ];
        for e in expect {
            assert!(v.iter().any(|x| x == e), "missing {e:?} in {v:?}");
        }
        assert_eq!(v.len(), expect.len(), "{v:?}");
    }

    #[test]
    fn differences_name_what_differs() {
        let a = with_partitions(&["a"]);
        let mut b = a.clone();
        assert!(a.differences(&b, 10).is_empty());
        b.units.insert(ResourceId::Cpu(0), p("a"));
        b.set_memory(Extent::new(0, 10), &Owner::Available, &p("a"))
            .unwrap();
        b.partitions.clear();
        assert_eq!(
            a.differences(&b, 10),
            vec![
                "cpu 0: Available here, Partition(PartitionId(\"a\")) there",
                "memory [0, 10) MiB: nothing here, Partition(PartitionId(\"a\")) there",
                "memory [0, 100) MiB: Available here, nothing there",
                "memory [10, 100) MiB: nothing here, Available there",
                "partition a: PartitionRecord { id: PartitionId(\"a\"), definition: \"{}\", state: Defined } here, nothing there",
            ]
        );
        assert_eq!(a.differences(&b, 2).len(), 2);
    }

    #[test]
    fn invariants_detect_gaps_and_uncoalesced_memory() {
        let mut s = with_partitions(&[]);
        s.memory.clear();
        s.memory.insert(0, (50, Owner::Available));
        s.memory.insert(50, (50, Owner::Available));
        assert_eq!(
            s.invariant_violations(),
            vec!["memory [50, 100) MiB is not coalesced with the extent before it"]
        );
        s.memory.remove(&50);
        s.memory.insert(60, (40, Owner::Available));
        assert!(s
            .invariant_violations()
            .iter()
            .any(|v| v.contains("do not tile the budget at 60 MiB")));
    }
}
