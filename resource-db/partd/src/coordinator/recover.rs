//! A restarted partd re-attaches to monitors that kept running and settles
//! the ones that ended while it was down.

use super::*;

impl Coordinator {
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
