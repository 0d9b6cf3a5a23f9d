//! Crash test (custom harness): a child process — this same binary, started
//! with `RESOURCE_DB_CRASH_CHILD` set — commits transactions from four
//! threads in a loop and reports each committed txid on stdout right after
//! `transact` returns. The parent SIGKILLs it at a random moment, then checks:
//! the store reopens, invariants hold, live == replay, no partial transaction
//! is visible (every partition holds exactly its full bundle, every
//! unassigned slot resource is `available`), and every reported txid is in
//! the log carrying the transaction the child reported.
//!
//! `CRASH_KILLS` (default 200) sets the number of kills, `CRASH_SEED` the
//! random seed (printed at start).

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use partvisor_runtime::sync::MutexExt;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pid, small_host};
use resource_db::{
    Change, Db, Extent, HostConfig, LogEntry, LogRecord, MacAddr, Owner, PartitionId,
    PartitionRecord, PartitionState, ResourceId, TxId,
};

const CHILD_ENV: &str = "RESOURCE_DB_CRASH_CHILD";
const THREADS: u32 = 4;
const SLOTS: u32 = 16;
const MAX_ALIVE: usize = 8;
const SLOT_MIB: u64 = 16;
const SHARE_MILLI: u32 = 10;

fn host() -> HostConfig {
    HostConfig {
        memory_budget_mib: u64::from(THREADS * SLOTS) * SLOT_MIB + 100,
        vsock_cid_count: THREADS * SLOTS,
        mac_count: THREADS * SLOTS,
        channel_count: THREADS * SLOTS,
        ..small_host()
    }
}

/// The resources partition `t{t}-s{slot}` holds while it exists.
fn bundle(host: &HostConfig, t: u32, slot: u32) -> Vec<ResourceId> {
    let i = t * SLOTS + slot;
    vec![
        ResourceId::VsockCid(host.first_vsock_cid + i),
        ResourceId::Mac(MacAddr::from_u64(host.first_mac.to_u64() + u64::from(i))),
        ResourceId::Memory(Extent::new(u64::from(i) * SLOT_MIB, SLOT_MIB)),
        ResourceId::Channel(i),
    ]
}

fn part_name(t: u32, slot: u32) -> PartitionId {
    pid(&format!("t{t}-s{slot}"))
}

/// xorshift64*: enough randomness for kill timing and workload choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ----------------------------------------------------------------- child --

fn child(path: &Path) {
    let iter: u64 = std::env::var("CRASH_ITER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let db = match Db::open(path, host()) {
        Ok(db) => db,
        Err(e) => fail_child(&format!("open: {e}")),
    };
    let out = Mutex::new(std::io::stdout());
    if writeln!(out.locked(), "ready").is_err() {
        fail_child("stdout closed");
    }
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (db, out) = (&db, &out);
            s.spawn(move || child_thread(db, out, iter, t));
        }
    });
}

fn fail_child(msg: &str) -> ! {
    eprintln!("crash child: {msg}");
    std::process::exit(2)
}

fn child_thread(db: &Db, out: &Mutex<std::io::Stdout>, iter: u64, t: u32) {
    let host = db.view().host().clone();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (iter << 8) ^ u64::from(t + 1));
    let prefix = format!("t{t}-");
    let mut alive: BTreeMap<u32, PartitionRecord> = db
        .view()
        .partitions()
        .unwrap_or_else(|e| fail_child(&format!("partitions: {e}")))
        .into_iter()
        .filter_map(|r| {
            let slot =
                r.id.as_str()
                    .strip_prefix(&prefix)?
                    .strip_prefix('s')?
                    .parse()
                    .ok()?;
            Some((slot, r))
        })
        .collect();
    for k in 0u64.. {
        let free: Vec<u32> = (0..SLOTS).filter(|s| !alive.contains_key(s)).collect();
        let roll = rng.below(10);
        let (changes, after): (Vec<Change>, Option<(u32, Option<PartitionRecord>)>) =
            if alive.len() < MAX_ALIVE && roll < 5 {
                let slot = free[rng.below(free.len() as u64) as usize];
                let id = part_name(t, slot);
                let record = PartitionRecord {
                    id: id.clone(),
                    definition: format!("{{\"slot\":{slot}}}"),
                    state: PartitionState::Defined,
                };
                let mut c = vec![Change::Create {
                    record: record.clone(),
                }];
                c.extend(
                    bundle(&host, t, slot)
                        .into_iter()
                        .map(|r| Change::Transfer {
                            resource: r,
                            before: Owner::Available,
                            after: Owner::Partition(id.clone()),
                        }),
                );
                c.push(Change::Share {
                    partition: id,
                    before_milli: 0,
                    after_milli: SHARE_MILLI,
                });
                (c, Some((slot, Some(record))))
            } else if !alive.is_empty() && roll < 7 {
                let (slot, rec) = alive
                    .iter()
                    .nth(rng.below(alive.len() as u64) as usize)
                    .map(|(s, r)| (*s, r.clone()))
                    .unwrap_or_else(|| fail_child("no partition"));
                let next = if rec.state == PartitionState::Running {
                    PartitionState::Stopped
                } else {
                    PartitionState::Running
                };
                let c = vec![Change::SetState {
                    partition: rec.id.clone(),
                    before: rec.state,
                    after: next,
                }];
                (
                    c,
                    Some((slot, Some(PartitionRecord { state: next, ..rec }))),
                )
            } else if !alive.is_empty() {
                let (slot, rec) = alive
                    .iter()
                    .nth(rng.below(alive.len() as u64) as usize)
                    .map(|(s, r)| (*s, r.clone()))
                    .unwrap_or_else(|| fail_child("no partition"));
                let mut c: Vec<Change> = bundle(&host, t, slot)
                    .into_iter()
                    .map(|r| Change::Transfer {
                        resource: r,
                        before: Owner::Partition(rec.id.clone()),
                        after: Owner::Available,
                    })
                    .collect();
                c.push(Change::Share {
                    partition: rec.id.clone(),
                    before_milli: SHARE_MILLI,
                    after_milli: 0,
                });
                c.push(Change::Destroy { record: rec });
                (c, Some((slot, None)))
            } else {
                continue;
            };
        let actor = format!("crash {iter}.{t}.{k} n={}", changes.len());
        let txid = match db.transact(&actor, &changes) {
            Ok(id) => id,
            Err(e) => fail_child(&format!("{actor}: {e}")),
        };
        match after {
            Some((slot, Some(rec))) => {
                alive.insert(slot, rec);
            }
            Some((slot, None)) => {
                alive.remove(&slot);
            }
            None => {}
        }
        let mut o = out.locked();
        // One write per line, so a kill can only cut the last line short.
        let line = format!("{} {actor}\n", txid.0);
        if o.write_all(line.as_bytes())
            .and_then(|()| o.flush())
            .is_err()
        {
            fail_child("stdout closed");
        }
    }
}

// ---------------------------------------------------------------- parent --

/// When the parent sends SIGKILL: this long after ...
enum KillAfter {
    /// ... spawning (start-up, open, genesis, first commits).
    Spawn(Duration),
    /// ... the child said its store is open.
    Ready(Duration),
    /// ... the child's first reported commit (inside the loop).
    FirstCommit(Duration),
}

/// Progress the reader thread passes to the parent.
#[derive(PartialEq)]
enum Progress {
    Ready,
    FirstCommit,
}

/// Runs one child, kills it at `at`, returns the complete reported lines.
fn run_and_kill(path: &Path, iter: u64, at: KillAfter) -> Vec<(u64, String)> {
    let exe = std::env::current_exe().expect("own executable");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, path)
        .env("CRASH_ITER", iter.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (progress_tx, progress_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    // A line cut short by the kill is not a report.
                    Ok(_) if buf.last() != Some(&b'\n') => break,
                    Ok(_) if buf == b"ready\n" => {
                        let _ = progress_tx.send(Progress::Ready);
                    }
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                        let (id, actor) = text.split_once(' ').expect("report line");
                        let mut lines = lines.lock().unwrap();
                        lines.push((id.parse().expect("txid"), actor.to_owned()));
                        if lines.len() == 1 {
                            let _ = progress_tx.send(Progress::FirstCommit);
                        }
                    }
                }
            }
        })
    };
    match at {
        KillAfter::Spawn(d) => std::thread::sleep(d),
        KillAfter::Ready(d) | KillAfter::FirstCommit(d) => {
            let want = if matches!(at, KillAfter::Ready(_)) {
                Progress::Ready
            } else {
                Progress::FirstCommit
            };
            // A child that dies early closes the channel; the exit status
            // check below then reports it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Ok(p) =
                progress_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if p == want {
                    break;
                }
            }
            std::thread::sleep(d);
        }
    }
    child.kill().expect("SIGKILL child");
    let status = child.wait().expect("wait child");
    reader.join().expect("reader thread");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "child ended before the kill with {status} (iteration {iter})"
    );
    let out = lines.lock().unwrap().clone();
    out
}

fn verify(path: &Path, reported: &[(u64, String)], iter: u64) -> u64 {
    let host = host();
    let db = Db::open(path, host.clone())
        .unwrap_or_else(|e| panic!("iteration {iter}: reopen failed: {e}"));
    db.check_invariants()
        .unwrap_or_else(|e| panic!("iteration {iter}: {e}"));
    db.check_replay()
        .unwrap_or_else(|e| panic!("iteration {iter}: {e}"));
    let live = db.snapshot().unwrap();

    // No partial transaction: each partition holds exactly its bundle and
    // share; every slot resource of a missing partition is available.
    let names: BTreeSet<PartitionId> = live.partitions().map(|r| r.id.clone()).collect();
    for t in 0..THREADS {
        for slot in 0..SLOTS {
            let id = part_name(t, slot);
            let present = names.contains(&id);
            let expect = if present {
                Owner::Partition(id.clone())
            } else {
                Owner::Available
            };
            for r in bundle(&host, t, slot) {
                assert_eq!(
                    live.owner(&r).unwrap(),
                    expect,
                    "iteration {iter}: partial transaction around {r}"
                );
            }
            let share = if present { SHARE_MILLI } else { 0 };
            assert_eq!(
                live.share(&id),
                share,
                "iteration {iter}: partial share of {id}"
            );
            if present {
                assert_eq!(
                    live.holdings(&id).resources().len(),
                    4,
                    "iteration {iter}: {id} holds extra"
                );
            }
        }
    }
    assert_eq!(names.len(), live.partitions().count());

    // Every transaction reported by this child is in the log, under its id, whole.
    let last = db.view().last_txid().unwrap();
    for (id, actor) in reported {
        assert!(
            TxId(*id) <= last,
            "iteration {iter}: reported {id} missing (log ends at {last})"
        );
        let entry = db.log(TxId(*id), 1).unwrap().pop().expect("log entry");
        check_entry(&entry, actor, iter);
    }
    last.0
}

fn check_entry(entry: &LogEntry, actor: &str, iter: u64) {
    let id = entry.txid;
    assert_eq!(
        entry.actor, actor,
        "iteration {iter}: {id} holds another transaction"
    );
    let n: usize = actor
        .rsplit_once("n=")
        .and_then(|(_, n)| n.parse().ok())
        .expect("n= in actor");
    match &entry.record {
        LogRecord::Transaction { changes } => {
            assert_eq!(changes.len(), n, "iteration {iter}: partial log entry {id}")
        }
        LogRecord::Genesis { .. } => panic!("iteration {iter}: {id} is the genesis entry"),
    }
}

/// At the end: every transaction reported by any child is still in the log.
fn verify_all(path: &Path, reported: &[(u64, String)]) {
    let db = Db::open(path, host()).expect("reopen");
    let last = db.view().last_txid().unwrap();
    let log: BTreeMap<u64, LogEntry> = db
        .log(TxId(1), last.0)
        .unwrap()
        .into_iter()
        .map(|e| (e.txid.0, e))
        .collect();
    for (id, actor) in reported {
        check_entry(
            log.get(id)
                .unwrap_or_else(|| panic!("reported {id} missing at the end")),
            actor,
            u64::MAX,
        );
    }
}

fn main() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&path));
        return;
    }
    // Enough of the libtest command line for `cargo test <filter>` and
    // cargo-nextest (`--list`, `--exact NAME`).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("crash_recovery: test");
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                *f == "crash_recovery"
            } else {
                "crash_recovery".contains(f.as_str())
            }
        });
    if !selected {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return;
    }
    let kills: u64 = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("running crash_recovery: {kills} SIGKILLs, CRASH_SEED={seed}");
    let start = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.db");
    let mut rng = Rng(seed | 1);
    let mut all_reported: Vec<(u64, String)> = Vec::new();
    let mut empty_runs = 0;
    let mut last = 0;
    for iter in 0..kills {
        // Mostly within the commit loop; sometimes during start-up and open.
        let at = match rng.below(10) {
            0 => KillAfter::Spawn(Duration::from_micros(rng.below(10_000))),
            1 => KillAfter::Ready(Duration::from_micros(rng.below(3_000))),
            _ => KillAfter::FirstCommit(Duration::from_micros(rng.below(20_000))),
        };
        let reported = run_and_kill(&path, iter, at);
        if reported.is_empty() {
            empty_runs += 1;
        }
        let now = verify(&path, &reported, iter);
        assert!(
            now >= last,
            "iteration {iter}: log shrank from {last} to {now}"
        );
        last = now;
        all_reported.extend(reported);
    }
    // A later crash must not have lost an earlier commit.
    verify_all(&path, &all_reported);
    println!(
        "crash_recovery: {kills} kills, {} reported commits verified ({} kills before the first report), log at tx {last}, {:.1}s",
        all_reported.len(),
        empty_runs,
        start.elapsed().as_secs_f64()
    );
    // Guard against a vacuous run (e.g. a child that never gets to commit).
    assert!(
        kills - empty_runs >= kills / 2,
        "only {} of {kills} kills happened after a reported commit",
        kills - empty_runs
    );
    println!("test crash_recovery ... ok");
    println!("\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}
