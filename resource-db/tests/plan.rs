//! The planning helpers: a plan committed gives exactly the demand, a
//! shortage is reported before anything is allocated, a stale plan is
//! rejected by its before images, and a release plan returns everything.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use resource_db::{Change, Db, Demand, Error, Extent, Owner, Rejection, ResourceId, State};

fn demand() -> Demand {
    Demand {
        memory_mib: 300,
        dedicated_cpus: vec![0, 3],
        cpu_share_milli: 400,
        vsock_cids: 2,
        macs: 1,
        devices: vec!["tap0".into()],
        channels: 1,
        endpoints: 2,
        uids: 2,
    }
}

/// A plan against a fresh snapshot that must succeed.
fn plan_grant(db: &Db, name: &str, demand: &Demand) -> Vec<Change> {
    db.snapshot()
        .unwrap()
        .plan_grant(&pid(name), demand)
        .unwrap()
}

fn one_vsock_cid() -> Demand {
    Demand {
        vsock_cids: 1,
        ..Demand::default()
    }
}

#[test]
fn a_committed_plan_gives_exactly_the_demand() {
    let (_d, db) = open();
    // Fragment memory: [0, 100) and [200, 1024) stay free.
    db.transact(
        "t",
        &[
            create("other"),
            grant(ResourceId::Memory(Extent::new(100, 100)), "other"),
        ],
    )
    .unwrap();
    db.transact("t", &[create("a")]).unwrap();
    let plan = plan_grant(&db, "a", &demand());
    db.transact("t", &plan).unwrap();
    let h = db.holdings(&pid("a")).unwrap();
    assert_eq!(h.cpus, vec![0, 3]);
    assert_eq!(h.cpu_share_milli, 400);
    assert_eq!(h.memory, vec![Extent::new(0, 100), Extent::new(200, 200)]);
    assert_eq!(h.vsock_cids, vec![3, 4]);
    assert_eq!(h.macs.len(), 1);
    assert_eq!(h.devices, vec!["tap0".to_string()]);
    assert_eq!(h.channels, vec![0]);
    assert_eq!(h.endpoints, vec![0, 1]);
    // CPU 3 came out of the pool: one pool CPU left.
    assert_eq!(db.free().unwrap().shared_pool_milli.total, 1000);
    db.check_invariants().unwrap();
}

#[test]
fn shortages_are_reported_before_anything_is_allocated() {
    let (_d, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    let s = db.snapshot().unwrap();
    let cases = [
        (Demand { memory_mib: 1025, ..Demand::default() }, "not enough memory MiB: 1025 requested, 1024 free"),
        (Demand { vsock_cids: 9, ..Demand::default() }, "not enough vsock-cid: 9 requested, 8 free"),
        (Demand { cpu_share_milli: 2001, ..Demand::default() }, "not enough shared pool milli-CPUs: 2001 requested, 2000 free"),
        (
            Demand { dedicated_cpus: vec![2, 3], cpu_share_milli: 1, ..Demand::default() },
            "not enough shared pool milli-CPUs once 2 pool CPU(s) are dedicated: 1 requested, 0 free",
        ),
    ];
    for (d, msg) in cases {
        let err = s.plan_grant(&pid("a"), &d).unwrap_err();
        assert!(matches!(err, Rejection::Insufficient { .. }));
        assert_eq!(err.to_string(), msg);
    }
    assert_eq!(db.snapshot().unwrap(), s, "planning changed the database");
}

#[test]
fn specific_resources_held_by_others_are_unavailable() {
    let (_d, db) = open();
    db.transact(
        "t",
        &[
            create("a"),
            create("b"),
            grant(ResourceId::Cpu(1), "b"),
            grant(ResourceId::Device("disk0".into()), "b"),
        ],
    )
    .unwrap();
    let s = db.snapshot().unwrap();
    assert_eq!(
        s.plan_grant(
            &pid("a"),
            &Demand {
                dedicated_cpus: vec![1],
                ..Demand::default()
            }
        ),
        Err(Rejection::Unavailable {
            resource: ResourceId::Cpu(1),
            owner: owner("b")
        })
    );
    assert_eq!(
        s.plan_grant(
            &pid("a"),
            &Demand {
                devices: vec!["disk0".into()],
                ..Demand::default()
            }
        ),
        Err(Rejection::Unavailable {
            resource: ResourceId::Device("disk0".into()),
            owner: owner("b")
        })
    );
    assert_eq!(
        s.plan_grant(
            &pid("a"),
            &Demand {
                dedicated_cpus: vec![7],
                ..Demand::default()
            }
        ),
        Err(Rejection::UnknownResource {
            resource: ResourceId::Cpu(7)
        })
    );
}

#[test]
fn a_stale_plan_is_rejected_by_its_before_images() {
    let (_d, db) = open();
    db.transact("t", &[create("a"), create("b")]).unwrap();
    let plan = plan_grant(&db, "a", &one_vsock_cid());
    db.transact("t", &[grant(ResourceId::VsockCid(3), "b")])
        .unwrap();
    match db.transact("t", &plan) {
        Err(Error::Rejected { reason, .. }) => assert_eq!(
            reason,
            Rejection::StaleOwner {
                resource: ResourceId::VsockCid(3),
                expected: Owner::Available,
                actual: owner("b")
            }
        ),
        other => panic!("expected a stale-owner rejection, got {other:?}"),
    }
    // Planning again against a fresh snapshot succeeds.
    let plan = plan_grant(&db, "a", &one_vsock_cid());
    db.transact("t", &plan).unwrap();
    assert_eq!(db.holdings(&pid("a")).unwrap().vsock_cids, vec![4]);
}

#[test]
fn release_plan_and_destroy_return_the_host_to_genesis() {
    let (_d, db) = open();
    db.transact("t", &[create("a")]).unwrap();
    let plan = plan_grant(&db, "a", &demand());
    db.transact("t", &plan).unwrap();
    let s = db.snapshot().unwrap();
    let mut release = s.plan_release(&pid("a"));
    release.push(Change::Destroy {
        record: s.partition(&pid("a")).unwrap().clone(),
    });
    db.transact("t", &release).unwrap();
    assert_eq!(db.snapshot().unwrap(), State::genesis(&small_host()));
    db.check_replay().unwrap();
}
