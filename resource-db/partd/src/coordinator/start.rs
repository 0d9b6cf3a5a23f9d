//! Starting a partition, in named steps: [`Coordinator::prepare_start`]
//! (checks, nothing changes), [`Coordinator::grant`] (one transaction:
//! everything the partition needs and `starting`), [`Coordinator::launch`]
//! (its I/O partitions, then its monitor), registration with its
//! supervisor, and [`Coordinator::await_first_answer`]. A launch that fails
//! takes the one way back, [`Coordinator::roll_back`].

use super::*;
use crate::definition::Placeholder;

/// What a start needs once its checks passed.
struct Prepared {
    def: Definition,
    /// Its kernel and initrd, opened with the starting caller's rights.
    boot: super::owner::BootFiles,
    /// The command line with every `{mac:...}` filled in.
    cmdline: String,
    /// The state to return to when the start changes nothing.
    state_before: PartitionState,
}

/// A launch that did not get as far as a running monitor.
struct LaunchFailure {
    error: CoordError,
    /// Where the partition goes once its grant is released.
    outcome: Outcome,
}

enum Outcome {
    /// Nothing was started (e.g. a busy switch): back to where it was.
    Unchanged,
    /// It failed: `failed`, with an exit record naming `reason`.
    Failed { reason: &'static str },
}

impl Coordinator {
    /// Grants, spawns and waits until the monitor answers (or ends).
    pub async fn start(
        self: &Arc<Self>,
        id: &PartitionId,
        caller: &crate::access::Caller,
    ) -> Result<PartitionView, CoordError> {
        let t0 = Instant::now();
        let lock = self.lock_of(id);
        let guard = lock.lock().await;
        let prepared = self.prepare_start(id, caller)?;
        let affinity = self.grant(id, &prepared.def).await?;
        let t_granted = Instant::now();
        let files = self.files(id);
        let (proc_, record, t_io) = match self.launch(id, &prepared, affinity, &files).await {
            Ok(launched) => launched,
            Err(failure) => return Err(self.roll_back(id, &prepared, &files, failure).await),
        };
        let t_spawned = Instant::now();
        let live = self.register(id, record, files, false);
        self.place_in_cgroup(id, &live, prepared.def.share_milli());
        let phase = live.phase.subscribe();
        self.supervise(id.clone(), Arc::clone(&live), proc_);
        drop(guard);
        let (mut view, answered) = self.await_first_answer(id, phase).await?;
        if answered {
            let first = live.first_answer.locked().unwrap_or(t_spawned);
            let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            view.start_timings = Some(StartTimings {
                grant_us: us(t_granted - t0),
                io_us: us(t_io - t_granted),
                spawn_us: us(t_spawned - t_io),
                monitor_us: us(first.saturating_duration_since(t_spawned)),
                running_us: us(first.elapsed()),
                total_us: us(t0.elapsed()),
            });
        }
        Ok(view)
    }

    /// Step 1: the partition may start and its definition still holds
    /// (files may have gone since `create`), and `caller` can open its
    /// files (they are opened now, and part-vmm gets what was opened).
    /// Changes nothing.
    fn prepare_start(
        &self,
        id: &PartitionId,
        caller: &crate::access::Caller,
    ) -> Result<Prepared, CoordError> {
        // Under the partition's lock: the partition checked is the one
        // started.
        self.authorize(id, caller, "start")?;
        let rec = self.record(id)?;
        if is_active(rec.state) {
            return Err(CoordError::AlreadyActive {
                id: id.clone(),
                state: rec.state,
            });
        }
        let value: serde_json::Value = serde_json::from_str(&rec.definition).map_err(|source| {
            CoordError::StoredDefinition {
                id: id.clone(),
                source,
            }
        })?;
        let def = Definition::from_json(value, self.db.view().host()).map_err(|source| {
            CoordError::NoLongerValid {
                id: id.clone(),
                source,
            }
        })?;
        self.check_socket_paths(id, &def)?;
        let boot = self.open_boot_files(id, &def, &super::owner::opener(&def, caller), "start")?;
        // `{mac:NAME}` in the command line: the MACs granted at create;
        // `{cid:NAME}`: the CID a running partition holds.
        let cmdline = def
            .expand_cmdline(|placeholder| match placeholder {
                Placeholder::Mac(name, i) => {
                    let p = PartitionId::new(name).ok()?;
                    let macs = self.db.holdings(&p).ok()?.macs;
                    macs.get(i).map(ToString::to_string)
                }
                Placeholder::Cid(name) => {
                    let p = PartitionId::new(name).ok()?;
                    let cids = self.db.holdings(&p).ok()?.vsock_cids;
                    cids.first().map(ToString::to_string)
                }
            })
            .map_err(|source| CoordError::Cmdline {
                id: id.clone(),
                source,
            })?;
        Ok(Prepared {
            def,
            boot,
            cmdline,
            state_before: rec.state,
        })
    }

    /// Step 2: one transaction grants everything the partition needs,
    /// asserts the MACs it got at create, and records `starting`. Returns
    /// the host CPUs its vCPU threads may run on.
    async fn grant(&self, id: &PartitionId, def: &Definition) -> Result<Vec<u32>, CoordError> {
        let capacity = |reason: Rejection| CoordError::Capacity {
            action: "start",
            id: id.clone(),
            reason,
        };
        for _ in 0..PLAN_ATTEMPTS {
            let snap = self.db.snapshot()?;
            let rec = self.record(id)?;
            let held = snap.holdings(id);
            let mut demand = def.demand();
            // Created before partitions held uids: they are granted now.
            demand.uids = crate::definition::PARTITION_UIDS
                .saturating_sub(u32::try_from(held.uids.len()).unwrap_or(u32::MAX));
            let mut changes = snap.plan_grant(id, &demand).map_err(capacity)?;
            for uid in held.uids {
                changes.push(Change::Transfer {
                    resource: ResourceId::Uid(uid),
                    before: Owner::partition(id),
                    after: Owner::partition(id),
                });
            }
            for mac in held.macs {
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
            let affinity = if def.cpus.is_empty() {
                snap.host()
                    .cpus
                    .iter()
                    .copied()
                    .filter(|c| matches!(snap.owner(&ResourceId::Cpu(*c)), Ok(Owner::SharedPool)))
                    .collect()
            } else {
                def.cpus.clone()
            };
            match self.transact(changes).await {
                Ok(_) => return Ok(affinity),
                Err(e) if stale(&e) => continue,
                Err(e) => {
                    return Err(match e.rejection() {
                        Some(
                            r @ (Rejection::OverCapacity { .. }
                            | Rejection::Insufficient { .. }
                            | Rejection::Unavailable { .. }),
                        ) => capacity(r.clone()),
                        _ => e.into(),
                    })
                }
            }
        }
        Err(CoordError::Contended {
            id: id.clone(),
            what: "resources kept changing while planning",
        })
    }

    /// Step 3: the I/O partitions listen before the monitor starts; then
    /// the monitor is spawned from its sealed descriptor.
    async fn launch(
        &self,
        id: &PartitionId,
        prepared: &Prepared,
        affinity: Vec<u32>,
        files: &PartitionFiles,
    ) -> Result<(VmmProcess, VmmRecord, Instant), LaunchFailure> {
        let failed = |reason| {
            move |error| LaunchFailure {
                error,
                outcome: Outcome::Failed { reason },
            }
        };
        files
            .clear_run_files()
            .map_err(|source| CoordError::Monitor {
                id: id.clone(),
                source,
            })
            .map_err(failed("io-failed"))?;
        let ids = self.identities(id).map_err(failed("io-failed"))?;
        self.own(&files.run_dir(), ids.monitor, ids.monitor, 0o700)
            .map_err(failed("io-failed"))?;
        let devices = self
            .start_io(id, &prepared.def, &prepared.boot)
            .await
            .map_err(|error| match error {
                // A busy switch starts nothing: the partition stays as it was.
                CoordError::SwitchBusy { .. } => LaunchFailure {
                    error,
                    outcome: Outcome::Unchanged,
                },
                error => failed("io-failed")(error),
            })?;
        let t_io = Instant::now();
        let jail = self
            .monitor_jail(id, &prepared.def, files, &devices)
            .map_err(failed("spawn-failed"))?;
        let mut cfg = prepared.def.descriptor(&files.console(), affinity, devices);
        cfg.cmdline = prepared.cmdline.clone();
        let (proc_, record) = process::spawn(
            &self.settings.vmm,
            id.as_str(),
            &mut cfg,
            files,
            &prepared.boot,
            jail,
        )
        .map_err(|source| CoordError::Monitor {
            id: id.clone(),
            source,
        })
        .map_err(failed("spawn-failed"))?;
        if let Err(e) = process::write_json_atomic(&files.vmm_record(), &record) {
            tracing::warn!(
                "{id}: cannot write {}: {e}; a restarted partd will not find this VMM",
                files.vmm_record().display()
            );
        }
        Ok((proc_, record, t_io))
    }

    /// The one way back from a failed launch: record why (when it failed),
    /// stop what was started for it, release the grant and set the state.
    /// Returns the error the caller reports.
    async fn roll_back(
        &self,
        id: &PartitionId,
        prepared: &Prepared,
        files: &PartitionFiles,
        failure: LaunchFailure,
    ) -> CoordError {
        let after = match failure.outcome {
            Outcome::Unchanged => prepared.state_before,
            Outcome::Failed { reason } => {
                let record = ExitRecord {
                    pid: 0,
                    reason: reason.into(),
                    status: -1,
                    detail: failure.error.to_string(),
                };
                if let Err(e) = process::write_json_atomic(&files.exit_file(), &record) {
                    tracing::warn!("{id}: cannot write {}: {e}", files.exit_file().display());
                }
                PartitionState::Failed
            }
        };
        self.let_go(id, &prepared.def).await;
        match self.release(id, after).await {
            Ok(()) => failure.error,
            // The release is what the operator must see: the grant is still
            // held. The launch error is in the log.
            Err(e) => {
                tracing::error!(
                    "{id}: start failed ({}); releasing failed too",
                    failure.error
                );
                e
            }
        }
    }

    /// Puts the monitor in a cgroup of its own, weighted by its shared-pool
    /// share (a partition on dedicated CPUs, whose affinity confines it,
    /// gets the weight of one pool CPU). Moving a process between cgroups
    /// can take milliseconds (v1 waits for RCU), so it is done beside the
    /// start, not in its way; `finish` waits for it before removing the
    /// cgroup.
    fn place_in_cgroup(&self, id: &PartitionId, live: &Arc<Live>, share: u32) {
        let share = if share == 0 { 1000 } else { share };
        let cgroups = self.settings.cgroups.clone();
        let (name, pid) = (id.to_string(), live.record.pid);
        let placing = tokio::task::spawn_blocking(move || {
            if let Err(e) = cgroups.place(&name, pid, share) {
                tracing::warn!("{name}: its share is not weighted: {e}");
            }
        });
        *live.placing.locked() = Some(placing);
    }

    /// Last step: waits until the monitor first answers (the view, and
    /// `true`) or ends while starting (an error naming why). `false`: the
    /// supervisor went away first; the view is what the database says.
    async fn await_first_answer(
        &self,
        id: &PartitionId,
        mut phase: watch::Receiver<Phase>,
    ) -> Result<(PartitionView, bool), CoordError> {
        let waited =
            tokio::time::timeout(START_DEADLINE, phase.wait_for(|p| *p != Phase::Starting)).await;
        let (ended, answered) = match waited {
            Ok(Ok(p)) => match &*p {
                Phase::Ended(state) => (Some(*state), false),
                _ => (None, true),
            },
            Ok(Err(_)) => (None, false),
            Err(_) => {
                return Err(CoordError::StartTimeout {
                    id: id.clone(),
                    secs: START_DEADLINE.as_secs(),
                    log: self.files(id).vmm_log(),
                })
            }
        };
        let view = self.view(id)?;
        match ended {
            Some(state) => Err(CoordError::EndedWhileStarting {
                id: id.clone(),
                state,
                why: view.last_exit.map(|r| r.detail).unwrap_or_default(),
                log: self.files(id).vmm_log(),
            }),
            None => Ok((view, answered)),
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
