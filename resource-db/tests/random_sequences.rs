//! Property test: random sequences of create / grant / release / share / CPU
//! pool moves / state changes / destroy / aborted transactions. After every
//! step the invariants hold, the live tables equal the replay of the audit
//! log (two code paths: SQL updates versus after images applied in memory),
//! the SQL read API agrees with the in-memory one, and a rejected
//! transaction changed nothing.
//!
//! Case count: `PROPTEST_CASES` (default 64).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proptest::prelude::*;
use resource_db::{
    Change, Db, Error, Extent, Owner, PartitionId, PartitionState, ResourceId, ResourceKind, State,
};

const PARTITIONS: u8 = 4;

#[derive(Clone, Debug)]
enum Op {
    Create(u8),
    Destroy(u8),
    Grant {
        p: u8,
        kind: u8,
        pick: u16,
        len: u16,
    },
    Release {
        p: u8,
        pick: u16,
        len: u16,
    },
    Share {
        p: u8,
        milli: u16,
    },
    MoveCpu {
        pick: u8,
    },
    SetState {
        p: u8,
        state: u8,
    },
    /// A valid operation followed by a change whose precondition fails.
    Abort {
        inner: Box<Op>,
        bad: u8,
    },
}

fn leaf() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..PARTITIONS).prop_map(Op::Create),
        1 => (0..PARTITIONS).prop_map(Op::Destroy),
        5 => (0..PARTITIONS, 0u8..7, any::<u16>(), 1u16..300).prop_map(|(p, kind, pick, len)| Op::Grant { p, kind, pick, len }),
        3 => (0..PARTITIONS, any::<u16>(), 1u16..300).prop_map(|(p, pick, len)| Op::Release { p, pick, len }),
        2 => (0..PARTITIONS, 0u16..2500).prop_map(|(p, milli)| Op::Share { p, milli }),
        1 => any::<u8>().prop_map(|pick| Op::MoveCpu { pick }),
        1 => (0..PARTITIONS, 0u8..7).prop_map(|(p, state)| Op::SetState { p, state }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => leaf(),
        1 => (leaf(), 0u8..4).prop_map(|(inner, bad)| Op::Abort { inner: Box::new(inner), bad }),
    ]
}

fn name(p: u8) -> PartitionId {
    pid(&format!("p{p}"))
}

/// Partition `p` if it exists, else the next one that does.
fn existing(s: &State, p: u8) -> Option<PartitionId> {
    (0..PARTITIONS)
        .map(|k| name((p + k) % PARTITIONS))
        .find(|id| s.partition(id).is_some())
}

const STATES: [PartitionState; 7] = [
    PartitionState::Defined,
    PartitionState::Starting,
    PartitionState::Running,
    PartitionState::Stopping,
    PartitionState::Stopped,
    PartitionState::Failed,
    PartitionState::Unresponsive,
];

const KINDS: [ResourceKind; 8] = ResourceKind::ALL;

/// The changes an operation resolves to against `s`, and whether they must
/// commit. `None` when the operation does not apply (e.g. nothing free).
fn resolve(s: &State, op: &Op) -> Option<(Vec<Change>, bool)> {
    match op {
        Op::Create(p) => {
            let id = name(*p);
            let exists = s.partition(&id).is_some();
            Some((vec![create(id.as_str())], !exists))
        }
        Op::Destroy(p) => {
            let id = name(*p);
            let rec = s.partition(&id)?.clone();
            let h = s.holdings(&id);
            let me = Owner::Partition(id.clone());
            let mut changes: Vec<Change> = h
                .resources()
                .into_iter()
                .map(|r| {
                    let before = me.clone();
                    // A dedicated CPU goes back to where CPUs come from.
                    Change::Transfer {
                        resource: r,
                        before,
                        after: Owner::Available,
                    }
                })
                .collect();
            if h.cpu_share_milli > 0 {
                changes.push(Change::Share {
                    partition: id.clone(),
                    before_milli: h.cpu_share_milli,
                    after_milli: 0,
                });
            }
            changes.push(Change::Destroy { record: rec });
            Some((changes, true))
        }
        Op::Grant { p, kind, pick, len } => {
            let id = existing(s, *p)?;
            let kind = KINDS[usize::from(*kind)];
            let resource = if kind == ResourceKind::Memory {
                let free = s.free_memory();
                let e = free.get(usize::from(*pick) % free.len().max(1))?;
                let len = u64::from(*len).min(e.len_mib);
                let off = u64::from(*pick) % (e.len_mib - len + 1);
                ResourceId::Memory(Extent::new(e.start_mib + off, len))
            } else {
                let free = s.free_units(kind);
                free.get(usize::from(*pick) % free.len().max(1))?.clone()
            };
            Some((
                vec![Change::Transfer {
                    resource,
                    before: Owner::Available,
                    after: Owner::Partition(id),
                }],
                true,
            ))
        }
        Op::Release { p, pick, len } => {
            let id = existing(s, *p)?;
            let held = s.holdings(&id).resources();
            let r = held.get(usize::from(*pick) % held.len().max(1))?;
            let resource = match r {
                // Release part of an extent.
                ResourceId::Memory(e) => {
                    let len = u64::from(*len).min(e.len_mib);
                    let off = u64::from(*pick) % (e.len_mib - len + 1);
                    ResourceId::Memory(Extent::new(e.start_mib + off, len))
                }
                other => other.clone(),
            };
            Some((
                vec![Change::Transfer {
                    resource,
                    before: Owner::Partition(id),
                    after: Owner::Available,
                }],
                true,
            ))
        }
        Op::Share { p, milli } => {
            let id = existing(s, *p)?;
            let current = s.share(&id);
            let others = s.free().shared_pool_milli.total
                - s.free().shared_pool_milli.free
                - u64::from(current);
            let ok = others + u64::from(*milli) <= s.pool_capacity_milli()
                || u32::from(*milli) <= current;
            Some((
                vec![Change::Share {
                    partition: id,
                    before_milli: current,
                    after_milli: u32::from(*milli),
                }],
                ok,
            ))
        }
        Op::MoveCpu { pick } => {
            let cpus: Vec<(u32, Owner)> = s
                .host()
                .cpus
                .iter()
                .map(|c| (*c, s.owner(&ResourceId::Cpu(*c)).unwrap()))
                .filter(|(_, o)| matches!(o, Owner::Available | Owner::SharedPool))
                .collect();
            let (cpu, before) = cpus.get(usize::from(*pick) % cpus.len().max(1))?.clone();
            let used = s.free().shared_pool_milli.total - s.free().shared_pool_milli.free;
            let (after, ok) = if before == Owner::SharedPool {
                (Owner::Available, used <= s.pool_capacity_milli() - 1000)
            } else {
                (Owner::SharedPool, true)
            };
            Some((
                vec![Change::Transfer {
                    resource: ResourceId::Cpu(cpu),
                    before,
                    after,
                }],
                ok,
            ))
        }
        Op::SetState { p, state } => {
            let id = existing(s, *p)?;
            let before = s.partition(&id)?.state;
            Some((
                vec![Change::SetState {
                    partition: id,
                    before,
                    after: STATES[usize::from(*state)],
                }],
                true,
            ))
        }
        Op::Abort { inner, bad } => {
            let (mut changes, ok) = resolve(s, inner)?;
            if !ok {
                return None;
            }
            let stranger = pid("nobody");
            let bad_change = match bad {
                // Release of something not held.
                0 => Change::Transfer {
                    resource: ResourceId::Channel(0),
                    before: Owner::Partition(stranger),
                    after: Owner::Available,
                },
                // Unknown resource.
                1 => grant(ResourceId::Cpu(99), "p0"),
                // The first change once more: a double grant, double release,
                // double create or double destroy.
                2 => match &changes[0] {
                    c @ (Change::Transfer { .. }
                    | Change::Create { .. }
                    | Change::Destroy { .. }) => c.clone(),
                    _ => Change::Share {
                        partition: name(0),
                        before_milli: 4242,
                        after_milli: 0,
                    },
                },
                // A stale share (generated shares never reach 4242), or an
                // unknown partition if p0 does not exist.
                _ => Change::Share {
                    partition: name(0),
                    before_milli: 4242,
                    after_milli: 0,
                },
            };
            changes.push(bad_change);
            Some((changes, false))
        }
    }
}

fn check_step(db: &Db, step: usize, op: &Op) -> Result<(), TestCaseError> {
    db.check_invariants()
        .map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
    let live = db.snapshot().unwrap();
    let replayed = db.replay().unwrap();
    prop_assert_eq!(
        &live,
        &replayed,
        "step {} {:?}: live differs from replay",
        step,
        op
    );
    prop_assert_eq!(db.free().unwrap(), live.free());
    for p in 0..PARTITIONS {
        let id = name(p);
        if live.partition(&id).is_some() {
            prop_assert_eq!(db.holdings(&id).unwrap(), live.holdings(&id));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants_and_live_equals_replay(ops in prop::collection::vec(op(), 1..50)) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("r.db"), small_host()).unwrap();
        let mut committed = 0;
        for (step, op) in ops.iter().enumerate() {
            let before = db.snapshot().unwrap();
            let Some((changes, should_commit)) = resolve(&before, op) else { continue };
            let result = db.transact("proptest", &changes);
            match (&result, should_commit) {
                (Ok(_), true) => {
                    committed += 1;
                    // Every transfer's after image is now the owner.
                    for c in &changes {
                        if let Change::Transfer { resource, after, .. } = c {
                            prop_assert_eq!(&db.owner(resource).unwrap(), after);
                        }
                    }
                }
                (Err(Error::Rejected { index, .. }), false) => {
                    prop_assert_eq!(db.snapshot().unwrap(), before, "rejected step {} changed state", step);
                    if matches!(op, Op::Abort { .. }) {
                        prop_assert_eq!(*index, changes.len() - 1);
                    }
                }
                _ => prop_assert!(false, "step {step} {op:?}: {changes:?} gave {result:?}, expected commit = {should_commit}"),
            }
            check_step(&db, step, op)?;
        }
        prop_assert_eq!(db.view().last_txid().unwrap().0, 1 + committed);
    }
}
