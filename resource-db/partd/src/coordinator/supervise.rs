//! The supervisor task of one running monitor: pings, end detection.

use super::*;

impl Coordinator {
    pub(super) fn supervise(
        self: &Arc<Self>,
        id: PartitionId,
        live: Arc<Live>,
        mut proc_: VmmProcess,
    ) {
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
}
