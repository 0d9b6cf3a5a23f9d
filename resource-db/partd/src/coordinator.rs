//! The coordinator: partition life cycle on top of the resource database.
//!
//! Every state change and every grant or release is one transaction. A start
//! grants everything (plan_grant) and moves the partition to `starting` in
//! the same transaction; the release and the final state (`stopped` or
//! `failed`) are one transaction committed only after the VMM process is
//! gone. One supervisor task per VMM pings its control socket and waits for
//! its end.

use partvisor_runtime::sync::MutexExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use part_vmm::control::{ExitRecord, Request};
use resource_db::{
    Change, Db, Error as DbError, FreeCapacity, Holdings, LogEntry, LogRecord, Owner, PartitionId,
    PartitionRecord, PartitionState, Rejection, ResourceId, TxId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::definition::{Definition, DefinitionError};
use crate::io::{self, IoRecord, IoView, Port, SwitchFiles};
use crate::process::{self, Ended, PartitionFiles, VmmProcess, VmmRecord};
use part_vmm::config::DeviceConfig;

/// The actor name partd uses in the audit log.
const ACTOR: &str = "partd";
/// How often a plan made from a stale snapshot is made again.
const PLAN_ATTEMPTS: usize = 8;
/// How long a start waits for the monitor's first answer.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Grace after a forced stop before partd sends SIGKILL.
const FORCE_GRACE: Duration = Duration::from_secs(3);

/// Errors of the coordinator, mapped to HTTP statuses by the API layer.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("{0}")]
    Invalid(String),
    #[error("no partition named {0}; `partctl list` shows the defined ones")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("cannot start {name}: {reason}; nothing was allocated (`partctl resources` shows what is free)")]
    Capacity { name: String, reason: String },
    #[error("{0}")]
    Timeout(String),
    #[error("resource database: {0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

impl From<DefinitionError> for CoordError {
    fn from(e: DefinitionError) -> Self {
        CoordError::Invalid(e.to_string())
    }
}

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
}

/// A partition as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionView {
    pub name: String,
    pub state: PartitionState,
    pub definition: serde_json::Value,
    pub holdings: Holdings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    /// The part-io processes serving its disks and NICs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io: Vec<IoView>,
    /// Only in the reply to a start: where its time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timings: Option<StartTimings>,
}

/// Where the time of one start went, in microseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StartTimings {
    /// Checks, planning and the grant transaction (durable).
    pub grant_us: u64,
    /// Starting the part-io backends and waiting until they listen.
    #[serde(default)]
    pub io_us: u64,
    /// Descriptor memfd, state files and fork/exec of part-vmm.
    pub spawn_us: u64,
    /// From the spawn until the monitor first answered a ping: the
    /// monitor's own share (exec, KVM setup, control socket).
    pub monitor_us: u64,
    /// Recording `running` (durable) and building the reply.
    pub running_us: u64,
    /// The whole start inside partd.
    pub total_us: u64,
}

/// The running monitor of a partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmView {
    pub pid: u32,
    pub start_time: u64,
    pub control_socket: PathBuf,
    pub console_socket: PathBuf,
    /// The cgroup weighting its share of the shared pool, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
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
            .ok_or_else(|| CoordError::NotFound(id.to_string()))
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
        Err(CoordError::Internal(format!(
            "{id}: state kept changing; try again"
        )))
    }

    pub fn parse_id(name: &str) -> Result<PartitionId, CoordError> {
        PartitionId::new(name).map_err(|e| CoordError::Invalid(e.to_string()))
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
            definition: serde_json::from_str(&rec.definition)
                .unwrap_or(serde_json::Value::String(rec.definition.clone())),
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

    pub async fn create(&self, body: serde_json::Value) -> Result<PartitionView, CoordError> {
        let host = self.db.view().host().clone();
        let def = Definition::from_json(body, &host)?;
        let id = def.id()?;
        let lock = self.lock_of(&id);
        let _g = lock.lock().await;
        let definition =
            serde_json::to_string(&def).map_err(|e| CoordError::Internal(e.to_string()))?;
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
            .map_err(|r| CoordError::Capacity {
                name: id.to_string(),
                reason: r.to_string(),
            })?;
        let mut changes = vec![change];
        changes.extend(macs);
        match self.transact(changes).await {
            Ok(_) => {}
            Err(e) if matches!(e.rejection(), Some(Rejection::PartitionExists { .. })) => {
                return Err(CoordError::Conflict(format!(
                    "partition {id} already exists; `partctl destroy {id}` it first or pick another name"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.view(&id)
    }

    pub async fn destroy(&self, id: &PartitionId) -> Result<(), CoordError> {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        for _ in 0..PLAN_ATTEMPTS {
            let rec = self.record(id)?;
            if is_active(rec.state) {
                return Err(CoordError::Conflict(format!(
                    "partition {id} is {}; `partctl stop {id}` it first",
                    rec.state.as_str()
                )));
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
        Err(CoordError::Internal(format!(
            "{id}: kept changing during destroy; try again"
        )))
    }

    /// Grants, spawns and waits until the monitor answers (or ends).
    pub async fn start(self: &Arc<Self>, id: &PartitionId) -> Result<PartitionView, CoordError> {
        let t0 = Instant::now();
        let lock = self.lock_of(id);
        let guard = lock.lock().await;
        let rec = self.record(id)?;
        let state_before = rec.state;
        if is_active(rec.state) {
            return Err(CoordError::Conflict(format!(
                "partition {id} is already {}",
                rec.state.as_str()
            )));
        }
        let value: serde_json::Value = serde_json::from_str(&rec.definition)
            .map_err(|e| CoordError::Internal(format!("stored definition of {id}: {e}")))?;
        // Files may have gone since `create`: check again.
        let def = Definition::from_json(value, self.db.view().host())
            .map_err(|e| CoordError::Conflict(format!("cannot start {id}: {e}")))?;

        self.check_socket_paths(id, &def)?;
        // `{mac:NAME}` in the command line: the MACs granted at create.
        let cmdline = def
            .expand_cmdline(|name, i| {
                let p = PartitionId::new(name).ok()?;
                let macs = self.db.holdings(&p).ok()?.macs;
                macs.get(i).map(ToString::to_string)
            })
            .map_err(|e| CoordError::Conflict(format!("cannot start {id}: {e}")))?;

        // One transaction: everything the partition needs + `starting`.
        let mut affinity = Vec::new();
        let mut granted = false;
        for _ in 0..PLAN_ATTEMPTS {
            let snap = self.db.snapshot()?;
            let rec = self.record(id)?;
            let mut changes =
                snap.plan_grant(id, &def.demand())
                    .map_err(|r| CoordError::Capacity {
                        name: id.to_string(),
                        reason: r.to_string(),
                    })?;
            // The MACs granted at create are asserted (before == after) in
            // the same transaction.
            for mac in snap.holdings(id).macs {
                changes.push(Change::Transfer {
                    resource: ResourceId::Mac(mac),
                    before: Owner::partition(id),
                    after: Owner::partition(id),
                });
            }
            changes.push(Change::SetState {
                partition: id.clone(),
                before: rec.state,
                after: PartitionState::Starting,
            });
            affinity = if def.cpus.is_empty() {
                let host = snap.host();
                host.cpus
                    .iter()
                    .copied()
                    .filter(|c| matches!(snap.owner(&ResourceId::Cpu(*c)), Ok(Owner::SharedPool)))
                    .collect()
            } else {
                def.cpus.clone()
            };
            match self.transact(changes).await {
                Ok(_) => {
                    granted = true;
                    break;
                }
                Err(e) if stale(&e) => continue,
                Err(e) => {
                    if let Some(r) = e.rejection() {
                        if matches!(
                            r,
                            Rejection::OverCapacity { .. }
                                | Rejection::Insufficient { .. }
                                | Rejection::Unavailable { .. }
                        ) {
                            return Err(CoordError::Capacity {
                                name: id.to_string(),
                                reason: r.to_string(),
                            });
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        if !granted {
            return Err(CoordError::Internal(format!(
                "{id}: resources kept changing while planning; try again"
            )));
        }

        let t_granted = Instant::now();
        let files = self.files(id);
        // Boot order: the I/O partitions listen before the monitor starts.
        let devices = match files.clear_run_files() {
            Ok(()) => self.start_io(id, &def).await,
            Err(e) => Err(CoordError::Internal(e.to_string())),
        };
        let devices = match devices {
            Ok(d) => d,
            Err(e) => {
                // A conflict (a busy switch) starts nothing: the partition
                // goes back to where it was. Anything else is a failure.
                let after = if matches!(e, CoordError::Conflict(_)) {
                    state_before
                } else {
                    let reason = ExitRecord {
                        pid: 0,
                        reason: "io-failed".into(),
                        status: -1,
                        detail: e.to_string(),
                    };
                    let _ = process::write_json_atomic(&files.exit_file(), &reason);
                    PartitionState::Failed
                };
                self.let_go(id, &def).await;
                self.release(id, after).await?;
                return Err(e);
            }
        };
        let t_io = Instant::now();
        let spawned = {
            let mut cfg = def.descriptor(&files.console(), affinity, devices);
            cfg.cmdline = cmdline;
            process::spawn(&self.settings.vmm, id.as_str(), &cfg, &files)
        };
        let (proc_, record) = match spawned {
            Ok(x) => x,
            Err(e) => {
                let reason = ExitRecord {
                    pid: 0,
                    reason: "spawn-failed".into(),
                    status: -1,
                    detail: e.to_string(),
                };
                let _ = process::write_json_atomic(&files.exit_file(), &reason);
                self.let_go(id, &def).await;
                self.release(id, PartitionState::Failed).await?;
                return Err(CoordError::Internal(format!("cannot start {id}: {e}")));
            }
        };
        if let Err(e) = process::write_json_atomic(&files.vmm_record(), &record) {
            tracing::warn!(
                "{id}: cannot write {}: {e}; a restarted partd will not find this VMM",
                files.vmm_record().display()
            );
        }
        let t_spawned = Instant::now();
        let live = self.register(id, record, files, false);
        let share = def.share_milli();
        if share > 0 {
            // Moving a process between cgroups can take milliseconds (v1
            // waits for RCU): done beside the start, not in its way. `finish`
            // waits for it before removing the cgroup.
            let cgroups = self.settings.cgroups.clone();
            let (name, pid) = (id.to_string(), live.record.pid);
            let placing = tokio::task::spawn_blocking(move || {
                if let Err(e) = cgroups.place(&name, pid, share) {
                    tracing::warn!("{name}: its share is not weighted: {e}");
                }
            });
            *live.placing.locked() = Some(placing);
        }
        let mut phase = live.phase.subscribe();
        self.supervise(id.clone(), Arc::clone(&live), proc_);
        drop(guard);

        let waited =
            tokio::time::timeout(START_DEADLINE, phase.wait_for(|p| *p != Phase::Starting)).await;
        match waited {
            Ok(Ok(p)) => {
                let p = p.clone();
                if let Phase::Ended(state) = p {
                    let view = self.view(id)?;
                    let why = view
                        .last_exit
                        .as_ref()
                        .map(|r| r.detail.clone())
                        .unwrap_or_default();
                    return Err(CoordError::Conflict(format!(
                        "partition {id} ended while starting ({}): {why}; see {}",
                        state.as_str(),
                        self.files(id).vmm_log().display()
                    )));
                }
                let mut view = self.view(id)?;
                let first = live
                    .first_answer
                    .locked()
                    .unwrap_or(t_spawned);
                let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                view.start_timings = Some(StartTimings {
                    grant_us: us(t_granted - t0),
                    io_us: us(t_io - t_granted),
                    spawn_us: us(t_spawned - t_io),
                    monitor_us: us(first.saturating_duration_since(t_spawned)),
                    running_us: us(first.elapsed()),
                    total_us: us(t0.elapsed()),
                });
                Ok(view)
            }
            Ok(Err(_)) => self.view(id),
            Err(_) => Err(CoordError::Timeout(format!(
                "partition {id}: its monitor did not answer within {} s; it stays `starting` (see {})",
                START_DEADLINE.as_secs(),
                self.files(id).vmm_log().display()
            ))),
        }
    }

    fn register(
        &self,
        id: &PartitionId,
        record: VmmRecord,
        files: PartitionFiles,
        stopping: bool,
    ) -> Arc<Live> {
        let (phase, _) = watch::channel(Phase::Starting);
        let live = Arc::new(Live {
            record,
            files,
            stop_requested: AtomicBool::new(stopping),
            killed_by_partd: AtomicBool::new(false),
            phase,
            first_answer: Mutex::new(None),
            placing: Mutex::new(None),
        });
        let mut map = self.live.locked();
        map.insert(id.clone(), Arc::clone(&live));
        live
    }

    /// Polite (or forced) stop; returns once the monitor is gone and the
    /// resources are released.
    pub async fn stop(
        &self,
        id: &PartitionId,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<PartitionView, CoordError> {
        let live = {
            let lock = self.lock_of(id);
            let _g = lock.lock().await;
            let rec = self.record(id)?;
            if !is_active(rec.state) {
                return Err(CoordError::Conflict(format!(
                    "partition {id} is {}, not running",
                    rec.state.as_str()
                )));
            }
            let Some(live) = self.live_of(id) else {
                return Err(CoordError::Internal(format!(
                    "partition {id} is {} but partd supervises no monitor for it",
                    rec.state.as_str()
                )));
            };
            live.stop_requested.store(true, Ordering::SeqCst);
            self.transition(
                id,
                &[
                    PartitionState::Starting,
                    PartitionState::Running,
                    PartitionState::Unresponsive,
                ],
                PartitionState::Stopping,
            )
            .await?;
            live
        };
        let mut phase = live.phase.subscribe();
        let ended = |phase: &mut watch::Receiver<Phase>, d: Duration| {
            let mut phase = phase.clone();
            async move {
                tokio::time::timeout(d, phase.wait_for(|p| matches!(p, Phase::Ended(_))))
                    .await
                    .is_ok()
            }
        };
        let control = live.files.control();
        let t = self.settings.ping_timeout;
        if !force {
            let polite = process::control(&control, &Request::Stop { force: false }, t).await;
            if polite.is_err() {
                // Not answering: SIGTERM is part-vmm's other polite stop.
                process::signal(&live.record, Signal::SIGTERM);
            }
            let def_timeout = self
                .record(id)
                .ok()
                .and_then(|r| serde_json::from_str::<Definition>(&r.definition).ok())
                .map(|d| Duration::from_secs(d.stop_timeout_s))
                .unwrap_or(Duration::from_secs(10));
            let wait = timeout.unwrap_or(def_timeout + Duration::from_secs(2));
            if ended(&mut phase, wait).await {
                return self.view(id);
            }
        }
        if process::control(&control, &Request::Stop { force: true }, t)
            .await
            .is_ok()
            && ended(&mut phase, FORCE_GRACE).await
        {
            return self.view(id);
        }
        live.killed_by_partd.store(true, Ordering::SeqCst);
        process::signal(&live.record, Signal::SIGKILL);
        if ended(&mut phase, Duration::from_secs(10)).await {
            return self.view(id);
        }
        Err(CoordError::Timeout(format!(
            "partition {id}: monitor pid {} did not end after SIGKILL",
            live.record.pid
        )))
    }

    // ----- supervision -----

    fn supervise(self: &Arc<Self>, id: PartitionId, live: Arc<Live>, mut proc_: VmmProcess) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut last_ok = Instant::now();
            let mut answered = false;
            let mut dead_reported: Vec<u32> = Vec::new();
            loop {
                // Until the first answer, poll fast: that is the start latency.
                let interval = if answered {
                    me.settings.ping_interval
                } else {
                    Duration::from_millis(1)
                };
                tokio::select! {
                    ended = proc_.wait() => {
                        let state = me.finish(&id, &live, Some(ended)).await;
                        live.phase.send_replace(Phase::Ended(state));
                        return;
                    }
                    _ = tokio::time::sleep(interval) => {}
                }
                let ping = process::control(
                    &live.files.control(),
                    &Request::Ping,
                    me.settings.ping_timeout,
                )
                .await;
                // Its I/O partitions: a dead one is reported once (restarting
                // part-io is not partd's job yet; the devices need reset).
                if let Ok(rec) = me.record(&id) {
                    for io in me.io_views(&rec) {
                        if !io.alive && !dead_reported.contains(&io.pid) {
                            dead_reported.push(io.pid);
                            tracing::error!(
                                "{id}: part-io {} pid {} is gone; its devices need reset (see {})",
                                io.kind,
                                io.pid,
                                io.log.display()
                            );
                        }
                    }
                }
                match ping {
                    Ok(reply) if reply.ok => {
                        last_ok = Instant::now();
                        if !answered {
                            let mut first = live.first_answer.locked();
                            *first = Some(Instant::now());
                        }
                        answered = true;
                        if !live.stop_requested.load(Ordering::SeqCst) {
                            let lock = me.lock_of(&id);
                            let _g = lock.lock().await;
                            if let Err(e) = me
                                .transition(
                                    &id,
                                    &[PartitionState::Starting, PartitionState::Unresponsive],
                                    PartitionState::Running,
                                )
                                .await
                            {
                                tracing::warn!("{id}: cannot record `running`: {e}");
                            }
                        }
                        live.phase.send_if_modified(|p| {
                            if *p == Phase::Starting {
                                *p = Phase::Answering;
                                true
                            } else {
                                false
                            }
                        });
                    }
                    _ => {
                        if last_ok.elapsed() >= me.settings.unresponsive_after {
                            let lock = me.lock_of(&id);
                            let _g = lock.lock().await;
                            match me
                                .transition(
                                    &id,
                                    &[PartitionState::Running],
                                    PartitionState::Unresponsive,
                                )
                                .await
                            {
                                Ok(true) => tracing::warn!(
                                    "{id}: monitor pid {} has not answered for {} ms: unresponsive",
                                    live.record.pid,
                                    last_ok.elapsed().as_millis()
                                ),
                                Ok(false) => {}
                                Err(e) => tracing::warn!("{id}: cannot record `unresponsive`: {e}"),
                            }
                        }
                    }
                }
            }
        });
    }

    /// The monitor is gone: record why, release everything and set the final
    /// state, in one transaction.
    async fn finish(&self, id: &PartitionId, live: &Live, ended: Option<Ended>) -> PartitionState {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        let files = &live.files;
        let stop_requested = live.stop_requested.load(Ordering::SeqCst);
        let killed = live.killed_by_partd.load(Ordering::SeqCst);
        let recorded = process::read_json::<ExitRecord>(&files.exit_file())
            .filter(|r| r.pid == live.record.pid);
        let exit = match recorded {
            Some(r) => r,
            None => {
                let (status, detail) = match ended {
                    Some(Ended::Exited(code)) => (code, format!("part-vmm exited with status {code} without an exit record (see {})", files.vmm_log().display())),
                    Some(Ended::Signaled(sig)) if killed => (128 + sig, format!("part-vmm did not respond and was killed by partd (signal {sig})")),
                    Some(Ended::Signaled(sig)) => (128 + sig, format!("part-vmm was killed by signal {sig}")),
                    Some(Ended::Unknown) | None if killed => (-1, "part-vmm did not respond and was killed by partd".to_string()),
                    Some(Ended::Unknown) | None => (-1, "part-vmm ended without an exit record (killed by a signal?) while partd was not watching it".to_string()),
                };
                let r = ExitRecord {
                    pid: live.record.pid,
                    reason: if killed {
                        "killed-by-partd".into()
                    } else {
                        "no-exit-record".into()
                    },
                    status,
                    detail,
                };
                if let Err(e) = process::write_json_atomic(&files.exit_file(), &r) {
                    tracing::warn!("{id}: cannot write {}: {e}", files.exit_file().display());
                }
                r
            }
        };
        let state = final_state(stop_requested, killed, &exit);
        tracing::info!(
            "{id}: monitor pid {} ended: {} -> {}",
            live.record.pid,
            exit.detail,
            state.as_str()
        );
        // No monitor any more: views show the exit record from now on, so
        // nobody sees the final state without its reason.
        self.live.locked().remove(id);
        let _ = std::fs::remove_file(files.vmm_record());
        let placing = live.placing.locked().take();
        if let Some(p) = placing {
            let _ = p.await;
        }
        self.settings.cgroups.remove(id.as_str(), live.record.pid);
        if let Some(def) = self
            .record(id)
            .ok()
            .and_then(|r| serde_json::from_str::<Definition>(&r.definition).ok())
        {
            self.let_go(id, &def).await;
        }
        match self.release(id, state).await {
            Ok(()) => tracing::info!("{id}: resources released ({})", state.as_str()),
            Err(e) => tracing::error!("{id}: cannot release its resources: {e}"),
        }
        state
    }

    /// Releases everything `id` holds and sets `state`, in one transaction.
    async fn release(&self, id: &PartitionId, state: PartitionState) -> Result<(), CoordError> {
        for _ in 0..PLAN_ATTEMPTS {
            let rec = self.record(id)?;
            let snap = self.db.snapshot()?;
            // MACs stay with the partition until destroy (granted at create).
            let mut changes: Vec<Change> = snap
                .plan_release(id)
                .into_iter()
                .filter(|c| {
                    !matches!(
                        c,
                        Change::Transfer {
                            resource: ResourceId::Mac(_),
                            ..
                        }
                    )
                })
                .collect();
            if rec.state != state {
                changes.push(Change::SetState {
                    partition: id.clone(),
                    before: rec.state,
                    after: state,
                });
            }
            if changes.is_empty() {
                return Ok(());
            }
            match self.transact(changes).await {
                Ok(_) => return Ok(()),
                Err(e) if stale(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoordError::Internal(format!(
            "{id}: kept changing during release"
        )))
    }

    /// After a partd (re)start: re-attach to live monitors, finish the ones
    /// that ended while partd was down. Returns (adopted, finished).
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), CoordError> {
        let mut adopted = 0;
        let mut finished = 0;
        for rec in self.db.view().partitions()? {
            if !is_active(rec.state) {
                continue;
            }
            let id = rec.id.clone();
            let files = self.files(&id);
            let mut record = process::read_json::<VmmRecord>(&files.vmm_record());
            if record.is_none() {
                // partd died between spawning the monitor and recording it:
                // the monitor itself says who it is.
                let ping =
                    process::control(&files.control(), &Request::Ping, self.settings.ping_timeout)
                        .await;
                if let Some(pid) = ping.ok().and_then(|r| r.pid) {
                    record =
                        process::start_time(pid).map(|start_time| VmmRecord { pid, start_time });
                    if let Some(r) = &record {
                        let _ = process::write_json_atomic(&files.vmm_record(), r);
                    }
                }
            }
            let stopping = rec.state == PartitionState::Stopping;
            match record.as_ref().and_then(process::adopt) {
                Some(proc_) => {
                    let record = record.unwrap_or(VmmRecord {
                        pid: 0,
                        start_time: 0,
                    });
                    tracing::info!(
                        "{id}: re-attached to monitor pid {} ({})",
                        record.pid,
                        rec.state.as_str()
                    );
                    let live = self.register(&id, record, files, stopping);
                    self.supervise(id, live, proc_);
                    adopted += 1;
                }
                None => {
                    let record = record.unwrap_or(VmmRecord {
                        pid: 0,
                        start_time: 0,
                    });
                    let live = Live {
                        record,
                        files,
                        stop_requested: AtomicBool::new(stopping),
                        killed_by_partd: AtomicBool::new(false),
                        phase: watch::channel(Phase::Starting).0,
                        first_answer: Mutex::new(None),
                        placing: Mutex::new(None),
                    };
                    self.finish(&id, &live, None).await;
                    finished += 1;
                }
            }
        }
        Ok((adopted, finished))
    }
}

/// I/O partitions: starting them before a guest, letting go after it.
impl Coordinator {
    fn blk_record_path(&self, id: &PartitionId) -> PathBuf {
        self.files(id).dir.join("blk.json")
    }

    /// Refuses a start whose sockets would not fit a Unix socket address.
    fn check_socket_paths(&self, id: &PartitionId, def: &Definition) -> Result<(), CoordError> {
        let files = self.files(id);
        let mut sockets: Vec<PathBuf> = (0..def.disk.len())
            .map(|i| files.dir.join(format!("disk{i}.sock")))
            .collect();
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            sockets.push(sf.port_socket(id.as_str(), i));
            sockets.push(sf.stats());
        }
        if let Some(long) = sockets
            .iter()
            .find(|s| s.as_os_str().len() > io::MAX_SOCKET_PATH)
        {
            return Err(CoordError::Invalid(format!(
                "cannot start {id}: socket path {} is longer than {} bytes (the Unix socket limit); give partd a shorter --state-dir, or use shorter partition and switch names",
                long.display(),
                io::MAX_SOCKET_PATH
            )));
        }
        Ok(())
    }

    /// Starts the partition's `part-io blk` and makes sure every switch it
    /// has a NIC on runs with a port for it; returns its devices, disks
    /// first, in definition order.
    async fn start_io(
        &self,
        id: &PartitionId,
        def: &Definition,
    ) -> Result<Vec<DeviceConfig>, CoordError> {
        let files = self.files(id);
        let mut devices = Vec::new();
        if !def.disk.is_empty() {
            let sockets: Vec<PathBuf> = (0..def.disk.len())
                .map(|i| files.dir.join(format!("disk{i}.sock")))
                .collect();
            let disks: Vec<(PathBuf, bool)> = def
                .disk
                .iter()
                .map(|d| (d.image.clone(), d.read_only))
                .collect();
            let args = io::blk_args(&disks, &sockets, id.as_str());
            let rec = io::spawn_ready(
                &self.settings.part_io,
                &format!("blk of {id}"),
                &args,
                &files.dir.join("blk.log"),
                sockets.len(),
            )
            .await
            .map_err(|e| CoordError::Internal(format!("cannot start {id}: {e}")))?;
            tracing::info!(
                "{id}: part-io blk pid {} serves {} disk(s)",
                rec.pid,
                sockets.len()
            );
            if let Err(e) = process::write_json_atomic(&self.blk_record_path(id), &rec) {
                tracing::warn!("{id}: cannot record part-io blk pid {}: {e}", rec.pid);
            }
            devices.extend(
                sockets
                    .into_iter()
                    .map(|socket| DeviceConfig::VhostUserBlk { socket }),
            );
        }
        let mut switches: Vec<&str> = def.nic.iter().map(|n| n.switch.as_str()).collect();
        switches.dedup();
        for sw in switches {
            self.ensure_switch(sw, id).await?;
        }
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            devices.push(DeviceConfig::VhostUserNet {
                socket: sf.port_socket(id.as_str(), i),
            });
        }
        Ok(devices)
    }

    /// Every port `switch` must have: one per NIC on it of every defined
    /// partition, with the MAC granted to that partition at create.
    fn members(&self, switch: &str) -> Result<Vec<Port>, CoordError> {
        let sf = SwitchFiles::new(&self.settings.state_dir, switch);
        let mut ports = Vec::new();
        for rec in self.db.view().partitions()? {
            let Ok(def) = serde_json::from_str::<Definition>(&rec.definition) else {
                continue;
            };
            let macs = self.db.holdings(&rec.id)?.macs;
            for (i, nic) in def.nic.iter().enumerate() {
                if nic.switch != switch {
                    continue;
                }
                let Some(mac) = macs.get(i) else {
                    return Err(CoordError::Internal(format!(
                        "partition {} has no MAC for its NIC {i}",
                        rec.id
                    )));
                };
                ports.push(Port {
                    partition: rec.id.to_string(),
                    socket: sf.port_socket(rec.id.as_str(), i),
                    mac: mac.to_string(),
                });
            }
        }
        Ok(ports)
    }

    /// Starts switch `switch` with every member's port, unless it already
    /// runs with `id`'s ports. A running switch without them is restarted
    /// only while no member is connected.
    async fn ensure_switch(&self, switch: &str, id: &PartitionId) -> Result<(), CoordError> {
        let _g = self.switches.lock().await;
        let sf = SwitchFiles::new(&self.settings.state_dir, switch);
        std::fs::create_dir_all(&sf.dir).map_err(|e| {
            CoordError::Internal(format!("cannot create {}: {e}", sf.dir.display()))
        })?;
        let want = self.members(switch)?;
        let mine: Vec<&Port> = want.iter().filter(|p| p.partition == id.as_str()).collect();
        if let Some(rec) = process::read_json::<IoRecord>(&sf.record()).filter(IoRecord::alive) {
            if mine.iter().all(|p| rec.ports.contains(p)) {
                return Ok(());
            }
            let conns = io::port_connections(&sf.stats()).await.unwrap_or_default();
            let busy: Vec<&str> = rec
                .ports
                .iter()
                .filter(|p| conns.iter().any(|(s, c)| *c && s == &p.socket))
                .map(|p| p.partition.as_str())
                .collect();
            if !busy.is_empty() {
                return Err(CoordError::Conflict(format!(
                    "cannot start {id}: switch {switch} (part-io pid {}) has no port for it and cannot be restarted while partitions are connected to it ({}); stop them, then start {id} first (the switch is then started with a port for every partition defined on it)",
                    rec.pid,
                    busy.join(", ")
                )));
            }
            tracing::info!(
                "switch {switch}: restarting part-io pid {} to add ports for {id}",
                rec.pid
            );
            if !rec.stop(Duration::from_secs(5)).await {
                return Err(CoordError::Internal(format!(
                    "switch {switch}: part-io pid {} did not end",
                    rec.pid
                )));
            }
        }
        let args = io::net_args(&want, &sf.stats());
        let mut rec = io::spawn_ready(
            &self.settings.part_io,
            &format!("net switch {switch}"),
            &args,
            &sf.log(),
            want.len(),
        )
        .await
        .map_err(|e| CoordError::Internal(format!("cannot start {id}: {e}")))?;
        tracing::info!(
            "switch {switch}: part-io net pid {} with {} port(s)",
            rec.pid,
            want.len()
        );
        rec.ports = want;
        if let Err(e) = process::write_json_atomic(&sf.record(), &rec) {
            tracing::warn!(
                "switch {switch}: cannot record part-io pid {}: {e}",
                rec.pid
            );
        }
        Ok(())
    }

    /// Waits until no backend maps `id`'s memory any more: its `part-io
    /// blk` has exited (partd stops it) and every switch port of it shows
    /// `connected: false` (or its switch is gone). It never gives up: until
    /// then the memory stays held (the partition stays `stopping`), and an
    /// error is logged every `UNMAP_DEADLINE` (DESIGN: a partition's memory
    /// is not reused while any backend still maps it).
    async fn let_go(&self, id: &PartitionId, def: &Definition) {
        let blk = self.blk_record_path(id);
        if let Some(rec) = process::read_json::<IoRecord>(&blk) {
            let mut rounds = 0u64;
            while !rec.stop(io::UNMAP_DEADLINE).await {
                rounds += 1;
                tracing::error!(
                    "{id}: part-io blk pid {} has not ended after {} s; its memory stays held",
                    rec.pid,
                    rounds * io::UNMAP_DEADLINE.as_secs()
                );
            }
            tracing::info!("{id}: part-io blk pid {} has exited", rec.pid);
            let _ = std::fs::remove_file(&blk);
        }
        for (i, nic) in def.nic.iter().enumerate() {
            let sf = SwitchFiles::new(&self.settings.state_dir, &nic.switch);
            let socket = sf.port_socket(id.as_str(), i);
            let mut t0 = Instant::now();
            loop {
                let connected = match io::port_connections(&sf.stats()).await {
                    None => false,
                    Some(ports) => ports.iter().any(|(s, c)| *c && *s == socket),
                };
                if !connected {
                    tracing::info!(
                        "{id}: switch {} port {} disconnected",
                        nic.switch,
                        socket.display()
                    );
                    break;
                }
                if t0.elapsed() >= io::UNMAP_DEADLINE {
                    tracing::error!(
                        "{id}: switch {} still shows port {} connected after {} s; its memory stays held",
                        nic.switch,
                        socket.display(),
                        io::UNMAP_DEADLINE.as_secs()
                    );
                    t0 = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if !def.disk.is_empty() || !def.nic.is_empty() {
            tracing::info!("{id}: every backend has unmapped its memory");
        }
    }

    /// The part-io processes of a partition, for `show`.
    fn io_views(&self, rec: &PartitionRecord) -> Vec<IoView> {
        let mut out = Vec::new();
        let Ok(def) = serde_json::from_str::<Definition>(&rec.definition) else {
            return out;
        };
        let files = self.files(&rec.id);
        if let Some(r) = process::read_json::<IoRecord>(&self.blk_record_path(&rec.id)) {
            out.push(IoView {
                kind: "blk".into(),
                switch: None,
                pid: r.pid,
                start_time: r.start_time,
                alive: r.alive(),
                sockets: (0..def.disk.len())
                    .map(|i| files.dir.join(format!("disk{i}.sock")))
                    .collect(),
                log: files.dir.join("blk.log"),
            });
        }
        let mut switches: Vec<&str> = def.nic.iter().map(|n| n.switch.as_str()).collect();
        switches.sort_unstable();
        switches.dedup();
        for sw in switches {
            let sf = SwitchFiles::new(&self.settings.state_dir, sw);
            if let Some(r) = process::read_json::<IoRecord>(&sf.record()) {
                out.push(IoView {
                    kind: "net".into(),
                    switch: Some(sw.to_string()),
                    pid: r.pid,
                    start_time: r.start_time,
                    alive: r.alive(),
                    sockets: r
                        .ports
                        .iter()
                        .filter(|p| p.partition == rec.id.as_str())
                        .map(|p| p.socket.clone())
                        .collect(),
                    log: sf.log(),
                });
            }
        }
        out
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
