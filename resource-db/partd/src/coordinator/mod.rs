//! The coordinator: partition life cycle on top of the resource database.
//!
//! Every state change and every grant or release is one transaction. A start
//! grants everything (plan_grant) and moves the partition to `starting` in
//! the same transaction; the release and the final state (`stopped` or
//! `failed`) are one transaction committed only after the VMM process is
//! gone. One supervisor task per VMM pings its control socket and waits for
//! its end.

mod backends;
mod confine;
mod error;
mod owner;
mod recover;
mod start;
mod stop;
mod supervise;
mod vsock;

pub use error::CoordError;
pub(crate) use owner::BootFiles;

use partvisor_runtime::sync::MutexExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use partvisor_api::control::{ExitRecord, Request};
use resource_db::{
    Change, Db, Error as DbError, FreeCapacity, LogEntry, LogRecord, Owner, PartitionId,
    PartitionRecord, PartitionState, Rejection, ResourceId, TxId,
};
use tokio::sync::watch;

use crate::definition::{Definition, DefinitionExt};
use crate::io::{self, IoKind, IoRecord, IoView, Port, SwitchFiles, VsockFiles};
use crate::process::{self, Ended, PartitionFiles, VmmProcess, VmmRecord};
use partvisor_api::descriptor::DeviceConfig;
pub use partvisor_api::views::{PartitionView, StartTimings, VmmView};

/// The actor name partd uses in the audit log.
const ACTOR: &str = "partd";
/// How often a plan made from a stale snapshot is made again.
const PLAN_ATTEMPTS: usize = 8;
/// How long a start waits for the monitor's first answer.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Grace after a forced stop before partd sends SIGKILL.
const FORCE_GRACE: Duration = Duration::from_secs(3);

/// Supervision settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub vmm: PathBuf,
    /// The part-io binary (I/O partitions).
    pub part_io: PathBuf,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub unresponsive_after: Duration,
    pub cgroups: crate::cgroup::CpuCgroups,
    /// partd's own uid: like root, it may act on every partition.
    pub own_uid: u32,
    /// How children are confined; `None`: they run as partd's uid,
    /// unconfined (`--jail off`).
    pub jail: Option<crate::jail::Jailing>,
    /// What the children's seccomp filters do (`--seccomp`).
    pub seccomp: partvisor_seccomp::Mode,
}

/// Where a live VMM is in its life, as the supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Answering,
    Ended(PartitionState),
}

/// A VMM partd supervises.
struct Live {
    record: VmmRecord,
    files: PartitionFiles,
    stop_requested: AtomicBool,
    killed_by_partd: AtomicBool,
    phase: watch::Sender<Phase>,
    /// When the monitor first answered a ping.
    first_answer: Mutex<Option<Instant>>,
    /// The monitor's move into its cgroup, while it runs.
    placing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The coordinator. Cheap to share (`Arc`).
pub struct Coordinator {
    db: Arc<Db>,
    settings: Settings,
    live: Mutex<HashMap<PartitionId, Arc<Live>>>,
    locks: Mutex<HashMap<PartitionId, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises starting and restarting switches.
    switches: tokio::sync::Mutex<()>,
    /// Serialises starting the vsock relay.
    vsock: tokio::sync::Mutex<()>,
}

fn stale(e: &DbError) -> bool {
    matches!(
        e.rejection(),
        Some(
            Rejection::StaleOwner { .. }
                | Rejection::StaleShare { .. }
                | Rejection::StaleState { .. }
        )
    )
}

fn is_active(s: PartitionState) -> bool {
    matches!(
        s,
        PartitionState::Starting
            | PartitionState::Running
            | PartitionState::Stopping
            | PartitionState::Unresponsive
    )
}

/// The state a partition ends in once its monitor is gone: `stopped` when
/// the guest ended cleanly (status 0: power-off or exit code 0) or when the
/// end was asked for (a stop, forced by the monitor's timer or killed by
/// partd); `failed` otherwise (crash, non-zero guest exit, monitor error, or
/// killed by someone else, e.g. while partd was down).
fn final_state(stop_requested: bool, killed_by_partd: bool, exit: &ExitRecord) -> PartitionState {
    let clean = exit.status == 0;
    let stopped_on_request = stop_requested && (exit.reason == "forced-stop" || killed_by_partd);
    if clean || stopped_on_request {
        PartitionState::Stopped
    } else {
        PartitionState::Failed
    }
}

/// Whether an audit record changes anything of partition `p`.
fn mentions(record: &LogRecord, p: &PartitionId) -> bool {
    let LogRecord::Transaction { changes } = record else {
        return false;
    };
    changes.iter().any(|c| match c {
        Change::Transfer { before, after, .. } => {
            before.as_partition() == Some(p) || after.as_partition() == Some(p)
        }
        Change::Share { partition, .. } | Change::SetState { partition, .. } => partition == p,
        Change::Create { record } | Change::Destroy { record } => &record.id == p,
    })
}

impl Coordinator {
    pub fn new(db: Db, settings: Settings) -> Arc<Self> {
        Arc::new(Coordinator {
            db: Arc::new(db),
            settings,
            live: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            switches: tokio::sync::Mutex::new(()),
            vsock: tokio::sync::Mutex::new(()),
        })
    }

    fn files(&self, id: &PartitionId) -> PartitionFiles {
        PartitionFiles::new(&self.settings.state_dir, id.as_str())
    }

    fn lock_of(&self, id: &PartitionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.locked();
        locks.entry(id.clone()).or_default().clone()
    }

    fn live_of(&self, id: &PartitionId) -> Option<Arc<Live>> {
        let live = self.live.locked();
        live.get(id).cloned()
    }

    async fn transact(&self, changes: Vec<Change>) -> Result<TxId, DbError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || db.transact(ACTOR, &changes))
            .await
            .unwrap_or(Err(DbError::WriterGone))
    }

    fn record(&self, id: &PartitionId) -> Result<PartitionRecord, CoordError> {
        self.db
            .partition(id)?
            .ok_or_else(|| CoordError::NotFound { id: id.clone() })
    }

    /// Moves `id` to `to` if it is in one of `from`; returns whether it did.
    async fn transition(
        &self,
        id: &PartitionId,
        from: &[PartitionState],
        to: PartitionState,
    ) -> Result<bool, CoordError> {
        for _ in 0..PLAN_ATTEMPTS {
            let rec = self.record(id)?;
            if !from.contains(&rec.state) {
                return Ok(false);
            }
            let change = Change::SetState {
                partition: id.clone(),
                before: rec.state,
                after: to,
            };
            match self.transact(vec![change]).await {
                Ok(_) => return Ok(true),
                Err(e) if stale(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoordError::Contended {
            id: id.clone(),
            what: "state kept changing",
        })
    }

    pub fn parse_id(name: &str) -> Result<PartitionId, CoordError> {
        Ok(PartitionId::new(name)?)
    }

    // ----- reads -----

    pub fn view(&self, id: &PartitionId) -> Result<PartitionView, CoordError> {
        let rec = self.record(id)?;
        self.view_of(rec)
    }

    fn view_of(&self, rec: PartitionRecord) -> Result<PartitionView, CoordError> {
        let files = self.files(&rec.id);
        let vmm = self.live_of(&rec.id).map(|l| VmmView {
            pid: l.record.pid,
            start_time: l.record.start_time,
            control_socket: files.control(),
            console_socket: files.console(),
            cgroup: self
                .settings
                .cgroups
                .dir(rec.id.as_str(), l.record.pid)
                .filter(|d| d.exists()),
        });
        let last_exit = if vmm.is_none() {
            process::read_json::<ExitRecord>(&files.exit_file())
        } else {
            None
        };
        let io = self.io_views(&rec);
        Ok(PartitionView {
            io,
            name: rec.id.to_string(),
            state: rec.state,
            definition: serde_json::from_str(&rec.definition).map_err(|source| {
                CoordError::StoredDefinition {
                    id: rec.id.clone(),
                    source,
                }
            })?,
            holdings: self.db.holdings(&rec.id)?,
            vmm,
            last_exit,
            start_timings: None,
        })
    }

    pub fn list(&self) -> Result<Vec<PartitionView>, CoordError> {
        let recs = self.db.view().partitions()?;
        recs.into_iter().map(|r| self.view_of(r)).collect()
    }

    pub fn free(&self) -> Result<FreeCapacity, CoordError> {
        Ok(self.db.free()?)
    }

    pub fn log(
        &self,
        partition: Option<&PartitionId>,
        limit: u64,
    ) -> Result<Vec<LogEntry>, CoordError> {
        let last = self.db.view().last_txid()?;
        let Some(p) = partition else {
            let from = last.0.saturating_sub(limit.saturating_sub(1)).max(1);
            return Ok(self.db.log(TxId(from), limit)?);
        };
        let mut entries = self.db.log(TxId(1), last.0)?;
        entries.retain(|e| mentions(&e.record, p));
        let skip = entries
            .len()
            .saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(entries.split_off(skip))
    }

    // ----- life cycle -----

    /// Creates a partition owned by `caller`, whose files it must be able
    /// to open.
    pub async fn create(
        &self,
        body: serde_json::Value,
        caller: &crate::access::Caller,
    ) -> Result<PartitionView, CoordError> {
        if body.get("owner_uid").is_some() {
            return Err(crate::definition::DefinitionError::OwnerGiven.into());
        }
        let host = self.db.view().host().clone();
        let mut def = Definition::from_json(body, &host)?;
        let id = def.id()?;
        def.owner_uid = Some(caller.uid);
        drop(self.open_boot_files(&id, &def, caller, "create")?);
        let lock = self.lock_of(&id);
        let _g = lock.lock().await;
        let definition =
            serde_json::to_string(&def).map_err(|source| CoordError::EncodeDefinition {
                id: id.clone(),
                source,
            })?;
        let change = Change::Create {
            record: PartitionRecord {
                id: id.clone(),
                definition,
                state: PartitionState::Defined,
            },
        };
        // A NIC's MAC is part of the partition's identity: granted here, in
        // the create transaction, and kept until destroy, so its switch has
        // a port for it whether or not it runs.
        let macs = self
            .db
            .snapshot()?
            .plan_grant(&id, &def.nic_demand())
            .map_err(|reason| CoordError::Capacity {
                action: "create",
                id: id.clone(),
                reason,
            })?;
        let mut changes = vec![change];
        changes.extend(macs);
        match self.transact(changes).await {
            Ok(_) => {}
            Err(e) if matches!(e.rejection(), Some(Rejection::PartitionExists { .. })) => {
                return Err(CoordError::Exists { id })
            }
            Err(e) => return Err(e.into()),
        }
        // Its owner may set up host listeners before the first start.
        if def.vsock.is_some() {
            self.own_vsock_host_dir(&id, &def)?;
        }
        self.view(&id)
    }

    /// Destroys a partition that is not running, for `caller` (its owner,
    /// root or partd's uid: checked under the partition's lock).
    pub async fn destroy(
        &self,
        id: &PartitionId,
        caller: &crate::access::Caller,
    ) -> Result<(), CoordError> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        self.authorize(id, caller, "destroy")?;
        for _ in 0..PLAN_ATTEMPTS {
            let rec = self.record(id)?;
            if is_active(rec.state) {
                return Err(CoordError::StillActive {
                    id: id.clone(),
                    state: rec.state,
                });
            }
            let snap = self.db.snapshot()?;
            let mut changes = snap.plan_release(id);
            changes.push(Change::Destroy { record: rec });
            match self.transact(changes).await {
                Ok(_) => {
                    let files = self.files(id);
                    let _ = std::fs::remove_dir_all(&files.dir);
                    return Ok(());
                }
                Err(e)
                    if stale(&e)
                        || matches!(e.rejection(), Some(Rejection::StaleRecord { .. })) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoordError::Contended {
            id: id.clone(),
            what: "kept changing during destroy",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(reason: &str, status: i32) -> ExitRecord {
        ExitRecord {
            pid: 1,
            reason: reason.into(),
            status,
            detail: String::new(),
        }
    }

    #[test]
    fn clean_ends_and_requested_stops_are_stopped_everything_else_failed() {
        use PartitionState::{Failed, Stopped};
        let cases = [
            // (stop requested, killed by partd, reason, status, expected)
            (true, false, "power-off", 0, Stopped),
            (false, false, "power-off", 0, Stopped),
            (false, false, "guest-exit", 0, Stopped),
            (true, false, "forced-stop", 74, Stopped),
            (true, true, "killed-by-partd", 137, Stopped),
            (false, false, "forced-stop", 74, Failed),
            (false, false, "triple-fault", 72, Failed),
            (true, false, "triple-fault", 72, Failed),
            (false, false, "guest-exit", 3, Failed),
            (false, false, "no-exit-record", -1, Failed),
            (false, false, "vmm-error", 70, Failed),
        ];
        for (req, killed, reason, status, want) in cases {
            assert_eq!(
                final_state(req, killed, &exit(reason, status)),
                want,
                "{req} {killed} {reason} {status}"
            );
        }
    }
}
