//! Benchmark: durable transactions/s at 1 and 16 concurrent writers, with
//! group commit, without batching, and against the design without a writer
//! thread (16 SQLite connections committing on their own); relaxed
//! durability for comparison; and replay time of a 100,000-entry audit log
//! against reading the live tables. Configurations run interleaved for
//! several rounds so that changes in the machine's load hit all of them.
//!
//! `cargo bench -p resource-db --features bench`
//! Environment: `BENCH_SECS` (per run, default 3), `BENCH_ROUNDS` (default
//! 3), `REPLAY_ENTRIES` (default 100000), `BENCH_DIR` (default: temp dir).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use resource_db::{
    Change, Db, Durability, HostConfig, MacAddr, Options, Owner, PartitionId, PartitionRecord,
    PartitionState, ResourceId,
};

const MAX_WRITERS: u32 = 16;

fn host() -> HostConfig {
    HostConfig {
        cpus: vec![0, 1],
        shared_pool_cpus: vec![0, 1],
        memory_budget_mib: 4096,
        vsock_cid_count: 64,
        mac_count: 64,
        channel_count: 16,
        endpoint_count: 16,
        ..HostConfig::empty()
    }
}

fn name(w: u32) -> PartitionId {
    PartitionId::new(&format!("w{w}")).expect("valid name")
}

fn open(path: &Path, durability: Durability, max_batch: usize) -> Db {
    let db = Db::open_with(
        path,
        host(),
        Options {
            durability,
            max_batch,
        },
    )
    .expect("open");
    let creates: Vec<Change> = (0..MAX_WRITERS)
        .map(|w| Change::Create {
            record: PartitionRecord {
                id: name(w),
                definition: "{}".into(),
                state: PartitionState::Defined,
            },
        })
        .collect();
    db.transact("bench", &creates).expect("create partitions");
    db
}

/// The k-th transaction of writer `w`: grant (k even) or release (k odd) of
/// the writer's own vsock CID and MAC, so writers never conflict.
fn tx(host: &HostConfig, w: u32, k: u64) -> Vec<Change> {
    let me = Owner::Partition(name(w));
    let (before, after) = if k % 2 == 0 {
        (Owner::Available, me)
    } else {
        (me, Owner::Available)
    };
    let mac = MacAddr::from_u64(host.first_mac.to_u64() + u64::from(w));
    vec![
        Change::Transfer {
            resource: ResourceId::VsockCid(host.first_vsock_cid + w),
            before: before.clone(),
            after: after.clone(),
        },
        Change::Transfer {
            resource: ResourceId::Mac(mac),
            before,
            after,
        },
    ]
}

/// Runs `writers` threads committing until `dur` has passed (or each has
/// done `per_writer` transactions). Returns the latency of every
/// transaction (µs, sorted) and the elapsed seconds.
fn drive(db: &Db, writers: u32, dur: Duration, per_writer: u64) -> (Vec<u32>, f64) {
    let host = host();
    run_writers(writers, |w, start| {
        let mut lat = Vec::new();
        let mut k = 0;
        while k < per_writer && start.elapsed() < dur {
            let changes = tx(&host, w, k);
            let t = Instant::now();
            db.transact("bench", &changes).expect("transaction");
            lat.push(micros_since(t));
            k += 1;
        }
        lat
    })
}

/// Runs `writer(w, start)` on threads `w` in `0..writers`, each returning its
/// transactions' latencies. Returns them all (µs, sorted) and the elapsed
/// seconds.
fn run_writers(writers: u32, writer: impl Fn(u32, Instant) -> Vec<u32> + Sync) -> (Vec<u32>, f64) {
    let start = Instant::now();
    let mut lat: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let writer = &writer;
                s.spawn(move || writer(w, start))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (lat, elapsed)
}

fn micros_since(t: Instant) -> u32 {
    u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One measured run.
struct Row {
    rate: f64,
    per_commit: f64,
    p50_us: u32,
    p99_us: u32,
}

impl Row {
    fn new(lat: &[u32], secs: f64, commits: u64) -> Row {
        let n = lat.len() as f64;
        Row {
            rate: n / secs,
            per_commit: n / commits.max(1) as f64,
            p50_us: percentile(lat, 0.5),
            p99_us: percentile(lat, 0.99),
        }
    }
}

/// Throughput of the database with `writers` threads calling `transact`.
fn throughput(
    path: &Path,
    durability: Durability,
    max_batch: usize,
    writers: u32,
    secs: f64,
) -> Row {
    let db = open(path, durability, max_batch);
    let base = db.stats();
    let (lat, t) = drive(&db, writers, Duration::from_secs_f64(secs), u64::MAX);
    let commits = db.stats().commits - base.commits;
    db.check_invariants().expect("invariants");
    Row::new(&lat, t, commits)
}

/// The alternative design without a writer thread: each of `writers`
/// threads has its own SQLite connection (WAL, synchronous=FULL) and commits
/// the same row changes and audit insert itself (`BEGIN IMMEDIATE` ...
/// `COMMIT`), serialized by SQLite's write lock. No precondition checks: it
/// only measures what the store alone gives.
fn raw_sqlite_writers(path: &Path, writers: u32, secs: f64) -> Row {
    drop(open(path, Durability::Full, 1));
    let host = host();
    let dur = Duration::from_secs_f64(secs);
    let (lat, elapsed) = run_writers(writers, |w, start| {
        let c = rusqlite::Connection::open(path).expect("open");
        c.pragma_update(None, "synchronous", "FULL")
            .expect("pragma");
        c.busy_timeout(Duration::from_secs(30))
            .expect("busy timeout");
        let me = name(w).to_string();
        let cid = (host.first_vsock_cid + w).to_string();
        let mac = MacAddr::from_u64(host.first_mac.to_u64() + u64::from(w)).to_string();
        let mut lat = Vec::new();
        let mut k = 0u64;
        while start.elapsed() < dur {
            let owner = if k % 2 == 0 { me.as_str() } else { "available" };
            let t = Instant::now();
            c.execute_batch("BEGIN IMMEDIATE").expect("begin");
            let mut up = c
                .prepare_cached("UPDATE units SET owner = ?3 WHERE kind = ?1 AND key = ?2")
                .expect("prepare");
            up.execute(rusqlite::params!["vsock-cid", cid, owner])
                .expect("update");
            up.execute(rusqlite::params!["mac", mac, owner])
                .expect("update");
            c.prepare_cached(
                "INSERT INTO audit_log(time_unix_ns, actor, record) VALUES (0, 'raw', ?1)",
            )
            .expect("prepare")
            .execute([format!("{:?}", tx(&host, w, k))])
            .expect("insert");
            c.execute_batch("COMMIT").expect("commit");
            lat.push(micros_since(t));
            k += 1;
        }
        lat
    });
    let n = lat.len() as u64;
    Row::new(&lat, elapsed, n)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The environment variable `name` parsed, else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (T, f64) {
    let mut best = f64::MAX;
    let mut out = None;
    for _ in 0..n {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (out.expect("n > 0"), best)
}

fn main() {
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let entries: u64 = env_or("REPLAY_ENTRIES", 100_000);
    let tmp = tempfile_dir();
    let dir = tmp.path();
    println!(
        "resource-db benchmark; store in {}; load average at start: {}",
        dir.display(),
        load()
    );
    println!("each transaction: 2 ownership changes + 1 audit entry; WAL journal\n");

    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    println!(
        "== transactions/s: {rounds} interleaved rounds of {secs} s per configuration; median [min-max] =="
    );
    type Mode = Option<(Durability, usize)>;
    let configs: [(&str, Mode, u32); 6] = [
        (
            "full durability, 1 writer",
            Some((Durability::Full, 256)),
            1,
        ),
        (
            "full, 16 writers, group commit",
            Some((Durability::Full, 256)),
            16,
        ),
        (
            "full, 16 writers, no batching (max_batch=1)",
            Some((Durability::Full, 1)),
            16,
        ),
        ("baseline: 16 SQLite connections, own commits", None, 16),
        (
            "relaxed durability, 1 writer",
            Some((Durability::Relaxed, 256)),
            1,
        ),
        (
            "relaxed, 16 writers, group commit",
            Some((Durability::Relaxed, 256)),
            16,
        ),
    ];
    let mut runs: Vec<Vec<Row>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (_, mode, writers)) in configs.iter().enumerate() {
            let file = dir.join(format!("round{round}-config{i}.db"));
            let row = match mode {
                Some((durability, max_batch)) => {
                    throughput(&file, *durability, *max_batch, *writers, secs)
                }
                None => raw_sqlite_writers(&file, *writers, secs),
            };
            runs[i].push(row);
        }
    }
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut medians = Vec::new();
    for ((label, _, _), rows) in configs.iter().zip(&runs) {
        let mut rates: Vec<f64> = rows.iter().map(|r| r.rate).collect();
        let m = median(&mut rates);
        let mut per: Vec<f64> = rows.iter().map(|r| r.per_commit).collect();
        let mut p50: Vec<f64> = rows.iter().map(|r| f64::from(r.p50_us)).collect();
        let mut p99: Vec<f64> = rows.iter().map(|r| f64::from(r.p99_us)).collect();
        println!(
            "{label:<46} {m:>7.0} tx/s [{:>6.0}-{:<6.0}] {:>5.1} tx/commit  p50 {:>5.0} µs  p99 {:>6.0} µs",
            rates[0],
            rates[rates.len() - 1],
            median(&mut per),
            median(&mut p50),
            median(&mut p99),
        );
        medians.push(m);
    }
    println!();
    ratio(
        "16 writers group commit / no batching      ",
        medians[1] / medians[2],
    );
    ratio(
        "16 writers group commit / 16 connections   ",
        medians[1] / medians[3],
    );
    ratio(
        "16 writers / 1 writer (full)               ",
        medians[1] / medians[0],
    );
    ratio(
        "relaxed / full, 1 writer                   ",
        medians[4] / medians[0],
    );
    ratio(
        "relaxed / full, 16 writers                 ",
        medians[5] / medians[1],
    );

    println!("\n== replay of a {entries}-entry audit log ==");
    let path = dir.join("replay.db");
    let build = Instant::now();
    {
        let db = open(&path, Durability::Relaxed, 256);
        let per_writer = (entries - 2).div_ceil(u64::from(MAX_WRITERS));
        drive(&db, MAX_WRITERS, Duration::from_secs(3600), per_writer);
        let last = db.view().last_txid().expect("last txid");
        println!(
            "built log of {} entries in {:.1} s (relaxed durability, 16 writers)",
            last.0,
            build.elapsed().as_secs_f64()
        );
    }
    let db = Db::open(&path, host()).expect("reopen");
    let (replayed, t_replay) = best_of(3, || db.replay().expect("replay"));
    let (live, t_snapshot) = best_of(3, || db.snapshot().expect("snapshot"));
    let (_, t_check) = best_of(3, || db.check_replay().expect("check_replay"));
    assert!(replayed == live, "replay differs from live tables");
    let n = db.view().last_txid().expect("last").0;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "replay():       {:>8.1} ms  ({:.0} entries/s)",
        t_replay * 1e3,
        n as f64 / t_replay
    );
    println!(
        "snapshot():     {:>8.1} ms  (read the live tables)",
        t_snapshot * 1e3
    );
    println!(
        "check_replay(): {:>8.1} ms  (both, in one read transaction)",
        t_check * 1e3
    );
    println!(
        "ratio replay / snapshot: {:.0}x; store file {:.1} MiB",
        t_replay / t_snapshot,
        size as f64 / (1 << 20) as f64
    );
    println!("\nload average at end: {}", load());
}

fn ratio(label: &str, r: f64) {
    println!("ratio {label}: {r:.2}x");
}

/// A fresh directory (removed at exit) under `BENCH_DIR` or the system temp dir.
fn tempfile_dir() -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("resource-db-bench-")
        .tempdir_in(base)
        .expect("bench dir")
}
