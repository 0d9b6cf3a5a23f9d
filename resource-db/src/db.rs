//! [`Db`]: the one writer (a thread that group-commits transactions), and
//! [`View`]: read-only access, in the writer's process or any other.

use partvisor_runtime::sync::MutexExt;
use std::ffi::OsString;
use std::fs::{File, OpenOptions as FileOpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::{HostConfig, HostConfigExt};
use crate::error::{Error, Rejection};
use crate::state::{check_extent, unknown, State};
use crate::store::{self, ApplyError};
use crate::LogEntry;
use crate::{Capacity, FreeCapacity, Holdings};
use crate::{Change, Extent, Owner, PartitionId, PartitionRecord, ResourceId, ResourceKind, TxId};

/// How commits reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=FULL`: the WAL is fsynced before a commit is
    /// acknowledged, so an acknowledged transaction survives power loss.
    #[default]
    Full,
    /// WAL with `synchronous=NORMAL`: acknowledged transactions survive a
    /// crash of the process but the last ones may be lost on power loss or an
    /// OS crash. For tests and bulk loading.
    Relaxed,
}

/// Options for [`Db::open_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Commit durability.
    pub durability: Durability,
    /// Most transactions committed together by one store commit.
    pub max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Full,
            max_batch: 256,
        }
    }
}

/// Counters of the writer thread, for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Store commits (one fsync each with [`Durability::Full`]).
    pub commits: u64,
    /// Transactions committed.
    pub committed: u64,
    /// Transactions refused (rejections and failed commits).
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    committed: AtomicU64,
    failed: AtomicU64,
}

struct Request {
    actor: String,
    changes: Vec<Change>,
    reply: mpsc::SyncSender<Result<TxId, Error>>,
}

/// The resource database, opened for writing. At most one `Db` per store
/// exists on a host at a time (enforced with an exclusive `flock` on
/// `<path>-lock`); everything else uses a [`View`].
///
/// `Db` is `Send + Sync`: share it (e.g. in an `Arc`) between the
/// coordinator's threads. All transactions go through one writer thread,
/// which commits whatever transactions are waiting as one store transaction
/// (group commit, each transaction in its own savepoint so a rejected one
/// leaves the others intact) and answers each caller after the commit is
/// durable.
pub struct Db {
    view: View,
    stats: Arc<Counters>,
    sender: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    _lock: File,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn lock_exclusive(path: &Path) -> Result<File, Error> {
    let lock_path = with_suffix(path, "-lock");
    let file = FileOpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Io {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: `file` is an open descriptor owned by this function for the
    // duration of the call; flock does not touch memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked {
                path: path.to_owned(),
                lock: lock_path,
            });
        }
        return Err(Error::Io {
            path: lock_path,
            source: err,
        });
    }
    Ok(file)
}

impl Db {
    /// Opens (creating if needed) the store at `path` with full durability.
    /// A new store is initialised from `host`; an existing one must have been
    /// created with an equal `host`.
    pub fn open(path: impl AsRef<Path>, host: HostConfig) -> Result<Db, Error> {
        Db::open_with(path, host, Options::default())
    }

    /// [`Db::open`] with explicit options.
    pub fn open_with(
        path: impl AsRef<Path>,
        host: HostConfig,
        options: Options,
    ) -> Result<Db, Error> {
        let path = path.as_ref();
        host.validate()?;
        let lock = lock_exclusive(path)?;
        let mut conn = Connection::open(path).map_err(Error::store("opening the store"))?;
        let sync = match options.durability {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        };
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(Error::store("enabling WAL"))?;
        conn.pragma_update(None, "synchronous", sync)
            .map_err(Error::store("setting synchronous"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(Error::store("setting busy timeout"))?;
        conn.set_prepared_statement_cache_capacity(64);
        let differing = store::init(&mut conn, &host)?;
        if !differing.is_empty() {
            return Err(Error::HostConfigChanged {
                path: path.to_owned(),
                fields: differing.join(", "),
            });
        }
        let view = View::open(path)?;
        let (sender, receiver) = mpsc::channel::<Request>();
        let max_batch = options.max_batch.max(1);
        let stats = Arc::new(Counters::default());
        let writer_stats = Arc::clone(&stats);
        let writer = std::thread::Builder::new()
            .name("resource-db-writer".into())
            .spawn(move || writer_loop(conn, host, receiver, max_batch, writer_stats))
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Db {
            view,
            stats,
            sender: Some(sender),
            writer: Some(writer),
            _lock: lock,
        })
    }

    /// The host configuration stored in the store at `path`.
    pub fn stored_host_config(path: impl AsRef<Path>) -> Result<HostConfig, Error> {
        Ok(View::open(path)?.host.clone())
    }

    /// Applies `changes` as one transaction on behalf of `actor`. Returns the
    /// transaction's id once it is committed (durably with
    /// [`Durability::Full`]). On any error nothing of it was applied; a
    /// refused change gives [`Error::Rejected`] naming its index and the rule.
    pub fn transact(&self, actor: &str, changes: &[Change]) -> Result<TxId, Error> {
        let sender = self.sender.as_ref().ok_or(Error::WriterGone)?;
        let (reply, answer) = mpsc::sync_channel(1);
        sender
            .send(Request {
                actor: actor.to_owned(),
                changes: changes.to_vec(),
                reply,
            })
            .map_err(|_| Error::WriterGone)?;
        answer.recv().map_err(|_| Error::WriterGone)?
    }

    /// Writer counters since open: commits vs. transactions shows how many
    /// transactions each group commit carried.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.stats.commits.load(Ordering::Relaxed),
            committed: self.stats.committed.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
        }
    }

    /// Read access through this process's read connection.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// See [`View::owner`].
    pub fn owner(&self, resource: &ResourceId) -> Result<Owner, Error> {
        self.view.owner(resource)
    }

    /// See [`View::holdings`].
    pub fn holdings(&self, partition: &PartitionId) -> Result<Holdings, Error> {
        self.view.holdings(partition)
    }

    /// See [`View::free`].
    pub fn free(&self) -> Result<FreeCapacity, Error> {
        self.view.free()
    }

    /// See [`View::partition`].
    pub fn partition(&self, id: &PartitionId) -> Result<Option<PartitionRecord>, Error> {
        self.view.partition(id)
    }

    /// See [`View::snapshot`].
    pub fn snapshot(&self) -> Result<State, Error> {
        self.view.snapshot()
    }

    /// See [`View::replay`].
    pub fn replay(&self) -> Result<State, Error> {
        self.view.replay()
    }

    /// See [`View::check_invariants`].
    pub fn check_invariants(&self) -> Result<(), Error> {
        self.view.check_invariants()
    }

    /// See [`View::check_replay`].
    pub fn check_replay(&self) -> Result<(), Error> {
        self.view.check_replay()
    }

    /// See [`View::log`].
    pub fn log(&self, from: TxId, limit: u64) -> Result<Vec<LogEntry>, Error> {
        self.view.log(from, limit)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop after the queued requests.
        self.sender.take();
        if let Some(w) = self.writer.take() {
            if w.join().is_err() {
                tracing::error!("resource-db writer thread panicked");
            }
        }
    }
}

fn writer_loop(
    conn: Connection,
    host: HostConfig,
    receiver: mpsc::Receiver<Request>,
    max_batch: usize,
    stats: Arc<Counters>,
) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let results = commit_batch(&conn, &host, &batch);
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        if ok > 0 {
            stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        stats.committed.fetch_add(ok, Ordering::Relaxed);
        stats
            .failed
            .fetch_add(results.len() as u64 - ok, Ordering::Relaxed);
        for (req, res) in batch.into_iter().zip(results) {
            // A caller that went away no longer needs the answer.
            let _ = req.reply.send(res);
        }
    }
}

/// Commits `batch` as one store transaction, each request in its own
/// savepoint. Returns one result per request.
fn commit_batch(
    conn: &Connection,
    host: &HostConfig,
    batch: &[Request],
) -> Vec<Result<TxId, Error>> {
    let fail_all = |what: &str, e: &dyn std::fmt::Display| {
        batch
            .iter()
            .map(|_| Err(Error::CommitFailed(format!("{what}: {e}"))))
            .collect()
    };
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        return fail_all("begin", &e);
    }
    let mut results: Vec<Result<TxId, Error>> = Vec::with_capacity(batch.len());
    for req in batch {
        let attempt = conn
            .execute_batch("SAVEPOINT tx")
            .map_err(|e| (None, ApplyError::Store(e)))
            .and_then(|()| store::apply_transaction(conn, host, &req.actor, &req.changes));
        match attempt {
            Ok(txid) => {
                if let Err(e) = conn.execute_batch("RELEASE tx") {
                    let _ = conn.execute_batch("ROLLBACK");
                    return fail_all("release savepoint", &e);
                }
                results.push(Ok(txid));
            }
            Err((index, ApplyError::Rejected(reason))) => {
                if let Err(e) = conn.execute_batch("ROLLBACK TO tx; RELEASE tx") {
                    let _ = conn.execute_batch("ROLLBACK");
                    return fail_all("roll back savepoint", &e);
                }
                results.push(Err(Error::Rejected {
                    index: index.unwrap_or(0),
                    reason,
                }));
            }
            Err((_, ApplyError::Store(e))) => {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "store error applying a transaction; batch rolled back");
                // Rejections stand; transactions applied earlier in the batch
                // and those not yet attempted were rolled back with it.
                let why =
                    format!("batch rolled back after a store error in another transaction: {e}");
                let done = results.len();
                let mut out: Vec<Result<TxId, Error>> = results
                    .into_iter()
                    .map(|r| r.and_then(|_| Err(Error::CommitFailed(why.clone()))))
                    .collect();
                out.push(Err(Error::Store {
                    context: "applying a transaction",
                    source: e,
                }));
                out.extend(
                    batch[done + 1..]
                        .iter()
                        .map(|_| Err(Error::CommitFailed(why.clone()))),
                );
                return out;
            }
        }
    }
    if results.iter().any(Result::is_ok) {
        if let Err(e) = conn.execute_batch("COMMIT") {
            let _ = conn.execute_batch("ROLLBACK");
            return results
                .into_iter()
                .map(|r| r.and_then(|_| Err(Error::CommitFailed(format!("commit: {e}")))))
                .collect();
        }
    } else if let Err(e) = conn.execute_batch("ROLLBACK") {
        tracing::warn!(error = %e, "rollback of an all-rejected batch failed");
    }
    results
}

/// Read-only access to a store: the read API of the database. Opened by
/// [`Db`] for its own process, or with [`View::open`] by any other process
/// (seed 001: "others get read-only views"). Each method reads one
/// consistent committed state.
pub struct View {
    conn: Mutex<Connection>,
    host: HostConfig,
}

impl View {
    /// Opens the store at `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<View, Error> {
        let conn = Connection::open_with_flags(
            path.as_ref(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(Error::store("opening the store read-only"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(Error::store("setting busy timeout"))?;
        conn.set_prepared_statement_cache_capacity(32);
        let host = store::stored_host(&conn)?;
        Ok(View {
            conn: Mutex::new(conn),
            host,
        })
    }

    /// The host configuration of this store.
    pub fn host(&self) -> &HostConfig {
        &self.host
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done state behind:
        // the connection only ever runs read transactions.
        self.conn.locked()
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let conn = self.lock();
        let tx = conn
            .unchecked_transaction()
            .map_err(Error::store("starting a read transaction"))?;
        let out = f(&tx)?;
        tx.finish()
            .map_err(Error::store("ending a read transaction"))?;
        Ok(out)
    }

    /// Who owns `resource`. A memory extent must lie inside one owner's
    /// extent ([`Rejection::MixedOwners`] otherwise).
    pub fn owner(&self, resource: &ResourceId) -> Result<Owner, Error> {
        let ctx = "reading an owner";
        self.read(|c| {
            let text: Option<String> = match resource {
                ResourceId::Memory(e) => {
                    check_extent(&self.host, e)?;
                    let row: Option<(i64, i64, String)> = c
                        .prepare_cached(
                            "SELECT start_mib, len_mib, owner FROM memory WHERE start_mib <= ?1
                             ORDER BY start_mib DESC LIMIT 1",
                        )
                        .and_then(|mut s| {
                            s.query_row([e.start_mib as i64], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            })
                            .optional()
                        })
                        .map_err(Error::store(ctx))?;
                    match row {
                        Some((s, l, _)) if ((s + l) as u64) < e.end_mib() => {
                            return Err(Rejection::MixedOwners {
                                resource: resource.clone(),
                            }
                            .into())
                        }
                        other => other.map(|(_, _, o)| o),
                    }
                }
                _ => {
                    if !self.host.contains(resource) {
                        return Err(unknown(resource).into());
                    }
                    c.prepare_cached("SELECT owner FROM units WHERE kind = ?1 AND key = ?2")
                        .and_then(|mut s| {
                            s.query_row(
                                params![resource.kind().as_str(), resource.unit_key()],
                                |r| r.get(0),
                            )
                            .optional()
                        })
                        .map_err(Error::store(ctx))?
                }
            };
            let text = text.ok_or_else(|| unknown(resource))?;
            text.parse::<Owner>()
                .map_err(|e| Error::Corrupt(format!("owner of {resource}: {e}")))
        })
    }

    /// What `partition` holds. [`Rejection::UnknownPartition`] if it does not exist.
    pub fn holdings(&self, partition: &PartitionId) -> Result<Holdings, Error> {
        let ctx = "reading holdings";
        self.read(|c| {
            if store::read_partitions(c, Some(partition))?.is_empty() {
                return Err(Rejection::UnknownPartition {
                    partition: partition.clone(),
                }
                .into());
            }
            let mut h = Holdings::default();
            store::for_each_row(
                c,
                ctx,
                "SELECT kind, key FROM units WHERE owner = ?1",
                [partition.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
                |(kind, key): (String, String)| {
                    let id = ResourceId::from_unit(&kind, &key)
                        .ok_or_else(|| Error::Corrupt(format!("units row {kind} {key}")))?;
                    h.add(id);
                    Ok(())
                },
            )?;
            store::for_each_row(
                c,
                ctx,
                "SELECT start_mib, len_mib FROM memory WHERE owner = ?1",
                [partition.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
                |(s, l): (i64, i64)| {
                    let bad = |_| Error::Corrupt(format!("memory row ({s}, {l})"));
                    h.memory.push(Extent::new(
                        u64::try_from(s).map_err(bad)?,
                        u64::try_from(l).map_err(bad)?,
                    ));
                    Ok(())
                },
            )?;
            let share: Option<i64> = c
                .prepare_cached("SELECT milli FROM shares WHERE partition = ?1")
                .and_then(|mut s| s.query_row([partition.as_str()], |r| r.get(0)).optional())
                .map_err(Error::store(ctx))?;
            h.cpu_share_milli = u32::try_from(share.unwrap_or(0))
                .map_err(|_| Error::Corrupt(format!("share of {partition}: {share:?}")))?;
            h.sort();
            Ok(h)
        })
    }

    /// Total and free capacity per kind.
    pub fn free(&self) -> Result<FreeCapacity, Error> {
        let ctx = "reading free capacity";
        self.read(|c| {
            let mut f = FreeCapacity::default();
            let mut pool_cpus = 0;
            store::for_each_row(
                c,
                ctx,
                "SELECT kind, count(*), sum(owner = 'available'), sum(owner = 'shared-pool')
                     FROM units GROUP BY kind",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                |(kind, total, free, pool): (String, i64, i64, i64)| {
                    let k = ResourceKind::from_name(&kind)
                        .ok_or_else(|| Error::Corrupt(format!("unknown resource kind {kind:?}")))?;
                    *f.kind_mut(k) = Capacity { total: total as u64, free: free as u64 };
                    if kind == "cpu" {
                        pool_cpus = pool as u64;
                    }
                    Ok(())
                },
            )?;
            let (total, free): (i64, i64) = c
                .query_row(
                    "SELECT coalesce(sum(len_mib), 0), coalesce(sum(CASE WHEN owner = 'available' THEN len_mib END), 0) FROM memory",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(Error::store(ctx))?;
            f.memory_mib = Capacity { total: total as u64, free: free as u64 };
            let used: i64 = c
                .query_row("SELECT coalesce(sum(milli), 0) FROM shares", [], |r| r.get(0))
                .map_err(Error::store(ctx))?;
            let cap = pool_cpus * 1000;
            f.shared_pool_milli = Capacity { total: cap, free: cap.saturating_sub(used as u64) };
            Ok(f)
        })
    }

    /// One partition's record.
    pub fn partition(&self, id: &PartitionId) -> Result<Option<PartitionRecord>, Error> {
        self.read(|c| Ok(store::read_partitions(c, Some(id))?.into_iter().next()))
    }

    /// All partitions, by name.
    pub fn partitions(&self) -> Result<Vec<PartitionRecord>, Error> {
        self.read(|c| store::read_partitions(c, None))
    }

    /// The live tables, read whole.
    pub fn snapshot(&self) -> Result<State, Error> {
        self.read(|c| store::load_live(c, &self.host))
    }

    /// The state rebuilt from the audit log alone.
    pub fn replay(&self) -> Result<State, Error> {
        self.read(store::replay)
    }

    /// Checks the invariants on the live tables: SQLite's own consistency
    /// check, then [`State::invariant_violations`].
    pub fn check_invariants(&self) -> Result<(), Error> {
        self.read(|c| {
            let quick: String = c
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(Error::store("running quick_check"))?;
            let mut v = Vec::new();
            if quick != "ok" {
                v.push(format!("sqlite quick_check: {quick}"));
            }
            v.extend(store::load_live(c, &self.host)?.invariant_violations());
            if v.is_empty() {
                Ok(())
            } else {
                Err(Error::InvariantsViolated(v))
            }
        })
    }

    /// Checks that replaying the audit log gives exactly the live tables
    /// (both read in one read transaction).
    pub fn check_replay(&self) -> Result<(), Error> {
        self.read(|c| {
            let live = store::load_live(c, &self.host)?;
            let replayed = store::replay(c)?;
            if live == replayed {
                Ok(())
            } else {
                Err(Error::Corrupt(format!(
                    "live tables differ from the replay of the audit log (live first): {}",
                    live.differences(&replayed, 5).join("; ")
                )))
            }
        })
    }

    /// Up to `limit` audit log entries from `from` on.
    pub fn log(&self, from: TxId, limit: u64) -> Result<Vec<LogEntry>, Error> {
        self.read(|c| {
            let mut out = Vec::new();
            store::for_each_log_entry(c, from.0, Some(limit), |e| {
                out.push(e);
                Ok(())
            })?;
            Ok(out)
        })
    }

    /// Id of the last committed transaction.
    pub fn last_txid(&self) -> Result<TxId, Error> {
        self.read(|c| {
            let n: i64 = c
                .query_row("SELECT coalesce(max(txid), 0) FROM audit_log", [], |r| {
                    r.get(0)
                })
                .map_err(Error::store("reading the last txid"))?;
            Ok(TxId(n as u64))
        })
    }
}
