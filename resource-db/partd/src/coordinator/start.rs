//! Starting a partition: one grant transaction, its I/O partitions, then
//! its monitor, and the monitor's registration with its supervisor.

use super::*;

impl Coordinator {
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

    pub(super) fn register(
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
}
