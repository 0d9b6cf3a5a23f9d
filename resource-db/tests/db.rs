//! Behaviour of `Db`: every rejection path, all-or-nothing transactions, the
//! audit log, reopening, locking, and the read API.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use resource_db::{
    Capacity, Change, Db, Error, Extent, HostConfig, LogRecord, Owner, PartitionState, Rejection,
    ResourceId, TxId, View,
};

fn mem(start: u64, len: u64) -> ResourceId {
    ResourceId::Memory(Extent::new(start, len))
}

/// Runs a transaction that must be rejected, checks it changed nothing
/// (live tables and log), and returns (index, reason).
fn rejected(db: &Db, changes: &[Change]) -> (usize, Rejection) {
    let before = db.snapshot().unwrap();
    let last = db.view().last_txid().unwrap();
    let err = db.transact("test", changes).unwrap_err();
    assert_eq!(
        db.snapshot().unwrap(),
        before,
        "rejected transaction changed the live tables"
    );
    assert_eq!(
        db.view().last_txid().unwrap(),
        last,
        "rejected transaction reached the log"
    );
    match err {
        Error::Rejected { index, reason } => (index, reason),
        other => panic!("expected a rejection, got {other}"),
    }
}

#[test]
fn empty_transaction_is_rejected() {
    let (_d, db) = open();
    assert_eq!(rejected(&db, &[]), (0, Rejection::EmptyTransaction));
}

#[test]
fn unknown_resources_are_rejected_by_name() {
    let (_d, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    for r in [
        ResourceId::Cpu(4),
        ResourceId::VsockCid(2),
        ResourceId::VsockCid(11),
        ResourceId::Device("disk9".into()),
        ResourceId::Channel(4),
        ResourceId::Endpoint(99),
        mem(1000, 25),
    ] {
        let (i, reason) = rejected(&db, &[grant(r.clone(), "a")]);
        assert_eq!(i, 0);
        assert_eq!(
            reason,
            Rejection::UnknownResource {
                resource: r.clone()
            }
        );
        assert!(reason.to_string().contains(&r.to_string()), "{reason}");
    }
    assert_eq!(
        rejected(&db, &[grant(mem(5, 0), "a")]).1,
        Rejection::EmptyExtent {
            extent: Extent::new(5, 0)
        }
    );
}

#[test]
fn stale_before_image_names_resource_expected_and_actual_owner() {
    let (_d, db) = open();
    db.transact(
        "t",
        &[create("a"), create("b"), grant(ResourceId::Cpu(0), "a")],
    )
    .unwrap();
    let (i, reason) = rejected(
        &db,
        &[
            grant(ResourceId::VsockCid(3), "b"),
            release(ResourceId::Cpu(0), "b"),
        ],
    );
    assert_eq!(i, 1);
    assert_eq!(
        reason,
        Rejection::StaleOwner {
            resource: ResourceId::Cpu(0),
            expected: owner("b"),
            actual: owner("a")
        }
    );
    assert_eq!(
        reason.to_string(),
        "precondition failed: cpu 0 is owned by a, the transaction expected b"
    );
    // The valid first change was not applied either.
    assert_eq!(
        db.owner(&ResourceId::VsockCid(3)).unwrap(),
        Owner::Available
    );
}

#[test]
fn double_grant_is_rejected_within_and_across_transactions() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), create("b")]).unwrap();
    let mac = ResourceId::Mac("02:70:76:00:00:01".parse().unwrap());
    let (i, reason) = rejected(&db, &[grant(mac.clone(), "a"), grant(mac.clone(), "b")]);
    assert_eq!(i, 1);
    assert_eq!(
        reason,
        Rejection::StaleOwner {
            resource: mac.clone(),
            expected: Owner::Available,
            actual: owner("a")
        }
    );
    db.transact("t", &[grant(mac.clone(), "a")]).unwrap();
    let (_, reason) = rejected(&db, &[grant(mac.clone(), "b")]);
    assert_eq!(
        reason,
        Rejection::StaleOwner {
            resource: mac.clone(),
            expected: Owner::Available,
            actual: owner("a")
        }
    );
    assert_eq!(db.owner(&mac).unwrap(), owner("a"));
}

#[test]
fn release_of_something_not_held_is_rejected() {
    let (_d, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    let (_, reason) = rejected(&db, &[release(ResourceId::Channel(2), "a")]);
    assert_eq!(
        reason,
        Rejection::StaleOwner {
            resource: ResourceId::Channel(2),
            expected: owner("a"),
            actual: Owner::Available
        }
    );
}

#[test]
fn memory_precondition_names_the_part_of_the_extent_with_another_owner() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), create("b"), grant(mem(256, 128), "a")])
        .unwrap();
    let (_, reason) = rejected(&db, &[grant(mem(0, 512), "b")]);
    assert_eq!(
        reason,
        Rejection::StaleOwner {
            resource: mem(256, 128),
            expected: Owner::Available,
            actual: owner("a")
        }
    );
    assert_eq!(db.owner(&mem(260, 8)).unwrap(), owner("a"));
    assert!(matches!(
        db.owner(&mem(200, 100)).unwrap_err().rejection(),
        Some(Rejection::MixedOwners { .. })
    ));
}

#[test]
fn memory_grants_split_and_releases_merge_extents() {
    let (_d, db) = open();
    db.transact(
        "t",
        &[
            create("a"),
            grant(mem(100, 100), "a"),
            grant(mem(200, 50), "a"),
        ],
    )
    .unwrap();
    assert_eq!(
        db.holdings(&pid("a")).unwrap().memory,
        vec![Extent::new(100, 150)]
    );
    db.transact("t", &[release(mem(150, 50), "a")]).unwrap();
    assert_eq!(
        db.holdings(&pid("a")).unwrap().memory,
        vec![Extent::new(100, 50), Extent::new(200, 50)]
    );
    db.transact(
        "t",
        &[release(mem(100, 50), "a"), release(mem(200, 50), "a")],
    )
    .unwrap();
    assert!(db.holdings(&pid("a")).unwrap().is_empty());
    assert_eq!(
        db.snapshot().unwrap().free_memory(),
        vec![Extent::new(0, 1024)]
    );
    db.check_invariants().unwrap();
    db.check_replay().unwrap();
}

#[test]
fn over_capacity_share_is_rejected() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), create("b")]).unwrap();
    db.transact("t", &[share("a", 0, 1500)]).unwrap();
    let (_, reason) = rejected(&db, &[share("b", 0, 501)]);
    assert_eq!(
        reason,
        Rejection::OverCapacity {
            requested_milli: 2001,
            capacity_milli: 2000
        }
    );
    db.transact("t", &[share("b", 0, 500)]).unwrap();
    assert_eq!(
        db.free().unwrap().shared_pool_milli,
        Capacity {
            total: 2000,
            free: 0
        }
    );
}

#[test]
fn taking_a_cpu_out_of_an_overcommitted_pool_is_rejected() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), share("a", 0, 1200)])
        .unwrap();
    let (_, reason) = rejected(
        &db,
        &[Change::Transfer {
            resource: ResourceId::Cpu(3),
            before: Owner::SharedPool,
            after: owner("a"),
        }],
    );
    assert_eq!(
        reason,
        Rejection::OverCapacity {
            requested_milli: 1200,
            capacity_milli: 1000
        }
    );
    // Lending CPU 0 to the pool first makes it fit.
    db.transact(
        "t",
        &[
            Change::Transfer {
                resource: ResourceId::Cpu(0),
                before: Owner::Available,
                after: Owner::SharedPool,
            },
            Change::Transfer {
                resource: ResourceId::Cpu(3),
                before: Owner::SharedPool,
                after: owner("a"),
            },
        ],
    )
    .unwrap();
    assert_eq!(db.holdings(&pid("a")).unwrap().cpus, vec![3]);
    assert_eq!(
        db.free().unwrap().shared_pool_milli,
        Capacity {
            total: 2000,
            free: 800
        }
    );
}

#[test]
fn stale_share_before_image_is_rejected() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), share("a", 0, 300)])
        .unwrap();
    let (_, reason) = rejected(&db, &[share("a", 0, 400)]);
    assert_eq!(
        reason,
        Rejection::StaleShare {
            partition: pid("a"),
            expected_milli: 0,
            actual_milli: 300
        }
    );
}

#[test]
fn changes_naming_unknown_partitions_are_rejected() {
    let (_d, db) = open();
    let (_, reason) = rejected(&db, &[grant(ResourceId::Cpu(0), "ghost")]);
    assert_eq!(
        reason,
        Rejection::UnknownPartition {
            partition: pid("ghost")
        }
    );
    let (_, reason) = rejected(&db, &[share("ghost", 0, 1)]);
    assert_eq!(
        reason,
        Rejection::UnknownPartition {
            partition: pid("ghost")
        }
    );
    let (_, reason) = rejected(
        &db,
        &[Change::SetState {
            partition: pid("ghost"),
            before: PartitionState::Defined,
            after: PartitionState::Running,
        }],
    );
    assert_eq!(
        reason,
        Rejection::UnknownPartition {
            partition: pid("ghost")
        }
    );
    let (_, reason) = rejected(
        &db,
        &[Change::Destroy {
            record: record("ghost"),
        }],
    );
    assert_eq!(
        reason,
        Rejection::UnknownPartition {
            partition: pid("ghost")
        }
    );
    assert!(matches!(
        db.holdings(&pid("ghost")).unwrap_err().rejection(),
        Some(Rejection::UnknownPartition { .. })
    ));
}

#[test]
fn only_cpus_can_go_to_the_shared_pool() {
    let (_d, db) = open();
    let r = ResourceId::Endpoint(1);
    let (_, reason) = rejected(
        &db,
        &[Change::Transfer {
            resource: r.clone(),
            before: Owner::Available,
            after: Owner::SharedPool,
        }],
    );
    assert_eq!(
        reason,
        Rejection::InvalidOwner {
            resource: r,
            owner: Owner::SharedPool
        }
    );
}

#[test]
fn partition_create_state_and_destroy_preconditions() {
    let (_d, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    assert_eq!(
        rejected(&db, &[create("a")]).1,
        Rejection::PartitionExists {
            partition: pid("a")
        }
    );
    let mut bad = record("b");
    bad.definition = "{not json".into();
    assert!(matches!(
        rejected(&db, &[Change::Create { record: bad }]).1,
        Rejection::InvalidDefinition { .. }
    ));
    let set = |before, after| Change::SetState {
        partition: pid("a"),
        before,
        after,
    };
    db.transact(
        "t",
        &[set(PartitionState::Defined, PartitionState::Running)],
    )
    .unwrap();
    assert_eq!(
        rejected(
            &db,
            &[set(PartitionState::Defined, PartitionState::Stopped)]
        )
        .1,
        Rejection::StaleState {
            partition: pid("a"),
            expected: PartitionState::Defined,
            actual: PartitionState::Running
        }
    );
    // The destroy's before image is the whole record, state included.
    assert_eq!(
        rejected(
            &db,
            &[Change::Destroy {
                record: record("a")
            }]
        )
        .1,
        Rejection::StaleRecord {
            partition: pid("a")
        }
    );
    let current = db.partition(&pid("a")).unwrap().unwrap();
    assert_eq!(current.state, PartitionState::Running);
    db.transact("t", &[Change::Destroy { record: current }])
        .unwrap();
    assert_eq!(db.partition(&pid("a")).unwrap(), None);
}

#[test]
fn destroy_of_a_partition_that_still_holds_resources_is_rejected() {
    let (_d, db) = open();
    db.transact(
        "t",
        &[
            create("a"),
            grant(ResourceId::Device("tap0".into()), "a"),
            grant(mem(0, 64), "a"),
        ],
    )
    .unwrap();
    let (i, reason) = rejected(
        &db,
        &[
            release(ResourceId::Device("tap0".into()), "a"),
            Change::Destroy {
                record: record("a"),
            },
        ],
    );
    assert_eq!(i, 1);
    assert_eq!(
        reason,
        Rejection::PartitionNotEmpty {
            partition: pid("a"),
            what: "memory [0, 64) MiB".into()
        }
    );
    db.transact("t", &[share("a", 0, 10)]).unwrap();
    let (_, reason) = rejected(
        &db,
        &[
            release(ResourceId::Device("tap0".into()), "a"),
            release(mem(0, 64), "a"),
            Change::Destroy {
                record: record("a"),
            },
        ],
    );
    assert_eq!(
        reason,
        Rejection::PartitionNotEmpty {
            partition: pid("a"),
            what: "a shared-pool share of 10 milli-CPUs".into()
        }
    );
    db.transact(
        "t",
        &[
            release(ResourceId::Device("tap0".into()), "a"),
            release(mem(0, 64), "a"),
            share("a", 10, 0),
            Change::Destroy {
                record: record("a"),
            },
        ],
    )
    .unwrap();
    db.check_invariants().unwrap();
}

#[test]
fn committed_transactions_are_logged_with_before_and_after_images() {
    let (_d, db) = open();
    let changes = vec![create("a"), grant(ResourceId::Cpu(1), "a")];
    let t = db.transact("operator", &changes).unwrap();
    assert_eq!(t, TxId(2));
    let log = db.log(TxId(1), 10).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].record, LogRecord::Genesis { host: small_host() });
    assert_eq!(log[1].txid, t);
    assert_eq!(log[1].actor, "operator");
    assert_eq!(log[1].record, LogRecord::Transaction { changes });
    assert!(log[1].time_unix_ns >= log[0].time_unix_ns);
}

#[test]
fn state_survives_reopen_and_matches_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let before = {
        let db = Db::open(&path, small_host()).unwrap();
        db.transact(
            "t",
            &[
                create("a"),
                grant(mem(0, 512), "a"),
                grant(ResourceId::VsockCid(4), "a"),
            ],
        )
        .unwrap();
        db.snapshot().unwrap()
    };
    let db = Db::open(&path, small_host()).unwrap();
    assert_eq!(db.snapshot().unwrap(), before);
    assert_eq!(db.replay().unwrap(), before);
    assert_eq!(db.holdings(&pid("a")).unwrap().vsock_cids, vec![4]);
}

#[test]
fn reopening_with_another_host_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    drop(Db::open(&path, small_host()).unwrap());
    let other = HostConfig {
        memory_budget_mib: 2048,
        channel_count: 5,
        ..small_host()
    };
    match Db::open(&path, other) {
        Err(Error::HostConfigChanged { fields, .. }) => {
            assert_eq!(fields, "memory_budget_mib, channel_count")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with another configuration"),
    }
    assert_eq!(Db::stored_host_config(&path).unwrap(), small_host());
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let db = Db::open(&path, small_host()).unwrap();
    assert!(matches!(
        Db::open(&path, small_host()),
        Err(Error::Locked { .. })
    ));
    drop(db);
    Db::open(&path, small_host()).unwrap();
}

#[test]
fn invalid_host_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = HostConfig {
        shared_pool_cpus: vec![9],
        ..small_host()
    };
    assert!(matches!(
        Db::open(dir.path().join("r.db"), bad),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn read_only_view_sees_committed_state() {
    let (dir, db) = open();
    let view = View::open(dir.path().join("r.db")).unwrap();
    db.transact("t", &[create("a"), grant(ResourceId::Cpu(0), "a")])
        .unwrap();
    assert_eq!(view.owner(&ResourceId::Cpu(0)).unwrap(), owner("a"));
    assert_eq!(view.partitions().unwrap(), vec![record("a")]);
    assert_eq!(view.snapshot().unwrap(), db.snapshot().unwrap());
}

#[test]
fn free_and_holdings_agree_with_the_snapshot() {
    let (_d, db) = open();
    db.transact(
        "t",
        &[
            create("a"),
            grant(ResourceId::Cpu(0), "a"),
            grant(mem(0, 100), "a"),
            grant(mem(500, 10), "a"),
            grant(ResourceId::Mac("02:70:76:00:00:07".parse().unwrap()), "a"),
            share("a", 0, 250),
        ],
    )
    .unwrap();
    let snap = db.snapshot().unwrap();
    let free = db.free().unwrap();
    assert_eq!(free, snap.free());
    assert_eq!(free.cpus, Capacity { total: 4, free: 1 });
    assert_eq!(
        free.memory_mib,
        Capacity {
            total: 1024,
            free: 914
        }
    );
    assert_eq!(free.macs, Capacity { total: 8, free: 7 });
    assert_eq!(free.devices, Capacity { total: 2, free: 2 });
    assert_eq!(
        free.shared_pool_milli,
        Capacity {
            total: 2000,
            free: 1750
        }
    );
    let h = db.holdings(&pid("a")).unwrap();
    assert_eq!(h, snap.holdings(&pid("a")));
    assert_eq!(h.memory_mib(), 110);
    assert_eq!(h.cpu_share_milli, 250);
}

#[test]
fn concurrent_writers_are_isolated_and_all_commit() {
    let (_d, db) = open();
    let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    std::thread::scope(|s| {
        for (i, n) in names.iter().enumerate() {
            let db = &db;
            s.spawn(move || {
                db.transact(
                    "t",
                    &[create(n), grant(ResourceId::VsockCid(3 + i as u32), n)],
                )
                .unwrap();
                // Everyone also tries to take channel 0; exactly one wins.
                let _ = db.transact("t", &[grant(ResourceId::Channel(0), n)]);
            });
        }
    });
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            db.owner(&ResourceId::VsockCid(3 + i as u32)).unwrap(),
            owner(n)
        );
    }
    assert!(matches!(
        db.owner(&ResourceId::Channel(0)).unwrap(),
        Owner::Partition(_)
    ));
    assert_eq!(db.view().last_txid().unwrap(), TxId(1 + 8 + 1));
    let stats = db.stats();
    assert_eq!((stats.committed, stats.failed), (9, 7));
    assert!(stats.commits >= 1 && stats.commits <= 9, "{stats:?}");
    db.check_invariants().unwrap();
    db.check_replay().unwrap();
}

#[test]
fn tampering_with_the_live_tables_is_detected() {
    let (dir, db) = open();
    db.transact("t", &[create("a"), grant(ResourceId::Cpu(1), "a")])
        .unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("r.db")).unwrap();
    raw.execute(
        "UPDATE units SET owner = 'ghost' WHERE kind = 'cpu' AND key = '0'",
        [],
    )
    .unwrap();
    raw.execute("DELETE FROM units WHERE kind = 'channel' AND key = '3'", [])
        .unwrap();
    match db.check_invariants() {
        Err(Error::InvariantsViolated(v)) => assert_eq!(
            v,
            vec![
                "cpu 0 is owned by unknown partition ghost".to_string(),
                "channel 3 has no owner".to_string()
            ]
        ),
        other => panic!("expected violations, got {other:?}"),
    }
    match db.check_replay() {
        Err(Error::Corrupt(m)) => assert!(
            m.contains("cpu 0: Partition(PartitionId(\"ghost\")) here, Available there"),
            "{m}"
        ),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn tampering_with_the_log_is_detected_by_replay() {
    let (dir, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    db.transact("t", &[grant(ResourceId::Cpu(1), "a")]).unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("r.db")).unwrap();
    raw.execute("DELETE FROM audit_log WHERE txid = 2", [])
        .unwrap();
    match db.replay() {
        Err(Error::Corrupt(m)) => assert_eq!(m, "audit log jumps from 1 to tx 3"),
        other => panic!("expected corruption, got {other:?}"),
    }
    raw.execute("DELETE FROM audit_log WHERE txid = 3", [])
        .unwrap();
    raw.execute(
        "INSERT INTO audit_log(txid, time_unix_ns, actor, record) VALUES (2, 0, 'x', ?1)",
        [r#"{"transaction":{"changes":[{"transfer":{"resource":{"cpu":1},"before":"a","after":"available"}}]}}"#],
    )
    .unwrap();
    match db.replay() {
        Err(Error::Corrupt(m)) => assert!(m.contains("tx 2 change #0 does not apply"), "{m}"),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn opening_in_a_missing_directory_names_the_lock_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("r.db");
    match Db::open(&path, small_host()) {
        Err(Error::Io { path: p, .. }) => {
            assert_eq!(p, dir.path().join("no-such-dir").join("r.db-lock"))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a store in a missing directory"),
    }
}

#[test]
fn a_view_of_a_missing_store_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        View::open(dir.path().join("absent.db")),
        Err(Error::Store {
            context: "opening the store read-only",
            ..
        })
    ));
}

#[test]
fn a_view_opens_a_closed_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    {
        let db = Db::open(&path, small_host()).unwrap();
        db.transact("t", &[create("a"), grant(ResourceId::Cpu(0), "a")])
            .unwrap();
    }
    let view = View::open(&path).unwrap();
    assert_eq!(view.owner(&ResourceId::Cpu(0)).unwrap(), owner("a"));
    view.check_invariants().unwrap();
    view.check_replay().unwrap();
}

#[test]
fn max_batch_one_commits_every_transaction_alone() {
    let dir = tempfile::tempdir().unwrap();
    let options = resource_db::Options {
        durability: resource_db::Durability::Relaxed,
        max_batch: 1,
    };
    let db = Db::open_with(dir.path().join("r.db"), small_host(), options).unwrap();
    db.transact("t", &[create("a")]).unwrap();
    std::thread::scope(|s| {
        for cid in 3..11 {
            let db = &db;
            s.spawn(move || {
                db.transact("t", &[grant(ResourceId::VsockCid(cid), "a")])
                    .unwrap()
            });
        }
    });
    let stats = db.stats();
    assert_eq!((stats.commits, stats.committed, stats.failed), (9, 9, 0));
    assert_eq!(
        db.holdings(&pid("a")).unwrap().vsock_cids,
        (3..11).collect::<Vec<_>>()
    );
}
