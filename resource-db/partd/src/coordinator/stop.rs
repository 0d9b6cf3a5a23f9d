//! Stopping a partition and what follows its end: the final state and the
//! release of what it held, committed only after its backends let go.

use super::*;

impl Coordinator {
    /// Polite (or forced) stop by `caller` (who must own the partition, or
    /// be root or partd's uid: checked under the partition's lock); returns
    /// once the monitor is gone and the resources are released.
    pub async fn stop(
        &self,
        id: &PartitionId,
        caller: &crate::access::Caller,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<PartitionView, CoordError> {
        let live = {
            let lock = self.lock_of(id);
            let _g = lock.lock().await;
            self.authorize(id, caller, "stop")?;
            let rec = self.record(id)?;
            if !is_active(rec.state) {
                return Err(CoordError::NotRunning {
                    id: id.clone(),
                    state: rec.state,
                });
            }
            let Some(live) = self.live_of(id) else {
                return Err(CoordError::NotSupervised {
                    id: id.clone(),
                    state: rec.state,
                });
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
        Err(CoordError::KillTimeout {
            id: id.clone(),
            pid: live.record.pid,
        })
    }

    // ----- supervision -----

    /// The monitor is gone: record why, release everything and set the final
    /// state, in one transaction.
    pub(super) async fn finish(
        &self,
        id: &PartitionId,
        live: &Live,
        ended: Option<Ended>,
    ) -> PartitionState {
        let lock = self.lock_of(id);
        let _g = lock.lock().await;
        let files = &live.files;
        let stop_requested = live.stop_requested.load(Ordering::SeqCst);
        let killed = live.killed_by_partd.load(Ordering::SeqCst);
        // The run directory was emptied before this monitor started, so a
        // record there is this monitor's: it names its pid, which is 1 for
        // a monitor that is the init of a pid namespace of its own (jailed).
        let recorded = process::read_json::<ExitRecord>(&files.exit_file())
            .filter(|r| r.pid == live.record.pid || r.pid == 1)
            .map(|r| ExitRecord {
                pid: live.record.pid,
                ..r
            });
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
    pub(super) async fn release(
        &self,
        id: &PartitionId,
        state: PartitionState,
    ) -> Result<(), CoordError> {
        for _ in 0..PLAN_ATTEMPTS {
            let rec = self.record(id)?;
            let snap = self.db.snapshot()?;
            // MACs and uids stay with the partition until destroy (granted
            // at create).
            let mut changes: Vec<Change> = snap
                .plan_release(id)
                .into_iter()
                .filter(|c| {
                    !matches!(
                        c,
                        Change::Transfer {
                            resource: ResourceId::Mac(_) | ResourceId::Uid(_),
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
        Err(CoordError::Contended {
            id: id.clone(),
            what: "kept changing during release",
        })
    }
}
