//! The SQLite side: schema, the live-table update path used by transactions,
//! reading the live tables, and reading the audit log.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::config::HostConfig;
use crate::error::{Error, Rejection};
use crate::state::{check_extent, unknown, State};
use crate::{
    Change, Extent, LogEntry, LogRecord, Owner, PartitionId, PartitionRecord, PartitionState,
    ResourceId, ResourceKind, TxId,
};

/// Schema version stored in `meta`.
const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
-- Live ownership of every resource except memory: exactly one row per resource.
CREATE TABLE IF NOT EXISTS units(
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY(kind, key)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS units_by_owner ON units(owner, kind);
-- Live ownership of memory: maximal extents tiling [0, budget).
CREATE TABLE IF NOT EXISTS memory(
    start_mib INTEGER PRIMARY KEY,
    len_mib INTEGER NOT NULL CHECK (len_mib > 0),
    owner TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS memory_by_owner ON memory(owner);
-- Shares of the shared CPU pool.
CREATE TABLE IF NOT EXISTS shares(
    partition TEXT PRIMARY KEY,
    milli INTEGER NOT NULL CHECK (milli > 0)
) STRICT;
CREATE TABLE IF NOT EXISTS partitions(
    id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    state TEXT NOT NULL
) STRICT;
-- The audit log: one row per committed transaction, with before and after
-- images of every change. Written in the same store transaction as the live
-- tables. Never updated or deleted.
CREATE TABLE IF NOT EXISTS audit_log(
    txid INTEGER PRIMARY KEY,
    time_unix_ns INTEGER NOT NULL,
    actor TEXT NOT NULL,
    record TEXT NOT NULL
) STRICT;
";

/// Failure while applying one change on the live tables.
pub(crate) enum ApplyError {
    Rejected(Rejection),
    Store(rusqlite::Error),
}

impl From<Rejection> for ApplyError {
    fn from(r: Rejection) -> Self {
        ApplyError::Rejected(r)
    }
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Store(e)
    }
}

type Apply<T> = Result<T, ApplyError>;

fn parse_state(s: &str) -> Option<PartitionState> {
    Some(match s {
        "defined" => PartitionState::Defined,
        "starting" => PartitionState::Starting,
        "running" => PartitionState::Running,
        "stopping" => PartitionState::Stopping,
        "stopped" => PartitionState::Stopped,
        "failed" => PartitionState::Failed,
        "unresponsive" => PartitionState::Unresponsive,
        _ => return None,
    })
}

fn i64_of(v: u64) -> i64 {
    // Memory values are bounded by the budget, which `HostConfig::validate`
    // keeps below i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Creates the schema, and on an empty store writes the genesis state and
/// log entry. On an existing store checks the stored configuration is `host`.
/// Returns the differing field names when it is not.
pub(crate) fn init(conn: &mut Connection, host: &HostConfig) -> Result<Vec<&'static str>, Error> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::store("starting the schema transaction"))?;
    tx.execute_batch(SCHEMA)
        .map_err(Error::store("creating the schema"))?;
    let stored: Option<String> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'host_config'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::store("reading the stored host configuration"))?;
    if let Some(text) = stored {
        let stored: HostConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Corrupt(format!("stored host configuration: {e}")))?;
        return Ok(stored.differing_fields(host));
    }
    let put_meta = |k: &str, v: &str| {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)",
            params![k, v],
        )
        .map_err(Error::store("writing meta"))
    };
    put_meta("schema_version", SCHEMA_VERSION)?;
    put_meta("host_config", &to_json(host)?)?;
    let genesis = State::genesis(host);
    {
        let mut ins = tx
            .prepare("INSERT INTO units(kind, key, owner) VALUES (?1, ?2, ?3)")
            .map_err(Error::store("preparing genesis"))?;
        for (r, o) in &genesis.units {
            let key = r.unit_key().unwrap_or_default();
            ins.execute(params![r.kind().as_str(), key, o.to_string()])
                .map_err(Error::store("writing genesis units"))?;
        }
        for (s, (l, o)) in &genesis.memory {
            tx.execute(
                "INSERT INTO memory(start_mib, len_mib, owner) VALUES (?1, ?2, ?3)",
                params![i64_of(*s), i64_of(*l), o.to_string()],
            )
            .map_err(Error::store("writing genesis memory"))?;
        }
    }
    let record = LogRecord::Genesis { host: host.clone() };
    tx.execute(
        "INSERT INTO audit_log(txid, time_unix_ns, actor, record) VALUES (1, ?1, 'genesis', ?2)",
        params![now_unix_ns(), to_json(&record)?],
    )
    .map_err(Error::store("writing the genesis log entry"))?;
    tx.commit().map_err(Error::store("committing genesis"))?;
    Ok(Vec::new())
}

/// Serializes to JSON text.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| Error::Corrupt(format!("cannot encode: {e}")))
}

/// Reads the stored host configuration.
pub(crate) fn stored_host(conn: &Connection) -> Result<HostConfig, Error> {
    let text: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'host_config'",
            [],
            |r| r.get(0),
        )
        .map_err(Error::store("reading the stored host configuration"))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Corrupt(format!("stored host configuration: {e}")))
}

// ---------------------------------------------------------------------------
// Live-table update path (the writer thread).
// ---------------------------------------------------------------------------

/// Applies `changes` to the live tables and appends the audit entry. The
/// caller wraps this in a savepoint and rolls it back on error.
pub(crate) fn apply_transaction(
    conn: &Connection,
    host: &HostConfig,
    actor: &str,
    changes: &[Change],
) -> Result<TxId, (Option<usize>, ApplyError)> {
    if changes.is_empty() {
        return Err((None, ApplyError::Rejected(Rejection::EmptyTransaction)));
    }
    for (i, c) in changes.iter().enumerate() {
        apply_change(conn, host, c).map_err(|e| (Some(i), e))?;
    }
    let record = serde_json::to_string(&LogRecord::Transaction {
        changes: changes.to_vec(),
    })
    .map_err(|e| {
        (
            None,
            ApplyError::Store(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
        )
    })?;
    let mut ins = conn
        .prepare_cached("INSERT INTO audit_log(time_unix_ns, actor, record) VALUES (?1, ?2, ?3)")
        .map_err(|e| (None, e.into()))?;
    ins.execute(params![now_unix_ns(), actor, record])
        .map_err(|e| (None, e.into()))?;
    let id = conn.last_insert_rowid();
    Ok(TxId(u64::try_from(id).unwrap_or(0)))
}

fn partition_exists(conn: &Connection, p: &PartitionId) -> Apply<bool> {
    let mut st = conn.prepare_cached("SELECT 1 FROM partitions WHERE id = ?1")?;
    Ok(st.exists([p.as_str()])?)
}

fn require_partition(conn: &Connection, owner: &Owner) -> Apply<()> {
    if let Owner::Partition(p) = owner {
        if !partition_exists(conn, p)? {
            return Err(Rejection::UnknownPartition {
                partition: p.clone(),
            }
            .into());
        }
    }
    Ok(())
}

fn parse_owner(text: &str) -> Apply<Owner> {
    text.parse().map_err(|_| {
        ApplyError::Store(rusqlite::Error::InvalidColumnType(
            0,
            format!("owner {text:?}"),
            rusqlite::types::Type::Text,
        ))
    })
}

fn pool_capacity_milli(conn: &Connection) -> Apply<u64> {
    let mut st = conn.prepare_cached(
        "SELECT count(*) FROM units WHERE owner = 'shared-pool' AND kind = 'cpu'",
    )?;
    let n: i64 = st.query_row([], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0) * 1000)
}

fn shares_total_milli(conn: &Connection) -> Apply<u64> {
    let mut st = conn.prepare_cached("SELECT coalesce(sum(milli), 0) FROM shares")?;
    let n: i64 = st.query_row([], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn apply_change(conn: &Connection, host: &HostConfig, change: &Change) -> Apply<()> {
    match change {
        Change::Transfer {
            resource,
            before,
            after,
        } => {
            if *after == Owner::SharedPool && resource.kind() != ResourceKind::Cpu {
                return Err(Rejection::InvalidOwner {
                    resource: resource.clone(),
                    owner: after.clone(),
                }
                .into());
            }
            match resource {
                ResourceId::Memory(e) => {
                    check_extent(host, e)?;
                    require_partition(conn, after)?;
                    transfer_memory(conn, *e, before, after)
                }
                _ => {
                    if !host.contains(resource) {
                        return Err(unknown(resource).into());
                    }
                    require_partition(conn, after)?;
                    transfer_unit(conn, resource, before, after)
                }
            }
        }
        Change::Share {
            partition,
            before_milli,
            after_milli,
        } => {
            if !partition_exists(conn, partition)? {
                return Err(Rejection::UnknownPartition {
                    partition: partition.clone(),
                }
                .into());
            }
            let mut get = conn.prepare_cached("SELECT milli FROM shares WHERE partition = ?1")?;
            let actual: i64 = get
                .query_row([partition.as_str()], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let actual = u32::try_from(actual).unwrap_or(u32::MAX);
            if actual != *before_milli {
                return Err(Rejection::StaleShare {
                    partition: partition.clone(),
                    expected_milli: *before_milli,
                    actual_milli: actual,
                }
                .into());
            }
            if *after_milli > actual {
                let requested =
                    shares_total_milli(conn)? - u64::from(actual) + u64::from(*after_milli);
                let capacity = pool_capacity_milli(conn)?;
                if requested > capacity {
                    return Err(Rejection::OverCapacity {
                        requested_milli: requested,
                        capacity_milli: capacity,
                    }
                    .into());
                }
            }
            if *after_milli == 0 {
                conn.prepare_cached("DELETE FROM shares WHERE partition = ?1")?
                    .execute([partition.as_str()])?;
            } else {
                conn.prepare_cached(
                    "INSERT INTO shares(partition, milli) VALUES (?1, ?2)
                     ON CONFLICT(partition) DO UPDATE SET milli = excluded.milli",
                )?
                .execute(params![partition.as_str(), i64::from(*after_milli)])?;
            }
            Ok(())
        }
        Change::Create { record } => {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&record.definition) {
                return Err(Rejection::InvalidDefinition {
                    partition: record.id.clone(),
                    reason: e.to_string(),
                }
                .into());
            }
            if partition_exists(conn, &record.id)? {
                return Err(Rejection::PartitionExists {
                    partition: record.id.clone(),
                }
                .into());
            }
            conn.prepare_cached(
                "INSERT INTO partitions(id, definition, state) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                record.id.as_str(),
                record.definition,
                record.state.as_str()
            ])?;
            Ok(())
        }
        Change::SetState {
            partition,
            before,
            after,
        } => {
            let mut get = conn.prepare_cached("SELECT state FROM partitions WHERE id = ?1")?;
            let actual: Option<String> = get
                .query_row([partition.as_str()], |r| r.get(0))
                .optional()?;
            let actual = actual.ok_or_else(|| Rejection::UnknownPartition {
                partition: partition.clone(),
            })?;
            let actual = parse_state(&actual).ok_or_else(|| {
                ApplyError::Store(rusqlite::Error::InvalidColumnType(
                    0,
                    format!("state {actual:?}"),
                    rusqlite::types::Type::Text,
                ))
            })?;
            if actual != *before {
                return Err(Rejection::StaleState {
                    partition: partition.clone(),
                    expected: *before,
                    actual,
                }
                .into());
            }
            conn.prepare_cached("UPDATE partitions SET state = ?2 WHERE id = ?1")?
                .execute(params![partition.as_str(), after.as_str()])?;
            Ok(())
        }
        Change::Destroy { record } => {
            let p = &record.id;
            let mut get =
                conn.prepare_cached("SELECT definition, state FROM partitions WHERE id = ?1")?;
            let stored: Option<(String, String)> = get
                .query_row([p.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (definition, state) = stored.ok_or_else(|| Rejection::UnknownPartition {
                partition: p.clone(),
            })?;
            if definition != record.definition || state != record.state.as_str() {
                return Err(Rejection::StaleRecord {
                    partition: p.clone(),
                }
                .into());
            }
            let mut unit =
                conn.prepare_cached("SELECT kind, key FROM units WHERE owner = ?1 LIMIT 1")?;
            if let Some((kind, key)) = unit
                .query_row([p.as_str()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .optional()?
            {
                return Err(Rejection::PartitionNotEmpty {
                    partition: p.clone(),
                    what: format!("{kind} {key}"),
                }
                .into());
            }
            let mut mem = conn
                .prepare_cached("SELECT start_mib, len_mib FROM memory WHERE owner = ?1 LIMIT 1")?;
            if let Some((s, l)) = mem
                .query_row([p.as_str()], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?
            {
                let e = Extent::new(s as u64, l as u64);
                return Err(Rejection::PartitionNotEmpty {
                    partition: p.clone(),
                    what: format!("memory {e}"),
                }
                .into());
            }
            let mut share = conn.prepare_cached("SELECT milli FROM shares WHERE partition = ?1")?;
            if let Some(m) = share
                .query_row([p.as_str()], |r| r.get::<_, i64>(0))
                .optional()?
            {
                return Err(Rejection::PartitionNotEmpty {
                    partition: p.clone(),
                    what: format!("a shared-pool share of {m} milli-CPUs"),
                }
                .into());
            }
            conn.prepare_cached("DELETE FROM partitions WHERE id = ?1")?
                .execute([p.as_str()])?;
            Ok(())
        }
    }
}

fn transfer_unit(
    conn: &Connection,
    resource: &ResourceId,
    before: &Owner,
    after: &Owner,
) -> Apply<()> {
    let kind = resource.kind().as_str();
    let key = resource.unit_key().unwrap_or_default();
    let mut get = conn.prepare_cached("SELECT owner FROM units WHERE kind = ?1 AND key = ?2")?;
    let actual: Option<String> = get
        .query_row([kind, key.as_str()], |r| r.get(0))
        .optional()?;
    let actual = parse_owner(&actual.ok_or_else(|| unknown(resource))?)?;
    if actual != *before {
        return Err(Rejection::StaleOwner {
            resource: resource.clone(),
            expected: before.clone(),
            actual,
        }
        .into());
    }
    conn.prepare_cached("UPDATE units SET owner = ?3 WHERE kind = ?1 AND key = ?2")?
        .execute(params![kind, key, after.to_string()])?;
    if *before == Owner::SharedPool && *after != Owner::SharedPool {
        let requested = shares_total_milli(conn)?;
        let capacity = pool_capacity_milli(conn)?;
        if requested > capacity {
            return Err(Rejection::OverCapacity {
                requested_milli: requested,
                capacity_milli: capacity,
            }
            .into());
        }
    }
    Ok(())
}

/// Memory on the live tables: verify, split the extents at both ends of the
/// range, re-own the rows inside it, then merge equal-owner neighbours.
fn transfer_memory(conn: &Connection, e: Extent, before: &Owner, after: &Owner) -> Apply<()> {
    let (s, end) = (i64_of(e.start_mib), i64_of(e.end_mib()));
    {
        let mut rows = conn.prepare_cached(
            "SELECT start_mib, len_mib, owner FROM memory
             WHERE start_mib >= coalesce((SELECT max(start_mib) FROM memory WHERE start_mib <= ?1), 0)
               AND start_mib < ?2
             ORDER BY start_mib",
        )?;
        let mut q = rows.query(params![s, end])?;
        while let Some(r) = q.next()? {
            let (ks, kl, owner): (i64, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let owner = parse_owner(&owner)?;
            if owner != *before {
                let (os, oe) = (ks.max(s), (ks + kl).min(end));
                return Err(Rejection::StaleOwner {
                    resource: ResourceId::Memory(Extent::new(os as u64, (oe - os) as u64)),
                    expected: before.clone(),
                    actual: owner,
                }
                .into());
            }
        }
    }
    split_memory_at(conn, s)?;
    split_memory_at(conn, end)?;
    conn.prepare_cached("UPDATE memory SET owner = ?3 WHERE start_mib >= ?1 AND start_mib < ?2")?
        .execute(params![s, end, after.to_string()])?;
    merge_memory_around(conn, s, end)
}

/// Splits the extent that strictly contains `at`, if any, into two rows.
fn split_memory_at(conn: &Connection, at: i64) -> Apply<()> {
    let mut get = conn.prepare_cached(
        "SELECT start_mib, len_mib, owner FROM memory WHERE start_mib < ?1 ORDER BY start_mib DESC LIMIT 1",
    )?;
    let row: Option<(i64, i64, String)> = get
        .query_row([at], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((ks, kl, owner)) = row {
        if ks + kl > at {
            conn.prepare_cached("UPDATE memory SET len_mib = ?2 WHERE start_mib = ?1")?
                .execute(params![ks, at - ks])?;
            conn.prepare_cached(
                "INSERT INTO memory(start_mib, len_mib, owner) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![at, ks + kl - at, owner])?;
        }
    }
    Ok(())
}

/// Merges runs of adjacent equal-owner rows from the row before `s` to the row
/// starting at `end`.
fn merge_memory_around(conn: &Connection, s: i64, end: i64) -> Apply<()> {
    let rows: Vec<(i64, i64, String)> = {
        let mut st = conn.prepare_cached(
            "SELECT start_mib, len_mib, owner FROM memory
             WHERE start_mib >= coalesce((SELECT max(start_mib) FROM memory WHERE start_mib < ?1), ?1)
               AND start_mib <= ?2
             ORDER BY start_mib",
        )?;
        let it = st.query_map(params![s, end], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        it.collect::<Result<_, _>>()?
    };
    let mut run: Option<(i64, i64, String)> = None;
    for (ks, kl, owner) in rows {
        match &mut run {
            Some((rs, rl, ro)) if *ro == owner && *rs + *rl == ks => {
                *rl += kl;
                conn.prepare_cached("DELETE FROM memory WHERE start_mib = ?1")?
                    .execute([ks])?;
                conn.prepare_cached("UPDATE memory SET len_mib = ?2 WHERE start_mib = ?1")?
                    .execute(params![*rs, *rl])?;
            }
            _ => run = Some((ks, kl, owner)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading the live tables and the log.
// ---------------------------------------------------------------------------

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {e}"))
}

/// Runs `sql` with `params` and hands each row, read by `get`, to `each`;
/// a failing read is [`Error::Store`] with `ctx`.
pub(crate) fn for_each_row<T>(
    conn: &Connection,
    ctx: &'static str,
    sql: &str,
    params: impl rusqlite::Params,
    get: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    mut each: impl FnMut(T) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut st = conn.prepare_cached(sql).map_err(Error::store(ctx))?;
    let mut q = st.query(params).map_err(Error::store(ctx))?;
    while let Some(r) = q.next().map_err(Error::store(ctx))? {
        each(get(r).map_err(Error::store(ctx))?)?;
    }
    Ok(())
}

/// Loads the live tables into a [`State`].
pub(crate) fn load_live(conn: &Connection, host: &HostConfig) -> Result<State, Error> {
    let ctx = "reading the live tables";
    let mut units = BTreeMap::new();
    for_each_row(
        conn,
        ctx,
        "SELECT kind, key, owner FROM units",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        |(kind, key, owner): (String, String, String)| {
            let id = ResourceId::from_unit(&kind, &key)
                .ok_or_else(|| corrupt("units row", format!("{kind} {key}")))?;
            let owner: Owner = owner.parse().map_err(|e| corrupt("units owner", e))?;
            units.insert(id, owner);
            Ok(())
        },
    )?;
    let mut memory = BTreeMap::new();
    for_each_row(
        conn,
        ctx,
        "SELECT start_mib, len_mib, owner FROM memory",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        |(s, l, owner): (i64, i64, String)| {
            let owner: Owner = owner.parse().map_err(|e| corrupt("memory owner", e))?;
            let s = u64::try_from(s).map_err(|e| corrupt("memory start", e))?;
            let l = u64::try_from(l).map_err(|e| corrupt("memory length", e))?;
            memory.insert(s, (l, owner));
            Ok(())
        },
    )?;
    let mut shares = BTreeMap::new();
    for_each_row(
        conn,
        ctx,
        "SELECT partition, milli FROM shares",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
        |(p, m): (String, i64)| {
            let p = PartitionId::new(&p).map_err(|e| corrupt("shares partition", e))?;
            shares.insert(p, u32::try_from(m).map_err(|e| corrupt("share", e))?);
            Ok(())
        },
    )?;
    let partitions = read_partitions(conn, None)?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    Ok(State {
        host: host.clone(),
        units,
        memory,
        shares,
        partitions,
    })
}

/// Reads one or all partition records.
pub(crate) fn read_partitions(
    conn: &Connection,
    only: Option<&PartitionId>,
) -> Result<Vec<PartitionRecord>, Error> {
    let ctx = "reading partitions";
    let mut out = Vec::new();
    for_each_row(
        conn,
        ctx,
        "SELECT id, definition, state FROM partitions WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        [only.map(PartitionId::as_str)],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        |(id, definition, state): (String, String, String)| {
            out.push(PartitionRecord {
                id: PartitionId::new(&id).map_err(|e| corrupt("partition id", e))?,
                definition,
                state: parse_state(&state).ok_or_else(|| corrupt("partition state", &state))?,
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Streams log entries with `txid >= from` in order to `f`.
pub(crate) fn for_each_log_entry(
    conn: &Connection,
    from: u64,
    limit: Option<u64>,
    mut f: impl FnMut(LogEntry) -> Result<(), Error>,
) -> Result<(), Error> {
    let ctx = "reading the audit log";
    let mut st = conn
        .prepare_cached("SELECT txid, time_unix_ns, actor, record FROM audit_log WHERE txid >= ?1 ORDER BY txid LIMIT ?2")
        .map_err(Error::store(ctx))?;
    let limit = limit.map_or(-1, i64_of);
    let mut q = st
        .query(params![i64_of(from), limit])
        .map_err(Error::store(ctx))?;
    while let Some(r) = q.next().map_err(Error::store(ctx))? {
        let txid: i64 = r.get(0).map_err(Error::store(ctx))?;
        let record: String = r.get(3).map_err(Error::store(ctx))?;
        let record: LogRecord =
            serde_json::from_str(&record).map_err(|e| corrupt(&format!("log entry {txid}"), e))?;
        f(LogEntry {
            txid: TxId(u64::try_from(txid).map_err(|e| corrupt("txid", e))?),
            time_unix_ns: r.get(1).map_err(Error::store(ctx))?,
            actor: r.get(2).map_err(Error::store(ctx))?,
            record,
        })?;
    }
    Ok(())
}

/// Rebuilds the state from the audit log alone: the genesis entry gives the
/// host configuration, each transaction's before images are checked and its
/// after images installed.
pub(crate) fn replay(conn: &Connection) -> Result<State, Error> {
    let mut state: Option<State> = None;
    let mut expect = 1u64;
    for_each_log_entry(conn, 0, None, |entry| {
        if entry.txid.0 != expect {
            return Err(Error::Corrupt(format!(
                "audit log jumps from {} to {}",
                expect - 1,
                entry.txid
            )));
        }
        expect += 1;
        match (&mut state, entry.record) {
            (None, LogRecord::Genesis { host }) => {
                state = Some(State::genesis(&host));
                Ok(())
            }
            (Some(st), LogRecord::Transaction { changes }) => {
                for (i, c) in changes.iter().enumerate() {
                    st.apply_logged(c).map_err(|r| {
                        Error::Corrupt(format!(
                            "{} change #{i} does not apply on replay: {r}",
                            entry.txid
                        ))
                    })?;
                }
                Ok(())
            }
            (None, _) => Err(Error::Corrupt(
                "audit log does not start with a genesis entry".into(),
            )),
            (Some(_), LogRecord::Genesis { .. }) => Err(Error::Corrupt(format!(
                "second genesis entry at {}",
                entry.txid
            ))),
        }
    })?;
    state.ok_or_else(|| Error::Corrupt("audit log is empty".into()))
}
